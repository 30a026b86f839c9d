"""Serving HTTP: errors in OpenAI's shape, reading a request, SSE and JSON answers that stop when
the caller hangs up, Bearer auth, the request log, the one channel for per-request facts, and
the HTTP protocol with bounds on a request head.

Everything here is pure ASGI (BaseHTTPMiddleware would buffer and slow the streams).
"""

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import metrics
from context import Context, log_as, logged_request_id, stop_logging_as
from errors import SHUTTING_DOWN, ApiError, bad_request, internal_error
from events import DONE, ChunkWriter, Event, sse, words_of
from redact import printable
from text import sentence_end

log = logging.getLogger("custom_llm")
M = TypeVar("M", bound=BaseModel)

# ---------------------------------------------------------------------------------------------
# Errors: one exception, a status before the first byte and an event after it
# ---------------------------------------------------------------------------------------------


def error_response(error: ApiError, close: bool = False) -> Response:
    headers = {**(error.headers or {}), **({"connection": "close"} if close else {})}
    return Response(
        orjson.dumps(error.body()), status_code=error.status, media_type="application/json", headers=headers
    )


async def send_error(send: Send, error: ApiError, close: bool = False) -> None:
    """Answer an ASGI request with an error, for middleware that runs before the app. `close`: the
    body was not read, so the connection closes after the answer (a client sending its body slowly
    keeps nothing open)."""
    await error_response(error, close)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def invalid_value(problem: dict[str, Any], location: tuple[Any, ...]) -> ApiError:
    """A pydantic error as a 400 that names the field."""
    param = ".".join(str(part) for part in location) or None
    return bad_request(f"{param}: {problem['msg']}" if param else problem["msg"], "invalid_value", param)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; an unexpected one logs its traceback and tells the caller nothing more."""

    async def on_api_error(http: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return error_response(error)

    async def on_invalid_parameters(http: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0]
        return error_response(invalid_value(first, first["loc"][1:]))  # loc[0] is "query", "path"...

    async def on_http_error(http: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        path = http.url.path[:100]
        messages = {404: f"No such endpoint: {http.method} {path}.", 405: f"{http.method} is not allowed on {path}."}
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            ApiError(
                error.status_code,
                messages.get(error.status_code, str(error.detail)),
                "invalid_request_error",
                codes.get(error.status_code),
            )
        )

    async def on_unexpected(http: Request, error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return error_response(internal_error())

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid_parameters)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def openapi_with(app: FastAPI, *models: type[BaseModel]) -> dict[str, Any]:
    """FastAPI's schema, plus the request models that routes reading their own body validate."""
    if not app.openapi_schema:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


# ---------------------------------------------------------------------------------------------
# Reading a request
# ---------------------------------------------------------------------------------------------


def validated(model: type[M], body: dict[str, Any]) -> M:
    """The body as the request model; the first problem as a 400 that names the field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        raise invalid_value(dict(first), first["loc"]) from None


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read with a size cap so a huge body costs nothing."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.lower():
        raise bad_request(
            f"Send the body as application/json, not {printable(content_type, 60)}.",
            "unsupported_media_type",
            status=415,
        )
    too_large = bad_request(f"The request body is larger than {limit} bytes.", "body_too_large", status=413)
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    try:
        body = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError as error:
        raise bad_request(f"The body is not valid JSON: {error.msg}.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", "invalid_json")
    return body


# ---------------------------------------------------------------------------------------------
# Answers that stop their work the moment the caller hangs up (a barge-in)
# ---------------------------------------------------------------------------------------------

# How far into an answer its first sentence is looked for; past it (no punctuation at all), the
# relayed events are not parsed for words any more, so the hot path stays a byte relay.
FIRST_SENTENCE_SCAN = 400
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx and friends not to hold events back
]


class CancelOnDisconnect(Response):
    """A response whose work runs beside a watch on the connection; a disconnect cancels the work.

    Starlette only watches for disconnects on some ASGI servers and versions, and a barge-in must
    stop the upstream at once, so the watch is ours."""

    def __init__(self, context: Context) -> None:
        super().__init__(status_code=200)
        self.context = context
        self.hung_up = False
        self.finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.current_task()
        assert work is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not self.finished:  # a caller closing after the whole answer is no barge-in
                self.hung_up = True
                work.cancel()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.finished = True
            await send(message)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.respond(tracked_send)
        except asyncio.CancelledError:
            if not self.hung_up:
                raise  # a cancellation that is not ours (server shutdown) goes on
            work.uncancel()
        finally:
            watcher.cancel()
            self.context.cancelled = self.hung_up

    async def respond(self, send: Send) -> None:
        raise NotImplementedError


class EventStream(CancelOnDisconnect):
    """An answer's events as SSE, always ending with `[DONE]`.

    Headers go out with the first event, so an error before it (say the upstream refused) is a
    plain HTTP error in OpenAI's shape; an error after it is one error event, then `[DONE]`."""

    def __init__(self, events: AsyncIterator[Event], context: Context, notes: bool = False):
        super().__init__(context)
        self.events = events
        self.write = ChunkWriter(context.model, notes)

    async def respond(self, send: Send) -> None:
        started = False

        async def emit(data: bytes, more: bool = True) -> None:
            nonlocal started
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": more})

        said: str | None = ""  # the words sent so far, until the first sentence is complete
        try:
            async for event in self.events:
                if data := self.write(event):
                    await emit(data)
                if said is not None and (words := words_of(event)):
                    said += words
                    if sentence_end(said):
                        self.context.first_sentence_ms, said = self.context.since_start_ms(), None
                    elif len(said) > FIRST_SENTENCE_SCAN:
                        said = None  # no sentence end so far: stop reading the relayed events' words
        except asyncio.CancelledError:
            if not self.hung_up:  # the server is shutting down: close the answer properly
                if started:
                    await emit(sse(orjson.dumps(SHUTTING_DOWN.body())))
                    await emit(DONE, more=False)
                else:
                    await send_error(send, SHUTTING_DOWN)
            raise
        except Exception as error:
            if not isinstance(error, ApiError):
                log.exception("stream failed")
                error = internal_error()
            if not started:
                await send_error(send, error)
                return
            await emit(sse(orjson.dumps(error.body())))
        finally:
            await asyncio.shield(self.events.aclose())  # type: ignore[attr-defined]  # closes the upstream even when cancelled mid-send
        await emit(DONE, more=False)


class BytesStream(CancelOnDisconnect):
    """Raw bytes as they are made (PCM for Agora's custom TTS); an error before the first byte is
    an error in OpenAI's shape, one after it ends the body early (and is logged)."""

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, context: Context):
        super().__init__(context)
        self.chunks, self.headers_out = chunks, [(b"content-type", media_type.encode())]

    async def respond(self, send: Send) -> None:
        started = False
        try:
            async for chunk in self.chunks:
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": self.headers_out})
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except ApiError as error:
            if not started:
                return await send_error(send, error)
            log.warning("stream cut short: %s", error.message)
        finally:
            await asyncio.shield(self.chunks.aclose())  # type: ignore[attr-defined]  # a hang-up stops the work
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers_out})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class JSONReply(CancelOnDisconnect):
    """A JSON answer computed under the disconnect watch (non-streaming calls)."""

    def __init__(self, work: Awaitable[bytes], context: Context):
        super().__init__(context)
        self.work = work

    async def respond(self, send: Send) -> None:
        try:
            body = await self.work
        except ApiError as error:
            response = error_response(error)
        except asyncio.CancelledError:
            if not self.hung_up:
                await send_error(send, SHUTTING_DOWN)
            raise
        else:
            response = Response(body, media_type="application/json")
        await response({"type": "http"}, _no_receive, send)


# ---------------------------------------------------------------------------------------------
# Middleware
# ---------------------------------------------------------------------------------------------


class BearerAuth:
    """Rejects a request without a valid `Authorization: Bearer <key>` before it reaches any endpoint,
    notes the agent the key selects in the request's context, and holds each key to its agent's
    MAX_STREAMS_PER_KEY requests at once. The keys are read per request: a reload changes them."""

    def __init__(self, app: ASGIApp, keyring: Callable[[], Sequence[tuple[bytes, str, int]]], public: frozenset[str]):
        self.app, self.keyring, self.public = app, keyring, public
        self.in_flight: dict[bytes, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keyring()  # (key, agent, requests it may have in flight: 0 for any)
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        context: Context = scope["state"]["context"]
        if not keys:  # ALLOW_UNAUTHENTICATED, and no key set: the one agent
            context.agent = "default"
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return await send_error(
                send,
                ApiError(
                    401,
                    "Missing API key: send it as 'Authorization: Bearer <key>'.",
                    "authentication_error",
                    "missing_api_key",
                ),
                close=True,
            )
        token, match = token.strip(), None
        for key in keys:  # every key compared, in constant time
            if hmac.compare_digest(token, key[0]):
                match = key
        if match is None:
            return await send_error(
                send, ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key"), close=True
            )
        secret, context.agent, limit = match
        if limit and self.in_flight.get(secret, 0) >= limit:
            return await send_error(
                send,
                ApiError(
                    429,
                    f"This key already has {limit} requests in flight.",
                    "rate_limit_error",
                    "too_many_concurrent_requests",
                    headers={"retry-after": "1"},
                ),
                close=True,
            )
        self.in_flight[secret] = self.in_flight.get(secret, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[secret] -= 1
            if not self.in_flight[secret]:
                del self.in_flight[secret]  # keys come and go with reloads


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
            stop_logging_as(token)


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


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = logged_request_id()
        return True


def configure_logging(level: str) -> None:
    """One format for every line of ours, in every worker: time, level, request id.

    Idempotent, and on our own logger only, so an embedding app's logging is left alone."""
    logger = logging.getLogger("custom_llm")
    logger.setLevel(level)
    if not any(getattr(handler, "custom_llm", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.custom_llm = True  # type: ignore[attr-defined]
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        logger.addHandler(handler)


# ---------------------------------------------------------------------------------------------
# The HTTP protocol: uvicorn's httptools, with a request head bounded in size and in time
# ---------------------------------------------------------------------------------------------


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, safe to face the internet without a proxy in front.

    httptools puts no bound on a request head: a header that never ends grows without limit, and
    a connection that sends nothing, or a byte now and then, is kept open forever. Here a head
    larger than `max_head_bytes` gets a 431 and a head not complete within `head_seconds` (counted
    from the connection, or from the first byte of the next request on a kept-alive one) gets a
    408; a body not complete within `body_seconds` of its head gets a 408 too (or, once the answer
    has begun, the connection is closed). All close the connection. `configure()` sets the limits
    in each worker process."""

    max_head_bytes = 64 * 1024
    head_seconds = 10.0
    body_seconds = 30.0

    @classmethod
    def configure(cls, max_head_bytes: int, head_seconds: float, body_seconds: float) -> None:
        cls.max_head_bytes, cls.head_seconds, cls.body_seconds = max_head_bytes, head_seconds, body_seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes = 0
        self.body_timer: asyncio.TimerHandle | None = None
        self.head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_seconds, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        in_head = self.head_timer is not None
        if in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if in_head and self.head_timer is not None and self.head_bytes > self.max_head_bytes:
            self._refuse(431, b"Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_timer is None:  # the next request on a kept-alive connection
            self.head_bytes = 0
            self.head_timer = self.loop.call_later(self.head_seconds, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._stop_timers()
        self.body_timer = self.loop.call_later(self.body_seconds, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_timers()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def _stop_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, b"Request Timeout")

    def _body_timeout(self) -> None:
        self.body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the answer has begun (a 401 for a body still arriving): just close
        else:
            self._refuse(408, b"Request Timeout")

    def _refuse(self, status: int, reason: bytes) -> None:
        self._stop_timers()
        self.url, self.headers = b"", []  # drop what was buffered
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, reason))
        self.transport.close()
