"""What Agora's engine adds to a request (kept from the upstream), and the history as the user heard it:
an interrupted answer cut where they stopped it, images in OpenAI's shape, and what the user's app
shares (`context.presence`) handed to the model as data."""

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from custom_llm_server.core.errors import bad_request
from custom_llm_server.core.text import language
from custom_llm_server.core.wording import INTERRUPTED_MARK

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
        "output_modalities",  # an agent setting that OpenAI's API would refuse as an unknown argument
        "variables",  # the call's own values for the agent's prompt and tools (config/profiles.py), not the model's
    }
)
MESSAGE_ENGINE_FIELDS = ("turn_id", "timestamp", "metadata")


def for_upstream(
    body: dict[str, Any], model: str, stream: bool, strip: frozenset[str], marks: Mapping[str, str] = INTERRUPTED_MARK
) -> dict[str, Any]:
    """The body for the upstream: the caller's own, minus the engine's fields, plus defaults.

    Every other key, known to OpenAI or not (vLLM's top_k, Ollama's options...), is forwarded."""
    dropped = ENGINE_FIELDS | strip
    forwarded = {key: value for key, value in body.items() if key not in dropped}
    forwarded["model"] = body.get("model") or model
    forwarded["stream"] = stream
    forwarded["messages"] = [as_heard(message, marks) for message in body["messages"]]
    return forwarded


def as_heard(message: dict[str, Any], marks: Mapping[str, str] = INTERRUPTED_MARK) -> dict[str, Any]:
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
        lang = language(heard + str(metadata.get("original", "")))
        message["content"] = heard.rstrip() + ("" if lang == "zh" else " ") + marks[lang].strip()
    return message


def _openai_image_part(part: dict[str, Any]) -> dict[str, Any]:
    """Agora's guide shows images as {"type": "image", "image_url": "<url>"}; OpenAI wants an object."""
    if part.get("type") in ("image", "image_url") and isinstance(part.get("image_url"), str):
        return {**part, "type": "image_url", "image_url": {"url": part["image_url"]}}
    return part


def presence_of(context: Any, max_chars: int) -> dict[str, Any]:
    """The users' RTM presence states the engine puts in `context.presence` ({user: {key: value}},
    Agora's "Transmit custom information"), at most `max_chars` of JSON (MAX_PRESENCE_CHARS)."""
    presence = context.get("presence") if isinstance(context, dict) else None
    if presence is None:
        return {}
    if not isinstance(presence, dict):
        raise bad_request(
            "context.presence: an object of users and their states is expected.", "invalid_presence", "context.presence"
        )
    try:
        written = orjson.dumps(presence).decode()
    except TypeError:  # deeper than orjson writes (254 levels): no state a model could read
        raise bad_request("context.presence: nested too deeply.", "too_deeply_nested", "context.presence") from None
    if len(written) > max_chars:  # a body's JSON is already bounded: this is what the model may read
        raise bad_request(
            f"context.presence: more than {max_chars} characters of JSON (MAX_PRESENCE_CHARS).",
            "presence_too_large",
            "context.presence",
        )
    return presence


def with_presence(messages: list[dict[str, Any]], presence: dict[str, Any], prompt: str) -> list[dict[str, Any]]:
    """The messages with the app's state as quoted data: a system message after the caller's own that
    says what it is, and the state as the result of a read_app_state call the server made (the lowest
    trust a model gives a message: information, never orders)."""
    if not presence:
        return messages
    call_id = f"call_app_state_{uuid.uuid4().hex[:16]}"
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "read_app_state", "arguments": "{}"}}],
    }
    result = {"role": "tool", "tool_call_id": call_id, "content": orjson.dumps({"presence": presence}).decode()}
    lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), len(messages))
    return [*messages[:lead], {"role": "system", "content": prompt}, *messages[lead:], call, result]
