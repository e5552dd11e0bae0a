"""The data-plane interface: everything the engine and the agent ask of a host's kernel.

Two implementations: `dataplane.real.RealDataPlane` (pyroute2, hand-packed batched netlink, libnftables;
every call runs in the one kernel thread that owns the netlink and nftables handles) and
`dataplane.fake.FakeDataPlane` (in memory, for unit tests of the reconcile logic and for simulations
of thousands of hosts in one process). Outside dataplane/ and runtime/ nothing touches the kernel.

Every method is idempotent (it changes only what differs from what is asked), so a reconcile can call
it again after a crash half way. Kernel refusals raise KernelError with one line; malformed arguments
raise InvalidRequest before anything changes. `list_*` methods report what exists, for the diff.
"""
from __future__ import annotations

import abc
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

from netweft.dataplane.checks import check_ifname
from netweft.dataplane.firewall import BridgeRule, PortRule
from netweft.dataplane.wgconf import Implementation, PeerStatus, TunnelSpec
from netweft.dataplane.mesh import MeshRule
from netweft.model.objects import Peer

VXLAN_OVERHEAD = 50          # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8: overlay MTU = underlay MTU - 50
DEFAULT_VXLAN_PORT = 4789
GWBRIDGE = "nw_gwbridge"     # the overlays' gateway bridge (Docker's docker_gwbridge)


class ProbeChannel(Protocol):
    """Probe frames to and from peer hosts through the data path (see dataplane/probe.py)."""

    def start(self, loop, on_frame: Callable[[bytes], None]) -> None:
        """Call on_frame(inner Ethernet frame) for every probe frame received, from the loop."""

    def send(self, vtep: str, frame: bytes) -> str | None:
        """Send a frame to a peer's VTEP; None, or a few words why it could not leave this host."""

    def close(self) -> None: ...


class DataPlane(abc.ABC):
    # ---- namespaces ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_netns(self, path: str) -> None:
        """A network namespace pinned at `path` (loopback up)."""

    @abc.abstractmethod
    async def delete_netns(self, path: str) -> None: ...

    @abc.abstractmethod
    async def list_netns(self, directory: str) -> list[str]:
        """Names of the namespaces pinned in `directory`."""

    # ---- host facts ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def link_exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def link_info(self, name: str) -> tuple[str | None, str | None, bool] | None:
        """(kind, master, is_loopback) of host link `name`: kind as the kernel names it ("bridge", "veth",
        ...; None for a physical device or loopback), master the name of the bridge it is a port of (or
        None). None if there is no such link."""

    @abc.abstractmethod
    async def list_links(self, prefix: str) -> list[str]:
        """Names of host links starting with `prefix`, sorted."""

    @abc.abstractmethod
    async def list_ports(self, bridge: str) -> list[str]:
        """Names of the host links that are ports of host bridge `bridge` or of its extension bridges
        (dataplane/bridgechain.py), without the links between them, sorted (a few dumps, for resyncs)."""

    @abc.abstractmethod
    async def ipv4_addresses(self) -> dict[str, list[str]]:
        """Global IPv4 addresses of the host's interfaces, by interface name."""

    @abc.abstractmethod
    async def host_routes(self, bridge_prefix: str) -> list[ipaddress.IPv4Network]:
        """Main-table routes of the host except the default and those out of our own bridges."""

    @abc.abstractmethod
    async def underlay_mtu(self, local_ip: str) -> int:
        """MTU of the host interface holding `local_ip`."""

    # ---- local bridge networks -----------------------------------------------------------------
    @abc.abstractmethod
    async def ensure_bridge(self, name: str, address: str | None, mtu: int, parent: str | None) -> None: ...

    @abc.abstractmethod
    async def delete_bridge(self, name: str, parent: str | None) -> None: ...

    @abc.abstractmethod
    async def ensure_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                              address: str, mac: str, mtu: int, gateway: str | None) -> None:
        """A veth: `host_ifname` on host bridge `bridge`, `ifname` in the namespace with `address` (CIDR),
        `mac`, `mtu`, and a default route via `gateway` if given."""

    @abc.abstractmethod
    async def delete_endpoint(self, host_ifname: str) -> None: ...

    @abc.abstractmethod
    async def set_ip_forward(self, enabled: bool) -> None: ...

    @abc.abstractmethod
    async def apply_firewall(self, table: str, networks: list[BridgeRule]) -> None:
        """Atomically replace table `inet <table>` with the rules of `networks` (empty: delete it)."""

    # ---- overlay sandboxes ----------------------------------------------------------------------
    @abc.abstractmethod
    async def ensure_sandbox(self, path: str, vni: int, gateway_cidr: str, mtu: int, local_ip: str,
                             port: int, tmp_name: str) -> bool:
        """Sandbox namespace at `path` with br0 (`gateway_cidr`) and vxlan0 (VNI, source `local_ip`, UDP
        `port`, socket in the host namespace; `local_ip` "" leaves the source to the route). Repairs what was deleted or changed by hand (the namespace,
        br0 with its ports back on it, vxlan0). True if vxlan0 was (re)created: its peers are gone with the
        old one and must be programmed again (sync_peers)."""

    @abc.abstractmethod
    async def delete_sandbox(self, path: str, tmp_name: str | None = None) -> None: ...

    @abc.abstractmethod
    async def ensure_overlay_endpoint(self, sandbox_path: str, netns_path: str, host_ifname: str, ifname: str,
                                      address: str, mac: str, mtu: int) -> None:
        """A veth: `host_ifname` a port of the sandbox's br0, or of an extension of it once br0 is full
        (dataplane/bridgechain.py; PoolExhausted when every extension is), `ifname` in the container's namespace."""

    @abc.abstractmethod
    async def delete_overlay_endpoint(self, sandbox_path: str, host_ifname: str) -> None: ...

    async def delete_overlay_endpoints(self, sandbox_path: str, host_ifnames: list[str]) -> None:
        """delete_overlay_endpoint of each (`rm -f` of many); the real data plane deletes them at once.
        A malformed name is refused before anything is deleted."""
        for name in host_ifnames:
            check_ifname(name, "host interface name")
        for name in host_ifnames:
            await self.delete_overlay_endpoint(sandbox_path, name)

    @abc.abstractmethod
    async def list_overlay_endpoints(self, sandbox_path: str) -> list[str]:
        """Names of the endpoint veths in the sandbox (host ends; not the links between its bridges)."""

    @abc.abstractmethod
    async def add_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None: ...

    @abc.abstractmethod
    async def remove_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None: ...

    @abc.abstractmethod
    async def list_peers(self, sandbox_path: str) -> set[Peer]:
        """Remote endpoints programmed in the sandbox (none if it or its vxlan0 is missing), read back in
        canonical form: equal to the peers given."""

    @abc.abstractmethod
    async def sync_peers(self, sandbox_path: str, wanted: Iterable[Peer]) -> int:
        """Make the remote endpoints exactly `wanted`; returns the number of entries changed."""

    # ---- the gateway bridge (overlay egress) ------------------------------------------------------
    @abc.abstractmethod
    async def ensure_gwbridge(self, name: str, gateway_cidr: str, mtu: int) -> None: ...

    @abc.abstractmethod
    async def delete_gwbridge(self, name: str) -> None: ...

    @abc.abstractmethod
    async def ensure_gw_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                                 address: str, mac: str, mtu: int, gateway_ip: str) -> None:
        """A veth: `host_ifname` an isolated port of gateway bridge `bridge` or of one of its extensions (as
        ensure_overlay_endpoint), `ifname` in the namespace with `address` and the default route via
        `gateway_ip`. ensure_gwbridge makes the bridge and puts back its extensions' parts."""

    @abc.abstractmethod
    async def delete_gw_endpoint(self, host_ifname: str) -> None: ...

    async def delete_gw_endpoints(self, host_ifnames: list[str]) -> None:
        """delete_gw_endpoint of each; the real data plane deletes them at once (names checked first)."""
        for name in host_ifnames:
            check_ifname(name, "host interface name")
        for name in host_ifnames:
            await self.delete_gw_endpoint(name)

    @abc.abstractmethod
    async def apply_overlay_firewall(self, gwbridge: str, gw_subnet: str) -> None:
        """Atomically replace table `inet netweft-ov`: no routing between the gateway bridge's ports, MSS
        clamp, masquerade of `gw_subnet`. Re-applying repairs a rule or the table deleted by hand."""

    @abc.abstractmethod
    async def delete_overlay_firewall(self) -> None: ...

    # ---- WireGuard (encrypted overlays) -----------------------------------------------------------------
    @abc.abstractmethod
    async def wireguard(self) -> Implementation:
        """Which WireGuard this host has: the kernel module, wireguard-go (path, version), or none (and why)."""

    @abc.abstractmethod
    async def ensure_tunnel(self, spec: TunnelSpec) -> bool:
        """The WireGuard interface as `spec` says: key, port, peers (only what differs is changed, so sessions
        of unchanged peers live on), addresses, MTU, up, and the tunnel block routed into it with spec.source.
        Started if missing or dead (wireguard-go: the process too); True if it was (re)started."""

    @abc.abstractmethod
    async def delete_tunnel(self, ifname: str) -> None:
        """The interface (and its wireguard-go process) gone. Idempotent."""

    @abc.abstractmethod
    async def list_tunnels(self, prefix: str) -> list[str]:
        """Our WireGuard interfaces named `prefix`*, including a crash's leftovers."""

    @abc.abstractmethod
    async def tunnel_status(self, ifname: str) -> list[PeerStatus]:
        """Each peer key of the interface with its last handshake and byte counters ([] if it is not running)."""

    @abc.abstractmethod
    async def apply_tunnel_firewall(self, ifnames: list[str], vxlan_port: int, vnis: list[int]) -> None:
        """Atomically replace table `inet netweft-wg`: VXLAN of `vnis` leaves and enters only through `ifnames`."""

    @abc.abstractmethod
    async def delete_tunnel_firewall(self) -> None: ...

    @abc.abstractmethod
    async def send_tunnel_probes(self, addrs: list[str]) -> None:
        """An echo request to each peer tunnel address, through the tunnel."""

    @abc.abstractmethod
    async def tunnel_probe_replies(self) -> set[str]:
        """The tunnel addresses that answered since the last call."""

    # ---- published ports ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def apply_port_maps(self, rules: list[PortRule]) -> None:
        """Atomically replace table `inet netweft-ports` with DNAT rules for the published ports (none:
        delete it)."""
    # ---- data-path probes (dataplane/probe.py) -----------------------------------------------------
    @abc.abstractmethod
    async def open_probe(self, local_ip: str, port: int, mtu: int) -> "ProbeChannel":
        """The host's probe device (a VXLAN device on the data path's `port`, VNI probe.PROBE_VNI) made or
        repaired, and a channel on it: frames sent encapsulated to a peer's VTEP with DF, frames received."""

    @abc.abstractmethod
    async def delete_probe(self) -> None:
        """Remove the probe device (the host left its swarm). Idempotent."""

    @abc.abstractmethod
    async def list_antispoof(self, netns_path: str | None = None) -> list[str]:
        """Container ports guarded against spoofing (dataplane/antispoof.py) in the host namespace, or in the
        namespace at `netns_path` (an overlay sandbox). ensure_endpoint, ensure_overlay_endpoint and
        ensure_gw_endpoint guard their port (only its MAC and IPv4 address may send); the delete_* remove it."""

    @abc.abstractmethod
    async def kernel_features(self) -> dict[str, str | None]:
        """What the kernel can do (dataplane/features.py): feature -> None if it works, else why not."""

    # ---- the resolver's sockets in containers ----------------------------------------------------
    @abc.abstractmethod
    async def open_dns_sockets(self, netns_path: str) -> tuple[socket.socket, socket.socket]:
        """(UDP socket, listening TCP socket) bound to 127.0.0.11:53 inside the namespace at `netns_path`,
        non-blocking, for the host's resolver to serve (the caller owns and closes them)."""

    # ---- service VIPs in containers --------------------------------------------------------------
    @abc.abstractmethod
    async def sync_vips(self, netns_path: str, wanted: dict[str, tuple[str, ...]]) -> int:
        """Make the load balancing in the namespace exactly `wanted` (VIP -> its tasks' addresses), element
        by element (dataplane/vip.py); returns the number of changes (0: it was so already)."""

    # ---- the routing mesh -------------------------------------------------------------------------
    @abc.abstractmethod
    async def apply_mesh(self, netns_path: str | None, rules: list[MeshRule], masquerade_out: str | None) -> None:
        """Replace the routing mesh's table (dataplane/mesh.py): in the host namespace (netns_path None:
        published ports on the host's own addresses) or in an ingress sandbox (spread over the tasks,
        masqueraded out of `masquerade_out`). IPv4 forwarding is turned on there. Empty rules: no table."""

    @abc.abstractmethod
    async def close(self) -> None: ...
