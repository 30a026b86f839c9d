"""Every source of an audio answer, as events (transcript first, then 40 ms frames): a recording,
the model's words spoken (segment n+1 synthesized while n plays), the upstream's own audio converted,
and the non-streaming completion."""

import asyncio
import base64
import logging
import math
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from custom_llm_server.core.errors import ApiError, upstream_error
from custom_llm_server.core.events import (
    Audio,
    End,
    Event,
    Note,
    Relayed,
    Text,
    ToolCall,
    completion_id,
    merge_tool_calls,
    words_of,
)
from custom_llm_server.core.redact import printable
from custom_llm_server.core.text import CJK
from custom_llm_server.voice.audio import CHUNK_BYTES, SAMPLE_RATE, Framer, Pacer, Resampler, frames
from custom_llm_server.voice.engines import Engine, SpeechError
from custom_llm_server.voice.segments import segments

log = logging.getLogger("custom_llm.speech")

RECORDING = Path(__file__).resolve().parent / "recording"  # the sample answer of AUDIO_SOURCE=files


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


def simulated_audio() -> tuple[str, bytes]:
    """A spoken-answer stand-in when the audio files are missing: a soft one-second tone."""
    samples = (int(3000 * math.sin(2 * math.pi * 440 * n / SAMPLE_RATE)) for n in range(SAMPLE_RATE))
    return "This is a simulated audio answer.", struct.pack(f"<{SAMPLE_RATE}h", *samples)


async def load_audio(text_file: Path | None, pcm_file: Path | None) -> tuple[str, bytes]:
    """The recording's transcript and PCM: the files given (AUDIO_TEXT_FILE, AUDIO_PCM_FILE), or the
    one that ships in the package."""

    def read() -> tuple[str, bytes]:
        text = (text_file or RECORDING / "file.txt").read_text(encoding="utf-8").strip()
        return text, (pcm_file or RECORDING / "file.pcm").read_bytes()

    try:
        text, pcm = await asyncio.to_thread(read)
    except (OSError, UnicodeDecodeError) as error:
        log.warning("audio files unavailable (%s); sending a simulated answer", type(error).__name__)
        return simulated_audio()
    return text, pcm[: len(pcm) // 2 * 2]  # whole 16-bit samples only


async def file_answer(text_file: Path | None, pcm_file: Path | None, head_start_ms: int | None) -> AsyncIterator[Event]:
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


async def words(events: AsyncIterator[Event], held: list[ToolCall], notes: list[Note]) -> AsyncIterator[str]:
    """The words of an answer's events; calls to the caller's tools are held for after the speech,
    notes (a server tool's call and result, for the playground) for the speech's next step."""
    async for event in events:
        if isinstance(event, ToolCall):
            held.append(event)
        elif isinstance(event, Note):
            notes.append(event)
        elif text := words_of(event):
            yield text


def taken(notes: list[Note]) -> list[Note]:
    """The notes gathered so far, each handed over once."""
    out, notes[:] = notes[:], []
    return out


async def spoken_answer(
    events: AsyncIterator[Event],
    engine: Engine | None,
    head_start_ms: int | None,
    why_silent: str = "no voice is configured",
) -> AsyncIterator[Event]:
    """The answer's words, spoken as they come; without an engine, the words as transcript only.

    The caller's tool calls come back after the speech, as on /chat/completions."""
    held: list[ToolCall] = []
    notes: list[Note] = []  # read ahead of the speech: each goes out with the step after it was read
    texts = segments(words(events, held, notes))
    if engine is None:
        log.warning("answering /audio with a transcript only: %s", why_silent)
        async for text in texts:
            for note in taken(notes):
                yield note
            yield Audio(transcript=text + spoken_separator(text))
    else:
        try:
            async for step in speak(texts, engine, head_start_ms):
                for note in taken(notes):
                    yield note
                if step.transcript is not None:
                    yield Audio(transcript=step.transcript + spoken_separator(step.transcript))
                else:
                    yield Audio(pcm=step.audio)
        except SpeechError as error:
            log.warning("speech failed before any audio: %s", printable(error, 200))
            raise upstream_error(502, "The speech service failed.", "speech_failed") from None
    for note in taken(notes):
        yield note
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
        if isinstance(event, Note):
            yield event  # a server tool's call, for the playground
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
