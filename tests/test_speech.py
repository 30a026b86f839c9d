"""voice/segments.py and voice/audio.py: sentences from deltas, what is spoken, resampling."""

from __future__ import annotations

import asyncio

from custom_llm_server.voice.audio import Resampler
from custom_llm_server.voice.segments import MAX_SEGMENT, segments
from tests.conftest import dominant_frequency
from tests.scripted_llm import ScriptedUpstream


async def collect(deltas: list[str]) -> list[str]:
    async def source():
        for delta in deltas:
            yield delta

    return [segment async for segment in segments(source())]


def run(coroutine):
    return asyncio.run(coroutine)


def test_segments_are_sentences_and_the_first_is_short():
    deltas = ["Sure, here", " is the plan", ". First we go", " north! Then we turn? ", "Finally we rest"]
    assert run(collect(deltas)) == ["Sure, here is the plan.", "First we go north!", "Then we turn?", "Finally we rest"]


def test_chinese_segments_need_no_spaces():
    deltas = ["今天天气很好，", "我们去公园吧。", "你觉得", "怎么样？好的！"]
    assert run(collect(deltas)) == ["今天天气很好，", "我们去公园吧。", "你觉得怎么样？", "好的！"]


def test_numbers_do_not_end_sentences_and_long_text_is_cut():
    assert run(collect(["Pi is 3.14 roughly. Done."])) == ["Pi is 3.14 roughly.", "Done."]
    long = run(collect(["word " * 100]))
    assert all(len(segment) <= MAX_SEGMENT for segment in long) and len(long) > 1


def test_markdown_code_and_urls_are_not_spoken():
    deltas = [
        "## Result\n",
        "The **answer** is `42`, see [the docs](https://example.com/docs) ",
        "or https://example.com/x.\n",
        "```py",
        "thon\nprint('hidden')\n``",
        "`\n",
        "- Done *now*.\n",
    ]
    spoken = " ".join(run(collect(deltas)))
    assert spoken == "Result The answer is 42, see the docs or. Done now."


def test_resampling_keeps_the_pitch_and_the_duration():
    tone = ScriptedUpstream.speech_pcm("x" * 100)  # 3 s of 440 Hz at 24 kHz
    resample = Resampler(24_000)
    out = b"".join(resample(tone[i : i + 999]) for i in range(0, len(tone), 999)) + resample(b"", last=True)
    assert abs(len(out) / 32_000 - len(tone) / 48_000) < 0.01  # same duration at 16 kHz
    assert abs(dominant_frequency(out, 16_000) - 440) < 2
    # Dropping samples instead would alias: the output must carry no energy the input did not have.
    assert abs(dominant_frequency(out[: 16_000 * 2], 16_000) - 440) < 2
