"""Reading conversations: the words of a message, the question being asked, and its language.

One place decides what counts as Chinese or Japanese text, so /rag's waiting phrase, the tool
bridge phrase, the knowledge base's tokens and the voice's sentence cuts never disagree.
"""

import re
from typing import Any

# CJK ideographs, kana, compatibility ideographs and Hangul: scripts written without spaces.
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CJK = re.compile(f"[{CJK_RANGES}]")


# A sentence ends at .!? before a space, or at the end of the text so far unless a digit precedes
# it (the next delta may be "14" after "3."), or at Chinese and Japanese full stops.
SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|(?<!\d)[.!?…]+[\"')\]]*$|[。！？；]+|\n")


def is_cjk(text: str) -> bool:
    """Whether the text has any Chinese, Japanese or Korean character."""
    return CJK.search(text) is not None


def language(text: str) -> str:
    """ "zh" for a text with CJK characters, else "en": the two languages the built-in phrases speak."""
    return "zh" if is_cjk(text) else "en"


def message_text(message: dict[str, Any]) -> str:
    """The words of one message: its string content, or the text parts of a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(
            part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def latest_question(messages: list[dict[str, Any]]) -> str:
    """The words of the last user message, or "" when there is none."""
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
