"""Drift (issue 7 item 12): what an operator deletes by hand from a host's overlay data plane is repaired by the
agent's periodic resync within a few seconds, and traffic flows again."""
from __future__ import annotations

import json
import subprocess

from lab_fixture import LogWatch, run_cli, wait_for
from netweft.lab.lab import Lab


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def ping(lab: Lab, host: str, ctr: str, ip: str) -> bool:
    return run_cli(lab, host, "exec", ctr, "--", "ping", "-c1", "-W1", ip, check=False).returncode == 0


def test_hand_deleted_overlay_state_is_repaired(make_lab):
    lab = make_lab(2)
    # An "outside" reachable from h2's host namespace only (TEST-NET-3, no route back): egress needs masquerade.
    outside = f"nwl-{lab.name}-out"
    sh("ip", "netns", "add", outside)
    sh("ip", "-n", lab.ns("h2"), "link", "add", "up0", "type", "veth", "peer", "name", "wan", "netns", outside)
    for ns, dev, addr in ((lab.ns("h2"), "up0", "203.0.113.1/24"), (outside, "wan", "203.0.113.2/24")):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "ov", "--ip", "198.18.0.11", "--", "sleep", "1000")
    run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--ip", "198.18.0.12", "--", "sleep", "1000")
    net_id = json.loads(run_cli(lab, "h2", "network", "inspect", "ov").stdout)[0]["Id"]
    sb = f"--net={lab.host_dir('h2') / 'run' / 'sandboxes' / net_id[:12]}"
    c1 = json.loads(run_cli(lab, "h1", "inspect", "c1").stdout)[0]["NetworkSettings"]["Networks"]["ov"]
    c2 = json.loads(run_cli(lab, "h2", "inspect", "c2").stdout)[0]["NetworkSettings"]["Networks"]["ov"]
    assert ping(lab, "h2", "c2", "198.18.0.11") and ping(lab, "h2", "c2", "203.0.113.2")
    log = LogWatch(lab, "h2")

    def links(*ns: str) -> set[str]:
        return {l["ifname"] for l in json.loads(sh("nsenter", *ns, "ip", "-j", "link"))}

    def flows() -> bool:
        return ping(lab, "h2", "c2", "198.18.0.11")

    def repaired(what: str, present) -> None:
        wait_for(lambda: present() and flows(), timeout=20, what=f"{what} repaired and traffic flowing", interval=0.2)

    # The sandbox's VXLAN device (and with it every remote endpoint).
    sh("nsenter", sb, "ip", "link", "del", "vxlan0")
    repaired("the VXLAN device", lambda: "vxlan0" in links(sb))
    # The sandbox's bridge (its ports fall off).
    sh("nsenter", sb, "ip", "link", "del", "br0")
    repaired("the sandbox bridge", lambda: "br0" in links(sb))
    # The container's veth (its end in the container goes with it).
    sh("nsenter", sb, "ip", "link", "del", c2["HostInterface"])
    repaired("the container's veth", lambda: c2["HostInterface"] in links(sb))
    # A remote endpoint's FDB entry, then its neighbour entry.
    sh("nsenter", sb, "bridge", "fdb", "del", c1["MacAddress"], "dev", "vxlan0", "dst", lab.address("h1"))
    repaired("the FDB entry", lambda: c1["MacAddress"] in sh("nsenter", sb, "bridge", "fdb", "show", "dev", "vxlan0"))
    sh("nsenter", sb, "ip", "neigh", "del", "198.18.0.11", "dev", "vxlan0")
    repaired("the neighbour entry", lambda: "198.18.0.11" in sh("nsenter", sb, "ip", "neigh", "show", "nud",
                                                                  "permanent"))
    # The gateway bridge's masquerade rule: egress stops until it is back.
    host = f"--net={lab.ns_path('h2')}"
    chain = json.loads(sh("nsenter", host, "nft", "-a", "-j", "list", "chain", "inet", "netweft-ov", "postrouting"))
    handle = next(e["rule"]["handle"] for e in chain["nftables"] if "rule" in e)
    sh("nsenter", host, "nft", "delete", "rule", "inet", "netweft-ov", "postrouting", "handle", str(handle))
    wait_for(lambda: "masquerade" in sh("nsenter", host, "nft", "list", "chain", "inet", "netweft-ov", "postrouting")
             and ping(lab, "h2", "c2", "203.0.113.2"), timeout=20, what="the masquerade rule repaired", interval=0.2)
    # Each repair was the resync's doing, and said so in one line.
    assert [e for e in log.entries() if e.get("msg") == "overlays resynced" and e.get("repaired")]
