"""The overlay agent on the fake data plane, with an in-memory manager: attach under its network's lock, watch
events one object at a time, the resync (drift, failures half way), other owners' endpoints, a restart with no
manager, releases deferred while no manager is reachable, and the watch client's one line per outage."""
import asyncio
import logging
from urllib.parse import parse_qsl

import msgspec
import pytest

from netweft.agent import watcher as watch_mod
from netweft.agent.overlay import OverlayAgent
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import NetweftError, NotFound, Unavailable
from netweft.model.codec import convert, to_builtins
from netweft.model.objects import Endpoint, Network, Node, Owner, Peer
from netweft.model.watch import Attachment, EndpointEvent, EndpointRequest, Events, NetworkEvent, Snapshot
from netweft.store.local import ENDPOINTS, Store, endpoint_name

ME, OTHER, THIRD = "node1", "node2", "node3"
VTEP = {ME: "192.0.2.11", OTHER: "192.0.2.12", THIRD: "192.0.2.13"}
NET = Network(id="a1" * 32, name="ov", driver="overlay", scope="swarm", created="now", subnet="198.18.0.0/24",
              gateway="198.18.0.1", attachable=True, vni=4096)
NET2 = Network(id="b2" * 32, name="ov2", driver="overlay", scope="swarm", created="now", subnet="198.18.1.0/24",
               gateway="198.18.1.1", attachable=True, vni=4097)


def run(coro):
    return asyncio.run(coro)


class FakeManager:
    """The managers' side of POST/DELETE /endpoints and GET /networks, in memory."""

    def __init__(self):
        self.rev = 10
        self.networks = {NET.id: NET, NET2.id: NET2}
        self.endpoints: dict[str, Endpoint] = {}
        self.down = False
        self.during_post = None     # called while a POST /endpoints is "on the wire"
        self.deleted: list[str] = []
        self.n = 0
        self.posts = 0
        self.list_status = None     # GET /networks answers with this HTTP status instead
        self.queries: list[str] = []   # the query string of each POST /endpoints

    def endpoint(self, node: str, net: Network = NET, owner: str = "c") -> Endpoint:
        """A new endpoint at a new revision (another host's, or this one's)."""
        self.n += 1
        self.rev += 1
        ep = Endpoint(id=f"{self.n:02d}" * 32, network_id=net.id, node_id=node, hostname=node, vtep=VTEP[node],
                      ip=f"{net.subnet.rsplit('.', 1)[0]}.{10 + self.n}", prefix_len=24,
                      mac=f"02:42:c6:12:00:{10 + self.n:02x}", owner=Owner(kind="netweft", id=f"{owner}{self.n}"))
        self.endpoints[ep.id] = ep
        return ep

    async def call(self, method, path, body=None):
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("cannot reach the manager at 192.0.2.11:2377: connection refused")
        path, _, qs = path.partition("?")
        if method == "POST" and path == "/endpoints":
            self.queries.append(qs)
            q = dict(parse_qsl(qs))
            req = convert(body, EndpointRequest)
            net = self.networks[req.network_id]
            # Idempotent per owner, as the managers are: a retried request gets the endpoint it made before.
            ep = next((e for e in self.endpoints.values() if e.network_id == net.id and e.node_id == ME
                       and (e.owner.kind, e.owner.id) == (req.owner.kind, req.owner.id)), None)
            if ep is None:
                ep = self.endpoint(ME, net, owner=req.owner.id)
                ep = Endpoint(**{**to_builtins(ep), "owner": req.owner})
                self.endpoints[ep.id] = ep
            self.posts += 1
            rev = self.rev
            if self.during_post is not None:
                await self.during_post()
            anchor = self.endpoints.get(q.get("anchor", ""))
            if q.get("state") == "none" or (anchor is not None and anchor.node_id == ME and anchor.network_id == net.id
                                            and int(anchor.id[:2]) + 10 <= int(q["since"])):
                return to_builtins(Attachment(rev=rev, endpoint=ep, network=net, endpoints=[], partial=True))
            return to_builtins(Attachment(rev=rev, endpoint=ep, network=net,
                                          endpoints=[e for e in self.endpoints.values() if e.network_id == net.id
                                                     and e.id in self.at(rev)]))
        if method == "DELETE" and path.startswith("/endpoints/"):
            self.deleted.append(path.rsplit("/", 1)[1])
            self.endpoints.pop(path.rsplit("/", 1)[1], None)
            return {}
        if method == "GET" and path == "/networks":
            if self.list_status is not None:
                err = NetweftError("404: Not Found")
                err.status = self.list_status
                raise err
            return [to_builtins(n) for n in self.networks.values()]
        if method == "GET" and path.startswith("/networks/"):
            ref = path.rsplit("/", 1)[1]
            hit = next((n for n in self.networks.values() if ref in (n.id, n.name)), None)
            if hit is None:
                err = NotFound(f"network {ref!r} not found")
                raise err
            return to_builtins(hit)
        raise NetweftError(f"no call {method} {path}")

    def at(self, rev: int) -> set[str]:
        """IDs of the endpoints that existed at rev (they are numbered in creation order)."""
        return {e.id for e in self.endpoints.values() if int(e.id[:2]) + 10 <= rev}


class Host:
    """The narrow view of the engine the agent gets."""

    def __init__(self, tmp_path):
        self.store = Store(str(tmp_path / "db" / "netweft.db"))
        self.sandbox_dir = str(tmp_path / "sandboxes")
        self.released = False

    async def gateway_subnet(self):
        return "198.19.0.0/24", "198.19.0.1"

    async def gateway_released(self):
        self.released = True


@pytest.fixture
def env(tmp_path):
    dp = FakeDataPlane()
    dp.add_host_interface("eth0", f"{VTEP[ME]}/24")
    return tmp_path, dp, Host(tmp_path), FakeManager()


def new_agent(env) -> OverlayAgent:
    tmp_path, dp, host, mgr = env
    return OverlayAgent(host, dp, mgr, ME, VTEP[ME], 4789)


def events(rev: int, *evs) -> dict:
    return to_builtins(Events(rev=rev, events=list(evs)))


def put(ep: Endpoint) -> EndpointEvent:
    return EndpointEvent(action="put", object=ep)


def peer(ep: Endpoint) -> Peer:
    return Peer(ep.ip, ep.mac, ep.vtep)


async def attach(agent: OverlayAgent, dp: FakeDataPlane, name: str, net: Network = NET, gw: bool = True):
    netns = f"/run/nwt/netns/{name}"
    await dp.create_netns(netns)
    return await agent.attach(Owner(kind="netweft", id=name, name=name), net.id, netns, "eth0",
                              gw_ifname="eth1" if gw else None)


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def test_attach_programs_sandbox_port_gateway_and_peers(env):
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        remote = mgr.endpoint(OTHER)
        ep = await attach(agent, dp, "c1")
        sb = agent.sandbox(NET.id)
        assert await dp.list_peers(sb) == {peer(remote)}
        assert await dp.list_overlay_endpoints(sb) == [ep.host_ifname]
        assert dp.link("eth0", "/run/nwt/netns/c1").addresses == [f"{ep.ip}/24"]
        assert dp.link("eth0", "/run/nwt/netns/c1").mtu == 1450          # underlay 1500 - VXLAN
        assert dp.default_route("/run/nwt/netns/c1") == ("198.19.0.1", "eth1")
        assert "netweft-ov" in dp.tables
        # The endpoint is a first-class record in the local store, with its local part.
        rec = convert(host.store.get(ENDPOINTS, ep.id), Endpoint)
        assert rec.sandbox_key == "/run/nwt/netns/c1" and rec.gw_ip == "198.19.0.2" and rec.owner.id == "c1"
    run(go())


def test_events_held_during_an_attach_apply_above_its_revision(env):
    """Issue 7 item 11: the network is new here; while POST /endpoints is on the wire, the stream brings the
    network's events. Those at or below the Attachment's revision are in it; those above must not be lost."""
    _, dp, _, mgr = env
    agent = new_agent(env)
    early = mgr.endpoint(OTHER)           # in the attachment's state

    async def meanwhile():
        late = mgr.endpoint(THIRD)        # after the attachment's revision
        agent.on_message(events(early_rev, put(early)))          # replayed: covered by the attachment
        agent.on_message(events(mgr.rev, put(late)))
        meanwhile.late = late

    early_rev = mgr.rev
    mgr.during_post = meanwhile

    async def go():
        await attach(agent, dp, "c1")
        await settle()
        assert await dp.list_peers(agent.sandbox(NET.id)) == {peer(early), peer(meanwhile.late)}
        assert agent.nets[NET.id].rev == mgr.rev
    run(go())


def test_events_apply_one_object_at_a_time_and_a_bad_one_is_skipped(env, caplog):
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        a, b = mgr.endpoint(OTHER), mgr.endpoint(THIRD)
        bad = to_builtins(put(b))
        bad["object"]["ip"] = "not an address"
        msg = events(mgr.rev, put(a))
        msg["events"].append(bad)
        with caplog.at_level(logging.WARNING):
            agent.on_message(msg)
            agent.on_message(msg)    # the same bad record again: logged once
        await settle()
        assert await dp.list_peers(agent.sandbox(NET.id)) == {peer(a)}
        assert agent.bad_rev == mgr.rev
        assert len([r for r in caplog.records if "could not be applied" in r.getMessage()]) == 1
        agent._save()
        # The saved revision stays below the bad record: a restarted agent does not skip past it.
        assert host.store.get("settings", "overlay-cache")["rev"] == mgr.rev - 1
        # A fresh snapshot (the retry) holding good data clears it.
        agent.on_message(to_builtins(Snapshot(rev=mgr.rev, nodes=[], networks=[NET],
                                              endpoints=list(mgr.endpoints.values()))))
        await settle()
        assert agent.bad_rev is None
        assert await dp.list_peers(agent.sandbox(NET.id)) == {peer(a), peer(b)}
    run(go())


def test_endpoint_deletes_and_node_moves_reach_the_kernel(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        a = mgr.endpoint(OTHER)
        await attach(agent, dp, "c1")
        mgr.rev += 1
        agent.on_message(events(mgr.rev, EndpointEvent(action="delete", object=a)))
        await settle()
        assert await dp.list_peers(agent.sandbox(NET.id)) == set()
        b = mgr.endpoint(THIRD)
        agent.on_message(events(mgr.rev, put(b)))
        mgr.rev += 1
        moved = Node(id=THIRD, hostname=THIRD, role="worker", addr="192.0.2.99")
        agent.on_message(to_builtins(Events(rev=mgr.rev, events=[{"kind": "node", "action": "put",
                                                                   "object": to_builtins(moved)}])))
        await settle()
        assert await dp.list_peers(agent.sandbox(NET.id)) == {Peer(b.ip, b.mac, "192.0.2.99")}
    run(go())


def test_resync_repairs_drift_and_a_converged_host_changes_nothing(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        remote = mgr.endpoint(OTHER)
        ep = await attach(agent, dp, "c1")
        await agent.resync()
        before = dp.changes
        await agent.resync()
        assert dp.changes == before
        sb = agent.sandbox(NET.id)
        dp.delete_link("vxlan0", sb)
        dp.delete_link("br0", sb)
        dp.delete_link(ep.gw_host_ifname)
        dp.drop_table("netweft-ov")
        await agent.resync()
        assert await dp.list_peers(sb) == {peer(remote)}
        assert dp.link(ep.host_ifname, sb).master == "br0"
        assert dp.link(ep.gw_host_ifname).master == "nw_gwbridge" and "netweft-ov" in dp.tables
        dp.delete_link(ep.host_ifname, sb)
        dp.drop_peer(sb, peer(remote), neigh=False)
        await agent.resync()
        assert await dp.list_peers(sb) == {peer(remote)}
        assert dp.link("eth0", "/run/nwt/netns/c1").addresses == [f"{ep.ip}/24"]
    run(go())


def test_a_failure_half_way_is_retried_and_blocks_nothing_else(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        await attach(agent, dp, "c2", NET2)
        mgr.endpoint(OTHER)
        for sb in (agent.sandbox(NET.id), agent.sandbox(NET2.id)):
            dp.remove_netns(sb)
        dp.fail_on("ensure_sandbox", times=1)   # the first network's sandbox fails this round
        await agent.resync()
        assert await dp.list_netns(agent.sandbox_dir) == [NET2.id[:12]]
        await agent.resync()
        assert await dp.list_netns(agent.sandbox_dir) == sorted([NET.id[:12], NET2.id[:12]])
    run(go())


def test_endpoints_of_other_owners_are_kept_and_stale_sandboxes_go(env):
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        # Another runtime's endpoint on the same network, recorded here (a CNI attachment, say).
        cni = mgr.endpoint(ME)
        cni = Endpoint(**{**to_builtins(cni), "owner": Owner(kind="cni", id="pod-1"), "sandbox_key": "/run/netns/pod1",
                          "ifname": "eth0", "host_ifname": "nwv" + cni.id[:12]})
        await dp.create_netns("/run/netns/pod1")
        host.store.put(ENDPOINTS, cni.id, endpoint_name(cni.owner, cni.network_id), to_builtins(cni))
        await agent.stop()
        agent2 = new_agent(env)     # reads the records, as after a restart
        await dp.create_netns(f"{agent2.sandbox_dir}/deadbeef0000")    # a leftover of an earlier life
        await agent2.resync()
        assert await dp.list_netns(agent2.sandbox_dir) == [NET.id[:12]]
        assert sorted(await dp.list_overlay_endpoints(agent2.sandbox(NET.id))) == sorted(
            e.host_ifname for e in agent2.local.values())
        assert len(agent2.local) == 2
    run(go())


def test_a_local_endpoint_of_a_network_missing_from_the_copy_asks_for_a_snapshot(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        agent.on_message({"type": "ping", "rev": mgr.rev})
        assert agent._since() == mgr.rev
        agent.nets.clear()            # as after a crash before the copy was saved
        assert agent._since() == 0
    run(go())


def test_a_restarted_agent_reconciles_from_its_saved_copy_with_no_manager(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        remote = mgr.endpoint(OTHER)
        await attach(agent, dp, "c1")
        await agent.stop()
        mgr.down = True
        dp.drop_peer(agent.sandbox(NET.id), peer(remote))
        again = new_agent(env)
        await again.resync()
        assert await dp.list_peers(again.sandbox(NET.id)) == {peer(remote)}
    run(go())


def test_detach_without_a_manager_is_released_when_one_is_back(env):
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        ep = await attach(agent, dp, "c1")
        mgr.down = True
        await agent.detach(ep)
        assert await dp.list_netns(agent.sandbox_dir) == [] and host.store.get(ENDPOINTS, ep.id) is None
        assert agent.pending_release == [ep.id]
        mgr.down = False
        agent._on_connect()
        await settle()
        assert mgr.deleted == [ep.id] and agent.pending_release == []
    run(go())


def test_a_snapshot_replaces_the_scope_but_keeps_networks_with_local_endpoints(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        mgr.rev += 1
        agent.on_message(events(mgr.rev, NetworkEvent(action="put", object=NET2)))
        assert NET2.id in agent.nets
        mgr.rev += 1
        agent.on_message(to_builtins(Snapshot(rev=mgr.rev, nodes=[], networks=[], endpoints=[])))
        assert set(agent.nets) == {NET.id}
    run(go())


def test_a_bad_record_survives_a_restart_as_a_snapshot_to_take(env):
    """Review 13: the networks' revisions move past a bad record; a restarted agent must still retry it."""
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        b = mgr.endpoint(OTHER)
        bad = to_builtins(put(b))
        bad["object"]["ip"] = "not an address"
        agent.on_message({"type": "events", "rev": mgr.rev, "events": [bad]})
        await agent.stop()
        again = new_agent(env)
        assert again._since() == 0       # a snapshot, not a resume that replays into revisions already passed
        again.on_message(to_builtins(Snapshot(rev=mgr.rev, nodes=[], networks=[NET],
                                              endpoints=list(mgr.endpoints.values()))))
        await again.resync()
        assert await dp.list_peers(again.sandbox(NET.id)) == {peer(b)}
        await again.stop()
        assert new_agent(env)._since() == mgr.rev
    run(go())


def test_a_snapshot_below_the_held_revision_replaces_the_state(env):
    """Review 14: a manager whose history restarted sends a snapshot at a lower revision: it is the truth, and
    the events after it apply."""
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        old = mgr.endpoint(OTHER)
        agent.on_message(events(100, put(old)))
        await settle()
        mgr.endpoints.pop(old.id)
        a = mgr.endpoint(THIRD)
        agent.on_message(to_builtins(Snapshot(rev=50, nodes=[], networks=[NET],
                                              endpoints=list(mgr.endpoints.values()))))
        b = mgr.endpoint(OTHER)
        agent.on_message(events(51, put(b)))
        await settle()
        assert agent.nets[NET.id].rev == 51
        assert await dp.list_peers(agent.sandbox(NET.id)) == {peer(a), peer(b)}
    run(go())


def test_resync_goes_on_while_an_attach_waits_on_a_frozen_manager(env):
    """Review 6: an attach holds its network's lock across POST /endpoints; the resync of the other networks
    must not wait for it."""
    _, dp, _, mgr = env
    agent = new_agent(env)
    thaw = asyncio.Event

    async def go():
        await attach(agent, dp, "c0")
        await attach(agent, dp, "c2", NET2)
        frozen = thaw()

        async def freeze():
            await frozen.wait()
        mgr.during_post = freeze
        stuck = asyncio.ensure_future(attach(agent, dp, "c1"))
        await settle()
        dp.delete_link("vxlan0", agent.sandbox(NET2.id))
        resync = asyncio.ensure_future(agent.resync())
        for _ in range(200):
            await asyncio.sleep(0)
        assert resync.done()
        await resync
        assert dp.link("vxlan0", agent.sandbox(NET2.id)) is not None
        frozen.set()
        await stuck
        await agent.resync()     # the held network's turn comes in the next round
    run(go())


def test_an_attach_whose_answer_is_lost_releases_the_endpoint_the_manager_made(env):
    """Review 8: POST /endpoints committed, then the answer never came (a timeout): the endpoint is released
    once a manager answers, also after a restart."""
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def lost():
        mgr.during_post = None
        raise Unavailable("manager 192.0.2.11:2377 is unreachable (timed out)")

    async def go():
        mgr.during_post = lost
        with pytest.raises(Unavailable):
            await attach(agent, dp, "c1")
        made = [e for e in mgr.endpoints.values() if e.owner.id == "c1"]
        assert len(made) == 1 and agent.orphans[0].owner.id == "c1"
        await agent.stop()
        again = new_agent(env)           # the orphan is saved
        again._on_connect()
        await settle()
        assert mgr.deleted == [made[0].id] and made[0].id not in mgr.endpoints and again.orphans == []
        assert host.store.get("settings", "overlay-cache")["orphans"] == []
    run(go())


def test_an_orphan_is_not_released_when_its_owner_attached_again(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def lost():
        mgr.during_post = None
        raise Unavailable("manager 192.0.2.11:2377 is unreachable (timed out)")

    async def go():
        mgr.during_post = lost
        with pytest.raises(Unavailable):
            await attach(agent, dp, "c1")
        ep = await agent.attach(Owner(kind="netweft", id="c1", name="c1"), NET.id, "/run/nwt/netns/c1", "eth0",
                                gw_ifname=None)     # the retry gets the endpoint the lost answer was about
        agent._on_connect()
        await settle()
        assert mgr.deleted == [] and ep.id in mgr.endpoints and agent.orphans == []
        # A refused attach made nothing: no orphan.
        mgr.networks.pop(NET2.id)
        mgr_call = mgr.call

        async def refuse(method, path, body=None):
            if method == "POST":
                err = NetweftError("network not found")
                err.status = 404
                raise err
            return await mgr_call(method, path, body)
        mgr.call = refuse
        with pytest.raises(NetweftError):
            await attach(agent, dp, "c2", NET2)
        assert agent.orphans == []
    run(go())


def test_every_overlay_is_listed_by_the_managers_and_a_refusal_is_an_error(env):
    """Review 21: GET /networks exists on every manager; a 404 or 405 is not read as "cannot list"."""
    _, _, _, mgr = env
    agent = new_agent(env)

    async def go():
        assert {n.id for n in await agent.fetch_networks()} == {NET.id, NET2.id}
        mgr.list_status = 404
        with pytest.raises(NetweftError):
            await agent.fetch_networks()
        assert await agent.fetch_network("missing") is None
        assert (await agent.fetch_network("ov2")).id == NET2.id
    run(go())


# ---------------------------------------------------------------- the watch client

class Stream:
    """A client whose watch streams yield the given lines, then end (or fail)."""

    def __init__(self, rounds):
        self.rounds, self.paths = list(rounds), []

    async def stream(self, path):
        self.paths.append(path)
        if not self.rounds:
            await asyncio.sleep(3600)
        lines, error = self.rounds.pop(0)
        for line in lines:
            yield line
        if error is not None:
            raise error


def test_a_closing_stream_is_one_line_and_backoff_has_jitter(monkeypatch, caplog):
    monkeypatch.setattr(watch_mod, "BACKOFF_FIRST", 0.001)
    got = []
    client = Stream([([{"type": "ping", "rev": 1}], None),
                     ([], Unavailable("watch stream from 192.0.2.11:2377 ended: connection reset")),
                     ([], Unavailable("watch stream from 192.0.2.11:2377 ended: connection reset")),
                     ([{"type": "ping", "rev": 2}], None)])
    w = watch_mod.Watcher(client, since=lambda: 7, handle=got.append, on_connect=lambda: None)

    async def go():
        task = asyncio.ensure_future(w.run())
        while len(client.paths) < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    with caplog.at_level(logging.INFO, logger="netweft.agent.watch"):
        run(go())
    assert client.paths[0] == "/watch?since=7"
    assert [m["rev"] for m in got] == [1, 2]
    lines = [r for r in caplog.records if r.name == "netweft.agent.watch"]
    # End of the first stream, the outage (once, not per retry), end of the second stream.
    assert len(lines) == 3 and not any(r.exc_info for r in lines)
    base = watch_mod.BACKOFF_FIRST * 8
    delays = {watch_mod.backoff(3) for _ in range(50)}
    assert len(delays) > 1 and all(base / 2 <= d <= base for d in delays)
    assert watch_mod.backoff(30) <= watch_mod.BACKOFF_CAP


def test_an_endpoint_whose_mac_is_no_hosts_is_never_a_peer(env):
    """A zero MAC in the FDB is VXLAN's flood destination: such a record never reaches the kernel."""
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        good = mgr.endpoint(OTHER)
        await attach(agent, dp, "c1")
        mgr.rev += 1
        bad = msgspec.structs.replace(mgr.endpoint(THIRD), mac="00:00:00:00:00:00")
        agent.on_message(events(mgr.rev, put(bad)))
        await settle()
        assert agent.remote_peers(NET.id) == frozenset({peer(good)})
        assert await dp.list_peers(agent.sandbox(NET.id)) == {peer(good)}
    run(go())


def test_a_converged_periodic_resync_looks_into_no_owner_namespace_and_a_remade_gateway_gets_its_ports(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        mgr.endpoint(OTHER)
        ep = await attach(agent, dp, "c1")
        await agent.resync()
        before = dict(dp.calls)
        await agent.resync()
        assert dp.calls["ensure_overlay_endpoint"] == before.get("ensure_overlay_endpoint", 0)
        assert dp.calls["ensure_gw_endpoint"] == before.get("ensure_gw_endpoint", 0)
        dp.delete_link("nw_gwbridge")             # its port stays, off any bridge
        await agent.resync()
        assert dp.link(ep.gw_host_ifname).master == "nw_gwbridge"
        assert dp.default_route("/run/nwt/netns/c1") == ("198.19.0.1", "eth1")
    run(go())


def test_a_withdrawn_node_leaves_the_peer_tables_and_comes_back_when_reinstated(env):
    """Issue 13 item 8: the managers withdraw a host (down, and unreachable on the data path from every host
    sharing a network with it); its endpoints go from the peer tables, and come back with it."""
    from netweft.model.watch import NodeEvent
    _, dp, _, mgr = env
    agent = new_agent(env)
    node = Node(id=OTHER, hostname=OTHER, role="worker", addr=VTEP[OTHER])

    async def go():
        agent.on_message(events(mgr.rev, NodeEvent(action="put", object=node)))
        remote, third = mgr.endpoint(OTHER), mgr.endpoint(THIRD)
        await attach(agent, dp, "c1")
        sb = agent.sandbox(NET.id)
        assert await dp.list_peers(sb) == {peer(remote), peer(third)}
        assert agent.probe_targets() == {OTHER: VTEP[OTHER], THIRD: VTEP[THIRD]}
        mgr.rev += 1
        agent.on_message(events(mgr.rev, NodeEvent(action="put", object=msgspec.structs.replace(
            node, state="down", withdrawn=True))))
        await settle()
        assert await dp.list_peers(sb) == {peer(third)}
        assert OTHER in agent.probe_targets()   # still probed: its return is seen on the data path
        mgr.rev += 1
        agent.on_message(events(mgr.rev, NodeEvent(action="put", object=node)))
        await settle()
        assert await dp.list_peers(sb) == {peer(remote), peer(third)}
        await agent.resync()
        assert await dp.list_peers(sb) == {peer(remote), peer(third)}
    run(go())


def test_a_second_attach_asks_only_for_its_endpoint_and_the_watch_brings_the_rest(env):
    """Issue 12 item 3: the attach answer is O(1) in the network's size once this host has an endpoint there
    (its anchor); the peers created meanwhile come by the watch, after the attach or held during it."""
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        early = mgr.endpoint(OTHER)
        first = await attach(agent, dp, "c1")
        assert mgr.queries == [""]
        agent.on_message(events(mgr.rev, put(first)))      # the watch carries the network from here
        missed = mgr.endpoint(THIRD)                       # the watch is late: not seen yet
        missed_rev = mgr.rev
        sb = agent.sandbox(NET.id)
        second = await attach(agent, dp, "c2")
        assert mgr.queries[-1] == f"anchor={first.id}&since={missed_rev - 1}"
        assert second.id in agent.nets[NET.id].endpoints and agent.nets[NET.id].rev == missed_rev - 1
        await settle()
        assert await dp.list_peers(sb) == {peer(early)}
        agent.on_message(events(missed_rev, put(missed)))  # the watch catches up: nothing was skipped
        agent.on_message(events(mgr.rev, put(agent.nets[NET.id].endpoints[second.id])))
        await settle()
        assert await dp.list_peers(sb) == {peer(early), peer(missed)}

        async def meanwhile():
            meanwhile.late = mgr.endpoint(OTHER)
            agent.on_message(events(mgr.rev, put(meanwhile.late)))   # held, applied after the answer
        mgr.during_post = meanwhile
        await attach(agent, dp, "c3")
        assert mgr.queries[-1].startswith(f"anchor={first.id}&since=")
        await settle()
        assert await dp.list_peers(sb) == {peer(early), peer(missed), peer(meanwhile.late)}
        # With every local endpoint gone the network leaves; the next attach asks for the whole state.
        mgr.during_post = None
        for ep in list(agent.local.values()):
            await agent.detach(ep)
        await attach(agent, dp, "c4")
        assert mgr.queries[-1] == ""
        assert await dp.list_peers(sb) == {peer(early), peer(missed), peer(meanwhile.late)}
    run(go())


def test_an_anchor_is_used_only_once_the_copy_is_past_its_revision(env):
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        first = await attach(agent, dp, "c1")
        agent.nets[NET.id].rev -= 1     # the copy is behind the first attach's answer (a snapshot reset it)
        await attach(agent, dp, "c2")
        assert mgr.queries == ["", ""]
        agent.on_message(events(mgr.rev, put(first)))
        await attach(agent, dp, "c3")
        assert mgr.queries[-1].startswith(f"anchor={first.id}&since={mgr.rev - 1}") or \
            mgr.queries[-1].startswith(f"anchor={first.id}&since=")
    run(go())


def test_a_sandbox_checked_moments_ago_is_trusted_and_checked_again_when_an_endpoint_cannot_be_made(env):
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        await attach(agent, dp, "c1")
        await attach(agent, dp, "c2")
        assert dp.calls["ensure_sandbox"] == 1          # the second attach trusted the first one's check
        # The sandbox goes behind the agent's back: the next attach cannot make its port, checks, repairs.
        sb = agent.sandbox(NET.id)
        await dp.delete_sandbox(sb)
        ep = await attach(agent, dp, "c3")
        assert dp.calls["ensure_sandbox"] == 2
        assert ep.host_ifname in await dp.list_overlay_endpoints(sb)
        # Past the resync period, an attach checks again.
        agent._sandbox_checked[sb] = (agent._sandbox_checked[sb][0], 0.0)
        await attach(agent, dp, "c4")
        assert dp.calls["ensure_sandbox"] == 3
    run(go())
