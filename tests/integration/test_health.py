"""Live data-path health and dead hosts (issue 13, items 2 and 8), on one 3-host lab shared by the module:
h1 leader, h2 and h3 workers, one overlay with a container on each host.

- UDP of the data path blocked at h3: health turns unreachable on both sides, named in words, and healthy
  again once unblocked;
- h3 cut off from the managers only (TCP 2377): Down for the managers, but its data path works, so it keeps
  every endpoint and its containers keep talking;
- h3 killed (daemon killed, its underlay link down): its endpoints leave every other host's peer tables
  within 10 s of both signals (the time measured is printed; the bound itself is checked by polling).

The tests run in this order and each restores what it changed, but the last one kills h3.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from lab_fixture import LogWatch, build_lab, node_table, run_cli, wait_for
from netweft.lab.lab import Lab

SUBNET = "198.18.0.0/24"
IPS = {"h1": "198.18.0.11", "h2": "198.18.0.12", "h3": "198.18.0.13"}


@pytest.fixture(scope="module")
def lab():
    lab = build_lab(3)
    try:
        run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", SUBNET, "ov")
        for h, ip in IPS.items():
            run_cli(lab, h, "run", "-d", "--name", f"c{h[1]}", "--network", "ov", "--ip", ip, "--", "sleep", "1000")
        yield lab
    finally:
        lab.down(quiet=True)


def nft(lab: Lab, host: str, script: str) -> None:
    subprocess.run(["nsenter", f"--net={lab.ns_path(host)}", "nft", script], check=True, capture_output=True)


def block(lab: Lab, host: str, rule: str) -> None:
    nft(lab, host, "add table inet nwtblock; add chain inet nwtblock in { type filter hook input priority -10; }; "
                   f"add chain inet nwtblock out {{ type filter hook output priority -10; }}; {rule}")


def unblock(lab: Lab, host: str) -> None:
    subprocess.run(["nsenter", f"--net={lab.ns_path(host)}", "nft", "delete table inet nwtblock"],
                   capture_output=True)


def peer_health(lab: Lab, host: str, peer: str) -> dict:
    view = json.loads(run_cli(lab, host, "network", "inspect", "ov").stdout)[0]
    return next((p.get("Health") or {} for p in view["Peers"] if p["Name"] == peer), {})


def health_column(lab: Lab, host: str) -> str:
    return next(r["HEALTH"] for r in node_table(lab, "h1") if r["HOSTNAME"] == host)


def sandbox_vteps(lab: Lab, host: str) -> set[str]:
    """The VTEPs in the FDB of `host`'s sandbox of the overlay: the hosts it sends to."""
    nid = json.loads(run_cli(lab, host, "network", "inspect", "ov").stdout)[0]["Id"]
    path = str(lab.host_dir(host) / "run" / "sandboxes" / nid[:12])
    out = subprocess.run(["nsenter", f"--net={path}", "bridge", "-j", "fdb", "show", "dev", "vxlan0"],
                         capture_output=True, text=True).stdout
    return {e["dst"] for e in json.loads(out or "[]") if e.get("dst")}


def ping(lab: Lab, host: str, ip: str) -> bool:
    return run_cli(lab, host, "exec", f"c{host[1]}", "--", "ping", "-c1", "-w2", ip, check=False).returncode == 0


def test_health_turns_unreachable_when_the_data_path_is_blocked_and_healthy_after(lab):
    wait_for(lambda: peer_health(lab, "h2", "h3").get("State") == "healthy", 20, "h2 sees h3 healthy")
    wait_for(lambda: health_column(lab, "h3") == "Healthy", 15, "node ls shows h3 healthy")
    logs = LogWatch(lab, "h2")
    block(lab, "h3", "add rule inet nwtblock in udp dport 4789 drop")
    try:
        t0 = time.monotonic()
        h = wait_for(lambda: (p := peer_health(lab, "h2", "h3")).get("State") == "unreachable" and p, 20,
                     "h2 sees h3 unreachable")
        print(f"\nunreachable seen by h2 {time.monotonic() - t0:.1f} s after blocking UDP 4789 at h3")
        assert "UDP 4789" in h["Reason"] and "blocked" in h["Reason"], h
        wait_for(lambda: health_column(lab, "h3") == "Unreachable", 15, "node ls shows h3 unreachable")
        line = logs.wait(lambda e: "data path to h3" in e.get("msg", "") and "unreachable" in e["msg"], 10)
        assert "UDP 4789" in line["msg"]
        # The managers see h3 up: nothing is withdrawn for a blocked path alone.
        assert "withdrawn" not in health_column(lab, "h3")
    finally:
        unblock(lab, "h3")
    t0 = time.monotonic()
    wait_for(lambda: peer_health(lab, "h2", "h3").get("State") == "healthy", 20, "h2 sees h3 healthy again")
    print(f"healthy again {time.monotonic() - t0:.1f} s after unblocking")
    wait_for(lambda: health_column(lab, "h3") == "Healthy", 15, "node ls shows h3 healthy again")
    time.sleep(2)
    changes = [e["msg"] for e in logs.entries() if "data path to h3" in e.get("msg", "")]
    assert sum("unreachable" in m for m in changes) == 1, changes   # a change is logged once
    assert ping(lab, "h2", IPS["h3"])


def test_a_host_cut_off_from_the_managers_only_keeps_its_endpoints(lab):
    h3 = lab.address("h3")
    block(lab, "h3", "add rule inet nwtblock out tcp dport 2377 drop")
    try:
        wait_for(lambda: next(r["STATUS"] for r in node_table(lab, "h1") if r["HOSTNAME"] == "h3") == "Down",
                 20, "h3 down for the managers")
        # Down, but its data path works: well past the time a withdrawal would take, it keeps everything.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for host in ("h1", "h2"):
                assert h3 in sandbox_vteps(lab, host), f"h3's endpoints left {host}'s peer tables"
            time.sleep(0.5)
        assert "withdrawn" not in health_column(lab, "h3")
        assert ping(lab, "h2", IPS["h3"]) and ping(lab, "h3", IPS["h1"])
    finally:
        unblock(lab, "h3")
    wait_for(lambda: next(r["STATUS"] for r in node_table(lab, "h1") if r["HOSTNAME"] == "h3") == "Ready",
             20, "h3 ready again")


def test_a_killed_host_is_withdrawn_from_every_host_within_10_s_of_both_signals(lab):
    h3 = lab.address("h3")
    for host in ("h1", "h2"):
        assert h3 in sandbox_vteps(lab, host)
    # The host dies: its daemon is killed and its underlay link goes down.
    pid = int((lab.host_dir("h3") / "netweftd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", "h3", "down"], check=True)
    t_kill = time.monotonic()

    def both_signals():
        rows = {r["HOSTNAME"]: r for r in node_table(lab, "h1")}
        return rows["h3"]["STATUS"] == "Down" and rows["h3"]["HEALTH"].startswith("Unreachable")
    wait_for(both_signals, 30, "h3 down and unreachable")
    t_both = time.monotonic()
    gone = {}
    while len(gone) < 2:
        for host in ("h1", "h2"):
            if host not in gone and h3 not in sandbox_vteps(lab, host):
                gone[host] = time.monotonic()
        assert time.monotonic() - t_both < 10, f"h3's endpoints still in the peer tables of " \
                                               f"{sorted({'h1', 'h2'} - set(gone))} 10 s after both signals"
        time.sleep(0.1)
    print(f"\nboth signals seen {t_both - t_kill:.1f} s after the kill; endpoints gone "
          + ", ".join(f"from {h} {t - t_both:+.1f} s" for h, t in sorted(gone.items())) + " after both signals")
    assert "withdrawn" in health_column(lab, "h3")
    assert ping(lab, "h1", IPS["h2"])   # the others keep talking
