"""nftables rules, rendered as libnftables JSON: local bridge networks, and the overlays' gateway bridge.

The renderers are pure so they can be tested without a kernel (and the fake data plane validates with
them); the real data plane sends their output in one transaction. The table is rebuilt from scratch each time (add, delete, add), so rules of
networks that no longer exist disappear atomically with the new ones appearing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from netweft.dataplane.checks import check_ifname
from netweft.errors import InvalidRequest

# nft identifiers: a letter or underscore, then letters, digits, underscores.
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_IFNAMSIZ = 15

FAMILY = "inet"
BRIDGES_SET = "bridges"
FORWARD_CHAIN = "forward"
POSTROUTING_CHAIN = "postrouting"
PRIO_FILTER = 0
PRIO_SRCNAT = 100
OVERLAY_TABLE = "netweft-ov"   # the gateway bridge's table (overlay egress)


@dataclass(frozen=True)
class BridgeRule:
    """What the firewall must know about one local bridge network."""

    bridge: str        # Linux bridge name, e.g. "nw-1a2b3c"
    subnet: str        # "198.18.0.0/24"
    internal: bool     # no forwarding in or out of the bridge
    masquerade: bool   # source-NAT traffic from the subnet leaving through another interface


def _check(table: str, networks: list[BridgeRule]) -> None:
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise InvalidRequest(f"invalid nftables table name {table!r}")
    seen = set()
    for n in networks:
        if not isinstance(n, BridgeRule):
            raise InvalidRequest(f"expected a BridgeRule, got {n!r}")
        if not isinstance(n.bridge, str) or not n.bridge or len(n.bridge.encode()) > _IFNAMSIZ or "/" in n.bridge or n.bridge.strip() != n.bridge:
            raise InvalidRequest(f"invalid bridge name {n.bridge!r}")
        if n.bridge in seen:
            raise InvalidRequest(f"bridge {n.bridge} listed twice")
        seen.add(n.bridge)
        try:
            if not isinstance(n.subnet, str):
                raise ValueError
            ipaddress.IPv4Network(n.subnet, strict=False)
        except ValueError:
            raise InvalidRequest(f"invalid subnet {n.subnet!r} for bridge {n.bridge}") from None


def _meta(key: str, op: str, value) -> dict:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _rule(table: str, chain: str, comment: str, *expr: dict) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain,
                             "comment": comment, "expr": list(expr)}}}


def render_firewall(table: str, networks: list[BridgeRule]) -> dict:
    """The libnftables JSON command that replaces table `inet <table>` with rules for `networks`.

    With no networks, the command deletes the table (creating it first makes the delete idempotent).
    """
    _check(table, networks)
    tbl = {"family": FAMILY, "name": table}
    # "add" then "delete" never fails, whether or not the table exists.
    cmds: list[dict] = [{"add": {"table": dict(tbl)}}, {"delete": {"table": dict(tbl)}}]
    if not networks:
        return {"nftables": cmds}

    networks = sorted(networks, key=lambda n: n.bridge)  # stable output for stable input
    cmds.append({"add": {"table": dict(tbl)}})
    cmds.append({"add": {"set": {"family": FAMILY, "table": table, "name": BRIDGES_SET, "type": "ifname",
                                 "elem": [n.bridge for n in networks]}}})
    cmds.append({"add": {"chain": {"family": FAMILY, "table": table, "name": FORWARD_CHAIN,
                                   "type": "filter", "hook": "forward", "prio": PRIO_FILTER,
                                   "policy": "accept"}}})
    cmds.append({"add": {"chain": {"family": FAMILY, "table": table, "name": POSTROUTING_CHAIN,
                                   "type": "nat", "hook": "postrouting", "prio": PRIO_SRCNAT,
                                   "policy": "accept"}}})
    drop = {"drop": None}
    for n in networks:
        br = n.bridge
        if n.internal:
            # Nothing is routed out of, or into, an internal network.
            cmds.append(_rule(table, FORWARD_CHAIN, f"internal {br} out",
                              _meta("iifname", "==", br), _meta("oifname", "!=", br), drop))
            cmds.append(_rule(table, FORWARD_CHAIN, f"internal {br} in",
                              _meta("oifname", "==", br), _meta("iifname", "!=", br), drop))
        else:
            # Networks are isolated from each other; the reverse direction is covered by the other
            # bridge's own rule.
            cmds.append(_rule(table, FORWARD_CHAIN, f"isolate {br}",
                              _meta("iifname", "==", br), _meta("oifname", "!=", br),
                              _meta("oifname", "==", "@" + BRIDGES_SET), drop))
        if n.masquerade and not n.internal:
            net = ipaddress.IPv4Network(n.subnet, strict=False)
            cmds.append(_rule(table, POSTROUTING_CHAIN, f"masquerade {br}",
                              {"match": {"op": "==",
                                         "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                         "right": {"prefix": {"addr": str(net.network_address),
                                                              "len": net.prefixlen}}}},
                              _meta("oifname", "!=", br),
                              {"masquerade": None}))
    return {"nftables": cmds}


# ---- the overlays' gateway bridge -----------------------------------------------------------------

def _clamp_mss() -> list[dict]:
    # `tcp flags syn tcp option maxseg size set rt mtu`: SYN and SYN-ACK, MSS lowered to fit the route out.
    return [{"match": {"op": "in", "left": {"payload": {"protocol": "tcp", "field": "flags"}}, "right": "syn"}},
            {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                        "value": {"rt": {"key": "mtu"}}}}]


def render_overlay_firewall(gwbridge: str, gw_subnet: str, table: str = OVERLAY_TABLE) -> dict:
    """The libnftables JSON command that atomically replaces table `inet <table>` for the gateway bridge.

    - forward: nothing is routed from the gateway bridge back into it. Together with isolated bridge
      ports (no L2 path between containers on the gateway bridge) this keeps overlays apart: a
      container's only way to a container on another overlay would be through the host.
    - forward: TCP MSS of SYNs crossing the gateway bridge is clamped to the route MTU, so a smaller
      uplink (or a smaller gateway bridge) never blackholes TCP. Overlay traffic itself needs no clamp:
      both ends sit on the overlay MTU, so their own SYNs already advertise the right MSS, and the
      sandbox only bridges.
    - postrouting: the gateway bridge subnet is masqueraded when it leaves through another interface.
    - forward: nothing is routed from an extension of the gateway bridge (it has no address and no ARP; a
      frame sent to its MAC is not let through the host). A frame bridged through it (br_netfilter) passes
      the hook with the extension as both ways in and out, and goes on.
    - prerouting (raw): nothing is tracked while it is bridged through an extension of the gateway bridge
      (dataplane/bridgechain.py). Where br_netfilter is on, a frame bridged there passes the IP hooks as if
      routed out of the extension: it would be masqueraded to some host address there, or its connection
      would be set up without NAT before it reaches the gateway bridge, where it is routed and masqueraded.
    """
    check_ifname(gwbridge, "gateway bridge name")
    try:
        if not isinstance(gw_subnet, str):
            raise TypeError
        net = ipaddress.IPv4Network(gw_subnet, strict=False)
    except (ValueError, TypeError):
        raise InvalidRequest(f"invalid gateway bridge subnet {gw_subnet!r}") from None
    tbl = {"family": "inet", "name": table}

    def rule(chain: str, comment: str, *expr: dict) -> dict:
        return {"add": {"rule": {"family": "inet", "table": table, "chain": chain, "comment": comment,
                                 "expr": list(expr)}}}

    return {"nftables": [
        # "add" then "delete" never fails, whether or not the table exists; then build it afresh.
        {"add": {"table": dict(tbl)}},
        {"delete": {"table": dict(tbl)}},
        {"add": {"table": dict(tbl)}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "forward", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "postrouting", "type": "nat",
                           "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "prerouting", "type": "filter",
                           "hook": "prerouting", "prio": -300, "policy": "accept"}}},
        rule("prerouting", f"no conntrack while bridged in an extension of {gwbridge}",
             _meta("iifname", "==", f"{gwbridge}-*"), {"notrack": None}),
        rule("forward", f"no routing between {gwbridge} ports",
             _meta("iifname", "==", gwbridge), _meta("oifname", "==", gwbridge), {"drop": None}),
        rule("forward", f"nothing routed from an extension of {gwbridge}",
             _meta("iifname", "==", f"{gwbridge}-*"), _meta("oifname", "!=", f"{gwbridge}-*"), {"drop": None}),
        rule("forward", f"clamp MSS out of {gwbridge}", _meta("iifname", "==", gwbridge), *_clamp_mss()),
        rule("forward", f"clamp MSS into {gwbridge}", _meta("oifname", "==", gwbridge), *_clamp_mss()),
        rule("postrouting", f"masquerade {gwbridge}",
             {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}}},
             _meta("oifname", "!=", gwbridge), {"masquerade": None}),
    ]}


def render_delete_overlay_firewall(table: str = OVERLAY_TABLE) -> dict:
    tbl = {"family": "inet", "name": table}
    return {"nftables": [{"add": {"table": dict(tbl)}}, {"delete": {"table": dict(tbl)}}]}


# ---- encrypted overlays: no VXLAN of theirs in clear -------------------------------------------------

TUNNEL_TABLE = "netweft-wg"


def render_tunnel_firewall(wg_ifnames: list[str], vxlan_port: int, vnis: list[int], table: str = TUNNEL_TABLE) -> dict:
    """The libnftables JSON command that atomically replaces table `inet <table>`: VXLAN (UDP `vxlan_port`)
    carrying one of the encrypted networks' `vnis` is dropped when it would leave the host through any
    interface but the WireGuard ones (two during a key rotation), and when it arrives through any other. The VNI is read from the VXLAN
    header (bits 32-55 after the 8-byte UDP header). The table stays when netweftd stops: fail closed."""
    if isinstance(wg_ifnames, str) or not wg_ifnames:
        raise InvalidRequest("give the WireGuard interface names as a non-empty list")
    ifnames = sorted({check_ifname(n, "WireGuard interface name") for n in wg_ifnames})
    ours = {"set": ifnames} if len(ifnames) > 1 else ifnames[0]
    if not isinstance(vxlan_port, int) or isinstance(vxlan_port, bool) or not 1 <= vxlan_port <= 65535:
        raise InvalidRequest(f"invalid VXLAN port {vxlan_port!r}")
    vnis = sorted(set(vnis))
    if not vnis or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 1 << 24 for v in vnis):
        raise InvalidRequest(f"invalid VNIs {vnis[:8]!r}: give one or more between 1 and 16777215")
    tbl = {"family": "inet", "name": table}

    def vxlan_of_ours() -> list[dict]:
        return [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                           "right": vxlan_port}},
                {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 96, "len": 24}},
                           "right": {"set": vnis} if len(vnis) > 1 else vnis[0]}}]

    def rule(chain: str, comment: str, *expr: dict) -> dict:
        return {"add": {"rule": {"family": "inet", "table": table, "chain": chain, "comment": comment,
                                 "expr": list(expr)}}}

    def chain(name: str, hook: str) -> dict:
        return {"add": {"chain": {"family": "inet", "table": table, "name": name, "type": "filter",
                                  "hook": hook, "prio": -10, "policy": "accept"}}}

    return {"nftables": [
        {"add": {"table": dict(tbl)}},
        {"delete": {"table": dict(tbl)}},
        {"add": {"table": dict(tbl)}},
        chain("output", "output"),
        chain("input", "input"),
        rule("output", "encrypted VXLAN never leaves in clear", *vxlan_of_ours(),
             _meta("oifname", "!=", ours), {"counter": None}, {"drop": None}),
        rule("input", "encrypted VXLAN is accepted only out of the tunnel", *vxlan_of_ours(),
             _meta("iifname", "!=", ours), {"counter": None}, {"drop": None}),
    ]}


def render_delete_tunnel_firewall(table: str = TUNNEL_TABLE) -> dict:
    tbl = {"family": "inet", "name": table}
    return {"nftables": [{"add": {"table": dict(tbl)}}, {"delete": {"table": dict(tbl)}}]}


# ---- published ports ------------------------------------------------------------------------------

PORTS_TABLE = "netweft-ports"


@dataclass(frozen=True, order=True)
class PortRule:
    """One published port: traffic to this host's `host_ip` (any local address if "") on `host_port`
    goes to `dest_ip`:`dest_port` (a container's address the host can route to)."""

    protocol: str      # tcp | udp | sctp
    host_port: int
    host_ip: str
    dest_ip: str
    dest_port: int


def _check_ports(rules: list[PortRule]) -> None:
    seen = set()
    for r in rules:
        if not isinstance(r, PortRule):
            raise InvalidRequest(f"expected a PortRule, got {r!r}")
        if r.protocol not in ("tcp", "udp", "sctp"):
            raise InvalidRequest(f"invalid protocol {r.protocol!r}: tcp, udp or sctp")
        for port, what in ((r.host_port, "host port"), (r.dest_port, "container port")):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise InvalidRequest(f"invalid {what} {port!r}: 1-65535")
        for ip, what in ((r.host_ip, "host IP"), (r.dest_ip, "container IP")):
            if ip == "" and what == "host IP":
                continue
            try:
                ipaddress.IPv4Address(ip)
            except (ValueError, TypeError):
                raise InvalidRequest(f"invalid {what} {ip!r}") from None
        key = (r.protocol, r.host_port, r.host_ip)
        if key in seen or (r.protocol, r.host_port, "") in seen or \
                (r.host_ip == "" and any(k[:2] == key[:2] for k in seen)):
            raise InvalidRequest(f"{r.protocol} port {r.host_port} of this host is published twice")
        seen.add(key)


def render_port_maps(rules: list[PortRule], table: str = PORTS_TABLE) -> dict:
    """The libnftables JSON command that atomically replaces table `inet <table>` with DNAT rules for the
    published ports: from outside (prerouting) and from the host itself (output), only to addresses that
    are this host's (`fib daddr type local`). No rules: the table is deleted."""
    rules = sorted(rules)
    _check_ports(rules)
    tbl = {"family": FAMILY, "name": table}
    cmds: list[dict] = [{"add": {"table": dict(tbl)}}, {"delete": {"table": dict(tbl)}}]
    if not rules:
        return {"nftables": cmds}
    cmds.append({"add": {"table": dict(tbl)}})
    for chain, hook in (("prerouting", "prerouting"), ("output", "output")):
        cmds.append({"add": {"chain": {"family": FAMILY, "table": table, "name": chain, "type": "nat",
                                       "hook": hook, "prio": -100, "policy": "accept"}}})
    for r in rules:
        match = [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}]
        if r.host_ip:
            match.append({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                    "right": r.host_ip}})
        match += [_meta("l4proto", "==", r.protocol),
                  {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                             "right": r.host_port}},
                  {"dnat": {"family": "ip", "addr": r.dest_ip, "port": r.dest_port}}]
        for chain in ("prerouting", "output"):
            cmds.append(_rule(table, chain, f"publish {r.protocol} {r.host_ip or '*'}:{r.host_port}", *match))
    return {"nftables": cmds}
