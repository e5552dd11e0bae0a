"""`make demo`: the management-network scenario of an OpenStack control plane, then teardown.

A simulated host (a lab of one), a bridge network `mgmt`, three containers with the hostnames
and addresses of the network plan, every pair pinged, printed as a short report.
"""
from __future__ import annotations

import subprocess
import sys
import time

from netweft.lab.lab import Lab
from netweft.runtime.container import exec_argv

PLAN = [("controller01", "198.18.0.11"), ("compute01", "198.18.0.21"), ("storage01", "198.18.0.31")]


def say(text: str = "") -> None:
    print(text, flush=True)


def main() -> int:
    lab = Lab("demo")
    if lab.exists():
        lab.down(quiet=True)
    say("netweft demo: an OpenStack management network on one host")
    say("=" * 60)
    ok = True
    try:
        lab.up(1, swarm=False, progress=lambda m: say("  " + m))
        c = lab.client("h1")
        t0 = time.monotonic()
        c.call("POST", "/networks/create", {"Name": "mgmt", "Driver": "bridge", "Labels": {"plan": "openstack"},
                                             "IPAM": {"Config": [{"Subnet": "198.18.0.0/24",
                                                                  "Gateway": "198.18.0.1"}]}})
        say(f"\nnetwork mgmt: bridge, 198.18.0.0/24, gateway 198.18.0.1 ({(time.monotonic() - t0) * 1000:.0f} ms)")
        pids = {}
        for name, ip in PLAN:
            t0 = time.monotonic()
            ctr = c.call("POST", "/containers/create", {"Name": name, "Hostname": name, "NetworkMode": "mgmt",
                                                         "IPAddress": ip, "Cmd": ["sleep", "3600"]})
            pids[name] = ctr["State"]["Pid"]
            say(f"  container {name:<13} {ip:<12} started in {(time.monotonic() - t0) * 1000:.0f} ms")
        say("\nwho am I (hostname inside each container):")
        for name, _ in PLAN:
            argv = exec_argv(pids[name], ["hostname"])
            got = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
            mark = "ok" if got == name else "WRONG"
            ok &= got == name
            say(f"  {name:<13} -> {got:<13} {mark}")
        say("\nreachability (ping by address):")
        for src, _ in PLAN:
            for dst, ip in PLAN:
                if src == dst:
                    continue
                r = subprocess.run(exec_argv(pids[src], ["ping", "-c1", "-w3", ip]), capture_output=True, text=True)
                rtt = next((l.split("time=")[1] for l in r.stdout.splitlines() if "time=" in l), "")
                ok &= r.returncode == 0
                say(f"  {src:<13} -> {dst:<13} {ip:<12} {'ok ' + rtt if r.returncode == 0 else 'FAILED'}")
        nets = c.call("GET", "/networks/mgmt")
        say(f"\nnetwork inspect mgmt: {len(nets['Containers'])} containers: " +
            ", ".join(f"{v['Name']}={v['IPv4Address']}" for v in nets["Containers"].values()))
    finally:
        say("\nteardown:")
        result = lab.down(quiet=True)
        say(f"  removed {result['processes']} processes, {result['namespaces']} namespaces, "
            f"{result['mounts']} namespace mounts")
    say("\nresult: " + ("all containers reachable with their planned names and addresses" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
