"""IPAM and validation: pure logic, hammered with properties."""
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings, strategies as st

from netweft.errors import Conflict, InvalidRequest, PoolExhausted
from netweft.ipam import address as ipam
from netweft import validate


def cfg(subnet="198.18.0.0/24", **kw):
    return ipam.build_subnet_config(IPv4Network(subnet), **kw)


@pytest.mark.parametrize("text", ["198.18.0.0/33", "300.1.1.0/24", "abc", "", "198.18.0.0/", "::1/64"])
def test_malformed_cidr_refused(text):
    with pytest.raises(InvalidRequest):
        ipam.parse_network(text)


@pytest.mark.parametrize("text, words", [("0.0.0.0/0", "a /0 is larger"), ("10.0.0.0/7", "a /7 is larger"),
                                         ("0.0.0.0/8", "'this network'"), ("0.1.2.0/24", "'this network'"),
                                         ("127.0.0.0/24", "loopback"), ("169.254.1.0/24", "link-local"),
                                         ("169.0.0.0/8", "link-local"), ("224.0.0.0/24", "multicast"),
                                         ("239.1.0.0/16", "multicast"), ("240.0.0.0/8", "reserved"),
                                         ("255.255.255.255/32", "reserved")])
def test_networks_no_container_can_use_are_refused_in_one_line(text, words):
    with pytest.raises(InvalidRequest, match=words) as e:
        ipam.parse_network(text)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidRequest, match=words):
        ipam.parse_pool(f"base={text},size=30")


@pytest.mark.parametrize("text", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15", "1.0.0.0/8",
                                  "126.255.255.0/24", "128.0.0.0/24", "223.255.255.0/24"])
def test_ordinary_networks_are_accepted(text):
    assert str(ipam.parse_network(text)) == text


def test_host_bits_refused_with_hint():
    with pytest.raises(InvalidRequest, match="198.18.0.0/24"):
        ipam.parse_network("198.18.0.7/24")


@pytest.mark.parametrize("text", ["198.18.0.256", "x", "", "fe80::1", "198.18.0.0/24"])
def test_malformed_ip_refused(text):
    with pytest.raises(InvalidRequest):
        ipam.parse_address(text)


def test_default_gateway_is_first_host():
    assert cfg().gateway == IPv4Address("198.18.0.1")


def test_gateway_outside_subnet_refused():
    with pytest.raises(InvalidRequest, match="gateway"):
        cfg(gateway="198.18.1.1")
    with pytest.raises(InvalidRequest, match="gateway"):
        cfg(gateway="198.18.0.255")  # broadcast


def test_ip_range_outside_subnet_refused():
    with pytest.raises(InvalidRequest, match="ip-range"):
        cfg(ip_range="198.18.1.0/28")


def test_aux_outside_subnet_refused():
    with pytest.raises(InvalidRequest, match="aux-address"):
        cfg(aux={"router": "198.19.0.1"})


def test_requested_ip_rules():
    c = cfg(gateway="198.18.0.254", ip_range="198.18.0.0/25", aux={"r": "198.18.0.5"})
    assert ipam.check_requested_ip(c, "198.18.0.10", set()) == IPv4Address("198.18.0.10")
    with pytest.raises(InvalidRequest, match="not inside"):
        ipam.check_requested_ip(c, "198.18.1.10", set())
    with pytest.raises(Conflict, match="gateway"):
        ipam.check_requested_ip(c, "198.18.0.254", set())
    with pytest.raises(Conflict, match="aux-address"):
        ipam.check_requested_ip(c, "198.18.0.5", set())
    with pytest.raises(Conflict, match="in use"):
        ipam.check_requested_ip(c, "198.18.0.10", {IPv4Address("198.18.0.10")})
    with pytest.raises(InvalidRequest, match="broadcast"):
        ipam.check_requested_ip(c, "198.18.0.255", set())


def test_allocation_skips_reserved_and_exhausts():
    c = cfg("198.18.0.0/29", aux={"r": "198.18.0.2"})  # hosts .1-.6, gw .1, aux .2
    got = []
    for _ in range(4):
        got.append(ipam.allocate_ip(c, set(got)))
    assert [str(a) for a in got] == ["198.18.0.3", "198.18.0.4", "198.18.0.5", "198.18.0.6"]
    with pytest.raises(PoolExhausted):
        ipam.allocate_ip(c, set(got))


@settings(max_examples=200, deadline=None)
@given(prefix=st.integers(22, 29), rng_prefix=st.integers(0, 4), n=st.integers(1, 40), seed=st.randoms())
def test_allocation_properties(prefix, rng_prefix, n, seed):
    subnet = IPv4Network(f"198.18.0.0/{prefix}")
    rng = IPv4Network(f"198.18.0.0/{min(30, prefix + rng_prefix)}")
    c = ipam.build_subnet_config(subnet, ip_range=str(rng))
    used: set[IPv4Address] = set()
    for _ in range(n):
        try:
            ip = ipam.allocate_ip(c, used)
        except PoolExhausted:
            # exhausted only when every usable address of the range is taken or reserved
            first, last = ipam.usable_hosts(subnet)
            free = [a for a in rng.hosts() if first <= int(a) <= last and a not in used and a not in c.reserved()]
            assert free == []
            break
        assert ip in rng and ip not in used and ip not in c.reserved()
        assert ip != subnet.network_address and ip != subnet.broadcast_address
        used.add(ip)
        if seed.random() < 0.3:  # release a random one: allocation must reuse holes, never duplicate
            used.discard(seed.choice(sorted(used)))


def test_pool_parse_and_errors():
    p = ipam.parse_pool("base=198.18.0.0/16,size=24")
    assert p.base == IPv4Network("198.18.0.0/16") and p.size == 24
    for bad in ["198.18.0.0/16", "base=198.18.0.0/16", "base=198.18.0.0/16,size=x", "base=198.18.0.0/16,size=8",
                "base=nope,size=24"]:
        with pytest.raises(InvalidRequest):
            ipam.parse_pool(bad)


def test_subnet_allocation_avoids_taken_and_exhausts():
    pools = [ipam.parse_pool("base=198.18.0.0/22,size=24")]
    taken = [IPv4Network("198.18.0.0/24"), IPv4Network("198.18.1.128/25")]
    assert ipam.allocate_subnet(pools, taken) == IPv4Network("198.18.2.0/24")
    taken.append(IPv4Network("198.18.0.0/22"))
    with pytest.raises(PoolExhausted):
        ipam.allocate_subnet(pools, taken)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(16, 28)), max_size=12))
def test_subnet_allocation_never_overlaps(blocks):
    pools = [ipam.parse_pool("base=198.18.0.0/16,size=24"), ipam.parse_pool("base=198.19.0.0/16,size=26")]
    taken = [IPv4Network((int(IPv4Address("198.18.0.0")) + (i << 8), p), strict=False) for i, p in blocks]
    try:
        got = ipam.allocate_subnet(pools, taken)
    except PoolExhausted:
        return
    assert not any(got.overlaps(t) for t in taken)
    assert any(got.subnet_of(p.base) and got.prefixlen == p.size for p in pools)


def test_mac_from_ip_and_parse():
    assert ipam.mac_for_ip(IPv4Address("198.18.0.5")) == "02:42:c6:12:00:05"
    assert ipam.parse_mac("02:42:AA:bb:cc:dd") == "02:42:aa:bb:cc:dd"
    for bad in ["02:42:aa", "zz:42:aa:bb:cc:dd", "01:00:5e:00:00:01"]:
        with pytest.raises(InvalidRequest):
            ipam.parse_mac(bad)


@pytest.mark.parametrize("mac, words", [("00:00:00:00:00:00", "all-zero"), ("FF:ff:ff:ff:ff:ff", "broadcast"),
                                        ("33:33:00:00:00:01", "multicast")])
def test_macs_that_are_no_hosts_are_refused(mac, words):
    # As a peer's MAC, 00:..:00 is the VXLAN default destination: every host's flooding would go to one VTEP.
    with pytest.raises(InvalidRequest, match=words) as e:
        ipam.parse_mac(mac)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,ok", [("1500", True), ("68", True), ("65535", True), ("67", False),
                                     ("65536", False), ("abc", False), ("-1", False)])
def test_mtu_range(text, ok):
    if ok:
        assert validate.parse_mtu(text) == int(text)
    else:
        with pytest.raises(InvalidRequest, match="MTU"):
            validate.parse_mtu(text)


def test_labels_syntax():
    assert validate.parse_key_values(["a=b", "c=", "d=e=f"], "label") == {"a": "b", "c": "", "d": "e=f"}
    for bad in ["novalue", "=v", " =v"]:
        with pytest.raises(InvalidRequest, match="KEY=VALUE"):
            validate.parse_key_values([bad], "label")


@pytest.mark.parametrize("name,ok", [("mgmt", True), ("a.b-c_d", True), ("-x", False), ("", False),
                                     ("a b", False), ("x" * 65, False)])
def test_names(name, ok):
    if ok:
        validate.check_name(name, "network")
    else:
        with pytest.raises(InvalidRequest):
            validate.check_name(name, "network")


@pytest.mark.parametrize("name,ok", [("controller01", True), ("a-b.example", True), ("-bad", False),
                                     ("bad_", False), ("a" * 70, False)])
def test_hostnames(name, ok):
    if ok:
        validate.check_hostname(name)
    else:
        with pytest.raises(InvalidRequest):
            validate.check_hostname(name)


def test_requested_ip_may_lie_outside_the_ip_range_as_in_docker():
    c = cfg(ip_range="198.18.0.0/25")
    assert ipam.check_requested_ip(c, "198.18.0.200", set()) == IPv4Address("198.18.0.200")
    with pytest.raises(Conflict, match="in use"):
        ipam.check_requested_ip(c, "198.18.0.200", {IPv4Address("198.18.0.200")})
    # Allocation without a requested address still stays inside the range.
    assert all(a in c.ip_range for a in ipam.allocate_ips(c, {IPv4Address("198.18.0.200")}, 120))


@settings(max_examples=100, deadline=None)
@given(used=st.sets(st.integers(1, 60), max_size=30), count=st.integers(0, 40))
def test_bulk_allocation_matches_one_by_one(used, count):
    c = cfg("198.18.0.0/26", aux={"r": "198.18.0.9"})
    in_use = {IPv4Address(int(IPv4Address("198.18.0.0")) + u) for u in used}
    expected, taken = [], set(in_use)
    try:
        for _ in range(count):
            ip = ipam.allocate_ip(c, taken)
            expected.append(ip)
            taken.add(ip)
    except PoolExhausted:
        with pytest.raises(PoolExhausted):
            ipam.allocate_ips(c, in_use, count)
        return
    assert ipam.allocate_ips(c, in_use, count) == expected
