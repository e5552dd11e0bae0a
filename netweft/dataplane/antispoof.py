"""Anti-spoofing: a container sends on a network only from its own MAC and IPv4 address there.

Frames are checked where they enter the bridge, in the bridge family's prerouting hook of the namespace
holding the bridge (the host for local networks and the gateway bridge, the sandbox for an overlay):

    table bridge netweft_as {
        map ports { type ifname : verdict }                                  # guarded port -> jump guard
        set ip_ok { type ifname . ether_addr . ipv4_addr }                   # port . MAC . IP
        set arp_ok { type ifname . ether_addr . ether_addr . ipv4_addr }     # port . MAC . MAC . {IP, 0.0.0.0}
        chain prerouting { type filter hook prerouting priority -300; iifname vmap @ports }
        chain guard {
            ether type ip iifname . ether saddr . ip saddr @ip_ok accept
            ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @arp_ok accept
            drop        # another MAC or address; IPv6, VLAN tags, anything but IPv4 and ARP
        }
    }

(0.0.0.0 as ARP sender: probes, RFC 5227.) Frames from other ports (VXLAN, the bridge itself, a parent LAN)
match no map element and pass. The rules never change; a port is three set elements and a map element,
added and removed in one transaction, so the cost of a port does not grow with the number of ports
(libnftables reads a table's chains and rules before changing them: one chain per port made each call
cost in proportion to the ports already there). One table per namespace, shared by whoever adds ports
there. Tables of the former layout (a chain `p_<port>` per port, jumped to from the same map) keep
working and are converted port by port as those ports are added again or removed.

Deleting the set elements needs the port's MAC and address: a `Guarded` per namespace remembers them
for the ports this context added, read once from the kernel when first needed (after a restart).

Pure: the renderers return libnftables JSON; `add_port`, `delete_port` and `list_ports` run them through
`run(cmd, what)` (dataplane/kernel.py and overlay.py, inside the namespace of the bridge).
"""
from __future__ import annotations

from netweft.dataplane.checks import check_ifname, ipv4, parse_mac
from netweft.errors import KernelError

FAMILY = "bridge"
TABLE = "netweft_as"
MAP = "ports"
IP_SET = "ip_ok"
ARP_SET = "arp_ok"
HOOK_CHAIN = "prerouting"
GUARD_CHAIN = "guard"
LEGACY_PREFIX = "p_"   # the former layout's chain per port
PRIORITY = -300     # before anything else that might look at a bridged frame
ANY_IP = "0.0.0.0"

Entry = tuple[str, str]   # (MAC, IPv4 address) a port may send from


class Guarded:
    """What this process knows of one namespace's guarded ports; the caller keeps one per namespace (and
    libnftables context). `known`: port -> (MAC, IP), or None for a port of the former layout."""
    __slots__ = ("ready", "loaded", "known")

    def __init__(self) -> None:
        self.ready = False     # the table, sets and rules were written by this context
        self.loaded = False    # `known` holds what the kernel held when read, plus this context's changes
        self.known: dict[str, Entry | None] = {}


def _match(left: dict, op: str, right) -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _iif() -> dict:
    return {"meta": {"key": "iifname"}}


def _obj(kind: str, name: str, **extra) -> dict:
    return {kind: {"family": FAMILY, "table": TABLE, "name": name, **extra}}


def render_base() -> dict:
    """Table, map, sets and chains (`add` is idempotent for each), and the rules of both chains written
    again (flush + add: they stay exactly these, also when several contexts share the table)."""
    guard = [
        [_match(_payload("ether", "type"), "==", "ip"),
         _match({"concat": [_iif(), _payload("ether", "saddr"), _payload("ip", "saddr")]}, "==", "@" + IP_SET),
         {"accept": None}],
        [_match(_payload("ether", "type"), "==", "arp"),
         _match({"concat": [_iif(), _payload("ether", "saddr"), _payload("arp", "saddr ether"),
                            _payload("arp", "saddr ip")]}, "==", "@" + ARP_SET),
         {"accept": None}],
        [{"drop": None}],
    ]
    cmds = [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"add": _obj("map", MAP, type="ifname", map="verdict")},
            {"add": _obj("set", IP_SET, type=["ifname", "ether_addr", "ipv4_addr"])},
            {"add": _obj("set", ARP_SET, type=["ifname", "ether_addr", "ether_addr", "ipv4_addr"])},
            {"add": _obj("chain", HOOK_CHAIN, type="filter", hook="prerouting", prio=PRIORITY, policy="accept")},
            {"add": _obj("chain", GUARD_CHAIN)},
            {"flush": _obj("chain", HOOK_CHAIN)},
            {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": HOOK_CHAIN,
                              "expr": [{"vmap": {"key": _iif(), "data": "@" + MAP}}]}}},
            {"flush": _obj("chain", GUARD_CHAIN)}]
    cmds += [{"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": GUARD_CHAIN, "expr": expr}}}
             for expr in guard]
    return {"nftables": cmds}


def _elements(port: str, entry: Entry) -> list[dict]:
    """The set elements of a port allowed to send from `entry`, as (set name, elements) objects."""
    mac, ip = entry
    return [_obj("element", IP_SET, elem=[{"concat": [port, mac, ip]}]),
            _obj("element", ARP_SET, elem=[{"concat": [port, mac, mac, a]} for a in (ip, ANY_IP)])]


def _forget(port: str, old: Entry | None) -> list[dict]:
    """Commands removing what a guarded port had: its map element, then its elements or its former chain."""
    cmds = [{"delete": _obj("element", MAP, elem=[port])}]
    if old is None:
        cmds.append({"delete": _obj("chain", LEGACY_PREFIX + port)})   # after the map element jumping to it
    else:
        cmds += [{"delete": e} for e in _elements(port, old)]
    return cmds


def check_entry(mac: str, ip: str) -> Entry:
    return parse_mac(mac), ipv4(ip, "endpoint address")


def render_add_port(port: str, mac: str, ip: str, *, old: Entry | None = None, was_guarded: bool = False) -> dict:
    """Guard `port`: only frames from `mac` and, for IPv4 and ARP, from `ip`. `was_guarded`: the port is
    guarded now, allowed `old` (None: by a chain of the former layout), which is removed in the same
    transaction. Adding what is there already changes nothing."""
    check_ifname(port, "port name")
    entry = check_entry(mac, ip)
    cmds = _forget(port, old) if was_guarded and old != entry else []
    cmds += [{"add": e} for e in _elements(port, entry)]
    cmds.append({"add": _obj("element", MAP, elem=[[port, {"jump": {"target": GUARD_CHAIN}}]])})
    return {"nftables": cmds}


def render_delete_port(port: str, old: Entry | None) -> dict:
    """Unguard `port`, which allows `old` (None: a port of the former layout): one transaction."""
    check_ifname(port, "port name")
    return {"nftables": _forget(port, old)}


def render_list() -> dict:
    return {"nftables": [{"list": _obj("map", MAP)}]}


def render_list_addresses() -> dict:
    return {"nftables": [{"list": _obj("set", IP_SET)}]}


def _map_elements(output: dict) -> list:
    for item in (output or {}).get("nftables", []):
        m = item.get("map") if isinstance(item, dict) else None
        if m:
            return m.get("elem", []) or []
    return []


def parse_list(output: dict) -> list[str]:
    """The guarded ports from `render_list`'s output."""
    ports = []
    for elem in _map_elements(output):
        key = elem[0] if isinstance(elem, list) else elem.get("elem", {}).get("val") if isinstance(elem, dict) \
            else elem
        if isinstance(key, str):
            ports.append(key)
    return sorted(ports)


def parse_known(map_output: dict, set_output: dict | None) -> dict[str, Entry | None]:
    """port -> what it may send from, from `render_list` and `render_list_addresses` output: a port whose
    map element jumps elsewhere than the guard chain is of the former layout (None); a port of the guard
    chain without an address element is left out (it allows nothing, and is rewritten when added)."""
    addresses: dict[str, Entry] = {}
    for item in (set_output or {}).get("nftables", []):
        s = item.get("set") if isinstance(item, dict) else None
        for elem in (s or {}).get("elem", []) or []:
            parts = elem.get("concat") if isinstance(elem, dict) else None
            if isinstance(parts, list) and len(parts) == 3 and all(isinstance(p, str) for p in parts):
                addresses[parts[0]] = (parts[1], parts[2])
    known: dict[str, Entry | None] = {}
    for elem in _map_elements(map_output):
        if not (isinstance(elem, list) and len(elem) == 2 and isinstance(elem[0], str)):
            continue
        target = ((elem[1] or {}).get("jump") or {}).get("target") if isinstance(elem[1], dict) else None
        if target == GUARD_CHAIN:
            if elem[0] in addresses:
                known[elem[0]] = addresses[elem[0]]
        elif isinstance(target, str) and target == LEGACY_PREFIX + elem[0]:
            known[elem[0]] = None
    return known


# ---- running them (in the kernel thread, inside the namespace of the bridge) -------------------------------

def _missing(e: KernelError) -> bool:
    return "No such file" in str(e) or "does not exist" in str(e)


def _load(run, guarded: Guarded) -> None:
    """Read the namespace's guarded ports (after a restart, or when the kernel disagreed with `known`)."""
    try:
        ports = run(render_list(), "list anti-spoofing ports")
    except KernelError as e:
        if not _missing(e):
            raise
        ports = None
    addresses = None
    if ports is not None:
        try:
            addresses = run(render_list_addresses(), "list anti-spoofing addresses")
        except KernelError as e:
            if not _missing(e):   # a table of the former layout has no address set
                raise
    guarded.known = parse_known(ports, addresses) if ports is not None else {}
    guarded.loaded = True


def add_port(run, guarded: Guarded, port: str, mac: str, ip: str) -> None:
    """`run(cmd, what)` runs a libnftables JSON command in the right namespace (KernelError on refusal)."""
    check_ifname(port, "port name")
    entry = check_entry(mac, ip)
    what = f"anti-spoofing for port {port}"
    if not guarded.loaded:
        _load(run, guarded)
    for attempt in (1, 2):
        cmd = render_add_port(port, *entry, old=guarded.known.get(port), was_guarded=port in guarded.known)
        if not guarded.ready:
            cmd = {"nftables": render_base()["nftables"] + cmd["nftables"]}
        try:
            run(cmd, what)
            break
        except KernelError as e:
            if attempt == 2 or not _missing(e):
                raise
            # Someone removed the table or the port since this context last looked: look again.
            guarded.ready = False
            _load(run, guarded)
    guarded.ready = True
    guarded.known[port] = entry


def delete_port(run, guarded: Guarded, port: str) -> None:
    """Unguard `port`; nothing to do if it is not guarded (as this context knows, or read once)."""
    check_ifname(port, "port name")
    if port not in guarded.known and not guarded.loaded:
        _load(run, guarded)
    for attempt in (1, 2):
        if port not in guarded.known:
            return
        try:
            run(render_delete_port(port, guarded.known[port]), f"remove anti-spoofing of port {port}")
            break
        except KernelError as e:
            if attempt == 2 or not _missing(e):
                raise
            _load(run, guarded)   # changed by someone else since: the kernel says what is there
    guarded.known.pop(port, None)


def delete_ports(run, guarded: Guarded, ports: list[str]) -> None:
    """delete_port for many ports in one transaction (`rm -f` of many); if the kernel refuses it (someone
    changed the table meanwhile), port by port after reading the table again."""
    for port in ports:
        check_ifname(port, "port name")
    if not guarded.loaded and any(p not in guarded.known for p in ports):
        _load(run, guarded)
    doomed = [p for p in dict.fromkeys(ports) if p in guarded.known]
    if not doomed:
        return
    cmds = [c for p in doomed for c in render_delete_port(p, guarded.known[p])["nftables"]]
    try:
        run({"nftables": cmds}, f"remove anti-spoofing of {len(doomed)} ports")
    except KernelError as e:
        if not _missing(e):
            raise
        _load(run, guarded)
        for port in doomed:
            delete_port(run, guarded, port)
        return
    for port in doomed:
        guarded.known.pop(port, None)


def list_ports(run) -> list[str]:
    try:
        return parse_list(run(render_list(), "list anti-spoofing ports"))
    except KernelError as e:
        if _missing(e):
            return []
        raise
