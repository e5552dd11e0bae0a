"""render_firewall is pure: check the JSON it produces without a kernel."""

import json

import pytest

from netweft.dataplane.firewall import (OVERLAY_TABLE, BridgeRule, render_delete_overlay_firewall, render_firewall,
                                        render_overlay_firewall)
from netweft.errors import InvalidRequest


def cmds(doc):
    return doc["nftables"]


def rules(doc, chain):
    return [c["add"]["rule"] for c in cmds(doc) if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def matches(rule):
    """The rule's matches as (key, op, right) tuples, plus the verdict/statement keys."""
    out = []
    for e in rule["expr"]:
        if "match" in e:
            m = e["match"]
            left = m["left"]
            key = left["meta"]["key"] if "meta" in left else f'{left["payload"]["protocol"]} {left["payload"]["field"]}'
            out.append((key, m["op"], m["right"]))
        else:
            out.extend(e.keys())
    return out


A = BridgeRule("nw-a", "198.18.0.0/24", internal=False, masquerade=True)
B = BridgeRule("nw-b", "198.18.1.0/24", internal=False, masquerade=False)
I = BridgeRule("nw-i", "198.18.2.0/24", internal=True, masquerade=False)


def test_empty_deletes_table_idempotently():
    doc = render_firewall("netweft", [])
    assert cmds(doc) == [
        {"add": {"table": {"family": "inet", "name": "netweft"}}},
        {"delete": {"table": {"family": "inet", "name": "netweft"}}},
    ]


def test_table_is_rebuilt_in_one_document():
    doc = render_firewall("netweft", [A])
    verbs = [next(iter(c)) for c in cmds(doc)]
    objs = [next(iter(next(iter(c.values())))) for c in cmds(doc)]
    # add + delete + add: the whole old table goes in the same transaction as the new one appears.
    assert verbs[:3] == ["add", "delete", "add"] and objs[:3] == ["table", "table", "table"]
    assert all(v == "add" for v in verbs[3:])
    json.dumps(doc)  # serialisable as is


def test_chains_hooks_and_priorities():
    doc = render_firewall("netweft", [A])
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds(doc) if "chain" in c.get("add", {})}
    assert chains["forward"]["type"] == "filter" and chains["forward"]["hook"] == "forward"
    assert chains["forward"]["prio"] == 0 and chains["forward"]["policy"] == "accept"
    assert chains["postrouting"]["type"] == "nat" and chains["postrouting"]["hook"] == "postrouting"
    assert chains["postrouting"]["prio"] == 100  # srcnat
    for c in chains.values():
        assert c["family"] == "inet" and c["table"] == "netweft"


def test_bridges_set_lists_all_bridges():
    doc = render_firewall("t", [B, A, I])
    sets = [c["add"]["set"] for c in cmds(doc) if "set" in c.get("add", {})]
    assert len(sets) == 1
    assert sets[0]["name"] == "bridges" and sets[0]["type"] == "ifname"
    assert sets[0]["elem"] == ["nw-a", "nw-b", "nw-i"]


def test_masquerade_only_for_masquerading_networks():
    doc = render_firewall("t", [A, B])
    nat = rules(doc, "postrouting")
    assert len(nat) == 1
    assert matches(nat[0]) == [
        ("ip saddr", "==", {"prefix": {"addr": "198.18.0.0", "len": 24}}),
        ("oifname", "!=", "nw-a"),
        "masquerade",
    ]


def test_subnet_with_host_bits_is_normalised():
    doc = render_firewall("t", [BridgeRule("nw-a", "198.18.0.1/24", False, True)])
    assert matches(rules(doc, "postrouting")[0])[0][2] == {"prefix": {"addr": "198.18.0.0", "len": 24}}


def test_bridges_isolated_from_each_other():
    doc = render_firewall("t", [A, B])
    fwd = [matches(r) for r in rules(doc, "forward")]
    assert [("iifname", "==", "nw-a"), ("oifname", "!=", "nw-a"), ("oifname", "==", "@bridges"), "drop"] in fwd
    assert [("iifname", "==", "nw-b"), ("oifname", "!=", "nw-b"), ("oifname", "==", "@bridges"), "drop"] in fwd
    assert len(fwd) == 2


def test_internal_network_blocked_both_ways_and_not_masqueraded():
    doc = render_firewall("t", [BridgeRule("nw-i", "198.18.2.0/24", internal=True, masquerade=True)])
    fwd = [matches(r) for r in rules(doc, "forward")]
    assert fwd == [
        [("iifname", "==", "nw-i"), ("oifname", "!=", "nw-i"), "drop"],
        [("oifname", "==", "nw-i"), ("iifname", "!=", "nw-i"), "drop"],
    ]
    assert rules(doc, "postrouting") == []


def test_output_is_stable_regardless_of_input_order():
    assert render_firewall("t", [A, B, I]) == render_firewall("t", [I, A, B])


@pytest.mark.parametrize("table", ["", "1abc", "a b", "a;b", "x" * 65])
def test_bad_table_name(table):
    with pytest.raises(InvalidRequest):
        render_firewall(table, [A])


@pytest.mark.parametrize("bridge", ["", "x" * 16, "a/b", " a"])
def test_bad_bridge_name(bridge):
    with pytest.raises(InvalidRequest):
        render_firewall("t", [BridgeRule(bridge, "198.18.0.0/24", False, False)])


@pytest.mark.parametrize("subnet", ["", "198.18.0.0/33", "fd00::/64", "example.com", 5, None])
def test_bad_subnet(subnet):
    # A malformed address would otherwise reach libnftables, which tries to resolve it as a host name.
    with pytest.raises(InvalidRequest):
        render_firewall("t", [BridgeRule("nw-a", subnet, False, True)])


def test_duplicate_bridge():
    with pytest.raises(InvalidRequest):
        render_firewall("t", [A, BridgeRule("nw-a", "198.18.9.0/24", False, False)])


@pytest.mark.parametrize("rule", [{"bridge": "nw-a", "subnet": "198.18.0.0/24"}, ("nw-a", "198.18.0.0/24", False, True)])
def test_only_bridge_rules(rule):
    with pytest.raises(InvalidRequest):
        render_firewall("t", [rule])


# ---- the overlays' gateway bridge --------------------------------------------------------------------------

def test_overlay_table_replaces_itself_and_clamps_mss_both_ways():
    doc = render_overlay_firewall("nw_gwbridge", "198.19.0.7/24")
    assert cmds(doc)[:3] == [{"add": {"table": {"family": "inet", "name": OVERLAY_TABLE}}},
                             {"delete": {"table": {"family": "inet", "name": OVERLAY_TABLE}}},
                             {"add": {"table": {"family": "inet", "name": OVERLAY_TABLE}}}]
    forward = rules(doc, "forward")
    assert [matches(r)[:2] for r in forward] == [
        [("iifname", "==", "nw_gwbridge"), ("oifname", "==", "nw_gwbridge")],
        [("iifname", "==", "nw_gwbridge-*"), ("oifname", "!=", "nw_gwbridge-*")],
        [("iifname", "==", "nw_gwbridge"), ("tcp flags", "in", "syn")],
        [("oifname", "==", "nw_gwbridge"), ("tcp flags", "in", "syn")],
    ]
    assert "drop" in matches(forward[0]) and "drop" in matches(forward[1])
    assert all("mangle" in matches(r) for r in forward[2:])
    [masq] = rules(doc, "postrouting")
    assert matches(masq) == [("ip saddr", "==", {"prefix": {"addr": "198.19.0.0", "len": 24}}),
                             ("oifname", "!=", "nw_gwbridge"), "masquerade"]
    # Frames bridged through an extension of the gateway bridge (bridgechain.py) are not tracked there.
    [raw] = rules(doc, "prerouting")
    assert matches(raw) == [("iifname", "==", "nw_gwbridge-*"), "notrack"]
    assert cmds(render_delete_overlay_firewall())[1] == {"delete": {"table": {"family": "inet", "name": OVERLAY_TABLE}}}


@pytest.mark.parametrize("gwbridge,subnet", [("x" * 16, "198.19.0.0/24"), ("a b", "198.19.0.0/24"),
                                             ("nw_gwbridge", "198.19.0.0/33"), ("nw_gwbridge", 5),
                                             ("nw_gwbridge", "gateway")])
def test_overlay_table_refuses_bad_arguments(gwbridge, subnet):
    with pytest.raises(InvalidRequest):
        render_overlay_firewall(gwbridge, subnet)
