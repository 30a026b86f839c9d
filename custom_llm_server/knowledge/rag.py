"""/rag around any retriever: the interface a knowledge source offers, the query
(with a follow-up's context), the deadline, and the passages handed to the model as data.

Light on purpose: a server whose knowledge folder holds no document imports neither the index
(knowledge.py) nor its dictionaries and model, and answers /rag without passages.
"""

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import orjson
from pydantic import Field

from custom_llm_server.core import metrics
from custom_llm_server.core.context import Context
from custom_llm_server.core.text import MAX_QUESTION_CHARS, is_cjk, message_text
from custom_llm_server.core.wording import GROUNDING_PROMPT
from custom_llm_server.knowledge.documents import SUFFIXES

log = logging.getLogger("custom_llm.knowledge")


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # file path relative to the knowledge folder
    heading: str  # "Title › Section", where the passage sits in its document
    score: float  # BM25 for the question's words, higher is better (meaning ranks by similarity first)
    rowid: int = 0
    coverage: float = 1.0  # the share of the question's information it holds (0 to 1)
    similarity: float | None = None  # cosine similarity to the question, when searched by meaning

    def citation(self) -> str:
        return f"{self.source} › {self.heading}" if self.heading else self.source

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "heading": self.heading,
            "score": round(self.score, 4),
            "coverage": round(self.coverage, 3),
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "text": self.text,
        }


class Retriever(Protocol):
    """What /rag and the search_knowledge tool need; pass your own to `create_app(retriever=...)`."""

    @property
    def ready(self) -> bool:
        """Whether every document is searchable (GET /ready waits for it)."""
        ...

    async def start(self) -> None:
        """Called once at start-up, beside the first requests (index what changed, load models...)."""
        ...

    async def search(self, question: str, limit: int) -> list[Passage]:
        """The passages that answer the question, best first; none when nothing does."""
        ...

    async def aclose(self) -> None:
        """Called at shutdown."""
        ...


class NoKnowledge:
    """The retriever of a knowledge folder with no document in it: every search finds nothing."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        why = "holds no documents" if self.folder.is_dir() else "does not exist"
        log.warning("knowledge folder %s %s; /rag answers without passages (add some, restart)", self.folder, why)

    async def search(self, question: str, limit: int) -> list[Passage]:
        return []

    async def aclose(self) -> None:
        pass


def has_documents(folder: Path) -> bool:
    """Whether the folder holds a file the knowledge base would read."""
    try:
        return any(path.suffix.lower() in SUFFIXES for path in folder.rglob("*"))
    except OSError:
        return False


_FOLLOW_UP = re.compile(
    r"^(and|but|so|or|also|then|what about|how about)\b|\b(it|its|that|this|they|them|those|"
    r"these|there|one)\b|^(那|还有|那么|它|这个|那个|另外)",
    re.I,
)


def search_query(messages: list[dict[str, Any]]) -> str:
    """The latest question, plus the one before when it is a follow-up ("and how much is it?"). Only
    the last two user messages are read, each to MAX_QUESTION_CHARS: cap before you scan."""
    asked = [m for m in messages if m.get("role") == "user"][-2:]
    questions = [message_text(m, MAX_QUESTION_CHARS) for m in asked]
    latest = questions[-1] if questions else ""
    short = len(latest.split()) <= 3 if not is_cjk(latest) else len(latest) <= 8
    if len(questions) > 1 and (short or _FOLLOW_UP.search(latest.strip())):
        return f"{questions[-2]} {latest}"
    return latest


async def retrieve(
    retriever: Retriever, messages: list[dict[str, Any]], limit: int, deadline_ms: int, context: Context
) -> list[Passage]:
    """The passages for the conversation's question; past the deadline, none (the answer goes ahead)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_ms / 1000):  # not wait_for: it can swallow a barge-in on 3.11
            return await retriever.search(search_query(messages), limit)
    except TimeoutError:
        log.warning("retrieval passed its %d ms deadline; answering without passages", deadline_ms)
        return []
    finally:
        metrics.RETRIEVAL.observe(time.perf_counter() - started)
        context.retrieval_ms = (time.perf_counter() - started) * 1000


def with_passages(
    messages: list[dict[str, Any]], passages: list[Passage], prompt: str = GROUNDING_PROMPT
) -> list[dict[str, Any]]:
    """The messages with the passages as quoted data: the grounding prompt after the caller's own
    system messages, and the passages as the result of a search_knowledge call the server made for
    the latest question (the lowest trust a model gives a message: data, not orders)."""
    if not passages:
        return messages
    call_id = f"call_knowledge_{uuid.uuid4().hex[:16]}"
    found = [{"source": p.citation(), "text": p.text} for p in passages]
    search = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {
                    "name": "search_knowledge",
                    "arguments": orjson.dumps({"query": search_query(messages)[:500]}).decode(),
                },
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": call_id, "content": orjson.dumps(found).decode()}
    lead = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), len(messages))
    grounding = {"role": "system", "content": prompt}
    return [*messages[:lead], grounding, *messages[lead:], search, result]


def search_knowledge_tool(retriever: Retriever) -> Callable[[str], Coroutine[Any, Any, list[dict[str, str]]]]:
    """The search_knowledge tool: the model looks something up in the knowledge base itself."""

    async def search_knowledge(
        query: Annotated[str, Field(description="What to look up, in the user's words")],
    ) -> list[dict[str, str]]:
        """Search this service's knowledge base; use it for questions about the product or its documents."""
        return [{"source": p.citation(), "text": p.text} for p in await retriever.search(query, 3)]

    return search_knowledge
