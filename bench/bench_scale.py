"""Containers on one overlay on one host: does `run` / `rm` stay flat from 100 to N (4,000 by default)?

A 1-host swarm lab with default daemon settings (the gateway bridge's subnet is whatever the daemon picks),
one attachable overlay with a /20, then N containers (`sleep`) through the API one after another, each
call timed. Prints the median create time per window (the first 100, around 1,000, ..., the last 100)
and the ratio last/first; then `rm` of 100 single containers at full size, and one `netweft rm -f` of all
the rest (the CLI, as a user types it), timed. Everything is removed at the end, also on Ctrl-C.

    sudo .venv/bin/python bench/bench_scale.py [--containers 4000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, daemon_pid, median, rss_kib  # noqa: E402

NETWEFT = str(Path(sys.executable).parent / "netweft")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--containers", type=int, default=4000)
    p.add_argument("--window", type=int, default=100)
    args = p.parse_args()
    n, w = args.containers, args.window
    with Bench() as b:
        lab = b.lab(1)
        c = lab.client("h1", timeout=600)
        c.call("POST", "/networks/create", {"Name": "ov", "Driver": "overlay", "Attachable": True,
                                            "IPAM": {"Config": [{"Subnet": "198.18.0.0/20"}]}})
        create: list[float] = []
        t_all = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            try:
                c.call("POST", "/containers/create", {"Name": f"s{i}", "NetworkMode": "ov",
                                                      "Cmd": ["sleep", "1000000"]})
            except Exception as e:
                print(f"container {i + 1} of {n} failed: {e}")
                n = i
                break
            create.append(time.perf_counter() - t)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1} containers, last {w} creates median {median(create[-w:]) * 1000:.1f} ms, "
                      f"daemon RSS {rss_kib(daemon_pid(lab, 'h1')) / 1024:.0f} MiB", flush=True)
        t_all = time.perf_counter() - t_all
        if n < 2 * w:
            raise SystemExit("too few containers to compare")
        first, last = median(create[:w]), median(create[-w:])
        print(f"{n} containers on one overlay, one host: created in {t_all:.0f} s")
        marks = sorted({w, *range(1000, n, 1000), n})
        for m in marks:
            print(f"  create, containers {m - w + 1:>5}-{m:<5} median {median(create[m - w:m]) * 1000:6.1f} ms")
        print(f"  create: last {w} / first {w} = {last / first:.2f} (goal <= 1.2)")
        rm_single = []
        for i in range(n - 1, n - 1 - w, -1):
            t = time.perf_counter()
            c.call("DELETE", f"/containers/s{i}", force=1)
            rm_single.append(time.perf_counter() - t)
        print(f"  rm -f one container at {n} containers: median {median(rm_single) * 1000:.1f} ms")
        rest = [f"s{i}" for i in range(n - w)]
        env = {**os.environ, "NETWEFT_HOST": lab.socket("h1")}
        t = time.perf_counter()
        r = subprocess.run([NETWEFT, "rm", "-f", *rest], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        print(f"  netweft rm -f of the other {len(rest)} containers: {dt:.1f} s "
              f"({dt / len(rest) * 1000:.1f} ms each){'' if r.returncode == 0 else ' FAILED: ' + r.stderr[-300:]}")
        print(f"  daemon RSS after: {rss_kib(daemon_pid(lab, 'h1')) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
