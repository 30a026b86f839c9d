"""Tools an agents file declares without code: the model's arguments POSTed as JSON to a URL of yours,
with the request's context, and the JSON answer handed back to the model.

    [[agents.shop.tools]]
    name = "order_status"
    description = "The delivery status of an order."
    url = "https://api.example.com/orders/status"     # POSTed {"arguments": {...}, "context": {...}}
    parameters = { type = "object", properties = { order_id = { type = "string" } }, required = ["order_id"] }
    timeout_seconds = 5
    headers = { Authorization = "env:SHOP_TOKEN" }      # optional; env: values come from the environment
    destructive = ["cancel", "取消"]                     # optional: runs only when the user's words ask

Each call is held to the limits of every outbound call: the tool's time, an answer read to
MAX_ANSWER_BYTES, the process's cap on calls in flight (MAX_HTTP_TOOL_CALLS), no redirects, and every
failure returned to the model as a result it reads; the headers' values are scrubbed from what the
tool answers, so a tool that echoes its token shows it to nobody.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import yarl

from custom_llm_server.core.bounds import Slots, TooLarge, read_at_most
from custom_llm_server.core.context import Context
from custom_llm_server.core.errors import ApiError
from custom_llm_server.core.redact import Redactor

MAX_ANSWER_BYTES = 64 << 10  # what the model is handed of a tool's answer
MAX_TIMEOUT_SECONDS = 60.0
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
SECRET_HEADER = re.compile(r"auth|cookie|key|token|secret|password|signature", re.I)


class ToolFailed(ValueError):
    """The tool's endpoint did not answer usefully: an expected failure, told to the model (and logged
    without a traceback)."""


@dataclass(frozen=True)
class HttpTool:
    """One declared tool: where it is called, what the model is told, and its limits."""

    name: str
    description: str
    url: str
    parameters: dict[str, Any]
    timeout_seconds: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    destructive: tuple[str, ...] = ()  # phrases a user says to ask for it; empty: not destructive
    from_env: frozenset[str] = frozenset()  # the headers whose values were read from the environment

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ValueError("name: letters, digits, _ and - (up to 64), not starting with a digit")
        url = yarl.URL(self.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("url: an http:// or https:// address")
        if not 0 < self.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(f"timeout_seconds: more than 0, at most {MAX_TIMEOUT_SECONDS:g}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ValueError("parameters: a JSON schema of type object")
        if len(orjson.dumps(self.parameters)) > 16_384:
            raise ValueError("parameters: at most 16 KB of schema")
        properties = self.parameters.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise ValueError("parameters.properties: a table of the arguments' schemas")
        required = self.parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) and r in properties for r in required):
            raise ValueError("parameters.required: a list of the names in parameters.properties")

    def secrets(self) -> list[str]:
        """The values of the headers that hold a credential (read with env:, or named like one), and
        the credentials inside them ("Bearer <token>": the token too). An `Accept` or a version
        header is no secret: scrubbing it would cut every date or type out of the tool's answers."""
        values = [value for name, value in self.headers if name in self.from_env or SECRET_HEADER.search(name)]
        return [*values, *(part for value in values for part in value.split() if len(part) >= 8)]


class HttpCaller:
    """Calls an agent's HTTP tools on one connection pool of its own, within the process's cap."""

    def __init__(self, slots: Slots):
        self.slots = slots
        self.session: aiohttp.ClientSession | None = None

    def function(self, tool: HttpTool) -> Callable[..., Awaitable[Any]]:
        """What the tool registry runs for this tool (ToolRegistry.declare)."""

        async def call(context: Context, **arguments: Any) -> Any:
            return await self.call(tool, arguments, context)

        return call

    async def call(self, tool: HttpTool, arguments: dict[str, Any], context: Context) -> Any:
        """The tool's JSON answer (or its text), or ToolFailed."""
        if self.session is None:  # made in the event loop that uses it
            self.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
        body = {"arguments": arguments, "context": sent_context(context)}
        headers = {"accept-encoding": "identity", **dict(tool.headers)}
        with contextlib.ExitStack() as slot:  # the call's time is the registry's: the tool's timeout_seconds
            try:
                slot.enter_context(self.slots.take())
            except ApiError:  # MAX_HTTP_TOOL_CALLS in flight: a result the model reads, not an error of ours
                raise ToolFailed("too many tool calls are in flight on this server; try again shortly") from None
            try:
                async with self.session.post(
                    tool.url,
                    data=orjson.dumps(body),
                    headers={"content-type": "application/json", **headers},
                    allow_redirects=False,
                ) as response:
                    if response.headers.get("content-encoding", "identity").lower() != "identity":
                        raise ToolFailed("it answered compressed, though asked not to")  # never inflated here
                    raw = await read_at_most(response, MAX_ANSWER_BYTES)
                    status = response.status
            except TooLarge:
                raise ToolFailed(f"its answer is larger than {MAX_ANSWER_BYTES} bytes") from None
            except aiohttp.ClientError as error:
                raise ToolFailed(f"it could not be reached ({type(error).__name__})") from None
        answer = Redactor(*tool.secrets()).relayed(raw)
        if 300 <= status < 400:
            raise ToolFailed(f"it answered a redirect (HTTP {status}), which is not followed")
        if status >= 400:
            raise ToolFailed(f"it answered HTTP {status}: {answer[:300].decode('utf-8', 'replace')}")
        try:
            return orjson.loads(answer)
        except orjson.JSONDecodeError:
            return answer.decode("utf-8", "replace")

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


def sent_context(context: Context) -> dict[str, Any]:
    """What a tool is told about the call: who is calling and where, and the call's own values."""
    return {
        "request_id": context.request_id,
        "agent": context.agent,
        "turn_id": context.turn_id,
        "channel": context.channel,
        "agent_id": context.agent_id,
        "variables": context.variables,
    }
