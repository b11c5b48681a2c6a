"""Session state stores. `SQLiteStore` is the default: one embedded file, WAL mode, for one server.
`PostgresStore` keeps them in a PostgreSQL table that several replicas share. `open_store` picks
one from `kbi serve --store`: a file path (SQLite) or a `postgresql://` URL.

A store keeps, per session, the `DecayFeedback` state as it was right after the last update and
that update's timestamp; decay to any later time is computed from them, so a restart changes
nothing. `update` is one transaction: once it returns, the new state is on disk (it survives
`kill -9` of the server), and concurrent updates to one session never interleave; if `fn` raises,
nothing is stored.

Sessions expire: one not updated for `ttl` seconds of the server's clock (not the client's
timestamps) reads as absent, starts over at its next update, and is deleted when the store is full.
"""

import abc
import json
import sqlite3
import threading
import time
import urllib.parse


class SessionStore(abc.ABC):
    """The interface a shared store (for several replicas) implements. `ttl` (seconds; 0 or None:
    never) and `clock` (the server's time) decide when an idle session has expired."""

    @abc.abstractmethod
    def get(self, session_id):
        """(state list, updated_at, updates), or None (no such session, or it expired)."""

    @abc.abstractmethod
    def update(self, session_id, fn, max_sessions):
        """Atomically: `fn(current or None) -> (state, updated_at)`; returns the stored triple. An
        expired session is passed as None and starts over; when a new session would exceed
        `max_sessions`, expired ones are deleted first (SessionLimitError if still full)."""

    @abc.abstractmethod
    def purge_expired(self, limit=1000):
        """Deletes up to `limit` expired sessions without holding up updates; returns how many."""


class SessionLimitError(Exception):
    """A new session would exceed the store's session limit."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (a database that is down or restarting, a lock or statement
    that timed out). Nothing was stored by the call that raised it, unless `outcome_unknown`: the
    connection broke while the commit was on its way, so the update may or may not be stored. The
    server answers 503 and says which."""

    def __init__(self, store, reason, outcome_unknown=False):
        super().__init__(f"session store {store!r} cannot be reached: {reason}")
        self.reason = reason
        self.outcome_unknown = outcome_unknown


def open_store(spec, ttl=None, clock=time.time):
    """The store `spec` names: a `postgresql://` (or `postgres://`) URL, a `sqlite:///` URL, or a
    file path (SQLite). ValueError for any other URL, a malformed one, or a store that cannot be
    opened; the message never shows a password."""
    text = str(spec)
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(text, ttl=ttl, clock=clock)
    if scheme == "sqlite":
        return SQLiteStore(text[len("sqlite://"):], ttl=ttl, clock=clock)
    if scheme is not None:
        raise ValueError(f"--store {masked(text)!r}: unknown store scheme {scheme!r}. Give a SQLite file path, "
                         "sqlite:///PATH, or postgresql://USER@HOST:PORT/DATABASE.")
    return SQLiteStore(text, ttl=ttl, clock=clock)


def masked(url):
    """`url` with its password, if any, replaced by `***`: in the user info (which ends at the last `@`
    before the query, so a password holding `/` or `@` is masked whole) and in a `password=` parameter."""
    head, sep, rest = str(url).partition("://")
    if not sep:
        return str(url)
    base, qmark, query = rest.partition("?")
    if "@" in base:
        userinfo, host = base.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        base = f"{user}{':***' if colon else ''}@{host}"
    if qmark:
        query = "&".join("password=***" if part.lower().startswith("password=") else part for part in query.split("&"))
    return f"{head}://{base}{qmark}{query}"


def scrubbed(text, url):
    """`text` (a driver's message) without any password that `url` holds, raw or percent-decoded."""
    secrets = set()
    head, sep, rest = str(url).partition("://")
    base, _, query = rest.partition("?")
    if sep and "@" in base:
        userinfo = base.rsplit("@", 1)[0]
        password = userinfo.partition(":")[2]
        secrets.add(password)  # and, as libpq splits at the first '@', the pieces it may take for a host
        secrets.update(password.split("@")[1:] + userinfo.split("@")[1:])
    secrets.update(part[len("password="):] for part in query.split("&") if part.lower().startswith("password="))
    secrets.update({urllib.parse.unquote(v) for v in secrets})
    for secret in sorted((v for v in secrets if len(v) >= 3), key=len, reverse=True):  # shorter ones would mangle the text
        text = text.replace(secret, "***")
    return text


def wal_mode(db, seconds=30.0):
    """Switches `db` to WAL mode. SQLite answers "database is locked" at once, without waiting, when
    another connection (a replica starting at the same time) holds the file meanwhile: try again."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore(SessionStore):
    """The default store: one SQLite file at `path` (WAL mode), one connection per thread."""

    def __init__(self, path, ttl=None, clock=time.time):
        self.path = str(path)
        self.ttl = ttl or None  # seconds a session may stay idle; None: for ever
        self.clock = clock  # () -> seconds: the server's time, stamped on every write
        self._local = threading.local()
        try:
            self._create()
        except sqlite3.Error as error:  # a folder, an unwritable file, not a database
            raise ValueError(f"session store {self.path!r} cannot be opened ({error}); give a writable SQLite file "
                             "(`kbi serve --store FILE`) in an existing folder.") from None

    def _create(self):
        """The table, created or (a store of an older version, without `touched_at`) migrated, in one
        write transaction: replicas starting together on one old store migrate it once."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: the check and the migration never interleave
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, "
                "updated_at REAL NOT NULL, updates INTEGER NOT NULL)"
            )
            if "touched_at" not in [row[1] for row in db.execute("PRAGMA table_info(sessions)")]:
                db.execute("ALTER TABLE sessions ADD COLUMN touched_at REAL")
                db.execute("UPDATE sessions SET touched_at = ? WHERE touched_at IS NULL", (self.clock(),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _connect(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions
            wal_mode(db)
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the client hears back
            self._local.db = db
        return db

    def _expired_before(self):
        """Sessions last written before this server time have expired (-inf without a ttl)."""
        return float("-inf") if self.ttl is None else self.clock() - self.ttl

    def _read(self, db, session_id):
        row = db.execute(
            "SELECT state, updated_at, updates FROM sessions WHERE id = ? AND touched_at >= ?",
            (session_id, self._expired_before()),
        ).fetchone()
        return None if row is None else (json.loads(row[0]), row[1], row[2])

    def get(self, session_id):
        return self._read(self._connect(), session_id)

    def update(self, session_id, fn, max_sessions):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: read-modify-write never interleaves
        try:
            current = self._read(db, session_id)
            if current is None and self._count(db) >= max_sessions:
                db.execute("DELETE FROM sessions WHERE touched_at < ?", (self._expired_before(),))
                if self._count(db) >= max_sessions:
                    raise SessionLimitError(f"the server holds {max_sessions} sessions, its limit")
            state, updated_at = fn(current)
            updates = 1 if current is None else current[2] + 1
            db.execute(
                "INSERT INTO sessions (id, state, updated_at, updates, touched_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at, "
                "updates = excluded.updates, touched_at = excluded.touched_at",
                (session_id, json.dumps([float(v) for v in state]), float(updated_at), updates, self.clock()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return list(map(float, state)), float(updated_at), updates

    def purge_expired(self, limit=1000):
        """Deletes up to `limit` expired sessions in one short write transaction; returns how many."""
        if self.ttl is None:
            return 0
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE touched_at < ? LIMIT ?)",
                                 (self._expired_before(), limit)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return deleted

    @staticmethod
    def _count(db):
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]


class PostgresStore(SessionStore):
    """Sessions in the table `kbi_sessions` of a PostgreSQL database, shared by every replica that is
    given the same URL. One connection per thread. An update is one transaction that first takes a
    transaction-level advisory lock on the session id, then reads, computes and writes the row: two
    replicas' updates to one session never interleave (the second waits for the first's commit), and
    updates of other sessions do not wait. A new session also takes one store-wide lock, so that the
    session limit holds across replicas. Commits are synchronous, as PostgreSQL's default: once
    `update` returns, the update survives a crash of the database server.

    A dropped connection (the server restarted) is replaced on the next call. A call that fails before
    its commit was sent is retried once on a new connection; otherwise `StoreUnavailable` is raised."""

    TABLE = "kbi_sessions"
    _NEW_SESSION_LOCK = 0x6B6269  # "kbi": taken by every update that creates a session

    def __init__(self, url, ttl=None, clock=time.time, connect_timeout=5):
        try:
            import psycopg
        except ImportError:
            raise ValueError(f"--store {masked(url)!r} needs the PostgreSQL driver psycopg: "
                             "pip install 'keras-biasinject[postgres]'.") from None
        self._psycopg = psycopg
        try:
            urllib.parse.urlsplit(url).port  # noqa: B018  (raises ValueError for a port that is not a number)
            psycopg.conninfo.conninfo_to_dict(url)
        except (ValueError, psycopg.ProgrammingError) as error:
            raise ValueError(f"--store {masked(url)!r} is not a valid PostgreSQL URL ({scrubbed(str(error).strip(), url)}); "
                             "give postgresql://USER@HOST:PORT/DATABASE.") from None
        self.url = url
        # A replica cut off by the network must not hold a session's lock for ever: TCP keepalives find a
        # dead peer in about 25 s, and no update waits more than 10 s for a lock or runs more than 30 s.
        self._session_settings = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
        if "options" not in psycopg.conninfo.conninfo_to_dict(url):  # the URL's own options win
            self._session_settings["options"] = ("-c lock_timeout=10000 -c statement_timeout=30000 "
                                                 "-c idle_in_transaction_session_timeout=60000")
        self.ttl = ttl or None
        self.clock = clock
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        try:
            self._create()
        except (psycopg.Error, StoreUnavailable) as error:
            reason = error.reason if isinstance(error, StoreUnavailable) else scrubbed(_reason(error), url)
            raise ValueError(f"session store {masked(url)!r} cannot be opened ({reason}). Start the database "
                             "or correct `--store`.") from None

    def __repr__(self):
        return f"PostgresStore({masked(self.url)!r})"

    def _connect(self):
        db = getattr(self._local, "db", None)
        if db is None or db.closed or db.broken:
            try:
                db = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout, **self._session_settings)
            except self._psycopg.OperationalError as error:
                raise StoreUnavailable(masked(self.url), scrubbed(_reason(error), self.url)) from None
            self._local.db = db
        return db

    def _transaction(self, work):
        """`work(cursor)` in one transaction, on this thread's connection; retried once on a new
        connection when the connection failed before the commit was sent."""
        for attempt in (0, 1):
            db = self._connect()
            committing = False
            try:
                with db.transaction():
                    with db.cursor() as cursor:
                        result = work(cursor)
                    committing = True  # leaving the block sends COMMIT
                return result
            except self._psycopg.OperationalError as error:
                reason = scrubbed(_reason(error), self.url)
                if not (db.closed or db.broken):
                    timeouts = (self._psycopg.errors.QueryCanceled, self._psycopg.errors.LockNotAvailable)
                    if isinstance(error, timeouts):  # rolled back: nothing stored
                        raise StoreUnavailable(masked(self.url), f"a lock or statement timed out: {reason}") from None
                    raise  # a statement failed on a healthy connection: a bug of ours, not an outage
                if committing:
                    raise StoreUnavailable(masked(self.url), f"the connection broke while committing: {reason}",
                                           outcome_unknown=True) from None
                if attempt:
                    raise StoreUnavailable(masked(self.url), f"the connection failed during a transaction: {reason}") from None

    def _create(self):
        def create(cursor):
            cursor.execute("SELECT to_regclass(%s)", (self.TABLE,))
            if cursor.fetchone()[0] is not None:  # there: a role with row rights only may serve it
                return
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._NEW_SESSION_LOCK,))  # replicas starting together
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {self.TABLE} (id TEXT PRIMARY KEY, state DOUBLE PRECISION[] NOT NULL, "
                "updated_at DOUBLE PRECISION NOT NULL, updates BIGINT NOT NULL, touched_at DOUBLE PRECISION NOT NULL)"
            )
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {self.TABLE}_touched ON {self.TABLE} (touched_at)")

        self._transaction(create)

    def _expired_before(self):
        return float("-inf") if self.ttl is None else self.clock() - self.ttl

    def _read(self, cursor, session_id, lock=False):
        """The live session's triple or None; `lock`: with its row locked, so that no purge deletes it meanwhile."""
        cursor.execute(f"SELECT state, updated_at, updates FROM {self.TABLE} WHERE id = %s AND touched_at >= %s"
                       + (" FOR UPDATE" if lock else ""), (session_id, self._expired_before()))
        row = cursor.fetchone()
        return None if row is None else (list(map(float, row[0])), float(row[1]), int(row[2]))

    def get(self, session_id):
        return self._transaction(lambda cursor: self._read(cursor, session_id))

    def update(self, session_id, fn, max_sessions):
        def work(cursor):
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (session_id,))
            current = self._read(cursor, session_id, lock=True)
            if current is None:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._NEW_SESSION_LOCK,))
                if self._count(cursor) >= max_sessions:
                    cursor.execute(f"DELETE FROM {self.TABLE} WHERE touched_at < %s", (self._expired_before(),))
                    if self._count(cursor) >= max_sessions:
                        raise SessionLimitError(f"the server holds {max_sessions} sessions, its limit")
            state, updated_at = fn(current)
            state = [float(v) for v in state]
            updates = 1 if current is None else current[2] + 1
            cursor.execute(
                f"INSERT INTO {self.TABLE} (id, state, updated_at, updates, touched_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at, "
                "updates = excluded.updates, touched_at = excluded.touched_at",
                (session_id, state, float(updated_at), updates, self.clock()),
            )
            return state, float(updated_at), updates

        return self._transaction(work)

    def purge_expired(self, limit=1000):
        """Deletes up to `limit` expired sessions, skipping rows an update holds; returns how many."""
        if self.ttl is None:
            return 0

        def work(cursor):
            cursor.execute(
                f"DELETE FROM {self.TABLE} WHERE id IN (SELECT id FROM {self.TABLE} WHERE touched_at < %s "
                "LIMIT %s FOR UPDATE SKIP LOCKED)", (self._expired_before(), limit))
            return cursor.rowcount

        return self._transaction(work)

    def _count(self, cursor):
        cursor.execute(f"SELECT COUNT(*) FROM {self.TABLE}")
        return cursor.fetchone()[0]


def _reason(error):
    """A driver error's first line, without the password the URL may hold."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
