"""The cluster store: the managers' state as versioned objects behind one small async interface.

Shaped after etcd v3 (and flannel's pkg/subnet above it) so that an etcd backend can replace the
SQLite one without touching a caller:

- every object is a (kind, key) -> value (bytes, the caller's encoding) with the revision that created
  it and the one that last changed it (`mod_rev`);
- every successful write transaction makes exactly one new store-wide revision;
- `txn(compares, ops)`: if every compare holds, all ops land in one revision, else none does and the
  caller re-reads and retries (an allocation does that: compare on the object whose version covers
  what it allocated from, write the allocation and that object together);
- `watch(since)`: every revision after `since`, in order, from a history that survives restarts;
  `Compacted` when `since` is older than the kept history (the watcher lists afresh).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Literal

import msgspec


class Record(msgspec.Struct, frozen=True):
    kind: str
    key: str
    value: bytes
    create_rev: int
    mod_rev: int


class Compare(msgspec.Struct, frozen=True):
    """Holds when the object's mod revision is `mod_rev`; mod_rev 0 means: the object does not exist."""
    kind: str
    key: str
    mod_rev: int


class Put(msgspec.Struct, frozen=True):
    """lease: the etcd lease the object lives with (it goes when the lease expires); 0 for none. A store
    without leases (SQLite, one manager) keeps the object until it is deleted."""
    kind: str
    key: str
    value: bytes
    lease: int = 0


class Delete(msgspec.Struct, frozen=True):
    """Deleting an object that does not exist is no change (and no event)."""
    kind: str
    key: str


class Event(msgspec.Struct, frozen=True):
    """One object changed at `rev`. `value` is the new value, or for a delete the object's last value."""
    rev: int
    kind: str
    key: str
    action: Literal["put", "delete"]
    value: bytes


class Changes(msgspec.Struct, frozen=True):
    """Everything one revision changed, in the order of the transaction's ops."""
    rev: int
    events: list[Event]


class TxnResult(msgspec.Struct, frozen=True):
    """ok: the ops landed at `rev`. Not ok: a compare failed; `rev` is the store's revision then."""
    ok: bool
    rev: int


class Compacted(Exception):
    """The revisions asked for are no longer kept; list the objects afresh."""

    def __init__(self, since: int, compacted: int):
        super().__init__(f"revision {since} is older than the kept history (compacted up to {compacted})")
        self.since, self.compacted = since, compacted


class ClusterStore(ABC):
    """The interface the managers use. Implementations: store/sqlite.py (one manager); etcd next."""

    @abstractmethod
    async def get(self, kind: str, key: str) -> Record | None:
        """One object, or None."""

    @abstractmethod
    async def list(self, kind: str, prefix: str = "") -> tuple[int, list[Record]]:
        """The objects of a kind whose key starts with prefix (ordered by key), and the revision read at."""

    @abstractmethod
    async def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> TxnResult:
        """All ops in one new revision if every compare holds; else nothing. A key appears in ops at most once."""

    @abstractmethod
    async def revision(self) -> int:
        """The current revision (0 for an empty store)."""

    @abstractmethod
    def watch(self, since: int) -> AsyncIterator[Changes]:
        """Every revision after `since`, in order, then each new one as it commits; never ends by itself.
        Raises Compacted (on the first iteration) when `since` is older than the kept history."""

    async def snapshot(self, kinds: tuple[str, ...]) -> tuple[int, dict[str, list[Record]]]:
        """Every object of these kinds, read at one revision (retried until the kinds agree)."""
        while True:
            lists = [await self.list(kind) for kind in kinds]
            if len({rev for rev, _ in lists}) == 1:
                return lists[0][0], {kind: recs for kind, (_, recs) in zip(kinds, lists)}

    @abstractmethod
    async def close(self) -> None:
        """Release the store; watches end."""


def key_range(prefix: str) -> tuple[str, str | None]:
    """[start, end) of the keys starting with prefix (end None: no upper bound), as etcd's range_end."""
    if not prefix:
        return "", None
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
