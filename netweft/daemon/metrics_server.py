"""The opt-in metrics listener (`netweftd --metrics-addr IP:PORT`): GET /metrics in Prometheus' text format.

Counters and histograms are moved where things happen (netweft/metrics.py). The gauges of state are set
here, at each scrape, from what the daemon holds: the agent's and the manager's revisions, each watcher's
lag, peers per overlay and the FDB entries its sandbox has (read from the kernel), every node's probe
results (Node.health) and the certificates' expiry. Nothing is served but /metrics; it changes nothing.
"""
from __future__ import annotations

import logging
import time

from netweft.http import web

from netweft.daemon.listen import serve_tcp
from netweft import metrics, pki
from netweft.errors import NetweftError
from netweft.pki.nodepair import files

log = logging.getLogger("netweft.metrics")


class MetricsServer:
    def __init__(self, daemon, addr: tuple[str, int]):
        self.daemon, self.addr = daemon, addr
        self.m = metrics.enable()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.scrape)
        self.runner = await serve_tcp(app, self.addr, "--metrics-addr")
        log.info("metrics served", extra={"url": f"http://{self.addr[0]}:{self.addr[1]}/metrics"})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        metrics.disable()

    async def scrape(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        try:
            await self.refresh()
        except Exception:  # a half-read state still gives the counters; the log says what failed
            log.exception("reading the daemon's state for metrics failed")
        return web.Response(body=generate_latest(self.m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def refresh(self) -> None:
        out: dict[str, list] = {}

        def add(name: str, labels: tuple, value: float) -> None:
            out.setdefault(name, []).append((labels, float(value)))

        swarm = self.daemon.swarm
        manager, overlay = swarm.manager, swarm.overlay
        nodes = {}
        if manager is not None and manager.hub is not None:
            st = manager.hub.state
            add("netweft_watch_revision", ("manager",), st.rev)
            for w in list(manager.hub.watchers):
                add("netweft_watch_lag_revisions", (w.hostname,), max(0, st.rev - w.rev))
            for net in st.networks():
                add("netweft_cluster_endpoints", (net.name,), len(st.net_eps.get(net.id, ())))
            states: dict[str, int] = {}
            for n in st.nodes():
                states[n.state] = states.get(n.state, 0) + 1
                nodes[n.id] = n
            for s, count in states.items():
                add("netweft_cluster_nodes", (s,), count)
        if overlay is not None:
            add("netweft_watch_revision", ("agent",), overlay.rev)
            add("netweft_watch_connected", (), 1 if overlay.connected.is_set() else 0)
            if self.m.last_watch_at is not None:
                add("netweft_watch_last_message_age_seconds", (), round(time.monotonic() - self.m.last_watch_at, 3))
            nodes = nodes or dict(overlay.nodes)
            local = overlay._local_networks()
            for net_id, ns in list(overlay.nets.items()):
                add("netweft_overlay_peers", (ns.network.name,), len(overlay.remote_peers(net_id)))
                if net_id in local:
                    try:
                        fdb = len(await overlay.dp.list_peers(overlay.sandbox(net_id)))
                    except NetweftError:
                        continue
                    add("netweft_overlay_fdb_entries", (ns.network.name,), fdb)
        # This host's own probes only: every host is a target of its own, and a manager exporting the whole
        # matrix would make a scrape of N^2 series.
        names = {n.id: n.hostname for n in nodes.values()}
        me = nodes.get(swarm.state()["NodeID"]) if swarm.state() is not None else None
        for peer_id, h in (me.health.items() if me is not None else ()):
            peer = names.get(peer_id, peer_id)
            add("netweft_peer_probe_loss_ratio", (me.hostname, peer), h.loss)
            if h.rtt_ms is not None:
                add("netweft_peer_probe_rtt_seconds", (me.hostname, peer), h.rtt_ms / 1000)
            add("netweft_peer_health", (me.hostname, peer, h.state), 1)
        if swarm.state() is not None:
            f = files(swarm.dir)
            for which in ("cert", "ca"):
                try:
                    _, not_after = pki.validity(pki.load_cert(pki.load_pem(f[which])))
                except (OSError, NetweftError, ValueError):
                    continue
                add("netweft_certificate_expiry_timestamp_seconds", ("node" if which == "cert" else "ca",),
                    not_after.timestamp())
        self.m.state.samples = out
