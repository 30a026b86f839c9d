"""Tools without code (an agents file's [[agents.<name>.tools]]) against a real HTTP tool on loopback,
and slow tools answered after the turn through a fake of Agora's REST API."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerThread, eventually, request_body, sse_events, text_of

ORDER_ARGS = json.dumps({"order_id": "A-1042"})


class ToolEndpoint:
    """An HTTP API of the agent's owner: records what it gets, answers what a test says, when it says."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status, self.answer, self.delay, self.headers = 200, b'{"status": "shipped"}', 0.0, []

    async def __call__(self, scope, receive, send) -> None:
        raw = await request_body(scope, receive, send)
        if raw is None:
            return
        self.requests.append(
            {"headers": {k.decode(): v.decode() for k, v in scope["headers"]}, "body": json.loads(raw)}
        )
        await asyncio.sleep(self.delay)
        headers = [(b"content-type", b"application/json"), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.answer})


@pytest.fixture(scope="module")
def tool_server():
    endpoint = ToolEndpoint()
    with ServerThread(endpoint) as server:
        server.endpoint = endpoint
        yield server


@pytest.fixture
def endpoint(tool_server) -> ToolEndpoint:
    tool_server.endpoint.__init__()
    return tool_server.endpoint


def agents_file(tmp_path: Path, upstream_url: str, tool_url: str, extra: str = "", tool_extra: str = "") -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(
        f"""
[agents.shop]
api_keys = ["shop-key"]
llm_base_url = "{upstream_url}/v1"
server_tools = "none"
{extra}

[[agents.shop.tools]]
name = "order_status"
description = "The delivery status of an order."
url = "{tool_url}/orders/status"
parameters = {{ type = "object", properties = {{ order_id = {{ type = "string" }} }}, required = ["order_id"] }}
timeout_seconds = 10
headers = {{ Authorization = "env:SHOP_TOKEN" }}
{tool_extra}
"""
    )
    return path


def ask(server, words: str = "Where is my order A-1042?", **fields) -> httpx.Response:
    body = {"stream": True, "channel": "room-1", "messages": [{"role": "user", "content": words}], **fields}
    return httpx.post(
        server.url + "/chat/completions", json=body, headers={"authorization": "Bearer shop-key"}, timeout=30
    )


def tool_result(upstream) -> dict:
    message = next(m for m in upstream.requests[1]["body"]["messages"] if m["role"] == "tool")
    return json.loads(message["content"])


def test_a_declared_tool_is_offered_called_with_the_context_and_its_answer_read(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHOP_TOKEN", "Bearer shop-secret-token")
    server = make_server(agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url))
    upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["It has shipped."]}]
    answer = ask(server, variables={"customer": "Ann"})
    assert text_of(sse_events(answer)) == "It has shipped."
    offered = upstream.requests[0]["body"]["tools"]
    assert [t["function"]["name"] for t in offered] == ["order_status"]
    assert offered[0]["function"]["parameters"]["required"] == ["order_id"]
    (call,) = endpoint.requests
    assert call["body"]["arguments"] == {"order_id": "A-1042"}
    assert call["body"]["context"]["channel"] == "room-1" and call["body"]["context"]["variables"] == {
        "customer": "Ann"
    }
    assert call["headers"]["authorization"] == "Bearer shop-secret-token"
    assert tool_result(upstream) == {"status": "shipped"}


@pytest.mark.parametrize(
    ("status", "answer", "headers", "said"),
    [
        (500, b'{"error": "db down"}', [], "answered HTTP 500"),
        (302, b"", [(b"location", b"http://169.254.169.254/")], "redirect"),
        (200, b"x" * 200_000, [], "larger than"),
        (200, b'{"token": "shop-secret-token"}', [], "[redacted]"),  # an echo of its own header's token
    ],
)
def test_a_tool_that_fails_is_a_result_the_model_reads(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch, status, answer, headers, said
):
    monkeypatch.setenv("SHOP_TOKEN", "Bearer shop-secret-token")  # the token alone is scrubbed too
    server = make_server(agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url))
    endpoint.status, endpoint.answer, endpoint.headers = status, answer, headers
    upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["Sorry."]}]
    assert ask(server).status_code == 200
    result = json.dumps(tool_result(upstream))
    assert said in result and "shop-secret-token" not in result
    assert len(endpoint.requests) == 1  # the redirect was not followed


def test_a_slow_tool_gets_its_time_limit(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHOP_TOKEN", "t")
    path = agents_file(tmp_path, upstream_server.url, tool_server.url, extra="tool_async_after_ms = 0")
    path.write_text(path.read_text().replace("timeout_seconds = 10", "timeout_seconds = 0.5"))
    server = make_server(agents_file=path)
    endpoint.delay = 3
    upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["Sorry."]}]
    ask(server).read()
    assert "did not finish within 0.5 seconds" in tool_result(upstream)["error"]


@pytest.mark.parametrize(
    ("name", "destructive"),
    [("order_status", 'destructive = ["cancel", "取消"]'), ("cancel_order", "destructive = true")],
)
def test_a_destructive_declared_tool_runs_only_when_the_user_asks(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch, name, destructive
):
    monkeypatch.setenv("SHOP_TOKEN", "t")
    path = agents_file(tmp_path, upstream_server.url, tool_server.url, tool_extra=destructive)
    path.write_text(path.read_text().replace('name = "order_status"', f'name = "{name}"'))
    server = make_server(agents_file=path)
    call = {"calls": [(name, json.dumps({"order_id": "A-1", "reason": "asked"}))]}
    upstream.script.turns = [call, {"say": ["Ok."]}]
    ask(server, "How do I cancel an order?").read()
    assert endpoint.requests == [] and "do not ask for it" in tool_result(upstream)["error"]
    upstream.reset()
    upstream.script.turns = [call, {"say": ["Ok."]}]
    ask(server, "Please cancel order A-1.").read()
    assert len(endpoint.requests) == 1 and endpoint.requests[0]["body"]["arguments"] == {"order_id": "A-1"}


@pytest.mark.parametrize(
    ("tool", "said"),
    [
        ('description = "no address"', "url: an http"),
        ("timeout_seconds = 600", "timeout_seconds"),
        ("destructive = 3", "destructive is true"),
        ('colour = "blue"', "colour is not a tool's key"),
        ('parameters = { type = "object", properties = "oops" }', "parameters.properties"),
        ('parameters = { type = "object", properties = { id = { type = "string" } }, required = "id" }', "required"),
        ('name = "calculate"', "the name of a server tool"),
        ('name = "end_call"', "the name of a server tool"),
    ],
)
def test_a_declared_tool_that_cannot_be_used_stops_the_server_with_the_reason(
    make_server, upstream_server, upstream, tmp_path, tool, said
):
    path = tmp_path / "agents.toml"
    name = "" if tool.startswith("name") else 'name = "t"\n'
    path.write_text(
        f'[agents.shop]\napi_keys = ["k"]\nagora_app_id = "app"\nagora_customer_id = "c"\n'
        f'agora_customer_secret = "s"\n[[agents.shop.tools]]\n{name}{tool}\n'
        + ('url = "https://example.com/t"\n' if "description" not in tool else 'url = "ftp://x"\n')
    )
    with pytest.raises(ValueError, match=said):
        make_server(agents_file=path)


@pytest.mark.slow
def test_a_slow_tool_is_answered_after_the_turn_in_the_callers_channel(
    make_server, upstream_server, upstream, tool_server, endpoint, agora, tmp_path, monkeypatch
):
    """A tool that answers after 6 s, TOOL_ASYNC_AFTER_MS 1 s: the answer ends with the model's promise
    within a couple of seconds; when the tool answers, the model phrases its result and Agora's agent in
    the caller's channel says it (speak, APPEND); the next request of that channel holds the result, and
    a request of another channel does not."""
    monkeypatch.setenv("SHOP_TOKEN", "t")
    credentials = (
        f'tool_async_after_ms = 1000\nagora_app_id = "app-1"\nagora_customer_id = "cust"\n'
        f'agora_customer_secret = "secret"\nagora_api_base = "{agora.url}"'
    )
    server = make_server(agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url, extra=credentials))
    endpoint.delay, endpoint.answer = 6, b'{"status": "shipped", "eta": "tomorrow"}'
    upstream.script.turns = [
        {"calls": [("order_status", ORDER_ARGS)]},
        {"say": ["I'm still checking; I'll tell you shortly."]},
    ]
    started = time.monotonic()
    answer = ask(server)
    assert text_of(sse_events(answer)).endswith("I'm still checking; I'll tell you shortly.")  # maybe bridged
    assert time.monotonic() - started < 5  # not the tool's 6 s
    assert tool_result(upstream)["status"] == "still running"
    upstream.script.turns = [{"say": ["Good news: order A-1042 has shipped and arrives tomorrow."]}]
    eventually(lambda: any(path.endswith("/speak?") for _, path, _ in agora.calls), 20)
    assert agora.bodies[-1] == {
        "text": "Good news: order A-1042 has shipped and arrives tomorrow.",
        "priority": "APPEND",
        "interruptable": True,
    }
    phrased = upstream.requests[-1]["body"]
    assert phrased["stream"] is False and "tomorrow" in json.dumps(phrased["messages"])
    upstream.reset()
    ask(server, "And when exactly?").read()
    later = [m for m in upstream.requests[-1]["body"]["messages"] if m["role"] == "tool"]
    assert later and json.loads(later[0]["content"]) == {"status": "shipped", "eta": "tomorrow"}
    upstream.reset()
    ask(server, "Hello", channel="room-2").read()
    assert not [m for m in upstream.requests[-1]["body"]["messages"] if m["role"] == "tool"]


@pytest.mark.slow
def test_a_slow_tool_without_agora_holds_the_answer_as_before(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHOP_TOKEN", "t")
    server = make_server(
        agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url, extra="tool_async_after_ms = 500")
    )
    endpoint.delay = 2
    upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["It has shipped."]}]
    assert text_of(sse_events(ask(server))).endswith("It has shipped.")  # after the bridge phrase
    assert tool_result(upstream) == {"status": "shipped"}


def test_a_changed_tool_is_picked_up_by_a_reload(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHOP_TOKEN", "t")
    path = agents_file(tmp_path, upstream_server.url, tool_server.url)
    server = make_server(agents_file=path, agents_watch_seconds=0.05)
    path.write_text(path.read_text().replace("/orders/status", "/v2/orders/status").replace("order_status", "track"))
    upstream.script.turns = [{"say": ["Hi."]}]

    def offered() -> list[str]:
        upstream.reset()
        upstream.script.turns = [{"say": ["Hi."]}]
        ask(server).read()
        return [t["function"]["name"] for t in upstream.requests[0]["body"].get("tools", [])]

    eventually(lambda: offered() == ["track"], 5)
    assert offered() == ["track"]
    upstream.reset()
    upstream.script.turns = [{"calls": [("track", ORDER_ARGS)]}, {"say": ["Shipped."]}]
    ask(server).read()
    assert endpoint.requests[-1]["body"]["arguments"] == {"order_id": "A-1042"}


@pytest.mark.slow
def test_a_slow_tool_is_pending_once_a_channel_and_dropped_when_the_call_ends(
    make_server, upstream_server, upstream, tool_server, endpoint, agora, tmp_path, monkeypatch
):
    """A second call of the same slow tool in the channel is told the first still runs; the user's
    goodbye (end_call) drops the pending result: Agora is asked to leave, never to speak."""
    monkeypatch.setenv("SHOP_TOKEN", "t")
    credentials = (
        f'tool_async_after_ms = 300\nagora_app_id = "app-1"\nagora_customer_id = "cust"\n'
        f'agora_customer_secret = "secret"\nagora_api_base = "{agora.url}"\nagora_hangup_grace_ms = 0'
    )
    server = make_server(agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url, extra=credentials))
    endpoint.delay = 4
    for _ in range(2):
        upstream.reset()
        upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["Still on it."]}]
        ask(server).read()
    assert tool_result(upstream)["status"] == "already running"
    upstream.reset()
    goodbye = ("end_call", json.dumps({"goodbye": "Goodbye!", "reason": "The user said bye."}))
    upstream.script.turns = [{"calls": [goodbye]}, {"say": ["Goodbye!"]}]
    ask(server, "Thanks, bye!").read()
    eventually(lambda: any(path.endswith("/leave?") for _, path, _ in agora.calls), 5)
    time.sleep(5)  # past the tool's answer
    assert [path for _, path, _ in agora.calls if "/speak" in path] == []
    assert any(path.endswith("/leave?") for _, path, _ in agora.calls)


def test_only_a_headers_credentials_are_scrubbed_from_its_answer(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch
):
    """The token an Authorization header carries is scrubbed; a version or an Accept header is no
    secret, and the dates and types a tool answers reach the model whole."""
    monkeypatch.setenv("SHOP_TOKEN", "Bearer shop-secret-token")
    path = agents_file(tmp_path, upstream_server.url, tool_server.url)
    path.write_text(
        path.read_text().replace(
            'headers = { Authorization = "env:SHOP_TOKEN" }',
            'headers = { Authorization = "env:SHOP_TOKEN", X-Api-Version = "2024-01-02", Accept = "application/json" }',
        )
    )
    server = make_server(agents_file=path)
    endpoint.answer = b'{"shipped": "2024-01-02", "type": "application/json", "echo": "shop-secret-token"}'
    upstream.script.turns = [{"calls": [("order_status", ORDER_ARGS)]}, {"say": ["Shipped."]}]
    ask(server).read()
    assert tool_result(upstream) == {"shipped": "2024-01-02", "type": "application/json", "echo": "[redacted]"}


def test_too_many_tool_calls_at_once_are_a_result_and_no_traceback(
    make_server, upstream_server, upstream, tool_server, endpoint, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("SHOP_TOKEN", "t")
    server = make_server(agents_file=agents_file(tmp_path, upstream_server.url, tool_server.url), max_http_tool_calls=1)
    endpoint.delay = 0.5
    two = [("order_status", ORDER_ARGS), ("order_status", json.dumps({"order_id": "B-7"}))]
    upstream.script.turns = [{"calls": two}, {"say": ["One of them."]}]
    ask(server).read()
    results = [m["content"] for m in upstream.requests[1]["body"]["messages"] if m["role"] == "tool"]
    assert len(results) == 2 and sum("too many tool calls" in r for r in results) == 1
    assert "Traceback" not in caplog.text


def test_results_of_calls_long_over_let_their_channels_go(monkeypatch):
    """Most calls end with a hang-up, not end_call: their kept results must not fill the table of
    channels, or every slow call after the thousandth channel would be told the server is busy."""
    from custom_llm_server.core.context import Context
    from custom_llm_server.llm import later

    monkeypatch.setattr(later, "MAX_CHANNELS", 3)
    monkeypatch.setattr(later, "KEPT_SECONDS", 0.2)
    said: list[str] = []

    async def say(context, text):
        said.append(context.channel)
        return "spoken"

    async def phrase(messages):
        return "It is ready."

    async def run() -> str:
        results = later.Later(1, say, phrase)

        async def done() -> str:
            return '{"status": "ready"}'

        for n in range(3):
            context = Context(f"r{n}", engine={"channel": f"room-{n}"})
            results.adopt(f"call-{n}", "t", "{}", asyncio.ensure_future(done()), context)
        await asyncio.sleep(0.1)
        assert len(results.kept) == 3
        await asyncio.sleep(0.2)  # every kept result is now older than KEPT_SECONDS
        fresh = Context("r9", engine={"channel": "room-9"})
        told = results.adopt("call-9", "t", "{}", asyncio.ensure_future(done()), fresh)
        await asyncio.sleep(0.05)
        await results.aclose()
        return told

    assert json.loads(asyncio.run(run()))["status"] == "still running" and "room-9" in said
