"""How long a user waits for the CLI: `network ls`, `ps`, `network create` (bridge and overlay), netweft beside
Docker 20.10 in the same run, each command a fresh process timed from fork to exit, rounds interleaved.

netweft: a 1-host lab (swarm manager, so overlays can be made). Docker: a dockerd in its own namespace, swarm
initialised. Both CLIs talk to their daemon's unix socket from here. The netweft package is byte-compiled
first, as `pip install` does (this machine sets PYTHONDONTWRITEBYTECODE). `--help` shows the click path.
Everything made is removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_cli.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _docker import DOCKER_CLI, Dockerd  # noqa: E402
from _lab import Bench, median, pct  # noqa: E402

import netweft  # noqa: E402

NETWEFT = str(Path(sys.executable).parent / "netweft")


def timed(argv: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.decode().strip()}")
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-docker", action="store_true", help="netweft only")
    args = p.parse_args()
    compileall.compile_dir(str(Path(netweft.__file__).parent), quiet=1)

    with Bench() as b:
        lab = b.lab(1)
        nw_env = {**os.environ, "NETWEFT_HOST": lab.socket("h1")}
        docker = None if args.no_docker else Dockerd()
        try:
            if docker:
                docker.start()
                docker.swarm_init()
            tools = {"netweft": ([NETWEFT], nw_env)}
            if docker:
                tools["docker"] = ([DOCKER_CLI], docker.env)
            times: dict[tuple[str, str], list[float]] = {}
            cases = [("network ls", ["network", "ls"]), ("ps", ["ps"]), ("ps -a", ["ps", "-a"])]
            for rnd in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
                for tool, (argv0, env) in tools.items():
                    for label, argv in cases:
                        dt = timed(argv0 + argv, env)
                        if rnd:
                            times.setdefault((label, tool), []).append(dt)
                    for driver in ("bridge", "overlay"):
                        name = f"bcli{driver[0]}{rnd}"
                        extra = ["--attachable"] if driver == "overlay" else []
                        dt = timed(argv0 + ["network", "create", "-d", driver, *extra, name], env)
                        if rnd:
                            times.setdefault((f"network create -d {driver}", tool), []).append(dt)
                        dt = timed(argv0 + ["network", "rm", name], env)
                        if rnd:
                            times.setdefault((f"network rm ({driver})", tool), []).append(dt)
                    if rnd:
                        times.setdefault(("--help (click path)", tool), []).append(timed(argv0 + ["--help"], env))
        finally:
            if docker:
                docker.stop()

    print(f"CLI round trips, ms: median [p10-p90] of {args.rounds} rounds, fresh process each, interleaved")
    labels = list(dict.fromkeys(label for label, _ in times))
    print(f"  {'command':<28}{'netweft':>24}{'docker 20.10':>24}   netweft/docker")
    for label in labels:
        cells, meds = [], {}
        for tool in ("netweft", "docker"):
            v = times.get((label, tool))
            if v:
                meds[tool] = median(v)
                cells.append(f"{meds[tool] * 1000:7.1f} [{pct(v, 10) * 1000:5.1f}-{pct(v, 90) * 1000:5.1f}]")
            else:
                cells.append("-")
        ratio = f"{meds['netweft'] / meds['docker']:.2f}" if len(meds) == 2 else "-"
        print(f"  {label:<28}{cells[0]:>24}{cells[1]:>24}   {ratio}")


if __name__ == "__main__":
    main()
