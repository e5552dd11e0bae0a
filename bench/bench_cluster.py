"""How long `swarm init` and `swarm join` take: the daemon's API call, on a 3-host lab.

Builds a lab without a swarm (h1..h3, own namespaces and daemons), then per round: POST /swarm/init on h1,
POST /swarm/join on h2 and h3 with the worker token (timed one by one), then `swarm leave --force`
everywhere. Prints median, min and max against Docker 20.10's figures on the same kind of machine.
The lab (nwl-bNNNNNN-*, /run/netweft-lab/bNNNNNN) is removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_cluster.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import time

from netweft.lab.lab import Lab

# Docker 20.10 (swarmkit): `docker swarm init` ~0.6 s, `docker swarm join` ~0.15 s of API time.
DOCKER = {"init": 0.6, "join": 0.15}


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def one_round(lab: Lab, hosts: list[str]) -> tuple[float, list[float]]:
    leader, workers = hosts[0], hosts[1:]
    manager = f"{lab.address(leader)}:2377"
    t_init, init = timed(lambda: lab.client(leader).call("POST", "/swarm/init",
                                                         {"AdvertiseAddr": lab.address(leader)}))
    token = init["JoinTokens"]["Worker"]
    joins = []
    for h in workers:
        t, _ = timed(lambda: lab.client(h).call("POST", "/swarm/join", {
            "JoinToken": token, "RemoteAddrs": [manager], "AdvertiseAddr": lab.address(h)}))
        joins.append(t)
    nodes = lab.client(leader).call("GET", "/nodes")
    ready = sorted(n["Description"]["Hostname"] for n in nodes if n["Status"]["State"] == "ready")
    if ready != sorted(hosts):
        raise SystemExit(f"after the joins the leader sees {ready} ready, expected {hosts}")
    for h in [*workers, leader]:
        lab.client(h).call("POST", "/swarm/leave", force=1)
    return t_init, joins


def line(label: str, values: list[float], docker: float) -> str:
    med = statistics.median(values)
    ratio = f"ours/Docker = {med / docker:.3f}" + (f" ({docker / med:.1f}x faster)" if med < docker else "")
    return (f"  {label:<5} median {med * 1000:7.1f} ms   min {min(values) * 1000:7.1f} ms   "
            f"max {max(values) * 1000:7.1f} ms   (n={len(values)})   Docker 20.10: {docker * 1000:.0f} ms   {ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--hosts", type=int, default=3)
    args = p.parse_args()
    if args.rounds < 1 or args.hosts < 2:
        p.error("--rounds must be >= 1 and --hosts >= 2")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally below

    lab = Lab("b" + secrets.token_hex(3))
    try:
        t_up, _ = timed(lambda: lab.up(args.hosts, swarm=False, progress=lambda *a: None))
        hosts = lab.hosts()
        print(f"lab {lab.name}: {len(hosts)} hosts, daemons up in {t_up:.1f} s; {args.rounds} rounds of "
              f"init on {hosts[0]} + join of {', '.join(hosts[1:])} (API call time), leave --force between")
        one_round(lab, hosts)  # warm-up: imports, first key generation, page cache
        inits, joins = [], []
        for _ in range(args.rounds):
            t_init, t_joins = one_round(lab, hosts)
            inits.append(t_init)
            joins.extend(t_joins)
        print(line("init", inits, DOCKER["init"]))
        print(line("join", joins, DOCKER["join"]))
    finally:
        lab.down(quiet=True)


if __name__ == "__main__":
    main()
