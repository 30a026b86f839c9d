"""A scripted OpenAI-compatible LLM for the tests: answers from a script, records what it received.

It is a bare ASGI app on a real uvicorn server, so the server under test talks to it over real
HTTP on loopback, exactly as it would to OpenAI or vLLM.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Script:
    """What the next requests get."""

    words: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " upstream", "."])
    status: int = 200
    error: dict[str, Any] | None = None  # the JSON body of an error answer
    first_delay: float = 0.0  # seconds before the first event (time to first token)
    delay: float = 0.0  # seconds between events
    done: bool = True  # end with data: [DONE]
    stall_after: int | None = None  # stop sending (but keep the connection) after this many events
    raw: bytes | None = None  # send these bytes verbatim as the whole stream body
    usage: bool = False  # a final usage chunk with choices: []


def chunk_event(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1700000000 + index,
        "model": "scripted-model", "system_fingerprint": "fp_scripted",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class ScriptedUpstream:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.active = 0

    def events(self) -> list[bytes]:
        """The events the current script streams, in order."""
        script = self.script
        events = [chunk_event(0, {"role": "assistant", "content": ""})]
        events += [chunk_event(i + 1, {"content": word}) for i, word in enumerate(script.words)]
        events.append(chunk_event(len(events), {}, "stop"))
        if script.usage:
            events.append(b"data: " + json.dumps({
                "id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "scripted-model", "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(script.words), "total_tokens": 7 + len(script.words)},
            }).encode() + b"\n\n")
        return events

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        self.requests.append({"path": scope["path"], "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                              "body": request, "at": time.monotonic(),
                              "client": tuple(scope["client"])})
        script = self.script
        if script.status != 200:
            return await self._json(send, script.status, script.error or {"error": {"message": "scripted failure"}})
        if not request.get("stream"):
            return await self._json(send, 200, {
                "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1700000000, "model": "scripted-model",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(script.words)}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(script.words), "total_tokens": 7 + len(script.words)},
            })
        self.active += 1
        try:
            await self._race_disconnect(receive, self._stream(send, script))
        finally:
            self.active -= 1

    async def _stream(self, send, script: Script) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if script.first_delay:
            await asyncio.sleep(script.first_delay)
        if script.raw is not None:
            await send({"type": "http.response.body", "body": script.raw, "more_body": True})
        else:
            for n, event in enumerate(self.events()):
                if script.stall_after is not None and n >= script.stall_after:
                    await asyncio.sleep(3600)
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if script.delay:
                    await asyncio.sleep(script.delay)
            if script.done:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _race_disconnect(self, receive, work) -> None:
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not task.done():
                self.disconnected_at = time.monotonic()
                self.disconnected.set()
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task}, return_when=asyncio.ALL_COMPLETED)
        finally:
            watcher.cancel()

    @staticmethod
    async def _json(send, status: int, body: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
