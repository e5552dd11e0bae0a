"""The routing mesh's added latency: a client outside the cluster (a namespace on the lab's underlay)
connecting to a published port, against the nearest thing to a direct connection it has.

A 3-host lab; service `web` (2 tasks, on h1 and h2, each answering a TCP connection with its hostname)
published twice: port 8080 in ingress mode (the mesh) and port 9090 in host mode (the host DNATs straight
to its own task). Per round, LOOPS connect+read+close cycles from outside to: h1:9090 (host mode, one
DNAT: the baseline), h1:8080 (mesh through a host with a task), h3:8080 (mesh through a host without
one: always a hop over the overlay); and, for reference, from a container on the overlay to a task's IP.
Medians per connection. The lab (and the outside namespace, nwl-<lab>-out) is removed at the end.

    sudo .venv/bin/python bench/bench_mesh.py [--rounds 3] [--loops 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _lab import Bench, in_pid_netns  # noqa: E402
from bench_vip import LATENCY, SERVER, cli, running  # noqa: E402

LAT_PORT = LATENCY.replace("(sys.argv[1], 80)", "(sys.argv[1], int(sys.argv[3]))")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loops", type=int, default=300)
    a = p.parse_args()
    with Bench() as b:
        lab = b.lab(3)
        out = f"/run/netns/{lab.ns('out')}"
        subprocess.run(["ip", "netns", "add", lab.ns("out")], check=True)
        subprocess.run(["ip", "-n", lab.ns("sw"), "link", "add", "nwbo0", "type", "veth", "peer", "name", "eth0",
                        "netns", lab.ns("out")], check=True)
        subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", "nwbo0", "master", "ul", "up"], check=True)
        for args in (["addr", "add", "192.0.2.200/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", lab.ns("out"), *args], check=True)
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
        cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "2", "--network", "ov", "--constraint",
            "node.hostname!=h3", "--publish", "published=8080,target=80", "--publish",
            "published=9090,target=80,mode=host", "-q", "--", sys.executable, "-c", SERVER)
        cli(lab, "h1", "run", "-d", "--name", "c", "--network", "ov", "--", "sleep", "infinity")
        pid = json.loads(cli(lab, "h1", "inspect", "c"))[0]["State"]["Pid"]
        task_ip = next(x for t in running(lab) for x in (a_["Addresses"][0].split("/")[0]
                       for a_ in t["NetworksAttachments"] if not a_["Addresses"][0].startswith("198.18.255.")))

        def outside(ip: str, port: int) -> float:
            r = subprocess.run(["nsenter", f"--net={out}", sys.executable, "-c", LAT_PORT, ip, str(a.loops),
                                str(port)], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise SystemExit(f"connections to {ip}:{port} failed: {r.stderr.strip()[-300:]}")
            return float(r.stdout) * 1e6

        h1, h3 = lab.address("h1"), lab.address("h3")
        outside(h1, 8080), outside(h3, 8080), outside(h1, 9090)   # warm up (and fail early)
        res: dict[str, list[float]] = {"host mode h1:9090": [], "mesh h1:8080": [], "mesh h3:8080 (no task)": [],
                                       "container -> task IP": []}
        for r in range(a.rounds):
            res["host mode h1:9090"].append(outside(h1, 9090))
            res["mesh h1:8080"].append(outside(h1, 8080))
            res["mesh h3:8080 (no task)"].append(outside(h3, 8080))
            direct = subprocess.run(in_pid_netns(pid, [sys.executable, "-c", LATENCY, task_ip, str(a.loops)]),
                                    capture_output=True, text=True, check=True).stdout
            res["container -> task IP"].append(float(direct) * 1e6)
            print("  round", r + 1, ", ".join(f"{k} {v[-1]:.0f} µs" for k, v in res.items()))
        base = statistics.median(res["host mode h1:9090"])
        print("routing mesh, median per connection from outside: " + "; ".join(
            f"{k} {statistics.median(v):.0f} µs" + (f" ({statistics.median(v) - base:+.0f} µs vs host mode)"
                                                     if k.startswith("mesh") else "")
            for k, v in res.items()) + f"; {a.rounds} rounds of {a.loops}")


if __name__ == "__main__":
    main()
