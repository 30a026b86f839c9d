"""BM25 in memory: every chunk of the knowledge base scored for a question, and which chunks hold each word.

The SQLite index (index.py) stores each chunk's terms; this module turns them into an inverted index
of numpy arrays. Scoring a question touches only the postings of its words (docs/benchmarks.md has the
times), and the relevance decision can read every chunk that holds a word instead of a shortlist an
engine picked by score.

The formula is Lucene's BM25 (k1 1.2, b 0.75) with an idf of log(1 + (N - df + 0.5) / (df + 0.5)):
it stays positive when a word is in every chunk, so a one-file knowledge base still ranks. A word in
a chunk's heading path (page and section titles) counts HEADING_WEIGHT times, as BM25F weighs fields.
"""

import math
from array import array
from collections import Counter
from collections.abc import Iterable

import numpy as np

K1, B = 1.2, 0.75
HEADING_WEIGHT = 5.0  # a heading names what its section is about: its words count this much more
# A passage is about a word it says three times or more (in a heading, once is enough), about
# every word it holds when it is this short (an FAQ answer, a definition), in terms, and about a
# word the knowledge base says in no more than RARE_TERM passages (in a small FAQ, most words;
# in a manual, a word said in passing is rare there only if it is no topic of it, which
# knowledge.coverage checks apart).
CENTRAL_TIMES = 3
SHORT_PASSAGE = 30
RARE_TERM = 3


class Postings:
    """The chunks each term is in, with the term's BM25 weight there; built once per index change."""

    def __init__(self, chunks: Iterable[tuple[int, str, str]]):
        """From (rowid, terms, heading terms) rows, terms space-separated as terms.index_terms makes them."""
        ids: dict[str, int] = {}
        # Typed arrays, not lists: 100,000 chunks hold ~7 million postings, 4 bytes each here
        rowids, lengths = array("q"), array("i")
        term_of, chunk_of, in_text, in_heading = array("i"), array("i"), array("i"), array("i")  # one per posting
        for position, (rowid, terms, heading_terms) in enumerate(chunks):
            text, heading = Counter(terms.split()), Counter(heading_terms.split())
            held = list(text) + [term for term in heading if term not in text]
            term_of.extend([ids.setdefault(term, len(ids)) for term in held])
            chunk_of.extend([position] * len(held))
            in_text.extend([text.get(term, 0) for term in held])
            in_heading.extend([heading.get(term, 0) for term in held])
            rowids.append(rowid)
            lengths.append(text.total() + heading.total())
        self.ids = ids
        self.rowids = np.frombuffer(rowids, dtype=np.int64)
        self.size = len(rowids)
        terms_of = np.frombuffer(term_of, dtype=np.int32)
        order = np.argsort(terms_of, kind="stable")
        self.chunk = np.frombuffer(chunk_of, dtype=np.int32)[order]
        self.start = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms_of, minlength=len(ids)), out=self.start[1:])
        said, headed = np.frombuffer(in_text, dtype=np.int32), np.frombuffer(in_heading, dtype=np.int32)
        tf = (said + HEADING_WEIGHT * headed).astype(np.float32)[order]
        length = np.frombuffer(lengths, dtype=np.int32).astype(np.float32)
        norm = 1 - B + B * length / max(float(length.mean()), 1.0) if self.size else length
        self.weight = (tf * (K1 + 1) / (tf + K1 * norm[self.chunk])).astype(np.float32)
        titled = headed[order] > 0
        in_chunks = np.diff(self.start)
        rare = np.repeat(in_chunks, in_chunks) <= RARE_TERM  # per posting, in term order
        self._only = {
            "central": (tf >= CENTRAL_TIMES) | titled | (length <= SHORT_PASSAGE)[self.chunk] | rare,
            "heading": titled,
        }
        self.said = np.bincount(terms_of, weights=said + headed, minlength=len(ids))  # times each term is said
        self.total = max(float(self.said.sum()), 1.0)

    def __contains__(self, term: str) -> bool:
        return term in self.ids

    def count(self, term: str) -> int:
        """In how many chunks the term is."""
        at = self.ids.get(term)
        return 0 if at is None else int(self.start[at + 1] - self.start[at])

    def holding(self, term: str, only: str = "") -> np.ndarray:
        """The positions of the chunks that hold the term; only="central": the chunks about it
        (see CENTRAL_TIMES), only="heading": the chunks whose heading says it."""
        at = self.ids.get(term)
        if at is None:
            return self.chunk[:0]
        span = slice(self.start[at], self.start[at + 1])
        return self.chunk[span][self._only[only][span]] if only else self.chunk[span]

    def lift(self, term: str, zipf: float) -> float:
        """How many times more often the knowledge base says the term than everyday language does,
        in log10 (zipf: wordfreq's Zipf frequency; 0, a word it never saw, is as specific as words
        get). Negative infinity for a term the knowledge base does not hold."""
        at = self.ids.get(term)
        if at is None:
            return -math.inf
        if zipf <= 0:
            return math.inf
        return math.log10(self.said[at] / self.total) - (zipf - 9)  # Zipf is log10 per billion words

    def scores(self, terms: Iterable[str]) -> np.ndarray:
        """Every chunk's BM25 score for the terms (0 where none of them is)."""
        scores = np.zeros(self.size, dtype=np.float32)
        for term in set(terms):
            at = self.ids.get(term)
            if at is None:
                continue
            span = slice(self.start[at], self.start[at + 1])
            df = span.stop - span.start
            idf = np.log1p((self.size - df + 0.5) / (df + 0.5))
            scores[self.chunk[span]] += idf * self.weight[span]
        return scores
