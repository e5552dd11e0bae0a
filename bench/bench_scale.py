"""Containers on one overlay on one host: do `run` and `rm` stay flat from 100 to 1,000 to 4,000?

A 1-host swarm lab with default daemon settings (the gateway bridge's subnet is whatever the daemon picks),
one attachable overlay with a /20, then containers (`sleep`) through the API one after another. At each
mark (100, 1,000, 4,000, as far as --containers reaches) it times `rm -f` of the last window of containers
and `run` (create and start) of as many again, so the host holds the mark's count, and prints their
medians. Filling stops at the first refusal (a full bridge says so): the count reached is the last mark.
Then one `netweft rm -f` (the CLI, as a user types it) of every container above the first mark, timed, the
first mark measured again, and each mark's ratio to the first's two rounds printed (the goal: within 1.2x);
then one `rm -f` of the rest.
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
    results: list[tuple[int, float, float, float]] = []
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

        def measure(m: int) -> None:
            """rm -f, then run again, of the last window of containers: the host holds m of them."""
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            last = [f"s{i}" for i in range(m - w, m)]
            rms = [rm_one(c, name) for name in last]
            runs = [run_one(c, name) for name in last]
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            load = os.getloadavg()[0]
            results.append((m, median(runs), median(rms), load))
            print(f"  at {m:>5} containers: run median {median(runs) * 1000:6.1f} ms, "
                  f"rm -f median {median(rms) * 1000:6.1f} ms (load {load:.1f})", flush=True)

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
            measure(m)
        print(f"{made} containers on one overlay, one host (filled in {t_fill:.0f} s); "
              f"daemon RSS {rss_kib(pid) / 1024:.0f} MiB")
        env = {**os.environ, "NETWEFT_HOST": lab.socket("h1")}

        def rm_many(names: list[str]) -> None:
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            t = time.perf_counter()
            r = subprocess.run([NETWEFT, "rm", "-f", *names], env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t
            if args.profile:
                os.kill(pid, signal.SIGUSR2)
            print(f"  netweft rm -f of {len(names)} containers at once: {dt:.1f} s "
                  f"({dt / len(names) * 1000:.1f} ms each, load {os.getloadavg()[0]:.1f})"
                  f"{'' if r.returncode == 0 else ' FAILED: ' + r.stderr[-300:]}", flush=True)
        # Back to the first mark, measured again: the machine's load drifts (other work on it), so the largest
        # mark is compared with the first measured before and after it.
        m0 = results[0][0]
        if made > m0:
            rm_many([f"s{i}" for i in range(m0, made)])
            measure(m0)
        print(f"  {'containers':>10}  {'run ms':>7}  {'rm ms':>7}  {'load':>5}")
        for m, run, rm, load in results:
            print(f"  {m:>10}  {run * 1000:7.1f}  {rm * 1000:7.1f}  {load:5.1f}")
        firsts = [r for r in results if r[0] == m0]
        run0, rm0 = (sum(r[1] for r in firsts) / len(firsts), sum(r[2] for r in firsts) / len(firsts))
        for m, run, rm, _ in results:
            if m != m0:
                print(f"  {m} vs {m0} containers (mean of the {len(firsts)} rounds at {m0}): "
                      f"run {run / run0:.2f}x, rm {rm / rm0:.2f}x (goal: <= 1.2)")
        rm_many([f"s{i}" for i in range(min(made, m0))])
        print(f"  daemon RSS after: {rss_kib(pid) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
