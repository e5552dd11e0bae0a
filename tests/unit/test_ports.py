"""Published ports: the DNAT table renderer and the conflict rules."""
import pytest

from netweft.daemon import ports
from netweft.dataplane.firewall import PortRule, render_port_maps
from netweft.errors import Conflict, InvalidRequest
from netweft.model.objects import Endpoint, Owner
from netweft.model.runtimes import PublishedPort


def test_render_replaces_the_table_and_dnats_only_local_addresses():
    doc = render_port_maps([PortRule("tcp", 8080, "", "198.19.0.2", 80), PortRule("udp", 53, "192.0.2.1",
                                                                                 "198.18.0.2", 5353)])
    cmds = doc["nftables"]
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "netweft-ports"}}}
    assert cmds[1] == {"delete": {"table": {"family": "inet", "name": "netweft-ports"}}}
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    assert len(rules) == 4 and {r["chain"] for r in rules} == {"prerouting", "output"}
    for r in rules:
        assert r["expr"][0]["match"]["left"] == {"fib": {"result": "type", "flags": ["daddr"]}}
    assert {"dnat": {"family": "ip", "addr": "198.19.0.2", "port": 80}} in [e for r in rules for e in r["expr"]]
    assert render_port_maps([])["nftables"][2:] == []


@pytest.mark.parametrize("rules", [
    [PortRule("icmp", 1, "", "198.18.0.2", 1)], [PortRule("tcp", 0, "", "198.18.0.2", 1)],
    [PortRule("tcp", 1, "", "198.18.0.2", 70000)], [PortRule("tcp", 1, "x", "198.18.0.2", 1)],
    [PortRule("tcp", 1, "", "198.18.0.300", 1)],
    [PortRule("tcp", 80, "", "198.18.0.2", 1), PortRule("tcp", 80, "192.0.2.1", "198.18.0.3", 1)],
])
def test_render_refuses_bad_rules(rules):
    with pytest.raises(InvalidRequest):
        render_port_maps(rules)


def ep(i: int, node: str = "n1", gw_ip: str | None = "198.19.0.9") -> Endpoint:
    return Endpoint(id=f"e{i}", network_id="n", node_id=node, ip=f"198.18.0.{i}", prefix_len=24,
                    mac=f"02:00:00:00:00:{i:02x}", owner=Owner(kind="cni", id=f"c{i}:eth0"), gw_ip=gw_ip)


def test_destinations_and_conflicts():
    assert ports.destination(ep(2)) == "198.19.0.9"
    assert ports.destination(ep(2, node="")) == "198.18.0.2"
    taken = {"e1": [PublishedPort(host_port=8080, container_port=80)]}
    ports.check(ep(2), [PublishedPort(host_port=8081, container_port=80),
                        PublishedPort(protocol="udp", host_port=8080, container_port=80)], taken)
    ports.check(ep(1), [PublishedPort(host_port=8080, container_port=81)], taken)   # its own, replaced
    for bad in ([PublishedPort(host_port=8080, container_port=80)],
                [PublishedPort(host_port=8080, host_ip="192.0.2.1", container_port=80)],
                [PublishedPort(host_port=9, container_port=80), PublishedPort(host_port=9, container_port=81)]):
        with pytest.raises(Conflict):
            ports.check(ep(2), bad, taken)
    with pytest.raises(InvalidRequest):
        ports.check(ep(3, gw_ip=None), [PublishedPort(host_port=1, container_port=1)], {})
