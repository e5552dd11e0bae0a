"""The ingress network's rules (manager/ingress.py) and its place in every node's watch."""
from __future__ import annotations

from ipaddress import IPv4Network
from types import SimpleNamespace

import pytest

from netweft.errors import Conflict, InvalidRequest, PoolExhausted
from netweft.ipam.address import AddressPool
from netweft.manager import ingress
from netweft.model.api import NetworkCreate

from test_watch import Manager, ids, pending, run


def test_top_subnet_takes_the_last_free_subnet_of_the_pools():
    pools = [AddressPool(IPv4Network("198.18.0.0/16"), 24)]
    assert ingress.top_subnet(pools, []) == IPv4Network("198.18.255.0/24")
    assert ingress.top_subnet(pools, [IPv4Network("198.18.255.0/24")]) == IPv4Network("198.18.254.0/24")
    # A big taken block is jumped over at once.
    assert ingress.top_subnet(pools, [IPv4Network("198.18.128.0/17")]) == IPv4Network("198.18.127.0/24")
    with pytest.raises(PoolExhausted):
        ingress.top_subnet(pools, [IPv4Network("198.18.0.0/16")])


def test_an_ingress_is_neither_attachable_nor_internal_and_there_is_one():
    with pytest.raises(InvalidRequest, match="cannot be attachable"):
        ingress.check_request(NetworkCreate(Name="i", Driver="overlay", Ingress=True, Attachable=True))
    with pytest.raises(InvalidRequest, match="cannot be internal"):
        ingress.check_request(NetworkCreate(Name="i", Driver="overlay", Ingress=True, Internal=True))
    ingress.check_unique([SimpleNamespace(ingress=False, name="ov")])
    with pytest.raises(Conflict, match="already exists"):
        ingress.check_unique([SimpleNamespace(ingress=True, name="ingress")])


def test_removal_is_refused_while_services_publish_ingress_ports():
    net = SimpleNamespace(ingress=True, name="ingress")
    web = SimpleNamespace(name="web", ports=[SimpleNamespace(mode="ingress")])
    local = SimpleNamespace(name="local", ports=[SimpleNamespace(mode="host")])
    ingress.check_removal(net, [local])
    with pytest.raises(Conflict, match=r"in use by services publishing ports \(web\)"):
        ingress.check_removal(net, [web, local])
    ingress.check_removal(SimpleNamespace(ingress=False, name="ov"), [web])


def test_every_node_watches_the_ingress_network_and_hears_of_its_removal(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a = await m.node("a", "192.0.2.1")
        w = m.hub.subscribe(a, "a", m.hub.state.rev)
        net = (await m.ov.create_network({"Name": "ingress", "Driver": "overlay", "Ingress": True}))
        assert net["ingress"] and net["subnet"] == "198.19.255.0/24"   # the top of the pool
        assert ids(pending(w), "network") == [net["id"]]
        with pytest.raises(Conflict):
            await m.ov.create_network({"Name": "ing2", "Driver": "overlay", "Ingress": True})
        assert net["id"] in m.hub.state.scope(a)
        snap = m.hub.snapshot("b")
        assert net["id"].encode() in snap
        await m.ov.remove_network(net["id"])
        assert ids(pending(w), "network") == [net["id"]] * 2
        assert net["id"] not in m.hub.state.scope(a)
        await m.close()
    run(main())
