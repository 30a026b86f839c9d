"""A paced OpenAI-compatible upstream for the benchmark: `python3 bench/paced_llm.py PORT`.

Each request says how to answer in its `bench` field (our server forwards unknown keys untouched):
{"n": chunks, "interval": seconds between chunks, "first_delay": seconds before the first, "tag": id}.
Every chunk is ~200 bytes of realistic chunk JSON and carries `emit_ns`, the CLOCK_MONOTONIC time it
was written, so a client on the same host measures one-way latency per chunk. `GET /stats` reports
streams in flight and when each tagged stream saw its client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time

import uvicorn
from asgi import read_body

CHUNK = (
    '{"id":"chatcmpl-bench0123456789","object":"chat.completion.chunk","created":1700000000,'
    '"model":"bench-model","system_fingerprint":"fp_bench01","choices":[{"index":0,'
    '"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"emit_ns":%d}'
)
FINISH = (
    '{"id":"chatcmpl-bench0123456789","object":"chat.completion.chunk","created":1700000000,'
    '"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)

SPEECH_RATE = 24_000
SPEECH_TTFB = float(os.environ.get("BENCH_SPEECH_TTFB_MS", "50")) / 1000
SPEECH_MS_PER_CHAR = 60  # a speaking rate of about 16 characters a second
TONE = b"".join(
    int(6000 * math.sin(2 * math.pi * 220 * n / SPEECH_RATE)).to_bytes(2, "little", signed=True)
    for n in range(SPEECH_RATE)
)  # one second

active = 0
requests = 0
disconnects: dict[str, int] = {}
arrivals: dict[str, int] = {}  # tag -> when its request arrived (CLOCK_MONOTONIC ns)


async def app(scope, receive, send):
    global active, requests
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    if scope["method"] == "GET":
        body = json.dumps(
            {"active": active, "requests": requests, "disconnects": disconnects, "arrivals": arrivals}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        return await send({"type": "http.response.body", "body": body})
    raw = await read_body(receive)
    request = json.loads(raw)
    if scope["path"].endswith("/audio/speech"):
        return await speech(send, request["input"])
    spec = request.get("bench", {})
    requests += 1
    tag = spec.get("tag")
    if tag:
        arrivals[tag] = time.monotonic_ns()
    active += 1
    task = asyncio.ensure_future(stream(send, spec))

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        if not task.done():
            if tag:
                disconnects[tag] = time.monotonic_ns()
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task})
    finally:
        watcher.cancel()
        active -= 1


async def speech(send, text: str) -> None:
    """24 kHz pcm of a tone as long as the text would take to say, after a fixed time to first byte."""
    length = int(SPEECH_RATE * SPEECH_MS_PER_CHAR / 1000 * len(text)) * 2
    pcm = (TONE * (length // len(TONE) + 1))[:length]
    await asyncio.sleep(SPEECH_TTFB)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/pcm")]})
    for offset in range(0, len(pcm), 4800):
        await send({"type": "http.response.body", "body": pcm[offset : offset + 4800], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def text_chunk(text: str) -> bytes:
    return (
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "bench-model",
                "emit_ns": time.monotonic_ns(),
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
    )


async def stream(send, spec):
    """Faults for the soak test: "status" (an error answer), "stall_after" (chunks, then silence),
    "truncate" (the connection ends without [DONE])."""
    n, interval, first_delay = spec.get("n", 20), spec.get("interval", 0.0), spec.get("first_delay", 0.0)
    if spec.get("status"):
        body = b'{"error": {"message": "injected fault", "type": "server_error"}}'
        await send(
            {
                "type": "http.response.start",
                "status": spec["status"],
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        return await send({"type": "http.response.body", "body": body})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    if first_delay:
        await asyncio.sleep(first_delay)
    texts = spec.get("text")  # the answer's words, when they matter (the voice benchmark)
    for i in range(len(texts) if texts else n):
        if i == spec.get("stall_after"):
            await asyncio.sleep(3600)
        await send(
            {
                "type": "http.response.body",
                "more_body": True,
                "body": text_chunk(texts[i]) if texts else b"data: " + (CHUNK % time.monotonic_ns()).encode() + b"\n\n",
            }
        )
        if interval and i < (len(texts) if texts else n) - 1:
            await asyncio.sleep(interval)
    if not spec.get("truncate"):
        await send(
            {
                "type": "http.response.body",
                "more_body": True,
                "body": b"data: " + FINISH.encode() + b"\n\ndata: [DONE]\n\n",
            }
        )
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=30,
    )
