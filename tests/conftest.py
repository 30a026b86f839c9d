"""Fixtures and the helpers every test file shares: a scripted upstream and the server under test,
both real uvicorn servers on loopback, and readers for SSE, answers, errors and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from custom_llm import Settings, create_app
from custom_llm_server.serving.protocol import GuardedHttpTools
from tests.scripted_llm import ScriptedUpstream

API_KEY = "test-key"
# Each test process (pytest-xdist runs two) keeps its indexes and keys apart, and removes them at the end.
DATA = Path(tempfile.mkdtemp(prefix="custom-llm-tests-"))
UPSTREAM_KEY = "upstream-secret-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


# The watchdog: every callback the event loop of a server under test runs is timed, and one that
# holds the loop for more than 100 ms fails the test that caused it. asyncio's debug mode reports the
# same by wall-clock time; here the servers share the test process with its client threads, whose
# GIL would be counted too, so the time is the loop thread's own CPU time, less the garbage
# collections that ran in it: a full collection walks the whole test process's heap (hypothesis's
# examples, the clients' objects), whatever callback happened to allocate when it came due.
WATCHDOG_SECONDS = 0.1
BLOCKED: list[str] = []
_run_callback = asyncio.events.Handle._run
_collecting = threading.local()  # per thread: when its collection began, and the seconds collections took


def _collection_timed(phase: str, info: dict) -> None:
    if phase == "start":
        _collecting.began = time.thread_time()
    elif hasattr(_collecting, "began"):
        _collecting.seconds = getattr(_collecting, "seconds", 0.0) + time.thread_time() - _collecting.began


gc.callbacks.append(_collection_timed)


def _timed_callback(handle: asyncio.events.Handle) -> None:
    if not getattr(handle._loop, "watched", False):
        return _run_callback(handle)
    started, collected = time.thread_time(), getattr(_collecting, "seconds", 0.0)
    try:
        return _run_callback(handle)
    finally:
        spent = time.thread_time() - started - (getattr(_collecting, "seconds", 0.0) - collected)
        if spent > WATCHDOG_SECONDS:
            BLOCKED.append(f"{str(handle)[:300]} held the loop for {spent * 1000:.0f} ms")


asyncio.events.Handle._run = _timed_callback  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def loop_watchdog():
    """Fails any test during which a server under test held its event loop for over 100 ms."""
    BLOCKED.clear()
    yield
    assert not BLOCKED, f"the event loop was blocked: {BLOCKED}"


class ServerThread:
    """A uvicorn server on a free loopback port, in a thread of the test process. `watched`: its
    loop is under the watchdog (the server under test; not the fakes around it)."""

    def __init__(self, app, watched: bool = False, **config) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.watched = watched
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **config))
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        async def serve() -> None:
            asyncio.get_running_loop().watched = self.watched  # type: ignore[attr-defined]
            await self.server.serve(sockets=[self.socket])

        asyncio.run(serve())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60  # generous: a busy machine starts servers slowly
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        agents = getattr(getattr(self.server.config.app, "state", None), "agents", None)
        for knowledge in agents.knowledge.values() if agents is not None else ():
            while not knowledge.retriever.ready:  # the index builds in the background
                assert time.monotonic() < deadline, "the knowledge base was not indexed"
                time.sleep(0.01)
            embedding = getattr(knowledge.retriever, "embedding", None)
            while embedding is not None and not embedding.done():  # and so do its vectors, with a model
                assert time.monotonic() < deadline + 120, "the knowledge base was not embedded"
                time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session", autouse=True)
def data_folder():
    yield DATA
    shutil.rmtree(DATA, ignore_errors=True)


def scripted_server():
    """A ScriptedUpstream served on loopback; the server carries it as .upstream."""
    upstream = ScriptedUpstream()
    with ServerThread(upstream) as server:
        server.upstream = upstream
        yield server


upstream_server = pytest.fixture(scope="session", name="upstream_server")(scripted_server)
fallback_server = pytest.fixture(scope="session", name="fallback_server")(scripted_server)


@pytest.fixture
def agora():
    """A fake of Agora's REST API on loopback (tests/test_agora.py's FakeAgora), recording each call."""
    from tests.test_agora import FakeAgora

    fake = FakeAgora()
    with ServerThread(fake) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def upstream(upstream_server) -> ScriptedUpstream:
    """The scripted LLM behind LLM_BASE_URL, reset for each test."""
    upstream_server.upstream.reset()
    return upstream_server.upstream


@pytest.fixture
def fallback(fallback_server) -> ScriptedUpstream:
    """A second scripted LLM, for LLM_FALLBACK_BASE_URL."""
    fallback_server.upstream.reset()
    return fallback_server.upstream


def settings_for(upstream_server, **overrides) -> Settings:
    base = Settings(
        llm_base_url=f"{upstream_server.url}/v1",
        llm_api_key=UPSTREAM_KEY,
        api_keys=(API_KEY,),
        llm_first_token_timeout=2.0,
        llm_idle_timeout=2.0,
        embedding_model="none",  # the built-in model costs seconds per index: tests that need meaning ask for it
        data_dir=DATA,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def make_server(upstream_server):
    """Start a server with some settings changed, or other tools: make_server(rag_top_k=1, tools=registry)."""
    started = []

    def make(tools=None, config=None, retriever=None, voice=None, wording=None, **overrides) -> ServerThread:
        app = create_app(settings_for(upstream_server, **overrides), tools, retriever, voice, wording)
        server = ServerThread(app, watched=True, **{"http": GuardedHttpTools, **(config or {})}).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def server(upstream_server):
    with ServerThread(create_app(settings_for(upstream_server)), watched=True, http=GuardedHttpTools) as server:
        yield server


@pytest.fixture
def client(server, upstream) -> openai.OpenAI:
    """The official SDK, pointed at the server under test."""
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=10)


@pytest.fixture
def http(server, upstream) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        yield http


def post(server: ServerThread, body: dict, path: str = "/chat/completions", **kw) -> httpx.Response:
    """One request to the server under test, with the key (unless headers say otherwise)."""
    return httpx.post(
        server.url + path, json=body, headers=kw.pop("headers", AUTH), timeout=kw.pop("timeout", 20), **kw
    )


def stream(server: ServerThread, body: dict, path: str = "/chat/completions") -> list[bytes]:
    """The SSE payloads of a streaming request."""
    return sse_events(post(server, {**body, "stream": True}, path))


def text_of(events: list[bytes]) -> str:
    """The words of a streamed answer."""
    text = ""
    for event in events[:-1]:
        choices = json.loads(event).get("choices") or [{}]
        text += choices[0].get("delta", {}).get("content") or ""
    return text


def audio_of(events: list[bytes]) -> list[dict]:
    """The audio deltas of a streamed /audio answer, checked to end with a stop chunk and [DONE]."""
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return [c["choices"][0]["delta"]["audio"] for c in chunks[:-1]]


def error_of(response: httpx.Response) -> dict:
    """The error of an OpenAI-shaped error answer."""
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]


def metric(server: ServerThread, series: str, key: str = API_KEY) -> float:
    """One series' value from /metrics (0 when absent), its labels in any order. One process serves
    every test server, so tests compare values before and after."""

    def parts(line: str) -> tuple[str, frozenset[str]]:
        name, _, labels = line.partition("{")
        return name, frozenset(labels.rstrip("}").split(",")) if labels else frozenset()

    wanted = parts(series)
    for line in httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {key}"}).text.splitlines():
        if not line.startswith("#") and parts(line.rsplit(" ", 1)[0]) == wanted:
            return float(line.split()[-1])
    return 0.0


def hold_a_stream(server: ServerThread, key: str = API_KEY) -> threading.Event:
    """Start a slow stream in the background; the event is set once it has begun."""
    started = threading.Event()

    def run() -> None:
        with httpx.stream(
            "POST",
            server.url + "/chat/completions",
            timeout=20,
            headers={"authorization": f"Bearer {key}"},
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True},
        ) as response:
            for _ in response.iter_lines():
                started.set()

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(5)
    return started


def dominant_frequency(pcm: bytes, rate: int) -> float:
    """The loudest frequency in some PCM (Hz)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


async def request_body(scope, receive, send) -> bytes | None:
    """For the small ASGI fakes of other services: the request's whole body; None for the lifespan
    messages, answered here."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    raw, more = b"", True
    while more:
        message = await receive()
        raw, more = raw + message.get("body", b""), message.get("more_body", False)
    return raw


def sse_events(response: httpx.Response) -> list[bytes]:
    """The data payloads of an SSE response, [DONE] included."""
    events = [block for block in response.read().split(b"\n\n") if block]
    assert all(block.startswith(b"data: ") for block in events), events
    return [block[6:] for block in events]


def eventually(condition, seconds: float = 3.0) -> bool:
    """Whether the condition holds within the time, asked every 20 ms."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def raw_connection(server: ServerThread) -> socket.socket:
    """A plain TCP connection to a server under test, for what no HTTP client would send."""
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def read_until_closed(connection: socket.socket) -> bytes:
    """What the server sends before it closes the connection (b"" if it only closes)."""
    received = b""
    while piece := connection.recv(65536):
        received += piece
    return received


def pytest_terminal_summary(terminalreporter) -> None:
    """Say loudly what did not run and why (a machine without espeak-ng, Node.js or Chromium skips
    those tests; .ci/run installs them)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} tests did NOT run", yellow=True, bold=True)
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"NOT RUN  {report.nodeid}: {reason}", yellow=True)
