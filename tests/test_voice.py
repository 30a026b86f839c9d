"""/audio/chat/completions speaking any answer: segments, synthesis, resampling, barge-in, failures."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import time

import httpx
import numpy as np
import pytest

import speech
from tests.conftest import API_KEY, sse_events
from tests.upstream import ScriptedUpstream

AUTH = {"authorization": f"Bearer {API_KEY}"}
ASK = {"messages": [{"role": "user", "content": "Tell me about the weather."}]}


async def collect(deltas: list[str]) -> list[str]:
    async def source():
        for delta in deltas:
            yield delta
    return [segment async for segment in speech.segments(source())]


def run(coroutine):
    return asyncio.run(coroutine)


# --- text ---------------------------------------------------------------------------------------


def test_segments_are_sentences_and_the_first_is_short():
    deltas = ["Sure, here", " is the plan", ". First we go", " north! Then we turn? ", "Finally we rest"]
    assert run(collect(deltas)) == ["Sure, here is the plan.", "First we go north!", "Then we turn?", "Finally we rest"]


def test_chinese_segments_need_no_spaces():
    deltas = ["今天天气很好，", "我们去公园吧。", "你觉得", "怎么样？好的！"]
    assert run(collect(deltas)) == ["今天天气很好，", "我们去公园吧。", "你觉得怎么样？", "好的！"]


def test_numbers_do_not_end_sentences_and_long_text_is_cut():
    assert run(collect(["Pi is 3.14 roughly. Done."])) == ["Pi is 3.14 roughly.", "Done."]
    long = run(collect(["word " * 100]))
    assert all(len(segment) <= speech.MAX_SEGMENT for segment in long) and len(long) > 1


def test_markdown_code_and_urls_are_not_spoken():
    deltas = ["## Result\n", "The **answer** is `42`, see [the docs](https://example.com/docs) ",
              "or https://example.com/x.\n", "```py", "thon\nprint('hidden')\n``", "`\n", "- Done *now*.\n"]
    spoken = " ".join(run(collect(deltas)))
    assert spoken == "Result The answer is 42, see the docs or. Done now."


# --- audio --------------------------------------------------------------------------------------


def dominant_frequency(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_resampling_keeps_the_pitch_and_the_duration():
    tone = ScriptedUpstream.speech_pcm("x" * 100)  # 3 s of 440 Hz at 24 kHz
    resample = speech.Resampler(24_000)
    out = b"".join(resample(tone[i:i + 999]) for i in range(0, len(tone), 999)) + resample(b"", last=True)
    assert abs(len(out) / 32_000 - len(tone) / 48_000) < 0.01  # same duration at 16 kHz
    assert abs(dominant_frequency(out, 16_000) - 440) < 2
    # Dropping samples instead would alias: the output must carry no energy the input did not have.
    assert abs(dominant_frequency(out[: 16_000 * 2], 16_000) - 440) < 2


# --- the endpoint -------------------------------------------------------------------------------


def tts_server(make_server, upstream_server, **overrides):
    settings = dict(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)
    return make_server(**{**settings, **overrides})


def audio_steps(response: httpx.Response) -> list[dict]:
    events = sse_events(response)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return [c["choices"][0]["delta"]["audio"] for c in chunks[:-1]]


def test_tts_speaks_the_answer_sentence_by_sentence(make_server, upstream_server, upstream):
    upstream.script.words = ["Hello there, my friend. ", "This is the **second** sentence. ", "And a third!"]
    server = tts_server(make_server, upstream_server)
    steps = audio_steps(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20))
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
    upstream.script.delay = 0.15
    server = tts_server(make_server, upstream_server)
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"data"' in line)
        first_audio = time.monotonic() - started
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert first_audio < 0.15 * len(upstream.script.words) / 2  # well before the model is done


def test_broadcasts_are_spoken_verbatim_without_the_llm(make_server, upstream_server, upstream):
    server = tts_server(make_server, upstream_server)
    body = {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "Welcome back! How can I help?"}]}
    steps = audio_steps(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=20))
    assert upstream.requests == []
    assert sorted(r["input"] for r in upstream.speech_requests) == ["How can I help?", "Welcome back!"]
    assert any("data" in s for s in steps)


def test_the_upstreams_own_audio_is_converted(make_server, upstream_server, upstream):
    tone = ScriptedUpstream.speech_pcm("x" * 40)  # 1.2 s at 24 kHz
    pieces = [tone[i:i + 9600] for i in range(0, len(tone), 9600)]
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "audio": {"id": "a1", "transcript": "Hi there."}}}]}]
    events += [{"choices": [{"index": 0, "delta": {"audio": {"id": "a1", "data": base64.b64encode(p).decode()}}}]}
               for p in pieces]
    upstream.script.raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    server = tts_server(make_server, upstream_server)
    body = {**ASK, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}}
    steps = audio_steps(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=20))
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
    assert upstream.speech_disconnected.wait(2), "the speech request kept going after the caller hung up"


def test_speech_failure_before_audio_is_a_502(make_server, upstream_server, upstream):
    upstream.script.speech_status = 500
    server = tts_server(make_server, upstream_server)
    response = httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20)
    assert response.status_code == 502 and response.json()["error"]["code"] == "speech_failed"


def test_speech_failure_after_audio_leaves_subtitles(make_server, upstream_server, upstream, caplog):
    upstream.script.words = ["First sentence here. ", "Second one. ", "Third one."]
    upstream.script.speech_fail_after = 1
    server = tts_server(make_server, upstream_server)
    with caplog.at_level(logging.WARNING, logger="custom_llm"):
        steps = audio_steps(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=20))
    transcripts = [s["transcript"].strip() for s in steps if "transcript" in s]
    assert transcripts == ["First sentence here.", "Second one.", "Third one."]  # nothing lost
    last_audio = max(i for i, s in enumerate(steps) if "data" in s)
    assert all("data" not in s for s in steps[last_audio + 1:]) and "subtitles" in caplog.text


def test_non_streaming_tts_is_one_message(make_server, upstream_server, upstream):
    upstream.script.words = ["One. ", "Two."]
    server = tts_server(make_server, upstream_server)
    response = httpx.post(server.url + "/audio/chat/completions", json={**ASK, "stream": False}, headers=AUTH, timeout=20)
    audio = response.json()["choices"][0]["message"]["audio"]
    assert audio["transcript"] == "One. Two."
    assert len(base64.b64decode(audio["data"])) % 1280 == 0 and audio["data"]


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (CI installs it)")
def test_espeak_speaks_end_to_end(make_server, upstream_server, upstream):
    server = make_server(audio_source="tts", tts_engine="espeak", audio_head_start_ms=60_000)
    body = {"messages": [{"role": "assistant", "content": "Hello from the local voice. It works offline."}]}
    steps = audio_steps(httpx.post(server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=30))
    pcm = b"".join(base64.b64decode(s["data"]) for s in steps if "data" in s)
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert 1.0 < len(samples) / 16_000 < 10 and np.sqrt((samples ** 2).mean()) > 300  # real speech, not silence
    assert [s["transcript"].strip() for s in steps if "transcript" in s] == ["Hello from the local voice.", "It works offline."]
