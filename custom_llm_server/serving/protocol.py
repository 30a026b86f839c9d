"""The HTTP protocol: uvicorn's httptools, with a request head bounded in size and in time."""

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("custom_llm")


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
