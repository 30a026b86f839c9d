"""Bad input gets a clear 4xx in OpenAI's error shape, never reaches the upstream, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY

USER = [{"role": "user", "content": "Hi"}]
AUTH = {"authorization": f"Bearer {API_KEY}"}


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


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"authorization": "Bearer wrong-key"}, "invalid_api_key"),
    ({"authorization": f"Basic {API_KEY}"}, "missing_api_key"),
    ({"authorization": "Bearer"}, "missing_api_key"),
])
def test_auth_rejections_never_reach_the_upstream(server, upstream, headers, code):
    for path in ("/chat/completions", "/rag/chat/completions", "/audio/chat/completions"):
        response = httpx.post(server.url + path, json={"messages": USER}, headers=headers)
        assert_error(response, 401, code)
    assert upstream.requests == []


def test_any_of_the_rotated_keys_is_accepted(make_server, upstream):
    server = make_server(api_keys=("old-key", "new-key"))
    for key in ("old-key", "new-key"):
        response = httpx.post(server.url + "/chat/completions", json={"messages": USER},
                              headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert_error(httpx.post(server.url + "/chat/completions", json={"messages": USER},
                            headers={"authorization": "Bearer test-key"}), 401)


def test_opt_out_of_auth_serves_without_a_key(make_server, upstream):
    server = make_server(api_keys=(), allow_unauthenticated=True)
    assert httpx.post(server.url + "/chat/completions", json={"messages": USER}).status_code == 200


@pytest.mark.parametrize("content, code", [
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
])
def test_malformed_bodies_are_400(server, upstream, content, code):
    for path in ("/chat/completions", "/rag/chat/completions", "/audio/chat/completions"):
        response = httpx.post(server.url + path, content=content,
                              headers={**AUTH, "content-type": "application/json"})
        assert_error(response, 400, code)
    assert upstream.requests == []


def test_validation_errors_name_the_field(server, upstream):
    response = httpx.post(server.url + "/chat/completions", headers=AUTH,
                          json={"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "x"}]})
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

    response = httpx.post(server.url + "/chat/completions", content=chunked(),
                          headers={**AUTH, "content-type": "application/json"})
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
    import openai

    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[], stream=True)
