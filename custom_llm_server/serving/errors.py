"""Errors in OpenAI's shape: one exception (core.errors.ApiError), answered with its status before the
first byte; FastAPI's own errors and anything unexpected answered the same way."""

import asyncio
import logging
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from custom_llm_server.core.errors import ApiError, bad_request, internal_error

log = logging.getLogger("custom_llm")


def error_response(error: ApiError, close: bool = False) -> Response:
    headers = {**(error.headers or {}), **({"connection": "close"} if close else {})}
    return Response(
        orjson.dumps(error.body()), status_code=error.status, media_type="application/json", headers=headers
    )


async def send_error(send: Send, error: ApiError, close: bool = False) -> None:
    """Answer an ASGI request with an error, for middleware that runs before the app. `close`: the
    connection closes after the answer."""
    await error_response(error, close)({"type": "http"}, no_receive, send)


async def refuse(
    scope: Scope, receive: Receive, send: Send, error: ApiError, drain_bytes: int, drain_seconds: float
) -> None:
    """Answer with an error a request whose body will not be used (no key, a wrong key, over a
    limit). The body is read and dropped first: a connection closed with bytes it has not read is
    reset by the kernel, which throws away the answer still queued to send, so the client (the
    OpenAI SDKs, who then retry) sees a dropped connection instead of the 401 or 429. Up to
    `drain_bytes` and `drain_seconds` (MAX_BODY_BYTES, REFUSED_BODY_SECONDS): the connection stays
    open; a body larger or slower than that (a client sending it slowly keeps nothing open): the
    answer, then the connection closed. A client that waits for `100 Continue` before it sends its
    body is answered at once: asking for the body would only have it sent for nothing."""
    if (b"expect", b"100-continue") in [(name, value.lower()) for name, value in scope["headers"]]:
        return await send_error(send, error, close=True)
    try:
        whole = await asyncio.wait_for(_drained(receive, drain_bytes), drain_seconds)
    except TimeoutError:
        whole = False
    if whole is not None:  # None: the client left, and the request log counts a 499
        await send_error(send, error, close=not whole)


async def _drained(receive: Receive, most: int) -> bool | None:
    """Read the request's body to its end, dropping it: False past `most` bytes, None on a disconnect."""
    read = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        read += len(message.get("body", b""))
        if read > most:
            return False
        if not message.get("more_body"):
            return True


async def no_receive() -> Message:
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
