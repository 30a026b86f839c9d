"""A phrase said only when an answer is late: /rag's waiting phrase and the tool bridge share the rule.

A voice cannot start speaking before a whole sentence has arrived, so the line is silent until the
answer's first sentence is there. If it is there within the budget, no phrase is said (the phrase
would only delay the answer, ~1.5 s of speech). If it is late, the phrase fills the silence and the
answer follows it without a gap; nothing is said twice. `bench/waiting.py` chose the default budget.
"""

import asyncio
import random
from collections.abc import AsyncIterator, Mapping

from custom_llm_server.core.events import Event, Note, Text, words_of
from custom_llm_server.core.text import FIRST_SENTENCE_SCAN, language, sentence_end


def phrase_for(phrases: Mapping[str, tuple[str, ...]], question: str) -> str:
    """One of the phrases in the question's language, ending so a voice says it as a sentence of its own."""
    lang = language(question)
    return random.choice(phrases[lang]) + ("" if lang == "zh" else " ")


async def said_when_late(events: AsyncIterator[Event], phrase: str, after_ms: int, kind: str) -> AsyncIterator[Event]:
    """The events, with the phrase before them only when their first sentence is not there within
    `after_ms` (0: the phrase always comes first). Until then the events are held, which costs the
    listener nothing. The phrase goes with a Note of `kind` for a caller that asked for notes."""
    if after_ms <= 0:
        yield Note(kind, phrase)
        yield Text(phrase)
        async for event in events:
            yield event
        return
    loop = asyncio.get_running_loop()
    deadline, said = loop.time() + after_ms / 1000, ""
    held: list[Event] = []
    waiting = True
    step = asyncio.ensure_future(anext(events, None))
    try:
        while True:
            if waiting:
                done, _ = await asyncio.wait({step}, timeout=max(0.0, deadline - loop.time()))
                if not done:  # late: the phrase now, then what was held
                    yield Note(kind, phrase)
                    yield Text(phrase)
                    waiting = False
                    for event in held:
                        yield event
                    held = []
                    continue
            arrived = await step
            if arrived is None:
                break
            if not waiting:
                yield arrived
            else:
                held.append(arrived)
                said += words_of(arrived)
                if sentence_end(said) or len(said) > FIRST_SENTENCE_SCAN:  # in time: no phrase
                    waiting = False
                    for kept in held:
                        yield kept
                    held = []
            step = asyncio.ensure_future(anext(events, None))
        for kept in held:  # the answer ended before its first sentence did, in time: no phrase
            yield kept
    finally:
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
