"""Session stores: the PostgreSQL store that replicas share (against a private server these tests
start), and what every store does alike (expiry, the session limit, a failed update)."""

import threading

import pytest

from keras_biasinject.serving.store import PostgresStore, SessionLimitError, SQLiteStore, StoreUnavailable, open_store
from tests.serving.concurrency import in_threads
from tests.serving.postgres import PostgresServer, free_port


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.close()


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def fresh(kind, pg, tmp_path, name, **kwargs):
    """A store of `kind` with no sessions: its own SQLite file, or a cleared table on the shared server."""
    if kind == "sqlite":
        return SQLiteStore(tmp_path / f"{name}.sqlite", **kwargs)
    store = PostgresStore(pg.url, **kwargs)
    store._transaction(lambda cursor: cursor.execute(f"TRUNCATE {store.TABLE}"))
    return store


def plus_one(at=5.0):
    return lambda current: ([1.0 if current is None else current[0][0] + 1.0], at)


def test_two_replicas_eight_threads_lose_and_double_nothing(pg, tmp_path):
    """8 threads, each writing through one of two stores (two replicas' connections) to 3 shared
    sessions: every acknowledged update is counted once."""
    replicas = [fresh("postgres", pg, tmp_path, "a"), PostgresStore(pg.url)]
    acknowledged = {s: 0 for s in ("s0", "s1", "s2")}
    lock = threading.Lock()

    def client(k):
        store = replicas[k % 2]
        for i in range(30):
            session = f"s{(k + i) % 3}"
            state, _, updates = store.update(session, plus_one(), 1000)
            assert state == [float(updates)]  # the state this update made: one +1 per stored update
            with lock:
                acknowledged[session] += 1

    assert in_threads(client, 8)[1] == [None] * 8
    assert sum(acknowledged.values()) == 240
    for session, count in acknowledged.items():
        for store in replicas:
            assert store.get(session) == ([float(count)], 5.0, count)


def test_the_session_limit_holds_across_replicas(pg, tmp_path):
    replicas = [fresh("postgres", pg, tmp_path, "a"), PostgresStore(pg.url)]
    created, refused = [], []

    def client(k):
        try:
            replicas[k % 2].update(f"new-{k}", plus_one(), 5)
            created.append(k)
        except SessionLimitError:
            refused.append(k)

    assert in_threads(client, 16)[1] == [None] * 16
    assert len(created) == 5 and len(refused) == 11
    assert replicas[0]._transaction(lambda c: (c.execute(f"SELECT COUNT(*) FROM {PostgresStore.TABLE}"), c.fetchone()[0])[1]) == 5


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_idle_sessions_expire_alike_on_every_store(kind, pg, tmp_path):
    clock = Clock(1000.0)
    store = fresh(kind, pg, tmp_path, "ttl", ttl=10.0, clock=clock)
    store.update("old", plus_one(), 100)
    store.update("kept", plus_one(), 100)
    clock.now = 1005.0
    store.update("kept", plus_one(), 100)  # touched: its idle time starts again
    assert store.get("old") == ([1.0], 5.0, 1)
    clock.now = 1011.0
    assert store.get("old") is None  # idle 11 s > ttl: absent
    assert store.get("kept") == ([2.0], 5.0, 2)
    assert store.purge_expired() == 1  # "old" is deleted, "kept" is not
    assert store.purge_expired() == 0
    assert store.update("old", plus_one(), 100) == ([1.0], 5.0, 1)  # starts over


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_full_store_makes_room_from_expired_sessions_only(kind, pg, tmp_path):
    clock = Clock(1000.0)
    store = fresh(kind, pg, tmp_path, "full", ttl=10.0, clock=clock)
    store.update("a", plus_one(), 2)
    store.update("b", plus_one(), 2)
    with pytest.raises(SessionLimitError, match="holds 2 sessions, its limit"):
        store.update("c", plus_one(), 2)
    clock.now = 1020.0
    assert store.update("c", plus_one(), 2) == ([1.0], 5.0, 1)  # a and b expired and made room


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_an_update_that_fails_stores_nothing(kind, pg, tmp_path):
    store = fresh(kind, pg, tmp_path, "fail")
    store.update("s", plus_one(), 10)

    def broken(current):
        raise ArithmeticError("not finite")

    with pytest.raises(ArithmeticError):
        store.update("s", broken, 10)
    with pytest.raises(ArithmeticError):
        store.update("new", broken, 10)
    assert store.get("s") == ([1.0], 5.0, 1) and store.get("new") is None


def test_acknowledged_updates_survive_database_restarts_and_crashes(pg, tmp_path):
    store = fresh("postgres", pg, tmp_path, "restart")
    for _ in range(3):
        store.update("s", plus_one(), 10)
    pg.stop("fast")
    with pytest.raises(StoreUnavailable, match="cannot be reached: .*(refused|failed|closed)"):
        store.update("s", plus_one(), 10)  # not acknowledged
    with pytest.raises(StoreUnavailable):
        store.get("s")
    pg.start()
    assert store.get("s") == ([3.0], 5.0, 3)  # the store reconnects by itself
    store.update("s", plus_one(), 10)
    pg.stop("immediate")  # a crash: no shutdown checkpoint, recovery from the WAL
    pg.start()
    assert store.update("s", plus_one(), 10) == ([5.0], 5.0, 5)


def test_bad_store_urls_are_refused_clearly(pg):
    closed = free_port()
    with pytest.raises(ValueError, match=r"'postgresql://kbi:\*\*\*@127.0.0.1:\d+/postgres' cannot be opened.*Start the database") as error:
        open_store(f"postgresql://kbi:secret@127.0.0.1:{closed}/postgres")
    assert "secret" not in str(error.value)
    with pytest.raises(ValueError, match=r"is not a valid PostgreSQL URL.*postgresql://USER@HOST:PORT/DATABASE"):
        open_store("postgresql://kbi@127.0.0.1:port/postgres")
    with pytest.raises(ValueError, match=r"unknown store scheme 'mysql'.*SQLite file path"):
        open_store("mysql://kbi:pw@127.0.0.1/x")
    with pytest.raises(ValueError, match=r"cannot be opened.*database \"nope\" does not exist"):
        open_store(pg.url.rsplit("/", 1)[0] + "/nope")


def test_the_servers_purge_loop_deletes_expired_sessions_in_the_background(tmp_path):
    import time

    from keras_biasinject.serving.app import purge_loop

    clock = Clock(1000.0)
    store = SQLiteStore(tmp_path / "purge.sqlite", ttl=10.0, clock=clock)
    for k in range(3):
        store.update(f"s{k}", plus_one(), 100)
    clock.now = 1020.0  # all three expired
    stop = threading.Event()
    purger = threading.Thread(target=purge_loop, args=(store, stop, 0.05))
    purger.start()
    deadline = time.time() + 30
    while store._count(store._connect()) and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    purger.join()
    assert store._count(store._connect()) == 0


@pytest.mark.parametrize("url", [
    "postgresql://kbi:se/cret@127.0.0.1:{port}/postgres",  # a '/' in the password, unencoded
    "postgresql://kbi:pa%ZZss@127.0.0.1:{port}/postgres",  # a malformed escape that libpq quotes back
    "postgresql://kbi:a@secret@127.0.0.1:{port}/postgres",  # an '@' in the password, unencoded
    "postgresql://kbi@127.0.0.1:{port}/postgres?password=secret",
])
def test_no_error_shows_a_password(url):
    url = url.format(port=free_port())
    with pytest.raises(ValueError) as error:
        open_store(url)
    assert not any(secret in str(error.value) for secret in ("se/cret", "pa%ZZss", "secret")), str(error.value)
    assert "***" in str(error.value)
