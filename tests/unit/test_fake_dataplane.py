"""The fake data plane: what it keeps, what it refuses, drift and failure injection, and its cost.

(tests/integration/test_dataplane.py::test_the_fake_reports_what_the_real_one_does runs one sequence of
calls on it and on the real data plane and compares what both report and hold.)
"""
from __future__ import annotations

import asyncio
import ipaddress

import pytest

from netweft.dataplane.api import GWBRIDGE
from netweft.dataplane.fake import FakeDataPlane
from netweft.dataplane.firewall import OVERLAY_TABLE, BridgeRule
from netweft.errors import InvalidRequest, KernelError
from netweft.model.objects import Peer

SB = "/run/nw/sandboxes/sb1"
CTR = "/run/nw/netns/c1"
CTR2 = "/run/nw/netns/c2"
VTEP = "192.0.2.1"
P1 = Peer("198.18.1.11", "02:00:00:00:00:11", "192.0.2.11")
P2 = Peer("198.18.1.12", "02:00:00:00:00:12", "192.0.2.12")
P3 = Peer("198.18.1.13", "02:00:00:00:00:13", "192.0.2.13")


def run(coro):
    return asyncio.run(coro)


def fake() -> FakeDataPlane:
    f = FakeDataPlane()
    f.add_host_interface("eth0", f"{VTEP}/24", mtu=1400)
    return f


async def overlay_host(f: FakeDataPlane) -> None:
    """One overlay on this host: sandbox, a container on it with a gateway-bridge port, two peers."""
    await f.create_netns(CTR)
    await f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001")
    await f.ensure_overlay_endpoint(SB, CTR, "nwv1", "eth0", "198.18.1.2/24", "02:00:c6:12:01:02", 1350)
    await f.ensure_gwbridge(GWBRIDGE, "198.19.0.1/24", 1400)
    await f.ensure_gw_endpoint(CTR, GWBRIDGE, "nwg1", "eth1", "198.19.0.2/24", "02:00:c6:13:00:02", 1400,
                               "198.19.0.1")
    await f.apply_overlay_firewall(GWBRIDGE, "198.19.0.0/24")
    await f.sync_peers(SB, {P1, P2})


# ---- what it keeps ------------------------------------------------------------------------------------

def test_a_bridge_network_is_kept_and_reported():
    f = fake()

    async def main():
        await f.create_netns(CTR)
        await f.ensure_bridge("nw-a", "198.18.0.1/24", 1500, None)
        await f.ensure_endpoint(CTR, "nw-a", "nwva", "eth0", "198.18.0.2/24", "02:42:c6:12:00:02", 1500,
                                "198.18.0.1")
        await f.apply_firewall("netweft", [BridgeRule("nw-a", "198.18.0.0/24", internal=False, masquerade=True)])
        await f.set_ip_forward(True)
        assert await f.link_exists("nw-a") and not await f.link_exists("nw-b")
        assert not await f.link_exists("not a name")
        assert await f.link_info("nw-a") == ("bridge", None, False)
        assert await f.link_info("nwva") == ("veth", "nw-a", False)
        assert await f.link_info("eth0") == (None, None, False)   # a physical device: no kind
        assert await f.link_info("lo") == (None, None, True)
        assert await f.link_info("nw-b") is None and await f.link_info("not a name") is None
        assert await f.list_links("nw") == ["nw-a", "nwva"]
        assert await f.ipv4_addresses() == {"eth0": [VTEP], "nw-a": ["198.18.0.1"]}
        assert await f.host_routes("nw-") == [ipaddress.ip_network("192.0.2.0/24")]
        assert await f.host_routes("") == [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.18.0.0/24")]
        assert await f.underlay_mtu(VTEP) == 1400
        assert await f.list_netns("/run/nw/netns/") == ["c1"]

    run(main())
    eth0 = f.link("eth0", CTR)
    assert (eth0.kind, eth0.mtu, eth0.addresses, eth0.mac, eth0.up) == ("veth", 1500, ["198.18.0.2/24"],
                                                                         "02:42:c6:12:00:02", True)
    assert f.link("nwva").master == "nw-a" and f.link("nwva").peer == (CTR, "eth0")
    assert f.default_route(CTR) == ("198.18.0.1", "eth0")
    assert "masquerade nw-a" in str(f.tables["netweft"]) and f.ip_forward


def test_an_overlay_host_is_kept_and_a_second_pass_changes_nothing():
    f = fake()
    run(overlay_host(f))
    assert [f.link(n, SB).master for n in ("vxlan0", "nwv1")] == ["br0", "br0"]
    assert f.link("vxlan0", SB).vxlan == (4097, VTEP, 4789) and f.link("br0", SB).addresses == ["198.18.1.1/24"]
    assert f.link("nwg1").isolated and f.link("nwv1", SB).isolated is False
    assert f.default_route(CTR) == ("198.19.0.1", "eth1")
    assert f.ip_forward and OVERLAY_TABLE in f.tables

    async def check():
        assert await f.list_overlay_endpoints(SB) == ["nwv1"]
        assert await f.list_peers(SB) == {P1, P2}
        assert await f.list_netns("/run/nw/sandboxes") == ["sb1"]
        assert await f.list_links("nwg") == ["nwg1"]

    run(check())
    before = f.changes
    run(overlay_host(f))
    assert f.changes == before, "converged: a second pass changed something"


def test_peers_add_remove_sync_as_the_kernel_does():
    f = fake()

    async def main():
        await f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001")
        await f.add_peers(SB, [P1, P2])
        # Leftovers of a crash or of someone else: an FDB entry without a neighbour.
        f.link("vxlan0", SB).fdb["02:00:00:00:00:99"] = ["192.0.2.99"]
        assert await f.sync_peers(SB, {P1, P3}) == 5   # -neigh P2, -fdb P2/orphan, +fdb P3, +neigh P3
        assert await f.list_peers(SB) == {P1, P3}
        assert await f.sync_peers(SB, {P1, P3}) == 0
        moved = Peer(P1.ip, P1.mac, "192.0.2.21")
        assert await f.sync_peers(SB, {moved, P3}) == 2
        await f.add_peers(SB, [moved, P3])             # adding again is fine (replace)
        await f.remove_peers(SB, [moved, P3, P2])      # absent ones are fine
        assert await f.list_peers(SB) == set()
        # Canonical forms: what is read back equals what was given.
        await f.add_peers(SB, [Peer("198.18.1.14", "02:AA:BB:CC:DD:EE", "192.0.2.14")])
        assert await f.list_peers(SB) == {Peer("198.18.1.14", "02:aa:bb:cc:dd:ee", "192.0.2.14")}
        # No sandbox: nothing to list or remove, nothing to add to.
        assert await f.list_peers("/run/nw/sandboxes/none") == set()
        await f.remove_peers("/run/nw/sandboxes/none", [P1])
        with pytest.raises(KernelError, match="no overlay sandbox"):
            await f.add_peers("/run/nw/sandboxes/none", [P1])

    run(main())


def test_deleting_takes_what_the_kernel_would_along():
    f = fake()

    async def main():
        await overlay_host(f)
        await f.delete_sandbox(SB, "nwx001001")
        assert f.link("eth0", CTR) is None, "the endpoint's container end went with the sandbox"
        assert await f.list_netns("/run/nw/sandboxes") == [] and await f.list_peers(SB) == set()
        # The same VNI and port can be used again right away.
        assert await f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001") is True
        await f.delete_netns(CTR)
        assert f.link("nwg1") is None, "a veth goes when its other end's namespace goes"
        await f.delete_gwbridge(GWBRIDGE)
        await f.delete_overlay_firewall()
        assert OVERLAY_TABLE not in f.tables
        for call in (f.delete_sandbox(SB), f.delete_netns(CTR), f.delete_gwbridge(GWBRIDGE),
                     f.delete_gw_endpoint("nwg1"), f.delete_overlay_endpoint(SB, "nwv1"), f.delete_endpoint("nwva"),
                     f.delete_bridge("nw-a", None), f.delete_overlay_firewall(), f.apply_firewall("netweft", [])):
            await call   # idempotent

    run(main())


# ---- drift, as an operator with ip/nft would make it -----------------------------------------------------

def test_a_deleted_vxlan_device_is_reported_and_recreated_with_its_peers_to_add():
    f = fake()
    run(overlay_host(f))
    f.delete_link("vxlan0", SB)

    async def main():
        assert await f.list_peers(SB) == set()            # the peers lived on it
        assert await f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001") is True
        assert await f.sync_peers(SB, {P1, P2}) == 4
        assert await f.list_peers(SB) == {P1, P2}

    run(main())
    assert f.link("vxlan0", SB).master == "br0"


def test_a_deleted_bridge_comes_back_with_its_ports():
    f = fake()
    run(overlay_host(f))
    f.delete_link("br0", SB)
    assert f.link("nwv1", SB).master is None and f.link("vxlan0", SB).master is None
    assert run(f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001")) is False
    assert f.link("br0", SB).addresses == ["198.18.1.1/24"]
    assert f.link("nwv1", SB).master == "br0" and f.link("vxlan0", SB).master == "br0"
    assert run(f.list_peers(SB)) == {P1, P2}             # peers are on vxlan0, which stayed


def test_deleted_veths_are_reported_and_repaired():
    f = fake()
    run(overlay_host(f))
    f.delete_link("nwv1", SB)
    f.delete_link("nwg1")
    assert f.link("eth0", CTR) is None and f.link("eth1", CTR) is None and f.default_route(CTR) is None
    assert run(f.list_overlay_endpoints(SB)) == [] and run(f.list_links("nwg")) == []
    run(overlay_host(f))
    assert run(f.list_overlay_endpoints(SB)) == ["nwv1"] and f.link("eth0", CTR).addresses == ["198.18.1.2/24"]
    assert f.default_route(CTR) == ("198.19.0.1", "eth1") and f.link("nwg1").master == GWBRIDGE


def test_settings_changed_by_hand_are_put_back():
    f = fake()
    run(overlay_host(f))
    f.set_link("eth0", CTR, mtu=1500, addresses=[])
    f.set_link("vxlan0", SB, up=False)
    f.set_link("nwg1", isolated=False)
    before = f.changes
    run(overlay_host(f))
    assert f.changes == before + 4
    assert f.link("eth0", CTR).mtu == 1350 and f.link("vxlan0", SB).up and f.link("nwg1").isolated


def test_dropped_peers_and_tables_are_repaired_by_the_next_pass():
    f = fake()
    run(overlay_host(f))
    f.drop_peer(SB, P1)
    f.drop_peer(SB, P2, neigh=False)     # half a peer: its neighbour stays, its FDB entry goes
    f.drop_table(OVERLAY_TABLE)
    assert run(f.list_peers(SB)) == set()
    assert run(f.sync_peers(SB, {P1, P2})) == 3
    run(f.apply_overlay_firewall(GWBRIDGE, "198.19.0.0/24"))
    assert OVERLAY_TABLE in f.tables and run(f.list_peers(SB)) == {P1, P2}


def test_a_namespace_removed_by_hand_takes_its_links():
    f = fake()
    run(overlay_host(f))
    f.remove_netns(SB)
    assert f.link("eth0", CTR) is None and run(f.list_netns("/run/nw/sandboxes")) == []
    assert run(f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001")) is True


# ---- failures ---------------------------------------------------------------------------------------------

def test_an_injected_failure_half_way_changes_nothing_and_the_next_pass_converges():
    f = fake()

    async def reconcile():
        await f.ensure_sandbox(SB, 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001")
        for i, ctr in enumerate((CTR, CTR2), start=2):
            await f.create_netns(ctr)
            await f.ensure_overlay_endpoint(SB, ctr, f"nwv{i}", "eth0", f"198.18.1.{i}/24", f"02:00:00:00:01:0{i}",
                                            1350)

    f.fail_on("ensure_overlay_endpoint", times=1, after=1, error=KernelError("the kernel said no"))
    with pytest.raises(KernelError, match="the kernel said no"):
        run(reconcile())
    assert run(f.list_overlay_endpoints(SB)) == ["nwv2"]   # the first endpoint made it, the second did not
    run(reconcile())
    assert run(f.list_overlay_endpoints(SB)) == ["nwv2", "nwv3"]
    assert f.calls["ensure_overlay_endpoint"] == 4

    f.fail_on("sync_peers", times=2)
    for _ in range(2):
        with pytest.raises(KernelError, match="injected failure"):
            run(f.sync_peers(SB, {P1}))
    assert run(f.sync_peers(SB, {P1})) == 2
    with pytest.raises(ValueError):
        f.fail_on("ensure_sandboxx")


def test_closed_refuses_calls():
    f = fake()
    run(f.close())
    with pytest.raises(KernelError, match="closed"):
        run(f.link_exists("eth0"))


# ---- refusals: the same rules as the real data plane --------------------------------------------------------

BAD_ARGUMENTS = [
    ("create_netns", ("relative/path",)),
    ("create_netns", (5,)),
    ("list_netns", ("",)),
    ("ensure_bridge", ("a-name-much-too-long", None, 1500, None)),
    ("ensure_bridge", ("nw-a", "198.18.0.1", 1500, None)),            # no prefix length
    ("ensure_bridge", ("nw-a", "198.18.0.1/24", 50, None)),
    ("ensure_bridge", ("nw-a", None, 1500, "nw-a")),
    ("ensure_endpoint", (CTR, "nw-a", "nwva", "eth0", "198.18.0.2/24", "01:00:5e:00:00:01", 1500, None)),
    ("ensure_endpoint", (CTR, "nw-a", "nwva", "eth 0", "198.18.0.2/24", "02:00:00:00:00:01", 1500, None)),
    ("ensure_endpoint", (CTR, "nw-a", "nwva", "eth0", "198.18.0.2/24", "02:00:00:00:00:01", 1500, "gw")),
    ("apply_firewall", ("bad table", [])),
    ("apply_firewall", ("netweft", [{"bridge": "nw-a"}])),
    ("ensure_sandbox", (SB, 1 << 24, "198.18.1.1/24", 1350, VTEP, 4789, "nwx")),
    ("ensure_sandbox", (SB, 7, "198.18.1.1/24", 1350, VTEP, 0, "nwx")),
    ("ensure_sandbox", (SB, 7, "198.18.1.1/24", 1350, "192.0.2", 4789, "nwx")),
    ("ensure_sandbox", (SB, True, "198.18.1.1/24", 1350, VTEP, 4789, "nwx")),
    ("ensure_sandbox", ("sb", 7, "198.18.1.1/24", 1350, VTEP, 4789, "nwx")),
    ("ensure_overlay_endpoint", (SB, CTR, "nwv1", "eth0", "198.18.1.2/33", "02:00:00:00:00:01", 1350)),
    ("add_peers", (SB, [("198.18.1.3", "02:00:00:00:00:03", VTEP)])),
    ("add_peers", (SB, [Peer("198.18.1.3", "02:00:00:00:00", VTEP)])),
    ("add_peers", (SB, [Peer(["198.18.1.3"], "02:00:00:00:00:03", VTEP)])),      # a Struct made in Python
    ("add_peers", (SB, [Peer("198.18.1.03", "02:00:00:00:00:03", VTEP)])),
    ("sync_peers", (SB, [P1, Peer(P1.ip, P2.mac, P2.vtep)])),
    ("ensure_gwbridge", (GWBRIDGE, "198.19.0.1/24", 65536)),
    ("ensure_gw_endpoint", (CTR, GWBRIDGE, "nwg1", "eth1", "198.19.0.2/24", "02:00:00:00:00:01", 1400, "x")),
    ("apply_overlay_firewall", (GWBRIDGE, "198.19.0.0/33")),
    ("underlay_mtu", ("not an address",)),
]


@pytest.mark.parametrize("method,args", BAD_ARGUMENTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_ARGUMENTS)])
def test_malformed_arguments_are_refused_before_anything_changes(method, args):
    f = fake()
    run(overlay_host(f))
    before = f.changes
    with pytest.raises(InvalidRequest) as e:
        run(getattr(f, method)(*args))
    assert "\n" not in str(e.value)
    assert f.changes == before


def test_the_kernel_refusals_of_the_real_one():
    f = fake()
    run(overlay_host(f))
    f.add_link("nw-x", "veth")   # someone else's interface

    refusals = [
        (f.ensure_bridge("nw-x", None, 1500, None), "not a bridge"),
        (f.ensure_bridge("nw-a", None, 1500, "eth9"), "does not exist"),
        (f.ensure_endpoint(CTR, "nw-missing", "nwva", "eth0", "198.18.0.2/24", "02:00:00:00:00:01", 1500, None),
         "does not exist"),
        (f.ensure_endpoint("/run/nw/netns/none", GWBRIDGE, "nwva", "eth5", "198.18.0.2/24", "02:00:00:00:00:01",
                           1500, None), "cannot open network namespace"),
        (f.delete_bridge("nw-x", None), "not a bridge"),
        (f.delete_endpoint(GWBRIDGE), "not a veth"),
        (f.ensure_sandbox("/run/nw/sandboxes/sb2", 4097, "198.18.1.1/24", 1350, VTEP, 4789, "nwx001001"),
         "File exists"),
        (f.ensure_overlay_endpoint("/run/nw/sandboxes/none", CTR, "nwv9", "eth9", "198.18.1.9/24",
                                   "02:00:00:00:00:09", 1350), "no overlay sandbox"),
        (f.ensure_overlay_endpoint(SB, CTR, "nwv9", "lo", "198.18.1.9/24", "02:00:00:00:00:09", 1350),
         "not a veth"),
        (f.ensure_overlay_endpoint(SB, CTR, "vxlan0", "eth9", "198.18.1.9/24", "02:00:00:00:00:09", 1350),
         "not a veth"),
        (f.ensure_gwbridge("nw-x", "198.19.0.1/24", 1500), "not a bridge"),
        (f.ensure_gw_endpoint(CTR, "nw-missing", "nwg9", "eth9", "198.19.0.9/24", "02:00:00:00:00:09", 1500,
                              "198.19.0.1"), "no gateway bridge"),
        (f.underlay_mtu("192.0.2.77"), "no interface in the host namespace has address"),
    ]
    for call, match in refusals:
        with pytest.raises(KernelError, match=match):
            run(call)
    # A second sandbox that failed on the VNI is left as the real one leaves it (namespace and bridge made).
    assert run(f.list_netns("/run/nw/sandboxes")) == ["sb1", "sb2"]


# ---- cost -------------------------------------------------------------------------------------------------

def test_two_thousand_fake_hosts_in_one_process():
    hosts = [fake() for _ in range(2000)]
    peers = {Peer(f"198.18.{i // 250}.{1 + i % 250}", f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                  f"192.0.2.{1 + i % 200}") for i in range(50)}

    async def one(f: FakeDataPlane) -> int:
        await overlay_host(f)
        return await f.sync_peers(SB, peers)

    async def main():
        return await asyncio.gather(*(one(f) for f in hosts))

    changed = run(main())
    assert set(changed) == {2 + 2 + 50 + 50}   # P1 and P2 go, 50 come: neighbour and FDB each
    assert all(len(f.link("vxlan0", SB).neigh) == 50 for f in hosts)
