"""Which nodes an agent is sent (netweft/model/watch.py): the real manager watch (Hub, Overlays on SQLite) feeding
the real overlay agent on the fake data plane. An agent hears of itself, the managers and the nodes it shares a
network with, and of nothing else; a network it joins later brings the nodes of that network, and a node's
first endpoint on a network brings that node to the network's agents, so every peer is programmed with its
node's address."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qsl

import msgspec

from netweft.agent.overlay import OverlayAgent
from netweft.dataplane.fake import FakeDataPlane
from netweft.manager.overlays import AttachQuery
from netweft.model import codec
from netweft.model.objects import Node, Owner, Peer
from netweft.model.watch import EndpointRequest, Snapshot, WatchMessage
from netweft.store.api import Delete, Put

from test_agent_fake import Host
from test_watch import Manager, ids, pending

message = msgspec.json.Decoder(WatchMessage)
ADDR = {n: f"192.0.2.{i}" for i, n in enumerate(("a", "b", "c", "d", "e", "m"), 11)}


def run(coro):
    return asyncio.run(coro)


class Client:
    """The agent's calls, answered by the manager's code (what the cluster API does, minus HTTP and TLS)."""

    def __init__(self, m: Manager, node_id: str):
        self.m, self.node_id = m, node_id

    async def call(self, method, path, body=None):
        path, _, qs = path.partition("?")
        assert (method, path) == ("POST", "/endpoints")
        raw = await self.m.ov.create_endpoint(self.node_id, codec.convert(body, EndpointRequest),
                                              AttachQuery.parse(dict(parse_qsl(qs))))
        return json.loads(raw)


class Agent:
    """Node `name`'s overlay agent, its watch stream pumped by hand."""

    def __init__(self, m: Manager, tmp_path, name: str):
        self.m, self.name = m, name
        self.dp = FakeDataPlane()
        self.dp.add_host_interface("eth0", f"{ADDR[name]}/24")
        self.agent = OverlayAgent(Host(tmp_path / name), self.dp, Client(m, name), name, ADDR[name], 4789)
        self.w = m.hub.subscribe(name, name, 0)
        self.first = message.decode(b"".join(self.w.first))
        self.agent.on_message(json.loads(b"".join(self.w.first)))
        self.w.first = None

    async def pump(self) -> None:
        """Hand the agent what its stream holds, and let its peer programming run."""
        for _ in range(3):
            for _, frame in self.w.take(1 << 30):
                for line in frame.splitlines():
                    self.agent.on_message(json.loads(line))
            for _ in range(20):
                await asyncio.sleep(0)

    async def attach(self, net: str, owner: str):
        netns = f"/run/nwt/netns/{self.name}-{owner}"
        await self.dp.create_netns(netns)
        ep = await self.agent.attach(Owner(kind="netweft", id=owner, name=owner), net, netns, "eth0", gw_ifname=None)
        await self.pump()
        return ep

    async def peers(self, net: str) -> set[Peer]:
        return set(await self.dp.list_peers(self.agent.sandbox(net)))


async def move(m: Manager, name: str, addr: str) -> None:
    """A node's new underlay address (its VTEP)."""
    node = Node(**{**codec.to_builtins(m.hub.state.get("nodes", name)), "addr": addr})
    r = await m.store.txn([], [Put("nodes", name, codec.encode(node))])
    await m.hub.wait(r.rev)


def test_an_agent_hears_of_the_nodes_it_shares_a_network_with_and_of_no_other(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        for n in "abcde":
            await m.node(n, ADDR[n])
        await m.node("m", ADDR["m"], role="manager")
        n1, n2 = await m.net("n1", "198.18.1.0/24"), await m.net("n2", "198.18.2.0/24")
        eb = (await m.attach("b", n1, "cb")).endpoint
        ec = (await m.attach("c", n1, "cc")).endpoint
        ed = (await m.attach("d", n2, "cd")).endpoint
        a = Agent(m, tmp_path, "a")
        # On no network yet: itself and the managers only.
        assert isinstance(a.first, Snapshot) and {n.id for n in a.first.nodes} == {"a", "m"}
        assert set(a.agent.nodes) == {"a", "m"}

        # a joins n1: the answer brings n1's nodes (b, c), whose endpoints are programmed at their addresses.
        ea = await a.attach(n1, "ca")
        assert set(a.agent.nodes) == {"a", "m", "b", "c"}
        assert await a.peers(n1) == {Peer(eb.ip, eb.mac, ADDR["b"]), Peer(ec.ip, ec.mac, ADDR["c"])}

        # b moves: a shares n1 with it and hears of it; d (on n2 only) moves and a hears nothing.
        await move(m, "b", "192.0.2.21")
        await move(m, "d", "192.0.2.24")
        await a.pump()
        assert a.agent.nodes["b"].addr == "192.0.2.21" and "d" not in a.agent.nodes
        assert Peer(eb.ip, eb.mac, "192.0.2.21") in await a.peers(n1)
        # A new worker on no network reaches nobody; a manager reaches everybody.
        await m.node("x", "192.0.2.30")
        await m.node("m2", "192.0.2.31", role="manager")
        await a.pump()
        assert "x" not in a.agent.nodes and "m2" in a.agent.nodes

        # d's first endpoint on n1 brings d's node along to n1's agents (a had never heard of d).
        ed1 = (await m.attach("d", n1, "cd1")).endpoint
        await a.pump()
        assert a.agent.nodes["d"].addr == "192.0.2.24"
        assert Peer(ed1.ip, ed1.mac, "192.0.2.24") in await a.peers(n1)

        # a joins n2 later: e is on n2 only, unknown to a until then; the answer brings it.
        ee = (await m.attach("e", n2, "ce")).endpoint
        await move(m, "e", "192.0.2.25")
        await a.pump()
        assert "e" not in a.agent.nodes
        await a.attach(n2, "ca2")
        assert a.agent.nodes["e"].addr == "192.0.2.25"
        assert await a.peers(n2) == {Peer(ed.ip, ed.mac, "192.0.2.24"), Peer(ee.ip, ee.mac, "192.0.2.25")}
        # From then on e's changes reach a.
        await move(m, "e", "192.0.2.35")
        await a.pump()
        assert Peer(ee.ip, ee.mac, "192.0.2.35") in await a.peers(n2)

        # A new snapshot (a reconnect from scratch) holds exactly what a may see.
        w = m.hub.subscribe("a", "a", 0)
        snap = message.decode(b"".join(w.first))
        assert {n.id for n in snap.nodes} == {"a", "b", "c", "d", "e", "m", "m2"}
        assert ea.id in {e.id for e in snap.endpoints}
        # A node leaving the cluster reaches every agent, whatever it shared (its endpoints go with it).
        r = await m.store.txn([], [Delete("nodes", "x")])
        await m.hub.wait(r.rev)
        assert "x" in ids(pending(w), "node")
        await m.close()
    run(main())


def test_an_attach_answer_never_replaces_a_newer_node_the_watch_brought(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        for n in "ab":
            await m.node(n, ADDR[n])
        n1 = await m.net("n1", "198.18.1.0/24")
        await m.attach("b", n1, "cb")
        a = Agent(m, tmp_path, "a")
        await a.attach(n1, "ca")
        rev = a.agent._node_revs["b"]
        # An older copy of b (as if an attach answered at an older revision) is ignored.
        stale = Node(id="b", hostname="b", role="worker", addr="192.0.2.99")
        a.agent._learn_nodes([stale], rev - 1)
        assert a.agent.nodes["b"].addr == ADDR["b"]
        # A newer one is taken.
        a.agent._learn_nodes([stale], rev + 1)
        assert a.agent.nodes["b"].addr == "192.0.2.99"
        await m.close()
    run(main())


def test_a_batch_is_offered_to_the_watchers_it_concerns_without_asking_every_one(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        names = [f"w{i}" for i in range(12)]
        for i, n in enumerate(names):
            await m.node(n, f"192.0.2.{40 + i}")
        n1, n2, n3 = [await m.net(f"n{k}", f"198.18.{k}.0/24") for k in (1, 2, 3)]
        for i, n in enumerate(names[:8]):
            await m.attach(n, (n1, n2)[i % 2], f"c{n}")
        ws = {n: m.hub.subscribe(n, n, m.hub.state.rev, frozenset({n3}) if n == "w11" else frozenset())
              for n in names}

        def check() -> None:
            st, batch = m.hub.state, m.hub.recent[-1]
            wanted = {w.node_id for w in ws.values() if w in m.hub.watchers and (
                      batch.select_for(w.node_id, st.node_nets.get(w.node_id, {}), w.asked, st.ingress)
                      or batch.has_nodes)}
            asked = {w.node_id for w in m.hub._recipients(batch)}
            assert wanted <= asked and len(asked) < len(names)
        await m.attach("w9", n1, "x")       # a node's first endpoint on n1 (its node rides along)
        check()
        await m.attach("w1", n2, "y")       # a second endpoint of w1 on n2
        check()
        ep = (await m.attach("w10", n3, "z")).endpoint   # n3: w10's, and w11 asked for it
        check()
        assert {w.node_id for w in m.hub._recipients(m.hub.recent[-1])} == {"w10", "w11"}
        await m.ov.delete_endpoint("w10", ep.id)   # w10 leaves n3: still told
        check()
        await move(m, "w2", "192.0.2.99")   # a worker's node: those on n1
        check()
        await m.node("mgr", "192.0.2.100", role="manager")   # a manager's: everyone
        assert len(list(m.hub._recipients(m.hub.recent[-1]))) == len(names)
        await m.close()
    run(main())


def test_a_managers_agent_hears_of_every_node(tmp_path):
    """Managers are few, and every host's data-path probes (netweft doctor's too) are answered by them."""
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        await m.node("m", ADDR["m"], role="manager")
        for n in "ab":
            await m.node(n, ADDR[n])
        w = m.hub.subscribe("m", "m", 0)
        assert {n.id for n in message.decode(b"".join(w.first)).nodes} == {"m", "a", "b"}
        wa = m.hub.subscribe("a", "a", m.hub.state.rev)
        await move(m, "b", "192.0.2.22")   # b shares no network with anyone
        assert ids(pending(w), "node") == ["b"] and ids(pending(wa), "node") == []
        await m.close()
    run(main())
