"""The manager's watch (netweft/manager/watch.py) and allocations (netweft/manager/overlays.py) on a real
SQLite cluster store, without sockets: scope per node, resume from a revision (also across a restart),
snapshot fallback, the bounded queue, one encoding per batch, Attachments, and the refusals."""
from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest

from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound
from netweft.manager.overlays import AttachQuery, Overlays
from netweft.manager.watch import Hub
from netweft.model import codec
from netweft.model.objects import Node, Owner
from netweft.model.watch import Attachment, EndpointRequest, Events, Ping, Snapshot, WatchMessage
from netweft.store import sqlite as sqlite_store
from netweft.store.api import Put
from netweft.store.sqlite import SQLiteStore

SPEC = {"DefaultAddrPool": ["198.18.0.0/15"], "SubnetSize": 24}
message = msgspec.json.Decoder(WatchMessage)


def run(coro):
    return asyncio.run(coro)


class Manager:
    """A store, its hub and the overlay allocations: what the cluster API runs on, minus HTTP."""

    @classmethod
    async def open(cls, path, **hub_opts) -> "Manager":
        m = cls()
        m.store = await SQLiteStore.open(str(path))
        m.hub = Hub(m.store, **hub_opts)
        await m.hub.start()
        m.ov = Overlays(m.hub, lambda: SPEC)
        return m

    async def close(self):
        await self.hub.stop()
        await self.store.close()

    async def node(self, name: str, addr: str, role: str = "worker") -> str:
        """A node (a manager's node event reaches every watcher; a worker's, those sharing a network)."""
        node = Node(id=name, hostname=name, role=role, addr=addr)
        r = await self.store.txn([], [Put("nodes", node.id, codec.encode(node))])
        await self.hub.wait(r.rev)
        return node.id

    async def net(self, name: str, subnet: str | None = None, **extra) -> str:
        body = {"Name": name, "Driver": "overlay", "Attachable": True, **extra}
        if subnet:
            body["IPAM"] = {"Config": [{"Subnet": subnet}]}
        return (await self.ov.create_network(body))["id"]

    async def attach(self, node: str, net: str, owner: str, query: AttachQuery | None = None, **req) -> Attachment:
        raw = await self.ov.create_endpoint(node, EndpointRequest(network_id=net, owner=Owner(kind="netweft", id=owner),
                                                                  **req), query)
        return codec.decode(raw, Attachment)


def pending(w) -> list:
    """Decoded messages queued for a watcher (as its stream would send them next)."""
    return [message.decode(line) for _, frame in w.frames for line in frame.splitlines()]


def ids(msgs, kind) -> list[str]:
    return [e.object.id for m in msgs if isinstance(m, Events) for e in m.events
            if type(e).__name__.lower().startswith(kind)]


async def take(gen, n: int, timeout=5.0) -> list:
    out = []
    while len(out) < n:
        data = await asyncio.wait_for(gen.__anext__(), timeout)
        out += [message.decode(line) for line in data.splitlines()]
    return out


# ------------------------------------------------------------------ scope

def test_each_node_hears_of_nodes_and_of_the_networks_it_has_endpoints_on_or_asked_for(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b, c = [await m.node(n, f"192.0.2.{i}") for i, n in enumerate("abc", 1)]
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        await m.attach(a, n1, "ca")
        await m.attach(b, n2, "cb")
        wa = m.hub.subscribe(a, "a", m.hub.state.rev)
        wb = m.hub.subscribe(b, "b", m.hub.state.rev)
        wc = m.hub.subscribe(c, "c", m.hub.state.rev)
        wx = m.hub.subscribe("e", "e", m.hub.state.rev, frozenset({n1}))  # e asks for n1 by ID

        att = await m.attach(c, n1, "cc")  # c's first endpoint on n1: n1 enters c's scope
        assert ids(pending(wa), "endpoint") == [att.endpoint.id]
        assert ids(pending(wb), "endpoint") == []
        assert ids(pending(wc), "endpoint") == [att.endpoint.id]
        assert ids(pending(wx), "endpoint") == [att.endpoint.id]
        await m.ov.delete_endpoint(c, att.endpoint.id)  # ...and leaves it with its last one: still told
        assert ids(pending(wc), "endpoint") == [att.endpoint.id] * 2
        assert ids(pending(wb), "endpoint") == []
        # c's first endpoint on n1 brought c's node along to n1's watchers (they may never have heard of it);
        # a node on no network of theirs reaches nobody else.
        assert ids(pending(wa), "node") == ["c"] and ids(pending(wb), "node") == []
        await m.node("d", "192.0.2.4")
        for w in (wa, wb, wc):
            assert "d" not in ids(pending(w), "node")
        # A network nobody has endpoints on reaches only those who asked for it, its removal too.
        n3 = await m.net("n3", "198.18.3.0/24")
        wy = m.hub.subscribe(a, "a", m.hub.state.rev, frozenset({n3}))
        await m.ov.remove_network(n3)
        assert [type(e).__name__ for msg in pending(wy) for e in msg.events] == ["NetworkEvent"]
        assert not any("NetworkEvent" == type(e).__name__ for msg in pending(wa) for e in msg.events)
        await m.close()
    run(main())


def test_a_snapshot_holds_every_node_and_only_the_nodes_networks_with_their_endpoints(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        e1 = (await m.attach(a, n1, "x")).endpoint.id
        e2 = (await m.attach(b, n1, "y")).endpoint.id
        await m.attach(b, n2, "z")
        w = m.hub.subscribe(a, "a", 0)
        snap = message.decode(b"".join(w.first))
        assert isinstance(snap, Snapshot) and snap.rev == m.hub.state.rev
        assert {n.id for n in snap.nodes} == {a, b}
        assert [n.id for n in snap.networks] == [n1]
        assert {e.id for e in snap.endpoints} == {e1, e2}
        await m.close()
    run(main())


def test_watchers_with_one_selection_share_one_encoded_frame(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24")
        d = await m.node("d", "192.0.2.4")
        await m.attach(a, n1, "x")
        await m.attach(b, n1, "y")
        await m.attach(d, n1, "w")
        ws = [m.hub.subscribe(node, node, m.hub.state.rev) for node in (a, b, d)]
        await m.node("c", "192.0.2.3", role="manager")
        await m.attach("c", n1, "z")
        frames = [[f for _, f in w.frames] for w in ws]
        assert len(frames[0]) == 2
        for i in range(2):  # the same bytes object, not equal copies
            assert frames[0][i] is frames[1][i] is frames[2][i]
        await m.close()
    run(main())


# ------------------------------------------------------------------ resume and snapshot fallback

def test_resume_sends_the_missed_events_of_the_current_scope_then_live_ones_and_pings(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db", ping=0.05)
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        await m.attach(a, n1, "x")
        since = m.hub.state.rev  # the agent of a had this, then lost its stream
        mine = (await m.attach(b, n1, "y")).endpoint.id
        await m.attach(b, n2, "z")  # not in a's scope
        w = m.hub.subscribe(a, "a", since)
        assert w.first is None
        gen = m.hub.frames(w)
        msgs = await take(gen, 1)
        assert [type(x).__name__ for x in msgs] == ["Events"] and ids(msgs, "endpoint") == [mine]
        assert msgs[0].rev == since + 1
        later = (await m.attach(b, n1, "later")).endpoint.id
        msgs = await take(gen, 1)
        assert ids(msgs, "endpoint") == [later]
        msgs = await take(gen, 1)  # nothing more for a: a ping with the current revision
        assert isinstance(msgs[0], Ping) and msgs[0].rev == m.hub.state.rev
        await gen.aclose()
        await m.close()
    run(main())


def test_revision_and_history_survive_a_manager_restart_so_agents_resume_with_events(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24")
        await m.attach(a, n1, "x")
        since = m.hub.state.rev
        missed = (await m.attach(b, n1, "y")).endpoint.id
        before = m.hub.state.rev
        await m.close()

        m = await Manager.open(tmp_path / "c.db")  # the leader's daemon restarted
        assert m.hub.state.rev == before
        w = m.hub.subscribe(a, "a", since)
        assert w.first is None  # no snapshot
        msgs = await take(m.hub.frames(w), 1)
        assert isinstance(msgs[0], Events) and ids(msgs, "endpoint") == [missed]
        # New revisions continue the old sequence.
        assert (await m.attach(b, n1, "z")).rev == before + 1
        await m.close()
    run(main())


def test_a_resume_from_before_the_kept_history_gets_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "COMPACT_EVERY", 2)
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        m.store.history = 3  # the change log keeps 3 revisions
        a = await m.node("a", "192.0.2.1")
        n1 = await m.net("n1", "198.18.1.0/24")
        await m.attach(a, n1, "x")
        for i in range(6):
            await m.node(f"n{i}", f"192.0.2.{10 + i}", role="manager")
        await m.close()
        m = await Manager.open(tmp_path / "c.db")   # restarted: nothing before its start is in its memory
        w = m.hub.subscribe(a, "a", 1)
        msgs = await take(m.hub.frames(w), 1)
        assert isinstance(msgs[0], Snapshot) and msgs[0].rev == m.hub.state.rev
        assert len(msgs[0].nodes) == 7 and [n.id for n in msgs[0].networks] == [n1]
        # A revision from the future (another cluster's store) gets one too.
        assert m.hub.subscribe(a, "a", 10_000).first is not None
        await m.close()
    run(main())


# ------------------------------------------------------------------ bounded queue

def test_a_slow_watcher_is_cut_off_and_resumes_from_its_revision(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db", max_frames=3)
        a = await m.node("a", "192.0.2.1")
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        gen = m.hub.frames(w)
        await m.node("b", "192.0.2.2", role="manager")
        got = await take(gen, 1)
        had = w.rev = got[-1].rev
        for i in range(5):  # the agent reads nothing meanwhile
            await m.node(f"x{i}", f"192.0.2.{20 + i}", role="manager")
        assert w.ended and w.ended.startswith("cut off") and w not in m.hub.watchers
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(gen.__anext__(), 5)
        # It comes back from the revision it had: the missed events, not a snapshot.
        w2 = m.hub.subscribe(a, "a", had)
        msgs = await take(m.hub.frames(w2), 5)
        assert ids(msgs, "node") == [f"x{i}" for i in range(5)]
        await m.close()
    run(main())


def test_a_node_has_one_watch_stream_a_new_one_ends_the_old(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24")
        olds = [m.hub.subscribe(a, "a", 0, frozenset({n1})) for _ in range(5)]
        wb = m.hub.subscribe(b, "b", 0)
        new = m.hub.subscribe(a, "a", m.hub.state.rev)
        assert [w for w in m.hub.watchers if w.node_id == a] == [new] and wb in m.hub.watchers
        for w in olds:
            assert w.ended == "replaced by a newer watch stream of this node" and not w.frames
        with pytest.raises(StopAsyncIteration):  # the old stream ends after what it was sent first
            gen = m.hub.frames(olds[0])
            await asyncio.wait_for(gen.__anext__(), 5)
            await asyncio.wait_for(gen.__anext__(), 5)
        await m.node("c", "192.0.2.3", role="manager")
        assert ids(pending(new), "node") == ["c"] and ids(pending(wb), "node") == ["c"]
        await m.close()
    run(main())


def test_queue_bounds_count_frames_and_bytes():
    from netweft.manager.watch import Watcher
    w = Watcher("a", "a", frozenset(), max_frames=10, max_bytes=100)
    assert w.offer(1, b"x" * 300)  # one frame always fits, however big
    assert not w.offer(2, b"y")
    w.take()
    assert all(w.offer(i, b"z" * 10) for i in range(10)) and not w.offer(11, b"z")


# ------------------------------------------------------------------ allocations and attachments

def test_an_attachment_carries_the_network_at_the_creations_revision(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24")
        first = await m.attach(a, n1, "x", aliases=["web"])
        assert (first.endpoint.ip, first.endpoint.mac, first.endpoint.vtep) == ("198.18.1.2", "02:42:c6:12:01:02",
                                                                               "192.0.2.1")
        att = await m.attach(b, n1, "y", ip="198.18.1.50", mac="02:00:00:00:00:50")
        assert att.rev == m.hub.state.rev and att.network.id == n1
        assert {e.id for e in att.endpoints} == {first.endpoint.id, att.endpoint.id}
        assert att.endpoint.ip_requested and att.endpoint.mac == "02:00:00:00:00:50"
        assert (await m.attach(b, n1, "z")).endpoint.ip == "198.18.1.3"  # lowest free
        # A retried request gets the endpoint it made, not a second one.
        again = await m.attach(b, n1, "y")
        assert again.endpoint.id == att.endpoint.id and len(m.hub.state.endpoints_of(n1)) == 3
        await m.close()
    run(main())


def test_addresses_are_reused_lowest_first_after_a_delete(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a = await m.node("a", "192.0.2.1")
        n1 = await m.net("n1", "198.18.1.0/28")
        eps = [(await m.attach(a, n1, f"c{i}")).endpoint for i in range(5)]
        assert [e.ip for e in eps] == [f"198.18.1.{i}" for i in range(2, 7)]
        await m.ov.delete_endpoint(a, eps[1].id)
        assert (await m.attach(a, n1, "again")).endpoint.ip == "198.18.1.3"
        assert (await m.attach(a, n1, "next")).endpoint.ip == "198.18.1.7"
        await m.close()
    run(main())


def test_two_managers_on_one_store_never_hand_out_an_address_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "POLL", 0.02)
    async def main():
        m1 = await Manager.open(tmp_path / "c.db")
        a = await m1.node("a", "192.0.2.1")
        n1 = await m1.net("n1", "198.18.1.0/24")
        m2 = await Manager.open(tmp_path / "c.db")  # a second manager: its own view, the same store
        atts = await asyncio.gather(*((m1 if i % 2 else m2).attach(a, n1, f"c{i}") for i in range(30)))
        ips = [x.endpoint.ip for x in atts]
        assert len(set(ips)) == 30
        await m1.hub.sync()
        assert len(m1.hub.state.endpoints_of(n1)) == 30
        # Both views agree on the networks too: a name taken through one is refused through the other.
        await m2.net("n2", "198.18.2.0/24")
        await m1.hub.sync()
        with pytest.raises(Conflict, match="already exists"):
            await m1.net("n2", "198.18.3.0/24")
        await m2.close()
        await m1.close()
    run(main())


def test_a_retried_attachment_carries_the_revision_its_endpoints_were_read_at(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "POLL", 30.0)  # m1 hears of m2's writes only when it asks

    async def main():
        m1 = await Manager.open(tmp_path / "c.db")
        a, b = await m1.node("a", "192.0.2.1"), await m1.node("b", "192.0.2.2")
        n1 = await m1.net("n1", "198.18.1.0/24")
        first = await m1.attach(a, n1, "x")
        m2 = await Manager.open(tmp_path / "c.db")
        other = await m2.attach(b, n1, "y")  # through another manager: m1 does not know it yet
        again = await m1.attach(a, n1, "x")  # the agent of a retries
        assert again.endpoint.id == first.endpoint.id
        # The endpoints in the answer are those of the network at again.rev, whatever that revision is.
        assert again.rev < other.rev or other.endpoint.id in {e.id for e in again.endpoints}, \
            (again.rev, other.rev)
        await m2.close()
        await m1.close()
    run(main())


def test_refusals(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24", Options={"com.docker.network.driver.overlay.vxlanid_list": "5000"})
        svc = (await m.ov.create_network({"Name": "svc", "Driver": "overlay"}))["id"]  # not attachable
        x = await m.attach(a, n1, "x", mac="02:00:00:00:00:01")
        rev = m.hub.state.rev
        cases = [
            (m.attach(b, svc, "y"), Forbidden, "not attachable"),
            (m.attach(b, n1, "y", mac="02:00:00:00:00:01"), Conflict, "MAC address 02:00:00:00:00:01 is already used"),
            (m.attach(b, n1, "y", ip=x.endpoint.ip), Conflict, "already in use"),
            (m.attach(b, n1, "y", ip="198.18.9.9"), InvalidRequest, "not inside"),
            (m.attach(b, n1, "y", mac="01:00:00:00:00:01"), InvalidRequest, "multicast"),
            (m.attach(b, n1, "y", mac="00:00:00:00:00:00"), InvalidRequest, "all-zero"),
            (m.attach(b, n1, "y", mac="ff:ff:ff:ff:ff:ff"), InvalidRequest, "broadcast"),
            (m.attach(b, n1, "y", aliases=["bad name"]), InvalidRequest, "aliases"),
            (m.attach(b, n1, "y", aliases=["web\n"]), InvalidRequest, "aliases"),
            (m.attach("ghost", n1, "y"), Forbidden, "not a member"),
            (m.attach(b, "f" * 64, "y"), NotFound, "not found"),
            (m.net(n1), Conflict, "is the ID of another network"),
            (m.net("n1"), Conflict, "already exists"),
            (m.net("n9", "198.18.1.128/25"), Conflict, "overlaps"),
            (m.net("n9", "127.0.0.0/24"), InvalidRequest, "the loopback range"),
            (m.net("n9", "0.0.0.0/0"), InvalidRequest, "larger than any network needs"),
            (m.net("n9", Options={"com.docker.network.driver.overlay.vxlanid_list": "5000"}), Conflict,
             "already used"),
            (m.net("n9", Options={"foo": "bar"}), InvalidRequest, "unknown overlay driver option 'foo'"),
            (m.net("n9", Options={"com.docker.network.driver.overlay.vxlanid_list": "+5"}), InvalidRequest,
             "invalid VXLAN ID '+5'"),
            (m.net("n9", Options={"com.docker.network.driver.mtu": "20"}), InvalidRequest, "invalid MTU 20"),
            (m.net("n9", Options={"encrypted": "no"}), InvalidRequest, "invalid -o encrypted='no'"),
            (m.net("n9", "198.19.244.0/24"), Conflict, "tunnel addresses (reserved)"),
            (m.net("n9", "198.19.0.0/16"), Conflict, "tunnel addresses (reserved)"),
            (m.net("n9\n"), InvalidRequest, "invalid network name"),
            (m.ov.create_network({"Name": 5}), InvalidRequest, "$.Name"),
            (m.ov.create_network({"Name": "n9", "Driver": "bridge"}), InvalidRequest, "overlay networks only"),
            (m.ov.remove_network("n1"), Conflict, "has endpoints"),
            (m.ov.delete_endpoint(b, x.endpoint.id), Forbidden, "another node"),
        ]
        for coro, error, words in cases:
            with pytest.raises(error) as e:
                await coro
            assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert m.hub.state.rev == rev  # nothing was written
        await m.ov.delete_endpoint(a, "0" * 64)  # deleting what is gone is fine
        await m.close()
    run(main())


def test_a_node_holds_at_most_its_quota_of_endpoints(tmp_path, monkeypatch):
    from netweft.manager import overlays
    monkeypatch.setattr(overlays, "MAX_NODE_ENDPOINTS", 3)

    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        await m.attach(a, n1, "x")
        await m.attach(a, n2, "x")
        third = await m.attach(a, n1, "y")
        rev = m.hub.state.rev
        with pytest.raises(Conflict, match="already holds 3 overlay endpoints") as e:
            await m.attach(a, n2, "z")
        assert "\n" not in str(e.value) and m.hub.state.rev == rev  # nothing stored
        assert (await m.attach(a, n1, "y")).endpoint.id == third.endpoint.id  # a retry is no new endpoint
        await m.attach(b, n2, "z")  # other nodes are not held back
        await m.ov.delete_endpoint(a, third.endpoint.id)
        await m.attach(a, n2, "z")  # room again
        await m.close()
    run(main())


def test_a_worker_request_cannot_carry_fields_that_bypass_the_attachable_check():
    # "Service" (or anything else unknown) is refused before anything is looked at.
    body = json.dumps({"network_id": "a" * 64, "owner": {"kind": "netweft", "id": "c"}, "Service": True})
    with pytest.raises(InvalidRequest, match="Service"):
        codec.decode(body, EndpointRequest)


def test_an_anchored_attachment_carries_no_endpoints_only_when_the_anchor_vouches_for_the_askers_copy(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        first = await m.attach(a, n1, "x")
        assert not first.partial and len(first.endpoints) == 1
        theirs = await m.attach(b, n1, "y")
        other = await m.attach(a, n2, "o")
        # a's copy of n1 is current at first.rev or later, and its endpoint x has been there since first.rev
        att = await m.attach(a, n1, "z", AttachQuery(anchor=first.endpoint.id, since=first.rev))
        assert att.partial and att.endpoints == [] and att.endpoint.node_id == a and att.rev == m.hub.state.rev
        # A copy older than the anchor, another node's endpoint, another network's: the whole state.
        for q in (AttachQuery(anchor=first.endpoint.id, since=first.rev - 1),
                  AttachQuery(anchor=att.endpoint.id, since=first.rev),
                  AttachQuery(anchor=theirs.endpoint.id, since=m.hub.state.rev),
                  AttachQuery(anchor=other.endpoint.id, since=m.hub.state.rev)):
            full = await m.attach(a, n1, "w", q)
            assert not full.partial and len(full.endpoints) == 4
        full = await m.attach(b, n1, "v", AttachQuery(anchor=first.endpoint.id, since=m.hub.state.rev))
        assert not full.partial and len(full.endpoints) == 5
        # The anchor gone (the node purged, say): the whole state, whatever the revision.
        await m.ov.delete_endpoint(a, first.endpoint.id)
        full = await m.attach(a, n1, "u", AttachQuery(anchor=first.endpoint.id, since=m.hub.state.rev))
        assert not full.partial and len(full.endpoints) == 5
        # A reservation asks for none; a retried request answers the endpoint it made, also partially.
        res = await m.attach(a, n1, "u", AttachQuery(state=False))
        assert res.partial and res.endpoints == [] and res.endpoint.id == full.endpoint.id
        await m.close()
    run(main())


@pytest.mark.parametrize("query,words", [
    ({"anchor": "a1" * 32}, "together"), ({"since": "5"}, "together"),
    ({"anchor": "../x", "since": "5"}, "invalid anchor"), ({"anchor": "ab", "since": "-1"}, "invalid since"),
    ({"anchor": "ab", "since": "9" * 30}, "invalid since"), ({"state": "some"}, "invalid state"),
    ({"nets": "x"}, "unknown query parameter"),
])
def test_attach_query_refusals_are_one_line(query, words):
    with pytest.raises(InvalidRequest) as e:
        AttachQuery.parse(query)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_attach_query():
    q = AttachQuery.parse({"anchor": "ab12", "since": "42"})
    assert (q.state, q.anchor, q.since) == (True, "ab12", 42)
    q = AttachQuery.parse({"state": "none"})
    assert (q.state, q.anchor, q.since) == (False, None, None)
    assert AttachQuery.parse({}).state


def test_purging_a_node_removes_all_its_endpoints_in_one_revision(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        for net in (n1, n2):
            await m.attach(a, net, "x")
            await m.attach(b, net, "y")
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        count, _ = await m.hub.commit(lambda: m.ov.purge_plan(b))  # what leave and node rm commit
        assert count == 2
        msgs = pending(w)
        assert len(msgs) == 1 and [e.action for e in msgs[0].events] == ["delete", "delete"]
        assert {e.node_id for net in (n1, n2) for e in m.hub.state.endpoints_of(net)} == {a}
        await m.close()
    run(main())


def test_an_unreadable_object_in_the_store_is_skipped_and_the_rest_goes_on(tmp_path, caplog):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a = await m.node("a", "192.0.2.1")
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        r = await m.store.txn([], [Put("endpoints", "bad", b'{"id": 5}'), Put("widgets", "x", b"{}")])
        await m.hub.wait(r.rev)
        await m.node("b", "192.0.2.2", role="manager")
        assert ids(pending(w), "node") == ["b"]
        assert m.hub.state.get("endpoints", "bad") is None
        await m.close()
    run(main())
    errors = [r.msg for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["unreadable change in the cluster store skipped"]


@pytest.mark.parametrize("query, words", [({"since": "abc"}, "invalid since"), ({"since": "-1"}, "invalid since"),
                                          ({"since": "1" * 40}, "invalid since"),
                                          ({"networks": "ABC"}, "invalid network ID"),
                                          ({"networks": ",".join(["a"] * 2000)}, "too many networks")])
def test_watch_query_refusals_are_one_line(query, words):
    from netweft.manager.watch import parse_query
    with pytest.raises(InvalidRequest, match=words) as e:
        parse_query(query)
    assert "\n" not in str(e.value)


def test_watch_query():
    from netweft.manager.watch import parse_query
    assert parse_query({}) == (0, frozenset())
    assert parse_query({"since": "42", "networks": "ab1,cd2,"}) == (42, frozenset({"ab1", "cd2"}))


# ------------------------------------------------------------------ coalesced writes

def test_a_quiet_watcher_writes_at_once_a_busy_one_waits_for_its_gap():
    from netweft.manager.watch import coalesce_wait
    assert coalesce_wait(now=100.0, wrote=-1e9, watchers=1000) == 0.0          # first write: at once
    assert coalesce_wait(now=100.0, wrote=99.0, watchers=1000) == 0.0          # quiet for a second: at once
    assert coalesce_wait(now=100.0, wrote=99.99, watchers=1000, per_watcher=50e-6) == pytest.approx(0.04)
    # The gap grows with the watchers, up to the cap.
    assert coalesce_wait(now=100.0, wrote=100.0, watchers=10, per_watcher=50e-6) == pytest.approx(0.0005)
    assert coalesce_wait(now=100.0, wrote=100.0, watchers=10**6, max_gap=0.5) == pytest.approx(0.5)


def test_a_burst_reaches_a_watcher_in_few_writes_in_order(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db", ping=5.0)
        a = await m.node("a", "192.0.2.1")
        n1 = await m.net("n1", "198.18.1.0/24")
        await m.attach(a, n1, "x")
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        gen = m.hub.frames(w)
        await m.node("b0", "192.0.2.10", role="manager")
        first = await asyncio.wait_for(gen.__anext__(), 5)     # after a quiet spell: at once, alone
        assert ids([message.decode(x) for x in first.splitlines()], "node") == ["b0"]
        import netweft.manager.watch as watch
        real, watch.MAX_GAP = watch.MAX_GAP, 0.2
        try:
            for i in range(1, 6):
                await m.node(f"b{i}", f"192.0.2.{10 + i}", role="manager")
            w.wrote = time.monotonic()                         # as if it had just written: it waits its gap
            data = await asyncio.wait_for(gen.__anext__(), 5)  # the five revisions in one write
        finally:
            watch.MAX_GAP = real
        msgs = [message.decode(x) for x in data.splitlines()]
        assert ids(msgs, "node") == [f"b{i}" for i in range(1, 6)]
        assert [x.rev for x in msgs] == sorted(x.rev for x in msgs)
        await gen.aclose()
        await m.close()
    run(main())


def test_select_for_picks_what_select_picks(tmp_path):
    from netweft.manager.watch import Batch
    b = Batch(7)
    b.touched = {"n1": {"a"}, "n2": set(), "n3": {"c"}, "ing": set()}
    b.everyone = {"ing"}
    cases = [("a", {}, frozenset(), set()), ("b", {"n2": 1}, frozenset(), set()),
             ("c", {}, frozenset({"n1"}), set()), ("d", {}, frozenset(), {"n2"}), ("e", {"n9": 2}, frozenset(), set())]
    for node, on, asked, ingress in cases:
        scope = set(on).union(asked, ingress)
        assert b.select_for(node, on, asked, ingress) == b.select(node, scope)


def test_a_big_snapshot_is_written_in_pieces_and_not_kept_once_sent(tmp_path, monkeypatch):
    from netweft.manager import watch
    monkeypatch.setattr(watch, "WRITE_CHUNK", 300)

    async def main():
        m = await Manager.open(tmp_path / "c.db")
        nodes = {await m.node(f"n{i}", f"192.0.2.{i + 1}", role="manager") for i in range(20)}
        w = m.hub.subscribe("n0", "n0", 0)
        gen = m.hub.frames(w)
        got = [await gen.__anext__()]
        assert w.first is None   # handed over: the watcher no longer holds it
        while not bytes(got[-1]).endswith(b"\n"):
            got.append(await gen.__anext__())
        assert len(got) > 1 and all(len(p) <= 300 for p in got)
        snap = message.decode(b"".join(got))
        assert isinstance(snap, Snapshot) and {n.id for n in snap.nodes} == nodes
        await gen.aclose()
        await m.close()
    run(main())


def test_snapshots_made_at_one_revision_share_one_copy_of_the_nodes(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1 = await m.net("n1", "198.18.1.0/24")
        await m.attach(a, n1, "x")
        await m.attach(b, n1, "y")
        pa, pb = m.hub.snapshot_parts(a), m.hub.snapshot_parts(b)
        assert pa[1] is pb[1]   # each sees every node (they share n1): one copy of them for both
        await m.node("c", "192.0.2.3", role="manager")
        pc = m.hub.snapshot_parts(a)
        assert pc[1] is not pa[1] and {n.id for n in message.decode(b"".join(pc)).nodes} == {a, b, "c"}
        await m.close()
    run(main())


def test_a_resume_with_nothing_to_catch_up_on_is_acknowledged_at_once(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db", ping=3600)   # no periodic ping during the test
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        await m.attach(a, n1, "x")
        up_to_date = m.hub.state.rev
        await m.attach(b, n2, "z")    # a revision outside a's scope
        for k in range(2):   # missed revisions out of its scope only; then none missed at all
            since = up_to_date if k == 0 else m.hub.state.rev
            w = m.hub.subscribe(a, "a", since)
            gen = m.hub.frames(w)
            msgs = await take(gen, 1, timeout=2.0)
            assert isinstance(msgs[0], Ping) and msgs[0].rev == m.hub.state.rev
            later = (await m.attach(b, n1, f"later{k}")).endpoint.id
            assert ids(await take(gen, 1), "endpoint") == [later]
            await gen.aclose()
        await m.close()
    run(main())


def test_a_resume_is_served_from_the_recent_batches_in_memory_with_the_frames_the_store_would_give(tmp_path,
                                                                                                 monkeypatch):
    from netweft.manager import watch

    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        await m.attach(a, n1, "x")
        since = m.hub.state.rev
        for k in range(3):
            await m.attach(b, n1, f"y{k}")
            await m.attach(b, n2, f"z{k}")   # not in a's scope
        await m.node("c", "192.0.2.3", role="manager")
        until = m.hub.state.rev
        assert m.hub.recent_from <= since
        from_memory = [f async for f in m.hub.missed(a, frozenset(), since, until)]
        reads = []
        real_watch = m.store.watch
        monkeypatch.setattr(m.store, "watch", lambda rev: (reads.append(rev), real_watch(rev))[1])
        assert [f async for f in m.hub.missed(a, frozenset(), since, until)] == from_memory and not reads
        m.hub.recent_from = until   # as if those revisions had left the memory: the store serves them
        from_store = [f async for f in m.hub.missed(a, frozenset(), since, until)]
        # The change log has no index of who knew a node: every endpoint brings its node along from there.
        assert reads == [since] and [r for r, _ in from_store] == [r for r, _ in from_memory]
        assert [ids([message.decode(f)], "endpoint") for _, f in from_store] == \
            [ids([message.decode(f)], "endpoint") for _, f in from_memory]
        assert [ids([message.decode(f)], "node") for _, f in from_store] == [[b], [b], [b], ["c"]]
        assert [ids([message.decode(f)], "node") for _, f in from_memory] == [[b], [], [], ["c"]]
        assert [len(ids([message.decode(f)], "endpoint")) for _, f in from_memory] == [1, 1, 1, 0]
        # Resuming again (another agent of the same scope) from memory: the very same frame objects.
        m.hub.recent_from = since
        again = [f async for f in m.hub.missed(a, frozenset(), since, until)]
        assert all(x is y for (_, x), (_, y) in zip(again, from_memory)) and len(again) == len(from_memory)
        await m.close()
    run(main())


def test_the_recent_batches_are_bounded_and_their_start_moves_up(tmp_path, monkeypatch):
    from netweft.manager import watch
    monkeypatch.setattr(watch, "RECENT_REVS", 3)

    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a = await m.node("a", "192.0.2.1")
        n1 = await m.net("n1", "198.18.1.0/24")
        for k in range(6):
            await m.attach(a, n1, f"x{k}")
        assert len(m.hub.recent) == 3 and all(b.rev > m.hub.recent_from > 0 for b in m.hub.recent)
        # A resume from before them is served from the store, whole.
        frames = [f async for f in m.hub.missed(a, frozenset(), 0, m.hub.state.rev)]
        assert sum(len(ids([message.decode(f)], "endpoint")) for _, f in frames) == 6
        await m.close()
    run(main())


def test_a_release_of_many_endpoints_is_one_revision_and_refused_whole_if_one_is_another_nodes(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.1"), await m.node("b", "192.0.2.2")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        mine = [(await m.attach(a, net, f"c{i}")).endpoint for net in (n1, n2) for i in range(3)]
        theirs = (await m.attach(b, n1, "y")).endpoint
        with pytest.raises(Forbidden, match="another node"):
            await m.ov.delete_endpoints(a, [mine[0].id, theirs.id])
        assert len(m.hub.state.endpoints_of(n1)) == 4            # refused whole: nothing released
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        await m.ov.delete_endpoints(a, [e.id for e in mine[:4]] + [mine[0].id, "0" * 64])   # twice; one gone
        msgs = pending(w)
        assert len(msgs) == 1 and [e.action for e in msgs[0].events] == ["delete"] * 4
        assert {e.id for net in (n1, n2) for e in m.hub.state.endpoints_of(net)} == {mine[4].id, mine[5].id, theirs.id}
        assert (await m.attach(a, n1, "again")).endpoint.ip == mine[0].ip   # the addresses are free again
        await m.close()
    run(main())


def test_a_release_request_is_parsed_strictly():
    from netweft.model.watch import RELEASE_MAX, EndpointRelease
    assert codec.decode(b'{"ids": ["ab12"]}', EndpointRelease).ids == ["ab12"]
    for bad in (b'{"ids": []}', b'{"ids": ["../x"]}', b'{"ids": ["a"], "node": "b"}',
                ('{"ids": [%s]}' % ",".join(['"a"'] * (RELEASE_MAX + 1))).encode()):
        with pytest.raises(InvalidRequest):
            codec.decode(bad, EndpointRelease)
