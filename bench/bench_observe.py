"""What issue 13's observability costs: replaying event history, the clock on each commit, and a scrape.

- `events --since` replays the cluster store's kept history: REVISIONS revisions of node updates (as health
  reports and heartbeats make) written to a SQLite store in a temporary directory, then the time to derive every
  event from all of them (the manager's work for one `netweft events --since`).
- The clock manager commits carry: Hub.commit's commits per second with no clock, as shipped (at most every
  100 ms) and on every commit.
- Building and encoding the dashboard's overview of a cluster of 100 hosts and 10,000 endpoints, and one
  Prometheus scrape of a host probing 99 peers, on 100 networks.
Each figure is the median of --rounds runs. Nothing touches the kernel.

    .venv/bin/python bench/bench_observe.py [--rounds 3] [--revisions 20000]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import msgspec

from netweft.manager.events import events
from netweft.model.events import ClusterEvent
from netweft.manager.overview import overview
from netweft.manager.watch import CLOCK, ENDPOINTS, NETWORKS, NODES, ClusterState
from netweft.model import codec
from netweft.model.objects import Endpoint, Network, Node, Owner, PeerHealth
from netweft.store.api import Put
from netweft.store.sqlite import SQLiteStore


def nodes(n: int) -> list[Node]:
    return [Node(id=f"node{i:021d}", hostname=f"h{i}", role="worker", addr=f"192.0.2.{10 + i % 200}",
                 created="2026-01-01T00:00:00Z") for i in range(n)]


async def replay(revisions: int, rounds: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="nwt-bench-") as d:
        store = await SQLiteStore.open(f"{d}/c.db")
        ns = nodes(20)
        for i in range(revisions):
            n = ns[i % len(ns)]
            state = ("healthy", "degraded")[(i // len(ns)) % 2]
            peer = ns[(i + 1) % len(ns)].id
            node = msgspec.structs.replace(n, health={peer: PeerHealth(state=state, loss=0.1)})
            await store.txn([], [Put(NODES, n.id, codec.encode(node)), Put(CLOCK, "time", str(i + 1).encode())])
        st = ClusterState()
        st.rev = await store.revision()
        times, count = [], 0
        for _ in range(rounds):
            t = time.perf_counter()
            count = len([e async for e in events(store, st, 0, revisions + 1) if isinstance(e, ClusterEvent)])
            times.append(time.perf_counter() - t)
        await store.close()
    return statistics.median(times), count


async def commits(rounds: int, n: int = 1000) -> dict[str, float]:
    """Manager commits per second through Hub.commit: as shipped (the clock at most every CLOCK_EVERY), with
    the clock on every commit, and with none."""
    from netweft.manager import watch
    out: dict[str, list[float]] = {"none": [], "shipped": [], "every": []}
    ep = Endpoint(id="e" * 12, network_id="n" * 12, node_id="a", ip="198.18.0.2", prefix_len=24,
                  mac="02:42:c6:12:00:02", owner=Owner(kind="netweft", id="c"))
    raw = codec.encode(ep)
    shipped = watch.CLOCK_EVERY
    with tempfile.TemporaryDirectory(prefix="nwt-bench-") as d:
        store = await SQLiteStore.open(f"{d}/c.db")
        hub = watch.Hub(store)
        await hub.start()
        try:
            for _ in range(rounds):
                for mode, every in (("none", 1e9), ("shipped", shipped), ("every", 0.0)):
                    watch.CLOCK_EVERY = every
                    t = time.perf_counter()
                    for i in range(n):
                        await hub.commit(lambda: ([], [Put(ENDPOINTS, f"e{i}", raw)], None))
                    out[mode].append(n / (time.perf_counter() - t))
        finally:
            watch.CLOCK_EVERY = shipped
            await hub.stop()
            await store.close()
    return {k: statistics.median(v) for k, v in out.items()}


def overview_and_scrape(rounds: int) -> tuple[float, int, float, int]:
    st = ClusterState()
    ns = nodes(100)
    for n in ns:
        n = msgspec.structs.replace(n, health={p.id: PeerHealth(state="healthy", rtt_ms=0.3) for p in ns if p != n})
        st.put(NODES, n.id, codec.encode(n), 1)
    for j in range(100):
        net = Network(id=f"net{j:09d}", name=f"ov{j}", driver="overlay", scope="swarm", created="",
                      subnet=f"198.18.{j}.0/24", gateway=f"198.18.{j}.1", vni=4096 + j)
        st.put(NETWORKS, net.id, codec.encode(net), 1)
        for k in range(100):
            ep = Endpoint(id=f"ep{j:04d}{k:04d}", network_id=net.id, node_id=ns[k].id, hostname=ns[k].hostname,
                          ip=f"198.18.{j}.{k + 2}", prefix_len=24, mac=f"02:42:c6:12:{j:02x}:{k:02x}",
                          owner=Owner(kind="netweft", id=f"c{j}-{k}", name=f"c{j}-{k}"))
            st.put(ENDPOINTS, ep.id, codec.encode(ep), 1)
    t_ov, size = [], 0
    for _ in range(rounds):
        t = time.perf_counter()
        size = len(msgspec.json.encode(overview(st, ns[0].id)))
        t_ov.append(time.perf_counter() - t)
    from prometheus_client import generate_latest

    from netweft import metrics
    m = metrics.enable()
    t_sc, body = [], b""
    for _ in range(rounds):
        t = time.perf_counter()
        samples = {"netweft_peer_probe_loss_ratio": [], "netweft_peer_probe_rtt_seconds": [],
                   "netweft_overlay_peers": [((f"ov{j}",), 99.0) for j in range(100)]}
        me = st.nodes()[0]   # a host exports its own probes: 99 peers
        for p, h in me.health.items():
            samples["netweft_peer_probe_loss_ratio"].append(((me.hostname, p), h.loss))
            samples["netweft_peer_probe_rtt_seconds"].append(((me.hostname, p), h.rtt_ms / 1000))
        m.state.samples = samples
        body = generate_latest(m.registry)
        t_sc.append(time.perf_counter() - t)
    return statistics.median(t_ov), size, statistics.median(t_sc), len(body)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--revisions", type=int, default=20000)
    a = p.parse_args()
    t, count = asyncio.run(replay(a.revisions, a.rounds))
    print(f"events --since over {a.revisions} revisions of history: {t:.2f} s ({a.revisions / t:,.0f} revisions/s,"
          f" {count} events)")
    c = asyncio.run(commits(a.rounds))
    print(f"manager commits/s (Hub.commit, one endpoint each): {c['none']:,.0f} without a clock, "
          f"{c['shipped']:,.0f} with it every 100 ms (as shipped), {c['every']:,.0f} with it on every commit")
    t_ov, size, t_sc, body = overview_and_scrape(a.rounds)
    print(f"dashboard overview, 100 hosts / 100 networks / 10,000 endpoints: {t_ov * 1000:.0f} ms, {size >> 10} KiB")
    print(f"metrics scrape of a host with 99 probed peers and 100 networks: {t_sc * 1000:.0f} ms, {body >> 10} KiB")


if __name__ == "__main__":
    main()
