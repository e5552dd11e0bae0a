"""Down marking with several managers on a real etcd (manager/downjudge.py): a live node under a busy leader is
not marked Down, a dead one is.

A real Manager (the leader, on etcd with mutual TLS) and a second manager's part that matters here (its lease,
its presence and its reports of the nodes that heartbeat to it) run in one child interpreter inside the etcd
namespace (see test_etcd_store.py). The leader's event loop is blocked for longer than the Down limit again
and again, as a manager serving 1,000 watchers is: its view of the reports arrives late, and a judgment by
"now minus when the other manager heard it" would mark the live node Down.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from test_etcd_store import Backend, _etcd_backend, run

PERIOD = 0.5            # the cluster's heartbeat period here: a node is Down after 3 of them (1.5 s)
BLOCK = 1.8             # seconds the leader's loop is blocked at a time (longer than the limit)


async def busy_leader_scenario(b: Backend):
    from netweft.manager import downjudge, hastore
    from netweft.manager.cluster import Manager
    from netweft.manager.leader import Coordination
    from netweft.manager.watch import NODES, Hub
    from netweft.model import codec
    from netweft.model.objects import Node
    from netweft.pki import sealed
    from netweft.store.api import Put

    root = Path(b.path)
    ip = b.endpoint.split(":")[0]
    swarm = str(root / "swarm-a")
    os.makedirs(swarm, mode=0o700)
    read = lambda n: (root / n).read_bytes()  # noqa: E731
    hastore.save_store_pair(swarm, read("ca.pem"), read("client.pem"), read("client-key.pem"))
    key = sealed.new_key()
    sealed.save_key(swarm, key)
    spec = {"CertExpiry": 90 * 24 * 3600, "HeartbeatPeriod": PERIOD, "DataPathPort": 4789}
    store = hastore.open_store(swarm, [b.endpoint])
    created = await Manager.init_cluster(swarm, "ma", ip, (ip, 2377), spec, store=store, manager_key=key)
    now = "2026-01-01T00:00:00+00:00"
    await store.txn([], [Put(NODES, n, codec.encode(Node(id=n, hostname=n, role="worker", addr="203.0.113.9",
                                                         created=now, updated=now))) for n in ("live", "dead")])
    await store.close()

    a = Manager(swarm, created["node_id"], store_endpoints=[b.endpoint])
    await a.start((ip, 2377))
    # The second manager: its own connection, lease, presence and reports ("live" heartbeats to it).
    store_b = hastore.open_store(swarm, [b.endpoint])
    hub_b = Hub(store_b)
    await hub_b.start()
    coord_b = Coordination(store_b, hub_b, "mb", f"{ip}:2378")
    tasks = [asyncio.ensure_future(coord_b.run())]
    seen = {"live": time.time(), "dead": time.time()}

    async def publish_b():
        while True:
            await asyncio.sleep(PERIOD / 2)
            if coord_b.lease:
                seen["live"] = time.time()
                await coord_b.publish_heartbeats(downjudge.make_report(seen, time.time(), 6 * PERIOD))

    async def hog():   # the leader's loop busy (a burst of watch fan-out, say)
        while True:
            await asyncio.sleep(0.3)
            time.sleep(BLOCK)

    tasks.append(asyncio.ensure_future(publish_b()))
    try:
        deadline = time.monotonic() + 20
        while not a.is_leader():
            assert time.monotonic() < deadline, "the manager was not elected"
            await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(hog()))
        deadline = time.monotonic() + 30
        while a.state.get(NODES, "dead").state != "down":
            assert time.monotonic() < deadline, "the dead node was not marked Down"
            assert a.state.get(NODES, "live").state == "ready", "the live node was marked Down"
            await asyncio.sleep(0.1)
        end = time.monotonic() + 8 * BLOCK       # more rounds of a busy leader
        while time.monotonic() < end:
            assert a.state.get(NODES, "live").state == "ready", "the live node was marked Down"
            await asyncio.sleep(0.1)
        assert a.is_leader(), "the leader lost its lease while busy: the test proved nothing"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await coord_b.stop()
        await hub_b.stop()
        await store_b.close()
        await a.stop()


def test_a_busy_leader_marks_the_dead_node_down_and_not_the_live_one(request):
    backend, _ = _etcd_backend(request, tls=True)
    run(busy_leader_scenario, backend)
