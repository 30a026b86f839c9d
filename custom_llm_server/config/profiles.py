"""Agent profiles by key: AGENTS_FILE's `[agents.<name>]` tables, each the server's settings with some
values of its own, the caller keys that select it and a system prompt; and the per-call variables
that fill the prompt's `{{name}}` placeholders.

A table's keys are the settings' environment names in lower case (`llm_model`, `knowledge_dir`...),
plus `api_keys` and `system_prompt`. A value written `env:NAME` is read from the environment, so the
file holds no secret. What a table leaves out comes from the server's own settings.
"""

import logging
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from custom_llm_server.config.settings import Settings, parsed
from custom_llm_server.core.errors import bad_request
from custom_llm_server.llm.http_tools import HttpTool

log = logging.getLogger("custom_llm.profiles")

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a profile's name is a metrics label
# Settings of the process, not of an agent: one listener, one log, one way in.
SERVER_WIDE = frozenset(
    {
        "ALLOW_UNAUTHENTICATED",
        "HOST",
        "PORT",
        "WORKERS",
        "LOG_LEVEL",
        "MAX_HEADER_BYTES",
        "HEADER_TIMEOUT_SECONDS",
        "BODY_TIMEOUT_SECONDS",
        "REFUSED_BODY_SECONDS",
        "SHUTDOWN_GRACE_SECONDS",
        "PLAYGROUND",
        "AGENTS_FILE",
        "AGENTS_WATCH_SECONDS",
        "DATA_DIR",
        "MAX_UPSTREAM_STREAMS",  # one cap on the process's calls in flight, whichever agent makes them
        "MAX_SPEECH_STREAMS",
        "MAX_HTTP_TOOL_CALLS",
        "CUSTOM_LLM_API_KEY",  # a profile's keys are its `api_keys`
        "METRICS_API_KEY",
        "REDIS_URL",  # one count of each key across the replicas
        "REDIS_REQUIRED",
        "REDIS_TIMEOUT_SECONDS",
    }
)
# A placeholder, with the spaces before it (left out with it when it has no value). Only the
# operator's prompt is scanned, never a caller's value.
PLACEHOLDER = re.compile(r"([ \t]*)\{\{\s*([A-Za-z_][A-Za-z0-9_]{0,63})\s*\}\}")
VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class Profile:
    """One agent: its settings, the caller keys that select it, the prompt put before the caller's,
    and the HTTP tools its table declares ([[agents.<name>.tools]], llm/http_tools.py)."""

    name: str
    settings: Settings
    keys: tuple[str, ...]
    system_prompt: str = ""
    tools: tuple[HttpTool, ...] = ()


class ProfileError(ValueError):
    """AGENTS_FILE cannot be used; the message says where."""


def single(settings: Settings) -> dict[str, Profile]:
    """The server without AGENTS_FILE: one agent, "default", selected by CUSTOM_LLM_API_KEY."""
    return {"default": Profile("default", settings, settings.api_keys)}


def read_profiles(path: Path, base: Settings) -> dict[str, Profile]:
    """The profiles in the file, each made from `base` and its own values; ProfileError if any is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
        document = tomllib.loads(text)
    except OSError as error:
        raise ProfileError(f"{path.name} cannot be read ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ProfileError(f"{path.name}: {error}") from None
    agents = document.pop("agents", None)
    if document or not isinstance(agents, dict) or not agents:
        raise ProfileError(f"{path.name} must hold [agents.<name>] tables and nothing else")
    profiles: dict[str, Profile] = {}
    owners: dict[str, str] = {}
    for name, table in agents.items():
        where = f"{path.name}, [agents.{name}]"
        if not NAME.fullmatch(name) or not isinstance(table, dict):
            raise ProfileError(f"{where}: an agent's name is letters, digits, _ and - (up to 64)")
        profile = _profile(name, table, base, text, where)
        for key in profile.keys:
            if key in owners:
                raise ProfileError(f"{where}: a caller key of [agents.{owners[key]}] is used again")
            owners[key] = name
        profiles[name] = profile
    return profiles


def _profile(name: str, table: dict[str, Any], base: Settings, text: str, where: str) -> Profile:
    known = {spec.metadata["env"] for spec in fields(Settings)} - SERVER_WIDE
    values, keys, prompt = {}, None, ""
    tools: tuple[HttpTool, ...] = ()
    for key, value in table.items():
        at = f"{where} line {_line_of(text, name, key)}, {key}"
        if key == "tools":
            tools = _http_tools(value, f"{where}, tools")
        elif key == "api_keys":
            keys = parsed({"CUSTOM_LLM_API_KEY": _text(value, at, ",")})["api_keys"]  # spelled as that one is
        elif key == "system_prompt":
            prompt = _text(value, at, "\n")
        elif key.upper() in known and key == key.lower():
            values[key.upper()] = _text(value, at, "|" if "_messages_" in key else ",")  # phrases may hold commas
        else:
            why = "is a server-wide setting" if key.upper() in SERVER_WIDE else "is not a setting"
            raise ProfileError(f"{at}: {why}")
    if not keys:
        raise ProfileError(f"{where}: api_keys is missing (the caller keys that select this agent)")
    try:
        settings = base.with_values(values)
    except ValueError as error:
        raise ProfileError(f"{where}: {error}") from None
    return Profile(name, settings, keys, prompt, tools)


def _asking_phrases(destructive: Any, name: str, at: str) -> tuple[str, ...]:
    """The phrases a user says to ask for a destructive tool: the ones given, or with `true` the verb its
    name starts with (cancel_order: "cancel"); none for a tool that is not destructive."""
    if destructive is True:
        return (re.split(r"[_\-]", name)[0].lower(),)
    if destructive is False:
        return ()
    if not isinstance(destructive, list) or not all(isinstance(p, str) and p.strip() for p in destructive):
        raise ProfileError(
            f"{at}: destructive is true (the verb the name starts with) or the phrases a user says to ask for it, "
            'e.g. ["cancel", "取消"]'
        )
    return tuple(destructive)


HTTP_TOOL_KEYS = frozenset({"name", "description", "url", "parameters", "timeout_seconds", "headers", "destructive"})


def _http_tools(value: Any, where: str) -> tuple[HttpTool, ...]:
    """An agent's [[agents.<name>.tools]] tables as HTTP tools; ProfileError says which and why."""
    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        raise ProfileError(f"{where}: write each tool as a [[agents.<name>.tools]] table")
    tools, names = [], set()
    for number, table in enumerate(value, 1):
        at = f"{where} #{number} ({str(table.get('name'))[:64]})"
        unknown = set(table) - HTTP_TOOL_KEYS
        if unknown:
            raise ProfileError(
                f"{at}: {', '.join(sorted(unknown))} is not a tool's key ({', '.join(sorted(HTTP_TOOL_KEYS))})"
            )
        destructive = _asking_phrases(table.get("destructive", False), str(table.get("name", "")), at)
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ProfileError(f"{at}: headers is a table of names and text values (env:NAME to read one)")
        try:
            tool = HttpTool(
                name=str(table.get("name", "")),
                description=str(table.get("description", ""))[:1000],
                url=str(table.get("url", "")),
                parameters=table.get("parameters", {"type": "object", "properties": {}}),
                timeout_seconds=float(table.get("timeout_seconds", 5)),
                headers=tuple((str(k), _resolved(v, f"{at}, headers.{k}")) for k, v in headers.items()),
                from_env=frozenset(str(k) for k, v in headers.items() if v.startswith("env:")),
                destructive=destructive,
            )
        except (ValueError, TypeError) as error:
            raise ProfileError(f"{at}: {error}") from None
        if tool.name in names:
            raise ProfileError(f"{at}: a tool of that name is declared twice")
        names.add(tool.name)
        tools.append(tool)
    return tuple(tools)


def _text(value: Any, at: str, joiner: str) -> str:
    """A TOML value as its environment variable would spell it; `env:NAME` read from the environment."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return joiner.join(_resolved(item, at) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return _resolved(value, at)
    raise ProfileError(f"{at}: use a string, a number, true/false or a list of strings")


def _resolved(value: str, at: str) -> str:
    if not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    if name not in os.environ:
        raise ProfileError(f"{at}: the environment variable {name} is not set")
    return os.environ[name]


def _line_of(text: str, table: str, key: str) -> int | str:
    """The line where the table sets the key, for the error message."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            inside = re.fullmatch(rf"\[\s*agents\.\"?{re.escape(table)}\"?\s*\]", stripped) is not None
        elif inside and re.match(rf"\"?{re.escape(key)}\"?\s*=", stripped):
            return number
    return "?"


def variables_of(value: Any, max_count: int = 64, max_chars: int = 2000) -> dict[str, str]:
    """The call's variables (`llm.params.variables`), checked: at most `max_count` of them
    (MAX_VARIABLES), counted before any is read; names are identifiers; values are strings, numbers or
    true/false of at most `max_chars` characters (MAX_VARIABLE_CHARS). Anything else is refused,
    never dropped in silence."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("variables: an object of names and values is expected.", "invalid_variables", "variables")
    if len(value) > max_count:
        raise bad_request(
            f"variables: at most {max_count} are accepted (MAX_VARIABLES).", "too_many_variables", "variables"
        )
    result = {}
    for name, item in value.items():
        if not VARIABLE.fullmatch(name):
            raise bad_request(
                "variables: a name is letters, digits and _ (up to 64), not starting with a digit.",
                "invalid_variables",
                "variables",
            )
        if isinstance(item, bool):
            result[name] = "true" if item else "false"
        elif isinstance(item, (str, int, float)):
            result[name] = str(item)
        else:
            raise bad_request(
                f"variables.{name}: a string, a number or true/false is expected.", "invalid_variables", "variables"
            )
        if len(result[name]) > max_chars:
            raise bad_request(
                f"variables.{name}: longer than {max_chars} characters (MAX_VARIABLE_CHARS).",
                "variable_too_long",
                "variables",
            )
    return result


def filled(prompt: str, variables: dict[str, str]) -> str:
    """The prompt with its `{{name}}` placeholders filled; one with no value is left out cleanly (the
    space before it too), and the log says which."""
    missing = sorted({name for _, name in PLACEHOLDER.findall(prompt) if name not in variables})
    if missing:
        log.warning("the system prompt's %s had no value in llm.params.variables; left out", ", ".join(missing))
    return PLACEHOLDER.sub(lambda m: m[1] + variables[m[2]] if m[2] in variables else "", prompt)
