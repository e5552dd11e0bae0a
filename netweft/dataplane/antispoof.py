"""Anti-spoofing: a container sends on a network only from its own MAC and IPv4 address there.

Frames are checked where they enter the bridge, in the bridge family's prerouting hook of the namespace
holding the bridge (the host for local networks and the gateway bridge, the sandbox for an overlay):

    table bridge netweft_as {
        map ports { type ifname : verdict }          # container port -> jump to its chain
        chain prerouting { type filter hook prerouting priority -300; iifname vmap @ports }
        chain p_<port> {                             # one per container port
            ether saddr != MAC drop
            ether type arp arp saddr ether != MAC drop
            ether type arp arp saddr ip != { IP, 0.0.0.0 } drop     # 0.0.0.0: ARP probes (RFC 5227)
            ether type ip ip saddr != IP drop
            ether type != { ip, arp } drop           # IPv4 networks: IPv6, VLAN tags, anything else is dropped
        }
    }

Frames from other ports (VXLAN, the bridge itself, a parent LAN) match no map element and pass. One table
per namespace, shared by whoever adds ports there: ports are added and removed element by element (a map
element and a chain), never by rewriting the table, so several daemons sharing a namespace keep each
other's ports, and churn costs per port.

Pure: the renderers return libnftables JSON; dataplane/kernel.py and overlay.py run it.
"""
from __future__ import annotations

from netweft.dataplane.checks import check_ifname, ipv4, parse_mac
from netweft.errors import KernelError

FAMILY = "bridge"
TABLE = "netweft_as"
MAP = "ports"
HOOK_CHAIN = "prerouting"
PRIORITY = -300     # before anything else that might look at a bridged frame


def chain_name(port: str) -> str:
    return "p_" + check_ifname(port, "port name")


def _match(left: dict, op: str, right) -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _base() -> list[dict]:
    """Table, map and hook chain: `add` is idempotent for all three."""
    return [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"add": {"map": {"family": FAMILY, "table": TABLE, "name": MAP, "type": "ifname", "map": "verdict"}}},
            {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": HOOK_CHAIN, "type": "filter",
                               "hook": "prerouting", "prio": PRIORITY, "policy": "accept"}}}]


def render_hook() -> list[dict]:
    """The one rule of the hook chain, written when the chain is made (flush + add keeps it single)."""
    return [{"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": HOOK_CHAIN}}},
            {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": HOOK_CHAIN, "expr": [
                {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@" + MAP}}]}}}]


def render_add_port(port: str, mac: str, ip: str) -> dict:
    """Guard `port`: only frames from `mac` and, for IPv4 and ARP, from `ip`. Idempotent (the port's chain
    is flushed and written again, its map element re-added with the same verdict)."""
    chain = chain_name(port)
    mac = parse_mac(mac)
    ip = ipv4(ip, "endpoint address")
    drop = {"drop": None}
    rules = [
        [_match(_payload("ether", "saddr"), "!=", mac), drop],
        [_match(_payload("ether", "type"), "==", "arp"), _match(_payload("arp", "saddr ether"), "!=", mac), drop],
        [_match(_payload("ether", "type"), "==", "arp"),
         _match(_payload("arp", "saddr ip"), "!=", {"set": [ip, "0.0.0.0"]}), drop],
        [_match(_payload("ether", "type"), "==", "ip"), _match(_payload("ip", "saddr"), "!=", ip), drop],
        [_match(_payload("ether", "type"), "!=", {"set": ["ip", "arp"]}), drop],
    ]
    cmds = _base() + render_hook()
    cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}})
    cmds.append({"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}})
    for expr in rules:
        cmds.append({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "expr": expr}}})
    cmds.append({"add": {"element": {"family": FAMILY, "table": TABLE, "name": MAP,
                                      "elem": [[port, {"jump": {"target": chain}}]]}}})
    return {"nftables": cmds}


def render_delete_port(port: str) -> list[dict]:
    """Two commands, run one after the other (each may find nothing to delete): the map element, then the
    port's chain (a chain cannot go while the map jumps to it)."""
    chain = chain_name(port)
    return [{"nftables": [{"delete": {"element": {"family": FAMILY, "table": TABLE, "name": MAP, "elem": [port]}}}]},
            {"nftables": [{"delete": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}}]}]


def render_list() -> dict:
    return {"nftables": [{"list": {"map": {"family": FAMILY, "table": TABLE, "name": MAP}}}]}


def parse_list(output: dict) -> list[str]:
    """The guarded ports from `render_list`'s output."""
    ports = []
    for item in (output or {}).get("nftables", []):
        m = item.get("map") if isinstance(item, dict) else None
        if not m:
            continue
        for elem in m.get("elem", []) or []:
            key = elem[0] if isinstance(elem, list) else elem.get("elem", {}).get("val") if isinstance(elem, dict) \
                else elem
            if isinstance(key, str):
                ports.append(key)
    return sorted(ports)


# ---- running them (in the kernel thread, inside the namespace of the bridge) -------------------------------

def add_port(run, port: str, mac: str, ip: str) -> None:
    """`run(cmd, what)` runs a libnftables JSON command in the right namespace (KernelError on refusal)."""
    run(render_add_port(port, mac, ip), f"anti-spoofing for port {port}")


def delete_port(run, port: str) -> None:
    for cmd in render_delete_port(port):
        try:
            run(cmd, f"remove anti-spoofing of port {port}")
        except KernelError as e:
            if "No such file" not in str(e) and "does not exist" not in str(e):
                raise


def list_ports(run) -> list[str]:
    try:
        return parse_list(run(render_list(), "list anti-spoofing ports"))
    except KernelError as e:
        if "No such file" in str(e) or "does not exist" in str(e):
            return []
        raise
