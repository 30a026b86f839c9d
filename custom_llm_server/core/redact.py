"""What a value may show when it leaves the server: secrets replaced in every form they can take in
text, and caller-controlled values made safe for one log line.

An upstream, a speech endpoint or Agora's API may echo our key back in an error (proxies repeat the
request's headers). It can come back as written, JSON-escaped (`\\/` for `/`, as PHP and some Java
encoders write it), `\\u`-escaped, or percent-encoded. Raw text is scrubbed for each of those forms,
and a JSON error is scrubbed again after it is decoded, so no escape hides a key.
"""

import re
from urllib.parse import quote

import orjson

REDACTED = "[redacted]"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, limit: int = 100) -> str:
    """A caller-controlled value made safe for one log line: no control characters, bounded length."""
    text = str(value)[: limit + 1]
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "…"


class Redactor:
    """Replaces the given secrets, in each form text can carry them, with [redacted]."""

    def __init__(self, *secrets: str):
        forms: set[str] = set()
        for secret in secrets:
            if len(secret) >= 4:  # a shorter "secret" would redact ordinary words
                escaped = orjson.dumps(secret).decode()[1:-1]
                forms |= {secret, escaped, escaped.replace("/", "\\/"), quote(secret, safe="")}
        self.forms = sorted(forms, key=len, reverse=True)
        self.byte_forms = [form.encode() for form in self.forms]

    def __call__(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def relayed(self, payload: bytes) -> bytes:
        """An event or body passed on as bytes, scrubbed (a few substring searches: cheap enough
        for every event of a stream)."""
        for form in self.byte_forms:
            if form in payload:
                payload = payload.replace(form, REDACTED.encode())
        return payload

    def json_message(self, body: bytes) -> tuple[dict, str]:
        """An error body as (its decoded `error` object, the whole text), both scrubbed: the raw text
        for every written form, the decoded strings again for whatever escapes they used."""
        text = self(body.decode("utf-8", "replace"))
        try:
            detail = orjson.loads(text).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return {}, text
        if not isinstance(detail, dict):
            detail = {"message": str(detail)}
        return {key: self(value) if isinstance(value, str) else value for key, value in detail.items()}, text
