"""N simulated hosts against one manager (SQLite) and three (etcd): propagation, recovery, manager cost.

Managers are real netweftd processes in a lab. The simulated hosts (bench/_simhost.py: the real agent code
on the fake data plane, each with its own certificate from the real join with a worker token and its own
mutual-TLS watch) run in --procs processes (bench/_simworker.py), inside lab host h1's network namespace,
joining a few at a time. Each one attaches one endpoint to one overlay, so every host holds the overlay's
peer table and watches it (with --group G, the hosts are spread over networks of G hosts each, and the
change is timed on the first network's hosts: every host holding N peers is N x N peers in all, which
10,000 hosts cannot hold on one machine). Then:

  propagation  one more endpoint is attached (by one simulated host) and the time from the start of its
               attach until its peer is programmed on every other host is taken (p50 / p99 / max over the
               hosts); --rounds times, the median of each figure printed;
  restart      every manager daemon is stopped (SIGTERM) and started again; the time from the last one
               answering again until every host's watch is back (its first line received) is printed,
               then one more propagation round checks the watches work;
  cost         each manager daemon's RSS (and its etcd's) and CPU seconds per phase.

Everything is removed at the end (lab down), also on errors and Ctrl-C.

    sudo .venv/bin/python bench/bench_sim_hosts.py [--hosts 1000] [--stores sqlite,etcd] [--rounds 5]
        [--procs 2] [--group G] [--profile DIR]

With --profile DIR, py-spy (installed in the venv, not a dependency) samples each manager daemon and each
process of simulated hosts during the propagation rounds and again during the restart, and writes collapsed
stacks (DIR/<phase>-<process>.txt, one `frame;frame;... count` line each) and a summary of where the time went.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, daemon_pid, median, pct, rss_kib  # noqa: E402
from _simhost import add_source_addresses  # noqa: E402

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

    def peak_mib(self) -> float:
        """The largest RSS any manager daemon has had since it started (VmHWM)."""
        out = 0
        for h in self.hosts:
            with open(f"/proc/{daemon_pid(self.lab, h)}/status") as f:
                out = max([out] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        return out / 1024


class Profiler:
    """py-spy recording the given processes (name -> pid) until stop(); nothing without a directory."""

    def __init__(self, out: str | None, phase: str, pids: dict[str, int]):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.out, self.phase = out, phase
        spy = Path(sys.executable).parent / "py-spy"
        if not out or not spy.exists():
            return
        os.makedirs(out, exist_ok=True)
        for name, pid in pids.items():
            path = os.path.join(out, f"{phase}-{name}.txt")
            self.procs.append((path, subprocess.Popen(
                [str(spy), "record", "-p", str(pid), "-o", path, "-f", "raw", "-r", "50", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    def stop(self) -> None:
        for _, p in self.procs:
            p.send_signal(signal.SIGINT)
        for path, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            summarize(path)


def summarize(path: str, top: int = 25) -> None:
    """The functions with the most samples (inclusive, and on-CPU at the top of the stack), beside the stacks."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return
    total, incl, own = 0, {}, {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    if not total:
        return
    with open(path[:-4] + ".summary", "w") as f:
        f.write(f"{total} samples\n-- inclusive\n")
        for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]:
            f.write(f"{v / total * 100:5.1f}% {k}\n")
        f.write("-- own\n")
        for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            f.write(f"{v / total * 100:5.1f}% {k}\n")


class Workers:
    """The processes of simulated hosts (bench/_simworker.py), each running a share of them."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, n: int, cfgs: list[dict]) -> None:
        for cfg in cfgs[:n]:
            p = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).parent / "_simworker.py"), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, start_new_session=True, limit=1 << 26)
            self.procs.append(p)
        await self.all("init", [dict(c) for c in cfgs[:n]])

    async def call(self, p: asyncio.subprocess.Process, cmd: str, kw: dict):
        p.stdin.write((json.dumps([cmd, kw]) + "\n").encode())
        await p.stdin.drain()
        line = await p.stdout.readline()
        if not line:
            raise RuntimeError(f"a simulated-host process ended during {cmd} (exit {await p.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    async def all(self, cmd: str, kws: list[dict] | dict):
        kws = kws if isinstance(kws, list) else [kws] * len(self.procs)
        return await asyncio.gather(*(self.call(p, cmd, kw) for p, kw in zip(self.procs, kws)))

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    await asyncio.wait_for(self.call(p, "stop", {}), 60)
                except Exception:   # noqa: BLE001 - killed below
                    pass
                p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()


def start_manager(lab: Lab, host: str, timeout: float = 900) -> None:
    """lab.start_daemon, waiting longer than its 30 s: 1,000 agents reconnecting at once (2,000 mutual-TLS
    handshakes) keep a manager's loop busy before its local API answers."""
    try:
        lab.start_daemon(host)
        return
    except RuntimeError as e:
        if "did not answer" not in str(e):
            raise
    deadline = time.monotonic() + timeout
    c = lab.client(host, timeout=10)
    while True:
        try:
            c.call("GET", "/_ping")
            return
        except Exception:   # noqa: BLE001 - retried until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError(f"netweftd on {host} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)


async def join_progress(lab: Lab, mgr: Managers, workers: Workers, t0: float, every: float = 60) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            nodes = len(await loop.run_in_executor(None, lab.client("h1").call, "GET", "/nodes"))
        except Exception as e:   # noqa: BLE001 - progress only
            nodes = f"? ({e})"
        sims = sum(rss_kib(p.pid) for p in workers.procs) / 1024
        print(f"  ... {time.monotonic() - t0:.0f} s: {nodes} nodes joined; manager RSS {mgr.rss()}, simulated "
              f"hosts' RSS {sims:.0f} MiB; load {os.getloadavg()[0]:.1f}", flush=True)


async def run_store(lab: Lab, mgr_hosts: list[str], args) -> dict:
    mgr = Managers(lab, mgr_hosts)
    c = lab.client("h1")
    token = c.call("GET", "/swarm")["JoinTokens"]["Worker"]
    manager = f"{lab.address('h1')}:2377"
    groups = max(1, -(-args.hosts // (args.group or args.hosts)))
    nets = []
    for g in range(groups):
        # 198.18.0.0/15 holds 64 networks of /21 (2,046 hosts each) or one /17 for everything.
        subnet = "198.18.0.0/17" if groups == 1 else f"198.{18 + g // 32}.{(g % 32) * 8}.0/21"
        nets.append(c.call("POST", "/networks/create", {
            "Name": f"scale{g}", "Driver": "overlay", "Attachable": True,
            "IPAM": {"Config": [{"Subnet": subnet}]}})["Id"])
    sources = [f"192.0.2.{i}" for i in range(100, 250)]   # the lab's underlay /24; its hosts are .11-.13
    add_source_addresses(lab.ns("h1"), sources, 24)
    procs = max(1, min(args.procs, args.hosts))
    root = tempfile.mkdtemp(prefix="nwt-sim-")
    cfgs = [{"netns": str(lab.ns_path("h1")), "root": os.path.join(root, f"p{k}"), "sources": sources,
             "indices": list(range(k, args.hosts, procs)), "hosts": args.hosts, "resync": args.resync,
             "prober": args.prober} for k in range(procs)]
    # Host i is in worker i % procs and on network i % groups.
    where = {f"sim{i}": i % procs for i in range(args.hosts)}
    group0 = [f"sim{i}" for i in range(0, args.hosts, groups)]
    workers = Workers()
    res: dict = {}
    try:
        await workers.start(procs, cfgs)
        cpu0 = mgr.cpu()
        t = time.monotonic()
        # Staggered: each process joins a few hosts at a time, spread over every manager; how far it got is
        # printed every 60 s (a run that cannot finish says where it stopped).
        progress = asyncio.ensure_future(join_progress(lab, mgr, workers, t))
        try:
            await workers.all("join", {"token": token, "manager": manager, "concurrency": max(2, 16 // procs),
                                       "managers": [f"{lab.address(h)}:2377" for h in mgr_hosts]})
        finally:
            progress.cancel()
        res["join_s"] = time.monotonic() - t
        print(f"  {args.hosts} hosts joined and started in {res['join_s']:.1f} s ({procs} processes); "
              f"manager RSS {mgr.rss()}", flush=True)
        t = time.monotonic()
        await workers.all("connected", {"timeout": 600})
        print(f"  {args.hosts} agents watching {time.monotonic() - t:.1f} s later", flush=True)
        t = time.monotonic()
        ips = await workers.all("attach_all", {"nets": nets, "concurrency": max(2, 8 // procs)})
        res["attach_s"] = time.monotonic() - t
        print(f"  {args.hosts} endpoints attached in {res['attach_s']:.1f} s "
              f"({groups} network(s) of {len(group0)} hosts); manager RSS {mgr.rss()}", flush=True)
        # Let every host catch up with its network's endpoints (the last one attached in each network).
        t = time.monotonic()
        by_host = {i: ips[i % procs][i // procs] for i in range(args.hosts)}
        for g in range(groups):
            last = max(range(g, args.hosts, groups))
            await workers.all("arrivals", {"ip": by_host[last], "t0": 0.0, "skip": f"sim{last}",
                                           "names": [f"sim{i}" for i in range(g, args.hosts, groups)],
                                           "timeout": 900})
        res["catch_up_s"] = time.monotonic() - t
        print(f"  every host has its {len(group0) - 1} peers after {res['catch_up_s']:.1f} s more; "
              f"manager RSS {mgr.rss()}", flush=True)
        await asyncio.sleep(5)   # a quiet moment: memory given back after the burst shows here
        res["rss_settled"] = mgr.rss()
        cpu1 = mgr.cpu()

        async def propagate(r: int, tag: str) -> tuple[list[float], float]:
            src = group0[r % len(group0)]
            a = await workers.call(workers.procs[where[src]], "attach_one", {"name": src, "net": nets[0], "tag": tag})
            lat = sum(await workers.all("arrivals", {"ip": a["ip"], "t0": a["t0"], "skip": src, "names": group0,
                                                     "timeout": 120}), [])
            return lat, a["attach_s"]

        rounds = []
        prof = Profiler(args.profile, "rounds", {**{h: daemon_pid(lab, h) for h in mgr_hosts},
                                                 **{f"sim{k}": p.pid for k, p in enumerate(workers.procs)}})
        for r in range(args.rounds):
            await workers.all("loop_lag", {})
            cpu_r = mgr.cpu()
            lat, t_attach = await propagate(r, f"p{r}")
            lag = max(await workers.all("loop_lag", {}))
            rounds.append((pct(lat, 50), pct(lat, 99), max(lat), t_attach, lag))
            print(f"  round {r + 1}: p50 {rounds[-1][0] * 1000:.0f} ms, p99 {rounds[-1][1] * 1000:.0f} ms, "
                  f"max {rounds[-1][2] * 1000:.0f} ms over {len(lat)} hosts "
                  f"(attach answered in {t_attach * 1000:.0f} ms; simulated hosts' event loops up to "
                  f"{lag * 1000:.0f} ms late; managers' CPU {sum(mgr.cpu().values()) - sum(cpu_r.values()):.2f} s; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            await asyncio.sleep(1)
        prof.stop()
        cpu2 = mgr.cpu()
        res["p50"], res["p99"], res["max"], _, res["lag"] = (median(x[i] for x in rounds) for i in range(5))
        res["load"] = os.getloadavg()[0]
        res["rss_steady"] = mgr.rss()
        res["rss_max_mib"] = mgr.max_rss_mib()
        res["peak_mib"] = mgr.peak_mib()
        res["cpu_setup"] = sum(cpu1.values()) - sum(cpu0.values())
        res["cpu_rounds"] = sum(cpu2.values()) - sum(cpu1.values())
        # Idle cost: heartbeats and watch pings only, for 10 s.
        await asyncio.sleep(10)
        cpu3 = mgr.cpu()
        res["cpu_idle_pct"] = (sum(cpu3.values()) - sum(cpu2.values())) / 10 * 100
        print(f"  managers' CPU: {res['cpu_setup']:.0f} s for joins+attaches, {res['cpu_rounds']:.1f} s for "
              f"the rounds; idle (heartbeats, pings) {res['cpu_idle_pct']:.0f}% of a core together", flush=True)
        # Every manager restarts.
        loop = asyncio.get_running_loop()
        snaps0 = sum(await workers.all("snapshots", {}))
        t = time.monotonic()
        for h in mgr_hosts:
            await loop.run_in_executor(None, lab.stop_daemon, h)
        await workers.all("cleared", {"timeout": 120})
        for h in mgr_hosts:
            await loop.run_in_executor(None, start_manager, lab, h)
        t_up = time.monotonic()
        print(f"  managers answering {t_up - t:.1f} s after the stop began", flush=True)
        cpu4 = mgr.cpu()
        prof = Profiler(args.profile, "restart", {**{h: daemon_pid(lab, h) for h in mgr_hosts},
                                                  **{f"sim{k}": p.pid for k, p in enumerate(workers.procs)}})
        try:
            await workers.all("connected", {"timeout": 900})
        finally:
            prof.stop()
        res["back_s"] = time.monotonic() - t_up
        res["cpu_back"] = sum(mgr.cpu().values()) - sum(cpu4.values())
        res["snapshots_back"] = sum(await workers.all("snapshots", {})) - snaps0
        print(f"  managers restarted (down+up {t_up - t:.1f} s); every host's watch back "
              f"{res['back_s']:.1f} s after the last manager answered ({res['cpu_back']:.0f} s of manager CPU; "
              f"{res['snapshots_back']} of {args.hosts} hosts needed a new snapshot; load {os.getloadavg()[0]:.1f})",
              flush=True)
        lat, t_attach = await propagate(1, "after-restart")
        res["after_p99"] = pct(lat, 99)
        res["rss_after"] = mgr.rss()
        print(f"  after the restart: p50 {pct(lat, 50) * 1000:.0f} ms, p99 {res['after_p99'] * 1000:.0f} ms; "
              f"manager RSS {res['rss_after']}", flush=True)
        return res
    finally:
        await workers.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=1000, help="simulated hosts (default 1000)")
    p.add_argument("--stores", default="sqlite,etcd", help="sqlite (one manager), etcd (three), or both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--procs", type=int, default=2, help="processes the simulated hosts are spread over")
    p.add_argument("--group", type=int, default=0,
                   help="hosts per overlay network (default: all hosts on one network); the change is timed "
                        "on the first network's hosts")
    p.add_argument("--heartbeat", default="5s", help="the cluster's heartbeat period (default 5s, the default)")
    p.add_argument("--resync", action="store_true", help="also run each agent's 3-s resync loop")
    p.add_argument("--prober", action="store_true", help="also run each agent's data-path prober")
    p.add_argument("--profile", metavar="DIR", help="py-spy the managers and simulated hosts during the rounds "
                   "and the restart; collapsed stacks and summaries in DIR")
    args = p.parse_args()
    # N agents each say "watch stream closed" when the managers restart: that is expected here.
    logging.getLogger("netweft").setLevel(logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 8 * args.hosts + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))   # daemons started from here inherit it
    results = {}
    with Bench() as b:
        for store in args.stores.split(","):
            n_mgr = 3 if store == "etcd" else 1
            print(f"{store}: {n_mgr} manager(s), {args.hosts} simulated hosts", flush=True)
            lab = Lab("sim" + secrets.token_hex(3))
            b.labs.append(lab)
            lab.up(n_mgr, mtu=1500, managers=n_mgr, progress=lambda m: None,
                   init_opts={"HeartbeatPeriod": args.heartbeat, **({"Store": "etcd"} if store == "etcd" else {})})
            try:
                results[store] = asyncio.run(run_store(lab, [f"h{i + 1}" for i in range(n_mgr)], args))
            finally:
                b.drop_lab(lab)
    print(f"\n{args.hosts} simulated hosts (median of {args.rounds} rounds)")
    print(f"{'store':8} {'join s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'back s':>7} "
          f"{'mgr MiB':>8} {'peak MiB':>9} {'CPU s':>7} {'CPU idle':>9} {'lag ms':>7} {'load':>5}  manager RSS after restart")
    for store, r in results.items():
        print(f"{store:8} {r['join_s']:7.1f} {r['p50'] * 1000:7.0f} {r['p99'] * 1000:7.0f} {r['max'] * 1000:7.0f} "
              f"{r['back_s']:7.1f} {r['rss_max_mib']:8.0f} {r['peak_mib']:9.0f} {r['cpu_setup']:7.0f} "
              f"{r['cpu_idle_pct']:8.0f}% {r['lag'] * 1000:7.0f} {r['load']:5.1f}  {r['rss_after']}")
    print("lag ms: how late the simulated hosts' event loops ran during a round (median of the rounds): a change "
          "reaches those hosts at least that late; load: the machine's 1-min load average (2 cores)")
    print("mgr MiB: largest manager RSS in the steady state; peak: its high-water mark (joins and attaches "
          "included); CPU s: managers' CPU seconds for the joins and attaches")
    print("goals: p99 <= 1000 ms at 1,000 hosts, <= 2000 ms at 10,000; manager <= 300 MiB at 1,000 hosts")


if __name__ == "__main__":
    main()
