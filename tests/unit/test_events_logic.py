"""Issue 13 item 4, the pure parts: events derived from store revisions, filters, and --since/--until."""
import asyncio

import click
import msgspec
import pytest

from netweft.cli.events import line, parse_event_filters, parse_time
from netweft.errors import InvalidRequest
from netweft.manager.events import Deriver, events, parse_ns, visible_to
from netweft.manager.watch import CLOCK, ENDPOINTS, NETWORKS, NODES, ClusterState
from netweft.model import codec
from netweft.model.events import ClusterEvent, EventFilters, docker_view, parse_filters
from netweft.model.objects import Endpoint, Network, Node, Owner, PeerHealth
from netweft.store.api import Changes, Delete, Event, Put
from netweft.store.sqlite import SQLiteStore

NET = Network(id="n" * 12, name="ov", driver="overlay", scope="swarm", created="", subnet="198.18.0.0/24",
              gateway="198.18.0.1", vni=4096)
A = Node(id="a" * 25, hostname="ha", role="manager", addr="192.0.2.11", created="2026-01-01T00:00:00Z")
B = Node(id="b" * 25, hostname="hb", role="worker", addr="192.0.2.12", created="2026-01-01T00:00:00Z")
EP = Endpoint(id="e" * 12, network_id=NET.id, node_id=B.id, hostname="hb", ip="198.18.0.2", prefix_len=24,
              mac="02:42:c6:12:00:02", owner=Owner(kind="netweft", id="c" * 64, name="web"))


def rev(n: int, *evs) -> Changes:
    return Changes(n, [Event(n, k, key, act, codec.encode(obj)) for k, key, act, obj in evs])


def acts(evs):
    return [(e.type, e.action) for e in evs]


def test_revisions_become_events():
    d = Deriver(complete=True)
    assert acts(d.derive(rev(1, (NODES, A.id, "put", A)), 1)) == [("node", "join")]
    assert acts(d.derive(rev(2, (NODES, B.id, "put", B)), 2)) == [("node", "join")]
    assert acts(d.derive(rev(3, (NETWORKS, NET.id, "put", NET)), 3)) == [("network", "create")]
    evs = d.derive(rev(4, (ENDPOINTS, EP.id, "put", EP)), 4)
    assert acts(evs) == [("network", "connect")] and evs[0].rev == 4 and evs[0].time_ns == 4
    assert evs[0].attributes["name"] == "ov" and evs[0].attributes["node"] == "hb" and evs[0].id == NET.id
    assert d.derive(rev(5, (ENDPOINTS, EP.id, "put", EP)), 5) == []          # an update is no connect
    assert d.derive(rev(6, (NODES, B.id, "put", msgspec.structs.replace(B, labels={"x": "y"}))), 6) == []
    down = msgspec.structs.replace(B, state="down")
    assert acts(d.derive(rev(7, (NODES, B.id, "put", down)), 7)) == [("node", "down")]
    assert acts(d.derive(rev(8, (NODES, B.id, "put", B)), 8)) == [("node", "ready")]
    sick = msgspec.structs.replace(B, health={A.id: PeerHealth(state="unreachable", loss=1.0, reason="blocked")})
    evs = d.derive(rev(9, (NODES, B.id, "put", sick)), 9)
    assert acts(evs) == [("health", "unreachable")]
    assert evs[0].attributes | {} == {"name": "hb", "peer": "ha", "peer_id": A.id, "state": "unreachable",
                                      "previous": "unknown", "loss": "1", "reason": "blocked"}
    assert d.derive(rev(10, (NODES, B.id, "put", sick)), 10) == []            # the same state: no event
    evs = d.derive(rev(11, (ENDPOINTS, EP.id, "delete", EP), (NETWORKS, NET.id, "delete", NET),
                       (NODES, B.id, "delete", sick), (CLOCK, "time", "put", 11)), 11)
    assert acts(evs) == [("network", "disconnect"), ("network", "remove"), ("node", "remove")]


def test_a_node_first_seen_in_a_trimmed_history_joined_only_if_it_was_made_then():
    d = Deriver(complete=False)
    made = 1767225600 * 10**9   # 2026-01-01T00:00:00Z, A's creation
    assert d.derive(rev(5, (NODES, A.id, "put", A)), made + 3600 * 10**9) == []
    assert acts(d.derive(rev(6, (NODES, B.id, "put", B)), made + 10**9)) == [("node", "join")]


def test_the_store_history_gives_times_and_a_live_stream_follows(tmp_path):
    async def main():
        store = await SQLiteStore.open(str(tmp_path / "c.db"))
        try:
            await store.txn([], [Put(NETWORKS, NET.id, codec.encode(NET)), Put(CLOCK, "time", b"1000")])
            await store.txn([], [Put(ENDPOINTS, EP.id, codec.encode(EP)), Put(CLOCK, "time", b"2000")])
            state = ClusterState()
            state.rev = await store.revision()
            got = [e async for e in events(store, state, 1500, 2500) if isinstance(e, ClusterEvent)]
            assert [(e.action, e.time_ns, e.rev) for e in got] == [("connect", 2000, 2)]
            got = [e async for e in events(store, state, 0, 2500) if isinstance(e, ClusterEvent)]
            assert acts(got) == [("network", "create"), ("network", "connect")]
        finally:
            await store.close()
    asyncio.run(main())


def test_filters():
    conn = ClusterEvent(type="network", action="connect", id=NET.id, attributes={"name": "ov", "node": "hb",
                                                                                   "node_id": B.id})
    health = ClusterEvent(type="health", action="degraded", id=B.id, attributes={"name": "hb", "peer": "ha",
                                                                                 "peer_id": A.id})
    assert EventFilters().matches(conn)
    assert EventFilters(type=["network", "node"], event=["connect"]).matches(conn)
    assert not EventFilters(type=["node"]).matches(conn)
    assert EventFilters(network=["ov"]).matches(conn) and EventFilters(network=[NET.id[:3]]).matches(conn)
    assert not EventFilters(network=["nn"]).matches(conn)          # a prefix needs 3 characters
    assert EventFilters(node=["hb"]).matches(conn) and not EventFilters(node=["ha"]).matches(conn)
    assert EventFilters(node=["ha"]).matches(health) and EventFilters(node=["hb"]).matches(health)
    assert not EventFilters(network=["ov"]).matches(health)
    assert parse_filters('{"type":["health"],"node":["hb"]}').matches(health)
    for raw, words in [('{"type":["container"]}', "invalid filter type='container'"),
                       ('{"event":["explode"]}', "invalid filter event='explode'"),
                       ('{"colour":["red"]}', "the keys are type, event, network, node"),
                       ('{"type":"network"}', "Expected `array`")]:
        with pytest.raises(InvalidRequest) as e:
            parse_filters(raw)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_workers_see_what_their_watch_shows_them():
    state = ClusterState()
    worker = msgspec.structs.replace(A, role="worker")
    see = visible_to(worker, lambda: state)
    conn = ClusterEvent(type="network", action="connect", id=NET.id, attributes={"node_id": B.id})
    assert not see(conn) and see(msgspec.structs.replace(conn, action="create"))
    assert see(msgspec.structs.replace(conn, attributes={"node_id": A.id}))   # its own
    state.node_nets[A.id][NET.id] = 1
    assert see(conn)                                                             # a network it is on
    assert visible_to(A, lambda: ClusterState())(conn)                           # a manager sees all


def test_times_as_docker_takes_them():
    now = 1_700_000_000 * 10**9
    assert parse_time("1700000000", "--since", now) == now
    assert parse_time("1700000000.5", "--since", now) == now + 500_000_000
    assert parse_time("10m", "--since", now) == now - 600 * 10**9
    assert parse_time("1h30m", "--since", now) == now - 5400 * 10**9
    assert parse_time("0s", "--until", now) == now
    assert parse_time("2023-11-14T22:13:20Z", "--since", now) == now
    assert parse_time("2023-11-14T23:13:20+01:00", "--since", now) == now
    with pytest.raises(click.UsageError, match="invalid --since 'yesterday'"):
        parse_time("yesterday", "--since", now)
    assert parse_event_filters(["type=network", "type=node", "node=h1"]) == {"type": ["network", "node"],
                                                                              "node": ["h1"]}
    with pytest.raises(click.UsageError, match="invalid filter 'colour=red'"):
        parse_event_filters(["colour=red"])
    assert parse_ns("123", "since") == 123 and parse_ns("", "since") is None
    with pytest.raises(InvalidRequest, match="invalid until '-5'"):
        parse_ns("-5", "until")


def test_docker_shape_and_text_line():
    ev = ClusterEvent(type="network", action="create", id="abc", attributes={"name": "ov", "type": "overlay"},
                      rev=7, time_ns=1_700_000_000_123_456_789)
    view = docker_view(ev)
    assert view == {"Type": "network", "Action": "create", "Actor": {"ID": "abc", "Attributes": {"name": "ov",
                    "type": "overlay"}}, "scope": "swarm", "time": 1_700_000_000, "timeNano": 1_700_000_000_123_456_789,
                    "rev": 7}
    assert line(view) == "2023-11-14T22:13:20.123456789Z network create abc (name=ov, type=overlay)"


def test_local_events_are_kept_and_handed_to_each_stream():
    from netweft.daemon.local_events import LocalEvents
    local = LocalEvents("hb", keep=3)
    q: asyncio.Queue = asyncio.Queue(maxsize=2)
    local.subscribe(q)
    for action in ("create", "connect", "disconnect", "remove"):
        local.network(action, msgspec.structs.replace(NET, driver="bridge"), EP if "connect" in action else None,
                      "web")
    assert [e.action for e in local.kept] == ["connect", "disconnect", "remove"]      # the last `keep`
    assert [e.action for e in local.since(0)] == ["connect", "disconnect", "remove"]
    assert local.since(None) == []
    got = [q.get_nowait() for _ in range(q.qsize())]                                   # a full queue drops the oldest
    assert [(k, v["Action"], v["scope"]) for k, v, _ in got] == [("local", "disconnect", "local"),
                                                                 ("local", "remove", "local")]
    a = got[0][1]["Actor"]["Attributes"]
    assert (a["name"], a["node"], a["container_name"], a["ip"]) == ("ov", "hb", "web", "198.18.0.2")
    local.unsubscribe(q)
    local.network("create", NET)
    assert q.empty()
