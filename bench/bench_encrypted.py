"""Encrypted overlay benchmarks (issue 10) on a 2-host lab, with wireguard-go (this kernel has no WireGuard).

  (a) iperf3, one TCP stream, h1 -> h2, three ways interleaved in each round:
        encrypted   container -> container over an `-o encrypted` overlay (VXLAN inside WireGuard)
        plain wg    host -> host over a bare wireguard-go tunnel between the same two hosts (the same
                    implementation and MTU as netweft's, made with netweft's data plane, nothing on top)
        clear       container -> container over an unencrypted overlay
      medians and the ratios encrypted/plain-wg (goal >= 0.9 here) and encrypted/clear.
  (b) attach -> reachable on an encrypted network: a container created on h2 through the API; a probe in a
      container on h1 (ICMP echo every 2 ms, started before the create call) reports the first reply.

Everything made here (the lab, the extra tunnel, helper processes) is removed at the end, also on failure
or Ctrl-C. One run on a noisy 2-core machine: medians of a few rounds, ratios measured side by side.

    sudo .venv/bin/python bench/bench_encrypted.py [--rounds 3] [--seconds 5] [--attach 10]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import Bench, in_host, in_pid_netns, iperf, median, pct  # noqa: E402
from bench_overlay import Prober, cli, create_ctr, remove_ctr  # noqa: E402

from netweft.dataplane.real import RealDataPlane  # noqa: E402
from netweft.dataplane.wgconf import TunnelPeer, TunnelSpec, new_private_key, public_key  # noqa: E402
from netweft.lab.lab import Lab  # noqa: E402

SEC, CLR = "198.18.20.0/24", "198.18.21.0/24"
PLAIN = "198.18.250.0/24"     # the bare tunnel's addresses: .1 on h1, .2 on h2
PLAIN_PORT = 51900


async def plain_tunnel(lab: Lab, up: bool) -> None:
    """A bare wireguard-go tunnel between h1 and h2 (or its removal), through netweft's data plane."""
    keys = {h: new_private_key() for h in ("h1", "h2")}
    for i, (h, other) in enumerate((("h1", "h2"), ("h2", "h1"))):
        dp = RealDataPlane(str(lab.host_dir(h) / "bench"), host_netns=lab.ns_path(h))
        try:
            name = f"nwbwg{lab.name[-6:]}{i}"
            if not up:
                await dp.delete_tunnel(name)
                continue
            addr = f"198.18.250.{i + 1}"
            peer = TunnelPeer(public_key(keys[other]), f"{lab.address(other)}:{PLAIN_PORT}",
                              f"198.18.250.{2 - i}/32")
            await dp.ensure_tunnel(TunnelSpec(ifname=name, private_key=keys[h], port=PLAIN_PORT,
                                              addresses=(f"{addr}/32",), source=addr, route=PLAIN,
                                              mtu=1500 - 60, peers=(peer,)))
        finally:
            await dp.close()


def bench_throughput(b: Bench, lab: Lab, pids: dict, rounds: int, seconds: int) -> None:
    b.spawn(in_pid_netns(pids["c2"], ["iperf3", "-s"]), lab=lab)
    b.spawn(in_host(lab, "h2", ["iperf3", "-s", "-B", "198.18.250.2"]), lab=lab)
    runs = {"encrypted": ["iperf3", "-c", "198.18.20.12"], "plain wg": ["iperf3", "-c", "198.18.250.2"],
            "clear": ["iperf3", "-c", "198.18.21.12"]}
    where = {"encrypted": pids["c1"], "plain wg": None, "clear": pids["c1"]}
    got: dict[str, list[float]] = {k: [] for k in runs}
    kinds = list(runs)
    for r in range(rounds):
        order = kinds[r % 3:] + kinds[:r % 3]   # rotate who goes first: drift hits all alike
        for kind in order:
            argv = in_host(lab, "h1", runs[kind]) if where[kind] is None else in_pid_netns(where[kind], runs[kind])
            got[kind].append(iperf(argv, seconds))
        print("  round %d: " % (r + 1) + "   ".join(f"{k} {got[k][-1]:5.2f} Gbit/s" for k in kinds))
    med = {k: median(v) for k, v in got.items()}
    print("  median:  " + "   ".join(f"{k} {med[k]:5.2f} Gbit/s" for k in kinds))
    per_round = median([e / p for e, p in zip(got["encrypted"], got["plain wg"])])
    print(f"  encrypted / plain wireguard-go: {med['encrypted'] / med['plain wg']:.3f} (ratio of medians), "
          f"{per_round:.3f} (median of per-round ratios)  (goal >= 0.9)")
    print(f"  encrypted / clear overlay:      {med['encrypted'] / med['clear']:.3f}  "
          "(goal >= 0.6 is for the kernel module; wireguard-go is userspace)")


def bench_attach(b: Bench, lab: Lab, pid1: int, iterations: int) -> None:
    prober = Prober(b, lab, pid1)
    reach, call, fails = [], [], 0
    for i in range(iterations):
        ip, name = f"198.18.20.{100 + i}", f"a{i}"
        prober.start(ip, 10)
        t0 = time.monotonic()
        create_ctr(lab, "h2", name, ip, net="sec")
        call.append(time.monotonic() - t0)
        t, _ = prober.result(15)
        if t is None:
            fails += 1
        else:
            reach.append(t - t0)
        remove_ctr(lab, "h2", name)
    for label, v in (("create call returned", call), ("reachable from h1", reach)):
        print(f"  {label:<22} p50 {pct(v, 50) * 1000:6.1f} ms  p99 {pct(v, 99) * 1000:6.1f} ms  n={len(v)}")
    if fails:
        print(f"  {fails} of {iterations} never became reachable within 10 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--attach", type=int, default=10)
    args = ap.parse_args()
    with Bench() as b:
        lab = b.lab(2)
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "-o", "encrypted", "--subnet", SEC, "sec")
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", CLR, "clr")
        pids = {}
        for k in (1, 2):
            pids[f"c{k}"] = create_ctr(lab, f"h{k}", f"c{k}", f"198.18.20.1{k}", net="sec")["State"]["Pid"]
            cli(lab, f"h{k}", "network", "connect", "--ip", f"198.18.21.1{k}", "clr", f"c{k}")
        asyncio.run(plain_tunnel(lab, True))
        try:
            wg = lab.client("h1").call("GET", "/info")["WireGuard"]
            print(f"WireGuard: {wg.get('Implementation')} {wg.get('Path', '')} {wg.get('Version', '')}; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"\n(a) iperf3, 1 TCP stream, {args.rounds} rounds x {args.seconds} s (+1 s omitted), interleaved")
            bench_throughput(b, lab, pids, args.rounds, args.seconds)
            print(f"\n(b) attach -> reachable on an encrypted network ({args.attach} containers on h2, probe on h1)")
            bench_attach(b, lab, pids["c1"], args.attach)
        finally:
            asyncio.run(plain_tunnel(lab, False))


if __name__ == "__main__":
    main()
