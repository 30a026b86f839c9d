"""Capacity per core: `make bench` (or `python3 bench/capacity.py`). How many concurrent voice calls one
server process (one core) sustains while the TTFT it adds stays within 5 ms at p99, and what a caller
gets past that with MAX_UPSTREAM_STREAMS set to the measured capacity (a quick 503, never a collapse).

A call is what Agora's engine does for one user: a turn (an answer of 100 chunks paced at 50 chunks/s,
two seconds of speech), then the user's own time to listen and speak (2 to 4 s), then the next turn.
Calls start spread over one turn's length. Each load level runs against the upstream directly and
through the server, in the same run, and the added TTFT is p99(server) − p99(direct) at that level.
The server is on CPU 1 alone; the paced upstream and this client share CPU 0 (rig-bound when that
core is saturated: the row says so). Writes bench/results/capacity.md.
"""

import asyncio
import random
import time
from pathlib import Path

from bench import body, cpu_seconds, ms, pct, publish, start_servers, stop, stream

ROOT = Path(__file__).resolve().parent.parent

WINDOW = 15.0  # seconds of load per level and path
TURN = body(n=100, interval=0.02)
LEVELS = (50, 100, 150, 200, 300, 400)
TARGET_NS = 5_000_000


async def calls(port: int, path: str, count: int, seconds: float) -> tuple[list[int], dict[int, int], int]:
    """`count` calls for `seconds`: TTFTs of the turns that streamed, statuses, peak streams at once."""
    ttfts: list[int] = []
    statuses: dict[int, int] = {}
    until, live, peak = time.monotonic() + seconds, 0, 0

    async def call(offset: float) -> None:
        nonlocal live, peak
        await asyncio.sleep(offset)
        while time.monotonic() < until:
            live += 1
            peak = max(peak, live)
            try:
                sample = await stream(port, path, TURN)
                statuses[sample.status] = statuses.get(sample.status, 0) + 1
                if sample.status == 200 and sample.ttft:
                    ttfts.append(sample.ttft)
            except (OSError, asyncio.IncompleteReadError):
                statuses[0] = statuses.get(0, 0) + 1  # the connection failed: a collapse
            finally:
                live -= 1
            await asyncio.sleep(random.uniform(2.0, 4.0))

    await asyncio.gather(*(call(2.0 * i / count) for i in range(count)))
    return ttfts, statuses, peak


def cpu0_busy(seconds: float) -> float:
    """CPU 0's busy share over a window (is the rig, not the server, the limit?)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[1].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1 - (idle2 - idle) / max(1, total2 - total)


async def level(
    up: int, sv: int, pid: int, count: int, rows: list[str], refused: set[int] = frozenset()
) -> tuple[bool, int]:
    """One load level, direct then through the server; passes when the server adds at most 5 ms at p99
    and answers every turn with 200 (or with a status in `refused`, the clean refusal of an overload)."""
    direct, _, _ = await calls(up, "/v1/chat/completions", count, WINDOW)
    before = cpu_seconds(pid)
    load = asyncio.get_running_loop().run_in_executor(None, cpu0_busy, WINDOW - 1)
    served, statuses, peak = await calls(sv, "/chat/completions", count, WINDOW)
    busy, cpu = await load, (cpu_seconds(pid) - before) / WINDOW
    added = pct(served, 99) - pct(direct, 99)
    ok = added <= TARGET_NS and set(statuses) <= {200, *refused}
    rows.append(
        f"| {count} | {ms(pct(direct, 99))} | {ms(pct(served, 50))} / {ms(pct(served, 99))} | +{ms(added)} | "
        f"{peak} | {cpu:.0%} | {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))} | "
        f"{'pass' if ok else 'fail'}{' (rig-bound: CPU 0 at %.0f%%)' % (busy * 100) if busy > 0.9 else ''} |"
    )
    print(rows[-1], flush=True)
    return ok, peak


async def sweep(rows: list[str]) -> tuple[int, int]:
    up, sv, upstream, server = start_servers("capacity")
    try:
        capacity, streams = 0, 0
        for count in LEVELS:
            ok, peak = await level(up, sv, server.pid, count, rows)
            if not ok:
                break
            capacity, streams = count, peak
        return capacity, streams
    finally:
        stop(server, upstream)


async def overload(capacity: int, streams: int, rows: list[str]) -> None:
    up, sv, upstream, server = start_servers("capacity-capped", MAX_UPSTREAM_STREAMS=str(streams))
    try:
        await level(up, sv, server.pid, capacity * 2, rows, refused={503})
    finally:
        stop(server, upstream)


def main() -> None:
    rows = [
        f"Capacity, measured {time.strftime('%Y-%m-%d')} (`make bench`, bench/capacity.py): calls of 2 s turns at "
        "50 chunks/s with 2–4 s between turns; one server process on one core.",
        "",
        "| calls | direct TTFT p99 (ms) | server TTFT p50 / p99 (ms) | added p99 | streams at once (peak) | "
        "server CPU | statuses | ≤ 5 ms added |",
        "|---|---|---|---|---|---|---|---|",
    ]
    capacity, streams = asyncio.run(sweep(rows))
    rows.append(
        f"| **{capacity} calls** per core within 5 ms added at p99 ({streams} streams at once at the peak) |"
        " | | | | | | |"
    )
    if capacity:
        rows.append(f"| with `MAX_UPSTREAM_STREAMS={streams}`, twice as many calls: |  |  |  |  |  |  |  |")
        asyncio.run(overload(capacity, streams, rows))
    publish("capacity.md", rows)


if __name__ == "__main__":
    main()
