"""Answers that stop their work the moment the caller hangs up (a barge-in): SSE events, raw bytes
and JSON computed under a watch on the connection. Pure ASGI: BaseHTTPMiddleware would buffer them."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import SHUTTING_DOWN, ApiError, internal_error
from custom_llm_server.core.events import DONE, ChunkWriter, Event, sse, words_of
from custom_llm_server.core.text import FIRST_SENTENCE_SCAN, sentence_end
from custom_llm_server.serving.errors import error_response, no_receive, send_error

log = logging.getLogger("custom_llm")


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
        await response({"type": "http"}, no_receive, send)
