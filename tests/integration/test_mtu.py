"""MTU on every underlay (issue 7, item 13), through the CLI on lab hosts.

The overlay MTU is the underlay's minus the 50 bytes of VXLAN encapsulation, so a full-size frame with
DF set crosses hosts; and TCP leaving through the gateway bridge toward a smaller uplink has its MSS
clamped, so it never meets a path-MTU blackhole.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab_fixture import run_cli

VXLAN_OVERHEAD = 50
IP_ICMP_HEADERS = 28


def in_ctr(lab, host, ctr, *cmd, timeout=60) -> subprocess.CompletedProcess:
    return run_cli(lab, host, "exec", ctr, "--", *cmd, check=False, timeout=timeout)


def df_ping(lab, host, ctr, ip, payload: int) -> subprocess.CompletedProcess:
    """One ICMP echo of `payload` bytes with Don't Fragment set."""
    return in_ctr(lab, host, ctr, "ping", "-M", "do", "-c1", "-w3", "-s", str(payload), ip)


@pytest.mark.parametrize("underlay", [1500, 1400, 9000])
def test_overlay_mtu_fits_the_underlay(make_lab, underlay):
    lab = make_lab(2, mtu=underlay)
    mtu = underlay - VXLAN_OVERHEAD
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "ov", "--ip", "198.18.0.11", "--", "sleep", "1000")
    run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--ip", "198.18.0.12", "--", "sleep", "1000")
    for host, ctr in (("h1", "c1"), ("h2", "c2")):
        link = json.loads(in_ctr(lab, host, ctr, "ip", "-j", "link", "show", "eth0").stdout)[0]
        assert link["mtu"] == mtu, f"{ctr}: eth0 MTU {link['mtu']}, expected {underlay} - {VXLAN_OVERHEAD}"
        # What tools that read sysfs see (the container's own interface, not the host's).
        assert in_ctr(lab, host, ctr, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == str(mtu)
    # The full overlay MTU crosses hosts with DF set, both ways; one byte more does not leave the container.
    largest = mtu - IP_ICMP_HEADERS
    for host, ctr, peer in (("h1", "c1", "198.18.0.12"), ("h2", "c2", "198.18.0.11")):
        r = df_ping(lab, host, ctr, peer, largest)
        assert r.returncode == 0, f"{ctr}: DF ping of {largest} bytes failed: {r.stdout}{r.stderr}"
        r = df_ping(lab, host, ctr, peer, largest + 1)
        assert r.returncode != 0 and f"mtu={mtu}" in r.stderr, r.stdout + r.stderr


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.2", 7000)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30)
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
c.sendall(b"x" * int(sys.argv[1])); c.close()
print(mss, flush=True)
"""

CLIENT = r"""
import socket
c = socket.create_connection(("203.0.113.2", 7000), timeout=30)
n = 0
while data := c.recv(1 << 16):
    n += len(data)
print(n)
"""


def test_tcp_to_a_smaller_uplink_has_its_mss_clamped(make_lab):
    """A container (eth1 on the gateway bridge: MTU 1500) connects to 'the outside', which also sits on
    1500 but is reached through an uplink of MTU 1300. The container's SYN offers MSS 1460; the clamp on
    the gateway bridge lowers it to what the uplink carries, so the outside never sends segments that
    need a path-MTU discovery many routers break."""
    lab = make_lab(1, mtu=1500)
    outside = f"nwl-{lab.name}-out"
    host = lab.ns("h1")
    subprocess.run(["ip", "netns", "add", outside], check=True)
    subprocess.run(["ip", "-n", host, "link", "add", "up0", "mtu", "1300", "type", "veth", "peer", "name", "wan",
                    "mtu", "1500", "netns", outside], check=True)
    for ns, dev, addr in ((host, "up0", "203.0.113.1/24"), (outside, "wan", "203.0.113.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "ov", "--", "sleep", "1000")
    eth1 = json.loads(in_ctr(lab, "h1", "c1", "ip", "-j", "link", "show", "eth1").stdout)[0]
    assert eth1["mtu"] == 1500   # the container's own SYN offers MSS 1460

    size = 2 * 1024 * 1024
    server = subprocess.Popen(["ip", "netns", "exec", outside, sys.executable, "-c", SERVER, str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        client = in_ctr(lab, "h1", "c1", sys.executable, "-c", CLIENT, timeout=90)
        mss, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert int(mss) <= 1300 - 40, f"the outside kept MSS {mss.strip()}: SYN not clamped to the 1300 uplink"
    assert client.returncode == 0, client.stderr
    assert int(client.stdout) == size          # and bulk data from the outside arrived
