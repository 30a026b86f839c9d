"""Agora's engine as this server meets it: the fields it adds to a request (kept from the upstream),
the history as the user heard it, the first chunk that makes an answer uninterruptible, and the
REST API call that ends the call (the `end_call` tool).
"""

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
from pydantic import Field

from serving import facts
from text import language

log = logging.getLogger("custom_llm.agora")

# Fields Agora's engine adds to the body (vendor "custom", and the routing ids its sample backend
# puts into llm.params). They are ours to read; an OpenAI upstream would reject them, and the
# tokens among them must not leak to a model provider.
ENGINE_FIELDS = frozenset(
    {
        "turn_id",
        "timestamp",
        "interruptable",
        "context",
        "channel",
        "app_id",
        "user_uid",
        "agent_uid",
        "agent_id",
        "subscriber_token",
        "rtm_token",
        "rtm_uid",
    }
)
MESSAGE_ENGINE_FIELDS = ("turn_id", "timestamp", "metadata")

# Where the user barged in, told to the model inside the answer it gave: the words before the mark
# are all the user heard. (The engine sends the full text as metadata.original; it is never sent
# on, because the user did not hear it.)
INTERRUPTED_MARK = {
    "en": " [The user interrupted this answer here and did not hear the rest.]",
    "zh": "【用户在这里打断了这条回答，没有听到后面的内容。】",
}


def for_upstream(body: dict[str, Any], model: str, stream: bool, strip: frozenset[str]) -> dict[str, Any]:
    """The body for the upstream: the caller's own, minus the engine's fields, plus defaults.

    Every other key, known to OpenAI or not (vLLM's top_k, Ollama's options...), is forwarded."""
    dropped = ENGINE_FIELDS | strip
    forwarded = {key: value for key, value in body.items() if key not in dropped}
    forwarded["model"] = body.get("model") or model
    forwarded["stream"] = stream
    forwarded["messages"] = [as_heard(message) for message in body["messages"]]
    return forwarded


def as_heard(message: dict[str, Any]) -> dict[str, Any]:
    """One message for the upstream: without the engine's fields, images in OpenAI's shape, and an
    interrupted answer cut where the user stopped it, with the mark that says so."""
    metadata = message.get("metadata")
    message = {key: value for key, value in message.items() if key not in MESSAGE_ENGINE_FIELDS}
    if isinstance(message.get("content"), list):
        message["content"] = [_openai_image_part(part) for part in message["content"]]
    if not isinstance(metadata, dict) or metadata.get("interrupted") is not True:
        return message
    if message.get("role") == "assistant" and isinstance(message.get("content") or "", str):
        heard = message.get("content") or ""
        message["content"] = heard.rstrip() + INTERRUPTED_MARK[language(heard + str(metadata.get("original", "")))]
    return message


def _openai_image_part(part: dict[str, Any]) -> dict[str, Any]:
    """Agora's guide shows images as {"type": "image", "image_url": "<url>"}; OpenAI wants an object."""
    if part.get("type") in ("image", "image_url") and isinstance(part.get("image_url"), str):
        return {**part, "type": "image_url", "image_url": {"url": part["image_url"]}}
    return part


# ---------------------------------------------------------------------------------------------
# Ending the call: Agora's REST API, and the end_call tool that uses it
# ---------------------------------------------------------------------------------------------

RUNNING = 2  # the agent state "RUNNING" in Agora's list-agents call


@dataclass(frozen=True)
class AgoraREST:
    """Agora's Conversational AI REST API with the project's credentials (HTTP Basic auth)."""

    app_id: str
    customer_id: str
    customer_secret: str
    base_url: str = "https://api.agora.io/api/conversational-ai-agent"

    async def stop_agent(self, channel: str | None, agent_id: str | None) -> str:
        """Stop the agent (by id, or the one running in the channel); what happened, for the log."""
        credentials = base64.b64encode(f"{self.customer_id}:{self.customer_secret}".encode()).decode()
        headers = {"authorization": f"Basic {credentials}"}
        project = f"{self.base_url.rstrip('/')}/v2/projects/{self.app_id}"
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as session:
            if not agent_id:
                if not channel:
                    return "no agent id and no channel in the request: nothing to stop"
                params = {"channel": channel, "state": str(RUNNING)}
                async with session.get(f"{project}/agents", params=params) as response:
                    if response.status != 200:
                        return f"listing the channel's agents failed with status {response.status}"
                    agents = ((await response.json(content_type=None)).get("data") or {}).get("list") or []
                if not agents:
                    return "no running agent in the channel (already gone)"
                agent_id = agents[0].get("agent_id")
            async with session.post(f"{project}/agents/{agent_id}/leave") as response:
                if response.status == 404:
                    return f"agent {agent_id} was already gone"
                if response.status != 200:
                    return f"stopping agent {agent_id} failed with status {response.status}"
        return f"agent {agent_id} stopped"


def speaking_seconds(text: str) -> float:
    """About how long the engine takes to say a text (15 characters a second, 5 for Chinese)."""
    return len(text) / (5 if language(text) == "zh" else 15)


def end_call_tool(rest: AgoraREST, grace_seconds: float) -> Callable[..., Any]:
    """The end_call tool: it lets the goodbye be heard, then stops the agent through the REST API."""

    async def end_call(
        goodbye: Annotated[str, Field(description="The last words to say, e.g. 'Thanks for calling, goodbye!'")],
    ) -> dict[str, str]:
        """End the call when the conversation is over (the user said goodbye or asked to hang up)."""
        engine = facts().engine
        channel, agent_id = engine.get("channel"), engine.get("agent_id")
        delay = speaking_seconds(goodbye) + grace_seconds

        async def hang_up() -> None:
            await asyncio.sleep(delay)  # the goodbye is heard first
            try:
                log.info("end_call: %s", await rest.stop_agent(channel, agent_id))
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("end_call: Agora's REST API could not be reached (%s)", type(error).__name__)

        # Not tied to this request: the caller's hang-up after the goodbye must not cancel it.
        task = asyncio.get_running_loop().create_task(hang_up())
        PENDING.add(task)
        task.add_done_callback(PENDING.discard)
        return {
            "status": "the call ends after the goodbye",
            "say": goodbye,
            "instruction": "Say exactly the goodbye now, nothing else.",
        }

    return end_call


PENDING: set[asyncio.Task[None]] = set()  # hang-ups scheduled, kept alive until they run
