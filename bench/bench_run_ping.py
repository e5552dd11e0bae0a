"""`netweft run -d` on one host -> first ping reply from a container on another host, as a user times it.

A 2-host lab (h1 manager, h2 worker) with an overlay `ov` and a container `pinger` on h1. Each round:
iputils `ping -c1 -i0.02` toward the new address is started in pinger's namespace (it stops at its first
reply), then `netweft run -d --network ov --ip X -- sleep infinity` is run on h2 as a user runs it (the
`netweft` command with NETWEFT_HOST, no nsenter); the figure is from the command's start to the reply.
The same shape as Docker's figure in ../shared/peers/docker-swarm-baseline.sh ("docker run start on h2 ->
first ping reply", 20 ms ping interval: figures are quantized by up to 20 ms for both). Also printed:
the command's own time, where the daemon's time goes (its "endpoint attached" log line), and the
reply after the command returned. Goals (issue 12): p50 <= 50 ms, p99 <= 100 ms.

    sudo .venv/bin/python bench/bench_run_ping.py [--rounds 30] [--docker]

--docker runs the shared Docker swarm baseline script beside it (one Docker sample per run of the script;
it builds and removes its own namespaces, about a minute).
Everything made here (the lab, its processes) is removed at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import Bench, pct  # noqa: E402

import netweft  # noqa: E402
from netweft.lab.lab import BIN  # noqa: E402

SUBNET = "198.18.60.0/24"
BASELINE_NAME = "docker-swarm-baseline.sh"


def baseline() -> Path | None:
    """The shared Docker baseline script: $NETWEFT_DOCKER_BASELINE, or shared/peers/ beside a parent folder."""
    if os.environ.get("NETWEFT_DOCKER_BASELINE"):
        return Path(os.environ["NETWEFT_DOCKER_BASELINE"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "peers" / BASELINE_NAME).is_file():
            return parent / "shared" / "peers" / BASELINE_NAME
    return None


class Pinger:
    """A ping started before the container exists; `done_at` is when its first reply came (perf_counter)."""

    def __init__(self, b: Bench, lab, pid: int, ip: str):
        self.done_at: float | None = None
        self.p = b.spawn(["nsenter", "-t", str(pid), "-n", "ping", "-n", "-q", "-c1", "-i0.02", "-w30", ip], lab=lab)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        if self.p.wait() == 0:
            self.done_at = time.perf_counter()

    def result(self, timeout: float = 35) -> float | None:
        self.thread.join(timeout)
        return self.done_at


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cli(argv: list[str], env: dict) -> float:
    """Run the command (output discarded) and return its CPU seconds; raises if it fails."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
    finally:
        os.close(devnull)
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed")
    return ru.ru_utime + ru.ru_stime


def ms(v: float) -> str:
    return f"{v * 1000:7.1f} ms"


def show(label: str, values: list[float]) -> None:
    if not values:
        print(f"  {label:<52} (no samples)")
        return
    print(f"  {label:<52} p50 {ms(pct(values, 50))}  p99 {ms(pct(values, 99))}  "
          f"min {ms(min(values))}  max {ms(max(values))}  n={len(values)}")


def attached_times(log: Path, names: dict[str, float]) -> dict[str, float]:
    """{container: wall-clock time h2's daemon logged 'endpoint attached' for it}."""
    out = {}
    for line in log.read_text().splitlines():
        if '"endpoint attached"' in line:
            rec = json.loads(line)
            if rec.get("container") in names:
                out[rec["container"]] = datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
    return out


def docker_sample() -> float | None:
    """One `docker run start on h2 -> first ping reply` figure from the shared baseline script."""
    script = baseline()
    if script is None:
        print(f"no {BASELINE_NAME} found: set NETWEFT_DOCKER_BASELINE to its path", file=sys.stderr)
        return None
    r = subprocess.run(["bash", str(script), "all"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "IPERF_T": "1"})
    m = re.search(r"docker run start on h2 -> first ping reply [^:]*: ([0-9.]+) s", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--docker", action="store_true", help="also run Docker's swarm baseline once")
    ap.add_argument("--trace", action="store_true", help="print h1's and h2's daemon log lines of the last round")
    args = ap.parse_args()
    # Bytecode compiled first, as `pip install` does (this machine sets PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(str(Path(netweft.__file__).parent), quiet=1)
    with Bench() as b:
        lab = b.lab(2)
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}

        def nw(host: str, *a: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "netweft"), *a], env={**env, "NETWEFT_HOST": lab.socket(host)},
                                  capture_output=True, text=True, check=True)

        nw("h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", SUBNET, "ov")
        nw("h1", "run", "-d", "--name", "pinger", "--network", "ov", "--", "sleep", "infinity")
        pinger_pid = json.loads(nw("h1", "inspect", "pinger").stdout)[0]["State"]["Pid"]
        # Warm-up: h2's sandbox for ov exists after its first container, as on any host already in use.
        nw("h2", "run", "-d", "--name", "warm", "--network", "ov", "--", "sleep", "infinity")
        reach, call, after, daemon, sent = [], [], [], [], {}
        pids = {"h2's netweftd": int((lab.host_dir("h2") / "netweftd.pid").read_text()),
                "h2's supervisor": int((lab.host_dir("h2") / "run" / "supervisor.sock.pid").read_text()),
                "h1's netweftd (manager)": int((lab.host_dir("h1") / "netweftd.pid").read_text())}
        cpu: dict[str, list[float]] = {"the netweft command": [], **{k: [] for k in pids}}
        fails = 0
        for i in range(args.rounds):
            ip, name = f"198.18.60.{20 + i}", f"r{i}"
            pinger = Pinger(b, lab, pinger_pid, ip)
            time.sleep(0.2)   # the ping is running before the command starts
            before = {k: cpu_s(p) for k, p in pids.items()}
            wall, t0 = time.time(), time.perf_counter()
            cli_cpu = run_cli([str(BIN / "netweft"), "run", "-d", "--name", name, "--network", "ov", "--ip", ip,
                               "--", "sleep", "infinity"], {**env, "NETWEFT_HOST": lab.socket("h2")})
            t_ret = time.perf_counter()
            sent[name] = wall
            done = pinger.result()
            b.stop(pinger.p)
            cpu["the netweft command"].append(cli_cpu)
            for k, p in pids.items():
                cpu[k].append(cpu_s(p) - before[k])
            call.append(t_ret - t0)
            if done is None:
                fails += 1
            else:
                reach.append(done - t0)
                after.append(done - t_ret)
            nw("h2", "rm", "-f", name)
        for name, t in attached_times(lab.host_dir("h2") / "netweftd.log", sent).items():
            daemon.append(t - sent[name])
        if args.trace:
            for host in ("h2", "h1"):
                lines = (lab.host_dir(host) / "netweftd.log").read_text().splitlines()
                print(f"--- {host}'s log from the last round's start")
                for line in lines:
                    if json.loads(line).get("time", "") >= datetime.utcfromtimestamp(wall).isoformat()[:23]:
                        print(line[:300])
        load = os.getloadavg()[0]
        print(f"netweft run -d on h2 -> first ping reply from h1, {args.rounds} rounds, load {load:.1f}")
        show("run start -> first ping reply (goal p50 50, p99 100)", reach)
        show("  the command itself (start -> exit)", call)
        show("  command start -> daemon logged 'endpoint attached'", daemon)
        show("  command returned -> first reply", after)
        if fails:
            print(f"  no reply within 30 s: {fails}")
        print("  CPU per run (user + system, until the reply; independent of the machine's load):")
        for k, v in cpu.items():
            show(f"    {k}", v)
    if args.docker:
        d = docker_sample()
        print(f"Docker 20.10 swarm overlay (shared baseline script, one sample): "
              f"{'n/a' if d is None else ms(d).strip()} run start on h2 -> first ping reply")


if __name__ == "__main__":
    main()
