"""checker.py: `python3 custom_llm.py check URL --key KEY` passes on this server and fails, with a clear
reason, on endpoints that misbehave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import checker
from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent


def run(url: str, key: str = API_KEY) -> tuple[int, list[str]]:
    lines: list[str] = []
    return checker.run(url, key, "m", lines.append), lines


@pytest.mark.parametrize("path", ["/chat/completions", "/rag/chat/completions"])
def test_this_server_passes(server, upstream, path):
    upstream.script.delay = 0.01
    upstream.script.words = ["One", " two.", " Three", " four."] * 10
    status, lines = run(server.url + path)
    assert status == 0, "\n".join(lines)
    assert not [line for line in lines if line.startswith("FAIL")]
    names = " ".join(lines)
    for check in (
        "streaming answer with Agora's fields",
        "time to first byte",
        "time to first sentence",
        "interrupted assistant message",
        "Agora's image part",
        "OpenAI's image part",
        "greeting broadcast",
        "wrong key",
        "error in OpenAI's shape",
        "hang-up mid-stream",
        "non-streaming",
    ):
        assert check in names, check
    assert "PASS  hang-up mid-stream: the endpoint counted the hang-up" in names
    assert lines[-1].startswith("11 passed, 0 failed")


def test_the_voice_endpoint_passes(make_server, upstream_server, upstream):
    upstream.script.words, upstream.script.delay = ["One two. ", "Three four. "] * 5, 0.05  # long enough to hang up on
    server = make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)
    status, lines = run(server.url + "/audio/chat/completions")
    assert status == 0, "\n".join(lines)


def test_an_endpoint_whose_upstream_fails_fails_with_the_reason(server, upstream):
    upstream.script.status = 500
    status, lines = run(server.url + "/chat/completions")
    assert status == 1
    assert "FAIL  streaming answer with Agora's fields: HTTP 502: The upstream LLM failed (status 500)." in lines
    assert lines[-1].split(",")[1].strip() != "0 failed"


def test_an_open_endpoint_fails_the_key_check(make_server, upstream):
    server = make_server(api_keys=(), allow_unauthenticated=True)
    status, lines = run(server.url + "/chat/completions")
    assert status == 1 and any(line.startswith("FAIL  wrong key: HTTP 200") for line in lines)


def test_an_unreachable_url_fails_cleanly():
    status, lines = run("http://127.0.0.1:9/chat/completions")
    assert status == 1 and all(line.startswith("FAIL") for line in lines[:-1]) and "ConnectError" in lines[0]


def test_the_command_line(server, upstream):
    upstream.script.delay, upstream.script.words = 0.01, ["One", " two."] * 20
    done = subprocess.run(
        [sys.executable, "custom_llm.py", "check", server.url + "/chat/completions", "--key", API_KEY, "--model", "m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("11 passed, 0 failed")
