"""Every text scan is linear: each function that reads what a caller, an upstream or a document sent,
on adversarial inputs (runs of every mark, no spaces, CR floods, megabytes) within a time budget; and
properties of the parsers for any input (hypothesis)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agora
import checker
import documents
import rag
import redact
import speech
import terms
import text
from upstream import Limits, sse_payloads

MEGABYTE = 1 << 20
MARKS = ".!?…,;:。！？；，、\n\r \t`#*_~[]()\"'>-+0123456789a中"
ADVERSARIAL = {
    **{f"a run of {mark!r}": mark * MEGABYTE for mark in MARKS},
    "sentences of one letter": "a. " * (MEGABYTE // 3),
    "a digit before each stop": "3." * (MEGABYTE // 2),
    "links never closed": "[a](" * (MEGABYTE // 4),
    "fences": "```x" * (MEGABYTE // 4),
    "a URL of dots": "http://" + "." * MEGABYTE,
    "headings": "\n# " * (MEGABYTE // 3),
    "CR floods": "\r\n\r" * (MEGABYTE // 3),
}


def segment(value: str) -> int:
    cutter = speech.Segmenter()
    return sum(1 for _ in cutter.push(value)) + len(cutter.flush())


READERS = {
    "text.sentence_end": text.sentence_end,
    "speech.Segmenter": segment,
    "speech.speakable": speech.speakable,
    "terms.question_words": lambda value: terms.question_words(terms.tokens(value)),
    "terms.heard_apart": lambda value: terms.heard_apart(terms.tokens(value)),
    "rag.search_query": lambda value: rag.search_query(
        [{"role": "user", "content": "x"}, {"role": "user", "content": value}]
    ),
    "agora.as_heard": lambda value: agora.as_heard(
        {"role": "assistant", "content": value, "metadata": {"interrupted": True, "original": value}}
    ),
    "documents.chunk_markdown": documents.chunk_markdown,
    "redact.Redactor": redact.Redactor("sk-secret/key"),
    "redact.printable": redact.printable,
    "checker.words": lambda value: checker.words('{"choices":[{"delta":{"content":"' + value + '"}}]}'),
    "checker.sse_data": lambda value: list(
        checker.sse_data(iter([value.encode()[i : i + 4096] for i in range(0, 4 * MEGABYTE, 4096)]), LOOSE, FAR)
    ),
}
LOOSE, FAR = checker.Bounds(max_line_bytes=8 * MEGABYTE, max_body_bytes=8 * MEGABYTE), time.monotonic() + 3600
BUDGET_SECONDS = 4.0  # per megabyte, on a slow machine; a quadratic scan takes minutes


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_is_linear_on_adversarial_input(reader):
    read = READERS[reader]
    for name, value in ADVERSARIAL.items():
        started = time.perf_counter()
        read(value)
        assert time.perf_counter() - started < BUDGET_SECONDS, f"{reader} on {name}"


# --- SSE from an upstream: any cut into pieces, LF or CRLF, gives the same events --------------------


class Pieces:
    """What sse_payloads reads of an aiohttp response: its body, in the pieces the network gave."""

    def __init__(self, pieces: list[bytes]):
        self.content = self
        self.pieces = pieces

    async def iter_any(self):
        for piece in self.pieces:
            yield piece


def payloads_of(pieces: list[bytes], limits: Limits = Limits()) -> list[bytes]:
    async def read() -> list[bytes]:
        return [p async for batch in sse_payloads(Pieces(pieces), limits, redact.Redactor()) for p in batch]

    return asyncio.run(read())


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


PAYLOAD = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b and b != b"[DONE]")


@given(events=st.lists(PAYLOAD, min_size=1, max_size=8), points=st.lists(st.integers(0, 10_000)), crlf=st.booleans())
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_sse_events_survive_any_cut(events, points, crlf):
    newline = b"\r\n" if crlf else b"\n"
    stream = b"".join(b"data: " + event + newline + newline for event in events)
    stream += b": keep-alive" + newline + newline + b"data: [DONE]" + newline + newline
    assert payloads_of(cut(stream, points)) == events  # "data: " loses its one space, as the spec says


@given(events=st.lists(PAYLOAD, min_size=1, max_size=8), points=st.lists(st.integers(0, 10_000)), crlf=st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_checker_reads_sse_the_same_under_any_cut(events, points, crlf):
    newline = b"\r\n" if crlf else b"\n"
    stream = b"".join(b"data: " + event + newline + newline for event in events) + b"data: [DONE]" + newline + newline
    read = list(checker.sse_data(iter(cut(stream, points)), checker.Bounds(), time.monotonic() + 60))
    assert read == [event.decode("utf-8", "replace") for event in events] + ["[DONE]"]


def test_sse_cr_floods_and_splits_cost_linear_time():
    event = b"data: " + b"y" * MEGABYTE
    pieces = [event[:64]] + [b"\r" + event[i : i + 64] for i in range(64, len(event), 64)] + [b"\r\n\r\n"]
    started = time.perf_counter()
    assert len(payloads_of(pieces, Limits(max_event_bytes=4 * MEGABYTE))) == 1
    assert time.perf_counter() - started < BUDGET_SECONDS


# --- the voice's cuts: any text, any deltas -------------------------------------------------------

SPOKEN = st.text(alphabet="abcdefghij  .,!?;:。，！？\n中文", max_size=600)


@given(value=SPOKEN, points=st.lists(st.integers(0, 600), max_size=12))
@settings(max_examples=300, deadline=None)
def test_segments_keep_every_word_and_stay_short(value, points):
    deltas = [value[a:b] for a, b in zip([0, *sorted(points)], [*sorted(points), len(value)])]
    cutter = speech.Segmenter()
    said = [s for delta in deltas for s in cutter.push(delta) if s] + cutter.flush()
    assert all(re.search(r"[^\W_]", s) and len(s) <= speech.MAX_SEGMENT for s in said)
    assert re.sub(r"[\W_]", "", "".join(said)) == re.sub(r"[\W_]", "", value)


@given(value=st.text(alphabet='ab3 .!?…")\n。', max_size=60), start=st.integers(0, 60))
@settings(max_examples=300, deadline=None)
def test_a_sentence_ends_where_a_stop_is(value, start):
    end = text.sentence_end(value, start)
    assert end == 0 or (start < end <= len(value) and value[end - 1] in '.!?…")]\n。')
