"""The anti-spoofing rules as libnftables JSON (dataplane/antispoof.py): what a port may send, refusals of malformed
arguments before anything is sent, and the list of guarded ports read back."""
import pytest

from netweft.dataplane import antispoof
from netweft.errors import InvalidRequest, KernelError


def test_a_port_may_send_only_from_its_mac_and_address():
    cmds = antispoof.render_add_port("nwv0123", "02:42:c6:12:00:03", "198.18.0.3")["nftables"]
    rules = [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})
             and c["add"]["rule"]["chain"] == "p_nwv0123"]
    assert len(rules) == 5 and all(r[-1] == {"drop": None} for r in rules)
    assert rules[0][0]["match"] == {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                                    "right": "02:42:c6:12:00:03"}
    assert {"set": ["198.18.0.3", "0.0.0.0"]} in [m["match"]["right"] for m in rules[2][:-1]]
    assert rules[3][1]["match"]["right"] == "198.18.0.3"
    assert rules[4][0]["match"]["right"] == {"set": ["ip", "arp"]}
    elem = [c["add"]["element"] for c in cmds if "element" in c.get("add", {})]
    assert elem == [{"family": "bridge", "table": "netweft_as", "name": "ports",
                     "elem": [["nwv0123", {"jump": {"target": "p_nwv0123"}}]]}]
    # The chain is flushed before its rules: adding a port twice leaves one set of rules.
    names = [next(iter(c)) + ":" + next(iter(next(iter(c.values())))) for c in cmds]
    assert names.index("flush:chain") < names.index("add:rule")


@pytest.mark.parametrize("port, mac, ip", [("a/b", "02:42:c6:12:00:03", "198.18.0.3"),
                                           ("nwv1", "ff:ff:ff:ff:ff:ff", "198.18.0.3"),
                                           ("nwv1", "02:42:c6:12:00:03", "198.18.0.300"),
                                           ("x" * 16, "02:42:c6:12:00:03", "198.18.0.3")])
def test_malformed_arguments_are_refused_before_anything_runs(port, mac, ip):
    ran = []
    with pytest.raises(InvalidRequest):
        antispoof.add_port(lambda cmd, what: ran.append(cmd), port, mac, ip)
    assert ran == []


def test_deleting_what_is_not_there_is_fine_and_other_refusals_are_not():
    def missing(cmd, what):
        raise KernelError(f"{what}: Could not process rule: No such file or directory")
    antispoof.delete_port(missing, "nwv1")
    assert antispoof.list_ports(missing) == []

    def broken(cmd, what):
        raise KernelError(f"{what}: Operation not permitted")
    with pytest.raises(KernelError):
        antispoof.delete_port(broken, "nwv1")


def test_the_guarded_ports_are_read_from_the_map():
    out = {"nftables": [{"metainfo": {}}, {"map": {"name": "ports", "elem": [
        ["nwv2", {"jump": {"target": "p_nwv2"}}], ["nwv1", {"jump": {"target": "p_nwv1"}}]]}}]}
    assert antispoof.parse_list(out) == ["nwv1", "nwv2"]
    assert antispoof.parse_list({"nftables": [{"map": {"name": "ports"}}]}) == []
