"""The routing mesh's nftables: published ports on a host, spread over the tasks through the ingress network.

Two tables `ip netweft-mesh`, both replaced whole in one transaction when the published ports or their
tasks change (they hold one rule per published port; the VIP maps, which churn with every task, are
changed element by element in dataplane/vip.py):
- in the host's namespace: a connection to one of the host's own addresses on a published port is
  DNATed to the ingress sandbox's address on the gateway bridge (mode=ingress), or straight to a task
  of this host (mode=host);
- in the ingress sandbox (a namespace on the ingress network and the gateway bridge, one per host):
  the connection is DNATed to one of the service's tasks on the ingress network (numgen inc: in turn),
  and masqueraded out of the ingress interface so the answer comes back the same way.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from netweft.dataplane import netns
from netweft.dataplane.checks import check_ifname
from netweft.errors import InvalidRequest, KernelError

TABLE = "netweft-mesh"


@dataclass(frozen=True)
class MeshRule:
    protocol: str                          # tcp | udp
    port: int                              # the published port
    backends: tuple[tuple[str, int], ...]  # (address, port) to spread over; empty: refused


def _check(rules: list[MeshRule]) -> None:
    for r in rules:
        if r.protocol not in ("tcp", "udp") or not 1 <= r.port <= 65535:
            raise InvalidRequest(f"invalid published port {r.port}/{r.protocol}")
        for ip, port in r.backends:
            ipaddress.IPv4Address(ip)
            if not 1 <= int(port) <= 65535:
                raise InvalidRequest(f"invalid backend port {port}")


def render(rules: list[MeshRule], local_only: bool, masquerade_out: str | None) -> str:
    """The whole table as nft text (add, delete, add: atomic whether or not it existed)."""
    _check(rules)
    if masquerade_out is not None:
        check_ifname(masquerade_out, "ingress interface")
    lines = [f"add table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
             "  chain prerouting { type nat hook prerouting priority -100; policy accept;"]
    match = "fib daddr type local " if local_only else ""
    body = []
    for r in sorted(rules, key=lambda r: (r.protocol, r.port)):
        if not r.backends:
            body.append(f"    {match}{r.protocol} dport {r.port} reject")
        elif len(r.backends) == 1:
            ip, port = r.backends[0]
            body.append(f"    {match}{r.protocol} dport {r.port} dnat to {ip}:{port}")
        else:
            elems = ", ".join(f"{i} : {ip} . {port}" for i, (ip, port) in enumerate(r.backends))
            body.append(f"    {match}{r.protocol} dport {r.port} dnat ip addr . port to numgen inc mod "
                        f"{len(r.backends)} map {{ {elems} }}")
    lines += body + ["  }"]
    if local_only:   # the host itself connecting to its own address and a published port
        lines += ["  chain output { type nat hook output priority -100; policy accept;"] + body + ["  }"]
    if masquerade_out is not None:
        lines += ["  chain postrouting { type nat hook postrouting priority 100; policy accept;",
                  f'    oifname "{masquerade_out}" masquerade', "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_delete() -> str:
    return f"add table ip {TABLE}\ndelete table ip {TABLE}\n"


def apply_here(text: str, forward: bool, what: str) -> None:
    """Apply nft text in the calling thread's namespace (and turn IPv4 forwarding on if asked)."""
    import nftables  # pip-nftables over the system libnftables

    if forward:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    nft = nftables.Nftables()
    rc, _, err = nft.cmd(text)
    if rc != 0:
        lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "Error:" in ln), lines[0] if lines else f"libnftables returned {rc}")
        raise KernelError(f"{what}: {detail[detail.find('Error:') + 6:].strip() if 'Error:' in detail else detail}")


def apply_in_netns(netns_path: str, text: str, forward: bool, what: str) -> None:
    fd = netns.open_netns(netns_path)
    try:
        with netns.entered(fd):
            apply_here(text, forward, what)
    finally:
        os.close(fd)
