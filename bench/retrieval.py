"""The knowledge-base benchmark: `make bench-knowledge` (also part of `make bench`), bench/retrieval.py.

On third-party documents none of us wrote (bench/corpora.py: Requests' and GNU diffutils' HTML
manuals, Chinese manual pages from manpages-zh, all from Debian's archive) and spoken questions
(bench/retrieval-questions.json: answerable ones, a quarter with speech-recognition errors, and
unanswerable ones by kind), it measures, for this server and for bm25s and tantivy on the same
chunks:
- R@1, R@5 and MRR on the answerable questions (all, English, Chinese, noisy);
- false injection: unanswerable questions that still get a passage, by kind (bm25s and tantivy
  have no relevance decision: they return passages for every question);
- the tiny corpus (bench/tiny: two short FAQ files): answerable questions that find their
  passage, unanswerable ones that get none;
- small talk beyond the bench (bench/small-talk.txt): phrases that get a passage, on the corpus,
  the tiny corpus and git's manual;
- search latency at ~13,000 chunks (the corpus three times over) for the same questions;
- indexing speed, and how soon a restart with unchanged documents can search.
Writes bench/results/knowledge.md.
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import alternatives  # noqa: E402
import corpora  # noqa: E402

from bench import pct, save  # noqa: E402
from knowledge import KnowledgeBase  # noqa: E402

QUESTIONS = json.loads((ROOT / "bench" / "retrieval-questions.json").read_text())
SMALL_TALK = (ROOT / "bench" / "small-talk.txt").read_text().splitlines()
K = 5


def found(hit: tuple[str, str], label: str) -> bool:
    """Whether a passage (source, heading) is where a label says the answer is ("file#heading words")."""
    source, heading = hit
    file, _, words = label.partition("#")
    return source == file and words.lower() in heading.lower()


def rank(hits: list[tuple[str, str]], labels: list[str]) -> int | None:
    """The 1-based rank of the first passage that answers, if any."""
    return next((i for i, hit in enumerate(hits, 1) if any(found(hit, label) for label in labels)), None)


def chunks_of(kb: KnowledgeBase) -> list[tuple[tuple[str, str], str]]:
    """The server's chunks as ((source, heading), heading and text), for bm25s and tantivy."""
    with kb._lock:
        rows = kb._db.execute("SELECT source, heading, text FROM chunks ORDER BY rowid").fetchall()
    return [((source, heading), f"{heading}\n{text}") for source, heading, text in rows]


def server(kb: KnowledgeBase):
    return lambda question, limit: [(p.source, p.heading) for p in kb.search(question, limit)]


def quality(kb: KnowledgeBase, files: int, rows: list[str]) -> None:
    answerable, unanswerable = QUESTIONS["answerable"], QUESTIONS["unanswerable"]
    chunk_list = chunks_of(kb)
    systems = {
        "this server": server(kb),
        **{s.name: s.search for s in (alternatives.BM25S(chunk_list), alternatives.Tantivy(chunk_list))},
    }
    groups = {
        "all": lambda q: True,
        "English": lambda q: q["lang"] == "en",
        "Chinese": lambda q: q["lang"] == "zh",
        "noisy": lambda q: q["noisy"],
    }
    kinds = sorted({q["kind"] for q in unanswerable})
    rows += [
        "",
        f"Retrieval quality on third-party documents ({files} files, {kb.chunks:,} chunks: bench/corpora.py), "
        f"{len(answerable)} answerable spoken questions ({sum(q['noisy'] for q in answerable)} with "
        f"speech-recognition errors) and {len(unanswerable)} unanswerable ones (bench/retrieval-questions.json).",
        "",
        "| system | "
        + " | ".join(f"{g} R@1 / R@5 / MRR (n={sum(map(keep, answerable))})" for g, keep in groups.items())
        + " | answerable with no passage | "
        + " | ".join(f"false injection: {kind} (n={sum(q['kind'] == kind for q in unanswerable)})" for kind in kinds)
        + " | false injection, all |",
        "|---|" + "---|" * (len(groups) + len(kinds) + 2),
    ]
    for name, search in systems.items():
        hits = [search(q["q"], K) for q in answerable]
        ranks = [rank(passages, q["answer"]) for passages, q in zip(hits, answerable)]
        cells = []
        for keep in groups.values():
            picked = [r for r, q in zip(ranks, answerable) if keep(q)]
            r1 = sum(r == 1 for r in picked) / len(picked)
            r5 = sum(r is not None for r in picked) / len(picked)
            mrr = sum(1 / r for r in picked if r) / len(picked)
            cells.append(f"{r1:.2f} / {r5:.2f} / {mrr:.2f}")
        empty = sum(not passages for passages in hits)
        injected = {kind: [bool(search(q["q"], K)) for q in unanswerable if q["kind"] == kind] for kind in kinds}
        everything = [i for values in injected.values() for i in values]
        rows.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {empty} |"
            + "".join(f" {sum(v)} of {len(v)} |" for v in injected.values())
            + f" {sum(everything) / len(everything):.0%} |"
        )


def tiny(rows: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tiny-"))
    kb = KnowledgeBase(ROOT / "bench" / "tiny", folder / "index.sqlite3")
    kb.index()
    questions = QUESTIONS["tiny"]
    answered = [rank(server(kb)(q["q"], 3), q["answer"]) is not None for q in questions["answerable"]]
    injected = [bool(kb.search(q["q"], 3)) for q in questions["unanswerable"]]
    misses = [q["q"] for q, ok in zip(questions["answerable"], answered) if not ok]
    wrong = [q["q"] for q, bad in zip(questions["unanswerable"], injected) if bad]
    rows += [
        "",
        f"Tiny corpus (bench/tiny: two FAQ files, {kb.chunks} chunks): {sum(answered)} of {len(answered)} answerable "
        f"questions find their passage{' (missed: ' + '; '.join(misses) + ')' if misses else ''}; "
        f"{sum(injected)} of {len(injected)} unanswerable ones get a passage{' (' + '; '.join(wrong) + ')' if wrong else ''}.",
    ]


def small_talk(kb: KnowledgeBase, rows: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="small-talk-"))
    bases = {
        "the corpus above": kb,
        "the tiny corpus": KnowledgeBase(ROOT / "bench" / "tiny", folder / "tiny.sqlite3"),
        "git's manual": KnowledgeBase(corpora.git_manual(folder / "git"), folder / "git.sqlite3"),
    }
    counts, found = [], []
    for name, base in bases.items():
        base.index()
        hits = [(phrase, passages[0]) for phrase in SMALL_TALK if (passages := base.search(phrase, 1))]
        counts.append(f"{len(hits)} on {name} ({base.chunks:,} chunks)")
        found += [f'"{phrase}" ({name}: {hit.citation()})' for phrase, hit in hits]
    rows += [
        "",
        f"Small talk beyond the bench (bench/small-talk.txt, {len(SMALL_TALK)} phrases in English and Chinese) "
        f"gets a passage {', '.join(counts)}{': ' + '; '.join(found) if found else ''}.",
    ]


def speed(corpus: Path, rows: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="speed-"))
    for copy in range(3):
        shutil.copytree(corpus, folder / f"copy{copy}")
    kb = KnowledgeBase(folder, folder.parent / f"{folder.name}.sqlite3")
    report = kb.index()
    restarted = time.perf_counter()
    again = KnowledgeBase(folder, folder.parent / f"{folder.name}.sqlite3").index()  # loads the terms too
    restarted = time.perf_counter() - restarted
    questions = [q["q"] for q in QUESTIONS["answerable"] + QUESTIONS["unanswerable"]] * 5
    chunk_list = chunks_of(kb)
    timings = {"this server": alternatives.timed(server(kb), questions)}
    for system in (alternatives.BM25S(chunk_list), alternatives.Tantivy(chunk_list)):
        timings[system.name] = alternatives.timed(system.search, questions)
    rows += [
        "",
        f"Search latency over {kb.chunks:,} chunks (the corpus three times), the questions above, top 3 "
        "(ms; in process, no HTTP):",
        "",
        "| system | p50 | p99 | max |",
        "|---|---|---|---|",
        *(f"| {name} | {pct(t, 50):.2f} | {pct(t, 99):.2f} | {max(t):.2f} |" for name, t in timings.items()),
        "",
        f"Indexing: {report.chunks:,} chunks in {report.seconds:.1f} s ({report.chunks / report.seconds:,.0f} chunks/s); "
        f"a restart with unchanged documents re-indexes {again.indexed} files and is ready to search "
        f"(terms loaded into memory) in {restarted * 1000:.0f} ms.",
    ]


def main() -> None:
    corpus = corpora.third_party(Path(tempfile.mkdtemp(prefix="corpus-")))
    kb = KnowledgeBase(corpus, corpus.parent / f"{corpus.name}.sqlite3")
    report = kb.index()
    rows = [f"Knowledge base, measured {time.strftime('%Y-%m-%d')} (`make bench-knowledge`)."]
    quality(kb, report.files, rows)
    tiny(rows)
    small_talk(kb, rows)
    speed(corpus, rows)
    table = "\n".join(rows) + "\n"
    save("knowledge.md", table)
    print(table)


if __name__ == "__main__":
    main()
