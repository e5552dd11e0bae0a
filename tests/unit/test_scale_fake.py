"""Thousands of containers on one host (issue 12): the gateway bridge's default subnet has room for them, a
full one says so in one line, and the parts an attach pays for do not grow with the endpoints already there."""
import asyncio
from ipaddress import IPv4Network

import pytest

from netweft.daemon.engine import GWBRIDGE_PREFIX, Engine
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import PoolExhausted
from netweft.ipam.address import allocate_subnet, parse_pool

from test_agent_fake import NET, Host, attach, new_agent


def run(coro):
    return asyncio.run(coro)


def test_allocate_subnet_can_take_a_bigger_block_than_the_pools_size():
    pools = [parse_pool("base=172.17.0.0/16,size=24")]
    assert allocate_subnet(pools, [], 20) == IPv4Network("172.17.0.0/20")
    assert allocate_subnet(pools, [IPv4Network("172.17.0.0/24")], 20) == IPv4Network("172.17.16.0/20")
    assert allocate_subnet(pools, [IPv4Network("172.17.0.0/24")]) == IPv4Network("172.17.1.0/24")
    # Never larger than the pool itself.
    assert allocate_subnet([parse_pool("base=198.19.0.0/22,size=24")], [], 20) == IPv4Network("198.19.0.0/22")
    with pytest.raises(PoolExhausted):
        allocate_subnet([parse_pool("base=198.19.0.0/22,size=24")], [IPv4Network("198.19.1.0/24")], 20)


def test_the_gateway_bridge_gets_room_for_4000_containers_by_default(tmp_path):
    eng = Engine(str(tmp_path / "data"), str(tmp_path / "run"), [parse_pool("base=172.17.0.0/16,size=24")],
                 FakeDataPlane())
    try:
        subnet, gateway = run(eng.gateway_subnet())
        assert IPv4Network(subnet).prefixlen == GWBRIDGE_PREFIX and IPv4Network(subnet).num_addresses - 3 >= 4000
        assert gateway == str(next(IPv4Network(subnet).hosts()))
    finally:
        run(eng.close())


def test_pools_too_small_for_that_still_give_a_gateway_subnet(tmp_path):
    pools = [parse_pool("base=198.19.0.0/16,size=24")]
    eng = Engine(str(tmp_path / "data"), str(tmp_path / "run"), pools, FakeDataPlane())
    try:
        # Every /20 of the pool overlaps a network already there (the last one the reserved tunnel block,
        # 198.19.240.0/21): the pool's own size is used.
        for i in range(15):
            run(eng.create_network({"Name": f"n{i}", "Driver": "bridge",
                                    "IPAM": {"Config": [{"Subnet": f"198.19.{i * 16}.0/24"}]}}))
        assert IPv4Network(run(eng.gateway_subnet())[0]).prefixlen == 24
    finally:
        run(eng.close())


class TinyGatewayHost(Host):
    async def gateway_subnet(self):
        return "198.19.0.0/29", "198.19.0.1"   # .2-.6: five containers


def test_a_full_gateway_bridge_says_so_in_one_line(tmp_path):
    dp = FakeDataPlane()
    dp.add_host_interface("eth0", "192.0.2.11/24")
    from test_agent_fake import FakeManager
    env = (tmp_path, dp, TinyGatewayHost(tmp_path), FakeManager())
    agent = new_agent(env)

    async def go():
        for i in range(5):
            await attach(agent, dp, f"c{i}")
        with pytest.raises(PoolExhausted) as e:
            await attach(agent, dp, "c5")
        msg = str(e.value)
        assert "\n" not in msg and "nw_gwbridge" in msg and "198.19.0.0/29" in msg and "is full" in msg
        assert len([ep for ep in agent.local.values() if ep.network_id == NET.id]) == 5
    run(go())
