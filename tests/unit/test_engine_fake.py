"""The engine on the fake data plane: its check-and-write sections under concurrency, and refusals that
depend on the host's links (review of issue 7: findings 3, 9 and 21)."""
import asyncio
import os

import pytest

from engine_fixture import engine  # noqa: F401 (a fixture)
from netweft.daemon.engine import Engine
from netweft.errors import Conflict, InvalidRequest
from netweft.store.local import ENDPOINTS


def run(coro):
    return asyncio.run(coro)


def bridge_req(name: str, subnet: str, **options) -> dict:
    return {"Name": name, "Driver": "bridge", "Options": options, "IPAM": {"Config": [{"Subnet": subnet}]}}


async def while_engine_busy(engine: Engine, *coros) -> list:
    """Run coros together while the engine's lock is held a moment (by a network create, say): each gets
    as far as it can before its turn."""
    async with engine.lock:
        tasks = [asyncio.ensure_future(c) for c in coros]
        for _ in range(20):
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def add_container(engine: Engine, name: str) -> dict:
    """A container document as create_container records it, with its namespace (no process)."""
    ctr_id = name.encode().hex().ljust(64, "0")
    ctr = {"Id": ctr_id, "Name": name, "Config": {"Hostname": name, "Cmd": ["true"], "Env": {}},
           "HostConfig": {"NetworkMode": "bridge"}, "NetworkSettings": {"SandboxKey": engine.netns_path(ctr_id)},
           "LogPath": os.path.join(engine.ctr_state_dir(ctr_id), "log")}
    os.makedirs(engine.ctr_state_dir(ctr_id))
    with engine.store.tx():
        engine.store.put("containers", ctr_id, name, ctr)
    await engine.dp.create_netns(engine.netns_path(ctr_id))
    return ctr


def test_concurrent_connects_of_one_container_to_one_network_make_one_endpoint(engine):
    async def main():
        await engine.create_network(bridge_req("n1", "198.18.1.0/24"))
        await add_container(engine, "c1")
        got = await while_engine_busy(engine, *(engine.connect("n1", "c1") for _ in range(3)))
        assert sum(isinstance(g, dict) for g in got) == 1, got
        assert all(isinstance(g, Conflict) and "already connected" in str(g) for g in got if not isinstance(g, dict))
        assert len(engine.store.list(ENDPOINTS)) == 1
        assert len(await engine.dp.list_links("nwv")) == 1

    run(main())


def test_concurrent_connects_to_two_networks_get_two_interfaces(engine):
    async def main():
        await engine.create_network(bridge_req("n1", "198.18.1.0/24"))
        await engine.create_network(bridge_req("n2", "198.18.2.0/24"))
        ctr = await add_container(engine, "c1")
        a, b = await while_engine_busy(engine, engine.connect("n1", "c1"), engine.connect("n2", "c1"))
        assert {a["Interface"], b["Interface"]} == {"eth0", "eth1"}
        assert sorted(engine.dp.links(engine.netns_path(ctr["Id"]))) == ["eth0", "eth1", "lo"]

    run(main())


def test_a_network_name_equal_to_another_networks_id_is_refused(engine):
    async def main():
        net = await engine.create_network(bridge_req("n1", "198.18.1.0/24"))
        with pytest.raises(Conflict, match="is the ID of another network"):
            await engine.create_network(bridge_req(net["Id"], "198.18.2.0/24"))
        assert [n.name for n in engine.all_networks()] == ["n1"]

    run(main())


@pytest.mark.parametrize("parent, why", [
    ("lo", "is a loopback interface"),
    ("nwtbr0", "is itself a bridge"),
    ("nwtport0", "is already a port of 'nwtbr0'"),
    ("nwtnone0", "does not exist on this host"),
])
def test_a_parent_that_cannot_be_a_bridge_port_is_refused_in_one_line(engine, parent, why):
    engine.dp.add_link("nwtbr0", "bridge")
    engine.dp.add_link("nwtport0", "veth", master="nwtbr0")

    async def main():
        with pytest.raises(InvalidRequest, match=why) as e:
            await engine.create_network(bridge_req("lan", "198.18.3.0/24", parent=parent))
        assert "\n" not in str(e.value) and repr(parent) in str(e.value)
        assert engine.all_networks() == [] and await engine.dp.list_links("nw-") == []

    run(main())


def test_a_free_physical_parent_is_accepted(engine):
    engine.dp.add_host_interface("nwtlan0")

    async def main():
        await engine.create_network(bridge_req("lan", "198.18.3.0/24", parent="nwtlan0"))
        assert (await engine.dp.link_info("nwtlan0"))[1].startswith("nw-")

    run(main())
