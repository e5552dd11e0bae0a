"""Endpoints of other runtimes' namespaces on the fake data plane: the engine's one endpoint path, used by
the CNI routes and the Docker driver; published ports rendered from the records."""
import asyncio

import pytest

from engine_fixture import engine  # noqa: F401 (a fixture)
from netweft.daemon import ports
from netweft.daemon.engine import Engine
from netweft.dataplane.firewall import PORTS_TABLE
from netweft.errors import Conflict
from netweft.model.objects import Owner
from netweft.model.runtimes import PublishedPort


def run(coro):
    return asyncio.run(coro)


def owner(i: int) -> Owner:
    return Owner(kind="cni", id=f"c{i}:eth0", name=f"c{i}")


async def netns(engine: Engine, name: str) -> str:
    path = f"{engine.exec_root}/ext/{name}"
    await engine.dp.create_netns(path)
    return path


def test_attach_is_once_per_owner_and_network_and_detach_is_idempotent(engine):
    async def main():
        await engine.create_network({"Name": "n", "IPAM": {"Config": [{"Subnet": "198.18.1.0/24"}]}})
        ns1, ns2 = await netns(engine, "a"), await netns(engine, "b")
        net, ep = await engine.attach_owner(owner(1), "n", ns1, "eth0", ip="198.18.1.7", mac="02:00:00:00:01:07",
                                            aliases=["web"])
        assert (ep.ip, ep.mac, ep.aliases, ep.gateway, ep.sandbox_key) == ("198.18.1.7", "02:00:00:00:01:07", ["web"],
                                                                           "198.18.1.1", ns1)
        again = (await engine.attach_owner(owner(1), "n", ns1, "eth0"))[1]
        assert again.id == ep.id                                   # a runtime retrying ADD
        with pytest.raises(Conflict):
            await engine.attach_owner(owner(1), "n", ns2, "eth0")  # the same attachment elsewhere
        with pytest.raises(Conflict):
            await engine.attach_owner(owner(2), "n", ns2, "eth0", ip="198.18.1.7")
        # A second endpoint in the same namespace gives no second default route.
        await engine.create_network({"Name": "m", "IPAM": {"Config": [{"Subnet": "198.18.2.0/24"}]}})
        other = (await engine.attach_owner(Owner(kind="cni", id="c1:eth1"), "m", ns1, "eth1"))[1]
        assert other.gateway is None
        assert [e.id for e in engine.endpoints_of_kind("cni")] == [ep.id, other.id]
        assert engine.network_view(net)["Containers"]["c1:eth0"]["Name"] == "c1"
        assert await engine.detach_owner("cni", "c1:eth0") == 1
        assert await engine.detach_owner("cni", "c1:eth0") == 0
        assert [e.id for e in engine.endpoints_of_kind("cni")] == [other.id]
        # Its namespace gone first: the detach still removes the record.
        await engine.dp.delete_netns(ns1)
        assert await engine.detach_owner("cni", "c1:eth1") == 1
        assert engine.endpoints_of_kind("cni") == []
    run(main())


def test_ports_follow_the_records(engine):
    async def main():
        await engine.create_network({"Name": "n", "IPAM": {"Config": [{"Subnet": "198.18.3.0/24"}]}})
        _, e1 = await engine.attach_owner(owner(1), "n", await netns(engine, "a"), "eth0")
        _, e2 = await engine.attach_owner(owner(2), "n", await netns(engine, "b"), "eth0")
        await ports.publish(engine, e1, [PublishedPort(host_port=8080, container_port=80)])
        with pytest.raises(Conflict):
            await ports.publish(engine, e2, [PublishedPort(host_port=8080, container_port=80)])
        assert [r.dest_ip for r in ports.rules(engine.store)] == [e1.ip]
        assert PORTS_TABLE in engine.dp.tables
        # A restart renders the same table from the store.
        before = engine.dp.tables[PORTS_TABLE]
        engine.dp.tables.clear()
        await ports.apply(engine)
        assert engine.dp.tables[PORTS_TABLE] == before
        await engine.detach_owner("cni", owner(1).id)
        assert ports.rules(engine.store) == [] and PORTS_TABLE not in engine.dp.tables
        await ports.publish(engine, e2, [PublishedPort(host_port=8080, container_port=80)])
        assert [r.dest_ip for r in ports.rules(engine.store)] == [e2.ip]
    run(main())
