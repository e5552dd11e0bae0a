"""The overlay reconcile diff (agent/reconcile.py): pure plans, and their execution on the fake data plane,
including a crash half way and drift."""
import asyncio

import pytest

from netweft.agent.reconcile import (DesiredNetwork, Gateway, GwPort, ObservedNetwork, Port, execute, plan_gateway,
                                     plan_network)
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import KernelError
from netweft.model.objects import Peer, Sandbox

SB = "/run/nwt/sandboxes/aaaaaaaaaaaa"
SB2 = "/run/nwt/sandboxes/bbbbbbbbbbbb"
CTR = "/run/nwt/netns/c1"
CTR2 = "/run/nwt/netns/c2"
P1 = Peer("198.18.0.21", "02:42:c6:12:00:15", "192.0.2.12")
P2 = Peer("198.18.0.22", "02:42:c6:12:00:16", "192.0.2.13")
P3 = Peer("198.18.0.23", "02:42:c6:12:00:17", "192.0.2.13")


def run(coro):
    return asyncio.run(coro)


def port(ep_id: str, netns: str = CTR, n: int = 2) -> Port:
    return Port(ep_id, netns, f"nwv{ep_id}", "eth0", f"198.18.0.{n}/24", f"02:42:c6:12:00:{n:02x}", 1450)


def desired(path: str = SB, ports=(), peers=(), vni: int = 4096) -> DesiredNetwork:
    return DesiredNetwork(Sandbox(network_id=path[-12:], path=path, vni=vni, gateway_cidr="198.18.0.1/24", mtu=1450),
                          "192.0.2.11", 4789, f"nwx{vni:06x}", tuple(ports), frozenset(peers))


def ops(steps) -> list[str]:
    return [s.op for s in steps]


def fake() -> FakeDataPlane:
    dp = FakeDataPlane()
    dp.add_host_interface("eth0", "192.0.2.11/24")
    return dp


async def observe(dp: FakeDataPlane, path: str) -> ObservedNetwork:
    """What the agent observes: the data plane's list calls only."""
    if path.rsplit("/", 1)[1] not in await dp.list_netns(path.rsplit("/", 1)[0]):
        return ObservedNetwork(False)
    return ObservedNetwork(True, frozenset(await dp.list_overlay_endpoints(path)), frozenset(await dp.list_peers(path)))


async def converge(dp: FakeDataPlane, want: DesiredNetwork, path: str = SB):
    out = await execute(dp, plan_network(path, want, await observe(dp, path)))
    assert not out.failed, out.failed
    return out


# ---------------------------------------------------------------- pure plans

def test_a_new_sandbox_is_ensured_then_its_ports_then_its_whole_peer_table():
    steps = plan_network(SB, desired(ports=[port("e1")], peers=[P1, P2]), ObservedNetwork(False))
    assert ops(steps) == ["ensure_sandbox", "ensure_overlay_endpoint", "sync_peers"]
    assert steps[2].args == (SB, frozenset({P1, P2}))
    assert steps[1].needs == (steps[0].group,)   # no port without its sandbox
    assert steps[0].if_true is not None and steps[0].if_true.op == "sync_peers"


def test_a_converged_network_plans_only_idempotent_ensures():
    steps = plan_network(SB, desired(ports=[port("e1")], peers=[P1]),
                         ObservedNetwork(True, frozenset({"nwve1"}), frozenset({P1})))
    assert ops(steps) == ["ensure_sandbox", "ensure_overlay_endpoint"]


def test_stale_ports_and_peers_go_missing_ones_come():
    steps = plan_network(SB, desired(ports=[port("e1")], peers=[P1, P2]),
                         ObservedNetwork(True, frozenset({"nwve1", "nwvgone"}), frozenset({P1, P3})))
    assert ops(steps) == ["ensure_sandbox", "delete_overlay_endpoint", "ensure_overlay_endpoint", "remove_peers",
                          "add_peers"]
    assert steps[1].args == (SB, "nwvgone")
    assert steps[3].args == (SB, (P3,)) and steps[4].args == (SB, (P2,))


def test_unreadable_tables_are_programmed_whole():
    steps = plan_network(SB, desired(peers=[P1]), ObservedNetwork(True, None, None))
    assert ops(steps) == ["ensure_sandbox", "sync_peers"]   # no port deleted on a guess


def test_a_sandbox_nobody_wants_is_deleted_and_an_absent_one_left_alone():
    assert ops(plan_network(SB, None, ObservedNetwork(True))) == ["delete_sandbox"]
    assert plan_network(SB, None, ObservedNetwork(False)) == []


def test_gateway_plan_keeps_ports_of_attaches_in_progress():
    gw = Gateway("nw_gwbridge", "198.19.0.1/24", "198.19.0.0/24", 1500)
    gp = GwPort("e1", CTR, "nwge1", "eth1", "198.19.0.2/24", "02:42:c6:13:00:02", 1500, "198.19.0.1")
    steps = plan_gateway(gw, [gp], {"nwge1", "nwgold", "nwgnew"}, keep={"nwgnew"})
    assert ops(steps) == ["delete_gw_endpoint", "ensure_gwbridge", "apply_overlay_firewall", "ensure_gw_endpoint"]
    assert steps[0].args == ("nwgold",)
    assert steps[3].needs == ("gateway",)
    assert ops(plan_gateway(None, [], {"nwgold"})) == ["delete_gw_endpoint"]


# ---------------------------------------------------------------- on the fake data plane

@pytest.fixture
def dp():
    d = fake()
    run(d.create_netns(CTR))
    run(d.create_netns(CTR2))
    return d


def test_execute_converges_and_a_second_round_changes_nothing(dp):
    want = desired(ports=[port("e1"), port("e2", CTR2, 3)], peers=[P1, P2])

    async def go():
        await converge(dp, want)
        assert await dp.list_peers(SB) == {P1, P2}
        assert await dp.list_overlay_endpoints(SB) == ["nwve1", "nwve2"]
        before = dp.changes
        out = await converge(dp, want)
        assert dp.changes == before and not out.failed
    run(go())


def test_a_crash_half_way_is_finished_by_the_next_round(dp):
    want = desired(ports=[port("e1"), port("e2", CTR2, 3)], peers=[P1, P2])

    async def go():
        dp.fail_on("ensure_overlay_endpoint", after=1)   # the second endpoint fails, as a crash there would
        out = await execute(dp, plan_network(SB, want, await observe(dp, SB)))
        assert [s.args[2] for s, _ in out.failed] == ["nwve2"]
        # Only that endpoint's group stopped: the other endpoint and the peers went on.
        assert await dp.list_overlay_endpoints(SB) == ["nwve1"]
        assert await dp.list_peers(SB) == {P1, P2}
        await converge(dp, want)
        assert await dp.list_overlay_endpoints(SB) == ["nwve1", "nwve2"]
    run(go())


def test_a_failed_sandbox_skips_its_network_only(dp):
    a = desired(SB, [port("e1")], [P1], vni=4096)
    b = desired(SB2, [port("e2", CTR2, 3)], [P2], vni=4097)

    async def go():
        dp.fail_on("ensure_sandbox", error=KernelError("injected"))
        out = await execute(dp, plan_network(SB, a, await observe(dp, SB)) + plan_network(SB2, b, await observe(dp, SB2)))
        assert {s.op for s, _ in out.failed} == {"ensure_sandbox"}
        assert {s.op for s in out.skipped} == {"ensure_overlay_endpoint", "sync_peers"}
        assert await dp.list_netns("/run/nwt/sandboxes") == ["bbbbbbbbbbbb"]
        assert await dp.list_peers(SB2) == {P2}
    run(go())


def test_drift_of_every_kind_is_repaired(dp):
    want = desired(ports=[port("e1")], peers=[P1, P2])

    async def go():
        await converge(dp, want)
        dp.delete_link("vxlan0", SB)                     # the VXLAN device, with its peer table
        await converge(dp, want)
        assert await dp.list_peers(SB) == {P1, P2} and dp.link("vxlan0", SB).master == "br0"
        dp.delete_link("br0", SB)                        # the bridge: its ports fall off
        await converge(dp, want)
        assert dp.link("nwve1", SB).master == "br0" and dp.link("vxlan0", SB).master == "br0"
        dp.delete_link("nwve1", SB)                      # the container's veth (both ends go)
        await converge(dp, want)
        assert dp.link("eth0", CTR).addresses == ["198.18.0.2/24"]
        dp.drop_peer(SB, P1, fdb=False)                  # a neighbour entry
        dp.drop_peer(SB, P2, neigh=False)                # an FDB entry
        await converge(dp, want)
        assert await dp.list_peers(SB) == {P1, P2}
        dp.remove_netns(SB)                              # the whole sandbox
        await converge(dp, want)
        assert await dp.list_peers(SB) == {P1, P2} and await dp.list_overlay_endpoints(SB) == ["nwve1"]
    run(go())


def test_gateway_drift_is_repaired(dp):
    gw = Gateway("nw_gwbridge", "198.19.0.1/24", "198.19.0.0/24", 1500)
    gp = GwPort("e1", CTR, "nwge1", "eth1", "198.19.0.2/24", "02:42:c6:13:00:02", 1500, "198.19.0.1")

    async def go():
        async def once():
            out = await execute(dp, plan_gateway(gw, [gp], set(await dp.list_links("nwg"))))
            assert not out.failed, out.failed
        await once()
        table = dict(dp.tables)
        dp.drop_table("netweft-ov")                       # the gateway bridge's firewall
        dp.delete_link("nwge1")                            # a container's port on it
        await once()
        assert dp.tables == table and dp.link("nwge1").master == "nw_gwbridge"
        assert dp.default_route(CTR) == ("198.19.0.1", "eth1")
        dp.delete_link("nw_gwbridge")                      # the bridge itself
        await once()
        assert dp.link("nwge1").master == "nw_gwbridge"
    run(go())


def test_the_periodic_resync_makes_only_the_ports_missing_from_the_sandbox():
    """Looking into every owner's namespace each round would cost a socket per namespace: only at start."""
    want = desired(ports=[port("e1"), port("e2")], peers=[P1])
    seen = ObservedNetwork(True, frozenset({"nwve1"}), frozenset({P1}))
    steps = plan_network(SB, want, seen, full=False)
    assert ops(steps) == ["ensure_sandbox", "ensure_overlay_endpoint"]
    assert steps[1].args[1:3] == (port("e2").netns, "nwve2")
    assert ops(plan_network(SB, want, seen, full=True)).count("ensure_overlay_endpoint") == 2
    # Nothing readable about the ports: every port is ensured.
    assert ops(plan_network(SB, want, ObservedNetwork(True, None, frozenset({P1})), full=False)).count(
        "ensure_overlay_endpoint") == 2


def test_the_periodic_resync_remakes_only_gateway_ports_off_the_bridge():
    gw = Gateway("nw_gwbridge", "198.19.0.1/24", "198.19.0.0/24", 1500)
    a = GwPort("e1", CTR, "nwge1", "eth1", "198.19.0.2/24", "02:42:c6:13:00:02", 1500, "198.19.0.1")
    b = GwPort("e2", CTR, "nwge2", "eth1", "198.19.0.3/24", "02:42:c6:13:00:03", 1500, "198.19.0.1")
    steps = plan_gateway(gw, [a, b], {"nwge1", "nwge2"}, attached={"nwge1"})
    assert ops(steps) == ["ensure_gwbridge", "apply_overlay_firewall", "ensure_gw_endpoint"]
    assert steps[2].args[2] == "nwge2"
    assert ops(plan_gateway(gw, [a, b], {"nwge1", "nwge2"})).count("ensure_gw_endpoint") == 2
