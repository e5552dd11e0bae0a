"""Docker's driver protocol: the typed bodies and the pure rules for reading them."""
from ipaddress import IPv4Network

import msgspec
import pytest

from netweft.errors import InvalidRequest
from netweft.plugins import docker as d


def test_pool_ids_carry_subnet_and_range():
    for sub in (None, IPv4Network("198.18.0.128/25")):
        pid = d.pool_id(IPv4Network("198.18.0.0/24"), sub)
        assert d.parse_pool_id(pid) == (IPv4Network("198.18.0.0/24"), sub)
    for bad in ("", "default:198.18.0.0/24", "netweft:", "netweft:198.18.0.0/24:x", "netweft:1.2.3.4/33"):
        with pytest.raises(InvalidRequest):
            d.parse_pool_id(bad)


def test_addresses_options_and_names():
    assert str(d.parse_address("198.18.0.5/24", "address")) == "198.18.0.5"
    assert str(d.parse_address("198.18.0.5", "address")) == "198.18.0.5"
    with pytest.raises(InvalidRequest):
        d.parse_address("fe80::1/64", "address")
    opts = {d.GENERIC: {d.NAME_OPT: "ov", "com.docker.network.driver.mtu": "1400"}}
    assert d.generic_options(opts) == {d.NAME_OPT: "ov", "com.docker.network.driver.mtu": "1400"}
    assert d.overlay_name("abcdef0123456789", d.generic_options(opts)) == "ov"
    assert d.overlay_name("abcdef0123456789", {}) == "docker-abcdef012345"
    for bad in ({d.GENERIC: "x"}, {d.GENERIC: {"k": 1}}):
        with pytest.raises(InvalidRequest):
            d.generic_options(bad)
    assert d.error_body("two\nlines") == b'{"Err":"two lines"}'


def test_bodies_are_typed_and_bounded():
    body = msgspec.json.decode(b'{"NetworkID":"n","EndpointID":"e","SandboxKey":"/var/run/docker/netns/x",'
                               b'"Options":{"a":1},"Unknown":true}', type=d.Join)
    assert body.SandboxKey == "/var/run/docker/netns/x"
    for raw, type_ in ((b'{"NetworkID":"n","EndpointID":"e","SandboxKey":"x"}', d.Join),
                       (b'{"NetworkID":1}', d.NetworkRef), (b'{"PoolID":"p","Address":null}', d.ReleaseAddress),
                       (b'{"NetworkID":"n","IPv4Data":{}}', d.CreateNetwork)):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=type_)
