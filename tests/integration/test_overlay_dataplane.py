"""The overlay data plane against the real kernel.

Simulated hosts are network namespaces named nwt-ov-XXXXXX-<role>, joined by a veth underlay
(192.0.2.0/24). Each host runs its own Overlay in a worker thread that entered the host namespace, as
the daemon would run it. Sandboxes and containers are namespaces bind-mounted under /tmp/nwt-ov-XXXXXX.
Overlays and containers use 198.18.0.0/15 only. Everything is removed at teardown, failures included.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from netweft.dataplane import garp, netns
from netweft.dataplane.nlbatch import NeighBatch, open_route_socket
from netweft.dataplane.overlay import (OVERLAY_TABLE, Overlay, Peer, default_tmp_name,
                                       render_overlay_firewall)
from netweft.errors import InvalidRequest, KernelError
from netweft.lab.cleanup import clean


PREFIX = "nwt-ov-"
A_IP, B_IP = "192.0.2.1", "192.0.2.2"
PORT = 4789   # each test's hosts are fresh namespaces, so the port never clashes
VNI = 4242
MAC_A, MAC_B = "02:00:c6:12:00:02", "02:00:c6:12:00:03"


def sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def in_ns(path: str, *cmd: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command in the network namespace at `path` (only the network namespace changes)."""
    return sh("nsenter", f"--net={path}", *cmd, check=check, timeout=timeout)


def ping(ctr: str, ip: str, attempts: int = 3) -> bool:
    for _ in range(attempts):
        if in_ns(ctr, "ping", "-c1", "-W1", ip).returncode == 0:
            return True
    return False


def links(path: str) -> dict:
    """name -> `ip -d -j link` entry of the namespace at `path`, minus counters."""
    out = json.loads(in_ns(path, "ip", "-d", "-j", "link", "show", check=True).stdout)
    for link in out:
        # Timers and counters change by themselves; identity and settings must not.
        for k in ("stats64", "stats", "operstate"):
            link.pop(k, None)
        info = link.get("linkinfo", {})
        for part in (info.get("info_data", {}), info.get("info_slave_data", {})):
            for k in [k for k in part if k.endswith("_timer")]:
                del part[k]
    return {link["ifname"]: link for link in out}


def addrs(path: str) -> list:
    out = json.loads(in_ns(path, "ip", "-j", "addr", "show", check=True).stdout)
    return [(a["ifname"], [(i["local"], i["prefixlen"]) for i in a.get("addr_info", [])]) for a in out]


def udp_ports(path: str) -> set[int]:
    out = in_ns(path, "ss", "-Hlun", check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


class _InThread:
    """Calls an object's methods in one worker thread (the one that created it)."""

    def __init__(self, pool: ThreadPoolExecutor, target):
        self._pool, self._target = pool, target

    def __getattr__(self, name):
        method = getattr(self._target, name)
        return lambda *a, **kw: self._pool.submit(method, *a, **kw).result()


class Host:
    """A simulated host: a network namespace with its own Overlay, used from a thread inside it."""

    def __init__(self, lab: "Lab", role: str):
        self.lab = lab
        self.name = f"{lab.root.name}-{role}"
        self.path = f"/run/netns/{self.name}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")
        self.pool: ThreadPoolExecutor | None = None
        self.ov = None

    def start_overlay(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix=self.name,
                                           initializer=netns.setns, initargs=(fd,))
            self.ov = _InThread(self.pool, self.pool.submit(Overlay).result())
        finally:
            os.close(fd)

    def call(self, fn, *args):
        """Run `fn` in this host's worker thread (inside the host namespace)."""
        return self.pool.submit(fn, *args).result()

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.name, *args)

    def stop(self) -> None:
        if self.pool is not None:
            try:
                if self.ov is not None:
                    self.ov.close()
            finally:
                self.pool.shutdown(wait=True)
                self.pool = None


class Lab:
    def __init__(self):
        self.root = Path(f"/tmp/{PREFIX}{secrets.token_hex(3)}")
        self.root.mkdir(mode=0o700)
        self.hosts: list[Host] = []

    def host(self, role: str, overlay: bool = True) -> Host:
        h = Host(self, role)
        self.hosts.append(h)
        if overlay:
            h.start_overlay()
        return h

    def link(self, a: Host, a_ip: str, b: Host, b_ip: str, a_mtu: int = 1500, b_mtu: int = 1500,
             a_if: str = "ul0", b_if: str = "ul0") -> None:
        """A veth between two namespaces (never in the root namespace), addressed and up."""
        a.ip("link", "add", a_if, "mtu", str(a_mtu), "type", "veth", "peer", "name", b_if, "mtu", str(b_mtu),
             "netns", b.name)
        for h, ifname, cidr in ((a, a_if, a_ip), (b, b_if, b_ip)):
            h.ip("addr", "add", cidr, "dev", ifname)
            h.ip("link", "set", ifname, "up")

    def underlay(self, a: Host, b: Host, mtu: int = 1500) -> None:
        self.link(a, f"{A_IP}/24", b, f"{B_IP}/24", mtu, mtu)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def container(self, name: str) -> str:
        path = self.path(name)
        netns.create_netns(path)
        return path

    def teardown(self) -> None:
        try:
            for h in self.hosts:
                h.stop()
        finally:
            # Kills anything left running in our namespaces, unmounts every namespace under the root,
            # deletes the host namespaces (their veths and devices go with them) and the directory.
            clean([str(self.root)], ns_prefixes=(f"{self.root.name}-",), quiet=True)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    yield
    assert not [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(PREFIX)]
    assert not [m for m in open("/proc/mounts").read().splitlines() if "nsfs" in m and PREFIX in m]
    root_links = sh("ip", "-o", "link", "show").stdout
    assert "nwt-vx" not in root_links and "nwt-gw" not in root_links and "vxlan0" not in root_links


def two_hosts(lab: Lab, mtu: int = 1500, overlay_mtu: int = 1450):
    """Hosts a and b on one underlay, each with the sandbox of one overlay and one container."""
    a, b = lab.host("a"), lab.host("b")
    lab.underlay(a, b, mtu)
    out = []
    for h, local, ip, mac in ((a, A_IP, "198.18.0.2/24", MAC_A), (b, B_IP, "198.18.0.3/24", MAC_B)):
        sb, ctr = lab.path(f"sb-{h.name[-1]}"), lab.container(f"ctr-{h.name[-1]}")
        h.ov.ensure_sandbox(sb, VNI, "198.18.0.1/24", overlay_mtu, local, PORT)
        h.ov.ensure_endpoint(sb, ctr, f"ve-{h.name[-1]}", "eth0", ip, mac, overlay_mtu)
        out.append((h, sb, ctr))
    return out


PEER_A = Peer("198.18.0.2", MAC_A, A_IP)
PEER_B = Peer("198.18.0.3", MAC_B, B_IP)


# ---- pure ---------------------------------------------------------------------------------------

def test_render_overlay_firewall():
    cmd = render_overlay_firewall("nwt-gw", "198.19.255.7/24")["nftables"]
    # Replace semantics: add, delete, add the table, all in one transaction.
    assert [list(c["add" if "add" in c else "delete"])[0] for c in cmd[:3]] == ["table"] * 3
    assert cmd[1] == {"delete": {"table": {"family": "inet", "name": OVERLAY_TABLE}}}
    rules = [c["add"]["rule"] for c in cmd if "rule" in c.get("add", {})]
    text = json.dumps(rules)
    assert '"masquerade": null' in text and '"addr": "198.19.255.0", "len": 24' in text
    drop = next(r for r in rules if {"drop": None} in r["expr"])
    assert [e["match"]["left"]["meta"]["key"] for e in drop["expr"][:2]] == ["iifname", "oifname"]
    assert sum('"maxseg"' in json.dumps(r) for r in rules) == 2
    with pytest.raises(InvalidRequest):
        render_overlay_firewall("a-name-that-is-too-long", "198.19.255.0/24")
    with pytest.raises(InvalidRequest):
        render_overlay_firewall("nwt-gw", "198.19.255.0/33")


def test_peer_validation():
    assert Peer("198.18.0.2", "02:AA:bb:CC:dd:EE", "192.0.2.1").mac == "02:aa:bb:cc:dd:ee"
    for bad in (("198.18.0", MAC_A, A_IP), ("198.18.0.2", "02:00:00:00:00", A_IP),
                ("198.18.0.2", "01:00:5e:00:00:01", A_IP), ("198.18.0.2", MAC_A, "nowhere")):
        with pytest.raises(InvalidRequest):
            Peer(*bad)


# ---- kernel -------------------------------------------------------------------------------------

def test_containers_on_two_hosts_ping_only_once_peers_are_programmed(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)

    # The VXLAN socket is in the host namespace, not in the sandbox.
    assert PORT in udp_ports(a.path) and PORT not in udp_ports(sa)
    vx = links(sa)["vxlan0"]
    assert "link_netnsid" in vx and vx["master"] == "br0" and vx["mtu"] == 1450
    data = vx["linkinfo"]["info_data"]
    assert data["id"] == VNI and data["port"] == PORT and data["local"] == A_IP
    assert data["learning"] is False and data["proxy"] is True

    # Nothing programmed: no flooding, no learning, so no way across.
    assert not ping(ca, "198.18.0.3", attempts=1)
    # One way is not enough either: B cannot resolve A to answer.
    a.ov.add_peers(sa, [PEER_B])
    assert not ping(ca, "198.18.0.3", attempts=1)
    b.ov.add_peers(sb, [PEER_A])
    assert ping(ca, "198.18.0.3") and ping(cb, "198.18.0.2")

    # Traffic taught the kernel nothing: the tables hold exactly what we programmed.
    assert a.ov.list_peers(sa) == {PEER_B} and b.ov.list_peers(sb) == {PEER_A}
    fdb = in_ns(sa, "bridge", "fdb", "show", "dev", "vxlan0", check=True).stdout
    assert "00:00:00:00:00:00" not in fdb
    assert [ln.split()[0] for ln in fdb.splitlines() if " dst " in ln] == [MAC_B]
    # The container has no default route through the overlay.
    assert "default" not in in_ns(ca, "ip", "route", check=True).stdout


def test_ensure_twice_is_a_no_op(lab):
    (a, sa, ca), _ = two_hosts(lab)
    before = (links(a.path), links(sa), links(ca), addrs(sa), addrs(ca))
    assert a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT) is False
    a.ov.ensure_endpoint(sa, ca, "ve-a", "eth0", "198.18.0.2/24", MAC_A, 1450)
    assert (links(a.path), links(sa), links(ca), addrs(sa), addrs(ca)) == before


def test_ensure_sandbox_repairs(lab):
    a = lab.host("a")
    sb = lab.path("sb")
    assert a.ov.ensure_sandbox(sb, 100, "198.18.0.1/24", 1450, A_IP, PORT) is True
    # Damage it: address gone, vxlan0 down and detached.
    in_ns(sb, "ip", "addr", "flush", "dev", "br0", check=True)
    in_ns(sb, "ip", "link", "set", "vxlan0", "nomaster", "down", check=True)
    assert a.ov.ensure_sandbox(sb, 100, "198.18.0.1/24", 1450, A_IP, PORT) is False
    l = links(sb)
    assert l["vxlan0"]["master"] == "br0" and "UP" in l["vxlan0"]["flags"]
    assert ("br0", [("198.18.0.1", 24)]) in addrs(sb)

    # Another VNI: vxlan0 is recreated (and the caller told so: its peers went with it).
    assert a.ov.ensure_sandbox(sb, 101, "198.18.0.1/24", 1450, A_IP, PORT) is True
    assert links(sb)["vxlan0"]["linkinfo"]["info_data"]["id"] == 101

    # A vxlan0 made inside the sandbox has its socket there: replaced by one whose socket is in the host.
    in_ns(sb, "ip", "link", "del", "vxlan0", check=True)
    in_ns(sb, "ip", "link", "add", "vxlan0", "type", "vxlan", "id", "101", "local", A_IP,
          "dstport", str(PORT), "nolearning", "proxy", check=True)
    in_ns(sb, "ip", "link", "set", "vxlan0", "up", check=True)
    assert PORT in udp_ports(sb)
    a.ov.ensure_sandbox(sb, 101, "198.18.0.1/24", 1450, A_IP, PORT)
    assert PORT not in udp_ports(sb) and PORT in udp_ports(a.path)
    assert "link_netnsid" in links(sb)["vxlan0"]

    # A VXLAN device left in the host under the temporary name by a crash is cleaned up.
    a.ip("link", "add", default_tmp_name(102), "type", "vxlan", "id", "102", "dstport", "4790")
    a.ov.ensure_sandbox(sb, 102, "198.18.0.1/24", 1450, A_IP, PORT)
    assert default_tmp_name(102) not in links(a.path)


def test_delete_sandbox_removes_everything(lab):
    (a, sa, ca), _ = two_hosts(lab)
    a.ov.delete_sandbox(sa)
    assert not os.path.exists(sa)
    assert PORT not in udp_ports(a.path)              # the VXLAN socket is gone from the host at once
    assert "eth0" not in links(ca)                    # the endpoint went with the sandbox
    assert not [n for n in links(a.path) if n.startswith("nwt-vx")]
    a.ov.delete_sandbox(sa)                           # idempotent
    a.ov.delete_endpoint(sa, "ve-a")
    a.ov.remove_peers(sa, [PEER_B])
    # The same VNI and port can be used again right away.
    a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT)
    a.ov.ensure_endpoint(sa, ca, "ve-a", "eth0", "198.18.0.2/24", MAC_A, 1450)
    a.ov.delete_endpoint(sa, "ve-a")
    a.ov.delete_endpoint(sa, "ve-a")
    assert "eth0" not in links(ca) and "ve-a" not in links(sa)


def neighbour(ctr: str, ip: str) -> dict:
    """The container's neighbour entry for `ip` on eth0 ({} if none)."""
    out = json.loads(in_ns(ctr, "ip", "-j", "neigh", "show", ip, "dev", "eth0", check=True).stdout or "[]")
    return out[0] if out else {}


def resolved(ctr: str, ip: str, timeout: float = 5.0) -> str | None:
    """The MAC the container's kernel resolved `ip` to, waiting up to `timeout`."""
    end = time.monotonic() + timeout
    while True:
        mac = neighbour(ctr, ip).get("lladdr")
        if mac or time.monotonic() > end:
            return mac
        time.sleep(0.05)


def test_a_container_waiting_for_an_address_learns_it_when_its_endpoint_appears(lab):
    """garp.py: an address asked for before it existed resolves as soon as it is programmed, not at the
    kernel's next ARP retry. The waiting container retries once a minute here, so only the announcement
    can resolve it within the test."""
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    b.ov.add_peers(sb, [PEER_A])
    in_ns(ca, "sysctl", "-q", "-w", "net.ipv4.neigh.eth0.retrans_time_ms=60000", check=True)
    local_ip, local_mac = "198.18.0.4", "02:00:c6:12:00:04"
    for ip in ("198.18.0.3", local_ip):
        assert in_ns(ca, "ping", "-c1", "-W1", ip).returncode != 0
        assert neighbour(ca, ip).get("state") == ["INCOMPLETE"]
    # A remote endpoint arrives: the entry resolves, and traffic flows.
    a.ov.add_peers(sa, [PEER_B])
    assert resolved(ca, "198.18.0.3") == MAC_B
    assert ping(ca, "198.18.0.3")
    # A local endpoint comes up on the same sandbox: the same.
    c2 = lab.container("ctr-a2")
    a.ov.ensure_endpoint(sa, c2, "ve-a2", "eth0", f"{local_ip}/24", local_mac, 1450)
    assert resolved(ca, local_ip) == local_mac
    assert ping(ca, local_ip)
    # Containers that never asked learn nothing (arp_accept stays 0: no entries made for them).
    assert neighbour(cb, "198.18.0.9") == {}


def test_sync_peers_applies_only_the_difference(lab):
    a = lab.host("a")
    sb = lab.path("sb")
    a.ov.ensure_sandbox(sb, VNI, "198.18.0.1/24", 1450, A_IP, PORT)
    p1 = Peer("198.18.0.11", "02:00:00:00:00:11", "192.0.2.11")
    p2 = Peer("198.18.0.12", "02:00:00:00:00:12", "192.0.2.12")
    p3 = Peer("198.18.0.13", "02:00:00:00:00:13", "192.0.2.13")
    a.ov.add_peers(sb, [p1, p2])
    # Leftovers of a crash or of someone else: an FDB entry without neighbour, a flooding entry.
    for mac, dst in (("02:00:00:00:00:99", "192.0.2.99"), ("00:00:00:00:00:00", "192.0.2.98")):
        in_ns(sb, "bridge", "fdb", "append", mac, "dev", "vxlan0", "dst", dst, "self", "permanent", check=True)

    assert a.ov.sync_peers(sb, {p1, p3}) == 6   # -neigh p2, -fdb p2/orphan/zeros, +fdb p3, +neigh p3
    assert a.ov.list_peers(sb) == {p1, p3}
    fdb = in_ns(sb, "bridge", "fdb", "show", "dev", "vxlan0", check=True).stdout
    assert {ln.split()[0] for ln in fdb.splitlines() if " dst " in ln} == {p1.mac, p3.mac}
    neigh = in_ns(sb, "ip", "neigh", "show", "dev", "vxlan0", "nud", "permanent", check=True).stdout
    assert {ln.split()[0] for ln in neigh.splitlines()} == {p1.ip, p3.ip}

    assert a.ov.sync_peers(sb, {p1, p3}) == 0   # already there: nothing sent
    moved = Peer(p1.ip, p1.mac, "192.0.2.21")   # the container's host changed
    assert a.ov.sync_peers(sb, {moved, p3}) == 2
    assert a.ov.list_peers(sb) == {moved, p3}
    a.ov.add_peers(sb, [moved, p3])             # adding again is fine (replace)
    a.ov.remove_peers(sb, [moved, p3, p2])      # absent ones are fine
    assert a.ov.list_peers(sb) == set()
    with pytest.raises(InvalidRequest):
        a.ov.sync_peers(sb, {p1, Peer(p1.ip, p2.mac, p2.vtep)})


def test_10000_peers(lab):
    a = lab.host("a")
    sb = lab.path("sb")
    a.ov.ensure_sandbox(sb, VNI, "198.18.0.1/24", 1450, A_IP, PORT)
    rng = random.Random(7)
    macs = set()
    while len(macs) < 10_000:
        macs.add(bytes([0x02] + [rng.randrange(256) for _ in range(5)]).hex(":"))
    peers = {Peer(f"198.{18 + i // 65024}.{(i // 254) % 256}.{1 + i % 254}", mac, f"192.0.2.{2 + i % 250}")
             for i, mac in enumerate(sorted(macs))}
    assert len(peers) == 10_000

    t = time.perf_counter()
    a.ov.add_peers(sb, peers)
    took = time.perf_counter() - t
    print(f"\n10,000 peers programmed in {took * 1000:.0f} ms ({len(peers) / took:,.0f} pairs/s)")
    assert a.ov.list_peers(sb) == peers
    assert a.ov.sync_peers(sb, peers) == 0

    t = time.perf_counter()
    a.ov.remove_peers(sb, peers)
    print(f"10,000 peers removed in {(time.perf_counter() - t) * 1000:.0f} ms")
    assert a.ov.list_peers(sb) == set()
    assert in_ns(sb, "ip", "neigh", "show", "dev", "vxlan0", "nud", "permanent", check=True).stdout == ""


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, peer = s.accept(); c.settimeout(30)
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
n = 0
if sys.argv[3] == "recv":
    while data := c.recv(1 << 16):
        n += len(data)
else:
    c.sendall(b"x" * int(sys.argv[4])); n = int(sys.argv[4])
c.close()
print(peer[0], mss, n, flush=True)
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
n = 0
if sys.argv[3] == "send":
    c.sendall(b"y" * int(sys.argv[4])); c.shutdown(socket.SHUT_WR); c.recv(1); n = int(sys.argv[4])
else:
    while data := c.recv(1 << 16):
        n += len(data)
print(n, flush=True)
"""


def tcp_transfer(server_ns: str, server_ip: str, client_ns: str, direction: str, size: int,
                 port: int = 5201) -> tuple[str, int, int, int]:
    """Move `size` bytes over one TCP connection; returns (peer seen by server, server MSS, bytes
    counted by server, bytes counted by client)."""
    server = subprocess.Popen(["nsenter", f"--net={server_ns}", sys.executable, "-c", SERVER, server_ip,
                               str(port), "recv" if direction == "to_server" else "send", str(size)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = in_ns(client_ns, sys.executable, "-c", CLIENT, server_ip, str(port),
                       "send" if direction == "to_server" else "recv", str(size), timeout=60)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert client.returncode == 0, client.stderr
    peer, mss, n = out.split()
    return peer, int(mss), int(n), int(client.stdout)


def test_bulk_tcp_over_a_1400_underlay(lab):
    a, b = lab.host("a"), lab.host("b")
    lab.underlay(a, b, mtu=1400)
    assert a.ov.underlay_mtu(A_IP) == 1400
    mtu = a.ov.default_mtu(A_IP)
    assert mtu == 1350
    (a, sa, ca), (b, sb, cb) = [(h, lab.path(f"sb-{r}"), lab.container(f"ctr-{r}")) for h, r in ((a, "a"), (b, "b"))]
    for h, sbox, ctr, local, ip, mac in ((a, sa, ca, A_IP, "198.18.0.2/24", MAC_A),
                                         (b, sb, cb, B_IP, "198.18.0.3/24", MAC_B)):
        h.ov.ensure_sandbox(sbox, VNI, "198.18.0.1/24", mtu, local, PORT)
        h.ov.ensure_endpoint(sbox, ctr, "ve", "eth0", ip, mac, mtu)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    assert all(links(p)[n]["mtu"] == 1350 for p, n in ((sa, "br0"), (sa, "vxlan0"), (sa, "ve"), (ca, "eth0")))

    # A full-size frame with DF fits the underlay once encapsulated.
    assert in_ns(ca, "ping", "-c1", "-W2", "-M", "do", "-s", str(mtu - 28), "198.18.0.3").returncode == 0
    size = 5 * 1024 * 1024
    peer, _mss, received, sent = tcp_transfer(cb, "198.18.0.3", ca, "to_server", size)
    assert (peer, received, sent) == ("198.18.0.2", size, size)


def outside_world(lab: Lab, a: Host) -> Host:
    """'The outside' at 203.0.113.2, behind a router whose link to host a has MTU 1400 and which, like
    many, sends no ICMP 'fragmentation needed': a path-MTU blackhole for TCP unless MSS is clamped.
    The outside has no route back to the gateway bridge subnet: only masquerade lets it answer."""
    isp, out = lab.host("isp", overlay=False), lab.host("out", overlay=False)
    lab.link(a, "203.0.113.129/25", isp, "203.0.113.130/25", 1400, 1400, a_if="up0", b_if="i0")
    lab.link(isp, "203.0.113.1/25", out, "203.0.113.2/25", 1500, 1500, a_if="i1", b_if="eth0")
    a.ip("route", "add", "203.0.113.0/25", "via", "203.0.113.130")
    out.ip("route", "add", "203.0.113.128/25", "via", "203.0.113.1")
    in_ns(isp.path, "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
    sh("ip", "netns", "exec", isp.name, "nft", "add table inet blackhole; "
       "add chain inet blackhole out { type filter hook output priority 0; }; "
       "add rule inet blackhole out icmp type destination-unreachable drop")
    return out


def test_gateway_bridge_egress_and_isolation(lab):
    a = lab.host("a")
    out = outside_world(lab, a)

    gw = "nwt-gw"
    a.ov.ensure_gwbridge(gw, "198.19.255.1/24", 1500)
    ctrs = {}
    for n, (vni, subnet) in enumerate(((101, "198.18.1"), (102, "198.18.2")), start=1):
        sb, ctr = lab.path(f"sb{n}"), lab.container(f"ctr{n}")
        a.ov.ensure_sandbox(sb, vni, f"{subnet}.1/24", 1350, "203.0.113.129", PORT)
        a.ov.ensure_endpoint(sb, ctr, "ve", "eth0", f"{subnet}.2/24", f"02:00:00:00:0{n}:02", 1350)
        a.ov.ensure_gw_endpoint(ctr, gw, f"gw-c{n}", "eth1", f"198.19.255.{n + 1}/24",
                                f"02:00:00:00:ff:0{n}", 1500, "198.19.255.1")
        ctrs[n] = ctr
    c1, c2 = ctrs[1], ctrs[2]
    before = (links(a.path), links(c1), addrs(c1), in_ns(c1, "ip", "route", check=True).stdout)
    a.ov.ensure_gwbridge(gw, "198.19.255.1/24", 1500)
    a.ov.ensure_gw_endpoint(c1, gw, "gw-c1", "eth1", "198.19.255.2/24", "02:00:00:00:ff:01", 1500,
                            "198.19.255.1")
    assert (links(a.path), links(c1), addrs(c1), in_ns(c1, "ip", "route", check=True).stdout) == before
    port = links(a.path)["gw-c1"]["linkinfo"]["info_slave_data"]
    assert port["isolated"] is True and port["hairpin"] is False
    assert "default via 198.19.255.1 dev eth1" in in_ns(c1, "ip", "route", check=True).stdout

    # Control: routed through the host (not bridged), the two containers do reach each other
    # before the firewall is there. (No redirects, so they keep going through the host.)
    for ctr, other in ((c1, "198.19.255.3"), (c2, "198.19.255.2")):
        in_ns(ctr, "sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0",
              "net.ipv4.conf.eth1.accept_redirects=0", check=True)
        in_ns(ctr, "ip", "route", "add", f"{other}/32", "via", "198.19.255.1", check=True)
    assert ping(c1, "198.19.255.3")

    a.ov.apply_overlay_firewall(gw, "198.19.255.0/24")
    a.ov.apply_overlay_firewall(gw, "198.19.255.0/24")   # replaces, never duplicates
    table = json.loads(in_ns(a.path, "nft", "-j", "list", "table", "inet", OVERLAY_TABLE, check=True).stdout)
    assert sum("rule" in item for item in table["nftables"]) == 6

    # Egress works (the outside has no route back to 198.19.255.0/24: only masquerade makes it work).
    assert ping(c1, "203.0.113.2") and ping(c2, "203.0.113.2")
    assert ping(c1, "198.19.255.1")
    # Overlays do not meet on the gateway bridge: not bridged (isolated ports), not routed (nftables),
    # and the other overlay's subnet is nowhere on this path.
    assert not ping(c1, "198.19.255.3", attempts=1)
    assert not ping(c2, "198.19.255.2", attempts=1)
    in_ns(c1, "ip", "route", "del", "198.19.255.3/32", check=True)
    assert not ping(c1, "198.19.255.3", attempts=1)
    assert not ping(c1, "198.18.2.2", attempts=1)

    # Bulk TCP from the outside into a container: masqueraded, and the MSS clamped to the 1400 uplink
    # (without the clamp the outside sends 1448-byte segments that die silently at the router).
    size = 2 * 1024 * 1024
    peer, mss, sent, received = tcp_transfer(out.path, "203.0.113.2", c1, "to_client", size)
    assert peer == "203.0.113.129" and sent == received == size
    assert mss <= 1360, f"outside kept MSS {mss}: not clamped"

    a.ov.delete_overlay_firewall()
    a.ov.delete_overlay_firewall()
    assert in_ns(a.path, "nft", "list", "table", "inet", OVERLAY_TABLE).returncode != 0
    a.ov.delete_gw_endpoint("gw-c1")
    a.ov.delete_gw_endpoint("gw-c1")
    assert "eth1" not in links(c1)
    a.ov.delete_gwbridge(gw)
    a.ov.delete_gwbridge(gw)
    assert gw not in links(a.path)


def test_errors_are_one_clear_line(lab):
    a = lab.host("a")
    missing = lab.path("no-such-sandbox")
    with pytest.raises(KernelError, match="no overlay sandbox at"):
        a.ov.add_peers(missing, [PEER_B])
    sb = lab.path("sb")
    a.ov.ensure_sandbox(sb, VNI, "198.18.0.1/24", 1450, A_IP, PORT)
    with pytest.raises(KernelError, match="not a network namespace|cannot open"):
        a.ov.ensure_endpoint(sb, lab.path("no-such-container"), "ve", "eth0", "198.18.0.2/24", MAC_A, 1450)
    with pytest.raises(InvalidRequest):
        a.ov.ensure_sandbox(sb, 2**24, "198.18.0.1/24", 1450, A_IP, PORT)
    with pytest.raises(KernelError, match="no interface in the host namespace has address"):
        a.ov.underlay_mtu("192.0.2.77")
    # A second sandbox cannot take the same VNI and port on this host.
    with pytest.raises(KernelError) as e:
        a.ov.ensure_sandbox(lab.path("sb2"), VNI, "198.18.0.1/24", 1450, A_IP, PORT)
    assert "\n" not in str(e.value) and "File exists" in str(e.value)

    # The batch reports the first refusal with what it was about.
    def refused():
        nl = NeighBatch(open_route_socket())
        try:
            nl.add_neighbours(999_999, [("198.18.0.9", MAC_A), ("198.18.0.10", MAC_B)])
        finally:
            nl.close()

    with pytest.raises(KernelError, match=r"^add neighbour 198\.18\.0\.9 lladdr .*: No such device"):
        a.call(refused)


# ---- drift: what an operator deletes by hand, the next ensure_* puts back (issue 7, item 12) ------------

def test_a_vxlan_device_deleted_by_hand_is_recreated_and_reported(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    assert ping(ca, "198.18.0.3")
    in_ns(sa, "ip", "link", "del", "vxlan0", check=True)
    assert a.ov.list_peers(sa) == set()          # the peers lived on it
    assert not ping(ca, "198.18.0.3", attempts=1)
    # Recreated, and reported as such: its peers must be programmed again.
    assert a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT) is True
    vx = links(sa)["vxlan0"]
    assert vx["master"] == "br0" and "link_netnsid" in vx and PORT in udp_ports(a.path)
    assert a.ov.sync_peers(sa, {PEER_B}) == 2
    assert ping(ca, "198.18.0.3") and ping(cb, "198.18.0.2")
    assert a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT) is False


def test_a_sandbox_bridge_deleted_by_hand_comes_back_with_its_ports(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    in_ns(sa, "ip", "link", "del", "br0", check=True)
    assert "master" not in links(sa)["vxlan0"] and "master" not in links(sa)["ve-a"]
    assert not ping(ca, "198.18.0.3", attempts=1)
    # vxlan0 and its peers stayed: nothing to re-add.
    assert a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT) is False
    l = links(sa)
    assert l["vxlan0"]["master"] == "br0" and l["ve-a"]["master"] == "br0" and l["br0"]["mtu"] == 1450
    assert ("198.18.0.1", 24) in dict(addrs(sa))["br0"]
    assert ping(ca, "198.18.0.3") and ping(ca, "198.18.0.1")


def test_a_sandbox_deleted_by_hand_is_recreated_and_reported(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    netns.delete_netns(sa)   # unmounted: the namespace goes with vxlan0, br0 and the endpoint's veth
    assert a.ov.ensure_sandbox(sa, VNI, "198.18.0.1/24", 1450, A_IP, PORT) is True
    a.ov.ensure_endpoint(sa, ca, "ve-a", "eth0", "198.18.0.2/24", MAC_A, 1450)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    assert ping(ca, "198.18.0.3")


def test_an_endpoint_veth_deleted_by_hand_is_recreated(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    in_ns(sa, "ip", "link", "del", "ve-a", check=True)
    assert "eth0" not in links(ca) and a.ov.list_endpoints(sa) == []
    a.ov.ensure_endpoint(sa, ca, "ve-a", "eth0", "198.18.0.2/24", MAC_A, 1450)
    assert a.ov.list_endpoints(sa) == ["ve-a"] and links(ca)["eth0"]["address"] == MAC_A
    assert ping(ca, "198.18.0.3")


def test_peer_entries_deleted_by_hand_are_put_back(lab):
    (a, sa, ca), (b, sb, cb) = two_hosts(lab)
    a.ov.add_peers(sa, [PEER_B])
    b.ov.add_peers(sb, [PEER_A])
    in_ns(sa, "bridge", "fdb", "del", MAC_B, "dev", "vxlan0", "dst", B_IP, "self", check=True)
    in_ns(sb, "ip", "neigh", "del", "198.18.0.2", "dev", "vxlan0", check=True)
    assert a.ov.list_peers(sa) == set() and b.ov.list_peers(sb) == set()
    assert a.ov.sync_peers(sa, {PEER_B}) == 1 and b.ov.sync_peers(sb, {PEER_A}) == 1
    assert ping(ca, "198.18.0.3")


def test_gateway_bridge_parts_deleted_by_hand_are_put_back(lab):
    a = lab.host("a")
    outside_world(lab, a)   # 203.0.113.2, reached only through masquerade
    gw = "nwt-gw"
    sbox, ctr = lab.path("sb"), lab.container("ctr")

    def ensure_all() -> None:
        a.ov.ensure_gwbridge(gw, "198.19.255.1/24", 1500)
        a.ov.ensure_sandbox(sbox, 101, "198.18.1.1/24", 1350, "203.0.113.129", PORT)
        a.ov.ensure_endpoint(sbox, ctr, "ve", "eth0", "198.18.1.2/24", "02:00:00:00:01:02", 1350)
        a.ov.ensure_gw_endpoint(ctr, gw, "gw-c1", "eth1", "198.19.255.2/24", "02:00:00:00:ff:01", 1500,
                                "198.19.255.1")
        a.ov.apply_overlay_firewall(gw, "198.19.255.0/24")

    def rules() -> list[dict]:
        table = json.loads(in_ns(a.path, "nft", "-j", "list", "table", "inet", OVERLAY_TABLE, check=True).stdout)
        return [item["rule"] for item in table["nftables"] if "rule" in item]

    ensure_all()
    full = [r["comment"] for r in rules()]
    assert ping(ctr, "203.0.113.2")

    # The container's port on the gateway bridge: its default route went with it.
    a.ip("link", "del", "gw-c1")
    assert "default" not in in_ns(ctr, "ip", "route", check=True).stdout
    ensure_all()
    assert "default via 198.19.255.1 dev eth1" in in_ns(ctr, "ip", "route", check=True).stdout
    assert ping(ctr, "203.0.113.2")

    # The gateway bridge itself: its ports are left detached.
    a.ip("link", "del", gw)
    assert not ping(ctr, "203.0.113.2", attempts=1)
    ensure_all()
    port = links(a.path)["gw-c1"]
    assert port["master"] == gw and port["linkinfo"]["info_slave_data"]["isolated"] is True
    assert ping(ctr, "203.0.113.2")

    # One rule (the masquerade: the outside has no route back), then the whole table.
    masq = next(r for r in rules() if r["comment"].startswith("masquerade"))
    sh("ip", "netns", "exec", a.name, "nft", "delete", "rule", "inet", OVERLAY_TABLE, "postrouting",
       "handle", str(masq["handle"]))
    assert not ping(ctr, "203.0.113.2", attempts=1)
    a.ov.apply_overlay_firewall(gw, "198.19.255.0/24")
    assert [r["comment"] for r in rules()] == full
    assert ping(ctr, "203.0.113.2")
    sh("ip", "netns", "exec", a.name, "nft", "delete", "table", "inet", OVERLAY_TABLE)
    a.ov.apply_overlay_firewall(gw, "198.19.255.0/24")
    assert [r["comment"] for r in rules()] == full
    assert ping(ctr, "203.0.113.2")


def test_no_announcement_floods_a_bridge_with_more_containers_than_the_bound(lab, monkeypatch):
    """garp.MAX_FLOOD_PORTS: past it, an endpoint's arrival is not flooded to every container (each run
    would cost in proportion to them); a container that asked early waits for its kernel's retry."""
    monkeypatch.setattr(garp, "MAX_FLOOD_PORTS", 1)
    (a, sa, ca), _ = two_hosts(lab)
    in_ns(ca, "sysctl", "-q", "-w", "net.ipv4.neigh.eth0.retrans_time_ms=60000", check=True)
    local_ip, local_mac = "198.18.0.4", "02:00:c6:12:00:04"
    assert in_ns(ca, "ping", "-c1", "-W1", local_ip).returncode != 0
    a.ov.ensure_endpoint(sa, lab.container("ctr-a2"), "ve-a2", "eth0", f"{local_ip}/24", local_mac, 1450)
    assert resolved(ca, local_ip, timeout=1.0) is None     # no announcement: still waiting for its retry
    assert neighbour(ca, local_ip).get("state") == ["INCOMPLETE"]
