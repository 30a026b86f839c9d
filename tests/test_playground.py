"""GET /playground in a real browser: Debian's Chromium driven by Playwright (the system browser, so
nothing is downloaded at run time), against the real server and a scripted upstream on loopback.
Screenshots go to pytest's temporary folder, or to PLAYGROUND_SHOTS when set (to look at them), never
the repo."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from custom_llm_server.voice.answers import RECORDING
from tests.conftest import API_KEY

CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")
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


def open_page(browser, server, **options):
    """The playground in a new browser context (a browser session of its own), the key typed in."""
    page = browser.new_page(**options)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.goto(server.url + "/playground")
    page.fill("#key", API_KEY)
    return page


@pytest.fixture
def page(browser, make_server, upstream_server, upstream):
    server = make_server(audio_source="tts", tts_base_url=f"{upstream_server.url}/v1", tool_bridge_ms=60_000)
    page = open_page(browser, server)
    yield page
    page.close()


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.click("#send")


def answered(page, requests: int) -> None:
    """Wait until the page has sent this many requests and the last turn is over (audio played too)."""
    page.wait_for_function(
        f"window.playground.requests.length === {requests} && !document.querySelector('#send').disabled"
    )


def last_answer(page) -> str:
    return page.locator(".assistant .text").last.inner_text()


def shot(page, tmp_path, name: str) -> None:
    folder = Path(os.environ.get("PLAYGROUND_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def test_the_page_loads_without_a_key_and_can_be_turned_off(make_server, upstream):
    server = make_server()
    page = httpx.get(server.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text.split("<script>")[1].split("</script>")[0].replace("x-custom-llm", "")  # no CDN
    assert "localStorage" not in page.text  # the key is kept for the tab's session only
    off = make_server(playground=False)
    assert httpx.get(off.url + "/playground", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 404


def test_talk_stop_and_the_next_turn_is_marked_interrupted(page, upstream, tmp_path):
    ask(page, "Hello there")
    answered(page, 1)
    assert last_answer(page) == "Hello from the upstream."
    assert "first_sentence" in page.inner_text("#timing") and "total" in page.inner_text("#timing")

    upstream.script.words, upstream.script.delay = ["Word number one."] + [" and more"] * 200, 0.05
    ask(page, "Tell me a long story")
    page.wait_for_function("document.querySelectorAll('.assistant .text')[1].textContent.length > 20")
    page.click("#stop")
    shown = page.locator(".assistant .text").nth(1).inner_text()
    upstream.script.words, upstream.script.delay = ["Sure."], 0.0
    ask(page, "Sorry, go on")
    answered(page, 3)
    sent = page.evaluate("window.playground.requests[2]")
    interrupted = sent["messages"][3]
    assert interrupted["role"] == "assistant" and interrupted["metadata"]["interrupted"] is True
    assert interrupted["content"] == shown and sent["turn_id"] == 3 and "timestamp" in sent
    assert upstream.requests[-1]["body"]["messages"][3]["content"].endswith("did not hear the rest.]")
    shot(page, tmp_path, "talk-and-stop")
    assert page.errors == [] and page.evaluate("window.playground.errors") == []


def test_an_upstream_that_knows_only_its_own_models_is_asked_for_the_servers(page, upstream):
    upstream.script.models = ("gpt-4o-mini",)  # LLM_MODEL's default, as a real upstream knows its models
    ask(page, "Hello?")
    answered(page, 1)
    assert last_answer(page) == "Hello from the upstream." and upstream.requests[-1]["body"]["model"] == "gpt-4o-mini"
    assert "model" not in page.evaluate("window.playground.requests[0]")
    page.fill("#model", "gpt-4o")  # a model picked by the user is sent as picked
    ask(page, "And now?")
    answered(page, 2)
    assert "does not exist" in page.locator(".turn.error").last.inner_text()  # the upstream's own words
    assert all("404" in error for error in page.errors)  # the browser logs the refused request, nothing else


def test_errors_are_shown_as_errors_and_left_out_of_the_history(page, upstream, tmp_path):
    upstream.script.status = 500  # the server answers 502 in OpenAI's shape, before any event
    ask(page, "First question")
    answered(page, 1)
    error = page.locator(".turn.error").last
    assert "upstream_failed: The upstream LLM failed (status 500)." in error.inner_text()
    assert page.locator(".assistant").count() == 0  # no words came: no assistant line at all
    red, green = error.evaluate("e => getComputedStyle(e).color"), "rgb(29, 122, 74)"
    assert red == "rgb(161, 38, 27)" != green
    assert "left out of the history" in page.locator(".turn.user").first.inner_text()

    upstream.script.status = 200
    ask(page, "Second question")
    answered(page, 2)
    assert turns(page.evaluate("window.playground.requests[1]")["messages"]) == [("user", "Second question")]

    # An error event after words had come: the upstream stalls after two of them, and the server gives
    # up after LLM_IDLE_TIMEOUT (2 s here).
    upstream.script.stall_after = 3
    ask(page, "Third question")
    page.wait_for_function("document.querySelectorAll('.turn.error').length === 2")
    answered(page, 3)
    assert "upstream_timeout: The upstream LLM stopped sending." in page.locator(".turn.error").last.inner_text()
    assert last_answer(page) == "Hello from"  # the words that came stay, in the assistant's colour
    assert page.locator(".assistant").last.evaluate("e => getComputedStyle(e.querySelector('.who')).color") == green
    shot(page, tmp_path, "errors")

    upstream.script.stall_after = None
    ask(page, "Fourth question")
    answered(page, 4)
    sent = page.evaluate("window.playground.requests[3]")
    assert turns(sent["messages"]) == [
        ("user", "Second question"),
        ("assistant", "Hello from the upstream."),
        ("user", "Fourth question"),
    ]
    roles = [m["role"] for m in upstream.requests[-1]["body"]["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]
    assert page.evaluate("window.playground.errors") == []


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


def test_passages_are_cut_at_word_boundaries(page, upstream, tmp_path):
    cut = page.evaluate(
        """() => [
            clip('The quick brown fox jumps over the lazy dog', 20),
            clip('Short enough', 20),
            clip('检索到的段落在词语之间截断，而不是在词语中间截断。', 10),
            clip('x'.repeat(50), 20),
            clip("Put the server's key in `llm.api_key`; the engine sends it", 32),
        ]"""
    )
    assert cut[0] == "The quick brown fox…" and cut[1] == "Short enough"
    chinese = "检索到的段落在词语之间截断，而不是在词语中间截断。"
    assert cut[2].endswith("…") and len(cut[2]) <= 10 and chinese.startswith(cut[2][:-1]) and len(cut[2]) > 1
    assert cut[3] == "x" * 19 + "…"  # one word longer than the card is the only thing cut inside itself
    assert cut[4] == "Put the server's key in…"  # not `llm.…, where the browser's word segmenter would cut
    page.select_option("#endpoint", "/rag/chat/completions")
    ask(page, "How do I point the llm url of my agent at the server?")
    answered(page, 1)
    passages = page.evaluate("window.playground.notes.find((n) => n.kind === 'passages').data")
    shown = page.locator("#passages pre").all_inner_texts()
    assert passages and len(shown) == len(passages)
    shot(page, tmp_path, "passages")
    for passage, text in zip(passages, shown):
        citation, _, body = text.partition("\n")
        assert citation == passage["citation"]
        if len(passage["text"]) <= 300:
            assert body == passage["text"]
            continue
        kept = body.removesuffix("…")
        assert body.endswith("…") and len(body) <= 300 and passage["text"].startswith(kept)
        assert passage["text"][len(kept)].isspace() or CJK.search(passage["text"][len(kept) - 1 : len(kept) + 1])


def test_tool_calls_show_their_arguments_and_results(page, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    page.wait_for_function("document.querySelector('#tools pre') !== null && !document.querySelector('#send').disabled")
    tools = page.inner_text("#tools")
    assert 'calculate({"expression": "6*7"})' in tools and '"result":42' in tools and last_answer(page) == "It is 42."


def test_tool_calls_show_on_audio_too(page, upstream, tmp_path):
    page.select_option("#endpoint", "/audio/chat/completions")
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    answered(page, 1)
    tools = page.inner_text("#tools")
    assert 'calculate({"expression": "6*7"})' in tools and '"result":42' in tools
    assert last_answer(page).strip() == "It is 42." and page.evaluate("window.playground.audio.played") > 0.2
    shot(page, tmp_path, "audio-tool")
    assert page.errors == []


def test_audio_answers_play_as_they_arrive_and_stop_keeps_what_was_played(page, upstream, tmp_path):
    page.select_option("#endpoint", "/audio/chat/completions")
    # The scripted voice says 30 ms a character: five sentences of about two seconds.
    sentences = [f"Sentence number {n} is here, and it goes on for about two seconds. " for n in "12345"]
    upstream.script.words = sentences
    ask(page, "Say something")
    page.wait_for_function("window.playground.audio.played >= 0.5")
    shown, received = last_answer(page), page.evaluate("window.playground.audio.transcript")
    assert received.startswith(shown) and len(shown) < len(received)  # the words come with their voice
    shot(page, tmp_path, "audio-playing")
    page.wait_for_function("window.playground.audio.played >= 2.5")
    shown = last_answer(page)
    assert "Sentence number 1 is here" in shown and "Sentence number 3" not in shown
    page.click("#stop")
    audio = page.evaluate("window.playground.audio")
    page.wait_for_timeout(300)
    assert page.evaluate("window.playground.audio") == audio  # nothing more arrives, nor plays, after Stop
    assert "(stopped)" in page.inner_text("#audio") and "total: -" not in page.inner_text("#timing")
    shot(page, tmp_path, "audio-stopped")
    upstream.script.words = ["Sure."]
    page.select_option("#endpoint", "/chat/completions")
    ask(page, "Sorry, go on")
    answered(page, 2)
    interrupted = page.evaluate("window.playground.requests[1]")["messages"][1]
    assert interrupted["metadata"]["interrupted"] is True and interrupted["metadata"]["original"] == audio["transcript"]
    # What was played, about: 30 ms a character, give or take a word and the rate guessed at first (30 characters: 0.9 s).
    said = interrupted["content"]
    assert "".join(sentences).startswith(said) and abs(len(said) - audio["played"] / 0.03) < 30, (said, audio)
    assert "Sentence number 3" not in said
    assert page.errors == [], json.dumps(page.errors)


def test_a_transcript_sent_ahead_of_its_audio_is_shown_and_kept_as_it_is_played(
    browser, make_server, upstream, tmp_path
):
    # Files mode sends the recording's whole transcript first, then 10.9 s of its audio.
    page = open_page(browser, make_server(audio_source="files"))
    transcript = (RECORDING / "file.txt").read_text(encoding="utf-8").strip()
    seconds = (RECORDING / "file.pcm").stat().st_size / 32_000
    page.select_option("#endpoint", "/audio/chat/completions")
    ask(page, "Say something")
    page.wait_for_function("window.playground.audio.played >= 1")
    assert page.evaluate("window.playground.audio.transcript") == transcript  # all of it came at once
    shown = last_answer(page)
    assert transcript.startswith(shown) and len(shown) < len(transcript) / 4  # a second of eleven
    page.wait_for_function("window.playground.audio.played >= 2.5")
    page.click("#stop")
    played = page.evaluate("window.playground.audio.played")
    shot(page, tmp_path, "audio-files-stopped")
    page.select_option("#endpoint", "/chat/completions")
    ask(page, "Sorry, go on")
    answered(page, 2)
    said = page.evaluate("window.playground.requests[1]")["messages"][1]["content"]
    assert transcript.startswith(said) and abs(len(said) - len(transcript) * played / seconds) < 30, (said, played)
    assert "The words you hear now" not in said  # not the third sentence, nor the whole transcript
    assert page.errors == [], json.dumps(page.errors)
    page.close()


def test_each_card_shows_only_this_turn(page, upstream, tmp_path):
    page.select_option("#endpoint", "/audio/chat/completions")
    upstream.script.words = ["One short sentence."]
    ask(page, "Say one thing")
    answered(page, 1)
    first = page.evaluate("window.playground.audio")
    assert first["played"] > 0.3 and page.inner_text("#audio").endswith(f"of {first['received']:.2f} s received")

    page.select_option("#endpoint", "/chat/completions")  # a chat turn with a tool: no audio numbers
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    answered(page, 2)
    assert page.inner_text("#audio") == "-" and "calculate" in page.inner_text("#tools")
    assert "first_byte" in page.inner_text("#timing")
    shot(page, tmp_path, "cards-chat-after-audio")

    upstream.script.turns = []  # a rag turn: its passages, not the tool of the turn before
    page.select_option("#endpoint", "/rag/chat/completions")
    ask(page, "How do I point the llm url of my agent at the server?")
    answered(page, 3)
    assert page.inner_text("#tools") == "-" and page.locator("#passages pre").count() > 0
    assert page.inner_text("#audio") == "-"

    page.select_option("#endpoint", "/audio/chat/completions")  # audio again: this turn's seconds, not a sum
    ask(page, "Say it again")
    answered(page, 4)
    second = page.evaluate("window.playground.audio")
    assert abs(second["received"] - first["received"]) < 0.2 and abs(second["played"] - first["played"]) < 0.2
    assert page.inner_text("#passages") == "-" and page.inner_text("#tools") == "-"

    page.select_option("#endpoint", "/chat/completions")
    ask(page, "Thanks")
    answered(page, 5)
    assert page.inner_text("#audio") == "-" and page.inner_text("#passages") == "-"
    assert page.errors == []


def test_speak_says_why_it_cannot_listen(page, browser, tmp_path):
    # Headless Chromium has a speech recognition object, but it refuses to listen (no microphone).
    page.click("#mic")
    page.wait_for_function(
        "!document.querySelector('#notice').hidden && !document.querySelector('#notice').textContent.startsWith('Listening')"
    )
    assert "type your question" in page.inner_text("#notice") and page.locator("#notice").is_visible()
    shot(page, tmp_path, "speak-refused")
    # A browser with none at all (Firefox): it says so.
    bare = browser.new_page()
    bare.add_init_script("delete window.SpeechRecognition; delete window.webkitSpeechRecognition;")
    bare.goto(page.url)
    bare.click("#mic")
    assert bare.locator("#notice").is_visible()
    assert "no speech recognition" in bare.inner_text("#notice")
    bare.close()


def test_clear_empties_the_conversation_and_the_cards(page, upstream):
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    answered(page, 1)
    upstream.script.turns, upstream.script.words, upstream.script.delay = [], ["Word."] + [" more"] * 200, 0.05
    ask(page, "Tell me a long story")
    page.wait_for_function("document.querySelectorAll('.assistant .text')[1].textContent.length > 10")
    page.click("#clear")  # mid-answer: it is cut off too
    assert page.locator("#log .turn").count() == 0
    assert [page.inner_text(f"#{card}") for card in ("timing", "passages", "tools", "audio")] == ["-"] * 4
    page.wait_for_timeout(300)
    assert page.locator("#log .turn").count() == 0  # nothing of the cut answer comes back
    upstream.script.words, upstream.script.delay = ["Hello."], 0.0
    ask(page, "A new start")
    answered(page, 3)
    sent = page.evaluate("window.playground.requests[2]")
    assert turns(sent["messages"]) == [("user", "A new start")] and sent["turn_id"] == 1
    assert page.errors == []


def test_the_key_is_kept_for_the_browser_session_only(page, browser, upstream):
    page.reload()
    assert page.input_value("#key") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    ask(page, "Still there?")
    answered(page, 1)
    assert last_answer(page) == "Hello from the upstream."
    other = browser.new_page()  # another browser session: the key is not there
    other.goto(page.url)
    assert other.input_value("#key") == ""
    other.close()


def test_on_a_phone_the_cards_go_under_the_conversation(browser, make_server, upstream, tmp_path):
    page = open_page(browser, make_server(), viewport={"width": 390, "height": 844})
    upstream.script.turns = [{"calls": [("calculate", '{"expression": "6*7"}')]}, {"say": ["It is 42."]}]
    ask(page, "What is six times seven?")
    answered(page, 1)
    log, cards = page.locator("#log").bounding_box(), page.locator("aside").bounding_box()
    assert log["width"] >= 350 and cards["width"] >= 350  # the whole width, less the margins
    assert cards["y"] >= log["y"] + log["height"]  # under the conversation
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    shot(page, tmp_path, "phone")
    page.close()


def test_chinese_falls_back_to_a_cjk_font(page, upstream, tmp_path):
    for element in ("body", "#timing"):
        fonts = page.eval_on_selector(element, "e => getComputedStyle(e).fontFamily")
        assert '"Noto Sans CJK SC"' in fonts and '"Microsoft YaHei"' in fonts, fonts
    upstream.script.words = ["你好，", "我是你的语音助手。", "有什么可以帮你？"]
    ask(page, "你好")
    answered(page, 1)
    assert last_answer(page) == "你好，我是你的语音助手。有什么可以帮你？"
    shot(page, tmp_path, "chinese")
