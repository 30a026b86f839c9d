"""/rag/chat/completions: waiting phrase first, then retrieval, context injection and the answer."""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import API_KEY, sse_events

AUTH = {"authorization": f"Bearer {API_KEY}"}


def ask(server, question: str, **extra) -> httpx.Response:
    body = {"messages": [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": question}], **extra}
    return httpx.post(server.url + "/rag/chat/completions", json=body, headers=AUTH, timeout=10)


def delta(event: bytes) -> dict:
    return json.loads(event)["choices"][0]["delta"]


def test_waiting_phrase_comes_first_then_the_answer(server, upstream):
    events = sse_events(ask(server, "How do I set the llm url of my agent?"))
    waiting = delta(events[0])
    assert waiting["role"] == "assistant" and waiting["content"].rstrip() in (
        "Let me check that for you.", "One moment, let me look that up.", "Good question, let me find out.")
    assert waiting["content"].endswith(" ")  # a sentence of its own before the answer
    assert [b"data: " + e + b"\n\n" for e in events[1:-1]] == upstream.events()
    assert events[-1] == b"[DONE]"


def test_waiting_phrase_is_sent_before_retrieval_finishes(server, upstream):
    knowledge = server.server.config.app.state.knowledge
    knowledge._lock.acquire()  # retrieval cannot finish while the test holds the index
    try:
        with httpx.stream("POST", server.url + "/rag/chat/completions", headers=AUTH, timeout=10,
                          json={"messages": [{"role": "user", "content": "What is the audio format?"}]}) as response:
            lines = response.iter_lines()
            assert delta(next(lines)[6:].encode())["content"]
            time.sleep(0.1)
            assert upstream.requests == []
            knowledge._lock.release()
            rest = list(lines)
    finally:
        if knowledge._lock.locked():
            knowledge._lock.release()
    assert "data: [DONE]" in rest and len(upstream.requests) == 1


def test_passages_are_injected_after_the_callers_system_messages(server, upstream):
    ask(server, "How do I point the llm url of my agent at the server?").read()
    messages = upstream.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert messages[0]["content"] == "You are Ada."
    context = messages[1]["content"]
    assert "agora-setup.md › Pointing an Agora agent at the server › The llm block" in context
    assert "appends no path" in context  # the fact itself, not just its title
    assert "say you don't know" in context


def test_chinese_question_gets_a_chinese_waiting_phrase_and_chinese_passages(make_server, upstream):
    server = make_server(waiting_messages={"en": ("Hold on.",), "zh": ("请稍等。",)})
    events = sse_events(ask(server, "音频格式是什么？"))
    assert delta(events[0])["content"] == "请稍等。"
    assert "1280 字节" in upstream.requests[-1]["body"]["messages"][1]["content"]
    events = sse_events(ask(server, "What audio format do you send?"))
    assert delta(events[0])["content"] == "Hold on. "


def test_no_match_means_no_context_message(server, upstream):
    ask(server, "xyzzy plugh").read()
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["system", "user"]


def test_non_streaming_rag_answers_with_context(client, upstream):
    client = client.with_options(base_url=str(client.base_url).rstrip("/") + "/rag")
    completion = client.chat.completions.create(
        model="m", stream=False, messages=[{"role": "user", "content": "What is the audio chunk size?"}])
    assert completion.choices[0].message.content == "Hello from the upstream."
    assert "1280" in upstream.requests[-1]["body"]["messages"][0]["content"]


def test_sdk_streams_rag(client, upstream):
    client = client.with_options(base_url=str(client.base_url).rstrip("/") + "/rag")
    stream = client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "Hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.endswith("Hello from the upstream.") and len(text) > len("Hello from the upstream.")


def test_upstream_failure_after_the_waiting_phrase_is_an_error_event(server, upstream):
    upstream.script.status = 500
    events = sse_events(ask(server, "Hi"))
    assert delta(events[0])["content"]
    assert json.loads(events[1])["error"]["code"] == "upstream_failed"
    assert events[2:] == [b"[DONE]"]


def test_disconnect_during_rag_cancels_the_upstream(server, upstream):
    upstream.script.first_delay = 5
    with httpx.stream("POST", server.url + "/rag/chat/completions", headers=AUTH, timeout=10,
                      json={"messages": [{"role": "user", "content": "Hi"}]}) as response:
        lines = response.iter_lines()  # kept: a dropped iterator would close the connection early
        next(lines)
        deadline = time.monotonic() + 2
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.005)
    closed_at = time.monotonic()
    assert upstream.disconnected.wait(2)
    assert upstream.disconnected_at - closed_at < 0.5
