"""Daemon memory on a worker: idle, with N local overlay endpoints, and after they are removed.

netweft: a 2-host lab (h1 manager, h2 worker), one overlay network, N containers (`sleep`) on h2 through the API.
Printed: VmRSS of h2's netweftd (right after it joined, and idle after a restart: a worker day to day) (the daemon only: the host's container supervisor is a separate process,
as containerd-shims are outside dockerd), median of a few samples, plus its anonymous part (RssAnon) and the
number of Python modules it would import (`python -X importtime -c 'import netweft.daemon.main'`).
Docker (where dockerd runs here): dockerd + containerd VmRSS idle, in the same run. Docker with N containers
is bench/bench_container_memory.py's job (a `docker run` costs about 0.5 s here).

    sudo .venv/bin/python bench/bench_daemon_memory.py [--endpoints 1000] [--no-docker] [--compare GITREF]

--compare GITREF measures the daemon of that commit first (its netweft/ exported to a temporary directory and put
first on the daemons' PYTHONPATH, same venv), then this tree's, in the same run: before and after side by side.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lab import Bench, children, daemon_pid, median  # noqa: E402

MIB = 1024.0
OV = "memov"
SUBNET = "198.18.0.0/17"  # room for 32k endpoints


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss(pid: int, samples: int = 5) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MiB, medians of a few samples 0.2 s apart."""
    tot, anon = [], []
    for _ in range(samples):
        tot.append(status_kib(pid, "VmRSS"))
        anon.append(status_kib(pid, "RssAnon"))
        time.sleep(0.2)
    return median(tot) / MIB, median(anon) / MIB


def breakdown(pid: int, top: int = 8) -> str:
    """Where the resident memory is: anonymous (the Python heap: objects, code objects of loaded modules) and the
    largest file mappings (the interpreter, libraries, compiled extensions), from /proc/PID/smaps."""
    by: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5 and not line.startswith(("Rss", "Size")):
                path = first[5].strip() if len(first) == 6 else ""
                name = os.path.basename(path) if path.startswith("/") else "[anon]" if not path else path
            elif line.startswith("Rss:"):
                by[name] = by.get(name, 0) + int(line.split()[1])
    items = sorted(by.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / MIB:.1f}" for k, v in items[:top] if v)


def ip_of(i: int) -> str:
    return f"198.18.{1 + i // 250}.{1 + i % 250}"


def imported_modules() -> int:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import netweft.daemon.main"],
                       capture_output=True, text=True, check=True, cwd="/")
    return sum(1 for line in r.stderr.splitlines() if line.startswith("import time:") and "|" in line) - 1


def create_overlay(lab) -> None:
    """Create the overlay at the manager h1 and wait until the worker h2 has it."""
    lab.client("h1").call("POST", "/networks/create", {
        "Name": OV, "Driver": "overlay", "Attachable": True, "IPAM": {"Config": [{"Subnet": SUBNET}]}})
    deadline = time.monotonic() + 30
    while True:  # the worker learns the network from the manager's watch stream
        try:
            lab.client("h2").call("GET", f"/networks/{OV}")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def netweft_figures(b: Bench, n: int, workers: int) -> dict:
    lab = b.lab(2, prefix="m")
    time.sleep(3.0)  # first heartbeats, watch stream connected, startup garbage settled
    R = {"joined": rss(daemon_pid(lab, "h2"))}
    print(f"  h2 netweftd right after joining (the join loaded cryptography): VmRSS {R['joined'][0]:.1f} MiB "
          f"(anon {R['joined'][1]:.1f})", flush=True)
    # A worker day to day: the daemon restarted since it joined (cryptography loads again only to renew).
    lab.stop_daemon("h2")
    lab.start_daemon("h2")
    pid = daemon_pid(lab, "h2")
    time.sleep(3.0)
    R["idle"] = rss(pid)
    print(f"  h2 netweftd (pid {pid}) idle worker, restarted: VmRSS {R['idle'][0]:.1f} MiB "
          f"(anon {R['idle'][1]:.1f})", flush=True)
    print(f"    resident MiB by mapping: {breakdown(pid)}", flush=True)
    create_overlay(lab)

    def create(i: int) -> None:
        lab.client("h2").call("POST", "/containers/create", {
            "Name": f"e{i}", "NetworkMode": OV, "IPAddress": ip_of(i), "Cmd": ["sleep", "100000"]})

    def remove(i: int) -> None:
        lab.client("h2").call("DELETE", f"/containers/e{i}", force=1)

    t = time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(create, range(n)))
    R["create_s"] = time.monotonic() - t
    time.sleep(2.0)  # deferred store saves
    R["with"] = rss(pid)
    print(f"  with {n} local endpoints (created in {R['create_s']:.0f} s): VmRSS {R['with'][0]:.1f} MiB "
          f"(anon {R['with'][1]:.1f})", flush=True)
    print(f"    resident MiB by mapping: {breakdown(pid)}", flush=True)
    t = time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(remove, range(n)))
    R["rm_s"] = time.monotonic() - t
    time.sleep(2.0)
    R["after"] = rss(pid)
    print(f"  after removing them (in {R['rm_s']:.0f} s): VmRSS {R['after'][0]:.1f} MiB "
          f"(anon {R['after'][1]:.1f})", flush=True)
    b.drop_lab(lab)
    return R


def docker_idle() -> tuple[float, float] | None:
    from _docker import Dockerd
    d = Dockerd()
    try:
        d.start()
        time.sleep(3.0)
        procs = [d.proc.pid, *children(d.proc.pid)]
        tot = sum(status_kib(p, "VmRSS") for p in procs) / MIB
        anon = sum(status_kib(p, "RssAnon") for p in procs) / MIB
        return tot, anon
    except Exception as e:
        print(f"  docker: not measured: {e}")
        return None
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=4, help="API calls in flight while creating/removing")
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--compare", metavar="GITREF", help="measure that commit's daemon too, first, in the same run")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces)")
    import netweft
    print(f"bench_daemon_memory: {args.endpoints} endpoints; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}; netweft from "
          f"{os.path.dirname(os.path.dirname(os.path.abspath(netweft.__file__)))}")
    runs: list[tuple[str, dict]] = []
    if args.compare:
        import tempfile
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with tempfile.TemporaryDirectory(prefix="nwt-bench-") as tree:
            subprocess.run(f"git -C {src} archive {args.compare} netweft | tar -x -C {tree}", shell=True, check=True)
            os.environ["PYTHONPATH"] = tree
            try:
                print(f"  {args.compare}: modules imported by `import netweft.daemon.main`: {imported_modules()}")
                with Bench() as b:
                    runs.append((args.compare, netweft_figures(b, args.endpoints, args.parallel)))
            finally:
                del os.environ["PYTHONPATH"]
        print(f"  load {os.getloadavg()[0]:.2f}; now this tree", flush=True)
    print(f"  modules imported by `import netweft.daemon.main`: {imported_modules()}")
    with Bench() as b:
        runs.append(("this tree" if args.compare else "", netweft_figures(b, args.endpoints, args.parallel)))
    R = runs[-1][1]
    dk = None if args.no_docker else docker_idle()
    n = args.endpoints
    print(f"\nsummary (VmRSS MiB; anon in parentheses); load {os.getloadavg()[0]:.2f}")
    print(f"  {'':<32}{'idle':>14}{f'{n} endpoints':>16}{'after removal':>16}{'right after joining':>22}")
    f = lambda x: f"{x[0]:.1f} ({x[1]:.1f})"  # noqa: E731
    for name, r in runs:
        label = f"netweftd (worker) {name}"
        print(f"  {label:<32}{f(r['idle']):>14}{f(r['with']):>16}{f(r['after']):>16}{f(r['joined']):>22}")
    if dk:
        print(f"  {'dockerd + containerd':<32}{f(dk):>14}{'-':>16}{'-':>16}")
    print(f"  targets: idle <= 40 MiB: {'yes' if R['idle'][0] <= 40 else 'NO'}; "
          f"with 1,000 endpoints <= 60 MiB: {'yes' if R['with'][0] <= 60 else 'NO'}"
          f"{'' if n == 1000 else f' (measured with {n})'}")


if __name__ == "__main__":
    main()
