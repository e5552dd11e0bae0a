"""The host's routes and addresses a new subnet must not overlap (daemon/collisions.py), on the fake data plane,
and the leader's automatic overlay subnet skipping them."""
import asyncio
from ipaddress import IPv4Network

from netweft.daemon import collisions
from netweft.dataplane.fake import FakeDataPlane


def test_host_claims_are_routes_and_foreign_addresses_not_our_bridges():
    dp = FakeDataPlane()
    dp.add_host_interface("eth0", "192.0.2.11/24")
    dp.add_host_interface("nw_gwbridge", "198.19.0.1/24")
    dp.add_route("203.0.113.0/24", "eth0")
    claims = asyncio.run(collisions.host_claims(dp, "nw-"))
    nets = {str(n) for n, _ in claims}
    assert "192.0.2.0/24" in nets and "203.0.113.0/24" in nets and "192.0.2.11/32" in nets
    assert "198.19.0.1/32" not in nets
    assert collisions.overlap(IPv4Network("203.0.113.128/25"), claims) == (IPv4Network("203.0.113.0/24"),
                                                                            "a route of this host")
    assert collisions.overlap(IPv4Network("198.18.0.0/24"), claims) is None
    assert ("192.0.2.11/32", "this host's address on eth0") in {(str(n), w) for n, w in claims}


def test_our_wireguard_tunnel_is_no_host_claim():
    # The tunnel block routed into WireGuard is refused in its own words (reserved), not as a host route.
    dp = FakeDataPlane()
    dp.add_host_interface("nwwgabc0", "198.19.240.1/32")
    dp.add_route("198.19.240.0/21", "nwwgabc0")
    dp.add_route("198.19.0.0/16", "eth0")
    nets = {str(n) for n, _ in asyncio.run(collisions.host_claims(dp, "nw-"))}
    assert nets == {"198.19.0.0/16"}
