"""The official clients, each at its default calls, on all three endpoints with and without /v1 in
their base_url: openai-python (sync and async) and LangChain here, openai-node and the Vercel AI SDK
through clients/clients.mjs; and the models list they ask for first."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
ENDPOINTS = ["", "/rag", "/audio", "/v1", "/v1/rag", "/v1/audio"]  # a base_url with /v1, as OpenAI has it
ANSWER = "Hello from the upstream."
CALLER_TOOL = {
    "type": "function",
    "function": {"name": "lookup_order", "description": "Find an order", "parameters": {"type": "object"}},
}
CALLS_LOOKUP = [{"calls": [("lookup_order", '{"order_id": "7"}')]}]


@pytest.fixture
def voiced(make_server, upstream_server, upstream):
    """The server, with /audio speaking the model's answer (so every endpoint consults the model)."""
    return make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)


def said(message) -> str:
    """The words of a completion's message: its text, or an audio answer's transcript."""
    return message.content or (message.audio.transcript if message.audio else "")


@pytest.mark.parametrize("prefix", ENDPOINTS)
def test_openai_python_default_calls(voiced, upstream, prefix):
    client = openai.OpenAI(base_url=voiced.url + prefix, api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Hello there"}]
    assert said(client.chat.completions.create(model="m", messages=messages).choices[0].message) == ANSWER
    text = ""
    for chunk in client.chat.completions.create(model="m", messages=messages, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta:
            text += delta.content or (delta.audio.transcript if delta.audio else "") or ""
    assert text.strip().endswith(ANSWER)
    upstream.script.turns = CALLS_LOOKUP
    message = client.chat.completions.create(model="m", messages=messages, tools=[CALLER_TOOL]).choices[0].message
    assert [call.function.name for call in message.tool_calls] == ["lookup_order"]


@pytest.mark.parametrize("prefix", ENDPOINTS)
def test_openai_python_async_default_calls(voiced, upstream, prefix):
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=voiced.url + prefix, api_key=API_KEY, max_retries=0) as client:
            messages = [{"role": "user", "content": "Hello there"}]
            completion = await client.chat.completions.create(model="m", messages=messages)
            stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
            chunks = [chunk async for chunk in stream]
            return said(completion.choices[0].message), chunks[-1].choices[0].finish_reason

    text, finish = asyncio.run(run())
    assert text == ANSWER and finish == "stop"


@pytest.mark.parametrize("prefix", ENDPOINTS)
def test_langchain_default_calls(voiced, upstream, prefix):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="m", base_url=voiced.url + prefix, api_key=API_KEY, max_retries=0)
    reply = model.invoke("Hello there")
    assert reply.content == ANSWER or reply.additional_kwargs.get("audio", {}).get("transcript") == ANSWER
    streamed = "".join(str(chunk.content) for chunk in model.stream("Hello there"))
    assert streamed.endswith(ANSWER) or prefix.endswith("/audio")  # LangChain reads no audio deltas
    upstream.script.turns = CALLS_LOOKUP
    called = model.bind_tools([CALLER_TOOL]).invoke("Where is order 7?")
    assert [call["name"] for call in called.tool_calls] == ["lookup_order"]


def node_clients(url: str, calls: str) -> list[dict]:
    if not shutil.which("node"):
        if os.environ.get("CI"):
            pytest.fail("node is not installed (.ci/run installs Debian's nodejs)")
        pytest.skip("node is not installed (CI installs it)")
    if not (ROOT / "clients" / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT / "clients", check=True, capture_output=True)
    done = subprocess.run(
        ["node", "clients.mjs", url, API_KEY, calls], cwd=ROOT / "clients", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ENDPOINTS)
def test_openai_node_and_the_ai_sdk_default_calls(voiced, upstream, prefix):
    results = node_clients(voiced.url + prefix, "plain")
    assert {(r["client"], r["call"]) for r in results} == {
        ("openai-node", "create"),
        ("openai-node", "create stream"),
        ("ai-sdk", "generateText"),
        ("ai-sdk", "streamText"),
    }
    for result in results:
        assert result["ok"], result
        if result["client"] == "openai-node" or not prefix.endswith("/audio"):  # the AI SDK reads no audio
            assert result["text"].strip().endswith(ANSWER), result


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ENDPOINTS)
def test_node_clients_get_the_callers_tool_calls(voiced, upstream, prefix):
    upstream.script.turns = CALLS_LOOKUP
    for result in node_clients(voiced.url + prefix, "tools"):
        assert result["ok"] and result["toolCalls"] == ["lookup_order"], result


@pytest.mark.parametrize("prefix", ["/v1", "", "/v1/rag"])
def test_the_sdk_lists_the_agents_models(make_server, upstream, prefix):
    server = make_server(llm_model="agent-model", llm_fallback_model="backup-model")
    client = openai.OpenAI(base_url=server.url + prefix, api_key=API_KEY, max_retries=0)
    models = client.models.list()
    assert [model.id for model in models] == ["agent-model", "backup-model"]
    assert all(model.object == "model" and model.owned_by for model in models)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + prefix, api_key="wrong", max_retries=0).models.list()
