"""netweft/ipam/inuse.py: the lowest free address, kept as addresses come and go (the gateway bridge's)."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from netweft.ipam import address as ipam
from netweft.ipam.inuse import InUse


def cfg(subnet: str = "198.19.0.0/29", gateway: str = "198.19.0.1", **kw):
    return ipam.build_subnet_config(IPv4Network(subnet), gateway, **kw)


def test_lowest_free_skips_the_reserved_and_the_used_and_comes_back_to_a_released_one():
    s = InUse(cfg())
    assert s.lowest_free() == IPv4Address("198.19.0.2")
    for ip in ("198.19.0.2", "198.19.0.3", "198.19.0.4"):
        s.add(ip)
    assert s.lowest_free() == IPv4Address("198.19.0.5")
    assert s.lowest_free({int(IPv4Address("198.19.0.5"))}) == IPv4Address("198.19.0.6")   # a claim in flight
    assert s.lowest_free() == IPv4Address("198.19.0.5")   # claims are not remembered
    s.discard("198.19.0.3")
    assert s.lowest_free() == IPv4Address("198.19.0.3") and len(s) == 2


def test_full_is_none_and_a_name_used_twice_is_released_twice():
    s = InUse(cfg())
    for n in range(2, 7):
        s.add(f"198.19.0.{n}")
    assert s.lowest_free() is None
    s.add("198.19.0.4")
    s.discard("198.19.0.4")
    assert s.lowest_free() is None
    s.discard("198.19.0.4")
    s.discard("198.19.0.4")   # not in use any more: nothing happens
    assert s.lowest_free() == IPv4Address("198.19.0.4")


def test_same_answers_as_allocate_ip_over_churn():
    c = cfg("198.19.0.0/24", ip_range="198.19.0.0/25", aux={"x": "198.19.0.70"})
    s, used = InUse(c), set()
    for step in range(300):
        if step % 3 == 2 and used:
            ip = sorted(used)[(step * 7) % len(used)]
            used.discard(ip)
            s.discard(ip)
            continue
        want = ipam.allocate_ip(c, used)
        assert s.lowest_free() == want
        used.add(want)
        s.add(want)
