"""The best available alternatives to this server's retrieval, on the same chunks: bm25s and tantivy.

Both get the chunks the server's index holds (text and heading, as the server indexes them), Chinese
segmented into words by jieba and English stemmed (PyStemmer, English stopwords), so the comparison is
of ranking, not of reading documents. Used by bench/retrieval.py; needs bench/requirements-compare.txt.
"""

import re
import tempfile
import time

import bm25s
import jieba
import Stemmer
import tantivy

from custom_llm_server.core.text import CJK_RANGES  # bench/retrieval.py puts the project on the path

CJK_RUN = re.compile(f"[{CJK_RANGES}]+")
WORD = re.compile(r"\w+")
STEMMER = Stemmer.Stemmer("english")
jieba.setLogLevel(60)  # quiet


def segmented(text: str) -> str:
    """The text with Chinese and Japanese runs cut into words by jieba (other text as it is)."""
    return CJK_RUN.sub(lambda run: " " + " ".join(jieba.lcut(run.group())) + " ", text)


class BM25S:
    """bm25s over the chunks: stemming, English stopwords, jieba for Chinese."""

    name = "bm25s (stemming + stopwords + jieba)"

    def __init__(self, chunks: list[tuple[str, str]]):  # (source, text)
        self.sources = [source for source, _ in chunks]
        self.retriever = bm25s.BM25()
        self.retriever.index(self.tokens([text for _, text in chunks]), show_progress=False)

    @staticmethod
    def tokens(texts: list[str]):
        return bm25s.tokenize([segmented(t) for t in texts], stopwords="en", stemmer=STEMMER, show_progress=False)

    def search(self, question: str, limit: int) -> list[str]:
        tokens = self.tokens([question])
        if not tokens.vocab:
            return []
        found, scores = self.retriever.retrieve(tokens, k=min(limit, len(self.sources)), show_progress=False)
        return [self.sources[i] for i, score in zip(found[0], scores[0], strict=True) if score > 0]


class Tantivy:
    """tantivy over the same chunks, the same words: English stemming (en_stem), jieba for Chinese."""

    name = "tantivy (en_stem + jieba)"

    def __init__(self, chunks: list[tuple[str, str]]):
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("body", stored=False, tokenizer_name="en_stem")
        builder.add_unsigned_field("n", stored=True)
        self.sources = [source for source, _ in chunks]
        self.index = tantivy.Index(builder.build(), path=tempfile.mkdtemp(prefix="tantivy-"))
        writer = self.index.writer()
        for n, (_, text) in enumerate(chunks):
            writer.add_document(tantivy.Document(body=segmented(text), n=n))
        writer.commit()
        self.index.reload()
        self.searcher = self.index.searcher()

    def search(self, question: str, limit: int) -> list[str]:
        words = WORD.findall(segmented(question))
        if not words:
            return []
        query = self.index.parse_query(" ".join(words), ["body"])  # any word may match (OR)
        hits = self.searcher.search(query, limit).hits
        return [self.sources[self.searcher.doc(address)["n"][0]] for _, address in hits]


def timed(search, questions: list[str], limit: int = 3) -> list[float]:
    """Milliseconds per search(question, limit), after a warm-up."""
    for question in questions[:50]:
        search(question, limit)
    timings = []
    for question in questions:
        started = time.perf_counter()
        search(question, limit)
        timings.append((time.perf_counter() - started) * 1000)
    return timings
