"""The custom voice: text cut into speakable segments, synthesized, resampled to 16 kHz mono s16le,
framed in 40 ms chunks and paced at real time.

Engines: any OpenAI-compatible `/audio/speech` (response_format "pcm"), or Debian's espeak-ng
on a machine without a network. Both stream: the first audio leaves after the first sentence is
written, not after the whole answer, and sentence n+1 is synthesized while sentence n plays.
"""

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import aiohttp
import numpy as np
import soxr
import yarl

log = logging.getLogger("custom_llm.speech")

SAMPLE_RATE = 16_000
CHUNK_MS = 40
CHUNK_BYTES = SAMPLE_RATE * 2 * CHUNK_MS // 1000  # 1280: what Agora's engine plays


class SpeechError(Exception):
    """The speech engine failed; the message is for the log."""


# ---------------------------------------------------------------------------------------------
# Text: what is worth saying, cut where a listener expects a pause
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```.*?(```|$)", re.S)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"(https?://|www\.)\S*[^\s.,;:!?)\]]")
_MARKS = re.compile(r"(^|\n)\s{0,3}(#{1,6}\s+|[-*+]\s+|>\s?|\d+[.)]\s+)|[*_`~]{1,3}")
# A sentence ends at .!? before a space, or at the end of the text so far unless a digit precedes
# it (the next delta may be "14" after "3."): waiting for the next word would cost a whole delta.
_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|(?<!\d)[.!?…]+[\"')\]]*$|[。！？；]+|\n")
_CLAUSE = re.compile(r"[,;:](?=\s)|[，、：]")
FIRST_SEGMENT_MIN = 12  # characters before the first segment may end at a comma
MAX_SEGMENT = 220  # a segment with no punctuation is cut at a space near this length


def speakable(text: str) -> str:
    """The text as it should be spoken: no code blocks, link targets, raw URLs or markdown marks."""
    text = _FENCE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _MARKS.sub(lambda m: m.group(1) or "", text)
    text = re.sub(r"[ \t]+([.,!?;:])", r"\1", text)  # where a URL was cut out
    return re.sub(r"[ \t]+", " ", text).strip()


_WIDE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def _length(text: str) -> int:
    """Length as speech: a Chinese or Japanese character says about as much as two Latin letters."""
    return len(text) + len(_WIDE.findall(text))


def _cut(buffer: str, first: bool) -> int:
    """Where the next segment ends in the buffer, or 0 when it needs more text."""
    ends = [m.end() for m in [_END.search(buffer)] if m]
    if first:  # the first segment may end at a clause, so the first audio leaves sooner
        ends += [m.end() for m in _CLAUSE.finditer(buffer) if _length(buffer[:m.end()]) >= FIRST_SEGMENT_MIN][:1]
    if ends:
        return min(ends)
    if len(buffer) > MAX_SEGMENT:
        space = buffer.rfind(" ", 0, MAX_SEGMENT)
        return space if space > 0 else MAX_SEGMENT
    return 0


async def segments(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Speakable segments from a stream of text deltas: whole sentences, the first one short.

    Code blocks are skipped even when they span many deltas."""
    buffer, first, in_code = "", True, False
    async for delta in deltas:
        buffer += delta
        while True:
            if in_code or "```" in buffer:
                before, fence, after = buffer.partition("```")
                if in_code:
                    if not fence:
                        buffer = buffer[-2:]  # a fence may be split across deltas
                        break
                    buffer, in_code = after, False
                    continue
                if speakable(before):
                    yield speakable(before)
                    first = False
                buffer, in_code = after, True
                continue
            cut = _cut(buffer, first)
            if not cut:
                break
            segment, buffer = speakable(buffer[:cut]), buffer[cut:]
            if segment:
                yield segment
                first = False
    if not in_code and speakable(buffer):
        yield speakable(buffer)


# ---------------------------------------------------------------------------------------------
# Audio: resampling, framing, pacing
# ---------------------------------------------------------------------------------------------


class Resampler:
    """Streaming, anti-aliased sample-rate conversion of s16le mono (soxr, high quality)."""

    def __init__(self, rate: int):
        self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16", quality="HQ") if rate != SAMPLE_RATE else None
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
        return [ready[i:i + CHUNK_BYTES] for i in range(0, cut, CHUNK_BYTES)]

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
    """Lets frames go at real time after a head start, so a long answer never floods the engine."""

    def __init__(self, head_start_ms: int):
        self.head_start = head_start_ms / 1000
        self.start: float | None = None
        self.sent = 0

    async def wait(self) -> None:
        clock = asyncio.get_running_loop().time
        if self.start is None:
            self.start = clock() - self.head_start
        delay = self.start + self.sent * CHUNK_MS / 1000 - clock()
        self.sent += 1
        if delay > 0:
            await asyncio.sleep(delay)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


class Engine(Protocol):
    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """16 kHz mono s16le PCM of the text, as it is made."""


@dataclass
class OpenAISpeech:
    """Any OpenAI-compatible speech endpoint: POST {base}/audio/speech with response_format "pcm"."""

    session: aiohttp.ClientSession
    base_url: str
    api_key: str
    model: str
    voice: str
    rate: int = 24_000  # OpenAI's pcm is 24 kHz

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        url = yarl.URL(self.base_url.rstrip("/") + "/audio/speech")
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "voice": self.voice, "input": text, "response_format": "pcm"}
        resample = Resampler(self.rate)
        try:
            async with self.session.post(url, json=body, headers=headers) as response:
                if response.status >= 400:
                    raise SpeechError(f"speech endpoint answered {response.status}: {(await response.read())[:200]!r}")
                async for piece in response.content.iter_any():
                    yield resample(piece)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise SpeechError(f"speech endpoint failed: {type(error).__name__}: {error}") from None
        yield resample(b"", last=True)


@dataclass
class EspeakSpeech:
    """Debian's espeak-ng, run locally: no network, no key; a robotic but clear voice."""

    voice: str = "en-us"
    rate: int = 22_050  # what espeak-ng writes

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        try:
            process = await asyncio.create_subprocess_exec(
                "espeak-ng", "--stdout", "-v", self.voice, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError as error:
            raise SpeechError(f"espeak-ng cannot run: {error}") from None
        resample, header = Resampler(self.rate), b""
        try:
            process.stdin.write(text.encode())  # on stdin, so no text is ever read as an option
            process.stdin.close()
            while piece := await process.stdout.read(8192):
                if len(header) < 44:  # the WAV header
                    header, piece = (header + piece)[:44], (header + piece)[44:]
                yield resample(piece)
            if await process.wait() != 0:
                raise SpeechError(f"espeak-ng exited with {process.returncode}")
            yield resample(b"", last=True)
        finally:
            if process.returncode is None:
                process.kill()  # a barge-in: stop speaking at once
                await process.wait()


# ---------------------------------------------------------------------------------------------
# The pipeline: segment n+1 is synthesized while segment n is played
# ---------------------------------------------------------------------------------------------


@dataclass
class Said:
    """One step of a spoken answer: a segment's transcript (before its audio), a frame of audio,
    or a transcript with no audio to come (a subtitle, after the voice failed)."""

    transcript: str | None = None
    audio: bytes | None = None
    subtitle: bool = False


async def _fill(engine: Engine, text: str, queue: asyncio.Queue) -> None:
    try:
        async for frame in frames(engine.synthesize(text)):
            await queue.put(frame)
        await queue.put(None)
    except Exception as error:  # handed to the reader, which decides what the caller hears
        await queue.put(error)


async def speak(texts: AsyncIterator[str], engine: Engine, head_start_ms: int) -> AsyncIterator[Said]:
    """The spoken answer, paced at real time.

    A speech failure before any audio raises SpeechError (the caller gets a proper error); after
    audio began, the rest of the text goes out as subtitles and the log says why."""
    ready: asyncio.Queue = asyncio.Queue(maxsize=1)  # one segment synthesizing ahead of the one playing

    async def produce() -> None:
        try:
            async for text in texts:
                audio: asyncio.Queue = asyncio.Queue()
                task = asyncio.ensure_future(_fill(engine, text, audio))
                try:
                    await ready.put((text, audio, task))
                except BaseException:
                    task.cancel()
                    raise
            await ready.put(None)
        except Exception as error:  # the text source failed (the LLM): the reader raises it
            await ready.put(error)

    producer = asyncio.ensure_future(produce())
    pacer, spoken, broken, task = Pacer(head_start_ms), False, False, None
    try:
        while (item := await ready.get()) is not None:
            if isinstance(item, Exception):
                raise item
            text, audio, task = item
            frame = None if broken else await audio.get()
            if isinstance(frame, Exception):
                if not spoken:
                    raise SpeechError(str(frame)) from frame
                log.warning("speech failed after audio began (%s); the rest goes out as subtitles", frame)
                broken = True
            if broken:
                task.cancel()
                yield Said(transcript=text, subtitle=True)
                continue
            yield Said(transcript=text)
            while frame is not None:
                if isinstance(frame, Exception):
                    log.warning("speech failed mid-sentence (%s); the rest goes out as subtitles", frame)
                    broken = True
                    break
                await pacer.wait()
                yield Said(audio=frame)
                spoken = True
                frame = await audio.get()
    finally:
        producer.cancel()
        if task is not None:
            task.cancel()  # a barge-in stops the synthesis too
        while not ready.empty():
            item = ready.get_nowait()
            if isinstance(item, tuple):
                item[2].cancel()
