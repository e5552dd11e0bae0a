"""The cluster store (netweft/store/api.py) and its SQLite backend: compare-and-write transactions,
get/list, revisions, the watch from a revision, history across restarts, compaction, file modes."""
from __future__ import annotations

import asyncio
import os
import stat

import pytest

from netweft.store import sqlite as sqlite_store
from netweft.store.api import Compacted, Compare, Delete, Put
from netweft.store.sqlite import SQLiteStore


def run(coro):
    return asyncio.run(coro)


async def opened(tmp_path, name="cluster.db", **kw) -> SQLiteStore:
    return await SQLiteStore.open(str(tmp_path / "swarm" / name), **kw)


async def next_changes(it, timeout=5.0):
    return await asyncio.wait_for(it.__anext__(), timeout)


def test_puts_make_one_revision_each_and_records_carry_create_and_mod_revisions(tmp_path):
    async def main():
        s = await opened(tmp_path)
        assert await s.revision() == 0
        r1 = await s.txn([], [Put("nodes", "a", b'{"n":1}'), Put("nodes", "b", b'{"n":2}')])
        r2 = await s.txn([], [Put("nodes", "a", b'{"n":3}')])
        assert (r1.ok, r1.rev, r2.ok, r2.rev) == (True, 1, True, 2)
        a = await s.get("nodes", "a")
        assert (a.value, a.create_rev, a.mod_rev) == (b'{"n":3}', 1, 2)
        assert await s.get("nodes", "zz") is None
        rev, recs = await s.list("nodes")
        assert rev == 2 and [r.key for r in recs] == ["a", "b"]
        await s.close()
    run(main())


def test_list_by_prefix_and_kind(tmp_path):
    async def main():
        s = await opened(tmp_path)
        await s.txn([], [Put("allocations", k, b"{}") for k in ("net/a1", "net/a2", "net/b1", "node/a1", "networks")]
                    + [Put("nodes", "net/a9", b"{}")])
        _, recs = await s.list("allocations", "net/a")
        assert [r.key for r in recs] == ["net/a1", "net/a2"]
        _, recs = await s.list("allocations", "net/")
        assert [r.key for r in recs] == ["net/a1", "net/a2", "net/b1"]
        _, recs = await s.list("allocations")
        assert len(recs) == 5
        await s.close()
    run(main())


def test_a_failed_compare_changes_nothing_and_a_retry_on_fresh_state_lands(tmp_path):
    async def main():
        s = await opened(tmp_path)
        await s.txn([], [Put("allocations", "net/x", b"{}")])
        guard = (await s.get("allocations", "net/x")).mod_rev
        # Two allocators read the same guard; the first one to write wins...
        first = await s.txn([Compare("allocations", "net/x", guard)],
                            [Put("endpoints", "e1", b'{"ip":"198.18.0.2"}'), Put("allocations", "net/x", b"{}")])
        second = await s.txn([Compare("allocations", "net/x", guard)],
                             [Put("endpoints", "e2", b'{"ip":"198.18.0.2"}'), Put("allocations", "net/x", b"{}")])
        assert first.ok and not second.ok and second.rev == first.rev
        assert await s.get("endpoints", "e2") is None  # all or nothing: no part of it landed
        # ...the second re-reads, decides again, and lands.
        guard = (await s.get("allocations", "net/x")).mod_rev
        again = await s.txn([Compare("allocations", "net/x", guard)],
                            [Put("endpoints", "e2", b'{"ip":"198.18.0.3"}'), Put("allocations", "net/x", b"{}")])
        assert again.ok and again.rev == first.rev + 1
        await s.close()
    run(main())


def test_compare_on_absence(tmp_path):
    async def main():
        s = await opened(tmp_path)
        assert (await s.txn([Compare("names", "ov", 0)], [Put("names", "ov", b'"id1"')])).ok
        assert not (await s.txn([Compare("names", "ov", 0)], [Put("names", "ov", b'"id2"')])).ok
        assert (await s.get("names", "ov")).value == b'"id1"'
        await s.close()
    run(main())


def test_deleting_nothing_is_no_revision_and_a_key_appears_once_per_transaction(tmp_path):
    async def main():
        s = await opened(tmp_path)
        r = await s.txn([], [Delete("nodes", "ghost")])
        assert r.ok and r.rev == 0 and await s.revision() == 0
        with pytest.raises(ValueError):
            await s.txn([], [Put("nodes", "a", b"{}"), Delete("nodes", "a")])
        await s.close()
    run(main())


def test_watch_gives_history_then_live_changes_with_deleted_values(tmp_path):
    async def main():
        s = await opened(tmp_path)
        await s.txn([], [Put("nodes", "a", b'"a1"')])
        await s.txn([], [Put("nodes", "b", b'"b1"')])
        it = s.watch(0)
        c1, c2 = await next_changes(it), await next_changes(it)
        assert (c1.rev, c1.events[0].key, c2.rev) == (1, "a", 2)
        await s.txn([], [Delete("nodes", "a"), Put("nodes", "c", b'"c1"')])
        c3 = await next_changes(it)
        assert c3.rev == 3
        assert [(e.action, e.key, e.value) for e in c3.events] == [("delete", "a", b'"a1"'), ("put", "c", b'"c1"')]
        # From the middle: only what came after.
        it2 = s.watch(2)
        assert (await next_changes(it2)).rev == 3
        await it.aclose()
        await it2.aclose()
        await s.close()
    run(main())


def test_revision_and_history_survive_a_restart(tmp_path):
    async def main():
        s = await opened(tmp_path)
        for i in range(5):
            await s.txn([], [Put("endpoints", f"e{i}", b"{}")])
        await s.close()
        s = await opened(tmp_path)
        assert await s.revision() == 5
        assert (await s.get("endpoints", "e4")).mod_rev == 5
        it = s.watch(3)  # an agent that had revision 3 before the manager restarted
        assert [(await next_changes(it)).rev for _ in range(2)] == [4, 5]
        await it.aclose()
        assert (await s.txn([], [Put("endpoints", "e5", b"{}")])).rev == 6
        await s.close()
    run(main())


def test_a_watch_from_before_the_kept_history_is_told_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "COMPACT_EVERY", 5)
    async def main():
        s = await opened(tmp_path, history=10)
        for i in range(30):
            await s.txn([], [Put("endpoints", f"e{i % 3}", str(i).encode())])
        it = s.watch(2)
        with pytest.raises(Compacted):
            await next_changes(it)
        it = s.watch(25)  # recent enough
        assert (await next_changes(it)).rev == 26
        await it.aclose()
        # The objects themselves stay whole.
        _, recs = await s.list("endpoints")
        assert len(recs) == 3
        await s.close()
    run(main())


def test_commits_of_another_process_reach_a_watch(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "POLL", 0.05)
    async def main():
        s = await opened(tmp_path)
        other = await opened(tmp_path)  # another connection to the same file: a tool, another process
        it = s.watch(0)
        assert (await other.txn([], [Put("endpoints", "x", b"{}")])).rev == 1
        c = await next_changes(it, timeout=5)
        assert c.rev == 1 and c.events[0].key == "x"
        # Transactions of both interleave on one revision sequence, compares included.
        assert (await s.txn([Compare("endpoints", "x", 1)], [Put("endpoints", "x", b"{}")])).rev == 2
        assert not (await other.txn([Compare("endpoints", "x", 1)], [Delete("endpoints", "x")])).ok
        await it.aclose()
        await other.close()
        await s.close()
    run(main())


def test_concurrent_allocations_never_hand_out_one_address_twice(tmp_path):
    """Two managers' worth of allocators on one store: compare the guard, retry on conflict."""
    async def main():
        a, b = await opened(tmp_path), await opened(tmp_path)

        async def allocate(store, owner):
            while True:
                guard = await store.get("allocations", "net/x")
                _, eps = await store.list("endpoints")
                used = {int(r.value) for r in eps}
                ip = min(set(range(2, 100)) - used)
                r = await store.txn([Compare("allocations", "net/x", guard.mod_rev if guard else 0)],
                                    [Put("endpoints", owner, str(ip).encode()), Put("allocations", "net/x", b"{}")])
                if r.ok:
                    return ip
        ips = await asyncio.gather(*(allocate(a if i % 2 else b, f"c{i}") for i in range(20)))
        assert sorted(ips) == list(range(2, 22))
        await a.close()
        await b.close()
    run(main())


def test_store_file_and_directory_are_private_whatever_the_umask(tmp_path):
    async def main():
        old = os.umask(0)
        try:
            s = await opened(tmp_path)
            await s.txn([], [Put("cluster", "cluster", b'{"join_tokens":"secret"}')])
        finally:
            os.umask(old)
        files = [f for f in os.listdir(tmp_path / "swarm")]
        assert "cluster.db" in files and "cluster.db-wal" in files
        for f in files:
            assert stat.S_IMODE(os.stat(tmp_path / "swarm" / f).st_mode) == 0o600, f
        assert stat.S_IMODE(os.stat(tmp_path / "swarm").st_mode) == 0o700
        await s.close()
    run(main())


def test_a_closed_store_ends_its_watches(tmp_path):
    async def main():
        s = await opened(tmp_path)
        it = s.watch(0)
        task = asyncio.ensure_future(next_changes(it))
        await asyncio.sleep(0.05)
        await s.close()
        with pytest.raises(StopAsyncIteration):
            await task
    run(main())
