"""checker.py: `python3 custom_llm.py check URL --key KEY` passes on this server and fails, with a clear
reason, on endpoints that misbehave."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custom_llm_server.agora import checker
from tests.conftest import API_KEY, ServerThread

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
        "wrong key",
        "error in OpenAI's shape",
        "hang-up mid-stream",
        "non-streaming",
    ):
        assert check in names, check
    assert "PASS  hang-up mid-stream: the endpoint counted the hang-up" in names
    # The engine asks for a greeting to be said only in audio mode.
    assert "SKIP  greeting broadcast" in names
    assert lines[-1].startswith("10 passed, 0 failed, 0 warnings, 1 skipped")


def test_the_voice_endpoint_passes(make_server, upstream_server, upstream):
    upstream.script.words, upstream.script.delay = ["One two. ", "Three four. "] * 5, 0.05  # long enough to hang up on
    server = make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)
    status, lines = run(server.url + "/audio/chat/completions")
    assert status == 0, "\n".join(lines)
    assert any(line.startswith("PASS  greeting broadcast") for line in lines)


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


def test_without_a_key_an_open_endpoint_is_checked_and_said_to_be_open(make_server, upstream):
    upstream.script.delay, upstream.script.words = 0.01, ["One", " two."] * 20
    server = make_server(api_keys=(), allow_unauthenticated=True)
    status, lines = run(server.url + "/chat/completions", key="")
    assert status == 0, "\n".join(lines)
    assert "WARN  open endpoint: no --key given, and it answers: anyone who finds the URL can use it" in lines


def test_without_a_key_a_closed_endpoint_says_so_first_and_stops(server, upstream):
    """One line, the first, and the run stops: not seven that each repeat the 401."""
    status, lines = run(server.url + "/chat/completions", key="")
    assert status == 1
    assert lines == [
        "FAIL  a key: the endpoint wants one (HTTP 401): run again with --key KEY",
        f"0 passed, 1 failed, 0 warnings, 0 skipped ({server.url}/chat/completions)",
    ]


def test_a_wrong_key_says_so_first_and_stops(server, upstream):
    status, lines = run(server.url + "/chat/completions", key="not-the-key")
    assert (
        status == 1 and lines[0] == "FAIL  the key: the endpoint refuses it (HTTP 401): check --key" and len(lines) == 2
    )


@pytest.mark.parametrize("path", ["/v2/chat/completions", "/v1/chat", "/chat/completion"])
def test_a_url_that_is_no_endpoint_is_a_404_with_its_path(server, upstream, path):
    """A /v1/... URL that 404s was reported as "the model refused images"."""
    status, lines = run(server.url + path)
    assert (
        status == 1
        and lines[0]
        == f"FAIL  the URL: HTTP 404: no chat completions endpoint at {path} (e.g. .../v1/chat/completions)"
    )
    assert len(lines) == 2


def test_a_fast_server_that_ends_before_the_hang_up_is_not_failed(server, upstream):
    upstream.script.words = ["Done."]  # the whole answer arrives at once
    status, lines = run(server.url + "/chat/completions")
    assert status == 0, "\n".join(lines)
    assert any(line.startswith("WARN  hang-up mid-stream: not checked") for line in lines)


def test_an_unreachable_url_stops_at_the_first_check():
    status, lines = run("http://127.0.0.1:9/chat/completions")
    assert status == 1 and "ConnectError" in lines[0]
    assert lines[1] == "FAIL  the rest: not run: the endpoint did not answer the first check" and len(lines) == 3


class Hostile:
    """An endpoint that misbehaves in one way; it counts what it sent before the client left."""

    def __init__(self, mode: str):
        self.mode, self.sent, self.requests = mode, 0, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        self.requests += 1
        gone = asyncio.ensure_future(self.left(receive))
        if self.mode == "silent":
            await gone
        kind = b"application/json" if self.mode == "endless json" else b"text/event-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        piece = {
            "giant line": b"data: " + b"x" * 65536,
            "endless json": b'{"a": [' + b"1," * 32768,
            "infinite stream": b'data: {"choices":[{"delta":{"content":"la "}}]}\n\n' * 200,
            "drip": b"d",
        }[self.mode]
        while not gone.done():  # sending blocks while the client reads nothing
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            self.sent += len(piece)
            await asyncio.sleep(0.2 if self.mode == "drip" else 0)

    @staticmethod
    async def left(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["giant line", "endless json", "infinite stream", "drip", "silent"])
def test_a_hostile_endpoint_cannot_hold_or_fill_the_checker(mode):
    endpoint = Hostile(mode)
    with ServerThread(endpoint) as server:
        lines: list[str] = []
        started = time.monotonic()
        status = checker.run(server.url + "/chat/completions", "k", "m", lines.append, checker.Bounds(1.0, 8.0))
        took = time.monotonic() - started
    assert status == 1 and took < 15, (took, lines)
    # Read only so far: what was sent is what the checker read plus what sockets buffer (a few MB each).
    assert endpoint.sent < endpoint.requests * (checker.Bounds().max_body_bytes + (16 << 20))
    failures = [line for line in lines if line.startswith("FAIL")]
    assert failures and all(len(line) > len("FAIL  x: ") + 10 for line in failures)  # each says what it saw
    if mode == "silent":
        assert lines[1].startswith("FAIL  the rest: not run")


@pytest.mark.slow
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
    assert done.stdout.splitlines()[-1].startswith("10 passed, 0 failed")
