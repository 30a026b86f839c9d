"""Which language each passage is written in, and the question: so that a knowledge base that says the
same thing in two languages (a help centre in English and Chinese) answers in the caller's language.

The multilingual model puts a page and its translation about equally close to a question, and the
voice then reads the caller a passage in the other language. Among passages about equally close,
search prefers those in the question's language (LANGUAGE_WEIGHT, index.py); a passage that is clearly
closer still comes first, whatever its language. Read from the index's terms (a passage is Chinese when
at least CHINESE_SHARE of its terms are), once per loaded index and kept beside it.
"""

import re
import threading
import weakref

import numpy as np

from custom_llm_server.core.text import CJK_RANGES
from custom_llm_server.knowledge.ranking import Postings

# How much closer in meaning a passage in the question's language counts: less than the gap between
# a right answer and a near miss, about the gap between a page and its translation.
LANGUAGE_WEIGHT = 0.01
# A Chinese manual page names its commands and options in Latin letters: it is Chinese when a
# quarter of its terms are Chinese words, not only when most are.
CHINESE_SHARE = 0.25
_CHINESE = re.compile(f"[{CJK_RANGES}]")
_known: "weakref.WeakKeyDictionary[Postings, np.ndarray]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def chinese_passages(postings: Postings) -> np.ndarray:
    """Which passages are written in Chinese (True), a value per chunk in the postings' order; computed
    on the first search after the index is loaded (linear in its postings), then kept with it."""
    with _lock:
        found = _known.get(postings)
    if found is not None:
        return found
    chinese_term = np.zeros(len(postings.ids), dtype=bool)
    for term, at in postings.ids.items():
        chinese_term[at] = _CHINESE.match(term) is not None
    per_term = np.diff(postings.start)
    in_chinese = np.repeat(chinese_term, per_term)  # one per posting, in term order as postings.chunk is
    terms = np.bincount(postings.chunk, minlength=postings.size)
    chinese = np.bincount(postings.chunk[in_chinese], minlength=postings.size)
    found = chinese >= CHINESE_SHARE * np.maximum(terms, 1)
    with _lock:
        _known[postings] = found
    return found


def chinese_question(said: list[tuple[str, bool]]) -> bool:
    """Whether a question (terms.tokens) asks in Chinese: any Chinese word does ("tar怎么解压")."""
    return any(chinese for _, chinese in said)
