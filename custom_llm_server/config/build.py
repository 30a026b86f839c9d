"""Each agent's objects, built from its settings: the upstream LLM client, the knowledge base, the
tools, the voice, the wording and Agora's REST API. The one place where settings become objects.

What `create_app(...)` passes in takes the place of what the settings would build, one rule per kind:
- retriever: it serves every agent; an agent's own knowledge settings are then unused (logged).
- tools: they replace the sample tools of every agent; SERVER_TOOLS still picks among them, and
  end_call is still added where Agora's REST credentials are set.
- voice: it speaks for every agent, within the speech limits; an agent's own TTS_* settings are then
  unused (logged). In files mode it says broadcasts and /audio/speech; /audio answers play the recording.
- wording: it is the base every agent starts from; an agent's WAITING_MESSAGES_*, BRIDGE_MESSAGES_*,
  INTERRUPTED_MARK_* and GROUNDING_PROMPT still change it (the settings win).

The limits on calls in flight are the process's (Capacity): every agent's upstream calls and hosted
embeddings count against one MAX_UPSTREAM_STREAMS, every voice against one MAX_SPEECH_STREAMS.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from custom_llm_server.agora.engine import as_heard
from custom_llm_server.agora.rest import AGENT_ID, UID, AgoraREST, BasicAuth, Hangups, TokenAuth, end_call_tool
from custom_llm_server.config.settings import BUILTIN_EMBEDDING, Settings
from custom_llm_server.core.bounds import Slots
from custom_llm_server.core.context import Context
from custom_llm_server.core.intent import ends_the_call
from custom_llm_server.core.wording import Wording
from custom_llm_server.knowledge.rag import NoKnowledge, Retriever, has_documents, search_knowledge_tool
from custom_llm_server.llm.http_tools import HttpCaller, HttpTool
from custom_llm_server.llm.later import Later
from custom_llm_server.llm.tools import ToolRegistry, sample_tools
from custom_llm_server.llm.upstream import LLM, Endpoint, Limits
from custom_llm_server.voice.engines import Bounded, Engine, local_engine, speech_engine

if TYPE_CHECKING:  # imported where it is made: a server with no documents never loads it
    from custom_llm_server.knowledge.embeddings import Embedder
    from custom_llm_server.knowledge.index import Knowledge
    from custom_llm_server.knowledge.store import Store

log = logging.getLogger("custom_llm.build")

KNOWLEDGE_SETTINGS = (
    "knowledge_dir", "knowledge_index", "knowledge_store", "knowledge_store_timeout_seconds",
    "knowledge_max_file_bytes", "knowledge_file_seconds", "rag_min_coverage",
    "embedding_model", "embedding_base_url", "embedding_api_key", "embedding_threads", "rag_min_similarity",
)  # fmt: skip
VOICE_SETTINGS = ("tts_engine", "tts_base_url", "tts_api_key", "tts_model", "tts_voice", "tts_sample_rate")


@dataclass(frozen=True)
class Capacity:
    """The process's caps on calls in flight, shared by every agent (made once, kept across reloads)."""

    upstream: Slots
    speech: Slots
    tools: Slots  # calls to agents' HTTP tools

    @classmethod
    def of(cls, settings: Settings) -> Capacity:
        return cls(
            Slots(settings.max_upstream_streams, "MAX_UPSTREAM_STREAMS"),
            Slots(settings.max_speech_streams, "MAX_SPEECH_STREAMS"),
            Slots(settings.max_http_tool_calls, "MAX_HTTP_TOOL_CALLS"),
        )


def unused(agent: str, settings: Settings, server: Settings, names: tuple[str, ...], given: str) -> None:
    """Log the agent's own values that something given to create_app() takes the place of."""
    own = [
        spec.metadata["env"]
        for spec in dataclasses.fields(Settings)
        if spec.name in names and getattr(settings, spec.name) != getattr(server, spec.name)
    ]
    if own:
        log.warning("agent %s: %s given to create_app() serves it; its own %s are unused", agent, given, ", ".join(own))


def upstream(settings: Settings, capacity: Capacity) -> LLM:
    """The upstream LLM client: the primary, and the fallback when one is set."""
    fallback = None
    if settings.llm_fallback_base_url:
        fallback = Endpoint(
            "fallback", settings.llm_fallback_base_url, settings.llm_fallback_api_key, settings.llm_fallback_model
        )
    limits = Limits(
        settings.llm_connect_timeout,
        settings.llm_first_token_timeout,
        settings.llm_idle_timeout,
        settings.llm_max_stream_seconds,
        settings.llm_max_event_bytes,
        settings.llm_max_response_bytes,
    )
    return LLM(Endpoint("primary", settings.llm_base_url, settings.llm_api_key), fallback, limits, capacity.upstream)


def wording(settings: Settings, base: Wording) -> Wording:
    """The base wording (create_app's, or wording.py's) with what the settings change."""

    def by_language(given: Mapping[str, Any], en: Any, zh: Any) -> dict[str, Any]:
        return {"en": given["en"] if en is None else en, "zh": given["zh"] if zh is None else zh}

    return dataclasses.replace(
        base,
        waiting=by_language(base.waiting, settings.waiting_messages_en, settings.waiting_messages_zh),
        bridge=by_language(base.bridge, settings.bridge_messages_en, settings.bridge_messages_zh),
        interrupted_mark=by_language(base.interrupted_mark, settings.interrupted_mark_en, settings.interrupted_mark_zh),
        grounding_prompt=settings.grounding_prompt or base.grounding_prompt,
    )


def agora_rest(settings: Settings) -> AgoraREST | None:
    """Agora's REST API with a token signed by the App Certificate (Agora's production method), else
    with the customer id and secret; None without credentials. Ids that are not Agora's are refused."""
    if settings.agora_app_id and not AGENT_ID.fullmatch(settings.agora_app_id):
        raise ValueError("AGORA_APP_ID is not an Agora App ID (letters and digits)")
    if settings.agora_app_certificate and not all(
        re.fullmatch(r"[0-9a-fA-F]{32}", value) for value in (settings.agora_app_id, settings.agora_app_certificate)
    ):  # Agora's token builder signs only these; anything else would be an empty token
        raise ValueError("token authentication needs AGORA_APP_ID and AGORA_APP_CERTIFICATE of 32 hex digits")
    if not UID.fullmatch(settings.agora_agent_uid):
        raise ValueError("AGORA_AGENT_UID is not an Agora uid")
    auth: TokenAuth | BasicAuth
    if settings.agora_app_certificate:
        auth = TokenAuth(settings.agora_app_certificate)
    elif settings.agora_customer_id and settings.agora_customer_secret:
        auth = BasicAuth(settings.agora_customer_id, settings.agora_customer_secret)
    else:
        return None
    if not settings.agora_app_id:
        return None
    telephony = None
    if settings.agora_telephony:  # Agora's telephony hang-up takes Basic auth only
        if not (settings.agora_customer_id and settings.agora_customer_secret):
            raise ValueError(
                "AGORA_TELEPHONY hangs calls up with Agora's Basic auth: set AGORA_CUSTOMER_ID and _SECRET"
            )
        telephony = BasicAuth(settings.agora_customer_id, settings.agora_customer_secret)
    return AgoraREST(settings.agora_app_id, auth, settings.agora_api_base, settings.agora_agent_uid, telephony)


def tools(
    settings: Settings,
    retriever: Retriever,
    given: ToolRegistry | None,
    words: Wording,
    declared: tuple[HttpTool, ...] = (),
    caller: HttpCaller | None = None,
    later: Later | None = None,
) -> ToolRegistry:
    """The server's tools: the given or sample ones, as SERVER_TOOLS selects; the HTTP tools the
    agent's table declares (called by `caller`); and end_call when Agora's REST credentials are set (it
    runs when the user's words say goodbye)."""
    registry = (given or sample_tools(search_knowledge_tool(retriever))).select(settings.server_tools)
    for tool in declared:
        assert caller is not None
        if tool.name in registry.tools or tool.name == "end_call":
            raise ValueError(f"the agents file's tool {tool.name} has the name of a server tool: give it another")
        registry.declare(
            tool.name, tool.description, tool.parameters, caller.function(tool), tool.timeout_seconds, tool.destructive
        )
    rest = agora_rest(settings)
    if rest is not None:
        grace, graceful = settings.agora_hangup_grace_ms / 1000, settings.agora_graceful_leave
        hangups = Hangups(rest, grace, graceful, settings.agora_max_pending_hangups)
        asked = ends_the_call(words.farewells)  # the user's words say goodbye, and nothing else
        ending = later.forget if later is not None else None
        registry.add(end_call_tool(hangups, ending), name="end_call", heard_whole=True, destructive=asked)
    return registry


def retriever(settings: Settings, capacity: Capacity) -> Retriever:
    """The default retriever: the index of KNOWLEDGE_DIR, or nothing at all for a folder with no
    document (then neither the index nor its dictionaries or model are ever loaded)."""
    if not settings.knowledge_store and not has_documents(settings.knowledge_dir):
        return NoKnowledge(settings.knowledge_dir)
    return knowledge_base(settings, capacity)


def knowledge_base(settings: Settings, capacity: Capacity) -> Knowledge:
    from custom_llm_server.knowledge.index import Knowledge, KnowledgeBase

    base = KnowledgeBase(
        settings.knowledge_dir,
        store(settings),
        settings.rag_min_coverage,
        settings.knowledge_max_file_bytes,
        settings.knowledge_file_seconds,
    )
    return Knowledge(base, embedder(settings, capacity))


def store(settings: Settings) -> Store:
    """Where the knowledge base is kept: PostgreSQL shared by replicas (KNOWLEDGE_STORE), or the
    SQLite file of the folder (KNOWLEDGE_INDEX, or one under DATA_DIR/index/)."""
    from custom_llm_server.knowledge.store import SQLiteStore, default_path

    if settings.knowledge_store:
        from custom_llm_server.knowledge.postgres import PostgresStore

        return PostgresStore(settings.knowledge_store, settings.knowledge_dir, settings.knowledge_store_timeout_seconds)
    return SQLiteStore(settings.knowledge_index or default_path(settings.data_dir, settings.knowledge_dir))


def embedder(settings: Settings, capacity: Capacity) -> Embedder | None:
    """The embedding model: none, the built-in one, or a hosted one (EMBEDDING_MODEL, EMBEDDING_BASE_URL)."""
    from custom_llm_server.knowledge.embeddings import BuiltinModel, HostedModel

    if settings.embedding_model.lower() == "none":
        return None
    if settings.embedding_model == BUILTIN_EMBEDDING and not settings.embedding_base_url:
        return BuiltinModel(settings.embedding_threads, settings.rag_min_similarity)
    return HostedModel(
        settings.embedding_base_url or settings.llm_base_url,
        settings.embedding_api_key or settings.llm_api_key,
        settings.embedding_model,
        capacity.upstream,
        settings.rag_min_similarity,
    )


def voice(settings: Settings, llm: LLM, given: Engine | None, capacity: Capacity) -> Bounded | None:
    """The voice /audio speaks with, within the speech limits: the given one, the TTS engine, or in
    files mode espeak-ng where it is installed."""
    engine = given or _engine(settings, llm)
    if engine is None:
        return None
    return Bounded(engine, capacity.speech, settings.tts_timeout_seconds, settings.tts_max_seconds)


def _engine(settings: Settings, llm: LLM) -> Engine | None:
    if settings.audio_source == "files":
        return local_engine()
    return speech_engine(
        settings.tts_engine,
        llm.session,
        settings.tts_base_url or settings.llm_base_url,
        settings.tts_api_key or settings.llm_api_key,
        settings.tts_model,
        settings.tts_voice,
        settings.tts_sample_rate,
    )


def later(settings: Settings, words: Wording, llm: Callable[[], LLM | None]) -> Later | None:
    """Slow tool calls answered after the turn (TOOL_ASYNC_AFTER_MS): said by the channel's agent through
    Agora's `speak`, in a sentence the agent's model makes from the result. None without Agora's
    credentials (a slow call then holds the answer, as any call does)."""
    rest = agora_rest(settings)
    if rest is None or settings.tool_async_after_ms <= 0:
        return None

    async def say(context: Context, text: str) -> str:
        return await rest.speak(context.channel, context.agent_id, context.agent_uid, text)

    async def phrase(messages: list[dict[str, Any]]) -> str:
        upstream = llm()
        if upstream is None:
            return ""
        body = {
            "model": settings.llm_model,
            "stream": False,
            "max_tokens": 150,
            "messages": [{"role": "system", "content": words.later_prompt}, *(as_heard(m) for m in messages)],
        }
        answer = orjson.loads(await upstream.complete(body, Context("later")))
        content = answer["choices"][0]["message"].get("content")
        return content if isinstance(content, str) else ""

    return Later(settings.tool_async_after_ms, say, phrase)
