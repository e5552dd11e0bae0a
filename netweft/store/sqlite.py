"""The cluster store in one SQLite file (WAL, mode 0600): the backend for a single manager.

One connection, used by one thread: every call runs there, off the event loop, in order. A write
transaction checks its compares and applies its ops inside BEGIN IMMEDIATE, so another process
writing the same file (a tool, a test) is serialized by SQLite and its revisions interleave
correctly. The change log (table `events`) is what watches read: in-process commits wake them at
once, other processes' commits are picked up within POLL seconds. The log keeps the last
`history` revisions; a watch from before them gets Compacted.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from netweft.store.api import (ClusterStore, Changes, Compacted, Compare, Delete, Event, Put, Record, TxnResult,
                               key_range)

HISTORY = 50_000     # revisions kept in the change log for watchers that resume
COMPACT_EVERY = 1000  # commits between two trims of the log
POLL = 0.5           # seconds: how soon a watch sees a commit made by another process
READ_REVS = 256      # revisions read from the log per step of a watch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (rev INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    key TEXT NOT NULL, action TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (rev, seq)) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (k, v) VALUES ('rev', 0), ('compacted', 0);
"""


def _create_private(path: str) -> None:
    """The file (and its directory) exist and are root-only before SQLite opens it: it holds the join tokens.
    SQLite gives the -wal and -shm files the database file's mode."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteStore(ClusterStore):
    def __init__(self, path: str, history: int = HISTORY):
        self.path, self.history = path, history
        self._x = ThreadPoolExecutor(1, thread_name_prefix="cluster-store")
        self._db: sqlite3.Connection | None = None
        self._commits = 0
        self._wake: set[asyncio.Event] = set()
        self._closed = False

    @classmethod
    async def open(cls, path: str, history: int = HISTORY) -> "SQLiteStore":
        store = cls(path, history)
        await store._run(store._open)
        return store

    # ---------------------------------------------------------------- plumbing
    async def _run(self, fn, *args):
        if self._closed:
            raise RuntimeError("the cluster store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._x, fn, *args)

    def _open(self) -> None:
        _create_private(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a daemon crash; fsync at checkpoints
        db.execute("PRAGMA busy_timeout=10000")  # another process's write waits, not fails
        db.executescript(_SCHEMA)
        self._db = db

    def _meta(self, key: str) -> int:
        return self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()[0]

    # ---------------------------------------------------------------- reads
    async def get(self, kind: str, key: str) -> Record | None:
        return await self._run(self._get, kind, key)

    def _get(self, kind: str, key: str) -> Record | None:
        row = self._db.execute("SELECT value, create_rev, mod_rev FROM objects WHERE kind = ? AND key = ?",
                               (kind, key)).fetchone()
        return Record(kind, key, row[0], row[1], row[2]) if row else None

    async def list(self, kind: str, prefix: str = "") -> tuple[int, list[Record]]:
        return await self._run(self._list, kind, prefix)

    def _list(self, kind: str, prefix: str) -> tuple[int, list[Record]]:
        start, end = key_range(prefix)
        sql = "SELECT key, value, create_rev, mod_rev FROM objects WHERE kind = ? AND key >= ?"
        args: tuple = (kind, start)
        if end is not None:
            sql, args = sql + " AND key < ?", args + (end,)
        self._db.execute("BEGIN")  # the rows and the revision from one snapshot
        try:
            rows = self._db.execute(sql + " ORDER BY key", args).fetchall()
            rev = self._meta("rev")
        finally:
            self._db.execute("COMMIT")
        return rev, [Record(kind, r[0], r[1], r[2], r[3]) for r in rows]

    async def revision(self) -> int:
        return await self._run(self._meta, "rev")

    # ---------------------------------------------------------------- writes
    async def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> TxnResult:
        keys = [(op.kind, op.key) for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError("a transaction may name each key once")
        result = await self._run(self._txn, compares, ops)
        if result.ok:
            self._notify()
        return result

    def _txn(self, compares: list[Compare], ops: list[Put | Delete]) -> TxnResult:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rev = self._meta("rev")
            for c in compares:
                row = db.execute("SELECT mod_rev FROM objects WHERE kind = ? AND key = ?", (c.kind, c.key)).fetchone()
                if (row[0] if row else 0) != c.mod_rev:
                    db.execute("ROLLBACK")
                    return TxnResult(False, rev)
            new = rev + 1
            seq = 0
            for op in ops:
                if isinstance(op, Put):
                    row = db.execute("SELECT create_rev FROM objects WHERE kind = ? AND key = ?",
                                     (op.kind, op.key)).fetchone()
                    db.execute("INSERT OR REPLACE INTO objects (kind, key, value, create_rev, mod_rev) "
                               "VALUES (?, ?, ?, ?, ?)", (op.kind, op.key, op.value, row[0] if row else new, new))
                    value, action = op.value, "put"
                else:
                    row = db.execute("SELECT value FROM objects WHERE kind = ? AND key = ?",
                                     (op.kind, op.key)).fetchone()
                    if row is None:
                        continue
                    db.execute("DELETE FROM objects WHERE kind = ? AND key = ?", (op.kind, op.key))
                    value, action = row[0], "delete"
                db.execute("INSERT INTO events (rev, seq, kind, key, action, value) VALUES (?, ?, ?, ?, ?, ?)",
                           (new, seq, op.kind, op.key, action, value))
                seq += 1
            if seq == 0:  # nothing changed: no new revision
                db.execute("ROLLBACK")
                return TxnResult(True, rev)
            db.execute("UPDATE meta SET v = ? WHERE k = 'rev'", (new,))
            self._commits += 1
            if self._commits % COMPACT_EVERY == 0 and new > self.history:
                self._compact(new - self.history)
            db.execute("COMMIT")
            return TxnResult(True, new)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _compact(self, upto: int) -> None:
        """Forget the changes of revisions <= upto (the objects themselves stay)."""
        if upto > self._meta("compacted"):
            self._db.execute("DELETE FROM events WHERE rev <= ?", (upto,))
            self._db.execute("UPDATE meta SET v = ? WHERE k = 'compacted'", (upto,))

    # ---------------------------------------------------------------- watch
    def _notify(self) -> None:
        for ev in self._wake:
            ev.set()

    def _read_log(self, since: int) -> tuple[int, int, list[Changes]]:
        """(compacted, current revision, the changes of up to READ_REVS revisions after since)."""
        db = self._db
        db.execute("BEGIN")
        try:
            compacted, rev = self._meta("compacted"), self._meta("rev")
            rows = db.execute("SELECT rev, kind, key, action, value FROM events WHERE rev > ? AND rev <= ? "
                              "ORDER BY rev, seq", (since, since + READ_REVS)).fetchall() \
                if since >= compacted and rev > since else []
        finally:
            db.execute("COMMIT")
        out: list[Changes] = []
        for r in rows:
            if not out or out[-1].rev != r[0]:
                out.append(Changes(r[0], []))
            out[-1].events.append(Event(r[0], r[1], r[2], r[3], r[4]))
        return compacted, rev, out

    async def watch(self, since: int) -> AsyncIterator[Changes]:
        wake = asyncio.Event()
        self._wake.add(wake)
        try:
            last = since
            while not self._closed:
                wake.clear()  # before reading: a commit during the read wakes the next wait
                try:
                    compacted, rev, changes = await self._run(self._read_log, last)
                except (RuntimeError, sqlite3.ProgrammingError):
                    if self._closed:
                        return  # closed under us: the watch ends
                    raise
                if last < compacted:
                    raise Compacted(last, compacted)
                for c in changes:
                    yield c
                    last = c.rev
                if changes and last < rev:
                    continue  # more to read
                try:  # (asyncio.timeout, not wait_for: that one can swallow a cancellation in 3.11)
                    async with asyncio.timeout(POLL):
                        await wake.wait()
                except TimeoutError:
                    pass
        finally:
            self._wake.discard(wake)

    # ---------------------------------------------------------------- close
    async def close(self) -> None:
        if self._closed:
            return
        if self._db is not None:
            await self._run(self._db.close)
        self._closed = True
        self._notify()
        self._x.shutdown(wait=True)
