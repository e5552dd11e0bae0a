"""Bridges past the kernel's port limit (dataplane/bridgechain.py): names, first fit, and the fake's chains."""
from __future__ import annotations

import asyncio

import pytest

from netweft.dataplane import bridgechain
from netweft.dataplane.bridgechain import Chain, extension, is_link, parse
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import PoolExhausted


def test_names_fit_and_parse_back():
    ext = extension("nw_gwbridge", bridgechain.MAX_EXTENSIONS)
    assert (ext.bridge, ext.trunk, ext.branch) == ("nw_gwbridge-20", "nw_gwbridge-20a", "nw_gwbridge-20b")
    assert max(len(n) for n in (ext.bridge, ext.trunk, ext.branch)) <= 15
    assert parse("br0", "br0-3") == (3, "") and parse("br0", "br0-3a") == (3, "a") and parse("br0", "br0-12b") == (12, "b")
    for other in ("br0", "br0-0", "br0-01", "br0-3c", "br0-21", "br0-x", "br1-1", "nwv1234", "br0-3ab"):
        assert parse("br0", other) is None, other
    assert is_link("br0", "br0-1a") and is_link("br0", "br0-1b") and not is_link("br0", "br0-1")
    assert not is_link("nw_gwbridge", "nwg0123456789ab")


def test_the_default_layout_holds_4000_containers():
    assert bridgechain.MAX_PORTS == 1023
    # The first bridge keeps room for vxlan0 and a link per extension.
    assert bridgechain.FIRST_PORTS + 1 + bridgechain.MAX_EXTENSIONS <= bridgechain.MAX_PORTS
    chain = Chain("br0")
    for i in range(4000):
        chain.placed(f"p{i}", chain.choose())
    assert chain.counts == {0: 1000, 1: 1022, 2: 1022, 3: 956}


def test_first_fit_and_a_full_chain(monkeypatch):
    monkeypatch.setattr(bridgechain, "FIRST_PORTS", 2)
    monkeypatch.setattr(bridgechain, "EXTENSION_PORTS", 1)
    monkeypatch.setattr(bridgechain, "MAX_EXTENSIONS", 2)
    chain = Chain("br0")
    for name in "abcd":
        chain.placed(name, chain.choose())
    assert chain.where == {"a": 0, "b": 0, "c": 1, "d": 2} and chain.extensions == {1, 2}
    with pytest.raises(PoolExhausted, match=r"^bridge br0 is full: 4 container ports on it and its 2 extension"):
        chain.choose()
    chain.removed("a")
    chain.removed("a")          # idempotent
    assert chain.choose() == 0  # a port freed on the first bridge is taken first
    chain.placed("e", 0)
    chain.placed("e", 0)        # counted once
    assert chain.counts[0] == 2
    chain.learn({"x": 2}, {1, 2})
    assert chain.counts == {0: 0, 1: 0, 2: 1} and chain.choose() == 0
    chain.full(0)               # the kernel said so: the next bridge
    assert chain.choose() == 1


def test_a_long_first_bridge_name_cannot_grow():
    with pytest.raises(PoolExhausted, match="too long"):
        bridgechain.check_first("nw-0123456789ab")
    bridgechain.check_first("nw_gwbridge")


def test_the_fake_grows_chains_first_fit(monkeypatch):
    monkeypatch.setattr(bridgechain, "FIRST_PORTS", 1)
    monkeypatch.setattr(bridgechain, "EXTENSION_PORTS", 1)
    sb, gw = "/run/nwt/sb", "nwgw"

    async def main():
        f = FakeDataPlane(yield_to_loop=False)
        await f.ensure_sandbox(sb, 7, "198.18.0.1/24", 1450, "192.0.2.1", 4789, "nwx7")
        await f.ensure_gwbridge(gw, "198.19.0.1/24", 1500)
        for i in range(3):
            await f.create_netns(f"/run/nwt/c{i}")
            await f.ensure_overlay_endpoint(sb, f"/run/nwt/c{i}", f"nwv{i}", "eth0", f"198.18.0.{i + 2}/24",
                                            f"02:00:00:00:00:0{i}", 1450)
            await f.ensure_gw_endpoint(f"/run/nwt/c{i}", gw, f"nwg{i}", "eth1", f"198.19.0.{i + 2}/24",
                                       f"02:00:00:00:01:0{i}", 1500, "198.19.0.1")
        assert [f.link(f"nwv{i}", sb).master for i in range(3)] == ["br0", "br0-1", "br0-2"]
        assert [f.link(f"nwg{i}").master for i in range(3)] == [gw, "nwgw-1", "nwgw-2"]
        assert f.link("nwgw-1a").master == gw and f.link("nwgw-1a").isolated
        assert f.link("br0-1a", sb).master == "br0" and not f.link("br0-1a", sb).isolated
        assert await f.list_overlay_endpoints(sb) == ["nwv0", "nwv1", "nwv2"]
        assert await f.list_ports(gw) == ["nwg0", "nwg1", "nwg2"]
        assert f.link(gw).mac == "02:42:c6:13:00:01"   # pinned: the gateway's
        f.delete_link("br0-1", sb)
        assert f.link("nwv1", sb).master is None
        await f.ensure_sandbox(sb, 7, "198.18.0.1/24", 1450, "192.0.2.1", 4789, "nwx7")
        assert f.link("nwv1", sb).master == "br0-1"
        await f.delete_gwbridge(gw)
        assert not [n for n in f.links() if n.startswith(gw)] and f.link("nwg1").master is None

    asyncio.run(main())
