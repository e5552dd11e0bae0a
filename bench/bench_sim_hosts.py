"""N simulated hosts against one manager (SQLite) and three (etcd): propagation, recovery, manager cost.

Managers are real netweftd processes in a lab. The simulated hosts (bench/_simhost.py: the real agent code
on the fake data plane, each with its own certificate from the real join with a worker token and its own
mutual-TLS watch) all run in this process, inside lab host h1's network namespace. Each one attaches one
endpoint to one overlay, so every host holds the overlay's peer table and watches it. Then:

  propagation  one more endpoint is attached (by one simulated host) and the time from the start of its
               attach until its peer is programmed on every other host is taken (p50 / p99 / max over the
               hosts); --rounds times, the median of each figure printed;
  restart      every manager daemon is stopped (SIGTERM) and started again; the time from the last one
               answering again until every host's watch is back (its first line received) is printed,
               then one more propagation round checks the watches work;
  cost         each manager daemon's RSS (and its etcd's) and CPU seconds per phase.

Everything is removed at the end (lab down), also on errors and Ctrl-C.

    sudo .venv/bin/python bench/bench_sim_hosts.py [--hosts 1000] [--stores sqlite,etcd] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, daemon_pid, median, pct, rss_kib  # noqa: E402
from _simhost import SimHost, SimOverlayAgent, add_source_addresses, enter_netns  # noqa: E402

from netweft.lab.lab import Lab  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def etcd_pid(lab: Lab, host: str) -> int | None:
    for p in (lab.host_dir(host) / "data").rglob("etcd.pid"):
        try:
            return int(p.read_text())
        except (OSError, ValueError):
            return None
    return None


class Managers:
    def __init__(self, lab: Lab, hosts: list[str]):
        self.lab, self.hosts = lab, hosts

    def cpu(self) -> dict[str, float]:
        return {h: cpu_s(daemon_pid(self.lab, h)) for h in self.hosts}

    def rss(self) -> str:
        out = []
        for h in self.hosts:
            s = f"{h} {rss_kib(daemon_pid(self.lab, h)) / 1024:.0f} MiB"
            e = etcd_pid(self.lab, h)
            if e:
                s += f" (+etcd {rss_kib(e) / 1024:.0f} MiB)"
            out.append(s)
        return ", ".join(out)

    def max_rss_mib(self) -> float:
        return max(rss_kib(daemon_pid(self.lab, h)) / 1024 for h in self.hosts)


def sim_addr(i: int) -> str:
    """Advertise addresses from the documentation ranges (never used on the wire: the data plane is fake)."""
    nets = ("203.0.113", "198.51.100")
    return f"{nets[(i // 240) % 2]}.{10 + i % 240}"


async def gather_limited(coros, limit: int):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


async def propagate(sims: list[SimHost], src: SimHost, net_id: str, tag: str) -> tuple[list[float], float]:
    """Attach one new endpoint at src; seconds until each other host programs its peer, and the attach time."""
    others = [s for s in sims if s is not src]
    # The address is known only from the answer, and a host may program it before the answer is back:
    # each host notes when it first programmed each IP (first_seen), looked up once the address is known.
    t0 = time.monotonic()
    ep = await src.attach(net_id, tag)
    t_attach = time.monotonic() - t0
    for s in others:
        s.dp.expect(ep.ip)
        s.dp._seen(())   # already programmed before the answer came back
    await asyncio.wait_for(asyncio.gather(*(s.dp.arrived.wait() for s in others)), timeout=120)
    lat = [s.dp.arrived_at - t0 for s in others]
    return lat, t_attach


async def run_store(lab: Lab, mgr_hosts: list[str], args) -> dict:
    mgr = Managers(lab, mgr_hosts)
    c = lab.client("h1")
    token = c.call("GET", "/swarm")["JoinTokens"]["Worker"]
    manager = f"{lab.address('h1')}:2377"
    net = c.call("POST", "/networks/create", {"Name": "scale", "Driver": "overlay", "Attachable": True,
                                               "IPAM": {"Config": [{"Subnet": "198.18.0.0/17"}]}})
    net_id = net["Id"]
    SimOverlayAgent.share = args.hosts
    root = tempfile.mkdtemp(prefix="nwt-sim-")
    sources = [f"192.0.2.{i}" for i in range(100, 250)]   # the lab's underlay /24; its hosts are .11-.13
    add_source_addresses(lab.ns("h1"), sources, 24)
    sims = [SimHost(os.path.join(root, f"s{i}"), f"sim{i}", sim_addr(i), sources[i % len(sources)])
            for i in range(args.hosts)]
    res: dict = {}
    try:
        cpu0 = mgr.cpu()
        t = time.monotonic()


        async def join_and_start(s: SimHost) -> None:
            await s.join(token, manager)
            await s.start(args.resync, args.prober)   # heartbeats at once: a joined node that is silent goes down

        await gather_limited((join_and_start(s) for s in sims), 16)
        res["join_s"] = time.monotonic() - t
        print(f"  {len(sims)} hosts joined and started in {res['join_s']:.1f} s", flush=True)
        t = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(s.overlay.connected.wait() for s in sims)), timeout=300)
        print(f"  {len(sims)} agents watching {time.monotonic() - t:.1f} s later", flush=True)
        t = time.monotonic()
        await gather_limited((s.attach(net_id, f"{s.name}c0") for s in sims), 16)
        res["attach_s"] = time.monotonic() - t
        print(f"  {len(sims)} endpoints attached in {res['attach_s']:.1f} s; manager RSS {mgr.rss()}", flush=True)
        # Let every host catch up with all of them (each holds N-1 peers).
        t = time.monotonic()
        ips = [next(iter(s.overlay.local.values())).ip for s in sims]
        last = ips[-1]
        for s in sims:
            s.dp.expect(last)
            s.dp._seen(())
            if s is sims[-1]:
                s.dp.arrived.set()
        await asyncio.wait_for(asyncio.gather(*(s.dp.arrived.wait() for s in sims)), timeout=300)
        print(f"  every host has all {len(sims) - 1} peers after {time.monotonic() - t:.1f} s more", flush=True)
        await asyncio.sleep(2)
        cpu1 = mgr.cpu()
        rounds = []
        for r in range(args.rounds):
            src = sims[r % len(sims)]
            lat, t_attach = await propagate(sims, src, net_id, f"{src.name}p{r}")
            rounds.append((pct(lat, 50), pct(lat, 99), max(lat), t_attach))
            print(f"  round {r + 1}: p50 {rounds[-1][0] * 1000:.0f} ms, p99 {rounds[-1][1] * 1000:.0f} ms, "
                  f"max {rounds[-1][2] * 1000:.0f} ms (attach answered in {t_attach * 1000:.0f} ms)", flush=True)
            await asyncio.sleep(1)
        cpu2 = mgr.cpu()
        res["p50"], res["p99"], res["max"] = (median(x[i] for x in rounds) for i in range(3))
        res["rss_steady"] = mgr.rss()
        res["rss_max_mib"] = mgr.max_rss_mib()
        res["cpu_setup"] = sum(cpu1.values()) - sum(cpu0.values())
        res["cpu_rounds"] = sum(cpu2.values()) - sum(cpu1.values())
        # Idle cost: heartbeats and watch pings only, for 10 s.
        await asyncio.sleep(10)
        cpu3 = mgr.cpu()
        res["cpu_idle_pct"] = (sum(cpu3.values()) - sum(cpu2.values())) / 10 * 100
        print(f"  idle (heartbeats, pings): managers use {res['cpu_idle_pct']:.0f}% of a core together", flush=True)
        # Every manager restarts.
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        for h in mgr_hosts:
            await loop.run_in_executor(None, lab.stop_daemon, h)
        await asyncio.wait_for(asyncio.gather(*(_cleared(s) for s in sims)), timeout=60)
        for h in mgr_hosts:
            await loop.run_in_executor(None, lab.start_daemon, h)
        t_up = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(s.overlay.connected.wait() for s in sims)), timeout=600)
        res["back_s"] = time.monotonic() - t_up
        print(f"  managers restarted (down+up {t_up - t:.1f} s); every host's watch back "
              f"{res['back_s']:.1f} s after the last manager answered", flush=True)
        lat, t_attach = await propagate(sims, sims[1], net_id, "after-restart")
        res["after_p99"] = pct(lat, 99)
        print(f"  after the restart: p50 {pct(lat, 50) * 1000:.0f} ms, p99 {res['after_p99'] * 1000:.0f} ms; "
              f"manager RSS {mgr.rss()}", flush=True)
        res["rss_after"] = mgr.rss()
        return res
    finally:
        await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
        shutil.rmtree(root, ignore_errors=True)


async def _cleared(s: SimHost) -> None:
    while s.overlay.connected.is_set():
        await asyncio.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=1000, help="simulated hosts (default 1000)")
    p.add_argument("--stores", default="sqlite,etcd", help="sqlite (one manager), etcd (three), or both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--heartbeat", default="5s", help="the cluster's heartbeat period (default 5s, the default)")
    p.add_argument("--resync", action="store_true", help="also run each agent's 3-s resync loop")
    p.add_argument("--prober", action="store_true", help="also run each agent's data-path prober")
    p.add_argument("--profile", help="write a cProfile of this process (the simulated hosts) here")
    args = p.parse_args()
    # N agents each say "watch stream closed" when the managers restart: that is expected here.
    logging.getLogger("netweft").setLevel(logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 8 * args.hosts + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))   # daemons started from here inherit it
    results = {}
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    with Bench() as b:
        for store in args.stores.split(","):
            n_mgr = 3 if store == "etcd" else 1
            print(f"{store}: {n_mgr} manager(s), {args.hosts} simulated hosts", flush=True)
            lab = Lab("sim" + secrets.token_hex(3))
            b.labs.append(lab)
            lab.up(n_mgr, mtu=1500, managers=n_mgr, progress=lambda m: None,
                   init_opts={"HeartbeatPeriod": args.heartbeat, **({"Store": "etcd"} if store == "etcd" else {})})
            enter_netns(lab.ns_path("h1"))
            try:
                if args.profile:
                    import cProfile
                    prof = cProfile.Profile()
                    prof.enable()
                results[store] = asyncio.run(run_store(lab, [f"h{i + 1}" for i in range(n_mgr)], args))
                if args.profile:
                    prof.disable()
                    prof.dump_stats(f"{args.profile}.{store}")
            finally:
                _setns_fd(home)
                b.drop_lab(lab)
    print(f"\n{args.hosts} simulated hosts (median of {args.rounds} rounds)")
    print(f"{'store':8} {'join s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'back s':>7} "
          f"{'mgr MiB':>8} {'CPU idle':>9}  manager RSS after restart")
    for store, r in results.items():
        print(f"{store:8} {r['join_s']:7.1f} {r['p50'] * 1000:7.0f} {r['p99'] * 1000:7.0f} {r['max'] * 1000:7.0f} "
              f"{r['back_s']:7.1f} {r['rss_max_mib']:8.0f} {r['cpu_idle_pct']:8.0f}%  {r['rss_after']}")
    print("goals: p99 <= 1000 ms at 1,000 hosts, <= 2000 ms at 10,000; manager <= 300 MiB at 1,000 hosts")


def _setns_fd(fd: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns back")


if __name__ == "__main__":
    main()
