"""Many replicas on loopback: two server processes sharing one PostgreSQL (KNOWLEDGE_STORE) and one
Redis (REDIS_URL), against one server with the SQLite file, on a 10,000-chunk knowledge base.

    python bench/replicas.py          # needs PostgreSQL and Redis (BENCH_POSTGRES_URL, BENCH_REDIS_URL)

It measures: indexing once into each store; start-up to /ready, RSS and search over HTTP by meaning
(p50/p99) per server; how long a changed document takes to reach both replicas; MAX_STREAMS_PER_KEY=2
across both; searches while PostgreSQL is cut and restored; requests while Redis is cut. The passages'
vectors are random unit vectors stored as the built-in model's (embedding 10,000 passages takes most
of an hour here): loading and searching them costs what real ones do, and the questions are embedded
for real. Writes bench/results/replicas.md and docs/benchmarks.md's bench:replicas table.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg
from proxy import Proxy

from bench import (
    KEY,
    free_port,
    knowledge_corpus,
    rss_mb,
    save,
    start,
    stop,
    wait_for_port,
    wait_until_ready,
    wait_until_searchable,
)
from custom_llm_server.knowledge.embeddings import BuiltinModel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CUSTOM_LLM = str(Path(sys.executable).parent / "custom-llm")
QUESTIONS = [f"what is the {word} of section {n}" for n, word in enumerate(["price", "delivery", "refund"] * 67)]


def database() -> str:
    name = f"custom_llm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return psycopg.conninfo.make_conninfo(POSTGRES, dbname=name)


def drop(url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def index(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([CUSTOM_LLM, "index"], env={**os.environ, **env}, check=True, capture_output=True)
    return time.perf_counter() - started


def random_vectors(hashes: list[str], size: int = 384) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((len(hashes), size)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [(h, v.tobytes()) for h, v in zip(hashes, vectors, strict=True)]


def store_vectors_postgres(url: str, model: str) -> int:
    with psycopg.connect(url) as db:
        hashes = [h for (h,) in db.execute("SELECT DISTINCT hash FROM kb_chunks")]
        db.execute("INSERT INTO kb_models VALUES (%s, 384) ON CONFLICT DO NOTHING", (model,))
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO kb_vectors VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(model, h, v) for h, v in random_vectors(hashes)],
            )
    return len(hashes)


def store_vectors_sqlite(path: Path, model: str) -> None:
    db = sqlite3.connect(path)
    hashes = [h for (h,) in db.execute("SELECT DISTINCT hash FROM chunks")]
    db.execute("INSERT OR REPLACE INTO meta VALUES ('embedding_model', ?)", (model,))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('embedding_dimension', '384')")
    db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)", random_vectors(hashes))
    db.commit()
    db.close()


def serve(label: str, cpu: int, env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    started = time.perf_counter()
    process = start(
        [CUSTOM_LLM, "serve"], {"HOST": "127.0.0.1", "PORT": str(port), **env}, cpu, RESULTS / f"replicas-{label}.log"
    )
    wait_until_ready(port, process)
    wait_until_searchable(process, RESULTS / f"replicas-{label}.log")
    url = f"http://127.0.0.1:{port}"
    searched = httpx.get(url + "/knowledge/search", params={"q": "warm up"}, headers=auth(), timeout=60)
    assert searched.status_code == 200  # the first search loads the question model
    return process, url, time.perf_counter() - started


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def search_latency(url: str) -> tuple[float, float]:
    took = []
    with httpx.Client(headers=auth(), timeout=30) as client:
        for question in QUESTIONS:
            started = time.perf_counter()
            assert client.get(url + "/knowledge/search", params={"q": question}).status_code == 200
            took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]


def until_both_find(urls: list[str], text: str, started: float, seconds: float = 30) -> float:
    found: dict[str, float] = {}
    with httpx.Client(headers=auth(), timeout=10) as client:
        while len(found) < len(urls) and time.perf_counter() - started < seconds:
            for url in urls:
                if url not in found and text in client.get(url + "/knowledge/search", params={"q": text}).text:
                    found[url] = time.perf_counter() - started
            time.sleep(0.02)
    return max(found.values()) if len(found) == len(urls) else float("inf")


async def four_streams(urls: list[str]) -> list[int]:
    body = {"stream": True, "messages": [{"role": "user", "content": "hi"}], "bench": {"n": 40, "interval": 0.05}}
    async with httpx.AsyncClient(headers=auth(), timeout=60) as client:
        calls = [client.post(urls[n % 2] + "/chat/completions", json=body) for n in range(4)]
        return sorted(r.status_code for r in await asyncio.gather(*calls))


def searches_while_cut(urls: list[str], proxy: Proxy, seconds: float = 9) -> tuple[int, int]:
    """Searches on both replicas for `seconds`, PostgreSQL cut for the middle third: (answered, failed)."""
    answered = failed = 0
    started = time.perf_counter()
    with httpx.Client(headers=auth(), timeout=10) as client:
        while (elapsed := time.perf_counter() - started) < seconds:
            if seconds / 3 <= elapsed < 2 * seconds / 3 and proxy.open.is_set():
                proxy.cut()
            elif elapsed >= 2 * seconds / 3 and not proxy.open.is_set():
                proxy.open.set()
            for url in urls:
                ok = client.get(url + "/knowledge/search", params={"q": QUESTIONS[answered % 50]}).status_code == 200
                answered, failed = answered + ok, failed + (not ok)
    return answered, failed


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="replicas-"))
    folder = work / "knowledge"
    folder.mkdir()
    knowledge_corpus(folder)
    url, model = database(), BuiltinModel().identity
    rows, processes = [], []
    try:
        upstream_port = free_port()
        upstream = start([sys.executable, "bench/paced_llm.py", str(upstream_port)], {}, 0, RESULTS / "replicas-up.log")
        processes.append(upstream)
        wait_for_port(upstream_port, upstream)
        pg_proxy = Proxy(("127.0.0.1", int(psycopg.conninfo.conninfo_to_dict(url).get("port", 5432))))
        redis_proxy = Proxy(("127.0.0.1", 6379))
        through = psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=pg_proxy.port)
        common = {
            "KNOWLEDGE_DIR": str(folder),
            "LLM_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "LLM_API_KEY": "bench",
            "CUSTOM_LLM_API_KEY": KEY,
            "DATA_DIR": str(work / "data"),
            "LOG_LEVEL": "INFO",  # the log says when a server searches by meaning
        }
        sqlite_index = work / "index.sqlite3"
        took_sqlite = index({**common, "EMBEDDING_MODEL": "none", "KNOWLEDGE_INDEX": str(sqlite_index)})
        took_pg = index({**common, "EMBEDDING_MODEL": "none", "KNOWLEDGE_STORE": url})
        chunks = store_vectors_postgres(url, model)
        store_vectors_sqlite(sqlite_index, model)
        shared = {
            **common,
            "KNOWLEDGE_STORE": through,
            "REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "MAX_STREAMS_PER_KEY": "2",
            "RAG_DEADLINE_MS": "2000",
        }
        limits = {key: shared[key] for key in ("REDIS_URL", "MAX_STREAMS_PER_KEY", "RAG_DEADLINE_MS")}
        small, _, _ = serve("small", 1, {**common, "KNOWLEDGE_DIR": str(ROOT / "knowledge"), **limits})
        rss_small = rss_mb(small.pid)  # the same server with the repository's three documents
        stop(small)
        alone, alone_url, alone_start = serve("sqlite", 1, {**common, "KNOWLEDGE_INDEX": str(sqlite_index), **limits})
        processes.append(alone)
        alone_p50, alone_p99 = search_latency(alone_url)
        rss_alone = rss_mb(alone.pid)
        stop(alone)
        replicas = [serve(f"pg-{n}", n, shared) for n in range(2)]
        processes += [process for process, _, _ in replicas]
        urls = [u for _, u, _ in replicas]
        latency = [search_latency(u) for u in urls]
        rows += [
            f"| knowledge base | {chunks:,} chunks (synthetic, bench.knowledge_corpus), vectors of 384 numbers | |",
            f"| indexing once (words) | SQLite file {took_sqlite:.1f} s | PostgreSQL {took_pg:.1f} s |",
            f"| start-up until searchable by meaning, and a first search | SQLite {alone_start:.1f} s | replicas {', '.join(f'{s:.1f} s' for _, _, s in replicas)} |",
            f"| RSS after start-up (with 3 documents: {rss_small:.0f} MB) | SQLite {rss_alone:.0f} MB | replicas "
            + ", ".join(f"{rss_mb(p.pid):.0f} MB" for p, _, _ in replicas)
            + " |",
            f"| /knowledge/search by meaning over HTTP, p50 / p99 | SQLite {alone_p50:.1f} / {alone_p99:.1f} ms | "
            + ", ".join(f"{p50:.1f} / {p99:.1f} ms" for p50, p99 in latency)
            + " |",
        ]
        changed = folder / "doc000.md"
        changed.write_text(changed.read_text() + "\n\n## Bicycles\n\nzyzzyva quokka bicycle parking behind the shop.\n")
        index({**common, "EMBEDDING_MODEL": "none", "KNOWLEDGE_STORE": url})
        followed = until_both_find(urls, "zyzzyva quokka", time.perf_counter())
        rows.append(
            f"| a changed document found by both replicas, after `custom-llm index` ends | {followed:.2f} s | |"
        )
        statuses = asyncio.run(four_streams(urls))
        rows.append(f"| 4 concurrent streams, one key, MAX_STREAMS_PER_KEY=2 across both | {statuses} | |")
        answered, failed = searches_while_cut(urls, pg_proxy)
        rows.append(f"| searches while PostgreSQL is cut for 3 of 9 s | {answered} answered, {failed} failed | |")
        redis_proxy.cut()
        with httpx.Client(headers=auth(), timeout=10) as client:
            body = {"stream": True, "messages": [{"role": "user", "content": "hi"}], "bench": {"n": 2}}
            served = [client.post(urls[n % 2] + "/chat/completions", json=body).status_code for n in range(20)]
        rows.append(f"| requests while Redis is cut (REDIS_REQUIRED=false) | {served.count(200)} of 20 served | |")
    finally:
        stop(*processes)
        drop(url)
    table = "\n".join(["| | | |", "|---|---|---|", *rows]) + "\n"
    save("replicas.md", table)
    print(table)


if __name__ == "__main__":
    main()
