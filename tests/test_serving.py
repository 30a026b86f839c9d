"""serving.py: auth, bad input, errors in OpenAI's shape, the request log, metrics, readiness, limits, shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import openai
import pytest

import custom_llm
from tests.conftest import API_KEY, AUTH, hold_a_stream, metric, post, raw_connection, read_until_closed

USER = [{"role": "user", "content": "Hi"}]
ASK = {"messages": USER, "stream": True}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if code:
        assert error["code"] == code
    # Nothing internal reaches a caller.
    for leak in ("Traceback", ".py", "/work", "upstream-secret"):
        assert leak not in response.text
    return error


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"authorization": f"Basic {API_KEY}"}, "missing_api_key"),
        ({"authorization": "Bearer"}, "missing_api_key"),
    ],
)
def test_auth_rejections_never_reach_the_upstream(server, upstream, headers, code):
    for path in ("/chat/completions", "/rag/chat/completions", "/audio/chat/completions"):
        response = httpx.post(server.url + path, json={"stream": True, "messages": USER}, headers=headers)
        assert_error(response, 401, code)
    assert upstream.requests == []


def test_any_of_the_rotated_keys_is_accepted(make_server, upstream):
    server = make_server(api_keys=("old-key", "new-key"))
    for key in ("old-key", "new-key"):
        response = httpx.post(
            server.url + "/chat/completions",
            json={"stream": True, "messages": USER},
            headers={"authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200
    assert_error(
        httpx.post(
            server.url + "/chat/completions",
            json={"stream": True, "messages": USER},
            headers={"authorization": "Bearer test-key"},
        ),
        401,
    )


def test_opt_out_of_auth_serves_without_a_key(make_server, upstream):
    server = make_server(api_keys=(), allow_unauthenticated=True)
    assert httpx.post(server.url + "/chat/completions", json={"stream": True, "messages": USER}).status_code == 200


@pytest.mark.parametrize(
    "content, code",
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'[{"role": "user", "content": "Hi"}]', "invalid_json"),
        (b'"just a string"', "invalid_json"),
        (b"42", "invalid_json"),
        (b'{"messages": []}', "invalid_value"),
        (b'{"model": "m"}', "invalid_value"),
        (b'{"messages": "Hi"}', "invalid_value"),
        (b'{"messages": [{"role": "wizard", "content": "Hi"}]}', "invalid_value"),
        (b'{"messages": [{"content": "Hi"}]}', "invalid_value"),
        (b'{"messages": [{"role": "user", "content": 42}]}', "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}', "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "stream": "maybe"}', "invalid_value"),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1.5}', "invalid_value"),
        (b'{"messages": [{"role": "user", "content": [{"text": "no type"}]}]}', "invalid_value"),
    ],
)
def test_malformed_bodies_are_400(server, upstream, content, code):
    for path in ("/chat/completions", "/rag/chat/completions", "/audio/chat/completions"):
        response = httpx.post(server.url + path, content=content, headers={**AUTH, "content-type": "application/json"})
        assert_error(response, 400, code)
    assert upstream.requests == []


def test_validation_errors_name_the_field(server, upstream):
    response = httpx.post(
        server.url + "/chat/completions",
        headers=AUTH,
        json={"stream": True, "messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "x"}]},
    )
    error = assert_error(response, 400)
    assert error["param"] == "messages.1" and "wizard" in error["message"]


def test_a_body_over_the_limit_is_413(make_server, upstream):
    server = make_server(max_body_bytes=1000)
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(httpx.post(server.url + "/chat/completions", json=big, headers=AUTH), 413, "body_too_large")

    def chunked():  # no content-length: the cap holds while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(50):
            yield b"x" * 100
        yield b'"}]}'

    response = httpx.post(
        server.url + "/chat/completions", content=chunked(), headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(response, 413, "body_too_large")
    assert upstream.requests == []


def test_a_non_json_content_type_is_415(server, upstream):
    response = httpx.post(server.url + "/chat/completions", data={"messages": "Hi"}, headers=AUTH)
    assert_error(response, 415, "unsupported_media_type")


def test_unknown_paths_and_methods(server, upstream):
    assert_error(httpx.post(server.url + "/v2/nothing", json={}, headers=AUTH), 404, "not_found")
    assert_error(httpx.get(server.url + "/chat/completions", headers=AUTH), 405, "method_not_allowed")
    assert_error(httpx.get(server.url + "/nothing"), 401)  # without a key, nothing is revealed


def test_the_server_keeps_serving_after_bad_input(server, client, upstream):
    for content in (b"{", b"[]", b'{"messages": []}'):
        httpx.post(server.url + "/chat/completions", content=content, headers=AUTH)
    answer = client.chat.completions.create(model="m", messages=USER, stream=False)
    assert answer.choices[0].message.content == "Hello from the upstream."


def test_sdk_raises_bad_request_with_our_message(client, upstream):

    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[], stream=True)


def test_health_needs_no_key(server):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok", "version": custom_llm.__version__}


def test_request_id_is_returned(http, upstream):
    response = http.post("/chat/completions", json={"stream": True, "messages": USER})
    assert len(response.headers["x-request-id"]) == 16


def test_one_log_line_per_request_without_message_contents(client, upstream, caplog):
    secret = "purple-elephant-42"
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        list(
            client.chat.completions.create(
                model="m1", stream=True, extra_body={"turn_id": 9}, messages=[{"role": "user", "content": secret}]
            )
        )
        deadline = time.monotonic() + 10
        while "path=/chat/completions" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.message for r in caplog.records if r.message.startswith("request ")]
    assert len(lines) == 1
    for field in (
        "path=/chat/completions",
        "status=200",
        "model=m1",
        "turn=9",
        "ttfb_ms=",
        "total_ms=",
        "chunks=",
        "cancelled=false",
    ):
        assert field in lines[0]
    assert secret not in caplog.text and API_KEY not in caplog.text


def test_metrics_count_requests_and_need_the_key(make_server, upstream):
    server = make_server()
    ok, bad = (
        f'custom_llm_requests_total{{endpoint="chat",status="{status}",agent="default"}}' for status in (200, 400)
    )
    before = metric(server, ok), metric(server, bad)
    for _ in range(3):
        post(server, ASK).read()
    post(server, {"messages": []}).read()
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert (metric(server, ok), metric(server, bad)) == (before[0] + 3, before[1] + 1)
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in (
        "custom_llm_time_to_first_byte_seconds_bucket",
        "custom_llm_request_duration_seconds_bucket",
        "custom_llm_upstream_first_event_seconds_bucket",
        "custom_llm_in_flight_requests",
        "custom_llm_cancelled_total",
        "custom_llm_retrieval_seconds",
        "custom_llm_tool_seconds",
    ):
        assert name in text, name


def test_ready_reports_what_is_missing(make_server, upstream):
    upstream.probe_status = 500
    server = make_server()
    response = httpx.get(server.url + "/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "problems": ["the upstream LLM does not answer"]}
    upstream.probe_status = 200
    time.sleep(1.1)  # a failed probe stands for a second, so /ready cannot multiply upstream calls
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}


def test_too_many_messages_is_400(make_server, upstream):
    server = make_server(max_messages=3)
    response = post(server, {"messages": [{"role": "user", "content": "x"}] * 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"


def test_per_key_concurrency_limit_is_429(make_server, upstream):
    upstream.script.delay = 0.2
    server = make_server(api_keys=("key-a", "key-b"), max_streams_per_key=1)
    hold_a_stream(server, "key-a")
    refused = post(server, ASK, headers={"authorization": "Bearer key-a"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_concurrent_requests"
    assert refused.headers["retry-after"] == "1"
    assert post(server, ASK, headers={"authorization": "Bearer key-b"}).status_code == 200


def test_shutdown_lets_short_streams_finish(make_server, upstream):
    upstream.script.delay = 0.05
    server = make_server(config={"timeout_graceful_shutdown": 5})
    with httpx.stream("POST", server.url + "/chat/completions", json=ASK, headers=AUTH, timeout=20) as response:
        lines = response.iter_lines()
        next(lines)
        server.server.should_exit = True  # what SIGTERM does
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and "error" not in "".join(rest)


def test_shutdown_closes_long_streams_with_an_error_and_done(make_server, upstream):
    upstream.script.delay, upstream.script.words = 0.05, ["word "] * 200
    server = make_server(config={"timeout_graceful_shutdown": 0.3})
    with httpx.stream("POST", server.url + "/chat/completions", json=ASK, headers=AUTH, timeout=20) as response:
        lines = response.iter_lines()
        next(lines)
        server.server.should_exit = True
        rest = [line for line in lines if line]
    assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down" and rest[-1] == "data: [DONE]"


# --- hostile clients, before any key is checked ------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/chat/completions"])
def test_a_header_that_never_ends_gets_431_and_costs_nothing(make_server, path):
    server = make_server(max_header_bytes=64 * 1024)
    with raw_connection(server) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nx-junk: ".encode())
        try:
            for _ in range(50 * 16):  # up to 50 MB, 64 KB at a time
                connection.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: what we want
        assert read_until_closed(connection).startswith(b"HTTP/1.1 431 ")
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("sent", [b"", b"POST /chat/compl", b"GET /health HTTP/1.1\r\nhost: x\r\n"])
def test_connections_that_send_nothing_or_a_partial_head_are_closed(make_server, sent):
    server = make_server(header_timeout_seconds=0.5)
    with raw_connection(server) as connection:
        connection.sendall(sent)
        started = time.monotonic()
        assert read_until_closed(connection) in (
            b"",
            b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        assert time.monotonic() - started < 15  # not held open


def test_a_header_a_second_does_not_hold_a_connection(make_server):
    server = make_server(header_timeout_seconds=0.5)
    with raw_connection(server) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        try:
            for n in range(20):  # slowloris: one header every 0.2 s, forever
                connection.sendall(b"x-%d: y\r\n" % n)
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_until_closed(connection).startswith(b"HTTP/1.1 408") and time.monotonic() - started < 15
    with raw_connection(server) as connection:  # a kept-alive connection is held to the same bound
        connection.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        received = connection.recv(65536)
        while b'"ok"' not in received:  # the head and the body may come apart
            received += connection.recv(65536)
        assert b"200 OK" in received
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        assert read_until_closed(connection).startswith(b"HTTP/1.1 408")


def test_nothing_a_caller_sends_can_forge_or_bloat_a_log_line(server, upstream, caplog):
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        httpx.get(server.url + "/health%0a2026-01-01 INFO custom_llm [x] request path=/forged")
        post(server, {**ASK, "model": "m\nforged" + "x" * 3_000_000, "turn_id": "7\r\nforged"}).read()
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "custom_llm"]
    assert lines and all("\n" not in line and "\r" not in line and len(line) < 2000 for line in lines)


def test_shutdown_before_the_first_event_is_a_503_in_openais_shape(make_server, upstream):
    upstream.script.first_delay = 5
    server = make_server(config={"timeout_graceful_shutdown": 0.3})
    result = {}
    thread = threading.Thread(target=lambda: result.update(response=post(server, ASK)))
    thread.start()
    time.sleep(0.3)
    server.server.should_exit = True  # what SIGTERM does
    thread.join(10)
    response = result["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"


def test_an_error_before_the_first_byte_is_no_barge_in(make_server, upstream):
    server = make_server()
    before = metric(server, 'custom_llm_cancelled_total{endpoint="chat",agent="default"}')
    upstream.script.status = 500
    for _ in range(3):
        assert post(server, ASK).status_code == 502
    time.sleep(0.1)
    assert metric(server, 'custom_llm_cancelled_total{endpoint="chat",agent="default"}') == before


def test_metrics_are_for_the_operators_key_only(make_server, upstream, tmp_path):
    """/metrics names every agent and its traffic: an agent's key gets 403, the server's own key
    (CUSTOM_LLM_API_KEY) and METRICS_API_KEY get the numbers."""
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.a]\napi_keys = ["agent-a-key"]\n[agents.b]\napi_keys = ["agent-b-key"]\n')
    server = make_server(agents_file=agents, metrics_api_key=("scraper-key",))
    post(server, ASK, headers={"authorization": "Bearer agent-a-key"}).read()
    refused = httpx.get(server.url + "/metrics", headers={"authorization": "Bearer agent-a-key"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "operator_only"
    assert "agent_a" not in refused.text and 'agent="a"' not in refused.text
    assert httpx.get(server.url + "/metrics", headers={"authorization": "Bearer nobody"}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    for key in (API_KEY, "scraper-key"):  # the server's own key, and the scraper's
        answer = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and 'agent="a"' in answer.text
    assert post(server, ASK, headers={"authorization": "Bearer scraper-key"}).status_code == 401  # it selects no agent


def test_the_home_page_points_to_the_playground_without_a_key(make_server, upstream):
    server = make_server()
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'href="/playground"' in page.text and "/v1/chat/completions" in page.text
    assert API_KEY not in page.text
    closed = make_server(playground=False)
    assert 'href="/playground"' not in httpx.get(closed.url + "/").text


def test_every_api_path_is_also_under_v1(make_server, upstream):
    server = make_server()
    for path in ("/chat/completions", "/rag/chat/completions", "/audio/chat/completions"):
        answer = post(server, {"messages": [{"role": "user", "content": "Hi"}]}, "/v1" + path)
        assert answer.status_code == 200, path
    assert httpx.get(server.url + "/v1/knowledge/search", params={"q": "PCM"}, headers=AUTH).status_code == 200
    unknown = httpx.get(server.url + "/v2/chat/completions", headers=AUTH)
    assert unknown.status_code == 404 and "/v2/chat/completions" in unknown.json()["error"]["message"]
