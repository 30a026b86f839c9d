"""The deployment files people copy (deploy/compose.yaml, deploy/kubernetes/): read as their tools
read them, checked for the fields that matter, and their commands run with their settings against
this machine's PostgreSQL and Redis (there is no Docker engine or cluster here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from custom_llm_server.config.profiles import read_profiles
from custom_llm_server.config.settings import Settings
from tests.conftest import UPSTREAM_KEY
from tests.test_install import free_port
from tests.test_replicas import database, redis_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CUSTOM_LLM = str(Path(sys.executable).parent / "custom-llm")
IMAGE_ENV = {  # what the Dockerfile's ENV gives every container, with /app as this checkout
    "HOST": "127.0.0.1",
    "WORKERS": "1",
    "KNOWLEDGE_DIR": str(ROOT / "knowledge"),
}


def manifests() -> dict[str, dict]:
    """Every Kubernetes object in deploy/kubernetes/, by kind (and the example Secret)."""
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def container(kind: str) -> dict:
    spec = manifests()[kind]["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return only


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_kustomization_names_every_manifest_but_the_secret():
    kustomization = manifests()["Kustomization"]
    files = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files


def test_the_deployment_probes_the_servers_own_paths_and_keeps_secrets_in_the_secret():
    objects = manifests()
    deployment, server = objects["Deployment"], container("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert server["command"] == ["custom-llm", "serve"]
    (port,) = server["ports"]
    env = {item["name"]: item.get("value") for item in server["env"]}
    assert int(env["PORT"]) == port["containerPort"]
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert server["resources"]["requests"]["memory"] and server["resources"]["requests"]["cpu"]
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert objects["Service"]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    secret = objects["Secret"]
    assert [ref["secretRef"]["name"] for ref in server["envFrom"]] == [secret["metadata"]["name"]]
    assert {"CUSTOM_LLM_API_KEY", "LLM_API_KEY", "KNOWLEDGE_STORE", "REDIS_URL"} <= set(secret["stringData"])
    assert all(value == "" for value in secret["stringData"].values())  # no key in the repository
    assert not {"LLM_API_KEY", "KNOWLEDGE_STORE", "REDIS_URL", "CUSTOM_LLM_API_KEY"} & set(env)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().shutdown_grace_seconds  # answers in flight finish before the kill


def test_the_agents_file_in_the_configmap_is_mounted_where_agents_file_says(tmp_path, monkeypatch):
    objects, server = manifests(), container("Deployment")
    env = {item["name"]: item.get("value") for item in server["env"]}
    mount = next(m for m in server["volumeMounts"] if m["name"] == "agents")
    volume = next(v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "agents")
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    (name,) = objects["ConfigMap"]["data"]
    assert env["AGENTS_FILE"] == f"{mount['mountPath']}/{name}"
    (tmp_path / name).write_text(objects["ConfigMap"]["data"][name])
    for variable in re.findall(r'"env:(\w+)"', objects["ConfigMap"]["data"][name]):
        assert variable in objects["Secret"]["stringData"]  # what the file reads, the Secret gives
        monkeypatch.setenv(variable, "sk-test")
    assert read_profiles(tmp_path / name, Settings())


def test_the_compose_file_runs_two_replicas_after_the_index_job():
    services = compose()["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("replica")}
    assert len(replicas) == 2
    assert len({service["ports"][0] for service in replicas.values()}) == 2
    for service in [*replicas.values(), services["index"]]:
        assert service["environment"]["KNOWLEDGE_STORE"].startswith("postgresql://")
        assert service["environment"]["REDIS_URL"].startswith("redis://")
    for service in replicas.values():
        assert service["depends_on"]["index"] == {"condition": "service_completed_successfully"}
    assert services["index"]["command"] == ["custom-llm", "index"]
    assert services["postgres"]["image"].startswith("postgres:") and services["redis"]["image"].startswith("redis:")
    assert all("healthcheck" in services[name] for name in ("postgres", "redis"))


def run_env(container_spec: dict, secrets: dict[str, str], **more: str) -> dict[str, str]:
    """A container's environment as Kubernetes gives it: its env and its Secret's values."""
    env = {**os.environ, **IMAGE_ENV, **secrets}
    env.update({item["name"]: item["value"] for item in container_spec.get("env", [])})
    return {**env, **more}


@pytest.mark.slow
def test_the_manifests_commands_index_once_and_serve_two_ready_replicas(
    database,  # noqa: F811
    redis_url,  # noqa: F811
    upstream_server,
    upstream,
    tmp_path,
):
    objects = manifests()
    agents = tmp_path / "agents.toml"
    agents.write_text(objects["ConfigMap"]["data"]["agents.toml"])
    secrets = {
        "CUSTOM_LLM_API_KEY": "sk-operator-test",
        "SALES_KEYS": "sk-sales-test",
        "LLM_API_KEY": UPSTREAM_KEY,
        "LLM_BASE_URL": f"{upstream_server.url}/v1",
        "KNOWLEDGE_STORE": database,
        "REDIS_URL": redis_url,
    }
    job = container("Job")
    indexed = subprocess.run(
        [CUSTOM_LLM, *job["command"][1:]],
        env=run_env(job, secrets, DATA_DIR=str(tmp_path / "job")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert indexed.returncode == 0, indexed.stderr
    assert "passages embedded" in indexed.stdout
    server, replicas = container("Deployment"), []
    try:
        for n in range(2):
            port = free_port()
            env = run_env(server, secrets, PORT=str(port), AGENTS_FILE=str(agents), DATA_DIR=str(tmp_path / f"{n}"))
            process = subprocess.Popen(
                [CUSTOM_LLM, *server["command"][1:]],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            replicas.append((process, f"http://127.0.0.1:{port}"))
        for process, url in replicas:
            for probe in ("livenessProbe", "readinessProbe"):
                path = server[probe]["httpGet"]["path"]
                assert eventually_ok(process, url + path), path
            answer = httpx.get(
                url + "/knowledge/search",
                params={"q": "how do I point an Agora agent at this server?"},
                headers={"authorization": "Bearer sk-sales-test"},
            )
            assert answer.status_code == 200 and answer.json()["passages"]
            assert "embedding" not in process_log_so_far(process)  # the job made the vectors, not the replica
    finally:
        for process, _ in replicas:
            process.terminate()
            process.wait(30)


def eventually_ok(process: subprocess.Popen, url: str, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def process_log_so_far(process: subprocess.Popen) -> str:
    """What the process has logged until now, without waiting for more."""
    os.set_blocking(process.stdout.fileno(), False)  # type: ignore[union-attr]
    return process.stdout.read() or ""  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_compose_index_command_runs_with_its_settings(database, tmp_path):  # noqa: F811
    service = compose()["services"]["index"]
    env = {**os.environ, **IMAGE_ENV, "DATA_DIR": str(tmp_path), "EMBEDDING_MODEL": "none"}
    env.update({k: v for k, v in service["environment"].items() if not str(v).startswith("${")})
    env["KNOWLEDGE_STORE"] = database  # the compose network's postgres, here
    done = subprocess.run([CUSTOM_LLM, *service["command"][1:]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " indexed" in done.stdout, done.stderr
