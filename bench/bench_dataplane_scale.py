"""The overlay data plane alone at 100 and 1,000 endpoints in one sandbox: does a port's attach and detach cost
the same? No daemon, no manager: one Overlay in a scratch host namespace, a sandbox, the gateway bridge, and one
namespace per container. At each mark it times, step by step, the detach and attach of the last --window
endpoints (overlay port, gateway port, each with its anti-spoofing elements) and prints medians and the ratio to
the first mark. Everything is removed at the end.

    sudo .venv/bin/python bench/bench_dataplane_scale.py [--endpoints 1000] [--window 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import median  # noqa: E402

from netweft.dataplane import netns  # noqa: E402
from netweft.dataplane.overlay import Overlay  # noqa: E402

MARKS = (100, 1000, 4000)
GW = "nwtgw"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", type=int, default=1000)
    p.add_argument("--window", type=int, default=20)
    args = p.parse_args()
    marks = [m for m in MARKS if m <= args.endpoints] or [args.endpoints]
    d = tempfile.mkdtemp(prefix="nwt-dps-")
    host = os.path.join(d, "nwt-host")
    netns.create_netns(host)

    def enter() -> None:
        fd = netns.open_netns(host)
        netns.setns(fd)
        os.close(fd)
    ex = ThreadPoolExecutor(1, initializer=enter)

    def call(fn, *a):
        return ex.submit(fn, *a).result()
    ov = call(Overlay)
    sb = os.path.join(d, "nwt-sb")
    ctr = [os.path.join(d, f"nwt-c{i}") for i in range(marks[-1])]
    steps = ("overlay port", "gateway port", "remove overlay port", "remove gateway port")

    def attach(i: int) -> tuple[float, float]:
        n = i + 2   # .0.1 is the gateway's
        ip, gw_ip = f"198.18.{n >> 8}.{n & 255}", f"198.19.{n >> 8}.{n & 255}"
        t0 = time.perf_counter()
        ov.ensure_endpoint(sb, ctr[i], f"nwv{i:05d}", "eth0", f"{ip}/16", f"02:42:c6:12:{i >> 8:02x}:{i & 255:02x}",
                           1450)
        t1 = time.perf_counter()
        ov.ensure_gw_endpoint(ctr[i], GW, f"nwg{i:05d}", "eth1", f"{gw_ip}/16", f"02:42:c6:13:{i >> 8:02x}:{i & 255:02x}",
                              1500, "198.19.0.1")
        return t1 - t0, time.perf_counter() - t1

    def detach(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        ov.delete_endpoint(sb, f"nwv{i:05d}")
        t1 = time.perf_counter()
        ov.delete_gw_endpoint(f"nwg{i:05d}")
        return t1 - t0, time.perf_counter() - t1

    results = []
    try:
        call(ov.ensure_sandbox, sb, 4242, "198.18.0.1/16", 1450, "192.0.2.1")
        call(ov.ensure_gwbridge, GW, "198.19.0.1/16", 1500)
        made = 0
        for m in marks:
            while made < m:
                netns.create_netns(ctr[made])
                call(attach, made)
                made += 1
            last = range(m - args.window, m)
            dets = [call(detach, i) for i in last]
            atts = [call(attach, i) for i in last]
            row = [median(a[0] for a in atts), median(a[1] for a in atts), median(x[0] for x in dets),
                   median(x[1] for x in dets)]
            results.append((m, row))
            print(f"  at {m:>5} endpoints: " + ", ".join(f"{s} {v * 1000:.1f} ms" for s, v in zip(steps, row))
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
        m0, r0 = results[0]
        print(f"  {'endpoints':>9}  " + "  ".join(f"{s:>20}" for s in steps))
        for m, row in results:
            print(f"  {m:>9}  " + "  ".join(f"{v * 1000:8.1f} ms ({v / v0:4.2f}x)" for v, v0 in zip(row, r0)))
    finally:
        try:
            call(ov.delete_sandbox, sb)
            call(ov.delete_gwbridge, GW)
            call(ov.close)
        finally:
            ex.shutdown()
            for c in ctr:
                if os.path.exists(c):
                    netns.delete_netns(c)
            netns.delete_netns(host)
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
