"""Queries per second and latency of a host's resolver (127.0.0.11 in containers), measured with dnsperf, netweft's
and Docker's side by side.

netweft: a 1-host lab (a swarm of one), a bridge network with NAMES containers (container names and aliases are
what is asked), and a dnsrr service of 3 tasks on an overlay (its name and tasks.NAME are asked).
Docker (20.10, where it runs: a dockerd in its own namespace, bench/_docker.py): the same on a user-defined
bridge network (its embedded DNS, 127.0.0.11 in each container), and a swarm of one with a dnsrr service on an
attachable overlay. In each case dnsperf runs inside one more container's network namespace against 127.0.0.11:
  - throughput: as fast as dnsperf can (100 queries outstanding), for --seconds; q/s reported;
  - latency at 1,000 q/s (-Q 1000), every answer's latency read from dnsperf -v: median and p99.
Several rounds, netweft and Docker interleaved, medians printed. The lab and dockerd (its namespace, state and
containers) are removed at the end, also on failure or Ctrl-C.
Goal (issue 9): >= 20,000 q/s, p99 <= 1 ms at 1,000 q/s.

    sudo .venv/bin/python bench/bench_dns.py [--rounds 3] [--seconds 5] [--names 20] [--no-docker]
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
import time

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


def measure(pid: int, datafile: str, seconds: float) -> tuple[float, str, float, float, int]:
    """One round: (q/s, queries lost, median ms, p99 ms, answers) against 127.0.0.11 in pid's namespace."""
    out = dnsperf(pid, datafile, seconds, None, False)
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    qps = float(m.group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", out).group(1)
    noerror = re.search(r"NOERROR (\d+)", out)
    if noerror is None:
        raise SystemExit("no NOERROR answers: the names do not resolve; dnsperf said:\n" + out[-1000:])
    out = dnsperf(pid, datafile, seconds, 1000, True)
    lat = [float(x) * 1000 for x in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M)]
    if not lat:
        raise SystemExit("dnsperf -v printed no latencies; see its output:\n" + out[-1000:])
    return qps, lost, pct(lat, 50), pct(lat, 99), len(lat)


def netweft_cases(lab, host: str, names: int, tmp: str) -> dict[str, tuple[int, str]]:
    """Case -> (the asking container's pid, its query file)."""
    cli(lab, host, "network", "create", "--subnet", "198.19.210.0/24", "dnsnet")
    asked = []
    for i in range(names):
        cli(lab, host, "run", "-d", "--name", f"t{i}", "--network", "dnsnet", "--network-alias",
            f"svc{i}", "--", "sleep", "infinity")
        asked += [f"t{i}", f"svc{i}"]
    cli(lab, host, "run", "-d", "--name", "asker", "--network", "dnsnet", "--", "sleep", "infinity")
    cases = {"names": (pid_of(lab, host, "asker"), query_file(tmp, "names", asked))}
    cli(lab, host, "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.19.211.0/24", "ov")
    cli(lab, host, "service", "create", "--name", "rr", "--replicas", "3", "--endpoint-mode", "dnsrr",
        "--network", "ov", "--", "sleep", "infinity")
    cli(lab, host, "run", "-d", "--name", "asker2", "--network", "ov", "--", "sleep", "infinity")
    cases["dnsrr"] = (pid_of(lab, host, "asker2"), query_file(tmp, "dnsrr", ["rr", "tasks.rr"]))
    return cases


def pid_of(lab, host: str, ctr: str) -> int:
    return json.loads(cli(lab, host, "inspect", ctr))[0]["State"]["Pid"]


def query_file(tmp: str, case: str, names: list[str]) -> str:
    path = os.path.join(tmp, f"queries-{case}")
    with open(path, "w") as f:
        f.write("".join(f"{n} A\n" for n in names))
    return path


def docker_cases(d, names: int, tmp: str) -> dict[str, tuple[int, str]]:
    """The same cases on Docker: a user-defined network's names, a swarm dnsrr service's."""
    from _docker import import_busybox
    img = import_busybox(d)
    d.cli("network", "create", "--subnet", "198.18.65.0/24", "dnsnet")
    asked = []
    for i in range(names):
        d.cli("run", "-d", "--name", f"t{i}", "--network", "dnsnet", "--network-alias", f"svc{i}", img,
              "sleep", "1000000")
        asked += [f"t{i}", f"svc{i}"]
    d.cli("run", "-d", "--name", "asker", "--network", "dnsnet", img, "sleep", "1000000")
    cases = {"names": (docker_pid(d, "asker"), query_file(tmp, "dk-names", asked))}
    try:
        d.swarm_init()
        d.cli("network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.66.0/24", "ov")
        d.cli("service", "create", "--name", "rr", "--replicas", "3", "--endpoint-mode", "dnsrr", "--network",
              "ov", "--detach", img, "sleep", "1000000")
        deadline = time.monotonic() + 90
        while d.cli("service", "ls", "--format", "{{.Replicas}}").stdout.strip() != "3/3":
            if time.monotonic() > deadline:
                raise RuntimeError("the dnsrr service's 3 tasks did not run within 90 s: " +
                                   d.cli("service", "ps", "--no-trunc", "rr").stdout[-800:])
            time.sleep(0.5)
        d.cli("run", "-d", "--name", "asker2", "--network", "ov", img, "sleep", "1000000")
        cases["dnsrr"] = (docker_pid(d, "asker2"), query_file(tmp, "dk-dnsrr", ["rr", "tasks.rr"]))
    except RuntimeError as e:
        print(f"Docker dnsrr service: not measured here: {str(e)[:400]}", file=sys.stderr)
    return cases


def docker_pid(d, ctr: str) -> int:
    return int(d.cli("inspect", "-f", "{{.State.Pid}}", ctr).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--names", type=int, default=20)
    p.add_argument("--no-docker", action="store_true", help="measure netweft only")
    a = p.parse_args()
    from _docker import Dockerd
    dockerd = None
    with Bench() as b, tempfile.TemporaryDirectory(prefix="nwt-bench-dns-") as tmp:
        try:
            lab = b.lab(1, prefix="b")
            cases = {("netweft", k): v for k, v in netweft_cases(lab, lab.hosts()[0], a.names, tmp).items()}
            if not a.no_docker:
                try:
                    dockerd = Dockerd().start()
                    cases.update({("Docker", k): v for k, v in docker_cases(dockerd, a.names, tmp).items()})
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    print(f"Docker: not measured here: {str(e)[:400]}", file=sys.stderr)
            got: dict[tuple[str, str], list] = {k: [] for k in cases}
            for r in range(a.rounds):
                for key, (pid, datafile) in cases.items():   # interleaved: the machine's noise hits both
                    qps, lost, p50, p99, n = measure(pid, datafile, a.seconds)
                    got[key].append((qps, p50, p99))
                    print(f"  round {r + 1} {key[0]:7} {key[1]:5}: {qps:,.0f} q/s (lost {lost}); at 1,000 q/s: "
                          f"median {p50:.3f} ms, p99 {p99:.3f} ms ({n} answers)")
        finally:
            if dockerd is not None:
                dockerd.stop()
        what = {"names": f"{2 * a.names} container names and aliases", "dnsrr": "dnsrr service (rr, tasks.rr)"}
        print(f"\nresolver at 127.0.0.11, {a.rounds} rounds of {a.seconds:g} s, medians "
              "(goal: >= 20,000 q/s, p99 <= 1 ms at 1,000 q/s):")
        print(f"  {'case':38} {'engine':8} {'q/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for case in ("names", "dnsrr"):
            for engine in ("netweft", "Docker"):
                rows = got.get((engine, case))
                if not rows:
                    print(f"  {what[case]:38} {engine:8} {'not measured':>27}")
                    continue
                print(f"  {what[case]:38} {engine:8} {statistics.median(x[0] for x in rows):9,.0f} "
                      f"{statistics.median(x[1] for x in rows):8.3f} {statistics.median(x[2] for x in rows):8.3f}")


if __name__ == "__main__":
    main()
