"""Session state stores. `SQLiteStore` is the default: one embedded file, WAL mode.

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


class SessionLimitError(Exception):
    """A new session would exceed the store's session limit."""


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

    @staticmethod
    def _count(db):
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
