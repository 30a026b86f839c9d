"""The knowledge-base benchmark: `make bench-knowledge` (also part of `make bench`), bench/retrieval.py.

- Retrieval latency over a 10,000-chunk index (BM25), and indexing speed without embeddings.
- Retrieval quality on a labelled set (bench/questions.json: English and Chinese, some with
  speech-recognition noise) over Python's reference topics (shipped with CPython) plus
  bench/corpus-zh: recall@1 and recall@5 for BM25, for hybrid (BM25 + embeddings, when an
  embeddings server is at hand: EMBED_PYTHON=<python with bench/requirements-embed.txt>), and for a
  naive keyword-overlap baseline, and the best available alternatives on the same chunks (bm25s and
  tantivy, bench/alternatives.py), all measured the same way. Writes bench/results/knowledge.md.
"""

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import alternatives  # noqa: E402

from bench import free_port, knowledge_corpus, pct, save, wait_for_port  # noqa: E402
from knowledge import Embeddings, KnowledgeBase, split_cjk  # noqa: E402

WORD = re.compile(r"\w+")


def quality_corpus(folder: Path) -> None:
    from pydoc_data.topics import topics

    for name, text in topics.items():
        (folder / f"{name}.md").write_text(f"# {name}\n\n{text}")
    shutil.copytree(ROOT / "bench" / "corpus-zh", folder / "zh")


def naive_ranking(kb: KnowledgeBase, question: str) -> list[str]:
    """The baseline: chunks ranked by how many of the question's words they contain."""
    words = set(WORD.findall(split_cjk(question).lower()))
    with kb._lock:
        rows = kb._db.execute("SELECT source, terms FROM chunks").fetchall()
    scored = sorted(((len(words & set(WORD.findall(terms.lower()))), source) for source, terms in rows), reverse=True)
    return [source for score, source in scored if score]


def chunks_of(kb: KnowledgeBase) -> list[tuple[str, str]]:
    """The chunks the server indexed, as (source, heading and text), for the alternatives."""
    with kb._lock:
        return kb._db.execute("SELECT source, heading || char(10) || text FROM chunks ORDER BY rowid").fetchall()


def recall(rankings: list[list[str]], labels: list[list[str]], k: int) -> float:
    return sum(any(source in label for source in ranking[:k]) for ranking, label in zip(rankings, labels)) / len(labels)


async def quality(rows: list[str]) -> None:
    questions = json.loads((ROOT / "bench" / "questions.json").read_text())["questions"]
    folder = Path(tempfile.mkdtemp(prefix="quality-"))
    quality_corpus(folder)
    kb = KnowledgeBase(folder, folder.parent / f"{folder.name}.sqlite3")
    report = kb.index()
    systems = {
        "naive keyword overlap": [naive_ranking(kb, q["q"]) for q in questions],
        "BM25 (this server)": [[p.source for p in kb.search(q["q"], 5)] for q in questions],
    }
    for system in (alternatives.BM25S(chunks_of(kb)), alternatives.Tantivy(chunks_of(kb))):
        systems[system.name] = [system.search(q["q"], 5) for q in questions]
    embed_python = os.environ.get("EMBED_PYTHON")
    if embed_python:
        port = free_port()
        server = subprocess.Popen([embed_python, str(ROOT / "bench" / "embed_server.py"), str(port)])
        try:
            wait_for_port(port, server)
            embeddings = Embeddings(f"http://127.0.0.1:{port}/v1", "", "all-MiniLM-L6-v2")
            await kb.embed(embeddings)
            vectors = await embeddings.embed([q["q"] for q in questions])
            await embeddings.aclose()
            systems["hybrid: BM25 + all-MiniLM-L6-v2"] = [
                [p.source for p in kb.search(q["q"], 5, v)] for q, v in zip(questions, vectors)
            ]
        finally:
            server.terminate()
    groups = {
        "all": lambda q: True,
        "English": lambda q: not re.search(r"[\u4e00-\u9fff]", q["q"]),
        "Chinese": lambda q: bool(re.search(r"[\u4e00-\u9fff]", q["q"])),
        "noisy": lambda q: q.get("noisy"),
    }
    rows += [
        "",
        f"Retrieval quality: {len(questions)} labelled questions over {report.files} documents "
        f"({kb.chunks} chunks): Python's reference topics and bench/corpus-zh.",
        "",
        "| system | " + " | ".join(f"{g} R@1 / R@5" for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for name, rankings in systems.items():
        cells = []
        for keep in groups.values():
            picked = [(r, q["source"]) for r, q in zip(rankings, questions) if keep(q)]
            cells.append(f"{recall(*zip(*picked), 1):.2f} / {recall(*zip(*picked), 5):.2f} (n={len(picked)})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if not embed_python:
        rows.append("| hybrid | not measured: set EMBED_PYTHON to a Python with bench/requirements-embed.txt |")


def speed(rows: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="speed-"))
    knowledge_corpus(folder)  # 100 files, 10,000 chunks of synthetic text
    kb = KnowledgeBase(folder, folder.parent / f"{folder.name}.sqlite3")
    report = kb.index()
    rate = report.chunks / report.seconds
    rng = random.Random(5)
    with kb._lock:
        vocabulary = list(
            {w for (text,) in kb._db.execute("SELECT text FROM chunks LIMIT 500") for w in WORD.findall(text)}
        )
    questions = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 10))) + "?" for _ in range(1000)]
    for question in questions[:50]:  # warm-up
        kb.search(question, 3)
    timings = []
    for question in questions:
        started = time.perf_counter()
        kb.search(question, 3)
        timings.append((time.perf_counter() - started) * 1000)
    again = KnowledgeBase(folder, folder.parent / f"{folder.name}.sqlite3").index()
    others = [
        (s.name, alternatives.timed(s, questions))
        for s in (alternatives.BM25S(chunks_of(kb)), alternatives.Tantivy(chunks_of(kb)))
    ]
    rows += [
        f"Knowledge base, measured {time.strftime('%Y-%m-%d')} (`make bench-knowledge`).",
        "",
        "| metric | measured | target |",
        "|---|---|---|",
        f"| retrieval over {kb.chunks:,} chunks, BM25, p50 / p99 (ms) | {pct(timings, 50):.2f} / {pct(timings, 99):.2f} "
        f"| ≤ 2 / ≤ 10 |",
        f"| indexing without embeddings (chunks/s) | {rate:,.0f} ({report.chunks:,} chunks in {report.seconds:.1f} s) "
        f"| ≥ 1,000 |",
        f"| restart with unchanged documents: files re-indexed / time | {again.indexed} / {again.seconds * 1000:.0f} ms "
        f"| 0 |",
        *(
            f"| the same {kb.chunks:,} chunks, {name}, p50 / p99 (ms) | {pct(t, 50):.2f} / {pct(t, 99):.2f} | - |"
            for name, t in others
        ),
    ]


def main() -> None:
    rows: list[str] = []
    speed(rows)
    asyncio.run(quality(rows))
    table = "\n".join(rows) + "\n"
    save("knowledge.md", table)
    print(table)


if __name__ == "__main__":
    main()
