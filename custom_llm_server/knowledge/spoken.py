"""The question as meant: what speech recognition did to a spoken question, undone against the
knowledge base's own vocabulary, so that search by meaning sees the words the caller meant.

Speech recognition writes what it hears, and a voice agent's caller says things a typist would not:
- letters spelled out one by one: "h t t p", "p d f", "s s h 怎么指定端口" (the embedding model reads
  "h t t p" as four letters, not as the protocol), with a digit after them ("m d 5");
- one letter or a digit beside a word that the knowledge base writes as one: "s diff" (sdiff),
  "diff three" (diff3), "o auth" (oauth);
- one word heard as two ("time out", "back up", 日 至) or as another that sounds the same ("jason"
  for json, 木路 for 目录, 人物 for 任务).
The last two are what index.py's lexical repair (KnowledgeBase._heard) already guesses for the words;
this module writes its guesses back into the question. Every repair is one the knowledge base backs:
the word it makes is one the index holds (spelled letters excepted: spelled, they are a word whatever
the index says). The result is only ever a second reading beside the question as said (index.py
takes the better similarity of the two, and only for passages that hold what a repair brought in),
so a wrong guess costs little. A known word is taken for a homophone only when the knowledge base is
about the homophone and not about the word it heard (人物 in a manual that says 任务 in every
section about scheduling): a word the knowledge base uses as it is stays as it is.

Linear in the question's words: each is looked at once, with dictionary lookups.
"""

import re
from dataclasses import dataclass

import numpy as np

from custom_llm_server.core.text import CJK as _CJK
from custom_llm_server.knowledge.ranking import Postings
from custom_llm_server.knowledge.terms import everyday, question_words, said_as, sound, stem

# Spelled digits join the letters or the word before them only as a term the index holds ("diff
# three": diff3); otherwise "three two" stays words.
DIGITS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
# A known word is heard as a homophone only when the knowledge base is about the homophone far more
# than about the word: 10^TOPICAL_LIFT = 5 times more above everyday language (index.py's measure of
# what a knowledge base is about), and in HOMOPHONE_MORE times as many passages.
TOPICAL_LIFT = 0.7
HOMOPHONE_MORE = 5
HOMOPHONE_MIN_PASSAGES = 3


# An apostrophe inside a word: "cookie's", "doesn't". Split there, its last letters would read as
# letters spelled out ("cookie s a cross" is no "sa"); joined, the word stays one ("cookies", "doesnt").
_APOSTROPHE = re.compile(r"(?<=[^\W\d_])['\u2019](?=[^\W\d_])")


def unquoted(question: str) -> str:
    """The question with the apostrophes inside its words left out, before it is cut into words."""
    return _APOSTROPHE.sub("", question)


@dataclass(frozen=True)
class Meant:
    """A question as meant: its text, and the index terms the repairs brought in (a passage gains
    from the repaired reading only when it holds one of them). Its words support a passage as the
    question's own do only when it was spelled: a word guessed by its sound is index.py's lexical
    repair already, for less than the word itself and never alone."""

    text: str
    terms: tuple[str, ...]
    spelled: bool = False  # letters spelled out, or a letter or digit joined to a word: no guess, a reading


def _term(word: str, chinese: bool) -> str:
    return word if chinese else stem(word)


def _letter(token: tuple[str, bool]) -> bool:
    word, chinese = token
    return not chinese and len(word) == 1 and word.isalpha()


def _digit(token: tuple[str, bool]) -> str:
    """The digit a token says ("5", "five"), or ""."""
    word, chinese = token
    if chinese:
        return ""
    return word if word.isdigit() and len(word) == 1 else DIGITS.get(word, "")


def as_meant(
    said: list[tuple[str, bool]],
    heard: dict[str, list[str]],
    joined: dict[str, str],
    known: Postings,
    sounds: dict[str, list[str]],
) -> Meant | None:
    """The question as meant, from its words (terms.tokens) and what index.py's _heard guessed of them
    (heard: term -> known terms it may be misheard for; joined: term -> the known term it and its
    neighbour make); sounds: how a term sounds -> the index's terms that sound so. None when nothing
    was repaired."""
    out: list[tuple[str, bool]] = []
    brought: list[str] = []
    spelled_out = False
    asked = {word.term for word in question_words(said)}  # the informative words, as terms
    at, count = 0, len(said)
    while at < count:
        word, chinese = said[at]
        if _letter(said[at]) and (found := _spelled_at(said, at, known)):
            at, words, term = found
            out += [(spelled, False) for spelled in words]
            brought.append(term)
            spelled_out = True
            continue
        following = said[at + 1] if at + 1 < count else None
        if following is not None and following[1] == chinese:
            together = word + following[0]
            digit = _digit(following)
            if not chinese and digit and stem(word + digit) in known and not word.isdigit():  # "diff three"
                out.append((word + digit, False))
                brought.append(stem(word + digit))
                spelled_out = True
                at += 2
                continue
            term = _term(together, chinese)
            if term in (joined.get(_term(word, chinese)), joined.get(_term(following[0], chinese))):  # "back up"
                out.append((together, chinese))
                brought.append(term)
                at += 2
                continue
        guess = _meant_word(word, chinese, heard, known, sounds, asked)
        if guess:
            said_so = said_as(guess)
            if out and out[-1][1] == chinese and said_so.startswith(out[-1][0]):
                out.pop()  # 主机 明 heard as 主机名, "funk shun" (both halves) as function: the word once
            out.append((said_so, chinese))
            brought.append(guess)
        else:
            out.append((word, chinese))
        at += 1
    if not brought:
        return None
    return Meant(_text(out), tuple(dict.fromkeys(brought)), spelled_out)


def _spelled_at(said: list[tuple[str, bool]], at: int, known: Postings) -> tuple[int, list[str], str] | None:
    """Letters spelled out from `at` ("h t t p", "m d 5"), or a letter joined to the word after it
    ("s diff"): where the question goes on, the words they say, and the term they bring; None when
    they are neither."""
    end, count = at, len(said)
    while end < count and _letter(said[end]):
        end += 1
    letters = [w for w, _ in said[at:end]]
    if len(letters) >= 2:
        words = []
        # "a" and "i" before spelled letters are the article and the pronoun ("use a p d f",
        # "can i s s h"), unless the index knows the letters with them as one word
        if letters[0] in ("a", "i") and len(letters) >= 3 and stem("".join(letters)) not in known:
            words.append(letters.pop(0))
        spelled = "".join(letters)
        while end < count and (digit := _digit(said[end])) and len(spelled) < 12:  # "m d 5"
            spelled += digit
            end += 1
        return end, [*words, spelled], stem(spelled)
    word, following = letters[0], said[at + 1] if at + 1 < count else None
    # "s diff": sdiff; never "a" or "i", words of their own ("set a time out" is no atime)
    if word not in ("a", "i") and following and not following[1] and stem(word + following[0]) in known:
        return at + 2, [word + following[0]], stem(word + following[0])
    return None


def _text(words: list[tuple[str, bool]]) -> str:
    """The words as one text: a space between two, except between two Chinese words."""
    text = ""
    for position, (word, chinese) in enumerate(words):
        if position and not (chinese and words[position - 1][1]):
            text += " "
        text += word
    return text


def _meant_word(
    word: str,
    chinese: bool,
    heard: dict[str, list[str]],
    known: Postings,
    sounds: dict[str, list[str]],
    asked: set[str],
) -> str | None:
    """The known term a word was misheard for: _heard's first guess for a word the index does not
    know; for one it knows, a homophone the knowledge base is about where it is not about the word,
    and that the question's other words go with where the word as heard never does."""
    term = _term(word, chinese)
    # A guess in the other language is a coincidence of spelling: an English word too short for a
    # sound code of its own ("bite") is spelt like a pinyin syllable (比特, bite).
    guesses = [guess for guess in heard.get(term, []) if bool(_CJK.search(guess)) == chinese]
    if guesses:
        return guesses[0]
    if term not in asked or term not in known or (not chinese and len(word) < 4) or (chinese and len(word) < 2):
        return None
    # The homophone is what the knowledge base is about, far more than the word as heard: said 5 times
    # as much beside everyday language (10^TOPICAL_LIFT), and in 5 times as many passages.
    above = known.lift(term, everyday(term)) + TOPICAL_LIFT
    floor = max(HOMOPHONE_MIN_PASSAGES, HOMOPHONE_MORE * known.count(term))
    for other in sounds.get(sound(word if chinese else said_as(term)), []):  # the most used first
        if known.count(other) < floor:
            return None
        if other != term and bool(_CJK.search(other)) == chinese and known.lift(other, everyday(other)) >= above:
            context = [t for t in asked if t not in (term, other)]
            # 邮件 (email) is no 右键 (right-click) in a help centre that says 右键 far more: the
            # document the question sends is said beside 邮件 there too; 人物 never beside 定时
            if context and not _beside(known, term, context) and _beside(known, other, context):
                return other
            return None
    return None


def _beside(known: Postings, term: str, others: list[str]) -> bool:
    """Whether a passage holds the term and any of the others."""
    holding = np.zeros(known.size, dtype=bool)
    holding[known.holding(term)] = True
    return any(holding[known.holding(other)].any() for other in others)
