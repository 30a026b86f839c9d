"""BM25 in memory: every chunk of the knowledge base scored for a question, and which chunks hold each word.

The SQLite index (knowledge.py) stores each chunk's terms; this module turns them into an inverted
index of numpy arrays. Scoring a question touches only the postings of its words, so it takes a
fraction of a millisecond at 10,000 chunks, and the relevance decision can read every chunk that
holds a word instead of a shortlist an engine picked by score.

The formula is Lucene's BM25 (k1 1.2, b 0.75) with an idf of log(1 + (N - df + 0.5) / (df + 0.5)):
it stays positive when a word is in every chunk, so a one-file knowledge base still ranks. A word in
a chunk's heading path (page and section titles) counts HEADING_WEIGHT times, as BM25F weighs fields.
"""

from array import array
from collections import Counter
from collections.abc import Iterable

import numpy as np

K1, B = 1.2, 0.75
HEADING_WEIGHT = 5.0  # a heading names what its section is about: its words count this much more
# A passage is about a word it says twice or more (in a heading, once is enough), about every
# word it holds when it is this short (an FAQ answer, a definition), in terms, and about a word
# the knowledge base says in no more than this many passages (in a one-file FAQ, every word).
SHORT_PASSAGE = 30
RARE_TERM = 3


class Postings:
    """The chunks each term is in, with the term's BM25 weight there; built once per index change."""

    def __init__(self, chunks: Iterable[tuple[int, str, str]]):
        """From (rowid, terms, heading terms) rows, terms space-separated as terms.index_terms makes them."""
        ids: dict[str, int] = {}
        # Typed arrays, not lists: 100,000 chunks hold ~7 million postings, 4 bytes each here
        rowids, lengths, term_of, chunk_of, frequency = array("q"), array("i"), array("i"), array("i"), array("f")
        for position, (rowid, terms, heading_terms) in enumerate(chunks):
            text, heading = terms.split(), heading_terms.split()
            counts: dict[str, float] = dict(Counter(text))
            for term, times in Counter(heading).items():
                counts[term] = counts.get(term, 0) + HEADING_WEIGHT * times
            for term, weighted in counts.items():
                term_of.append(ids.setdefault(term, len(ids)))
                chunk_of.append(position)
                frequency.append(weighted)
            rowids.append(rowid)
            lengths.append(len(text) + len(heading))
        self.rowids = np.frombuffer(rowids, dtype=np.int64)
        self.size = len(rowids)
        terms_of = np.frombuffer(term_of, dtype=np.int32)
        order = np.argsort(terms_of, kind="stable")
        self.chunk = np.frombuffer(chunk_of, dtype=np.int32)[order]
        self.start = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms_of, minlength=len(ids)), out=self.start[1:])
        tf = np.frombuffer(frequency, dtype=np.float32)[order]
        length = np.frombuffer(lengths, dtype=np.int32).astype(np.float32)
        norm = 1 - B + B * length / max(float(length.mean()), 1.0) if self.size else length
        self.weight = (tf * (K1 + 1) / (tf + K1 * norm[self.chunk])).astype(np.float32)
        in_chunks = np.diff(self.start)
        rare = np.repeat(in_chunks, in_chunks) <= RARE_TERM  # per posting, in term order
        self.central = (tf >= 2) | (length[self.chunk] <= SHORT_PASSAGE) | rare
        self.ids = ids

    def __contains__(self, term: str) -> bool:
        return term in self.ids

    def count(self, term: str) -> int:
        """In how many chunks the term is."""
        at = self.ids.get(term)
        return 0 if at is None else int(self.start[at + 1] - self.start[at])

    def holding(self, term: str, centrally: bool = False) -> np.ndarray:
        """The positions of the chunks that hold the term (centrally: that are about it)."""
        at = self.ids.get(term)
        if at is None:
            return self.chunk[:0]
        span = slice(self.start[at], self.start[at + 1])
        return self.chunk[span][self.central[span]] if centrally else self.chunk[span]

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
