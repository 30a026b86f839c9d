"""Installing the server as a user would: `pip install .` into a fresh virtual environment gives the
`custom-llm` command, which serves from any folder; and the container's environment, built by the
Dockerfile's own steps (tests/test_container.py builds the image itself), indexes at build time and serves as a
non-root user with its HEALTHCHECK passing. Slow: each builds a virtual environment."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def environment() -> dict[str, str]:
    """Every ENV of the Dockerfile, in order."""
    values: dict[str, str] = {}
    for keyword, arguments in instructions():
        if keyword == "ENV":
            values.update(part.split("=", 1) for part in shlex.split(arguments))
    return values


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[Path]:
    """The image's /app, built by the Dockerfile's steps in a folder every user may read: what COPY
    copies, a fresh venv for the image's Python, and its RUN pip install."""
    app = Path(tempfile.mkdtemp(prefix="custom-llm-image-"))
    os.chmod(app, 0o755)
    try:
        for keyword, arguments in instructions():
            if keyword == "COPY":
                *sources, target = arguments.split()
                for source in sources:
                    copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
                    copy(ROOT / source, app / (target if target not in (".", "./") else source).removeprefix("./"))
        subprocess.run([system_python(), "-m", "venv", app / "venv"], check=True)
        (run,) = [arguments for keyword, arguments in instructions() if keyword == "RUN" and "pip install" in arguments]
        install = run.split("&&")[0].strip()
        assert install == 'pip install -c constraints.txt ".[replicas]"', install  # what the image installs, as pinned
        subprocess.run([app / "venv" / "bin" / "python", "-m", *shlex.split(install), "--quiet"], cwd=app, check=True)
        yield app
    finally:
        shutil.rmtree(app, ignore_errors=True)


def system_python() -> str:
    """The image's Python is the system's, outside any user's home: Debian's python3.11 where it is
    installed (an unprivileged user can run it), else this one."""
    return shutil.which("python3.11", path="/usr/local/bin:/usr/bin") or sys.executable


def as_the_image_user():
    """Run as an unprivileged user, as USER does (when the tests run as root)."""
    if os.getuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Serving(subprocess.Popen):
    """A server process whose output is collected line by line as it comes."""

    lines: list[str]

    def said(self, text: str, seconds: float = 120) -> bool:
        deadline = time.monotonic() + seconds
        while not any(text in line for line in self.lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        return any(text in line for line in self.lines)


def serving(command: list[str], env: dict[str, str], cwd: Path, port: int) -> Serving:
    process = Serving(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=as_the_image_user,
    )  # fmt: skip
    process.lines = []
    threading.Thread(target=lambda: process.lines.extend(process.stdout or ()), daemon=True).start()
    deadline = time.monotonic() + 120  # a first start loads dictionaries: generous on a busy machine
    while True:
        assert process.poll() is None, "".join(process.lines)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def stopped(process: Serving) -> str:
    process.terminate()
    process.wait(30)
    time.sleep(0.2)  # the reader's last lines
    return "".join(process.lines)


def test_pip_install_gives_the_command_and_it_serves(image, upstream_server, upstream, tmp_path):
    """The installed command, from a folder that holds none of the project: it imports the package from
    the environment, answers an OpenAI call under /v1, and lists its model."""
    folder = Path(tempfile.mkdtemp(prefix="custom-llm-elsewhere-"))
    os.chmod(folder, 0o777)
    port = free_port()
    env = {
        "PATH": f"{image / 'venv' / 'bin'}:/usr/bin:/bin",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "LLM_API_KEY": UPSTREAM_KEY,
        "CUSTOM_LLM_API_KEY": "installed-key",
    }
    process = serving([str(image / "venv" / "bin" / "custom-llm"), "serve"], env, folder, port)
    try:
        headers = {"authorization": "Bearer installed-key"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).json()
        assert models["object"] == "list" and models["data"][0]["id"] == "gpt-4o-mini"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}]},
            headers=headers,
            timeout=20,
        )
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from the upstream."
    finally:
        stopped(process)
        shutil.rmtree(folder, ignore_errors=True)
    where = subprocess.run(
        [image / "venv" / "bin" / "python", "-c", "import custom_llm_server, custom_llm; print(custom_llm_server.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(image / "venv")), where


def test_the_container_environment_indexes_at_build_and_serves_as_a_non_root_user(image, upstream_server, upstream):
    """The Dockerfile's ENV, its INDEX=1 step and its CMD, with /app and /data where this test put
    them; then its HEALTHCHECK, run as Docker would."""
    assert re.search(r"^ARG BASE=python:3\.11-slim", DOCKERFILE, re.M) and "FROM ${BASE}" in DOCKERFILE
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users == ["app"]  # not root
    data = image / "data"
    data.mkdir(exist_ok=True)
    if os.getuid() == 0:
        os.chown(data, 65534, 65534)  # the image's `chown app /data`
    port = free_port()
    env = {key: value.replace("/app", str(image)).replace("/data", str(data)) for key, value in environment().items()}
    assert {"HOST", "PORT", "WORKERS", "DATA_DIR", "KNOWLEDGE_DIR"} <= set(env)
    env |= {
        "PATH": f"{image / 'venv' / 'bin'}:/usr/bin:/bin",
        "HOME": str(data),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "LLM_API_KEY": UPSTREAM_KEY,
    }
    (build_index,) = [a for k, a in instructions() if k == "RUN" and "custom-llm index" in a]
    index = build_index.split("then", 1)[1].split(";")[0].strip()
    done = subprocess.run(
        shlex.split(index), cwd=image, env=env, capture_output=True, text=True, preexec_fn=as_the_image_user
    )
    assert done.returncode == 0 and "passages embedded" in done.stdout, done.stdout + done.stderr
    (cmd,) = [a for k, a in instructions() if k == "CMD"]
    process = serving(json.loads(cmd), env, image, port)  # the exec form: a JSON list
    try:
        (check,) = [a for k, a in instructions() if k == "HEALTHCHECK"]
        probe = json.loads(check.split("CMD", 1)[1].strip())
        assert subprocess.run(probe, env=env, timeout=10).returncode == 0
        key = (data / "api-key").read_text().strip()
        assert (data / "api-key").stat().st_mode & 0o777 == 0o600
        ready = httpx.get(f"http://127.0.0.1:{port}/knowledge/search", params={"q": "mono PCM audio"},
                          headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert ready.status_code == 200 and ready.json()["passages"]
        assert process.said("searchable by meaning")
    finally:
        log = stopped(process)
    assert "0 embedded now" in log, log  # the vectors made at build time were used, none made again
    assert "Traceback" not in log
