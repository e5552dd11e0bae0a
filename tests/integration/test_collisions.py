"""Subnet collisions with the host (issue 13, item 7), in a 3-host lab: a network (bridge or overlay) or a swarm's
default pool overlapping a route or an address of the host is refused in one line naming it; automatic choices
(an overlay's subnet from the pool, the gateway bridge's) skip it."""
from __future__ import annotations

import ipaddress
import json
import subprocess

from lab_fixture import run_cli


def ip(lab, host, *args):
    subprocess.run(["ip", "-n", lab.ns(host), *args], check=True, capture_output=True)


def refused(r, *words):
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    return lines[0]


def test_subnets_overlapping_the_host_are_refused_or_skipped(lab3):
    lab = lab3
    ip(lab, "h1", "route", "add", "198.18.77.0/24", "dev", "eth0")
    ip(lab, "h1", "addr", "add", "198.18.88.1/32", "dev", "eth0")
    ip(lab, "h1", "route", "add", "198.18.0.0/24", "dev", "eth0")    # the overlay pool's first subnet

    r = run_cli(lab, "h1", "network", "create", "-d", "overlay", "--subnet", "198.18.77.0/25", "ov1", check=False)
    refused(r, "subnet 198.18.77.0/25 overlaps 198.18.77.0/24 of a route of this host", "choose another subnet")
    r = run_cli(lab, "h1", "network", "create", "--subnet", "198.18.88.0/24", "br1", check=False)
    refused(r, "overlaps 198.18.88.1/32 of this host's address on eth0", "choose another subnet")
    # Nothing was made by a refusal.
    assert "ov1" not in run_cli(lab, "h1", "network", "ls").stdout

    # Automatic: the pool's first /24 is a route of the leader's host, so the overlay gets the next one.
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
    subnet = json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["IPAM"]["Config"][0]["Subnet"]
    assert subnet == "198.18.1.0/24"

    # The gateway bridge's subnet (from the local pool, 198.19.0.0/16) skips a route of its host.
    ip(lab, "h2", "route", "add", "198.19.0.0/24", "dev", "eth0")
    run_cli(lab, "h2", "run", "-d", "--name", "c", "--network", "ov", "--", "sleep", "1000")
    out = subprocess.run(["ip", "-n", lab.ns("h2"), "-j", "addr", "show", "nw_gwbridge"], capture_output=True,
                         text=True, check=True).stdout
    gw = [a for link in json.loads(out) for a in link["addr_info"] if a["family"] == "inet"][0]
    assert not ipaddress.ip_network(f"{gw['local']}/{gw['prefixlen']}", strict=False).overlaps(
        ipaddress.ip_network("198.19.0.0/24")), gw

    # A swarm's default pool overlapping a route of the host is refused at init.
    run_cli(lab, "h3", "swarm", "leave")
    ip(lab, "h3", "route", "add", "198.18.9.0/24", "dev", "eth0")
    r = run_cli(lab, "h3", "swarm", "init", "--advertise-addr", lab.address("h3"), "--default-addr-pool",
                "198.18.0.0/16", check=False)
    refused(r, "default address pool 198.18.0.0/16 overlaps 198.18.9.0/24 of a route of this host",
            "choose another --default-addr-pool")
    assert json.loads(run_cli(lab, "h3", "info").stdout)["Swarm"]["LocalNodeState"] == "inactive"
