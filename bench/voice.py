"""The voice benchmark: time to first audio through /audio/chat/completions (AUDIO_SOURCE=tts)
against its floor, and whether a 30-second answer plays without a gap.

The floor is what no server can beat: the upstream's time to finish the first sentence plus the
speech endpoint's time to first byte for it, both measured directly in the same run. Part of
`make bench`; alone: `python3 bench/voice.py`. Writes bench/results/voice.md and its table in docs/benchmarks.md.
"""

import asyncio
import itertools
import json
import tempfile
import time

from bench import ms, now, pct, save, start_servers, stop, stream

FIRST = ["Sure", ",", " the", " shop", " opens", " at", " nine", " on", " weekends", "."]
SENTENCE = [" We", " also", " deliver", " to", " most", " addresses", " in", " the", " city", " every", " day", "."]


def answer(sentences: int) -> list[str]:
    return FIRST + SENTENCE * sentences


def payload(words: list[str]) -> bytes:
    return json.dumps(
        {
            "model": "bench-model",
            "stream": True,
            "messages": [{"role": "user", "content": "When are you open?"}],
            "bench": {"text": words, "interval": 0.02},
        }
    ).encode()


async def first_byte(port: int, path: str, body: bytes) -> int:
    """Time to the first byte of a response body (the speech endpoint's TTFB)."""
    started = now()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    await reader.readuntil(b"\r\n\r\n")
    await reader.readuntil(b"\r\n")  # the first chunk's size line: its bytes follow
    elapsed = now() - started
    writer.close()
    return elapsed


async def run() -> str:
    up_port, sv_port, upstream, server = start_servers("voice", AUDIO_SOURCE="tts", KNOWLEDGE_DIR=tempfile.mkdtemp())
    try:
        speech_body = json.dumps(
            {"model": "m", "voice": "v", "input": "Sure, the shop opens at nine on weekends.", "response_format": "pcm"}
        ).encode()
        floors, through = [], []
        for round_number in range(40):
            direct = await stream(up_port, "/v1/chat/completions", payload(answer(1)))
            sentence_done = next(t for t, e in direct.events if b'"content": "."' in e) - direct.start
            floor = sentence_done + await first_byte(up_port, "/v1/audio/speech", speech_body)
            voiced = await stream(sv_port, "/audio/chat/completions", payload(answer(1)), close_after_events=2)
            if round_number >= 5:  # warm-up
                floors.append(floor)
                through.append(voiced.first(b'"data"'))
        rows = [
            f"| time to first audio p50 (ms) | {ms(pct(floors, 50))} | {ms(pct(through, 50))} | "
            f"+{ms(pct(through, 50) - pct(floors, 50))} ms | ≤ 5 ms added |",
            f"| time to first audio p99 (ms) | {ms(pct(floors, 99))} | {ms(pct(through, 99))} | "
            f"+{ms(pct(through, 99) - pct(floors, 99))} ms | - |",
        ]
        # A 30-second answer: does every 40 ms frame arrive before its turn to play?
        for _ in range(2):
            long = await stream(sv_port, "/audio/chat/completions", payload(answer(8)))
            arrivals = [t for t, e in long.events if b'"data"' in e]
            seconds = len(arrivals) * 0.04
            late = max(t - (arrivals[0] + k * 40_000_000) for k, t in enumerate(arrivals))
            gap = max(b - a for a, b in itertools.pairwise(arrivals))
            rows.append(
                f"| {seconds:.0f} s answer: latest frame vs its play time / longest gap (ms) | - | "
                f"{ms(late)} / {ms(gap)} | {len(arrivals)} frames | late ≤ 0: the listener never waits |"
            )
        table = (
            "\n".join(
                [
                    f"Voice, measured {time.strftime('%Y-%m-%d')} (`make bench`): the upstream streams words every 20 ms; "
                    "its speech endpoint answers after 50 ms, faster than real time. Floor = the upstream's time to finish "
                    "the first sentence + the speech endpoint's time to first byte, both measured directly.",
                    "",
                    "| metric | floor | through the server | added | target |",
                    "|---|---|---|---|---|",
                    *rows,
                ]
            )
            + "\n"
        )
        save("voice.md", table)
        return table
    finally:
        stop(server, upstream)


if __name__ == "__main__":
    import uvloop

    print(uvloop.run(run()))
