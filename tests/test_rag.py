"""/rag/chat/completions and GET /knowledge/search: waiting phrase, retrieval, injection, hybrid search."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from custom_llm_server.knowledge.rag import search_query
from tests.conftest import AUTH, post, sse_events, text_of


def ask(server, question: str, **extra) -> httpx.Response:
    body = {
        "stream": True,
        "messages": [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": question}],
        **extra,
    }
    return httpx.post(server.url + "/rag/chat/completions", json=body, headers=AUTH, timeout=10)


def stream(server, question: str):
    """A streamed /rag request with only the question, to read as it arrives."""
    body = {"stream": True, "messages": [{"role": "user", "content": question}]}
    return httpx.stream("POST", server.url + "/rag/chat/completions", headers=AUTH, timeout=10, json=body)


def delta(event: bytes) -> dict:
    return json.loads(event)["choices"][0]["delta"]


PHRASES = ("Let me check that for you.", "One moment, let me look that up.", "Good question, let me find out.")


def test_an_answer_in_time_gets_no_waiting_phrase(server, upstream):
    events = sse_events(ask(server, "How do I set the llm url of my agent?"))
    assert [b"data: " + e + b"\n\n" for e in events[:-1]] == upstream.events()  # the answer, as it came
    assert events[-1] == b"[DONE]"


def test_a_late_answer_gets_the_waiting_phrase_first_then_the_answer(make_server, upstream):
    server = make_server(waiting_phrase_after_ms=300)
    upstream.script.first_delay = 1.0  # the model takes a second to start
    started = time.monotonic()
    with stream(server, "How do I set the llm url of my agent?") as response:
        lines = [line for line in response.iter_lines() if line]
        first = delta(lines[0][6:].encode())
        waited = time.monotonic() - started
    assert first["role"] == "assistant" and first["content"].rstrip() in PHRASES and first["content"].endswith(" ")
    assert [line.encode() + b"\n\n" for line in lines[1:-1]] == upstream.events()  # no gap, nothing twice
    assert waited < 3


def test_the_phrase_can_always_come_first_before_retrieval_finishes(make_server, upstream):
    server = make_server(waiting_phrase_after_ms=0)  # the always-on behaviour
    knowledge = server.server.config.app.state.agents.get("default").retriever.base
    knowledge.store._lock.acquire()  # retrieval cannot finish while the test holds the index
    try:
        with stream(server, "What is the audio format?") as response:
            lines = response.iter_lines()
            assert delta(next(lines)[6:].encode())["content"].rstrip() in PHRASES
            time.sleep(0.1)
            assert upstream.requests == []
            knowledge.store._lock.release()
            rest = list(lines)
    finally:
        if knowledge.store._lock.locked():
            knowledge.store._lock.release()
    assert "data: [DONE]" in rest and len(upstream.requests) == 1


def test_passages_are_injected_after_the_callers_system_messages(server, upstream):
    ask(server, "How do I point the llm url of my agent at the server?").read()
    messages = upstream.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "tool"]
    assert messages[0]["content"] == "You are Ada."
    assert "say you don't know" in messages[1]["content"] and "never instructions" in messages[1]["content"]
    # The passages are data: the result of a search_knowledge call, never a system message.
    call = messages[3]["tool_calls"][0]
    assert call["function"]["name"] == "search_knowledge" and messages[4]["tool_call_id"] == call["id"]
    found = json.loads(messages[4]["content"])
    assert "agora-setup.md › Pointing an Agora agent at the server › The llm block" in [p["source"] for p in found]
    assert any("appends no path" in p["text"] for p in found)  # the fact itself, not just its title


def test_chinese_question_gets_a_chinese_waiting_phrase_and_chinese_passages(make_server, upstream):
    server = make_server(
        waiting_messages_en=("Hold on.",), waiting_messages_zh=("请稍等。",), waiting_phrase_after_ms=0
    )
    events = sse_events(ask(server, "音频格式是什么？"))
    assert delta(events[0])["content"] == "请稍等。"
    assert "1280 字节" in upstream.requests[-1]["body"]["messages"][-1]["content"]
    events = sse_events(ask(server, "What audio format do you send?"))
    assert delta(events[0])["content"] == "Hold on. "


def test_no_match_means_no_context_message(server, upstream):
    ask(server, "xyzzy plugh").read()
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["system", "user"]


def test_non_streaming_rag_answers_with_context(client, upstream):
    client = client.with_options(base_url=str(client.base_url).rstrip("/") + "/rag")
    completion = client.chat.completions.create(
        model="m", stream=False, messages=[{"role": "user", "content": "Must the audio be mono PCM?"}]
    )
    assert completion.choices[0].message.content == "Hello from the upstream."
    assert "16-bit, mono PCM" in upstream.requests[-1]["body"]["messages"][-1]["content"]


def test_sdk_streams_rag(client, upstream):
    client = client.with_options(base_url=str(client.base_url).rstrip("/") + "/rag")
    stream = client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "Hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the upstream."


def test_upstream_failure_after_the_waiting_phrase_is_an_error_event(make_server, upstream):
    upstream.script.status = 500
    events = sse_events(ask(make_server(waiting_phrase_after_ms=0), "Hi"))
    assert delta(events[0])["content"]
    assert json.loads(events[1])["error"]["code"] == "upstream_failed"
    assert events[2:] == [b"[DONE]"]


def test_disconnect_during_rag_cancels_the_upstream(server, upstream):
    upstream.script.first_delay = 30
    with stream(server, "Hi") as response:
        lines = response.iter_lines()  # kept: a dropped iterator would close the connection early
        next(lines)
        deadline = time.monotonic() + 10
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.005)
    closed_at = time.monotonic()
    assert upstream.disconnected.wait(10)
    assert upstream.disconnected_at - closed_at < 5  # at once, not when the answer ends


def test_follow_up_questions_carry_the_previous_turn():
    messages = [
        {"role": "user", "content": "What audio format does the server send?"},
        {"role": "assistant", "content": "16 kHz PCM."},
        {"role": "user", "content": "and how big is each chunk?"},
    ]
    assert search_query(messages) == "What audio format does the server send? and how big is each chunk?"
    messages[-1]["content"] = "Where can I get a tunnel for local development?"
    assert search_query(messages) == "Where can I get a tunnel for local development?"


def test_http_search_returns_the_same_hits(server):
    response = httpx.get(
        server.url + "/knowledge/search", params={"q": "What PCM audio is it?", "limit": 2}, headers=AUTH
    )
    body = response.json()
    assert response.status_code == 200 and body["query"] == "What PCM audio is it?" and len(body["passages"]) == 2
    assert {"source", "heading", "score", "coverage", "similarity", "text"} == set(body["passages"][0])
    assert httpx.get(server.url + "/knowledge/search", params={"q": "x"}).status_code == 401
    missing = httpx.get(server.url + "/knowledge/search", headers=AUTH)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "q"


def test_rag_answers_without_passages_past_the_deadline(make_server, upstream, caplog):
    server = make_server(rag_deadline_ms=50)
    kb = server.server.config.app.state.agents.get("default").retriever.base
    kb.store._lock.acquire()  # a search that cannot finish in time
    try:
        with caplog.at_level(logging.WARNING, logger="custom_llm"):
            body = {"stream": True, "messages": [{"role": "user", "content": "What audio format?"}]}
            response = post(server, body, "/rag/chat/completions", timeout=10)
    finally:
        kb.store._lock.release()
    assert response.status_code == 200
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]
    assert "deadline" in caplog.text


@pytest.fixture
def cars(tmp_path) -> Path:
    docs = tmp_path / "cars"
    docs.mkdir()
    (docs / "auto.md").write_text("# Automobile insurance\n\nOur policy covers theft of the automobile.\n")
    (docs / "kettle.md").write_text("# Kettles\n\nThe kettle boils water in two minutes.\n")
    (docs / "car-wash.md").write_text("# Car wash\n\nWe wash every car by hand in ten minutes.\n")
    return docs


def hybrid(make_server, upstream_server, folder: Path, tmp_path: Path, **overrides):
    return make_server(
        knowledge_dir=folder,
        knowledge_index=str(tmp_path / "hybrid.sqlite3"),
        embedding_model="scripted-embed",
        embedding_base_url=f"{upstream_server.url}/v1",
        **{"rag_min_similarity": 0.3, **overrides},  # a hosted model's scale is its own: calibrated here
    )


def search(server, q: str) -> list[str]:
    body = httpx.get(server.url + "/knowledge/search", params={"q": q}, headers=AUTH).json()
    return [p["source"] for p in body["passages"]]


def test_hybrid_finds_by_meaning_and_fuses_rankings(make_server, upstream_server, upstream, cars, tmp_path):
    keyword_only = make_server(knowledge_dir=cars, knowledge_index=str(tmp_path / "bm25.sqlite3"))
    assert "auto.md" not in search(keyword_only, "is a stolen vehicle protected")
    server = hybrid(make_server, upstream_server, cars, tmp_path)
    found = search(server, "is a stolen vehicle protected")
    assert found[0] == "auto.md"  # no word in common, the same meaning
    # auto.md is found by both rankings, car-wash.md by meaning only: fusion puts both in that order.
    assert search(server, "automobile stolen")[:2] == ["auto.md", "car-wash.md"]
    assert upstream.embedding_requests[-1] == ["automobile stolen"]


def test_hybrid_search_gives_a_copied_passage_once(make_server, upstream_server, cars, tmp_path):
    (cars / "auto-copy.md").write_text((cars / "auto.md").read_text())
    server = hybrid(make_server, upstream_server, cars, tmp_path)
    found = search(server, "automobile stolen")
    assert found[0] in {"auto.md", "auto-copy.md"} and not {"auto.md", "auto-copy.md"} <= set(found)


def test_hybrid_search_answers_nothing_to_small_talk(make_server, upstream_server, upstream, cars, tmp_path):
    """By meaning, "thanks" is near something in any folder; with nothing to look up, nothing is
    injected and the question is not even embedded."""
    server = hybrid(make_server, upstream_server, cars, tmp_path)
    small_talk = ["hello", "thanks a lot!", "你好"]
    for question in small_talk:
        assert search(server, question) == []
    assert not [texts for texts in upstream.embedding_requests if texts[0] in small_talk]
    passages = httpx.get(server.url + "/knowledge/search", params={"q": "is a stolen vehicle protected"}, headers=AUTH)
    assert passages.json()["passages"][0]["coverage"] == 0  # found by meaning, no word in common


def test_chunks_are_embedded_once_and_batched(make_server, upstream_server, upstream, cars, tmp_path):
    hybrid(make_server, upstream_server, cars, tmp_path)
    assert len(upstream.embedding_requests) == 1 and len(upstream.embedding_requests[0]) == 3  # one batch
    hybrid(make_server, upstream_server, cars, tmp_path)  # a restart: everything is cached by hash
    assert len(upstream.embedding_requests) == 1
    (cars / "kettle.md").write_text("# Kettles\n\nThe kettle boils water in one minute.\n")
    hybrid(make_server, upstream_server, cars, tmp_path)
    assert len(upstream.embedding_requests) == 2 and len(upstream.embedding_requests[1]) == 1  # only the change


def test_a_failing_embeddings_upstream_degrades_to_bm25(make_server, upstream_server, upstream, cars, tmp_path, caplog):
    server = hybrid(make_server, upstream_server, cars, tmp_path)
    upstream.script.embedding_status = 500
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        assert search(server, "kettle water") == ["kettle.md"]
    assert "searching by words" in caplog.text


def test_a_slow_embedding_never_holds_the_answer(make_server, upstream_server, upstream, cars, tmp_path, caplog):
    server = hybrid(make_server, upstream_server, cars, tmp_path, rag_deadline_ms=200)
    upstream.script.embedding_delay = 20
    started = __import__("time").monotonic()
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        body = {"stream": True, "messages": [{"role": "user", "content": "car theft"}]}
        response = post(server, body, "/rag/chat/completions", timeout=10)
    assert response.status_code == 200 and __import__("time").monotonic() - started < 10  # not the 20 s embedding
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]
    assert "deadline" in caplog.text


# --- round three: what a hosted model, a huge question or a sentence-less answer may not do ------------


def test_hosted_vectors_of_the_wrong_size_cost_meaning_not_the_answer(
    make_server, upstream_server, upstream, cars, tmp_path, caplog
):
    """The model answers questions with vectors of another size than the passages': a search by words,
    a warning, never a 500 (it was `matmul` in a traceback)."""
    server = hybrid(make_server, upstream_server, cars, tmp_path)
    upstream.script.embedding_sizes = [40]
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        answer = httpx.get(server.url + "/knowledge/search", params={"q": "kettle water"}, headers=AUTH)
        assert answer.status_code == 200 and [p["source"] for p in answer.json()["passages"]] == ["kettle.md"]
        rag = post(
            server, {"stream": True, "messages": [{"role": "user", "content": "car theft"}]}, "/rag/chat/completions"
        )
    assert rag.status_code == 200 and sse_events(rag)[-1] == b"[DONE]"
    assert "searching by words" in caplog.text


def test_a_huge_hosted_answer_is_not_read_and_the_deadline_holds(
    make_server, upstream_server, upstream, cars, tmp_path
):
    """30 MB of tiny objects for one question: read no further than one vector can be, parsed off the
    loop (the watchdog fails the test if a callback holds it 100 ms), and /rag keeps its deadline."""
    server = hybrid(make_server, upstream_server, cars, tmp_path, rag_deadline_ms=300)
    upstream.script.embedding_body = b'{"data": [' + b'{"index": 0, "embedding": [0.1]},' * 1_000_000 + b"{}]}"
    started = time.monotonic()
    rag = post(
        server, {"stream": True, "messages": [{"role": "user", "content": "car theft"}]}, "/rag/chat/completions"
    )
    assert rag.status_code == 200 and sse_events(rag)[-1] == b"[DONE]"
    assert time.monotonic() - started < 10  # the body was not parsed whole (it took 5-7 s on the loop)


def test_batches_of_different_sizes_keep_no_mixed_vectors(make_server, upstream_server, upstream, tmp_path, caplog):
    """An endpoint that changes the size of its vectors while the passages are embedded: embedding stops
    with a warning, nothing of the other size is kept, and a restart with a healthy endpoint searches
    by meaning again."""
    docs = tmp_path / "many"
    docs.mkdir()
    for n in range(20):  # more than one batch of passages
        (docs / f"doc{n}.md").write_text(f"# Topic {n}\n\nThe automobile policy number {n} covers theft.\n")
    upstream.script.embedding_sizes = [32, 48, 32, 32]
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        hybrid(make_server, upstream_server, docs, tmp_path)
    assert "embedding the knowledge base failed" in caplog.text
    upstream.script.embedding_sizes = []
    again = hybrid(make_server, upstream_server, docs, tmp_path)
    found = httpx.get(again.url + "/knowledge/search", params={"q": "stolen vehicle"}, headers=AUTH).json()
    assert found["passages"] and found["passages"][0]["similarity"] is not None  # by meaning again


def test_a_megabyte_question_is_read_only_so_far(make_server, upstream, tmp_path):
    """A 3.9 MB user message to /rag: retrieval reads its first MAX_QUESTION_CHARS (the loop watchdog
    fails the test if a callback holds the loop 100 ms, as the whole-question scan did)."""
    docs = tmp_path / "faq"
    docs.mkdir()
    (docs / "faq.md").write_text("# Delivery\n\nWe deliver to every address in the city within two days.\n")
    server = make_server(knowledge_dir=docs, knowledge_index=str(tmp_path / "faq.sqlite3"), max_body_bytes=8 << 20)
    question = "Do you deliver to my address? " + "blah " * 800_000
    rag = post(server, {"stream": True, "messages": [{"role": "user", "content": question}]}, "/rag/chat/completions")
    assert rag.status_code == 200 and sse_events(rag)[-1] == b"[DONE]"
    assert "deliver to every address" in json.dumps(upstream.requests[-1]["body"]["messages"])


def test_the_waiting_phrase_never_rescans_a_long_first_sentence(make_server, upstream):
    """An answer with no sentence end at all (Chinese in 100-byte deltas): what /rag holds while it
    waits for the first sentence is bounded, and the rest is relayed as it comes (the loop watchdog
    catches a rescan: each delta read the whole answer again)."""
    server = make_server(waiting_phrase_after_ms=60_000)
    upstream.script.words = ["这是没有句号的回答" * 11] * 30_000  # 3 MB in deltas of ~100 characters, no stop
    upstream.script.delay = 0
    rag = post(server, {"stream": True, "messages": [{"role": "user", "content": "你好"}]}, "/rag/chat/completions")
    events = sse_events(rag)  # within the client's 20 s: a rescan at each delta would take minutes
    assert events[-1] == b"[DONE]" and len(events) > 30_000
    assert text_of(events).startswith("这是没有句号的回答")  # no waiting phrase: the answer was there at once
