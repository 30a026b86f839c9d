"""custom_llm.py: settings, the entry point, several workers, and extending the server through create_app."""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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


class Started:
    """A server process of ours on a free port, its stderr collected line by line."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path = ROOT):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            self.port = free.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", **env}
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def wait_for_lines(self, text: str, count: int) -> list[str]:
        deadline = time.monotonic() + 15
        while sum(text in line for line in self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return [line for line in self.lines if text in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO custom_llm \[[0-9a-f]{16}\] request path=/chat/completions "
)


@pytest.mark.slow
def test_two_workers_with_no_key_configured_share_one_key_and_log_every_request(upstream_server, upstream, tmp_path):
    env = {
        "WORKERS": "2",
        "CUSTOM_LLM_API_KEY": "",
        "LOG_LEVEL": "INFO",
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "LLM_API_KEY": "k",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
    }  # an empty key, as .env.example ships it
    server = Started([sys.executable, "custom_llm.py"], env)
    try:
        server.wait_ready()
        said = server.wait_for_lines("CUSTOM_LLM_API_KEY is not set", 1)
        assert len(said) == 1, said  # made once, by the parent, before the workers start
        headers = {"authorization": f"Bearer {(tmp_path / 'data' / 'api-key').read_text().strip()}"}
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with httpx.Client() as client:
                assert client.post(server.url + "/chat/completions", json=ASK, headers=headers).status_code == 200
        text = httpx.get(server.url + "/metrics", headers=headers).text
        assert 'custom_llm_requests_total{agent="default",endpoint="chat",status="200"} 20.0' in text
        logged = server.wait_for_lines("request path=/chat/completions", 20)
        assert len(logged) == 20 and all(LOG_LINE.match(line) for line in logged), logged
    finally:
        server.stop()


@pytest.mark.slow
def test_the_uvicorn_command_serves_and_logs(upstream_server, upstream, tmp_path):
    env = {
        "CUSTOM_LLM_API_KEY": "k1",
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "LLM_API_KEY": "k",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    line = next(
        line
        for line in (ROOT / "docs" / "production.md").read_text().splitlines()
        if line.startswith("uvicorn --factory")
    )
    command = [sys.executable, "-m", *line.split()]  # as written, on a loopback port of the test's
    command[command.index("--host") + 1], command[command.index("--port") + 1] = "127.0.0.1", "{port}"
    command[command.index("--workers") + 1] = "2"
    server = Started(command, env)
    try:
        server.wait_ready()
        response = httpx.post(server.url + "/chat/completions", json=ASK, headers={"authorization": "Bearer k1"})
        assert response.status_code == 200
        assert LOG_LINE.match(server.wait_for_lines("request path=/chat/completions", 1)[0])
        with socket.create_connection(("127.0.0.1", server.port)) as connection:  # the head bound holds
            connection.sendall(b"GET /health HTTP/1.1\r\nx-junk: " + b"a" * 100_000)
            assert connection.recv(100).startswith(b"HTTP/1.1 431")
    finally:
        server.stop()


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
        from custom_llm_server.knowledge.rag import Passage

        if "kettle" not in question.lower():
            return []  # nothing relevant: /rag injects nothing
        return [Passage("The K-2 kettle costs 49 euros.", "catalogue", "Kettles › K-2", 1.0)][:limit]

    async def aclose(self) -> None:
        pass


def test_a_retriever_of_your_own(make_server, upstream):
    server = make_server(retriever=Catalogue())
    post(server, {"messages": [{"role": "user", "content": "How much is the kettle?"}]}, "/rag/chat/completions")
    context = upstream.requests[-1]["body"]["messages"][-1]["content"]
    assert "catalogue › Kettles › K-2" in context and "49 euros" in context
    hits = httpx.get(server.url + "/knowledge/search", params={"q": "kettle"}, headers=AUTH).json()["passages"]
    assert hits == [
        {
            "source": "catalogue",
            "heading": "Kettles › K-2",
            "score": 1.0,
            "coverage": 1.0,
            "similarity": None,
            "text": "The K-2 kettle costs 49 euros.",
        }
    ]
    post(server, {"messages": [{"role": "user", "content": "Hello!"}]}, "/rag/chat/completions")
    assert [m["role"] for m in upstream.requests[-1]["body"]["messages"]] == ["user"]


def test_a_tool_of_your_own(make_server, upstream):
    from custom_llm_server.llm.tools import ToolRegistry

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
    """A voice of one's own: any object with synthesize(text) yielding mono s16le PCM (16 kHz unless it declares a rate)."""

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


def test_a_voice_that_asks_for_the_request_gets_it(make_server, upstream):
    class Personal(Beeper):
        async def synthesize(self, text: str, context):  # the caller's agent, the call's variables
            self.said.append(f"{context.agent}:{context.variables.get('name')}:{text}")
            yield b"\x10\x00" * 1600

    voice = Personal()
    server = make_server(audio_source="tts", voice=voice)
    upstream.script.words = ["Hello there."]
    body = {"messages": [{"role": "user", "content": "Hi"}], "variables": {"name": "Ann"}}
    assert post(server, body, "/audio/chat/completions").status_code == 200
    speech = {"input": "Bye now.", "response_format": "pcm", "sample_rate": 16000}
    assert httpx.post(server.url + "/audio/speech", json=speech, headers=AUTH, timeout=10).status_code == 200
    assert voice.said == ["default:Ann:Hello there.", "default:None:Bye now."]


def test_a_voice_declares_its_rate_and_files_mode_says_what_it_speaks(make_server, upstream, caplog):
    class SlowBeeper(Beeper):
        rate = 8000  # the same bytes now last twice as long: 200 ms a word

    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        server = make_server(voice=SlowBeeper())  # AUDIO_SOURCE=files, the default
    assert "/audio answers play the recorded files until AUDIO_SOURCE=tts" in caplog.text
    body = {"input": "One two three.", "response_format": "pcm", "sample_rate": 16000}
    spoken = httpx.post(server.url + "/audio/speech", json=body, headers=AUTH, timeout=10)
    assert spoken.status_code == 200 and abs(len(spoken.content) / 2 / 16000 - 0.6) < 0.01


def test_start_up_says_what_is_missing(make_server, upstream, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        make_server(
            llm_base_url="https://api.openai.com/v1",
            llm_api_key="",
            knowledge_dir=tmp_path / "nowhere",
            knowledge_index=str(tmp_path / "index.sqlite3"),
        )
    assert "no upstream LLM: set LLM_API_KEY" in caplog.text and "answer 503" in caplog.text
    assert "knowledge folder" in caplog.text and "does not exist" in caplog.text


def test_the_package_declares_everything_the_server_imports():
    """`pip install .` installs pyproject.toml's dependencies only: every package a module of the
    server imports is declared there (an extra's, such as `replicas`, is imported only when its
    setting asks for it)."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    listed = {re.split(r"[<>=\[ ;]", line.strip())[0].lower().replace("_", "-") for line in declared}
    distributions = importlib.metadata.packages_distributions()
    for module in [ROOT / "custom_llm.py", *(ROOT / "custom_llm_server").rglob("*.py")]:
        for node in ast.walk(ast.parse(module.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            )
            for name in names:
                top = name.split(".")[0]
                if top in ("custom_llm", "custom_llm_server") or top in sys.stdlib_module_names:
                    continue
                owners = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                assert owners & listed, f"{module.name} imports {top}, which pyproject.toml does not declare"


# --- the process: a key that survives restarts, workers that agree, a shutdown that ends cleanly ------


@pytest.mark.slow
def test_the_generated_key_survives_a_restart(upstream_server, upstream, tmp_path):
    env = {"CUSTOM_LLM_API_KEY": "", "DATA_DIR": str(tmp_path / "data"), "LLM_BASE_URL": f"{upstream_server.url}/v1"}
    keys, said = [], []
    for _ in range(2):
        server = Started([sys.executable, "custom_llm.py"], env)
        try:
            server.wait_ready()
            said.append(server.wait_for_lines("CUSTOM_LLM_API_KEY is not set", 1)[0])
            keys.append((tmp_path / "data" / "api-key").read_text().strip())
            headers = {"authorization": f"Bearer {keys[-1]}"}
            assert httpx.post(server.url + "/v1/chat/completions", json=ASK, headers=headers).status_code == 200
        finally:
            server.stop()
    assert keys[0] == keys[1] and len(keys[0]) >= 32
    assert "made one and kept it in" in said[0] and "using the one kept in" in said[1]
    assert str(tmp_path / "data" / "api-key") in said[0]  # the log names the file
    assert keys[0] not in "".join(said)  # and keeps the key out of a log that is not a terminal
    assert (tmp_path / "data" / "api-key").stat().st_mode & 0o777 == 0o600


def burn(seconds: float) -> list[subprocess.Popen]:
    """Both cores busy: one process spinning per core, for as long as the test needs."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "both cores busy"])
def test_a_sighup_reaches_every_worker(upstream_server, upstream, tmp_path, busy):
    """WORKERS=2, the agents file changed and SIGHUP sent (the file watch off, so the signal is all
    there is): 15 s later every new connection, whichever worker takes it, knows the new key and
    refuses the old one."""
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.a]\napi_keys = ["old-key"]\n')
    env = {
        "WORKERS": "2", "AGENTS_FILE": str(agents), "AGENTS_WATCH_SECONDS": "0", "DATA_DIR": str(tmp_path / "data"),
        "LLM_BASE_URL": f"{upstream_server.url}/v1", "LLM_API_KEY": "k", "LOG_LEVEL": "INFO",
    }  # fmt: skip
    server = Started([sys.executable, "custom_llm.py"], env)
    burners: list[subprocess.Popen] = []
    try:
        server.wait_ready()
        burners = burn(60) if busy else []
        agents.write_text('[agents.a]\napi_keys = ["new-key"]\n')
        server.process.send_signal(signal.SIGHUP)
        time.sleep(15)
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with httpx.Client(timeout=30) as client:
                new = client.post(
                    server.url + "/chat/completions", json=ASK, headers={"authorization": "Bearer new-key"}
                )
            with httpx.Client(timeout=30) as client:
                old = client.post(
                    server.url + "/chat/completions", json=ASK, headers={"authorization": "Bearer old-key"}
                )
            assert (new.status_code, old.status_code) == (200, 401)
        assert len(server.wait_for_lines("AGENTS_FILE reloaded", 2)) == 2  # each worker said so
    finally:
        for burner in burners:
            burner.kill()
        server.stop()
    assert "Traceback" not in "".join(server.lines)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_mid_stream_ends_it_cleanly_and_leaves_nothing_behind(upstream_server, upstream, tmp_path, workers):
    """Past SHUTDOWN_GRACE_SECONDS the stream gets its error event and [DONE]; the log holds no
    traceback; the workers' metrics folder is gone."""
    import tempfile

    upstream.script.delay, upstream.script.words = 0.5, ["word "] * 60
    before = set(Path(tempfile.gettempdir()).glob("custom-llm-metrics-*"))
    env = {
        "WORKERS": workers, "SHUTDOWN_GRACE_SECONDS": "1", "CUSTOM_LLM_API_KEY": "k1", "LOG_LEVEL": "INFO",
        "LLM_BASE_URL": f"{upstream_server.url}/v1", "LLM_API_KEY": "k", "DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip
    server = Started([sys.executable, "custom_llm.py"], env)
    server.wait_ready()
    with httpx.stream(
        "POST", server.url + "/chat/completions", json=ASK, headers={"authorization": "Bearer k1"}, timeout=30
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"shutting_down"' in rest[-2]
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn ends by raising the signal it caught
    time.sleep(0.5)  # the stderr reader's last lines
    log = "".join(server.lines)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert "shut down before this answer was complete" in log
    assert set(Path(tempfile.gettempdir()).glob("custom-llm-metrics-*")) <= before


def test_a_terminal_is_shown_the_generated_key_and_a_log_only_where_it_is(tmp_path, monkeypatch):
    """The developer at a terminal needs the key for the agent's llm.api_key; a container's or a
    service manager's log collector keeps what it is sent, so it gets only the file's name."""
    import dataclasses
    import io

    from custom_llm import with_a_key
    from custom_llm_server.config.settings import Settings

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.delenv("CUSTOM_LLM_API_KEY", raising=False)
        (key,) = with_a_key(dataclasses.replace(Settings(), data_dir=tmp_path)).api_keys
        said = stream.getvalue()
        assert str(tmp_path / "api-key") in said and (key in said) == shown, said
