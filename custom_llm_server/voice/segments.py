"""Text a voice can say: markdown, code and links left out, cut into segments where a listener
expects a pause (whole sentences; the first one short, so the first audio leaves sooner)."""

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator

from custom_llm_server.core.text import CJK, sentence_end

log = logging.getLogger("custom_llm.speech")


_FENCE = re.compile(r"```.*?(```|$)", re.S)
_LINK = re.compile(r"\[([^\][]*)\]\([^()\s]*\)")
_URL = re.compile(r"(https?://|www\.)\S*[^\s.,;:!?)\]]")
_MARKS = re.compile(r"(^|\n)\s{0,3}(#{1,6}\s+|[-*+]\s+|>\s?|\d+[.)]\s+)|[*_`~]{1,3}")
# Runs of spaces are matched from their first space and never given back: linear on any text.
_SPACE_BEFORE_MARK = re.compile(r"(?<![ \t])[ \t]++([.,!?;:])")
_SPACES = re.compile(r"[ \t]++")
_WORD = re.compile(r"[^\W_]")
_UNSAID = re.compile(r"[\s.!?…,;:。！？；，、]*+")  # nothing to say at the start of a segment
_CLAUSE = re.compile(r"[,;:](?=\s)|[，、：]")
FIRST_SEGMENT_MIN = 12  # characters before the first segment may end at a comma
MAX_SEGMENT = 220  # a segment with no punctuation is cut at a space near this length


def speakable(text: str) -> str:
    """The text as it should be spoken: no code blocks, link targets, raw URLs or markdown marks;
    nothing at all when no word is left (a run of dots or commas says nothing)."""
    text = _FENCE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _MARKS.sub(lambda m: m.group(1) or "", text)
    text = _SPACE_BEFORE_MARK.sub(r"\1", text)  # where a URL was cut out
    text = _SPACES.sub(" ", text).strip()
    return text if _WORD.search(text) else ""


def _length(text: str) -> int:
    """Length as speech: a Chinese or Japanese character says about as much as two Latin letters."""
    return len(text) + len(CJK.findall(text))


class Segmenter:
    """Cuts streamed text into speakable segments: whole sentences, the first one short (it may end
    at a clause, so the first audio leaves sooner), none longer than MAX_SEGMENT, code blocks skipped
    even when they span many deltas.

    Linear in the text, whatever it holds: each cut looks at most MAX_SEGMENT characters ahead, and
    what is left over is moved only once per delta, so a 4 MB broadcast is read once."""

    def __init__(self) -> None:
        self.pending, self.first, self.in_code = "", True, False

    def push(self, delta: str) -> Iterator[str]:
        """The segments this delta completes, one at a time, "" for a cut with nothing to say (so a
        consumer that awaits between cuts lets the event loop serve others while a huge delta is cut)."""
        text, at = self.pending + delta, 0
        fence = -1 if self.in_code else text.find("```")
        while True:
            if self.in_code:  # skip to the closing fence
                close = text.find("```", at)
                if close < 0:
                    at = max(at, len(text) - 2)  # a fence may be split across deltas
                    break
                at, self.in_code = close + 3, False
                fence = text.find("```", at)
                continue
            at = _UNSAID.match(text, at).end()  # type: ignore[union-attr]  # a run of them is one step
            near = 0 <= fence <= at + MAX_SEGMENT
            window = fence if near else at + MAX_SEGMENT
            cut = self._cut(text, at, window)
            if not cut and near:  # what comes before a code block is said on its own
                cut, self.in_code = fence, True
            elif not cut and len(text) - at > MAX_SEGMENT:
                space = text.rfind(" ", at, window)
                cut = space if space > at else window
            elif not cut:
                break
            segment = speakable(text[at:cut]) if _WORD.search(text, at, cut) else ""
            at = cut + 3 if self.in_code else cut
            self.first = self.first and not segment
            yield segment
        self.pending = text[at:]

    def flush(self) -> list[str]:
        rest, self.pending = self.pending, ""
        return [] if self.in_code or not (segment := speakable(rest)) else [segment]

    def _cut(self, text: str, at: int, window: int) -> int:
        """Where the next segment ends within text[at:window], or 0 when it needs more text."""
        # One character past the window, so a stop at its edge can see the space after it.
        end = sentence_end(text, at, window + 1)
        end = end if end <= window else 0
        if self.first:  # the first segment may end at a clause, so the first audio leaves sooner
            for clause in _CLAUSE.finditer(text, at, end or window):
                if _length(text[at : clause.end()]) >= FIRST_SEGMENT_MIN:
                    return clause.end()
        return end


async def segments(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Speakable segments from a stream of text deltas (see Segmenter)."""
    cutter = Segmenter()
    async for delta in deltas:
        for segment in cutter.push(delta):
            if segment:
                yield segment
            # A long text is cut without any I/O: let the loop breathe between cuts, so it serves
            # others and notices a hang-up (a transcript-only answer never waits for a voice).
            await asyncio.sleep(0)
    for segment in cutter.flush():
        yield segment
