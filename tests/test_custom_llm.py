"""custom_llm.py: settings, the entry point, several workers, and extending the server through create_app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import custom_llm

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
