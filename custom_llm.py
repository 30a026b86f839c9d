"""A custom LLM server for Agora's Conversational AI Engine.

The engine POSTs an OpenAI Chat Completions request to this server; the server streams an
OpenAI-compatible answer back over server-sent events:

    /chat/completions        relays any OpenAI-compatible LLM, event by event, as it arrives
    /rag/chat/completions    a waiting phrase first, then an answer grounded in ./knowledge
    /audio/chat/completions  a transcript and 16 kHz mono PCM for a custom voice

Read top to bottom: settings, request models, errors, reading a request, the upstream LLM and
the SSE relay, server tools, the streaming responses, /rag, /audio, middleware, the app, the
entry point. Retrieval lives in knowledge.py, tools in tools.py, the voice in speech.py.
"""

import asyncio
import base64
import contextvars
import dataclasses
import gc
import hmac
import logging
import math
import os
import random
import re
import secrets
import struct
import sys
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Iterator, Literal, Union

import aiohttp
import orjson
import yarl
from dotenv import load_dotenv
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import metrics
import speech
from knowledge import Embeddings, KnowledgeBase, Passage
from tools import ToolRegistry, sample_tools

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent
log = logging.getLogger("custom_llm")

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Fields Agora's engine adds to the body (vendor "custom", and the routing ids its sample backend
# puts into llm.params). They are ours to read; an OpenAI upstream would reject them, and the
# tokens among them must not leak to a model provider.
ENGINE_FIELDS = frozenset(
    {"turn_id", "timestamp", "interruptable", "context",
     "channel", "app_id", "user_uid", "agent_uid", "subscriber_token", "rtm_token", "rtm_uid"}
)
MESSAGE_ENGINE_FIELDS = ("turn_id", "timestamp", "metadata")

WAITING_EN = ("Let me check that for you.", "One moment, let me look that up.", "Good question, let me find out.")
WAITING_ZH = ("好的，我查一下。", "请稍等，我找一下资料。", "好问题，我来查查看。")


def _split(value: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(sep) if part.strip())


def _tool_names(value: str | None) -> tuple[str, ...] | None:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    return () if value.strip().lower() == "none" else _split(value)


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from the environment (and .env); see .env.example."""

    llm_api_key: str = ""
    llm_base_url: str = DEFAULT_BASE_URL
    llm_model: str = "gpt-4o-mini"
    llm_connect_timeout: float = 3.0
    llm_first_token_timeout: float = 8.0
    llm_idle_timeout: float = 15.0
    llm_fallback_base_url: str = ""
    llm_fallback_api_key: str = ""
    llm_fallback_model: str = ""
    api_keys: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 2048
    max_streams_per_key: int = 0  # 0: no limit
    max_upstream_streams: int = 1000
    shutdown_grace_seconds: float = 10.0
    workers: int = 1
    strip_fields: frozenset[str] = ENGINE_FIELDS
    knowledge_dir: Path = HERE / "knowledge"
    knowledge_index: str = ""  # empty: one file per folder under .index/
    rag_top_k: int = 3
    rag_min_score: float = 0.5
    rag_deadline_ms: int = 300
    embedding_model: str = ""  # set: hybrid search (BM25 + embeddings)
    embedding_base_url: str = ""  # empty: LLM_BASE_URL
    embedding_api_key: str = ""  # empty: LLM_API_KEY
    waiting_messages: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"en": WAITING_EN, "zh": WAITING_ZH}
    )
    audio_text_file: Path = HERE / "file.txt"
    audio_pcm_file: Path = HERE / "file.pcm"
    audio_head_start_ms: int = 200
    audio_source: str = "files"  # or "tts": the model's answer, spoken
    tts_engine: str = "openai"  # or "espeak"
    tts_base_url: str = ""  # empty: LLM_BASE_URL
    tts_api_key: str = ""  # empty: LLM_API_KEY
    tts_model: str = "gpt-4o-mini-tts"
    tts_voice: str = ""  # empty: "alloy" for openai, "en-us" for espeak
    tts_sample_rate: int = 24_000
    server_tools: tuple[str, ...] | None = None  # None: every tool in tools.sample_tools()
    tool_max_rounds: int = 3
    tool_bridge_ms: int = 1000
    log_level: str = "INFO"

    @property
    def upstream_configured(self) -> bool:
        # OpenAI without a key can only fail; any other base URL may be a keyless local model.
        return bool(self.llm_api_key) or self.llm_base_url.rstrip("/") != DEFAULT_BASE_URL

    @classmethod
    def from_env(cls, quiet: bool = False) -> "Settings":
        load_dotenv(override=False)  # the real environment wins over .env
        env = os.environ
        defaults = cls()
        api_keys = _split(env.get("CUSTOM_LLM_API_KEY", ""))
        allow_unauthenticated = env.get("ALLOW_UNAUTHENTICATED", "").lower() in ("1", "true", "yes")
        if not api_keys and not allow_unauthenticated and not quiet:
            api_keys = (secrets.token_urlsafe(24),)
            # Printed once, on purpose: a server is never open by accident, and the developer
            # needs this value for the agent's llm.api_key.
            print(f"CUSTOM_LLM_API_KEY is not set; callers must send this key: {api_keys[0]}", file=sys.stderr)
        return cls(
            llm_api_key=env.get("LLM_API_KEY", ""),
            llm_base_url=env.get("LLM_BASE_URL", DEFAULT_BASE_URL),
            llm_model=env.get("LLM_MODEL", defaults.llm_model),
            llm_connect_timeout=float(env.get("LLM_CONNECT_TIMEOUT", defaults.llm_connect_timeout)),
            llm_first_token_timeout=float(env.get("LLM_FIRST_TOKEN_TIMEOUT", defaults.llm_first_token_timeout)),
            llm_idle_timeout=float(env.get("LLM_IDLE_TIMEOUT", defaults.llm_idle_timeout)),
            llm_fallback_base_url=env.get("LLM_FALLBACK_BASE_URL", ""),
            llm_fallback_api_key=env.get("LLM_FALLBACK_API_KEY", ""),
            llm_fallback_model=env.get("LLM_FALLBACK_MODEL", ""),
            api_keys=api_keys,
            allow_unauthenticated=allow_unauthenticated,
            host=env.get("HOST", defaults.host),
            port=int(env.get("PORT", defaults.port)),
            max_body_bytes=int(env.get("MAX_BODY_BYTES", defaults.max_body_bytes)),
            max_messages=int(env.get("MAX_MESSAGES", defaults.max_messages)),
            max_streams_per_key=int(env.get("MAX_STREAMS_PER_KEY", defaults.max_streams_per_key)),
            max_upstream_streams=int(env.get("MAX_UPSTREAM_STREAMS", defaults.max_upstream_streams)),
            shutdown_grace_seconds=float(env.get("SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds)),
            workers=int(env.get("WORKERS", defaults.workers)),
            strip_fields=ENGINE_FIELDS | set(_split(env.get("STRIP_FIELDS", ""))),
            knowledge_dir=Path(env.get("KNOWLEDGE_DIR", defaults.knowledge_dir)),
            knowledge_index=env.get("KNOWLEDGE_INDEX", ""),
            rag_top_k=int(env.get("RAG_TOP_K", defaults.rag_top_k)),
            rag_min_score=float(env.get("RAG_MIN_SCORE", defaults.rag_min_score)),
            rag_deadline_ms=int(env.get("RAG_DEADLINE_MS", defaults.rag_deadline_ms)),
            embedding_model=env.get("EMBEDDING_MODEL", ""),
            embedding_base_url=env.get("EMBEDDING_BASE_URL", ""),
            embedding_api_key=env.get("EMBEDDING_API_KEY", ""),
            waiting_messages={
                "en": _split(env.get("WAITING_MESSAGES_EN", ""), "|") or WAITING_EN,
                "zh": _split(env.get("WAITING_MESSAGES_ZH", ""), "|") or WAITING_ZH,
            },
            audio_text_file=Path(env.get("AUDIO_TEXT_FILE", defaults.audio_text_file)),
            audio_pcm_file=Path(env.get("AUDIO_PCM_FILE", defaults.audio_pcm_file)),
            audio_head_start_ms=int(env.get("AUDIO_HEAD_START_MS", defaults.audio_head_start_ms)),
            audio_source=env.get("AUDIO_SOURCE", defaults.audio_source).lower(),
            tts_engine=env.get("TTS_ENGINE", defaults.tts_engine).lower(),
            tts_base_url=env.get("TTS_BASE_URL", ""),
            tts_api_key=env.get("TTS_API_KEY", ""),
            tts_model=env.get("TTS_MODEL", defaults.tts_model),
            tts_voice=env.get("TTS_VOICE", ""),
            tts_sample_rate=int(env.get("TTS_SAMPLE_RATE", defaults.tts_sample_rate)),
            server_tools=_tool_names(env.get("SERVER_TOOLS")),
            tool_max_rounds=int(env.get("TOOL_MAX_ROUNDS", defaults.tool_max_rounds)),
            tool_bridge_ms=int(env.get("TOOL_BRIDGE_MS", defaults.tool_bridge_ms)),
            log_level=env.get("LOG_LEVEL", defaults.log_level).upper(),
        )


# ---------------------------------------------------------------------------------------------
# Request models: they document and validate the fields we act on. Every model allows extra keys,
# and the body is forwarded as the caller sent it, not as the model dumps it.
# ---------------------------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str
    detail: str | None = None


class InputAudio(_Open):
    data: str
    format: str


class ContentPart(_Open):
    """`text`, `image_url` (OpenAI's `{"url": ...}` or Agora's plain string), `image`, `input_audio`."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    input_audio: InputAudio | None = None


Content = Union[str, list[ContentPart]]


class SystemMessage(_Open):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Open):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None


class ToolMessage(_Open):
    role: Literal["tool", "function"]
    content: Content | None = None
    tool_call_id: str | None = None


Message = Annotated[
    Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")
]


class ToolFunction(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: str = "function"
    function: ToolFunction


class ChatCompletionRequest(_Open):
    """An OpenAI Chat Completions request as Agora's engine sends it (extra keys are kept)."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool | None = None  # missing means true: Agora always streams
    stream_options: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    # Added by Agora's engine (llm.vendor "custom"); read here, never sent upstream.
    turn_id: int | str | None = None
    timestamp: int | float | None = None
    interruptable: bool | None = None
    context: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Errors: one exception, rendered in OpenAI's shape as a status before the first byte and as an
# event after it.
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str, code: str | None = None, param: str | None = None,
                 retryable: bool = False, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retryable = retryable  # an upstream failure another attempt might not have
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error() -> ApiError:
    return ApiError(500, "The server failed to handle this request; the log has details.", "server_error", "internal_error")


def error_response(error: ApiError) -> Response:
    return Response(orjson.dumps(error.body()), status_code=error.status, media_type="application/json",
                    headers=error.headers)


async def send_error(send, error: ApiError) -> None:
    """Answer an ASGI request with an error, for middleware that runs before the app."""
    await error_response(error)({"type": "http"}, None, send)


# ---------------------------------------------------------------------------------------------
# Reading a request
# ---------------------------------------------------------------------------------------------


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read with a size cap so a huge body costs nothing."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.lower():
        raise ApiError(415, f"Send the body as application/json, not {content_type[:60]}.",
                       "invalid_request_error", "unsupported_media_type")
    too_large = ApiError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error", "body_too_large")
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
        raise ApiError(400, f"The body is not valid JSON: {error.msg}.", "invalid_request_error", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.", "invalid_request_error", "invalid_json")
    return body


def invalid_value(problem: dict[str, Any], location: tuple) -> ApiError:
    """A pydantic error as a 400 that names the field."""
    param = ".".join(str(part) for part in location) or None
    return ApiError(400, f"{param}: {problem['msg']}" if param else problem["msg"],
                    "invalid_request_error", "invalid_value", param)


def validate_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        raise invalid_value(first, first["loc"]) from None


def is_streaming(body: dict[str, Any]) -> bool:
    return body.get("stream") is not False


def upstream_body(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The body for the upstream: the caller's own, minus the engine's fields, plus defaults.

    Every other key, known to OpenAI or not (vLLM's top_k, Ollama's options...), is forwarded."""
    forwarded = {key: value for key, value in body.items() if key not in settings.strip_fields}
    forwarded["model"] = body.get("model") or settings.llm_model
    forwarded["stream"] = is_streaming(body)
    forwarded["messages"] = [_upstream_message(message) for message in body["messages"]]
    return forwarded


def _upstream_message(message: dict[str, Any]) -> dict[str, Any]:
    message = {key: value for key, value in message.items() if key not in MESSAGE_ENGINE_FIELDS}
    if isinstance(message.get("content"), list):
        message["content"] = [_openai_image_part(part) for part in message["content"]]
    return message


def _openai_image_part(part: dict[str, Any]) -> dict[str, Any]:
    """Agora's guide shows images as {"type": "image", "image_url": "<url>"}; OpenAI wants an object."""
    if part.get("type") in ("image", "image_url") and isinstance(part.get("image_url"), str):
        return {**part, "type": "image_url", "image_url": {"url": part["image_url"]}}
    return part


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""


def latest_question(messages: list[dict[str, Any]]) -> str:
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


# ---------------------------------------------------------------------------------------------
# The upstream LLM: one pooled client for the process, and the SSE relay
# ---------------------------------------------------------------------------------------------


class Upstream:
    """One OpenAI-compatible LLM endpoint (the primary or the fallback)."""

    def __init__(self, name: str, base_url: str, api_key: str, model: str, session: aiohttp.ClientSession):
        self.name, self.model, self.session = name, model, session
        base = base_url.rstrip("/")
        self.url, self.models_url = yarl.URL(base + "/chat/completions"), yarl.URL(base + "/models")  # parsed once
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    async def post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """The response, its status checked; failures become ApiErrors."""
        if self.model:  # the fallback may serve under another model name
            body = {**body, "model": self.model}
        with upstream_errors(self.name):
            response = await self.session.post(self.url, data=orjson.dumps(body), headers=self.headers)
            if response.status >= 400:
                try:
                    raise upstream_refusal(self.name, response.status, await response.read())
                finally:
                    response.release()
        return response

    async def probe(self) -> bool:
        """A cheap call that opens a pooled connection and tells whether the upstream answers."""
        try:
            async with self.session.get(self.models_url, headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=3)) as response:
                await response.read()
                return response.status < 500 and response.status not in (401, 403)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


class LLM:
    """The upstream LLM as the endpoints see it: one pooled session, the primary, a retry, the fallback.

    Until the first event arrives nothing has reached the caller, so a failed or slow call (no
    connection, 5xx, 429, no first event within LLM_FIRST_TOKEN_TIMEOUT) is tried once more after a
    short pause, then on the fallback when one is configured. After the first event nothing is
    retried: the caller would hear words twice."""

    RETRY_PAUSE = 0.2

    def __init__(self, settings: Settings):
        # The idle timeout is aiohttp's per-read timeout, so it also bounds each wait before the first event.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, connect=settings.llm_connect_timeout,
                                          sock_read=settings.llm_idle_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client has no cookies to keep
        )
        self.primary = Upstream("primary", settings.llm_base_url, settings.llm_api_key, "", self.session)
        self.fallback = None
        if settings.llm_fallback_base_url:
            self.fallback = Upstream("fallback", settings.llm_fallback_base_url, settings.llm_fallback_api_key,
                                     settings.llm_fallback_model, self.session)
        self.first_token_timeout = settings.llm_first_token_timeout
        self.max_streams = settings.max_upstream_streams
        self.streams = 0
        self.last_success = 0.0

    async def aclose(self) -> None:
        await self.session.close()

    def attempts(self) -> list[tuple[Upstream, float]]:
        attempts = [(self.primary, 0.0), (self.primary, self.RETRY_PAUSE)]
        return attempts + [(self.fallback, 0.0)] if self.fallback else attempts

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """One of MAX_UPSTREAM_STREAMS; past the cap, a quick 503 beats a slow queue."""
        if self.streams >= self.max_streams:
            raise ApiError(503, "The server is at capacity; try again shortly.", "server_error", "overloaded",
                           headers={"retry-after": "1"})
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    async def _with_retries(self, call):
        """call(upstream) on each attempt in turn until one succeeds or fails for good."""
        attempts = self.attempts()
        for n, (upstream, pause) in enumerate(attempts):
            await asyncio.sleep(pause)
            try:
                result = await call(upstream)
            except ApiError as error:
                metrics.UPSTREAM_ERRORS.labels(upstream.name, error.code or "error").inc()
                if not error.retryable or n == len(attempts) - 1:
                    raise
                again = attempts[n + 1][0] is upstream
                (metrics.RETRIES if again else metrics.FALLBACKS).inc()
                log.warning("upstream %s failed (%s); trying %s", upstream.name, error.code,
                            "again" if again else "the fallback")
                continue
            note(upstream=upstream.name)
            self.last_success = time.monotonic()
            return result

    async def _first_event(self, upstream: Upstream, body: dict[str, Any]):
        """An open response and its first batch of events, within the first-token timeout."""
        started = time.perf_counter()

        async def opened():
            response = await upstream.post(body)
            try:
                batches = sse_payloads(response)
                with upstream_errors(upstream.name):
                    first = await anext(batches, None)
                if first is None:
                    raise ApiError(502, "The upstream LLM sent an empty answer.", "upstream_error", "upstream_empty",
                                   retryable=True)
                return upstream.name, response, first, batches
            except BaseException:
                response.close()
                raise

        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation of a
            # barge-in that lands just as its work finishes, and the stream would run on unheard.
            async with asyncio.timeout(self.first_token_timeout):
                opened_response = await opened()
        except TimeoutError:
            log.warning("upstream %s sent nothing within %gs", upstream.name, self.first_token_timeout)
            raise ApiError(504, "The upstream LLM did not start answering in time.", "upstream_error",
                           "upstream_timeout", retryable=True) from None
        metrics.UPSTREAM_FIRST_EVENT.labels(upstream.name).observe(time.perf_counter() - started)
        return opened_response

    @asynccontextmanager
    async def stream(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """The answer's events, a batch per network read; leaving the block early closes the
        upstream connection, which is how an upstream learns to stop generating."""
        with self._slot():
            name, response, first, batches = await self._with_retries(lambda up: self._first_event(up, body))

            async def events() -> AsyncIterator[list[bytes]]:
                yield first
                with upstream_errors(name):
                    async for batch in batches:
                        yield batch

            try:
                yield events()
            except BaseException:
                response.close()  # half-read: drop the connection
                raise
            finally:
                response.release()

    async def complete(self, body: dict[str, Any]) -> bytes:
        """A non-streaming completion, as the upstream's JSON bytes."""

        async def call(upstream: Upstream) -> bytes:
            response = await upstream.post(body)
            try:
                with upstream_errors(upstream.name):
                    return await response.read()
            finally:
                response.release()

        with self._slot():
            return await self._with_retries(call)

    async def ready(self) -> bool:
        """Answered in the last minute, or answers a probe now."""
        if time.monotonic() - self.last_success < 60:
            return True
        if await self.primary.probe():
            self.last_success = time.monotonic()
            return True
        return False


@contextmanager
def upstream_errors(name: str) -> Iterator[None]:
    """Turn network failures into the error a caller can act on; the details go to the log."""
    try:
        yield
    except asyncio.TimeoutError as error:
        log.warning("upstream %s timed out: %s", name, type(error).__name__)
        raise ApiError(504, "The upstream LLM stopped sending.", "upstream_error", "upstream_timeout",
                       retryable=True) from None
    except aiohttp.ClientError as error:
        log.warning("upstream %s connection failed: %s: %s", name, type(error).__name__, error)
        raise ApiError(502, "The upstream LLM could not be reached.", "upstream_error", "upstream_unreachable",
                       retryable=True) from None


def upstream_refusal(name: str, status: int, content: bytes) -> ApiError:
    try:
        detail = orjson.loads(content).get("error") or {}
        detail = detail if isinstance(detail, dict) else {"message": str(detail)}
    except (orjson.JSONDecodeError, AttributeError):
        detail = {}
    if status in (401, 403):
        # The caller's key was fine; ours was not. The upstream's message may quote our key, so it
        # reaches neither the caller nor the log.
        log.warning("upstream %s rejected this server's credentials (%d)", name, status)
        return ApiError(502, "The upstream LLM rejected this server's credentials (check LLM_API_KEY).",
                        "upstream_error", "upstream_auth_failed")
    log.warning("upstream %s answered %d: %.300s", name, status, detail.get("message") or content[:300])
    if status >= 500:
        return ApiError(502, f"The upstream LLM failed (status {status}).", "upstream_error", "upstream_failed",
                        retryable=True)
    message = detail.get("message")
    return ApiError(
        status,
        message[:500] if isinstance(message, str) and message else f"The upstream LLM refused the request (status {status}).",
        detail.get("type") if isinstance(detail.get("type"), str) else "invalid_request_error",
        detail.get("code") if isinstance(detail.get("code"), str) else None,
        retryable=status == 429,
    )


async def sse_payloads(response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The data payloads of the upstream's events, a list per network read, until `[DONE]`.

    Events are split on blank lines and passed on as bytes; JSON is never parsed here."""
    pending = b""
    pieces = response.content.iter_any()
    async for piece in pieces:
        pending += piece
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")
        *blocks, pending = pending.split(b"\n\n")
        payloads, done = _payloads(blocks)
        if payloads:
            yield payloads
        if done:
            # Read to the end of the body (normally just the closing chunk): a response left
            # half-read cannot go back to the pool, and the next request would pay a new connection.
            async for _ in pieces:
                pass
            return
    payloads, done = _payloads([pending])
    if payloads:
        yield payloads
    if not done:
        log.warning("upstream stream ended without [DONE]")


def _payloads(blocks: list[bytes]) -> tuple[list[bytes], bool]:
    payloads = []
    for block in blocks:
        if block.startswith(b"data: ") and b"\n" not in block:
            payload = block[6:]  # the common case: one data line
        else:
            payload = b"\n".join(line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
        if payload == b"[DONE]":
            return payloads, True
        if payload:
            payloads.append(payload)
    return payloads, False


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def relay(llm: LLM, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The upstream's stream as SSE bytes, event for event."""
    async with llm.stream(body) as batches:
        async for payloads in batches:
            yield b"".join(map(sse, payloads))


def chunk(completion_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    """One `chat.completion.chunk` event of our own (waiting phrase, audio)."""
    return sse(orjson.dumps({
        "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# Tools: the server's own run here between rounds; calls to the caller's tools stream back to it
# ---------------------------------------------------------------------------------------------

BRIDGE_EN = ("One moment.", "Just a second.")
BRIDGE_ZH = ("稍等一下。", "马上就好。")


def caller_tool_names(body: dict[str, Any]) -> set[str]:
    return {(tool.get("function") or {}).get("name") for tool in body.get("tools") or []}


def offered_tools(body: dict[str, Any], tools: ToolRegistry) -> list[dict[str, Any]]:
    """The server's tools to offer beside the caller's (a caller's tool of the same name wins)."""
    if body.get("tool_choice") == "none":
        return []
    taken = caller_tool_names(body)
    return [schema for schema in tools.schemas() if schema["function"]["name"] not in taken]


def with_tools(body: dict[str, Any], messages: list[dict[str, Any]], offered: list[dict[str, Any]]) -> dict[str, Any]:
    request = {**body, "messages": messages}
    every_tool = [*(body.get("tools") or []), *offered]
    if every_tool:
        request["tools"] = every_tool
    else:  # the last round offers no server tool, and the caller had none
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            request.pop(key, None)
    return request


class ToolCalls:
    """The tool-call deltas of one streamed round, assembled by index and sorted by owner.

    Calls to the caller's tools pass on, renumbered from 0; the rest are the server's to run (an
    unknown name included: it gets an error result the model can recover from)."""

    def __init__(self, caller_tools: set[str]):
        self.caller_tools = caller_tools
        self.calls: list[dict[str, Any]] = []
        self.by_index: dict[int, dict[str, Any]] = {}
        self.for_caller = 0

    def route(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record the deltas; return the caller's, renumbered."""
        forward = []
        for delta in deltas:
            function = delta.get("function") or {}
            call = self.by_index.get(delta.get("index", 0))
            # Some providers put every call on index 0; a new id means a new call.
            if call is None or (delta.get("id") and delta["id"] != call["id"]):
                name = function.get("name") or ""
                call = {"id": delta.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": name, "arguments": ""}, "owner": "server"}
                if name in self.caller_tools:
                    call["owner"], call["index"] = "caller", self.for_caller
                    self.for_caller += 1
                self.by_index[delta.get("index", 0)] = call
                self.calls.append(call)
            call["function"]["arguments"] += function.get("arguments") or ""
            if call["owner"] == "caller":
                forward.append({**delta, "index": call["index"]})
        return forward

    def server_calls(self) -> list[dict[str, Any]]:
        return [{key: c[key] for key in ("id", "type", "function")} for c in self.calls if c["owner"] == "server"]


def tool_call_event(payload: bytes) -> dict[str, Any] | None:
    """The event parsed if it carries tool calls, else None (the common case: one byte search)."""
    if b'"tool_calls"' not in payload:
        return None
    try:
        event = orjson.loads(payload)
        return event if isinstance(event["choices"][0], dict) else None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None  # not ours to judge: relayed as it came


def without_tool_calls(chunk: dict[str, Any], forward: list[dict[str, Any]]) -> bytes:
    """The chunk with only the caller's tool-call deltas left in it."""
    choice = chunk["choices"][0]
    delta = {key: value for key, value in (choice.get("delta") or {}).items() if key != "tool_calls"}
    if forward:
        delta["tool_calls"] = forward
    return orjson.dumps({**chunk, "choices": [{**choice, "delta": delta}, *chunk["choices"][1:]]})


def round_text(payloads: list[bytes]) -> str:
    """The text the model said in a round, read back from the events already relayed."""
    text = []
    for payload in payloads:
        try:
            text.append(orjson.loads(payload)["choices"][0]["delta"].get("content") or "")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            pass
    return "".join(text)


async def run_calls(tools: ToolRegistry, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every call at once; their results as `tool` messages, in the calls' order."""
    results = await asyncio.gather(*(tools.run(c["function"]["name"], c["function"]["arguments"]) for c in calls))
    return [{"role": "tool", "tool_call_id": c["id"], "content": result} for c, result in zip(calls, results)]


async def answer(llm: LLM, body: dict[str, Any], tools: ToolRegistry, settings: Settings) -> AsyncIterator[bytes]:
    """The upstream's answer as SSE, running the server's tool calls between rounds.

    Events without tool calls are relayed as they arrive, untouched. A round whose calls are all
    the server's is run here (in parallel) and the model is called again, up to TOOL_MAX_ROUNDS,
    then once more without server tools so the caller always gets an answer. A round with any call
    to the caller's tools ends the response with those calls (finish_reason "tool_calls"); the
    server's calls of that round are not run, so the model asks again once the caller's results
    are in, and no call is lost or run twice."""
    offered = offered_tools(body, tools)
    if not offered:
        async for data in relay(llm, body):
            yield data
        return
    caller_tools = caller_tool_names(body)
    messages = list(body["messages"])
    bridged = False
    for round_number in range(settings.tool_max_rounds + 1):
        last = round_number == settings.tool_max_rounds
        calls, relayed, finish = ToolCalls(caller_tools), [], None
        async with llm.stream(with_tools(body, messages, [] if last else offered)) as batches:
            async for payloads in batches:
                out = []
                for payload in payloads:
                    event = tool_call_event(payload)
                    if event is None:
                        relayed.append(payload)
                        out.append(payload)
                        continue
                    choice = event["choices"][0]
                    forward = calls.route((choice.get("delta") or {}).get("tool_calls") or [])
                    if choice.get("finish_reason") == "tool_calls":
                        finish = (event, forward)  # its fate depends on the whole round
                    elif forward or (choice.get("delta") or {}).get("content"):
                        out.append(without_tool_calls(event, forward))
                if out:
                    yield b"".join(map(sse, out))
        server_calls = calls.server_calls()
        if last or not server_calls or calls.for_caller:
            if finish is not None:
                yield sse(without_tool_calls(*finish))
            return
        messages += [{"role": "assistant", "content": round_text(relayed) or None, "tool_calls": server_calls}]
        results = asyncio.ensure_future(run_calls(tools, server_calls))
        try:
            if not bridged and not (await asyncio.wait({results}, timeout=settings.tool_bridge_ms / 1000))[0]:
                bridged = True  # the tools are slow: say something so the line is not silent
                phrases = BRIDGE_ZH if _CJK.search(latest_question(messages)) else BRIDGE_EN
                yield chunk(completion_id(), body["model"], {"role": "assistant", "content": random.choice(phrases) + " "})
            messages += await results
        finally:
            results.cancel()  # a barge-in while tools run cancels them


async def complete(llm: LLM, body: dict[str, Any], tools: ToolRegistry, settings: Settings) -> bytes:
    """The non-streaming twin of answer(): the same rounds, one JSON completion at the end."""
    offered = offered_tools(body, tools)
    if not offered:
        return await llm.complete(body)
    caller_tools = caller_tool_names(body)
    messages = list(body["messages"])
    for round_number in range(settings.tool_max_rounds + 1):
        last = round_number == settings.tool_max_rounds
        completion = await llm.complete(with_tools(body, messages, [] if last else offered))
        try:
            completion = orjson.loads(completion)
            message = completion["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            mine = [c for c in calls if c["function"]["name"] not in caller_tools]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise ApiError(502, "The upstream LLM sent an answer this server cannot read.", "upstream_error",
                           "upstream_invalid_response") from None
        if last or not mine or len(mine) < len(calls):
            if mine:  # a mixed round: the caller gets its own calls; the model asks for ours again
                message["tool_calls"] = [c for c in calls if c not in mine] or None
            return orjson.dumps(completion)
        messages += [message, *await run_calls(tools, mine)]
    raise AssertionError("unreachable: the last round always returns")


# ---------------------------------------------------------------------------------------------
# Responses that stop their work the moment the caller hangs up (a barge-in)
# ---------------------------------------------------------------------------------------------

DONE = b"data: [DONE]\n\n"
SHUTTING_DOWN = ApiError(503, "The server is shutting down; this answer was cut short.", "server_error", "shutting_down")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx and friends not to hold events back
]


class CancelOnDisconnect(Response):
    """A response whose work runs beside a watch on the connection; a disconnect cancels the work.

    Starlette only watches for disconnects on some ASGI servers and versions, and a barge-in must
    stop the upstream at once, so the watch is ours."""

    def __init__(self) -> None:
        self.background = None
        self.status_code = 200

    hung_up = False

    async def __call__(self, scope, receive, send) -> None:
        work = asyncio.current_task()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.hung_up = True
            work.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.respond(send)
        except asyncio.CancelledError:
            if not self.hung_up:
                raise  # a cancellation that is not ours (server shutdown) goes on
            work.uncancel()
        finally:
            watcher.cancel()
        scope.setdefault("state", {})["cancelled"] = self.hung_up

    async def respond(self, send) -> None:
        raise NotImplementedError


class EventStream(CancelOnDisconnect):
    """SSE that always ends with `[DONE]`.

    Headers go out with the first event, so an error before it (say the upstream refused) is a
    plain HTTP error in OpenAI's shape; an error after it is one error event, then `[DONE]`."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__()
        self.events = events

    async def respond(self, send) -> None:
        started = False

        async def emit(data: bytes, more: bool = True) -> None:
            nonlocal started
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": more})

        try:
            async for data in self.events:
                await emit(data)
        except asyncio.CancelledError:
            if started and not self.hung_up:  # the server is shutting down: close the stream properly
                await emit(sse(orjson.dumps(SHUTTING_DOWN.body())))
                await emit(DONE, more=False)
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
            await asyncio.shield(self.events.aclose())  # closes the upstream even when cancelled mid-send
        await emit(DONE, more=False)


class JSONReply(CancelOnDisconnect):
    """A JSON answer computed under the disconnect watch (non-streaming calls)."""

    def __init__(self, work):
        super().__init__()
        self.work = work

    async def respond(self, send) -> None:
        try:
            body = await self.work
        except ApiError as error:
            response = error_response(error)
        else:
            response = Response(body, media_type="application/json")
        await response({"type": "http"}, None, send)


# ---------------------------------------------------------------------------------------------
# /rag: waiting phrase, retrieval, context injection
# ---------------------------------------------------------------------------------------------

def waiting_phrase(settings: Settings, question: str) -> str:
    language = "zh" if _CJK.search(question) else "en"
    phrase = random.choice(settings.waiting_messages[language])
    return phrase + ("" if language == "zh" else " ")  # a sentence of its own for the TTS


def with_passages(messages: list[dict[str, Any]], passages: list[Passage]) -> list[dict[str, Any]]:
    """The messages with the passages as a system message after the caller's own system messages."""
    if not passages:
        return messages
    sources = "\n\n".join(f"[{i}] {p.citation()}\n{p.text}" for i, p in enumerate(passages, 1))
    context = {
        "role": "system",
        "content": "Answer the user's question from these knowledge-base passages. Mention a source "
                   "when it helps. If the passages do not cover the question, say you don't know "
                   "rather than guessing.\n\n" + sources,
    }
    lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), len(messages))
    return [*messages[:lead], context, *messages[lead:]]


_FOLLOW_UP = re.compile(r"^(and|but|so|or|also|then|what about|how about)\b|\b(it|its|that|this|they|them|those|"
                        r"these|there|one)\b|^(那|还有|那么|它|这个|那个|另外)", re.I)


def search_query(messages: list[dict[str, Any]]) -> str:
    """The latest question, plus the one before when it is a follow-up ("and how much is it?")."""
    questions = [message_text(m) for m in messages if m.get("role") == "user"]
    latest = questions[-1] if questions else ""
    short = len(latest.split()) <= 3 if not _CJK.search(latest) else len(latest) <= 8
    if len(questions) > 1 and (short or _FOLLOW_UP.search(latest.strip())):
        return f"{questions[-2]} {latest}"
    return latest


async def find_passages(settings: Settings, kb: KnowledgeBase, embeddings: Embeddings | None,
                        query: str) -> list[Passage]:
    vector = None
    if embeddings is not None:
        try:
            vector = (await embeddings.embed([query]))[0]
        except Exception as error:  # the embeddings upstream failing costs this query its hybrid half only
            log.warning("query embedding failed (%s: %s); searching with BM25 alone", type(error).__name__, error)
    return await asyncio.to_thread(kb.search, query, settings.rag_top_k, vector)


async def retrieve(settings: Settings, kb: KnowledgeBase, embeddings: Embeddings | None,
                   body: dict[str, Any]) -> dict[str, Any]:
    """The body with the knowledge base's passages injected; past RAG_DEADLINE_MS (embedding the
    question included), without them."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(settings.rag_deadline_ms / 1000):  # not wait_for: see LLM._first_event
            passages = await find_passages(settings, kb, embeddings, search_query(body["messages"]))
    except TimeoutError:
        log.warning("retrieval passed its %d ms deadline; answering without passages", settings.rag_deadline_ms)
        passages = []
    metrics.RETRIEVAL.observe(time.perf_counter() - started)
    return {**body, "messages": with_passages(body["messages"], passages)}


async def rag_events(settings: Settings, llm: LLM, kb: KnowledgeBase, embeddings: Embeddings | None,
                     tools: ToolRegistry, body: dict[str, Any]) -> AsyncIterator[bytes]:
    # The waiting phrase goes out before any retrieval work, so the line is never silent.
    phrase = waiting_phrase(settings, latest_question(body["messages"]))
    yield chunk(completion_id(), body["model"], {"role": "assistant", "content": phrase})
    async for data in answer(llm, await retrieve(settings, kb, embeddings, body), tools, settings):
        yield data


# ---------------------------------------------------------------------------------------------
# /audio: a transcript and 16 kHz mono s16le PCM in 40 ms chunks, paced close to real time.
# Three sources: two files (the default), the model's answer spoken by a TTS engine (AUDIO_SOURCE
# "tts"), or the upstream's own audio when the request asks for it (modalities with "audio").
# ---------------------------------------------------------------------------------------------


def simulated_audio() -> tuple[str, bytes]:
    """A spoken-answer stand-in when the audio files are missing: a soft one-second tone."""
    rate = speech.SAMPLE_RATE
    samples = (int(3000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(rate))
    return "This is a simulated audio answer.", struct.pack(f"<{rate}h", *samples)


async def load_audio(settings: Settings) -> tuple[str, bytes]:
    def read() -> tuple[str, bytes]:
        return settings.audio_text_file.read_text(encoding="utf-8").strip(), settings.audio_pcm_file.read_bytes()

    try:
        text, pcm = await asyncio.to_thread(read)
    except (OSError, UnicodeDecodeError) as error:
        log.warning("audio files unavailable (%s); sending a simulated answer", error)
        return simulated_audio()
    return text, pcm[: len(pcm) // 2 * 2]  # whole 16-bit samples only


class AudioChunks:
    """The chunk shapes of one audio answer: every piece under one audio id."""

    def __init__(self, model: str):
        self.model, self.id, self.audio_id, self.first = model, completion_id(), f"audio_{uuid.uuid4().hex}", True

    def _chunk(self, audio: dict[str, Any]) -> bytes:
        delta = {"audio": {"id": self.audio_id, **audio}}
        if self.first:
            delta, self.first = {"role": "assistant", **delta}, False
        return chunk(self.id, self.model, delta)

    def transcript(self, text: str) -> bytes:
        return self._chunk({"transcript": text})

    def data(self, pcm: bytes) -> bytes:
        return self._chunk({"data": base64.b64encode(pcm).decode()})

    def stop(self) -> bytes:
        return chunk(self.id, self.model, {}, "stop")


async def file_events(settings: Settings, model: str, head_start_ms: int) -> AsyncIterator[bytes]:
    text, pcm = await load_audio(settings)
    out, pacer = AudioChunks(model), speech.Pacer(head_start_ms)
    # The transcript comes first: it is what the engine stores as the agent's words.
    yield out.transcript(text)
    for offset in range(0, len(pcm), speech.CHUNK_BYTES):
        await pacer.wait()
        yield out.data(pcm[offset: offset + speech.CHUNK_BYTES])
    yield out.stop()


def spoken_separator(text: str) -> str:
    """What joins this segment's transcript to the next: a space, except after Chinese or Japanese."""
    return "" if _CJK.search(text[-1:]) else " "


async def text_deltas(events: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The text of an answer's SSE events (tool rounds and bridge phrases included)."""
    async for data in events:
        for block in data.split(b"\n\n"):
            if not block.startswith(b"data: {"):
                continue
            event = orjson.loads(block[6:])
            if isinstance(event.get("error"), dict):
                raise ApiError(502, str(event["error"].get("message", "The upstream LLM failed."))[:300],
                               "upstream_error", "upstream_failed")
            content = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
            if content:
                yield content


async def one(text: str) -> AsyncIterator[str]:
    yield text


async def spoken_events(said: AsyncIterator[speech.Said], model: str) -> AsyncIterator[bytes]:
    out = AudioChunks(model)
    try:
        async for step in said:
            if step.transcript is not None:
                yield out.transcript(step.transcript + spoken_separator(step.transcript))
            else:
                yield out.data(step.audio)
    except speech.SpeechError as error:
        log.warning("speech failed before any audio: %s", error)
        raise ApiError(502, "The speech service failed.", "upstream_error", "speech_failed") from None
    yield out.stop()


async def upstream_audio_events(llm: "LLM", body: dict[str, Any], head_start_ms: int) -> AsyncIterator[bytes]:
    """The upstream's own audio (gpt-4o-audio style: base64 pcm16 at 24 kHz), converted, not re-synthesized."""
    out, pacer = AudioChunks(body["model"]), speech.Pacer(head_start_ms)
    resample, framer = speech.Resampler(24_000), speech.Framer()
    async with llm.stream(body) as batches:
        async for payloads in batches:
            for payload in payloads:
                event = orjson.loads(payload)
                audio = ((event.get("choices") or [{}])[0].get("delta") or {}).get("audio") or {}
                if audio.get("transcript"):
                    yield out.transcript(audio["transcript"])
                for frame in framer.push(resample(base64.b64decode(audio.get("data") or ""))):
                    await pacer.wait()
                    yield out.data(frame)
    for frame in framer.push(resample(b"", last=True)) + framer.flush():
        await pacer.wait()
        yield out.data(frame)
    yield out.stop()


async def audio_completion(events: AsyncIterator[bytes], model: str) -> bytes:
    """The non-streaming answer: one message.audio with all the data and the whole transcript."""
    transcript, pcm = [], []
    async for data in events:
        audio = orjson.loads(data[6:])["choices"][0]["delta"].get("audio") or {}
        transcript.append(audio.get("transcript") or "")
        pcm.append(base64.b64decode(audio.get("data") or ""))
    return orjson.dumps({
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": None,
            "audio": {"id": f"audio_{uuid.uuid4().hex}", "data": base64.b64encode(b"".join(pcm)).decode(),
                      "transcript": "".join(transcript).strip(), "expires_at": int(time.time()) + 3600},
        }}],
    })


def speech_engine(settings: Settings, session: aiohttp.ClientSession) -> speech.Engine:
    if settings.tts_engine == "espeak":
        return speech.EspeakSpeech(voice=settings.tts_voice or "en-us")
    return speech.OpenAISpeech(session, settings.tts_base_url or settings.llm_base_url,
                               settings.tts_api_key or settings.llm_api_key, settings.tts_model,
                               settings.tts_voice or "alloy", settings.tts_sample_rate)


# ---------------------------------------------------------------------------------------------
# Middleware (pure ASGI: BaseHTTPMiddleware would buffer and slow the streams)
# ---------------------------------------------------------------------------------------------

request_state: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("request_state")


def note(**facts: Any) -> None:
    """Record facts about the current request (which upstream served it...) for its log line."""
    state = request_state.get(None)
    if state is not None:
        state.update(facts)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_state.get({}).get("request_id", "-")
        return True


class BearerAuth:
    """Rejects a request without a valid `Authorization: Bearer <key>` before it reaches any endpoint,
    and holds each key to MAX_STREAMS_PER_KEY requests at once."""

    PUBLIC = {"/health", "/ready"}

    def __init__(self, app, keys: tuple[str, ...], max_per_key: int):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.max_per_key = max_per_key
        self.in_flight = [0] * len(keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.PUBLIC:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return await send_error(send, ApiError(
                401, "Missing API key: send it as 'Authorization: Bearer <key>'.", "authentication_error", "missing_api_key"))
        token, match = token.strip(), -1
        for n, key in enumerate(self.keys):  # every key compared, in constant time
            if hmac.compare_digest(token, key):
                match = n
        if match < 0:
            return await send_error(send, ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key"))
        if self.max_per_key and self.in_flight[match] >= self.max_per_key:
            return await send_error(send, ApiError(
                429, f"This key already has {self.max_per_key} requests in flight.", "rate_limit_error",
                "too_many_concurrent_requests", headers={"retry-after": "1"}))
        self.in_flight[match] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[match] -= 1


class RequestLog:
    """One log line and the metrics per request, and its id in `x-request-id`.

    Message contents are never logged here."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = rid = uuid.uuid4().hex[:16]
        token = request_state.set(state)
        endpoint = metrics.endpoint(scope["path"])
        metrics.IN_FLIGHT.labels(endpoint).inc()
        started = time.perf_counter()
        status, first_byte, chunks = 0, None, 0

        async def logged_send(message) -> None:
            nonlocal status, first_byte, chunks
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
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
            cancelled = state.get("cancelled", False)
            metrics.IN_FLIGHT.labels(endpoint).dec()
            metrics.REQUESTS.labels(endpoint, str(status or 499)).inc()
            metrics.DURATION.labels(endpoint).observe(ended - started)
            if first_byte:
                metrics.FIRST_BYTE.labels(endpoint).observe(first_byte - started)
            if cancelled:
                metrics.CANCELLED.labels(endpoint).inc()
            ms = lambda t: f"{(t - started) * 1000:.1f}" if t else "-"  # noqa: E731
            log.info(
                "request path=%s status=%s model=%s turn=%s upstream=%s ttfb_ms=%s total_ms=%s chunks=%d cancelled=%s",
                scope["path"], status or "-", state.get("model", "-"), state.get("turn_id", "-"),
                state.get("upstream", "-"), ms(first_byte), ms(ended), chunks, str(cancelled).lower(),
            )
            request_state.reset(token)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

CHAT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


async def index_knowledge(knowledge: KnowledgeBase, embeddings: Embeddings | None) -> None:
    """Index the folder (only what changed), then embed the new chunks for hybrid search."""
    await asyncio.to_thread(knowledge.index, ready_after=embeddings is None)
    if embeddings is not None:
        try:
            log.info("knowledge: %d chunks embedded", await knowledge.embed(embeddings))
        except Exception as error:
            log.warning("embedding the knowledge base failed (%s: %s); searching with BM25 alone",
                        type(error).__name__, error)
        knowledge.loaded = True


def create_app(settings: Settings | None = None, tools: ToolRegistry | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if settings.allow_unauthenticated and not settings.api_keys:
        log.warning("ALLOW_UNAUTHENTICATED is set: anyone who can reach this server can use it")
    for name, value, allowed in (("AUDIO_SOURCE", settings.audio_source, ("files", "tts")),
                                 ("TTS_ENGINE", settings.tts_engine, ("openai", "espeak"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    knowledge = KnowledgeBase(settings.knowledge_dir, settings.knowledge_index or None, settings.rag_min_score)
    tools = (tools or sample_tools(knowledge)).select(settings.server_tools)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.llm = LLM(settings)
        app.state.knowledge = knowledge
        app.state.tools = tools
        app.state.embeddings = None
        if settings.embedding_model:
            app.state.embeddings = Embeddings(app.state.llm.session, settings.embedding_base_url or settings.llm_base_url,
                                              settings.embedding_api_key or settings.llm_api_key, settings.embedding_model)
        # Indexing runs beside the requests: searches see what is indexed so far, /ready waits for all.
        indexing = asyncio.ensure_future(index_knowledge(knowledge, app.state.embeddings))
        if settings.upstream_configured and not await app.state.llm.primary.probe():
            log.warning("the upstream LLM at %s does not answer yet", settings.llm_base_url)
        # The probe left a warm connection in the pool, so the first caller skips the handshake.
        # Everything made at start lives as long as the process: keep it out of the garbage
        # collector's full passes, which otherwise pause every stream now and then.
        gc.freeze()
        yield
        await indexing
        await app.state.llm.aclose()

    app = FastAPI(title="Custom LLM server for Agora", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)

    async def chat_request(request: Request) -> dict[str, Any]:
        """The validated body, ready for the upstream; the engine's fields are kept on request.state."""
        body = await read_json_body(request, settings.max_body_bytes)
        validate_chat_request(body)
        if len(body["messages"]) > settings.max_messages:
            raise ApiError(400, f"messages: at most {settings.max_messages} messages are accepted.",
                           "invalid_request_error", "too_many_messages", "messages")
        request.state.model = body.get("model") or settings.llm_model
        request.state.turn_id = body.get("turn_id", "-")
        request.state.engine = {key: body[key] for key in settings.strip_fields if key in body}
        return body

    def require_upstream() -> LLM:
        if not settings.upstream_configured:
            raise ApiError(503, "No upstream LLM is configured: set LLM_API_KEY (and LLM_BASE_URL for "
                                "a provider other than OpenAI).", "server_error", "no_upstream")
        return app.state.llm

    @app.post("/chat/completions", openapi_extra=CHAT_BODY)
    async def chat_completions(request: Request) -> Response:
        """Relays the upstream LLM's answer as it arrives."""
        body = upstream_body(await chat_request(request), settings)
        upstream = require_upstream()
        if body["stream"]:
            return EventStream(answer(upstream, body, tools, settings))
        return JSONReply(complete(upstream, body, tools, settings))

    @app.post("/rag/chat/completions", openapi_extra=CHAT_BODY)
    async def rag_chat_completions(request: Request) -> Response:
        """A waiting phrase, then the answer grounded in the knowledge base."""
        body = upstream_body(await chat_request(request), settings)
        upstream = require_upstream()
        if body["stream"]:
            return EventStream(rag_events(settings, upstream, knowledge, app.state.embeddings, tools, body))
        return JSONReply(complete(upstream, await retrieve(settings, knowledge, app.state.embeddings, body), tools, settings))

    @app.post("/audio/chat/completions", openapi_extra=CHAT_BODY)
    async def audio_chat_completions(request: Request) -> Response:
        """The answer as a transcript and 16 kHz mono PCM, from files, a TTS engine or the upstream."""
        body = await chat_request(request)
        # Paced at real time when streaming; a non-streaming answer is wanted all at once.
        head_start = settings.audio_head_start_ms if is_streaming(body) else 10**9
        if settings.audio_source == "files" and "audio" not in (body.get("modalities") or []):
            events = file_events(settings, request.state.model, head_start)
        else:
            body = upstream_body(body, settings)
            if body["messages"][-1].get("role") == "assistant":
                # Agora's greeting, failure message, silence prompt or /speak: say it as written.
                texts = speech.segments(one(message_text(body["messages"][-1])))
            elif "audio" in (body.get("modalities") or []):
                texts = None
                events = upstream_audio_events(require_upstream(), {**body, "stream": True}, head_start)
            else:
                texts = speech.segments(text_deltas(answer(require_upstream(), {**body, "stream": True}, tools, settings)))
            if texts is not None:
                engine = speech_engine(settings, app.state.llm.session)
                events = spoken_events(speech.speak(texts, engine, head_start), body["model"])
        if is_streaming(body):
            return EventStream(events)
        return JSONReply(audio_completion(events, request.state.model))

    @app.get("/knowledge/search")
    async def knowledge_search(q: str, limit: int = 5) -> dict[str, Any]:
        """What a question retrieves from the knowledge base (the passages /rag would inject)."""
        query = q[:2000]
        passages = await find_passages(dataclasses.replace(settings, rag_top_k=max(1, min(limit, 50))), knowledge,
                                       app.state.embeddings, query)
        return {"query": query, "passages": [p.as_dict() for p in passages]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness for load balancers; needs no key."""
        return {"status": "ok", "version": __version__}

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the knowledge base is indexed and the upstream LLM answers; needs no key."""
        problems = []
        if not knowledge.loaded:
            problems.append("the knowledge base is not indexed yet")
        if not settings.upstream_configured:
            problems.append("no upstream LLM is configured")
        elif not await app.state.llm.ready():
            problems.append("the upstream LLM does not answer")
        body = {"status": "unavailable", "problems": problems} if problems else {"status": "ready"}
        return Response(orjson.dumps(body), status_code=503 if problems else 200, media_type="application/json")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics, summed over worker processes."""
        metrics.TASKS.set(len(asyncio.all_tasks()))
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_parameters(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0]
        return error_response(invalid_value(first, first["loc"][1:]))  # loc[0] is "query", "path"...

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        messages = {404: f"No such endpoint: {request.method} {request.url.path[:100]}.",
                    405: f"{request.method} is not allowed on {request.url.path[:100]}."}
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(ApiError(error.status_code, messages.get(error.status_code, str(error.detail)),
                                       "invalid_request_error", codes.get(error.status_code)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return error_response(internal_error())

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, definitions = models_json_schema([(ChatCompletionRequest, "validation")],
                                                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BearerAuth, keys=settings.api_keys, max_per_key=settings.max_streams_per_key)
    app.add_middleware(RequestLog)
    return app


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main() -> None:
    import tempfile

    import uvicorn

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False,
                   timeout_graceful_shutdown=settings.shutdown_grace_seconds)
    if settings.workers <= 1:
        return uvicorn.run(create_app(settings), **options)
    # Worker processes read their settings anew: hand them the same key and a shared metrics folder.
    os.environ.setdefault("CUSTOM_LLM_API_KEY", ",".join(settings.api_keys))
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="custom-llm-metrics-"))
    uvicorn.run("custom_llm:create_app", factory=True, workers=settings.workers, **options)


if __name__ == "__main__":
    main()
