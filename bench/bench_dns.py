"""Queries per second and latency of a host's resolver (127.0.0.11 in containers), measured with dnsperf.

Builds a 1-host lab (no swarm), a bridge network with NAMES containers (container names and aliases are
what is asked), and runs dnsperf inside one more container's network namespace against 127.0.0.11:
  - throughput: as fast as dnsperf can (100 queries outstanding), for --seconds; q/s reported;
  - latency at 1,000 q/s (-Q 1000), every answer's latency read from dnsperf -v: median and p99.
Several rounds, medians printed. The lab is removed at the end, also on failure or Ctrl-C.
Goal (issue 9): >= 20,000 q/s, p99 <= 1 ms at 1,000 q/s.

    sudo .venv/bin/python bench/bench_dns.py [--rounds 3] [--seconds 5] [--names 20]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _lab import Bench, in_pid_netns, pct  # noqa: E402


def cli(lab, host, *args) -> str:
    argv, env = lab.exec_argv(host, ["netweft", *args])
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout


def dnsperf(pid: int, datafile: str, seconds: float, qps: int | None, verbose: bool) -> str:
    argv = ["dnsperf", "-s", "127.0.0.11", "-d", datafile, "-l", str(seconds), "-c", "1", "-q", "100"]
    if qps:
        argv += ["-Q", str(qps)]
    if verbose:
        argv += ["-v"]
    r = subprocess.run(in_pid_netns(pid, argv), capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise SystemExit(f"dnsperf failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--names", type=int, default=20)
    a = p.parse_args()
    with Bench() as b, tempfile.TemporaryDirectory(prefix="nwt-bench-dns-") as tmp:
        lab = b.lab(1, prefix="b")
        lab_host = lab.hosts()[0]
        cli(lab, lab_host, "network", "create", "--subnet", "198.19.210.0/24", "dnsnet")
        names = []
        for i in range(a.names):
            cli(lab, lab_host, "run", "-d", "--name", f"t{i}", "--network", "dnsnet", "--network-alias",
                f"svc{i}", "--", "sleep", "infinity")
            names += [f"t{i}", f"svc{i}"]
        cli(lab, lab_host, "run", "-d", "--name", "asker", "--network", "dnsnet", "--", "sleep", "infinity")
        pid = json.loads(cli(lab, lab_host, "inspect", "asker"))[0]["State"]["Pid"]
        datafile = os.path.join(tmp, "queries")
        with open(datafile, "w") as f:
            f.write("".join(f"{n} A\n" for n in names))
        qps, p50s, p99s, lost = [], [], [], []
        for r in range(a.rounds):
            out = dnsperf(pid, datafile, a.seconds, None, False)
            m = re.search(r"Queries per second:\s+([\d.]+)", out)
            qps.append(float(m.group(1)))
            lost.append(re.search(r"Queries lost:\s+(\d+)", out).group(1))
            out = dnsperf(pid, datafile, a.seconds, 1000, True)
            lat = [float(x) * 1000 for x in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)]
            if not lat:
                raise SystemExit("dnsperf -v printed no latencies; see its output:\n" + out[-1000:])
            p50s.append(pct(lat, 50))
            p99s.append(pct(lat, 99))
            print(f"  round {r + 1}: {qps[-1]:,.0f} q/s (lost {lost[-1]}); at 1,000 q/s: median "
                  f"{p50s[-1]:.3f} ms, p99 {p99s[-1]:.3f} ms ({len(lat)} answers)")
        print(f"resolver, {len(names)} names, {a.rounds} rounds of {a.seconds:g} s (medians): "
              f"{statistics.median(qps):,.0f} q/s (goal >= 20,000); at 1,000 q/s median "
              f"{statistics.median(p50s):.3f} ms, p99 {statistics.median(p99s):.3f} ms (goal <= 1 ms)")


if __name__ == "__main__":
    main()
