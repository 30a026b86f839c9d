"""Limits every outbound call shares (the LLM, the speech endpoint, embeddings, Agora's REST API):
bodies read only so far, and a cap on calls in flight that refuses at once rather than queueing.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from custom_llm_server.core.errors import overloaded


class TooLarge(Exception):
    """A response body went past its limit; nothing more of it was read."""


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, refused past `limit` bytes (a huge error page costs no memory)."""
    pieces, size = [], 0
    async for piece in response.content.iter_any():
        size += len(piece)
        if size > limit:
            raise TooLarge(f"the body is larger than {limit} bytes")
        pieces.append(piece)
    return b"".join(pieces)


async def read_start(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most the first `limit` bytes of the body (an error's message), the rest left unread."""
    pieces, size = [], 0
    async for piece in response.content.iter_any():
        pieces.append(piece[: limit - size])
        size += len(pieces[-1])
        if size >= limit:
            break
    return b"".join(pieces)


class Slots:
    """At most `limit` calls of one kind in flight (a setting per kind); past it, a quick 503."""

    def __init__(self, limit: int, setting: str):
        self.limit, self.setting, self.used = limit, setting, 0

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.used >= self.limit:
            raise overloaded(self.setting)
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1
