"""Containers on one overlay on one host: do `netweft run` and `netweft rm` stay flat from 100 to 4,000?

A 1-host swarm lab with default daemon settings (the gateway bridge's subnet is whatever the daemon picks),
one attachable overlay with a /19. It fills the host through the API (--fill requests at a time: only the
count matters), and at each mark (100, 1,000, 2,000, 4,000, as far as --containers reaches) times, alone,
--window rounds of what a user types: `netweft rm -f NAME` of one of the last containers, then `netweft run
-d --name NAME --network ov -- sleep ...` of it again (so the host holds the mark's count), and prints their
medians and each mark's ratio to the first (the goal: within 1.2x). Filling stops at the first refusal (a
full bridge says so): the count reached is the last mark.
Then one `netweft rm -f` of every container (the CLI, as a user types it), timed; then the first mark is
filled and measured again, since the machine's load drifts (other work on it), and the ratios are taken to
the mean of the first mark's two rounds.
--profile DIR samples the daemon's stacks during each mark's window and the `rm -f` of all (the sampler in
bench/sampler/; summarize a file with bench/samples_top.py).
Everything is removed at the end, also on Ctrl-C.

    sudo .venv/bin/python bench/bench_scale.py                      # 100 and 1,000
    sudo .venv/bin/python bench/bench_scale.py --containers 4000    # 100, 1,000, 2,000 and 4,000
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, daemon_pid, median, rss_kib  # noqa: E402

BIN = Path(sys.executable).parent
NETWEFT = str(BIN / "netweft")
MARKS = (100, 1000, 2000, 4000)
CMD = ["sleep", "1000000"]


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--containers", type=int, default=1000, help="the largest mark reached (4000 for all four)")
    p.add_argument("--window", type=int, default=30, help="`rm -f` and `run -d` commands timed at each mark")
    p.add_argument("--fill", type=int, default=4, help="API requests at a time while filling")
    p.add_argument("--profile", metavar="DIR", help="stack samples of the daemon at each mark, into DIR")
    args = p.parse_args()
    n, w = args.containers, args.window
    marks = [m for m in MARKS if m <= n] or [n]
    if args.profile:   # the daemon inherits these: bench/sampler/sitecustomize.py, toggled with SIGUSR2
        os.makedirs(args.profile, exist_ok=True)
        os.environ["NETWEFT_BENCH_SAMPLES"] = os.path.abspath(args.profile)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "sampler"),
                                                                 os.environ.get("PYTHONPATH")]))
    results: list[tuple[int, float, float, float]] = []   # (mark, run median, rm median, load)
    with Bench() as b:
        lab = b.lab(1)
        env = {**os.environ, "NETWEFT_HOST": lab.socket("h1")}
        c = lab.client("h1", timeout=600)
        c.call("POST", "/networks/create", {"Name": "ov", "Driver": "overlay", "Attachable": True,
                                            "IPAM": {"Config": [{"Subnet": "198.18.0.0/19"}]}})
        pid = daemon_pid(lab, "h1")
        names: list[str] = []        # the containers on the host, in the order they were made
        refused: list[Exception] = []

        def profile() -> None:
            if args.profile:
                os.kill(pid, signal.SIGUSR2)

        def fill(to: int) -> float:
            """Containers made through the API, --fill at a time, until the host holds `to`."""
            t0 = time.perf_counter()
            lock = threading.Lock()
            nxt = [len(names)]

            def worker() -> None:
                client = lab.client("h1", timeout=600)
                while not refused:
                    with lock:
                        if nxt[0] >= to:
                            return
                        name = f"s{nxt[0]}"
                        nxt[0] += 1
                    try:
                        client.call("POST", "/containers/create", {"Name": name, "NetworkMode": "ov", "Cmd": CMD})
                    except Exception as e:   # a full bridge or subnet: the count reached is the last mark
                        refused.append(e)
                        return
                    with lock:
                        names.append(name)
                        if len(names) % 500 == 0:
                            print(f"  {len(names)} containers, daemon RSS {rss_kib(pid) / 1024:.0f} MiB "
                                  f"(load {load():.1f})", flush=True)
            threads = [threading.Thread(target=worker) for _ in range(args.fill)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if refused:
                print(f"  container {len(names) + 1} refused: {refused[0]}", flush=True)
            return time.perf_counter() - t0

        def cli(*argv: str) -> float:
            t = time.perf_counter()
            r = subprocess.run([NETWEFT, *argv], env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(f"netweft {' '.join(argv[:3])}... failed: {r.stderr.strip()[-300:]}")
            return dt

        def measure(m: int) -> None:
            """`rm -f` then `run -d` of each of the last --window containers, one command at a time."""
            profile()
            rms, runs = [], []
            for name in names[-w:]:
                rms.append(cli("rm", "-f", name))
                runs.append(cli("run", "-d", "--name", name, "--network", "ov", "--", *CMD))
            profile()
            results.append((m, median(runs), median(rms), load()))
            print(f"  at {m:>5} containers: netweft run -d median {median(runs) * 1000:6.1f} ms, "
                  f"netweft rm -f median {median(rms) * 1000:6.1f} ms (load {load():.1f})", flush=True)

        t_fill = 0.0
        for m in marks:
            t_fill += fill(m)
            if len(names) < m:
                if not results or len(names) > results[-1][0] + w:
                    measure(len(names))
                break
            measure(m)
        print(f"{len(names)} containers on one overlay, one host: filled in {t_fill:.0f} s through the API "
              f"({args.fill} at a time); daemon RSS {rss_kib(pid) / 1024:.0f} MiB (load {load():.1f})", flush=True)

        profile()
        t = time.perf_counter()
        r = subprocess.run([NETWEFT, "rm", "-f", *names], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        profile()
        gone = len(r.stdout.split())
        print(f"  one netweft rm -f of all {len(names)}: {dt:.1f} s ({dt / max(1, len(names)) * 1000:.1f} ms "
              f"each; {gone} removed; load {load():.1f})"
              f"{'' if r.returncode == 0 else ' FAILED: ' + r.stderr.strip()[-300:]}", flush=True)
        left = c.call("GET", "/containers/json", all=1)
        if left:
            print(f"  {len(left)} containers left after it", flush=True)
        print(f"  daemon RSS after: {rss_kib(pid) / 1024:.0f} MiB", flush=True)
        # The first mark again: the machine's load drifts, so the marks are compared with the mean of the
        # first mark's two rounds, one before and one after.
        names.clear()
        refused.clear()
        m0 = marks[0]
        if len(results) > 1:
            fill(m0)
            measure(m0)
        print(f"  {'containers':>10}  {'run ms':>7}  {'rm ms':>7}  {'load':>5}")
        for m, run, rm, ld in results:
            print(f"  {m:>10}  {run * 1000:7.1f}  {rm * 1000:7.1f}  {ld:5.1f}")
        firsts = [r for r in results if r[0] == m0]
        run0 = sum(r[1] for r in firsts) / len(firsts)
        rm0 = sum(r[2] for r in firsts) / len(firsts)
        for m, run, rm, _ in results[1:]:
            if m != m0:
                print(f"  {m} vs {m0} containers (mean of the {len(firsts)} rounds at {m0}): "
                      f"run {run / run0:.2f}x, rm {rm / rm0:.2f}x (goal: <= 1.2)")
        subprocess.run([NETWEFT, "rm", "-f", *names], env=env, capture_output=True, text=True)


if __name__ == "__main__":
    main()
