"""The conformance checker: Agora-engine scenarios against any custom LLM URL, ours or anyone's.

`python3 custom_llm.py check URL --key KEY [--model M]` sends what Agora's Conversational AI Engine
sends (vendor "custom": turn_id, timestamp, per-message metadata; a barge-in's history; images;
a greeting broadcast) and checks what comes back the way the engine reads it: SSE `data:` chunks
ending with `[DONE]`, errors in OpenAI's shape, a 401 for a wrong key. One line per check (pass,
warn or fail, with the reason), a summary, and exit status 1 when anything failed.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from text import sentence_end

FILLER_MS = 1500  # Agora's default filler-word trigger: slower first bytes get the filler phrase spoken
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png"


@dataclass
class Reply:
    """One answer as the engine reads it: status, headers, SSE events (or a JSON body), timings."""

    status: int
    content_type: str
    events: list[str] = field(default_factory=list)  # SSE data payloads, "[DONE]" included
    body: Any = None  # a JSON answer
    text: str = ""  # the spoken words: delta.content, or an audio delta's transcript
    first_byte_ms: float | None = None
    first_sentence_ms: float | None = None
    total_ms: float = 0.0

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]" and e.startswith("{")]

    def error(self) -> dict[str, Any] | None:
        """The OpenAI-shaped error in this answer: the body's, or the stream's error event."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        return next((c["error"] for c in self.chunks() if isinstance(c.get("error"), dict)), None)


@dataclass
class Check:
    name: str
    verdict: str  # "pass", "warn" or "fail"
    reason: str


class Checker:
    """Runs the scenarios against one endpoint."""

    def __init__(self, url: str, key: str, model: str = "gpt-4o-mini", timeout: float = 30.0):
        self.url, self.key, self.model = url, key, model
        self.client = httpx.Client(timeout=timeout)
        self.turn = 0

    def request(self, messages: list[dict[str, Any]], stream: bool = True) -> dict[str, Any]:
        """A body as Agora's engine sends it with vendor "custom" and `"stream": true` in llm.params."""
        self.turn += 1
        return {
            "model": self.model,
            "stream": stream,
            "turn_id": self.turn,
            "timestamp": int(time.time() * 1000),
            "interruptable": True,
            "messages": messages,
        }

    def cancelled(self) -> float | None:
        """Barge-ins the endpoint counted, where it reports them (this server's /metrics), else None."""
        try:
            response = self.client.get(
                str(httpx.URL(self.url).join("/metrics")), headers={"authorization": f"Bearer {self.key}"}, timeout=5
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200 or "custom_llm_requests_total" not in response.text:
            return None
        # A series appears with the first barge-in on each endpoint: none yet is zero.
        lines = response.text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("custom_llm_cancelled_total{"))

    def send(self, body: dict[str, Any], key: str | None = None, hang_up_after: int | None = None) -> Reply:
        """POST the body; read SSE event by event (or one JSON body), timing the first byte and sentence."""
        headers = {"authorization": f"Bearer {self.key if key is None else key}", "accept": "text/event-stream"}
        started = time.perf_counter()

        def since() -> float:
            return (time.perf_counter() - started) * 1000

        with self.client.stream("POST", self.url, json=body, headers=headers) as response:
            reply = Reply(response.status_code, response.headers.get("content-type", ""))
            if "text/event-stream" not in reply.content_type:
                raw = response.read()
                reply.first_byte_ms, reply.total_ms = since(), since()
                try:
                    reply.body = json.loads(raw)
                except ValueError:
                    reply.body = raw.decode("utf-8", "replace")[:300]
                return reply
            for line in response.iter_lines():
                reply.first_byte_ms = reply.first_byte_ms or since()
                if not line.startswith("data:"):
                    continue
                reply.events.append(line[5:].strip())
                reply.text += words(reply.events[-1])
                if reply.first_sentence_ms is None and sentence_end(reply.text):
                    reply.first_sentence_ms = since()
                if hang_up_after is not None and len(reply.events) >= hang_up_after:
                    break
        reply.total_ms = since()
        return reply


def words(payload: str) -> str:
    """The words of one SSE payload: its content, or the transcript of its audio."""
    try:
        delta = (json.loads(payload).get("choices") or [{}])[0].get("delta") or {}
    except (ValueError, AttributeError, IndexError):
        return ""
    return delta.get("content") or (delta.get("audio") or {}).get("transcript") or ""


# ---------------------------------------------------------------------------------------------
# The scenarios: each returns its checks
# ---------------------------------------------------------------------------------------------

USER: dict[str, Any] = {
    "role": "user",
    "content": "Hello! In one short sentence, what can you do?",
    "metadata": {"source": "asr", "user": "checker"},
}


def stream_shape(reply: Reply, name: str) -> Check:
    """What the engine needs of every streamed answer."""
    if reply.status != 200:
        error = reply.error() or {}
        return Check(name, "fail", f"HTTP {reply.status}: {error.get('message') or reply.body}")
    if "text/event-stream" not in reply.content_type:
        return Check(name, "fail", f"answered {reply.content_type or 'no content type'}, not text/event-stream")
    if not reply.events or reply.events[-1] != "[DONE]":
        return Check(name, "fail", "the stream did not end with data: [DONE]")
    bad = [e for e in reply.events[:-1] if not e.startswith("{")]
    if bad:
        return Check(name, "fail", f"an event is not JSON: {bad[0][:80]!r}")
    if reply.error():
        return Check(name, "fail", f"an error event: {reply.error()}")
    if not reply.text.strip():
        return Check(name, "fail", "no words: neither delta.content nor audio.transcript")
    return Check(name, "pass", f"{len(reply.events) - 1} chunks, then [DONE]; said {reply.text.strip()[:60]!r}")


def check_streaming(checker: Checker) -> list[Check]:
    reply = checker.send(checker.request([{"role": "system", "content": "You are a helpful voice assistant."}, USER]))
    checks = [stream_shape(reply, "streaming answer with Agora's fields")]
    if reply.status == 200 and reply.first_byte_ms is not None:
        slow = reply.first_byte_ms > FILLER_MS
        checks.append(
            Check(
                "time to first byte",
                "warn" if slow else "pass",
                f"{reply.first_byte_ms:.0f} ms" + (f" (over {FILLER_MS} ms: Agora plays a filler)" if slow else ""),
            )
        )
        sentence = reply.first_sentence_ms
        checks.append(
            Check(
                "time to first sentence",
                "pass" if sentence is not None else "warn",
                f"{sentence:.0f} ms" if sentence is not None else "no complete sentence in the answer",
            )
        )
    return checks


def check_interrupted_history(checker: Checker) -> list[Check]:
    heard = "I can answer questions, look things up and"
    messages = [
        USER,
        {
            "role": "assistant",
            "content": heard,
            "metadata": {
                "source": "llm",
                "interrupted": True,
                "interrupt_timestamp": int(time.time() * 1000),
                "original": heard + " tell you the time anywhere in the world.",
            },
        },
        {"role": "user", "content": "Sorry, go on.", "metadata": {"source": "asr", "user": "checker"}},
    ]
    return [stream_shape(checker.send(checker.request(messages)), "history with an interrupted assistant message")]


def check_images(checker: Checker) -> list[Check]:
    checks = []
    for name, part in (
        ("Agora's image part", {"type": "image", "image_url": IMAGE_URL}),
        ("OpenAI's image part", {"type": "image_url", "image_url": {"url": IMAGE_URL}}),
    ):
        content = [{"type": "text", "text": "What is in this picture?"}, part]
        reply = checker.send(checker.request([{"role": "user", "content": content}]))
        check = stream_shape(reply, name)
        if check.verdict == "fail" and reply.status in (400, 404) and reply.error():
            # Accepted by the endpoint, refused by a text-only model: the shape itself was fine.
            check = Check(name, "warn", f"the model refused images: {reply.error().get('message')}")  # type: ignore[union-attr]
        elif reply.status == 422:
            check = Check(name, "fail", "422: the endpoint's request model rejects this image shape")
        checks.append(check)
    return checks


def check_greeting(checker: Checker) -> list[Check]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful voice assistant."},
        {"role": "assistant", "content": "Hi there! How can I help you today?", "metadata": {"source": "greeting"}},
    ]
    return [
        stream_shape(checker.send(checker.request(messages)), "greeting broadcast (last message from the assistant)")
    ]


def check_wrong_key(checker: Checker) -> list[Check]:
    reply = checker.send(checker.request([USER]), key="not-the-key-" + str(time.time()))
    if reply.status == 401:
        return [Check("wrong key", "pass", "401")]
    return [Check("wrong key", "fail", f"HTTP {reply.status}: the endpoint answers without the right key")]


def check_error_shape(checker: Checker) -> list[Check]:
    reply = checker.send(checker.request([]))
    error = reply.error()
    if reply.status == 200 and not error:
        return [Check("error in OpenAI's shape", "fail", "an empty `messages` was answered as if valid")]
    if not error or not {"message", "type"} <= set(error):
        return [
            Check("error in OpenAI's shape", "fail", f"HTTP {reply.status}: not {{'error': {{message, type, code}}}}")
        ]
    if reply.status == 200 and reply.events[-1:] != ["[DONE]"]:
        return [Check("error in OpenAI's shape", "fail", "an error event not followed by [DONE]")]
    return [Check("error in OpenAI's shape", "pass", f"HTTP {reply.status}: {error.get('message', '')[:60]!r}")]


def check_hang_up(checker: Checker) -> list[Check]:
    long = {"role": "user", "content": "Please count slowly from one to fifty, one number per sentence."}
    before = checker.cancelled()
    reply = checker.send(checker.request([long]), hang_up_after=2)
    if reply.status != 200:
        return [Check("hang-up mid-stream", "fail", f"HTTP {reply.status}")]
    after = checker.send(checker.request([USER]))
    if after.status != 200:
        return [Check("hang-up mid-stream", "fail", f"the next request after a hang-up got HTTP {after.status}")]
    counted = checker.cancelled()
    if before is None or counted is None:
        return [
            Check(
                "hang-up mid-stream",
                "warn",
                "the next turn answered; whether the endpoint stopped its "
                "upstream is not observable from outside (it reports no custom_llm_cancelled_total)",
            )
        ]
    if counted <= before:
        return [
            Check(
                "hang-up mid-stream",
                "fail",
                "the endpoint did not notice the hang-up (no barge-in counted; or its answer ended before it)",
            )
        ]
    return [
        Check(
            "hang-up mid-stream", "pass", "the endpoint counted the hang-up as a barge-in, and the next turn answered"
        )
    ]


def check_non_streaming(checker: Checker) -> list[Check]:
    reply = checker.send(checker.request([USER], stream=False))
    try:
        message = reply.body["choices"][0]["message"]
    except (TypeError, KeyError, IndexError):
        return [Check("non-streaming (stream: false)", "fail", f"HTTP {reply.status}: not a chat.completion")]
    said = message.get("content") or (message.get("audio") or {}).get("transcript")
    verdict = "pass" if reply.status == 200 and said else "fail"
    return [Check("non-streaming (stream: false)", verdict, f"one chat.completion: {str(said)[:60]!r}")]


SCENARIOS: list[Callable[[Checker], list[Check]]] = [
    check_streaming,
    check_interrupted_history,
    check_images,
    check_greeting,
    check_wrong_key,
    check_error_shape,
    check_hang_up,
    check_non_streaming,
]


def run(url: str, key: str, model: str, out: Callable[[str], None] = print) -> int:
    """Every scenario, a line each, then a summary; 1 when a check failed (or the endpoint is unreachable)."""
    checker, checks = Checker(url, key, model), []
    for scenario in SCENARIOS:
        try:
            found = scenario(checker)
        except httpx.HTTPError as error:
            found = [
                Check(
                    scenario.__name__.removeprefix("check_").replace("_", " "),
                    "fail",
                    f"{type(error).__name__}: {error}",
                )
            ]
        for check in found:
            out(f"{check.verdict.upper():4}  {check.name}: {check.reason}")
        checks += found
    counts = {verdict: sum(c.verdict == verdict for c in checks) for verdict in ("pass", "warn", "fail")}
    out(f"{counts['pass']} passed, {counts['fail']} failed, {counts['warn']} warnings ({url})")
    return 1 if counts["fail"] else 0
