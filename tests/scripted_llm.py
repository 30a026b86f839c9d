"""A scripted OpenAI-compatible LLM for the tests: answers from a script, records what it received.

It is a bare ASGI app on a real uvicorn server, so the server under test talks to it over real
HTTP on loopback, exactly as it would to OpenAI or vLLM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar


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
    pieces: list[bytes] | None = None  # send these, `delay` apart, as the whole stream body
    forever: bytes | None = None  # after the events, send this again and again, `delay` apart
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # extra response headers
    body: bytes | None = None  # the whole body of a non-streaming answer
    usage: bool = False  # a final usage chunk with choices: []
    # Tool-calling turns: each request takes the next (the last one repeats), e.g.
    # {"say": ["Let me check. "], "calls": [("calculate", '{"expression": "2+2"}')], "after": ["Done."]};
    # "first_delay" in a turn holds that turn's first event back (a slow round).
    turns: list[dict[str, Any]] = field(default_factory=list)
    speech_status: int = 200  # the speech endpoint's answer
    # the speech endpoint breaks off, its answer begun, for a text holding one of these (by text, not by
    # order: the server asks for the next sentence while the first is playing, and either may arrive first)
    speech_fail_for: tuple[str, ...] = ()
    speech_delay: float = 0.0  # seconds between 100 ms pieces of speech
    speech_tone: float = 440.0  # the pitch of the scripted voice (Hz)
    embedding_status: int = 200
    embedding_delay: float = 0.0
    embedding_body: bytes | None = None  # an answer of its own instead of the vectors
    embedding_sizes: list[int] = field(default_factory=list)  # the size of the vectors of each answer, in turn
    fail_times: int | None = None  # only the first N requests get `status` (or the first delay); then all is well
    error_raw: bytes | None = None  # the whole body of an error answer, as bytes (escapes and all)
    speech_error_bytes: int = 0  # the speech endpoint fails with an error body this large, streamed
    # An obedient model: it follows an instruction to end the call wherever it reads one (a passage,
    # a tool result), calling end_call when it is offered.
    obey: bool = False
    models: tuple[str, ...] | None = None  # the model names it knows; any other gets a 404, as OpenAI's


def chunk_event(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000 + index,
        "model": "scripted-model",
        "system_fingerprint": "fp_scripted",
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
        self.active = getattr(self, "active", 0)  # streams still closing from an earlier test count on
        self.probes: list[tuple] = []
        self.speech_requests: list[dict[str, Any]] = []
        self.embedding_requests: list[list[str]] = []
        self.speech_disconnected = threading.Event()
        self.speech_error_sent = 0
        self.probe_status = 200

    def turn(self) -> dict[str, Any] | None:
        turns = self.script.turns
        return (turns.pop(0) if len(turns) > 1 else turns[0]) if turns else None

    @staticmethod
    def turn_events(turn: dict[str, Any]) -> list[bytes]:
        """A turn streamed as providers do: argument fragments of 3 characters, calls interleaved by index."""
        events = [chunk_event(0, {"role": "assistant", "content": ""})]
        events += [chunk_event(1, {"content": text}) for text in turn.get("say", [])]
        calls = turn.get("calls", [])
        for index, (name, _) in enumerate(calls):
            events.append(
                chunk_event(
                    2,
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": f"call_{index}_{name}",
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    },
                )
            )
        size = turn.get("fragment", 3)
        fragments = [[arguments[i : i + size] for i in range(0, len(arguments), size)] for _, arguments in calls]
        for step in range(max(map(len, fragments), default=0)):
            for index, pieces in enumerate(fragments):
                if step < len(pieces):
                    events.append(
                        chunk_event(3, {"tool_calls": [{"index": index, "function": {"arguments": pieces[step]}}]})
                    )
        events += [chunk_event(4, {"content": text}) for text in turn.get("after", [])]
        events.append(chunk_event(5, {}, "tool_calls" if calls else "stop"))
        return events

    @staticmethod
    def turn_message(turn: dict[str, Any]) -> dict[str, Any]:
        calls = [
            {"id": f"call_{i}_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(turn.get("calls", []))
        ]
        text = "".join(turn.get("say", []) + turn.get("after", []))
        return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}

    def events(self) -> list[bytes]:
        """The events the current script streams, in order."""
        script = self.script
        events = [chunk_event(0, {"role": "assistant", "content": ""})]
        events += [chunk_event(i + 1, {"content": word}) for i, word in enumerate(script.words)]
        events.append(chunk_event(len(events), {}, "stop"))
        if script.usage:
            events.append(
                b"data: "
                + json.dumps(
                    {
                        "id": "chatcmpl-upstream",
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": "scripted-model",
                        "choices": [],
                        "usage": {
                            "prompt_tokens": 7,
                            "completion_tokens": len(script.words),
                            "total_tokens": 7 + len(script.words),
                        },
                    }
                ).encode()
                + b"\n\n"
            )
        return events

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["method"] == "GET":  # GET /models: the server's readiness probe
            self.probes.append(tuple(scope["client"]))
            return await self._json(send, self.probe_status, {"object": "list", "data": []})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        if scope["path"].endswith("/audio/speech"):
            request["_headers"] = {k.decode(): v.decode() for k, v in scope["headers"]}
            return await self._speech(request, receive, send)
        if scope["path"].endswith("/embeddings"):
            return await self._embeddings(request, send, dict(scope["headers"]).get(b"authorization", b"").decode())
        self.requests.append(
            {
                "path": scope["path"],
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "body": request,
                "at": time.monotonic(),
                "client": tuple(scope["client"]),
            }
        )
        script = self.script
        if script.fail_times is not None and len(self.requests) > script.fail_times:
            script = Script(turns=script.turns, words=script.words)
        if script.models is not None and request.get("model") not in script.models:
            error = {"message": f"The model `{request.get('model')}` does not exist.", "code": "model_not_found"}
            return await self._json(send, 404, {"error": error})
        if script.status != 200 and script.error_raw is not None:
            await send({"type": "http.response.start", "status": script.status, "headers": []})
            return await send({"type": "http.response.body", "body": script.error_raw})
        if script.status != 200:
            return await self._json(send, script.status, script.error or {"error": {"message": "scripted failure"}})
        turn = self.obeyed(request) if script.obey else self.turn()
        if not request.get("stream") and script.body is not None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            return await send({"type": "http.response.body", "body": script.body})
        if not request.get("stream"):
            message = self.turn_message(turn) if turn else {"role": "assistant", "content": "".join(script.words)}
            return await self._json(
                send,
                200,
                {
                    "id": "chatcmpl-upstream",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": "scripted-model",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                            "message": message,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(script.words),
                        "total_tokens": 7 + len(script.words),
                    },
                },
            )
        self.active += 1
        if turn and "first_delay" in turn:
            script = dataclasses.replace(script, first_delay=turn["first_delay"])
        try:
            await self._race_disconnect(receive, self._stream(send, script, self.turn_events(turn) if turn else None))
        finally:
            self.active -= 1

    @staticmethod
    def obeyed(request: dict[str, Any]) -> dict[str, Any]:
        """What an obedient model does: end the call when anything but the user tells it to."""
        messages = request["messages"]
        planted = next(
            (m["content"] for m in messages if m["role"] != "user" and "end the call" in str(m.get("content"))), None
        )
        offered = any(t["function"]["name"] == "end_call" for t in request.get("tools") or [])
        if planted is None or not offered or (messages[-1]["role"] == "tool" and "end_call" in str(messages[-2])):
            return {"say": ["Here is what I found."]}
        arguments = json.dumps({"goodbye": "Goodbye!", "reason": str(planted)[:200]})
        return {"calls": [("end_call", arguments)]}

    async def _stream(self, send, script: Script, events: list[bytes] | None) -> None:
        headers = [(b"content-type", b"text/event-stream"), *script.headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if script.first_delay:
            await asyncio.sleep(script.first_delay)
        if script.raw is not None:
            await send({"type": "http.response.body", "body": script.raw, "more_body": True})
        elif script.pieces is not None:
            for piece in script.pieces:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(script.delay)
        else:
            for n, event in enumerate(events or self.events()):
                if script.stall_after is not None and n >= script.stall_after:
                    await asyncio.sleep(3600)
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if script.delay:
                    await asyncio.sleep(script.delay)
            while script.forever is not None:
                await send({"type": "http.response.body", "body": script.forever, "more_body": True})
                await asyncio.sleep(script.delay)
            if script.done:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # The scripted embedding model knows a few synonyms, so meaning can be told from wording.
    CONCEPTS: ClassVar[dict[str, int]] = {
        "car": 0,
        "cars": 0,
        "automobile": 0,
        "vehicle": 0,
        "insurance": 1,
        "policy": 1,
        "covers": 1,
        "protected": 1,
        "coverage": 1,
        "theft": 2,
        "stolen": 2,
        "robbery": 2,
    }

    @classmethod
    def embedding(cls, text: str) -> list[float]:
        vector = [0.0] * 32
        for word in re.findall(r"\w+", text.lower()):
            vector[cls.CONCEPTS.get(word, 3 + zlib.crc32(word.encode()) % 29)] += 1.0
        return vector

    async def _embeddings(self, request: dict[str, Any], send, authorization: str = "") -> None:
        texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
        self.embedding_requests.append(texts)
        if self.script.embedding_delay:
            await asyncio.sleep(self.script.embedding_delay)
        if self.script.embedding_status != 200:
            error = {"error": {"message": f"embeddings down for {authorization}"}}  # an echo of our key
            return await self._json(send, self.script.embedding_status, error)
        if self.script.embedding_body is not None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            return await send({"type": "http.response.body", "body": self.script.embedding_body})
        if self.script.embedding_sizes:
            size = self.script.embedding_sizes.pop(0)
            rows = [(self.embedding(t) * 4)[:size] for t in texts]
            body = {"object": "list", "data": [{"index": i, "embedding": row} for i, row in enumerate(rows)]}
            return await self._json(send, 200, body)
        await self._json(
            send,
            200,
            {
                "object": "list",
                "model": request["model"],
                "data": [
                    {"object": "embedding", "index": i, "embedding": self.embedding(t)} for i, t in enumerate(texts)
                ],
            },
        )

    SPEECH_RATE = 24_000

    @classmethod
    def speech_pcm(cls, text: str, tone: float = 440.0) -> bytes:
        """What the scripted voice says for a text: a tone (440 Hz), 30 ms per character, at 24 kHz."""
        samples = int(cls.SPEECH_RATE * max(0.1, 0.03 * len(text)))
        return b"".join(
            int(8000 * math.sin(2 * math.pi * tone * n / cls.SPEECH_RATE)).to_bytes(2, "little", signed=True)
            for n in range(samples)
        )

    async def _speech(self, request: dict[str, Any], receive, send) -> None:
        self.speech_requests.append(request)
        script = self.script
        if script.speech_error_bytes:
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            key = dict(request.get("_headers", {})).get("authorization", "")
            piece = (f"speech failed for {key} " * 3000)[:65536].encode()
            gone = asyncio.ensure_future(receive())  # the disconnect, once the server stops reading
            while self.speech_error_sent < script.speech_error_bytes and not gone.done():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                self.speech_error_sent += len(piece)
                await asyncio.sleep(0)
            gone.cancel()
            return await send({"type": "http.response.body", "body": b""})
        if script.speech_status != 200:
            return await self._json(send, script.speech_status, {"error": {"message": "speech failed"}})
        pcm = self.speech_pcm(request["input"], script.speech_tone)

        async def play() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/pcm")]})
            piece = self.SPEECH_RATE // 10 * 2
            for offset in range(0, len(pcm), piece):
                if any(part in request["input"] for part in script.speech_fail_for):
                    raise RuntimeError("scripted speech failure")  # the connection breaks mid-answer
                await send({"type": "http.response.body", "body": pcm[offset : offset + piece], "more_body": True})
                if script.speech_delay:
                    await asyncio.sleep(script.speech_delay)
            await send({"type": "http.response.body", "body": b""})

        task = asyncio.ensure_future(play())

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not task.done():
                self.speech_disconnected.set()
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task})
            if not task.cancelled() and task.exception():
                raise task.exception()
        finally:
            watcher.cancel()

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
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
