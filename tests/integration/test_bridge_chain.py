"""Bridges past the kernel's 1,023 ports (dataplane/bridgechain.py) on the real kernel.

Most tests make chains grow after two ports per bridge (the capacities are module settings, read at call
time), so a handful of containers shows every part: extensions, their links, first fit, isolation on the
gateway bridge, repairs of parts deleted by hand, a restarted data plane that finds everything in place.
One test puts more than 1,024 containers on one overlay on one host with the kernel's real limits.
Hosts and containers are namespaces of the test (nwt-ov-*, /tmp/nwt-ov-*), removed at teardown.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from netweft.dataplane import bridgechain, netns
from netweft.dataplane.overlay import Peer
from netweft.errors import PoolExhausted

from test_overlay_dataplane import A_IP, B_IP, PORT, Lab, addrs, in_ns, links, outside_world, ping

VNI = 4343
GW = "nwt-gw"
GW_CIDR, GW_IP = "198.19.240.1/20", "198.19.240.1"


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def small(monkeypatch):
    """Chains grow after two container ports per bridge."""
    monkeypatch.setattr(bridgechain, "FIRST_PORTS", 2)
    monkeypatch.setattr(bridgechain, "EXTENSION_PORTS", 2)


def ip_of(i: int) -> str:
    return f"198.18.{16 + i // 250}.{2 + i % 250}"


def mac_of(i: int, gw: bool = False) -> str:
    return f"02:00:{0xaa if gw else 0xbb:02x}:00:{i >> 8:02x}:{i & 0xFF:02x}"


def gw_ip_of(i: int) -> str:
    n = 2 + i
    return f"198.19.{240 + n // 256}.{n % 256}"


class Site:
    """Host a with one overlay sandbox (a peer of host b's) and containers attached to it and to the gateway
    bridge; host b with one container."""

    def __init__(self, lab: Lab, gateway: bool = True):
        self.lab = lab
        self.a, self.b = lab.host("a"), lab.host("b")
        lab.underlay(self.a, self.b)
        self.out = outside_world(lab, self.a) if gateway else None
        self.sa, self.sb = lab.path("sb-a"), lab.path("sb-b")
        self.a.ov.ensure_sandbox(self.sa, VNI, "198.18.16.1/20", 1450, A_IP, PORT)
        self.b.ov.ensure_sandbox(self.sb, VNI, "198.18.16.1/20", 1450, B_IP, PORT)
        if gateway:
            self.a.ov.ensure_gwbridge(GW, GW_CIDR, 1500)
            self.a.ov.apply_overlay_firewall(GW, "198.19.240.0/20")
        self.remote = lab.container("rb")
        self.b.ov.ensure_endpoint(self.sb, self.remote, "ve-rb", "eth0", "198.18.31.250/20", "02:00:cc:00:00:01",
                                  1450)
        self.b.ov.add_peers(self.sb, [Peer("198.18.31.250", "02:00:cc:00:00:01", B_IP)])
        self.ctrs: dict[int, str] = {}

    def attach(self, i: int, gateway: bool = True) -> str:
        ctr = self.ctrs.get(i) or self.lab.container(f"c{i}")
        self.ctrs[i] = ctr
        self.a.ov.ensure_endpoint(self.sa, ctr, f"ve{i}", "eth0", f"{ip_of(i)}/20", mac_of(i), 1450)
        if gateway:
            self.a.ov.ensure_gw_endpoint(ctr, GW, f"gw{i}", "eth1", f"{gw_ip_of(i)}/20", mac_of(i, True), 1500,
                                         GW_IP)
        return ctr

    def peer_up(self, indexes) -> None:
        """Program host b with the containers `indexes` of host a, and host a with b's container."""
        self.a.ov.sync_peers(self.sa, {Peer("198.18.31.250", "02:00:cc:00:00:01", B_IP)})
        self.b.ov.sync_peers(self.sb, {Peer("198.18.31.250", "02:00:cc:00:00:01", B_IP)}
                             | {Peer(ip_of(i), mac_of(i), A_IP) for i in indexes})


def masters(path: str) -> dict[str, str | None]:
    return {name: link.get("master") for name, link in links(path).items()}


def test_chains_grow_first_fit_and_carry_traffic(lab, small):
    s = Site(lab)
    for i in range(5):
        s.attach(i)
    m, g = masters(s.sa), masters(s.a.path)
    assert [m[f"ve{i}"] for i in range(5)] == ["br0", "br0", "br0-1", "br0-1", "br0-2"]
    assert [g[f"gw{i}"] for i in range(5)] == [GW, GW, f"{GW}-1", f"{GW}-1", f"{GW}-2"]
    assert m["br0-1a"] == "br0" and m["br0-1b"] == "br0-1" and m["br0-2a"] == "br0" and m["vxlan0"] == "br0"
    assert g[f"{GW}-2a"] == GW and g[f"{GW}-2b"] == f"{GW}-2"
    # The links are not endpoints; an extension has no address.
    assert s.a.ov.list_endpoints(s.sa) == [f"ve{i}" for i in range(5)]
    for path, ext in ((s.a.path, f"{GW}-1"), (s.sa, "br0-1")):
        assert not [a for a, _ in dict(addrs(path))[ext] if ":" not in a]
    slave = links(s.a.path)
    assert slave[f"{GW}-1a"]["linkinfo"]["info_slave_data"]["isolated"] is True     # on the first bridge
    assert slave[f"{GW}-1b"]["linkinfo"]["info_slave_data"]["isolated"] is False    # on the extension
    assert slave["gw4"]["linkinfo"]["info_slave_data"]["isolated"] is True

    s.peer_up(range(5))
    c = s.ctrs
    # Beyond the first bridge: to another host, to the first bridge, to another extension, to br0's address.
    assert ping(c[4], "198.18.31.250") and ping(c[4], ip_of(0)) and ping(c[2], ip_of(4))
    assert ping(c[4], "198.18.16.1") and ping(s.remote, ip_of(3))
    # Egress through an extension of the gateway bridge, masqueraded (the outside has no route back).
    assert ping(c[4], "203.0.113.2") and ping(c[0], "203.0.113.2") and ping(c[2], GW_IP)
    # The gateway bridge keeps containers apart across its extensions too: no L2 path, nothing routed.
    for src, dst in ((4, 0), (4, 2), (2, 3), (0, 4)):
        assert not ping(c[src], gw_ip_of(dst), attempts=1), (src, dst)

    # First fit: a port freed on the first bridge is taken again before an extension's.
    s.a.ov.delete_endpoint(s.sa, "ve1")
    s.a.ov.delete_gw_endpoint("gw1")
    s.attach(5)
    assert masters(s.sa)["ve5"] == "br0" and masters(s.a.path)["gw5"] == GW
    s.attach(6)
    assert masters(s.sa)["ve6"] == "br0-2" and masters(s.a.path)["gw6"] == f"{GW}-2"

    # The gateway bridge goes with its extensions and their links; its ports stay, detached.
    s.a.ov.delete_overlay_firewall()
    s.a.ov.delete_gwbridge(GW)
    left = links(s.a.path)
    assert not [n for n in left if n.startswith(f"{GW}")] and "gw4" in left and "master" not in left["gw4"]


def test_parts_deleted_by_hand_are_put_back(lab, small):
    s = Site(lab)
    for i in range(5):
        s.attach(i)
    s.peer_up(range(5))
    c = s.ctrs
    assert ping(c[4], "198.18.31.250") and ping(c[4], "203.0.113.2")

    def ensure_all() -> None:
        s.a.ov.ensure_sandbox(s.sa, VNI, "198.18.16.1/20", 1450, A_IP, PORT)
        s.a.ov.ensure_gwbridge(GW, GW_CIDR, 1500)

    # An extension bridge, the link of another, br0 itself: the sandbox's ensure puts each back with its ports.
    for gone in ("br0-1", "br0-2a", "br0"):
        in_ns(s.sa, "ip", "link", "del", gone, check=True)
        ensure_all()
        m = masters(s.sa)
        assert m["ve2"] == m["ve3"] == "br0-1" and m["ve4"] == "br0-2" and m["ve0"] == m["ve1"] == "br0", gone
        assert m["br0-1a"] == m["br0-2a"] == m["vxlan0"] == "br0"
        assert ping(c[4], "198.18.31.250") and ping(c[2], ip_of(0)), gone

    # The gateway bridge: a link deleted by hand comes back with its bridge's ensure; an extension's ports left
    # detached are put back by their ensure (the agent's resync sees them missing from list_ports).
    s.a.ip("link", "del", f"{GW}-2a")
    assert not ping(c[4], "203.0.113.2", attempts=1)
    ensure_all()
    assert ping(c[4], "203.0.113.2")
    s.a.ip("link", "del", f"{GW}-1")
    ensure_all()
    assert "master" not in links(s.a.path)["gw2"]
    for i in (2, 3):
        s.attach(i)
    g = masters(s.a.path)
    assert g["gw2"] == g["gw3"] == f"{GW}-1" and g[f"{GW}-1b"] == f"{GW}-1"
    assert ping(c[2], "203.0.113.2") and ping(c[3], "203.0.113.2")
    assert links(s.a.path)[f"{GW}-1a"]["linkinfo"]["info_slave_data"]["isolated"] is True


def test_a_restarted_data_plane_finds_everything_in_place(lab, small):
    s = Site(lab)
    for i in range(5):
        s.attach(i)
    before = (links(s.sa), links(s.a.path))
    # A new Overlay (the daemon restarted): the same ensures change nothing, and first fit continues.
    s.a.stop()
    s.a.start_overlay()
    s.a.ov.ensure_sandbox(s.sa, VNI, "198.18.16.1/20", 1450, A_IP, PORT)
    s.a.ov.ensure_gwbridge(GW, GW_CIDR, 1500)
    for i in range(5):
        s.attach(i)
    assert (links(s.sa), links(s.a.path)) == before
    s.attach(5)
    assert masters(s.sa)["ve5"] == "br0-2" and masters(s.a.path)["gw5"] == f"{GW}-2"


def test_a_full_chain_says_so_in_one_line(lab, monkeypatch):
    monkeypatch.setattr(bridgechain, "FIRST_PORTS", 1)
    monkeypatch.setattr(bridgechain, "EXTENSION_PORTS", 1)
    monkeypatch.setattr(bridgechain, "MAX_EXTENSIONS", 1)
    s = Site(lab, gateway=False)
    s.attach(0, gateway=False)
    s.attach(1, gateway=False)
    with pytest.raises(PoolExhausted) as e:
        s.attach(2, gateway=False)
    assert str(e.value).startswith("bridge br0 is full: 2 container ports") and "\n" not in str(e.value)
    assert "remove a container" in str(e.value)


@pytest.mark.timeout(1800)   # ≈2,000 veths and as many namespaces: minutes on a loaded 2-core machine
def test_more_than_1024_containers_on_one_overlay_on_one_host(lab):
    """The kernel's real limits: 1,030 containers on one overlay on host a (each also on the gateway bridge).
    One beyond the first bridges pings a container on host b and one on the first bridge, and goes out
    through the gateway bridge; everything is removed after."""
    n = 1030
    s = Site(lab)
    ctr_dir = lab.path("many")
    os.makedirs(ctr_dir)

    def make(i: int) -> str:
        path = os.path.join(ctr_dir, f"c{i}")
        netns.create_netns(path)
        return path

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(make, range(n)))
    s.ctrs = dict(enumerate(paths))
    for i in range(n):
        s.attach(i)
    m, g = masters(s.sa), masters(s.a.path)
    first = bridgechain.FIRST_PORTS
    assert sum(v == "br0" for k, v in m.items() if k.startswith("ve")) == first
    assert sum(v == "br0-1" for k, v in m.items() if k.startswith("ve")) == n - first
    assert sum(v == GW for k, v in g.items() if k.startswith("gw")) == first
    assert sum(v == f"{GW}-1" for k, v in g.items() if k.startswith("gw")) == n - first
    last, on_first = s.ctrs[n - 1], s.ctrs[0]
    assert m[f"ve{n - 1}"] == "br0-1" and g[f"gw{n - 1}"] == f"{GW}-1"
    assert len(s.a.ov.list_endpoints(s.sa)) == n
    s.peer_up([0, n - 1])
    assert ping(last, "198.18.31.250") and ping(last, ip_of(0)) and ping(on_first, ip_of(n - 1))
    assert ping(last, "203.0.113.2")

    # Everything removed: every endpoint, then the sandbox and the gateway bridge.
    for i in range(n):
        s.a.ov.delete_endpoint(s.sa, f"ve{i}")
        s.a.ov.delete_gw_endpoint(f"gw{i}")
    assert s.a.ov.list_endpoints(s.sa) == []
    s.a.ov.delete_sandbox(s.sa)
    s.a.ov.delete_overlay_firewall()
    s.a.ov.delete_gwbridge(GW)
    left = links(s.a.path)
    assert not [k for k in left if k.startswith(("gw", GW))]
    for p in paths:
        netns.delete_netns(p)
