"""A custom LLM server for Agora's Conversational AI Engine: the entry point.

The engine POSTs an OpenAI Chat Completions request to this server; the server answers the way
OpenAI does, streaming over server-sent events (every path also under /v1, so an SDK's base_url
may end in /v1):

    /chat/completions        relays any OpenAI-compatible LLM, event by event, as it arrives
    /rag/chat/completions    the answer grounded in ./knowledge, a waiting phrase when it is late
    /audio/chat/completions  a transcript and 16 kHz mono PCM for a custom voice
    /audio/speech            the server's voice as Agora's custom TTS

Read top to bottom: the request models, the routes (each declared once, in ROUTES), the app, the
entry point (`custom-llm serve|index|search|check`). The work is done in the package
custom_llm_server, whose folders are its layers: core (what every layer shares), serving (HTTP),
llm (the upstream and the tool loop), knowledge, voice, agora, and config (settings, agent profiles,
and build.py, where each agent's objects are made).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import HTMLResponse, Response

from custom_llm_server import __version__
from custom_llm_server.agora.engine import ENGINE_FIELDS, for_upstream, presence_of, with_presence
from custom_llm_server.config import build
from custom_llm_server.config.agents import Agents, Service
from custom_llm_server.config.keyfile import stored_key
from custom_llm_server.config.profiles import filled, read_profiles, variables_of
from custom_llm_server.config.settings import Settings
from custom_llm_server.core import metrics
from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import ApiError, bad_request
from custom_llm_server.core.events import Event, Note
from custom_llm_server.core.lateness import phrase_for, said_when_late
from custom_llm_server.core.text import latest_question, message_text
from custom_llm_server.core.wording import Wording
from custom_llm_server.knowledge.rag import Passage, Retriever, retrieve, with_passages
from custom_llm_server.llm.answer import answer, complete
from custom_llm_server.llm.tools import ToolRegistry
from custom_llm_server.serving.errors import add_error_handlers
from custom_llm_server.serving.limits import Limits
from custom_llm_server.serving.logs import configure_logging
from custom_llm_server.serving.middleware import BearerAuth, EndsOnShutdown, RequestLog, WithContext
from custom_llm_server.serving.protocol import GuardedHttpTools
from custom_llm_server.serving.requests import openapi_with, read_json_body, validated
from custom_llm_server.serving.streams import BytesStream, EventStream, JSONReply
from custom_llm_server.voice.answers import audio_completion, converted_answer, file_answer, one, spoken_answer
from custom_llm_server.voice.engines import Engine, Style, pcm_at

log = logging.getLogger("custom_llm")

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

    The server's voice says it (TTS_* settings); `voice`, `speed`, `model` and `instruction` (Agora's
    spelling; OpenAI's `instructions` too), when given, override the settings for this request, as
    Agora's custom_metadata.tts_params changes them mid-call. `request_id`, `request_seq_id` and
    `request_end` come only with Agora's `enable_request_id`. Agora documents `response_format` and
    `sample_rate` with the defaults `pcm` and 16000, so the engine may leave both out."""

    input: str = Field(max_length=4096)
    model: str | None = Field(None, max_length=200)
    voice: str | None = Field(None, max_length=200)
    speed: float | None = Field(None, gt=0, le=4)
    sample_rate: int = Field(16_000, ge=8_000, le=48_000)  # the bounds are this server's: Agora states none
    # pcm only: an OpenAI SDK asking for its default (mp3) gets a 400 that names pcm, not raw PCM it
    # would take for mp3.
    response_format: Literal["pcm"] = "pcm"
    instruction: str | None = Field(None, max_length=4096)
    instructions: str | None = Field(None, max_length=4096)
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


async def read_chat(http: Request, svc: Service) -> Chat:
    """Read and validate a chat request for the caller's agent; note its model and turn for the log."""
    settings = svc.settings
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
    context.variables = variables_of(body.get("variables"), settings.max_variables, settings.max_variable_chars)
    context.presence = presence_of(body.get("context"), settings.max_presence_chars)
    forwarded = for_upstream(body, settings.llm_model, stream, settings.strip_fields, svc.wording.interrupted_mark)
    forwarded["messages"] = with_presence(forwarded["messages"], context.presence, svc.wording.presence_prompt)
    if svc.loop.later is not None:  # slow tools' results that came after their turn, in this channel
        forwarded["messages"] = svc.loop.later.with_results(forwarded["messages"], context)
    if svc.profile.system_prompt:  # the agent's own prompt, before the caller's system messages
        prompt = {"role": "system", "content": filled(svc.profile.system_prompt, context.variables)}
        forwarded["messages"] = [prompt, *forwarded["messages"]]
    return Chat(request, forwarded, stream, notes, context)


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------

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


def service(http: Request) -> Service:
    """The caller's agent, as its key chose it (BearerAuth); the request keeps it to the end."""
    context: Context = http.state.context
    agents: Agents = http.app.state.agents
    svc = agents.get(context.agent)
    if svc is None:  # the key's agent was removed by a reload after the key was checked
        raise ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key")
    return svc.serve(context)


async def chat_completions(http: Request) -> Response:
    """Relays the upstream LLM's answer as it arrives, running the server's tools between rounds."""
    svc = service(http)
    chat = await read_chat(http, svc)
    if chat.stream:
        return chat.events(answer(svc.upstream(), chat.body, svc.loop, chat.context))
    return chat.reply(complete(svc.upstream(), chat.body, svc.loop, chat.context))


def rag_events(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    """The grounded answer, with a waiting phrase first when it is late (WAITING_PHRASE_AFTER_MS)."""
    phrase = phrase_for(svc.wording.waiting, latest_question(chat.body["messages"]))
    return said_when_late(grounded_answer(svc, chat), phrase, svc.settings.waiting_phrase_after_ms, "waiting")


async def grounded(svc: Service, chat: Chat) -> tuple[dict[str, Any], list[Passage]]:
    """The request with the passages retrieved for its question, as data for the model; and the passages."""
    settings, body = svc.settings, chat.body
    passages = await retrieve(
        svc.retriever, body["messages"], settings.rag_top_k, settings.rag_deadline_ms, chat.context
    )
    return {**body, "messages": with_passages(body["messages"], passages, svc.wording.grounding_prompt)}, passages


async def grounded_answer(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    body, passages = await grounded(svc, chat)
    yield Note("passages", [{"citation": p.citation(), "text": p.text, "score": round(p.score, 4)} for p in passages])
    async for event in answer(svc.upstream(), body, svc.loop, chat.context):
        yield event


async def rag_chat_completions(http: Request) -> Response:
    """A waiting phrase, then the answer grounded in the knowledge base."""
    svc = service(http)
    chat = await read_chat(http, svc)
    llm = svc.upstream()
    if chat.stream:
        return chat.events(rag_events(svc, chat))
    body, _ = await grounded(svc, chat)
    return chat.reply(complete(llm, body, svc.loop, chat.context))


def audio_events(svc: Service, chat: Chat) -> AsyncIterator[Event]:
    """Where an audio answer comes from: a broadcast is said as written; a request for the model's
    own audio is converted; in files mode the recording plays; otherwise the model's answer is spoken."""
    settings, messages = svc.settings, chat.body["messages"]
    voice = svc.voice.speaking_for(chat.context) if svc.voice else None
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
        return spoken_answer(
            one(broadcast), voice, head_start, "espeak-ng is not installed (files mode says broadcasts with it)"
        )
    streaming = {**chat.body, "stream": True}
    if "audio" in (chat.request.modalities or []):
        if voice is None:  # a model that answers in text would leave the agent silent: say so now
            raise ApiError(
                503,
                "This request asks for the model's own audio (modalities), and no voice is configured to speak a "
                "text answer: set AUDIO_SOURCE=tts with TTS_*, or install espeak-ng.",
                "server_error",
                "no_voice",
            )
        return converted_answer(answer(svc.upstream(), streaming, svc.loop, chat.context), voice, head_start)
    if settings.audio_source == "files":
        return file_answer(settings.audio_text_file, settings.audio_pcm_file, head_start)
    return spoken_answer(answer(svc.upstream(), streaming, svc.loop, chat.context), voice, head_start)


async def audio_chat_completions(http: Request) -> Response:
    """The answer as a transcript and 16 kHz mono PCM, from files, a voice or the upstream's audio."""
    svc = service(http)
    chat = await read_chat(http, svc)
    events = audio_events(svc, chat)
    if chat.stream:
        return chat.events(events)
    return chat.reply(audio_completion(events, chat.body["model"]))


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
    style = Style(request.voice, request.speed, request.model, request.instruction or request.instructions)
    voice = svc.voice.speaking_for(context)
    return BytesStream(pcm_at(voice, request.input, request.sample_rate, style), "audio/pcm", context)


async def knowledge_search(http: Request, q: str, limit: int = 5) -> dict[str, Any]:
    """What a question retrieves from the knowledge base (the passages /rag would inject)."""
    query = q[:2000]
    passages = await service(http).retriever.search(query, max(1, min(limit, 50)))
    return {"query": query, "passages": [p.as_dict() for p in passages]}


PLAYGROUND = Path(__file__).resolve().parent / "custom_llm_server" / "serving" / "playground.html"
STARTED = int(time.time())


async def playground(http: Request) -> Response:
    """The playground page: talk to the server as Agora's engine would, in a browser (PLAYGROUND)."""
    return Response(await asyncio.to_thread(PLAYGROUND.read_bytes), media_type="text/html; charset=utf-8")


async def home(http: Request) -> Response:
    """What a browser opening the server's address sees: where to go next; needs no key."""
    settings: Settings = http.app.state.settings
    try_it = '<a href="/playground">the playground</a>' if settings.playground else "the playground (PLAYGROUND=true)"
    return HTMLResponse(HOME.format(version=__version__, try_it=try_it))


HOME = """<!doctype html><meta charset="utf-8"><title>Custom LLM server for Agora</title>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 40em; margin: 3em auto; padding: 0 1em">
<h1>Custom LLM server for Agora</h1>
<p>Version {version} is running. Talk to it in {try_it}, or point an OpenAI SDK or Agora's
<code>llm.url</code> at <code>/v1/chat/completions</code>, <code>/v1/rag/chat/completions</code> or
<code>/v1/audio/chat/completions</code> with <code>Authorization: Bearer &lt;key&gt;</code>.</p>
<p><a href="/health">/health</a> · <a href="/ready">/ready</a> · <a href="/openapi.json">/openapi.json</a>
· the README and <code>docs/</code> in the project say the rest.</p>
</body>
"""


async def models(http: Request) -> dict[str, Any]:
    """The caller's agent's models, in OpenAI's list shape (SDKs, LangChain and many UIs ask first)."""
    settings = service(http).settings
    names = dict.fromkeys(name for name in (settings.llm_model, settings.llm_fallback_model) if name)
    listed = [{"id": name, "object": "model", "created": STARTED, "owned_by": "custom-llm-server"} for name in names]
    return {"object": "list", "data": listed}


async def health() -> dict[str, str]:
    """Liveness for load balancers; needs no key."""
    return {"status": "ok", "version": __version__}


async def ready(http: Request) -> Response:
    """Readiness: every agent's knowledge base is indexed and its upstream LLM answers; needs no key."""
    agents: Agents = http.app.state.agents
    problems = [] if agents.ready else ["the knowledge base is not indexed yet"]
    for svc in agents.services.values():
        named = "" if len(agents.services) == 1 else f" (agent {svc.name})"
        if not svc.settings.upstream_configured:
            problems.append("no upstream LLM is configured" + named)
        elif svc.llm is None or not await svc.llm.ready():
            problems.append("the upstream LLM does not answer" + named)
    body: dict[str, Any] = {"status": "unavailable", "problems": problems} if problems else {"status": "ready"}
    if agents.degraded:  # still serving (from memory): said, but no reason to take the replica out
        body["degraded"] = agents.degraded
    return Response(orjson.dumps(body), status_code=503 if problems else 200, media_type="application/json")


async def prometheus_metrics() -> Response:
    """Prometheus metrics, summed over worker processes; for the operator's key only (see BearerAuth)."""
    metrics.TASKS.set(len(asyncio.all_tasks()))
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)


API = ("", "/v1")  # OpenAI's SDKs put /v1 in base_url: every API path is served with it and without
EVERY_BASE = ("", "/v1", "/rag", "/v1/rag", "/audio", "/v1/audio")  # any base_url an SDK or a UI is given


@dataclass(frozen=True)
class Route:
    """A route, declared once: its path (under each prefix), handler, who may call it, its metrics label."""

    path: str
    handler: Callable[..., Awaitable[Any]]
    label: str
    method: str = "POST"
    access: Literal["agent", "operator", "public"] = "agent"  # an agent's key, the operator's, or none
    body: dict[str, Any] | None = None  # the request body's schema, for /openapi.json
    prefixes: tuple[str, ...] = ("",)
    documented: bool = True

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(prefix + self.path for prefix in self.prefixes)


ROUTES = (
    Route("/chat/completions", chat_completions, "chat", body=CHAT_BODY, prefixes=API),
    Route("/rag/chat/completions", rag_chat_completions, "rag", body=CHAT_BODY, prefixes=API),
    Route("/audio/chat/completions", audio_chat_completions, "audio", body=CHAT_BODY, prefixes=API),
    Route("/audio/speech", audio_speech, "speech", body=SPEECH_BODY, prefixes=API),
    Route("/models", models, "models", "GET", prefixes=EVERY_BASE),
    Route("/knowledge/search", knowledge_search, "search", "GET", prefixes=API),
    Route("/metrics", prometheus_metrics, "metrics", "GET", access="operator"),
    Route("/health", health, "health", "GET", access="public"),
    Route("/ready", ready, "ready", "GET", access="public"),
    Route("/", home, "home", "GET", access="public", documented=False),
    Route("/playground", playground, "playground", "GET", access="public", documented=False),  # when PLAYGROUND
)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    agents: Agents = app.state.agents
    await agents.start()
    # The probes left warm connections in the pools, so the first callers skip the handshake.
    # Everything made at start lives as long as the process: keep it out of the garbage
    # collector's full passes, which otherwise pause every stream now and then.
    gc.freeze()
    yield
    await agents.aclose()
    await app.state.limits.aclose()


def create_app(
    settings: Settings | None = None,
    tools: ToolRegistry | None = None,
    retriever: Retriever | None = None,
    voice: Engine | None = None,
    wording: Wording | None = None,
) -> FastAPI:
    """The ASGI app. Pass your own tools, retriever, voice or wording to change what the server does,
    knows, sounds like and says, for every agent (config/build.py says what each one replaces)."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    GuardedHttpTools.configure(
        settings.max_header_bytes, settings.header_timeout_seconds, settings.body_timeout_seconds
    )
    if not settings.api_keys and not settings.allow_unauthenticated and settings.agents_file is None:
        raise ValueError(
            "set CUSTOM_LLM_API_KEY (the key callers send), or ALLOW_UNAUTHENTICATED=true for local "
            "experiments; `custom-llm serve` makes a key for you"
        )
    agents = Agents(settings, tools, retriever, voice, wording or Wording())  # AGENTS_FILE's, or one agent
    if not agents.keys:
        log.warning("ALLOW_UNAUTHENTICATED is set: anyone who can reach this server can use it")
    app = FastAPI(
        title="Custom LLM server for Agora", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings, app.state.agents = settings, agents
    routes = [route for route in ROUTES if route.handler is not playground or settings.playground]
    for route in routes:
        for path in route.paths:
            app.add_api_route(
                path,
                route.handler,
                methods=[route.method],
                openapi_extra=route.body,
                include_in_schema=route.documented,
            )
    add_error_handlers(app)
    app.openapi = lambda: openapi_with(app, ChatCompletionRequest, SpeechRequest)  # type: ignore[method-assign]
    access = {path: route.access for route in routes for path in route.paths}
    operators = [key.encode() for key in (*settings.api_keys, *settings.metrics_api_key)]
    limits = Limits(settings.redis_url, settings.redis_required, settings.redis_timeout_seconds)
    app.state.limits = limits
    app.add_middleware(
        BearerAuth,
        keyring=lambda: agents.keys,
        operators=operators,
        access=access,
        limits=limits,
        drain=(settings.max_body_bytes, settings.refused_body_seconds),
    )
    app.add_middleware(EndsOnShutdown)
    app.add_middleware(RequestLog, labels={path: route.label for route in routes for path in route.paths})
    app.add_middleware(WithContext)  # the outermost: every other layer reads the request's context
    return app


# ---------------------------------------------------------------------------------------------
# The entry point: `custom-llm serve` (or `python3 custom_llm.py`); index, search and check
# ---------------------------------------------------------------------------------------------


def with_a_key(settings: Settings) -> Settings:
    """The settings with a caller key: CUSTOM_LLM_API_KEY, or the one kept in DATA_DIR (made once),
    put in the environment so that every worker reads it."""
    if settings.api_keys or settings.allow_unauthenticated or settings.agents_file is not None:
        return settings
    key, path, made = stored_key(settings.data_dir)
    # A server is never open by accident, and the developer needs the key for the agent's llm.api_key:
    # the file keeps it across restarts, and a terminal shows it; a log collector (a container's, a
    # service manager's) gets only where it is.
    said = "made one and kept it in" if made else "using the one kept in"
    shown = f": callers must send {key}" if sys.stderr.isatty() else " (callers send what it holds)"
    print(f"CUSTOM_LLM_API_KEY is not set; {said} {path}{shown}", file=sys.stderr, flush=True)
    os.environ["CUSTOM_LLM_API_KEY"] = key
    return dataclasses.replace(settings, api_keys=(key,))


def serve(settings: Settings) -> None:
    import uvicorn

    from custom_llm_server.serving.workers import run_workers

    settings = with_a_key(settings)
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
    if settings.agents_file is not None:  # each worker reads it again; a file that cannot be used stops here
        read_profiles(settings.agents_file, settings)
    # Each worker imports this module and builds its app from the environment (the key above included).
    # A worker busy indexing answers the supervisor's health check late: give it time.
    config = uvicorn.Config(
        "custom_llm:create_app", factory=True, workers=settings.workers, timeout_worker_healthcheck=30, **options
    )
    run_workers(config)


def knowledge_command(args: argparse.Namespace, settings: Settings) -> int:
    """`index [DIR]` and `search QUESTION`: the knowledge base from a terminal, with the server's
    settings, or an agent's (`--agent NAME`, from AGENTS_FILE)."""
    if args.agent:
        agents = read_profiles(settings.agents_file, settings) if settings.agents_file else {}
        if args.agent not in agents:
            print(f"custom-llm: no agent {args.agent!r} in AGENTS_FILE", file=sys.stderr)
            return 2
        settings = agents[args.agent].settings
    if args.folder:
        settings = dataclasses.replace(settings, knowledge_dir=Path(args.folder))
    if args.index_file:
        settings = dataclasses.replace(settings, knowledge_index=args.index_file)
    from custom_llm_server.knowledge.index import index_command, search_command

    knowledge = build.knowledge_base(settings, build.Capacity.of(settings))
    if args.command == "index":
        return asyncio.run(index_command(knowledge))
    return asyncio.run(search_command(knowledge, args.question, args.limit))


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custom-llm", description="The custom LLM server for Agora.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the server (the default)")
    index = commands.add_parser("index", help="index the knowledge folder (only what changed)")
    index.add_argument("folder", nargs="?", help="a folder other than KNOWLEDGE_DIR")
    search = commands.add_parser("search", help="show what a question retrieves")
    search.add_argument("question")
    search.add_argument("--folder", help="a folder other than KNOWLEDGE_DIR")
    search.add_argument("--limit", type=int, default=5)
    for command in (index, search):
        command.add_argument("--index-file", help="the SQLite index (default: KNOWLEDGE_INDEX, or DATA_DIR/index/)")
        command.add_argument("--agent", help="an agent of AGENTS_FILE: its knowledge settings")
    check = commands.add_parser("check", help="check any custom LLM URL against what Agora's engine sends and expects")
    check.add_argument("url", help="e.g. http://localhost:8000/rag/chat/completions")
    check.add_argument("--key", default="", help="the Bearer key the endpoint expects (none: an open endpoint)")
    check.add_argument("--model", default="gpt-4o-mini", help="the model name sent (default: gpt-4o-mini)")
    check.add_argument("--timeout", type=float, default=20.0, help="seconds each check may take (default: 20)")
    check.add_argument("--run-timeout", type=float, default=180.0, help="seconds all checks may take (default: 180)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`custom-llm [serve|index|search|check]`: the console script, and `python3 custom_llm.py`."""
    args = arguments().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "check":  # needs no settings: the endpoint may be anyone's
        from custom_llm_server.agora import checker  # only here: the server never needs this client

        bounds = checker.Bounds(check_seconds=args.timeout, run_seconds=args.run_timeout)
        return checker.run(args.url, args.key.strip(), args.model, bounds=bounds)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command in ("index", "search"):
            return knowledge_command(args, settings)
        serve(settings)
    except ValueError as error:  # a setting or AGENTS_FILE that cannot be used: said once, no traceback
        print(f"custom-llm: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
