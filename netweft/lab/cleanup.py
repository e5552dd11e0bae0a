"""Remove whatever a crashed test, lab or demo left behind: `make clean-lab`.

Everything the lab and the tests create is recognisable: namespaces named nwt-* or nwl-* in
/run/netns, and state under /tmp/nwt-* or /run/netweft-lab. Processes that live in those
namespaces (daemons, containers) are killed first, then the namespace mounts go.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import socket
import signal
import time

NETNS_DIR = "/run/netns"
NS_PREFIXES = ("nwt-", "nwl-")
STATE_GLOBS = ("/tmp/nwt-*", "/run/netweft-lab")
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def nsfs_mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index("-") + 1]
            if fstype == "nsfs":
                out.append(parts[4].replace("\\040", " "))
    return out


def ours(path: str, roots: list[str], ns_prefixes: tuple[str, ...]) -> bool:
    if path.startswith(NETNS_DIR + "/"):
        return os.path.basename(path).startswith(ns_prefixes)
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def kill_processes_in(ns_inodes: set[int]) -> int:
    """SIGKILL every process whose network namespace is one of ours (daemons, shims, containers)."""
    killed = 0
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        if inode(f"/proc/{pid}/ns/net") in ns_inodes:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


WIREGUARD_SOCKETS = "/var/run/wireguard"
WIREGUARD_PREFIXES = ("nwwg", "nwbwg")   # netweft's interfaces (agent/tunnels.py) and the benchmark's


def remove_dead_wireguard_sockets() -> int:
    """wireguard-go killed with its namespace leaves its control socket in the machine-wide directory: remove
    ours that nothing listens on any more (a live one, another lab's or a host's, is left alone)."""
    removed = 0
    try:
        names = os.listdir(WIREGUARD_SOCKETS)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(WIREGUARD_PREFIXES) and name.endswith(".sock")):
            continue
        path = os.path.join(WIREGUARD_SOCKETS, name)
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                continue
            except ConnectionRefusedError:
                pass
            except OSError:
                continue
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def clean(roots: list[str] | None = None, ns_prefixes: tuple[str, ...] = NS_PREFIXES, quiet: bool = False) -> dict:
    """Kill, unmount and delete everything under roots and the namespaces named ns_prefixes*
    (default: every lab and test root)."""
    if roots is None:
        roots = [p for g in STATE_GLOBS for p in glob.glob(g)]
    mounts = [m for m in nsfs_mounts() if ours(m, roots, ns_prefixes)]
    host_ns = [os.path.join(NETNS_DIR, n) for n in (os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else [])
               if n.startswith(ns_prefixes)]
    inodes = {i for i in (inode(m) for m in mounts + host_ns) if i is not None}
    killed = kill_processes_in(inodes)
    if killed:
        time.sleep(0.2)  # let the kernel reap before the namespaces go
    # Deepest mounts first; a path can be mounted more than once.
    for m in sorted(set(mounts), key=len, reverse=True):
        while _libc.umount2(m.encode(), MNT_DETACH) == 0:
            pass
    for path in host_ns:
        _libc.umount2(path.encode(), MNT_DETACH)
        try:
            os.unlink(path)
        except OSError:
            pass
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
    if killed:
        remove_dead_wireguard_sockets()
    result = {"processes": killed, "mounts": len(set(mounts)), "namespaces": len(host_ns), "dirs": len(roots)}
    if not quiet:
        print("removed: " + ", ".join(f"{v} {k}" for k, v in result.items()))
    return result


TEST_LAB_PREFIX = "test"  # labs made by tests are named test<hex>; the operator's own labs are left alone


def clean_tests(quiet: bool = False) -> dict:
    """What tests leave: /tmp/nwt-* roots, nwt-* namespaces and test* labs."""
    roots = glob.glob("/tmp/nwt-*") + glob.glob(f"/run/netweft-lab/{TEST_LAB_PREFIX}*")
    return clean(roots, ns_prefixes=("nwt-", f"nwl-{TEST_LAB_PREFIX}"), quiet=quiet)


def main() -> None:
    p = argparse.ArgumentParser(prog="netweft-clean-lab", description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--tests-only", action="store_true", help="only what tests leave; keep the operator's labs")
    args = p.parse_args()
    if args.tests_only:
        clean_tests(quiet=args.quiet)
    else:
        clean(quiet=args.quiet)


if __name__ == "__main__":
    main()
