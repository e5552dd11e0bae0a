"""Service VIPs without IPVS on 3 hosts: 300 connections spread over 3 tasks (100 ± 20 each); a killed
task stops getting connections and is replaced; the service name is the VIP, dnsrr has none."""
from __future__ import annotations

import collections
import json

from lab_fixture import run_cli, wait_for

# A task: answers each TCP connection on port 80 with its hostname (its container's short ID).
SERVER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80)); s.listen(128)\nwhile True:\n"
          "    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")
CLIENT = ("import socket, collections, sys, json\nn = collections.Counter()\n"
          "for i in range(int(sys.argv[2])):\n    try:\n"
          "        c = socket.create_connection((sys.argv[1], 80), timeout=2); n[c.recv(100).decode()] += 1; c.close()\n"
          "    except OSError as e:\n        n['error ' + type(e).__name__] += 1\nprint(json.dumps(n))")


def connect(lab, target: str, n: int) -> collections.Counter:
    r = run_cli(lab, "h1", "exec", "cli", "--", "python3", "-c", CLIENT, target, str(n), timeout=120)
    return collections.Counter(json.loads(r.stdout))


def hostnames(lab) -> dict[str, str]:
    """Task ID -> its container's hostname, for the running tasks of web."""
    out = {}
    for t in lab.client("h1").call("GET", "/tasks", service="web"):
        if t["DesiredState"] == "running" and t["Status"]["State"] == "running":
            out[t["ID"]] = t["Status"]["ContainerStatus"]["ContainerID"][:12]
    return out


def test_vip_spreads_connections_and_drops_a_killed_task(lab3):
    lab = lab3
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
    run_cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "3", "--network", "ov", "--",
            "python3", "-c", SERVER, timeout=180)
    run_cli(lab, "h1", "service", "create", "--name", "rr", "--endpoint-mode", "dnsrr", "--network", "ov", "-d",
            "--", "sleep", "infinity")
    run_cli(lab, "h1", "run", "-d", "--name", "cli", "--network", "ov", "--", "sleep", "infinity")
    web = json.loads(run_cli(lab, "h1", "service", "inspect", "web").stdout)[0]
    vips = web["Endpoint"]["VirtualIPs"]
    assert len(vips) == 1 and vips[0]["NetworkID"] == web["Spec"]["TaskTemplate"]["Networks"][0]["Target"]
    vip = vips[0]["Addr"].split("/")[0]
    assert json.loads(run_cli(lab, "h1", "service", "inspect", "rr").stdout)[0]["Endpoint"]["VirtualIPs"] == []
    got = run_cli(lab, "h1", "exec", "cli", "--", "getent", "ahostsv4", "web").stdout.split()
    assert got[0] == vip                                          # the service name is its VIP

    tasks = hostnames(lab)
    assert sorted(t["Node"] for t in lab.client("h1").call("GET", "/tasks", service="web")) == ["h1", "h2", "h3"]
    wait_for(lambda: sum(connect(lab, vip, 6).get(h, 0) > 0 for h in tasks.values()) == 3, 30,
             "the VIP reaching every task")
    counts = connect(lab, "web", 300)
    assert sorted(counts) == sorted(tasks.values()), counts     # no errors, only our tasks
    assert all(80 <= counts[h] <= 120 for h in tasks.values()), counts

    # Kill the task on h2: no connection reaches it any more, and a new task takes its place.
    victim = next(t for t in lab.client("h1").call("GET", "/tasks", service="web") if t["Node"] == "h2")
    run_cli(lab, "h2", "stop", "-t", "0", victim["Name"])
    dead = tasks[victim["ID"]]
    wait_for(lambda: dead not in connect(lab, vip, 30), 30, "the killed task out of the VIP")
    wait_for(lambda: len(hostnames(lab)) == 3 and victim["ID"] not in hostnames(lab), 30, "a replacement task")
    now = hostnames(lab)
    wait_for(lambda: set(connect(lab, vip, 30)) == set(now.values()), 30, "the VIP reaching the new task")
    counts = connect(lab, vip, 60)
    assert dead not in counts and not any(k.startswith("error") for k in counts), counts
