"""The WireGuard part of the data plane, real (wireguard-go in namespaces) and fake side by side: the same calls
give the same answers and refuse the same things. Two "hosts" are nwt-* namespaces joined by a veth on
192.0.2.0/24; tunnel addresses come from the reserved block."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from netweft.dataplane.fake import FakeDataPlane
from netweft.dataplane.real import RealDataPlane
from netweft.dataplane.wgconf import TunnelPeer, TunnelSpec, new_private_key, public_key
from netweft.errors import InvalidRequest


ROUTE = "198.19.240.0/21"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def hosts(root):
    """Two namespaces a and b on one veth: (path of a, path of b, run dir)."""
    names = [f"{root.name}-wg{x}" for x in "ab"]
    for n in names:
        sh("ip", "netns", "add", n)
    try:
        sh("ip", "-n", names[0], "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", names[1])
        for n, addr in zip(names, ("192.0.2.201/24", "192.0.2.202/24")):
            sh("ip", "-n", n, "addr", "add", addr, "dev", "up0")
            sh("ip", "-n", n, "link", "set", "up0", "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield [f"/run/netns/{n}" for n in names], str(root)
    finally:
        for n in names:
            sh("ip", "netns", "del", n, check=False)


def specs(tag: str, ka: str, kb: str) -> tuple[TunnelSpec, TunnelSpec]:
    a = TunnelSpec(f"nwwgt{tag}a", ka, 51820, ("198.19.240.2/32",), "198.19.240.2", ROUTE, 1440,
                   (TunnelPeer(public_key(kb), "192.0.2.202:51820", "198.19.240.4/32"),))
    b = TunnelSpec(f"nwwgt{tag}b", kb, 51820, ("198.19.240.4/32",), "198.19.240.4", ROUTE, 1440,
                   (TunnelPeer(public_key(ka), "192.0.2.201:51820", "198.19.240.2/32"),))
    return a, b


def test_real_and_fake_tunnels_agree(hosts):
    (na, nb), run = hosts
    tag = os.path.basename(run)[-6:]

    async def main():
        real = [RealDataPlane(os.path.join(run, x), host_netns=n) for x, n in (("a", na), ("b", nb))]
        fake = [FakeDataPlane(), FakeDataPlane()]
        ka, kb = new_private_key(), new_private_key()
        sa, sb = specs(tag, ka, kb)
        try:
            for (da, db) in (real, fake):
                assert (await da.wireguard()).kind == "wireguard-go"
                assert await da.ensure_tunnel(sa) is True and await db.ensure_tunnel(sb) is True
                assert await da.ensure_tunnel(sa) is False            # converged: nothing restarted
                assert await da.list_tunnels("nwwgt") == [sa.ifname]
                st = await da.tunnel_status(sa.ifname)
                assert [(p.public_key, p.endpoint, p.allowed_ips) for p in st] == \
                    [(public_key(kb), "192.0.2.202:51820", ("198.19.240.4/32",))]
                bad = [TunnelSpec(sa.ifname, "nope", 51820, sa.addresses, sa.source, ROUTE, 1440),
                       TunnelSpec(sa.ifname, ka, 51820, sa.addresses, "198.19.240.9", ROUTE, 1440),
                       TunnelSpec("bad name!", ka, 51820, sa.addresses, sa.source, ROUTE, 1440)]
                for spec in bad:
                    with pytest.raises(InvalidRequest):
                        await da.ensure_tunnel(spec)
                await da.apply_tunnel_firewall([sa.ifname], 4789, [4096])
                await da.delete_tunnel_firewall()
                await da.delete_tunnel(sa.ifname)
                await da.delete_tunnel(sa.ifname)                      # idempotent
                assert await da.list_tunnels("nwwgt") == [] and await da.tunnel_status(sa.ifname) == []
                assert await da.ensure_tunnel(sa) is True
            # The real one carries packets, answers the probes, and a peer's key change is applied in place.
            r = sh("nsenter", f"--net={na}", "ping", "-c1", "-W2", "198.19.240.4", check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            await real[0].send_tunnel_probes(["198.19.240.4"])
            for _ in range(50):
                got = await real[0].tunnel_probe_replies()
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got == {"198.19.240.4"}
            route = json.loads(sh("nsenter", f"--net={na}", "ip", "-j", "route", "show", ROUTE).stdout)
            assert route[0]["dev"] == sa.ifname and route[0]["prefsrc"] == "198.19.240.2"
            # A killed wireguard-go is noticed and started again.
            pid = int(open(os.path.join(run, "a", "wireguard", f"{sa.ifname}.pid")).read())
            os.kill(pid, 9)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    break
                await asyncio.sleep(0.02)
            assert await real[0].ensure_tunnel(sa) is True
        finally:
            for dp, spec in ((real[0], sa), (real[1], sb)):
                await dp.delete_tunnel(spec.ifname)
                await dp.close()
        assert not os.path.exists(f"/var/run/wireguard/{sa.ifname}.sock")

    asyncio.run(main())
