"""The knowledge-base benchmark: `make bench-knowledge` (also part of `make bench`), bench/retrieval.py.

On third-party documents none of us wrote (bench/corpora.py), with spoken questions:
- a manual set: Requests' and GNU diffutils' HTML manuals and Chinese manual pages
  (bench/retrieval-questions.json: 152 answerable, 60 with speech-recognition errors: misheard and
  split words, letters spelled out, homophones, in English and Chinese; 38 not);
- a help centre: LibreOffice's how-to pages in English and Chinese, asked in everyday words rather
  than the pages' own (bench/help-questions.json: 138 answerable, 32 spoken with errors, 40 not, 12
  follow-ups);
it measures this server by words alone (EMBEDDING_MODEL=none), by meaning alone (the embedding
model's ranking, no decision) and as it runs by default (meaning and words), beside bm25s and
tantivy on the same chunks:
- R@1, R@5 and MRR on the answerable questions (all, English, Chinese, spoken with errors), follow-ups;
- false injection: unanswerable questions that still get a passage, by kind (bm25s, tantivy and
  meaning alone have no relevance decision: they return passages for every question);
- calibration: one threshold, and a margin over each knowledge base's background (calibration.py),
  each chosen on one corpus and used on the other;
- the tiny corpus (bench/tiny: two short FAQ files), FAQs of 1 to 3 of its answers, and small talk beyond the bench
  (bench/small-talk.txt) on the manuals, the tiny corpus and git's manual;
- cost at about 1,000, 10,000 and 100,000 chunks, each in a process of its own on one core:
  memory, indexing, and search latency by words and by meaning (the question's embedding included).
The vectors are kept in bench/.cache between runs: the first run embeds about 6,700 passages
(half an hour on two cores). Writes bench/results/knowledge.md.
"""

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import alternatives
import corpora
import numpy as np

from bench import pct, publish
from custom_llm_server.core.text import is_cjk
from custom_llm_server.knowledge import calibration
from custom_llm_server.knowledge.embeddings import BuiltinModel
from custom_llm_server.knowledge.index import Knowledge, KnowledgeBase
from custom_llm_server.knowledge.rag import search_query

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = json.loads((ROOT / "bench" / "retrieval-questions.json").read_text())
HELP = json.loads((ROOT / "bench" / "help-questions.json").read_text())
SMALL_TALK = (ROOT / "bench" / "small-talk.txt").read_text().splitlines()
CACHE = corpora.CACHE / "indexes"
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
    with kb.store._lock:
        rows = kb.store._db.execute("SELECT source, heading, text FROM chunks ORDER BY rowid").fetchall()
    return [((source, heading), f"{heading}\n{text}") for source, heading, text in rows]


class Remembering:
    """The built-in model, each question embedded once in the whole run: the benchmark asks the same
    questions of many knowledge bases (FAQs, halves, thresholds)."""

    def __init__(self, model: BuiltinModel):
        self.model, self.identity, self.min_similarity, self.calibrated = model, model.identity, None, True
        self.seen: dict[str, np.ndarray] = {}

    async def passages(self, texts: list[str]) -> np.ndarray:
        return await self.model.passages(texts)

    async def query(self, text: str) -> np.ndarray:
        if text not in self.seen:
            self.seen[text] = await self.model.query(text)
        return self.seen[text]

    async def queries(self, texts: list[str]) -> np.ndarray:
        return np.stack([await self.query(text) for text in texts])

    async def aclose(self) -> None:
        pass


class Server:
    """This server's knowledge base in one of its modes, searched as the server searches it
    (Knowledge.search: the question as said and as meant), the questions' vectors made once."""

    def __init__(self, kb: KnowledgeBase, model: Remembering):
        self.kb, self.model = kb, model
        self.by_words, self.by_default = Knowledge(kb), Knowledge(kb, model)
        self.rows = [(source, heading) for (source, heading), _ in chunks_of(kb)]
        self.texts = [text for _, text in chunks_of(kb)]

    def vector(self, question: str) -> np.ndarray:
        return asyncio.run(self.model.query(question))

    def words(self, question: str, limit: int) -> list[tuple[str, str]]:
        return [(p.source, p.heading) for p in asyncio.run(self.by_words.search(question, limit))]

    def default(self, question: str, limit: int) -> list[tuple[str, str]]:
        return [(p.source, p.heading) for p in asyncio.run(self.by_default.search(question, limit))]

    def meaning(self, question: str, limit: int) -> list[tuple[str, str]]:
        """The embedding model alone: the closest passages, each text once, whatever their similarity."""
        similarity = self.kb._similarity(self.vector(question), len(self.rows))
        assert similarity is not None
        hits, seen = [], set()
        for at in np.argsort(-similarity):
            if self.texts[at] not in seen:
                seen.add(self.texts[at])
                hits.append(self.rows[at])
            if len(hits) == limit:
                break
        return hits


def embedded(name: str, folder: Path, model: Remembering, rows: list[str]) -> KnowledgeBase:
    """The folder's index, its vectors made (or found in the cache), timed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    kb = KnowledgeBase(folder, CACHE / f"{name}.sqlite3")
    knowledge = Knowledge(kb, model)
    started = time.perf_counter()
    asyncio.run(_start(knowledge))
    made = knowledge.embedding.result() if knowledge.embedding else 0
    if made:
        seconds = time.perf_counter() - started
        rows.append(f"Embedding {name}: {made:,} passages in {seconds:.0f} s ({seconds / made * 1000:.0f} ms each).")
    return kb


async def _start(knowledge: Knowledge) -> None:
    await knowledge.start()
    if knowledge.embedding is not None:
        await knowledge.embedding


def quality(name: str, server: Server, questions: dict, rows: list[str]) -> None:
    answerable, unanswerable = questions["answerable"], questions["unanswerable"]
    chunk_list = chunks_of(server.kb)
    systems = {
        "this server, words alone (`EMBEDDING_MODEL=none`)": server.words,
        "this server, meaning alone (the embedding model's ranking)": server.meaning,
        "**this server (default: meaning and words)**": server.default,
        **{s.name: s.search for s in (alternatives.BM25S(chunk_list), alternatives.Tantivy(chunk_list))},
    }
    groups = {
        "all": lambda q: True,
        "English": lambda q: q["lang"] == "en" and not q["noisy"],
        "Chinese": lambda q: q["lang"] == "zh" and not q["noisy"],
        "spoken (speech-recognition errors)": lambda q: q["noisy"],
    }
    kinds = sorted({q["kind"] for q in unanswerable})
    follow_ups = questions.get("follow_up", [])
    rows += [
        "",
        f"{name} ({server.kb.chunks:,} chunks; by meaning alone a passage answers from similarity "
        f"{server.kb.min_similarity:.3f}): {len(answerable)} answerable spoken questions "
        f"({sum(q['noisy'] for q in answerable)} with speech-recognition errors), {len(unanswerable)} unanswerable"
        + (f", {len(follow_ups)} follow-ups" if follow_ups else "")
        + ". R@1 / R@5 / MRR:",
        "",
        "| system | "
        + " | ".join(f"{g} (n={sum(map(keep, answerable))})" for g, keep in groups.items())
        + (" | follow-ups R@5 |" if follow_ups else " |")
        + " no passage |"
        + " | ".join(f" false injection: {kind} (n={sum(q['kind'] == kind for q in unanswerable)})" for kind in kinds)
        + " | false injection, all |",
        "|---|" + "---|" * (len(groups) + len(kinds) + 2 + bool(follow_ups)),
    ]
    for system, search in systems.items():
        hits = [search(q["q"], K) for q in answerable]
        ranks = [rank(passages, q["answer"]) for passages, q in zip(hits, answerable)]
        cells = []
        for keep in groups.values():
            picked = [r for r, q in zip(ranks, answerable) if keep(q)]
            r1 = sum(r == 1 for r in picked) / len(picked)
            r5 = sum(r is not None for r in picked) / len(picked)
            mrr = sum(1 / r for r in picked if r) / len(picked)
            cells.append(f"{r1:.2f} / {r5:.2f} / {mrr:.2f}")
        if follow_ups:
            asked = [search_query([{"role": "user", "content": q} for q in f["q"]]) for f in follow_ups]
            cells.append(
                f"{np.mean([rank(search(a, K), f['answer']) is not None for a, f in zip(asked, follow_ups)]):.2f}"
            )
        empty = sum(not passages for passages in hits)
        injected = {kind: [bool(search(q["q"], K)) for q in unanswerable if q["kind"] == kind] for kind in kinds}
        everything = [i for values in injected.values() for i in values]
        rows.append(
            f"| {system} | "
            + " | ".join(cells)
            + f" | {empty} |"
            + "".join(f" {sum(v)} of {len(v)} |" for v in injected.values())
            + f" {sum(everything) / len(everything):.0%} |"
        )


def halves(manuals: Path, help_centre: Path, model: Remembering, rows: list[str]) -> None:
    """Each language's half of each corpus as a knowledge base of its own, asked in its language: the
    calibrated threshold against the one threshold of 2026-12-05 (0.885)."""
    probes = asyncio.run(calibration.embedded(model))
    rows += [
        "",
        "Each language's half alone, asked in its language (R@5; unanswerable and small-talk questions that "
        "get a passage), calibrated and with the one threshold of 2026-12-05 (0.885):",
        "",
        "| knowledge base | chunks | calibrated threshold | calibrated | 0.885 |",
        "|---|---|---|---|---|",
    ]
    for name, corpus, half, questions in (
        ("manuals, English", manuals, "en", QUESTIONS),
        ("manuals, Chinese", manuals, "zh", QUESTIONS),
        ("help centre, English", help_centre, "en-US", HELP),
        ("help centre, Chinese", help_centre, "zh-CN", HELP),
    ):
        root = Path(tempfile.mkdtemp(prefix="half-"))
        shutil.copytree(corpus / half, root / half)
        server = borrowed(root, root.parent / f"{root.name}.sqlite3", model, probes)
        kb = server.kb
        chinese = half.startswith("zh")
        answerable = [
            (q["q"], [label for label in q["answer"] if label.startswith(half + "/")])
            for q in questions["answerable"]
            if (q["lang"] == "zh") == chinese and any(label.startswith(half + "/") for label in q["answer"])
        ]
        unanswerable = [q["q"] for q in questions["unanswerable"] if is_cjk(q["q"]) == chinese]
        chat = [phrase for phrase in SMALL_TALK if is_cjk(phrase) == chinese]
        calibrated, cells = kb.min_similarity, []
        for threshold in (calibrated, 0.885):
            kb.min_similarity = threshold
            r5 = np.mean([rank(server.default(q, K), labels) is not None for q, labels in answerable])
            wrong = sum(bool(server.default(q, K)) for q in unanswerable)
            chatted = sum(bool(server.default(q, K)) for q in chat)
            cells.append(f"{r5:.2f}; {wrong} of {len(unanswerable)}; {chatted} of {len(chat)}")
        rows.append(f"| {name} | {kb.chunks:,} | {calibrated:.3f} | " + " | ".join(cells) + " |")


def tiny(model: Remembering, rows: list[str]) -> None:
    kb = embedded("tiny", ROOT / "bench" / "tiny", model, rows)
    server = Server(kb, model)
    questions = QUESTIONS["tiny"]
    for mode, search in (("by words alone", server.words), ("by default", server.default)):
        answered = [rank(search(q["q"], 3), q["answer"]) is not None for q in questions["answerable"]]
        injected = [bool(search(q["q"], 3)) for q in questions["unanswerable"]]
        misses = [q["q"] for q, ok in zip(questions["answerable"], answered) if not ok]
        wrong = [q["q"] for q, bad in zip(questions["unanswerable"], injected) if bad]
        rows += [
            "",
            f"Tiny corpus (bench/tiny: two FAQ files, {kb.chunks} chunks), {mode}: {sum(answered)} of {len(answered)} "
            f"answerable questions find their passage{' (missed: ' + '; '.join(misses) + ')' if misses else ''}; "
            f"{sum(injected)} of {len(injected)} unanswerable ones get a passage"
            f"{' (' + '; '.join(wrong) + ')' if wrong else ''}.",
        ]


def tiny_faqs(model: Remembering, rows: list[str]) -> None:
    """FAQs of one, two and three of bench/tiny's answers, every such choice: what a knowledge base of a
    few passages answers, and what it gives to the questions it cannot answer."""
    sections = []  # (file, its title, one "## question" and its answer)
    for path in sorted((ROOT / "bench" / "tiny").glob("*.md")):
        title, *parts = path.read_text().split("\n## ")
        sections += [(path.name, title, part) for part in parts]
    questions = QUESTIONS["tiny"]
    probes = asyncio.run(calibration.embedded(model))
    rows += [
        "",
        "FAQs made of 1, 2 or 3 of bench/tiny's 8 answers (every choice), by default: questions whose answer "
        "is in the FAQ that find it; and the questions that get a passage though they cannot be answered there "
        "(about an answer left out, bench/tiny's unanswerable ones, bench/small-talk.txt):",
        "",
        "| answers | FAQs | answered | about an answer left out | unanswerable | small talk |",
        "|---|---|---|---|---|---|",
    ]
    for size in (1, 2, 3):
        counts: dict[str, list[int]] = {kind: [0, 0] for kind in ("answered", "left out", "unanswerable", "small talk")}
        chosen_faqs = list(itertools.combinations(sections, size))
        for chosen in chosen_faqs:
            folder = Path(tempfile.mkdtemp(prefix="faq-"))
            for name in dict.fromkeys(file for file, _, _ in chosen):
                title = next(title for file, title, _ in chosen if file == name)
                (folder / name).write_text("\n## ".join([title] + [part for file, _, part in chosen if file == name]))
            server = borrowed(folder, folder / "index.sqlite3", model, probes)
            held = [(file, part.split("\n")[0]) for file, _, part in chosen]
            for q in questions["answerable"]:
                here = any(found(hit, label) for hit in held for label in q["answer"])
                passages = server.default(q["q"], 3)
                kind, hit = (
                    ("answered", rank(passages, q["answer"]) is not None) if here else ("left out", bool(passages))
                )
                counts[kind][0] += hit
                counts[kind][1] += 1
            for kind, asked in (
                ("unanswerable", [q["q"] for q in questions["unanswerable"]]),
                ("small talk", SMALL_TALK),
            ):
                counts[kind][0] += sum(bool(server.default(question, 3)) for question in asked)
                counts[kind][1] += len(asked)
        rows.append(
            f"| {size} | {len(chosen_faqs)} | "
            + " | ".join(f"{got} of {out_of} ({got / out_of:.0%})" for got, out_of in counts.values())
            + " |"
        )


def borrowed(folder: Path, index: Path, model: Remembering, probes: dict) -> Server:
    """A knowledge base of texts the benchmark has vectors for, indexed and calibrated."""
    kb = KnowledgeBase(folder, index)
    kb.index()
    borrow_vectors(kb, model)
    kb.probes = probes
    kb.load_vectors()
    return Server(kb, model)


def borrow_vectors(kb: KnowledgeBase, model: BuiltinModel | Remembering) -> None:
    """The vectors the benchmark's cached indexes hold, for a knowledge base made of the same texts."""
    kb.use_model(model.identity, None)
    with kb.store._lock:
        for cached in CACHE.glob("*.sqlite3"):
            kb.store._db.execute("ATTACH DATABASE ? AS cached", (str(cached),))
            kb.store._db.execute("INSERT OR IGNORE INTO embeddings SELECT * FROM cached.embeddings")
            # their size too: vectors of no known size are taken for another model's, and left out
            kb.store._db.execute(
                "INSERT OR IGNORE INTO meta SELECT * FROM cached.meta WHERE key = 'embedding_dimension'"
            )
            kb.store._db.commit()
            kb.store._db.execute("DETACH DATABASE cached")


def small_talk(manuals: Server, help_centre: Server, model: Remembering, rows: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="small-talk-"))
    servers = {
        "the manuals": manuals,
        "the help centre": help_centre,
        "the tiny corpus": Server(embedded("tiny", ROOT / "bench" / "tiny", model, rows), model),
        "git's manual (words alone)": Server(
            KnowledgeBase(corpora.git_manual(folder / "git"), folder / "git.db"), model
        ),
    }
    counts, found_ = [], []
    for name, server in servers.items():
        if not server.kb.loaded:
            server.kb.index()
        search = server.words if "words" in name else server.default
        hits = [(phrase, passages[0]) for phrase in SMALL_TALK if (passages := search(phrase, 1))]
        counts.append(f"{len(hits)} on {name} ({server.kb.chunks:,} chunks)")
        found_ += [f'"{phrase}" ({name}: {hit[0]} › {hit[1].split(" › ")[-1]})' for phrase, hit in hits]
    rows += [
        "",
        f"Small talk beyond the bench (bench/small-talk.txt, {len(SMALL_TALK)} phrases in English and Chinese) "
        f"gets a passage {', '.join(counts)}{': ' + '; '.join(found_) if found_ else ''}.",
    ]


def transfer(servers: dict[str, Server], sets: dict[str, dict], rows: list[str]) -> None:
    """Calibrated on one corpus, used on the other: one threshold for every knowledge base, against a
    margin over each knowledge base's background (calibration.py). Each is chosen on one corpus as the
    most recall (R@5) with at most one in ten unanswerable questions getting a passage."""

    def measure(name: str, threshold: float) -> tuple[float, int, int]:
        server, questions = servers[name], sets[name]
        server.kb.min_similarity = threshold
        r5 = np.mean([rank(server.default(q["q"], K), q["answer"]) is not None for q in questions["answerable"]])
        injected = sum(bool(server.default(q["q"], K)) for q in questions["unanswerable"])
        return float(r5), injected, len(questions["unanswerable"])

    kept = {name: server.kb.min_similarity for name, server in servers.items()}
    backgrounds = {name: calibration.background(s.kb._vectors, s.kb.probes) for name, s in servers.items()}
    ways = {
        "one threshold": (np.arange(0.86, 0.9125, 0.0025), lambda name, x: x),
        "a margin over the background": (
            np.arange(0.02, 0.0725, 0.0025),
            lambda name, x: float(np.clip(backgrounds[name] + x, calibration.FLOOR, calibration.CEILING)),
        ),
    }
    rows += [
        "",
        "Calibrated on one corpus, used on the other (chosen: the most R@5 with at most one in ten "
        "unanswerable questions getting a passage; backgrounds "
        + ", ".join(f"{name} {value:.3f}" for name, value in backgrounds.items())
        + "):",
        "",
        "| calibrated as | on | chosen | there: R@5, false injection | used on | there: R@5, false injection |",
        "|---|---|---|---|---|---|",
    ]
    for way, (grid, threshold) in ways.items():
        for mine, other in (tuple(servers), tuple(servers)[::-1]):
            measured = [(x, measure(mine, threshold(mine, x))) for x in grid]
            allowed = [(x, m) for x, m in measured if m[1] <= m[2] / 10] or measured[-1:]
            x, (r5, injected, n) = max(allowed, key=lambda item: item[1][0])
            there = measure(other, threshold(other, x))
            rows.append(
                f"| {way} | {mine} | {x:.4f} | {r5:.2f}, {injected} of {n} | {other} | "
                f"{there[0]:.2f}, {there[1]} of {there[2]} |"
            )
    for name, server in servers.items():
        server.kb.min_similarity = kept[name]


# --- cost at 1,000, 10,000 and 100,000 chunks, each measured in a process of its own on one core -----


def scale(manuals: Path, help_centre: Path, rows: list[str]) -> None:
    sizes = {"1,000": [help_centre / "en-US"], "10,000": [manuals, manuals, help_centre], "100,000": [manuals] * 23}
    rows += [
        "Cost, each size in a process of its own pinned to one core (`taskset`, one embedding thread; the "
        "copies of the manuals share their vectors, so vectors are made once and the time to make them all "
        "is the measured rate times the chunks):",
        "",
        "| chunks | memory (RSS) | index by words | make the vectors | search by words p50 / p99 | "
        "search by meaning, question embedded, p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for label, folders in sizes.items():
        root = Path(tempfile.mkdtemp(prefix=f"scale-{label.replace(',', '')}-"))
        for n, folder in enumerate(folders):
            shutil.copytree(folder, root / f"copy{n}")
        done = subprocess.run(
            ["taskset", "-c", "0", sys.executable, __file__, "--scale", str(root)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
        )
        rows.append(f"| {label} | " + done.stdout.strip().splitlines()[-1])


def scale_one(root: Path) -> None:
    """One size: index by words, borrow the cached vectors, time both searches; print a table row's cells."""
    started = time.perf_counter()
    kb = KnowledgeBase(root, root.parent / f"{root.name}.sqlite3")
    report = kb.index()
    index_seconds = time.perf_counter() - started
    model = BuiltinModel(threads=1)
    borrow_vectors(kb, model)
    kb.probes = asyncio.run(calibration.embedded(model))
    handle = model._handle()
    kb.load_vectors()
    rate = _embedding_rate(model, kb)
    questions = [q["q"] for q in QUESTIONS["answerable"] + QUESTIONS["unanswerable"] + HELP["answerable"]]
    by_words = alternatives.timed(lambda q, k: kb.search(q, k), questions)
    by_meaning = alternatives.timed(lambda q, k: kb.search(q, k, handle.query(q)), questions)
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    print(
        f"{kb.chunks:,} chunks: {rss:.0f} MB | {index_seconds:.0f} s ({report.chunks / index_seconds:,.0f}/s) | "
        f"{kb.chunks * rate / 60:,.0f} min ({rate * 1000:.0f} ms each) | "
        f"{pct(by_words, 50):.2f} / {pct(by_words, 99):.2f} ms | {pct(by_meaning, 50):.1f} / {pct(by_meaning, 99):.1f} ms |"
    )


def _embedding_rate(model: BuiltinModel, kb: KnowledgeBase) -> float:
    """Seconds to embed one passage on this core, from 32 of the knowledge base's passages."""
    with kb.store._lock:
        texts = [f"{h}\n{t}" for h, t in kb.store._db.execute("SELECT heading, text FROM chunks LIMIT 32")]
    started = time.perf_counter()
    model._handle().passage(texts)
    return (time.perf_counter() - started) / len(texts)


def fresh(folder: Path) -> Path:
    """An empty folder at a path that stays the same between runs: a cached index holds one folder's
    documents (KnowledgeBase refuses another folder's), so the corpora are written where they were."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main() -> None:
    rows = [f"Knowledge base, measured {time.strftime('%Y-%m-%d')} (`make bench-knowledge`)."]
    model = Remembering(BuiltinModel(threads=2))
    manuals = corpora.third_party(fresh(corpora.CACHE / "corpora" / "manuals"))
    help_centre = corpora.help_centre(fresh(corpora.CACHE / "corpora" / "help"))
    manual_server = Server(embedded("manuals", manuals, model, rows), model)
    help_server = Server(embedded("help", help_centre, model, rows), model)
    quality("Manuals (Requests, GNU diffutils, Chinese manual pages)", manual_server, QUESTIONS, rows)
    quality("Help centre (LibreOffice, English and Chinese)", help_server, HELP, rows)
    transfer({"manuals": manual_server, "help centre": help_server}, {"manuals": QUESTIONS, "help centre": HELP}, rows)
    halves(manuals, help_centre, model, rows)
    tiny(model, rows)
    tiny_faqs(model, rows)
    small_talk(manual_server, help_server, model, rows)
    publish("knowledge.md", rows)
    if "--no-scale" not in sys.argv:  # quality alone: minutes, where the costs at 100,000 chunks take an hour
        costs: list[str] = []
        scale(manuals, help_centre, costs)
        publish("knowledge-cost.md", costs)


def quick() -> None:
    """`bench/retrieval.py --quick`: the help centre, the tiny corpus and its FAQs only, in minutes once
    their vectors are cached; written to bench/results/knowledge-quick.md, not to docs/benchmarks.md."""
    rows = [f"Knowledge base, the help centre and the tiny corpus, measured {time.strftime('%Y-%m-%d')}."]
    model = Remembering(BuiltinModel(threads=2))
    help_centre = corpora.help_centre(fresh(corpora.CACHE / "corpora" / "help"))
    quality(
        "Help centre (LibreOffice, English and Chinese)",
        Server(embedded("help", help_centre, model, rows), model),
        HELP,
        rows,
    )
    tiny(model, rows)
    tiny_faqs(model, rows)
    publish("knowledge-quick.md", rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--scale"]:
        scale_one(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--quick"]:
        quick()
    else:
        main()
