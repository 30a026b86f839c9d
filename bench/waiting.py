"""When should /rag say its waiting phrase? `python3 bench/waiting.py` (also part of `make bench`).

The server (`python3 custom_llm.py`, the sample knowledge base) answers /rag from the paced upstream
(bench/paced_llm.py), whose time to first token is drawn per question from a mix of fast and slow
models: 60% 0.3-0.6 s (a small hosted model), 30% 0.6-1.2 s, 10% 1.5-4 s (a large model, or a
loaded one). Each answer's first sentence is eight words, a word every 20 ms. For each setting of
WAITING_PHRASE_AFTER_MS (0: always, first), the same 60 questions, and for each answer the times
the client saw the phrase and the answer's first sentence. A voice speaks a sentence once it is
whole, at 15 characters a second, one thing at a time; so the user hears the answer at the later of
its first sentence's arrival and the phrase's end, and hears the first sound at the phrase or the
answer, whichever comes first. Writes bench/results/waiting.md.
"""

import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from bench import KEY, pct, publish, start_servers, stop
from custom_llm_server.core.text import sentence_end
from custom_llm_server.core.wording import WAITING_PHRASES

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = (0, 400, 700, 1000, 1500)
SPEAKING = 15  # characters a second
ANSWER = ["Agora's", " engine", " calls", " the", " address", " you", " give", " it."] + [" More words."] * 10
QUESTIONS = 60


def first_tokens(seed: int = 7) -> list[float]:
    draw = random.Random(seed)
    times = []
    for _ in range(QUESTIONS):
        kind = draw.random()
        low, high = (0.3, 0.6) if kind < 0.6 else (0.6, 1.2) if kind < 0.9 else (1.5, 4.0)
        times.append(draw.uniform(low, high))
    return times


async def one(client: httpx.AsyncClient, url: str, delay: float) -> tuple[float | None, str, float]:
    """(when the phrase arrived or None, the phrase, when the answer's first sentence arrived), in s."""
    body = {
        "stream": True,
        "messages": [{"role": "user", "content": "How do I point the llm url of my agent at the server?"}],
        "bench": {"text": ANSWER, "interval": 0.02, "first_delay": delay},
    }
    started, phrase_at, phrase, said = time.perf_counter(), None, "", ""
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            words = (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            if phrase_at is None and not said and words.strip() in PHRASES:
                phrase_at, phrase = time.perf_counter() - started, words
                continue
            said += words
            if sentence_end(said):
                return phrase_at, phrase, time.perf_counter() - started
    raise RuntimeError("the answer had no sentence")


PHRASES = set(WAITING_PHRASES["en"])


async def measure(port: int, delays: list[float]) -> list[tuple[float | None, str, float]]:
    url = f"http://127.0.0.1:{port}/rag/chat/completions"
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as client:
        results = []
        for at in range(0, len(delays), 10):  # ten calls at a time
            results += await asyncio.gather(*(one(client, url, d) for d in delays[at : at + 10]))
        return results


def heard(phrase_at: float | None, phrase: str, answer_at: float) -> tuple[float, float]:
    """(when the user hears the answer start, when they hear anything at all), in s."""
    if phrase_at is None:
        return answer_at, answer_at
    return max(answer_at, phrase_at + len(phrase) / SPEAKING), phrase_at


def main() -> None:
    delays = first_tokens()
    rows = [
        f"Waiting phrase on /rag, measured {time.strftime('%Y-%m-%d')} (`python3 bench/waiting.py`): {QUESTIONS} "
        "questions, time to first token 60% 0.3-0.6 s, 30% 0.6-1.2 s, 10% 1.5-4 s; speech at 15 characters a second.",
        "",
        "| WAITING_PHRASE_AFTER_MS | phrase said | answer heard, mean / p90 (s) | first sound heard, p90 / max (s) |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        _, port, upstream, server = start_servers(
            f"waiting-{setting}", WAITING_PHRASE_AFTER_MS=str(setting), EMBEDDING_MODEL="none"
        )
        try:
            results = asyncio.run(measure(port, delays))
        finally:
            stop(server, upstream)
        answers, sounds = zip(*(heard(*result) for result in results))
        said = sum(phrase_at is not None for phrase_at, _, _ in results)
        label = f"{setting} (always, first)" if setting == 0 else str(setting)
        rows.append(
            f"| {label} | {said} of {len(results)} | {sum(answers) / len(answers):.2f} / {pct(list(answers), 90):.2f} | "
            f"{pct(list(sounds), 90):.2f} / {max(sounds):.2f} |"
        )
    publish("waiting.md", rows)


if __name__ == "__main__":
    main()
