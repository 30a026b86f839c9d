"""The upstream LLM: one pooled client per process, retry and fallback before the first event,
timeouts and size limits on everything an upstream can make us hold, SSE parsing, and upstream
failures mapped to errors a caller can act on (with our key scrubbed from every one of them).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
import yarl

from custom_llm_server.core import metrics
from custom_llm_server.core.bounds import Slots
from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import ApiError, upstream_error
from custom_llm_server.core.redact import Redactor, printable

log = logging.getLogger("custom_llm.upstream")

T = TypeVar("T")
Batches = AsyncIterator[list[bytes]]


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible API: where it is, its key, and the model to ask for ("" keeps the request's)."""

    name: str
    base_url: str
    api_key: str = ""
    model: str = ""


@dataclass(frozen=True)
class Limits:
    """What one upstream call may take; every number is a setting (see .env.example)."""

    connect_timeout: float = 3.0
    first_token_timeout: float = 8.0
    idle_timeout: float = 15.0  # between two events, not two packets: comments do not count
    max_stream_seconds: float = 300.0
    max_event_bytes: int = 1 << 20
    max_response_bytes: int = 32 << 20  # a whole stream, or a non-streaming body


class Upstream:
    """One endpoint on the shared session: posting to it, and its failures as ApiErrors."""

    def __init__(self, endpoint: Endpoint, session: aiohttp.ClientSession):
        self.name, self.model, self.session = endpoint.name, endpoint.model, session
        self.scrub = Redactor(endpoint.api_key)
        base = endpoint.base_url.rstrip("/")
        self.url, self.models_url = yarl.URL(base + "/chat/completions"), yarl.URL(base + "/models")  # parsed once
        # identity: a compressed answer could expand a thousandfold in our memory.
        self.headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if endpoint.api_key:
            self.headers["authorization"] = f"Bearer {endpoint.api_key}"

    async def post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """The response, its status checked; failures become ApiErrors."""
        if self.model:  # the fallback may serve under another model name
            body = {**body, "model": self.model}
        try:
            data = orjson.dumps(body)
        except orjson.JSONEncodeError:  # orjson reads 1024 levels of nesting but writes only 255
            raise ApiError(
                400,
                "The request is nested too deeply to forward (at most 255 levels).",
                "invalid_request_error",
                "too_deeply_nested",
            ) from None
        with self.errors():
            response = await self.session.post(self.url, data=data, headers=self.headers)
            if response.status >= 400:
                try:
                    raise self.refusal(response.status, await response.content.read(64 * 1024))
                finally:
                    response.close()
        return response

    async def probe(self) -> bool:
        """A cheap call that opens a pooled connection and tells whether the upstream answers."""
        try:
            async with self.session.get(
                self.models_url, headers=self.headers, timeout=aiohttp.ClientTimeout(total=3)
            ) as response:
                await response.content.read(64 * 1024)
                return response.status < 500 and response.status not in (401, 403)
        except (TimeoutError, aiohttp.ClientError):
            return False

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn network failures into the error a caller can act on; the details go to the log."""
        try:
            yield
        except TimeoutError as error:
            log.warning("upstream %s timed out: %s", self.name, type(error).__name__)
            raise upstream_error(504, "The upstream LLM stopped sending.", "upstream_timeout", retryable=True) from None
        except aiohttp.ClientError as error:
            log.warning(
                "upstream %s connection failed: %s: %s",
                self.name,
                type(error).__name__,
                printable(self.scrub(str(error)), 200),
            )
            raise upstream_error(
                502, "The upstream LLM could not be reached.", "upstream_unreachable", retryable=True
            ) from None

    def refusal(self, status: int, content: bytes) -> ApiError:
        detail, text = self.scrub.json_message(content)
        if status in (401, 403):
            # The caller's key was fine; ours was not. The message may quote our key in a form the
            # scrub cannot see (truncated, masked), so it reaches neither the caller nor the log.
            log.warning("upstream %s rejected this server's credentials (%d)", self.name, status)
            return upstream_error(
                502, "The upstream LLM rejected this server's credentials (check LLM_API_KEY).", "upstream_auth_failed"
            )
        message = detail["message"] if isinstance(detail.get("message"), str) else ""
        log.warning("upstream %s answered %d: %s", self.name, status, printable(message or text, 300))
        if status >= 500:
            return upstream_error(502, f"The upstream LLM failed (status {status}).", "upstream_failed", retryable=True)
        return ApiError(
            status,
            message[:500] or f"The upstream LLM refused the request (status {status}).",
            detail["type"][:100] if isinstance(detail.get("type"), str) else "invalid_request_error",
            detail["code"][:100] if isinstance(detail.get("code"), str) else None,
            retryable=status == 429,
        )


class LLM:
    """The upstream LLM as the endpoints see it: one pooled session, the primary, a retry, the fallback.

    Until the first event arrives nothing has reached the caller, so a failed or slow call (no
    connection, 5xx, 429, no first event within the first-token timeout) is tried once more after a
    short pause, then on the fallback when one is configured. After the first event nothing is
    retried: the caller would hear words twice."""

    RETRY_PAUSE = 0.2

    def __init__(
        self,
        primary: Endpoint,
        fallback: Endpoint | None = None,
        limits: Limits = Limits(),
        slots: Slots | None = None,  # the process's MAX_UPSTREAM_STREAMS, shared by every agent
    ):
        # The idle timeout is also aiohttp's per-read timeout, so plain silence is caught by the socket.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, connect=limits.connect_timeout, sock_read=limits.idle_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client has no cookies to keep
            auto_decompress=False,  # we ask for identity; anything else is not expanded here
        )
        self.primary = Upstream(primary, self.session)
        self.fallback = Upstream(fallback, self.session) if fallback else None
        self.limits = limits
        self.slots = slots or Slots(1000, "MAX_UPSTREAM_STREAMS")
        self.last_success = 0.0
        self.probing: asyncio.Future[bool] | None = None
        self.probed_at = 0.0

    async def aclose(self) -> None:
        await self.session.close()

    def attempts(self) -> list[tuple[Upstream, float]]:
        attempts = [(self.primary, 0.0), (self.primary, self.RETRY_PAUSE)]
        return [*attempts, (self.fallback, 0.0)] if self.fallback else attempts

    async def _with_retries(self, call: Callable[[Upstream], Awaitable[T]], context: Context) -> T:
        """call(upstream) on each attempt in turn until one succeeds or fails for good."""
        attempts = self.attempts()
        for n, (upstream, pause) in enumerate(attempts):
            await asyncio.sleep(pause)
            try:
                result = await call(upstream)
            except ApiError as error:
                metrics.UPSTREAM_ERRORS.labels(upstream.name, metrics.error_code(error.code)).inc()
                if not error.retryable or n == len(attempts) - 1:
                    raise
                again = attempts[n + 1][0] is upstream
                (metrics.RETRIES if again else metrics.FALLBACKS).inc()
                log.warning(
                    "upstream %s failed (%s); trying %s",
                    upstream.name,
                    error.code,
                    "again" if again else "the fallback",
                )
                continue
            context.upstream = upstream.name
            self.last_success = time.monotonic()
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _first_event(
        self, upstream: Upstream, body: dict[str, Any]
    ) -> tuple[Upstream, aiohttp.ClientResponse, list[bytes], Batches]:
        """An open response and its first batch of events, within the first-token timeout."""
        started = time.perf_counter()

        async def opened() -> tuple[Upstream, aiohttp.ClientResponse, list[bytes], Batches]:
            response = await upstream.post(body)
            try:
                batches = sse_payloads(response, self.limits, upstream.scrub)
                with upstream.errors():
                    first = await anext(batches, None)
                if first is None:
                    raise upstream_error(
                        502, "The upstream LLM sent an empty answer.", "upstream_empty", retryable=True
                    )
                return upstream, response, first, batches
            except BaseException:
                response.close()
                raise

        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation of a
            # barge-in that lands just as its work finishes, and the stream would run on unheard.
            async with asyncio.timeout(self.limits.first_token_timeout):
                result = await opened()
        except TimeoutError:
            log.warning("upstream %s sent nothing within %gs", upstream.name, self.limits.first_token_timeout)
            raise upstream_error(
                504, "The upstream LLM did not start answering in time.", "upstream_timeout", retryable=True
            ) from None
        metrics.UPSTREAM_FIRST_EVENT.labels(upstream.name).observe(time.perf_counter() - started)
        return result

    @asynccontextmanager
    async def stream(self, body: dict[str, Any], context: Context) -> AsyncIterator[Batches]:
        """The answer's events, a batch per network read; leaving the block early closes the
        upstream connection, which is how an upstream learns to stop generating."""
        with self.slots.take():
            started = time.perf_counter()
            upstream, response, first, batches = await self._with_retries(
                lambda up: self._first_event(up, body), context
            )
            if context.upstream_ttfb_ms is None:  # the first round's, retries and fallback included
                context.upstream_ttfb_ms = (time.perf_counter() - started) * 1000

            async def events() -> Batches:
                yield first
                with upstream.errors():
                    # The whole stream has a deadline too: an upstream that never ends is cut off.
                    async with asyncio.timeout(self.limits.max_stream_seconds):
                        async for batch in batches:
                            yield batch

            try:
                yield events()
            except BaseException:
                response.close()  # half-read: drop the connection
                raise
            finally:
                response.release()

    async def complete(self, body: dict[str, Any], context: Context) -> bytes:
        """A non-streaming completion, as the upstream's JSON bytes (at most max_response_bytes)."""

        async def call(upstream: Upstream) -> bytes:
            response = await upstream.post(body)
            try:
                pieces, size = [], 0
                with upstream.errors():
                    async for piece in response.content.iter_any():
                        size += len(piece)
                        if size > self.limits.max_response_bytes:
                            log.warning("upstream %s answer exceeds %d bytes", upstream.name, size - len(piece))
                            raise upstream_error(502, "The upstream LLM's answer is too large.", "upstream_too_large")
                        pieces.append(piece)
                answer = b"".join(pieces)
                if len(answer) < 1 << 16:
                    return upstream.scrub.relayed(answer)
                return await asyncio.to_thread(upstream.scrub.relayed, answer)  # a large answer: off the loop
            finally:
                response.close()

        with self.slots.take():
            return await self._with_retries(call, context)

    async def ready(self) -> bool:
        """Answered in the last minute, or answers a probe now. Callers asking at once share one
        probe, and a failed probe stands for a second: /ready needs no key, so it must not let
        anyone multiply calls to the upstream."""
        if time.monotonic() - self.last_success < 60:
            return True
        if self.probing is None or (self.probing.done() and time.monotonic() - self.probed_at > 1):
            self.probing, self.probed_at = asyncio.ensure_future(self.primary.probe()), time.monotonic()
        if await asyncio.shield(self.probing):
            self.last_success = time.monotonic()
            return True
        return False


async def sse_payloads(response: aiohttp.ClientResponse, limits: Limits, scrub: Redactor) -> Batches:
    """The data payloads of the upstream's events, a list per network read, until `[DONE]`.

    Events are split on blank lines and passed on as bytes; JSON is never parsed here. Only what
    arrived is normalised (CRLF to LF) and searched for a boundary, so any event costs linear time,
    however it is cut into pieces; past max_event_bytes it is refused. The idle timeout counts from
    the last whole event: bytes trickled without completing one keep nothing alive. Our key is
    scrubbed from what the caller will decode, across events too (redact.StreamScrub)."""
    scrubbed = scrub.stream()
    pending = bytearray()
    total, last_event, carried_cr = 0, time.monotonic(), False
    pieces = response.content.iter_any()
    async for piece in pieces:
        total += len(piece)
        if total > limits.max_response_bytes:
            raise upstream_error(502, "The upstream LLM's answer is too large.", "upstream_too_large")
        if carried_cr:  # a CR that ended the last piece may begin a CRLF
            piece = b"\r" + piece
        carried_cr = piece.endswith(b"\r")
        if carried_cr:
            piece = piece[:-1]
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n")
        pending += piece
        end = pending.rfind(b"\n\n", max(0, len(pending) - len(piece) - 2))
        if end < 0:
            if len(pending) > limits.max_event_bytes:
                raise upstream_error(
                    502, "The upstream LLM sent an event that is too large.", "upstream_event_too_large"
                )
            if time.monotonic() - last_event > limits.idle_timeout:
                raise TimeoutError  # an event trickled a byte at a time is as dead as silence
            continue
        blocks = bytes(pending[:end]).split(b"\n\n")
        del pending[: end + 2]
        payloads, done = _payloads(blocks)
        if payloads:
            last_event = time.monotonic()
        elif time.monotonic() - last_event > limits.idle_timeout:
            raise TimeoutError  # keep-alive comments but no event: as dead as silence
        if payloads := scrubbed(payloads) + (scrubbed.flush() if done else []):
            yield payloads
        if done:
            # Read to the end of the body (normally just the closing chunk): a response left
            # half-read cannot go back to the pool, and the next request would pay a new connection.
            # Bounded: what an upstream sends after [DONE] is not worth more than a new connection.
            drained = 0
            async for rest in pieces:
                drained += len(rest)
                if drained > limits.max_event_bytes:
                    break
            return
    payloads, done = _payloads([bytes(pending)])
    if payloads := scrubbed(payloads) + scrubbed.flush():
        yield payloads
    if not done:
        log.warning("upstream stream ended without [DONE]")


def _payloads(blocks: list[bytes]) -> tuple[list[bytes], bool]:
    payloads: list[bytes] = []
    for block in blocks:
        if block.startswith(b"data: ") and b"\n" not in block:
            payload = block[6:]  # the common case: one data line
        else:
            payload = b"\n".join(
                line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
            )
        if payload == b"[DONE]":
            return payloads, True
        if payload:
            payloads.append(payload)
    return payloads, False
