"""The daemon's state: JSON documents in SQLite, one table per kind, names unique per kind.

Kind "endpoints" holds this host's endpoints (netweft.model.objects.Endpoint as builtins), whoever owns
them; each is named by `endpoint_name` (owner and network), so an owner has at most one endpoint per
network and its endpoints are found by name prefix.
"""
from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager

from netweft.errors import Conflict

ENDPOINTS = "endpoints"
KINDS = ("networks", "containers", ENDPOINTS, "settings")
CACHE_KIB = 256


class Store:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self._depth, self._after = 0, []
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # SQLite's page cache (2 MiB by default) fills with the endpoint records and stays full; the file's pages
        # stay in the kernel's page cache anyway, and every lookup here is by key.
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        for kind in KINDS:
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {kind} "
                            "(id TEXT PRIMARY KEY, name TEXT UNIQUE, doc TEXT NOT NULL)")

    @contextmanager
    def tx(self):
        """One atomic write: all of it lands or none. Re-entrant: an inner tx joins the outer one,
        so a read-check-write (an allocation) can sit in the same transaction as its write."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth, self._after = 1, []
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0
        after, self._after = self._after, []
        for fn in after:
            fn()

    def on_commit(self, fn) -> None:
        """Run fn once the current transaction has committed (never if it rolls back)."""
        if self._depth:
            self._after.append(fn)
        else:
            fn()

    def put(self, kind: str, id: str, name: str | None, doc: dict) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO {kind} (id, name, doc) VALUES (?, ?, ?)",
                        (id, name, json.dumps(doc)))

    def put_encoded(self, kind: str, id: str, name: str | None, text: str) -> None:
        """put for a document already encoded as JSON text (a large one: no dicts and lists made on the way)."""
        self.db.execute(f"INSERT OR REPLACE INTO {kind} (id, name, doc) VALUES (?, ?, ?)", (id, name, text))

    def insert(self, kind: str, id: str, name: str | None, doc: dict) -> None:
        """A new document; Conflict if its id or name is taken (put would silently replace that one)."""
        try:
            self.db.execute(f"INSERT INTO {kind} (id, name, doc) VALUES (?, ?, ?)", (id, name, json.dumps(doc)))
        except sqlite3.IntegrityError:
            raise Conflict(f"{kind} {name or id!r} already exists") from None

    def delete(self, kind: str, id: str) -> None:
        self.db.execute(f"DELETE FROM {kind} WHERE id = ?", (id,))

    def get(self, kind: str, id: str) -> dict | None:
        row = self.db.execute(f"SELECT doc FROM {kind} WHERE id = ?", (id,)).fetchone()
        return json.loads(row[0]) if row else None

    def by_name(self, kind: str, name: str) -> dict | None:
        row = self.db.execute(f"SELECT doc FROM {kind} WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def find(self, kind: str, ref: str) -> dict | None:
        """Docker-style reference: full id, name, or unique id prefix (taken literally: not a LIKE pattern)."""
        doc = self.get(kind, ref) or self.by_name(kind, ref)
        if doc is None and len(ref) >= 3:
            rows = self.db.execute(f"SELECT doc FROM {kind} WHERE substr(id, 1, ?) = ? LIMIT 2",
                                   (len(ref), ref)).fetchall()
            if len(rows) == 1:
                doc = json.loads(rows[0][0])
        return doc

    def list(self, kind: str) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute(f"SELECT doc FROM {kind} ORDER BY rowid")]

    def containing(self, kind: str, text: str) -> list[dict]:
        """Documents whose JSON text contains `text`: a pre-filter run inside SQLite (a poll over thousands of
        documents that wants a few must not decode them all); the caller checks what it gets."""
        return [json.loads(r[0]) for r in self.db.execute(f"SELECT doc FROM {kind} WHERE instr(doc, ?) > 0 "
                                                          "ORDER BY rowid", (text,))]

    def with_name_prefix(self, kind: str, prefix: str) -> list[dict]:
        """Documents whose name starts with prefix (taken literally), in name order."""
        # A range on the name's unique index (names compare as UTF-8 bytes; U+10FFFF sorts after any other).
        rows = self.db.execute(f"SELECT doc FROM {kind} WHERE name >= ? AND name < ? ORDER BY name",
                               (prefix, prefix + "\U0010ffff")).fetchall()
        return [json.loads(r[0]) for r in rows]

    def clear(self, kind: str) -> None:
        """Delete every document of a kind (inside the caller's transaction, if any)."""
        self.db.execute(f"DELETE FROM {kind}")

    def close(self) -> None:
        self.db.close()


def endpoint_name(owner, network_id: str) -> str:
    """The unique name of an endpoint record: its owner (kind and ID) and its network."""
    return f"{owner_prefix(owner.kind, owner.id)}{network_id}"


def owner_prefix(kind: str, owner_id: str) -> str:
    """The name prefix of every endpoint record of one owner."""
    return f"{kind}/{owner_id}/"


def get_setting(store: Store, key: str) -> dict | None:
    return store.get("settings", key)


def put_setting(store: Store, key: str, doc: dict) -> None:
    with store.tx():
        store.put("settings", key, key, doc)


def put_setting_encoded(store: Store, key: str, text: str) -> None:
    with store.tx():
        store.put_encoded("settings", key, key, text)

