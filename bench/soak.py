"""The soak test: `make soak`. Thousands of streams through the server with a third of the callers
hanging up at random points and upstream faults mixed in; afterwards nothing may be left open.

It starts the paced upstream (bench/paced_llm.py, which injects the faults each request asks for)
and the server (`python3 custom_llm.py`, short timeouts so stalls resolve quickly), runs the load
from this process, then checks: no upstream stream still open, no request in flight, no growth in
the event loop's tasks, and the server's memory.
"""

import argparse
import asyncio
import collections
import random
import tempfile
import time

from bench import KEY, Bench, body, established_to, http_get, rss_mb, save, start_servers, stop, stream

IN_FLIGHT = 'custom_llm_in_flight_requests{endpoint="chat"}'
FAULTS = [  # (weight, name, request spec)
    (70, "healthy", dict(n=20, interval=0.01)),
    (6, "upstream 500", dict(status=500)),
    (6, "upstream 429", dict(status=429)),
    (6, "stall before first token", dict(n=5, first_delay=1.5)),
    (6, "stall mid-stream", dict(n=20, interval=0.01, stall_after=5)),
    (6, "truncated stream", dict(n=10, truncate=True)),
]


async def metric(port: int, name: str) -> float:
    text = (await http_get(port, "/metrics", f"authorization: Bearer {KEY}\r\n")).decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def soak(requests: int, concurrency: int) -> None:
    up_port, sv_port, upstream, server = start_servers(
        "soak", LLM_FIRST_TOKEN_TIMEOUT="1", LLM_IDLE_TIMEOUT="1", KNOWLEDGE_DIR=tempfile.mkdtemp()
    )
    try:
        bench = Bench(up_port, 0, sv_port, server.pid)
        outcomes: collections.Counter = collections.Counter()
        queue: asyncio.Queue = asyncio.Queue()
        rng = random.Random(11)

        def fill(count: int) -> None:
            for fault in rng.choices(FAULTS, weights=[weight for weight, _, _ in FAULTS], k=count):
                queue.put_nowait(fault)

        fill(300)

        async def caller() -> None:
            while not queue.empty():
                _, name, spec = queue.get_nowait()
                hang_up = rng.random() < 1 / 3
                close = (
                    dict(close_after_events=rng.randint(1, 15))
                    if hang_up and rng.random() < 0.5
                    else dict(close_after_s=rng.uniform(0.0, 0.5))
                    if hang_up
                    else {}
                )
                try:
                    sample = await stream(sv_port, "/chat/completions", body(**spec), **close)
                except (OSError, asyncio.IncompleteReadError):
                    outcomes[name, "connection error"] += 1
                    continue
                done = bool(sample.events) and sample.events[-1][1] == b"data: [DONE]"
                error_event = any(b'"error"' in event for _, event in sample.events)
                if sample.status != 200 and sample.status:
                    kind = f"{sample.status}, OpenAI error JSON"
                elif done:
                    kind = "200, error event, [DONE]" if error_event else "200, answer, [DONE]"
                else:
                    kind = "hung up" if hang_up else "200, cut without [DONE] (defect)"
                outcomes[name, kind] += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))  # warm-up: every path
        warm_rss, warm_tasks = rss_mb(server.pid), await metric(sv_port, "custom_llm_event_loop_tasks")
        fill(requests)
        outcomes.clear()
        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.5)  # stalled upstream calls end on the server's idle timeout
        stats = await bench.stats()
        total = sum(outcomes.values())
        lines = [
            f"Soak: {total} streams in {elapsed:.0f} s, {concurrency} at a time, a third hanging up at random "
            f"points (`make soak`, {time.strftime('%Y-%m-%d')}).",
            "",
            "| upstream behaviour | what the caller got | streams |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {kind} | {count} |" for (name, kind), count in sorted(outcomes.items())]
        lines += [
            "",
            "| afterwards | value |",
            "|---|---|",
            f"| upstream streams still open | {stats['active']} |",
            f"| server connections to the upstream (idle, pooled) | {established_to(up_port)} |",
            f"| requests in flight (metrics) | {await metric(sv_port, IN_FLIGHT):.0f} |",
            f"| event loop tasks: after warm-up → after soak | {warm_tasks:.0f} → "
            f"{await metric(sv_port, 'custom_llm_event_loop_tasks'):.0f} |",
            f"| server RSS: after warm-up → after soak (MB) | {warm_rss:.1f} → {rss_mb(server.pid):.1f} |",
        ]
        report = "\n".join(lines) + "\n"
        save("soak.md", report)
        print(report)
    finally:
        stop(server, upstream)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    import uvloop

    uvloop.run(soak(args.requests, args.concurrency))
