"""Session state stores. `SQLiteStore` is the default: one embedded file, WAL mode.

A store keeps, per session, the `DecayFeedback` state as it was right after the last update and
that update's timestamp; decay to any later time is computed from them, so a restart changes
nothing. `update` is one transaction: once it returns, the new state is on disk (it survives
`kill -9` of the server), and concurrent updates to one session never interleave.
"""

import abc
import json
import sqlite3
import threading


class SessionStore(abc.ABC):
    """The interface a shared store (for several replicas) implements."""

    @abc.abstractmethod
    def get(self, session_id):
        """(state list, updated_at, updates) or None."""

    @abc.abstractmethod
    def update(self, session_id, fn, max_sessions):
        """Atomically: `fn(current or None) -> (state, updated_at)`; returns the stored triple."""


class SessionLimitError(Exception):
    """A new session would exceed the store's session limit."""


class SQLiteStore(SessionStore):
    """The default store: one SQLite file at `path` (WAL mode), one connection per thread."""

    def __init__(self, path):
        self.path = str(path)
        self._local = threading.local()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, "
                "updated_at REAL NOT NULL, updates INTEGER NOT NULL)"
            )

    def _connect(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the client hears back
            self._local.db = db
        return db

    def get(self, session_id):
        row = self._connect().execute(
            "SELECT state, updated_at, updates FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return None if row is None else (json.loads(row[0]), row[1], row[2])

    def update(self, session_id, fn, max_sessions):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: read-modify-write never interleaves
        try:
            row = db.execute("SELECT state, updated_at, updates FROM sessions WHERE id = ?", (session_id,)).fetchone()
            current = None if row is None else (json.loads(row[0]), row[1], row[2])
            if current is None and db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] >= max_sessions:
                raise SessionLimitError(f"the server holds {max_sessions} sessions, its limit")
            state, updated_at = fn(current)
            updates = 1 if current is None else current[2] + 1
            db.execute(
                "INSERT INTO sessions (id, state, updated_at, updates) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at, "
                "updates = excluded.updates",
                (session_id, json.dumps([float(v) for v in state]), float(updated_at), updates),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return list(map(float, state)), float(updated_at), updates
