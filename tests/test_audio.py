"""/audio/chat/completions: every source (files, a voice, the upstream's audio, broadcasts), pacing, barge-in, failures."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from custom_llm_server.voice.answers import RECORDING
from tests.conftest import AUTH, audio_of, dominant_frequency, post, sse_events
from tests.scripted_llm import ScriptedUpstream

ROOT = Path(__file__).resolve().parent.parent
ASK = {"messages": [{"role": "user", "content": "Tell me about the weather."}], "stream": True}


def test_transcript_then_every_byte_of_the_pcm_in_1280_byte_chunks(make_server, upstream):
    server = make_server(audio_head_start_ms=60_000)  # no pacing: the whole file at once
    audio = audio_of(sse_events(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH)))
    assert audio[0]["transcript"] == (RECORDING / "file.txt").read_text().strip() and "data" not in audio[0]
    data = [base64.b64decode(a["data"]) for a in audio[1:]]
    assert all(len(d) == 1280 for d in data[:-1]) and 0 < len(data[-1]) <= 1280
    assert b"".join(data) == (RECORDING / "file.pcm").read_bytes()
    assert len({a["id"] for a in audio}) == 1
    assert upstream.requests == []  # file mode never calls the LLM


def test_shipped_audio_is_real_speech_of_the_transcript():
    pcm = (RECORDING / "file.pcm").read_bytes()
    assert len(pcm) < 1_000_000 and len(pcm) % 2 == 0
    seconds = len(pcm) / 32000
    words = len((RECORDING / "file.txt").read_text().split())
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
    assert audio.transcript == (RECORDING / "file.txt").read_text().strip()
    assert base64.b64decode(audio.data) == (RECORDING / "file.pcm").read_bytes()


def test_disconnect_stops_the_pacing(server, caplog):
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH) as response:
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)

        def logged() -> list[str]:
            return [
                r.message for r in caplog.records if r.message.startswith("request ") and r.request_id == request_id
            ]

        deadline = time.monotonic() + 10
        while not logged() and time.monotonic() < deadline:
            time.sleep(0.01)
    line = logged()[0]
    assert "cancelled=true" in line
    assert float(line.split("total_ms=")[1].split()[0]) < 2000  # the 10 s file was not played out


def tts_server(make_server, upstream_server, **overrides):
    settings = dict(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)
    return make_server(**{**settings, **overrides})


def test_tts_speaks_the_answer_sentence_by_sentence(make_server, upstream_server, upstream):
    upstream.script.words = ["Hello there, my friend. ", "This is the **second** sentence. ", "And a third!"]
    server = tts_server(make_server, upstream_server)
    steps = audio_of(sse_events(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20)))
    said = ["Hello there,", "my friend.", "This is the second sentence.", "And a third!"]
    assert sorted(r["input"] for r in upstream.speech_requests) == sorted(said)  # synthesized ahead, in parallel
    transcripts = [s["transcript"] for s in steps if "transcript" in s]
    assert "".join(transcripts).strip() == " ".join(said)  # what the engine stores is what was spoken
    assert len({s["id"] for s in steps}) == 1
    # Each segment's transcript comes before its audio, and its audio is all there, at 16 kHz.
    position = 0
    for text in said:
        assert steps[position]["transcript"].strip() == text
        position += 1
        expected = len(ScriptedUpstream.speech_pcm(text)) * 2 // 3
        frames = []
        while position < len(steps) and "data" in steps[position]:
            frames.append(base64.b64decode(steps[position]["data"]))
            position += 1
        assert all(len(f) == 1280 for f in frames)
        assert 0 <= len(b"".join(frames)) - expected < 1280 + 64
    request = upstream.speech_requests[0]
    assert request["response_format"] == "pcm" and request["voice"] == "alloy" and request["model"] == "gpt-4o-mini-tts"


def test_the_first_audio_leaves_before_the_answer_is_finished(make_server, upstream_server, upstream):
    upstream.script.words = ["Short start, ", "then a much longer sentence follows. "] + ["More words. "] * 5
    upstream.script.delay = 0.6
    server = tts_server(make_server, upstream_server)
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"data"' in line)
        first_audio = time.monotonic() - started
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert first_audio < 0.6 * len(upstream.script.words) / 2  # well before the model is done


def test_broadcasts_are_spoken_verbatim_without_the_llm(make_server, upstream_server, upstream):
    server = tts_server(make_server, upstream_server)
    body = {
        "stream": True,
        "messages": [
            {"role": "system", "content": "x"},
            {"role": "assistant", "content": "Welcome back! How can I help?"},
        ],
    }
    steps = audio_of(
        sse_events(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=20))
    )
    assert upstream.requests == []
    assert sorted(r["input"] for r in upstream.speech_requests) == ["How can I help?", "Welcome back!"]
    assert any("data" in s for s in steps)


def test_the_upstreams_own_audio_is_converted(make_server, upstream_server, upstream):
    tone = ScriptedUpstream.speech_pcm("x" * 40)  # 1.2 s at 24 kHz
    pieces = [tone[i : i + 9600] for i in range(0, len(tone), 9600)]
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "audio": {"id": "a1", "transcript": "Hi there."}}}]}
    ]
    events += [
        {"choices": [{"index": 0, "delta": {"audio": {"id": "a1", "data": base64.b64encode(p).decode()}}}]}
        for p in pieces
    ]
    upstream.script.raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    server = tts_server(make_server, upstream_server)
    body = {**ASK, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}
    steps = audio_of(
        sse_events(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=20))
    )
    assert steps[0]["transcript"] == "Hi there." and upstream.speech_requests == []
    pcm = b"".join(base64.b64decode(s["data"]) for s in steps if "data" in s)
    assert abs(len(pcm) / 32_000 - 1.2) < 0.05 and abs(dominant_frequency(pcm, 16_000) - 440) < 2
    assert upstream.requests[0]["body"]["modalities"] == ["text", "audio"]


def test_barge_in_stops_the_model_and_the_synthesis(make_server, upstream_server, upstream):
    upstream.script.words = ["A fairly long first sentence to say. "] * 3
    upstream.script.speech_delay = 0.5
    server = tts_server(make_server, upstream_server)
    with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"data"' in line)
    assert upstream.speech_disconnected.wait(10), "the speech request kept going after the caller hung up"


def test_speech_failure_before_audio_is_a_502(make_server, upstream_server, upstream):
    upstream.script.speech_status = 500
    server = tts_server(make_server, upstream_server)
    response = httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20)
    assert response.status_code == 502 and response.json()["error"]["code"] == "speech_failed"


def test_speech_failure_after_audio_leaves_subtitles(make_server, upstream_server, upstream, caplog):
    upstream.script.words = ["First sentence here. ", "Second one. ", "Third one."]
    upstream.script.speech_fail_for = ("Second", "Third")
    server = tts_server(make_server, upstream_server)
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        steps = audio_of(
            sse_events(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20))
        )
    transcripts = [s["transcript"].strip() for s in steps if "transcript" in s]
    assert transcripts == ["First sentence here.", "Second one.", "Third one."]  # nothing lost
    last_audio = max(i for i, s in enumerate(steps) if "data" in s)
    assert all("data" not in s for s in steps[last_audio + 1 :]) and "subtitles" in caplog.text


def test_non_streaming_tts_is_one_message(make_server, upstream_server, upstream):
    upstream.script.words = ["One. ", "Two."]
    server = tts_server(make_server, upstream_server)
    response = httpx.post(
        server.url + "/audio/chat/completions", json={**ASK, "stream": False}, headers=AUTH, timeout=20
    )
    audio = response.json()["choices"][0]["message"]["audio"]
    assert audio["transcript"] == "One. Two."
    assert len(base64.b64decode(audio["data"])) % 1280 == 0 and audio["data"]


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (CI installs it)")
def test_espeak_speaks_end_to_end(make_server, upstream_server, upstream):
    server = make_server(audio_source="tts", tts_engine="espeak", audio_head_start_ms=60_000)
    body = {
        "stream": True,
        "messages": [{"role": "assistant", "content": "Hello from the local voice. It works offline."}],
    }
    steps = audio_of(
        sse_events(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=30))
    )
    pcm = b"".join(base64.b64decode(s["data"]) for s in steps if "data" in s)
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert 1.0 < len(samples) / 16_000 < 10 and np.sqrt((samples**2).mean()) > 300  # real speech, not silence
    assert [s["transcript"].strip() for s in steps if "transcript" in s] == [
        "Hello from the local voice.",
        "It works offline.",
    ]


# --- never silent: every answer carries its words -------------------------------------------------------

CALLER_TOOL = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}


def transcript_of(steps: list[dict]) -> str:
    return "".join(s.get("transcript") or "" for s in steps).strip()


def test_a_text_only_upstream_asked_for_audio_is_spoken(make_server, upstream_server, upstream):
    server = tts_server(make_server, upstream_server)  # an upstream that ignores `modalities`
    body = {**ASK, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}
    steps = audio_of(sse_events(post(server, body, "/audio/chat/completions")))
    assert transcript_of(steps) == "Hello from the upstream." and any("data" in s for s in steps)
    answer = post(server, {**body, "stream": False}, "/audio/chat/completions").json()
    audio = answer["choices"][0]["message"]["audio"]
    assert audio["transcript"] == "Hello from the upstream." and base64.b64decode(audio["data"])


def test_without_a_voice_a_request_for_the_models_audio_is_refused_not_silent(make_server, upstream, monkeypatch):
    """Files mode with no espeak-ng: a request for the model's own audio (modalities) could get a text
    answer nobody can say, an agent that says nothing; it gets a 503 that says what to set, before the
    model is called."""
    monkeypatch.setenv("PATH", "/nonexistent")
    server = make_server()
    answer = post(server, {**ASK, "modalities": ["text", "audio"]}, "/audio/chat/completions")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_voice"
    assert "AUDIO_SOURCE=tts" in answer.json()["error"]["message"] and upstream.requests == []


def test_without_a_voice_a_broadcast_still_comes_as_transcript(make_server, upstream, monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")  # no espeak-ng: files mode has no voice for other words
    server = make_server()
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        broadcast = {"stream": True, "messages": [{"role": "assistant", "content": "Welcome back!"}]}
        greeting = audio_of(sse_events(post(server, broadcast, "/audio/chat/completions")))
    assert transcript_of(greeting) == "Welcome back!" and "transcript only" in caplog.text


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (CI installs it)")
def test_in_files_mode_a_text_answer_to_a_request_for_audio_is_spoken(make_server, upstream):
    server = make_server(audio_head_start_ms=60_000)
    steps = audio_of(sse_events(post(server, {**ASK, "modalities": ["text", "audio"]}, "/audio/chat/completions")))
    assert transcript_of(steps) == "Hello from the upstream." and any("data" in step for step in steps)


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (CI installs it)")
def test_a_broadcast_in_files_mode_says_its_own_words(make_server, upstream):
    server = make_server(audio_head_start_ms=60_000)
    body = {"stream": True, "messages": [{"role": "assistant", "content": "Sorry, something went wrong."}]}
    steps = audio_of(sse_events(post(server, body, "/audio/chat/completions")))
    assert transcript_of(steps) == "Sorry, something went wrong."
    pcm = b"".join(base64.b64decode(s["data"]) for s in steps if "data" in s)
    assert 0.5 < len(pcm) / 32_000 < 5 and upstream.requests == []  # spoken, not file.pcm (10.9 s)


def test_the_callers_tool_calls_come_back_from_audio(make_server, upstream_server, upstream):
    server = tts_server(make_server, upstream_server)
    upstream.script.turns = [{"say": ["Let me look. "], "calls": [("lookup_order", '{"order_id": "7"}')]}]
    events = sse_events(post(server, {**ASK, "tools": [CALLER_TOOL]}, "/audio/chat/completions"))
    chunks = [json.loads(e) for e in events[:-1]]
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "lookup_order" and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "Let me look." in "".join(c["choices"][0]["delta"].get("audio", {}).get("transcript") or "" for c in chunks)
    upstream.script.turns = [{"calls": [("lookup_order", '{"order_id": "7"}')]}]
    answer = post(server, {**ASK, "stream": False, "tools": [CALLER_TOOL]}, "/audio/chat/completions").json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "lookup_order", "arguments": '{"order_id": "7"}'}
