"""The data plane's service methods on the real kernel, in step with the fake: resolver sockets in a
container's namespace, VIP maps changed element by element (the same change counts), the mesh tables."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess

import pytest
from dnslib import DNSRecord

from netweft.dataplane.fake import FakeDataPlane
from netweft.dataplane.mesh import MeshRule
from netweft.dataplane.real import RealDataPlane
from netweft.errors import KernelError

STEPS = [{"198.18.0.2": ("198.18.0.5", "198.18.0.6", "198.18.0.7")},
         {"198.18.0.2": ("198.18.0.5", "198.18.0.7")},
         {"198.18.0.2": ("198.18.0.5", "198.18.0.7")},
         {"198.18.0.2": (), "198.18.0.3": ("198.18.0.9",)},
         {"198.18.0.3": ("198.18.0.9", "198.18.0.8")}, {}]


def nft(path: str, *args: str) -> dict:
    r = subprocess.run(["nsenter", f"--net={path}", "nft", "-j", "list", *args], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_service_methods_real_and_fake(make_ns, root):
    host = make_ns("h1")

    async def main():
        real = RealDataPlane(str(root / "run"), host_netns=host.path)
        fake = FakeDataPlane()
        ctr = str(root / "run" / "ctr1")
        try:
            for dp in (real, fake):
                await dp.create_netns(ctr)
                with pytest.raises(KernelError):
                    await dp.sync_vips(str(root / "run" / "nope"), {})
            # Resolver sockets: bound to 127.0.0.11:53 inside the container's namespace.
            udp, tcp = await real.open_dns_sockets(ctr)
            assert udp.getsockname() == ("127.0.0.11", 53) and tcp.getsockname() == ("127.0.0.11", 53)
            q = DNSRecord.question("x").pack()
            subprocess.run(["nsenter", f"--net={ctr}", "python3", "-c",
                            "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                            f"s.sendto({bytes(q)!r}, ('127.0.0.11', 53))"], check=True)
            udp.settimeout(5)
            assert udp.recvfrom(512)[0] == bytes(q)
            udp.close(), tcp.close()
            # VIPs: the same steps, the same number of changes, the same slots read back.
            for want in STEPS:
                assert await real.sync_vips(ctr, want) == await fake.sync_vips(ctr, want), want
                maps = {m["map"]["name"]: m["map"] for m in nft(ctr, "table", "ip", "netweft-lb").get("nftables", [])
                        if "map" in m}
                got = {e[0]: tuple(v for _, v in sorted(maps[f"be-{int(ipaddress.IPv4Address(e[0])):08x}"].get("elem", [])))
                       for e in maps.get("vips", {}).get("elem", [])}
                assert got == fake.vips[ctr], want
            # The mesh: host table (own addresses) and a sandbox table (masquerade).
            rules = [MeshRule("tcp", 8080, (("198.18.255.5", 80), ("198.18.255.6", 80)))]
            await real.apply_mesh(None, rules, None)
            await real.apply_mesh(ctr, rules, "eth0")
            assert any("rule" in x for x in nft(host.path, "table", "ip", "netweft-mesh")["nftables"])
            assert any("rule" in x for x in nft(ctr, "table", "ip", "netweft-mesh")["nftables"])
            await real.apply_mesh(None, [], None)
            assert nft(host.path, "table", "ip", "netweft-mesh") == {}
            await real.delete_netns(ctr)
        finally:
            await real.close()
    asyncio.run(main())
