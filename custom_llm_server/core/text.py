"""Reading conversations: the words of a message, the question being asked, and its language.

One place decides what counts as Chinese or Japanese text, so /rag's waiting phrase, the tool
bridge phrase, the knowledge base's tokens and the voice's sentence cuts never disagree.
"""

import re
from typing import Any

# CJK ideographs, kana, compatibility ideographs and Hangul: scripts written without spaces.
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CJK = re.compile(f"[{CJK_RANGES}]")


# A sentence ends at a run of .!? (and closing quotes) before a space, at Chinese and Japanese full
# stops, or at a line end. A run is matched only from its first mark and never given back (possessive),
# so a model that prints 100,000 dots costs one pass, not one pass per dot.
_STOPS = ".!?…"
_SENTENCE_END = re.compile(r"(?<![.!?…])[.!?…]++[\"')\]]*+(?=\s)|[。！？；]++|\n")
_CLOSERS = "\"')]"
# How far into an answer its first sentence is looked for. Past it (no sentence end at all), the
# first sentence is taken as there: a voice starts on a run this long before it ends, and nothing
# rescans what a stream has said so far as it grows.
FIRST_SENTENCE_SCAN = 400


def sentence_end(text: str, start: int = 0, stop: int | None = None) -> int:
    """Where the first sentence in text[start:stop] ends (an index into text), or 0 when none does yet.

    At the very end of the text, a final .!? ends a sentence too, unless a digit precedes it: the next
    delta may be "14" after "3.". Linear in the part read, whatever the text."""
    end = len(text) if stop is None else min(stop, len(text))
    match = _SENTENCE_END.search(text, start, end)
    if match:
        return match.end()
    if end < len(text) or end <= start:
        return 0
    at = end
    while at > start and text[at - 1] in _CLOSERS:
        at -= 1
    marks = at
    while at > start and text[at - 1] in _STOPS:
        at -= 1
    if at == marks or (at > 0 and text[at - 1].isdigit()):
        return 0
    return end


def is_cjk(text: str) -> bool:
    """Whether the text has any Chinese, Japanese or Korean character."""
    return CJK.search(text) is not None


def language(text: str) -> str:
    """ "zh" for a text with CJK characters, else "en": the two languages the built-in phrases speak."""
    return "zh" if is_cjk(text) else "en"


# What retrieval reads of a question (a spoken one is a few dozen words): the rest of a huge message is
# never scanned, embedded or searched.
MAX_QUESTION_CHARS = 1000


def message_text(message: dict[str, Any], limit: int | None = None) -> str:
    """The words of one message: its string content, or the text parts of a list of parts; with a
    limit, at most that many characters, and parts past it are not read."""
    content = message.get("content")
    if isinstance(content, list):
        parts, size = [], 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"][:limit] if limit is not None else part["text"])
                size += len(parts[-1]) + 1
                if limit is not None and size >= limit:
                    break
        text = " ".join(parts)
    else:
        text = content if isinstance(content, str) else ""
    return text if limit is None else text[:limit]


def latest_question(messages: list[dict[str, Any]]) -> str:
    """The words of the last user message, or "" when there is none."""
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
