"""The opt-in metrics listener (`netweftd --metrics-addr IP:PORT`): GET /metrics in Prometheus' text format.

Counters and histograms are moved where things happen (netweft/metrics.py). The gauges of state are set
here, at each scrape, from what the daemon holds: the agent's and the manager's revisions, each watcher's
lag, peers per overlay and the FDB entries its sandbox has (read from the kernel), every node's probe
results (Node.health) and the certificates' expiry. Nothing is served but /metrics; it changes nothing.
"""
from __future__ import annotations

import logging
import time

from aiohttp import web

from netweft import metrics, pki
from netweft.errors import Conflict, NetweftError
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
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, self.addr[0], self.addr[1]).start()
        except OSError as e:
            await self.runner.cleanup()
            raise Conflict(f"cannot listen on --metrics-addr {self.addr[0]}:{self.addr[1]}: {e.strerror}; "
                           "choose another address") from None
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
        m, swarm = self.m, self.daemon.swarm
        for g in (m.watch_revision, m.watch_lag, m.peers, m.fdb, m.endpoints, m.nodes, m.probe_loss, m.probe_rtt,
                  m.probe_state, m.cert_expiry):
            g.clear()   # objects that went away take their series with them
        manager, overlay = swarm.manager, swarm.overlay
        nodes = {}
        if manager is not None and manager.hub is not None:
            st = manager.hub.state
            m.watch_revision.labels("manager").set(st.rev)
            for w in list(manager.hub.watchers):
                m.watch_lag.labels(w.hostname).set(max(0, st.rev - w.rev))
            for net in st.networks():
                m.endpoints.labels(net.name).set(len(st.net_eps.get(net.id, ())))
            states: dict[str, int] = {}
            for n in st.nodes():
                states[n.state] = states.get(n.state, 0) + 1
                nodes[n.id] = n
            for s, count in states.items():
                m.nodes.labels(s).set(count)
        if overlay is not None:
            m.watch_revision.labels("agent").set(overlay.rev)
            m.watch_connected.set(1 if overlay.connected.is_set() else 0)
            if self.m.last_watch_at is not None:
                m.watch_idle.set(round(time.monotonic() - self.m.last_watch_at, 3))
            nodes = nodes or dict(overlay.nodes)
            local = overlay._local_networks()
            for net_id, ns in list(overlay.nets.items()):
                m.peers.labels(ns.network.name).set(len(overlay.remote_peers(net_id)))
                if net_id in local:
                    try:
                        m.fdb.labels(ns.network.name).set(len(await overlay.dp.list_peers(overlay.sandbox(net_id))))
                    except NetweftError:
                        pass
        names = {n.id: n.hostname for n in nodes.values()}
        for node in nodes.values():
            for peer_id, h in node.health.items():
                peer = names.get(peer_id, peer_id)
                m.probe_loss.labels(node.hostname, peer).set(h.loss)
                if h.rtt_ms is not None:
                    m.probe_rtt.labels(node.hostname, peer).set(h.rtt_ms / 1000)
                m.probe_state.labels(node.hostname, peer, h.state).set(1)
        if swarm.state() is not None:
            f = files(swarm.dir)
            for which in ("cert", "ca"):
                try:
                    _, not_after = pki.validity(pki.load_cert(pki.load_pem(f[which])))
                except (OSError, NetweftError, ValueError):
                    continue
                m.cert_expiry.labels("node" if which == "cert" else "ca").set(not_after.timestamp())
