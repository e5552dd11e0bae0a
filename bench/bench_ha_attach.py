"""Attaches while the leader dies: 1,000 concurrent attaches from 4 hosts against 3 managers on etcd, and the
leader's netweftd killed with -9 a moment after they start (issue 8).

An attach here is what an agent asks the managers for: POST /endpoints over mutual TLS with the host's own
node certificate, through the agent's ClusterClient (spread over the managers, failing over to the next one,
the same request again: it is idempotent by owner). Containers are left out: a thousand container shims do
not fit next to other work on this machine (tests/integration/test_ha_managers.py does 100 real container
attaches under the same kill).

Prints: acknowledged / refused attaches, duplicate IPs (must be 0), acknowledged attaches missing from the
store (must be 0), latency p50/p99, the time until a new leader shows in `node ls`, and whether the cluster
still creates networks afterwards. The lab is removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_ha_attach.py [--attaches 1000] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _lab import Bench, pct  # noqa: E402

from netweft.lab.lab import Lab  # noqa: E402

_ATTACH = r"""
import asyncio, json, sys, time
from netweft.agent.node import ClusterClient
spec = json.load(sys.stdin)
async def main():
    c = ClusterClient(spec["dir"], spec["managers"], spec["node"])
    sem = asyncio.Semaphore(spec["conc"])
    out = {}
    async def one(i):
        owner = f"bench-{spec['host']}-{i}"
        async with sem:
            t = time.monotonic()
            try:
                a = await c.call("POST", "/endpoints", {"network_id": spec["net"], "owner": {"kind": "cni", "id": owner}})
                out[owner] = {"ok": True, "ip": a["endpoint"]["ip"], "s": time.monotonic() - t}
            except Exception as e:
                out[owner] = {"ok": False, "error": str(e)[:200]}
    print("started", flush=True)
    await asyncio.gather(*(one(i) for i in range(spec["n"])))
    await c.close()
    print(json.dumps(out), flush=True)
asyncio.run(main())
"""

_LIST = r"""
import asyncio, json, sys
from netweft.manager import hastore
async def main():
    s = hastore.open_store(sys.argv[1], json.loads(sys.argv[2]))
    try:
        _, recs = await s.list("endpoints")
        print(json.dumps([json.loads(r.value) for r in recs]))
    finally:
        await s.close()
asyncio.run(main())
"""


def in_host(lab: Lab, host: str, code: str, *args: str, stdin: str | None = None, timeout: float = 600) -> str:
    argv, env = lab.exec_argv(host, [sys.executable, "-c", code, *args])
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{host}: {r.stderr[-2000:]}")
    return r.stdout


def leader(lab: Lab, via: str) -> str | None:
    for n in lab.client(via).call("GET", "/nodes"):
        if n.get("ManagerStatus", {}).get("Leader"):
            return n["Description"]["Hostname"]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attaches", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32, help="attaches in flight per host")
    args = p.parse_args()
    hosts = ["h2", "h3", "h4", "h5"]
    with Bench() as b:
        lab = Lab("b" + os.urandom(3).hex())
        b.labs.append(lab)
        t0 = time.monotonic()
        lab.up(5, managers=3, init_opts={"HeartbeatPeriod": "500ms", "Store": "etcd"}, progress=lambda m: None)
        print(f"lab {lab.name}: 5 hosts, h1..h3 managers on etcd, up in {time.monotonic() - t0:.1f} s")
        net = lab.client("h2").call("POST", "/networks/create", {"Name": "ov", "Driver": "overlay", "Attachable": True,
                                                                "IPAM": {"Config": [{"Subnet": "198.18.0.0/20"}]}})
        net_id = net["Id"]
        managers = [f"{lab.address(h)}:2377" for h in ("h1", "h2", "h3")]
        per = args.attaches // len(hosts)
        results: dict[str, dict] = {}
        procs = []
        for h in hosts:
            info = lab.client(h).call("GET", "/info")
            spec = {"dir": str(lab.host_dir(h) / "data" / "swarm"), "managers": managers,
                    "node": info["Swarm"]["NodeID"], "host": h, "net": net_id, "n": per, "conc": args.concurrency}
            argv, env = lab.exec_argv(h, [sys.executable, "-c", _ATTACH])
            pr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
            pr.stdin.write(json.dumps(spec))
            pr.stdin.close()
            procs.append((h, pr))
        for h, pr in procs:
            assert pr.stdout.readline().strip() == "started", pr.stderr.read()[-2000:]
        t_start = time.monotonic()
        time.sleep(1.0)
        t_kill = time.monotonic()
        lab.stop_daemon("h1", signal.SIGKILL)
        takeover = None

        def watch_leader():
            nonlocal takeover
            while time.monotonic() - t_kill < 60:
                try:
                    if leader(lab, "h2") not in (None, "h1"):
                        takeover = time.monotonic() - t_kill
                        return
                except Exception:  # noqa: BLE001 - a manager between leaders
                    pass
                time.sleep(0.1)
        th = threading.Thread(target=watch_leader, daemon=True)
        th.start()
        for h, pr in procs:
            out, err = pr.stdout.read(), pr.stderr.read()
            if pr.wait(timeout=900) != 0:
                raise RuntimeError(f"{h}: {err[-2000:]}")
            results.update(json.loads(out.strip().splitlines()[-1]))
        wall = time.monotonic() - t_start
        th.join(60)
        stored = json.loads(in_host(lab, "h2", _LIST, str(lab.host_dir("h2") / "data" / "swarm"),
                                    json.dumps([f"{lab.address(h)}:2379" for h in ("h1", "h2", "h3")])))
        mine = [e for e in stored if e["network_id"] == net_id]
        by_owner = {e["owner"]["id"]: e["ip"] for e in mine}
        ips = [e["ip"] for e in mine]
        acked = {o: r for o, r in results.items() if r["ok"]}
        refused = {o: r for o, r in results.items() if not r["ok"]}
        missing = [o for o, r in acked.items() if by_owner.get(o) != r["ip"]]
        lat = [r["s"] for r in acked.values()]
        ok_after = True
        try:
            lab.client("h3").call("POST", "/networks/create", {"Name": "after", "Driver": "overlay",
                                                               "IPAM": {"Config": [{"Subnet": "198.18.16.0/24"}]}})
        except Exception as e:  # noqa: BLE001
            ok_after = False
            print(f"network create after the kill failed: {e}")
        print(f"\n{args.attaches} attaches from {len(hosts)} hosts ({args.concurrency} in flight per host), "
              f"leader h1's netweftd killed -9 after 1 s")
        print(f"  {'acknowledged':<34}{len(acked)}")
        print(f"  {'refused (the caller sees an error)':<34}{len(refused)}"
              + (f"  e.g. {next(iter(refused.values()))['error'][:120]}" if refused else ""))
        print(f"  {'duplicate IPs':<34}{len(ips) - len(set(ips))}")
        print(f"  {'acknowledged but missing/changed':<34}{len(missing)}")
        print(f"  {'endpoints in the store':<34}{len(mine)}")
        print(f"  {'wall time, attaches/s':<34}{wall:.1f} s, {len(acked) / wall:.0f}/s")
        print(f"  {'latency p50 / p99 / max':<34}{pct(lat, 50) * 1000:.0f} / {pct(lat, 99) * 1000:.0f} / "
              f"{max(lat) * 1000:.0f} ms")
        print(f"  {'new leader in node ls after':<34}" + (f"{takeover:.2f} s" if takeover is not None else "NONE"))
        print(f"  {'network create afterwards':<34}{'ok' if ok_after else 'FAILED'}")
        good = not missing and len(ips) == len(set(ips)) and takeover is not None and ok_after
        print("result: " + ("ok" if good else "FAILED"))
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
