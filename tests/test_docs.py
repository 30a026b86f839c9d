"""The README and docs/ tell the truth: every setting is documented (there and in .env.example), and
every command, request and snippet in them runs as written against a real server. A block that
cannot run here says so in a comment just above it: `<!-- run: tests/x.py::test_y -->` names the test
that runs it another way, `<!-- not run: why -->` says why nothing can."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from custom_llm_server.config.settings import Settings, parsed
from tests.conftest import API_KEY, UPSTREAM_KEY, post, sse_events, text_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- (run|not run): ([^\n]*?) -->\n)?```(\w*)\n(.*?)```", re.S)
RUN_HERE = ("curl ", "custom-llm ", "export ")  # what this file runs against a live server


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    language: str
    text: str
    directive: str  # "", "run", "not run"
    why: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.text[:60]!r}"


def blocks(language: str | None = None, directive: str | None = None) -> list[Block]:
    found = []
    for path in DOCS:
        for kind, why, lang, text in BLOCK.findall(path.read_text(encoding="utf-8")):
            block = Block(path, lang, text, kind, why)
            if (language is None or lang == language) and (directive is None or kind == directive):
                found.append(block)
    return found


def commands(block: Block) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run(command: str, url: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    command = command.replace("http://localhost:8000", url)
    environment = {**os.environ, "KEY": API_KEY, **env}
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=90, env=environment)


def test_every_setting_is_in_the_settings_reference_and_env_example():
    reference = (ROOT / "docs" / "settings.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for spec in dataclasses.fields(Settings):
        name = spec.metadata["env"]
        assert f"`{name}`" in reference, f"{name} is not in docs/settings.md"
        assert re.search(rf"^{name}=", example, re.M), f"{name} is not in .env.example"


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 25_000
    for heading in ("## Quick start", "## Try it", "## Point an Agora agent at it", "## Docker", "## Troubleshooting"):
        assert heading in readme
    for path in DOCS:  # every relative link leads somewhere
        for target in re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_every_block_that_is_not_run_here_says_why_or_names_its_test():
    for block in blocks(directive="run"):
        file, _, name = block.why.split()[0].partition("::")
        source = (ROOT / file).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{block}: {block.why}"
    reasons = [block.why for block in blocks(directive="not run")]
    assert all(len(why) > 20 for why in reasons) and len(reasons) <= 4, reasons
    for block in blocks("bash", directive=""):
        for command in commands(block):
            assert command.startswith(RUN_HERE), f"{block}: {command!r} is neither run here nor says why"


@pytest.mark.slow
def test_the_curl_commands_run(server, upstream, tmp_path):
    curls = [c for b in blocks("bash", directive="") for c in commands(b) if c.startswith("curl ")]
    assert len(curls) >= 10
    for command in curls:
        done = run(command, server.url, tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        assert '"error"' not in done.stdout, (command, done.stdout[:300])
        if "/chat/completions" in command:
            assert "data: [DONE]" in done.stdout, (command, done.stdout[:300])
        if " -o " in command:  # the speech, written to a file: 16 kHz s16le, a second or so of it
            (written,) = tmp_path.glob(command.split(" -o ")[1].split()[0])
            assert 8_000 < written.stat().st_size < 200_000


def test_export_lines_set_what_they_say(tmp_path):
    (tmp_path / ".custom-llm").mkdir()
    (tmp_path / ".custom-llm" / "api-key").write_text(API_KEY + "\n")
    exports = [c for b in blocks("bash", directive="") for c in commands(b) if c.startswith("export ")]
    assert exports
    for command in exports:
        names = re.findall(r"(\w+)=", command.removeprefix("export "))
        done = run(f"{command}; " + "; ".join(f"printenv {name}" for name in names), "", tmp_path)
        assert done.returncode == 0 and all(done.stdout.split()), (command, done.stderr)


@pytest.mark.slow
def test_the_custom_llm_commands_run(server, upstream, tmp_path):
    found = [c for b in blocks("bash", directive="") for c in commands(b) if c.startswith("custom-llm ")]
    assert {command.split()[1] for command in found} >= {"index", "search", "check"}
    said = {"index": "files (", "search": "›", "check": " passed, 0 failed"}
    upstream.script.delay, upstream.script.words = 0.01, ["One", " two."] * 20  # long enough to hang up on
    custom_llm = str(Path(sys.executable).parent / "custom-llm")
    env = {"KNOWLEDGE_DIR": str(ROOT / "knowledge"), "DATA_DIR": str(tmp_path), "EMBEDDING_MODEL": "none"}
    for command in found:
        done = run(command.replace("custom-llm", custom_llm, 1), server.url, tmp_path, **env)
        not_passed = [line for line in done.stdout.splitlines() if not line.startswith("PASS")]
        assert done.returncode == 0 and said[command.split()[1]] in done.stdout, (command, not_passed, done.stderr)


@pytest.mark.slow
def test_the_python_blocks_run(server, upstream, tmp_path):
    """Each Python block as a script of its own: those that call the server print its answer; the
    others build an app with create_app(), which must succeed."""
    snippets = blocks("python")
    assert len(snippets) >= 3
    env = {"CUSTOM_LLM_API_KEY": API_KEY, "LLM_BASE_URL": f"{server.url}/v1", "EMBEDDING_MODEL": "none"}
    for block in snippets:
        script = tmp_path / "snippet.py"
        script.write_text(block.text.replace("http://localhost:8000", server.url))
        done = subprocess.run(
            [sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=90,
            env={**os.environ, "KEY": API_KEY, **env},
        )  # fmt: skip
        assert done.returncode == 0, (str(block), done.stderr[-2000:])
        if "localhost:8000" in block.text:
            assert "Hello from the upstream." in done.stdout, (str(block), done.stdout)


def test_the_json_blocks_are_json_and_point_at_real_paths(server):
    for block in blocks("json"):
        text = block.text.strip()
        json.loads(text if text.startswith("{") else "{" + text + "}")  # a join body's block is a fragment
        for path in re.findall(r'"url": "https://<[^>]+>(/[^"]*)"', text):  # what an agent is told to call is here
            answer = httpx.post(server.url + path, json={}, headers={"authorization": f"Bearer {API_KEY}"})
            assert answer.status_code == 400, (path, answer.text)  # a real path, refusing an empty body


def test_the_toml_blocks_read_as_agents_files(tmp_path, monkeypatch):
    from custom_llm_server.config.profiles import read_profiles

    for name in ("SALES_KEYS", "SUPPORT_KEY", "SUPPORT_LLM_URL", "SUPPORT_LLM_KEY", "SHOP_KEYS", "SHOP_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    for block in blocks("toml"):
        (tmp_path / "agents.toml").write_text(block.text)
        assert read_profiles(tmp_path / "agents.toml", Settings()), str(block)


def test_the_local_model_recipe_serves(make_server, upstream_server, upstream):
    """The README's .env for a local model, with the test's scripted LLM standing in at its address."""
    (block,) = blocks("dotenv")
    values = dict(line.split("=", 1) for line in block.text.splitlines() if line and not line.startswith("#"))
    assert values["LLM_BASE_URL"] == "http://localhost:11434/v1"
    values["LLM_BASE_URL"] = f"{upstream_server.url}/v1"
    server = make_server(**parsed(values))
    assert text_of(sse_events(post(server, {"messages": [{"role": "user", "content": "Hi"}], "stream": True}))) == (
        "Hello from the upstream."
    )
    assert upstream.requests[-1]["body"]["model"] == values["LLM_MODEL"]
    assert upstream.requests[-1]["headers"]["authorization"] == f"Bearer {values['LLM_API_KEY']}"


@pytest.mark.slow
def test_the_agents_example_serves_both_agents(upstream_server, upstream, fallback_server, fallback, tmp_path):
    """docs/agents.md's file and command, as written, in a folder holding the project's knowledge and
    docs folders; the support agent's local model is the test's second scripted LLM."""
    from tests.test_custom_llm import Started

    (toml,) = [b for b in blocks("toml") if b.path.name == "agents.md"]
    (command,) = [c for b in blocks("bash", directive="run") if b.path.name == "agents.md" for c in commands(b)]
    (tmp_path / "agents.toml").write_text(toml.text)
    for folder in ("knowledge", "docs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    assignments = dict(re.findall(r"(\w+)=(\S+)", command.rsplit("custom-llm", 1)[0]))
    assignments["SUPPORT_LLM_URL"] = f"{fallback_server.url}/v1"
    assignments["AGENTS_FILE"] = str(tmp_path / "agents.toml")
    env = {
        **assignments, "LLM_BASE_URL": f"{upstream_server.url}/v1", "LLM_API_KEY": UPSTREAM_KEY,
        "EMBEDDING_MODEL": "none", "DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip
    server = Started([str(Path(sys.executable).parent / "custom-llm"), "serve"], env, cwd=tmp_path)
    try:
        server.wait_ready()
        for key, llm, model in (("sk-sales-1", upstream, "gpt-4o-mini"), ("sk-support-1", fallback, "llama3.1")):
            answer = httpx.post(
                server.url + "/v1/rag/chat/completions",
                json={"messages": [{"role": "user", "content": "How do I point an agent at the server?"}]},
                headers={"authorization": f"Bearer {key}"},
                timeout=20,
            )
            assert answer.status_code == 200 and llm.requests[-1]["body"]["model"] == model
    finally:
        server.stop()


def test_no_doc_names_a_module_that_is_gone():
    """Modules are named by their place in the package: a name the layout no longer has is a stale doc."""
    for path in [*DOCS, ROOT / "SECURITY.md"]:
        for name in re.findall(r"`((?:custom_llm_server/)?[a-z_]+/[a-z_]+\.py)`", path.read_text()):
            where = ROOT / name if name.startswith("custom_llm_server/") else ROOT / "custom_llm_server" / name
            if not name.startswith(("tests/", "bench/")):
                assert where.exists(), f"{path.name} names {name}"


def test_every_test_the_threat_model_names_exists():
    """SECURITY.md names the test that holds each line; a renamed test must not leave a claim unheld."""
    named, file = [], None
    for path, name in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", (ROOT / "SECURITY.md").read_text()):
        file = path or file
        named.append((file, name))
    assert len(named) > 20
    for file, name in named:
        assert re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{name}"
