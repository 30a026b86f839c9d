"""PCM on its way to Agora's engine: resampled to 16 kHz mono s16le (soxr), framed in 40 ms chunks,
and paced at real time after a head start."""

import asyncio
import logging
from collections.abc import AsyncIterator

import numpy as np
import soxr

log = logging.getLogger("custom_llm.speech")


SAMPLE_RATE = 16_000
CHUNK_MS = 40
CHUNK_BYTES = SAMPLE_RATE * 2 * CHUNK_MS // 1000  # 1280: what Agora's engine plays


class Resampler:
    """Streaming, anti-aliased sample-rate conversion of s16le mono (soxr, high quality)."""

    def __init__(self, rate: int, target: int = SAMPLE_RATE):
        self.stream = soxr.ResampleStream(rate, target, 1, dtype="int16", quality="HQ") if rate != target else None
        self.odd = b""

    def __call__(self, pcm: bytes, last: bool = False) -> bytes:
        pcm, self.odd = self.odd + pcm, b""
        if len(pcm) % 2:
            pcm, self.odd = pcm[:-1], pcm[-1:]
        if self.stream is None:
            return pcm
        return self.stream.resample_chunk(np.frombuffer(pcm, dtype="<i2"), last=last).astype("<i2").tobytes()


class Framer:
    """Cuts PCM into frames of exactly CHUNK_BYTES; the last is padded with silence, a pause a
    listener won't notice."""

    def __init__(self) -> None:
        self.pending = b""

    def push(self, pcm: bytes) -> list[bytes]:
        self.pending += pcm
        cut = len(self.pending) - len(self.pending) % CHUNK_BYTES
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return [ready[i : i + CHUNK_BYTES] for i in range(0, cut, CHUNK_BYTES)]

    def flush(self) -> list[bytes]:
        last, self.pending = self.pending, b""
        return [last.ljust(CHUNK_BYTES, b"\0")] if last else []


async def frames(pcm: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    framer = Framer()
    async for piece in pcm:
        for frame in framer.push(piece):
            yield frame
    for frame in framer.flush():
        yield frame


class Pacer:
    """Lets frames go at real time after a head start, so a long answer never floods the engine.

    A head start of None means no pacing: a non-streaming answer is wanted all at once."""

    def __init__(self, head_start_ms: int | None):
        self.head_start = head_start_ms / 1000 if head_start_ms is not None else None
        self.start: float | None = None
        self.sent = 0

    async def wait(self) -> None:
        if self.head_start is None:
            return
        clock = asyncio.get_running_loop().time
        if self.start is None:
            self.start = clock() - self.head_start
        delay = self.start + self.sent * CHUNK_MS / 1000 - clock()
        self.sent += 1
        if delay > 0:
            await asyncio.sleep(delay)
