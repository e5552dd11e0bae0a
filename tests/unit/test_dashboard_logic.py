"""Issue 13 item 5, the pure parts: what the dashboard shows, and which Host headers it answers."""
import pytest

from netweft.daemon.dashboard import host_allowed
from netweft.manager.overview import overview
from netweft.manager.watch import CLUSTER, ENDPOINTS, NETWORKS, NODES, ClusterState
from netweft.model import codec
from netweft.model.objects import Endpoint, Network, Node, Owner, PeerHealth


@pytest.mark.parametrize("host,ok", [("127.0.0.1:9324", True), ("localhost:9324", True), ("localhost", True),
                                     ("[::1]:9324", True), ("192.0.2.11", True), ("evil.example:9324", False),
                                     ("127.0.0.1.nip.io:9324", False), ("", False), (None, False),
                                     ("localhost.evil.example", False)])
def test_only_addresses_and_localhost_are_answered(host, ok):
    assert host_allowed(host) is ok


def test_the_overview_has_hosts_networks_endpoints_and_the_health_matrix():
    st = ClusterState()
    a = Node(id="a" * 25, hostname="ha", role="manager", addr="192.0.2.11", state="down",
             health={"b" * 25: PeerHealth(state="degraded", loss=0.5, rtt_ms=2.0, reason="lossy"),
                     "gone": PeerHealth(state="unreachable")})
    b = Node(id="b" * 25, hostname="hb", role="worker", addr="192.0.2.12")
    net = Network(id="n" * 12, name="ov", driver="overlay", scope="swarm", created="", subnet="198.18.0.0/24",
                  gateway="198.18.0.1", vni=4096, attachable=True)
    ep = Endpoint(id="e" * 12, network_id=net.id, node_id=b.id, hostname="hb", ip="198.18.0.2", prefix_len=24,
                  mac="02:42:c6:12:00:02", owner=Owner(kind="netweft", id="c" * 64, name="web"))
    for kind, key, obj in [(NODES, a.id, a), (NODES, b.id, b), (NETWORKS, net.id, net), (ENDPOINTS, ep.id, ep),
                           (CLUSTER, "cluster", {"id": "cid", "leader": {"node_id": a.id}})]:
        st.put(kind, key, codec.encode(obj), 1)
    st.rev = 7
    o = overview(st, self_id=a.id)
    assert o["rev"] == 7 and o["cluster"] == "cid"
    assert [(n["hostname"], n["leader"], n["state"]) for n in o["nodes"]] == [("ha", True, "ready"),
                                                                              ("hb", False, "ready")]
    assert o["networks"] == [{"id": net.id, "name": "ov", "subnet": "198.18.0.0/24", "gateway": "198.18.0.1",
                              "vni": 4096, "attachable": True, "internal": False, "endpoints": 1}]
    assert o["endpoints"] == [{"id": ep.id, "network": "ov", "name": "web", "kind": "netweft", "host": "hb",
                               "ip": "198.18.0.2/24", "mac": "02:42:c6:12:00:02"}] and o["endpoints_total"] == 1
    # A peer that is no longer a node is left out of the matrix.
    assert o["health"] == {a.id: {b.id: {"state": "degraded", "loss": 0.5, "rtt_ms": 2.0, "mtu_ok": None,
                                         "reason": "lossy", "since": ""}}, b.id: {}}
