"""Timeouts, retry and fallback, metrics, readiness, limits, shutdown and several workers."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, sse_events

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"authorization": f"Bearer {API_KEY}"}
ASK = {"messages": [{"role": "user", "content": "Hi"}]}


def post(server, body=ASK, **kw) -> httpx.Response:
    return httpx.post(server.url + "/chat/completions", json=body, headers=kw.pop("headers", AUTH), timeout=20, **kw)


def metric(server, series: str) -> float:
    """One series' value from /metrics (0 when absent). One process serves every test server, so
    tests compare values before and after."""
    for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def text_of(events: list[bytes]) -> str:
    return "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for e in events[:-1] if b'"choices"' in e)


# --- retry and fallback -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_failed_first_attempt_is_retried_once(server, upstream, status):
    upstream.script.status, upstream.script.fail_times = status, 1
    response = post(server)
    assert response.status_code == 200 and text_of(sse_events(response)) == "Hello from the upstream."
    assert len(upstream.requests) == 2


def test_a_client_error_is_not_retried(server, upstream):
    upstream.script.status = 400
    upstream.script.error = {"error": {"message": "Unsupported parameter: 'foo'"}}
    response = post(server)
    assert response.status_code == 400 and "Unsupported parameter" in response.json()["error"]["message"]
    assert len(upstream.requests) == 1


def test_a_slow_first_token_is_retried(make_server, upstream):
    upstream.script.first_delay, upstream.script.fail_times = 2, 1
    server = make_server(llm_first_token_timeout=0.3)
    response = post(server)
    assert text_of(sse_events(response)) == "Hello from the upstream." and len(upstream.requests) == 2


def test_the_fallback_serves_when_the_primary_fails_twice(make_server, upstream, fallback, fallback_server, caplog):
    upstream.script.status = 500
    server = make_server(llm_fallback_base_url=f"{fallback_server.url}/v1", llm_fallback_api_key="fallback-key",
                         llm_fallback_model="backup-model")
    errors = 'custom_llm_upstream_errors_total{code="upstream_failed",upstream="primary"}'
    before = metric(server, "custom_llm_fallbacks_total"), metric(server, errors)
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        response = post(server, {**ASK, "model": "main-model"})
    assert text_of(sse_events(response)) == "Hello from the upstream."
    assert len(upstream.requests) == 2 and len(fallback.requests) == 1
    assert fallback.requests[0]["body"]["model"] == "backup-model"
    assert fallback.requests[0]["headers"]["authorization"] == "Bearer fallback-key"
    assert "upstream=fallback" in caplog.text
    assert metric(server, "custom_llm_fallbacks_total") == before[0] + 1
    assert metric(server, errors) == before[1] + 2


def test_the_fallback_serves_when_the_primary_stalls(make_server, upstream, fallback, fallback_server):
    upstream.script.first_delay = 5
    server = make_server(llm_first_token_timeout=0.3, llm_fallback_base_url=f"{fallback_server.url}/v1")
    started = time.monotonic()
    assert text_of(sse_events(post(server))) == "Hello from the upstream."
    assert time.monotonic() - started < 2 and len(fallback.requests) == 1
    assert upstream.disconnected.wait(2)  # the stalled attempts were closed, not left running


def test_nothing_is_retried_after_content_was_sent(make_server, upstream, fallback, fallback_server):
    upstream.script.stall_after = 3
    server = make_server(llm_idle_timeout=0.3, llm_fallback_base_url=f"{fallback_server.url}/v1")
    events = sse_events(post(server))
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout" and events[-1] == b"[DONE]"
    assert len(upstream.requests) == 1 and fallback.requests == []


def test_an_empty_stream_is_retried_and_then_a_502(server, upstream):
    upstream.script.raw = b"data: [DONE]\n\n"
    response = post(server)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_empty"
    assert len(upstream.requests) == 2


def test_invalid_json_in_an_event_is_relayed_as_it_came(server, upstream):
    upstream.script.raw = b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: {not json\n\ndata: [DONE]\n\n'
    assert sse_events(post(server)) == [b'{"choices": [{"delta": {"content": "ok"}}]}', b"{not json", b"[DONE]"]


# --- metrics and readiness ----------------------------------------------------------------------


def test_metrics_count_requests_and_need_the_key(make_server, upstream):
    server = make_server()
    ok, bad = (f'custom_llm_requests_total{{endpoint="chat",status="{status}"}}' for status in (200, 400))
    before = metric(server, ok), metric(server, bad)
    for _ in range(3):
        post(server).read()
    post(server, {"messages": []}).read()
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert (metric(server, ok), metric(server, bad)) == (before[0] + 3, before[1] + 1)
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("custom_llm_time_to_first_byte_seconds_bucket", "custom_llm_request_duration_seconds_bucket",
                 "custom_llm_upstream_first_event_seconds_bucket", "custom_llm_in_flight_requests",
                 "custom_llm_cancelled_total", "custom_llm_retrieval_seconds", "custom_llm_tool_seconds"):
        assert name in text, name


def test_the_pool_is_warm_before_the_first_request(make_server, upstream):
    server = make_server()
    assert upstream.probes, "no warm-up call at start"
    post(server).read()
    assert upstream.requests[0]["client"] in upstream.probes  # the warm connection was reused


def test_ready_reports_what_is_missing(make_server, upstream):
    upstream.probe_status = 500
    server = make_server()
    response = httpx.get(server.url + "/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "problems": ["the upstream LLM does not answer"]}
    upstream.probe_status = 200
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}


# --- limits ---------------------------------------------------------------------------------------


def test_too_many_messages_is_400(make_server, upstream):
    server = make_server(max_messages=3)
    response = post(server, {"messages": [{"role": "user", "content": "x"}] * 4})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"


def hold_a_stream(server, key: str) -> threading.Event:
    """Start a slow stream in the background; the event is set once it has begun."""
    started = threading.Event()

    def run():
        with httpx.stream("POST", server.url + "/chat/completions", json=ASK, timeout=20,
                          headers={"authorization": f"Bearer {key}"}) as response:
            for _ in response.iter_lines():
                started.set()

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(5)
    return started


def test_per_key_concurrency_limit_is_429(make_server, upstream):
    upstream.script.delay = 0.2
    server = make_server(api_keys=("key-a", "key-b"), max_streams_per_key=1)
    hold_a_stream(server, "key-a")
    refused = post(server, headers={"authorization": "Bearer key-a"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_concurrent_requests"
    assert refused.headers["retry-after"] == "1"
    assert post(server, headers={"authorization": "Bearer key-b"}).status_code == 200


def test_upstream_stream_cap_is_503(make_server, upstream):
    upstream.script.delay = 0.2
    server = make_server(max_upstream_streams=1)
    hold_a_stream(server, API_KEY)
    refused = post(server)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"


# --- shutdown ---------------------------------------------------------------------------------------


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


# --- several workers ----------------------------------------------------------------------------------


def test_two_workers_share_the_key_and_the_metrics(upstream_server, upstream, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        number = free.getsockname()[1]
    env = {**os.environ, "WORKERS": "2", "PORT": str(number), "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING",
           "LLM_BASE_URL": f"{upstream_server.url}/v1", "LLM_API_KEY": "k", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env.pop("CUSTOM_LLM_API_KEY", None)
    process = subprocess.Popen([sys.executable, "custom_llm.py"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        key = None
        while key is None:  # the key is printed once, by the parent, and both workers accept it
            line = process.stderr.readline()
            assert line, "the server exited"
            if "callers must send this key:" in line:
                key = line.rsplit(":", 1)[1].strip()
        url, headers = f"http://127.0.0.1:{number}", {"authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with httpx.Client() as client:
                assert client.post(url + "/chat/completions", json=ASK, headers=headers).status_code == 200
        text = httpx.get(url + "/metrics", headers=headers).text
        assert 'custom_llm_requests_total{endpoint="chat",status="200"} 20.0' in text
    finally:
        process.terminate()
        process.wait(10)
