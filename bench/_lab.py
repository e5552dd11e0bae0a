"""Small shared helpers for the benchmarks: labs and processes that are always removed, percentiles,
RSS, and a netlink watcher that timestamps neighbour entries appearing in overlay sandboxes.

Everything a Bench creates (labs, helper processes) is removed when its `with` block ends, also on an
exception, Ctrl-C, SIGTERM or SIGHUP. Only what it created: other labs on the machine are left alone.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

from netweft.dataplane import netns
from netweft.lab.lab import Lab


# ------------------------------------------------------------------ statistics
def pct(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; nan if empty."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    return pct(values, 50)


# ------------------------------------------------------------------ iperf3
def iperf(argv: list[str], seconds: int, streams: int = 1, rt: bool = False) -> float:
    """Gbit/s received by one iperf3 client run (`argv` ends with its target; retried while the server is not
    listening yet or busy with the last client). `rt`: pinned to CPU 0 at SCHED_FIFO 10 (see iperf_server)."""
    pre = ["taskset", "-c", "0", "chrt", "-f", "10"] if rt else []
    i = argv.index("iperf3")  # the pinning goes right before iperf3, after nsenter
    cmd = argv[:i] + pre + argv[i:] + ["-t", str(seconds), "-O", "1", "-J", "-P", str(streams)]
    out: dict = {}
    for _ in range(20):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        try:
            out = json.loads(r.stdout)
        except ValueError:
            out = {}
        if r.returncode == 0 and "sum_received" in out.get("end", {}):
            return out["end"]["sum_received"]["bits_per_second"] / 1e9
        time.sleep(0.3)
    raise RuntimeError(f"iperf3 failed: {out.get('error') or r.stdout[-300:]} {r.stderr[-300:]}")


def iperf_server(argv: list[str], rt: bool) -> list[str]:
    """The server's argv, pinned to CPU 1 at SCHED_FIFO 10 if `rt` (single-stream iperf3 on 2 cores is
    CPU-bound: other work on a shared machine otherwise makes rounds differ by 2x)."""
    i = argv.index("iperf3")
    return argv[:i] + (["taskset", "-c", "1", "chrt", "-f", "10"] if rt else []) + argv[i:]


# ------------------------------------------------------------------ labs and processes
class _Interrupted(KeyboardInterrupt):
    pass


class Bench:
    """Owns labs and processes; `with Bench() as b:` removes all of them at the end, whatever happens."""

    def __init__(self) -> None:
        self.labs: list[Lab] = []
        self.procs: list[subprocess.Popen] = []
        self._old: dict[int, object] = {}

    def __enter__(self) -> "Bench":
        self.pid = os.getpid()

        def interrupt(signum, frame):
            if os.getpid() != self.pid:
                # A forked copy of this process (pyroute2 forks helpers that inherit this handler):
                # it must not unwind into __exit__ and remove the labs of its parent.
                os._exit(128 + signum)
            raise _Interrupted(f"signal {signum}")
        # SIGINT too: a shell without job control starts background jobs with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if os.getpid() != self.pid:
            return  # a forked child unwinding: the labs belong to the parent
        # Finish cleaning even if Ctrl-C is pressed again meanwhile.
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for p in list(self.procs):
                self.stop(p)
            for lab in list(self.labs):
                self.drop_lab(lab)
        finally:
            for sig, h in self._old.items():
                signal.signal(sig, h)

    def lab(self, n: int, prefix: str = "b") -> Lab:
        lab = Lab(prefix + secrets.token_hex(3))
        self.labs.append(lab)  # before up(): a lab half built when interrupted is removed too
        lab.up(n, mtu=1500, init_opts={"HeartbeatPeriod": "500ms"}, progress=lambda m: None)
        return lab

    def drop_lab(self, lab: Lab) -> None:
        for p in list(self.procs):  # processes inside the lab's namespaces die with it anyway
            if getattr(p, "lab", None) is lab:
                self.stop(p)
        try:
            lab.down(quiet=True)
        except Exception as e:  # keep going: the other labs must go too
            print(f"warning: removing lab {lab.name} failed: {e}", file=sys.stderr)
        if lab in self.labs:
            self.labs.remove(lab)

    def spawn(self, argv: list[str], lab: Lab | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        p.lab = lab
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                p.kill()  # by its own pid: nsenter without --fork execs the command in place
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)


def in_pid_netns(pid: int, argv: list[str]) -> list[str]:
    """argv run in the network namespace of a process (a container), nothing else changed."""
    return ["nsenter", "-t", str(pid), "-n", *argv]


def in_host(lab: Lab, host: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={lab.ns_path(host)}", *argv]


def daemon_pid(lab: Lab, host: str) -> int:
    return int((lab.host_dir(host) / "netweftd.pid").read_text())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# ------------------------------------------------------------------ neighbour watcher
RTMGRP_NEIGH = 0x4
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NUD_PERMANENT = 0x80
NDA_DST = 1


class NeighWatch:
    """Timestamps (time.monotonic) permanent IPv4 neighbour entries appearing in and leaving namespaces.

    One netlink socket per namespace, subscribed to neighbour events and opened inside the namespace
    (setns in this thread, no helper process); one thread reads them all. `added[(key, ip)]` and
    `removed[(key, ip)]` hold the first time seen.
    """

    def __init__(self, namespaces: dict[str, str]):
        self.socks: dict[socket.socket, str] = {}
        self.added: dict[tuple[str, str], float] = {}
        self.removed: dict[tuple[str, str], float] = {}
        self.overruns = 0
        self.cond = threading.Condition()
        self._stop = False
        for key, path in namespaces.items():
            fd = netns.open_netns(path)
            try:
                with netns.entered(fd):
                    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            finally:
                os.close(fd)
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((0, RTMGRP_NEIGH))
            self.socks[s] = key
        self.thread = threading.Thread(target=self._run, name="neighwatch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks = list(self.socks)
        while not self._stop:
            ready, _, _ = select.select(socks, [], [], 0.2)
            for s in ready:
                try:
                    data = s.recv(1 << 20)
                except OSError:  # ENOBUFS: events lost
                    self.overruns += 1
                    continue
                t = time.monotonic()
                self._parse(self.socks[s], data, t)

    def _parse(self, key: str, buf: bytes, t: float) -> None:
        off, hits = 0, []
        while off + 16 <= len(buf):
            length, mtype = struct.unpack_from("=IH", buf, off)
            if length < 16:
                break
            if mtype in (RTM_NEWNEIGH, RTM_DELNEIGH) and length >= 28:
                family, _ifindex, state = struct.unpack_from("=BxxxiH", buf, off + 16)
                a = off + 28
                while a + 4 <= off + length:
                    rlen, rtype = struct.unpack_from("=HH", buf, a)
                    if rlen < 4:
                        break
                    if rtype == NDA_DST and family == socket.AF_INET and rlen >= 8:
                        ip = socket.inet_ntoa(buf[a + 4:a + 8])
                        if mtype == RTM_DELNEIGH:
                            hits.append((self.removed, (key, ip)))
                        elif state & NUD_PERMANENT:
                            hits.append((self.added, (key, ip)))
                    a += (rlen + 3) & ~3
            off += (length + 3) & ~3
        if hits:
            with self.cond:
                for table, k in hits:
                    table.setdefault(k, t)
                self.cond.notify_all()

    def wait(self, table: dict, ip: str, keys: Iterable[str], timeout: float) -> dict[str, float]:
        """{key: time} for the keys whose event for ip arrived within timeout (all of them, normally)."""
        keys = list(keys)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = {k: table[(k, ip)] for k in keys if (k, ip) in table}
                left = deadline - time.monotonic()
                if len(got) == len(keys) or left <= 0:
                    return got
                self.cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        for s in self.socks:
            s.close()

    def __enter__(self) -> "NeighWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
