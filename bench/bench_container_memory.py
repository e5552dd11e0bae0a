"""Memory a container costs beyond its own process: netweft beside Docker 20.10, same run, same machine.

netweft: a 1-host lab (no swarm), a bridge network, N containers `sleep` through the API. Counted: the daemon's
growth and the host's container supervisor (whole: it exists for the containers), as PSS.
Docker: a dockerd in its own namespace, a busybox image made from the host's busybox, a bridge network, N
`docker run -d`. Counted: dockerd + containerd growth and every containerd-shim (whole), as PSS.
Both: the containers' own processes (sleep) are not counted. Then everything is removed and the daemon's
PSS after removal is printed (is memory given back?).

    sudo .venv/bin/python bench/bench_container_memory.py [--containers 100] [--no-docker]
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _docker import Dockerd, import_busybox  # noqa: E402
from _lab import Bench, children, daemon_pid  # noqa: E402

from netweft.lab.lab import Lab  # noqa: E402

MIB = 1024.0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_with(text: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def netweft_figures(b: Bench, n: int) -> dict:
    lab = Lab("m" + secrets.token_hex(3))
    b.labs.append(lab)
    lab.up(1, swarm=False, progress=lambda *a: None)
    c = lab.client("h1")
    c.call("POST", "/networks/create", {"Name": "memnet", "Driver": "bridge"})

    def run(name):
        c.call("POST", "/containers/create", {"Name": name, "NetworkMode": "memnet", "Cmd": ["sleep", "100000"]})
    run("warm")           # starts the supervisor, warms the daemon's paths
    c.call("DELETE", "/containers/warm", force=1)
    dpid = daemon_pid(lab, "h1")
    sup_pid = int((lab.host_dir("h1") / "run" / "supervisor.sock.pid").read_text())
    time.sleep(0.5)
    d0, s0 = pss_kib(dpid), pss_kib(sup_pid)
    for i in range(n):
        run(f"m{i}")
    time.sleep(0.5)
    d1, s1 = pss_kib(dpid), pss_kib(sup_pid)
    for i in range(n):
        c.call("DELETE", f"/containers/m{i}", force=1)
    time.sleep(0.5)
    d2 = pss_kib(dpid)
    return {"daemon before": d0, "daemon with": d1, "daemon after rm": d2, "helpers before": s0, "helpers with": s1,
            "helper processes": 1}


def docker_figures(n: int) -> dict:
    d = Dockerd()
    try:
        d.start()
        image = import_busybox(d)
        d.cli("network", "create", "memnet")
        d.cli("run", "-d", "--name", "warm", "--network", "memnet", image, "sleep", "100000")
        d.cli("rm", "-f", "warm")
        dockerd = d.proc.pid
        daemons = [dockerd, *children(dockerd)]   # dockerd and its containerd
        root = str(d.root)

        def shims() -> list[int]:
            return [p for p in pids_with("containerd-shim") if root in open(f"/proc/{p}/cmdline").read()]
        time.sleep(0.5)
        d0 = sum(pss_kib(p) for p in daemons)
        for i in range(n):
            d.cli("run", "-d", "--name", f"m{i}", "--network", "memnet", image, "sleep", "100000")
        time.sleep(0.5)
        d1 = sum(pss_kib(p) for p in daemons)
        sh = shims()
        s1 = sum(pss_kib(p) for p in sh)
        d.cli("rm", "-f", *[f"m{i}" for i in range(n)], timeout=600)
        time.sleep(0.5)
        d2 = sum(pss_kib(p) for p in daemons)
        return {"daemon before": d0, "daemon with": d1, "daemon after rm": d2, "helpers before": 0,
                "helpers with": s1, "helper processes": len(sh)}
    finally:
        d.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--containers", type=int, default=100)
    p.add_argument("--no-docker", action="store_true")
    args = p.parse_args()
    n = args.containers
    results = {}
    with Bench() as b:
        results["netweft"] = netweft_figures(b, n)
    if not args.no_docker:
        results["docker 20.10"] = docker_figures(n)
    print(f"Memory beyond the containers' own processes, {n} containers on a bridge network (PSS, MiB)")
    print(f"  {'':<14}{'daemon idle':>12}{'daemon +N':>11}{'helpers':>22}{'per container':>15}{'daemon after rm':>17}")
    for tool, r in results.items():
        growth = r["daemon with"] - r["daemon before"]
        per = (growth + r["helpers with"]) / n / MIB
        helpers = f"{r['helpers with'] / MIB:.1f} ({r['helper processes']} proc)"
        print(f"  {tool:<14}{r['daemon before'] / MIB:>12.1f}{growth / MIB:>11.1f}{helpers:>22}{per:>15.2f}"
              f"{r['daemon after rm'] / MIB:>17.1f}")
    print("  per container = (daemon growth + helper processes) / N; netweft's helper: the host's one supervisor; "
          "Docker's: one containerd-shim per container")


if __name__ == "__main__":
    main()
