"""What a value may show when it leaves the server: secrets replaced in whatever form a reader would
decode, and caller-controlled values made safe for one log line.

An upstream, a speech endpoint or Agora's API may echo our key back (proxies repeat the request's
headers), as written or encoded: JSON-escaped (`\\/`, `\\u0073`, any character or all of them),
percent-encoded (`%2f` or `%2F`, or every byte), or, in a stream, cut across events that the caller
joins. So a secret is looked for in what the reader decodes, not only in the bytes:
- text (an error message, a log line): in each run of URL-ish characters, decoded;
- one JSON body or event: its raw bytes for the written forms; its strings, decoded, when it holds
  an escape or a percent sign;
- a stream (`StreamScrub`): also the text of its `content` deltas joined, where an event whose text
  ends with the start of a secret is held back until the next shows whether the secret follows.
Every check reads each byte a bounded number of times: the relay's cost stays what it was.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote

import orjson

REDACTED = "[redacted]"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A run of characters a URL or an escaped JSON string may be made of: where an encoded secret hides.
_RUN = re.compile(r"[A-Za-z0-9%._~+/=\\-]++")
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\(/)")
# The body of each "content" string in a batch of events (escapes kept as they are), in one pass.
_CONTENT = re.compile(rb'"content"\s*+:\s*+"((?:[^"\\]|\\.)*+)"')
HELD_FROM = 4  # an event's text ending with this many characters of a secret, or more, is held back


def printable(value: object, limit: int = 100) -> str:
    """A caller-controlled value made safe for one log line: no control characters, bounded length."""
    text = str(value)[: limit + 1]
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "…"


def decoded(text: str) -> str:
    """Text as a reader decodes it: JSON escapes (`\\u0073`, `\\/`), then percent-encoding."""
    if "\\" in text:
        text = _ESCAPE.sub(lambda m: m[2] or chr(int(m[1], 16)), text)
    return unquote(text) if "%" in text else text


class Redactor:
    """Replaces the given secrets, in each form text can carry them, with [redacted]."""

    def __init__(self, *secrets: str):
        self.secrets = [secret for secret in secrets if len(secret) >= 4]  # a shorter one would redact words
        forms: set[str] = set()
        for secret in self.secrets:
            escaped = orjson.dumps(secret).decode()[1:-1]
            percent = quote(secret, safe="")
            forms |= {secret, escaped, escaped.replace("/", "\\/"), percent, percent.lower()}
        self.forms = sorted(forms, key=len, reverse=True)
        self.byte_forms = [form.encode() for form in self.forms]

    def __call__(self, text: str) -> str:
        """Text with every secret replaced: as written, then in any run that decodes to one."""
        for form in self.forms:
            if form in text:
                text = text.replace(form, REDACTED)
        if self.secrets and ("%" in text or "\\" in text):
            text = _RUN.sub(lambda m: REDACTED if self._in(decoded(m[0])) else m[0], text)
        return text

    def _in(self, text: str) -> bool:
        return any(secret in text for secret in self.secrets)

    def suspect(self, data: bytes) -> bool:
        """Whether bytes may carry a secret in a form a reader decodes (the cheap test before a parse)."""
        return bool(self.secrets) and (b"\\u" in data or b"%" in data or any(form in data for form in self.byte_forms))

    def relayed(self, payload: bytes) -> bytes:
        """One JSON body or event passed on as bytes, scrubbed: untouched unless suspect; then its
        strings are decoded and any that holds a secret is replaced (and the body written anew)."""
        if not self.suspect(payload):
            return payload
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError:  # not JSON: scrubbed as text
            return self(payload.decode("utf-8", "replace")).encode()
        cleaned, changed = self._strings(value)
        return orjson.dumps(cleaned) if changed else payload

    def _strings(self, value: Any) -> tuple[Any, bool]:
        """The value with every string (keys too) scrubbed as decoded text; whether any changed. A
        stack, not recursion: a body nested a thousand levels deep is read like any other."""
        root = [value]
        stack: list[tuple[list | dict, Any]] = [(root, 0)]
        changed = False
        while stack:
            holder, at = stack.pop()
            item = holder[at]
            if isinstance(item, str):
                if self._in(decoded(item)):
                    holder[at], changed = self(item), True
                    if self._in(decoded(holder[at])):  # encoded in a way no run shows: the whole string goes
                        holder[at] = REDACTED
            elif isinstance(item, list):
                stack.extend((item, index) for index in range(len(item)))
            elif isinstance(item, dict):
                for key in list(item):
                    if isinstance(key, str) and self._in(decoded(key)):
                        item[REDACTED] = item.pop(key)
                        key, changed = REDACTED, True
                    stack.append((item, key))
        return root[0], changed

    def json_message(self, body: bytes) -> tuple[dict, str]:
        """An error body as (its decoded `error` object, the whole text), both scrubbed: the raw text
        for every written and encoded form, the decoded strings again for whatever escapes they used."""
        text = self(body.decode("utf-8", "replace"))
        try:
            detail = orjson.loads(text).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return {}, text
        if not isinstance(detail, dict):
            detail = {"message": str(detail)}
        return {key: self(value) if isinstance(value, str) else value for key, value in detail.items()}, text

    def stream(self) -> StreamScrub:
        return StreamScrub(self)


class StreamScrub:
    """One stream's events scrubbed as the caller will read them: each event as `Redactor.relayed`
    does, and the text of the `content` deltas joined, so a secret cut across events is found too.

    An event whose text, joined to what came before, ends with the first HELD_FROM characters of a
    secret or more is held back (rare: a secret's start is no word) until the next event shows
    whether the secret goes on; then the secret's pieces are replaced in every event that holds one.
    Fewer leading characters than HELD_FROM may reach the caller: never enough to be the secret."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.longest = max((len(secret) for secret in redactor.secrets), default=0)
        self.held: list[bytes] = []
        self.tail = ""  # the last characters of the joined content text, as long as a secret less one

    def __call__(self, payloads: list[bytes]) -> list[bytes]:
        """The events of one read, scrubbed; those held back come out with the next read (or flush)."""
        if not self.redactor.secrets:
            return payloads
        payloads, self.held = self.held + payloads, []
        joined = b"\n".join(payloads)
        if self.redactor.suspect(joined):
            payloads = [self.redactor.relayed(payload) for payload in payloads]
            joined = b"\n".join(payloads)
        found = _CONTENT.findall(joined)
        if not found:
            return payloads
        text = self.tail + _text(found)
        if self.redactor._in(text):
            payloads = self._cut(payloads, text[: len(self.tail)])
            text = self.tail + _text(_CONTENT.findall(b"\n".join(payloads)))
        start = self._secret_start(text)
        held = 0 if start is None else self._hold(payloads, len(text) - start)
        sent = text[: len(text) - held]
        self.tail = sent[len(sent) - self.longest + 1 :] if self.longest > 1 else ""
        return payloads

    def flush(self) -> list[bytes]:
        """What is still held back, at the end of the stream (the secret's start alone: let it go)."""
        held, self.held = self.held, []
        return held

    def _secret_start(self, text: str) -> int | None:
        """Where a secret's first HELD_FROM characters or more end the text, or None."""
        for secret in self.redactor.secrets:
            at = text.find(secret[:HELD_FROM], max(0, len(text) - len(secret) + 1))
            while at >= 0:
                if secret.startswith(text[at:]):
                    return at
                at = text.find(secret[:HELD_FROM], at + 1)
        return None

    def _hold(self, payloads: list[bytes], characters: int) -> int:
        """Hold back the last events (taken off `payloads`), enough of them to hold the text's last
        `characters`; how many characters of text they hold."""
        held = 0
        while payloads and held < characters:
            self.held.insert(0, payloads.pop())
            held += len(_text(_CONTENT.findall(self.held[0])))
        return held

    def _cut(self, payloads: list[bytes], before: str) -> list[bytes]:
        """Replace the pieces of a secret that the events' content holds, across them: the first piece
        by [redacted], the rest by nothing. `before` is the text already sent before these events."""
        contents = [_content(payload) for payload in payloads]
        text = before + "".join(content or "" for content in contents)
        keep = [True] * len(text)
        for secret in self.redactor.secrets:
            at = text.find(secret)
            while at >= 0:
                keep[at : at + len(secret)] = [False] * len(secret)
                at = text.find(secret, at + 1)
        cleaned, offset, first = [], len(before), False
        for payload, content in zip(payloads, contents):
            if content is None:
                cleaned.append(payload)
                continue
            kept = []
            for at, char in enumerate(content, offset):
                if keep[at]:
                    kept.append(char)
                    first = False
                elif not first:
                    kept.append(REDACTED)
                    first = True
            offset += len(content)
            cleaned.append(_with_content(payload, "".join(kept)))
        return cleaned


def _text(contents: list[bytes]) -> str:
    """The text of content strings as they are written in JSON, decoded as a reader decodes them."""
    return decoded(b"".join(contents).decode("utf-8", "replace"))


def _content(payload: bytes) -> str | None:
    """The first choice's `delta.content` of an event, decoded as the caller reads it, or None."""
    try:
        value = orjson.loads(payload)["choices"][0]["delta"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return decoded(value) if isinstance(value, str) else None


def _with_content(payload: bytes, content: str) -> bytes:
    value = orjson.loads(payload)
    value["choices"][0]["delta"]["content"] = content
    return orjson.dumps(value)
