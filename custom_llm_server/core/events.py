"""The typed events an answer is made of, and how they are written as OpenAI SSE chunks.

The answer loop, /rag and the voice yield these; the SSE writer and the non-streaming
collectors consume them. Nothing reads its own output back: an upstream event that is passed on
untouched stays bytes (`Relayed`), and is parsed only by a consumer that needs its words.
An error is not an event: it is raised (`serving.ApiError`) and the writer turns it into the
error event and `[DONE]`.
"""

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Relayed:
    """Upstream events passed on as they came, a batch per network read."""

    payloads: list[bytes]

    def text(self) -> str:
        """The words in these events (for the voice and the history; the relay never needs them)."""
        return "".join(content_of(payload) for payload in self.payloads)


@dataclass(slots=True)
class Text:
    """Words of the server's own: a waiting phrase, a bridge phrase, a broadcast."""

    text: str


@dataclass(slots=True)
class ToolCall:
    """An upstream chunk carrying calls to the caller's tools (renumbered from 0), or the round's
    closing chunk with finish_reason "tool_calls"."""

    chunk: dict[str, Any]


@dataclass(slots=True)
class Audio:
    """A piece of the spoken answer: its transcript (sent before its audio), or 40 ms of 16 kHz PCM."""

    transcript: str | None = None
    pcm: bytes | None = None


@dataclass(slots=True)
class Metadata:
    """Agora's `chat.completion.custom_metadata` chunk, e.g. {"interruptable": False}: the engine reads
    it only as the first chunk of an answer."""

    metadata: dict[str, Any]


@dataclass(slots=True)
class Note:
    """What happened inside the answer (the passages retrieved, a tool's call and result), written as
    an SSE comment for a caller that asked for notes (the playground); clients ignore comments."""

    kind: str
    data: Any


@dataclass(slots=True)
class End:
    """The end of an answer the server made itself (an upstream's answer carries its own)."""

    finish_reason: str = "stop"


Event = Relayed | Text | ToolCall | Audio | Metadata | Note | End


def words_of(event: Event) -> str:
    """What an event says aloud: its text, or an audio piece's transcript."""
    if isinstance(event, Relayed):
        return event.text()
    if isinstance(event, Text):
        return event.text
    if isinstance(event, Audio):
        return event.transcript or ""
    return ""


def content_of(payload: bytes) -> str:
    """The `delta.content` of one upstream chunk, or "" (for events that are not chunks)."""
    try:
        choice = orjson.loads(payload)["choices"][0]
        return choice.get("delta", {}).get("content") or ""
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


@dataclass
class ChunkWriter:
    """Writes one answer's events as `chat.completion.chunk` SSE bytes, under one id (and one
    audio id), the first chunk of the server's own carrying the assistant role."""

    model: str
    notes: bool = False  # write Note events (else they are left out)
    id: str = field(default_factory=completion_id)
    audio_id: str = field(default_factory=lambda: f"audio_{uuid.uuid4().hex}")
    first: bool = True

    def __call__(self, event: Event) -> bytes:
        if isinstance(event, Relayed):
            return b"".join(b"data: " + payload + b"\n\n" for payload in event.payloads)
        if isinstance(event, ToolCall):
            return sse(orjson.dumps(event.chunk))
        if isinstance(event, Text):
            return self.chunk({"content": event.text})
        if isinstance(event, Note):
            return b": note " + orjson.dumps({"kind": event.kind, "data": event.data}) + b"\n\n" if self.notes else b""
        if isinstance(event, Metadata):
            return sse(
                orjson.dumps(
                    {
                        "id": self.id,
                        "object": "chat.completion.custom_metadata",
                        "choices": [],
                        "metadata": event.metadata,
                    }
                )
            )
        if isinstance(event, Audio):
            audio: dict[str, Any] = {"id": self.audio_id}
            if event.transcript is not None:
                audio["transcript"] = event.transcript
            if event.pcm is not None:
                audio["data"] = base64.b64encode(event.pcm).decode()
            return self.chunk({"audio": audio})
        return self.chunk({}, event.finish_reason)

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        if self.first and delta:
            delta, self.first = {"role": "assistant", **delta}, False
        return sse(
            orjson.dumps(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }
            )
        )


def merge_tool_calls(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The caller's tool calls whole, from the chunks that streamed them (for a non-streaming answer)."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0].get("delta", {}).get("tool_calls") or []:
            call = calls.setdefault(
                delta["index"], {"id": delta.get("id"), "type": "function", "function": {"name": "", "arguments": ""}}
            )
            function = delta.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[index] for index in sorted(calls)]
