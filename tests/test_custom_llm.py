"""custom_llm.py: settings, the entry point, several workers, and extending the server through create_app."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import custom_llm
from tests.conftest import AUTH, post

ROOT = Path(__file__).resolve().parent.parent
ASK = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}


def test_create_app_refuses_to_serve_without_a_key(upstream_server):
    from tests.conftest import settings_for

    with pytest.raises(ValueError, match="CUSTOM_LLM_API_KEY"):
        custom_llm.create_app(settings_for(upstream_server, api_keys=()))


def test_bad_settings_fail_at_start_with_the_variable_named(monkeypatch):
    for name, value in (
        ("PORT", "eighty"),
        ("AUDIO_SOURCE", "radio"),
        ("ALLOW_UNAUTHENTICATED", "maybe"),
        ("RAG_TOP_K", "-1"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            custom_llm.Settings.from_env()
        monkeypatch.delenv(name)


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUSTOM_LLM_API_KEY", "a, b")
    monkeypatch.setenv("LLM_MODEL", "llama3")
    monkeypatch.setenv("STRIP_FIELDS", "tenant")
    monkeypatch.setenv("WAITING_MESSAGES_EN", "Wait.|Hold on.")
    settings = custom_llm.Settings.from_env()
    assert settings.api_keys == ("a", "b") and settings.llm_model == "llama3"
    assert settings.strip_fields == {"tenant"}  # beside the engine fields, which are always kept back
    assert settings.waiting_messages_en == ("Wait.", "Hold on.")


def test_two_workers_share_the_key_and_the_metrics(upstream_server, upstream, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        number = free.getsockname()[1]
    env = {
        **os.environ,
        "WORKERS": "2",
        "PORT": str(number),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "LLM_API_KEY": "k",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    env.pop("CUSTOM_LLM_API_KEY", None)
    process = subprocess.Popen([sys.executable, "custom_llm.py"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        key = None
        while key is None:  # the key is printed once, by the parent, and both workers accept it
            line = process.stderr.readline()
            assert line, "the server exited"
            if "callers must send this key:" in line:
                key = line.rsplit(":", 1)[1].strip()
        url, headers = f"http://127.0.0.1:{number}", {"authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with httpx.Client() as client:
                assert client.post(url + "/chat/completions", json=ASK, headers=headers).status_code == 200
        text = httpx.get(url + "/metrics", headers=headers).text
        assert 'custom_llm_requests_total{endpoint="chat",status="200"} 20.0' in text
    finally:
        process.terminate()
        process.wait(10)


def test_unknown_server_tool_names_fail_at_start(upstream_server):
    from custom_llm import create_app
    from tests.conftest import settings_for

    with pytest.raises(ValueError, match="unknown tools: nope"):
        create_app(settings_for(upstream_server, server_tools=("nope",)))


# --- customising: each is one file of yours, handed to create_app ---------------------------------


class Catalogue:
    """A retriever of one's own: a dictionary instead of the SQLite index."""

    ready = True

    async def start(self) -> None:
        pass

    async def search(self, question: str, limit: int) -> list:
        from knowledge import Passage

        if "kettle" not in question.lower():
            return []  # nothing relevant: /rag injects nothing
        return [Passage("The K-2 kettle costs 49 euros.", "catalogue", "Kettles › K-2", 1.0)][:limit]

    async def aclose(self) -> None:
        pass


def test_a_retriever_of_your_own(make_server, upstream):
    server = make_server(retriever=Catalogue())
    post(server, {"messages": [{"role": "user", "content": "How much is the kettle?"}]}, "/rag/chat/completions")
    context = upstream.requests[-1]["body"]["messages"][0]["content"]
    assert "catalogue › Kettles › K-2" in context and "49 euros" in context
    hits = httpx.get(server.url + "/knowledge/search", params={"q": "kettle"}, headers=AUTH).json()["passages"]
    assert hits == [{"source": "catalogue", "heading": "Kettles › K-2", "score": 1.0, "text": "The K-2 kettle costs 49 euros."}]
    post(server, {"messages": [{"role": "user", "content": "Hello!"}]}, "/rag/chat/completions")
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]


def test_a_tool_of_your_own(make_server, upstream):
    from tools import ToolRegistry

    registry = ToolRegistry()

    def order_status(order_id: str) -> dict:
        """The delivery status of an order."""
        return {"order_id": order_id, "status": "shipped"}

    registry.add(order_status)
    server = make_server(tools=registry)
    upstream.script.turns = [{"calls": [("order_status", '{"order_id": "A7"}')]}, {"say": ["It shipped."]}]
    answer = post(server, {"messages": [{"role": "user", "content": "Where is order A7?"}]}).json()
    assert answer["choices"][0]["message"]["content"] == "It shipped."
    assert upstream.requests[0]["body"]["tools"][0]["function"]["name"] == "order_status"
    assert '"status":"shipped"' in upstream.requests[1]["body"]["messages"][-1]["content"]


class Beeper:
    """A voice of one's own: any object with synthesize(text) yielding 16 kHz mono s16le PCM."""

    def __init__(self) -> None:
        self.said: list[str] = []

    async def synthesize(self, text: str):
        self.said.append(text)
        yield b"\x10\x00" * 1600 * len(text.split())  # 100 ms a word


def test_a_voice_of_your_own(make_server, upstream):
    voice = Beeper()
    server = make_server(audio_source="tts", voice=voice)
    upstream.script.words = ["Two words. ", "Three more words."]
    answer = post(server, {"messages": [{"role": "user", "content": "Speak"}]}, "/audio/chat/completions").json()
    audio = answer["choices"][0]["message"]["audio"]
    assert voice.said == ["Two words.", "Three more words."] and audio["transcript"] == "Two words. Three more words."
    # Five words, 100 ms each at 16 kHz; each sentence's last 40 ms frame is padded with silence.
    assert 5 * 3200 <= len(base64.b64decode(audio["data"])) < 5 * 3200 + 2 * 1280
