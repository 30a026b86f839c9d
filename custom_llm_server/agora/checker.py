"""The conformance checker: Agora-engine scenarios against any custom LLM URL, ours or anyone's.

`custom-llm check URL [--key KEY] [--model M] [--timeout S] [--run-timeout S]` sends what
Agora's Conversational AI Engine sends (vendor "custom": turn_id, timestamp and metadata on the
request and on each message; a barge-in's history; images; in audio mode, a greeting broadcast) and
checks what comes back the way the engine reads it: SSE `data:` chunks ending with `[DONE]`, errors
in OpenAI's shape, a 401 for a wrong key. One line per check (pass, warn, skip or fail, with what it
saw), a summary, and exit status 1 when anything failed.

It is a client you can point at anything: every check has a deadline, and so has the whole run;
lines, events and bodies are read only so far; an endpoint that does not answer at all stops the run
at its first check.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from custom_llm_server.core.text import sentence_end

FILLER_MS = 1500  # what Agora's filler words wait for, when an agent turns them on (off by default)
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png"


@dataclass(frozen=True)
class Bounds:
    """What the checker gives an endpoint: time, and how much it reads of what comes back."""

    check_seconds: float = 20.0  # each request, from sending to the last byte read
    run_seconds: float = 180.0  # every check together
    max_line_bytes: int = 1 << 20
    max_body_bytes: int = 8 << 20  # a whole answer, streamed or not
    max_events: int = 20_000


class Unreadable(Exception):
    """The answer broke a bound (too long, too large, too slow); the message says what was seen."""


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
        found = []
        for event in self.events:
            try:
                chunk = json.loads(event) if event.startswith("{") else None
            except ValueError:
                chunk = None
            if isinstance(chunk, dict):
                found.append(chunk)
        return found

    def error(self) -> dict[str, Any] | None:
        """The OpenAI-shaped error in this answer: the body's, or the stream's error event."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        return next((c["error"] for c in self.chunks() if isinstance(c.get("error"), dict)), None)

    def seen(self) -> str:
        """What came back, in a few words, for a failure's reason."""
        if not self.events:
            return f"HTTP {self.status}, {self.content_type or 'no content type'}: {str(self.body)[:80]!r}"
        return f"{len(self.events)} events, the last {self.events[-1][:60]!r}"


@dataclass
class Check:
    name: str
    verdict: str  # "pass", "warn", "skip" or "fail"
    reason: str


def sse_data(chunks: Iterator[bytes], bounds: Bounds, deadline: float) -> Iterator[str]:
    """The data payloads of an SSE body as they arrive, within the bounds. Only new bytes are searched
    for a line end, so any body costs linear time."""
    pending, total, lines = bytearray(), 0, []
    for chunk in chunks:
        total += len(chunk)
        if total > bounds.max_body_bytes:
            raise Unreadable(f"more than {bounds.max_body_bytes} bytes in one answer")
        searched = len(pending)
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", max(start, searched))) >= 0:
            line = bytes(pending[start:end]).rstrip(b"\r")
            start = end + 1
            if line.startswith(b"data:"):
                lines.append(line[5:].removeprefix(b" ").decode("utf-8", "replace"))
            elif not line and lines:
                yield "\n".join(lines)
                lines = []
        del pending[:start]
        if len(pending) > bounds.max_line_bytes:
            raise Unreadable(f"a line longer than {bounds.max_line_bytes} bytes")
        if time.monotonic() > deadline:
            raise Unreadable("the answer was still streaming at the check's deadline")
    if lines:
        yield "\n".join(lines)


class Checker:
    """Runs the scenarios against one endpoint."""

    def __init__(self, url: str, key: str, model: str = "gpt-4o-mini", bounds: Bounds = Bounds()):
        self.url, self.key, self.model, self.bounds = url, key, model, bounds
        self.client = httpx.Client(follow_redirects=False)
        self.turn = 0
        self.run_deadline = time.monotonic() + bounds.run_seconds

    @property
    def audio(self) -> bool:
        return self.url.rstrip("/").endswith("/audio/chat/completions")

    def request(self, messages: list[dict[str, Any]], stream: bool = True) -> dict[str, Any]:
        """A body as Agora's engine sends it with vendor "custom" and `"stream": true` in llm.params:
        turn_id and timestamp on the request and on each message."""
        self.turn += 1
        now = int(time.time() * 1000)
        return {
            "model": self.model,
            "stream": stream,
            "turn_id": self.turn,
            "timestamp": now,
            "interruptable": True,
            "messages": [
                message if message["role"] == "system" else {"turn_id": self.turn, "timestamp": now, **message}
                for message in messages
            ],
        }

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = self.key if key is None else key
        return {"accept": "text/event-stream", **({"authorization": f"Bearer {key}"} if key else {})}

    def deadline(self) -> float:
        remaining = self.run_deadline - time.monotonic()
        if remaining <= 0:
            raise Unreadable("the run's deadline (--run-timeout) has passed")
        return time.monotonic() + min(self.bounds.check_seconds, remaining)

    def cancelled(self) -> float | None:
        """Barge-ins the endpoint counted, where it reports them (this server's /metrics), else None."""
        try:
            with self.client.stream(
                "GET", str(httpx.URL(self.url).join("/metrics")), headers=self.headers(), timeout=5
            ) as response:
                text = self.read_body(response, self.deadline()).decode("utf-8", "replace")
        except (httpx.HTTPError, Unreadable):
            return None
        if response.status_code != 200 or "custom_llm_requests_total" not in text:
            return None
        # A series appears with the first barge-in on each endpoint: none yet is zero.
        lines = text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("custom_llm_cancelled_total{"))

    def read_body(self, response: httpx.Response, deadline: float) -> bytes:
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.bounds.max_body_bytes:
                raise Unreadable(f"a body larger than {self.bounds.max_body_bytes} bytes")
            if time.monotonic() > deadline:
                raise Unreadable("the body was still arriving at the check's deadline")
        return bytes(body)

    def send(self, body: dict[str, Any], key: str | None = None, hang_up_after: int | None = None) -> Reply:
        """POST the body; read SSE event by event (or one JSON body), timing the first byte and sentence."""
        deadline = self.deadline()
        started = time.perf_counter()

        def since() -> float:
            return (time.perf_counter() - started) * 1000

        timeout = httpx.Timeout(max(0.1, deadline - time.monotonic()))
        with self.client.stream("POST", self.url, json=body, headers=self.headers(key), timeout=timeout) as response:
            reply = Reply(response.status_code, response.headers.get("content-type", ""))
            if "text/event-stream" not in reply.content_type:
                raw = self.read_body(response, deadline)
                reply.first_byte_ms, reply.total_ms = since(), since()
                try:
                    reply.body = json.loads(raw)
                except ValueError:
                    reply.body = raw.decode("utf-8", "replace")[:300]
                return reply
            chunks = self.timed(response.iter_bytes(), reply, since)
            for payload in sse_data(chunks, self.bounds, deadline):
                reply.events.append(payload)
                if len(reply.events) > self.bounds.max_events:
                    raise Unreadable(f"more than {self.bounds.max_events} events in one answer")
                if reply.first_sentence_ms is None:
                    reply.text += words(payload)
                    if sentence_end(reply.text):
                        reply.first_sentence_ms = since()
                else:
                    reply.text += words(payload)
                if hang_up_after is not None and len(reply.events) >= hang_up_after:
                    break
        reply.total_ms = since()
        return reply

    @staticmethod
    def timed(chunks: Iterator[bytes], reply: Reply, since: Callable[[], float]) -> Iterator[bytes]:
        for chunk in chunks:
            reply.first_byte_ms = reply.first_byte_ms or since()
            yield chunk


def words(payload: str) -> str:
    """The words of one SSE payload: its content, or the transcript of its audio."""
    try:
        delta = (json.loads(payload).get("choices") or [{}])[0].get("delta") or {}
        said = delta.get("content") or (delta.get("audio") or {}).get("transcript") or ""
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""
    return said if isinstance(said, str) else ""


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
        return Check(name, "fail", f"the stream did not end with data: [DONE] (saw {reply.seen()})")
    bad = [e for e in reply.events[:-1] if not e.startswith("{")]
    if bad:
        return Check(name, "fail", f"an event is not JSON: {bad[0][:80]!r}")
    if reply.error():
        return Check(name, "fail", f"an error event: {reply.error()}")
    if not reply.text.strip():
        return Check(name, "fail", f"no words: neither delta.content nor audio.transcript (saw {reply.seen()})")
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
                f"{reply.first_byte_ms:.0f} ms"
                + (f" (over {FILLER_MS} ms: an agent with filler words on would play one)" if slow else ""),
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
        error = reply.error()
        if check.verdict == "fail" and reply.status in (400, 404) and error:
            # Accepted by the endpoint, refused by a text-only model: the shape itself was fine.
            check = Check(name, "warn", f"the model refused images: {error.get('message')}")
        elif reply.status == 422:
            check = Check(name, "fail", "422: the endpoint's request model rejects this image shape")
        checks.append(check)
    return checks


def check_greeting(checker: Checker) -> list[Check]:
    name = "greeting broadcast (last message from the assistant)"
    if not checker.audio:  # the engine asks the LLM to say a greeting only in audio mode
        return [Check(name, "skip", "the engine sends it only with output_modalities audio (/audio URLs)")]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful voice assistant."},
        {"role": "assistant", "content": "Hi there! How can I help you today?", "metadata": {"source": "greeting"}},
    ]
    return [stream_shape(checker.send(checker.request(messages)), name)]


def check_wrong_key(checker: Checker) -> list[Check]:
    if not checker.key:
        reply = checker.send(checker.request([USER]))
        if reply.status == 200:
            return [
                Check("open endpoint", "warn", "no --key given, and it answers: anyone who finds the URL can use it")
            ]
        return [Check("open endpoint", "fail", f"no --key given, and it answered HTTP {reply.status}: pass --key")]
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
        return [Check("error in OpenAI's shape", "fail", f"not {{'error': {{message, type, code}}}}: {reply.seen()}")]
    if reply.status == 200 and reply.events[-1:] != ["[DONE]"]:
        return [Check("error in OpenAI's shape", "fail", "an error event not followed by [DONE]")]
    return [Check("error in OpenAI's shape", "pass", f"HTTP {reply.status}: {error.get('message', '')[:60]!r}")]


def check_hang_up(checker: Checker) -> list[Check]:
    name = "hang-up mid-stream"
    long = {"role": "user", "content": "Please count slowly from one to fifty, one number per sentence."}
    before = checker.cancelled()
    body = checker.request([long])
    reply = checker.send(body, hang_up_after=2)
    if reply.status != 200:
        return [Check(name, "fail", f"HTTP {reply.status}: {reply.seen()}")]
    after = checker.send(checker.request([USER]))
    if after.status != 200:
        return [Check(name, "fail", f"the next request after a hang-up got HTTP {after.status}")]
    counted = checker.cancelled()
    if before is None or counted is None:
        return [
            Check(
                name,
                "warn",
                "the next turn answered; whether the endpoint stopped its upstream is not observable from "
                "outside (it reports no custom_llm_cancelled_total)",
            )
        ]
    if counted <= before and answered_before_hanging_up(checker, body, reply):
        return [Check(name, "warn", "not checked: the whole answer was sent before the hang-up; ask a longer one")]
    if counted <= before:
        return [
            Check(name, "fail", "the endpoint did not notice the hang-up (no barge-in counted, its answer unfinished)")
        ]
    return [Check(name, "pass", "the endpoint counted the hang-up as a barge-in, and the next turn answered")]


def answered_before_hanging_up(checker: Checker, body: dict[str, Any], hung_up: Reply) -> bool:
    """Whether the whole answer takes no longer to stream than the checker took to hang up (then
    nothing was left to cancel): the same request again, read to the end."""
    whole = checker.send({**body, "turn_id": checker.turn + 1})
    streaming = whole.total_ms - (whole.first_byte_ms or 0)
    return whole.events[-1:] == ["[DONE]"] and streaming <= hung_up.total_ms - (hung_up.first_byte_ms or 0) + 50


def check_non_streaming(checker: Checker) -> list[Check]:
    name = "non-streaming (stream: false)"
    reply = checker.send(checker.request([USER], stream=False))
    try:
        message = reply.body["choices"][0]["message"]
        said = message.get("content") or (message.get("audio") or {}).get("transcript")
    except (TypeError, KeyError, IndexError, AttributeError):
        return [Check(name, "fail", f"not a chat.completion: {reply.seen()}")]
    verdict = "pass" if reply.status == 200 and said else "fail"
    return [Check(name, verdict, f"one chat.completion: {str(said)[:60]!r}")]


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


def reachable(checker: Checker) -> Check | None:
    """One plain request first: an endpoint that wants a key the run was not given, or a URL that is no
    endpoint, fails every check the same way, so the run says it once, first, and stops."""
    path = httpx.URL(checker.url).path
    try:
        reply = checker.send(checker.request([USER]))
    except (httpx.HTTPError, Unreadable):
        return None  # the scenarios say what happened
    if reply.status in (401, 403) and not checker.key:
        return Check("a key", "fail", f"the endpoint wants one (HTTP {reply.status}): run again with --key KEY")
    if reply.status in (401, 403):
        return Check("the key", "fail", f"the endpoint refuses it (HTTP {reply.status}): check --key")
    if reply.status in (404, 405):
        return Check(
            "the URL",
            "fail",
            f"HTTP {reply.status}: no chat completions endpoint at {path} (e.g. .../v1/chat/completions)",
        )
    return None


def run(url: str, key: str, model: str, out: Callable[[str], None] = print, bounds: Bounds = Bounds()) -> int:
    """Every scenario, a line each, then a summary; 1 when a check failed (or the endpoint is unreachable,
    wants a key the run was not given, or is no endpoint: then that one line, and the run stops)."""
    checker, checks = Checker(url, key, model, bounds), []
    stop = reachable(checker)
    if stop is not None:
        out(f"FAIL  {stop.name}: {stop.reason}")
        out(f"0 passed, 1 failed, 0 warnings, 0 skipped ({url})")
        return 1
    for number, scenario in enumerate(SCENARIOS):
        name = scenario.__name__.removeprefix("check_").replace("_", " ")
        try:
            found = scenario(checker)
        except (httpx.HTTPError, Unreadable) as error:
            found = [Check(name, "fail", f"{type(error).__name__}: {error}")]
            if number == 0 and isinstance(error, httpx.TransportError):  # no answer at all: nothing else can pass
                found.append(Check("the rest", "fail", "not run: the endpoint did not answer the first check"))
        for check in found:
            out(f"{check.verdict.upper():4}  {check.name}: {check.reason}")
        checks += found
        if found[-1].name == "the rest":
            break
    counts = {verdict: sum(c.verdict == verdict for c in checks) for verdict in ("pass", "warn", "skip", "fail")}
    out(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['warn']} warnings, {counts['skip']} skipped ({url})"
    )
    return 1 if counts["fail"] else 0
