"""profiles.py and agents.py: agent profiles by key from AGENTS_FILE, each with its own upstream,
knowledge, tools and voice; per-call variables; reloads that keep streams in flight on the old agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from custom_llm_server.core.context import Context
from custom_llm_server.llm.tools import ToolRegistry
from tests.conftest import API_KEY, metric, post, sse_events, text_of
from tests.test_custom_llm import Started

SALES, SUPPORT = "sales-key-1", "support-key-1"


def agents_file(tmp_path: Path, upstream_url: str, other_url: str, extra: str = "") -> Path:
    for name, text in {
        "sales": "# Bicycles\n\nWe sell road bicycles and mountain bicycles. Delivery to your door takes three days.\n",
        "support": "# Refunds\n\nRefunds are paid back to your card within fourteen days of the return.\n",
    }.items():
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}.md").write_text(text)
    path = tmp_path / "agents.toml"
    path.write_text(
        f"""
[agents.sales]
api_keys = ["{SALES}"]
llm_base_url = "{upstream_url}/v1"
llm_model = "sales-model"
system_prompt = "You sell bicycles to {{{{ customer }}}}. Their order is {{{{order}}}}."
knowledge_dir = "{tmp_path / "sales"}"
knowledge_index = "{tmp_path / "sales.sqlite3"}"
server_tools = ["calculate", "whoami"]
agora_app_id = "app-1"
agora_customer_id = "cust"
agora_customer_secret = "secret"
audio_source = "tts"
tts_base_url = "{upstream_url}/v1"
tts_voice = "sales-voice"
max_streams_per_key = 1

[agents.support]
api_keys = "env:SUPPORT_KEYS"
llm_base_url = "{other_url}/v1"
llm_api_key = "env:SUPPORT_LLM_KEY"
llm_model = "support-model"
knowledge_dir = "{tmp_path / "support"}"
knowledge_index = "{tmp_path / "support.sqlite3"}"
server_tools = "none"
audio_source = "tts"
tts_base_url = "{other_url}/v1"
tts_voice = "support-voice"
grounding_prompt = "Answer from the refund notes below."
interrupted_mark_en = "[cut off here]"
waiting_messages_en = ["Hold on, checking."]
waiting_phrase_after_ms = 0
{extra}"""
    )
    return path


def headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ask(server, key: str, body: dict, path: str = "/chat/completions") -> httpx.Response:
    body = {"stream": True, "messages": [{"role": "user", "content": "Hi"}], **body}
    return httpx.post(server.url + path, json=body, headers=headers(key), timeout=10)


def search(server, key: str, question: str) -> list[str]:
    deadline = time.monotonic() + 10
    while True:  # until the agent's folder is indexed
        found = httpx.get(server.url + "/knowledge/search", params={"q": question}, headers=headers(key), timeout=5)
        assert found.status_code == 200
        passages = [p["text"] for p in found.json()["passages"]]
        if passages or time.monotonic() > deadline:
            return passages
        time.sleep(0.05)


def whoami_tools() -> ToolRegistry:
    registry = ToolRegistry()

    def calculate(expression: str) -> str:
        """Calculate."""
        return expression

    def whoami(context: Context) -> str:
        """Who is calling."""
        return f"{context.agent}:{context.variables.get('customer')}:{context.channel}"

    registry.add(calculate)
    registry.add(whoami)
    return registry


@pytest.fixture
def two_agents(make_server, upstream_server, fallback_server, upstream, fallback, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPPORT_KEYS", f"{SUPPORT}, support-key-2")
    monkeypatch.setenv("SUPPORT_LLM_KEY", "support-upstream-secret")
    path = agents_file(tmp_path, upstream_server.url, fallback_server.url)
    return make_server(tools=whoami_tools(), agents_file=path)


def test_each_key_reaches_its_own_agents_upstream_model_and_prompt(two_agents, upstream, fallback, caplog):
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        response = ask(two_agents, SALES, {"variables": {"customer": "Ann", "tier": 2}, "channel": "room-9"})
    assert text_of(sse_events(response)) == "Hello from the upstream."
    sent = upstream.requests[-1]["body"]
    assert sent["model"] == "sales-model" and "variables" not in sent and "channel" not in sent
    # The agent's prompt comes first, its placeholders filled; one with no value is left out cleanly.
    assert sent["messages"][0] == {"role": "system", "content": "You sell bicycles to Ann. Their order is."}
    assert "order had no value" in caplog.text
    assert fallback.requests == []

    ask(two_agents, "support-key-2", {}).read()
    sent = fallback.requests[-1]
    assert (
        sent["body"]["model"] == "support-model"
        and sent["headers"]["authorization"] == "Bearer support-upstream-secret"
    )
    assert sent["body"]["messages"] == [{"role": "user", "content": "Hi"}] and "tools" not in sent["body"]
    assert len(upstream.requests) == 1
    time.sleep(0.2)  # a request is counted once its response has been sent
    assert metric(two_agents, 'custom_llm_requests_total{endpoint="chat",status="200",agent="sales"}') >= 1
    assert metric(two_agents, 'custom_llm_requests_total{endpoint="chat",status="200",agent="support"}') >= 1


@pytest.mark.parametrize("key", [API_KEY, "nobody", None])
def test_a_key_in_no_profile_gets_401(two_agents, upstream, key):
    body = {"stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    response = httpx.post(two_agents.url + "/chat/completions", json=body, headers=headers(key) if key else {})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert upstream.requests == []


def test_each_agent_says_its_own_words(two_agents, upstream, fallback):
    """The wording (wording.py) can be changed per agent: waiting phrase, grounding prompt, the mark."""
    question = {"role": "user", "content": "When are refunds paid back?"}
    search(two_agents, SUPPORT, "when are refunds paid back")  # indexed
    events = sse_events(ask(two_agents, SUPPORT, {"messages": [question]}, "/rag/chat/completions"))
    assert text_of(events).startswith("Hold on, checking.")
    assert {"role": "system", "content": "Answer from the refund notes below."} in fallback.requests[-1]["body"][
        "messages"
    ]
    heard = {
        "role": "assistant",
        "content": "Refunds are",
        "metadata": {"interrupted": True, "original": "Refunds are paid."},
    }
    ask(two_agents, SUPPORT, {"messages": [question, heard, question]}).read()
    assert fallback.requests[-1]["body"]["messages"][1]["content"] == "Refunds are [cut off here]"
    ask(two_agents, SALES, {"messages": [question, heard, question]}).read()
    assert "interrupted this answer" in upstream.requests[-1]["body"]["messages"][2]["content"]  # sales: the default


def test_each_agent_searches_only_its_own_knowledge(two_agents, upstream, fallback):
    assert any("bicycles" in text for text in search(two_agents, SALES, "do you sell mountain bicycles"))
    assert any("Refunds" in text for text in search(two_agents, SUPPORT, "when are refunds paid back"))
    assert search(two_agents, SUPPORT, "do you sell mountain bicycles") == []
    ask(two_agents, SUPPORT, {"messages": [{"role": "user", "content": "Do you sell mountain bicycles?"}]},
        "/rag/chat/completions").read()  # fmt: skip
    assert "bicycles" not in json.dumps(fallback.requests[-1]["body"]["messages"][:-1])
    assert upstream.requests == []


def test_tools_see_the_call_and_only_their_agents_tools_are_offered(two_agents, upstream, fallback):
    upstream.script.turns = [{"calls": [("whoami", "{}")]}, {"say": ["Done."]}]
    body = {"variables": {"customer": "Ann"}, "channel": "room-9"}
    assert text_of(sse_events(ask(two_agents, SALES, body))) == "Done."
    offered = {tool["function"]["name"] for tool in upstream.requests[0]["body"]["tools"]}
    assert offered == {"calculate", "whoami", "end_call"}  # sales has Agora's credentials
    assert upstream.requests[1]["body"]["messages"][-1]["content"] == json.dumps("sales:Ann:room-9")
    ask(two_agents, SUPPORT, {}).read()
    assert "tools" not in fallback.requests[-1]["body"]  # support: no tools, no end_call


def test_each_agent_speaks_with_its_own_voice(two_agents, upstream, fallback):
    for key in (SALES, SUPPORT):
        body = {"model": "m", "input": "Hello there.", "response_format": "pcm", "sample_rate": 16000}
        spoken = httpx.post(two_agents.url + "/audio/speech", json=body, headers=headers(key), timeout=10)
        assert spoken.status_code == 200 and spoken.content
    assert upstream.speech_requests[-1]["voice"] == "sales-voice"
    assert fallback.speech_requests[-1]["voice"] == "support-voice"


def test_each_agent_has_its_own_stream_limit(two_agents, upstream):
    upstream.script.first_delay = 1.0
    held = threading.Thread(target=lambda: ask(two_agents, SALES, {}).read())
    held.start()
    time.sleep(0.3)
    assert ask(two_agents, SALES, {}).status_code == 429  # MAX_STREAMS_PER_KEY=1 for sales
    assert ask(two_agents, SUPPORT, {}).status_code == 200  # support has no limit
    held.join()


@pytest.mark.parametrize("variables", [["Ann"], {"1st": "x"}, {"customer": {"name": "Ann"}}, {"customer": None}, "Ann"])
def test_variables_that_are_not_names_and_values_are_refused(two_agents, upstream, variables):
    response = ask(two_agents, SALES, {"variables": variables})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_variables"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ("llm_modle = 'x'", "line 33, llm_modle: is not a setting"),
        ("port = 9000", "line 33, port: is a server-wide setting"),
        ("tts_api_key = 'env:NOT_SET_ANYWHERE'", "the environment variable NOT_SET_ANYWHERE is not set"),
        ("[agents.copy]\napi_keys = ['sales-key-1']", "[agents.copy]: a caller key of [agents.sales] is used again"),
        ("[agents.nokey]\nllm_model = 'x'", "[agents.nokey]: api_keys is missing"),
        ("[agents.bad]\napi_keys = ['k']\nrag_top_k = 'many'", "RAG_TOP_K='many' is not valid"),
        ("tts_model = \nllm_model = 'x'", "agents.toml: Invalid value (at line 33"),
    ],
)
def test_a_file_that_cannot_be_used_is_refused_at_start_and_says_where(
    make_server, upstream_server, fallback_server, tmp_path, monkeypatch, extra, said
):
    monkeypatch.setenv("SUPPORT_KEYS", SUPPORT)
    monkeypatch.setenv("SUPPORT_LLM_KEY", "support-upstream-secret")
    path = agents_file(tmp_path, upstream_server.url, fallback_server.url, extra)
    with pytest.raises(ValueError) as refused:
        make_server(agents_file=path)
    assert said in str(refused.value) and "support-upstream-secret" not in str(refused.value)


def test_a_reload_serves_new_requests_and_lets_streams_in_flight_finish(
    make_server, upstream_server, upstream, tmp_path, caplog
):
    path = tmp_path / "agents.toml"
    base = f'llm_base_url = "{upstream_server.url}/v1"\nknowledge_dir = "{tmp_path / "none"}"\n'
    path.write_text(f'[agents.a]\napi_keys = ["key-a"]\nllm_model = "model-1"\n{base}')
    server = make_server(agents_file=path, agents_watch_seconds=0.05)
    upstream.script.delay = 0.1  # a stream that is still running when the file changes
    with httpx.stream(
        "POST", server.url + "/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        headers=headers("key-a"), timeout=10,
    ) as slow:  # fmt: skip
        lines = slow.iter_lines()
        next(lines)
        path.write_text(
            f'[agents.a]\napi_keys = ["key-a"]\nllm_model = "model-2"\n{base}\n'
            f'[agents.b]\napi_keys = ["key-b"]\nllm_model = "model-b"\n{base}'
        )
        deadline = time.monotonic() + 15
        while ask(server, "key-b", {}).status_code != 200:  # the new agent serves
            assert time.monotonic() < deadline, "the file was not reloaded"
            time.sleep(0.05)
        rest = "\n".join(lines)
    assert rest.rstrip().endswith("data: [DONE]") and "upstream" in rest  # the old agent finished its stream
    upstream.reset()
    ask(server, "key-a", {}).read()
    assert upstream.requests[-1]["body"]["model"] == "model-2"
    with caplog.at_level(logging.ERROR, logger="custom_llm"):
        path.write_text("broken = \n" + path.read_text())
        deadline = time.monotonic() + 15
        while "line" not in caplog.text and time.monotonic() < deadline:  # a write seen halfway fails first
            time.sleep(0.05)
    assert "AGENTS_FILE not reloaded, the running agents stay" in caplog.text and "line" in caplog.text
    assert ask(server, "key-b", {}).status_code == 200  # the running agents still serve


@pytest.mark.slow
def test_sighup_reloads_the_agents_of_a_running_server(upstream_server, upstream, tmp_path):
    path = tmp_path / "agents.toml"
    base = f'llm_base_url = "{upstream_server.url}/v1"\nknowledge_dir = "{tmp_path / "none"}"\n'
    path.write_text(f'[agents.a]\napi_keys = ["key-a"]\n{base}')
    started = Started(
        [sys.executable, "custom_llm.py"],
        {"AGENTS_FILE": str(path), "AGENTS_WATCH_SECONDS": "0", "EMBEDDING_MODEL": "none", "PLAYGROUND": "false"},
    )
    try:
        started.wait_ready()
        assert ask(started, "key-a", {}).status_code == 200
        path.write_text(f'[agents.b]\napi_keys = ["key-b"]\n{base}')
        started.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while ask(started, "key-b", {}).status_code != 200:
            assert time.monotonic() < deadline, "".join(started.lines)
            time.sleep(0.05)
        assert ask(started, "key-a", {}).status_code == 401
        assert started.process.poll() is None
        assert not any("CUSTOM_LLM_API_KEY is not set" in line for line in started.lines)  # the file's keys only
    finally:
        started.stop()


def test_without_agents_file_the_one_agent_is_the_environments(server, upstream):
    assert post(server, {"messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
    assert metric(server, 'custom_llm_requests_total{endpoint="chat",status="200",agent="default"}') >= 1


def test_the_docs_agents_file_reads_as_written(tmp_path, monkeypatch):
    from custom_llm_server.config import build
    from custom_llm_server.config.profiles import read_profiles
    from custom_llm_server.config.settings import Settings

    doc = (Path(__file__).resolve().parent.parent / "docs" / "agents.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", doc, re.S)
    values = {"SALES_KEYS": "sk-sales-1", "SUPPORT_KEY": "sk-support-1", "SUPPORT_LLM_URL": "http://localhost:11434/v1"}
    for name, value in {**values, "SUPPORT_LLM_KEY": "x"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "agents.toml").write_text(block)
    profiles = read_profiles(tmp_path / "agents.toml", Settings(agora_app_id="app", agora_customer_id="c",
                                                                agora_customer_secret="s"))  # fmt: skip
    sales, support = profiles["sales"], profiles["support"]
    assert sales.keys == ("sk-sales-1",) and support.keys == ("sk-support-1",)
    assert sales.settings.server_tools == ("calculate", "search_knowledge") and support.settings.server_tools == ()
    assert support.settings.llm_base_url == "http://localhost:11434/v1" and support.settings.llm_api_key == "x"
    assert build.agora_rest(sales.settings) is not None and build.agora_rest(support.settings) is None
    assert support.settings.waiting_messages_en == ("One moment.", "Let me check.")


@pytest.mark.slow
def test_a_bad_file_stops_the_server_with_one_line_not_a_traceback(tmp_path):
    import subprocess

    path = tmp_path / "agents.toml"
    path.write_text('[agents.a]\napi_keys = ["k"]\nllm_modle = "x"\n')
    root = Path(__file__).resolve().parent.parent
    for workers in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "custom_llm.py"],
            cwd=root,
            env={**os.environ, "AGENTS_FILE": str(path), "WORKERS": workers, "PORT": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "agents.toml, [agents.a] line 3, llm_modle: is not a setting" in done.stderr


def test_a_reload_that_names_a_new_folder_indexes_it_and_retires_the_old_one(make_server, upstream_server, tmp_path):
    for name, text in (("old", "# Opening hours\n\nWe open at nine."), ("new", "# Parking\n\nPark behind the bakery.")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "faq.md").write_text(text)

    def write(folder: str) -> None:
        (tmp_path / "agents.toml").write_text(
            f'[agents.a]\napi_keys = ["key-a"]\nllm_base_url = "{upstream_server.url}/v1"\n'
            f'knowledge_dir = "{tmp_path / folder}"\nknowledge_index = "{tmp_path / folder}.sqlite3"\n'
        )

    write("old")
    server = make_server(agents_file=tmp_path / "agents.toml", agents_watch_seconds=0.05)
    agents = server.server.config.app.state.agents
    assert search(server, "key-a", "when do you open") and len(agents.knowledge) == 1
    old = next(iter(agents.knowledge.values()))
    write("new")
    assert any("Park behind" in text for text in search(server, "key-a", "where can I park"))
    assert list(agents.knowledge.values()) != [old] and len(agents.knowledge) == 1  # the old one is retired


@pytest.mark.slow
def test_the_command_line_searches_an_agents_knowledge(tmp_path):
    import subprocess

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "faq.md").write_text("# Parking\n\nPark behind the bakery, in the yard.\n")
    path = tmp_path / "agents.toml"
    path.write_text(
        f'[agents.shop]\napi_keys = ["k"]\nknowledge_dir = "{tmp_path / "docs"}"\n'
        f'knowledge_index = "{tmp_path / "shop.sqlite3"}"\nembedding_model = "none"\n'
    )
    root = Path(__file__).resolve().parent.parent

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "AGENTS_FILE": str(path)}
        return subprocess.run(
            [sys.executable, "custom_llm.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=60
        )

    found = run("search", "where can I park?", "--agent", "shop")
    assert found.returncode == 0 and "faq.md › Parking" in found.stdout
    missing = run("search", "where can I park?", "--agent", "nobody")
    assert missing.returncode == 2 and "no agent 'nobody' in AGENTS_FILE" in missing.stderr


# --- round three: reloads that wait for answers, close what they replace, survive any error ---------


def open_files(name: str) -> int:
    """This process's open descriptors on files with this name (the server runs in it)."""
    found = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            found += os.readlink(fd).endswith(name)
        except OSError:
            pass
    return found


def reloaded(caplog, count: int) -> None:
    deadline = time.monotonic() + 30
    while caplog.text.count("AGENTS_FILE reloaded") < count:
        assert time.monotonic() < deadline, "the file was not reloaded"
        time.sleep(0.02)


def test_reloads_close_the_knowledge_bases_they_replace(make_server, upstream_server, upstream, tmp_path, caplog):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "faq.md").write_text("# Hours\n\nWe open at nine.\n")
    path = tmp_path / "agents.toml"

    def write(coverage: float) -> None:
        path.write_text(
            f'[agents.a]\napi_keys = ["key-a"]\nllm_base_url = "{upstream_server.url}/v1"\n'
            f'knowledge_dir = "{docs}"\nknowledge_index = "{tmp_path / "leak.sqlite3"}"\nrag_min_coverage = {coverage}\n'
        )

    write(0.5)
    server = make_server(agents_file=path, agents_watch_seconds=0.02)
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        for n in range(20):  # each a new knowledge base for the agent, the old one retired
            write(0.4 + n / 100)
            reloaded(caplog, n + 1)
            assert search(server, "key-a", "when do you open") == ["We open at nine."]
        time.sleep(0.5)
    assert open_files("leak.sqlite3") <= 2  # the one in use (and its journal): 21 before


@pytest.mark.slow
def test_a_reload_waits_for_an_answer_of_several_rounds(make_server, upstream_server, upstream, tmp_path):
    """An answer with a server-tool round in flight when a reload replaces its agent: the old agent is
    closed once the answer is done, not after one stream's longest time (it ended `internal_error`,
    "Session is closed")."""
    registry = ToolRegistry()

    async def slow_lookup() -> str:
        """Look it up."""
        await asyncio.sleep(8)  # the old agent was closed 6.5 s after the reload: mid-answer
        return "found"

    registry.add(slow_lookup, timeout=20)
    path = tmp_path / "agents.toml"
    base = f'llm_base_url = "{upstream_server.url}/v1"\nllm_max_stream_seconds = 1.5\ntool_bridge_ms = 60000\n'
    path.write_text(f'[agents.a]\napi_keys = ["key-a"]\nllm_model = "model-1"\n{base}')
    server = make_server(agents_file=path, agents_watch_seconds=0.05, tools=registry)
    upstream.script.turns = [{"calls": [("slow_lookup", "{}")]}, {"say": ["It", " is", " found", "."]}]
    upstream.script.delay = 0.3
    with httpx.stream(
        "POST", server.url + "/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        headers=headers("key-a"), timeout=30,
    ) as answer:  # fmt: skip
        lines = answer.iter_lines()
        next(lines)
        path.write_text(f'[agents.a]\napi_keys = ["key-a"]\nllm_model = "model-2"\n{base}')
        rest = "\n".join(lines)
    assert "internal_error" not in rest and rest.rstrip().endswith("data: [DONE]")
    assert "found" in rest


def test_the_watch_survives_a_reload_that_fails_of_any_error(make_server, upstream_server, upstream, tmp_path, caplog):
    """An index path that cannot be made raises an OSError, not a file error: it is logged, the running
    agents stay, and the corrected file is picked up by the watch (it died in silence)."""
    path = tmp_path / "agents.toml"
    base = f'llm_base_url = "{upstream_server.url}/v1"\n'
    path.write_text(f'[agents.a]\napi_keys = ["key-a"]\n{base}')
    server = make_server(agents_file=path, agents_watch_seconds=0.05)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nSomething.\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        path.write_text(
            f'[agents.a]\napi_keys = ["key-a"]\n{base}knowledge_dir = "{docs}"\n'
            f'knowledge_index = "{blocked / "index.sqlite3"}"\n'  # under a file: cannot be made
        )
        deadline = time.monotonic() + 15
        while "AGENTS_FILE not reloaded" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ask(server, "key-a", {}).status_code == 200  # the running agent still serves
        path.write_text(f'[agents.a]\napi_keys = ["key-a", "key-new"]\n{base}')
        deadline = time.monotonic() + 15
        while ask(server, "key-new", {}).status_code != 200:
            assert time.monotonic() < deadline, "the watch died"
            time.sleep(0.05)


def test_one_index_file_for_two_agents_folders_is_refused(make_server, upstream_server, tmp_path):
    """KNOWLEDGE_INDEX set for the server (as a one-agent .env has it) and two agents with their own
    folders: one file would hold both, and each agent's key would read the other's passages."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.md").write_text(f"# {name}\n\nAgent {name}'s private notes.\n")
    path = tmp_path / "agents.toml"
    path.write_text(
        f'[agents.a]\napi_keys = ["key-a"]\nknowledge_dir = "{tmp_path / "a"}"\n'
        f'[agents.b]\napi_keys = ["key-b"]\nknowledge_dir = "{tmp_path / "b"}"\n'
    )
    with pytest.raises(ValueError, match="different knowledge folders in one index file"):
        make_server(agents_file=path, knowledge_index=str(tmp_path / "shared.sqlite3"))


@pytest.mark.parametrize(
    ("variables", "code"),
    [
        ({f"v{n}": n for n in range(150_000)}, "too_many_variables"),
        ({"customer": "x" * 5000}, "variable_too_long"),
        ({"customer": ["a", "list"]}, "invalid_variables"),
    ],
)
def test_variables_are_capped_before_they_are_read(make_server, upstream, variables, code):
    server = make_server(max_body_bytes=16 << 20)
    answer = post(server, {"messages": [{"role": "user", "content": "Hi"}], "variables": variables})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == code
    assert (
        post(server, {"messages": [{"role": "user", "content": "Hi"}], "variables": {"customer": "Ann"}}).status_code
        == 200
    )
