"""The host's container names (daemon/names.py) follow the endpoints of a network endpoint by endpoint: only the
endpoints whose record changed are given to the name table, and the answers are those of the whole network."""
from __future__ import annotations

import msgspec

from netweft.daemon.names import ContainerNames, endpoint_records
from netweft.dns.names import NameTable, reverse_name
from netweft.model.objects import Endpoint, Owner


def ep(n: int, name: str, aliases=()) -> Endpoint:
    return Endpoint(id=f"{n:064x}", network_id="n" * 64, ip=f"198.18.0.{n}", prefix_len=24,
                    mac=f"02:42:c6:12:00:{n:02x}", owner=Owner(kind="netweft", id=f"{n:064x}", name=name),
                    aliases=list(aliases))


class Engine:
    overlay_agent = None

    def __init__(self):
        self.eps: list[Endpoint] = []

    def endpoints_on(self, net_id):
        return list(self.eps)


def whole(eps) -> NameTable:
    t = NameTable()
    t.set_network("n", endpoint_records(eps))
    return t


def test_a_network_is_changed_endpoint_by_endpoint_and_answers_as_a_whole():
    engine = Engine()
    names = ContainerNames(engine, upstreams=["192.0.2.53"])
    given: list[dict] = []
    update = names.resolver.update_network
    names.resolver.update_network = lambda net_id, changes: (given.append(changes), update(net_id, changes))[1]
    try:
        engine.eps = [ep(i, f"c{i}", ["web"] if i % 2 else []) for i in range(2, 40)]
        names.refresh("n")
        assert len(given[-1]) == 38
        engine.eps = engine.eps[1:] + [ep(50, "c50", ["web"])]
        engine.eps[3] = msgspec.structs.replace(engine.eps[3], aliases=["db"])
        names.refresh("n")
        assert set(given[-1]) == {ep(2, "").id, ep(50, "").id, engine.eps[3].id}
        ref = whole(engine.eps)
        for q in ("web", "db", "c5", "c50", "c2", ep(7, "").id[:12]):
            assert names.resolver.table.lookup(["n"], q) == ref.lookup(["n"], q), q
        for n in (2, 3, 5, 50):
            r = reverse_name(f"198.18.0.{n}")
            assert names.resolver.table.lookup_ptr(["n"], r) == ref.lookup_ptr(["n"], r)
        before = len(given)
        names.refresh("n")      # nothing changed: nothing given
        assert len(given) == before
        engine.eps = []
        names.refresh("n")
        assert names.resolver.table.networks() == []
    finally:
        names.resolver.close()


def test_a_run_or_rm_changes_only_its_own_names_and_never_reads_the_whole_network():
    net = "n" * 64   # the endpoints' network
    engine = Engine()
    names = ContainerNames(engine, upstreams=["192.0.2.53"])
    given: list[dict] = []
    update = names.resolver.update_network
    names.resolver.update_network = lambda net_id, changes: (given.append(changes), update(net_id, changes))[1]
    try:
        engine.eps = [ep(i, f"c{i}") for i in range(2, 200)]
        names.refresh(net)                     # the table exists: built once, whole
        reads = []
        engine.endpoints_on = lambda net_id: reads.append(net_id) or list(engine.eps)
        new = ep(220, "c220", ["web"])
        engine.eps.append(new)
        names._apply_some(net, {new.id: new})                      # what a run's container_changed does
        names.containers_removed([], [net], [engine.eps[0], engine.eps[1]])   # and an rm of two
        assert reads == []
        assert given[-2] == {new.id: ((new.ip, new.id), tuple(endpoint_records([new])))}
        assert given[-1] == {engine.eps[0].id: None, engine.eps[1].id: None}
        ref = whole(engine.eps[2:])
        for q in ("web", "c220", "c2", "c3", "c4", "c199"):
            assert names.resolver.table.lookup([net], q) == ref.lookup(["n"], q), q
        before = len(given)
        names.containers_removed([], [net], [engine.eps[0]])      # gone already: nothing given
        assert len(given) == before
    finally:
        names.resolver.close()
