"""A lab whose daemons serve metrics and the dashboard, shared by the observability tests of one module,
and helpers to read those listeners and to write a node's data-path health into the cluster store."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import msgspec
import pytest

from lab_fixture import HEARTBEAT, new_lab_name
from netweft.lab.lab import Lab

METRICS, DASHBOARD = "127.0.0.1:9323", "127.0.0.1:9324"


@pytest.fixture(scope="module")
def olab():
    """Three hosts (h1 leader, h2 and h3 workers), each netweftd with --metrics-addr and --dashboard-addr."""
    lab = Lab(new_lab_name())
    try:
        lab.up(3, daemon_args=["--metrics-addr", METRICS, "--dashboard-addr", DASHBOARD],
               init_opts={"HeartbeatPeriod": HEARTBEAT}, progress=lambda *a: None)
        yield lab
    finally:
        lab.down(quiet=True)


_GET = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        sys.stdout.write(f"{r.status}\n{r.headers.get('Content-Type', '')}\n"); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(f"{e.code}\n{e.headers.get('Content-Type', '')}\n"); sys.stdout.write(e.read().decode())
"""


def http_get(lab: Lab, host: str, url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET from inside a lab host."""
    argv, env = lab.exec_argv(host, [sys.executable, "-c", _GET, url])
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"GET {url} on {host} failed: {r.stderr.strip()[-1500:]}")
    status, ctype, body = r.stdout.split("\n", 2)
    return int(status), ctype, body


def node_ids(lab: Lab) -> dict[str, str]:
    """hostname -> node id, from `node ls` on the leader."""
    out = subprocess.run(*[lab.exec_argv("h1", ["netweft", "node", "ls", "--format", "json"])[0]],
                         capture_output=True, text=True, env=lab.exec_argv("h1", [])[1], check=True).stdout
    return {n["Description"]["Hostname"]: n["ID"] for n in map(json.loads, out.splitlines()) if n}


def set_health(lab: Lab, node_id: str, health: dict[str, dict]) -> None:
    """Write Node.health of one node into the leader's cluster store, as the probes' reports will: one
    compare-and-write through the ClusterStore interface while the manager runs, with the clock a
    manager's commit carries."""
    asyncio.run(_set_health(str(lab.host_dir("h1") / "data" / "swarm" / "cluster.db"), node_id, health))


async def _set_health(db: str, node_id: str, health: dict[str, dict]) -> None:
    import time

    from netweft.manager.watch import CLOCK, NODES
    from netweft.model import codec
    from netweft.model.objects import Node, PeerHealth
    from netweft.store.api import Compare, Put
    from netweft.store.sqlite import SQLiteStore

    store = await SQLiteStore.open(db)
    try:
        while True:
            rec = await store.get(NODES, node_id)
            node = codec.decode(rec.value, Node)
            node = msgspec.structs.replace(node, health={p: msgspec.convert(h, PeerHealth) for p, h in health.items()})
            ops = [Put(NODES, node_id, codec.encode(node)), Put(CLOCK, "time", str(time.time_ns()).encode())]
            if (await store.txn([Compare(NODES, node_id, rec.mod_rev)], ops)).ok:
                return
    finally:
        await store.close()
