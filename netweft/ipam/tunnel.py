"""The encrypted overlays' tunnel addresses: a block kept out of every network and pool. No I/O.

Each host's WireGuard interface holds two addresses of this block, a pair (2i, 2i+1) the managers hand
out once per node; its key generations alternate between them (make-before-break rotation: peers hold
the old and the new key side by side, each with its own address, so their allowed IPs never clash).
Encrypted VXLAN runs between these addresses. The block sits at the top of the benchmarking range
198.18.0.0/15, away from the default pools (10.0.0.0/8 for overlays, 172.17.0.0/16 for local networks)
and from the start of 198.18/15 where pools and operators begin; a subnet overlapping it is refused and
the pool allocators skip it.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from netweft.errors import Conflict, PoolExhausted

TUNNEL_NET = IPv4Network("198.19.240.0/21")     # 1024 nodes, two addresses each
TUNNEL_WHAT = "the encrypted overlays' tunnel addresses (reserved)"


def overlaps_tunnels(subnet: IPv4Network) -> bool:
    return subnet.overlaps(TUNNEL_NET)


def check_not_tunnels(subnet: IPv4Network) -> None:
    """Conflict if an operator's subnet overlaps the reserved tunnel block."""
    if overlaps_tunnels(subnet):
        raise Conflict(f"subnet {subnet} overlaps {TUNNEL_NET}, {TUNNEL_WHAT}; choose another subnet")


def pair(index: int) -> tuple[str, str]:
    """The two tunnel addresses of pair `index` (0-based)."""
    base = int(TUNNEL_NET.network_address) + 2 * index
    if index < 0 or base + 1 > int(TUNNEL_NET.broadcast_address):
        raise PoolExhausted(f"no tunnel address pair {index} in {TUNNEL_NET}")
    return str(IPv4Address(base)), str(IPv4Address(base + 1))


def pair_index(addr: str) -> int | None:
    """Which pair an address belongs to, or None if it is outside the block."""
    ip = IPv4Address(addr)
    if ip not in TUNNEL_NET:
        return None
    return (int(ip) - int(TUNNEL_NET.network_address)) // 2


def allocate_pair(taken: set[str]) -> tuple[str, str]:
    """The lowest pair none of whose addresses is in `taken`."""
    used = {pair_index(a) for a in taken}
    for i in range(1, TUNNEL_NET.num_addresses // 2):   # pair 0 holds the block's network address
        if i not in used:
            return pair(i)
    raise PoolExhausted(f"no tunnel address pair left in {TUNNEL_NET} (one per node of the cluster)")
