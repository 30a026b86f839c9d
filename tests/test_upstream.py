"""upstream.py: failures of the upstream, retry and fallback, the pool, and what an upstream may not make us do."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from tests.conftest import API_KEY, UPSTREAM_KEY, error_of, hold_a_stream, metric, post, sse_events, text_of

USER = [{"role": "user", "content": "Hi"}]
ASK = {"messages": USER, "stream": True}


def test_missing_done_from_upstream_still_ends_with_done(http, upstream):
    upstream.script.done = False
    events = sse_events(http.post("/chat/completions", json={"stream": True, "messages": USER}))
    assert events[-1] == b"[DONE]" and len(events) == len(upstream.events()) + 1


def test_crlf_and_multiline_events_are_normalised(http, upstream):
    upstream.script.raw = (
        b'data: {"a":1}\r\n\r\n: keep-alive comment\r\n\r\nevent: message\r\ndata: {"b":\r\ndata: 2}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    assert sse_events(http.post("/chat/completions", json={"stream": True, "messages": USER})) == [
        b'{"a":1}',
        b'{"b":\n2}',
        b"[DONE]",
    ]


def test_upstream_500_before_streaming_is_a_502(http, upstream):
    upstream.script.status = 500
    response = http.post("/chat/completions", json={"stream": True, "messages": USER})
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_failed"


def test_upstream_429_passes_through_with_its_message(client, upstream):
    upstream.script.status = 429
    upstream.script.error = {
        "error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}
    }
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="m", messages=USER, stream=True)
    assert "Rate limit reached" in str(raised.value)


def test_upstream_rejecting_our_key_never_echoes_it(http, upstream, caplog):
    upstream.script.status = 401
    upstream.script.error = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}"}}
    with caplog.at_level("DEBUG"):
        response = http.post("/chat/completions", json={"stream": True, "messages": USER})
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_auth_failed"
    assert UPSTREAM_KEY not in response.text and UPSTREAM_KEY not in caplog.text


def test_unreachable_upstream_is_a_502(make_server, upstream):
    with __import__("socket").socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    server = make_server(llm_base_url=f"http://127.0.0.1:{port}/v1")
    response = post(server, {"stream": True, "messages": USER})
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_unreachable"


def test_slow_first_token_is_a_504(make_server, upstream):
    upstream.script.first_delay = 2
    server = make_server(llm_first_token_timeout=0.3)
    response = post(server, {"stream": True, "messages": USER})
    # Nothing was sent to the caller yet, so the timeout is still a plain HTTP status.
    assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"


def test_stall_mid_stream_ends_with_an_error_event_and_done(make_server, upstream):
    upstream.script.stall_after = 3
    server = make_server(llm_idle_timeout=0.3)
    response = post(server, {"stream": True, "messages": USER})
    events = sse_events(response)
    assert [b"data: " + e + b"\n\n" for e in events[:3]] == upstream.events()[:3]
    assert json.loads(events[3]) == {
        "error": {
            "message": "The upstream LLM stopped sending.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_timeout",
        }
    }
    assert events[4:] == [b"[DONE]"]


def test_sdk_sees_a_mid_stream_error(make_server, upstream):
    upstream.script.stall_after = 3
    server = make_server(llm_idle_timeout=0.3)
    sdk = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIError, match="stopped sending"):
        list(sdk.chat.completions.create(model="m", messages=USER, stream=True))


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_failed_first_attempt_is_retried_once(server, upstream, status):
    upstream.script.status, upstream.script.fail_times = status, 1
    response = post(server, ASK)
    assert response.status_code == 200 and text_of(sse_events(response)) == "Hello from the upstream."
    assert len(upstream.requests) == 2


def test_a_client_error_is_not_retried(server, upstream):
    upstream.script.status = 400
    upstream.script.error = {"error": {"message": "Unsupported parameter: 'foo'"}}
    response = post(server, ASK)
    assert response.status_code == 400 and "Unsupported parameter" in response.json()["error"]["message"]
    assert len(upstream.requests) == 1


def test_a_slow_first_token_is_retried(make_server, upstream):
    upstream.script.first_delay, upstream.script.fail_times = 2, 1
    server = make_server(llm_first_token_timeout=0.3)
    response = post(server, ASK)
    assert text_of(sse_events(response)) == "Hello from the upstream." and len(upstream.requests) == 2


def test_the_fallback_serves_when_the_primary_fails_twice(make_server, upstream, fallback, fallback_server, caplog):
    upstream.script.status = 500
    server = make_server(
        llm_fallback_base_url=f"{fallback_server.url}/v1",
        llm_fallback_api_key="fallback-key",
        llm_fallback_model="backup-model",
    )
    errors = 'custom_llm_upstream_errors_total{code="upstream_failed",upstream="primary"}'
    before = metric(server, "custom_llm_fallbacks_total"), metric(server, errors)
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        response = post(server, {**ASK, "model": "main-model"})
    assert text_of(sse_events(response)) == "Hello from the upstream."
    assert len(upstream.requests) == 2 and len(fallback.requests) == 1
    assert fallback.requests[0]["body"]["model"] == "backup-model"
    assert fallback.requests[0]["headers"]["authorization"] == "Bearer fallback-key"
    for _ in range(100):  # the request's log line is written once the response has been sent
        if "upstream=fallback" in caplog.text:
            break
        time.sleep(0.02)
    assert "upstream=fallback" in caplog.text
    assert metric(server, "custom_llm_fallbacks_total") == before[0] + 1
    assert metric(server, errors) == before[1] + 2


def test_the_fallback_serves_when_the_primary_stalls(make_server, upstream, fallback, fallback_server):
    upstream.script.first_delay = 30
    server = make_server(llm_first_token_timeout=0.3, llm_fallback_base_url=f"{fallback_server.url}/v1")
    started = time.monotonic()
    assert text_of(sse_events(post(server, ASK))) == "Hello from the upstream."
    assert time.monotonic() - started < 20 and len(fallback.requests) == 1  # not after the stall
    assert upstream.disconnected.wait(10)  # the stalled attempts were closed, not left running


def test_nothing_is_retried_after_content_was_sent(make_server, upstream, fallback, fallback_server):
    upstream.script.stall_after = 3
    server = make_server(llm_idle_timeout=0.3, llm_fallback_base_url=f"{fallback_server.url}/v1")
    events = sse_events(post(server, ASK))
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout" and events[-1] == b"[DONE]"
    assert len(upstream.requests) == 1 and fallback.requests == []


def test_an_empty_stream_is_retried_and_then_a_502(server, upstream):
    upstream.script.raw = b"data: [DONE]\n\n"
    response = post(server, ASK)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_empty"
    assert len(upstream.requests) == 2


def test_invalid_json_in_an_event_is_relayed_as_it_came(server, upstream):
    upstream.script.raw = b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: {not json\n\ndata: [DONE]\n\n'
    assert sse_events(post(server, ASK)) == [b'{"choices": [{"delta": {"content": "ok"}}]}', b"{not json", b"[DONE]"]


def test_requests_share_one_pooled_upstream_connection(client, upstream):
    for _ in range(5):
        list(client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert len({r["client"] for r in upstream.requests}) == 1  # no client (or connection) per request


def test_the_pool_is_warm_before_the_first_request(make_server, upstream):
    server = make_server()
    assert upstream.probes, "no warm-up call at start"
    post(server, ASK).read()
    assert upstream.requests[0]["client"] in upstream.probes  # the warm connection was reused


def test_upstream_stream_cap_is_503(make_server, upstream):
    upstream.script.delay = 0.2
    server = make_server(max_upstream_streams=1)
    hold_a_stream(server, API_KEY)
    refused = post(server, ASK)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"


# --- what an upstream may not make the server hold or do ------------------------------------------


def health_ms(server) -> float:
    started = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    return (time.monotonic() - started) * 1000


def test_a_huge_event_is_refused_in_linear_time(make_server, upstream):
    upstream.script.pieces = [b'data: {"choices": [{"delta": {"content": "'] + [b"x" * 65536] * 256  # 16 MB, no end
    server = make_server(llm_max_event_bytes=1 << 20)
    started = time.monotonic()
    response = post(server, ASK)
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_event_too_large"
    assert time.monotonic() - started < 20  # the loop watchdog holds the rest: no callback ran 100 ms


def test_a_compressed_answer_is_never_expanded(make_server, upstream):
    import gzip

    bomb = gzip.compress(b"data: " + b"x" * 50_000_000)  # 50 MB in about 50 KB, without an event end
    upstream.script.raw, upstream.script.headers = bomb, [(b"content-encoding", b"gzip")]
    server = make_server()
    response = post(server, ASK)
    assert upstream.requests[-1]["headers"]["accept-encoding"] == "identity"
    assert response.status_code in (200, 502)  # bytes relayed as they came, or refused: never inflated
    assert len(response.content) < 1_000_000


def test_keepalive_comments_do_not_keep_a_dead_stream_open(make_server, upstream):
    upstream.script.words, upstream.script.forever, upstream.script.delay = ["Hi"], b": keepalive\n\n", 0.05
    server = make_server(llm_idle_timeout=0.3)
    started = time.monotonic()
    events = sse_events(post(server, ASK))
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout" and events[-1] == b"[DONE]"
    assert time.monotonic() - started < 20  # the stream never ends by itself


def test_an_endless_stream_is_cut_by_time_and_by_size(make_server, upstream):
    upstream.script.words, upstream.script.delay = ["Hi"], 0.01
    upstream.script.forever = b'data: {"choices": [{"index": 0, "delta": {"content": "more "}}]}\n\n'
    events = sse_events(post(make_server(llm_max_stream_seconds=0.5), ASK))
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout" and events[-1] == b"[DONE]"
    upstream.script.delay = 0.0
    events = sse_events(post(make_server(llm_max_response_bytes=200_000), ASK))
    assert json.loads(events[-2])["error"]["code"] == "upstream_too_large" and events[-1] == b"[DONE]"


def test_a_huge_non_streaming_answer_is_refused(make_server, upstream):
    upstream.script.body = b'{"choices": [{"message": {"content": "' + b"x" * 3_000_000 + b'"}}]}'
    response = post(make_server(llm_max_response_bytes=1_000_000), {**ASK, "stream": False})
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_too_large"


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_our_key_is_scrubbed_from_every_upstream_error(server, upstream, caplog, status):
    upstream.script.status = status
    upstream.script.error = {"error": {"message": f"bad request; headers were authorization: Bearer {UPSTREAM_KEY}"}}
    with caplog.at_level(logging.DEBUG):
        response = post(server, ASK)
    assert response.status_code == status and "[redacted]" in error_of(response)["message"]
    assert UPSTREAM_KEY not in response.text and UPSTREAM_KEY not in caplog.text


def test_nesting_orjson_cannot_write_is_a_400(server, upstream):
    deep = {}
    for _ in range(300):
        deep = {"x": deep}
    response = post(server, {**ASK, "metadata": deep})
    assert response.status_code == 400 and error_of(response)["code"] == "too_deeply_nested"


def test_ready_shares_one_probe_among_many_callers(make_server, upstream):
    upstream.probe_status = 500
    server = make_server()
    probes = len(upstream.probes)

    async def ask_ready() -> list[int]:  # 50 at a time, from one thread (threads would fight over the GIL)
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as client:
            answers = await asyncio.gather(*(client.get(server.url + "/ready") for _ in range(300)))
        return [answer.status_code for answer in answers]

    started = time.monotonic()
    statuses = asyncio.run(ask_ready())
    # A failed probe stands for a second, so a slow machine may see one more per second it takes.
    allowed = 2 + int(time.monotonic() - started)
    assert set(statuses) == {503} and len(upstream.probes) - probes <= allowed
