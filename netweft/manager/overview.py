"""The cluster at one revision as the dashboard shows it: hosts, networks, endpoints and the host-to-host
health matrix (each node's probes of each peer, Node.health). Read-only, built from the manager's state."""
from __future__ import annotations

from netweft.manager.watch import CLUSTER, ENDPOINTS, ClusterState

MAX_ENDPOINTS = 2000   # a page of ten thousand rows helps nobody; the count says how many there are


def overview(state: ClusterState, self_id: str) -> dict:
    cluster = state.get(CLUSTER, "cluster") or {}
    leader = (cluster.get("leader") or {}).get("node_id", "")
    nodes = sorted(state.nodes(), key=lambda n: n.hostname)
    names = {n.id: n.hostname for n in nodes}
    nets = sorted(state.networks(), key=lambda n: n.name)
    eps = []
    for net in nets:
        if len(eps) >= MAX_ENDPOINTS:
            break
        for ep in sorted(state.net_eps.get(net.id, {}).values(), key=lambda e: e.ip)[:MAX_ENDPOINTS - len(eps)]:
            eps.append({"id": ep.id, "network": net.name, "name": ep.owner.name or ep.owner.id[:12],
                        "kind": ep.owner.kind, "host": ep.hostname or names.get(ep.node_id, ep.node_id),
                        "ip": f"{ep.ip}/{ep.prefix_len}", "mac": ep.mac})
    health = {}
    for n in nodes:
        row = {}
        for peer, h in n.health.items():
            if peer in names:
                row[peer] = {"state": h.state, "loss": h.loss, "rtt_ms": h.rtt_ms, "mtu_ok": h.mtu_ok,
                             "reason": h.reason, "since": h.since}
        health[n.id] = row
    return {
        "rev": state.rev, "cluster": cluster.get("id", ""),
        "nodes": [{"id": n.id, "hostname": n.hostname, "role": n.role, "leader": n.id == leader,
                   "state": "ready" if n.id == self_id else n.state, "addr": n.addr,
                   "availability": n.availability, "cert_not_after": n.cert_not_after} for n in nodes],
        "networks": [{"id": n.id, "name": n.name, "subnet": n.subnet, "gateway": n.gateway, "vni": n.vni,
                      "attachable": n.attachable, "internal": n.internal,
                      "endpoints": len(state.net_eps.get(n.id, ()))} for n in nets],
        "endpoints": eps, "endpoints_total": len(state.kinds[ENDPOINTS]),
        "health": health,
    }
