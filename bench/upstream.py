"""A paced OpenAI-compatible upstream for the benchmark: `python3 bench/upstream.py PORT`.

Each request says how to answer in its `bench` field (our server forwards unknown keys untouched):
{"n": chunks, "interval": seconds between chunks, "first_delay": seconds before the first, "tag": id}.
Every chunk is ~200 bytes of realistic chunk JSON and carries `emit_ns`, the CLOCK_MONOTONIC time it
was written, so a client on the same host measures one-way latency per chunk. `GET /stats` reports
streams in flight and when each tagged stream saw its client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvicorn

CHUNK = ('{"id":"chatcmpl-bench0123456789","object":"chat.completion.chunk","created":1700000000,'
         '"model":"bench-model","system_fingerprint":"fp_bench01","choices":[{"index":0,'
         '"delta":{"content":" token"},"logprobs":null,"finish_reason":null}],"emit_ns":%d}')
FINISH = ('{"id":"chatcmpl-bench0123456789","object":"chat.completion.chunk","created":1700000000,'
          '"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')

active = 0
requests = 0
disconnects: dict[str, int] = {}
tags_seen: set[str] = set()


async def app(scope, receive, send):
    global active, requests
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    if scope["method"] == "GET":
        body = json.dumps({"active": active, "requests": requests, "disconnects": disconnects,
                           "tags": sorted(tags_seen)}).encode()
        if scope["path"] == "/reset":
            disconnects.clear(), tags_seen.clear()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        return await send({"type": "http.response.body", "body": body})
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    spec = json.loads(raw).get("bench", {})
    requests += 1
    tag = spec.get("tag")
    if tag:
        tags_seen.add(tag)
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


async def stream(send, spec):
    """Faults for the soak test: "status" (an error answer), "stall_after" (chunks, then silence),
    "truncate" (the connection ends without [DONE])."""
    n, interval, first_delay = spec.get("n", 20), spec.get("interval", 0.0), spec.get("first_delay", 0.0)
    if spec.get("status"):
        body = b'{"error": {"message": "injected fault", "type": "server_error"}}'
        await send({"type": "http.response.start", "status": spec["status"], "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        return await send({"type": "http.response.body", "body": body})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    if first_delay:
        await asyncio.sleep(first_delay)
    for i in range(n):
        if i == spec.get("stall_after"):
            await asyncio.sleep(3600)
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + (CHUNK % time.monotonic_ns()).encode() + b"\n\n"})
        if interval and i < n - 1:
            await asyncio.sleep(interval)
    if not spec.get("truncate"):
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + FINISH.encode() + b"\n\ndata: [DONE]\n\n"})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                backlog=4096, timeout_keep_alive=30)
