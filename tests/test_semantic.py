"""Knowledge by meaning: the built-in multilingual model finds what was meant (bike for bicycle, a
day inside a range, everyday Chinese), follow-ups are searched with the question before them, the
words keep serving until the vectors are made, and a hosted model is held to the outbound limits."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import AUTH, UPSTREAM_KEY, post

SHOP = """# Riverside Cycles: questions we hear a lot

## When are you open?
We are open Tuesday to Sunday, from 9 am to 6 pm. We are closed on Mondays.

## Do you repair bicycles?
Yes. Our workshop services every kind of bicycle: brakes, gears, punctures and wheels. Most repairs
are done within one working day.

## Can I return something?
Unused items can be returned within 30 days with the receipt, for a full refund.
"""
SHOP_ZH = """# 河畔单车常见问题

## 可以退货吗？
未使用的商品凭购物小票在三十天内可以退货，全额退款。

## 周末营业吗？
周六和周日都营业，时间是上午九点到下午六点。
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    (folder / "faq.md").write_text(SHOP)
    (folder / "faq-zh.md").write_text(SHOP_ZH)
    return folder


def search(server, question: str) -> list[dict]:
    body = httpx.get(server.url + "/knowledge/search", params={"q": question}, headers=AUTH, timeout=30).json()
    return body["passages"]


def headings(server, question: str) -> list[str]:
    return [p["heading"].split(" › ")[-1] for p in search(server, question)]


@pytest.fixture(scope="module")
def by_meaning(shop, tmp_path_factory, upstream_server):
    """A server with the built-in model, its vectors made once for the module."""
    from custom_llm import create_app
    from custom_llm_server.serving.protocol import GuardedHttpTools
    from tests.conftest import ServerThread, settings_for

    index = tmp_path_factory.mktemp("index") / "index.sqlite3"
    settings = settings_for(
        upstream_server, knowledge_dir=shop, knowledge_index=str(index), embedding_model="multilingual-e5-small"
    )
    with ServerThread(create_app(settings), watched=True, http=GuardedHttpTools) as server:
        yield server


@pytest.mark.parametrize(
    "question, heading",
    [
        ("can you fix my bike?", "Do you repair bicycles?"),  # bike is not bicycle, to words
        ("are you open on Wednesday?", "When are you open?"),  # a day inside "Tuesday to Sunday"
        ("I want to bring back a helmet I never used, can I get my money back?", "Can I return something?"),
        ("我买的东西没用过，能退钱吗？", "可以退货吗？"),  # everyday Chinese for a formal answer
        ("星期天开门吗", "周末营业吗？"),
    ],
)
def test_meaning_finds_what_words_miss(by_meaning, question, heading):
    assert headings(by_meaning, question)[:1] == [heading]
    assert search(by_meaning, question)[0]["similarity"] >= 0.82  # the threshold (0.87 here), or standing out


@pytest.mark.parametrize(
    "question", ["thanks, bye!", "what's the weather in Paris today?", "who won the match last night?", "你好"]
)
def test_meaning_adds_nothing_to_small_talk_or_other_topics(by_meaning, question):
    assert search(by_meaning, question) == []


def test_words_alone_miss_the_paraphrase(make_server, shop, tmp_path):
    lexical = make_server(knowledge_dir=shop, knowledge_index=str(tmp_path / "words.sqlite3"), embedding_model="none")
    assert search(lexical, "can you fix my bike?") == []
    assert headings(lexical, "do you repair bicycles?")[:1] == ["Do you repair bicycles?"]


def test_a_follow_up_is_searched_with_the_question_before_it(by_meaning, upstream):
    body = {
        "stream": True,
        "messages": [
            {"role": "user", "content": "Do you repair bicycles?"},
            {"role": "assistant", "content": "Yes, our workshop does."},
            {"role": "user", "content": "and how long does it take?"},
        ],
    }
    post(by_meaning, body, "/rag/chat/completions").read()
    found = json.loads(upstream.requests[-1]["body"]["messages"][-1]["content"])
    assert found[0]["source"] == "faq.md › Riverside Cycles: questions we hear a lot › Do you repair bicycles?"


def test_rag_injects_exactly_what_knowledge_search_returns(by_meaning, upstream):
    question = "can you fix my bike?"
    post(by_meaning, {"stream": True, "messages": [{"role": "user", "content": question}]}, "/rag/chat/completions")
    injected = json.loads(upstream.requests[-1]["body"]["messages"][-1]["content"])
    assert [p["text"] for p in injected] == [p["text"] for p in search(by_meaning, question)][:3]


# --- a hosted model: the scripted upstream's /embeddings ------------------------------------------


def hosted(make_server, upstream_server, folder: Path, tmp_path: Path, **overrides):
    settings = {"embedding_model": "scripted-embed", "rag_min_similarity": 0.3, **overrides}
    return make_server(
        knowledge_dir=folder,
        knowledge_index=str(tmp_path / "hosted.sqlite3"),
        embedding_base_url=f"{upstream_server.url}/v1",
        **settings,
    )


def test_words_answer_while_the_vectors_are_made(upstream_server, upstream, shop, tmp_path):
    from custom_llm import create_app
    from tests.conftest import ServerThread, settings_for

    upstream.script.embedding_delay = 1.0  # every batch of passages takes its time
    settings = settings_for(
        upstream_server,
        knowledge_dir=shop,
        knowledge_index=str(tmp_path / "slow.sqlite3"),
        embedding_model="scripted-embed",
        embedding_base_url=f"{upstream_server.url}/v1",
        rag_min_similarity=0.3,
    )
    server = ServerThread(create_app(settings), watched=True)
    server.thread.start()
    try:
        service = server.server.config.app.state.agents.get("default")
        while not (server.server.started and service.retriever.ready):  # the words are indexed...
            time.sleep(0.01)
        assert not service.retriever.embedding.done()  # ...the vectors are still being made...
        assert headings(server, "do you repair bicycles?")[:1] == ["Do you repair bicycles?"]  # ...and it answers
        assert len(upstream.embedding_requests) == 1  # by words: the question was not embedded
        while not service.retriever.embedding.done():
            time.sleep(0.05)
        upstream.script.embedding_delay = 0
        headings(server, "do you repair bicycles?")
        assert upstream.embedding_requests[-1] == ["do you repair bicycles?"]  # now by meaning too
    finally:
        server.__exit__()


def test_a_new_model_makes_the_vectors_again(make_server, upstream_server, upstream, shop, tmp_path):
    hosted(make_server, upstream_server, shop, tmp_path)
    first = sum(len(batch) for batch in upstream.embedding_requests)
    hosted(make_server, upstream_server, shop, tmp_path)  # the same model: nothing to embed
    assert sum(len(batch) for batch in upstream.embedding_requests) == first
    hosted(make_server, upstream_server, shop, tmp_path, embedding_model="scripted-embed-v2")
    assert sum(len(batch) for batch in upstream.embedding_requests) == 2 * first


def test_a_hosted_model_is_held_to_the_outbound_limits(make_server, upstream_server, upstream, shop, tmp_path, caplog):
    server = hosted(make_server, upstream_server, shop, tmp_path)
    upstream.script.embedding_status = 401  # its error quotes our key
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        assert headings(server, "do you repair bicycles?")[:1] == ["Do you repair bicycles?"]  # by words
    assert "searching by words" in caplog.text and UPSTREAM_KEY not in caplog.text


# --- the threshold: calibrated for each knowledge base ---------------------------------------------


def passages_at(similarities: list[float], probes: np.ndarray) -> np.ndarray:
    """Unit vectors, one per probe, each at the given similarity to its probe (and orthogonal to the rest)."""
    count, dim = probes.shape
    rows = np.zeros((count, dim), dtype=np.float32)
    for i, similarity in enumerate(similarities):
        rows[i, i] = similarity
        rows[i, count + i] = np.sqrt(1 - similarity**2)  # a direction no probe has
    return rows


def test_the_threshold_is_the_background_plus_a_margin_within_bounds():
    from custom_llm_server.knowledge import calibration

    probes = {"en": np.eye(9, 32, dtype=np.float32)}
    en = probes["en"]
    near = [0.79, 0.80, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87]
    assert calibration.threshold(passages_at(near, en), probes) == pytest.approx(0.83 + calibration.MARGIN)
    higher = passages_at([s + 0.02 for s in near], en)  # passages that come closer to everything
    assert calibration.threshold(higher, probes) == pytest.approx(0.85 + calibration.MARGIN)
    # a few probes the knowledge base does answer (a cookery FAQ and the soup question) do not move it
    assert calibration.background(passages_at([*near[:6], 1.0, 1.0, 1.0], en), probes) == pytest.approx(0.83)
    assert calibration.threshold(passages_at([0.5] * 9, en), probes) == calibration.FLOOR
    assert calibration.threshold(passages_at([0.99] * 9, en), probes) == calibration.CEILING
    many = np.concatenate([passages_at([0.5] * 9, en)] * 2000 + [passages_at(near, en)])  # past one block
    assert calibration.background(many, probes) == pytest.approx(0.83)


def test_the_background_is_in_the_language_that_comes_nearer():
    """Probes in a language the knowledge base is not written in are far from all of it: they do not
    pull its background down."""
    from custom_llm_server.knowledge import calibration

    both = {"en": np.eye(9, 64, dtype=np.float32), "zh": np.eye(9, 64, 27, dtype=np.float32)}
    english = passages_at([0.84] * 9, both["en"])  # near the English probes, orthogonal to the Chinese
    assert calibration.background(english, both) == pytest.approx(0.84)


def test_each_knowledge_base_calibrates_its_threshold(by_meaning, shop, tmp_path, make_server):
    from custom_llm_server.knowledge import calibration

    base = by_meaning.server.config.app.state.agents.get("default").retriever.base
    assert base.probes is not None
    assert {lang: len(vectors) for lang, vectors in base.probes.items()} == {
        lang: len(asked) for lang, asked in calibration.PROBES.items()
    }
    background = calibration.background(base._vectors, base.probes)
    assert 0.7 < background < calibration.FLOOR - calibration.MARGIN  # five answers: little comes near anything
    assert base.min_similarity == calibration.FLOOR
    fixed = make_server(  # RAG_MIN_SIMILARITY wins, and nothing is calibrated
        knowledge_dir=shop,
        knowledge_index=str(tmp_path / "fixed.sqlite3"),
        embedding_model="multilingual-e5-small",
        rag_min_similarity=0.95,
    )
    base = fixed.server.config.app.state.agents.get("default").retriever.base
    assert base.min_similarity == 0.95 and base.probes is None
    assert search(fixed, "can you fix my bike?") == []  # 0.95: nothing this shop says is that close


def test_one_passage_does_not_stand_out_from_nothing(make_server, tmp_path):
    """With one passage there is nothing to stand out from: it answers only above the threshold (or
    near it with the question's words). A question about the same shop that it does not answer, at
    0.84, got it before."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "faq.md").write_text(
        "# Harbor Street Bakery\n\n## Do you deliver?\n"
        "We deliver within five kilometres for orders over 30 dollars. Delivery costs 4 dollars.\n"
    )
    server = make_server(
        knowledge_dir=folder, knowledge_index=str(tmp_path / "one.sqlite3"), embedding_model="multilingual-e5-small"
    )
    assert headings(server, "how much is delivery?") == ["Do you deliver?"]
    for question in ("are you hiring bakers?", "what's the weather like today?", "今天股市怎么样？"):
        assert search(server, question) == [], question
