"""Embedded DNS at 127.0.0.11 on real hosts: names across hosts on an overlay, aliases, scoping to shared
networks, forwarding of other names to a resolver the test runs in the lab, a removed container gone."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lab_fixture import new_lab_name, run_cli, wait_for
from netweft.lab.lab import Lab

UPSTREAM = r"""
import socket, sys
from dnslib import RR, RCODE, DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    try:
        req = DNSRecord.parse(data)
    except Exception:
        continue
    name = str(req.q.qname).rstrip(".").lower()
    print("asked", name, flush=True)
    r = req.reply()
    if name == "outside.test":
        r.add_answer(*RR.fromZone("outside.test. 60 A 198.18.250.1"))
    else:
        r.header.rcode = RCODE.NXDOMAIN
    s.sendto(r.pack(), addr)
"""


@pytest.fixture
def dns_lab():
    """Two hosts whose daemons forward to a resolver on h1's underlay address (run by the test)."""
    lab = Lab(new_lab_name())
    upstream = None
    try:
        lab.up(2, daemon_args=["--dns", "192.0.2.11"], init_opts={"HeartbeatPeriod": "500ms"},
               progress=lambda *a: None)
        assert lab.address("h1") == "192.0.2.11"
        upstream = subprocess.Popen(["nsenter", f"--net={lab.ns_path('h1')}", sys.executable, "-c", UPSTREAM,
                                     "192.0.2.11"], stdout=subprocess.PIPE, text=True)
        assert upstream.stdout.readline().strip() == "ready"
        yield lab, upstream
    finally:
        if upstream is not None:
            upstream.kill()
            upstream.wait()
        lab.down(quiet=True)


def getent(lab: Lab, host: str, ctr: str, name: str) -> list[str]:
    """Addresses glibc in the container finds for name (through its resolv.conf: 127.0.0.11)."""
    r = run_cli(lab, host, "exec", ctr, "--", "getent", "ahostsv4", name, check=False)
    return sorted({line.split()[0] for line in r.stdout.splitlines() if line.strip()})


def ip_of(lab: Lab, host: str, ctr: str, net: str) -> str:
    import json
    return json.loads(run_cli(lab, host, "inspect", ctr).stdout)[0]["NetworkSettings"]["Networks"][net]["IPAddress"]


def test_names_scoped_to_shared_networks_and_the_rest_forwarded(dns_lab):
    lab, upstream = dns_lab
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
    run_cli(lab, "h1", "network", "create", "--subnet", "198.19.200.0/24", "lan")
    run_cli(lab, "h1", "run", "-d", "--name", "a", "--network", "ov", "--network-alias", "web", "--",
            "sleep", "infinity")
    run_cli(lab, "h2", "run", "-d", "--name", "b", "--network", "ov", "--", "sleep", "infinity")
    run_cli(lab, "h1", "run", "-d", "--name", "c", "--network", "lan", "--", "sleep", "infinity")
    a, b = ip_of(lab, "h1", "a", "ov"), ip_of(lab, "h2", "b", "ov")
    c = ip_of(lab, "h1", "c", "lan")

    resolv = run_cli(lab, "h1", "exec", "a", "--", "cat", "/etc/resolv.conf").stdout
    assert "nameserver 127.0.0.11" in resolv and "ndots:0" in resolv
    # Across hosts, by name and by alias (the other host's endpoints come through the watch).
    assert wait_for(lambda: getent(lab, "h2", "b", "web") == [a], 10, "b resolving web (a's alias)")
    assert wait_for(lambda: getent(lab, "h1", "a", "b") == [b], 10, "a resolving b on the other host")
    assert getent(lab, "h1", "c", "c") == [c]
    # Scoping: a and c share no network: neither name resolves for the other; the query is forwarded
    # (the lab's resolver saw it and said NXDOMAIN).
    assert getent(lab, "h1", "c", "a") == []
    assert getent(lab, "h1", "a", "c") == []
    assert getent(lab, "h1", "a", "outside.test") == ["198.18.250.1"]
    assert getent(lab, "h2", "b", "outside.test") == ["198.18.250.1"]
    # A container connected to a network gets its names at once.
    run_cli(lab, "h1", "network", "connect", "ov", "c")
    assert getent(lab, "h1", "c", "b") == [b]
    # A removed container is gone from every host's answers.
    run_cli(lab, "h2", "rm", "-f", "b")
    wait_for(lambda: getent(lab, "h1", "a", "b") == [], 10, "b gone from a's answers")
    upstream.kill()
    asked = upstream.communicate()[0]
    assert "asked a" in asked and "asked c" in asked and "asked outside.test" in asked
    assert "asked web\n" not in asked    # names of ours never leave the host


def test_resolver_survives_a_daemon_restart(dns_lab):
    lab, _ = dns_lab
    run_cli(lab, "h1", "network", "create", "--subnet", "198.19.201.0/24", "lan2")
    run_cli(lab, "h1", "run", "-d", "--name", "x", "--network", "lan2", "--", "sleep", "infinity")
    run_cli(lab, "h1", "run", "-d", "--name", "y", "--network", "lan2", "--network-alias", "why", "--",
            "sleep", "infinity")
    y = ip_of(lab, "h1", "y", "lan2")
    assert getent(lab, "h1", "x", "why") == [y]
    lab.stop_daemon("h1")
    lab.start_daemon("h1", ["--dns", "192.0.2.11"])
    assert wait_for(lambda: getent(lab, "h1", "x", "why") == [y], 10, "x resolving y after a restart")
