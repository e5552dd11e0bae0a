"""Overlay throughput, netweft beside Docker's swarm overlay, in one run.

iperf3 TCP, container -> container across two simulated hosts (overlay) and host -> host (underlay), for
netweft (a 2-host lab) and for Docker 20.10 swarm (../shared/peers/docker-swarm-baseline.sh: its setup,
daemons, image, swarm and measure steps build pa-c1 on pa-h1 and pa-c2 on pa-h2; its cleanup step removes
all of it). Every iperf3 server, Docker's included, is started by this bench in the right namespace. Each round runs every case once, the order rotating, so drift on a shared
machine hits all alike. Prints single-stream and multi-stream (-P) medians, overlay/underlay ratios and
netweft/Docker.

iperf3 runs pinned (client CPU 0, server CPU 1) at SCHED_FIFO priority 10 unless --no-rt: single-stream
iperf3 on 2 cores is CPU-bound and the other work on a shared machine otherwise makes rounds differ by 2x.
The same for every case.

    sudo .venv/bin/python bench/bench_throughput.py [--rounds N] [--seconds S] [--streams P] [--no-docker]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import Bench, in_host, in_pid_netns, iperf, iperf_server, median  # noqa: E402
from bench_overlay import create_ctr, create_overlay, wait_neigh, wait_sandboxes  # noqa: E402

DOCKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "peers",
                             "docker-swarm-baseline.sh")
PORT = 5299


def docker_script() -> str:
    for p in (DOCKER_SCRIPT, "/work/shared/peers/docker-swarm-baseline.sh"):
        if os.path.exists(p):
            return os.path.abspath(p)
    raise SystemExit("docker-swarm-baseline.sh not found (../shared/peers/); use --no-docker")


class DockerSwarm:
    """The reference script's swarm with pa-c1 (pa-h1) and pa-c2 (pa-h2, iperf3 -s on 5201)."""

    def __init__(self, script: str):
        self.script = script
        self.env = {**os.environ, "IPERF_T": "1"}

    def step(self, name: str) -> None:
        r = subprocess.run(["bash", self.script, name], env=self.env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"docker baseline step {name} failed: {(r.stderr or r.stdout)[-600:]}")

    def up(self) -> None:
        if any(line.split()[0] in ("pa-h1", "pa-h2", "pa-h3", "pa-ul")
               for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
               if line.strip()):
            raise SystemExit("pa-* namespaces exist (another Docker baseline run?); not touching them")
        for s in ("setup", "daemons", "image", "swarm", "measure"):
            self.step(s)
        self.c1, self.c2 = self.pid(1, "pa-c1"), self.pid(2, "pa-c2")

    @staticmethod
    def pid(host: int, name: str) -> int:
        sock = f"unix://{os.environ.get('PA_DIR', '/tmp/pa')}/h{host}/docker.sock"
        return int(subprocess.run(["/usr/bin/docker", "-H", sock, "inspect", "-f", "{{.State.Pid}}", name],
                                  env={**os.environ, "DOCKER_API_VERSION": "1.41"},
                                  capture_output=True, text=True, check=True).stdout.strip())

    def down(self) -> None:
        self.step("cleanup")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=4, help="parallel streams of the multi-stream case")
    ap.add_argument("--multi-rounds", type=int, default=3)
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--no-rt", action="store_true", help="do not pin iperf3 or raise its priority")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces)")
    rt = not args.no_rt
    import netweft
    print(f"bench_throughput rounds={args.rounds} seconds={args.seconds} streams={args.streams} rt={rt}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, kernel {os.uname().release}; "
          f"netweft from {os.path.dirname(os.path.dirname(os.path.abspath(netweft.__file__)))}")
    docker = None if args.no_docker else DockerSwarm(docker_script())
    with Bench() as b:
        try:
            lab = b.lab(2)
            net_id = create_overlay(lab)
            pids = {k: create_ctr(lab, f"h{k}", f"c{k}", f"198.18.0.1{k}")["State"]["Pid"] for k in (1, 2)}
            wait_sandboxes(lab, ["h1", "h2"], net_id)
            wait_neigh(lab, "h1", net_id, {"198.18.0.12"})
            wait_neigh(lab, "h2", net_id, {"198.18.0.11"})
            b.spawn(iperf_server(in_pid_netns(pids[2], ["iperf3", "-s", "-p", str(PORT)]), rt), lab=lab)
            b.spawn(iperf_server(in_host(lab, "h2", ["iperf3", "-s", "-p", str(PORT)]), rt), lab=lab)
            cases = {
                "netweft overlay": in_pid_netns(pids[1], ["iperf3", "-p", str(PORT), "-c", "198.18.0.12"]),
                "netweft underlay": in_host(lab, "h1", ["iperf3", "-p", str(PORT), "-c", lab.address("h2")]),
            }
            if docker is not None:
                print("starting Docker's swarm (docker-swarm-baseline.sh setup..measure) ...", flush=True)
                docker.up()
                # Servers like netweft's (pa-c2's own `iperf3 -s` runs unpinned in its cgroup): in pa-c2's
                # namespace and in pa-h2. The cleanup step ends them with the namespaces.
                b.spawn(iperf_server(in_pid_netns(docker.c2, ["iperf3", "-s", "-p", str(PORT)]), rt))
                b.spawn(iperf_server(["nsenter", "--net=/run/netns/pa-h2", "iperf3", "-s", "-B", "192.0.2.2",
                                "-p", str(PORT)], rt))
                cases["docker overlay"] = in_pid_netns(docker.c1, ["iperf3", "-p", str(PORT), "-c", "198.18.10.12"])
                cases["docker underlay"] = ["nsenter", "--net=/run/netns/pa-h1", "iperf3", "-p", str(PORT),
                                            "-c", "192.0.2.2"]
            time.sleep(0.5)
            results = {}
            for streams, rounds in ((1, args.rounds), (args.streams, args.multi_rounds)):
                print(f"\niperf3 TCP, {streams} stream(s), {rounds} rounds x {args.seconds} s (+1 s omitted)")
                got: dict[str, list[float]] = {k: [] for k in cases}
                names = list(cases)
                for r in range(rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for k in order:
                        got[k].append(iperf(cases[k], args.seconds, streams, rt))
                    print(f"  round {r + 1}: " + "  ".join(f"{k} {got[k][-1]:5.2f}" for k in names), flush=True)
                results[streams] = {k: median(v) for k, v in got.items()}
            if docker is not None:
                docker.down()
                docker = None
        finally:
            if docker is not None:
                docker.down()
    print("\nmedians, Gbit/s")
    for streams, m in results.items():
        line = f"  {streams} stream(s): " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
        print(line)
        nw = m["netweft overlay"] / m["netweft underlay"]
        text = f"    netweft overlay/underlay {nw:.3f}"
        if "docker overlay" in m:
            dk = m["docker overlay"] / m["docker underlay"]
            text += (f"; docker overlay/underlay {dk:.3f}; netweft overlay / docker overlay "
                     f"{m['netweft overlay'] / m['docker overlay']:.3f}")
        print(text)
    one = results[1]
    print(f"\ngoal (single stream): netweft overlay/underlay >= 0.85: "
          f"{'yes' if one['netweft overlay'] / one['netweft underlay'] >= 0.85 else 'NO'}"
          + (f"; netweft/docker overlay >= 1.15: "
             f"{'yes' if one['netweft overlay'] / one['docker overlay'] >= 1.15 else 'NO'}"
             if "docker overlay" in one else ""))


if __name__ == "__main__":
    main()
