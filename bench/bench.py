"""The latency benchmark: the server against a direct connection to the same upstream, in one run.

`make bench` (or `python3 bench/bench.py`) starts on loopback a paced upstream (bench/paced_llm.py,
pinned to CPU 0 with this load client) and the server under test (`python3 custom_llm.py`, one
worker, INFO logging as in production, pinned to CPU 1), then measures both paths with the same
raw-socket client, interleaving them so machine noise hits both. It prints one markdown table and
writes it to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
EMIT = re.compile(rb'"emit_ns":(\d+)')
now = time.monotonic_ns


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], cpu: int, log: Path) -> subprocess.Popen:
    cpus = {cpu % os.cpu_count()}
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "a benchmark process died; see bench/results/*.log"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def wait_until_ready(port: int, process: subprocess.Popen) -> None:
    """Wait for GET /ready: the server has indexed its knowledge base and reached its upstream."""
    wait_for_port(port, process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            if connection.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise RuntimeError("the server never became ready")


def wait_until_searchable(process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    """Wait for the server's log to say it searches by meaning: ready, it searches by words while it
    loads the vectors."""
    deadline = time.monotonic() + seconds
    while "searchable by meaning" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


def start_servers(label: str, **server_env: str) -> tuple[int, int, subprocess.Popen, subprocess.Popen]:
    """The paced upstream (CPU 0) and the server under test (CPU 1, `python3 custom_llm.py` as a user
    runs it) on free ports, ready; their logs go to bench/results/<label>-*.log."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    up_port, sv_port = free_port(), free_port()
    upstream = start([sys.executable, "bench/paced_llm.py", str(up_port)], {}, 0, results / f"{label}-upstream.log")
    server = start(
        [sys.executable, "custom_llm.py"],
        {
            "HOST": "127.0.0.1",
            "PORT": str(sv_port),
            "LLM_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
            "LLM_API_KEY": "bench-upstream-key",
            "CUSTOM_LLM_API_KEY": KEY,
            "LOG_LEVEL": "INFO",
            **server_env,
        },
        1,
        results / f"{label}-server.log",
    )
    try:
        wait_for_port(up_port, upstream)
        wait_until_ready(sv_port, server)
    except BaseException:
        stop(server, upstream)
        raise
    return up_port, sv_port, upstream, server


def publish(name: str, rows: list[str]) -> None:
    """A bench's table, one row a line: saved (save) and printed."""
    table = "\n".join(rows) + "\n"
    save(name, table)
    print(table)


def save(name: str, table: str) -> None:
    """Write a results table to bench/results/<name> (git-ignored), and into docs/benchmarks.md between
    its markers (`<!-- bench:<stem> ... -->`), stamped with the date and the machine."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / name).write_text(table)
    stem, docs = Path(name).stem, ROOT / "docs" / "benchmarks.md"
    text = docs.read_text()
    start = re.search(rf"<!-- bench:{stem}\b[^>]*-->\n", text)
    end = text.find(f"<!-- /bench:{stem} -->")
    if start is None or end < 0:
        print(f"docs/benchmarks.md has no bench:{stem} markers; the table is in bench/results/{name}")
        return
    stamp = f"_Measured {date.today().isoformat()} on {machine()}._\n\n"
    docs.write_text(text[: start.end()] + stamp + table.strip("\n") + "\n" + text[end:])


def machine() -> str:
    """The machine a table was measured on: processor, cores, Python."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.machine()
    )
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.terminate()
        process.wait(10)


async def http_get(port: int, path: str, headers: str = "") -> bytes:
    """The body of a one-off GET (stats, metrics)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return raw.split(b"\r\n\r\n", 1)[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state towards a local port (the upstream's), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "01" and int(parts[2].split(":")[1], 16) == port:
            count += 1
    return count


def knowledge_corpus(folder: Path, chunks: int = 10_000) -> None:
    """A synthetic 10,000-chunk knowledge base, so /rag pays a realistic retrieval cost."""
    rng = random.Random(7)
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(5000)
    ]
    vocabulary += ["opening", "hours", "weekends", "price", "delivery", "refund", "account", "password"]
    for f in range(100):
        sections = []
        for s in range(chunks // 100):
            words = " ".join(rng.choice(vocabulary) for _ in range(80))
            sections.append(f"## Section {s}\n\n{words}.")
        (folder / f"doc{f:03d}.md").write_text(f"# Document {f}\n\n" + "\n\n".join(sections))


# --- the client: raw HTTP/1.1 on asyncio streams, so it adds as little as possible ------------------


@dataclass
class Sample:
    start: int
    status: int = 0
    events: list[tuple[int, bytes]] = field(default_factory=list)
    closed: int = 0

    def first(self, marker: bytes = b"") -> int | None:
        return next((t - self.start for t, e in self.events if marker in e), None)

    @property
    def ttft(self) -> int | None:
        return self.first(b"emit_ns")  # the first chunk that came from the upstream

    def chunk_latencies(self) -> list[int]:
        return [t - int(m.group(1)) for t, e in self.events if (m := EMIT.search(e))]

    def gaps(self) -> list[int]:
        times = [t for t, e in self.events if b"emit_ns" in e]
        return [b - a for a, b in itertools.pairwise(times)]


def body(n: int = 20, interval: float = 0.0, first_delay: float = 0.0, tag: str | None = None, **faults) -> bytes:
    return json.dumps(
        {
            "model": "bench-model",
            "stream": True,
            "messages": [
                {"role": "system", "content": "You are a helpful voice assistant."},
                {"role": "user", "content": "What are your opening hours on weekends?"},
            ],
            "bench": {"n": n, "interval": interval, "first_delay": first_delay, "tag": tag, **faults},
        }
    ).encode()


async def stream(
    port: int, path: str, payload: bytes, *, close_after_events: int | None = None, close_after_s: float | None = None
) -> Sample:
    sample = Sample(now())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {KEY}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )

    async def read() -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        sample.status = int(head[9:12])
        chunked = b"chunked" in head.lower()
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
            received = now()
            pending += data
            *events, pending = pending.split(b"\n\n")
            sample.events += [(received, e) for e in events]
            if close_after_events and len(sample.events) >= close_after_events:
                return

    try:
        await asyncio.wait_for(read(), close_after_s or 60)
    except TimeoutError:
        if close_after_s is None:
            raise
    sample.closed = now()
    writer.close()
    try:  # make sure the FIN has gone out before the next measurement starts
        await asyncio.wait_for(writer.wait_closed(), 1)
    except (TimeoutError, OSError):
        pass
    return sample


# --- statistics -------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


# --- the scenarios ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, upstream_port: int, null_port: int, server_port: int, server_pid: int):
        self.up, self.null, self.sv, self.pid = upstream_port, null_port, server_port, server_pid
        self.rows: list[tuple[str, ...]] = []

    def paths(self, rag: bool = False) -> dict[str, tuple[int, str]]:
        return {
            "direct": (self.up, "/v1/chat/completions"),
            "null": (self.null, "/"),
            "server": (self.sv, "/rag/chat/completions" if rag else "/chat/completions"),
        }

    def row(self, metric: str, direct: str, null: str, server: str, ratio: str, target: str) -> None:
        self.rows.append((metric, direct, null, server, ratio, target))
        print(
            f"  {metric}: direct {direct} | null relay {null} | server {server} | {ratio} | target {target}", flush=True
        )

    async def interleaved(self, rounds: int, payload: bytes, rag: bool = False) -> dict[str, list[Sample]]:
        paths = self.paths(rag)
        if rag:
            del paths["null"]
        samples: dict[str, list[Sample]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, (port, path) in random.sample(list(paths.items()), len(paths)):
                samples[name].append(await stream(port, path, payload))
        return samples

    async def ttft(self) -> None:
        await self.interleaved(30, body(n=5))  # warm-up
        s = await self.interleaved(300, body(n=5))
        t = {name: [x.ttft for x in samples] for name, samples in s.items()}
        for p, target in ((50, "≤ 1 ms added"), (99, "≤ 3 ms added")):
            self.row(
                f"TTFT p{p}, 1 stream (ms)",
                *(ms(pct(t[k], p)) for k in ("direct", "null", "server")),
                f"+{ms(pct(t['server'], p) - pct(t['direct'], p))} ms",
                target,
            )
        rag = await self.interleaved(100, body(n=5), rag=True)
        waiting = [x.first() for x in rag["server"]]
        answer = [x.ttft for x in rag["server"]]
        self.row("/rag: waiting phrase p50 (ms)", "-", "-", ms(pct(waiting, 50)), "the first event", "-")
        self.row(
            "/rag: first upstream token p50 (ms)",
            ms(pct([x.ttft for x in rag["direct"]], 50)),
            "-",
            ms(pct(answer, 50)),
            f"retrieval ≈ {ms(pct(answer, 50) - pct(t['server'], 50))} ms",
            "10k-chunk index",
        )

    async def chunks(self) -> None:
        s = await self.interleaved(20, body(n=50, interval=0.02))
        lat = {k: [lat for x in v for lat in x.chunk_latencies()] for k, v in s.items()}
        stalls = {k: str(sum(g > 40e6 for x in v for g in x.gaps())) for k, v in s.items()}
        for p, target in ((50, "≤ 0.1 ms added"), (99, "-")):
            self.row(
                f"per-chunk latency p{p} (ms)",
                *(ms(pct(lat[k], p)) for k in ("direct", "null", "server")),
                f"+{ms(pct(lat['server'], p) - pct(lat['direct'], p))} ms",
                target,
            )
        self.row("stalls (gap > 40 ms), 1 stream", stalls["direct"], stalls["null"], stalls["server"], "", "0")

    async def lanes(self, port: int, path: str, c: int, seconds: float) -> list[Sample]:
        """c streams kept in flight for a while: each lane starts its next stream when one ends, and
        the lanes start spread over one stream's length, as calls arrive in real life."""
        samples: list[Sample] = []
        until = time.monotonic() + seconds

        async def lane(offset: float) -> None:
            await asyncio.sleep(offset)
            while time.monotonic() < until:
                try:
                    samples.append(await stream(port, path, body(n=50, interval=0.02)))
                except (OSError, asyncio.IncompleteReadError):
                    samples.append(Sample(now()))

        await asyncio.gather(*(lane(i / c) for i in range(c)))
        return samples

    async def sweep(self) -> None:
        for c in (1, 10, 50, 100, 200):
            results: dict[str, list[Sample]] = {"direct": [], "server": []}
            for order in (("direct", "server"), ("server", "direct")) * 2:
                for name in order:
                    results[name] += await self.lanes(*self.paths()[name], c, seconds=2.0)
            d = [x.ttft for x in results["direct"] if x.ttft]
            v = [x.ttft for x in results["server"] if x.ttft]
            errors = sum(1 for x in results["server"] if x.status != 200 or len(x.events) != 52)
            stalls = {k: sum(g > 40e6 for x in r for g in x.gaps()) for k, r in results.items()}
            self.row(
                f"c={c} paced streams: TTFT p50 / p99 (ms)",
                f"{ms(pct(d, 50))} / {ms(pct(d, 99))}",
                "-",
                f"{ms(pct(v, 50))} / {ms(pct(v, 99))}",
                f"p99 ×{pct(v, 99) / pct(d, 99):.2f}; stalls {stalls['direct']} / {stalls['server']}; "
                f"errors {errors} of {len(results['server'])}",
                "p99 ≤ 1.5× direct at c=100; 0 stalls" if c == 100 else "0 stalls",
            )
        # The worst case: 100 calls in the same millisecond, each paying its full setup at once.
        burst = {}
        for name in ("direct", "server"):
            port, path = self.paths()[name]
            burst[name] = [x.ttft for x in await asyncio.gather(*(stream(port, path, body(n=5)) for _ in range(100)))]
        self.row(
            "burst: 100 calls in the same ms, TTFT p50 / p99 (ms)",
            f"{ms(pct(burst['direct'], 50))} / {ms(pct(burst['direct'], 99))}",
            "-",
            f"{ms(pct(burst['server'], 50))} / {ms(pct(burst['server'], 99))}",
            f"p99 ×{pct(burst['server'], 99) / pct(burst['direct'], 99):.2f}",
            "-",
        )

    async def throughput(self) -> None:
        rates, cpu = {}, 0.0
        for name, (port, path) in self.paths().items():
            before = cpu_seconds(self.pid)
            started = now()
            batch = await asyncio.gather(*(stream(port, path, body(n=5000)) for _ in range(8)))
            elapsed = (now() - started) / 1e9
            chunks = sum(len(x.chunk_latencies()) for x in batch)
            rates[name] = chunks / elapsed
            if name == "server":
                cpu = (cpu_seconds(self.pid) - before) / chunks * 1000
        self.row(
            "relay throughput, 0 pacing (chunks/s)",
            *(f"{rates[k]:,.0f}" for k in ("direct", "null", "server")),
            f"{rates['server'] / rates['direct']:.0%} of direct",
            "≥ 50%",
        )
        self.row("server CPU per 1,000 chunks (ms)", "-", "-", f"{cpu * 1000:.1f}", "", "-")

    async def cancel_phase(self, name: str, samples: int, **kw) -> None:
        latencies, late_calls = [], 0
        for batch in range(samples // 10):
            tags = [f"{name}-{batch}-{i}" for i in range(10)]
            results = await asyncio.gather(
                *(
                    stream(self.sv, kw.get("path", "/chat/completions"), body(tag=t, **kw["spec"]), **kw["close"])
                    for t in tags
                )
            )
            await asyncio.sleep(0.05)
            stats = await self.stats()
            for tag, sample in zip(tags, results):
                if tag in stats["disconnects"]:
                    latencies.append(stats["disconnects"][tag] - sample.closed)
                # 1 ms of slack: the upstream shares its core with this client, so it may read a request
                # the server sent before the hang-up a little after it.
                late_calls += stats["arrivals"].get(tag, 0) > sample.closed + 1_000_000
        if kw.get("path") == "/rag/chat/completions":
            self.row(
                f"cancel {name}: upstream calls made after the hang-up", "-", "-", f"{late_calls} of {samples}", "", "0"
            )
        if latencies:
            self.row(
                f"cancel {name}: disconnect → upstream closed p50 / p99 (ms)",
                "-",
                "-",
                f"{ms(pct(latencies, 50))} / {ms(pct(latencies, 99))}",
                f"{len(latencies)} samples",
                "p99 ≤ 5 ms",
            )

    async def cancel(self) -> None:
        await self.cancel_phase(
            "before first token", 100, spec=dict(n=5, first_delay=2.0), close=dict(close_after_s=0.05)
        )
        await self.cancel_phase("mid-stream", 100, spec=dict(n=100, interval=0.02), close=dict(close_after_events=5))
        await self.cancel_phase(
            "during retrieval",
            100,
            spec=dict(n=5, first_delay=2.0),
            close=dict(close_after_events=1),
            path="/rag/chat/completions",
        )
        # 1,000 streams cut at random points, 32 at a time.
        for _ in range(1000 // 32 + 1):
            await asyncio.gather(
                *(
                    stream(
                        self.sv,
                        "/chat/completions",
                        body(n=100, interval=0.005),
                        close_after_events=random.randint(1, 60),
                    )
                    for _ in range(32)
                )
            )
        await asyncio.sleep(1.0)
        stats = await self.stats()
        self.row(
            "after 1,000+ cancelled streams: upstream streams still open",
            "-",
            "-",
            str(stats["active"]),
            f"{established_to(self.up)} pooled connections",
            "0 streams",
        )

    async def memory(self) -> None:
        idle = rss_mb(self.pid)
        held = {}
        for k in (100, 400):
            tasks = [
                asyncio.ensure_future(stream(self.sv, "/chat/completions", body(n=8, interval=1.0))) for _ in range(k)
            ]
            await asyncio.sleep(2.5)
            held[k] = rss_mb(self.pid)
            await asyncio.gather(*tasks)
        per_stream = (held[400] - held[100]) / 300 * 1024
        self.row(
            "RSS idle / with 400 streams in flight (MB)",
            "-",
            "-",
            f"{idle:.1f} / {held[400]:.1f}",
            f"{per_stream:.0f} KB per stream",
            "-",
        )

        async def burst(count: int) -> None:
            for _ in range(count // 50):
                await asyncio.gather(*(stream(self.sv, "/chat/completions", body(n=5)) for _ in range(50)))

        await burst(1000)
        warm = rss_mb(self.pid)
        await burst(10_000)
        self.row(
            "RSS after 1,000 → after 11,000 requests (MB)",
            "-",
            "-",
            f"{warm:.1f} → {rss_mb(self.pid):.1f}",
            f"+{rss_mb(self.pid) - warm:.1f} MB",
            "≤ 20 MB growth",
        )

    async def stats(self) -> dict:
        return json.loads(await http_get(self.up, "/stats"))


async def run(only: set[str]) -> Bench:
    os.sched_setaffinity(0, {0})
    corpus = Path(tempfile.mkdtemp(prefix="bench-knowledge-"))
    knowledge_corpus(corpus)
    up_port, sv_port, upstream, server = start_servers("bench", KNOWLEDGE_DIR=str(corpus))
    null_port = free_port()
    null = start(
        [sys.executable, "bench/null_relay.py", str(null_port), f"http://127.0.0.1:{up_port}/v1/chat/completions"],
        {},
        1,
        ROOT / "bench" / "results" / "null_relay.log",
    )
    try:
        wait_for_port(null_port, null)
        bench = Bench(up_port, null_port, sv_port, server.pid)
        for name in ("ttft", "chunks", "sweep", "throughput", "cancel", "memory"):
            if not only or name in only:
                print(f"{name} ...", flush=True)
                await getattr(bench, name)()
        return bench
    finally:
        stop(server, null, upstream)


def report(bench: Bench) -> str:
    lines = [
        f"Measured {date.today()} on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "server (and the null relay) on CPU 1, upstream and client on CPU 0. Command: `make bench`.",
        "",
        "| metric | direct | null relay | through the server | added / ratio | target |",
        "|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in bench.rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="scenarios to run: ttft chunks sweep throughput cancel memory")
    args = parser.parse_args()
    import uvloop

    bench = uvloop.run(run(set(args.only)))
    table = report(bench)
    save("latest.md", table)
    print("\n" + table)


if __name__ == "__main__":
    main()
