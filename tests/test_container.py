"""The image, built and run for real with Podman (deploy/container.sh: no registry serves
python:3.11-slim here, so its base is Debian bookworm made with debootstrap). The container starts as
the image's non-root user, its HEALTHCHECK passes, it answers the OpenAI SDK under /v1 with the key it
made and keeps in /data, searches by meaning with the vectors made while the image was built, keeps
its key across a restart and stops on SIGTERM without a traceback. Slow: it builds the image."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.test_install import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    for tool in ("podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: .ci/run installs Debian's podman, runc and debootstrap")
    built = subprocess.run(
        ["bash", "deploy/container.sh", "localhost/custom-llm:test"], cwd=ROOT, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-3000:]
    yield built.stdout.split()[-1]
    podman("rmi", "-f", "localhost/custom-llm:test", check=False)


def run_options() -> list[str]:
    """Podman's defaults ask for more open files and processes than a machine that is itself a container
    may grant; crun refuses a host with cgroup v1 and v2 mixed, runc does not."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    files = 1 << 20 if files == resource.RLIM_INFINITY else files
    return ["--runtime", "runc", "--network", "host", f"--ulimit=nofile={files}:{files}", "--ulimit=nproc=4096:4096"]


def healthy(url: str, name: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
        time.sleep(0.3)


def said(name: str, text: str) -> None:
    deadline = time.monotonic() + 60
    while text not in (logs := "".join(getattr(podman("logs", name), std) for std in ("stdout", "stderr"))):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(0.3)


def test_the_image_runs_as_built(image, upstream_server, upstream):
    name = f"custom-llm-test-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    podman("volume", "create", name)
    try:
        podman(
            "run", "-d", "--name", name, *run_options(), "-v", f"{name}:/data", "-e", f"PORT={port}",
            "-e", f"LLM_BASE_URL={upstream_server.url}/v1", "-e", f"LLM_API_KEY={UPSTREAM_KEY}", image,
        )  # fmt: skip
        healthy(url, name)
        assert podman("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/app/written", check=False).returncode != 0
        key = podman("exec", name, "cat", "/data/api-key").stdout.strip()
        assert "/playground" in httpx.get(url + "/").text
        client = openai.OpenAI(base_url=url + "/v1", api_key=key)
        assert client.models.list().data[0].id == "gpt-4o-mini"
        words = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True) if c.choices]  # fmt: skip
        assert "".join(words) == "Hello from the upstream."
        said(name, "searchable by meaning")  # the vectors loaded (a search before is by words)
        found = httpx.get(
            url + "/knowledge/search", params={"q": "16 kHz audio"}, headers={"authorization": f"Bearer {key}"}
        )
        assert found.status_code == 200 and found.json()["passages"][0]["similarity"] is not None
        podman("restart", "--time", "10", name)
        healthy(url, name)
        assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
        podman("stop", "--time", "10", name)
        assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        logs = podman("logs", name).stderr + podman("logs", name).stdout
    finally:
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", name, check=False)
    assert "0 embedded now" in logs  # the vectors made while building, none made again
    assert "Traceback" not in logs
