"""What one request is about, handed explicitly to whatever serves it: who is calling (the agent
their key selects), the engine's fields (turn, channel, agent id), the call's variables, and what
the request log reports (timings, which upstream served).

serving.WithContext makes a Context when the request arrives; the auth notes the caller's agent, the
route fills in what the body says and passes it down to the answer loop, the upstream client,
retrieval and the tools. A tool that declares a parameter of type Context receives it. The request
log reads it at the end. Nothing reads it from a global, except the log formatter, which stamps each
log line with the request id (logging offers no other way in).
"""

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """One request: set once from the caller and the body, filled in as the answer is made."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    agent: str = "-"  # the agent (profile) the caller's key selects
    model: str = "-"
    turn_id: str = "-"
    engine: dict[str, Any] = field(default_factory=dict)  # the engine's own fields: channel, agent_id...
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation as the caller sent it
    variables: dict[str, str] = field(default_factory=dict)  # llm.params.variables: the call's own values
    presence: dict[str, Any] = field(default_factory=dict)  # context.presence: what the user's app shares
    upstream: str = "-"  # which upstream served: primary or fallback
    cancelled: bool = False  # the caller hung up mid-answer (a barge-in)
    call_ended: bool = False  # end_call ran in this answer: once is enough
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # set when the response has been sent
    when_answered: list[Callable[[], None]] = field(default_factory=list)  # run then (an agent's count of users)
    # Our side of Agora's per-turn metrics, in ms: retrieval, tools, upstream first byte, first sentence.
    retrieval_ms: float | None = None
    tools_ms: float | None = None
    upstream_ttfb_ms: float | None = None
    first_sentence_ms: float | None = None

    @property
    def channel(self) -> str | None:
        value = self.engine.get("channel")
        return value if isinstance(value, str) else None

    @property
    def agent_id(self) -> str | None:
        value = self.engine.get("agent_id")
        return value if isinstance(value, str) else None

    @property
    def agent_uid(self) -> str | None:
        value = self.engine.get("agent_uid")  # a number or a string uid; Agora's sample sends it as text
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    def since_start_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


_logged: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def log_as(request_id: str) -> contextvars.Token[str]:
    """Stamp the log lines written from here on (in this task) with the request id."""
    return _logged.set(request_id)


def logged_request_id() -> str:
    return _logged.get()


def stop_logging_as(token: contextvars.Token[str]) -> None:
    _logged.reset(token)
