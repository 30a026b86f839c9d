"""Fixtures: a scripted upstream and the server under test, both real uvicorn servers on loopback."""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custom_llm import Settings, create_app  # noqa: E402
from tests.upstream import ScriptedUpstream  # noqa: E402

API_KEY = "test-key"
UPSTREAM_KEY = "upstream-secret-key"


class ServerThread:
    """A uvicorn server on a free loopback port, in a thread of the test process."""

    def __init__(self, app, **config) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        knowledge = getattr(getattr(self.server.config.app, "state", None), "knowledge", None)
        while knowledge is not None and not knowledge.loaded:  # the index builds in the background
            assert time.monotonic() < deadline, "the knowledge base was not indexed"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def scripted_server():
    """A ScriptedUpstream served on loopback; the server carries it as .upstream."""
    upstream = ScriptedUpstream()
    with ServerThread(upstream) as server:
        server.upstream = upstream
        yield server


upstream_server = pytest.fixture(scope="session", name="upstream_server")(scripted_server)
fallback_server = pytest.fixture(scope="session", name="fallback_server")(scripted_server)


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
    base = Settings(llm_base_url=f"{upstream_server.url}/v1", llm_api_key=UPSTREAM_KEY, api_keys=(API_KEY,),
                    llm_first_token_timeout=2.0, llm_idle_timeout=2.0)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def make_server(upstream_server):
    """Start a server with some settings changed, or other tools: make_server(rag_top_k=1, tools=registry)."""
    started = []

    def make(tools=None, config=None, **overrides) -> ServerThread:
        server = ServerThread(create_app(settings_for(upstream_server, **overrides), tools), **(config or {})).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def server(upstream_server):
    with ServerThread(create_app(settings_for(upstream_server))) as server:
        yield server


@pytest.fixture
def client(server, upstream) -> openai.OpenAI:
    """The official SDK, pointed at the server under test."""
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=10)


@pytest.fixture
def http(server, upstream) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        yield http


def sse_events(response: httpx.Response) -> list[bytes]:
    """The data payloads of an SSE response, [DONE] included."""
    events = [block for block in response.read().split(b"\n\n") if block]
    assert all(block.startswith(b"data: ") for block in events), events
    return [block[6:] for block in events]
