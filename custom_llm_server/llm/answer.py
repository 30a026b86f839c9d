"""The answer loop: the upstream's rounds, the server's tool calls run between them, the caller's
tool calls passed back, as typed events (streaming) or one JSON completion (non-streaming).

Both paths share one decision (`ends_answer`): a round ends the answer unless every call in it is
the server's and rounds remain. A round with any call to the caller's tools ends the answer with
those calls (finish_reason "tool_calls"); the server's calls of that round are not run, so the
model asks again once the caller's results are in, and no call is lost or run twice.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import upstream_error
from custom_llm_server.core.events import Event, Metadata, Note, Relayed, ToolCall, content_of
from custom_llm_server.core.lateness import phrase_for, said_when_late
from custom_llm_server.core.text import latest_question
from custom_llm_server.core.wording import BRIDGE_PHRASES
from custom_llm_server.llm.later import Later
from custom_llm_server.llm.tools import ToolRegistry, failure
from custom_llm_server.llm.upstream import LLM

log = logging.getLogger("custom_llm.answer")


@dataclass(frozen=True)
class ToolLoop:
    """The server's tools and the bounds on using them (settings TOOL_*)."""

    tools: ToolRegistry
    max_rounds: int = 3
    bridge_ms: int = 1000
    max_calls: int = 16  # per round: an upstream asking for thousands gets the first ones
    max_argument_bytes: int = 64 * 1024
    bridge: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: BRIDGE_PHRASES)
    later: Later | None = None  # slow calls answered after the turn (TOOL_ASYNC_AFTER_MS), where Agora can say them


@dataclass
class Call:
    """One tool call of a round, assembled from its streamed fragments."""

    id: str
    name: str
    owner: str  # "server" or "caller"
    index: int = 0  # the caller's calls are renumbered from 0
    fragments: list[str] = field(default_factory=list)
    size: int = 0

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": "".join(self.fragments)},
        }


def ends_answer(calls: list[Call], last: bool) -> bool:
    """The one round decision: the answer ends unless all calls are the server's and rounds remain."""
    server = sum(call.owner == "server" for call in calls)
    return last or server == 0 or server < len(calls)


def caller_tool_names(body: dict[str, Any]) -> set[str]:
    names = ((tool.get("function") or {}).get("name") for tool in body.get("tools") or [] if isinstance(tool, dict))
    return {name for name in names if isinstance(name, str)}


def offered_tools(body: dict[str, Any], tools: ToolRegistry) -> list[dict[str, Any]]:
    """The server's tools to offer beside the caller's (a caller's tool of the same name wins)."""
    if body.get("tool_choice") == "none":
        return []
    taken = caller_tool_names(body)
    return [schema for schema in tools.schemas() if schema["function"]["name"] not in taken]


def with_tools(body: dict[str, Any], messages: list[dict[str, Any]], offered: list[dict[str, Any]]) -> dict[str, Any]:
    request = {**body, "messages": messages}
    every_tool = [*(body.get("tools") or []), *offered]
    if every_tool:
        request["tools"] = every_tool
    else:  # the last round offers no server tool, and the caller had none
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            request.pop(key, None)
    return request


class Round:
    """The tool calls of one round, by owner; streamed deltas are assembled by index."""

    def __init__(self, caller_tools: set[str], loop: ToolLoop):
        self.caller_tools, self.loop = caller_tools, loop
        self.calls: list[Call] = []
        self.by_index: dict[int, Call] = {}
        self.for_caller = 0
        self.dropped = 0

    def add(self, call_id: str | None, name: str) -> Call | None:
        if len(self.calls) >= self.loop.max_calls:
            self.dropped += 1
            return None
        owner = "caller" if name in self.caller_tools else "server"
        call = Call(call_id or f"call_{uuid.uuid4().hex[:24]}", name, owner, self.for_caller)
        self.for_caller += owner == "caller"
        self.calls.append(call)
        return call

    def route(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record the streamed deltas; return the caller's, renumbered."""
        forward = []
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            function = delta.get("function") or {}
            index = delta.get("index", 0)
            call = self.by_index.get(index)
            # Some providers put every call on index 0; a new id means a new call.
            if call is None or (delta.get("id") and delta["id"] != call.id):
                call = self.add(delta.get("id"), function.get("name") or "")
                if call is None:
                    continue
                self.by_index[index] = call
            if call.owner == "caller":  # passed on as it came; nothing to hold here
                forward.append({**delta, "index": call.index})
                continue
            fragment = function.get("arguments") or ""
            call.size += len(fragment)
            if call.size <= self.loop.max_argument_bytes:
                call.fragments.append(fragment)
        return forward

    def server_calls(self) -> list[Call]:
        return [call for call in self.calls if call.owner == "server"]

    def warn_if_bounded(self) -> None:
        if self.dropped:
            log.warning(
                "the model asked for more than %d tool calls in one round; the rest were dropped", self.loop.max_calls
            )


def tool_call_event(payload: bytes) -> dict[str, Any] | None:
    """The event parsed if it carries tool calls, else None (the common case: one byte search)."""
    if b'"tool_calls"' not in payload:
        return None
    try:
        event = orjson.loads(payload)
        return event if isinstance(event["choices"][0], dict) else None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None  # not ours to judge: relayed as it came


def without_tool_calls(chunk: dict[str, Any], forward: list[dict[str, Any]]) -> dict[str, Any]:
    """The chunk with only the caller's tool-call deltas left in it."""
    choice = chunk["choices"][0]
    delta = {key: value for key, value in (choice.get("delta") or {}).items() if key != "tool_calls"}
    if forward:
        delta["tool_calls"] = forward
    return {**chunk, "choices": [{**choice, "delta": delta}, *chunk["choices"][1:]]}


async def run_calls(loop: ToolLoop, calls: list[Call], context: Context) -> list[dict[str, Any]]:
    """Every call at once; their results as `tool` messages, in the calls' order. A call still running
    after TOOL_ASYNC_AFTER_MS is handed to `loop.later`, which says its result when it comes (where the
    request has a channel and Agora's credentials are set), and the model is told it is still running."""

    async def run(call: Call) -> str:
        if call.size > loop.max_argument_bytes:
            return failure(f"The arguments for {call.name} are larger than {loop.max_argument_bytes} bytes.")
        return await loop.tools.run(call.name, "".join(call.fragments), context)

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(run(call)) for call in calls]
    adopted: set[asyncio.Future[str]] = set()
    try:
        if loop.later is not None and loop.later.takes(context):
            await asyncio.wait(tasks, timeout=loop.later.after)
        results = []
        for call, task in zip(calls, tasks):
            if not task.done() and loop.later is not None and loop.later.takes(context):
                adopted.add(task)
                results.append(loop.later.adopt(call.id, call.name, "".join(call.fragments), task, context))
            else:
                results.append(await task)
    except BaseException:  # a barge-in: the calls not handed over stop with the answer
        for task in tasks:
            if task not in adopted:
                task.cancel()
        raise
    finally:
        context.tools_ms = (context.tools_ms or 0.0) + (time.perf_counter() - started) * 1000
    return [{"role": "tool", "tool_call_id": call.id, "content": result} for call, result in zip(calls, results)]


@dataclass
class Turn:
    """What one streamed answer carries from round to round."""

    caller_tools: set[str]
    messages: list[dict[str, Any]]
    hold: bool  # a heard-whole tool is offered: hold word-less leading events until we know
    offered: list[dict[str, Any]]  # the server's tools, as offered to the model
    held: list[bytes] = field(default_factory=list)
    spoken: bool = False  # words or calls went out: too late for the uninterruptible first chunk
    bridged: bool = False  # the bridge phrase was said
    bridging: bool = False  # a bridge is waiting for the first sentence after the server's calls

    def release(self, payloads: list[bytes]) -> Relayed:
        """Events with words, after whatever was held back before them."""
        payloads, self.held, self.spoken = self.held + payloads, [], True
        return Relayed(payloads)


async def answer(llm: LLM, body: dict[str, Any], loop: ToolLoop, context: Context) -> AsyncIterator[Event]:
    """The upstream's answer as events, running the server's tool calls between rounds.

    Events without tool calls are relayed as they arrive, untouched. A round whose calls are all
    the server's is run here (in parallel) and the model is called again, up to max_rounds, then
    once more without server tools so the caller always gets an answer."""
    offered = offered_tools(body, loop.tools)
    hold = any(loop.tools.heard_whole(schema["function"]["name"]) for schema in offered)
    turn = Turn(caller_tool_names(body), list(body["messages"]), hold, offered)
    async for event in rounds(llm, body, loop, turn, 0, context):
        yield event


async def rounds(
    llm: LLM, body: dict[str, Any], loop: ToolLoop, turn: Turn, first: int, context: Context
) -> AsyncIterator[Event]:
    """The answer from round `first` on. After a round of the server's calls, the rest of the answer
    (the calls, then the next rounds) gets the bridge phrase when its first sentence is late."""
    for round_number in range(first, loop.max_rounds + 1):
        last = round_number == loop.max_rounds or not turn.offered
        calls, said = Round(turn.caller_tools, loop), []
        request = body if not turn.offered else with_tools(body, turn.messages, [] if last else turn.offered)
        finish = None
        async for event in stream_round(llm, request, calls, turn, context):
            if isinstance(event, Relayed):
                said.append(event)
            if isinstance(event, ToolCall) and event.chunk["choices"][0].get("finish_reason") == "tool_calls":
                finish = event  # its fate depends on the whole round
                continue
            yield event
        calls.warn_if_bounded()
        if ends_answer(calls.calls, last):
            if turn.held:
                yield turn.release([])
            if finish is not None:
                yield finish
            return
        for event in before_calls(loop, calls, turn, "".join(batch.text() for batch in said)):
            yield event
        rest = after_calls(llm, body, loop, calls, turn, round_number + 1, context)
        if not (turn.bridged or turn.bridging):  # one phrase an answer, and one timer at a time
            turn.bridging = True
            phrase = phrase_for(loop.bridge, latest_question(turn.messages))
            rest = said_when_late(rest, phrase, loop.bridge_ms, "bridge")
        async for event in rest:
            turn.bridging = False  # whatever comes out, the wait for the first sentence is over
            turn.bridged = turn.bridged or (isinstance(event, Note) and event.kind == "bridge")
            yield event
        return


async def stream_round(
    llm: LLM, request: dict[str, Any], calls: Round, turn: Turn, context: Context
) -> AsyncIterator[Event]:
    """One upstream call: plain events relayed, tool-call events routed (the caller's passed on)."""
    async with llm.stream(request, context) as batches:
        async for payloads in batches:
            plain: list[bytes] = []
            for payload in payloads:
                event = tool_call_event(payload)
                if event is None:
                    if turn.hold and not turn.spoken and not content_of(payload):
                        turn.held.append(payload)  # a role chunk: nothing heard yet
                        continue
                    plain.append(payload)
                    continue
                if plain:
                    yield turn.release(plain)
                    plain = []
                choice = event["choices"][0]
                delta = choice.get("delta") or {}
                forward = calls.route(delta.get("tool_calls") or [])
                if forward or delta.get("content") or choice.get("finish_reason") == "tool_calls":
                    yield ToolCall(without_tool_calls(event, forward))
            if plain:
                yield turn.release(plain)


def before_calls(loop: ToolLoop, calls: Round, turn: Turn, text: str) -> list[Event]:
    """What goes out before the server's calls run: the uninterruptible mark (it must be the answer's
    first chunk) and the held events; the round joins the history."""
    server_calls = calls.server_calls()
    events: list[Event] = []
    if any(loop.tools.heard_whole(call.name) for call in server_calls):
        if turn.spoken:
            log.warning("an answer that must be heard whole had already begun; the engine may let it be cut off")
        else:
            events.append(Metadata({"interruptable": False}))  # the first chunk: the engine plays the rest whole
    if turn.held:
        events.append(turn.release([]))
    turn.messages += [{"role": "assistant", "content": text or None, "tool_calls": [c.message() for c in server_calls]}]
    return events


async def after_calls(
    llm: LLM, body: dict[str, Any], loop: ToolLoop, calls: Round, turn: Turn, next_round: int, context: Context
) -> AsyncIterator[Event]:
    """The server's calls run (a barge-in cancels them), their results joined to the history, then the
    next rounds."""
    server_calls = calls.server_calls()
    results = await run_calls(loop, server_calls, context)
    turn.messages += results
    for call, result in zip(server_calls, results):
        yield Note(
            "tool", {"name": call.name, "arguments": "".join(call.fragments)[:1000], "result": result["content"][:1000]}
        )
    async for event in rounds(llm, body, loop, turn, next_round, context):
        yield event


async def complete(llm: LLM, body: dict[str, Any], loop: ToolLoop, context: Context) -> bytes:
    """The non-streaming twin of answer(): the same rounds and decision, one JSON completion at the end."""
    offered = offered_tools(body, loop.tools)
    if not offered:
        return await llm.complete(body, context)
    caller_tools = caller_tool_names(body)
    messages = list(body["messages"])
    for round_number in range(loop.max_rounds + 1):
        last = round_number == loop.max_rounds
        completion = await llm.complete(with_tools(body, messages, [] if last else offered), context)
        try:
            parsed = orjson.loads(completion)
            message = parsed["choices"][0]["message"]
            calls = Round(caller_tools, loop)
            for raw in message.get("tool_calls") or []:
                call = calls.add(raw.get("id"), raw["function"]["name"])
                if call is not None:
                    arguments = raw["function"].get("arguments") or ""
                    call.fragments.append(arguments)
                    call.size = len(arguments)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise upstream_error(
                502, "The upstream LLM sent an answer this server cannot read.", "upstream_invalid_response"
            ) from None
        calls.warn_if_bounded()
        if ends_answer(calls.calls, last):
            if calls.server_calls():  # the caller gets its own calls; the model asks for ours again
                message["tool_calls"] = [c.message() for c in calls.calls if c.owner == "caller"] or None
            return orjson.dumps(parsed)
        server_calls = calls.server_calls()
        messages += [
            {**message, "tool_calls": [c.message() for c in server_calls]},
            *await run_calls(loop, server_calls, context),
        ]
    raise AssertionError("unreachable: the last round always returns")
