"""Every surface bounded: the attacks of issue 21, each against the real server on loopback.

Each test asserts the guarantee, not the behaviour of the day: the event loop is never held for more
than 100 ms (the watchdog in conftest.py fails any test in which it is), memory and metric series
stay bounded, no key reaches any output, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import quote, unquote

import httpx
import pytest

from tests.conftest import (
    AUTH,
    UPSTREAM_KEY,
    error_of,
    eventually,
    post,
    raw_connection,
    read_until_closed,
    sse_events,
    text_of,
)

ASK = {"stream": True, "messages": [{"role": "user", "content": "Say something."}]}


def tts_server(make_server, upstream_server, **overrides):
    settings = dict(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", audio_head_start_ms=60_000)
    return make_server(**{**settings, **overrides})


# --- text a model or a caller sends: read once, whatever it holds ----------------------------------


@pytest.mark.parametrize("path", ["/chat/completions", "/rag/chat/completions"])
def test_a_model_printing_dots_never_holds_the_loop(server, upstream, path):
    upstream.script.words = ["." * 65_536 + "x", " and then a sentence."]
    events = sse_events(post(server, ASK, path))
    assert events[-1] == b"[DONE]" and text_of(events).endswith("and then a sentence.")


def test_a_model_printing_dots_is_spoken_without_holding_the_loop(make_server, upstream_server, upstream):
    upstream.script.words = ["Fine. ", "." * 65_536 + "x", ", " * 20_000, "Done."]
    server = tts_server(make_server, upstream_server)
    events = sse_events(httpx.post(server.url + "/audio/chat/completions", json=ASK, headers=AUTH, timeout=30))
    assert events[-1] == b"[DONE]"


def test_a_broadcast_longer_than_the_limit_is_refused(server, upstream):
    body = {"stream": True, "messages": [{"role": "assistant", "content": "." * 32_768}]}
    response = post(server, body, "/audio/chat/completions")
    assert response.status_code == 400 and error_of(response)["code"] == "broadcast_too_long"


def test_a_huge_permitted_broadcast_is_read_once(make_server, upstream):
    """3.8 MB of ordinary sentences with commas: the voice starts at once and the loop stays free."""
    server = make_server(max_broadcast_chars=4_000_000)
    text = "Well, this is one sentence, with commas, and more words. " * 66_000
    body = {"stream": True, "messages": [{"role": "assistant", "content": text}]}
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/audio/chat/completions", json=body, headers=AUTH, timeout=30) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if "transcript" in line)
    assert "this is one sentence" in first and time.monotonic() - started < 30  # not after 3.8 MB is read
    assert httpx.get(server.url + "/health").status_code == 200


# --- upstream streams: linear parsing, an idle timeout per event, keys scrubbed ----------------------


def test_an_event_trickled_a_byte_at_a_time_times_out(make_server, upstream):
    server = make_server(llm_idle_timeout=1.0)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    upstream.script.pieces = [first] + [b"x"] * 200
    upstream.script.delay = 0.2  # a byte every 0.2 s: never silent, never an event
    started = time.monotonic()
    events = sse_events(post(server, ASK))
    assert json.loads(events[-2])["error"]["code"] == "upstream_timeout" and events[-1] == b"[DONE]"
    assert time.monotonic() - started < 60  # the idle timeout, not the 300 s stream cap


def test_an_event_cut_into_pieces_that_start_with_cr_costs_linear_time(server, upstream):
    # Half of LLM_MAX_EVENT_BYTES, cut into 511-byte pieces that each start with a CR.
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"y" * (1 << 19) + b'"}}]}'
    upstream.script.pieces = [event[:512]] + [b"\r" + event[i : i + 511] for i in range(512, len(event), 511)]
    upstream.script.pieces.append(b"\r\n\r\n")
    upstream.script.delay = 0
    started = time.monotonic()
    events = sse_events(post(server, ASK))
    assert events[-1] == b"[DONE]" and len(events[0]) > 1 << 19  # relayed as it came (not JSON: a CR in it)
    assert time.monotonic() - started < 30  # a rescan of what is held would take minutes


@pytest.mark.parametrize(
    "echo",
    [
        b'{"error": {"message": "Incorrect key sk-pro\\/j+key=", "code": "invalid_api_key"}}',  # PHP, Java
        b'{"error": {"message": "Incorrect key sk-pro\\u002fj+key=", "code": "bad"}}',
        b"proxy error: Authorization: Bearer sk-pro%2Fj%2Bkey%3D",
    ],
)
def test_an_upstream_echoing_our_key_in_any_escape_never_shows_it(make_server, upstream, caplog, echo):
    server = make_server(llm_api_key="sk-pro/j+key=")
    upstream.script.status, upstream.script.error_raw = 400, echo
    with caplog.at_level(logging.DEBUG, logger="custom_llm"):
        response = post(server, {"messages": [{"role": "user", "content": "Hi"}]})
    shown = response.text + caplog.text
    assert response.status_code == 400
    for form in ("sk-pro/j+key=", "sk-pro\\/j+key=", "sk-pro\\u002fj+key=", "sk-pro%2Fj%2Bkey%3D"):
        assert form not in shown


def test_our_key_in_a_relayed_event_is_scrubbed(server, upstream):
    upstream.script.words = ["The header was Bearer ", UPSTREAM_KEY, "."]
    assert UPSTREAM_KEY not in post(server, ASK).text


def test_many_distinct_upstream_error_codes_make_no_new_series(make_server, upstream):
    server = make_server()
    upstream.script.status = 400
    for n in range(40):
        upstream.script.error = {"error": {"message": "no", "code": f"made-up-code-{n}"}}
        post(server, {"messages": [{"role": "user", "content": "Hi"}]}).read()
    series = [
        line
        for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines()
        if line.startswith("custom_llm_upstream_errors_total{")
    ]
    assert not any("made-up-code" in line for line in series) and any('code="other"' in line for line in series)


# --- the voice: a cap on syntheses, bounded answers, no key in the log -----------------------------


class CountingVoice:
    """A slow voice that records how many syntheses run at once."""

    def __init__(self) -> None:
        self.running = self.most = 0

    async def synthesize(self, text: str):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for _ in range(5):
                await asyncio.sleep(0.1)
                yield b"\0\0" * 1600
        finally:
            self.running -= 1


def test_speech_has_its_own_concurrency_cap(make_server, upstream):
    voice = CountingVoice()
    server = make_server(voice=voice, max_speech_streams=3, max_upstream_streams=1000)

    async def speak_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, headers=AUTH) as client:
            return await asyncio.gather(
                *(
                    client.post(server.url + "/audio/speech", json={"input": "x" * 4000, "response_format": "pcm"})
                    for _ in range(20)
                )
            )

    answers = asyncio.run(speak_all())
    statuses = sorted(answer.status_code for answer in answers)
    assert voice.most <= 3 and statuses.count(200) >= 3 and set(statuses) <= {200, 503}
    refused = next(answer for answer in answers if answer.status_code == 503)
    assert refused.headers["retry-after"] == "1" and error_of(refused)["code"] == "overloaded"


def test_a_huge_speech_error_is_read_only_so_far_and_shows_no_key(make_server, upstream_server, upstream, caplog):
    server = make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1")
    upstream.script.speech_error_bytes = 50 << 20  # an endless error page that quotes our key
    with caplog.at_level(logging.DEBUG, logger="custom_llm"):
        response = httpx.post(
            server.url + "/audio/speech", json={"input": "Hello.", "response_format": "pcm"}, headers=AUTH, timeout=20
        )
    assert response.status_code == 502 and error_of(response)["code"] == "speech_failed"
    assert upstream.speech_error_sent < 50 << 20  # the rest was never read
    assert UPSTREAM_KEY not in caplog.text and UPSTREAM_KEY not in response.text


def test_a_voice_that_never_ends_is_cut_off(make_server, upstream):
    class Endless:
        async def synthesize(self, text: str):
            while True:
                yield b"\0" * 32_000  # a second of audio, as fast as it can be read

    server = make_server(voice=Endless(), tts_max_seconds=2)
    with httpx.stream(
        "POST", server.url + "/audio/speech", json={"input": "Hi", "response_format": "pcm"}, headers=AUTH, timeout=20
    ) as response:
        received = sum(len(piece) for piece in response.iter_bytes())
    assert received <= 2 * 32_000 + 32_000


# --- connections: no key, no time -----------------------------------------------------------------


def test_a_slow_body_without_a_key_is_answered_and_closed_at_once(server):
    connections = []
    started = time.monotonic()
    for _ in range(20):
        connection = raw_connection(server)
        connection.sendall(b"POST /chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        connections.append(connection)
    for connection in connections:
        answer = read_until_closed(connection)  # returns only once the server has closed the connection
        assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer
        connection.close()
    assert time.monotonic() - started < 20  # none waited for BODY_TIMEOUT_SECONDS (30 s)


def one_answer(connection: socket.socket) -> bytes:
    """One answer's head and JSON body, from a connection the server may keep open."""
    received = b""
    while not (b"\r\n\r\n" in received and received.endswith(b"}")):
        piece = connection.recv(65536)
        if not piece:
            break
        received += piece
    return received


@pytest.mark.parametrize("size", [1_000, 300_000, 3_000_000])
def test_a_refused_body_is_read_so_the_answer_arrives(server, size):
    """Closed with bytes unread, a connection is reset and the 401 queued to send is lost: the body
    is read first (up to MAX_BODY_BYTES), and the connection stays open for the next request."""
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}'
    head = b"POST /chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\ncontent-length: %d\r\n\r\n"
    for _ in range(5):
        connection = raw_connection(server)
        connection.sendall(head % len(body) + body)
        answer = one_answer(connection)
        assert (
            answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer and b"connection: close" not in answer
        )
        connection.sendall(head % len(body) + body)  # the same connection serves the next one
        assert one_answer(connection).startswith(b"HTTP/1.1 401")
        connection.close()


def test_a_refused_client_that_leaves_mid_body_is_logged_as_gone(server, caplog):
    """Left while its body was being read: nothing is sent, and the log shows no status (the metrics
    count a 499), not a 401 it never got."""
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        connection = raw_connection(server)
        connection.sendall(
            b"POST /chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n"
            b"content-length: 1000000\r\n\r\n" + b"a" * 1000
        )
        time.sleep(0.2)
        connection.close()
        eventually(lambda: "path=/chat/completions" in caplog.text, 10)
    (line,) = [line for line in caplog.text.splitlines() if "path=/chat/completions" in line]
    assert " status=- " in line and " chunks=0 " in line


def test_a_refused_client_waiting_to_send_its_body_is_answered_at_once(server):
    """`Expect: 100-continue` (curl's habit for large bodies): the refusal comes without asking for
    the body, so none of it is sent."""
    connection = raw_connection(server)
    connection.sendall(
        b"POST /chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n"
        b"expect: 100-continue\r\ncontent-length: 3000000\r\n\r\n"
    )
    answer = read_until_closed(connection)  # the server closes: the body it did not ask for is not coming
    assert answer.startswith(b"HTTP/1.1 401") and b"100 Continue" not in answer and b"invalid_api_key" in answer
    connection.close()


def test_a_slow_body_with_a_key_meets_the_body_deadline(make_server):
    server = make_server(body_timeout_seconds=0.5)
    connection = raw_connection(server)
    connection.sendall(
        b"POST /chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-key\r\n"
        b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"
    )
    started = time.monotonic()
    try:
        for _ in range(20):
            connection.sendall(b" ")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert (
        read_until_closed(connection).startswith(b"HTTP/1.1 408") and time.monotonic() - started < 15
    )  # the body never ends
    connection.close()


# --- log lines ------------------------------------------------------------------------------------


def test_a_tool_name_cannot_forge_a_log_line(server, upstream, caplog):
    upstream.script.turns = [{"calls": [("calc\n2026-01-01 INFO custom_llm forged line", "{}")]}, {"say": ["ok"]}]
    with caplog.at_level(logging.INFO, logger="custom_llm"):
        post(server, {"messages": [{"role": "user", "content": "Hi"}]}).read()
    assert "forged line" in caplog.text
    assert all("\n" not in record.getMessage() for record in caplog.records)


# --- round three: our key in every form a caller decodes ----------------------------------------------

SECRET = "sk-live/AbC+def=0123456789xyzXYZ"


def escaped_all(text: str, upper: bool = False) -> str:
    return "".join(f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}" for c in text)


def every_byte(text: str, upper: bool = True) -> str:
    return "".join(f"%{b:02X}" if upper else f"%{b:02x}" for b in text.encode())


ENCODINGS = {
    "as written": SECRET,
    "JSON \\/": SECRET.replace("/", "\\/"),
    "every character \\u-escaped": escaped_all(SECRET),
    "every character \\U-escaped, upper hex": escaped_all(SECRET, upper=True),
    "its first character \\u-escaped": escaped_all(SECRET[0]) + SECRET[1:],
    "percent-encoded": quote(SECRET, safe=""),
    "percent-encoded, lower-case hex": quote(SECRET, safe="").lower(),
    "every byte percent-encoded": every_byte(SECRET),
    "every byte percent-encoded, lower-case": every_byte(SECRET, upper=False),
    "percent-encoded, then \\u-escaped": escaped_all(quote(SECRET, safe="")[:6]) + quote(SECRET, safe="")[6:],
}


def what_a_reader_decodes(text: str) -> str:
    """Everything a caller or a log reader can get out of some text: it as written, its JSON strings
    decoded (every event's, and the content deltas joined), and each of those percent-decoded."""
    seen = [text]
    contents = []
    for line in text.splitlines():
        data = line.removeprefix("data: ")
        try:
            value = json.loads(data)
        except ValueError:
            continue
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                seen.append(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        for choice in value.get("choices") or [] if isinstance(value, dict) else []:
            contents.append(((choice.get("delta") or choice.get("message") or {}).get("content")) or "")
    seen.append("".join(contents))
    seen.append(text.encode().decode("unicode_escape", "ignore"))
    return "\n".join(seen + [unquote(s) for s in seen])


def event(content: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"' + content.encode() + b'"},"finish_reason":null}]}\n\n'


@pytest.mark.parametrize("form", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_our_key_in_any_encoding_in_a_relayed_event_never_reaches_the_caller(make_server, upstream, form):
    server = make_server(llm_api_key=SECRET)
    upstream.script.raw = event("The header was Bearer ") + event(form) + event(".") + b"data: [DONE]\n\n"
    answer = post(server, ASK).text
    assert SECRET not in what_a_reader_decodes(answer)
    assert "The header was Bearer" in answer and answer.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("form", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_our_key_in_any_encoding_in_a_non_streaming_answer_never_reaches_the_caller(make_server, upstream, form):
    server = make_server(llm_api_key=SECRET)
    upstream.script.body = (
        b'{"id":"x","object":"chat.completion","choices":[{"index":0,"finish_reason":"stop",'
        b'"message":{"role":"assistant","content":"key: ' + form.encode() + b'"}}]}'
    )
    answer = post(server, {"messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200 and SECRET not in what_a_reader_decodes(answer.text)


@pytest.mark.parametrize("status", [400, 429, 500])
@pytest.mark.parametrize("form", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_our_key_in_any_encoding_in_an_upstream_error_reaches_neither_caller_nor_log(
    make_server, upstream, caplog, form, status
):
    server = make_server(llm_api_key=SECRET)
    upstream.script.status = status
    upstream.script.error_raw = b'{"error": {"message": "bad key ' + form.encode() + b'", "code": "nope"}}'
    with caplog.at_level(logging.DEBUG, logger="custom_llm"):
        answer = post(server, {"messages": [{"role": "user", "content": "Hi"}]})
    assert SECRET not in what_a_reader_decodes(answer.text)
    assert SECRET not in what_a_reader_decodes(caplog.text)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_our_key_cut_across_events_is_not_joined_by_the_caller(make_server, upstream, size):
    """The key streamed a few characters an event, as a model's tokens would carry it: the caller,
    who joins the deltas, never gets it (at most the first few characters, never enough)."""
    server = make_server(llm_api_key=SECRET)
    pieces = [SECRET[at : at + size] for at in range(0, len(SECRET), size)]
    upstream.script.raw = (
        event("Your key is ") + b"".join(event(piece.replace("/", "\\/")) for piece in pieces) + event(", keep it.")
    ) + b"data: [DONE]\n\n"
    answer = post(server, ASK).text
    joined = what_a_reader_decodes(answer)
    assert SECRET not in joined and SECRET[:12] not in joined
    assert "Your key is" in joined and "keep it." in joined


def test_text_that_looks_like_a_key_start_is_relayed_whole_and_in_order(make_server, upstream):
    server = make_server(llm_api_key=SECRET)
    words = ["Ask the ", "sk-l", "ive", " team ", "sk-live/", "x", " now."]  # a key's start, then not the key
    upstream.script.raw = b"".join(event(w.replace("/", "\\/")) for w in words) + b"data: [DONE]\n\n"
    assert text_of(sse_events(post(server, ASK))) == "".join(words)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (CI installs it)")
def test_many_syntheses_leave_the_server_responsive(make_server, tmp_path):
    """200 long /audio/speech requests at once, from another process: 16 espeak-ng processes run (the
    rest get a quick 503), below the server's priority, so /health still answers at once (it took
    26-41 s with both cores busy speaking)."""
    server = make_server()  # files mode: espeak-ng says /audio/speech
    client = tmp_path / "speak.py"
    client.write_text(
        "import asyncio, sys, httpx\n"
        "async def main():\n"
        "    text = ('A long sentence for the voice to say, with many words in it. ' * 80)[:4096]\n"
        f"    async with httpx.AsyncClient(timeout=300, headers={AUTH!r}) as c:\n"
        "        answers = await asyncio.gather(*(c.post(sys.argv[1] + '/audio/speech', json={'input': text}) for _ in range(200)))\n"
        "    print(sorted({a.status_code for a in answers}), sum(a.status_code == 200 for a in answers))\n"
        "asyncio.run(main())\n"
    )
    speaking = subprocess.Popen([sys.executable, client, server.url], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # the syntheses are running
        worst = 0.0
        for _ in range(10):
            started = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.2)
        output, _ = speaking.communicate(timeout=300)
    finally:
        speaking.kill()
    statuses, spoken = output.split("] ")
    assert statuses + "]" in ("[200, 503]", "[200]") and 0 < int(spoken) <= 200
    assert worst < 1.0, f"/health took {worst:.2f} s while espeak-ng spoke"
