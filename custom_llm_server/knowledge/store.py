"""Where a knowledge base is kept: the Store interface the index writes to and loads from, and its
embedded implementation, one SQLite file per folder (postgres.py is the one replicas share).

What a store keeps: the folder's files (path, content hash, size, time of change), their chunks (text,
heading, content hash, and the terms that search reads), and the embedding model's vectors by content
hash. Search runs in memory (index.py): a store is read when something changed, never per question,
except SQLite's passage texts, read from the local file for the few passages a search returns.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from custom_llm_server.knowledge.embeddings import EmbeddingError

log = logging.getLogger("custom_llm.knowledge")

SCHEMA_VERSION = 6  # bumped when what the index stores changes: an index made by another version is rebuilt
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, hash TEXT, size INTEGER, mtime REAL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, source TEXT, heading TEXT, text TEXT, hash TEXT, terms TEXT, heading_terms TEXT);
CREATE INDEX IF NOT EXISTS chunks_by_source ON chunks (source);
CREATE TABLE IF NOT EXISTS embeddings (hash TEXT PRIMARY KEY, vector BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
PRAGMA user_version = {SCHEMA_VERSION};
"""


class Chunk(NamedTuple):
    """One chunk as the index writes it."""

    terms: str
    heading_terms: str
    text: str
    source: str
    heading: str
    hash: str


class Known(NamedTuple):
    """A file as the store knows it: whether it changed is decided from these."""

    hash: str
    size: int
    mtime: float


class StoreUnavailable(ValueError):
    """The store cannot be reached or used: said in one line, never with a traceback."""


class Store(Protocol):
    """A knowledge base's documents, chunks and vectors. Every method is safe from any thread."""

    where: str  # for log lines: the file's name, or the database's host and name (never a password)
    shared: bool  # replicas share it: one of them writes at a time, the others follow its changes
    degraded: str | None  # why it is out of reach, while search goes on from memory
    on_change: Callable[[], None]  # called when it hears that another process wrote (if it can hear)

    def claim(self, folder: str) -> None:
        """Make the store this folder's, or refuse one that holds another folder's documents."""

    def files(self) -> dict[str, Known]: ...

    def touch(self, source: str, size: int, mtime: float) -> None:
        """A file touched, not changed: its new size and time, so it is not read again."""

    def replace(self, source: str, known: Known, chunks: list[Chunk]) -> None:
        """A file's chunks, all at once: a run stopped halfway leaves every file whole, old or new."""

    def forget(self, sources: list[str]) -> None: ...

    def count(self) -> int: ...

    def changed(self) -> bool:
        """Whether something was written (by another process too) since the last load()."""

    def load(self) -> list[tuple[int, str, str]]:
        """Every chunk's (id, terms, heading terms), by id; what changed() compares with from now."""

    def passages(self, ids: list[int]) -> dict[int, tuple[str, str, str]]:
        """The (text, source, heading) of these chunks, those still there."""

    def use_model(self, identity: str) -> None:
        """Vectors are this embedding model's from now on."""

    def unembedded(self) -> list[tuple[str, str]]:
        """(hash, heading and text) of each text with no vector of the model yet, each text once."""

    def store_vectors(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Keep vectors by content hash; all of one size (the first stored sets it), or none is kept."""

    def vectors(self) -> list[tuple[int, bytes]]:
        """(chunk id, float32 vector) of the chunks that have one, by id."""

    def writer(self, wait: bool) -> bool:
        """Become the one process that indexes and embeds (until release()); False when another is."""

    def release(self) -> None: ...

    def announce(self) -> None:
        """Tell the processes that follow the store that the vectors changed."""

    def close(self) -> None: ...


def default_path(data_dir: Path, folder: Path) -> Path:
    """One index file per knowledge folder, under DATA_DIR/index/."""
    name = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    return data_dir / "index" / f"knowledge-{name}.sqlite3"


class SQLiteStore:
    """The embedded store: one SQLite file, shared by the worker processes of one machine (each sees
    another's writes through the file's data_version)."""

    shared = False
    degraded: str | None = None
    on_change: Callable[[], None] = staticmethod(lambda: None)  # changes are read from data_version

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.where = Path(self.path).name
        self._lock = threading.Lock()
        self._db = self._open()
        self._loaded_version = -1

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=5)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and version != SCHEMA_VERSION and version >= 5:
                # Another version's terms: the documents are indexed again, the vectors (hours of work
                # at 100,000 chunks, kept by content hash and model) are kept.
                log.warning("knowledge index %s was made by another version; indexing again", self.where)
                db.executescript("DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS chunks;" + SCHEMA)
            elif tables and version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"made by another version ({version}, this is {SCHEMA_VERSION})")
            if not tables:  # only a new file is written to: a write tells every other worker to reload
                db.executescript(SCHEMA)
            db.execute("SELECT hash FROM chunks LIMIT 1").fetchone()
            return db
        except sqlite3.DatabaseError as error:  # corrupt, not a database at all, or older: start again
            log.warning("knowledge index %s is unusable (%s); rebuilding it", self.where, error)
            db.close()
            Path(self.path).unlink(missing_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=5)
            db.executescript(SCHEMA)
            return db

    def claim(self, folder: str) -> None:
        with self._lock:
            known = self._db.execute("SELECT value FROM meta WHERE key = 'folder'").fetchone()
            if known is None:
                self._db.execute("INSERT INTO meta VALUES ('folder', ?)", (folder,))
                self._db.commit()
        if known is not None and known[0] != folder:
            self._db.close()
            raise ValueError(
                f"the index file {self.where} holds another knowledge folder's documents: "
                "give this folder its own (KNOWLEDGE_INDEX), or leave it empty"
            )

    def files(self) -> dict[str, Known]:
        with self._lock:
            return {row[0]: Known(*row[1:]) for row in self._db.execute("SELECT path, hash, size, mtime FROM files")}

    def touch(self, source: str, size: int, mtime: float) -> None:
        with self._lock:
            self._db.execute("UPDATE files SET size = ?, mtime = ? WHERE path = ?", (size, mtime, source))
            self._db.commit()

    def replace(self, source: str, known: Known, chunks: list[Chunk]) -> None:
        with self._lock:
            self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            self._db.executemany(
                "INSERT INTO chunks (terms, heading_terms, text, source, heading, hash) VALUES (?, ?, ?, ?, ?, ?)",
                chunks,
            )
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (source, *known))
            self._db.commit()

    def forget(self, sources: list[str]) -> None:
        with self._lock:
            for source in sources:
                self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
                self._db.execute("DELETE FROM files WHERE path = ?", (source,))
            self._db.commit()

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def changed(self) -> bool:
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0] != self._loaded_version

    def load(self) -> list[tuple[int, str, str]]:
        with self._lock:
            self._loaded_version = self._db.execute("PRAGMA data_version").fetchone()[0]
            return self._db.execute("SELECT id, terms, heading_terms FROM chunks ORDER BY id").fetchall()

    def passages(self, ids: list[int]) -> dict[int, tuple[str, str, str]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, text, source, heading FROM chunks WHERE id IN ({','.join('?' * len(ids))})", ids
            )
            return {rowid: (text, source, heading) for rowid, text, source, heading in rows}

    def use_model(self, identity: str) -> None:
        """One model's vectors at a time: another model's are deleted."""
        with self._lock:
            known = self._db.execute("SELECT value FROM meta WHERE key = 'embedding_model'").fetchone()
            if known is None or known[0] != identity:
                self._db.execute("DELETE FROM embeddings")
                self._db.execute("DELETE FROM meta WHERE key = 'embedding_dimension'")
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('embedding_model', ?)", (identity,))
                self._db.commit()

    def unembedded(self) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT DISTINCT c.hash, c.heading || char(10) || c.text FROM chunks c"
                " LEFT JOIN embeddings e ON e.hash = c.hash WHERE e.hash IS NULL"
            ).fetchall()

    def store_vectors(self, hashes: list[str], vectors: np.ndarray) -> None:
        with self._lock:
            known = self._db.execute("SELECT value FROM meta WHERE key = 'embedding_dimension'").fetchone()
            if known is not None and int(known[0]) != vectors.shape[1]:
                raise EmbeddingError(f"vectors of size {vectors.shape[1]}, where the index holds size {known[0]}")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('embedding_dimension', ?)", (str(vectors.shape[1]),))
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)", list(_blobs(hashes, vectors)))
            self._db.commit()

    def vectors(self) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, e.vector FROM chunks c JOIN embeddings e ON e.hash = c.hash ORDER BY c.id"
            ).fetchall()
            known = self._db.execute("SELECT value FROM meta WHERE key = 'embedding_dimension'").fetchone()
        size = 4 * int(known[0]) if known else None
        if any(len(vector) != size for _, vector in rows):  # another size (an index of an older version)
            log.warning("knowledge: vectors of another size are left out; their passages are embedded again")
            with self._lock:
                self._db.execute("DELETE FROM embeddings WHERE length(vector) != ?", (size or 0,))
                self._db.commit()
            rows = [(rowid, vector) for rowid, vector in rows if len(vector) == size]
        return rows

    def writer(self, wait: bool) -> bool:
        return True  # one machine: the file's own locks order the writes

    def release(self) -> None:
        pass

    def announce(self) -> None:
        pass  # a commit changes the file's data_version, which every worker compares

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _blobs(hashes: list[str], vectors: np.ndarray) -> Iterable[tuple[str, bytes]]:
    return ((h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in zip(hashes, vectors, strict=True))
