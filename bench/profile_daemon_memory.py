"""Where a worker daemon's memory per endpoint goes: tracemalloc snapshots taken inside h2's netweftd at
0 / N/2 / N local overlay endpoints and after their removal, diffed by traceback, beside glibc's view
(mallinfo2) and the kernel's (/proc/PID/smaps_rollup).

    sudo .venv/bin/python bench/profile_daemon_memory.py [--endpoints 500] [--frames 15] [--top 10]

The daemon is traced through a sitecustomize module put first on its PYTHONPATH (only the restarted worker's):
SIGUSR2 dumps a snapshot after a full collection, the first one starting tracemalloc (so what is traced is what
was allocated after a warm-up endpoint came and went, and is still held). Tracing slows the daemon
and doubles its heap: the figures are for attribution, bench/bench_daemon_memory.py measures RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lab import Bench, daemon_pid  # noqa: E402
from bench_daemon_memory import OV, create_overlay, ip_of  # noqa: E402

SITECUSTOMIZE = r'''
import os, signal, tracemalloc
_dir = os.environ.get("NWT_MEMPROF_DIR")
if _dir:
    _n = [0]

    def _dump(signum, frame):
        import ctypes, gc, json
        gc.collect()
        frames = int(os.environ.get("NWT_MEMPROF_FRAMES", "15"))
        if frames and not tracemalloc.is_tracing():   # the first signal starts tracing (from start-up: too slow)
            tracemalloc.start(frames)
        _n[0] += 1
        base = os.path.join(_dir, f"snap{_n[0]}")
        if frames:
            tracemalloc.take_snapshot().dump(base + ".tm")

        class M(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = M
        m = libc.mallinfo2()
        info = {f: getattr(m, f) for f, _ in M._fields_}
        heap = anon = 0
        with open("/proc/self/smaps") as f:   # the brk heap and the anonymous mappings (pymalloc arenas, mmaps)
            name = None
            for line in f:
                p = line.split()
                if "-" in p[0] and len(p) >= 5 and not line.startswith(("Rss", "Size")):
                    name = p[5] if len(p) >= 6 else ""
                elif p[0] == "Rss:":
                    if name == "[heap]":
                        heap += int(p[1])
                    elif name == "":
                        anon += int(p[1])
        info["heap_rss"], info["anon_mmap_rss"] = heap, anon
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                p = line.split()
                if len(p) == 3 and p[2] == "kB":
                    info["smaps_" + p[0].rstrip(":")] = int(p[1])
        info["traced"] = tracemalloc.get_traced_memory()[0]
        try:
            sq = ctypes.CDLL("libsqlite3.so.0")   # the copy _sqlite3 loaded: its process-wide counters
            sq.sqlite3_memory_used.restype = ctypes.c_int64
            info["sqlite"] = sq.sqlite3_memory_used()
        except (OSError, AttributeError):
            info["sqlite"] = 0
        import collections
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        info["types"] = dict(types.most_common(60))
        info["objects"] = len(gc.get_objects())
        with open(base + ".json.tmp", "w") as f:
            json.dump(info, f)
        os.rename(base + ".json.tmp", base + ".json")
    signal.signal(signal.SIGUSR2, _dump)
'''


def snapshot(pid: int, d: str, n: int) -> tuple[tracemalloc.Snapshot, dict]:
    import signal
    os.kill(pid, signal.SIGUSR2)
    path = os.path.join(d, f"snap{n}.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot from the daemon")
        time.sleep(0.2)
    with open(path) as f:
        info = json.load(f)
    tm = os.path.join(d, f"snap{n}.tm")
    return (tracemalloc.Snapshot.load(tm) if os.path.exists(tm) else None), info


def where(tb: tracemalloc.Traceback, depth: int = 4) -> str:
    """The innermost netweft frames (innermost first), and the allocating line if it is outside netweft."""
    frames = [f for f in tb if "/netweft/" in f.filename] or list(tb)
    out = [f"{f.filename.split('/netweft/')[-1] if '/netweft/' in f.filename else os.path.basename(f.filename)}"
           f":{f.lineno}" for f in reversed(frames[-depth:])]
    site = tb[-1]   # tracemalloc orders frames oldest first
    lib = "" if "/netweft/" in site.filename else f" [alloc {os.path.basename(site.filename)}:{site.lineno}]"
    return " <- ".join(out) + lib


def report(label: str, a: tracemalloc.Snapshot, b: tracemalloc.Snapshot, per: int, top: int) -> None:
    filt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    stats = b.filter_traces(filt).compare_to(a.filter_traces(filt), "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"\n{label}: traced heap {total / 1024:+.0f} KiB"
          + (f" = {total / 1024 / per:+.2f} KiB per endpoint" if per else ""))
    for s in stats[:top]:
        k = f"{s.size_diff / 1024 / per:+7.2f} KiB/ep" if per else f"{s.size_diff / 1024:+8.0f} KiB"
        print(f"  {k} {s.count_diff:+7d} blocks  {where(s.traceback)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=500)
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in the traced daemon's environment (e.g. PYTHONMALLOC=malloc)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces)")
    n = args.endpoints
    print(f"profile_daemon_memory: {n} endpoints; load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nwt-memprof-") as d, Bench() as b:
        with open(os.path.join(d, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        lab = b.lab(2, prefix="p")
        time.sleep(2.0)
        lab.stop_daemon("h2")
        old = os.environ.get("PYTHONPATH")
        os.environ.update(NWT_MEMPROF_DIR=d, NWT_MEMPROF_FRAMES=str(args.frames),
                          PYTHONPATH=d + (":" + old if old else ""))
        extra = dict(e.split("=", 1) for e in args.env)
        os.environ.update(extra)
        try:
            lab.start_daemon("h2")
        finally:
            del os.environ["NWT_MEMPROF_DIR"], os.environ["NWT_MEMPROF_FRAMES"]
            for k in extra:
                del os.environ[k]
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        pid = daemon_pid(lab, "h2")
        time.sleep(3.0)
        create_overlay(lab)

        def create(i: int) -> None:
            lab.client("h2", timeout=120).call("POST", "/containers/create", {
                "Name": f"e{i}", "NetworkMode": OV, "IPAddress": ip_of(i), "Cmd": ["sleep", "100000"]})

        def remove(i: int) -> None:
            lab.client("h2", timeout=120).call("DELETE", f"/containers/e{i}", force=1)

        # Warm-up: one endpoint made and removed, so code paths' one-time costs are in snapshot 1.
        create(n + 1)
        remove(n + 1)
        time.sleep(2.5)
        snaps = [snapshot(pid, d, 1)]
        half = n // 2
        with ThreadPoolExecutor(args.parallel) as ex:
            list(ex.map(create, range(half)))
        time.sleep(2.5)
        snaps.append(snapshot(pid, d, 2))
        with ThreadPoolExecutor(args.parallel) as ex:
            list(ex.map(create, range(half, n)))
        time.sleep(2.5)
        snaps.append(snapshot(pid, d, 3))
        with ThreadPoolExecutor(args.parallel) as ex:
            list(ex.map(remove, range(n)))
        time.sleep(2.5)
        snaps.append(snapshot(pid, d, 4))
        labels = ["0", f"{half}", f"{n}", "removed"]
        print(f"\n{'KiB':<12}" + "".join(f"{x:>11}" for x in ("traced", "sqlite", "uordblks", "fordblks", "arena",
                                                              "hblkhd", "Rss", "Anon", "[heap]", "anon mmap", "gc objs")))
        for lab_, (_, i) in zip(labels, snaps):
            print(f"{lab_:<12}" + "".join(f"{v // 1024:>11}" for v in (
                i["traced"], i["sqlite"], i["uordblks"], i["fordblks"], i["arena"], i["hblkhd"])) +
                  f"{i['smaps_Rss']:>11}{i['smaps_Anonymous']:>11}{i['heap_rss']:>11}{i['anon_mmap_rss']:>11}"
                  f"{i['objects']:>11}")
        t0, t2 = snaps[0][1]["types"], snaps[2][1]["types"]
        grown = sorted(((t2.get(k, 0) - t0.get(k, 0), k) for k in t2), reverse=True)[:15]
        print(f"gc-tracked objects per endpoint at {n}: " + ", ".join(f"{k} {v / n:.1f}" for v, k in grown if v > 0))
        if snaps[0][0] is None:
            print(f"\nload {os.getloadavg()[0]:.2f}")
            b.drop_lab(lab)
            return
        report(f"0 -> {half}", snaps[0][0], snaps[1][0], half, args.top)
        report(f"{half} -> {n}", snaps[1][0], snaps[2][0], n - half, args.top)
        report(f"0 -> {n}", snaps[0][0], snaps[2][0], n, args.top)
        report("0 -> after removal (left behind)", snaps[0][0], snaps[3][0], 0, args.top)
        big = [t for t in snaps[2][0].traces if t.size >= 32 * 1024]
        print(f"\nblocks of 32 KiB or more at {n}: {len(big)}, {sum(t.size for t in big) // 1024} KiB")
        for t in sorted(big, key=lambda t: -t.size)[:args.top]:
            print(f"  {t.size // 1024:6d} KiB  {where(t.traceback, 5)}")
        print(f"\nload {os.getloadavg()[0]:.2f}")
        b.drop_lab(lab)


if __name__ == "__main__":
    main()
