"""How fast remote endpoints (FDB + permanent neighbour pairs) are programmed into an overlay sandbox.

Batched hand-packed netlink (netweft.dataplane.nlbatch, what Overlay.add_peers uses) on 10,000 endpoints
against plain pyroute2 calls on 1,000 (to keep it short); median of 5 runs each. Runs in its own
namespaces (nwt-bench-*, /tmp/nwt-bench-*), removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_fdb_rate.py [--runs 5] [--endpoints 10000] [--pyroute2-endpoints 1000]
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute

from netweft.dataplane import netns
from netweft.dataplane.overlay import Overlay, Peer
from netweft.lab.cleanup import clean

LOCAL_IP = "192.0.2.1"


def make_peers(n: int, seed: int) -> list[Peer]:
    """n endpoints: 198.18.0.0/15 addresses, random locally administered MACs, VTEPs in 192.0.2.0/24."""
    rng = random.Random(seed)
    macs: set[str] = set()
    while len(macs) < n:
        macs.add(bytes([0x02] + [rng.randrange(256) for _ in range(5)]).hex(":"))
    return [Peer(f"198.{18 + i // 65024}.{(i // 254) % 256}.{1 + i % 254}", mac, f"192.0.2.{2 + i % 250}")
            for i, mac in enumerate(sorted(macs))]


def bench_batched(ov: Overlay, sandbox: str, peers: list[Peer], runs: int) -> tuple[list, list, list]:
    adds, removes, reads = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        ov.add_peers(sandbox, peers)
        adds.append(len(peers) / (time.perf_counter() - t))
        t = time.perf_counter()
        got = ov.list_peers(sandbox)
        reads.append(time.perf_counter() - t)
        if got != set(peers):
            raise SystemExit(f"read back {len(got)} of {len(peers)} peers")
        t = time.perf_counter()
        ov.remove_peers(sandbox, peers)
        removes.append(len(peers) / (time.perf_counter() - t))
    return adds, removes, reads


def bench_pyroute2(sandbox: str, peers: list[Peer], runs: int) -> tuple[list, list]:
    fd = netns.open_netns(sandbox)
    try:
        with netns.entered(fd):
            ipr = IPRoute()  # opened inside: no helper process
    finally:
        os.close(fd)
    try:
        vx = ipr.link_lookup(ifname="vxlan0")[0]
        adds, removes = [], []
        for _ in range(runs):
            t = time.perf_counter()
            for p in peers:
                ipr.fdb("add", ifindex=vx, lladdr=p.mac, dst=p.vtep)  # self permanent by default
                ipr.neigh("replace", ifindex=vx, dst=p.ip, lladdr=p.mac, state="permanent")
            adds.append(len(peers) / (time.perf_counter() - t))
            t = time.perf_counter()
            for p in peers:
                ipr.neigh("del", ifindex=vx, dst=p.ip)
                ipr.fdb("del", ifindex=vx, lladdr=p.mac, dst=p.vtep)
            removes.append(len(peers) / (time.perf_counter() - t))
        return adds, removes
    finally:
        ipr.close()


def run(args, host: str, root: str) -> None:
    hfd = os.open(f"/run/netns/{host}", os.O_RDONLY)
    pool = ThreadPoolExecutor(1, initializer=netns.setns, initargs=(hfd,))  # the daemon's worker thread
    try:
        def work():
            sandbox = os.path.join(root, "sandbox")
            with Overlay() as ov:
                ov.ensure_sandbox(sandbox, 4242, "198.18.0.1/24", 1450, LOCAL_IP)
                batched = bench_batched(ov, sandbox, make_peers(args.endpoints, 1), args.runs)
                plain = bench_pyroute2(sandbox, make_peers(args.pyroute2_endpoints, 2), args.runs)
                ov.delete_sandbox(sandbox)
            return batched, plain

        (b_add, b_del, b_read), (p_add, p_del) = pool.submit(work).result()
    finally:
        pool.shutdown()
        os.close(hfd)

    med = statistics.median
    print(f"FDB + neighbour pairs per second, median of {args.runs} runs")
    print(f"{'':34}{'add':>12}{'remove':>12}")
    print(f"{f'batched netlink ({args.endpoints:,})':34}{med(b_add):>12,.0f}{med(b_del):>12,.0f}")
    print(f"{f'pyroute2 calls ({args.pyroute2_endpoints:,})':34}{med(p_add):>12,.0f}{med(p_del):>12,.0f}")
    print(f"{'speed-up':34}{med(b_add) / med(p_add):>11.0f}x{med(b_del) / med(p_del):>11.0f}x")
    print(f"{args.endpoints:,} endpoints: programmed in {args.endpoints / med(b_add) * 1000:.0f} ms, "
          f"read back (list_peers) in {med(b_read) * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--endpoints", type=int, default=10_000)
    p.add_argument("--pyroute2-endpoints", type=int, default=1_000)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    if not 1 <= args.endpoints <= 130_000 or not 1 <= args.pyroute2_endpoints <= 130_000:
        sys.exit("endpoints must be 1-130000 (198.18.0.0/15)")

    # SIGTERM too should reach the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    name = f"nwt-bench-{secrets.token_hex(3)}"
    root = f"/tmp/{name}"
    os.mkdir(root, 0o700)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        run(args, name, root)
    finally:
        clean([root], ns_prefixes=(name,), quiet=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
