"""Overlay benchmarks on simulated hosts, with Docker's figures and netweft's goals side by side.

  (a) iperf3, one TCP stream, container -> container across hosts (overlay) against host -> host on the
      underlay, alternating in the same run; the ratio overlay/underlay.
  (b) attach -> reachable from another host: create a container on h2 through the API; a probe inside an
      existing container on h3 (raw ICMP echo every 2 ms, started before the create call) reports the
      first reply. p50/p99 from the moment the create call is sent.
  (c) propagation: until the new endpoint's permanent neighbour entry is in the overlay sandbox of every
      other host (netlink neighbour events, one socket per sandbox, timestamped on arrival), from the create
      call being sent and from it returning (the entries usually arrive before it returns, so the summary
      uses the former, an upper bound); in a 3-host lab (the samples of (b)) and in a lab of --hosts hosts
      (10 unless told; creates rotating over the hosts). Removal: from the remove call returning until purged everywhere.
  (d) FDB/neighbour programming rate: bench/bench_fdb_rate.py (not repeated here).
  (e) RSS of a worker's netweftd with 0 and 100 local overlay endpoints.
  and `network create` latency on the manager (API call, and the whole `netweft network create` CLI).

Labs are nwl-b*-* namespaces under /run/netweft-lab/b*; every lab and process made here is removed at
the end, also on failure or Ctrl-C. A 2-core machine is noisy: figures are medians/percentiles and the
ratios are measured side by side.

    sudo .venv/bin/python bench/bench_overlay.py [--quick] [--hosts N] [--propagation-only]
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import select
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import (Bench, NeighWatch, children, daemon_pid, in_host, in_pid_netns, iperf, median, pct,  # noqa: E402
                  rss_kib)

from netweft.apiclient.client import ApiError  # noqa: E402
from netweft.lab.lab import Lab  # noqa: E402

OV = "ov"
OV_SUBNET = "198.18.0.0/17"        # containers; the latency test's networks use 198.18.128.0/17
PROBE_INTERVAL = 0.002             # s between echo requests of the reachability probe
ARP_RETRANS_MS = 10                # in the probing container only (see the note printed with (b))

# Runs inside a container (nsenter -t PID -n): one line "IP TIMEOUT" in, one line out:
# "OK IP MONOTONIC_TIME_OF_FIRST_REPLY SENT" or "TIMEOUT IP SENT".
PROBE = r"""
import os, select, socket, struct, sys, time
INTERVAL = float(sys.argv[1])
try:
    with open("/proc/sys/net/ipv4/neigh/eth0/retrans_time_ms", "w") as f:
        f.write(sys.argv[2])
except OSError as e:
    print("WARN", e, flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
def echo(seq):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"netweft-bench"
    return struct.pack("!BBHHH", 8, 0, csum(h), ident, seq) + b"netweft-bench"
print("READY", flush=True)
seq = 0
for line in sys.stdin:
    ip, timeout = line.split()
    t0 = time.monotonic(); deadline = t0 + float(timeout); nxt = t0; sent = 0; done = False
    while not done:
        now = time.monotonic()
        if now >= deadline:
            print("TIMEOUT", ip, sent, flush=True); break
        if now >= nxt:
            seq = (seq + 1) & 0xffff
            try:
                s.sendto(echo(seq), (ip, 0)); sent += 1
            except OSError:
                pass
            nxt = now + INTERVAL
        r, _, _ = select.select([s], [], [], max(0.0, min(nxt, deadline) - time.monotonic()))
        while r:
            data, addr = s.recvfrom(4096)
            t = time.monotonic()
            ihl = (data[0] & 0xf) * 4
            if addr[0] == ip and len(data) >= ihl + 8:
                typ, _, _, rid, _ = struct.unpack_from("!BBHHH", data, ihl)
                if typ == 0 and rid == ident:
                    print("OK", ip, repr(t), sent, flush=True); done = True; break
            r, _, _ = select.select([s], [], [], 0)
"""


# ------------------------------------------------------------------ helpers
def ms(x: float) -> str:
    return f"{x * 1000:7.1f} ms"


def show(label: str, values: list[float], unit=ms, extra: str = "") -> None:
    if not values:
        print(f"  {label:<48} (no samples)")
        return
    print(f"  {label:<48} p50 {unit(pct(values, 50))}  p99 {unit(pct(values, 99))}  "
          f"min {unit(min(values))}  max {unit(max(values))}  n={len(values)}{extra}")


def cli(lab: Lab, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv, env = lab.exec_argv(host, ["netweft", *args])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{host}: netweft {' '.join(args)}: {r.stderr.strip()}")
    return r


def create_ctr(lab: Lab, host: str, name: str, ip: str, net: str = OV) -> dict:
    return lab.client(host).call("POST", "/containers/create", {
        "Name": name, "Hostname": name, "NetworkMode": net, "IPAddress": ip, "Cmd": ["sleep", "100000"]})


def remove_ctr(lab: Lab, host: str, name: str) -> None:
    lab.client(host).call("DELETE", f"/containers/{name}", force=1)


def create_overlay(lab: Lab, name: str = OV, subnet: str = OV_SUBNET) -> str:
    net_id = lab.client("h1").call("POST", "/networks/create", {
        "Name": name, "Driver": "overlay", "Attachable": True, "IPAM": {"Config": [{"Subnet": subnet}]}})["Id"]
    # A worker knows the network only once the manager's watch stream brought it: until then
    # `run --network NAME` there fails with "not found" (see the network create section).
    wait_visible(lab, lab.hosts()[1:], name, time.monotonic())
    return net_id


def wait_visible(lab: Lab, hosts: list[str], name: str, t0: float, timeout: float = 15) -> dict[str, float]:
    """{host: seconds from t0 until GET /networks/NAME answers there}."""
    out: dict[str, float] = {}
    clients = {h: lab.client(h, timeout=5) for h in hosts}
    while len(out) < len(hosts):
        for h, c in clients.items():
            if h in out:
                continue
            try:
                c.call("GET", f"/networks/{name}")
                out[h] = time.monotonic() - t0
            except ApiError as e:
                if e.status != 404:
                    raise
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"network {name} not visible on {sorted(set(hosts) - set(out))} after {timeout} s")
    return out


def sandbox(lab: Lab, host: str, net_id: str) -> str:
    return str(lab.host_dir(host) / "run" / "sandboxes" / net_id[:12])


def log_time(stamp: str) -> float:
    """A daemon log timestamp (2026-01-02T03:04:05.678Z, UTC) as a time.time() value."""
    base, frac = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1000


def ip_of(i: int, base: int) -> str:
    """Distinct addresses per iteration: a stale ARP entry in the prober never fakes reachability."""
    return f"198.18.{base + i // 250}.{1 + i % 250}"


def wait_sandboxes(lab: Lab, hosts: list[str], net_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(sandbox(lab, h, net_id)) for h in hosts):
        if time.monotonic() > deadline:
            raise RuntimeError("overlay sandboxes did not appear")
        time.sleep(0.05)


def wait_neigh(lab: Lab, host: str, net_id: str, ips: set[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["nsenter", f"--net={sandbox(lab, host, net_id)}", "ip", "-j", "neigh", "show", "dev",
                              "vxlan0", "nud", "permanent"], capture_output=True, text=True).stdout
        if ips <= {n["dst"] for n in json.loads(out or "[]")}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sorted(ips)} not programmed on {host}")
        time.sleep(0.05)


def shim_rss_kib(lab: Lab, host: str) -> list[int]:
    """VmRSS of the container supervisor a host's daemon started (one per host; it outlives the daemon, as
    containerd-shims outlive dockerd)."""
    marker = str(lab.host_dir(host))
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"netweft.runtime.supervisor" in c for c in cmd) and any(marker.encode() in c for c in cmd):
            try:
                out.append(rss_kib(int(pid)))
            except OSError:
                pass
    return out


# ------------------------------------------------------------------ (network create)
def bench_network_create(lab: Lab, n: int) -> dict:
    api, clis, visible, early = [], [], [], 0
    c = lab.client("h1")
    workers = lab.hosts()[1:]
    for i in range(n):
        body = {"Name": f"lat{i}", "Driver": "overlay", "Attachable": True,
                "IPAM": {"Config": [{"Subnet": f"198.18.{128 + i}.0/24"}]}}
        t = time.monotonic()
        c.call("POST", "/networks/create", body)
        api.append(time.monotonic() - t)
        try:  # what a `run --network` on a worker right after the create would see
            lab.client("h2").call("GET", f"/networks/lat{i}")
        except ApiError as e:
            if e.status != 404:
                raise
            early += 1
        visible.append(max(wait_visible(lab, workers, f"lat{i}", t).values()))
        c.call("DELETE", f"/networks/lat{i}")
    for i in range(n):
        t = time.monotonic()
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", f"198.18.{128 + i}.0/24",
            f"latc{i}")
        clis.append(time.monotonic() - t)
        c.call("DELETE", f"/networks/latc{i}")
    t = time.monotonic()
    cli(lab, "h1", "network", "ls")
    ls = time.monotonic() - t
    print(f"  API POST /networks/create (overlay, on the manager): median {ms(median(api))}  "
          f"min {ms(min(api))}  max {ms(max(api))}  n={n}")
    print(f"  CLI `netweft network create -d overlay ...`:          median {ms(median(clis))}  "
          f"min {ms(min(clis))}  max {ms(max(clis))}  n={n}")
    print(f"  (CLI start-up alone, `netweft network ls` once:      {ms(ls)})")
    show("API create sent -> known on every worker", visible)
    print(f"  right after the create call returned, h2 did not know the network yet in {early} of {n} cases "
          f"(`run --network` there fails with 'not found')")
    return {"api": median(api), "cli": median(clis)}


# ------------------------------------------------------------------ (e) RSS
def bench_rss(lab: Lab, count: int) -> dict:
    pid = daemon_pid(lab, "h2")
    kids0 = children(pid)
    rss0 = rss_kib(pid)
    print(f"  h2 netweftd (pid {pid}) with 0 local endpoints: VmRSS {rss0 / 1024:.1f} MiB"
          f"{f' (+{len(kids0)} child processes)' if kids0 else ''}; "
          f"h1 (manager) {rss_kib(daemon_pid(lab, 'h1')) / 1024:.1f} MiB")
    times = []
    names = []
    try:
        for i in range(count):
            name = f"e{i}"
            t = time.monotonic()
            create_ctr(lab, "h2", name, ip_of(i, 2))
            times.append(time.monotonic() - t)
            names.append(name)
        time.sleep(1.0)  # let the agent's deferred store save and the allocator settle
        rss = rss_kib(pid)
        kids = children(pid)
        shims = shim_rss_kib(lab, "h2")
        print(f"  h2 netweftd with {count} local endpoints:  VmRSS {rss / 1024:.1f} MiB"
              f"{f' (+{len(kids)} child processes)' if kids else ''}")
        k = max(1, count // 10)
        print(f"  create with N local endpoints already: first {k} median {ms(median(times[:k]))}, "
              f"last {k} median {ms(median(times[-k:]))}")
        if shims:
            print(f"  the host's container supervisor (outside the daemon, as containerd-shims are outside "
                  f"dockerd): {len(shims)} process, {sum(shims) / 1024:.1f} MiB for {count} containers "
                  f"(PSS per container: bench/bench_container_memory.py)")
    finally:
        t = time.monotonic()
        for name in names:
            remove_ctr(lab, "h2", name)
    rm = time.monotonic() - t
    time.sleep(1.0)
    rss_after = rss_kib(pid)
    print(f"  removed {count} containers in {rm:.1f} s; h2 netweftd afterwards: VmRSS {rss_after / 1024:.1f} MiB")
    return {"rss0": rss0 / 1024, "rss": rss / 1024, "after": rss_after / 1024}


# ------------------------------------------------------------------ (a) iperf3
def bench_iperf(b: Bench, lab: Lab, pid1: int, pid2: int, rounds: int, seconds: int) -> dict:
    b.spawn(in_pid_netns(pid2, ["iperf3", "-s"]), lab=lab)
    b.spawn(in_host(lab, "h2", ["iperf3", "-s"]), lab=lab)
    ov, ul = [], []
    for r in range(rounds):
        # Alternate which goes first, so drift on the machine hits both alike.
        order = ("ov", "ul") if r % 2 == 0 else ("ul", "ov")
        for kind in order:
            if kind == "ov":
                ov.append(iperf(in_pid_netns(pid1, ["iperf3", "-c", "198.18.0.12"]), seconds))
            else:
                ul.append(iperf(in_host(lab, "h1", ["iperf3", "-c", lab.address("h2")]), seconds))
        print(f"  round {r + 1}: overlay {ov[-1]:6.2f} Gbit/s   underlay {ul[-1]:6.2f} Gbit/s   "
              f"ratio {ov[-1] / ul[-1]:.3f}")
    ratios = [o / u for o, u in zip(ov, ul)]
    res = {"ov": median(ov), "ul": median(ul), "ratio": median(ov) / median(ul), "ratio_rounds": median(ratios)}
    print(f"  median: overlay {res['ov']:.2f} Gbit/s, underlay {res['ul']:.2f} Gbit/s; ratio of medians "
          f"{res['ratio']:.3f}, median of per-round ratios {res['ratio_rounds']:.3f}")
    return res


# ------------------------------------------------------------------ (b) + (c, 3 hosts)
class Prober:
    def __init__(self, b: Bench, lab: Lab, pid: int):
        self.p = b.spawn(in_pid_netns(pid, [sys.executable, "-u", "-c", PROBE, str(PROBE_INTERVAL),
                                            str(ARP_RETRANS_MS)]),
                         lab=lab, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.readline(10)
        while line.startswith("WARN"):
            print("  probe:", line.strip())
            line = self.readline(10)
        if not line.startswith("READY"):
            raise RuntimeError(f"probe did not start: {line!r} {self.p.stderr.read() if self.p.poll() else ''}")

    def readline(self, timeout: float) -> str:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise RuntimeError("probe did not answer")
        return self.p.stdout.readline()

    def start(self, ip: str, timeout: float) -> None:
        self.p.stdin.write(f"{ip} {timeout}\n")
        self.p.stdin.flush()

    def result(self, timeout: float) -> tuple[float | None, int]:
        parts = self.readline(timeout).split()
        if parts[0] == "OK":
            return float(parts[2]), int(parts[3])
        return None, int(parts[2])


def bench_attach(b: Bench, lab: Lab, net_id: str, pid3: int, iterations: int) -> dict:
    hosts = lab.hosts()
    others = [h for h in hosts if h != "h2"]
    prober = Prober(b, lab, pid3)
    reach, call, prop_h3, prop_all, prop_all_sent, purge, fails = [], [], [], [], [], [], 0
    sent_wall: dict[str, tuple[float, float]] = {}
    with NeighWatch({h: sandbox(lab, h, net_id) for h in others}) as watch:
        for i in range(iterations):
            ip, name = ip_of(i, 4), f"a{i}"
            w_sent, t_sent = time.time(), time.monotonic()
            prober.start(ip, 10.0)
            create_ctr(lab, "h2", name, ip)
            t_ret = time.monotonic()
            sent_wall[name] = (w_sent, t_ret - t_sent)
            t_reply, sent = prober.result(15)
            seen = watch.wait(watch.added, ip, others, 5)
            t_rm = time.monotonic()
            remove_ctr(lab, "h2", name)
            t_rm_ret = time.monotonic()
            gone = watch.wait(watch.removed, ip, others, 5)
            call.append(t_ret - t_sent)
            if t_reply is None:
                fails += 1
            else:
                reach.append(t_reply - t_sent)
            if "h3" in seen:
                prop_h3.append(seen["h3"] - t_ret)
            if len(seen) == len(others):
                prop_all.append(max(seen.values()) - t_ret)
                prop_all_sent.append(max(seen.values()) - t_sent)
            if len(gone) == len(others):
                purge.append(max(gone.values()) - t_rm_ret)
        overruns = watch.overruns
    b.stop(prober.p)
    # Where the create call's time goes: h2's daemon logs "endpoint attached" (ms timestamps) once the
    # overlay endpoint is allocated and wired; what follows is starting the container process.
    attached, started = [], []
    for line in (lab.host_dir("h2") / "netweftd.log").read_text().splitlines():
        if '"endpoint attached"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("container") in sent_wall:
            w_sent, dur = sent_wall.pop(rec["container"])
            attached.append(log_time(rec["time"]) - w_sent)
            started.append(dur - attached[-1])
    show("create call (API, returns when running)", call)
    show("  of which: sent -> 'endpoint attached' logged", attached, extra="  (log has ms resolution)")
    show("  of which: attached -> returned (process start)", started)
    show("create sent -> first ping reply from h3", reach,
         extra=f"  unreachable after 10 s: {fails}" if fails else "")
    print(f"  (probe: an ICMP echo every {PROBE_INTERVAL * 1000:g} ms from c3, where ARP retrans_time_ms is set to "
          f"{ARP_RETRANS_MS} instead of 1000:\n   an ARP sent before the endpoint is programmed gets no answer from "
          f"the VXLAN proxy, and with the default\n   the retry comes 1 s later - as with any proxy-ARP overlay, "
          f"Docker's included)")
    show("create sent -> programmed on all others", prop_all_sent)
    show("create returned -> programmed on all others", prop_all,
         extra="  (negative: before the call returned)" if prop_all and min(prop_all) < 0 else "")
    show("remove returned -> purged on all others", purge)
    if overruns:
        print(f"  warning: {overruns} netlink overruns, some events may be missing")
    return {"reach": reach, "call": call, "prop": prop_all, "prop_sent": prop_all_sent, "purge": purge,
            "fails": fails}


# ------------------------------------------------------------------ (c, 10 hosts)
def bench_propagation(b: Bench, n_hosts: int, samples: int) -> dict:
    t = time.monotonic()
    lab = b.lab(n_hosts)
    print(f"  lab of {n_hosts} hosts up in {time.monotonic() - t:.1f} s")
    try:
        net_id = create_overlay(lab)
        hosts = lab.hosts()
        for k, h in enumerate(hosts):
            create_ctr(lab, h, f"base{h}", f"198.18.0.{10 + k + 1}")
        wait_sandboxes(lab, hosts, net_id)
        base = {f"198.18.0.{10 + k + 1}" for k in range(len(hosts))}
        for h in hosts:
            wait_neigh(lab, h, net_id, base - {f"198.18.0.{10 + hosts.index(h) + 1}"})
        prop, prop_sent, purge, missing = [], [], [], 0
        with NeighWatch({h: sandbox(lab, h, net_id) for h in hosts}) as watch:
            for i in range(samples):
                host = hosts[i % len(hosts)]
                others = [h for h in hosts if h != host]
                ip, name = ip_of(i, 4), f"p{i}"
                t_sent = time.monotonic()
                create_ctr(lab, host, name, ip)
                t_ret = time.monotonic()
                seen = watch.wait(watch.added, ip, others, 5)
                remove_ctr(lab, host, name)
                t_rm = time.monotonic()
                gone = watch.wait(watch.removed, ip, others, 5)
                if len(seen) == len(others):
                    prop.append(max(seen.values()) - t_ret)
                    prop_sent.append(max(seen.values()) - t_sent)
                else:
                    missing += 1
                if len(gone) == len(others):
                    purge.append(max(gone.values()) - t_rm)
            overruns = watch.overruns
        show(f"create sent -> on all {n_hosts - 1} others", prop_sent)
        show(f"create returned -> on all {n_hosts - 1} others", prop,
             extra=f"  not everywhere within 5 s: {missing}" if missing else "")
        show(f"remove returned -> purged on all {n_hosts - 1}", purge)
        if overruns:
            print(f"  warning: {overruns} netlink overruns, some events may be missing")
        return {"prop": prop, "prop_sent": prop_sent, "missing": missing}
    finally:
        b.drop_lab(lab)


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about 1 minute here; the full run about 2.5)")
    ap.add_argument("--hosts", type=int, default=10, help="hosts of the propagation lab (c) (default 10)")
    ap.add_argument("--propagation-only", action="store_true",
                    help="run only (c) in the lab of --hosts hosts (issue 8's check: p99 <= 100 ms at 25 hosts)")
    args = ap.parse_args()
    if not 2 <= args.hosts <= 200:
        raise SystemExit("--hosts: between 2 and 200")
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, raw sockets)")
    sys.setswitchinterval(0.0005)  # the netlink watcher thread timestamps events: keep it responsive
    q = args.quick
    cfg = {"rounds": 2 if q else 5, "seconds": 2 if q else 5, "attach": 50 if q else 200,
           "prop10": 30 if q else 100, "endpoints": 100, "netcreate": 10}
    import netweft
    print(f"bench_overlay {'--quick ' if q else ''}{cfg}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, kernel {os.uname().release}; "
          f"netweft from {os.path.dirname(os.path.dirname(os.path.abspath(netweft.__file__)))}")
    t_start = time.monotonic()
    R: dict = {}
    if args.propagation_only:
        with Bench() as b:
            print(f"\n(c) propagation in a {args.hosts}-host lab, {cfg['prop10']} samples, creates rotating over "
                  "the hosts")
            p = bench_propagation(b, args.hosts, cfg["prop10"])
        p99 = pct(p["prop_sent"], 99)
        print(f"\npropagation, {args.hosts} hosts: p50 {pct(p['prop_sent'], 50) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
              f"(from the create call sent; goal at 25 hosts: p99 <= 100 ms: {'met' if p99 <= 0.1 else 'NOT met'})"
              f"{'; missing: ' + str(p['missing']) if p['missing'] else ''}")
        print(f"total {time.monotonic() - t_start:.0f} s")
        return
    with Bench() as b:
        t = time.monotonic()
        lab = b.lab(3)
        print(f"lab {lab.name}: 3 hosts up in {time.monotonic() - t:.1f} s")
        time.sleep(1.0)  # first heartbeats, watch streams connected

        print("\nnetwork create latency")
        R["net"] = bench_network_create(lab, cfg["netcreate"])

        net_id = create_overlay(lab)
        print(f"\n(e) daemon RSS on a worker (h2)")
        R["rss"] = bench_rss(lab, cfg["endpoints"])

        pids = {}
        for k in (1, 2, 3):
            pids[k] = create_ctr(lab, f"h{k}", f"c{k}", f"198.18.0.1{k}")["State"]["Pid"]
        wait_sandboxes(lab, ["h1", "h2", "h3"], net_id)
        for k in (1, 2, 3):
            wait_neigh(lab, f"h{k}", net_id, {f"198.18.0.1{j}" for j in (1, 2, 3) if j != k})

        print(f"\n(a) iperf3, 1 TCP stream, {cfg['rounds']} rounds x {cfg['seconds']} s (+1 s omitted), alternating")
        R["iperf"] = bench_iperf(b, lab, pids[1], pids[2], cfg["rounds"], cfg["seconds"])

        print(f"\n(b) attach -> reachable from another host, and (c) propagation in a 3-host lab; "
              f"{cfg['attach']} containers on h2, probed from c3 on h3")
        R["attach"] = bench_attach(b, lab, net_id, pids[3], cfg["attach"])
        b.drop_lab(lab)

        print(f"\n(c) propagation in a {args.hosts}-host lab, {cfg['prop10']} samples, creates rotating over the hosts")
        R["prop10"] = bench_propagation(b, args.hosts, cfg["prop10"])
        R["prop_hosts"] = args.hosts

    print("\n(d) FDB/neighbour programming rate: see bench/bench_fdb_rate.py")
    summary(R, q)
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")


def summary(R: dict, quick: bool) -> None:
    a, at, p10, rss, net = R["iperf"], R["attach"], R["prop10"], R["rss"], R["net"]

    def ok(cond: bool) -> str:
        return "yes" if cond else "NO"

    reach50, reach99 = pct(at["reach"], 50), pct(at["reach"], 99)
    rows = [
        ("(a) overlay/underlay TCP throughput", f"{a['ratio']:.3f} ({a['ov']:.1f}/{a['ul']:.1f} Gbit/s)",
         "0.84-0.93", ">= 0.95", ok(a["ratio"] >= 0.95)),
        ("(b) attach -> reachable, p50", f"{reach50 * 1000:.0f} ms", "1.0 s", "<= 50 ms",
         ok(reach50 <= 0.05 and not at["fails"])),
        ("(b) attach -> reachable, p99", f"{reach99 * 1000:.0f} ms", "", "<= 200 ms",
         ok(reach99 <= 0.2 and not at["fails"])),
        ("(c) propagation p99, 3 hosts *", f"{pct(at['prop_sent'], 99) * 1000:.0f} ms "
         f"(p50 {pct(at['prop_sent'], 50) * 1000:.0f})", "", "<= 500 ms", ok(pct(at["prop_sent"], 99) <= 0.5)),
        (f"(c) propagation p99, {R['prop_hosts']} hosts *", f"{pct(p10['prop_sent'], 99) * 1000:.0f} ms "
         f"(p50 {pct(p10['prop_sent'], 50) * 1000:.0f})", "", "<= 500 ms",
         ok(pct(p10["prop_sent"], 99) <= 0.5 and not p10["missing"])),
        ("(d) FDB programming rate", "bench_fdb_rate.py", "", "", ""),
        ("(e) worker daemon RSS, 100 endpoints", f"{rss['rss']:.1f} MiB (0 eps: {rss['rss0']:.1f})",
         "~125 MiB", "<= 40 MiB", ok(rss["rss"] <= 40)),
        ("network create (API / CLI), median", f"{net['api'] * 1000:.0f} / {net['cli'] * 1000:.0f} ms",
         "0.03-0.12 s", "", ""),
    ]
    print(f"\nsummary{' (--quick)' if quick else ''}")
    w = [max(len(r[i]) for r in rows + [("metric", "netweft", "Docker", "goal", "met")]) for i in range(5)]
    line = lambda r: "  " + "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    print(line(("metric", "netweft", "Docker", "goal", "met")))
    print("  " + "  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))
    print("  * measured from the create call being SENT (an upper bound): the entries reach every other host "
          "before the call returns")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; labs and processes removed", file=sys.stderr)
        sys.exit(130)
