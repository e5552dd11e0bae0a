"""The real data plane: the DataPlane interface over the host's kernel.

Every call runs in one kernel thread, which owns every netlink socket and the libnftables context:
pyroute2's handles and libnftables are bound to the thread (and namespace) that first uses them, and
one thread also keeps kernel changes in the order they were asked for. Local bridge networks are
`Kernel` (kernel.py), overlays and the gateway bridge are `Overlay` (overlay.py); both are made in
that thread, the Overlay only when first needed.

"The host" is the network namespace the kernel thread starts in: the namespace of the thread that
makes the first call, or the namespace at `host_netns` if given (tests run a data plane inside a
namespace they made).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from netweft.dataplane import mesh, netns, sockets, vip
from netweft.dataplane.api import DataPlane
from netweft.dataplane.checks import check_path
from netweft.dataplane.firewall import BridgeRule, PortRule
from netweft.dataplane.kernel import Kernel
from netweft.dataplane.overlay import Overlay
from netweft.dataplane.tunnel import Tunnel, detect
from netweft.dataplane.wgconf import Implementation, PeerStatus, TunnelSpec
from netweft.errors import KernelError
from netweft.model.objects import Peer

T = TypeVar("T")


def _sandbox(path: str) -> str:
    return check_path(path, "sandbox path")


class RealDataPlane(DataPlane):
    def __init__(self, run_dir: str, host_netns: str | None = None, wireguard_go: str | None = None):
        self.run_dir = run_dir
        self.wireguard_go = wireguard_go   # None: found on PATH
        self._tunnel: Tunnel | None = None    # made in the kernel thread on first use
        self._host_fd = netns.open_netns(host_netns) if host_netns else None
        init = (netns.setns, (self._host_fd,)) if self._host_fd is not None else (None, ())
        self._kx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel",
                                      initializer=init[0], initargs=init[1])
        self._kernel: Kernel | None = None     # made in the kernel thread
        self._overlay: Overlay | None = None   # made in the kernel thread on first use
        self._closed = False

    # ---- the kernel thread ----------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise KernelError("the data plane is closed")
        return await asyncio.get_running_loop().run_in_executor(self._kx, fn)

    def _k(self) -> Kernel:
        if self._kernel is None:
            self._kernel = Kernel(self.run_dir)
        return self._kernel

    def _ov(self) -> Overlay:
        if self._overlay is None:
            self._overlay = Overlay()
        return self._overlay

    def _wg(self) -> Tunnel:
        if self._tunnel is None:
            self._tunnel = Tunnel(self._ov(), self.run_dir, detect(self.wireguard_go))
        return self._tunnel

    async def _wgcall(self, name: str, *args):
        return await self._run(lambda: getattr(self._wg(), name)(*args))

    async def _kcall(self, name: str, *args):
        return await self._run(lambda: getattr(self._k(), name)(*args))

    async def _ovcall(self, name: str, *args):
        return await self._run(lambda: getattr(self._ov(), name)(*args))

    async def start(self) -> None:
        """Open the host handles now, so a broken host fails at start rather than at the first request."""
        await self._run(self._k)

    async def close(self) -> None:
        if self._closed:
            return

        def release() -> None:
            try:
                if self._tunnel is not None:
                    self._tunnel.close()
                if self._overlay is not None:
                    self._overlay.close()
            finally:
                if self._kernel is not None:
                    self._kernel.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._kx, release)
        finally:
            self._closed = True
            self._kx.shutdown(wait=True)
            if self._host_fd is not None:
                os.close(self._host_fd)

    # ---- namespaces -------------------------------------------------------------------------------

    async def create_netns(self, path: str) -> None:
        await self._kcall("create_netns", check_path(path))

    async def delete_netns(self, path: str) -> None:
        await self._kcall("delete_netns", check_path(path))

    async def list_netns(self, directory: str) -> list[str]:
        check_path(directory, "directory")
        # Through the kernel thread too, so it sees every namespace created or deleted before it.
        return await self._run(lambda: [os.path.basename(p) for p in netns.list_netns(directory)])

    # ---- host facts -------------------------------------------------------------------------------

    async def link_exists(self, name: str) -> bool:
        return await self._kcall("link_exists", name)

    async def link_info(self, name: str) -> tuple[str | None, str | None, bool] | None:
        return await self._kcall("link_info", name)

    async def list_links(self, prefix: str) -> list[str]:
        return await self._kcall("list_links", prefix)

    async def list_ports(self, bridge: str) -> list[str]:
        return await self._kcall("list_ports", bridge)

    async def ipv4_addresses(self) -> dict[str, list[str]]:
        return await self._kcall("ipv4_addresses")

    async def host_routes(self, bridge_prefix: str) -> list[ipaddress.IPv4Network]:
        return await self._kcall("host_routes", bridge_prefix)

    async def underlay_mtu(self, local_ip: str) -> int:
        return await self._ovcall("underlay_mtu", local_ip)

    # ---- local bridge networks ----------------------------------------------------------------------

    async def ensure_bridge(self, name: str, address: str | None, mtu: int, parent: str | None) -> None:
        await self._kcall("ensure_bridge", name, address, mtu, parent)

    async def delete_bridge(self, name: str, parent: str | None) -> None:
        await self._kcall("delete_bridge", name, parent)

    async def ensure_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                              address: str, mac: str, mtu: int, gateway: str | None) -> None:
        await self._kcall("ensure_endpoint", check_path(netns_path), bridge, host_ifname, ifname, address, mac, mtu, gateway)

    async def delete_endpoint(self, host_ifname: str) -> None:
        await self._kcall("delete_endpoint", host_ifname)

    async def set_ip_forward(self, enabled: bool) -> None:
        await self._kcall("set_ip_forward", enabled)

    async def apply_firewall(self, table: str, networks: list[BridgeRule]) -> None:
        await self._kcall("apply_firewall", table, list(networks))

    async def apply_port_maps(self, rules: list[PortRule]) -> None:
        await self._kcall("apply_port_maps", list(rules))

    # ---- overlay sandboxes ----------------------------------------------------------------------------

    async def ensure_sandbox(self, path: str, vni: int, gateway_cidr: str, mtu: int, local_ip: str,
                             port: int, tmp_name: str) -> bool:
        return await self._ovcall("ensure_sandbox", _sandbox(path), vni, gateway_cidr, mtu, local_ip, port, tmp_name)

    async def delete_sandbox(self, path: str, tmp_name: str | None = None) -> None:
        await self._ovcall("delete_sandbox", _sandbox(path), tmp_name)

    async def ensure_overlay_endpoint(self, sandbox_path: str, netns_path: str, host_ifname: str, ifname: str,
                                      address: str, mac: str, mtu: int) -> None:
        await self._ovcall("ensure_endpoint", _sandbox(sandbox_path), check_path(netns_path), host_ifname, ifname, address, mac, mtu)

    async def delete_overlay_endpoint(self, sandbox_path: str, host_ifname: str) -> None:
        await self._ovcall("delete_endpoint", _sandbox(sandbox_path), host_ifname)

    async def delete_overlay_endpoints(self, sandbox_path: str, host_ifnames: list[str]) -> None:
        await self._ovcall("delete_endpoints", _sandbox(sandbox_path), list(host_ifnames))

    async def list_overlay_endpoints(self, sandbox_path: str) -> list[str]:
        return await self._ovcall("list_endpoints", _sandbox(sandbox_path))

    async def add_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        peers = list(peers)  # the caller's iterable is consumed here, not in another thread
        await self._ovcall("add_peers", _sandbox(sandbox_path), peers)

    async def remove_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        peers = list(peers)
        await self._ovcall("remove_peers", _sandbox(sandbox_path), peers)

    async def list_peers(self, sandbox_path: str) -> set[Peer]:
        return await self._ovcall("list_peers", _sandbox(sandbox_path))

    async def sync_peers(self, sandbox_path: str, wanted: Iterable[Peer]) -> int:
        wanted = list(wanted)
        return await self._ovcall("sync_peers", _sandbox(sandbox_path), wanted)

    # ---- the gateway bridge ---------------------------------------------------------------------------

    async def ensure_gwbridge(self, name: str, gateway_cidr: str, mtu: int) -> None:
        await self._ovcall("ensure_gwbridge", name, gateway_cidr, mtu)

    async def delete_gwbridge(self, name: str) -> None:
        await self._ovcall("delete_gwbridge", name)

    async def ensure_gw_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                                 address: str, mac: str, mtu: int, gateway_ip: str) -> None:
        await self._ovcall("ensure_gw_endpoint", check_path(netns_path), bridge, host_ifname, ifname, address, mac, mtu,
                           gateway_ip)

    async def delete_gw_endpoint(self, host_ifname: str) -> None:
        await self._ovcall("delete_gw_endpoint", host_ifname)

    async def delete_gw_endpoints(self, host_ifnames: list[str]) -> None:
        await self._ovcall("delete_gw_endpoints", list(host_ifnames))

    async def apply_overlay_firewall(self, gwbridge: str, gw_subnet: str) -> None:
        await self._ovcall("apply_overlay_firewall", gwbridge, gw_subnet)

    async def delete_overlay_firewall(self) -> None:
        await self._ovcall("delete_overlay_firewall")

    # ---- WireGuard --------------------------------------------------------------------------------------

    async def wireguard(self) -> Implementation:
        return await self._run(lambda: self._wg().impl)

    async def ensure_tunnel(self, spec: TunnelSpec) -> bool:
        return await self._wgcall("ensure", spec)

    async def delete_tunnel(self, ifname: str) -> None:
        await self._wgcall("delete", ifname)

    async def list_tunnels(self, prefix: str) -> list[str]:
        return await self._wgcall("list", prefix)

    async def tunnel_status(self, ifname: str) -> list[PeerStatus]:
        return await self._wgcall("status", ifname)

    async def apply_tunnel_firewall(self, ifnames: list[str], vxlan_port: int, vnis: list[int]) -> None:
        await self._wgcall("apply_firewall", list(ifnames), vxlan_port, list(vnis))

    async def delete_tunnel_firewall(self) -> None:
        await self._wgcall("delete_firewall")

    async def send_tunnel_probes(self, addrs: list[str]) -> None:
        await self._wgcall("send_probes", list(addrs))

    async def tunnel_probe_replies(self) -> set[str]:
        return await self._wgcall("probe_replies")

    # ---- data-path probes -------------------------------------------------------------------------

    async def open_probe(self, local_ip: str, port: int, mtu: int):
        return await self._ovcall("open_probe", local_ip, port, mtu)

    async def delete_probe(self) -> None:
        await self._ovcall("delete_probe")

    async def list_antispoof(self, netns_path: str | None = None) -> list[str]:
        if netns_path is None:
            return await self._kcall("list_antispoof")
        return await self._ovcall("list_antispoof", _sandbox(netns_path))

    async def kernel_features(self) -> dict[str, str | None]:
        # Its own thread, not the kernel thread: it leaves the host namespace for a throwaway one.
        from netweft.dataplane.features import kernel_features
        return await asyncio.get_running_loop().run_in_executor(None, kernel_features)

    # ---- the resolver's sockets in containers -------------------------------------------------------

    async def open_dns_sockets(self, netns_path: str):
        path = check_path(netns_path)
        return await self._run(lambda: sockets.open_dns_sockets(path))

    async def sync_vips(self, netns_path: str, wanted: dict[str, tuple[str, ...]]) -> int:
        path = check_path(netns_path)
        wanted = vip.check(wanted)
        return await self._run(lambda: vip.sync_in_netns(path, wanted))

    async def apply_mesh(self, netns_path, rules, masquerade_out) -> None:
        text = mesh.render(list(rules), netns_path is None, masquerade_out) if rules else mesh.render_delete()
        if netns_path is None:
            await self._run(lambda: mesh.apply_here(text, bool(rules), "routing mesh on this host"))
        else:
            path = check_path(netns_path)
            await self._run(lambda: mesh.apply_in_netns(path, text, bool(rules), "routing mesh in the ingress sandbox"))
