"""Which hosts have their endpoints withdrawn: the leader decides, from two independent signals.

A host is withdrawn when it is Down for the managers (missed heartbeats) AND every host that shares a
network with it, and is itself Ready, reports its data path unreachable (agent/health.py's probes
through VXLAN). Either signal alone is not enough: a host cut off from the managers only still carries
its containers' traffic, and a path that one peer cannot use says nothing about the host. It is
reinstated as soon as either stops being true (a heartbeat, or a probe getting through). The decision is
level-triggered: `withdrawals` is a pure function of the nodes and who shares networks with whom.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from netweft.model.objects import Node


def sharers(node_nets: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """node -> the other nodes with an endpoint on one of its networks (node_nets: node -> its networks)."""
    by_net: dict[str, set[str]] = {}
    for node, nets in node_nets.items():
        for net in nets:
            by_net.setdefault(net, set()).add(node)
    out: dict[str, set[str]] = {}
    for members in by_net.values():
        for node in members:
            out.setdefault(node, set()).update(members - {node})
    return out


def should_withdraw(node: Node, its_sharers: Iterable[str], nodes: Mapping[str, Node]) -> bool:
    if node.state != "down":
        return False
    views = []
    for other in its_sharers:
        reporter = nodes.get(other)
        if reporter is None or reporter.state != "ready":
            continue   # a host that is down itself says nothing fresh
        view = reporter.health.get(node.id)
        if view is not None:
            views.append(view.state)
    return bool(views) and all(v == "unreachable" for v in views)


def sharers_of(node: str, node_nets: Mapping[str, Iterable[str]], members: Mapping[str, set[str]]) -> set[str]:
    """The other nodes with an endpoint on one of node's networks (members: network -> its nodes)."""
    out: set[str] = set()
    for net in node_nets.get(node, ()):
        out |= members.get(net, set())
    out.discard(node)
    return out


def withdrawals(nodes: Mapping[str, Node], node_nets: Mapping[str, Iterable[str]]) -> dict[str, bool]:
    """node -> the `withdrawn` it should have, for every node whose flag is wrong now. Only a node Down or
    withdrawn can have a wrong flag: the others' sharers are never computed (1,000 nodes on one network
    are a million pairs, every second while one node is Down)."""
    suspects = [n for n in nodes.values() if n.state == "down" or n.withdrawn]
    if not suspects:
        return {}
    members: dict[str, set[str]] = {}
    for node, nets in node_nets.items():
        for net in nets:
            members.setdefault(net, set()).add(node)
    out = {}
    for node in suspects:
        want = should_withdraw(node, sharers_of(node.id, node_nets, members), nodes)
        if want != node.withdrawn:
            out[node.id] = want
    return out
