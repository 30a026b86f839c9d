"""The knowledge base behind /rag: the index of a folder of documents and its search, the default
`Retriever` (rag.py holds what /rag does around any retriever).

- Documents (read by documents.py): .md, .txt, .html and .pdf, found recursively, cut along their
  own headings and paragraphs into chunks of bounded size with a little overlap; every chunk keeps
  its file and heading path, so answers can cite where they came from.
- The index is kept in a store (store.py): a SQLite file by default, or PostgreSQL shared by replicas
  (postgres.py). A restart with unchanged documents re-indexes nothing; a changed, added or removed
  file updates only its own chunks (content hashes decide). Search runs in memory.
- Search ranks by BM25 (ranking.py, in memory) over the words terms.py makes (English stemmed,
  Chinese segmented by jieba, stopwords and question words out), keeping only the passages that
  cover enough of what the question asks: the share of its informative words, each weighted by
  how rare it is in general language, that the passage contains; and not by coincidence: a passage must hold a word
  the knowledge base says far more often than everyday language does, or be about the words it
  holds. Both compare rates, not counts, so they mean the same for a one-file FAQ as for 100,000
  chunks: "tell me a joke" finds nothing anywhere and "are you open on mondays" finds its answer
  in a two-chunk FAQ.
- Words may be misheard or spelt apart: two neighbouring words also match the one word they make
  ("shut down" → shutdown, 日 至 → 日志), and a word the index does not know also matches known
  words that sound the same (jason → json, 全线 → 权限), for less credit than the word itself.
- Meaning, once the vectors are made (embeddings.py: the built-in model, or a hosted one): a passage
  answers when its similarity to the question reaches the knowledge base's threshold (calibration.py),
  or comes close to it with the words' support; similarity ranks, and BM25 lifts exact words.
"""

import asyncio
import bisect
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom_llm_server.core.redact import printable
from custom_llm_server.core.text import MAX_QUESTION_CHARS
from custom_llm_server.knowledge import calibration
from custom_llm_server.knowledge.documents import SUFFIXES, Reader, chunk_markdown, read_inside
from custom_llm_server.knowledge.embeddings import Embedder, EmbeddingError, RecentQuestions
from custom_llm_server.knowledge.language import LANGUAGE_WEIGHT, chinese_passages, chinese_question
from custom_llm_server.knowledge.rag import Passage
from custom_llm_server.knowledge.ranking import Postings
from custom_llm_server.knowledge.spoken import Meant, as_meant, unquoted
from custom_llm_server.knowledge.store import Chunk, Known, SQLiteStore, Store, default_path
from custom_llm_server.knowledge.terms import (
    Word,
    asks_something,
    everyday,
    heard_apart,
    index_terms,
    question_words,
    said_as,
    sound,
    tokens,
    warm_up,
)

log = logging.getLogger("custom_llm.knowledge")

HEARD_CREDIT = 0.8  # a word matched only as what it may have been misheard for counts this much
HEARD_MAX = 3  # known words one unknown word may stand for
PREFIX_MIN = 4  # an unknown word this long may be the start of a known one, cut off
# A word heard in two is a long one ("in vironment", "funk shun"): two pieces that sound like fewer
# consonants ("tall is": TLS, as tls) would stand for any short word.
HEARD_APART_SOUNDS = 4
# A passage must also hold at least this much of the question's information (terms.py's weights:
# a word less common than "open" or "return", or two everyday ones), so "name" or "love" alone is no topic.
MIN_EVIDENCE = 2.5
# A word the knowledge base says at least 10^0.7 = 5 times as often as everyday language does (by
# wordfreq) is what it is about: "dictionary" in Python's documentation, "partition" in a Linux
# manual, "delivery" in a shop's FAQ; "colour", "day" or "life" in none of them.
TOPICAL_LIFT = 0.7
SAME_TEXT_SLACK = 4  # passages read per one returned, so that copies of the same text can be left out
EMBED_BATCH = 16  # passages embedded at a time, shared among the threads; each batch is written before the next
# The ranking when vectors are there: cosine similarity, plus this much for the passage BM25 scores
# best (and its share of that for the others): meaning leads, and exact words (identifiers, numbers,
# names) lift a passage among those about as close in meaning. Nothing in it depends on the number of
# chunks, so a two-chunk FAQ ranks as a manual does.
BM25_WEIGHT = 0.02
# A passage whose similarity is this much below the threshold still answers when the lexical decision
# says it holds enough of the question's words: the words support meaning; they never veto it.
SUPPORT_MARGIN = 0.05
# A passage that stands out, closer to the question by this much than any other passage, answers down
# to twice this much below the threshold: in a short FAQ an answer in everyday words stands out like
# that (by 0.03 to 0.09 on the tests' shop FAQ) while its similarity stays under the threshold.
STANDOUT = 0.025
# Standing out means something only among enough passages: ahead of one or two others is chance. With
# fewer others than this, the allowance shrinks in proportion, to none for a knowledge base of one
# passage (bench: with the full allowance, FAQs of 1 to 3 of bench/tiny's answers gave a passage to
# 11-14% of the unanswerable questions and 9-14% of the small talk; now to none and under 1%).
STANDOUT_AMONG = 7
# Among this many other passages or more, what stands out below the threshold is a short passage near
# anything conversational (the help centre's "Tip of the Day › OK" for "goodbye, have a nice day"),
# not an answer (bench: none of the 240 answerable questions), so the rule stops.
STANDOUT_UNTIL = 1000


@dataclass
class IndexReport:
    files: int = 0  # documents in the folder
    indexed: int = 0  # of them, (re)indexed now
    removed: int = 0
    chunks: int = 0  # chunks written now
    skipped: list[str] = field(default_factory=list)  # "path: why"
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def text_hash(heading: str, text: str) -> str:
    return hashlib.sha256(f"{heading}\n{text}".encode()).hexdigest()


def _point_known(
    words: list[Word], heard: dict[str, list[str]], joined: dict[str, str], postings: Postings, meant: Meant | None
) -> bool:
    """Whether the knowledge base says the question's most informative word, or what a repair takes it
    for. A question whose point it never says shares only the domain's words with it ("how do I turn
    off the windows firewall?" in an office suite's help: turn off, windows), so its words do not
    support a passage below the threshold; meaning alone decides (docs/knowledge.md has what it kept out)."""
    point = max(words, key=lambda word: word.weight)
    repaired = meant is not None and any(term in postings for term in meant.terms)
    return point.term in postings or point.term in joined or bool(heard.get(point.term)) or repaired


def coverage(
    words: list[Word], heard: dict[str, list[str]], joined: dict[str, str], postings: Postings
) -> tuple[np.ndarray, np.ndarray]:
    """How much of the question's information each chunk holds: (share, amount), one value per chunk.

    A word matched only as what it may have been misheard for counts for less, and never alone.
    A chunk that matches by coincidence holds nothing:
    - holding one of the question's words as said, it must be about it (ranking.Postings: said
      three times, in its heading, in a short passage, or rare in the knowledge base): one word
      said in passing in a long section is no answer;
    - it must hold a word the knowledge base is about (TOPICAL_LIFT), or else everyday words
      together: two in its heading, or three that say twice MIN_EVIDENCE. "What's your favourite
      colour?" finds a tutorial's example that prints a favourite colour, "it's my birthday!" a
      manual's one mention of a birthday, but neither colour nor birthday is what they are
      about; and a few common words meet by chance in any long passage (恭喜你找到新工作);
    - a Chinese question asks in its Chinese words; the names it spells in Latin letters (Python,
      Excel, Windows) only say what about. A passage holding none of its Chinese words must have
      one of those names in its heading: "zipfile怎么解压" finds zipfile's page in an English
      manual, but "怎么用Python读取Excel表格" no English page that says Python and "excellent"."""
    said = np.zeros(postings.size)  # float64: a passage holding every word has a share of exactly 1
    guessed = np.zeros(postings.size)
    held, central, in_heading = (np.zeros(postings.size, dtype=np.int32) for _ in range(3))
    topical = np.zeros(postings.size, dtype=bool)
    chinese = any(word.chinese for word in words)
    in_kind = np.full(postings.size, not chinese)  # a Chinese question: holds a Chinese word, or a name in its heading
    for word in words:
        # "de scale" heard in two is as said
        matched = [word.term] + ([joined[word.term]] if word.term in joined else [])
        holding = _held(postings, matched)
        said[holding] += word.weight
        held[holding] += 1
        central[_held(postings, matched, "central")] += 1
        headed = _held(postings, matched, "heading")
        in_heading[headed] += 1
        if chinese:
            in_kind[holding if word.chinese else headed] = True
        guesses = heard.get(word.term, [])
        if guesses:  # a guess adds to what a passage holds, but is not a second word of its own
            guess = _mask(postings, guesses)
            if chinese and word.chinese:
                in_kind[guess] = True
            guess[holding] = False
            guessed[guess] += word.weight * HEARD_CREDIT
        for term in matched + guesses:
            if postings.lift(term, everyday(term)) >= TOPICAL_LIFT:
                topical[postings.holding(term)] = True
    everyday_together = ((held >= 3) & (said >= 2 * MIN_EVIDENCE)) | (in_heading >= 2)
    not_by_chance = ((held > 1) | (central > 0)) & (topical | everyday_together) & in_kind
    amount = np.where((said > 0) & not_by_chance, said + guessed, 0)
    return amount / sum(word.weight for word in words), amount


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


def _held(postings: Postings, terms: list[str], only: str = "") -> np.ndarray:
    """The positions of the chunks holding any of the terms, each once."""
    if len(terms) == 1:
        return postings.holding(terms[0], only)
    return np.flatnonzero(_mask(postings, terms, only))


def _mask(postings: Postings, terms: list[str], only: str = "") -> np.ndarray:
    """Which chunks hold any of the terms, as a mask: linear, where a union of positions would sort."""
    mask = np.zeros(postings.size, dtype=bool)
    for term in terms:
        mask[postings.holding(term, only)] = True
    return mask


class KnowledgeBase:
    """The index of one folder, kept in a store; index() and search() are safe from any thread, and a
    search waits for the index only while one file's rows are written. Search sees what index()
    wrote once it has finished (written by another process, moments after the next search)."""

    def __init__(
        self,
        folder: str | Path,
        store: Store | str | Path | None = None,
        min_coverage: float = 0.5,
        max_file_bytes: int = 20_000_000,
        file_seconds: float = 10.0,
    ):
        """`store`: a Store, or the path of a SQLite file (by default one under ./.custom-llm/index/)."""
        self.folder = Path(folder)
        self.max_file_bytes = max_file_bytes
        self.reader = Reader(max_file_bytes, file_seconds)  # HTML and PDF within file_seconds each
        if store is None or isinstance(store, str | Path):
            store = SQLiteStore(store or default_path(Path(".custom-llm"), self.folder))
        self.store: Store = store
        self.min_coverage = min_coverage
        self.min_similarity: float | None = None  # set with use_model(), or calibrated with the vectors
        self._fixed_similarity: float | None = None  # RAG_MIN_SIMILARITY, when set
        self.probes: dict[str, np.ndarray] | None = None  # calibration.embedded(): the threshold is calibrated
        self._running = threading.Lock()  # held by index() from start to end
        self._loading = threading.RLock()  # held while the terms and vectors in memory are replaced
        self.store.claim(str(self.folder.resolve()))
        self.store.on_change = self._reload_soon
        self.loaded = False
        self._stop = threading.Event()
        self._postings: Postings | None = None  # the index's terms, in memory for search
        self._reloading = threading.Event()
        self._sorted: list[str] = []  # the index's terms in order, for cut-off words
        self._sounds: dict[str, list[str]] = {}  # how a term sounds -> the index's terms that sound so
        self.embedded: str | None = None  # the model whose vectors search uses, once they are loaded
        self._vectors: np.ndarray | None = None  # unit vectors, a row per chunk as the postings hold them
        self._vectorless: np.ndarray | None = None  # the chunks with no vector yet (True)

    @property
    def chunks(self) -> int:
        return self.store.count()

    def index(self, progress: Callable[[str, int], None] | None = None) -> IndexReport:
        """Bring the index in step with the folder; only changed, added or removed files are touched.

        A file that cannot be read (unreadable, empty, binary, huge, renamed or deleted meanwhile,
        a name that is not UTF-8) is skipped with a warning, never fatal. stop() ends a run between
        two files, so a shutdown never waits for indexing."""
        with self._running:
            if self.store.shared and not self.documents():
                # A replica without the documents serves the store's knowledge base as it is: an
                # empty or missing folder here must not empty it for every replica.
                log.info("knowledge: no documents in %s; serving the store's index as it is", self.folder)
                if not self.chunks:  # the folder's path names its base: another path is another base
                    log.warning(
                        "knowledge store %s holds nothing for %s: run `custom-llm index` with this KNOWLEDGE_DIR, "
                        "or give it the path the index was made with",
                        self.store.where,
                        self.folder.resolve(),
                    )
                return self.load()
            return self._index(progress)

    def load(self) -> IndexReport:
        """Search what the store holds, without indexing (a replica that another one indexes for)."""
        self._load_postings()
        self.loaded = True
        return IndexReport()

    def _index(self, progress: Callable[[str, int], None] | None) -> IndexReport:
        started, report = time.perf_counter(), IndexReport()
        known = self.store.files()
        present = set()
        for path in self.documents():
            if self._stop.is_set():
                return report
            report.files += 1
            try:
                source = path.relative_to(self.folder).as_posix()
                source.encode("utf-8")  # a name that is not UTF-8 cannot be stored or cited
                present.add(source)
                chunks = self._index_file(path, source, known.get(source))
            except Exception as error:  # one bad file never stops the rest
                log.warning("skipping knowledge file %r: %s", str(path.relative_to(self.folder)), error)
                report.skipped.append(f"{path.relative_to(self.folder)}: {error}")
                continue
            if chunks is not None:
                report.indexed, report.chunks = report.indexed + 1, report.chunks + chunks
                if progress:
                    progress(source, chunks)
        report.removed = self._forget([source for source in known if source not in present])
        report.seconds = time.perf_counter() - started
        if report.indexed or report.removed or self._postings is None:
            self._load_postings()
        self.loaded = True
        log.info(
            "knowledge: %d files, %d (re)indexed with %d chunks, %d removed, %d skipped, %.2f s",
            *(report.files, report.indexed, report.chunks, report.removed, len(report.skipped), report.seconds),
        )
        return report

    def stop(self) -> None:
        """Make a running index() return after the file it is on."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self, seconds: float = 30.0) -> None:
        """Stop indexing, wait for the file being indexed (each is bounded in time), and close the
        index file, so a reload that replaces this knowledge base leaves no connection open."""
        self.stop()
        if not self._running.acquire(timeout=seconds):
            log.warning("knowledge index %s still busy after %g s; left open", self.store.where, seconds)
            return
        try:
            self.reader.close()
            self.store.close()
        finally:
            self._running.release()

    def documents(self) -> list[Path]:
        """The folder's documents; a link that leads out of the folder is not one of them."""
        if not self.folder.is_dir():
            log.warning("knowledge folder %s does not exist; /rag answers without passages", self.folder)
            return []
        root = self.folder.resolve()
        found = []
        for path in sorted(self.folder.rglob("*")):
            try:
                if path.suffix.lower() in SUFFIXES and path.is_file() and path.resolve().is_relative_to(root):
                    found.append(path)
            except OSError:  # vanished, or a link loop
                continue
        return found

    def _index_file(self, path: Path, source: str, known: Known | None) -> int | None:
        """(Re)index one file; how many chunks it has, or None when it had not changed."""
        stat = path.stat()
        if known is not None and (known.size, known.mtime) == (stat.st_size, stat.st_mtime):
            return None  # unchanged since the last run: not even read
        raw, stat = read_inside(path, self.folder.resolve(), self.max_file_bytes)
        digest = hashlib.sha256(raw).hexdigest()
        if known is not None and known.hash == digest:  # touched, not changed
            self.store.touch(source, stat.st_size, stat.st_mtime)
            return None
        chunks = chunk_markdown(self.reader.text(path.suffix, raw))
        if not chunks:
            raise ValueError("no text")
        rows = [
            Chunk(index_terms(text), index_terms(heading), text, source, heading, text_hash(heading, text))
            for heading, text in chunks
        ]
        self.store.replace(source, Known(digest, stat.st_size, stat.st_mtime), rows)
        return len(rows)

    def _forget(self, sources: list[str]) -> int:
        if sources:
            self.store.forget(sources)
        return len(sources)

    def search(
        self,
        question: str,
        limit: int = 3,
        vector: np.ndarray | None = None,
        meant: Meant | None = None,
        meant_vector: np.ndarray | None = None,
    ) -> list[Passage]:
        """The passages that answer the question, best first; none when nothing does.

        Without a question vector (lexical mode, or while the vectors are being made), the lexical
        decision picks and BM25 ranks. With one, meaning leads: a passage answers when its cosine
        similarity reaches the threshold (calibration.py), or comes close to it (SUPPORT_MARGIN) and holds enough
        of the question's words; they are ranked by similarity and BM25 together (BM25_WEIGHT).
        meant and meant_vector: the question as meant (meant()) and its vector; a passage that holds
        what a repair brought in is as close as the nearer of the two readings, and the repair
        supports it as its words would."""
        said = tokens(question)
        words = question_words(said)
        if limit <= 0 or not words:  # "hello", "thanks", 你好: nothing to look up, by words or by meaning
            return []
        postings = self._current_postings()
        heard, joined = self._heard(said, words, postings)
        share, amount = coverage(words, heard, joined, postings)
        lexical = (share >= self.min_coverage) & (amount >= MIN_EVIDENCE)
        terms = [w.term for w in words] + [t for found in heard.values() for t in found] + list(joined.values())
        # spelled letters ("h t t p") are a word the question's words lack: the words as meant have a say
        if meant is not None and meant.spelled and (meant_words := question_words(tokens(meant.text))):
            share_meant, amount_meant = coverage(meant_words, {}, {}, postings)
            lexical |= (share_meant >= self.min_coverage) & (amount_meant >= MIN_EVIDENCE)
            share = np.maximum(share, share_meant)
            terms += list(meant.terms)
        scores = postings.scores(terms)
        similarity = self._similarity(vector, postings.size)
        repaired = self._similarity(meant_vector, postings.size) if meant is not None else None
        if similarity is not None and repaired is not None and meant is not None:
            holding = _mask(postings, list(meant.terms))
            similarity = np.where(holding, np.maximum(similarity, repaired), similarity)
        if similarity is None:
            answers, rank = lexical, scores
        else:
            answers = self._answers(similarity, lexical, _point_known(words, heard, joined, postings, meant))
            rank = similarity + BM25_WEIGHT * scores / max(float(scores.max()), 1e-9)
            rank += LANGUAGE_WEIGHT * (chinese_passages(postings) == chinese_question(said))
        found = np.flatnonzero(answers)
        # A few more than asked: the same text installed twice (a manual page and its alias) is shown once
        best = found[np.argsort(-rank[found], kind="stable")[: limit * SAME_TEXT_SLACK]]
        return self._passages(postings, best, scores, share, similarity)[:limit]

    def _similarity(self, vector: np.ndarray | None, size: int) -> np.ndarray | None:
        """Every chunk's cosine similarity to the question, when there are vectors for them."""
        vectors = self._vectors
        if vector is None or vectors is None or len(vectors) != size:
            return None
        if vector.shape != (vectors.shape[1],):  # a hosted model that changed: its words still answer
            log.warning(
                "the question's vector has %s numbers, the passages' %d: searching by words",
                vector.shape,
                vectors.shape[1],
            )
            return None
        return vectors @ np.asarray(vector, dtype=np.float32)

    def _answers(self, similarity: np.ndarray, lexical: np.ndarray, point_known: bool) -> np.ndarray:
        """Which chunks answer, by meaning with the words' support (see search); the words support a
        passage below the threshold only when the knowledge base says the question's point."""
        threshold = self.min_similarity
        if threshold is None:  # a hosted model nobody calibrated: its vectors only rank
            return lexical
        assert self._vectorless is not None
        close = similarity >= threshold - SUPPORT_MARGIN
        answers = (similarity >= threshold) | (close & lexical & point_known) | (self._vectorless & lexical)
        best = float(similarity.max())
        others = similarity[similarity < best - 1e-6]  # copies of the best text share its vector
        among = others.size if others.size < STANDOUT_UNTIL else 0
        allowance = 2 * STANDOUT * min(among, STANDOUT_AMONG) / STANDOUT_AMONG
        if allowance and best >= threshold - allowance and best - float(others.max()) >= STANDOUT:
            answers |= similarity >= best - 1e-6
        return answers

    def _passages(
        self, postings: Postings, best: np.ndarray, scores: np.ndarray, share: np.ndarray, similarity: np.ndarray | None
    ) -> list[Passage]:
        """The chunks at these positions as passages, each text once (the first, best, copy)."""
        rowids = [int(postings.rowids[at]) for at in best]
        rows = self.store.passages(rowids) if rowids else {}
        passages: dict[str, Passage] = {}  # by text, the best first
        for rowid, at in zip(rowids, best):
            if rowid in rows and rows[rowid][0] not in passages:  # not re-indexed since the postings were loaded
                close = None if similarity is None else float(similarity[at])
                passages[rows[rowid][0]] = Passage(*rows[rowid], float(scores[at]), rowid, float(share[at]), close)
        return list(passages.values())

    def meant(self, question: str) -> Meant | None:
        """The question as speech recognition's errors say it was meant (spoken.py), when it differs."""
        said = tokens(unquoted(question))
        words = question_words(said)
        if not words:
            return None
        postings = self._current_postings()
        heard, joined = self._heard(said, words, postings)
        return as_meant(said, heard, joined, postings, self._sounds)

    # --- speech-recognition noise ------------------------------------------------------------------

    def _heard(
        self, said: list[tuple[str, bool]], words: list[Word], known: Postings
    ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """What the question's words may have been meant as: two neighbours as the one word the
        index knows they make ("shut down", "time out", 日 至), and for each word the index does
        not know, known words that sound the same or that it is the cut-off start of. Returns
        (term -> what it may have been misheard for, term -> the known word it and its neighbour make)."""
        heard: dict[str, list[str]] = {}
        joined: dict[str, str] = {}
        asked = {word.term for word in words}  # "sing me a song": sing is not the song said beside it
        for together, spoken, stands_for in heard_apart(said):
            for term in stands_for:
                unknown = term not in known or len(term) == 1
                # "shut down" is also the index's "shutdown"; a known word and one letter ("I use") is not a word
                if together in known and (unknown or len(together) - len(term) >= 2):
                    joined[term] = together
                elif unknown and len(sounds := sound(spoken)) >= HEARD_APART_SOUNDS:
                    heard.setdefault(term, []).extend(self._sounds.get(sounds, [])[:HEARD_MAX])
        for word in words:
            if word.term not in known and len(word.term) >= 2:
                sounds_like = [t for t in self._sounds.get(sound(word.said), []) if t not in asked]
                heard.setdefault(word.term, []).extend(sounds_like[:HEARD_MAX] + self._completions(word))
        heard = {term: [t for t in dict.fromkeys(found) if t not in asked] for term, found in heard.items()}
        return {term: found for term, found in heard.items() if found}, joined

    def _completions(self, word: Word) -> list[str]:
        """Known English terms a cut-off word begins ("deliv" → delivery), found by bisection."""
        if word.chinese or len(word.term) < PREFIX_MIN:
            return []
        found: list[str] = []
        for term in self._sorted[bisect.bisect_left(self._sorted, word.term) :]:
            if not term.startswith(word.term) or len(found) == HEARD_MAX:
                break
            found.append(term)
        return found

    def _current_postings(self) -> Postings:
        """The terms in memory. When another process (`custom-llm index` run beside the server,
        another worker) has changed the index file since they were loaded, they are reloaded in
        the background (seconds at 100,000 chunks) and searches use the ones loaded until then."""
        if self._postings is None:
            return self._load_postings()
        if self.store.changed():
            self._reload_soon()
        return self._postings

    def _reload_soon(self) -> None:
        """Reload in the background, unless a reload is running (it reads the change too) or nothing
        was loaded yet. A store that hears of changes (postgres.py) calls this as soon as it does."""
        if self._postings is not None and not self._reloading.is_set():
            self._reloading.set()
            threading.Thread(target=self._reload, name="knowledge-reload", daemon=True).start()

    def _reload(self) -> None:
        try:
            self._load_postings()
        except Exception as error:  # a failed reload keeps the terms loaded before; the next change tries again
            log.warning("reloading the knowledge index failed (%s: %s)", type(error).__name__, error)
        finally:
            self._reloading.clear()

    def _load_postings(self) -> Postings:
        """The index's terms in memory, and which of them sound alike (rebuilt when the index changes).
        One load at a time: a reload and an index run finishing together swap in one whole state."""
        warm_up()
        with self._loading:
            postings = Postings(self.store.load())
            sounds: dict[str, list[str]] = {}  # the most used first: the likelier meant
            for term in sorted(postings.ids, key=postings.count, reverse=True):
                if len(term) >= 2 and not term.isdigit():
                    sounds.setdefault(sound(said_as(term)), []).append(term)
            if self.embedded:  # the vectors follow the chunks
                self.load_vectors(postings)
            self._postings, self._sounds, self._sorted = postings, sounds, sorted(postings.ids)
            return postings

    # --- vectors (semantic search) --------------------------------------------------------------

    def use_model(self, identity: str, min_similarity: float | None) -> None:
        """Search by this model's vectors from now on; the vectors of another model are deleted. The
        threshold is min_similarity when given, else calibrated once there are vectors and probes."""
        self.min_similarity = self._fixed_similarity = min_similarity
        self.store.use_model(identity)
        self.embedded = identity

    @property
    def searchable_by_meaning(self) -> bool:
        return self._vectors is not None

    def unembedded(self) -> list[tuple[str, str]]:
        """(hash, heading and text) of each text that has no vector yet (a text in two files is embedded once)."""
        return self.store.unembedded()

    def store_vectors(self, hashes: list[str], vectors: np.ndarray) -> None:
        self.store.store_vectors(hashes, vectors)

    def load_vectors(self, postings: Postings | None = None) -> int:
        """The stored vectors in memory, a row per chunk in the postings' order; how many chunks have one."""
        with self._loading:
            return self._load_vectors(postings or self._current_postings())

    def _load_vectors(self, postings: Postings) -> int:
        rows = self.store.vectors()
        if not rows:
            self._vectors = self._vectorless = None
            return 0
        found = np.stack([np.frombuffer(vector, dtype=np.float32) for _, vector in rows])
        at = np.searchsorted(postings.rowids, [rowid for rowid, _ in rows])
        inside = (at < postings.size) & (postings.rowids[np.minimum(at, postings.size - 1)] == [r for r, _ in rows])
        vectors = np.zeros((postings.size, found.shape[1]), dtype=np.float32)
        vectors[at[inside]] = found[inside]
        vectorless = np.ones(postings.size, dtype=bool)
        vectorless[at[inside]] = False
        if self._fixed_similarity is None and self.probes is not None:
            self.min_similarity = calibration.threshold(vectors, self.probes)
            log.info("knowledge: a passage answers on meaning alone from similarity %.3f", self.min_similarity)
        self._vectors, self._vectorless = vectors, vectorless
        return int(inside.sum())


# ---------------------------------------------------------------------------------------------
# The default retriever: the index, plus embeddings
# ---------------------------------------------------------------------------------------------


class Knowledge:
    """The default retriever: the SQLite index of a folder, searched by words and, once the vectors are
    made (in the background, after the words are indexed), by meaning too."""

    def __init__(self, base: KnowledgeBase, embedder: Embedder | None = None):
        self.base, self.embedder = base, embedder
        self.queries = RecentQuestions(embedder) if embedder is not None else None
        self.embedding: asyncio.Task[int] | None = None  # the vectors being made
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started

    @property
    def degraded(self) -> str | None:
        """Why the store is out of reach while search goes on from memory (a shared store only)."""
        return self.base.store.degraded

    async def start(self) -> None:
        """Index the folder (only what changed): searchable by words from then on. Then make the vectors
        of new texts in the background; search uses meaning once they are all there. With a store that
        replicas share, the one that gets to write does this, and the others load what it writes."""
        store = self.base.store
        writes = await asyncio.to_thread(store.writer, False)
        try:
            await asyncio.to_thread(self.base.index if writes else self.base.load)
            if self.base.stopped:  # closed while it indexed
                return
        except BaseException:
            await asyncio.to_thread(store.release)
            raise
        if self.use_model():
            self.embedding = asyncio.ensure_future(self.embed(writes))
        elif writes:
            await asyncio.to_thread(store.release)
        self.started = True

    def use_model(self) -> bool:
        """Point the index at the embedding model's vectors, when there is one and something to embed
        (or, with a store replicas share, might be: a replica that starts first follows the vectors
        another one writes)."""
        if self.embedder is None or not (self.base.store.shared or self.base.chunks):
            return False
        self.base.use_model(self.embedder.identity, self.embedder.min_similarity)
        return True

    async def embed(self, writes: bool = True) -> int:
        """Embed every text that has no vector, a batch at a time (the writer only); then search by
        meaning. How many were new."""
        try:
            return await self._embed(writes)
        finally:
            if writes:
                await asyncio.to_thread(self.base.store.release)

    async def _embed(self, writes: bool) -> int:
        assert self.embedder is not None
        started = time.perf_counter()
        missing = await asyncio.to_thread(self.base.unembedded) if writes else []
        if missing:
            log.info("knowledge: embedding %d passages in the background; until then, search by words", len(missing))
        try:
            for at in range(0, len(missing), EMBED_BATCH):
                batch = missing[at : at + EMBED_BATCH]
                vectors = await self.embedder.passages([text for _, text in batch])
                await asyncio.to_thread(self.base.store_vectors, [hash for hash, _ in batch], vectors)
            if self.embedder.calibrated and self.embedder.min_similarity is None and self.base.probes is None:
                self.base.probes = await calibration.embedded(self.embedder)
        except EmbeddingError as error:
            log.warning("embedding the knowledge base failed (%s); searching by words", printable(error, 200))
            return 0
        loaded = await asyncio.to_thread(self.base.load_vectors)
        if missing:
            await asyncio.to_thread(self.base.store.announce)  # the other replicas load them too
        log.info(
            "knowledge: %d passages searchable by meaning (%d embedded now in %.1f s)",
            *(loaded, len(missing), time.perf_counter() - started),
        )
        return len(missing)

    async def search(self, question: str, limit: int) -> list[Passage]:
        """The question as said and as meant (spoken.py), both embedded in one call unless embedded lately."""
        question = question[:MAX_QUESTION_CHARS]  # a tool's query is the model's: any size
        vectors: list[np.ndarray | None] = [None, None]  # of the question as said, and as meant
        meant = await asyncio.to_thread(self.base.meant, question)
        if self.queries is not None and self.base.searchable_by_meaning and asks_something(question):
            try:
                vectors[: 1 + bool(meant)] = await self.queries.vectors([question] + ([meant.text] if meant else []))
            except EmbeddingError as error:  # the embedding model failing costs this question its meaning only
                log.warning("question embedding failed (%s); searching by words", printable(error, 200))
        return await asyncio.to_thread(self.base.search, question, limit, vectors[0], meant, vectors[1])

    async def aclose(self) -> None:
        self.base.stop()
        if self.embedding is not None:
            self.embedding.cancel()
            await asyncio.gather(self.embedding, return_exceptions=True)
        if self.embedder is not None:
            await self.embedder.aclose()
        await asyncio.to_thread(self.base.close)


# ---------------------------------------------------------------------------------------------
# From a terminal: `custom-llm index` and `custom-llm search "question"`
# ---------------------------------------------------------------------------------------------


async def index_command(knowledge: Knowledge) -> int:
    """Index the folder, printing each file as it goes and a summary."""
    base = knowledge.base
    if not await asyncio.to_thread(base.store.writer, False):
        print(f"another replica is indexing {base.store.where}; waiting for it")
        await asyncio.to_thread(base.store.writer, True)
    report = await asyncio.to_thread(base.index, lambda source, chunks: print(f"  {source}: {chunks} chunks"))
    print(
        f"{report.files} files ({report.indexed} indexed, {report.removed} removed, {len(report.skipped)} skipped), "
        f"{report.chunks} chunks written, {base.chunks} in the index, {report.seconds:.2f} s"
    )
    for skipped in report.skipped:
        print(f"  skipped {skipped}")
    if knowledge.use_model():
        print(f"{await knowledge.embed()} passages embedded ({base.embedded})")
    else:
        await asyncio.to_thread(base.store.release)
    await knowledge.aclose()
    return 0


async def search_command(knowledge: Knowledge, question: str, limit: int) -> int:
    """Print what a question retrieves, with scores and citations (by meaning too, once the vectors are made)."""
    await knowledge.start()
    if knowledge.embedding is not None:
        await knowledge.embedding
    for passage in await knowledge.search(question, limit):
        close = "" if passage.similarity is None else f"  similarity {passage.similarity:.3f}"
        print(f"{passage.score:7.3f}  {passage.citation()}{close}\n         {passage.text[:200]!r}")
    await knowledge.aclose()
    return 0
