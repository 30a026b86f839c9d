"""/chat/completions: the relay, the streaming rule, what reaches the upstream, and barge-in."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import API_KEY, UPSTREAM_KEY, error_of, post, sse_events

USER = [{"role": "user", "content": "Hi"}]
AUTH = {"authorization": f"Bearer {API_KEY}"}


def test_sdk_streaming_receives_every_word_in_order(client, upstream):
    stream = client.chat.completions.create(model="m", messages=USER, stream=True)
    words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert words == upstream.script.words


def test_sdk_non_streaming_returns_a_chat_completion(client, upstream):
    completion = client.chat.completions.create(model="m", messages=USER, stream=False)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from the upstream."
    assert upstream.requests[-1]["body"]["stream"] is False


def test_events_are_relayed_byte_for_byte_and_end_with_done(http, upstream):
    with http.stream("POST", "/chat/completions", json={"model": "m", "messages": USER, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [b"data: " + e + b"\n\n" for e in events[:-1]] == upstream.events()
    assert events[-1] == b"[DONE]"


@pytest.mark.parametrize("path", ["/chat/completions", "/rag/chat/completions", "/audio/chat/completions"])
def test_missing_stream_means_one_json_completion_as_at_openai(http, upstream, path):
    response = http.post(path, json={"messages": USER})
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["object"] == "chat.completion"
    if upstream.requests:
        assert upstream.requests[-1]["body"]["stream"] is False or path == "/audio/chat/completions"


@pytest.mark.parametrize(
    "extra, headers",
    [
        ({"turn_id": 3}, {}),  # Agora's engine with vendor "custom"
        ({"timestamp": 1678905236}, {}),
        ({}, {"accept": "text/event-stream"}),  # a client that asks for SSE
    ],
)
def test_the_engine_always_gets_sse(http, upstream, extra, headers):
    response = http.post("/chat/completions", json={"messages": USER, **extra}, headers=headers)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert sse_events(response)[-1] == b"[DONE]" and upstream.requests[-1]["body"]["stream"] is True


def test_an_explicit_stream_false_wins_even_for_the_engine(http, upstream):
    response = http.post("/chat/completions", json={"messages": USER, "turn_id": 3, "stream": False})
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the upstream."


@pytest.mark.parametrize("value", ["no", "false", 0, 1, "true", None])
def test_stream_must_be_a_boolean(http, upstream, value):
    response = http.post("/chat/completions", json={"messages": USER, "stream": value})
    if value is None:  # null is "not given": one JSON completion
        assert response.json()["object"] == "chat.completion"
        return
    assert response.status_code == 400 and error_of(response)["param"] == "stream"
    assert upstream.requests == []


def test_usage_chunk_passes_through(client, upstream):
    upstream.script.usage = True
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7 + len(upstream.script.words)
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}


def test_every_openai_parameter_reaches_the_upstream_unchanged(client, upstream):
    params = dict(
        temperature=0.3,
        top_p=0.9,
        max_tokens=42,
        stop=["\n\n"],
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        n=1,
        logit_bias={"50256": -100},
        user="caller-1",
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "text"},
        parallel_tool_calls=False,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
    )
    list(client.chat.completions.create(model="gpt-x", messages=USER, stream=True, **params))
    received = upstream.requests[-1]["body"]
    for key, value in params.items():
        if key != "tools":
            assert received[key] == value, key
    assert received["tools"][0] == params["tools"][0]  # the server's own tools follow the caller's
    assert received["model"] == "gpt-x"


def test_unknown_keys_are_forwarded(http, upstream):
    http.post(
        "/chat/completions",
        json={"stream": True, "messages": USER, "top_k": 40, "repetition_penalty": 1.1, "options": {"num_ctx": 4096}},
    ).read()
    received = upstream.requests[-1]["body"]
    assert received["top_k"] == 40 and received["repetition_penalty"] == 1.1
    assert received["options"] == {"num_ctx": 4096}


def test_engine_fields_stay_on_our_side(http, upstream):
    body = {
        "model": "m",
        "turn_id": 4,
        "timestamp": 1678905236,
        "interruptable": True,
        "context": {"presence": {"userA": {"selection": "x"}}},
        "channel": "room-1",
        "app_id": "app",
        "rtm_token": "secret-token",
        "subscriber_token": "t",
        "output_modalities": ["text", "audio"],  # the agent's llm setting, when it reaches params
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "assistant",
                "content": "How can I help?",
                "turn_id": 1,
                "timestamp": 1678901234,
                "metadata": {"source": "greeting"},
            },
            {
                "role": "user",
                "content": "Tell me a joke",
                "turn_id": 2,
                "timestamp": 1678901235,
                "metadata": {"source": "asr", "user": "user123"},
            },
            {
                "role": "assistant",
                "content": "Why did the ",
                "turn_id": 2,
                "metadata": {"source": "llm", "interrupted": True, "original": "Why did the chicken"},
            },
            {"role": "user", "content": "go on", "turn_id": 3},
        ],
    }
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 200 and sse_events(response)[-1] == b"[DONE]"
    received = upstream.requests[-1]["body"]
    for key in (
        "turn_id",
        "timestamp",
        "interruptable",
        "context",
        "channel",
        "app_id",
        "rtm_token",
        "subscriber_token",
        "output_modalities",
    ):
        assert key not in received, key
    said = [m for m in received["messages"] if m["role"] != "tool" and not m.get("tool_calls")]
    assert said[1]["role"] == "system" and "read_app_state" in said[1]["content"]  # context.presence, as data
    assert [said[0], *said[2:]] == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {
            "role": "assistant",
            "content": "Why did the [The user interrupted this answer here and did not hear the rest.]",
        },
        {"role": "user", "content": "go on"},
    ]


def test_strip_fields_setting_keeps_more_keys_back(make_server, upstream):
    server = make_server(strip_fields=frozenset({"tenant"}))
    post(server, {"stream": True, "messages": USER, "tenant": "acme", "top_k": 3}).read()
    received = upstream.requests[-1]["body"]
    assert "tenant" not in received and received["top_k"] == 3


def test_model_defaults_to_llm_model(make_server, upstream):
    server = make_server(llm_model="default-model")
    post(server, {"stream": True, "messages": USER}).read()
    assert upstream.requests[-1]["body"]["model"] == "default-model"


def test_both_image_shapes_reach_the_upstream_in_openai_shape(http, upstream):
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "image", "image_url": "https://example.com/b.png"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    response = http.post("/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200
    parts = upstream.requests[-1]["body"]["messages"][0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}
    assert parts[2] == {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}
    assert parts[3] == content[3]


def test_upstream_gets_our_key_never_the_callers(http, upstream):
    http.post("/chat/completions", json={"stream": True, "messages": USER}).read()
    headers = upstream.requests[-1]["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert API_KEY not in json.dumps(headers)


def test_disconnect_mid_stream_cancels_the_upstream(http, upstream):
    upstream.script.delay = 0.05
    upstream.script.words = ["word "] * 200
    with http.stream("POST", "/chat/completions", json={"stream": True, "messages": USER}) as response:
        lines = response.iter_lines()
        next(lines)
        closed_at = time.monotonic()
    assert upstream.disconnected.wait(10), "the upstream request was not cancelled"
    assert upstream.disconnected_at - closed_at < 5  # at once, not when the answer ends
    deadline = time.monotonic() + 10
    while upstream.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.active == 0


def test_disconnect_before_first_token_cancels_the_upstream(http, upstream):
    upstream.script.first_delay = 30
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", json={"stream": True, "messages": USER}, timeout=0.3)
    closed_at = time.monotonic()
    assert upstream.disconnected.wait(10), "the upstream request was not cancelled"
    assert upstream.disconnected_at - closed_at < 5  # at once, not when the answer ends


def test_no_upstream_configured_is_a_503(make_server, upstream):
    server = make_server(llm_base_url="https://api.openai.com/v1", llm_api_key="")
    response = post(server, {"stream": True, "messages": USER})
    assert response.status_code == 503 and error_of(response)["code"] == "no_upstream"
    assert upstream.requests == []
