"""The knowledge base behind /rag: reads a folder of documents, indexes it in SQLite FTS5, searches it.

Search is BM25 over an in-memory FTS5 table (standard library only). English words are stemmed by
FTS5's porter tokenizer; Chinese and Japanese text has no spaces between words, so every CJK
character is indexed as its own token and questions are split the same way.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("custom_llm.knowledge")

SUFFIXES = {".md", ".txt"}
MAX_CHUNK_CHARS = 1200
MAX_FILE_BYTES = 5_000_000
MAX_QUERY_TERMS = 32

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")
_WORD = re.compile(r"\w+", re.UNICODE)
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # file path relative to the knowledge folder
    heading: str  # "Title › Section", where the passage sits in its document
    score: float  # BM25, higher is better

    def citation(self) -> str:
        return f"{self.source} › {self.heading}" if self.heading else self.source


def split_cjk(text: str) -> str:
    """Put spaces around CJK characters so FTS5 sees each one as a token."""
    return _CJK.sub(r" \1 ", text)


def chunk_markdown(text: str) -> list[tuple[str, str]]:
    """Split a document into (heading path, text) chunks along headings and paragraphs."""
    chunks: list[tuple[str, str]] = []
    path: list[str] = []
    paragraphs: list[str] = []

    def flush() -> None:
        current = ""
        for paragraph in paragraphs:
            if current and len(current) + len(paragraph) > MAX_CHUNK_CHARS:
                chunks.append((" › ".join(path), current))
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current:
            chunks.append((" › ".join(path), current))
        paragraphs.clear()

    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        heading = _HEADING.match(block.splitlines()[0])
        if heading:
            flush()
            level = len(heading.group(1))
            del path[level - 1 :]
            path.append(heading.group(2).strip())
            block = "\n".join(block.splitlines()[1:]).strip()
            if not block:
                continue
        # A paragraph longer than a chunk is cut at line ends so no chunk grows unbounded.
        while len(block) > MAX_CHUNK_CHARS:
            cut = block.rfind("\n", 0, MAX_CHUNK_CHARS)
            cut = cut if cut > 0 else MAX_CHUNK_CHARS
            paragraphs.append(block[:cut].strip())
            block = block[cut:].strip()
        paragraphs.append(block)
    flush()
    return chunks


def match_expression(question: str) -> str | None:
    """Turn free text into an FTS5 OR-query of quoted terms (quoting keeps FTS5 syntax out)."""
    terms = dict.fromkeys(t.lower() for t in _WORD.findall(split_cjk(question)))
    quoted = ['"' + t.replace('"', '""') + '"' for t in list(terms)[:MAX_QUERY_TERMS]]
    return " OR ".join(quoted) or None


class KnowledgeBase:
    """An FTS5 index of the documents in one folder; search() is safe to call from any thread."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE VIRTUAL TABLE chunks USING fts5("
            "terms, text UNINDEXED, source UNINDEXED, heading UNINDEXED,"
            " tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        self.files = 0
        self.chunks = 0
        self.loaded = False

    def index(self) -> None:
        """(Re)build the index from the folder; unreadable files are skipped with a warning."""
        rows = []
        files = 0
        paths = sorted(self.folder.rglob("*")) if self.folder.is_dir() else []
        if not self.folder.is_dir():
            log.warning("knowledge folder %s does not exist; /rag answers without passages", self.folder)
        for path in paths:
            if path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
                text = path.read_text(encoding="utf-8")
            except (OSError, ValueError) as error:
                log.warning("skipping knowledge file %s: %s", path, error)
                continue
            source = path.relative_to(self.folder).as_posix()
            files += 1
            for heading, chunk in chunk_markdown(text):
                rows.append((split_cjk(f"{heading}\n{chunk}"), chunk, source, heading))
        with self._lock:
            self._db.execute("DELETE FROM chunks")
            self._db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)", rows)
            self._db.commit()
        self.files, self.chunks, self.loaded = files, len(rows), True
        log.info("knowledge indexed: %d files, %d chunks from %s", files, len(rows), self.folder)

    def search(self, question: str, limit: int = 3) -> list[Passage]:
        """The passages that best match the question, best first."""
        expression = match_expression(question)
        if expression is None or limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT text, source, heading, bm25(chunks) FROM chunks"
                " WHERE chunks MATCH ? ORDER BY bm25(chunks) LIMIT ?",
                (expression, limit),
            ).fetchall()
        # FTS5's bm25() is negative, lower is better; flip it so callers read "higher is better".
        return [Passage(text, source, heading, -score) for text, source, heading, score in rows]


def main(argv: list[str]) -> int:
    """`python3 knowledge.py "question" [DIR]` prints the passages the question finds."""
    if not argv:
        print('usage: python3 knowledge.py "question" [DIR]', file=sys.stderr)
        return 2
    kb = KnowledgeBase(argv[1] if len(argv) > 1 else "knowledge")
    kb.index()
    for passage in kb.search(argv[0], limit=5):
        print(f"{passage.score:6.2f}  {passage.citation()}\n        {passage.text[:160]!r}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(sys.argv[1:]))
