"""Containers on one overlay on one host: do `run` and `rm` stay flat from 100 to 1,000 to 4,000?

A 1-host swarm lab with default daemon settings (the gateway bridge's subnet is whatever the daemon picks),
one attachable overlay with a /20, then containers (`sleep`) through the API one after another. At each
mark (100, 1,000, 4,000, as far as --containers reaches) it times `rm -f` of the last window of containers
and `run` (create and start) of as many again, so the host holds the mark's count, and prints their
medians and the ratio to the first mark (the goal: within 1.2x). Filling stops at the first refusal (a
full bridge says so): the count reached is the last mark. Then one `netweft rm -f` of every container
(the CLI, as a user types it), timed.
--profile DIR samples the daemon's stacks during each mark's window and the final `rm -f` (the sampler in
bench/sampler/; summarize a file with bench/samples_top.py).
Everything is removed at the end, also on Ctrl-C.

    sudo .venv/bin/python bench/bench_scale.py                      # 100 and 1,000
    sudo .venv/bin/python bench/bench_scale.py --containers 4000    # 100, 1,000 and 4,000
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, daemon_pid, median, rss_kib  # noqa: E402

BIN = Path(sys.executable).parent
NETWEFT = str(BIN / "netweft")
MARKS = (100, 1000, 4000)


def run_one(c, name: str) -> float:
    t = time.perf_counter()
    c.call("POST", "/containers/create", {"Name": name, "NetworkMode": "ov", "Cmd": ["sleep", "1000000"]})
    return time.perf_counter() - t


def rm_one(c, name: str) -> float:
    t = time.perf_counter()
    c.call("DELETE", f"/containers/{name}", force=1)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--containers", type=int, default=1000, help="the largest mark reached (4000 for all three)")
    p.add_argument("--window", type=int, default=50, help="runs and rms timed at each mark")
    p.add_argument("--profile", metavar="DIR", help="stack samples of the daemon at each mark, into DIR")
    args = p.parse_args()
    n, w = args.containers, args.window
    marks = [m for m in MARKS if m <= n] or [n]
    results: list[tuple[int, float, float]] = []
    if args.profile:   # the daemon inherits these: bench/sampler/sitecustomize.py, toggled with SIGUSR2
        os.makedirs(args.profile, exist_ok=True)
        os.environ["NETWEFT_BENCH_SAMPLES"] = os.path.abspath(args.profile)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "sampler"),
                                                                 os.environ.get("PYTHONPATH")]))
    with Bench() as b:
        lab = b.lab(1)
        c = lab.client("h1", timeout=600)
        c.call("POST", "/networks/create", {"Name": "ov", "Driver": "overlay", "Attachable": True,
                                            "IPAM": {"Config": [{"Subnet": "198.18.0.0/20"}]}})
        pid = daemon_pid(lab, "h1")
        made, t_fill, refused = 0, 0.0, None
        for m in marks:
            t = time.perf_counter()
            while made < m and refused is None:
                try:
                    run_one(c, f"s{made}")
                except Exception as e:
                    refused = e
                    print(f"  container {made + 1} refused: {e}", flush=True)
                    break
                made += 1
                if made % 500 == 0:
                    print(f"  {made} containers, daemon RSS {rss_kib(pid) / 1024:.0f} MiB", flush=True)
            t_fill += time.perf_counter() - t
            if made < m:
                m = made
                if results and m <= results[-1][0] + w:
                    break
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            last = [f"s{i}" for i in range(m - w, m)]
            rms = [rm_one(c, name) for name in last]
            runs = [run_one(c, name) for name in last]
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            results.append((m, median(runs), median(rms)))
            print(f"  at {m:>5} containers: run median {median(runs) * 1000:6.1f} ms, "
                  f"rm -f median {median(rms) * 1000:6.1f} ms (load {os.getloadavg()[0]:.1f})", flush=True)
        print(f"{made} containers on one overlay, one host (filled in {t_fill:.0f} s); "
              f"daemon RSS {rss_kib(pid) / 1024:.0f} MiB")
        m0, run0, rm0 = results[0]
        print(f"  {'containers':>10}  {'run ms':>7}  {'rm ms':>7}  {'run/first':>9}  {'rm/first':>8}")
        for m, run, rm in results:
            print(f"  {m:>10}  {run * 1000:7.1f}  {rm * 1000:7.1f}  {run / run0:9.2f}  {rm / rm0:8.2f}")
        print("  (goal: run/first and rm/first <= 1.2)")
        names = [f"s{i}" for i in range(made)]
        env = {**os.environ, "NETWEFT_HOST": lab.socket("h1")}
        if args.profile:
            os.kill(pid, signal.SIGUSR2)
        t = time.perf_counter()
        r = subprocess.run([NETWEFT, "rm", "-f", *names], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if args.profile:
            os.kill(pid, signal.SIGUSR2)
        print(f"  netweft rm -f of all {len(names)} containers: {dt:.1f} s "
              f"({dt / len(names) * 1000:.1f} ms each, load {os.getloadavg()[0]:.1f})"
              f"{'' if r.returncode == 0 else ' FAILED: ' + r.stderr[-300:]}")
        print(f"  daemon RSS after: {rss_kib(pid) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
