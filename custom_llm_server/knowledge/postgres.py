"""The knowledge base in PostgreSQL (KNOWLEDGE_STORE=postgresql://...), shared by every replica: one
indexes and embeds at a time, the others load what it wrote and follow its changes.

- Tables (MIGRATIONS, applied in order under a lock, each version once): kb_bases (one row per
  knowledge folder, named by its path: mount it at the same path on every replica), kb_files,
  kb_chunks (text, heading, terms), kb_vectors keyed by (model, content hash), so a text any replica
  or an earlier run embedded with the same model is never embedded again.
- A file's update is one transaction: a run stopped halfway leaves every file whole, old or new.
- Each write bumps the base's version and NOTIFYs `custom_llm_knowledge`; every replica LISTENs and
  reloads (in the background, searches meanwhile use what is loaded) within moments.
- One writer: `writer()` takes a session advisory lock for the base; a replica that dies lets it go.
- PostgreSQL unreachable at start: StoreUnavailable, one line. Later: search goes on from memory (the
  chunks' texts are kept in memory too), the listener reconnects with backoff, `degraded` says why
  (GET /ready shows it), and the first connection back reloads whatever changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from custom_llm_server.core.redact import printable
from custom_llm_server.knowledge.embeddings import EmbeddingError
from custom_llm_server.knowledge.store import SCHEMA_VERSION, Chunk, Known, StoreUnavailable

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool
except ImportError:  # the optional extra: pip install 'custom-llm-server[replicas]'
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger("custom_llm.knowledge")

CHANNEL = "custom_llm_knowledge"
LOCK_CLASS = 0x636C  # the first key of the advisory locks this server takes ("cl")
MIGRATION_LOCK = 0
STATEMENT_SECONDS = 120  # one statement at most: loading 100,000 chunks takes seconds, not minutes
BACKOFF_SECONDS = (0.5, 30.0)  # the listener's reconnection, doubling from the first to the last
PING_SECONDS = 5.0  # the listener asks the database something this often: a silent loss is found

MIGRATIONS = (
    """
    CREATE TABLE kb_bases (
        id serial PRIMARY KEY, folder text NOT NULL UNIQUE, terms_version int NOT NULL,
        version bigint NOT NULL DEFAULT 0);
    CREATE TABLE kb_files (
        base int NOT NULL REFERENCES kb_bases ON DELETE CASCADE, path text NOT NULL, hash text NOT NULL,
        size bigint NOT NULL, mtime double precision NOT NULL, PRIMARY KEY (base, path));
    CREATE TABLE kb_chunks (
        id bigserial PRIMARY KEY, base int NOT NULL REFERENCES kb_bases ON DELETE CASCADE,
        source text NOT NULL, heading text NOT NULL, text text NOT NULL, hash text NOT NULL,
        terms text NOT NULL, heading_terms text NOT NULL);
    CREATE INDEX kb_chunks_by_source ON kb_chunks (base, source);
    CREATE INDEX kb_chunks_by_hash ON kb_chunks (hash);
    CREATE TABLE kb_models (model text PRIMARY KEY, dimension int NOT NULL);
    CREATE TABLE kb_vectors (
        model text NOT NULL, hash text NOT NULL, vector bytea NOT NULL, PRIMARY KEY (model, hash));
    """,
)


def where(url: str) -> str:
    """The database's host, port and name, for log lines: never the user or the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql (an address that does not parse)"
    return f"postgresql {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def unreachable(at: str, error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the knowledge store ({at}) cannot be used: {printable(error, 200)}")


class PostgresStore:
    """The Store of one knowledge folder in a PostgreSQL database several replicas share."""

    shared = True

    def __init__(self, url: str, folder: Any, timeout: float = 5.0):
        if psycopg is None:
            raise StoreUnavailable("KNOWLEDGE_STORE needs psycopg: pip install 'custom-llm-server[replicas]'")
        self.url, self.where, self.timeout = url, where(url), timeout
        self.degraded: str | None = None  # why the store is out of reach, while it is
        self._changed, self._closed = threading.Event(), threading.Event()
        self._texts: dict[int, tuple[str, str, str]] = {}  # id -> (text, source, heading), as loaded
        self._lock = threading.Lock()  # the texts, replaced whole by load()
        self._writing: psycopg.Connection[Any] | None = None  # holds the writer's lock
        self.model = ""
        self.base = 0
        self.on_change: Callable[[], None] = lambda: None
        options = f"-c statement_timeout={STATEMENT_SECONDS * 1000}"
        self._connect: dict[str, Any] = {
            "connect_timeout": max(1, round(timeout)),
            "options": options,
            # A connection lost without a word (a NAT's idle drop, a failover) is found in seconds.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        try:
            self.pool = ConnectionPool(
                url,
                min_size=1,
                max_size=4,
                timeout=timeout,
                kwargs=self._connect,
                check=ConnectionPool.check_connection,  # a database restarted meanwhile: a new connection
                open=False,
            )
            self.pool.open(wait=True, timeout=timeout)
            with self.pool.connection() as db:
                migrate(db)
        except Exception as error:  # psycopg's and the pool's errors alike: said in one line
            self._closed.set()
            if hasattr(self, "pool"):
                self.pool.close()
            raise unreachable(self.where, error) from None
        self._listener = threading.Thread(
            target=lambda: asyncio.run(self._follow()), name="knowledge-listen", daemon=True
        )
        self._listener.start()

    # --- the base ---------------------------------------------------------------------------------

    def claim(self, folder: str) -> None:
        """The folder's base (made when new): one database holds any number of folders, each apart."""
        with self.pool.connection() as db:
            db.execute(
                "INSERT INTO kb_bases (folder, terms_version) VALUES (%s, %s) ON CONFLICT (folder) DO NOTHING",
                (folder, SCHEMA_VERSION),
            )
            row = db.execute("SELECT id FROM kb_bases WHERE folder = %s", (folder,)).fetchone()
        assert row is not None
        self.base = row[0]

    def files(self) -> dict[str, Known]:
        with self.pool.connection() as db:
            rows = db.execute("SELECT path, hash, size, mtime FROM kb_files WHERE base = %s", (self.base,))
            return {path: Known(digest, size, mtime) for path, digest, size, mtime in rows}

    def touch(self, source: str, size: int, mtime: float) -> None:
        with self.pool.connection() as db:
            db.execute(
                "UPDATE kb_files SET size = %s, mtime = %s WHERE base = %s AND path = %s",
                (size, mtime, self.base, source),
            )

    def replace(self, source: str, known: Known, chunks: list[Chunk]) -> None:
        with self.pool.connection() as db, db.transaction(), db.cursor() as cursor:
            cursor.execute("DELETE FROM kb_chunks WHERE base = %s AND source = %s", (self.base, source))
            cursor.executemany(
                "INSERT INTO kb_chunks (base, terms, heading_terms, text, source, heading, hash)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(self.base, *chunk) for chunk in chunks],
            )
            cursor.execute(
                "INSERT INTO kb_files VALUES (%s, %s, %s, %s, %s) ON CONFLICT (base, path)"
                " DO UPDATE SET hash = excluded.hash, size = excluded.size, mtime = excluded.mtime",
                (self.base, source, *known),
            )
            self._tell(cursor)

    def forget(self, sources: list[str]) -> None:
        with self.pool.connection() as db, db.transaction(), db.cursor() as cursor:
            cursor.execute("DELETE FROM kb_chunks WHERE base = %s AND source = ANY(%s)", (self.base, sources))
            cursor.execute("DELETE FROM kb_files WHERE base = %s AND path = ANY(%s)", (self.base, sources))
            self._tell(cursor)

    def count(self) -> int:
        with self.pool.connection() as db:
            row = db.execute("SELECT count(*) FROM kb_chunks WHERE base = %s", (self.base,)).fetchone()
        return int(row[0]) if row else 0

    def _tell(self, cursor: psycopg.Cursor[Any]) -> None:
        """In the writing transaction: the base changed (delivered to the listeners at commit)."""
        cursor.execute("UPDATE kb_bases SET version = version + 1 WHERE id = %s", (self.base,))
        cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(self.base)))

    def announce(self) -> None:
        with self.pool.connection() as db, db.transaction(), db.cursor() as cursor:
            self._tell(cursor)

    # --- loading and following ---------------------------------------------------------------------

    def changed(self) -> bool:
        return self._changed.is_set()

    def load(self) -> list[tuple[int, str, str]]:
        self._changed.clear()  # a change written while this reads is loaded next time
        try:
            with self.pool.connection() as db:
                rows = db.execute(
                    "SELECT id, terms, heading_terms, text, source, heading FROM kb_chunks WHERE base = %s ORDER BY id",
                    (self.base,),
                ).fetchall()
        except BaseException:
            self._changed.set()  # not loaded: still to do
            raise
        with self._lock:
            self._texts = {row[0]: row[3:] for row in rows}
        return [row[:3] for row in rows]

    def passages(self, ids: list[int]) -> dict[int, tuple[str, str, str]]:
        with self._lock:  # from memory: search never waits for the database
            return {rowid: self._texts[rowid] for rowid in ids if rowid in self._texts}

    def _listen(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        """LISTEN for the replicas' writes to this base, and mark it changed: on each notification and
        on each (re)connection, since what was written while not listening was not heard. A
        connection that fails, or stops answering (a NAT that drops it without a word), is replaced,
        with backoff, and `degraded` says why meanwhile."""
        wait = BACKOFF_SECONDS[0]
        while not self._closed.is_set():
            db = None
            try:
                async with asyncio.timeout(self.timeout * 2):
                    db = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **self._connect)
                    await db.execute(f"LISTEN {CHANNEL}")
                if self.degraded is not None:
                    log.info("knowledge store %s reachable again; reloading what changed", self.where)
                self.degraded, wait = None, BACKOFF_SECONDS[0]
                self._heard()
                await self._hear(db)
            except (psycopg.Error, OSError, TimeoutError) as error:
                if self.degraded is None:
                    why = printable(error, 200) or "it stopped answering"
                    log.warning(
                        "knowledge store %s unreachable (%s); searching what is loaded, retrying", self.where, why
                    )
                self.degraded = f"unreachable ({type(error).__name__}); answering from memory"
                await asyncio.sleep(wait)
                wait = min(wait * 2, BACKOFF_SECONDS[1])
            finally:
                if db is not None:
                    with contextlib.suppress(Exception):
                        await db.close()

    def _heard(self) -> None:
        self._changed.set()
        self.on_change()  # the knowledge base reloads now, not at its next search

    async def _hear(self, db: psycopg.AsyncConnection[Any]) -> None:
        """Mark the base changed for each notification about it, and ask the database a question now
        and then: a connection that does not answer within the timeout is a lost one."""
        while not self._closed.is_set():
            async for note in db.notifies(timeout=PING_SECONDS):
                if note.payload == str(self.base):
                    self._heard()
            async with asyncio.timeout(self.timeout):
                await db.execute("SELECT 1")

    # --- vectors -----------------------------------------------------------------------------------

    def use_model(self, identity: str) -> None:
        """Vectors of this model from now on; other models' stay, for the replicas that use them."""
        self.model = identity

    def unembedded(self) -> list[tuple[str, str]]:
        with self.pool.connection() as db:
            return db.execute(
                "SELECT DISTINCT ON (c.hash) c.hash, c.heading || E'\\n' || c.text FROM kb_chunks c"
                " WHERE c.base = %s AND NOT EXISTS"
                " (SELECT 1 FROM kb_vectors v WHERE v.model = %s AND v.hash = c.hash)",
                (self.base, self.model),
            ).fetchall()

    def store_vectors(self, hashes: list[str], vectors: np.ndarray) -> None:
        size = int(vectors.shape[1])
        with self.pool.connection() as db, db.transaction(), db.cursor() as cursor:
            cursor.execute("INSERT INTO kb_models VALUES (%s, %s) ON CONFLICT DO NOTHING", (self.model, size))
            row = cursor.execute("SELECT dimension FROM kb_models WHERE model = %s", (self.model,)).fetchone()
            if row is not None and row[0] != size:
                raise EmbeddingError(f"vectors of size {size}, where the store holds size {row[0]}")
            cursor.executemany(
                "INSERT INTO kb_vectors VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(self.model, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in zip(hashes, vectors)],
            )

    def vectors(self) -> list[tuple[int, bytes]]:
        with self.pool.connection() as db:
            rows = db.execute(
                "SELECT c.id, v.vector FROM kb_chunks c JOIN kb_vectors v ON v.model = %s AND v.hash = c.hash"
                " WHERE c.base = %s ORDER BY c.id",
                (self.model, self.base),
            ).fetchall()
        return [(rowid, bytes(vector)) for rowid, vector in rows]

    # --- the one writer ----------------------------------------------------------------------------

    def writer(self, wait: bool) -> bool:
        """Take the base's advisory lock on a connection of its own (held until release(), or until
        this process dies); with `wait`, until the replica that has it is done."""
        if self._writing is not None:
            return True
        db = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect["connect_timeout"])
        take = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        try:
            row = db.execute(f"SELECT {take}(%s, %s)", (LOCK_CLASS, self.base)).fetchone()
        except BaseException:
            db.close()
            raise
        if wait or (row is not None and row[0]):
            self._writing = db
            self._renew_terms(db)
            return True
        db.close()
        return False

    def _renew_terms(self, db: psycopg.Connection[Any]) -> None:
        """A base indexed by another version of the terms is indexed again (its vectors are kept)."""
        row = db.execute("SELECT terms_version FROM kb_bases WHERE id = %s", (self.base,)).fetchone()
        if row is not None and row[0] != SCHEMA_VERSION:
            log.warning("knowledge store %s: indexed by another version; indexing again", self.where)
            with db.transaction(), db.cursor() as cursor:
                cursor.execute("DELETE FROM kb_files WHERE base = %s", (self.base,))
                cursor.execute("DELETE FROM kb_chunks WHERE base = %s", (self.base,))
                cursor.execute("UPDATE kb_bases SET terms_version = %s WHERE id = %s", (SCHEMA_VERSION, self.base))

    def release(self) -> None:
        if self._writing is not None:
            with contextlib.suppress(psycopg.Error):  # out of reach: the session's end lets the lock go
                self._writing.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, self.base))
            self._writing.close()
            self._writing = None

    def close(self) -> None:
        self._closed.set()
        self.release()
        self.pool.close()
        self._listener.join(timeout=3)


def migrate(db: psycopg.Connection[Any]) -> None:
    """Bring the schema to this version's: each migration once, in order, one replica at a time; a
    database migrated by a newer version is refused (its tables may mean something else)."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
        db.execute("CREATE TABLE IF NOT EXISTS kb_schema (version int NOT NULL)")
        row = db.execute("SELECT coalesce(max(version), 0) FROM kb_schema").fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreUnavailable(f"its schema is version {version}, newer than this server's ({len(MIGRATIONS)})")
        for number, migration in enumerate(MIGRATIONS[version:], version + 1):
            db.execute(migration)
            db.execute("INSERT INTO kb_schema VALUES (%s)", (number,))
