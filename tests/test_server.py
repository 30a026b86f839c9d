"""Health, the request log, and the shared upstream connection pool."""

from __future__ import annotations

import logging
import time

import httpx

import custom_llm
from tests.conftest import API_KEY


def test_health_needs_no_key(server):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok", "version": custom_llm.__version__}


def test_one_log_line_per_request_without_message_contents(client, upstream, caplog):
    secret = "purple-elephant-42"
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        list(client.chat.completions.create(model="m1", stream=True, extra_body={"turn_id": 9},
                                            messages=[{"role": "user", "content": secret}]))
        deadline = time.monotonic() + 2
        while "path=/chat/completions" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.message for r in caplog.records if r.message.startswith("request ")]
    assert len(lines) == 1
    for field in ("path=/chat/completions", "status=200", "model=m1", "turn=9", "ttfb_ms=", "total_ms=",
                  "chunks=", "cancelled=false"):
        assert field in lines[0]
    assert secret not in caplog.text and API_KEY not in caplog.text


def test_requests_share_one_pooled_upstream_connection(client, upstream):
    for _ in range(5):
        list(client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert len({r["client"] for r in upstream.requests}) == 1  # no client (or connection) per request


def test_random_key_is_made_when_none_is_configured(monkeypatch, capsys):
    monkeypatch.delenv("CUSTOM_LLM_API_KEY", raising=False)
    monkeypatch.delenv("ALLOW_UNAUTHENTICATED", raising=False)
    settings = custom_llm.Settings.from_env()
    assert len(settings.api_keys) == 1 and len(settings.api_keys[0]) >= 32
    assert settings.api_keys[0] in capsys.readouterr().err


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUSTOM_LLM_API_KEY", "a, b")
    monkeypatch.setenv("LLM_MODEL", "llama3")
    monkeypatch.setenv("STRIP_FIELDS", "tenant")
    monkeypatch.setenv("WAITING_MESSAGES_EN", "Wait.|Hold on.")
    settings = custom_llm.Settings.from_env()
    assert settings.api_keys == ("a", "b") and settings.llm_model == "llama3"
    assert "tenant" in settings.strip_fields and "turn_id" in settings.strip_fields
    assert settings.waiting_messages["en"] == ("Wait.", "Hold on.")
