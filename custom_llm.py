"""A custom LLM server for Agora's Conversational AI Engine: the entry point.

The engine POSTs an OpenAI Chat Completions request to this server; the server answers the way
OpenAI does, streaming over server-sent events:

    /chat/completions        relays any OpenAI-compatible LLM, event by event, as it arrives
    /rag/chat/completions    a waiting phrase first, then an answer grounded in ./knowledge
    /audio/chat/completions  a transcript and 16 kHz mono PCM for a custom voice

Read top to bottom: the settings, the request models, the routes, the app, the entry point.
Each capability lives in a module of its own, named for it: upstream.py (the LLM client),
serving.py (errors, SSE, auth, the request log), answer.py (the tool loop), events.py (what an
answer is made of), knowledge.py (retrieval and /rag), tools.py, speech.py (the voice), text.py,
metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import orjson
from dotenv import load_dotenv
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import Response

import metrics
import speech
from agora import AGENT_ID, ENGINE_FIELDS, UID, AgoraREST, BasicAuth, Hangups, TokenAuth, end_call_tool, for_upstream
from answer import ToolLoop, answer, complete
from context import Context
from embeddings import BUILTIN, BuiltinModel, Embedder, HostedModel
from errors import ApiError, bad_request
from events import Event, Note
from lateness import phrase_for, said_when_late
from outbound import Slots
from rag import NoKnowledge, Retriever, has_documents, retrieve, with_passages
from serving import (
    BearerAuth,
    BytesStream,
    EventStream,
    GuardedHttpTools,
    JSONReply,
    RequestLog,
    add_error_handlers,
    configure_logging,
    openapi_with,
    read_json_body,
    validated,
)
from text import latest_question, message_text
from tools import ToolRegistry, sample_tools
from upstream import LLM, Endpoint, Limits
from wording import FAREWELLS, WAITING_PHRASES

if TYPE_CHECKING:  # imported where it is made: a server with no documents never loads it
    from knowledge import Knowledge

__version__ = "0.2.0"

HERE = Path(__file__).resolve().parent
log = logging.getLogger("custom_llm")

# ---------------------------------------------------------------------------------------------
# Settings: read once from the environment and .env, validated once, here
# ---------------------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _list(value: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(sep) if part.strip())


def _phrases(value: str) -> tuple[str, ...]:
    return _list(value, "|")


def _bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _tool_names(value: str) -> tuple[str, ...] | None:
    if value.strip().lower() == "all":
        return None
    return () if value.strip().lower() == "none" else _list(value)


def setting(env: str, default: Any, parse: Callable[[str], Any] = str) -> Any:
    """A field read from the environment variable `env`; an empty or missing variable keeps the default."""
    return field(default=default, metadata={"env": env, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from the environment (and .env); see .env.example."""

    llm_api_key: str = setting("LLM_API_KEY", "")
    llm_base_url: str = setting("LLM_BASE_URL", DEFAULT_BASE_URL)
    llm_model: str = setting("LLM_MODEL", "gpt-4o-mini")
    llm_connect_timeout: float = setting("LLM_CONNECT_TIMEOUT", 3.0, float)
    llm_first_token_timeout: float = setting("LLM_FIRST_TOKEN_TIMEOUT", 8.0, float)
    llm_idle_timeout: float = setting("LLM_IDLE_TIMEOUT", 15.0, float)
    llm_max_stream_seconds: float = setting("LLM_MAX_STREAM_SECONDS", 300.0, float)
    llm_max_event_bytes: int = setting("LLM_MAX_EVENT_BYTES", 1 << 20, int)
    llm_max_response_bytes: int = setting("LLM_MAX_RESPONSE_BYTES", 32 << 20, int)
    llm_fallback_base_url: str = setting("LLM_FALLBACK_BASE_URL", "")
    llm_fallback_api_key: str = setting("LLM_FALLBACK_API_KEY", "")
    llm_fallback_model: str = setting("LLM_FALLBACK_MODEL", "")
    api_keys: tuple[str, ...] = setting("CUSTOM_LLM_API_KEY", (), _list)
    allow_unauthenticated: bool = setting("ALLOW_UNAUTHENTICATED", False, _bool)
    host: str = setting("HOST", "0.0.0.0")
    port: int = setting("PORT", 8000, int)
    max_body_bytes: int = setting("MAX_BODY_BYTES", 4 * 1024 * 1024, int)
    max_header_bytes: int = setting("MAX_HEADER_BYTES", 64 * 1024, int)
    header_timeout_seconds: float = setting("HEADER_TIMEOUT_SECONDS", 10.0, float)
    body_timeout_seconds: float = setting("BODY_TIMEOUT_SECONDS", 30.0, float)
    max_messages: int = setting("MAX_MESSAGES", 2048, int)
    max_streams_per_key: int = setting("MAX_STREAMS_PER_KEY", 0, int)  # 0: no limit
    max_upstream_streams: int = setting("MAX_UPSTREAM_STREAMS", 1000, int)
    max_speech_streams: int = setting("MAX_SPEECH_STREAMS", 16, int)
    max_broadcast_chars: int = setting("MAX_BROADCAST_CHARS", 2000, int)
    shutdown_grace_seconds: float = setting("SHUTDOWN_GRACE_SECONDS", 10.0, float)
    workers: int = setting("WORKERS", 1, int)
    strip_fields: frozenset[str] = setting("STRIP_FIELDS", frozenset(), lambda v: frozenset(_list(v)))
    knowledge_dir: Path = setting("KNOWLEDGE_DIR", HERE / "knowledge", Path)
    knowledge_index: str = setting("KNOWLEDGE_INDEX", "")  # empty: one file per folder under .index/
    knowledge_max_file_bytes: int = setting("KNOWLEDGE_MAX_FILE_BYTES", 20_000_000, int)
    knowledge_pdf_seconds: float = setting("KNOWLEDGE_PDF_SECONDS", 10.0, float)
    rag_top_k: int = setting("RAG_TOP_K", 3, int)
    # Share (0 to 1) of a question's information a passage must hold to be injected; knowledge.py.
    rag_min_coverage: float = setting("RAG_MIN_COVERAGE", 0.5, float)
    rag_deadline_ms: int = setting("RAG_DEADLINE_MS", 300, int)
    embedding_model: str = setting("EMBEDDING_MODEL", BUILTIN)  # "none": search by words alone
    embedding_base_url: str = setting("EMBEDDING_BASE_URL", "")  # empty: the built-in model, or LLM_BASE_URL
    embedding_api_key: str = setting("EMBEDDING_API_KEY", "")  # empty: LLM_API_KEY
    embedding_threads: int = setting("EMBEDDING_THREADS", 1, int)
    rag_min_similarity: float | None = setting("RAG_MIN_SIMILARITY", None, float)  # None: the model's own
    waiting_messages_en: tuple[str, ...] = setting("WAITING_MESSAGES_EN", WAITING_PHRASES["en"], _phrases)
    waiting_messages_zh: tuple[str, ...] = setting("WAITING_MESSAGES_ZH", WAITING_PHRASES["zh"], _phrases)
    waiting_phrase_after_ms: int = setting("WAITING_PHRASE_AFTER_MS", 1000, int)  # 0: always, first
    audio_text_file: Path = setting("AUDIO_TEXT_FILE", HERE / "file.txt", Path)
    audio_pcm_file: Path = setting("AUDIO_PCM_FILE", HERE / "file.pcm", Path)
    audio_head_start_ms: int = setting("AUDIO_HEAD_START_MS", 200, int)
    audio_source: str = setting("AUDIO_SOURCE", "files", str.lower)  # or "tts": the model's answer, spoken
    tts_engine: str = setting("TTS_ENGINE", "openai", str.lower)  # or "espeak"
    tts_base_url: str = setting("TTS_BASE_URL", "")  # empty: LLM_BASE_URL
    tts_api_key: str = setting("TTS_API_KEY", "")  # empty: LLM_API_KEY
    tts_model: str = setting("TTS_MODEL", "gpt-4o-mini-tts")
    tts_voice: str = setting("TTS_VOICE", "")  # empty: "alloy" for openai, "en-us" for espeak
    tts_sample_rate: int = setting("TTS_SAMPLE_RATE", 24_000, int)
    tts_timeout_seconds: float = setting("TTS_TIMEOUT_SECONDS", 10.0, float)
    tts_max_seconds: float = setting("TTS_MAX_SECONDS", 120.0, float)
    server_tools: tuple[str, ...] | None = setting("SERVER_TOOLS", None, _tool_names)  # None: all
    tool_max_rounds: int = setting("TOOL_MAX_ROUNDS", 3, int)
    tool_bridge_ms: int = setting("TOOL_BRIDGE_MS", 1000, int)
    tool_max_calls: int = setting("TOOL_MAX_CALLS", 16, int)
    tool_max_argument_bytes: int = setting("TOOL_MAX_ARGUMENT_BYTES", 64 * 1024, int)
    agora_app_id: str = setting("AGORA_APP_ID", "")
    agora_customer_id: str = setting("AGORA_CUSTOMER_ID", "")
    agora_customer_secret: str = setting("AGORA_CUSTOMER_SECRET", "")
    agora_app_certificate: str = setting("AGORA_APP_CERTIFICATE", "")
    agora_agent_uid: str = setting("AGORA_AGENT_UID", "0")
    agora_api_base: str = setting("AGORA_API_BASE", "https://api.agora.io/api/conversational-ai-agent")
    agora_hangup_grace_ms: int = setting("AGORA_HANGUP_GRACE_MS", 1500, int)
    agora_graceful_leave: bool = setting("AGORA_GRACEFUL_LEAVE", False, _bool)
    agora_max_pending_hangups: int = setting("AGORA_MAX_PENDING_HANGUPS", 100, int)
    playground: bool = setting("PLAYGROUND", True, _bool)
    log_level: str = setting("LOG_LEVEL", "INFO", str.upper)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "audio_source": ("files", "tts"),
        "tts_engine": ("openai", "espeak"),
        "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    }

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.upper()} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{spec.metadata['env']} must not be negative, not {value}")
        if self.agora_app_id and not AGENT_ID.fullmatch(self.agora_app_id):
            raise ValueError("AGORA_APP_ID is not an Agora App ID (letters and digits)")
        if self.agora_app_certificate and not all(
            re.fullmatch(r"[0-9a-fA-F]{32}", value) for value in (self.agora_app_id, self.agora_app_certificate)
        ):  # Agora's token builder signs only these; anything else would be an empty token
            raise ValueError("token authentication needs AGORA_APP_ID and AGORA_APP_CERTIFICATE of 32 hex digits")
        if not UID.fullmatch(self.agora_agent_uid):
            raise ValueError("AGORA_AGENT_UID is not an Agora uid")
        if self.rag_min_coverage > 1:
            raise ValueError(f"RAG_MIN_COVERAGE is a share from 0 to 1, not {self.rag_min_coverage}")
        if self.rag_min_similarity is not None and not -1 <= self.rag_min_similarity <= 1:
            raise ValueError(f"RAG_MIN_SIMILARITY is a cosine similarity from -1 to 1, not {self.rag_min_similarity}")
        if os.environ.get("RAG_MIN_SCORE"):  # a raw BM25 floor meant something else at every corpus size
            log.warning("RAG_MIN_SCORE is no longer read; RAG_MIN_COVERAGE (0 to 1) decides what /rag injects")

    @classmethod
    def from_env(cls) -> Settings:
        load_dotenv(override=False)  # the real environment wins over .env
        values = {}
        for spec in fields(cls):
            raw = os.environ.get(spec.metadata["env"], "")
            if raw.strip():
                try:
                    values[spec.name] = spec.metadata["parse"](raw.strip())
                except ValueError as error:
                    raise ValueError(f"{spec.metadata['env']}={raw[:40]!r} is not valid: {error}") from None
        return cls(**values)

    @property
    def upstream_configured(self) -> bool:
        # OpenAI without a key can only fail; any other base URL may be a keyless local model.
        return bool(self.llm_api_key) or self.llm_base_url.rstrip("/") != DEFAULT_BASE_URL

    def upstream(self) -> LLM:
        fallback = None
        if self.llm_fallback_base_url:
            fallback = Endpoint(
                "fallback", self.llm_fallback_base_url, self.llm_fallback_api_key, self.llm_fallback_model
            )
        return LLM(
            Endpoint("primary", self.llm_base_url, self.llm_api_key),
            fallback,
            Limits(
                self.llm_connect_timeout,
                self.llm_first_token_timeout,
                self.llm_idle_timeout,
                self.llm_max_stream_seconds,
                self.llm_max_event_bytes,
                self.llm_max_response_bytes,
                self.max_upstream_streams,
            ),
        )

    def tools(self, retriever: Retriever, tools: ToolRegistry | None) -> ToolRegistry:
        """The server's tools: the given or sample ones, as SERVER_TOOLS selects, and end_call when
        Agora's REST credentials are set."""
        registry = (tools or sample_tools(retriever)).select(self.server_tools)
        rest = self.agora_rest()
        if rest is not None:
            hangups = Hangups(
                rest, self.agora_hangup_grace_ms / 1000, self.agora_graceful_leave, self.agora_max_pending_hangups
            )
            registry.add(end_call_tool(hangups), name="end_call", heard_whole=True, destructive=FAREWELLS)
        return registry

    def agora_rest(self) -> AgoraREST | None:
        """Agora's REST API with a token signed by the App Certificate (Agora's production method),
        else with the customer id and secret; None without credentials."""
        auth: TokenAuth | BasicAuth
        if self.agora_app_certificate:
            auth = TokenAuth(self.agora_app_certificate)
        elif self.agora_customer_id and self.agora_customer_secret:
            auth = BasicAuth(self.agora_customer_id, self.agora_customer_secret)
        else:
            return None
        if not self.agora_app_id:
            return None
        return AgoraREST(self.agora_app_id, auth, self.agora_api_base, self.agora_agent_uid)

    def knowledge(self) -> Retriever:
        """The default retriever: the index of KNOWLEDGE_DIR, or nothing at all for a folder with no
        document (then neither the index nor its dictionaries or model are ever loaded)."""
        if not has_documents(self.knowledge_dir):
            return NoKnowledge(self.knowledge_dir)
        return self.knowledge_base()

    def knowledge_base(self) -> Knowledge:
        from knowledge import Knowledge, KnowledgeBase

        base = KnowledgeBase(
            self.knowledge_dir,
            self.knowledge_index or None,
            self.rag_min_coverage,
            self.knowledge_max_file_bytes,
            self.knowledge_pdf_seconds,
        )
        return Knowledge(base, self.embedder())

    def embedder(self) -> Embedder | None:
        """The embedding model: none, the built-in one, or a hosted one (EMBEDDING_MODEL, EMBEDDING_BASE_URL)."""
        if self.embedding_model.lower() == "none":
            return None
        if self.embedding_model == BUILTIN and not self.embedding_base_url:
            return BuiltinModel(self.embedding_threads, self.rag_min_similarity)
        return HostedModel(
            self.embedding_base_url or self.llm_base_url,
            self.embedding_api_key or self.llm_api_key,
            self.embedding_model,
            Slots(self.max_upstream_streams, "MAX_UPSTREAM_STREAMS"),
            self.rag_min_similarity,
        )

    def voice(self, llm: LLM, voice: speech.Engine | None) -> speech.Bounded | None:
        """The voice /audio speaks with, within the speech limits: yours, the TTS engine, or in files
        mode espeak-ng where it is installed."""
        voice = voice or self.engine(llm)
        if voice is None:
            return None
        slots = Slots(self.max_speech_streams, "MAX_SPEECH_STREAMS")
        return speech.Bounded(voice, slots, self.tts_timeout_seconds, self.tts_max_seconds)

    def engine(self, llm: LLM) -> speech.Engine | None:
        if self.audio_source == "files":
            return speech.local_engine()
        return speech.speech_engine(
            self.tts_engine,
            llm.session,
            self.tts_base_url or self.llm_base_url,
            self.tts_api_key or self.llm_api_key,
            self.tts_model,
            self.tts_voice,
            self.tts_sample_rate,
        )


# ---------------------------------------------------------------------------------------------
# Request models: they document and validate the fields we act on. Every model allows extra keys,
# and the body is forwarded as the caller sent it (minus the engine's fields), never as the model
# dumps it, so a key this server does not know still reaches the upstream unchanged.
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


Content = str | list[ContentPart]


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


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class ToolFunction(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: str = "function"
    function: ToolFunction


class ChatCompletionRequest(_Open):
    """An OpenAI Chat Completions request, as Agora's engine and the OpenAI SDKs send it."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: StrictBool | None = None  # see wants_stream(): absent means not streaming, as at OpenAI
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

    def from_engine(self) -> bool:
        """Agora's engine with vendor "custom" stamps every request with turn_id and timestamp."""
        return self.turn_id is not None or self.timestamp is not None


class SpeechRequest(_Open):
    """Agora's custom TTS request (`tts.vendor: "generic_http"`): OpenAI's /audio/speech shape.

    The server's voice says it (TTS_* settings); `voice`, `speed`, `model` and `instructions` (also
    spelt `instruction`), when given, override the settings for this request, as Agora's
    custom_metadata.tts_params changes them mid-call. `request_id`, `request_seq_id` and
    `request_end` come only with Agora's `enable_request_id`."""

    input: str = Field(max_length=4096)
    model: str | None = Field(None, max_length=200)
    voice: str | None = Field(None, max_length=200)
    speed: float | None = Field(None, gt=0, le=4)
    sample_rate: int = Field(16_000, ge=8_000, le=48_000)
    # Required, and pcm only: an OpenAI SDK that asks for its default (mp3) gets a 400 that says so,
    # not raw PCM it would take for mp3. Agora's generic_http always sends "pcm".
    response_format: Literal["pcm"]
    instructions: str | None = Field(None, max_length=4096)
    instruction: str | None = Field(None, max_length=4096)
    request_id: str | int | None = None
    request_seq_id: int | None = None
    request_end: bool | None = None


@dataclass
class Chat:
    """One chat request: the validated model (what we act on), the body to forward upstream, and
    the request's context (handed to everything that serves it)."""

    request: ChatCompletionRequest
    body: dict[str, Any]
    stream: bool
    notes: bool  # the caller asked for notes (x-custom-llm-notes: 1): the playground does
    context: Context

    def events(self, events: AsyncIterator[Event]) -> EventStream:
        return EventStream(events, self.context, self.notes)

    def reply(self, work: Awaitable[bytes]) -> JSONReply:
        return JSONReply(work, self.context)


def wants_stream(request: ChatCompletionRequest, accept: str) -> bool:
    """The one rule for streaming: `stream` as sent; when absent, OpenAI's default (one JSON
    completion), except for Agora's engine, recognised by its turn_id/timestamp or by asking for
    `text/event-stream`, which always gets SSE. Agora's docs put `"stream": true` in llm.params."""
    if request.stream is not None:
        return request.stream
    return request.from_engine() or "text/event-stream" in accept


async def read_chat(http: Request) -> Chat:
    """Read and validate a chat request; note its model and turn for the log."""
    settings: Settings = http.app.state.settings
    body = await read_json_body(http, settings.max_body_bytes)
    request = validated(ChatCompletionRequest, body)
    if len(request.messages) > settings.max_messages:
        raise bad_request(
            f"messages: at most {settings.max_messages} messages are accepted.", "too_many_messages", "messages"
        )
    context: Context = http.state.context
    context.model = request.model or settings.llm_model
    context.turn_id = str(request.turn_id) if request.turn_id is not None else "-"
    context.engine = {key: body[key] for key in ENGINE_FIELDS if key in body}
    context.messages = body["messages"]
    stream = wants_stream(request, http.headers.get("accept", ""))
    notes = http.headers.get("x-custom-llm-notes") == "1"
    forwarded = for_upstream(body, settings.llm_model, stream, settings.strip_fields)
    return Chat(request, forwarded, stream, notes, context)


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------

router = APIRouter()
SPEECH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SpeechRequest"}}},
    }
}
CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    }
}


@dataclass
class Service:
    """What the routes share: made by create_app, the upstream client opened at start-up."""

    settings: Settings
    retriever: Retriever
    loop: ToolLoop
    llm: LLM | None = None
    given_voice: speech.Engine | None = None  # create_app(voice=...)
    voice: speech.Bounded | None = None  # the voice in use, within the speech limits (made at start-up)

    def upstream(self) -> LLM:
        if not self.settings.upstream_configured or self.llm is None:
            raise ApiError(
                503,
                "No upstream LLM is configured: set LLM_API_KEY (and LLM_BASE_URL for a provider other than OpenAI).",
                "server_error",
                "no_upstream",
            )
        return self.llm


def service(http: Request) -> Service:
    svc: Service = http.app.state.service
    return svc


@router.post("/chat/completions", openapi_extra=CHAT_BODY)
async def chat_completions(http: Request) -> Response:
    """Relays the upstream LLM's answer as it arrives, running the server's tools between rounds."""
    chat, svc = await read_chat(http), service(http)
    if chat.stream:
        return chat.events(answer(svc.upstream(), chat.body, svc.loop, chat.context))
    return chat.reply(complete(svc.upstream(), chat.body, svc.loop, chat.context))


def rag_events(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    """The grounded answer, with a waiting phrase first when it is late (WAITING_PHRASE_AFTER_MS)."""
    settings = svc.settings
    phrases = {"en": settings.waiting_messages_en, "zh": settings.waiting_messages_zh}
    phrase = phrase_for(phrases, latest_question(chat.body["messages"]))
    return said_when_late(grounded_answer(svc, chat), phrase, settings.waiting_phrase_after_ms, "waiting")


async def grounded_answer(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    settings, body = svc.settings, chat.body
    passages = await retrieve(
        svc.retriever, body["messages"], settings.rag_top_k, settings.rag_deadline_ms, chat.context
    )
    yield Note("passages", [{"citation": p.citation(), "text": p.text, "score": round(p.score, 4)} for p in passages])
    grounded = {**body, "messages": with_passages(body["messages"], passages)}
    async for event in answer(svc.upstream(), grounded, svc.loop, chat.context):
        yield event


@router.post("/rag/chat/completions", openapi_extra=CHAT_BODY)
async def rag_chat_completions(http: Request) -> Response:
    """A waiting phrase, then the answer grounded in the knowledge base."""
    chat, svc = await read_chat(http), service(http)
    llm = svc.upstream()
    if chat.stream:
        return chat.events(rag_events(svc, chat))
    passages = await retrieve(
        svc.retriever, chat.body["messages"], svc.settings.rag_top_k, svc.settings.rag_deadline_ms, chat.context
    )
    grounded = {**chat.body, "messages": with_passages(chat.body["messages"], passages)}
    return chat.reply(complete(llm, grounded, svc.loop, chat.context))


def audio_events(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    """Where an audio answer comes from: a broadcast is said as written; a request for the model's
    own audio is converted; in files mode the recording plays; otherwise the model's answer is spoken."""
    settings, messages = svc.settings, chat.body["messages"]
    # Paced at real time when streaming; a non-streaming answer is wanted all at once.
    head_start = settings.audio_head_start_ms if chat.stream else None
    if chat.request.messages[-1].role == "assistant":
        # Agora's greeting, failure message, silence prompt or /speak: say it as written, no LLM.
        broadcast = message_text(messages[-1])
        if len(broadcast) > settings.max_broadcast_chars:
            raise bad_request(
                f"The assistant message to say is longer than {settings.max_broadcast_chars} characters "
                "(MAX_BROADCAST_CHARS).",
                "broadcast_too_long",
                f"messages.{len(messages) - 1}.content",
            )
        return speech.spoken_answer(
            speech.one(broadcast),
            svc.voice,
            head_start,
            "espeak-ng is not installed (files mode says broadcasts with it)",
        )
    streaming = {**chat.body, "stream": True}
    if "audio" in (chat.request.modalities or []):
        return speech.converted_answer(answer(svc.upstream(), streaming, svc.loop, chat.context), svc.voice, head_start)
    if settings.audio_source == "files":
        return speech.file_answer(settings.audio_text_file, settings.audio_pcm_file, head_start)
    return speech.spoken_answer(answer(svc.upstream(), streaming, svc.loop, chat.context), svc.voice, head_start)


@router.post("/audio/chat/completions", openapi_extra=CHAT_BODY)
async def audio_chat_completions(http: Request) -> Response:
    """The answer as a transcript and 16 kHz mono PCM, from files, a voice or the upstream's audio."""
    chat = await read_chat(http)
    events = audio_events(service(http), chat)
    if chat.stream:
        return chat.events(events)
    return chat.reply(speech.audio_completion(events, chat.body["model"]))


@router.post("/audio/speech", openapi_extra=SPEECH_BODY)
async def audio_speech(http: Request) -> Response:
    """Agora's custom TTS (generic_http): the text said with the server's voice, raw PCM as it is made."""
    svc = service(http)
    request = validated(SpeechRequest, await read_json_body(http, svc.settings.max_body_bytes))
    if svc.voice is None:
        raise ApiError(
            503,
            "No voice is configured: set AUDIO_SOURCE=tts and TTS_*, or install espeak-ng.",
            "server_error",
            "no_voice",
        )
    context: Context = http.state.context
    context.model, context.turn_id = request.model or "-", str(request.request_id or "-")
    style = speech.Style(request.voice, request.speed, request.model, request.instructions or request.instruction)
    return BytesStream(speech.pcm_at(svc.voice, request.input, request.sample_rate, style), "audio/pcm", context)


@router.get("/knowledge/search")
async def knowledge_search(http: Request, q: str, limit: int = 5) -> dict[str, Any]:
    """What a question retrieves from the knowledge base (the passages /rag would inject)."""
    query = q[:2000]
    passages = await service(http).retriever.search(query, max(1, min(limit, 50)))
    return {"query": query, "passages": [p.as_dict() for p in passages]}


PLAYGROUND = HERE / "playground.html"


async def playground(http: Request) -> Response:
    """The playground page: talk to the server as Agora's engine would, in a browser (PLAYGROUND)."""
    return Response(await asyncio.to_thread(PLAYGROUND.read_bytes), media_type="text/html; charset=utf-8")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness for load balancers; needs no key."""
    return {"status": "ok", "version": __version__}


@router.get("/ready")
async def ready(http: Request) -> Response:
    """Readiness: the knowledge base is indexed and the upstream LLM answers; needs no key."""
    svc, problems = service(http), []
    if not svc.retriever.ready:
        problems.append("the knowledge base is not indexed yet")
    if not svc.settings.upstream_configured:
        problems.append("no upstream LLM is configured")
    elif svc.llm is None or not await svc.llm.ready():
        problems.append("the upstream LLM does not answer")
    body = {"status": "unavailable", "problems": problems} if problems else {"status": "ready"}
    return Response(orjson.dumps(body), status_code=503 if problems else 200, media_type="application/json")


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus metrics, summed over worker processes."""
    metrics.TASKS.set(len(asyncio.all_tasks()))
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: Service = app.state.service
    settings = svc.settings
    svc.llm = settings.upstream()
    svc.voice = settings.voice(svc.llm, svc.given_voice)
    # Indexing runs beside the requests: searches see what is indexed so far, /ready waits for all.
    starting = asyncio.ensure_future(svc.retriever.start())
    if not settings.upstream_configured:
        log.warning(
            "no upstream LLM: set LLM_API_KEY (or LLM_BASE_URL for a keyless local model); until then "
            "the chat endpoints answer 503, while /audio broadcasts and recorded answers still work"
        )
    elif not await svc.llm.primary.probe():
        log.warning("the upstream LLM at %s does not answer yet", settings.llm_base_url)
    # The probe left a warm connection in the pool, so the first caller skips the handshake.
    # Everything made at start lives as long as the process: keep it out of the garbage
    # collector's full passes, which otherwise pause every stream now and then.
    gc.freeze()
    yield
    await svc.retriever.aclose()  # stops indexing between two files: a shutdown never waits for it
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    await svc.llm.aclose()


def create_app(
    settings: Settings | None = None,
    tools: ToolRegistry | None = None,
    retriever: Retriever | None = None,
    voice: speech.Engine | None = None,
) -> FastAPI:
    """The ASGI app. Pass your own tools, retriever or voice to change what the server does, knows and sounds like."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    GuardedHttpTools.configure(
        settings.max_header_bytes, settings.header_timeout_seconds, settings.body_timeout_seconds
    )
    if not settings.api_keys and not settings.allow_unauthenticated:
        raise ValueError(
            "set CUSTOM_LLM_API_KEY (the key callers send), or ALLOW_UNAUTHENTICATED=true for local "
            "experiments; `python3 custom_llm.py` makes a key for you"
        )
    if settings.allow_unauthenticated and not settings.api_keys:
        log.warning("ALLOW_UNAUTHENTICATED is set: anyone who can reach this server can use it")
    retriever = retriever or settings.knowledge()
    registry = settings.tools(retriever, tools)
    loop = ToolLoop(
        registry,
        settings.tool_max_rounds,
        settings.tool_bridge_ms,
        settings.tool_max_calls,
        settings.tool_max_argument_bytes,
    )
    app = FastAPI(
        title="Custom LLM server for Agora", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings, app.state.service = settings, Service(settings, retriever, loop, given_voice=voice)
    app.include_router(router)
    if settings.playground:
        app.add_api_route("/playground", playground, methods=["GET"], include_in_schema=False)
    add_error_handlers(app)
    app.openapi = lambda: openapi_with(app, ChatCompletionRequest, SpeechRequest)  # type: ignore[method-assign]
    app.add_middleware(
        BearerAuth,
        keys=settings.api_keys,
        max_per_key=settings.max_streams_per_key,
        public=frozenset({"/health", "/ready", "/playground"}),
    )
    app.add_middleware(RequestLog)
    return app


# ---------------------------------------------------------------------------------------------
# The entry point: `python3 custom_llm.py` serves; `index` and `search` work the knowledge base
# ---------------------------------------------------------------------------------------------


def serve(settings: Settings) -> None:
    import tempfile

    import uvicorn

    if not settings.api_keys and not settings.allow_unauthenticated:
        key = secrets.token_urlsafe(24)
        # Made once, before any worker starts, and printed once, on purpose: a server is never open
        # by accident, and the developer needs this value for the agent's llm.api_key.
        print(f"CUSTOM_LLM_API_KEY is not set; callers must send this key: {key}", file=sys.stderr, flush=True)
        os.environ["CUSTOM_LLM_API_KEY"] = key
        settings = Settings.from_env()
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        http=GuardedHttpTools,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    if settings.workers <= 1:
        return uvicorn.run(create_app(settings), **options)
    # Worker processes read their settings anew from the environment, the key above included,
    # and share a folder for their metrics.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="custom-llm-metrics-"))
    uvicorn.run("custom_llm:create_app", factory=True, workers=settings.workers, **options)


def knowledge_command(args: argparse.Namespace, settings: Settings) -> int:
    """`index [DIR]` and `search QUESTION`: the knowledge base from a terminal, with the server's settings."""
    if args.folder:
        settings = dataclasses.replace(settings, knowledge_dir=Path(args.folder))
    if args.index_file:
        settings = dataclasses.replace(settings, knowledge_index=args.index_file)
    from knowledge import index_command, search_command

    if args.command == "index":
        return asyncio.run(index_command(settings.knowledge_base()))
    return asyncio.run(search_command(settings.knowledge_base(), args.question, args.limit))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="custom_llm.py", description="The custom LLM server for Agora.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the server (the default)")
    index = commands.add_parser("index", help="index the knowledge folder (only what changed)")
    index.add_argument("folder", nargs="?", help="a folder other than KNOWLEDGE_DIR")
    search = commands.add_parser("search", help="show what a question retrieves")
    search.add_argument("question")
    search.add_argument("--folder", help="a folder other than KNOWLEDGE_DIR")
    search.add_argument("--limit", type=int, default=5)
    for command in (index, search):
        command.add_argument("--index-file", help="the SQLite index (default: KNOWLEDGE_INDEX, or .index/)")
    check = commands.add_parser("check", help="check any custom LLM URL against what Agora's engine sends and expects")
    check.add_argument("url", help="e.g. http://localhost:8000/rag/chat/completions")
    check.add_argument("--key", default="", help="the Bearer key the endpoint expects (none: an open endpoint)")
    check.add_argument("--model", default="gpt-4o-mini", help="the model name sent (default: gpt-4o-mini)")
    check.add_argument("--timeout", type=float, default=20.0, help="seconds each check may take (default: 20)")
    check.add_argument("--run-timeout", type=float, default=180.0, help="seconds all checks may take (default: 180)")
    args = parser.parse_args(argv)
    if args.command == "check":  # needs no settings: the endpoint may be anyone's
        import checker  # only here: the server itself never needs an HTTP client of this kind

        bounds = checker.Bounds(check_seconds=args.timeout, run_seconds=args.run_timeout)
        return checker.run(args.url, args.key.strip(), args.model, bounds=bounds)
    try:
        settings = Settings.from_env()
    except ValueError as error:
        print(f"custom_llm.py: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command in ("index", "search"):
        return knowledge_command(args, settings)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
