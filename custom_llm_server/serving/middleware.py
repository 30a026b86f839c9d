"""The layers every request passes: its context made first, the Bearer auth that picks the agent,
and the request log with its metrics. Pure ASGI (BaseHTTPMiddleware would buffer the streams)."""

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custom_llm_server.core import metrics
from custom_llm_server.core.context import Context, log_as, stop_logging_as
from custom_llm_server.core.errors import SHUTTING_DOWN, ApiError
from custom_llm_server.core.redact import printable
from custom_llm_server.serving.errors import refuse, send_error
from custom_llm_server.serving.limits import Limits

log = logging.getLogger("custom_llm")


MISSING_KEY = ApiError(
    401, "Missing API key: send it as 'Authorization: Bearer <key>'.", "authentication_error", "missing_api_key"
)
INVALID_KEY = ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key")
NOT_AN_OPERATOR = ApiError(
    403,
    "This path is for the server's operator: send CUSTOM_LLM_API_KEY or METRICS_API_KEY, not an agent's key.",
    "permission_error",
    "operator_only",
)


class BearerAuth:
    """Rejects a request without a valid `Authorization: Bearer <key>` before it reaches any endpoint,
    notes the agent the key selects in the request's context, and holds each key to its agent's
    limits (limits.py: MAX_STREAMS_PER_KEY, MAX_REQUESTS_PER_MINUTE_PER_KEY, across replicas with
    REDIS_URL). The keys are read per request: a reload changes them.

    `access` says who may call each path: "public" (no key), "operator" (the server's own keys,
    never an agent's: /metrics tells about every agent), or "agent" (any caller key; also any path
    not listed, so an unknown path without a key is a 401, not a map of what exists)."""

    def __init__(
        self,
        app: ASGIApp,
        keyring: Callable[[], Sequence[tuple[bytes, str, int, int]]],
        operators: Sequence[bytes],
        access: Mapping[str, str],
        limits: Limits,
        drain: tuple[int, float],
    ):
        self.app, self.keyring, self.operators, self.access, self.limits = app, keyring, operators, access, limits
        self.drain = drain  # a refused request's body is read up to these bytes and seconds (errors.refuse)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keyring()  # (key, agent, requests it may have in flight, start a minute: 0 for any)
        access = self.access.get(scope.get("path", ""), "agent")
        if scope["type"] != "http" or access == "public":
            return await self.app(scope, receive, send)
        context: Context = scope["state"]["context"]
        if not keys and not self.operators:  # ALLOW_UNAUTHENTICATED, and no key set: the one agent
            context.agent = "default"
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return await refuse(scope, receive, send, MISSING_KEY, *self.drain)
        token = token.strip()
        if access == "operator":
            if _one_of(token, self.operators):
                return await self.app(scope, receive, send)
            known = any(hmac.compare_digest(token, key[0]) for key in keys)
            return await refuse(scope, receive, send, NOT_AN_OPERATOR if known else INVALID_KEY, *self.drain)
        match = None
        for key in keys:  # every key compared, in constant time
            if hmac.compare_digest(token, key[0]):
                match = key
        if match is None:
            return await refuse(scope, receive, send, INVALID_KEY, *self.drain)
        secret, context.agent, in_flight, per_minute = match
        taken = await self.limits.take(secret, in_flight, per_minute)
        if isinstance(taken, ApiError):
            return await refuse(scope, receive, send, taken, *self.drain)
        try:
            await self.app(scope, receive, send)
        finally:
            await taken()


def _one_of(token: bytes, keys: Sequence[bytes]) -> bool:
    """Whether the token is one of the keys, each compared in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class WithContext:
    """Makes each request's Context as it arrives, before anything else sees the request: the auth
    fills in the caller's agent, the route what the body says, and the request log reads it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        context = Context(uuid.uuid4().hex[:16])
        scope.setdefault("state", {})["context"] = context  # the route reads it as http.state.context
        token = log_as(context.request_id)
        try:
            await self.app(scope, receive, send)
        finally:
            context.answered.set()  # a hang-up waiting for this answer may go now
            for done in context.when_answered:
                done()
            stop_logging_as(token)


class EndsOnShutdown:
    """A request still being answered when the shutdown grace (SHUTDOWN_GRACE_SECONDS) is over is
    cancelled by uvicorn. Here it ends like any other answer, with one line in the log and no
    traceback: an error in OpenAI's shape when nothing was sent yet, or the body closed when something
    was (a stream has by then sent its error event and `[DONE]`, see streams.EventStream). A barge-in
    never gets here: the response that notices it ends the work itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = False

        async def tracked_send(message: Message) -> None:
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = finished or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # the cancellation was uvicorn's last word to this request: answered here
            log.warning("the server shut down before this answer was complete")
            if not started:
                await send_error(send, SHUTTING_DOWN)
            elif not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class RequestLog:
    """One log line and the metrics per request, and its id in `x-request-id`.

    Message contents are never logged here, and every caller-controlled value is made printable."""

    def __init__(self, app: ASGIApp, labels: dict[str, str]):
        self.app = app
        self.labels = labels  # path: metrics label; any other path is "other", so series stay bounded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request: Context = scope["state"]["context"]
        endpoint = self.labels.get(scope["path"], "other")
        metrics.IN_FLIGHT.labels(endpoint).inc()
        started = request.started
        status, first_byte, chunks = 0, 0.0, 0

        async def logged_send(message: Message) -> None:
            nonlocal status, first_byte, chunks
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request.request_id.encode())]
            elif message.get("body"):
                chunks += 1
                first_byte = first_byte or time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except Exception:
            status = status or 500  # the error handler outside this middleware answers it
            raise
        finally:
            ended = time.perf_counter()
            metrics.IN_FLIGHT.labels(endpoint).dec()
            agent = request.agent  # a profile's name (operator-chosen), or "-" before a key was accepted
            metrics.REQUESTS.labels(endpoint, str(status or 499), agent).inc()
            metrics.DURATION.labels(endpoint, agent).observe(ended - started)
            if first_byte:
                metrics.FIRST_BYTE.labels(endpoint, agent).observe(first_byte - started)
            if request.cancelled:
                metrics.CANCELLED.labels(endpoint, agent).inc()
            if request.first_sentence_ms is not None:
                metrics.FIRST_SENTENCE.labels(endpoint, agent).observe(request.first_sentence_ms / 1000)

            def ms(t: float) -> str:
                return f"{(t - started) * 1000:.1f}" if t else "-"

            log.info(
                "request path=%s agent=%s status=%s model=%s turn=%s upstream=%s ttfb_ms=%s total_ms=%s chunks=%d "
                "cancelled=%s retrieval_ms=%s tools_ms=%s upstream_ttfb_ms=%s first_sentence_ms=%s",
                *(printable(scope["path"]), request.agent, status or "-", printable(request.model)),
                printable(request.turn_id),
                *(request.upstream, ms(first_byte), ms(ended), chunks, str(request.cancelled).lower()),
                *(_ms(request.retrieval_ms), _ms(request.tools_ms), _ms(request.upstream_ttfb_ms)),
                _ms(request.first_sentence_ms),
            )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
