"""knowledge.py: ingest, chunking, the persistent incremental index, search, and the CLI."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import knowledge
from knowledge import KnowledgeBase

ROOT = Path(__file__).resolve().parent.parent


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
    (docs / "shop.md").write_text(
        "# Shop\n\n## Opening hours\n\nWe open at nine on weekdays and at ten on weekends.\n\n"
        "## Delivery\n\nDelivery inside the ring road is free for orders above forty euros.\n"
    )
    (docs / "sub" / "returns.txt").write_text("Returns are accepted within thirty days with the receipt.\n")
    (docs / "page.html").write_text(
        "<html><head><style>.x{}</style><script>var hidden=1</script></head><body>"
        "<h1>Warranty</h1><p>Every kettle carries a <b>two year</b> warranty.</p>"
        "<h2>Claims</h2><p>Send claims to the service desk.</p></body></html>"
    )
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
    for (_, before), (_, after) in itertools.pairwise(chunks):
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
    assert kb.search("kettle warranty", 5) == [] or all(
        p.source != "page.html" for p in kb.search("kettle warranty", 5)
    )


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
    assert sorted(s.split(":")[0] for s in report.skipped) == [
        "binary.txt",
        "broken.pdf",
        "empty.md",
        "huge.md",
        "latin1.txt",
    ]
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


def test_cli_index_and_search(folder, tmp_path):
    index = tmp_path / "cli.sqlite3"

    def run(command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "custom_llm.py", command, "--index-file", str(index), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = run("index", str(folder))
    assert first.returncode == 0 and "5 files (5 indexed, 0 removed, 0 skipped)" in first.stdout
    assert "shop.md: 2 chunks" in first.stdout
    assert "(0 indexed" in run("index", str(folder)).stdout
    hits = run("search", "is delivery free", "--folder", str(folder))
    assert hits.returncode == 0 and "shop.md › Shop › Delivery" in hits.stdout.splitlines()[0]
