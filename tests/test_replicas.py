"""Many replicas, one knowledge base and one count of each key: against the real PostgreSQL and Redis
of this machine (TEST_POSTGRES_URL, TEST_REDIS_URL). A service that is not there fails the test with
the reason; nothing is skipped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from bench.proxy import Proxy
from custom_llm_server.core import metrics
from custom_llm_server.knowledge.index import KnowledgeBase
from custom_llm_server.knowledge.postgres import PostgresStore
from custom_llm_server.knowledge.store import StoreUnavailable
from custom_llm_server.serving.limits import Limits
from tests.conftest import API_KEY, AUTH, eventually

POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CUSTOM_LLM = str(Path(sys.executable).parent / "custom-llm")


def with_database(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture
def database():
    """A database of its own for the test, dropped after it."""
    name = f"custom_llm_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as error:
        pytest.fail(f"these tests need PostgreSQL at {POSTGRES} (set TEST_POSTGRES_URL): {error}")
    yield with_database(POSTGRES, name)
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def redis_url():
    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except redis.RedisError as error:
        pytest.fail(f"these tests need Redis at {REDIS} (set TEST_REDIS_URL): {error}")
    return REDIS


def documents(folder: Path, **files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


SHOP = {
    "delivery.md": "# Delivery\n\nParcels are delivered within three working days by courier.\n",
    "returns.md": "# Returns\n\nUnworn shoes can be returned within thirty days for a full refund.\n",
}


def texts(passages) -> list[str]:
    return [passage.text for passage in passages]


# --- the knowledge base in PostgreSQL -------------------------------------------------------------


def test_replicas_share_one_index_and_follow_its_changes(database, tmp_path):
    folder = documents(tmp_path / "shop", **SHOP)
    writer = KnowledgeBase(folder, PostgresStore(database, folder))
    replica = KnowledgeBase(folder, PostgresStore(database, folder))
    try:
        assert writer.store.writer(wait=False) and not replica.store.writer(wait=False)  # one writes at a time
        assert writer.index().indexed == 2
        replica.load()
        question = "how long does delivery take?"
        assert texts(replica.search(question)) == texts(writer.search(question)) != []
        (folder / "delivery.md").write_text("# Delivery\n\nParcels now arrive the next day by bicycle courier.\n")
        loaded = replica._postings
        assert writer.index().indexed == 1
        # Told by NOTIFY, the replica reloads by itself: no search, no look at the folder.
        assert eventually(lambda: replica._postings is not loaded, 10)
        assert "next day" in " ".join(texts(replica.search(question)))
        writer.store.release()
        assert replica.store.writer(wait=False)  # the writer's turn is over: another may take it
    finally:
        writer.close()
        replica.close()


def test_a_replica_without_the_documents_serves_the_stores_index(database, tmp_path):
    folder = documents(tmp_path / "shop", **SHOP)
    KnowledgeBase(folder, PostgresStore(database, folder)).index()
    for name in SHOP:
        (folder / name).unlink()  # this replica's copy of the folder is empty
    replica = KnowledgeBase(folder, PostgresStore(database, folder))
    try:
        replica.index()  # must not empty the knowledge base every replica serves
        assert replica.chunks == 2 and replica.search("can I return shoes for a refund?")
    finally:
        replica.close()


def test_two_folders_in_one_database_stay_apart(database, tmp_path):
    shop = documents(tmp_path / "shop", **SHOP)
    cars = documents(tmp_path / "cars", **{"tyres.md": "# Tyres\n\nWinter tyres are fitted from October.\n"})
    bases = [KnowledgeBase(folder, PostgresStore(database, folder)) for folder in (shop, cars)]
    try:
        for base in bases:
            base.index()
        assert bases[0].chunks == 2 and bases[1].chunks == 1
        assert bases[0].search("when are winter tyres fitted?") == []
        assert bases[1].search("when are winter tyres fitted?")
    finally:
        for base in bases:
            base.close()


@pytest.mark.slow
def test_a_store_out_of_reach_at_start_is_one_line_and_an_exit(tmp_path):
    folder = documents(tmp_path / "shop", **SHOP)
    secret = "s3cret-password"
    env = {
        **os.environ,
        "KNOWLEDGE_STORE": f"postgresql://app:{secret}@127.0.0.1:1/shop",
        "KNOWLEDGE_DIR": str(folder),
        "KNOWLEDGE_STORE_TIMEOUT_SECONDS": "1",
        "EMBEDDING_MODEL": "none",
        "DATA_DIR": str(tmp_path / "data"),
    }
    for command in (["index"], ["serve"]):
        done = subprocess.run([CUSTOM_LLM, *command], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("custom-llm: the knowledge store (postgresql 127.0.0.1:1/shop) cannot be used")
        assert secret not in done.stderr and "Traceback" not in done.stderr


def test_a_database_of_a_newer_version_is_refused(database, tmp_path):
    folder = documents(tmp_path / "shop", **SHOP)
    PostgresStore(database, folder).close()
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("INSERT INTO kb_schema VALUES (99)")
    with pytest.raises(StoreUnavailable, match="schema is version 99, newer than this server's"):
        PostgresStore(database, folder)


@pytest.mark.slow
def test_an_index_run_killed_halfway_leaves_every_file_whole(database, tmp_path):
    folder = tmp_path / "manual"
    folder.mkdir()
    for number in range(400):
        paragraphs = "\n\n".join(
            f"Section {number}.{p}: the setting number {number * 10 + p} does this." for p in range(8)
        )
        (folder / f"page-{number:03}.md").write_text(f"# Page {number}\n\n{paragraphs}\n")
    env = {**os.environ, "KNOWLEDGE_STORE": database, "KNOWLEDGE_DIR": str(folder), "EMBEDDING_MODEL": "none"}
    run = subprocess.Popen([CUSTOM_LLM, "index"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert run.stdout is not None
    for _ in range(40):  # some files written: then it dies mid-run, without any chance to clean up
        run.stdout.readline()
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    with psycopg.connect(database) as db:
        files = {path for (path,) in db.execute("SELECT path FROM kb_files")}
        chunks = dict(db.execute("SELECT source, count(*) FROM kb_chunks GROUP BY source").fetchall())
    assert 0 < len(files) < 400
    assert set(chunks) == files and len(set(chunks.values())) == 1  # every file whole (they are alike)
    done = subprocess.run([CUSTOM_LLM, "index"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{400 - len(files)} indexed" in done.stdout  # it goes on where it stopped


@pytest.mark.slow
def test_the_store_out_of_reach_later_loses_no_search(database, make_server, tmp_path):
    folder = documents(tmp_path / "shop", **SHOP)
    info = psycopg.conninfo.conninfo_to_dict(database)
    proxy = Proxy((info.get("host", "127.0.0.1"), int(info.get("port", 5432))))
    through = psycopg.conninfo.make_conninfo(database, host="127.0.0.1", port=proxy.port)
    server = make_server(knowledge_dir=folder, knowledge_store=through, knowledge_store_timeout_seconds=1)
    ask = {"params": {"q": "can I return shoes for a refund?"}, "headers": AUTH, "timeout": 10}
    before = httpx.get(server.url + "/knowledge/search", **ask).json()
    assert before["passages"]
    proxy.cut()
    assert eventually(lambda: "degraded" in httpx.get(server.url + "/ready").json(), 10)
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and "answering from memory" in str(ready.json()["degraded"])
    for _ in range(20):  # every search answered, from memory
        assert httpx.get(server.url + "/knowledge/search", **ask).json() == before
    writer = KnowledgeBase(folder, PostgresStore(database, folder))  # meanwhile, another replica writes
    (folder / "returns.md").write_text("# Returns\n\nShoes can be returned within sixty days, worn or not.\n")
    writer.index()
    writer.close()
    proxy.open.set()
    assert eventually(lambda: "sixty days" in str(httpx.get(server.url + "/knowledge/search", **ask).json()), 60)
    # the listener follows again at its next try, at most BACKOFF_SECONDS[1] after the last (a search may
    # have loaded the change through the pool before)
    assert eventually(lambda: "degraded" not in httpx.get(server.url + "/ready").json(), 45)


# --- the per-key limits in Redis --------------------------------------------------------------------


def test_streams_per_key_count_across_replicas(make_server, upstream, redis_url, tmp_path):
    key = f"sk-{uuid.uuid4().hex}"
    replicas = [
        make_server(
            api_keys=(key,),
            redis_url=redis_url,
            max_streams_per_key=2,
            max_requests_per_minute_per_key=100,  # its record stays a minute in Redis: looked at below
            knowledge_dir=tmp_path,
        )
        for _ in "ab"
    ]
    upstream.script.delay = 0.3  # each answer takes a few seconds: all four are in flight at once
    body = {"stream": True, "messages": [{"role": "user", "content": "Count to ten."}]}

    async def four() -> list[int]:
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
            calls = [client.post(replicas[n % 2].url + "/chat/completions", json=body) for n in range(4)]
            return sorted(response.status_code for response in await asyncio.gather(*calls))

    assert asyncio.run(four()) == [200, 200, 429, 429]
    stored = redis.Redis.from_url(redis_url).keys("custom-llm:*")
    assert stored and not any(key.encode() in name for name in stored)  # named by a hash of the key
    upstream.script.delay = 0
    assert httpx.post(replicas[1].url + "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})


def test_requests_a_minute_count_across_replicas(make_server, upstream, redis_url, tmp_path):
    key = f"sk-{uuid.uuid4().hex}"
    replicas = [
        make_server(api_keys=(key,), redis_url=redis_url, max_requests_per_minute_per_key=3, knowledge_dir=tmp_path)
        for _ in "ab"
    ]
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    answers = [
        httpx.post(replicas[n % 2].url + "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        for n in range(4)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "too_many_requests" and 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_dead_replicas_leases_expire(redis_url):
    """A replica that dies holding a key's places: they stop counting when its leases expire."""

    async def run() -> tuple[object, object]:
        dead, alive = Limits(redis_url, lease_seconds=1.0), Limits(redis_url, lease_seconds=1.0)
        key = uuid.uuid4().bytes
        for _ in range(2):
            assert callable(await dead.take(key, 2, 0))
        dead._renewing.cancel()  # it dies: nothing renews its leases, nothing gives them back
        refused = await alive.take(key, 2, 0)
        await asyncio.sleep(1.5)
        taken = await alive.take(key, 2, 0)
        await taken()
        await alive.aclose()
        return refused, taken

    refused, taken = asyncio.run(run())
    assert getattr(refused, "code", None) == "too_many_concurrent_requests" and callable(taken)


def test_redis_out_of_reach_counts_in_the_process_or_refuses(make_server, upstream, tmp_path, caplog):
    nowhere = "redis://127.0.0.1:1/0"
    key = f"sk-{uuid.uuid4().hex}"
    before = unshared()
    alone = make_server(api_keys=(key,), redis_url=nowhere, max_streams_per_key=1, knowledge_dir=tmp_path)
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    assert [httpx.post(alone.url + "/chat/completions", json=body, headers=headers).status_code for _ in "ab"] == [
        200,
        200,
    ]
    assert sum("Redis out of reach" in r.getMessage() for r in caplog.records) == 1  # said once
    assert unshared() - before == 2  # both counted in the process, and counted as such
    strict = make_server(
        api_keys=(key,), redis_url=nowhere, redis_required=True, max_streams_per_key=1, knowledge_dir=tmp_path
    )
    refused = httpx.post(strict.url + "/chat/completions", json=body, headers=headers)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
    assert refused.headers["retry-after"] == "5"
    assert API_KEY not in caplog.text and key not in caplog.text


def unshared() -> float:
    return metrics.REGISTRY.get_sample_value("custom_llm_limits_unshared_total") or 0.0


@pytest.mark.slow
def test_vectors_are_made_once_for_every_replica(database, tmp_path):
    """The replica that writes embeds each text once; another replica, started meanwhile or after,
    embeds nothing and searches by meaning with the vectors in the store."""
    from custom_llm_server.knowledge.embeddings import BuiltinModel
    from custom_llm_server.knowledge.index import Knowledge

    folder = documents(tmp_path / "shop", **SHOP)

    async def run() -> tuple[int, int, bool, list[str]]:
        writer = Knowledge(KnowledgeBase(folder, PostgresStore(database, folder)), BuiltinModel(1, None))
        replica = Knowledge(KnowledgeBase(folder, PostgresStore(database, folder)), BuiltinModel(1, None))
        try:
            await writer.start()
            made = await writer.embedding
            await replica.start()
            again = await replica.embedding
            meaning = replica.base.searchable_by_meaning
            found = await replica.search("my parcel, when does it come?", 3)  # no word in common with the answer
            return made, again, meaning, [p.text for p in found]
        finally:
            await writer.aclose()
            await replica.aclose()

    made, again, meaning, found = asyncio.run(run())
    assert made == 2 and again == 0 and meaning
    assert found and "delivered within three working days" in found[0]
    with psycopg.connect(database) as db:
        assert db.execute("SELECT count(*) FROM kb_vectors").fetchone() == (2,)


def test_a_lease_given_back_while_redis_was_away_is_given_back_when_it_returns(redis_url):
    """Two requests end while Redis is cut: once it answers again their places are free at once,
    not 30 seconds later when their leases expire."""
    proxy = Proxy(("127.0.0.1", int(redis_url.split(":")[2].split("/")[0])))

    async def run() -> object:
        limits = Limits(f"redis://127.0.0.1:{proxy.port}/0")
        key = uuid.uuid4().bytes
        held = [await limits.take(key, 2, 0) for _ in range(2)]
        proxy.cut()
        for release in held:
            await release()  # Redis away: remembered
        proxy.open.set()
        limits.away_until = 0.0  # as after RETRY_SECONDS
        taken = await limits.take(key, 2, 0)
        await limits.aclose()
        return taken

    assert callable(asyncio.run(run()))


def test_the_minute_limit_follows_a_reload_that_raises_it():
    from custom_llm_server.serving.limits import InProcess

    counts, key = InProcess(), b"sk-test"
    assert [callable(counts.take(key, 0, 3)) for _ in range(4)] == [True, True, True, False]
    assert [callable(counts.take(key, 0, 5)) for _ in range(3)] == [True, True, False]  # 5 a minute now


@pytest.mark.slow
def test_a_replica_started_before_the_index_follows_its_vectors(database, tmp_path):
    """On a first deployment the replicas and the index job start together: a replica that finds the
    store empty (and another process writing) still searches by meaning once the vectors are there."""
    from custom_llm_server.knowledge.embeddings import BuiltinModel
    from custom_llm_server.knowledge.index import Knowledge

    folder = documents(tmp_path / "shop", **SHOP)
    empty = tmp_path / "empty-copy"  # the replica's own folder: nothing in it
    empty.mkdir()

    async def run() -> tuple[bool, list[str]]:
        writer = Knowledge(KnowledgeBase(folder, PostgresStore(database, folder)), BuiltinModel(1, None))
        assert writer.base.store.writer(wait=False)  # the job has the lock when the replica starts
        replica = Knowledge(KnowledgeBase(folder, PostgresStore(database, folder)), BuiltinModel(1, None))
        try:
            await replica.start()
            await replica.embedding
            assert replica.base.chunks == 0
            writer.base.store.release()
            await writer.start()
            await writer.embedding
            deadline = time.monotonic() + 20
            while not replica.base.searchable_by_meaning and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # no search needed: the store hears the change, the replica reloads
                await asyncio.sleep(0.1)
            found = await replica.search("my parcel, when does it come?", 3)
            return replica.base.searchable_by_meaning, [p.text for p in found]
        finally:
            await writer.aclose()
            await replica.aclose()

    meaning, found = asyncio.run(run())
    assert meaning, found
    assert found and "three working days" in found[0], found
