"""The routing mesh's tables (dataplane/mesh.py) and the fake data plane keeping them."""
from __future__ import annotations

import asyncio

import pytest

from netweft.dataplane import mesh
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import InvalidRequest, KernelError

R = [mesh.MeshRule("tcp", 8080, (("198.18.255.5", 80), ("198.18.255.6", 80))),
     mesh.MeshRule("udp", 53, (("198.18.255.7", 5353),)), mesh.MeshRule("tcp", 9000, ())]


def test_host_table_matches_only_the_hosts_own_addresses_and_covers_local_connections():
    text = mesh.render(R, True, None)
    assert "fib daddr type local tcp dport 8080 dnat ip addr . port to numgen inc mod 2 map " \
           "{ 0 : 198.18.255.5 . 80, 1 : 198.18.255.6 . 80 }" in text
    assert "fib daddr type local udp dport 53 dnat to 198.18.255.7:5353" in text
    assert "tcp dport 9000 reject" in text                   # no task: refused, not left hanging
    assert "chain output" in text and "masquerade" not in text
    assert text.startswith("add table ip netweft-mesh\ndelete table ip netweft-mesh\n")   # replaced atomically


def test_sandbox_table_masquerades_out_of_the_ingress_interface():
    text = mesh.render(R[:1], False, "eth0")
    assert "fib" not in text and 'oifname "eth0" masquerade' in text and "chain output" not in text


@pytest.mark.parametrize("bad", [mesh.MeshRule("sctp", 80, ()), mesh.MeshRule("tcp", 0, ()),
                                 mesh.MeshRule("tcp", 80, (("nope", 80),)), mesh.MeshRule("tcp", 80, (("198.18.0.1", 0),))])
def test_bad_rules_are_refused(bad):
    with pytest.raises((InvalidRequest, ValueError)):
        mesh.render([bad], True, None)
    with pytest.raises(InvalidRequest):
        mesh.render([], False, "bad name with spaces")


def test_fake_keeps_the_tables():
    async def main():
        dp = FakeDataPlane()
        await dp.apply_mesh(None, R, None)
        assert "8080" in dp.mesh[""]
        await dp.apply_mesh(None, [], None)
        assert "" not in dp.mesh
        with pytest.raises(KernelError):
            await dp.apply_mesh("/run/x/sbox", R, "eth0")
        await dp.create_netns("/run/x/sbox")
        await dp.apply_mesh("/run/x/sbox", R, "eth0")
        await dp.delete_netns("/run/x/sbox")
        assert "/run/x/sbox" not in dp.mesh
    asyncio.run(main())
