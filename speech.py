"""The custom voice behind /audio: every source of an audio answer, the engines, and the work
between: text cut into speakable segments, synthesized, resampled to 16 kHz mono s16le, framed in
40 ms chunks and paced at real time.

Sources: two files (the default), the model's answer spoken by an engine, the upstream's own
audio converted, and a broadcast (the assistant's last message) said as written. Engines: any
OpenAI-compatible `/audio/speech` (response_format "pcm"), or Debian's espeak-ng on a machine
without a network. Both stream: the first audio leaves after the first sentence is written, not
after the whole answer, and sentence n+1 is synthesized while sentence n plays.
"""

import asyncio
import base64
import dataclasses
import inspect
import logging
import math
import re
import shutil
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson
import soxr
import yarl

from context import Context
from errors import ApiError, upstream_error
from events import Audio, End, Event, Relayed, Text, ToolCall, completion_id, merge_tool_calls, words_of
from outbound import Slots, read_start
from redact import Redactor, printable
from text import CJK, sentence_end

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
_LINK = re.compile(r"\[([^\][]*)\]\([^()\s]*\)")
_URL = re.compile(r"(https?://|www\.)\S*[^\s.,;:!?)\]]")
_MARKS = re.compile(r"(^|\n)\s{0,3}(#{1,6}\s+|[-*+]\s+|>\s?|\d+[.)]\s+)|[*_`~]{1,3}")
# Runs of spaces are matched from their first space and never given back: linear on any text.
_SPACE_BEFORE_MARK = re.compile(r"(?<![ \t])[ \t]++([.,!?;:])")
_SPACES = re.compile(r"[ \t]++")
_WORD = re.compile(r"[^\W_]")
_UNSAID = re.compile(r"[\s.!?…,;:。！？；，、]*+")  # nothing to say at the start of a segment
_CLAUSE = re.compile(r"[,;:](?=\s)|[，、：]")
FIRST_SEGMENT_MIN = 12  # characters before the first segment may end at a comma
MAX_SEGMENT = 220  # a segment with no punctuation is cut at a space near this length


def speakable(text: str) -> str:
    """The text as it should be spoken: no code blocks, link targets, raw URLs or markdown marks;
    nothing at all when no word is left (a run of dots or commas says nothing)."""
    text = _FENCE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _MARKS.sub(lambda m: m.group(1) or "", text)
    text = _SPACE_BEFORE_MARK.sub(r"\1", text)  # where a URL was cut out
    text = _SPACES.sub(" ", text).strip()
    return text if _WORD.search(text) else ""


def _length(text: str) -> int:
    """Length as speech: a Chinese or Japanese character says about as much as two Latin letters."""
    return len(text) + len(CJK.findall(text))


class Segmenter:
    """Cuts streamed text into speakable segments: whole sentences, the first one short (it may end
    at a clause, so the first audio leaves sooner), none longer than MAX_SEGMENT, code blocks skipped
    even when they span many deltas.

    Linear in the text, whatever it holds: each cut looks at most MAX_SEGMENT characters ahead, and
    what is left over is moved only once per delta, so a 4 MB broadcast is read once."""

    def __init__(self) -> None:
        self.pending, self.first, self.in_code = "", True, False

    def push(self, delta: str) -> Iterator[str]:
        """The segments this delta completes, one at a time, "" for a cut with nothing to say (so a
        consumer that awaits between cuts lets the event loop serve others while a huge delta is cut)."""
        text, at = self.pending + delta, 0
        fence = -1 if self.in_code else text.find("```")
        while True:
            if self.in_code:  # skip to the closing fence
                close = text.find("```", at)
                if close < 0:
                    at = max(at, len(text) - 2)  # a fence may be split across deltas
                    break
                at, self.in_code = close + 3, False
                fence = text.find("```", at)
                continue
            at = _UNSAID.match(text, at).end()  # type: ignore[union-attr]  # a run of them is one step
            near = 0 <= fence <= at + MAX_SEGMENT
            window = fence if near else at + MAX_SEGMENT
            cut = self._cut(text, at, window)
            if not cut and near:  # what comes before a code block is said on its own
                cut, self.in_code = fence, True
            elif not cut and len(text) - at > MAX_SEGMENT:
                space = text.rfind(" ", at, window)
                cut = space if space > at else window
            elif not cut:
                break
            segment = speakable(text[at:cut]) if _WORD.search(text, at, cut) else ""
            at = cut + 3 if self.in_code else cut
            self.first = self.first and not segment
            yield segment
        self.pending = text[at:]

    def flush(self) -> list[str]:
        rest, self.pending = self.pending, ""
        return [] if self.in_code or not (segment := speakable(rest)) else [segment]

    def _cut(self, text: str, at: int, window: int) -> int:
        """Where the next segment ends within text[at:window], or 0 when it needs more text."""
        # One character past the window, so a stop at its edge can see the space after it.
        end = sentence_end(text, at, window + 1)
        end = end if end <= window else 0
        if self.first:  # the first segment may end at a clause, so the first audio leaves sooner
            for clause in _CLAUSE.finditer(text, at, end or window):
                if _length(text[at : clause.end()]) >= FIRST_SEGMENT_MIN:
                    return clause.end()
        return end


async def segments(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Speakable segments from a stream of text deltas (see Segmenter)."""
    cutter = Segmenter()
    async for delta in deltas:
        for segment in cutter.push(delta):
            if segment:
                yield segment
            else:
                await asyncio.sleep(0)  # nothing to say here: let the loop breathe
    for segment in cutter.flush():
        yield segment


# ---------------------------------------------------------------------------------------------
# Audio: resampling, framing, pacing
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How a request asks for its words to be said: Agora's custom TTS fields (which the LLM can change
    mid-call with custom_metadata.tts_params). What is not given, the settings decide."""

    voice: str | None = None
    speed: float | None = None
    model: str | None = None
    instructions: str | None = None


class Engine(Protocol):
    """A voice. It declares the rate it speaks at in `rate` (16 kHz when it has none), and its audio is
    resampled once, to what the caller asked for."""

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Mono s16le PCM of the text at the engine's rate, as it is made. An engine may also take
        `style: Style` (the request's voice, speed, model, instructions) and `context: Context` (the
        request: the caller's agent, the call's variables)."""
        ...


@dataclass
class OpenAISpeech:
    """Any OpenAI-compatible speech endpoint: POST {base}/audio/speech with response_format "pcm"."""

    session: aiohttp.ClientSession
    base_url: str
    api_key: str
    model: str
    voice: str
    rate: int = 24_000  # OpenAI's pcm is 24 kHz

    async def synthesize(self, text: str, style: Style = Style()) -> AsyncIterator[bytes]:
        url = yarl.URL(self.base_url.rstrip("/") + "/audio/speech")
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body: dict[str, Any] = {
            "model": style.model or self.model,
            "voice": style.voice or self.voice,
            "input": text,
            "response_format": "pcm",
        }
        if style.speed is not None:
            body["speed"] = style.speed
        if style.instructions:
            body["instructions"] = style.instructions
        scrub = Redactor(self.api_key)
        try:
            async with self.session.post(url, json=body, headers=headers, allow_redirects=False) as response:
                if response.status >= 400:  # only the start of an error is read: it may be huge, or echo our key
                    _, said = scrub.json_message(await read_start(response, 4096))
                    raise SpeechError(f"speech endpoint answered {response.status}: {printable(said, 200)}")
                async for piece in response.content.iter_any():
                    yield piece
        except (TimeoutError, aiohttp.ClientError) as error:
            raise SpeechError(f"speech endpoint failed: {type(error).__name__}: {scrub(str(error))[:200]}") from None


@dataclass
class Bounded:
    """Any engine (the built-in ones, or yours) within the speech limits: at most MAX_SPEECH_STREAMS
    syntheses at once (past it, a quick 503), TTS_TIMEOUT_SECONDS for the first audio and between
    pieces, and TTS_MAX_SECONDS for a synthesis, in time and in audio returned."""

    engine: Engine
    slots: Slots
    timeout: float = 10.0
    max_seconds: float = 120.0
    context: Context | None = None  # the request being answered, for an engine that asks for it

    def speaking_for(self, context: Context) -> "Bounded":
        """This voice for one request: an engine whose synthesize() takes `context` gets it (the
        caller's agent, the call's variables, the channel), within the same limits."""
        return dataclasses.replace(self, context=context)

    async def synthesize(self, text: str, style: Style = Style(), rate: int = SAMPLE_RATE) -> AsyncIterator[bytes]:
        """The text spoken at `rate`: resampled once, from the rate the engine declares."""
        accepts = inspect.signature(self.engine.synthesize).parameters  # a voice of yours may take neither
        extra: dict[str, Any] = {"style": style} if "style" in accepts else {}
        if "context" in accepts:
            extra["context"] = self.context
        source = getattr(self.engine, "rate", SAMPLE_RATE)
        with self.slots.take():
            pieces = self.engine.synthesize(text, **extra)
            sent, resample = 0, Resampler(source, rate)
            try:
                async with asyncio.timeout(self.max_seconds):
                    while True:
                        async with asyncio.timeout(self.timeout):
                            piece = await anext(pieces, None)
                        if piece is None:
                            if out := resample(b"", last=True):
                                yield out
                            return
                        sent += len(piece)
                        if sent > self.max_seconds * source * 2:
                            raise SpeechError(f"more than {self.max_seconds:g} s of audio (TTS_MAX_SECONDS)")
                        if out := resample(piece):
                            yield out
            except TimeoutError:
                raise SpeechError(f"no audio within {self.timeout:g} s, or past {self.max_seconds:g} s") from None
            finally:
                await pieces.aclose()  # type: ignore[attr-defined]  # stops the engine's request or process


@dataclass
class EspeakSpeech:
    """Debian's espeak-ng, run locally: no network, no key; a robotic but clear voice."""

    voice: str = "en-us"
    rate: int = 22_050  # what espeak-ng writes

    async def synthesize(self, text: str, style: Style = Style()) -> AsyncIterator[bytes]:
        """The text said by espeak-ng; of a request's style only the speed applies (its voice names are
        another engine's)."""
        speed = ["-s", str(round(175 * min(max(style.speed, 0.5), 2.5)))] if style.speed else []
        try:
            process = await asyncio.create_subprocess_exec(
                "espeak-ng",
                "--stdout",
                *speed,
                "-v",
                self.voice,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as error:
            raise SpeechError(f"espeak-ng cannot run: {error}") from None
        header = b""
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(text.encode())  # on stdin, so no text is ever read as an option
            process.stdin.close()
            while piece := await process.stdout.read(8192):
                if len(header) < 44:  # the WAV header
                    header, piece = (header + piece)[:44], (header + piece)[44:]
                yield piece
            if await process.wait() != 0:
                raise SpeechError(f"espeak-ng exited with {process.returncode}")
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


async def _fill(engine: Engine, text: str, queue: asyncio.Queue) -> None:
    try:
        async for frame in frames(engine.synthesize(text)):
            await queue.put(frame)
        await queue.put(None)
    except Exception as error:  # handed to the reader, which decides what the caller hears
        await queue.put(error)


def subtitles_from_here(error: Exception, where: str) -> bool:
    """Say in the log why the rest of an answer goes out as subtitles; True: the voice is broken."""
    log.warning("speech failed %s (%s); the rest goes out as subtitles", where, printable(error, 200))
    return True


async def speak(texts: AsyncIterator[str], engine: Engine, head_start_ms: int | None) -> AsyncIterator[Said]:
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
            if isinstance(frame, ApiError):
                raise frame  # MAX_SPEECH_STREAMS reached: a 503 the caller can retry
            if isinstance(frame, Exception):
                if not spoken:
                    raise SpeechError(str(frame)) from frame
                broken = subtitles_from_here(frame, "after audio began")
            if broken:  # a subtitle: the transcript, and no audio for it
                task.cancel()
                frame = None
            yield Said(transcript=text)
            while frame is not None:
                if isinstance(frame, Exception):
                    broken = subtitles_from_here(frame, "mid-sentence")
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


# ---------------------------------------------------------------------------------------------
# The engine choice
# ---------------------------------------------------------------------------------------------


def speech_engine(
    kind: str, session: aiohttp.ClientSession, base_url: str, api_key: str, model: str, voice: str, rate: int
) -> Engine:
    """The engine TTS_ENGINE names: "espeak" (offline) or "openai" (any OpenAI-compatible speech API)."""
    if kind == "espeak":
        return EspeakSpeech(voice=voice or "en-us")
    return OpenAISpeech(session, base_url, api_key, model, voice or "alloy", rate)


def local_engine() -> Engine | None:
    """espeak-ng when it is installed: the voice for words the files cannot say (broadcasts)."""
    return EspeakSpeech() if shutil.which("espeak-ng") else None


async def pcm_at(engine: Bounded, text: str, rate: int, style: Style = Style()) -> AsyncIterator[bytes]:
    """The text spoken, as raw s16le mono PCM at any rate, as it is made (POST /audio/speech)."""
    if not text.strip():
        return  # Agora may close a sequence with an empty request_end request
    try:
        async for piece in engine.synthesize(text, style, rate):
            yield piece
    except SpeechError as error:
        log.warning("speech failed: %s", printable(error, 200))
        raise upstream_error(502, "The speech service failed.", "speech_failed") from None


# ---------------------------------------------------------------------------------------------
# The sources of an audio answer, as events: transcript first, then 40 ms frames
# ---------------------------------------------------------------------------------------------


def simulated_audio() -> tuple[str, bytes]:
    """A spoken-answer stand-in when the audio files are missing: a soft one-second tone."""
    samples = (int(3000 * math.sin(2 * math.pi * 440 * n / SAMPLE_RATE)) for n in range(SAMPLE_RATE))
    return "This is a simulated audio answer.", struct.pack(f"<{SAMPLE_RATE}h", *samples)


async def load_audio(text_file: Path, pcm_file: Path) -> tuple[str, bytes]:
    def read() -> tuple[str, bytes]:
        return text_file.read_text(encoding="utf-8").strip(), pcm_file.read_bytes()

    try:
        text, pcm = await asyncio.to_thread(read)
    except (OSError, UnicodeDecodeError) as error:
        log.warning("audio files unavailable (%s); sending a simulated answer", type(error).__name__)
        return simulated_audio()
    return text, pcm[: len(pcm) // 2 * 2]  # whole 16-bit samples only


async def file_answer(text_file: Path, pcm_file: Path, head_start_ms: int | None) -> AsyncIterator[Event]:
    """The recorded answer: the transcript of the text file, then the PCM file."""
    text, pcm = await load_audio(text_file, pcm_file)
    pacer = Pacer(head_start_ms)
    # The transcript comes first: it is what the engine stores as the agent's words.
    yield Audio(transcript=text)
    for offset in range(0, len(pcm), CHUNK_BYTES):
        await pacer.wait()
        yield Audio(pcm=pcm[offset : offset + CHUNK_BYTES])
    yield End()


def spoken_separator(text: str) -> str:
    """What joins this segment's transcript to the next: a space, except after Chinese or Japanese."""
    return "" if CJK.search(text[-1:]) else " "


async def words(events: AsyncIterator[Event], held: list[ToolCall]) -> AsyncIterator[str]:
    """The words of an answer's events; calls to the caller's tools are held for after the speech."""
    async for event in events:
        if isinstance(event, ToolCall):
            held.append(event)
        elif text := words_of(event):
            yield text


async def spoken_answer(
    events: AsyncIterator[Event],
    engine: Engine | None,
    head_start_ms: int | None,
    why_silent: str = "no voice is configured",
) -> AsyncIterator[Event]:
    """The answer's words, spoken as they come; without an engine, the words as transcript only.

    The caller's tool calls come back after the speech, as on /chat/completions."""
    held: list[ToolCall] = []
    texts = segments(words(events, held))
    if engine is None:
        log.warning("answering /audio with a transcript only: %s", why_silent)
        async for text in texts:
            yield Audio(transcript=text + spoken_separator(text))
    else:
        try:
            async for step in speak(texts, engine, head_start_ms):
                if step.transcript is not None:
                    yield Audio(transcript=step.transcript + spoken_separator(step.transcript))
                else:
                    yield Audio(pcm=step.audio)
        except SpeechError as error:
            log.warning("speech failed before any audio: %s", printable(error, 200))
            raise upstream_error(502, "The speech service failed.", "speech_failed") from None
    for call in held:
        yield call
    if not held:
        yield End()


async def one(text: str) -> AsyncIterator[Event]:
    yield Text(text)


def upstream_audio(payload: bytes) -> tuple[dict[str, Any], str]:
    """The `delta.audio` and `delta.content` of one upstream chunk."""
    try:
        delta = orjson.loads(payload)["choices"][0].get("delta") or {}
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return {}, ""
    audio, content = delta.get("audio"), delta.get("content")
    return audio if isinstance(audio, dict) else {}, content if isinstance(content, str) else ""


async def converted_answer(
    events: AsyncIterator[Event], engine: Engine | None, head_start_ms: int | None
) -> AsyncIterator[Event]:
    """The upstream's own audio (gpt-4o-audio style: base64 pcm16 at 24 kHz), converted, not re-synthesized.

    An upstream that answers in text only (it ignored `modalities`) has its words spoken instead,
    so an audio answer is never silent."""
    pacer, resample, framer = Pacer(head_start_ms), Resampler(24_000), Framer()
    text, heard, held = [], False, []
    async for event in events:
        if isinstance(event, ToolCall):
            held.append(event)
            continue
        for payload in event.payloads if isinstance(event, Relayed) else []:
            audio, content = upstream_audio(payload)
            text.append(content)
            if isinstance(audio.get("transcript"), str) and audio["transcript"]:
                heard = True
                yield Audio(transcript=audio["transcript"])
            data = audio.get("data")
            for frame in framer.push(resample(base64.b64decode(data) if isinstance(data, str) else b"")):
                await pacer.wait()
                yield Audio(pcm=frame)
    for frame in framer.push(resample(b"", last=True)) + framer.flush():
        await pacer.wait()
        yield Audio(pcm=frame)
    if not heard and "".join(text).strip():
        async for spoken in spoken_answer(
            one("".join(text)),
            engine,
            head_start_ms,
            "the upstream answered in text, not audio, and no voice is configured",
        ):
            if not isinstance(spoken, End):
                yield spoken
    for call in held:
        yield call
    if not held:
        yield End()


async def audio_completion(events: AsyncIterator[Event], model: str) -> bytes:
    """The non-streaming answer: one message.audio with all the data and the whole transcript
    (and the caller's tool calls, when the model made some)."""
    transcript, pcm, calls, finish = [], [], [], "stop"
    async for event in events:
        if isinstance(event, Audio):
            transcript.append(event.transcript or "")
            pcm.append(event.pcm or b"")
        elif isinstance(event, ToolCall):
            calls.append(event.chunk)
            finish = "tool_calls"
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None,
        "audio": {
            "id": f"audio_{completion_id()[9:]}",
            "data": base64.b64encode(b"".join(pcm)).decode(),
            "transcript": "".join(transcript).strip(),
            "expires_at": int(time.time()) + 3600,
        },
    }
    if calls:
        message["tool_calls"] = merge_tool_calls(calls)
    return orjson.dumps(
        {
            "id": completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "message": message}],
        }
    )
