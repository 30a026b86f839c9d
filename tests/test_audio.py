"""/audio/chat/completions: transcript first, then 40 ms chunks of 16 kHz mono PCM under one audio id."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEY, sse_events

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"authorization": f"Bearer {API_KEY}"}
ASK = {"messages": [{"role": "user", "content": "Say something"}]}


def audio_of(events: list[bytes]) -> list[dict]:
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return [c["choices"][0]["delta"]["audio"] for c in chunks[:-1]]


def test_transcript_then_every_byte_of_the_pcm_in_1280_byte_chunks(make_server, upstream):
    server = make_server(audio_head_start_ms=60_000)  # no pacing: the whole file at once
    audio = audio_of(sse_events(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH)))
    assert audio[0]["transcript"] == (ROOT / "file.txt").read_text().strip() and "data" not in audio[0]
    data = [base64.b64decode(a["data"]) for a in audio[1:]]
    assert all(len(d) == 1280 for d in data[:-1]) and 0 < len(data[-1]) <= 1280
    assert b"".join(data) == (ROOT / "file.pcm").read_bytes()
    assert len({a["id"] for a in audio}) == 1
    assert upstream.requests == []  # file mode never calls the LLM


def test_shipped_audio_is_real_speech_of_the_transcript():
    pcm = (ROOT / "file.pcm").read_bytes()
    assert len(pcm) < 1_000_000 and len(pcm) % 2 == 0
    seconds = len(pcm) / 32000
    words = len((ROOT / "file.txt").read_text().split())
    assert 1.5 < words / seconds < 4.5  # a speaking rate, not noise or silence


def test_pcm_is_paced_close_to_real_time(make_server, tmp_path):
    (tmp_path / "a.txt").write_text("Short.")
    (tmp_path / "a.pcm").write_bytes(b"\x01\x00" * 16000)  # one second
    server = make_server(audio_text_file=tmp_path / "a.txt", audio_pcm_file=tmp_path / "a.pcm", audio_head_start_ms=200)
    arrivals = []
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH) as response:
        for line in response.iter_lines():
            if '"data"' in line:
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 25
    assert arrivals[-1] >= 0.7  # 1 s of audio, minus the 200 ms head start: not flooded at once


def test_missing_files_give_a_simulated_answer_and_a_warning(make_server, tmp_path, caplog):
    server = make_server(audio_pcm_file=tmp_path / "missing.pcm")
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        response = httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=10)
    assert response.status_code == 200
    audio = audio_of(sse_events(response))
    assert audio[0]["transcript"] == "This is a simulated audio answer."
    assert sum(len(base64.b64decode(a["data"])) for a in audio[1:]) == 32000
    assert "audio files unavailable" in caplog.text
    assert "missing.pcm" not in response.text


def test_non_streaming_audio_is_one_message(client):
    client = client.with_options(base_url=str(client.base_url).rstrip("/") + "/audio")
    completion = client.chat.completions.create(model="m", messages=ASK["messages"], stream=False)
    audio = completion.choices[0].message.audio
    assert audio.transcript == (ROOT / "file.txt").read_text().strip()
    assert base64.b64decode(audio.data) == (ROOT / "file.pcm").read_bytes()


def test_disconnect_stops_the_pacing(server, caplog):
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        deadline = time.monotonic() + 2
        while "path=/audio/chat/completions" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    line = next(r.message for r in caplog.records if "path=/audio/chat/completions" in r.message)
    assert "cancelled=true" in line
    assert float(line.split("total_ms=")[1].split()[0]) < 2000  # the 10 s file was not played out
