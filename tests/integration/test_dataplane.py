"""netweft.dataplane against the real kernel.

Every test builds its own world out of network namespaces named nwt-* under a temporary directory:
a "host" namespace in which the Kernel works (from one worker thread that entered it, as the
daemon's executor thread would), container namespaces, and "outside"/"lan" namespaces. The root
namespace is never changed; an autouse fixture checks that. Deleting the namespaces removes every
link, route and nftables table the tests made.

Addresses: containers 198.18.0.0/15, outside 203.0.113.0/24 and 192.0.2.0/24.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netweft.dataplane import netns
from netweft.dataplane.firewall import BridgeRule, PortRule
from netweft.dataplane.kernel import Kernel
from netweft.errors import InvalidRequest, KernelError


TABLE = "nwt_test"
OUR_LINK_PREFIXES = ("nwb", "nwv", "nwt", "up0", "lan0")
OUR_NETS = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "192.0.2.0/24", "203.0.113.0/24")]


# ---- helpers --------------------------------------------------------------------------------------

def sh(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in namespace `ns` (network namespace only)."""
    return subprocess.run(["nsenter", f"--net={ns}", *args], check=check, capture_output=True,
                          text=True, timeout=30)


def ip_json(ns: str, *args: str):
    return json.loads(sh(ns, "ip", "-j", *args).stdout or "[]")


def pings(ns: str, addr: str, tries: int = 3) -> bool:
    for _ in range(tries):
        if sh(ns, "ping", "-c1", "-W1", addr, check=False).returncode == 0:
            return True
    return False


def no_ping(ns: str, addr: str) -> bool:
    return sh(ns, "ping", "-c1", "-W1", addr, check=False).returncode != 0


def link(ns: str, name: str) -> dict:
    return ip_json(ns, "-d", "link", "show", "dev", name)[0]


def addrs(ns: str, name: str) -> list[str]:
    found = ip_json(ns, "-4", "addr", "show", "dev", name)  # [] when the link has no IPv4 address
    return sorted(f'{a["local"]}/{a["prefixlen"]}' for a in (found[0]["addr_info"] if found else []))


def default_route(ns: str) -> list[tuple[str, str]]:
    return [(r.get("gateway"), r.get("dev")) for r in ip_json(ns, "-4", "route", "show", "default")]


def _enter(path: str) -> None:
    fd = netns.open_netns(path)
    try:
        netns.setns(fd)
    finally:
        os.close(fd)


class Host:
    """A test "host" namespace and a Kernel used from one worker thread that lives in it."""

    def __init__(self, path: str, run_dir: str):
        self.path = path
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nwt-kernel", initializer=_enter,
                                           initargs=(path,))
        self.kernel = self.call(Kernel, run_dir)

    def call(self, fn, *args):
        return self.executor.submit(fn, *args).result(timeout=60)

    def __getattr__(self, name):
        method = getattr(self.kernel, name)
        return lambda *args: self.call(method, *args)

    def close(self) -> None:
        try:
            self.call(self.kernel.close)
        finally:
            self.executor.shutdown()


class Monitor:
    """`ip monitor` in a namespace, to prove that an operation sent no change to the kernel.

    mark() makes a recognisable event (an ifb link added and
    deleted; this kernel has no dummy driver) and returns the events
    seen since the previous mark, so no sleeping or guessing about delivery is needed. IPv4 only:
    IPv6 autoconfiguration (link-local addresses, DAD) keeps reporting for seconds after a link
    comes up, and netweft does not touch IPv6.
    """

    def __init__(self, ns: str):
        self.ns = ns
        self.proc = subprocess.Popen(["nsenter", f"--net={ns}", "ip", "-4", "-o", "monitor", "link", "address", "route"],
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.n = 0
        self.mark()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def mark(self) -> list[str]:
        tag = f"nwtmark{self.n}"
        self.n += 1
        deadline = time.monotonic() + 10
        seen: list[str] = []
        # The monitor may not have subscribed yet: repeat the marker until it shows up.
        while True:
            sh(self.ns, "ip", "link", "add", tag, "type", "ifb")
            sh(self.ns, "ip", "link", "del", tag)
            try:
                while True:
                    line = self.lines.get(timeout=0.3)
                    if tag in line and line.startswith("Deleted"):
                        return [s for s in seen if tag not in s]
                    seen.append(line)
            except queue.Empty:
                assert time.monotonic() < deadline, "ip monitor shows nothing"

    def settle(self, quiet: float = 1.5) -> None:
        """Wait until the kernel has finished reporting earlier changes (link state changes are
        announced asynchronously, up to a second later)."""
        deadline = time.monotonic() + 15
        while True:
            time.sleep(quiet)
            if not self.mark():
                return
            assert time.monotonic() < deadline, "the namespace never became quiet"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---- fixtures -------------------------------------------------------------------------------------

def _root_state():
    links = sorted(l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                                  text=True, check=True).stdout)
                   if l["ifname"].startswith(OUR_LINK_PREFIXES))
    routes = sorted(r["dst"] for r in json.loads(subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                                                                capture_output=True, text=True, check=True).stdout)
                    if r["dst"] != "default"
                    and any(ipaddress.ip_network(r["dst"], strict=False).overlaps(n) for n in OUR_NETS))
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forward = f.read()
    return links, routes, TABLE in tables, forward


@pytest.fixture(autouse=True)
def root_untouched():
    before = _root_state()
    yield
    assert _root_state() == before, "the root namespace was changed"


@pytest.fixture
def nsdir():
    d = tempfile.mkdtemp(prefix="nwt-")
    yield d
    for sub, _, _ in os.walk(d):  # in case a test's own cleanup did not run, at any depth
        for p in netns.list_netns(sub):
            netns.delete_netns(p)
    shutil.rmtree(d)  # fails loudly if a namespace is still mounted here


@pytest.fixture
def make_ns(nsdir):
    made: list[str] = []

    def make(name: str) -> str:
        path = os.path.join(nsdir, f"nwt-{name}")
        netns.create_netns(path)
        made.append(path)
        return path

    yield make
    for p in reversed(made):
        netns.delete_netns(p)


@pytest.fixture
def host(make_ns, nsdir):
    h = Host(make_ns("host"), os.path.join(nsdir, "run"))
    yield h
    h.close()


@pytest.fixture
def outside(host, make_ns):
    """An "outside" namespace behind the host's uplink up0: 203.0.113.1 (host) <-> 203.0.113.2.

    It has no route back to 198.18.0.0/15, so containers only reach it through masquerading.
    """
    out = make_ns("out")
    sh(host.path, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", out)
    sh(host.path, "ip", "addr", "add", "203.0.113.1/24", "dev", "up0")
    sh(host.path, "ip", "link", "set", "up0", "up")
    sh(out, "ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
    sh(out, "ip", "link", "set", "eth0", "up")
    sh(out, "ip", "link", "set", "lo", "up")
    return out


@pytest.fixture
def container(host, make_ns):
    """Factory: a container namespace attached to a bridge of the host."""

    def make(name: str, bridge: str, address: str, gateway: str | None, mac: str | None = None) -> str:
        ns = make_ns(name)
        n = int(ipaddress.ip_interface(address).ip) & 0xFFFF
        mac = mac or f"02:42:c6:12:{n >> 8:02x}:{n & 0xFF:02x}"
        host.ensure_endpoint(ns, bridge, f"nwv-{name}", "eth0", address, mac, 1500, gateway)
        return ns

    return make


# ---- netns module ---------------------------------------------------------------------------------

def test_netns_create_delete_idempotent(nsdir):
    path = os.path.join(nsdir, "sub", "nwt-a")
    assert not netns.is_netns(path)
    netns.create_netns(path)
    try:
        ino = os.stat(path).st_ino
        netns.create_netns(path)  # already there: nothing happens
        assert os.stat(path).st_ino == ino
        assert netns.is_netns(path)
        assert netns.list_netns(os.path.dirname(path)) == [path]
        assert sh(path, "ip", "-br", "link").stdout.split()[0] == "lo"  # a fresh namespace
        assert sum(path in line for line in open("/proc/mounts")) == 1
    finally:
        netns.delete_netns(path)
    assert not os.path.exists(path)
    assert not any(path in line for line in open("/proc/mounts"))
    netns.delete_netns(path)  # already gone
    assert netns.list_netns(os.path.dirname(path)) == []


def test_netns_reuses_stale_file_and_rejects_plain_files(nsdir):
    path = os.path.join(nsdir, "nwt-stale")
    open(path, "w").close()  # left by a crash between creating the file and mounting
    assert not netns.is_netns(path)
    with pytest.raises(KernelError, match="not a network namespace"):
        os.close(netns.open_netns(path))
    netns.create_netns(path)
    try:
        assert netns.is_netns(path)
    finally:
        netns.delete_netns(path)
    assert netns.is_netns("/proc/self/ns/net")
    assert not netns.is_netns("/proc/self/ns/mnt")


# ---- bridges and endpoints ------------------------------------------------------------------------

def test_two_endpoints_on_a_bridge_ping_each_other(host, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", "198.18.0.1", mac="02:42:c6:12:00:05")
    c2 = container("c2", "nwb0", "198.18.0.6/24", "198.18.0.1")

    assert pings(c1, "198.18.0.6") and pings(c2, "198.18.0.5")
    assert pings(c1, "198.18.0.1")  # the bridge address, the containers' gateway
    assert pings(c1, "127.0.0.1")  # loopback is up

    eth0 = link(c1, "eth0")
    assert eth0["address"] == "02:42:c6:12:00:05" and eth0["mtu"] == 1500 and "UP" in eth0["flags"]
    assert addrs(c1, "eth0") == ["198.18.0.5/24"]
    assert default_route(c1) == [("198.18.0.1", "eth0")]
    assert host.link_master("nwv-c1") == "nwb0" and host.link_master("nwv-c2") == "nwb0"
    assert host.link_master("nwb0") is None and host.link_master("nwv-nope") is None
    assert host.list_links("nwv-") == ["nwv-c1", "nwv-c2"]
    assert host.link_exists("nwb0") and not host.link_exists("nwb9") and not host.link_exists("x" * 20)
    br = link(host.path, "nwb0")
    assert br["linkinfo"]["info_kind"] == "bridge" and br["mtu"] == 1500 and "UP" in br["flags"]
    assert addrs(host.path, "nwb0") == ["198.18.0.1/24"]


def test_ensure_twice_changes_nothing(host, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1400, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", "198.18.0.1")
    before = (link(host.path, "nwb0")["ifindex"], link(host.path, "nwv-c1")["ifindex"], link(c1, "eth0")["ifindex"])

    mon_host, mon_c1 = Monitor(host.path), Monitor(c1)
    try:
        mon_host.settle()
        mon_c1.settle()
        host.ensure_bridge("nwb0", "198.18.0.1/24", 1400, None)
        container_args = (c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, "198.18.0.1")
        host.ensure_endpoint(*container_args)
        host.ensure_endpoint(*container_args)
        assert mon_host.mark() == [] and mon_c1.mark() == []
    finally:
        mon_host.close()
        mon_c1.close()

    after = (link(host.path, "nwb0")["ifindex"], link(host.path, "nwv-c1")["ifindex"], link(c1, "eth0")["ifindex"])
    assert after == before
    assert link(host.path, "nwb0")["mtu"] == 1400  # kept although a 1500 port joined


def test_ensure_bridge_converges_address_and_mtu(host):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    sh(host.path, "ip", "addr", "add", "198.18.0.77/24", "dev", "nwb0")  # a secondary
    sh(host.path, "ip", "addr", "add", "198.18.9.1/24", "dev", "nwb0")
    sh(host.path, "ip", "link", "set", "nwb0", "down")
    index = link(host.path, "nwb0")["ifindex"]

    host.ensure_bridge("nwb0", "198.18.0.1/24", 1450, None)
    assert addrs(host.path, "nwb0") == ["198.18.0.1/24"]
    assert link(host.path, "nwb0")["mtu"] == 1450 and "UP" in link(host.path, "nwb0")["flags"]

    host.ensure_bridge("nwb0", "198.18.0.254/24", 1450, None)  # the primary goes, taking nothing else
    assert addrs(host.path, "nwb0") == ["198.18.0.254/24"]
    host.ensure_bridge("nwb0", None, 1450, None)
    assert addrs(host.path, "nwb0") == []
    assert link(host.path, "nwb0")["ifindex"] == index


def test_delete_is_idempotent(host, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", None)
    host.delete_endpoint("nwv-c1")
    assert not host.link_exists("nwv-c1")
    assert ip_json(c1, "link", "show", "type", "veth") == []  # the peer went with it
    host.delete_endpoint("nwv-c1")
    host.delete_bridge("nwb0", None)
    assert not host.link_exists("nwb0")
    host.delete_bridge("nwb0", None)
    assert host.list_links("nw") == []


def test_repairs_drifted_endpoint_in_place(host, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", "198.18.0.1")
    c2 = container("c2", "nwb0", "198.18.0.6/24", "198.18.0.1")
    indexes = (link(host.path, "nwv-c1")["ifindex"], link(c1, "eth0")["ifindex"])

    sh(host.path, "ip", "link", "set", "nwv-c1", "nomaster")
    sh(host.path, "ip", "link", "set", "nwv-c1", "down")
    sh(c1, "ip", "addr", "flush", "dev", "eth0")
    sh(c1, "ip", "addr", "add", "198.18.0.99/24", "dev", "eth0")
    sh(c1, "ip", "link", "set", "eth0", "address", "02:00:00:00:00:99", "mtu", "1300")
    sh(c1, "ip", "link", "set", "lo", "down")
    sh(c1, "ip", "route", "replace", "default", "via", "198.18.0.6")
    assert no_ping(c2, "198.18.0.5")

    host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, "198.18.0.1")
    assert (link(host.path, "nwv-c1")["ifindex"], link(c1, "eth0")["ifindex"]) == indexes
    assert host.link_master("nwv-c1") == "nwb0"
    assert addrs(c1, "eth0") == ["198.18.0.5/24"]
    assert link(c1, "eth0")["address"] == "02:42:c6:12:00:05" and link(c1, "eth0")["mtu"] == 1500
    assert default_route(c1) == [("198.18.0.1", "eth0")]
    assert pings(c2, "198.18.0.5") and pings(c1, "127.0.0.1")


def test_recreated_namespace_gets_a_new_pair(host, container):
    """After a crash the namespace may be new while the host still shows the old veth end."""
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", "198.18.0.1")
    c2 = container("c2", "nwb0", "198.18.0.6/24", "198.18.0.1")
    for _ in range(3):
        netns.delete_netns(c1)
        netns.create_netns(c1)  # same path, new namespace, no eth0; the old pair may still linger
        host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, "198.18.0.1")
        assert pings(c1, "198.18.0.6")


def test_replaces_stale_container_interface(host, make_ns, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = make_ns("c1")
    sh(c1, "ip", "link", "add", "eth0", "type", "ifb")
    # A half-made pair: host end present, other end still in the host namespace.
    sh(host.path, "ip", "link", "add", "nwv-c1", "type", "veth", "peer", "name", "nwv-c1p")
    host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, None)
    assert link(c1, "eth0")["linkinfo"]["info_kind"] == "veth"
    assert not host.link_exists("nwv-c1p")
    c2 = container("c2", "nwb0", "198.18.0.6/24", None)
    assert pings(c2, "198.18.0.5")


def test_errors_are_one_line(host, make_ns):
    c1 = make_ns("c1")
    with pytest.raises(KernelError, match="bridge nwb0 does not exist") as e:
        host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, None)
    assert "\n" not in str(e.value)
    sh(host.path, "ip", "link", "add", "nwt-dummy", "type", "ifb")
    with pytest.raises(KernelError, match="not a bridge"):
        host.ensure_bridge("nwt-dummy", None, 1500, None)
    with pytest.raises(KernelError, match="not a veth"):
        host.delete_endpoint("nwt-dummy")
    with pytest.raises(KernelError, match="not a bridge"):
        host.delete_bridge("nwt-dummy", None)
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    with pytest.raises(KernelError, match="not a veth"):
        host.ensure_endpoint(c1, "nwb0", "nwt-dummy", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, None)
    with pytest.raises(KernelError, match="not a network namespace"):
        host.ensure_endpoint("/etc/hostname", "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05",
                             1500, None)
    with pytest.raises(KernelError, match="Network is unreachable"):  # gateway outside the subnet
        host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "02:42:c6:12:00:05", 1500, "192.0.2.1")
    for bad in (lambda: host.ensure_bridge("x" * 16, None, 1500, None),
                lambda: host.ensure_bridge("nwb0", "198.18.0.1", 1500, None),
                lambda: host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "zz", 1500, None),
                lambda: host.ensure_endpoint(c1, "nwb0", "nwv-c1", "eth0", "198.18.0.5/24", "03:00:00:00:00:01",
                                             1500, None)):
        with pytest.raises(InvalidRequest):
            bad()
    assert host.list_links("nwb") == ["nwb0"]


# ---- parent mode ----------------------------------------------------------------------------------

def test_parent_mode_bridges_to_the_lan_without_nat(host, make_ns, container):
    lan = make_ns("lan")
    sh(host.path, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
    sh(lan, "ip", "addr", "add", "198.18.5.1/24", "dev", "eth0")
    sh(lan, "ip", "link", "set", "eth0", "up")

    with pytest.raises(KernelError, match="parent interface lan9 does not exist"):
        host.ensure_bridge("nwb5", None, 1500, "lan9")
    host.ensure_bridge("nwb5", None, 1500, "lan0")
    host.ensure_bridge("nwb5", None, 1500, "lan0")
    assert host.link_master("lan0") == "nwb5" and "UP" in link(host.path, "lan0")["flags"]
    c1 = container("c1", "nwb5", "198.18.5.10/24", "198.18.5.1")
    assert pings(c1, "198.18.5.1")
    assert open_forward(host) == "0"  # bridged, not routed

    with pytest.raises(KernelError, match="already enslaved to nwb5"):
        host.ensure_bridge("nwb6", None, 1500, "lan0")

    host.delete_bridge("nwb5", "lan0")
    host.delete_bridge("nwb5", "lan0")
    assert host.link_exists("lan0") and host.link_master("lan0") is None
    host.delete_bridge("nwb6", None)


def open_forward(host: Host) -> str:
    return sh(host.path, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


# ---- host settings, routes, firewall --------------------------------------------------------------

def test_ip_forward_in_host_namespace_only(host):
    host.set_ip_forward(True)
    assert open_forward(host) == "1"
    host.set_ip_forward(True)
    host.set_ip_forward(False)
    assert open_forward(host) == "0"


def test_host_routes_skip_default_and_our_bridges(host, outside):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    sh(host.path, "ip", "route", "add", "192.0.2.0/24", "via", "203.0.113.2")
    sh(host.path, "ip", "route", "add", "default", "via", "203.0.113.2")
    sh(host.path, "ip", "route", "add", "192.0.2.128/25", "via", "203.0.113.2", "table", "100")
    nets = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "203.0.113.0/24")]
    assert host.host_routes("nwb") == nets
    assert host.host_routes("zzz") == sorted(nets + [ipaddress.ip_network("198.18.0.0/24")])


def test_masquerade_reaches_outside(host, outside, container):
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    c1 = container("c1", "nwb0", "198.18.0.5/24", "198.18.0.1")
    host.set_ip_forward(True)
    assert no_ping(c1, "203.0.113.2")  # routed out, but the outside cannot answer 198.18.0.5

    host.apply_firewall(TABLE, [BridgeRule("nwb0", "198.18.0.0/24", internal=False, masquerade=True)])
    assert pings(c1, "203.0.113.2")
    host.apply_firewall(TABLE, [BridgeRule("nwb0", "198.18.0.0/24", internal=False, masquerade=True)])
    assert pings(c1, "203.0.113.2")

    # Traffic within the network is not masqueraded.
    c2 = container("c2", "nwb0", "198.18.0.6/24", "198.18.0.1")
    assert pings(c1, "198.18.0.6")

    host.apply_firewall(TABLE, [])  # deletes the table
    assert TABLE not in sh(host.path, "nft", "list", "tables").stdout
    assert no_ping(c1, "203.0.113.2")


def test_networks_are_isolated_from_each_other(host, outside, container):
    host.ensure_bridge("nwb1", "198.18.1.1/24", 1500, None)
    host.ensure_bridge("nwb2", "198.18.2.1/24", 1500, None)
    c1 = container("c1", "nwb1", "198.18.1.5/24", "198.18.1.1")
    c2 = container("c2", "nwb2", "198.18.2.5/24", "198.18.2.1")
    host.set_ip_forward(True)
    assert pings(c1, "198.18.2.5")  # routed through the host before the firewall

    host.apply_firewall(TABLE, [BridgeRule("nwb1", "198.18.1.0/24", False, True),
                                BridgeRule("nwb2", "198.18.2.0/24", False, True)])
    assert no_ping(c1, "198.18.2.5") and no_ping(c2, "198.18.1.5")
    assert pings(c1, "203.0.113.2") and pings(c2, "203.0.113.2")
    assert pings(c1, "198.18.1.1")

    # Replacing the rules drops the old ones atomically: nwb2 is gone from the set.
    host.apply_firewall(TABLE, [BridgeRule("nwb1", "198.18.1.0/24", False, True)])
    table = json.loads(sh(host.path, "nft", "-j", "list", "table", "inet", TABLE).stdout)["nftables"]
    sets = [o["set"] for o in table if "set" in o]
    assert [s.get("elem") for s in sets] == [["nwb1"]]
    assert pings(c2, "198.18.1.5")  # nothing isolates nwb2 now
    host.delete_firewall(TABLE)
    host.delete_firewall(TABLE)
    assert TABLE not in sh(host.path, "nft", "list", "tables").stdout


def test_internal_network_is_cut_off(host, outside, container):
    host.ensure_bridge("nwb3", "198.18.3.1/24", 1500, None)
    c3 = container("c3", "nwb3", "198.18.3.5/24", "198.18.3.1")
    c3b = container("c3b", "nwb3", "198.18.3.6/24", "198.18.3.1")
    host.set_ip_forward(True)
    sh(outside, "ip", "route", "add", "198.18.3.0/24", "via", "203.0.113.1")  # so only the firewall stops it
    assert pings(c3, "203.0.113.2") and pings(outside, "198.18.3.5")

    host.apply_firewall(TABLE, [BridgeRule("nwb3", "198.18.3.0/24", internal=True, masquerade=True)])
    assert no_ping(c3, "203.0.113.2")
    assert no_ping(outside, "198.18.3.5")
    assert pings(c3, "198.18.3.6") and pings(c3b, "198.18.3.5")  # within the network: fine


def test_nft_failure_is_one_kernel_error(host):
    with pytest.raises(KernelError) as e:
        host.call(host.kernel._nft_cmd,
                  {"nftables": [{"delete": {"table": {"family": "inet", "name": "nwt_absent"}}}]}, "test")
    assert str(e.value).startswith("test: ") and "\n" not in str(e.value)


# ---- threading ------------------------------------------------------------------------------------

def test_used_from_executor_thread_while_loop_runs(make_ns, nsdir):
    """The daemon's way: an asyncio loop in the main thread, the Kernel in one executor thread."""
    h = make_ns("host")
    executor = ThreadPoolExecutor(1, initializer=_enter, initargs=(h,))

    async def main():
        loop = asyncio.get_running_loop()
        kernel = await loop.run_in_executor(executor, Kernel, os.path.join(nsdir, "run"))
        try:
            await loop.run_in_executor(executor, kernel.ensure_bridge, "nwb0", "198.18.0.1/24", 1500, None)
            assert await loop.run_in_executor(executor, kernel.link_exists, "nwb0")
            # The loop thread gets a clear refusal, not a socket in the wrong place.
            with pytest.raises(RuntimeError, match="second thread"):
                kernel.link_exists("nwb0")
        finally:
            await loop.run_in_executor(executor, kernel.close)
        with pytest.raises(RuntimeError, match="closed"):
            await loop.run_in_executor(executor, kernel.link_exists, "nwb0")

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    assert ip_json(h, "link", "show", "nwb0")[0]["ifname"] == "nwb0"


# ---- RealDataPlane: the async interface engine and agent use ----------------------------------------

def test_real_dataplane_through_the_async_interface(make_ns, nsdir):
    """A few calls of every kind through RealDataPlane, its kernel thread working inside a test namespace."""
    from netweft.dataplane.real import RealDataPlane
    from netweft.model.objects import Peer

    h = make_ns("host")
    ctr, octr = make_ns("c1"), make_ns("c2")
    sandboxes = os.path.join(nsdir, "sandboxes")
    sb = os.path.join(sandboxes, "sb1")
    sh(h, "ip", "link", "add", "nwtul0", "type", "veth", "peer", "name", "nwtul1")
    sh(h, "ip", "addr", "add", "192.0.2.1/24", "dev", "nwtul0")
    sh(h, "ip", "link", "set", "nwtul0", "mtu", "1400", "up")
    peers = {Peer("198.18.1.3", "02:00:c6:12:01:03", "192.0.2.2"), Peer("198.18.1.4", "02:00:c6:12:01:04", "192.0.2.3")}

    async def main():
        dp = RealDataPlane(os.path.join(nsdir, "run"), host_netns=h)
        try:
            await dp.start()
            # A local bridge network with one container.
            await dp.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
            await dp.ensure_endpoint(ctr, "nwb0", "nwv-c1", "eth0", "198.18.0.2/24", "02:42:c6:12:00:02", 1500,
                                     "198.18.0.1")
            await dp.apply_firewall(TABLE, [BridgeRule("nwb0", "198.18.0.0/24", internal=False, masquerade=True)])
            assert await dp.link_exists("nwb0") and not await dp.link_exists("nwb1")
            assert await dp.list_links("nwv") == ["nwv-c1"]
            assert (await dp.ipv4_addresses())["nwtul0"] == ["192.0.2.1"]
            assert await dp.host_routes("nwb") == [ipaddress.ip_network("192.0.2.0/24")]
            assert await dp.underlay_mtu("192.0.2.1") == 1400
            # An overlay sandbox with one local endpoint and two remote ones.
            assert await dp.ensure_sandbox(sb, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 4789, "nwtx4242") is True
            assert await dp.ensure_sandbox(sb, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 4789, "nwtx4242") is False
            await dp.ensure_overlay_endpoint(sb, octr, "nwv-o1", "eth0", "198.18.1.2/24", "02:00:c6:12:01:02", 1350)
            assert await dp.list_overlay_endpoints(sb) == ["nwv-o1"]
            assert await dp.list_netns(sandboxes) == ["sb1"]
            assert await dp.sync_peers(sb, peers) == 4
            assert await dp.list_peers(sb) == peers          # model Peers read back equal to those given
            await dp.remove_peers(sb, list(peers)[:1])
            assert await dp.list_peers(sb) == set(list(peers)[1:])
            with pytest.raises(InvalidRequest):
                await dp.add_peers(sb, [Peer("198.18.1.9", "not-a-mac", "192.0.2.2")])
            with pytest.raises(KernelError, match="no overlay sandbox"):
                await dp.add_peers(os.path.join(sandboxes, "absent"), peers)
            # The gateway bridge and its firewall.
            await dp.ensure_gwbridge("nwtgw", "198.19.255.1/24", 1400)
            await dp.ensure_gw_endpoint(octr, "nwtgw", "nwtg-o1", "eth1", "198.19.255.2/24", "02:00:c6:13:ff:02",
                                        1400, "198.19.255.1")
            await dp.apply_overlay_firewall("nwtgw", "198.19.255.0/24")
            assert default_route(octr) == [("198.19.255.1", "eth1")]
            assert pings(ctr, "198.18.0.1") and pings(octr, "198.18.1.1") and pings(octr, "198.19.255.1")
            # Teardown through the interface, every call idempotent.
            for _ in range(2):
                await dp.delete_overlay_firewall()
                await dp.delete_gw_endpoint("nwtg-o1")
                await dp.delete_gwbridge("nwtgw")
                await dp.delete_overlay_endpoint(sb, "nwv-o1")
                await dp.delete_sandbox(sb, "nwtx4242")
                await dp.delete_endpoint("nwv-c1")
                await dp.apply_firewall(TABLE, [])
                await dp.delete_bridge("nwb0", None)
            assert await dp.list_netns(sandboxes) == [] and await dp.list_overlay_endpoints(sb) == []
            assert await dp.list_peers(sb) == set()
            assert await dp.list_links("nw") == ["nwtul0", "nwtul1"]  # the underlay only
        finally:
            await dp.close()
        with pytest.raises(KernelError, match="closed"):
            await dp.link_exists("nwb0")

    asyncio.run(main())
    assert "nwtgw" not in sh(h, "ip", "-o", "link").stdout
    assert TABLE not in sh(h, "nft", "list", "tables").stdout


# ---- the contract: the fake data plane reports what the real one does ---------------------------------

def _real_state(paths: dict[str, str]) -> dict:
    """What the kernel holds, in the fake's terms: per namespace, link -> (kind, mtu, master, addresses, up)."""
    out = {}
    for key, path in paths.items():
        if key != "host" and not netns.is_netns(path):
            continue
        addrs = {a["ifname"]: sorted(f'{i["local"]}/{i["prefixlen"]}' for i in a.get("addr_info", []))
                 for a in ip_json(path, "-4", "addr", "show")}
        links = {}
        for l in ip_json(path, "-d", "link", "show"):
            if l["ifname"] == "lo" or l["ifname"].startswith("nwtul"):
                continue
            links[l["ifname"]] = (l.get("linkinfo", {}).get("info_kind", "device"), l["mtu"], l.get("master"),
                                  addrs.get(l["ifname"], []), "UP" in l["flags"])
        out[key] = (links, default_route(path)[:1] if key != "host" else None)
    tables = {t["table"]["name"] for t in json.loads(sh(paths["host"], "nft", "-j", "list", "tables").stdout)["nftables"]
              if "table" in t}
    forward = sh(paths["host"], "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    return {"ns": out, "tables": tables, "forward": forward}


def _fake_state(fake, paths: dict[str, str]) -> dict:
    out = {}
    for key, path in paths.items():
        if key != "host" and path not in fake.netns_paths():
            continue
        ns = None if key == "host" else path
        links = {n: (l.kind, l.mtu, l.master, sorted(l.addresses), l.up) for n, l in fake.links(ns).items()
                 if n != "lo" and not n.startswith("nwtul")}
        route = fake.default_route(path) if key != "host" else None
        out[key] = (links, [route] if route else [] if key != "host" else None)
    return {"ns": out, "tables": set(fake.tables), "forward": fake.ip_forward}


def _diff(real: dict, fake: dict) -> list[str]:
    out = [f"{k}: real {real[k]} fake {fake[k]}" for k in ("tables", "forward") if real[k] != fake[k]]
    for ns in sorted(set(real["ns"]) | set(fake["ns"])):
        r, f = real["ns"].get(ns, ({}, None)), fake["ns"].get(ns, ({}, None))
        for name in sorted(set(r[0]) | set(f[0])):
            if r[0].get(name) != f[0].get(name):
                out.append(f"{ns}/{name}: real {r[0].get(name)} fake {f[0].get(name)}")
        if r[1] != f[1]:
            out.append(f"{ns} default route: real {r[1]} fake {f[1]}")
    return out


def test_the_fake_reports_what_the_real_one_does(make_ns, nsdir):
    """One sequence of calls, refusals included, on the real data plane (in a test namespace) and on the
    fake: after every step both give the same answer or refusal, report the same through list_* and hold
    the same links, addresses, MTUs, routes and tables."""
    from netweft.dataplane.fake import FakeDataPlane
    from netweft.dataplane.real import RealDataPlane
    from netweft.model.objects import Peer

    h = make_ns("host")
    sh(h, "ip", "link", "add", "nwtul0", "type", "veth", "peer", "name", "nwtul1")
    sh(h, "ip", "addr", "add", "192.0.2.1/24", "dev", "nwtul0")
    sh(h, "ip", "link", "set", "nwtul0", "mtu", "1400", "up")
    fake = FakeDataPlane()
    fake.add_host_interface("nwtul0", "192.0.2.1/24", mtu=1400)
    fake.add_link("nwtul1", "veth", mtu=1400)
    ctrs, sbs = os.path.join(nsdir, "ctr"), os.path.join(nsdir, "sb")
    c1, c2, c3 = (os.path.join(ctrs, f"nwt-c{i}") for i in (1, 2, 3))
    sb1, sb2 = os.path.join(sbs, "nwt-sb1"), os.path.join(sbs, "nwt-sb2")
    paths = {"host": h, "c1": c1, "c2": c2, "c3": c3, "sb1": sb1, "sb2": sb2}
    p1, p2 = Peer("198.18.1.11", "02:00:00:00:01:11", "192.0.2.11"), Peer("198.18.1.12", "02:00:00:00:01:12", "192.0.2.12")
    rule = BridgeRule("nwb0", "198.18.0.0/24", internal=False, masquerade=True)
    steps = [
        ("create_netns", c1), ("create_netns", c2), ("create_netns", c3),
        ("ensure_bridge", "nwb0", "198.18.0.1/24", 1500, None),
        ("ensure_endpoint", c1, "nwb0", "nwv-c1", "eth0", "198.18.0.2/24", "02:42:c6:12:00:02", 1500, "198.18.0.1"),
        ("apply_firewall", TABLE, [rule]),
        ("set_ip_forward", True),
        ("ensure_sandbox", sb1, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 4789, "nwtx4242"),
        ("ensure_sandbox", sb1, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 4789, "nwtx4242"),
        ("ensure_overlay_endpoint", sb1, c2, "nwv-o2", "eth0", "198.18.1.2/24", "02:00:c6:12:01:02", 1350),
        ("ensure_overlay_endpoint", sb1, c3, "nwv-o3", "eth0", "198.18.1.3/24", "02:00:c6:12:01:03", 1350),
        ("sync_peers", sb1, {p1, p2}),
        ("ensure_gwbridge", "nwtgw", "198.19.255.1/24", 1400),
        ("ensure_gw_endpoint", c2, "nwtgw", "nwtg-o2", "eth1", "198.19.255.2/24", "02:00:c6:13:ff:02", 1400,
         "198.19.255.1"),
        ("ensure_gw_endpoint", c3, "nwtgw", "nwtg-o3", "eth1", "198.19.255.3/24", "02:00:c6:13:ff:03", 1400,
         "198.19.255.1"),
        ("apply_overlay_firewall", "nwtgw", "198.19.255.0/24"),
        ("apply_port_maps", [PortRule("tcp", 8080, "", "198.19.255.2", 80), PortRule("udp", 53, "192.0.2.1",
                                                                                     "198.18.0.2", 5353)]),
        ("apply_port_maps", [PortRule("tcp", 8080, "", "198.19.255.2", 80), PortRule("tcp", 8080, "", "198.18.0.2",
                                                                                     80)]),   # refused: twice
        # Kernel refusals.
        ("ensure_sandbox", sb2, 4242, "198.18.2.1/24", 1350, "192.0.2.1", 4789, "nwtx4242"),   # VNI in use
        ("ensure_overlay_endpoint", sb1, c3, "nwv-o9", "lo", "198.18.1.9/24", "02:00:c6:12:01:09", 1350),
        ("ensure_bridge", "nwtul0", None, 1500, None),
        ("ensure_endpoint", c1, "nwb9", "nwv-c9", "eth9", "198.18.0.9/24", "02:42:c6:12:00:09", 1500, None),
        ("ensure_gw_endpoint", os.path.join(ctrs, "absent"), "nwtgw", "nwtg-o9", "eth1", "198.19.255.9/24",
         "02:00:c6:13:ff:09", 1400, "198.19.255.1"),
        ("add_peers", os.path.join(sbs, "absent"), [p1]),
        ("delete_bridge", "nwtgw-x", None),
        ("delete_endpoint", "nwtgw"),
        # Malformed arguments.
        ("ensure_bridge", "nwb0", "198.18.0.1", 1500, None),
        ("ensure_sandbox", sb1, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 70000, "nwtx4242"),
        ("sync_peers", sb1, [p1, Peer(p1.ip, p2.mac, p2.vtep)]),
        ("create_netns", "relative"),
        ("delete_overlay_endpoints", sb1, ["br0"]),     # not a veth: refused, nothing deleted
        ("delete_gw_endpoints", ["nwtg-o2", "a/b"]),    # a malformed name: refused, nothing deleted
        # Changes and teardown.
        ("remove_peers", sb1, [p1]),
        ("delete_overlay_endpoint", sb1, "nwv-o3"),
        ("ensure_overlay_endpoint", sb1, c3, "nwv-o3", "eth0", "198.18.1.3/24", "02:00:c6:12:01:03", 1350),
        ("delete_overlay_endpoints", sb1, ["nwv-o2", "nwv-o3", "nwv-o8"]),   # many at once; one never made
        ("delete_overlay_endpoints", sb1, []),
        ("delete_gw_endpoint", "nwtg-o2"),
        ("delete_gw_endpoints", ["nwtg-o2", "nwtg-o3"]),
        ("delete_endpoint", "nwv-c1"),
        ("delete_netns", c1),
        ("delete_sandbox", sb2, None),
        ("delete_sandbox", sb1, "nwtx4242"),
        ("delete_overlay_firewall",),
        ("delete_gwbridge", "nwtgw"),
        ("apply_firewall", TABLE, []),
        ("apply_port_maps", []),
        ("delete_bridge", "nwb0", None),
    ]

    async def outcome(dp, method, args):
        try:
            return ("ok", await getattr(dp, method)(*args))
        except (InvalidRequest, KernelError) as e:
            assert "\n" not in str(e)
            return (type(e).__name__, None)

    async def observe(dp) -> dict:
        return {"links": await dp.list_links("nw"), "addresses": await dp.ipv4_addresses(),
                "routes": await dp.host_routes("nwb"), "mtu": await dp.underlay_mtu("192.0.2.1"),
                "netns": (await dp.list_netns(ctrs), await dp.list_netns(sbs)),
                "exists": [await dp.link_exists(n) for n in ("nwb0", "nwtgw", "nwv-c1", "nwtx4242", "a/b")],
                "info": [await dp.link_info(n) for n in ("lo", "nwb0", "nwtgw", "nwv-c1", "nwtg-o2", "nwtx4242",
                                                          "a/b")],
                "ports": [await dp.list_ports(b) for b in ("nwb0", "nwtgw", "nwtx4242")],
                "endpoints": [await dp.list_overlay_endpoints(s) for s in (sb1, sb2)],
                "peers": [await dp.list_peers(s) for s in (sb1, sb2)],
                "guarded": [await dp.list_antispoof(s) for s in (None, sb1, sb2)]}

    async def main():
        real = RealDataPlane(os.path.join(nsdir, "run"), host_netns=h)
        try:
            for method, *args in steps:
                got_real, got_fake = await outcome(real, method, args), await outcome(fake, method, args)
                assert got_real == got_fake, f"{method}{tuple(args)}: real {got_real}, fake {got_fake}"
                assert await observe(real) == await observe(fake), f"after {method}{tuple(args)}"
                real_state, fake_state = _real_state(paths), _fake_state(fake, paths)
                assert real_state == fake_state, f"after {method}{tuple(args)}: {_diff(real_state, fake_state)}"
        finally:
            await real.close()
            for path in (c1, c2, c3, sb1, sb2):
                netns.delete_netns(path)

    asyncio.run(main())


def test_the_probe_device_carries_a_probe_and_goes_on_delete(make_ns, nsdir):
    """The data-path probe channel (dataplane/probe.py) on the real kernel: a probe sent to this host's own
    VTEP goes out as VXLAN on the data path's port, comes in through the probe device and is read back;
    opening again repairs nothing that is right; delete removes the device. The fake keeps the same device."""
    from netweft.dataplane import probe as wire
    from netweft.dataplane.fake import FakeDataPlane
    from netweft.dataplane.real import RealDataPlane

    h = make_ns("host")
    sh(h, "ip", "link", "add", "nwtul0", "type", "veth", "peer", "name", "nwtul1")
    sh(h, "ip", "addr", "add", "192.0.2.1/24", "dev", "nwtul0")
    sh(h, "ip", "link", "set", "nwtul0", "up")
    sh(h, "ip", "link", "set", "lo", "up")   # a probe to this host's own VTEP goes through lo

    async def main():
        real = RealDataPlane(os.path.join(nsdir, "run"), host_netns=h)
        fake = FakeDataPlane()
        fake.add_host_interface("nwtul0", "192.0.2.1/24")
        try:
            got: list[bytes] = []
            ch = await real.open_probe("192.0.2.1", 4789, 1450)
            ch.start(asyncio.get_running_loop(), got.append)
            try:
                frame = wire.encode(wire.Probe(wire.REQUEST, 9, 12345, "nodea", "nodeb", 1464))
                assert ch.send("192.0.2.1", frame) is None
                for _ in range(100):
                    if got:
                        break
                    await asyncio.sleep(0.02)
                assert [wire.parse(f) for f in got] == [wire.parse(frame)]
                assert ch.send("192.0.2.1", b"\x00" * 70000) is not None   # one line why, no exception
            finally:
                ch.close()
            fch = await fake.open_probe("192.0.2.1", 4789, 1450)
            fch.close()
            for dp in (real, fake):
                assert await dp.link_info(wire.PROBE_DEVICE) == ("vxlan", None, False)
                assert await dp.list_links("nwprobe") == ["nwprobe"]
                (await dp.open_probe("192.0.2.1", 4789, 1450)).close()   # again: idempotent
                await dp.delete_probe()
                await dp.delete_probe()
                assert await dp.list_links("nwprobe") == []
        finally:
            await real.close()

    asyncio.run(main())


# ---- anti-spoofing (dataplane/antispoof.py) in the kernel ------------------------------------------

ETH_P_ALL = 0x0003


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _udp_frame(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, marker: bytes) -> bytes:
    payload = marker
    udp = struct.pack("!HHHH", 40000, 40001, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src_ip),
                      socket.inet_aton(dst_ip))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF) + hdr[12:]
    return _mac_bytes(dst_mac) + _mac_bytes(src_mac) + b"\x08\x00" + hdr + udp


def _arp_frame(src_mac: str, sender_mac: str, sender_ip: str, target_ip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac_bytes(sender_mac), socket.inet_aton(sender_ip),
                      b"\0" * 6, socket.inet_aton(target_ip))
    return b"\xff" * 6 + _mac_bytes(src_mac) + b"\x08\x06" + arp


class _Wire:
    """Raw frames sent from one namespace's eth0 and the frames seen on another's, through AF_PACKET sockets
    opened inside them (a thread enters each namespace for the socket call)."""

    def __init__(self, sender_ns: str, receiver_ns: str):
        def opened(ns: str) -> socket.socket:
            with ThreadPoolExecutor(1, initializer=_enter, initargs=(ns,)) as ex:
                return ex.submit(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                       socket.htons(ETH_P_ALL))).result()
        self.tx, self.rx = opened(sender_ns), opened(receiver_ns)
        self.tx.bind(("eth0", 0))
        self.rx.bind(("eth0", 0))
        self.rx.settimeout(5)

    def arrived(self, frames: list[bytes], fence: bytes) -> list[bool]:
        """Which of `frames` reached the receiver: sent in order, then `fence` (a frame that passes), until the
        fence is seen; then a moment for anything still on its way."""
        seen: list[bytes] = []
        for f in frames:
            self.tx.send(f)
        deadline = time.monotonic() + 10
        while fence not in seen:
            self.tx.send(fence)
            try:
                while fence not in seen:
                    seen.append(self.rx.recv(2048)[:len(fence)])
            except TimeoutError:
                assert time.monotonic() < deadline, "not even a legitimate frame arrived"
        self.rx.settimeout(0.3)
        try:
            while True:
                seen.append(self.rx.recv(2048))
        except TimeoutError:
            self.rx.settimeout(5)
        return [any(s[:len(f)] == f for s in seen) for f in frames]

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def _guard_sets(ns: str) -> dict[str, list]:
    out = json.loads(sh(ns, "nft", "-j", "list", "table", "bridge", "netweft_as").stdout)["nftables"]
    sets = {}
    for item in out:
        s = item.get("set") or item.get("map")
        if s:
            sets[s["name"]] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
    chains = sorted(item["chain"]["name"] for item in out if "chain" in item)
    return {**sets, "chains": chains}


def test_a_container_sends_only_from_its_own_mac_and_address_after_many_adds_and_removes(host, container, make_ns):
    """Spoofed frames are dropped and legitimate ones pass, for IPv4 and ARP, after hundreds of ports were added,
    readdressed and removed by two contexts sharing the table; what stays in the sets is exactly the guarded ports'."""
    from netweft.dataplane import antispoof
    from netweft.dataplane.nlutil import new_nft, nft_run

    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    a_mac, b_mac = "02:42:c6:12:00:05", "02:42:c6:12:00:06"
    a = container("a", "nwb0", "198.18.0.5/24", "198.18.0.1", mac=a_mac)

    # A second context in the host namespace (the overlay's gateway side does this): churn through it.
    other = antispoof.Guarded()
    ctx = host.call(new_nft, "test")

    def run(cmd, what):
        return nft_run(ctx, cmd, what)

    def churn():
        for i in range(300):
            antispoof.add_port(run, other, f"nwvf{i}", f"02:42:c6:13:{i >> 8:02x}:{i & 255:02x}",
                               f"198.18.1.{i % 250 + 1}")
        for i in range(0, 300, 3):
            antispoof.add_port(run, other, f"nwvf{i}", f"02:42:c6:14:{i >> 8:02x}:{i & 255:02x}",
                               f"198.18.2.{i % 250 + 1}")   # readdressed: the old elements go
        for i in range(300):
            if i % 3 != 0:
                antispoof.delete_port(run, other, f"nwvf{i}")
    host.call(churn)
    # The Kernel's own context: container b comes after the churn, a goes and comes back.
    b = container("b", "nwb0", "198.18.0.6/24", "198.18.0.1", mac=b_mac)
    host.delete_endpoint("nwv-a")
    host.ensure_endpoint(a, "nwb0", "nwv-a", "eth0", "198.18.0.5/24", a_mac, 1500, "198.18.0.1")
    host.ensure_endpoint(a, "nwb0", "nwv-a", "eth0", "198.18.0.5/24", a_mac, 1500, "198.18.0.1")   # twice: the same

    sets = _guard_sets(host.path)
    assert sets["chains"] == ["guard", "prerouting"]
    want_ports = sorted(["nwv-a", "nwv-b"] + [f"nwvf{i}" for i in range(0, 300, 3)])
    assert sorted(json.loads(e)[0] for e in sets["ports"]) == want_ports
    assert sorted(json.loads(e)["concat"][0] for e in sets["ip_ok"]) == want_ports
    assert len(sets["arp_ok"]) == 2 * len(want_ports)
    assert json.dumps({"concat": ["nwvf3", "02:42:c6:14:00:03", "198.18.2.4"]}, sort_keys=True) in sets["ip_ok"]
    assert host.list_antispoof() == want_ports

    wire = _Wire(a, b)
    try:
        a_ip, b_ip, spoof_ip, spoof_mac = "198.18.0.5", "198.18.0.6", "198.18.0.99", "02:42:de:ad:be:ef"
        frames = {
            "ip": _udp_frame(b_mac, a_mac, a_ip, b_ip, b"nwt-ok"),
            "ip from another address": _udp_frame(b_mac, a_mac, spoof_ip, b_ip, b"nwt-ip"),
            "ip from another mac": _udp_frame(b_mac, spoof_mac, a_ip, b_ip, b"nwt-mac"),
            "ip from 0.0.0.0": _udp_frame(b_mac, a_mac, "0.0.0.0", b_ip, b"nwt-zero"),
            "ip from b's address": _udp_frame(b_mac, a_mac, b_ip, b_ip, b"nwt-b"),
            "arp": _arp_frame(a_mac, a_mac, a_ip, "198.18.0.201"),
            "arp probe": _arp_frame(a_mac, a_mac, "0.0.0.0", "198.18.0.202"),
            "arp for another address": _arp_frame(a_mac, a_mac, spoof_ip, "198.18.0.203"),
            "arp for another mac": _arp_frame(a_mac, spoof_mac, a_ip, "198.18.0.204"),
            "arp from another mac": _arp_frame(spoof_mac, spoof_mac, a_ip, "198.18.0.205"),
            "ipv6": _mac_bytes(b_mac) + _mac_bytes(a_mac) + b"\x86\xdd" + b"\x60" + b"\0" * 50,
            "vlan-tagged ip": _mac_bytes(b_mac) + _mac_bytes(a_mac) + b"\x81\x00\x00\x05"
                              + _udp_frame(b_mac, a_mac, a_ip, b_ip, b"nwt-vlan")[12:],
        }
        fence = _udp_frame(b_mac, a_mac, a_ip, b_ip, b"nwt-fence")
        got = dict(zip(frames, wire.arrived(list(frames.values()), fence)))
        assert got == {name: name in ("ip", "arp", "arp probe") for name in frames}, got
    finally:
        wire.close()


def test_a_table_of_the_former_layout_is_converted_port_by_port(host, container):
    """A chain per port (the layout before the sets) keeps guarding its ports; a port added again moves to the
    sets, one removed takes its chain along, and at the end only the two shared chains are left."""
    host.ensure_bridge("nwb0", "198.18.0.1/24", 1500, None)
    fam, tbl = "bridge", "netweft_as"
    legacy = [{"add": {"table": {"family": fam, "name": tbl}}},
              {"add": {"map": {"family": fam, "table": tbl, "name": "ports", "type": "ifname", "map": "verdict"}}},
              {"add": {"chain": {"family": fam, "table": tbl, "name": "prerouting", "type": "filter",
                                 "hook": "prerouting", "prio": -300, "policy": "accept"}}},
              {"add": {"rule": {"family": fam, "table": tbl, "chain": "prerouting",
                                "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]}}}]
    for port in ("nwv-a", "nwv-old"):
        legacy += [{"add": {"chain": {"family": fam, "table": tbl, "name": f"p_{port}"}}},
                   {"add": {"rule": {"family": fam, "table": tbl, "chain": f"p_{port}", "expr": [{"drop": None}]}}},
                   {"add": {"element": {"family": fam, "table": tbl, "name": "ports",
                                        "elem": [[port, {"jump": {"target": f"p_{port}"}}]]}}}]
    subprocess.run(["nsenter", f"--net={host.path}", "nft", "-j", "-f", "-"], input=json.dumps({"nftables": legacy}),
                   text=True, check=True, capture_output=True)
    a = container("a", "nwb0", "198.18.0.5/24", "198.18.0.1", mac="02:42:c6:12:00:05")
    container("b", "nwb0", "198.18.0.6/24", "198.18.0.1", mac="02:42:c6:12:00:06")
    assert pings(a, "198.18.0.6")          # a's chain of the former layout (drop all) is gone
    sets = _guard_sets(host.path)
    assert sets["chains"] == ["guard", "p_nwv-old", "prerouting"]
    assert host.list_antispoof() == ["nwv-a", "nwv-b", "nwv-old"]
    host.delete_endpoint("nwv-old")        # its link is long gone; its guard goes
    assert _guard_sets(host.path)["chains"] == ["guard", "prerouting"]
    assert host.list_antispoof() == ["nwv-a", "nwv-b"]


def test_the_fake_grows_bridge_chains_as_the_real_one_does(make_ns, nsdir, monkeypatch):
    """Bridges past their port limit (dataplane/bridgechain.py, here after one container port per bridge):
    the sandbox's br0 and the gateway bridge grow extensions, first fit, and parts deleted by hand come back,
    alike on the real data plane and on the fake."""
    from netweft.dataplane import bridgechain
    from netweft.dataplane.fake import FakeDataPlane
    from netweft.dataplane.real import RealDataPlane

    monkeypatch.setattr(bridgechain, "FIRST_PORTS", 1)
    monkeypatch.setattr(bridgechain, "EXTENSION_PORTS", 1)
    h = make_ns("host")
    sh(h, "ip", "link", "add", "nwtul0", "type", "veth", "peer", "name", "nwtul1")
    sh(h, "ip", "addr", "add", "192.0.2.1/24", "dev", "nwtul0")
    sh(h, "ip", "link", "set", "nwtul0", "mtu", "1400", "up")
    fake = FakeDataPlane()
    fake.add_host_interface("nwtul0", "192.0.2.1/24", mtu=1400)
    fake.add_link("nwtul1", "veth", mtu=1400)
    ctrs, sbs = os.path.join(nsdir, "ctr"), os.path.join(nsdir, "sb")
    cs = [os.path.join(ctrs, f"nwt-c{i}") for i in range(5)]
    sb = os.path.join(sbs, "nwt-sb1")
    paths = {"host": h, "sb": sb, **{f"c{i}": c for i, c in enumerate(cs)}}

    def ov(i: int) -> tuple:
        return ("ensure_overlay_endpoint", sb, cs[i], f"nwv-o{i}", "eth0", f"198.18.1.{10 + i}/24",
                f"02:00:c6:12:01:{10 + i:02x}", 1350)

    def gw(i: int) -> tuple:
        return ("ensure_gw_endpoint", cs[i], "nwtgw", f"nwtg-o{i}", "eth1", f"198.19.255.{10 + i}/24",
                f"02:00:c6:13:ff:{10 + i:02x}", 1400, "198.19.255.1")

    sandbox = ("ensure_sandbox", sb, 4242, "198.18.1.1/24", 1350, "192.0.2.1", 4789, "nwtx4242")
    gwbridge = ("ensure_gwbridge", "nwtgw", "198.19.255.1/24", 1400)
    steps = [*(("create_netns", c) for c in cs), sandbox, ov(0), ov(1), ov(2), gwbridge, gw(0), gw(1), gw(2),
             sandbox, gwbridge, ov(2), gw(2),                               # ensured again: nothing changes
             ("delete_overlay_endpoint", sb, "nwv-o0"), ov(3),              # first fit: back on br0
             ("delete_gw_endpoint", "nwtg-o0"), gw(3),
             ("hand", "sb", "br0-1"), sandbox,                              # an extension and its port come back
             ("hand", "sb", "br0-2a"), sandbox,                             # a link comes back
             ("hand", "sb", "br0"), sandbox,                                # br0's ports come back on it
             ("hand", "host", "nwtgw-2a"), gwbridge,
             ("hand", "host", "nwtgw-1"), gwbridge, gw(1),                  # its port, left detached, goes back
             ov(4), gw(4),                                                  # a third extension
             ("delete_sandbox", sb, "nwtx4242"), ("delete_gwbridge", "nwtgw"),
             *(("delete_gw_endpoint", f"nwtg-o{i}") for i in range(5))]

    async def outcome(dp, method, args):
        try:
            if method == "hand":   # `ip link del` by hand
                ns, name = args
                if dp is fake:
                    fake.delete_link(name, None if ns == "host" else paths[ns])
                else:
                    sh(paths[ns], "ip", "link", "del", name)
                return ("ok", None)
            return ("ok", await getattr(dp, method)(*args))
        except (InvalidRequest, KernelError) as e:
            assert "\n" not in str(e)
            return (type(e).__name__, None)

    async def observe(dp) -> dict:
        return {"links": await dp.list_links("nw"), "ports": await dp.list_ports("nwtgw"),
                "endpoints": await dp.list_overlay_endpoints(sb), "netns": await dp.list_netns(sbs)}

    seen: set[tuple[str, str, str | None]] = set()

    async def main():
        real = RealDataPlane(os.path.join(nsdir, "run"), host_netns=h)
        try:
            for method, *args in steps:
                got_real, got_fake = await outcome(real, method, args), await outcome(fake, method, args)
                assert got_real == got_fake, f"{method}{tuple(args)}: real {got_real}, fake {got_fake}"
                assert await observe(real) == await observe(fake), f"after {method}{tuple(args)}"
                real_state, fake_state = _real_state(paths), _fake_state(fake, paths)
                assert real_state == fake_state, f"after {method}{tuple(args)}: {_diff(real_state, fake_state)}"
                seen.update((ns, name, link[2]) for ns, (links, _) in real_state["ns"].items() if ns in ("host", "sb")
                            for name, link in links.items())
            assert await real.list_links("nwtgw") == []
            # Every container port went where first fit puts it, the fourth past a third extension.
            assert {("sb", f"nwv-o{i}", b) for i, b in ((0, "br0"), (1, "br0-1"), (2, "br0-2"), (3, "br0"),
                                                        (4, "br0-3"))} <= seen
            assert {("host", f"nwtg-o{i}", b) for i, b in ((0, "nwtgw"), (1, "nwtgw-1"), (2, "nwtgw-2"),
                                                           (3, "nwtgw"), (4, "nwtgw-3"))} <= seen
        finally:
            await real.close()
            for path in (*cs, sb):
                netns.delete_netns(path)

    asyncio.run(main())
