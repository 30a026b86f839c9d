"""Every text scan is linear: each function that reads what a caller, an upstream or a document sent,
on adversarial inputs (runs of every mark, no spaces, CR floods) costs four times as much for four
times the input, never sixteen; and properties of the parsers for any input (hypothesis)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custom_llm_server.agora import checker
from custom_llm_server.agora import engine as agora
from custom_llm_server.core import redact, text
from custom_llm_server.knowledge import documents, rag, terms
from custom_llm_server.llm.upstream import Limits, sse_payloads
from custom_llm_server.voice import segments as speech

SIZE = 1 << 14  # characters: the smallest input tried; it grows until reading it is measurable (TIMED)
LARGEST = 1 << 20  # a megabyte: past it, the allocator and the page faults of huge buffers are what is timed
TIMED = 0.01  # seconds of CPU: long enough that timer noise is small beside it
MARKS = ".!?…,;:。！？；，、\n\r \t`#*_~[]()\"'>-+0123456789a中"
ADVERSARIAL = {  # each made at any size n
    **{f"a run of {mark!r}": (lambda n, mark=mark: mark * n) for mark in MARKS},
    "sentences of one letter": lambda n: "a. " * (n // 3),
    "a digit before each stop": lambda n: "3." * (n // 2),
    "links never closed": lambda n: "[a](" * (n // 4),
    "fences": lambda n: "```x" * (n // 4),
    "a URL of dots": lambda n: "http://" + "." * n,
    "headings": lambda n: "\n# " * (n // 3),
    "CR floods": lambda n: "\r\n\r" * (n // 3),
}


def segment(value: str) -> int:
    cutter = speech.Segmenter()
    return sum(1 for _ in cutter.push(value)) + len(cutter.flush())


def sse_lines(value: str) -> list:
    data = value.encode()
    return list(checker.sse_data(iter([data[i : i + 4096] for i in range(0, len(data), 4096)]), LOOSE, FAR))


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
    "checker.sse_data": sse_lines,
}
LOOSE, FAR = checker.Bounds(max_line_bytes=16 * LARGEST, max_body_bytes=16 * LARGEST), time.monotonic() + 3600


def cost(read, value) -> float:
    """The CPU time of this thread reading the value, best of three: other work on the machine and the
    servers' threads in this process are not counted."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        read(value)
        best = min(best, time.thread_time() - started)
    return best


def measurable(read, make) -> tuple[int, float]:
    """The smallest size (from SIZE, doubling or more) at which reading the input takes TIMED, or LARGEST;
    and what it costs there."""
    size = SIZE
    while True:
        once = cost(read, make(size))
        if once >= TIMED or size >= LARGEST:
            return size, once
        size = min(LARGEST, max(2 * size, int(size * 1.5 * TIMED / max(once, 1e-5))))


@pytest.mark.slow
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_is_linear_on_adversarial_input(reader):
    """Four times the input costs about four times the time, never sixteen: no budget in seconds, which a
    busy machine would break, but n against 4n, at a size where the reading is long enough to time."""
    read = READERS[reader]
    for name, make in ADVERSARIAL.items():
        size, once = measurable(read, make)
        if once < TIMED:
            continue  # LARGEST read in less than TIMED: nothing quadratic is that fast
        four_times = cost(read, make(4 * size))
        assert four_times < 8 * once, f"{reader} on {name}: {once:.4f} s at {size}, {four_times:.4f} s at 4 times that"


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


@pytest.mark.slow
def test_sse_cr_floods_and_splits_cost_linear_time():
    def flood(size: int) -> list[bytes]:
        event = b"data: " + b"y" * size
        return [event[:64]] + [b"\r" + event[i : i + 64] for i in range(64, len(event), 64)] + [b"\r\n\r\n"]

    def read(pieces: list[bytes]) -> None:  # room for the 4-times flood at LARGEST, its CRs included
        assert len(payloads_of(pieces, Limits(max_event_bytes=8 * LARGEST, max_response_bytes=16 * LARGEST))) == 1

    size, once = measurable(read, flood)
    assert cost(read, flood(4 * size)) < 8 * once, (size, once)


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


# --- round three's new readers, fuzzed: any input, no exception but the caller's 400 ---------------------


@given(html=st.text(alphabet="<>/=\"' abcdivnapmlh1\n", max_size=400))
@settings(max_examples=200, deadline=None)
def test_the_html_reader_reads_any_markup(html):
    assert isinstance(documents.html_text(html), str)


@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_variables_are_read_or_refused_with_a_400(value):
    from custom_llm_server.config.profiles import variables_of
    from custom_llm_server.core.errors import ApiError

    try:
        read = variables_of(value, 8, 30)
    except ApiError as error:
        assert error.status == 400
    else:
        assert all(isinstance(v, str) and len(v) <= 30 for v in read.values()) and len(read) <= 8


@given(words=st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_the_intent_judges_read_any_words(words):
    from custom_llm_server.core.intent import asked_for, ends_the_call
    from custom_llm_server.core.wording import FAREWELLS

    assert ends_the_call(FAREWELLS)(words) in (True, False)
    assert asked_for(("cancel", "取消"))(words) in (True, False)


KEY = "sk-live/AbC+def=0123456789"


@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    escape=st.sets(st.integers(0, len(KEY) - 1)),
    percent=st.sampled_from(["none", "upper", "lower"]),
)
@settings(max_examples=300, deadline=None)
def test_the_key_in_any_mix_of_escapes_is_scrubbed(before, after, escape, percent):
    from urllib.parse import quote

    form = quote(KEY, safe="") if percent != "none" else KEY
    form = form.lower() if percent == "lower" else form
    form = "".join(f"\\u{ord(c):04x}" if at in escape else c for at, c in enumerate(form))
    text = redact.Redactor(KEY)(before + form + after)
    assert KEY not in redact.decoded(text)
