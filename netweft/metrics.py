"""netweftd's Prometheus metrics: the metric objects, and the one-line hooks the code calls.

Off unless the daemon runs with --metrics-addr: until `enable()`, prometheus_client is not imported
(the CLI and a daemon without metrics never load it) and every hook is one test of a global. Counters
and histograms are moved by the hooks where things happen; gauges of state (revisions, peers, FDB
entries, probe results, certificate expiry) are set from the daemon's state at each scrape
(netweft/daemon/metrics_server.py).
"""
from __future__ import annotations

from typing import Any

_m: "Metrics | None" = None

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.api_requests = Counter("netweft_api_requests", "API calls answered, by API (local, cluster), route, "
                                    "method and status code", ["api", "route", "method", "code"], registry=r)
        self.api_seconds = Histogram("netweft_api_request_duration_seconds", "Time to answer an API call "
                                     "(streams: until the stream ends)", ["api", "route", "method"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.allocations = Counter("netweft_allocations", "Allocations made by this manager (network: a "
                                   "subnet and a VNI; endpoint: an address and a MAC)", ["kind"], registry=r)
        self.releases = Counter("netweft_releases", "Allocations given back by this manager", ["kind"], registry=r)
        self.reconcile_runs = Counter("netweft_reconcile_runs", "Reconcile runs of the overlay agent "
                                      "(resync: the periodic full comparison; flush: peers from the watch), by "
                                      "result (ok, failed: at least one step failed)", ["kind", "result"], registry=r)
        self.reconcile_seconds = Histogram("netweft_reconcile_duration_seconds", "Duration of reconcile runs",
                                           ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.watch_messages = Counter("netweft_watch_messages", "Watch stream lines received by the agent, "
                                      "by type (snapshot, events, ping)", ["type"], registry=r)
        self.last_watch_at: float | None = None   # time.monotonic() of the watch's last line
        # The gauges of state: set all at once at each scrape (StateGauges), not one labelled child at a time.
        self.state = StateGauges()
        r.register(self.state)


# name -> (help, label names): what the daemon's state is read into at each scrape.
STATE = {
    "netweft_watch_revision": ("Cluster store revision: held by this host's overlay agent (role=agent), or this "
                               "manager's view (role=manager)", ("role",)),
    "netweft_watch_lag_revisions": ("Revisions a watcher is behind this manager, per watching node", ("node",)),
    "netweft_watch_last_message_age_seconds": ("Seconds since the agent's watch stream last brought a line "
                                               "(pings come every 2 s)", ()),
    "netweft_watch_connected": ("1 while the agent's watch stream is open", ()),
    "netweft_overlay_peers": ("Remote endpoints this host should reach, per overlay network", ("network",)),
    "netweft_overlay_fdb_entries": ("Static FDB entries programmed in the network's sandbox (read from the "
                                    "kernel)", ("network",)),
    "netweft_cluster_endpoints": ("Endpoints per overlay network (managers)", ("network",)),
    "netweft_cluster_nodes": ("Nodes by state (managers)", ("state",)),
    "netweft_peer_probe_loss_ratio": ("Share of this node's last data-path probes to peer that were lost",
                                      ("node", "peer")),
    "netweft_peer_probe_rtt_seconds": ("Median round trip of this node's last data-path probes to peer",
                                       ("node", "peer")),
    "netweft_peer_health": ("1 for the state of the data path from this node to peer", ("node", "peer", "state")),
    "netweft_certificate_expiry_timestamp_seconds": ("When a certificate expires (Unix time): this node's "
                                                     "(cert=node), and the cluster CA's (cert=ca)", ("cert",)),
}


class StateGauges:
    """A prometheus_client collector of the STATE gauges; `samples` is replaced whole at each scrape:
    {name: [(label values, value)]}. Series of objects that went away go with them."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[tuple[str, ...], float]]] = {}

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        for name, (text, labels) in STATE.items():
            g = GaugeMetricFamily(name, text, labels=list(labels))
            for values, v in self.samples.get(name, ()):
                g.add_metric(list(values), v)
            yield g


def enable() -> Metrics:
    """Create the metrics (importing prometheus_client); the hooks record from now on."""
    global _m
    if _m is None:
        _m = Metrics()
    return _m


def get() -> Metrics | None:
    return _m


def disable() -> None:
    global _m
    _m = None


# ---------------------------------------------------------------- hooks (one line at each site)
def api_call(api: str, route: str, method: str, code: int, seconds: float) -> None:
    if _m is not None:
        _m.api_requests.labels(api, route, method, str(code)).inc()
        _m.api_seconds.labels(api, route, method).observe(seconds)


def allocated(kind: str, n: int = 1) -> None:
    if _m is not None and n:
        _m.allocations.labels(kind).inc(n)


def released(kind: str, n: int = 1) -> None:
    if _m is not None and n:
        _m.releases.labels(kind).inc(n)


def reconciled(kind: str, seconds: float, failed: int = 0) -> None:
    if _m is not None:
        _m.reconcile_runs.labels(kind, "failed" if failed else "ok").inc()
        _m.reconcile_seconds.labels(kind).observe(seconds)


def watch_message(msg: Any) -> None:
    if _m is not None and isinstance(msg, dict):
        import time
        _m.last_watch_at = time.monotonic()
        kind = msg.get("type")
        _m.watch_messages.labels(kind if kind in ("snapshot", "events", "ping") else "other").inc()


def middlewares(api: str) -> list:
    """[a middleware (netweft.http.web's or aiohttp's) counting and timing each call of `api`] when metrics are
    on, else []."""
    if _m is None:
        return []
    import time

    async def measure(request, handler):
        t0 = time.monotonic()
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "other"   # a template: no label per object
        code = 500
        try:
            resp = await handler(request)
            code = resp.status
            return resp
        except Exception as e:   # an HTTP exception carries its status; anything else is a 500
            code = getattr(e, "status", 500)
            raise
        finally:
            api_call(api, name, request.method, code, time.monotonic() - t0)
    measure.__middleware_version__ = 1   # a new-style middleware to aiohttp, without importing it here
    return [measure]
