"""Service VIPs without IPVS: nftables in each container's namespace spreads connections to a VIP over
the service's tasks (FIELD-NOTES "nftables": numgen + a map, as kube-proxy's nftables mode does).

The table `ip netweft-lb` of a container's namespace:

    map vips { type ipv4_addr : verdict }            VIP -> goto svc-<VIP in hex>
    chain output { type nat hook output priority -100; ip daddr vmap @vips }
    map be-<hex> { typeof numgen inc mod 1 : ip daddr }      slot 0..N-1 -> a task's address
    chain svc-<hex> { dnat to numgen inc mod N map @be-<hex> }      (reject when N = 0)

numgen inc takes the slots in turn (round robin, as IPVS's default scheduler): new connections of one
client spread evenly, not just on average.

Only the first packet of a flow meets the nat hook: conntrack keeps the rest of the flow on the task it
chose. Changes are element by element, computed here as a pure diff (`plan_sync`): a VIP is one element
of `vips`; a task that goes frees its slot, which the last slot's task moves into, so N stays dense; the
one rule of svc-<hex> is replaced only when N changes. Nothing is ever rebuilt as a whole.
"""
from __future__ import annotations

import ipaddress
import json
import os

from netweft.dataplane import netns
from netweft.errors import InvalidRequest, KernelError

TABLE = "netweft-lb"
FAMILY = "ip"
_T = {"family": FAMILY, "table": TABLE}


def _hex(vip: str) -> str:
    return f"{int(ipaddress.IPv4Address(vip)):08x}"


def check(wanted: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """VIP -> backends, both IPv4 addresses (a bad one is refused before anything changes)."""
    out = {}
    for vip, backends in wanted.items():
        try:
            vip = str(ipaddress.IPv4Address(vip))
            backends = tuple(str(ipaddress.IPv4Address(b)) for b in backends)
        except (ipaddress.AddressValueError, ValueError):
            raise InvalidRequest(f"invalid VIP or backend address in {vip!r}: {list(backends)!r}") from None
        if len(set(backends)) != len(backends):
            raise InvalidRequest(f"VIP {vip}: a backend is given twice")
        out[vip] = backends
    return out


def slots(old: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
    """The new backends in slot order, keeping every surviving backend in its slot when it fits and
    filling freed slots with the last ones (so few elements change)."""
    want = set(new)
    n = len(new)
    placed: list[str | None] = [b if i < len(old) and (b := old[i]) in want else None for i in range(n)]
    rest = [b for b in new if b not in placed]
    for i in range(n):
        if placed[i] is None:
            placed[i] = rest.pop(0)
    return tuple(placed)  # type: ignore[arg-type]


def _rule(vip_hex: str, n: int) -> dict:
    if n == 0:
        expr = [{"reject": None}]
    else:
        expr = [{"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "inc", "mod": n, "offset": 0}},
                                           "data": f"@be-{vip_hex}"}}}}]
    return {"add": {"rule": {**_T, "chain": f"svc-{vip_hex}", "expr": expr}}}


def base_commands() -> tuple[list[str], list[dict]]:
    """The table, the vips map and the output chain (idempotent adds)."""
    return [f"add table {FAMILY} {TABLE}"], [
        {"add": {"map": {**_T, "name": "vips", "type": "ipv4_addr", "map": "verdict"}}},
        {"add": {"chain": {**_T, "name": "output", "type": "nat", "hook": "output", "prio": -100,
                           "policy": "accept"}}},
    ]


def plan_sync(observed: dict[str, tuple[str, ...]], wanted: dict[str, tuple[str, ...]],
              has_base: bool) -> tuple[list[str], list[dict], dict[str, tuple[str, ...]]]:
    """(text commands run first: maps libnftables JSON cannot declare; JSON commands in one transaction;
    the resulting VIP -> backends in slot order). Empty lists: nothing to change."""
    text: list[str] = []
    cmds: list[dict] = []
    result: dict[str, tuple[str, ...]] = {}
    if not has_base and wanted:
        t, c = base_commands()
        text += t
        cmds += c
        cmds.append({"add": {"rule": {**_T, "chain": "output", "expr": [
            {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@vips"}}]}}})
    for vip, old in observed.items():
        if vip not in wanted:
            h = _hex(vip)
            cmds += [{"delete": {"element": {**_T, "name": "vips", "elem": [vip]}}},
                     {"flush": {"chain": {**_T, "name": f"svc-{h}"}}},
                     {"delete": {"chain": {**_T, "name": f"svc-{h}"}}},
                     {"delete": {"map": {**_T, "name": f"be-{h}"}}}]
    for vip, backends in wanted.items():
        h = _hex(vip)
        old = observed.get(vip)
        new = slots(old or (), backends)
        result[vip] = new
        if old is None:
            text.append(f"add map {FAMILY} {TABLE} be-{h} {{ typeof numgen inc mod 1 : ip daddr; }}")
            cmds.append({"add": {"chain": {**_T, "name": f"svc-{h}"}}})
            if new:
                cmds.append({"add": {"element": {**_T, "name": f"be-{h}", "elem": [[i, b] for i, b in
                                                                                     enumerate(new)]}}})
            cmds.append(_rule(h, len(new)))
            cmds.append({"add": {"element": {**_T, "name": "vips", "elem": [[vip, {"goto": {"target": f"svc-{h}"}}]]}}})
            continue
        gone = [i for i in range(len(old)) if i >= len(new) or old[i] != new[i]]
        if gone:
            cmds.append({"delete": {"element": {**_T, "name": f"be-{h}", "elem": gone}}})
        added = [[i, new[i]] for i in range(len(new)) if i >= len(old) or old[i] != new[i]]
        if len(new) != len(old):
            cmds += [{"flush": {"chain": {**_T, "name": f"svc-{h}"}}}]
        if added:
            cmds.append({"add": {"element": {**_T, "name": f"be-{h}", "elem": added}}})
        if len(new) != len(old):
            cmds.append(_rule(h, len(new)))
    return text, cmds, result


def parse_listing(doc: dict) -> tuple[bool, dict[str, tuple[str, ...]]]:
    """(the table and its vips map exist, VIP -> backends in slot order) from `list table` JSON."""
    maps: dict[str, dict] = {}
    for item in doc.get("nftables", []):
        m = item.get("map")
        if m is not None:
            maps[m["name"]] = m
    if "vips" not in maps:
        return False, {}
    out = {}
    for elem in maps["vips"].get("elem", []) or []:
        vip = elem[0]
        be = maps.get(f"be-{_hex(vip)}", {})
        pairs = sorted((int(k), v) for k, v in (be.get("elem") or []))
        out[vip] = tuple(v for _, v in pairs)
    return True, out


def _nft_error(what: str, rc: int, error: str) -> KernelError:
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    detail = lines[0] if lines else f"libnftables returned {rc}"
    if "Error:" in detail:
        detail = detail[detail.index("Error:") + len("Error:"):].strip()
    return KernelError(f"{what}: {detail}")


def sync_in_netns(netns_path: str, wanted: dict[str, tuple[str, ...]]) -> int:
    """Make the namespace's VIPs exactly `wanted`; returns how many commands it took (0: nothing changed).
    Runs in the calling thread, which steps into the namespace (a libnftables context is bound to the
    namespace it is first used in, so one is made there for each call)."""
    import nftables  # pip-nftables over the system libnftables

    wanted = check(wanted)
    fd = netns.open_netns(netns_path)
    try:
        with netns.entered(fd):
            nft = nftables.Nftables()
            nft.set_json_output(True)
            rc, out, _ = nft.cmd(f"list table {FAMILY} {TABLE}")
            has_base, observed = parse_listing(json.loads(out)) if rc == 0 and out else (False, {})
            text, cmds, _ = plan_sync(observed, wanted, has_base)
            what = f"service VIPs in {netns_path}"
            for line in text:
                rc, _, err = nft.cmd(line)
                if rc != 0:
                    raise _nft_error(what, rc, err)
            if cmds:
                rc, _, err = nft.json_cmd({"nftables": cmds})
                if rc != 0:
                    raise _nft_error(what, rc, err)
            return len(text) + len(cmds)
    finally:
        os.close(fd)
