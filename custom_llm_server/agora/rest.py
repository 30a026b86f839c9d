"""Agora's Conversational AI REST API with the project's credentials (Basic or token auth), and the
end_call tool that uses it once the goodbye has been heard."""

import asyncio
import base64
import logging
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import aiohttp
import orjson
import yarl
from pydantic import Field

from custom_llm_server.core.bounds import read_at_most
from custom_llm_server.core.context import Context
from custom_llm_server.core.redact import printable
from custom_llm_server.core.text import language

log = logging.getLogger("custom_llm.agora")


RUNNING = 2  # the agent state "RUNNING" in Agora's list-agents call
PUBLISHER = 1  # the RTC role a REST token is signed for, as Agora's Conversational AI SDK signs it
# Agora's ids are letters, digits, "_" and "-"; a channel name is at most 64 of these characters.
AGENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
CHANNEL = re.compile(r"[A-Za-z0-9 !#$%&()+\-:;<=.>?@\[\]^_{|}~,]{1,64}")
UID = re.compile(r"[A-Za-z0-9 !#$%&()+\-:;<=.>?@\[\]^_{|}~,]{1,255}")  # a number, or a string uid
# List agents finds only agents started in the last 2 hours unless told otherwise; a call lasts at
# most as long as its RTC token, 24 hours.
LIST_WINDOW_SECONDS = 24 * 3600
RETRY_STATUSES = frozenset({429, 503, 504})  # Agora's status-code reference: retry these, with backoff
RETRY_PAUSES = (0.5, 1.0)
REST_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=3)
MAX_REST_BODY = 1 << 20
MAX_SPEAKING_SECONDS = 60.0  # a goodbye is short: no estimate holds a hang-up longer than this
MAX_ANSWER_WAIT_SECONDS = 120.0  # the answer with the goodbye has this long to finish being sent
MAX_SPOKEN_BYTES = 512  # what Agora's speak call takes


@dataclass(frozen=True)
class BasicAuth:
    """Agora's REST credentials: the customer id and secret (HTTP Basic)."""

    customer_id: str
    customer_secret: str

    def header(self, app_id: str, channel: str, agent_uid: str) -> str:
        return "Basic " + base64.b64encode(f"{self.customer_id}:{self.customer_secret}".encode()).decode()


@dataclass(frozen=True)
class TokenAuth:
    """Agora's production REST authentication: an RTC+RTM token (AccessToken2) signed with the App
    Certificate for the agent's channel and uid, made by Agora's own token builder. Each hang-up
    gets a fresh token that expires in `lifetime` seconds."""

    certificate: str
    lifetime: int = 600

    def header(self, app_id: str, channel: str, agent_uid: str) -> str:
        with warnings.catch_warnings():  # the package's __init__ imports its deprecated builders too
            warnings.simplefilter("ignore", DeprecationWarning)
            from agoraiotools import RtcTokenBuilder2
        token = RtcTokenBuilder2.build_token_with_rtm(
            app_id, self.certificate, channel, agent_uid, PUBLISHER, self.lifetime, self.lifetime
        )
        return f"agora token={token}"


@dataclass(frozen=True)
class AgoraREST:
    """Agora's Conversational AI REST API with the project's credentials.

    Every URL is built from AGORA_API_BASE and ids that are checked to be Agora's ids and quoted as
    one path segment, redirects are not followed, and bodies are read only so far: the project's
    credentials go nowhere else, whatever a caller puts in its ids."""

    app_id: str
    auth: BasicAuth | TokenAuth
    base_url: str = "https://api.agora.io/api/conversational-ai-agent"
    agent_uid: str = "0"  # the join body's agent_rtc_uid, for a token; a request's agent_uid wins
    telephony: BasicAuth | None = None  # phone-call agents: end_call hangs the call up, with these credentials

    def url(self, *segments: str) -> yarl.URL:
        base = yarl.URL(self.base_url.rstrip("/"))
        url = base.joinpath(
            *(quote(part, safe="") for part in ("v2", "projects", self.app_id, *segments)), encoded=True
        )
        if url.origin() != base.origin() or not url.path.startswith(base.path.rstrip("/") + "/"):
            raise ValueError("a REST call would leave AGORA_API_BASE")
        return url

    async def stop_agent(self, channel: str | None, agent_id: str | None, agent_uid: str | None = None) -> str:
        """Stop the agent running in the channel (the one named, when an id is given): it leaves the
        channel, or, for a phone call (`telephony`), Agora hangs the call up. What happened, for the log.
        An id is only trusted once Agora lists it as running in the request's channel."""
        async with self._running(channel, agent_id, agent_uid) as (session, found):
            if session is None:
                return found
            if self.telephony is not None:  # Agora's telephony hang-up: Basic auth only
                headers = {"authorization": self.telephony.header(self.app_id, channel or "", "")}
                status, _ = await self._call(session, "POST", self.url("calls", found, "hangup"), headers=headers)
            else:
                status, _ = await self._call(session, "POST", self.url("agents", found, "leave"))
        if status == 404:
            return f"agent {found} was already gone"
        if status != 200:
            return f"stopping agent {found} failed with status {status}"
        return f"agent {found} {'hung up the call' if self.telephony else 'stopped'}"

    async def speak(self, channel: str | None, agent_id: str | None, agent_uid: str | None, text: str) -> str:
        """Have the agent running in the channel say a text after what it is saying (priority APPEND,
        interruptable), Agora's `speak`; what happened ("spoken", or why not), for the log."""
        text = text.encode()[:MAX_SPOKEN_BYTES].decode("utf-8", "ignore")
        async with self._running(channel, agent_id, agent_uid) as (session, found):
            if session is None:
                return found
            body = {"text": text, "priority": "APPEND", "interruptable": True}
            status, _ = await self._call(session, "POST", self.url("agents", found, "speak"), body=body)
        if status == 404:
            return f"agent {found} is gone"
        return "spoken" if status == 200 else f"speaking failed with status {status}"

    @asynccontextmanager
    async def _running(
        self, channel: str | None, agent_id: str | None, agent_uid: str | None
    ) -> AsyncIterator[tuple[aiohttp.ClientSession | None, str]]:
        """A session with the project's credentials and the id of the agent running in the channel;
        or no session and why nothing can be done."""
        if not channel or not CHANNEL.fullmatch(channel):
            yield None, "no valid channel in the request (put it in llm.params): nothing to do"
            return
        if agent_id is not None and not AGENT_ID.fullmatch(agent_id):
            yield None, "the request's agent_id is not an Agora id: nothing done"
            return
        agent_uid = agent_uid or self.agent_uid
        if not UID.fullmatch(agent_uid):
            yield None, "the request's agent_uid is not an Agora uid: nothing done"
            return
        authorization = self.auth.header(self.app_id, channel, agent_uid)
        async with aiohttp.ClientSession(
            headers={"authorization": authorization}, timeout=REST_TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            query = {
                "channel": channel,
                "state": str(RUNNING),
                "from_time": str(int(time.time()) - LIST_WINDOW_SECONDS),
            }
            status, body = await self._call(session, "GET", self.url("agents"), query=query)
            running = _agent_ids(body) if status == 200 else []
            if status != 200:
                yield None, f"listing the channel's agents failed with status {status}"
            elif agent_id is not None and agent_id not in running:
                yield None, f"agent {agent_id} is not running in the channel: nothing done"
            elif not running:
                yield None, "no running agent in the channel (already gone)"
            else:
                yield session, agent_id or running[0]

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: yarl.URL,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One REST call, retried with backoff on 429, 503 and 504; (status, at most MAX_REST_BODY of the body)."""
        for pause in (*RETRY_PAUSES, None):
            async with session.request(
                method, url, params=query, json=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await read_at_most(response, MAX_REST_BODY)
                if response.status not in RETRY_STATUSES or pause is None:
                    return response.status, answer
            await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns")


def _agent_ids(body: bytes) -> list[str]:
    try:
        agents = ((orjson.loads(body) or {}).get("data") or {}).get("list") or []
        return [agent["agent_id"] for agent in agents if isinstance(agent.get("agent_id"), str)]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return []


def speaking_seconds(text: str) -> float:
    """About how long the engine takes to say a text (15 characters a second, 5 for Chinese), capped."""
    return min(len(text) / (5 if language(text) == "zh" else 15), MAX_SPEAKING_SECONDS)


class Hangups:
    """The hang-ups end_call has scheduled: one per channel at a time, at most `limit` at once, each
    done within a few minutes. Not tied to the request: the caller's hang-up after the goodbye must
    not cancel it."""

    def __init__(self, rest: AgoraREST, grace_seconds: float, graceful: bool, limit: int = 100):
        self.rest, self.grace_seconds, self.graceful, self.limit = rest, grace_seconds, graceful, limit
        self.pending: dict[str, asyncio.Task[None]] = {}

    def schedule(self, context: Context, goodbye: str) -> str:
        """Stop the request's agent once the goodbye has been heard; what was done, for the model."""
        key = context.channel or ""
        if key in self.pending:
            return "the call is already ending"
        if len(self.pending) >= self.limit:
            log.warning("end_call: %d hang-ups are pending already; this one is not scheduled", self.limit)
            return "the call cannot be ended now"
        task = asyncio.get_running_loop().create_task(self._hang_up(context, goodbye))
        self.pending[key] = task
        task.add_done_callback(lambda _: self.pending.pop(key, None))
        return "the call ends after the goodbye"

    async def _hang_up(self, context: Context, goodbye: str) -> None:
        try:
            async with asyncio.timeout(MAX_ANSWER_WAIT_SECONDS):
                await context.answered.wait()  # the whole goodbye has been sent to the engine
        except TimeoutError:
            pass
        # With graceful leave, Agora waits for the agent to finish speaking; else, an estimate.
        await asyncio.sleep(0 if self.graceful else speaking_seconds(goodbye) + self.grace_seconds)
        try:
            done = await self.rest.stop_agent(context.channel, context.agent_id, context.agent_uid)
            log.info("end_call: %s", printable(done, 200))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning("end_call: Agora's REST API could not be reached (%s)", type(error).__name__)


def end_call_tool(hangups: Hangups, ending: Callable[[Context], None] | None = None) -> Callable[..., Any]:
    """The end_call tool: it lets the goodbye be heard, then stops the agent through the REST API;
    `ending` hears of it first (what is pending for the channel is dropped)."""

    async def end_call(
        goodbye: Annotated[str, Field(description="The last words to say, e.g. 'Thanks for calling, goodbye!'")],
        context: Context,
    ) -> dict[str, str]:
        """End the call when the user says goodbye or asks to hang up."""
        if context.call_ended:  # one per answer, however often the model asks
            return {"status": "the call is already ending", "say": goodbye}
        context.call_ended = True
        if ending is not None:
            ending(context)
        status = hangups.schedule(context, goodbye)
        return {"status": status, "say": goodbye, "instruction": "Say exactly the goodbye now, nothing else."}

    return end_call
