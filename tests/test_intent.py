"""core/intent.py: whether the user's latest words ask to end the call, or for an act a tool names,
judged clause by clause; a phrase inside a question or a sentence about something else is no request."""

from __future__ import annotations

import time

import pytest

from custom_llm_server.core.intent import asked_for, ends_the_call
from custom_llm_server.core.wording import FAREWELLS

GOODBYE = ends_the_call(FAREWELLS)
CANCEL = asked_for(("cancel", "取消"))


@pytest.mark.parametrize(
    "words",
    [
        "bye",
        "OK thanks, goodbye!",
        "Thanks so much, have a nice day, bye!",
        "No, that is all. Goodbye.",
        "I have to go, talk to you later",
        "you can hang up now",
        "could you hang up please?",
        "That’s all, thanks",
        "好的，再见",
        "没有了，谢谢，拜拜",
        "不用了，谢谢",
        "就这样吧，再见",
        "能挂电话吗",
        "把电话挂了吧",
    ],
)
def test_goodbyes_end_the_call(words):
    assert GOODBYE(words)


@pytest.mark.parametrize(
    "words",
    [
        "我的账户余额没有了，怎么回事？",  # 没有了: "is gone", in a question
        "这个功能以后不用了吗",  # 不用了, asked
        "就这样设置可以吗",  # 就这样: "like this", asked
        "电话怎么挂了",  # why did the call drop
        "I'm done with step two, what next?",
        "That's it? Refunds take only three days?",
        'How do I make the agent "say goodbye" at the end?',
        '"bye"',  # quoted: a word mentioned, not said
        "Nice to see you again! What's the price",
        "帮我查一下余额，然后再见",  # a request first
        "Can you tell me how to hang up the phone on the app?",
        "What are your opening hours?",
        "",
    ],
)
def test_farewell_words_inside_other_words_do_not(words):
    assert not GOODBYE(words)


@pytest.mark.parametrize(
    ("words", "asked"),
    [
        ("cancel my order 42", True),
        ("please cancel it", True),
        ("取消订单", True),
        ("don't cancel it", False),
        ("never cancel anything", False),
        ("不要取消", False),
        ("can I cancel?", False),
        ("how do I cancel", False),
        ('"cancel" is a word', False),
    ],
)
def test_a_named_act_is_asked_for_only_as_a_request(words, asked):
    assert CANCEL(words) is asked


def test_a_huge_message_is_judged_on_its_start_only():
    started = time.thread_time()
    assert not GOODBYE("What is this? " + "bye " * 500_000)
    assert time.thread_time() - started < 0.5  # CPU of this thread: the rest was never read
