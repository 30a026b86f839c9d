"""answer.py: the tool loop, on /chat and /rag, streaming and not: the server's tools run, the caller's pass back."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from custom_llm_server.llm import tools
from custom_llm_server.llm.tools import ToolRegistry
from tests.conftest import API_KEY, AUTH, stream, text_of

ASK = [{"role": "user", "content": "What time is it in Paris?"}]
CALLER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    },
}
ANSWER = {"say": ["It is ", "noon."]}


def tool_messages(request: dict) -> list[dict]:
    return [m for m in request["body"]["messages"] if m["role"] == "tool"]


def test_server_tool_round_trip(server, upstream):
    upstream.script.turns = [{"calls": [("get_current_time", '{"timezone": "Europe/Paris"}')]}, ANSWER]
    events = stream(server, {"messages": ASK})
    assert text_of(events) == "It is noon." and events[-1] == b"[DONE]"
    assert b"tool_calls" not in b"".join(events)  # the caller sees only the answer
    first, second = upstream.requests
    assert {t["function"]["name"] for t in first["body"]["tools"]} == {
        "calculate",
        "get_current_time",
        "search_knowledge",
    }
    assistant = second["body"]["messages"][-2]
    assert assistant["tool_calls"] == [
        {
            "id": "call_0_get_current_time",
            "type": "function",
            "function": {"name": "get_current_time", "arguments": '{"timezone": "Europe/Paris"}'},
        }
    ]  # fragments reassembled
    result = json.loads(tool_messages(second)[0]["content"])
    assert result["timezone"] == "Europe/Paris" and "T" in result["iso"]
    assert tool_messages(second)[0]["tool_call_id"] == "call_0_get_current_time"


def test_text_before_a_tool_call_is_spoken_and_kept_in_history(server, upstream):
    upstream.script.turns = [{"say": ["Let me ", "check. "], "calls": [("calculate", '{"expression": "6*7"}')]}, ANSWER]
    events = stream(server, {"messages": ASK})
    assert text_of(events) == "Let me check. It is noon."
    assistant = upstream.requests[1]["body"]["messages"][-2]
    assert assistant["content"] == "Let me check. "
    assert json.loads(tool_messages(upstream.requests[1])[0]["content"])["result"] == 42


def test_parallel_calls_run_at_once(make_server, upstream):
    registry = ToolRegistry()

    ran: dict[str, tuple[float, float]] = {}

    async def slow_a() -> str:
        """A."""
        started = time.monotonic()
        await asyncio.sleep(0.5)
        ran["a"] = (started, time.monotonic())
        return "a"

    def slow_b() -> str:  # a sync tool runs in a thread, beside the async one
        """B."""
        started = time.monotonic()
        time.sleep(0.5)
        ran["b"] = (started, time.monotonic())
        return "b"

    registry.add(slow_a)
    registry.add(slow_b)
    server = make_server(tools=registry, tool_bridge_ms=5000)
    upstream.script.turns = [{"calls": [("slow_a", "{}"), ("slow_b", "{}")]}, ANSWER]
    stream(server, {"messages": ASK})
    assert ran["a"][0] < ran["b"][1] and ran["b"][0] < ran["a"][1]  # each started before the other ended
    assert [m["content"] for m in tool_messages(upstream.requests[1])] == ['"a"', '"b"']


def test_caller_tool_calls_stream_back_intact(client, upstream):
    arguments = '{"order_id": "A-12345", "note": "fragmented \\"quotes\\" and ünïcode"}'
    upstream.script.turns = [{"calls": [("lookup_order", arguments)]}]
    stream = client.chat.completions.create(model="m", messages=ASK, tools=[CALLER_TOOL], stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert calls == {0: {"id": "call_0_lookup_order", "name": "lookup_order", "arguments": arguments}}
    assert finish == "tool_calls"
    sent = [t["function"]["name"] for t in upstream.requests[0]["body"]["tools"]]
    assert sent[0] == "lookup_order" and "calculate" in sent
    assert len(upstream.requests) == 1


def test_a_mixed_round_gives_the_caller_its_calls_and_defers_ours(client, upstream, caplog):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1+1"}'), ("lookup_order", '{"order_id": "7"}')]}]
    with caplog.at_level("INFO", logger="custom_llm.tools"):
        chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[CALLER_TOOL], stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert {d.function.name for d in deltas if d.function.name} == {"lookup_order"}
    assert {d.index for d in deltas} == {0}  # renumbered for the caller
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "tool name=calculate" not in caplog.text  # not run now: the model asks again next turn
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "call, error",
    [
        (("no_such_tool", "{}"), "There is no tool named 'no_such_tool'"),
        (("calculate", "{not json"), "Invalid arguments for calculate"),
        (("calculate", '{"expression": 42}'), "Invalid arguments for calculate"),
        (
            ("calculate", '{"expression": "9**9**9"}'),
            "calculate failed: CalculationError: the result would be too large",
        ),
        (("boom", "{}"), "boom failed: RuntimeError: kaput"),
        (("hang", "{}"), "hang did not finish within 0.2 seconds"),
    ],
)
def test_failures_are_results_the_model_reads(make_server, upstream, call, error):
    registry = tools.sample_tools()

    def boom() -> None:
        """Fails."""
        raise RuntimeError("kaput")

    async def hang() -> None:
        """Never ends."""
        await asyncio.sleep(30)

    registry.add(boom)
    registry.add(hang, timeout=0.2)
    server = make_server(tools=registry)
    upstream.script.turns = [{"calls": [call]}, ANSWER]
    events = stream(server, {"messages": ASK})
    assert text_of(events) == "It is noon." and events[-1] == b"[DONE]"
    assert error in json.loads(tool_messages(upstream.requests[1])[0]["content"])["error"]


def test_rounds_are_bounded_and_the_last_answers_without_tools(make_server, upstream):
    server = make_server(tool_max_rounds=2)
    upstream.script.turns = [
        {"calls": [("calculate", '{"expression": "1+1"}')]},
        {"calls": [("calculate", '{"expression": "2+2"}')]},
        ANSWER,
    ]
    events = stream(server, {"messages": ASK})
    assert text_of(events) == "It is noon."
    assert len(upstream.requests) == 3
    assert "tools" not in upstream.requests[-1]["body"] and "tools" in upstream.requests[0]["body"]
    assert len(tool_messages(upstream.requests[-1])) == 2


def test_slow_tools_get_a_bridge_phrase(make_server, upstream):
    registry = ToolRegistry()

    async def slow() -> str:
        """Slow."""
        await asyncio.sleep(0.4)
        return "done"

    registry.add(slow)
    server = make_server(tools=registry, tool_bridge_ms=100)
    upstream.script.turns = [{"calls": [("slow", "{}")]}, ANSWER]
    text = text_of(stream(server, {"messages": ASK}))
    assert text.removesuffix("It is noon.").strip() in ("One moment.", "Just a second.")
    upstream.reset()
    upstream.script.turns = [{"calls": [("slow", "{}")]}, ANSWER]
    text = text_of(stream(server, {"messages": [{"role": "user", "content": "现在几点？"}]}))
    assert text.removesuffix("It is noon.") in ("稍等一下。", "马上就好。")


def test_fast_tools_then_a_slow_answer_get_a_bridge_phrase(make_server, upstream):
    """The bridge answers the silence, not the tools: it counts until the answer's next sentence."""
    server = make_server(tool_bridge_ms=300)
    slow_answer = {**ANSWER, "first_delay": 0.8}
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1+1"}')]}, slow_answer]
    text = text_of(stream(server, {"messages": ASK}))
    assert text.removesuffix("It is noon.").strip() in ("One moment.", "Just a second.")


def test_the_bridge_phrases_can_be_changed_in_code_and_in_the_settings(make_server, upstream):
    from custom_llm_server.core.wording import Wording

    wording = Wording(bridge={"en": ("Hang tight.",), "zh": ("等等。",)})
    for server, said in (
        (make_server(tool_bridge_ms=0, wording=wording), "Hang tight."),
        (make_server(tool_bridge_ms=0, wording=wording, bridge_messages_en=("Bear with me.",)), "Bear with me."),
    ):
        upstream.reset()
        upstream.script.turns = [{"calls": [("calculate", '{"expression": "1+1"}')]}, ANSWER]
        assert text_of(stream(server, {"messages": ASK})) == f"{said} It is noon."


def test_one_bridge_phrase_an_answer_over_chained_tool_rounds(make_server, upstream):
    server = make_server(tool_bridge_ms=100)
    slow = {"calls": [("calculate", '{"expression": "1+1"}')], "first_delay": 0.4}
    upstream.script.turns = [slow, slow, {**ANSWER, "first_delay": 0.4}]
    text = text_of(stream(server, {"messages": ASK}))
    assert text.removesuffix("It is noon.").strip() in ("One moment.", "Just a second.")
    assert len(upstream.requests) == 3


def test_fast_tools_get_no_bridge_phrase(server, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1+1"}')]}, ANSWER]
    assert text_of(stream(server, {"messages": ASK})) == "It is noon."


def test_barge_in_during_a_tool_cancels_it(make_server, upstream):
    registry = ToolRegistry()
    started, cancelled = threading.Event(), threading.Event()

    async def long_lookup() -> str:
        """Takes long."""
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    registry.add(long_lookup, timeout=60)
    server = make_server(tools=registry, tool_bridge_ms=50)
    upstream.script.turns = [{"calls": [("long_lookup", "{}")]}, ANSWER]
    with httpx.stream(
        "POST", server.url + "/chat/completions", json={"stream": True, "messages": ASK}, headers=AUTH
    ) as response:
        lines = response.iter_lines()
        assert "content" in next(lines)  # the bridge phrase
        assert started.wait(10)
    assert cancelled.wait(10), "the tool kept running after the caller hung up"
    assert len(upstream.requests) == 1


def test_server_tools_can_be_switched_off(make_server, upstream):
    server = make_server(server_tools=())
    stream(server, {"messages": ASK})
    assert "tools" not in upstream.requests[0]["body"]
    server = make_server(server_tools=("calculate",))
    stream(server, {"messages": ASK})
    assert [t["function"]["name"] for t in upstream.requests[1]["body"]["tools"]] == ["calculate"]


def test_tool_choice_none_offers_no_server_tools(server, upstream):
    stream(server, {"messages": ASK, "tool_choice": "none", "tools": [CALLER_TOOL]})
    assert [t["function"]["name"] for t in upstream.requests[0]["body"]["tools"]] == ["lookup_order"]


def test_sdk_non_streaming_server_tool_round_trip(client, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, ANSWER]
    completion = client.chat.completions.create(model="m", messages=ASK, stream=False)
    assert completion.choices[0].message.content == "It is noon."
    assert completion.choices[0].message.tool_calls is None
    assert json.loads(tool_messages(upstream.requests[1])[0]["content"])["result"] == 42


def test_sdk_non_streaming_passthrough_and_mixed(client, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1"}'), ("lookup_order", '{"order_id": "7"}')]}]
    completion = client.chat.completions.create(model="m", messages=ASK, tools=[CALLER_TOOL], stream=False)
    calls = completion.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [("lookup_order", '{"order_id": "7"}')]
    assert completion.choices[0].finish_reason == "tool_calls" and len(upstream.requests) == 1


def test_sdk_non_streaming_round_limit(make_server, upstream):
    server = make_server(tool_max_rounds=1)
    sdk = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1"}')]}, ANSWER]
    completion = sdk.chat.completions.create(model="m", messages=ASK, stream=False)
    assert completion.choices[0].message.content == "It is noon."
    assert "tools" not in upstream.requests[-1]["body"]


def test_rag_runs_tools_too(server, upstream):
    upstream.script.turns = [{"calls": [("search_knowledge", '{"query": "PCM audio"}')]}, ANSWER]
    events = stream(server, {"messages": ASK}, "/rag/chat/completions")
    assert text_of(events).endswith("It is noon.")
    assert "1280" in tool_messages(upstream.requests[1])[0]["content"]


# --- bounds on what the model can make the loop do ---------------------------------------------------


def test_huge_arguments_get_an_error_result_and_cost_linear_time(make_server, upstream):
    server = make_server(tool_max_argument_bytes=64 * 1024)
    arguments = '{"expression": "' + "1+" * 4_000_000 + '1"}'  # 8 MB, in 4 KB fragments
    upstream.script.turns = [{"calls": [("calculate", arguments)], "fragment": 4096}, ANSWER]
    started = time.monotonic()
    events = stream(server, {"messages": ASK})
    assert text_of(events) == "It is noon." and time.monotonic() - started < 10
    assert "larger than 65536 bytes" in tool_messages(upstream.requests[1])[0]["content"]


def test_a_round_takes_at_most_tool_max_calls(make_server, upstream, caplog):
    server = make_server(tool_max_calls=16)
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "1+1"}')] * 3000}, ANSWER]
    with caplog.at_level("WARNING", logger="custom_llm.answer"):
        assert text_of(stream(server, {"messages": ASK})) == "It is noon."
    assert len(tool_messages(upstream.requests[1])) == 16 and "more than 16 tool calls" in caplog.text
