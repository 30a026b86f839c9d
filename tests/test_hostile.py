"""Hostile input: generated requests never get a 5xx, a traceback, a path or a key back.

schemathesis generates requests from the server's own OpenAPI schema; hypothesis generates
arbitrary JSON bodies. The server answers each over real HTTP and keeps serving.
"""

from __future__ import annotations

import collections
import itertools

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, UPSTREAM_KEY

AUTH = {"authorization": f"Bearer {API_KEY}"}
LEAKS = ("Traceback", 'File "', ".py", "/work/", "/usr/", "site-packages", UPSTREAM_KEY)

pytestmark = pytest.mark.slow


def assert_clean(status: int, content: bytes) -> None:
    text = content.decode("utf-8", "replace")  # /audio/speech answers in raw PCM
    # A 503 is a clean answer when it says what to do: no voice on this machine (no espeak-ng), or busy.
    assert status < 500 or (status == 503 and ('"no_voice"' in text or '"overloaded"' in text)), text[:500]
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked: {text[:500]}"


def test_schema_generated_requests(server, upstream):
    upstream.script.words = ["ok"]
    document = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/chat/completions"),
        ("POST", "/rag/chat/completions"),
        ("POST", "/audio/chat/completions"),
    }
    statuses = collections.Counter()
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(base_url=server.url, headers=AUTH, timeout=10)
            assert_clean(response.status_code, response.content)
            statuses[case.operation.path, response.status_code] += 1

        call()
    assert statuses["/chat/completions", 200] and statuses["/chat/completions", 400]  # both kinds were reached


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard", "", None, 3])
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES},
    optional={"content": JSON, "tool_calls": JSON, "metadata": JSON, "name": JSON, "tool_call_id": JSON},
)
BODY = (
    st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(MESSAGE, max_size=4) | JSON,
            "model": JSON,
            "stream": JSON,
            "tools": JSON,
            "tool_choice": JSON,
            "temperature": JSON,
            "max_tokens": JSON,
            "stream_options": JSON,
            "turn_id": JSON,
            "context": JSON,
            "modalities": JSON,
            "audio": JSON,
            "response_format": JSON,
        },
    )
    | JSON
)


@given(body=BODY, path=st.sampled_from(["/chat/completions", "/rag/chat/completions", "/audio/chat/completions"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_bodies(server, upstream, body, path):
    upstream.script.words = ["ok"]
    import orjson

    try:
        content = orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):
        return
    response = httpx.post(
        server.url + path, content=content, timeout=10, headers={**AUTH, "content-type": "application/json"}
    )
    assert_clean(response.status_code, response.content)


@given(raw=st.binary(max_size=300))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_bytes(server, raw):
    response = httpx.post(
        server.url + "/chat/completions", content=raw, timeout=10, headers={**AUTH, "content-type": "application/json"}
    )
    assert_clean(response.status_code, response.content)
    assert response.status_code == 400 or response.status_code == 200
