"""Whether the user's latest words ask for a destructive act: to end the call, or an act a tool names.

A phrase inside a message is not a request. "我的账户余额没有了，怎么回事？" holds 没有了, "I'm done with step
two, what next?" holds "I'm done", "Nice to see you again!" holds "see you": none of them says
goodbye. So the words are judged clause by clause (cut at punctuation), with quoted text set aside
as something mentioned, not said:
- To end the call, every clause must be a closing one: farewells (bye, that's all, 再见, 没有了...)
  with nothing but the small words of leave-taking around them (thanks, OK, have a nice day, 谢谢,
  好的...). A clause that asks something (a question mark, 吗/呢, a question word) keeps the call
  going, unless it asks to end it in so many words ("can you hang up?", 能挂电话吗).
- For an act a tool names (cancel, 取消), one clause must say the phrase as a request: not asked
  about, not negated (don't, never, 不要, 别), not quoted.
English is judged by words, Chinese by characters; both lower case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# A clause ends at a stop, a comma or a line end; its end says whether it asks.
_CLAUSE = re.compile(r"[^.!?;,\n。！？；，、…]+([.!?;,\n。！？；，、…]*)")
_QUOTED = re.compile(r"\"[^\"\n]{0,400}\"|“[^”\n]{0,400}”|「[^」\n]{0,400}」|『[^』\n]{0,400}』|‘[^’\n]{0,400}’")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
MAX_CHARS = 2000  # what is judged of a message: a goodbye is short

# Asking in so many words to end the call: allowed even in a question ("could you hang up?").
END_REQUESTS = (
    "hang up", "end the call", "end this call", "end call", "stop the call", "end the conversation",
    "挂电话", "挂断", "挂了吧", "结束通话", "结束对话", "结束这个电话",
)  # fmt: skip
# The small words of leave-taking: around a farewell they leave it a farewell.
LEAVE_TAKING_EN = frozenset(
    """thanks thank you very much so lot ok okay alright all right great perfect cool fine good nice awesome
    wonderful lovely sure yes yeah yep no nope please now then just well oh um uh and for your help today
    again really appreciate it appreciated have a an day night evening weekend morning afternoon take care
    can could would will go ahead i i'm im am we we're me that that's this is was it's to the bye be
    everything anything else more for now then soon later too same you've been helpful cheers""".split()  # noqa: SIM905
)
LEAVE_TAKING_ZH = tuple(
    """谢谢 多谢 谢了 感谢 好的 好吧 好啊 好 嗯 哦 啊 吧 啦 了 呀 哈 嗯嗯 行 可以 那 就 先 你 您 的
    帮助 帮忙 今天 晚安 祝 愉快 生活 工作 一切 顺利 辛苦 麻烦 请 现在 能 吗 帮我 一下 把 电话""".split()  # noqa: SIM905
)
QUESTION_WORDS_EN = frozenset(
    "what why how when where who which whose whom is are do does did can could would should will".split()  # noqa: SIM905
)
QUESTION_ZH = re.compile(r"怎么|怎样|什么|为什么|为啥|啥|多少|哪|几|谁|是否|能不能|可不可以|有没有|[吗呢么]$")
NEGATIONS = re.compile(r"\b(?:don't|do not|never|not)\b|不要|别|不用|没有")


def _clauses(text: str) -> list[tuple[str, bool]]:
    """The message's clauses, lower case, quoted text replaced by a word of its own; and whether each
    asks something."""
    text = _QUOTED.sub(" quoted ", text[:MAX_CHARS].lower().replace("’", "'"))
    return [
        (match.group(0)[: len(match.group(0)) - len(match.group(1))].strip(), "?" in match[1] or "？" in match[1])
        for match in _CLAUSE.finditer(text)
        if match.group(0).strip(" .!?;,\n。！？；，、…")
    ]


def _without(clause: str, phrases: Iterable[str]) -> tuple[str, bool]:
    """The clause with each phrase taken out (whole words in English); whether any was."""
    found = False
    for phrase in sorted(phrases, key=len, reverse=True):
        pattern = re.escape(phrase) if _CJK.search(phrase) else rf"(?<![a-z0-9']){re.escape(phrase)}(?![a-z0-9'])"
        clause, count = re.subn(pattern, " ", clause)
        found = found or count > 0
    return clause, found


def _asks(clause: str, question_mark: bool) -> bool:
    words = _WORD.findall(clause)
    return question_mark or bool(words and words[0] in QUESTION_WORDS_EN) or bool(QUESTION_ZH.search(clause))


def _only_leave_taking(rest: str) -> bool:
    """Whether what is left of a clause is nothing but the small words of leave-taking."""
    rest, _ = _without(rest, LEAVE_TAKING_ZH)
    if _CJK.search(rest):
        return False
    return all(word in LEAVE_TAKING_EN for word in _WORD.findall(rest))


def ends_the_call(farewells: Iterable[str]) -> Callable[[str], bool]:
    """A judge of the user's latest words: whether they say goodbye, and nothing else."""
    farewells = tuple(phrase.lower() for phrase in farewells)

    def judge(text: str) -> bool:
        said = False
        for clause, question_mark in _clauses(text):
            rest, requested = _without(clause, END_REQUESTS)
            rest, farewell = _without(rest, farewells)
            if (_asks(clause, question_mark) and not requested) or not _only_leave_taking(rest):
                return False
            said = said or requested or farewell
        return said

    return judge


def asked_for(phrases: Iterable[str]) -> Callable[[str], bool]:
    """A judge of the user's latest words: whether a clause asks for one of the phrases' act."""
    phrases = tuple(phrase.lower() for phrase in phrases)

    def judge(text: str) -> bool:
        for clause, question_mark in _clauses(text):
            rest, named = _without(clause, phrases)
            if named and not _asks(clause, question_mark) and not NEGATIONS.search(rest):
                return True
        return False

    return judge
