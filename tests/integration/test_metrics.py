"""Issue 13 item 3: Prometheus metrics on --metrics-addr, parsed with prometheus_client's own parser."""
from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from lab_fixture import run_cli, wait_for
from observe_lab import METRICS, http_get, node_ids, olab, set_health  # noqa: F401


def scrape(lab, host) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, through prometheus_client's parser."""
    status, ctype, text = http_get(lab, host, f"http://{METRICS}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels) -> float:
    """Sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_parse_and_move_with_actions(olab):
    lab = olab
    ids = node_ids(lab)
    before1, before2 = scrape(lab, "h1"), scrape(lab, "h2")
    names = {n for n, _ in before1}
    for family in ("netweft_api_requests_total", "netweft_api_request_duration_seconds_bucket",
                   "netweft_watch_revision", "netweft_reconcile_runs_total", "netweft_cluster_nodes",
                   "netweft_certificate_expiry_timestamp_seconds"):
        assert family in names, family
    assert value(before1, "netweft_cluster_nodes", state="ready") == 3
    now = time.time()
    assert value(before2, "netweft_certificate_expiry_timestamp_seconds", cert="node") > now
    assert value(before2, "netweft_certificate_expiry_timestamp_seconds", cert="ca") > now

    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.30.0/24", "mx")
    try:
        run_cli(lab, "h1", "run", "-d", "--name", "m1", "--network", "mx", "--", "sleep", "600")
        run_cli(lab, "h2", "run", "-d", "--name", "m2", "--network", "mx", "--", "sleep", "600")
        after1 = scrape(lab, "h1")
        # The leader allocated one network and two endpoints; its local API answered the create.
        assert value(after1, "netweft_allocations_total", kind="network") == \
            value(before1, "netweft_allocations_total", kind="network") + 1
        assert value(after1, "netweft_allocations_total", kind="endpoint") == \
            value(before1, "netweft_allocations_total", kind="endpoint") + 2
        assert total(after1, "netweft_api_requests_total", api="local", route="/networks/create", code="201") == \
            total(before1, "netweft_api_requests_total", api="local", route="/networks/create", code="201") + 1
        assert total(after1, "netweft_api_requests_total", api="cluster", route="/endpoints", method="POST") >= \
            total(before1, "netweft_api_requests_total", api="cluster", route="/endpoints", method="POST") + 2
        assert value(after1, "netweft_cluster_endpoints", network="mx") == 2
        assert value(after1, "netweft_watch_revision", role="manager") > value(before1, "netweft_watch_revision",
                                                                                role="manager")
        # h2 sees h1's endpoint as its one peer, programmed in the kernel's FDB; its reconciles ran.
        got = wait_for(lambda: (s := scrape(lab, "h2")) and value(s, "netweft_overlay_fdb_entries", network="mx") == 1
                       and s, timeout=20, what="one FDB entry on h2")
        assert value(got, "netweft_overlay_peers", network="mx") == 1
        runs = total(before2, "netweft_reconcile_runs_total", kind="resync")
        wait_for(lambda: total(scrape(lab, "h2"), "netweft_reconcile_runs_total", kind="resync") > runs, timeout=20,
                 what="a periodic resync counted on h2")
        # h1 had its sandbox first: h2's endpoint came to it on the watch and was flushed into its FDB.
        wait_for(lambda: total(scrape(lab, "h1"), "netweft_reconcile_runs_total", kind="flush", result="ok") >= 1,
                 timeout=20, what="a flush of peers counted on h1")
        assert value(got, "netweft_watch_connected") == 1
        assert value(got, "netweft_watch_revision", role="agent") >= value(after1, "netweft_watch_revision",
                                                                           role="manager")
        # Probe results come from Node.health: written into the store as h2's probes report them.
        set_health(lab, ids["h2"], {ids["h1"]: {"state": "degraded", "loss": 0.25, "rtt_ms": 1.5, "mtu_ok": True,
                                                "reason": "a quarter of the probes to h1 were lost"}})
        # Each host exports its own probes (from its copy of its Node, which the watch brings).
        s = wait_for(lambda: (s := scrape(lab, "h2")) and
                     value(s, "netweft_peer_probe_loss_ratio", node="h2", peer="h1") == 0.25 and s,
                     timeout=20, what="probe loss on h2")
        assert value(s, "netweft_peer_probe_rtt_seconds", node="h2", peer="h1") == 0.0015
        assert value(s, "netweft_peer_health", node="h2", peer="h1", state="degraded") == 1
        assert not any(n == "netweft_peer_probe_loss_ratio" for n, _ in scrape(lab, "h1"))
    finally:
        for host, ctr in (("h1", "m1"), ("h2", "m2")):
            run_cli(lab, host, "rm", "-f", ctr, check=False)
        run_cli(lab, "h1", "network", "rm", "mx", check=False)
        set_health(lab, ids["h2"], {})
    final = scrape(lab, "h1")
    assert value(final, "netweft_releases_total", kind="network") >= 1
    assert ("netweft_cluster_endpoints", (("network", "mx"),)) not in final   # gone with its network
