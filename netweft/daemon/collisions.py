"""What a new subnet must not overlap on this host: its routes and its addresses (issue 13, item 7).

A container network that overlaps a route of the host hides that destination from the containers (and the
host's route to it competes with the bridge's): the LAN, a VPN, the management network. So an explicit
subnet (a network's, the default address pool of a swarm) that overlaps one is refused with a line naming
it, and automatic choices (pools, the gateway bridge) skip it. Our own bridges' routes and addresses are
not the host's: they are the networks, checked as networks; nor are our WireGuard tunnels' (inside the
reserved tunnel block, refused and skipped as that block).
"""
from __future__ import annotations

from ipaddress import IPv4Network

from netweft.dataplane.api import GWBRIDGE
from netweft.ipam.tunnel import TUNNEL_NET

OWN_PREFIXES = ("nw-", "nw_", GWBRIDGE)


async def host_claims(dp, bridge_prefix: str) -> list[tuple[IPv4Network, str]]:
    """(prefix, words naming it) for every main-table route of the host but the default and our bridges',
    and every address on an interface that is not ours (as a /32). Nothing inside the tunnel block."""
    out = [(r, "a route of this host") for r in await dp.host_routes(bridge_prefix)]
    for ifname, addrs in sorted((await dp.ipv4_addresses()).items()):
        if ifname.startswith(OWN_PREFIXES):
            continue
        out += [(IPv4Network(f"{a}/32"), f"this host's address on {ifname}") for a in addrs]
    return [(net, what) for net, what in out if not net.subnet_of(TUNNEL_NET)]


def overlap(subnet: IPv4Network, claims: list[tuple[IPv4Network, str]]) -> tuple[IPv4Network, str] | None:
    return next(((net, what) for net, what in claims if subnet.overlaps(net)), None)
