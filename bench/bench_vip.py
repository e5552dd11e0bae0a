"""Service VIPs: added latency against a direct task IP, `service scale` until every task answers through
the VIP, and how soon a killed task is gone from every host's VIP and from DNS.

A 3-host lab, an attachable overlay, service `web` (3 tasks answering each TCP connection with their
hostname) and client containers on h1 and h3. Per round:
  - latency: LOOPS connect+read+close cycles from the h1 client to one task's own IP, then to the VIP
    (interleaved); median per connection and the difference;
  - scale: `service scale web=6` (no wait), then connections through the VIP until all 6 tasks answered;
    then back to 3;
  - kill: stop the task container on h2; time from its exit until the VIP map in the clients' namespaces on h1 and h3
    and the answer to tasks.web on h1 no longer hold its address (polled every 10 ms).
Medians over the rounds are printed. The lab is removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_vip.py [--rounds 3] [--loops 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _lab import Bench, in_pid_netns  # noqa: E402

SERVER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80)); s.listen(128)\nwhile True:\n"
          "    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")
LATENCY = ("import socket, sys, time, statistics\nts = []\nfor i in range(int(sys.argv[2])):\n"
           "    t = time.perf_counter(); c = socket.create_connection((sys.argv[1], 80), timeout=2); c.recv(100)\n"
           "    c.close(); ts.append(time.perf_counter() - t)\nprint(statistics.median(ts))")
SEEN = ("import socket, sys, time\nwant = int(sys.argv[2]); seen = set(); t0 = time.perf_counter()\n"
        "while len(seen) < want and time.perf_counter() - t0 < 60:\n    try:\n"
        "        c = socket.create_connection((sys.argv[1], 80), timeout=1); seen.add(c.recv(100)); c.close()\n"
        "    except OSError:\n        time.sleep(0.01)\nprint(time.perf_counter() - t0, len(seen))")


def cli(lab, host, *args, timeout=120) -> str:
    argv, env = lab.exec_argv(host, ["netweft", *args])
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=timeout).stdout


def py(pid: int, code: str, *args: str) -> str:
    return subprocess.run(in_pid_netns(pid, [sys.executable, "-c", code, *args]), check=True, capture_output=True,
                          text=True, timeout=120).stdout


def running(lab) -> list[dict]:
    return [t for t in lab.client("h1").call("GET", "/tasks", service="web")
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]


def vip_backends(pid: int) -> str:
    return subprocess.run(in_pid_netns(pid, ["nft", "list", "table", "ip", "netweft-lb"]), capture_output=True,
                          text=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loops", type=int, default=300)
    a = p.parse_args()
    with Bench() as b:
        lab = b.lab(3)
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
        cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "3", "--network", "ov", "-q", "--",
            sys.executable, "-c", SERVER)
        pids = {}
        for h in ("h1", "h3"):
            cli(lab, h, "run", "-d", "--name", f"cli{h}", "--network", "ov", "--", "sleep", "infinity")
            pids[h] = json.loads(cli(lab, h, "inspect", f"cli{h}"))[0]["State"]["Pid"]
        view = json.loads(cli(lab, "h1", "service", "inspect", "web"))[0]
        vip = view["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]
        direct, via, scale, gone_vip, gone_dns = [], [], [], [], []
        for r in range(a.rounds):
            task = running(lab)[0]["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            d = float(py(pids["h1"], LATENCY, task, str(a.loops)))
            v = float(py(pids["h1"], LATENCY, vip, str(a.loops)))
            direct.append(d * 1e6)
            via.append(v * 1e6)
            t0 = time.perf_counter()
            cli(lab, "h1", "service", "scale", "-d", "web=6")
            out = py(pids["h1"], SEEN, vip, "6").split()
            if int(out[1]) != 6:
                raise SystemExit(f"after scaling to 6, only {out[1]} tasks answered through the VIP")
            scale.append(time.perf_counter() - t0)
            cli(lab, "h1", "service", "scale", "web=3")
            victim = next(t for t in running(lab) if t["Node"] == "h2")
            ip = victim["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            cli(lab, "h2", "stop", "-t", "0", victim["Name"])   # returns once the task's process is gone
            t0 = time.perf_counter()
            t_vip = t_dns = None
            while (t_vip is None or t_dns is None) and time.perf_counter() - t0 < 30:
                now = time.perf_counter() - t0
                if t_vip is None and all(ip + "," not in vip_backends(pid).replace(" }", ",")
                                         for pid in pids.values()):
                    t_vip = now
                if t_dns is None:
                    dns = subprocess.run(in_pid_netns(pids["h1"], ["getent", "ahostsv4", "tasks.web"]),
                                         capture_output=True, text=True).stdout
                    t_dns = now if ip not in dns.split() else None
                time.sleep(0.01)
            gone_vip.append(t_vip if t_vip is not None else float("nan"))
            gone_dns.append(t_dns if t_dns is not None else float("nan"))
            print(f"  round {r + 1}: direct {direct[-1]:.0f} µs, via VIP {via[-1]:.0f} µs per connection; "
                  f"scale 3->6 reachable in {scale[-1]:.2f} s; killed task out of VIPs (h1, h3) after "
                  f"{gone_vip[-1]:.2f} s, out of DNS after {gone_dns[-1]:.2f} s")
            cli(lab, "h1", "service", "scale", "web=3")
        md, mv = statistics.median(direct), statistics.median(via)
        print(f"VIP: median per connection {mv:.0f} µs vs {md:.0f} µs direct (added {mv - md:+.0f} µs); "
              f"scale 3->6 all reachable through the VIP in {statistics.median(scale):.2f} s; a killed task "
              f"left every VIP in {statistics.median(gone_vip):.2f} s and DNS in {statistics.median(gone_dns):.2f} s "
              f"(goal <= 1 s); {a.rounds} rounds")


if __name__ == "__main__":
    main()
