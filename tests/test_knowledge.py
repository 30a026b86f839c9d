"""The knowledge base: ingest, chunking, the persistent incremental index, search, and /rag's use of it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import knowledge
from custom_llm import search_query
from knowledge import KnowledgeBase
from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"authorization": f"Bearer {API_KEY}"}


def pdf_with_text(lines: list[str]) -> bytes:
    """A minimal one-page PDF whose text pypdf can extract."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


@pytest.fixture
def folder(tmp_path) -> Path:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "shop.md").write_text("# Shop\n\n## Opening hours\n\nWe open at nine on weekdays and at ten on weekends.\n\n"
                                  "## Delivery\n\nDelivery inside the ring road is free for orders above forty euros.\n")
    (docs / "sub" / "returns.txt").write_text("Returns are accepted within thirty days with the receipt.\n")
    (docs / "page.html").write_text("<html><head><style>.x{}</style><script>var hidden=1</script></head><body>"
                                    "<h1>Warranty</h1><p>Every kettle carries a <b>two year</b> warranty.</p>"
                                    "<h2>Claims</h2><p>Send claims to the service desk.</p></body></html>")
    (docs / "manual.pdf").write_bytes(pdf_with_text(["Descaling the kettle", "Use citric acid once a month."]))
    (docs / "faq.md").write_text("# 常见问题\n\n## 付款\n\n我们接受支付宝和微信支付，也接受银行卡。\n")
    (docs / "notes.bin").write_bytes(b"\0\1\2")  # not a document type: ignored
    return docs


def make_kb(folder: Path, tmp_path: Path, **kw) -> KnowledgeBase:
    return KnowledgeBase(folder, tmp_path / "index.sqlite3", **kw)


def top(kb: KnowledgeBase, question: str) -> str:
    hits = kb.search(question, 1)
    return hits[0].citation() if hits else ""


def test_every_format_is_ingested_and_cited(folder, tmp_path):
    kb = make_kb(folder, tmp_path)
    report = kb.index()
    assert report.files == 5 and report.indexed == 5 and not report.skipped
    assert top(kb, "When do you open on weekends?") == "shop.md › Shop › Opening hours"
    assert top(kb, "Is delivery free?") == "shop.md › Shop › Delivery"
    assert top(kb, "how long can I return things") == "sub/returns.txt"
    assert top(kb, "what warranty does the kettle have") == "page.html › Warranty"
    assert "hidden" not in json.dumps([p.text for p in kb.search("var hidden", 5)])  # scripts are not text
    assert top(kb, "how do I descale it with citric acid") == "manual.pdf"


def test_chinese_and_english_questions(folder, tmp_path):
    kb = make_kb(folder, tmp_path)
    kb.index()
    assert top(kb, "可以用微信付款吗？") == "faq.md › 常见问题 › 付款"
    assert top(kb, "Can I pay with WeChat? 付款") == "faq.md › 常见问题 › 付款"


def test_noisy_spoken_questions_still_find_the_passage(folder, tmp_path):
    kb = make_kb(folder, tmp_path)
    kb.index()
    assert top(kb, "when do you opan on the weekend") == "shop.md › Shop › Opening hours"  # misheard word
    assert top(kb, "deliv inside the ring") == "shop.md › Shop › Delivery"  # cut-off words
    assert top(kb, "is delivering free") == "shop.md › Shop › Delivery"  # another word form
    assert top(kb, "what is the warrenty on the kettle") == "page.html › Warranty"  # a word the index lacks
    assert top(kb, "how do I de scale it") == "manual.pdf"  # one word heard as two


def test_chunks_are_bounded_overlap_and_keep_their_heading(tmp_path):
    sentences = [f"Fact number {n} is that item {n} weighs {n} kilos." for n in range(120)]
    (tmp_path / "long.md").write_text("# Catalogue\n\n## Weights\n\n" + "\n\n".join(sentences))
    chunks = knowledge.chunk_markdown((tmp_path / "long.md").read_text())
    assert len(chunks) > 3
    assert all(heading == "Catalogue › Weights" for heading, _ in chunks)
    assert all(len(text) <= knowledge.MAX_CHUNK_CHARS + knowledge.OVERLAP_CHARS + 10 for _, text in chunks)
    for (_, before), (_, after) in zip(chunks, chunks[1:]):
        assert after.split(" …")[0] in before  # each chunk starts with the end of the one before
    joined = " ".join(text for _, text in chunks)
    assert all(sentence in joined for sentence in sentences)


def test_reindexing_touches_only_what_changed(folder, tmp_path):
    kb = make_kb(folder, tmp_path)
    kb.index()
    assert kb.index().indexed == 0  # nothing changed: nothing read
    (folder / "sub" / "returns.txt").write_text("Returns are accepted within sixty days.\n")
    (folder / "new.md").write_text("# Gift cards\n\nGift cards never expire.\n")
    (folder / "page.html").unlink()
    shop = folder / "shop.md"
    shop.write_text(shop.read_text())  # touched, same content
    report = kb.index()
    assert (report.indexed, report.removed) == (2, 1)
    assert "sixty" in kb.search("how long can I return things", 1)[0].text
    assert top(kb, "do gift cards expire") == "new.md › Gift cards"
    assert kb.search("kettle warranty", 5) == [] or all(p.source != "page.html" for p in kb.search("kettle warranty", 5))


def test_the_index_survives_a_restart(folder, tmp_path):
    make_kb(folder, tmp_path).index()
    again = make_kb(folder, tmp_path)
    assert top(again, "When do you open on weekends?") == "shop.md › Shop › Opening hours"  # before any index()
    assert again.index().indexed == 0


def test_bad_files_are_skipped_and_counted(folder, tmp_path, caplog, monkeypatch):
    (folder / "empty.md").write_text("")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "binary.txt").write_bytes(b"text\0with a nul")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (folder / "huge.md").write_text("x" * 2000)
    monkeypatch.setattr(knowledge, "MAX_FILE_BYTES", 1000)
    with caplog.at_level(logging.WARNING):
        report = make_kb(folder, tmp_path).index()
    assert sorted(s.split(":")[0] for s in report.skipped) == ["binary.txt", "broken.pdf", "empty.md", "huge.md", "latin1.txt"]
    assert report.indexed == 5 and "skipping knowledge file" in caplog.text


def test_a_corrupt_index_is_rebuilt(folder, tmp_path):
    (tmp_path / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    kb = make_kb(folder, tmp_path)
    assert kb.index().indexed == 5 and top(kb, "Is delivery free?")


def test_an_empty_or_missing_folder_still_serves(tmp_path):
    kb = KnowledgeBase(tmp_path / "nothing", tmp_path / "i.sqlite3")
    assert kb.index().files == 0 and kb.search("anything", 3) == []


def test_the_relevance_floor_keeps_weak_matches_out(folder, tmp_path):
    kb = make_kb(folder, tmp_path, min_score=3.0)
    kb.index()
    assert kb.search("the", 3) == []
    assert top(kb, "When do you open on weekends?") == "shop.md › Shop › Opening hours"


def test_follow_up_questions_carry_the_previous_turn():
    messages = [{"role": "user", "content": "What audio format does the server send?"},
                {"role": "assistant", "content": "16 kHz PCM."},
                {"role": "user", "content": "and how big is each chunk?"}]
    assert search_query(messages) == "What audio format does the server send? and how big is each chunk?"
    messages[-1]["content"] = "Where can I get a tunnel for local development?"
    assert search_query(messages) == "Where can I get a tunnel for local development?"


def test_cli_index_and_search(folder, tmp_path):
    index = tmp_path / "cli.sqlite3"
    run = lambda *args: subprocess.run([sys.executable, "knowledge.py", "--index-file", str(index), *args],  # noqa: E731
                                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    first = run("index", str(folder))
    assert first.returncode == 0 and "5 files (5 indexed, 0 removed, 0 skipped)" in first.stdout
    assert "shop.md: 2 chunks" in first.stdout
    assert "(0 indexed" in run("index", str(folder)).stdout
    hits = run("search", "is delivery free", "--folder", str(folder))
    assert hits.returncode == 0 and "shop.md › Shop › Delivery" in hits.stdout.splitlines()[0]


def test_http_search_returns_the_same_hits(server):
    response = httpx.get(server.url + "/knowledge/search", params={"q": "What audio format?", "limit": 2}, headers=AUTH)
    body = response.json()
    assert response.status_code == 200 and body["query"] == "What audio format?" and len(body["passages"]) == 2
    assert {"source", "heading", "score", "text"} == set(body["passages"][0])
    assert httpx.get(server.url + "/knowledge/search", params={"q": "x"}).status_code == 401
    missing = httpx.get(server.url + "/knowledge/search", headers=AUTH)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "q"


def test_rag_answers_without_passages_past_the_deadline(make_server, upstream, caplog):
    server = make_server(rag_deadline_ms=50)
    kb = server.server.config.app.state.knowledge
    kb._lock.acquire()  # a search that cannot finish in time
    try:
        with caplog.at_level(logging.WARNING, logger="custom_llm"):
            response = httpx.post(server.url + "/rag/chat/completions", headers=AUTH, timeout=10,
                                  json={"messages": [{"role": "user", "content": "What audio format?"}]})
    finally:
        kb._lock.release()
    assert response.status_code == 200
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]
    assert "deadline" in caplog.text


# --- hybrid search (EMBEDDING_MODEL) --------------------------------------------------------------


@pytest.fixture
def cars(tmp_path) -> Path:
    docs = tmp_path / "cars"
    docs.mkdir()
    (docs / "auto.md").write_text("# Automobile insurance\n\nOur policy covers theft of the automobile.\n")
    (docs / "kettle.md").write_text("# Kettles\n\nThe kettle boils water in two minutes.\n")
    (docs / "car-wash.md").write_text("# Car wash\n\nWe wash every car by hand in ten minutes.\n")
    return docs


def hybrid(make_server, upstream_server, folder: Path, tmp_path: Path, **overrides):
    return make_server(knowledge_dir=folder, knowledge_index=str(tmp_path / "hybrid.sqlite3"),
                       embedding_model="scripted-embed", embedding_base_url=f"{upstream_server.url}/v1", **overrides)


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
    assert "BM25 alone" in caplog.text


def test_a_slow_embedding_never_holds_the_answer(make_server, upstream_server, upstream, cars, tmp_path, caplog):
    server = hybrid(make_server, upstream_server, cars, tmp_path, rag_deadline_ms=200)
    upstream.script.embedding_delay = 2
    started = __import__("time").monotonic()
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        response = httpx.post(server.url + "/rag/chat/completions", headers=AUTH, timeout=10,
                              json={"messages": [{"role": "user", "content": "car theft"}]})
    assert response.status_code == 200 and __import__("time").monotonic() - started < 1.5
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]
    assert "deadline" in caplog.text
