"""The voices: any OpenAI-compatible /audio/speech, Debian's espeak-ng, or yours (the Engine protocol),
each held to the speech limits by Bounded; and the text said as raw PCM for Agora's custom TTS."""

import asyncio
import dataclasses
import inspect
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import yarl

from custom_llm_server.core.bounds import Slots, read_start
from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import upstream_error
from custom_llm_server.core.redact import Redactor, printable
from custom_llm_server.voice.audio import SAMPLE_RATE, Resampler

log = logging.getLogger("custom_llm.speech")


class SpeechError(Exception):
    """The speech engine failed; the message is for the log."""


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


# espeak-ng runs at the lowest CPU priority: sixteen of them on two cores must leave the server's own
# loop (every stream, /health) the CPU it needs.
BELOW_THE_SERVER = ("nice", "-n", "19") if shutil.which("nice") else ()


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
                *BELOW_THE_SERVER,
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
