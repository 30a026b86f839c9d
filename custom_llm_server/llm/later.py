"""Tool results that arrive after the turn: a server tool (Python or HTTP) still running after
TOOL_ASYNC_AFTER_MS lets the answer finish with a short promise, keeps running within its own timeout,
and its result is said to the caller when it comes, through Agora's REST API.

Agora's engine runs only synchronous tools ("asynchronous tools, callbacks, polling... aren't
supported"), and its agent APIs offer two ways in: `think` injects a text as the user's input, and
`speak` has the agent say a text (priority APPEND: after what it is saying, interruptable). The
server uses `speak` with a sentence the model makes from the result: a tool's result is data, and
`think` would hand it to the model in the user's own voice, the most trusted place in a
conversation. So that the model knows the result on the next turn too, the call and its result are
put into the next requests of that channel's conversation, before the user's latest words.

Bounded: one pending result per tool and channel (a second slow call of the same tool is told the
first is still running), the tool's own timeout, at most MAX_KEPT results a channel, for KEPT_SECONDS;
dropped when the call ends (end_call, or Agora answering that the agent is gone); never said in, or
added to, another channel than the one that asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from custom_llm_server.core.context import Context
from custom_llm_server.core.redact import printable

log = logging.getLogger("custom_llm.tools")

MAX_KEPT = 8  # results kept a channel for its next requests
KEPT_SECONDS = 3600.0
MAX_CHANNELS = 1000  # channels with something pending or kept, at once

# What the model is told of a call still running: it says the promise, in the caller's language.
STILL_RUNNING = orjson.dumps(
    {
        "status": "still running",
        "instruction": "Tell the user in one short sentence, in their language, that you are still on it and will "
        "tell them the result as soon as it arrives. Do not guess the result.",
    }
).decode()
ALREADY_RUNNING = orjson.dumps(
    {"status": "already running", "instruction": "The same request is still running; its result will be told."}
).decode()

Say = Callable[[Context, str], Awaitable[str]]  # the channel's agent says a text: what happened
Phrase = Callable[[list[dict[str, Any]]], Awaitable[str]]  # a sentence that tells a result, from the model


@dataclass
class Kept:
    """A result that arrived, kept for the channel's next requests."""

    messages: list[dict[str, Any]]  # the assistant's call and the tool's result
    at: float = field(default_factory=time.monotonic)


class Later:
    """The channel-bound results of slow tool calls: adopted when the answer cannot wait, said when
    they arrive, and kept for the next turns."""

    def __init__(self, after_ms: int, say: Say, phrase: Phrase):
        self.after = after_ms / 1000
        self.say, self.phrase = say, phrase
        self.pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.kept: dict[str, list[Kept]] = {}

    def takes(self, context: Context) -> bool:
        """Whether a slow call of this request can be answered later: it has a channel to say it in."""
        return self.after > 0 and bool(context.channel)

    def adopt(self, call_id: str, name: str, arguments: str, task: asyncio.Future[str], context: Context) -> str:
        """Take over a call still running; what the model is told of it now."""
        channel = context.channel or ""
        if (channel, name) in self.pending:
            task.cancel()
            return ALREADY_RUNNING
        self._sweep()
        if len(self.pending) + len(self.kept) >= MAX_CHANNELS and channel not in self.kept:
            task.cancel()
            return orjson.dumps({"error": f"{name} is busy for too many calls; try again shortly."}).decode()
        said = [*context.messages[-6:]]  # what the user and the agent said last: what the result answers
        delivery = asyncio.get_running_loop().create_task(self._deliver(call_id, name, arguments, task, said, context))
        self.pending[(channel, name)] = delivery
        delivery.add_done_callback(lambda _: self.pending.pop((channel, name), None))
        log.info("tool %s still runs: its result will be said in the channel when it comes", printable(name, 64))
        return STILL_RUNNING

    async def _deliver(
        self,
        call_id: str,
        name: str,
        arguments: str,
        task: asyncio.Future[str],
        said: list[dict[str, Any]],
        context: Context,
    ) -> None:
        channel = context.channel or ""
        result = await task  # bounded by the tool's own timeout; a failure is a result too
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        messages: list[dict[str, Any]] = [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
        ]
        self._sweep()
        if channel not in self.kept and len(self.kept) >= MAX_CHANNELS:
            log.warning("tool %s result dropped: results kept for too many channels", printable(name, 64))
            return
        kept = [k for k in self.kept.get(channel, []) if time.monotonic() - k.at < KEPT_SECONDS]
        self.kept[channel] = [*kept, Kept(messages)][-MAX_KEPT:]
        try:
            sentence = await self.phrase([*said, *messages])
            done = await self.say(context, sentence) if sentence.strip() else "nothing to say"
        except Exception as error:  # Agora or the model unreachable: the result waits in the history
            done = f"not said ({type(error).__name__})"
        log.info("tool %s result: %s", printable(name, 64), printable(done, 200))
        if "gone" in done:  # the call ended meanwhile
            self.forget(context)

    def _sweep(self) -> None:
        """Forget the channels whose results are all older than KEPT_SECONDS (most calls end with a
        hang-up, not end_call: nothing else would ever let them go). At most MAX_CHANNELS to look at."""
        now = time.monotonic()
        for channel in [c for c, kept in self.kept.items() if all(now - k.at >= KEPT_SECONDS for k in kept)]:
            del self.kept[channel]

    def with_results(self, messages: list[dict[str, Any]], context: Context) -> list[dict[str, Any]]:
        """The messages with the channel's later results, before the user's latest words."""
        kept = [k for k in self.kept.get(context.channel or "", []) if time.monotonic() - k.at < KEPT_SECONDS]
        if not kept:
            return messages
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
        return [*messages[:last], *(m for k in kept for m in k.messages), *messages[last:]]

    def forget(self, context: Context) -> None:
        """The call has ended: nothing more is said or kept in its channel."""
        channel = context.channel or ""
        for (where, _), task in list(self.pending.items()):
            if where == channel:
                task.cancel()
        self.kept.pop(channel, None)

    async def drain(self, seconds: float) -> None:
        """Let the results still running arrive and be said (an agent replaced by a reload keeps its
        promises), for at most `seconds`."""
        if self.pending:
            await asyncio.wait(list(self.pending.values()), timeout=seconds)

    async def aclose(self) -> None:
        tasks = list(self.pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
