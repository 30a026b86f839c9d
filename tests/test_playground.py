"""GET /playground in a real browser: Debian's Chromium driven by Playwright (the system browser, so
nothing is downloaded at run time). A screenshot goes to pytest's temporary folder, never the repo."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from tests.conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.slow


@pytest.fixture
def browser():
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, make_server, upstream_server, upstream):
    server = make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", tool_bridge_ms=60_000)
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.goto(server.url + "/playground")
    page.fill("#key", API_KEY)
    yield page
    page.close()


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.click("#send")


def last_answer(page) -> str:
    return page.locator(".assistant .text").last.inner_text()


def test_the_page_loads_without_a_key_and_can_be_turned_off(make_server, upstream):
    server = make_server()
    page = httpx.get(server.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text.split("<script>")[1].split("</script>")[0].replace("x-custom-llm", "")  # no CDN
    off = make_server(playground=False)
    assert httpx.get(off.url + "/playground", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 404


def test_talk_stop_and_the_next_turn_is_marked_interrupted(page, upstream, tmp_path):
    ask(page, "Hello there")
    page.wait_for_function(
        "document.querySelector('#send').disabled === false && window.playground.requests.length === 1"
    )
    assert last_answer(page) == "Hello from the upstream."
    assert "first_sentence" in page.inner_text("#timing") and "total" in page.inner_text("#timing")

    upstream.script.words, upstream.script.delay = ["Word number one."] + [" and more"] * 200, 0.05
    ask(page, "Tell me a long story")
    page.wait_for_function("document.querySelectorAll('.assistant .text')[1].textContent.length > 20")
    page.click("#stop")
    shown = page.locator(".assistant .text").nth(1).inner_text()
    upstream.script.words, upstream.script.delay = ["Sure."], 0.0
    ask(page, "Sorry, go on")
    page.wait_for_function("window.playground.requests.length === 3 && !document.querySelector('#send').disabled")
    sent = page.evaluate("window.playground.requests[2]")
    interrupted = sent["messages"][3]
    assert interrupted["role"] == "assistant" and interrupted["metadata"]["interrupted"] is True
    assert interrupted["content"] == shown and sent["turn_id"] == 3 and "timestamp" in sent
    assert upstream.requests[-1]["body"]["messages"][3]["content"].endswith("did not hear the rest.]")
    page.screenshot(path=str(tmp_path / "playground.png"))
    assert page.errors == [] and page.evaluate("window.playground.errors") == []


def test_an_upstream_that_knows_only_its_own_models_is_asked_for_the_servers(page, upstream):
    upstream.script.models = ("gpt-4o-mini",)  # LLM_MODEL's default, as a real upstream knows its models
    ask(page, "Hello?")
    page.wait_for_function("!document.querySelector('#send').disabled")
    assert last_answer(page) == "Hello from the upstream." and upstream.requests[-1]["body"]["model"] == "gpt-4o-mini"
    assert "model" not in page.evaluate("window.playground.requests[0]")
    page.fill("#model", "gpt-4o")  # a model picked by the user is sent as picked
    ask(page, "And now?")
    page.wait_for_function("window.playground.requests.length === 2 && !document.querySelector('#send').disabled")
    assert "does not exist" in last_answer(page) + page.inner_text("body")  # the upstream's own words
    assert all("404" in error for error in page.errors)  # the browser logs the refused request, nothing else


def test_rag_shows_the_waiting_phrase_and_the_passages(page, upstream):
    upstream.script.first_delay = 1.5  # late enough for the waiting phrase (WAITING_PHRASE_AFTER_MS, 1 s)
    page.select_option("#endpoint", "/rag/chat/completions")
    ask(page, "How do I point the llm url of my agent at the server?")
    page.wait_for_function(
        "document.querySelector('#passages pre') !== null && !document.querySelector('#send').disabled"
    )
    assert page.locator(".waiting").first.inner_text().strip()
    assert "agora-setup.md" in page.inner_text("#passages") and last_answer(page) == "Hello from the upstream."
    assert page.errors == []


def test_tool_calls_show_their_arguments_and_results(page, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    page.wait_for_function("document.querySelector('#tools pre') !== null && !document.querySelector('#send').disabled")
    tools = page.inner_text("#tools")
    assert 'calculate({"expression": "6*7"})' in tools and '"result":42' in tools and last_answer(page) == "It is 42."


def test_audio_answers_play_as_they_arrive_and_stop_silences_them(page, upstream):
    page.select_option("#endpoint", "/audio/chat/completions")
    upstream.script.words = ["First sentence here. ", "Second sentence here. "] * 10
    ask(page, "Say something")
    page.wait_for_function("window.playground.audioSeconds > 0.5")
    assert "First sentence here." in last_answer(page)
    page.wait_for_function("document.querySelector('.assistant .text').textContent.length > 60")
    page.click("#stop")
    received = last_answer(page)  # transcripts arrive ahead of the audio they stand for
    seconds = page.evaluate("window.playground.audioSeconds")
    page.wait_for_timeout(300)
    assert page.evaluate("window.playground.audioSeconds") == seconds  # nothing more arrives after Stop
    assert "total" in page.inner_text("#timing") and "total: -" not in page.inner_text("#timing")
    upstream.script.words = ["Sure."]
    ask(page, "Sorry, go on")
    page.wait_for_function("window.playground.requests.length === 2 && !document.querySelector('#send').disabled")
    interrupted = page.evaluate("window.playground.requests[1]")["messages"][1]
    # The next turn says what was heard, not every transcript received: the audio had not all played.
    assert (
        interrupted["metadata"]["interrupted"] is True
        and interrupted["metadata"]["original"].strip() == received.strip()
    )
    assert received.startswith(interrupted["content"].strip()) and len(interrupted["content"]) < len(received)
    assert page.errors == [], json.dumps(page.errors)
