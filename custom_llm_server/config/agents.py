"""The agents this server serves: one Service per profile (its upstream, knowledge, tools and voice),
chosen by the caller's key, started and stopped with the app, and replaced when AGENTS_FILE changes.

A reload applies to new requests. A request holds the Service it started with, so answers in flight
finish on the old profile; a replaced Service is closed once no answer uses it. A file that cannot be
used keeps the profiles that are running, and the log says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import NamedTuple

from custom_llm_server.config import build
from custom_llm_server.config.build import Capacity
from custom_llm_server.config.profiles import Profile, read_profiles, single
from custom_llm_server.config.settings import Settings
from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import ApiError
from custom_llm_server.core.redact import printable
from custom_llm_server.core.wording import Wording
from custom_llm_server.knowledge.rag import Retriever
from custom_llm_server.llm.answer import ToolLoop
from custom_llm_server.llm.http_tools import MAX_TIMEOUT_SECONDS, HttpCaller
from custom_llm_server.llm.tools import ToolRegistry
from custom_llm_server.llm.upstream import LLM
from custom_llm_server.voice.engines import Bounded, Engine

log = logging.getLogger("custom_llm.agents")

LATER_SECONDS = MAX_TIMEOUT_SECONDS + 30  # a slow tool's longest run, then the sentence made and said


@dataclass
class Service:
    """What one agent's requests share: made from its profile, opened at start."""

    profile: Profile
    retriever: Retriever
    loop: ToolLoop
    wording: Wording
    capacity: Capacity
    http: HttpCaller  # the agent's HTTP tools' connections
    given_voice: Engine | None = None  # create_app(voice=...)
    llm: LLM | None = None
    voice: Bounded | None = None  # the voice in use, within the speech limits (made at start)
    users: int = 0  # requests being answered with this agent
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def serve(self, context: Context) -> Service:
        """This agent, for one request, counted until its answer has been sent (a reload closes a
        replaced agent only once nothing uses it: an answer of several rounds may outlast any one stream)."""
        self.users += 1
        self.idle.clear()
        context.when_answered.append(self._done)
        return self

    def _done(self) -> None:
        self.users -= 1
        if not self.users:
            self.idle.set()

    def longest_answer(self) -> float:
        """The longest an answer may take: each of its rounds streams at most LLM_MAX_STREAM_SECONDS."""
        settings = self.settings
        return (settings.tool_max_rounds + 1) * (settings.llm_first_token_timeout + settings.llm_max_stream_seconds)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def settings(self) -> Settings:
        return self.profile.settings

    def upstream(self) -> LLM:
        if not self.settings.upstream_configured or self.llm is None:
            raise ApiError(
                503,
                "No upstream LLM is configured: set LLM_API_KEY (and LLM_BASE_URL for a provider other than OpenAI).",
                "server_error",
                "no_upstream",
            )
        return self.llm

    async def start(self) -> None:
        settings = self.settings
        self.llm = build.upstream(settings, self.capacity)
        self.voice = build.voice(settings, self.llm, self.given_voice, self.capacity)
        if self.given_voice is not None and settings.audio_source == "files":
            log.warning(
                "agent %s: the voice given to create_app speaks broadcasts and /audio/speech; /audio answers "
                "play the recorded files until AUDIO_SOURCE=tts",
                self.name,
            )
        if not settings.upstream_configured:
            log.warning(
                "agent %s has no upstream LLM: set LLM_API_KEY (or LLM_BASE_URL for a keyless local model); "
                "until then its chat endpoints answer 503, while /audio broadcasts and recorded answers work",
                self.name,
            )
        elif not await self.llm.primary.probe():
            log.warning("agent %s: the upstream LLM at %s does not answer yet", self.name, settings.llm_base_url)

    async def aclose(self) -> None:
        if self.loop.later is not None:
            await self.loop.later.aclose()
        if self.llm is not None:
            await self.llm.aclose()
        await self.http.aclose()


def knowledge_key(settings: Settings) -> tuple[object, ...]:
    """What makes a knowledge base: agents that agree on all of it share one (one index, one indexer)."""
    return (
        settings.knowledge_dir.resolve(), settings.knowledge_index, settings.knowledge_store,
        settings.knowledge_store_timeout_seconds, settings.data_dir, settings.rag_min_coverage,
        settings.knowledge_max_file_bytes, settings.knowledge_file_seconds, settings.embedding_model,
        settings.embedding_base_url or settings.llm_base_url, settings.embedding_api_key or settings.llm_api_key,
        settings.embedding_threads, settings.rag_min_similarity,
    )  # fmt: skip


@dataclass
class SharedRetriever:
    """A knowledge base some agents share, and its indexing, which runs beside the requests."""

    retriever: Retriever
    indexing: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.indexing = asyncio.ensure_future(self.retriever.start())

    async def aclose(self) -> None:
        await self.retriever.aclose()  # stops indexing between two files: a shutdown never waits for it
        if self.indexing is not None:
            self.indexing.cancel()
            await asyncio.gather(self.indexing, return_exceptions=True)


class Key(NamedTuple):
    """A caller key, the agent it selects, and its limits (0: none): requests in flight, started a minute."""

    secret: bytes
    agent: str
    max_in_flight: int
    per_minute: int


@dataclass
class Agents:
    """The running agents by name, the keys that select them, and the reloads of AGENTS_FILE."""

    settings: Settings  # the server's own: what a profile leaves out
    tools: ToolRegistry | None = None  # create_app's: see config/build.py for what each replaces
    retriever: Retriever | None = None
    voice: Engine | None = None
    wording: Wording = field(default_factory=Wording)
    capacity: Capacity | None = None  # the process's limits on calls in flight, kept across reloads
    services: dict[str, Service] = field(default_factory=dict)
    knowledge: dict[tuple[object, ...], SharedRetriever] = field(default_factory=dict)
    keys: list[Key] = field(default_factory=list)
    read_stamp: tuple[float, int] | None = None  # the agents file as it was when last read
    _watching: asyncio.Task[None] | None = None
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.capacity = self.capacity or Capacity.of(self.settings)
        knowledge: dict[tuple[object, ...], SharedRetriever] = {}
        self.services = {name: self.service(p, knowledge) for name, p in self.profiles().items()}  # or raises
        self.knowledge, self.keys = knowledge, self.keyring()

    def profiles(self) -> dict[str, Profile]:
        if self.settings.agents_file is None:
            return single(self.settings)
        self.read_stamp = _stamp(self.settings.agents_file)
        profiles = read_profiles(self.settings.agents_file, self.settings)
        one_index_per_folder(profiles)
        return profiles

    def service(self, profile: Profile, knowledge: dict[tuple[object, ...], SharedRetriever]) -> Service:
        """The agent of a profile, with the knowledge base (found in, or added to, `knowledge`) that it
        shares with the agents that agree on it."""
        settings, capacity = profile.settings, self.capacity
        assert capacity is not None
        if self.retriever is not None:
            build.unused(profile.name, settings, self.settings, build.KNOWLEDGE_SETTINGS, "the retriever")
        if self.voice is not None:
            build.unused(profile.name, settings, self.settings, build.VOICE_SETTINGS, "the voice")
        key = ("given",) if self.retriever is not None else knowledge_key(settings)
        if key not in knowledge:
            knowledge[key] = SharedRetriever(self.retriever or build.retriever(settings, capacity))
        retriever = knowledge[key].retriever
        wording = build.wording(settings, self.wording)
        http = HttpCaller(capacity.tools)
        service: Service | None = None
        later = build.later(settings, wording, lambda: service.llm if service else None)
        registry = build.tools(settings, retriever, self.tools, wording, profile.tools, http, later)
        loop = ToolLoop(
            registry, settings.tool_max_rounds, settings.tool_bridge_ms, settings.tool_max_calls,
            settings.tool_max_argument_bytes, wording.bridge, later,
        )  # fmt: skip
        service = Service(profile, retriever, loop, wording, capacity, http, self.voice)
        return service

    def keyring(self) -> list[Key]:
        return [
            Key(key.encode(), name, svc.settings.max_streams_per_key, svc.settings.max_requests_per_minute_per_key)
            for name, svc in self.services.items()
            for key in svc.profile.keys
        ]

    def get(self, name: str) -> Service | None:
        return self.services.get(name)

    @property
    def ready(self) -> bool:
        return all(knowledge.retriever.ready for knowledge in self.knowledge.values())

    @property
    def degraded(self) -> list[str]:
        """What serves from a fallback right now (a knowledge store out of reach), for GET /ready."""
        found = (getattr(knowledge.retriever, "degraded", None) for knowledge in self.knowledge.values())
        return [f"knowledge store: {why}" for why in found if why]

    async def start(self) -> None:
        for knowledge in self.knowledge.values():
            knowledge.start()
        await asyncio.gather(*(svc.start() for svc in self.services.values()))
        if self.settings.agents_file is None:
            return
        try:  # the main thread only; an app embedded elsewhere reloads by watching the file
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        except (ValueError, RuntimeError, NotImplementedError):
            pass
        if self.settings.agents_watch_seconds > 0:
            self._watching = asyncio.ensure_future(self.watch())

    async def aclose(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
        for task in self._retiring:
            task.cancel()
        closing = [*(svc.aclose() for svc in self.services.values()), *(k.aclose() for k in self.knowledge.values())]
        await asyncio.gather(*closing, *self._retiring, return_exceptions=True)

    async def watch(self) -> None:
        """Reload when the file's size or time of change moves (since it was read: a change made while
        the server started is seen too). Whatever a reload meets, the watch goes on."""
        path = self.settings.agents_file
        assert path is not None
        while True:
            await asyncio.sleep(self.settings.agents_watch_seconds)
            stamp = _stamp(path)
            if stamp != self.read_stamp:
                self.read_stamp = stamp
                await self.reload()

    async def reload(self) -> bool:
        """Read the file again; the new profiles serve new requests. False if the file cannot be used
        (the running agents stay, and the log says why)."""
        async with self._reloading:  # a SIGHUP and a change seen at once make one reload after another
            try:
                return await self._reload()
            except Exception as error:  # an index that cannot be made, an agent that cannot start...
                log.error("AGENTS_FILE not reloaded, the running agents stay: %s", printable(error, 300))
                return False

    async def _reload(self) -> bool:
        knowledge = dict(self.knowledge)
        try:  # in a thread: a first knowledge base imports its dictionaries, which takes seconds
            profiles = await asyncio.to_thread(self.profiles)
            kept = {name: svc for name, svc in self.services.items() if profiles.get(name) == svc.profile}
            fresh = await asyncio.to_thread(
                lambda: {name: self.service(p, knowledge) for name, p in profiles.items() if name not in kept}
            )
        except ValueError as error:  # ProfileError, or a setting a profile's value makes unusable
            log.error("AGENTS_FILE not reloaded, the running agents stay: %s", printable(error, 300))
            return False
        for key in knowledge.keys() - self.knowledge.keys():
            knowledge[key].start()
        await asyncio.gather(*(svc.start() for svc in fresh.values()))
        retired = [svc for name, svc in self.services.items() if name not in kept]
        for name, svc in fresh.items():  # the channels' results that came late stay theirs
            old = self.services.get(name)
            if old is not None and old.loop.later is not None and svc.loop.later is not None:
                svc.loop.later.kept = old.loop.later.kept
        self.services = {**kept, **fresh}
        used = {id(svc.retriever) for svc in self.services.values()}
        unused = [k for k in knowledge.values() if id(k.retriever) not in used]
        self.knowledge = {key: k for key, k in knowledge.items() if id(k.retriever) in used}
        self.keys = self.keyring()
        task = asyncio.ensure_future(self._retire(retired, unused))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("AGENTS_FILE reloaded: %d agents, %d changed", len(self.services), len(fresh))
        return True

    @staticmethod
    async def _retire(services: list[Service], knowledge: list[SharedRetriever]) -> None:
        """Close what a reload replaced once the answers that use it are done (or could no longer be
        running), the agents first, then the knowledge bases only they used."""
        for svc in services:
            try:
                async with asyncio.timeout(svc.longest_answer()):
                    await svc.idle.wait()
            except TimeoutError:
                log.warning("agent %s was replaced; %d answers still used it when it closed", svc.name, svc.users)
        # A slow tool's promise made by a replaced agent is kept: its result is still said (within the
        # tool's own timeout and Agora's), into the results the agent's successor reads.
        await asyncio.gather(*(svc.loop.later.drain(LATER_SECONDS) for svc in services if svc.loop.later))
        await asyncio.gather(*(svc.aclose() for svc in services), return_exceptions=True)
        await asyncio.gather(*(k.aclose() for k in knowledge), return_exceptions=True)


def one_index_per_folder(profiles: dict[str, Profile]) -> None:
    """Refuse agents that name one index file for different knowledge folders: each folder's index
    holds its documents only, or one agent's key would read another's passages."""
    folders: dict[str, tuple[str, object]] = {}
    for name, profile in profiles.items():
        settings = profile.settings
        if not settings.knowledge_index:
            continue  # one file per folder, named for it
        folder = settings.knowledge_dir.resolve()
        first = folders.setdefault(settings.knowledge_index, (name, folder))
        if first[1] != folder:
            raise ValueError(
                f"agents {first[0]} and {name} have different knowledge folders in one index file "
                "(KNOWLEDGE_INDEX): give each its own knowledge_index, or leave it empty (one file per folder)"
            )


def _stamp(path: os.PathLike[str]) -> tuple[float, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime, status.st_size
