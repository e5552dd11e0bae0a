"""The fake data plane: one host's kernel, in memory.

For unit tests of the reconcile logic and for simulations of thousands of hosts in one process: no
threads, no I/O, a few small objects per namespace. It keeps what the real data plane would make
(namespaces, links with their MTU, master, addresses and state, veth pairs, VXLAN devices with their
peer tables, default routes, nftables tables, ip_forward) and reports it through the same list_*
methods. It refuses what the real one refuses: the same argument checks (dataplane/checks.py,
InvalidRequest) and the same kernel refusals (KernelError: a missing bridge or namespace, a name taken
by another kind of link, a VNI already in use).

Beyond the interface, a test can
- inject drift, as an operator with `ip`/`nft` would: delete_link, set_link, drop_peer, drop_table,
  remove_netns, add_link;
- inject failures: fail_on("ensure_overlay_endpoint", times=1, after=2) makes the third call fail
  (before it changes anything), as a crash half way through a reconcile would leave things;
- set up the host: add_host_interface (the underlay), add_route;
- look: link, links, default_route, netns_paths, tables, ip_forward, and `changes` (how many changes
  calls through the interface made: a second reconcile of a converged host makes none).
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from netweft.dataplane.api import VXLAN_OVERHEAD, DataPlane
from netweft.dataplane.probe import PROBE_DEVICE, PROBE_VNI
from netweft.dataplane.antispoof import TABLE as ANTISPOOF_TABLE
from netweft.dataplane import bridgechain, mesh, vip
from netweft.dataplane.checks import (check_ifname, check_mtu, check_path, check_peers, default_tmp_name, int_in,
                                      ipv4, parse_interface, parse_mac, peer_tables)
from netweft.dataplane.firewall import (OVERLAY_TABLE, PORTS_TABLE, TUNNEL_TABLE, BridgeRule, PortRule,
                                        render_firewall, render_overlay_firewall, render_port_maps,
                                        render_tunnel_firewall)
from netweft.dataplane.wgconf import Implementation, PeerStatus, TunnelSpec, key_bytes
from netweft.errors import InvalidRequest, KernelError, PoolExhausted
from netweft.model.objects import Peer

HOST = ""                 # the key of the host namespace
SANDBOX_BRIDGE = "br0"
SANDBOX_VXLAN = "vxlan0"


@dataclass(slots=True, eq=False)
class FakeLink:
    name: str
    kind: str                           # bridge | veth | vxlan | device (a host interface: lo, the underlay)
    mtu: int = 1500
    up: bool = False
    master: str | None = None           # the bridge it is a port of
    addresses: list[str] = field(default_factory=list)   # CIDR, e.g. 198.18.0.2/24
    mac: str | None = None
    isolated: bool = False              # bridge port setting (gateway bridge ports)
    peer: tuple[str, str] | None = None  # veth: (namespace key, name) of the other end
    vxlan: tuple[int, str, int] | None = None            # vxlan: (VNI, local IP, UDP port)
    neigh: dict[str, str] = field(default_factory=dict)  # vxlan: permanent neighbours ip -> mac
    fdb: dict[str, list[str]] = field(default_factory=dict)  # vxlan: mac -> VTEPs
    loopback: bool = False              # lo


class FakeProbeNet:
    """The underlay between fake hosts, for probes: who reaches whom, and the path MTU of each direction.
    Several FakeDataPlanes given one FakeProbeNet probe each other; a test blocks a direction or lowers
    a path's MTU as a firewall or a misconfigured link would."""

    def __init__(self, mtu: int = 1500):
        self.mtu = mtu
        self.channels: dict[str, "FakeProbeChannel"] = {}   # VTEP -> the open channel there
        self.blocked: set[tuple[str, str]] = set()            # (from VTEP, to VTEP)
        self.path_mtu: dict[tuple[str, str], int] = {}

    def block(self, a: str, b: str, both: bool = True) -> None:
        self.blocked.add((a, b))
        if both:
            self.blocked.add((b, a))

    def unblock(self, a: str, b: str) -> None:
        self.blocked -= {(a, b), (b, a)}

    def deliver(self, src: str, vtep: str, frame: bytes) -> None:
        dst = self.channels.get(vtep)
        outer = len(frame) + VXLAN_OVERHEAD - 14   # the outer IP packet's size, as on the real wire
        if dst is None or (src, vtep) in self.blocked or outer > self.path_mtu.get((src, vtep), self.mtu):
            return   # lost, as on a real path: nothing tells the sender
        if dst.loop is not None and dst.on_frame is not None:
            dst.loop.call_soon(dst.on_frame, bytes(frame))


class FakeProbeChannel:
    def __init__(self, net: FakeProbeNet, vtep: str):
        self.net, self.vtep = net, vtep
        self.loop = self.on_frame = None
        self.sent = 0
        net.channels[vtep] = self

    def start(self, loop, on_frame) -> None:
        self.loop, self.on_frame = loop, on_frame

    def send(self, vtep: str, frame: bytes) -> str | None:
        self.sent += 1
        self.net.deliver(self.vtep, vtep, frame)
        return None

    def close(self) -> None:
        if self.net.channels.get(self.vtep) is self:
            del self.net.channels[self.vtep]
        self.loop = self.on_frame = None


def _op(fn):
    """A DataPlane method: bookkeeping (closed, injected failures, a yield to the loop), then the body."""
    name = fn.__name__

    @functools.wraps(fn)
    async def call(self: "FakeDataPlane", *args, **kwargs):
        if self.yield_to_loop:
            await asyncio.sleep(0)
        self._enter(name)
        return fn(self, *args, **kwargs)

    return call


class FakeDataPlane(DataPlane):
    def __init__(self, *, yield_to_loop: bool = True, probe_net: "FakeProbeNet | None" = None):
        self.yield_to_loop = yield_to_loop
        self.probe_net = probe_net if probe_net is not None else FakeProbeNet()
        # What kernel_features reports; a test removes one: features["vxlan"] = "Operation not supported".
        self.features: dict[str, str | None] = {"bridge": None, "vxlan": None, "wireguard": None, "nftables": None,
                                                "nftables_bridge": None, "br_netfilter": "not loaded",
                                                "wireguard_go": None}
        self._ns: dict[str, dict[str, FakeLink]] = {HOST: {"lo": FakeLink("lo", "device", 65536, up=True,
                                                                          loopback=True)}}
        self._default: dict[str, tuple[str, str]] = {}    # namespace -> (gateway, device)
        self._routes: list[tuple[ipaddress.IPv4Network, str | None]] = []  # host routes added by a test
        self.tables: dict[str, dict] = {}                  # nftables table -> the libnftables JSON applied
        # Anti-spoofing (dataplane/antispoof.py): namespace -> guarded port -> (MAC, IP) it may send from.
        self.guards: dict[str, dict[str, tuple[str, str]]] = {}
        self.ip_forward = False
        self.changes = 0
        self.calls: Counter[str] = Counter()
        self._failures: dict[str, list] = {}               # method -> [calls to let through, failures left, error]
        self._closed = False
        # WireGuard: what the host has, the tunnels as configured, addresses whose probes go unanswered.
        self.wg_impl = Implementation("wireguard-go", "/usr/bin/wireguard-go", "v0.0.fake")
        self.tunnels: dict[str, TunnelSpec] = {}
        self.tunnel_starts: Counter[str] = Counter()
        self.unreachable: set[str] = set()
        self._probed: set[str] = set()

        self.dns_addresses: dict[str, tuple] = {}
        self.mesh: dict[str, str] = {}                    # namespace ("" the host) -> the mesh table (nft text)
        self.vips: dict[str, dict[str, tuple[str, ...]]] = {}   # namespace -> VIP -> backends (slot order)          # namespace -> (UDP, TCP) address of its resolver sockets

    # ---- test controls ------------------------------------------------------------------------------

    def fail_on(self, method: str, times: int = 1, error: Exception | None = None, after: int = 0) -> None:
        """Make the next `times` calls of `method` (after `after` more successful ones) raise `error`
        (default: a KernelError) before changing anything."""
        if not callable(getattr(DataPlane, method, None)):
            raise ValueError(f"DataPlane has no method {method!r}")
        self._failures[method] = [after, times, error or KernelError(f"{method}: injected failure")]

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if self._closed:
            raise KernelError("the data plane is closed")
        plan = self._failures.get(name)
        if plan is None:
            return
        if plan[0] > 0:
            plan[0] -= 1
            return
        plan[1] -= 1
        if plan[1] <= 0:
            del self._failures[name]
        raise plan[2]

    def add_host_interface(self, name: str, address: str | None = None, mtu: int = 1500) -> FakeLink:
        """A host interface that is not ours (the underlay's eth0), up, with `address` (CIDR)."""
        link = FakeLink(check_ifname(name), "device", check_mtu(mtu), up=True)
        if address is not None:
            link.addresses = [str(parse_interface(address))]
        self._ns[HOST][name] = link
        return link

    def add_route(self, destination: str, dev: str | None = None) -> None:
        """A host route (e.g. learnt from the LAN) that host_routes reports."""
        self._routes.append((ipaddress.IPv4Network(destination, strict=False), dev))

    def add_link(self, name: str, kind: str, netns: str | None = None, **attrs) -> FakeLink:
        """A link made behind the data plane's back (a leftover, or someone else's)."""
        link = FakeLink(name, kind, **attrs)
        self._links(netns)[name] = link
        return link

    def delete_link(self, name: str, netns: str | None = None) -> None:
        """`ip link del NAME` in the host (or in the namespace at `netns`)."""
        if name not in self._links(netns):
            raise KeyError(f"no link {name} in {netns or 'the host'}")
        self._del(self._key(netns), name)

    def set_link(self, name: str, netns: str | None = None, **attrs) -> None:
        """Change a link by hand: set_link("br0", sb, up=False, master=None, mtu=1400, addresses=[])."""
        link = self._links(netns)[name]
        for key, value in attrs.items():
            if not hasattr(link, key):
                raise AttributeError(f"a link has no {key!r}")
            setattr(link, key, value)

    def drop_peer(self, sandbox: str, peer: Peer, neigh: bool = True, fdb: bool = True) -> None:
        """Delete a peer's neighbour and/or FDB entry by hand."""
        vx = self._links(sandbox)[SANDBOX_VXLAN]
        if neigh:
            vx.neigh.pop(peer.ip, None)
        if fdb and peer.vtep in vx.fdb.get(peer.mac, ()):
            vx.fdb[peer.mac].remove(peer.vtep)
            if not vx.fdb[peer.mac]:
                del vx.fdb[peer.mac]

    def drop_table(self, name: str) -> None:
        """`nft delete table inet NAME`."""
        del self.tables[name]

    def remove_netns(self, path: str) -> None:
        """The namespace at `path` disappears (unmounted by hand), with everything in it."""
        self._drop_ns(self._key(path))

    # ---- looking ------------------------------------------------------------------------------------

    def link(self, name: str, netns: str | None = None) -> FakeLink | None:
        return self._ns.get(self._key(netns), {}).get(name)

    def links(self, netns: str | None = None) -> dict[str, FakeLink]:
        return dict(self._links(netns))

    def default_route(self, netns: str) -> tuple[str, str] | None:
        return self._default.get(self._key(netns))

    def netns_paths(self) -> list[str]:
        return sorted(p for p in self._ns if p != HOST)

    # ---- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _key(netns: str | None) -> str:
        return os.path.normpath(netns) if netns else HOST

    def _links(self, netns: str | None) -> dict[str, FakeLink]:
        try:
            return self._ns[self._key(netns)]
        except KeyError:
            raise KeyError(f"no namespace {netns}") from None

    def _set(self, link: FakeLink, attr: str, value) -> None:
        if getattr(link, attr) != value:
            setattr(link, attr, value)
            self.changes += 1

    def _add(self, ns: str, link: FakeLink) -> FakeLink:
        self._ns[ns][link.name] = link
        self.changes += 1
        return link

    def _del(self, ns: str, name: str) -> None:
        """Delete a link as the kernel would: a veth's other end goes too, a bridge's ports are released."""
        link = self._ns[ns].pop(name, None)
        if link is None:
            return
        self.changes += 1
        if link.kind == "bridge":
            for port in self._ns[ns].values():
                if port.master == name:
                    port.master = None
        if self._default.get(ns, ("", ""))[1] == name:
            del self._default[ns]
        if link.peer is not None and link.peer[0] in self._ns:
            self._del(*link.peer)

    def _drop_ns(self, path: str) -> None:
        if path not in self._ns:
            return
        for name in list(self._ns[path]):
            self._del(path, name)
        del self._ns[path]
        self._default.pop(path, None)
        self.guards.pop(path, None)   # the namespace's nftables go with it
        self.vips.pop(path, None)
        self.mesh.pop(path, None)
        self.changes += 1

    def _new_ns(self, path: str) -> None:
        if path not in self._ns:
            self._ns[path] = {"lo": FakeLink("lo", "device", 65536, up=True)}
            self.changes += 1

    @staticmethod
    def _path(path: str, what: str = "namespace path") -> str:
        """The key of the namespace at `path` (checked as the real data plane checks it)."""
        return os.path.normpath(check_path(path, what))

    def _netns(self, path: str, what: str) -> dict[str, FakeLink]:
        links = self._ns.get(path)
        if links is None:
            raise KernelError(f"{what}: cannot open network namespace {path}: No such file or directory")
        return links

    def _bridge(self, ns: str, name: str, address: ipaddress.IPv4Interface | None, mtu: int) -> FakeLink:
        link = self._ns[ns].get(name) or self._add(ns, FakeLink(name, "bridge", mtu))
        if address is not None:   # pinned to the gateway's (overlay.py's _ensure_bridge)
            self._set(link, "mac", "02:42:" + ":".join(f"{b:02x}" for b in address.ip.packed))
        self._set(link, "mtu", mtu)
        self._set(link, "addresses", [str(address)] if address else [])
        self._set(link, "up", True)
        return link

    def _veth(self, ns: str, host_ifname: str, ctr: str, ifname: str, mac: str, mtu: int, *,
              replace_peer: bool, what: str) -> tuple[FakeLink, FakeLink]:
        """The two ends of one veth, made afresh unless they already are a pair (see nlutil.ensure_veth)."""
        links, clinks = self._ns[ns], self._ns[ctr]
        host, peer = links.get(host_ifname), clinks.get(ifname)
        if host is not None and peer is not None and host.peer == (ctr, ifname) and peer.peer == (ns, host_ifname):
            return host, peer
        if host is not None and host.kind != "veth":
            raise KernelError(f"{what}: an interface named {host_ifname} exists and is not a veth")
        if peer is not None and peer.kind != "veth" and not replace_peer:
            raise KernelError(f"{what}: the container has an interface named {ifname} that is not a veth")
        self._del(ns, host_ifname)
        self._del(ctr, ifname)
        host = self._add(ns, FakeLink(host_ifname, "veth", mtu, peer=(ctr, ifname)))
        peer = self._add(ctr, FakeLink(ifname, "veth", mtu, mac=mac, peer=(ns, host_ifname)))
        return host, peer

    def _container_end(self, ctr: str, peer: FakeLink, address: ipaddress.IPv4Interface, mac: str, mtu: int,
                       gateway: str | None) -> None:
        self._set(peer, "mac", mac)
        self._set(peer, "mtu", mtu)
        self._set(peer, "addresses", [str(address)])
        self._set(peer, "up", True)
        self._set(self._ns[ctr]["lo"], "up", True)
        if gateway is not None and self._default.get(ctr) != (gateway, peer.name):
            self._default[ctr] = (gateway, peer.name)
            self.changes += 1

    def _port(self, port: FakeLink, bridge: str, mtu: int, isolated: bool) -> None:
        self._set(port, "mtu", mtu)
        self._set(port, "master", bridge)
        self._set(port, "isolated", isolated)
        self._set(port, "up", True)

    # ---- bridge chains (dataplane/bridgechain.py), as overlay.py makes them -------------------------------

    def _chain(self, ns: str, first: str) -> dict[int, str]:
        """Bridge number -> name of the chain's bridges in `ns` (0: the first), extensions known by their
        bridge or by an end of their link."""
        out = {0: first}
        for name in self._ns[ns]:
            found = bridgechain.parse(first, name)
            if found is not None:
                out[found[0]] = f"{first}-{found[0]}"
        return out

    def _chain_counts(self, ns: str, first: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, link in self._ns[ns].items():
            if link.kind == "veth" and link.master is not None and not bridgechain.is_link(first, name):
                counts[link.master] = counts.get(link.master, 0) + 1
        return counts

    def _extension(self, ns: str, first: str, number: int, mtu: int, isolated_trunk: bool, ours: bool) -> None:
        ext = bridgechain.extension(first, number)
        links = self._ns[ns]
        if ext.bridge in links and links[ext.bridge].kind != "bridge":
            if not ours:
                raise KernelError(f"an interface named {ext.bridge} exists and is not a bridge")
            self._del(ns, ext.bridge)
        self._bridge(ns, ext.bridge, None, mtu)
        trunk, branch = links.get(ext.trunk), links.get(ext.branch)
        if not (trunk is not None and branch is not None and trunk.peer == (ns, ext.branch)
                and branch.peer == (ns, ext.trunk)):
            for link in (trunk, branch):
                if link is not None:
                    if link.kind != "veth" and not ours:
                        raise KernelError(f"an interface named {link.name} exists and is not a veth")
                    self._del(ns, link.name)
            self._add(ns, FakeLink(ext.trunk, "veth", mtu, peer=(ns, ext.branch)))
            self._add(ns, FakeLink(ext.branch, "veth", mtu, peer=(ns, ext.trunk)))
        self._port(links[ext.trunk], first, mtu, isolated_trunk)
        self._port(links[ext.branch], ext.bridge, mtu, False)

    def _repair_chain(self, ns: str, first: str, mtu: int, isolated_trunk: bool, ours: bool) -> None:
        for number in sorted(self._chain(ns, first)):
            if number:
                self._extension(ns, first, number, mtu, isolated_trunk, ours)

    def _place(self, ns: str, first: str, port: FakeLink, mtu: int, isolated: bool) -> None:
        """Make `port` a port of the chain: kept where it is, else the lowest bridge with room (first fit)."""
        chain = self._chain(ns, first)
        if port.master in chain.values():
            self._port(port, port.master, mtu, isolated)
            return
        counts = self._chain_counts(ns, first)
        for number in range(bridgechain.MAX_EXTENSIONS + 1):
            bridge = f"{first}-{number}" if number else first
            if counts.get(bridge, 0) < bridgechain.capacity(number):
                if number:
                    bridgechain.check_first(first)
                    if bridge not in self._ns[ns]:
                        self._extension(ns, first, number, mtu, isolated, ours=ns != HOST)
                self._port(port, bridge, mtu, isolated)
                return
        raise PoolExhausted(bridgechain.full_message(first, sum(counts.values())))

    def _chain_ports(self, ns: str, first: str) -> list[str]:
        """Container ports on the chain's bridges (not the links between them), sorted."""
        bridges = set(self._chain(ns, first).values())
        return sorted(n for n, link in self._ns[ns].items()
                      if link.master in bridges and not bridgechain.is_link(first, n))

    def _delete_kind(self, ns: str, name: str, kind: str, what: str) -> None:
        link = self._ns[ns].get(name)
        if link is not None and link.kind != kind:
            raise KernelError(f"{what}: that interface is not a {kind}")
        self._del(ns, name)

    @staticmethod
    def _endpoint_args(host_ifname: str, ifname: str, address: str, mac: str, mtu: int) -> tuple:
        return (check_ifname(host_ifname, "host interface name"), check_ifname(ifname), parse_interface(address),
                parse_mac(mac), check_mtu(mtu))

    def _vxlan(self, sandbox_path: str) -> FakeLink | None:
        vx = self._ns.get(sandbox_path, {}).get(SANDBOX_VXLAN)
        return vx if vx is not None and vx.kind == "vxlan" else None

    def _vxlan_or_fail(self, sandbox_path: str) -> FakeLink:
        if sandbox_path not in self._ns:
            raise KernelError(f"no overlay sandbox at {sandbox_path} (ensure_sandbox first)")
        vx = self._vxlan(sandbox_path)
        if vx is None:
            raise KernelError(f"sandbox {sandbox_path} has no VXLAN device {SANDBOX_VXLAN} (ensure_sandbox first)")
        return vx

    # ---- namespaces ---------------------------------------------------------------------------------

    @_op
    def create_netns(self, path: str) -> None:
        self._new_ns(self._path(path))

    @_op
    def delete_netns(self, path: str) -> None:
        self._drop_ns(self._path(path))

    @_op
    def list_netns(self, directory: str) -> list[str]:
        directory = self._path(directory, "directory")
        return sorted(os.path.basename(p) for p in self._ns if p != HOST and os.path.dirname(p) == directory)

    # ---- host facts ---------------------------------------------------------------------------------

    @_op
    def link_exists(self, name: str) -> bool:
        try:
            check_ifname(name)
        except InvalidRequest:
            return False
        return name in self._ns[HOST]

    @_op
    def link_info(self, name: str) -> tuple[str | None, str | None, bool] | None:
        try:
            check_ifname(name)
        except InvalidRequest:
            return None
        link = self._ns[HOST].get(name)
        if link is None:
            return None
        return (None if link.kind == "device" else link.kind), link.master, link.loopback

    @_op
    def list_links(self, prefix: str) -> list[str]:
        return sorted(n for n in self._ns[HOST] if n.startswith(prefix))

    @_op
    def list_ports(self, bridge: str) -> list[str]:
        check_ifname(bridge, "bridge name")
        if bridge not in self._ns[HOST] or self._ns[HOST][bridge].kind != "bridge":
            return []
        return self._chain_ports(HOST, bridge)

    @_op
    def ipv4_addresses(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for link in self._ns[HOST].values():
            for a in link.addresses:
                out.setdefault(link.name, []).append(a.split("/")[0])
        return out

    @_op
    def host_routes(self, bridge_prefix: str) -> list[ipaddress.IPv4Network]:
        found = set()
        for link in self._ns[HOST].values():
            if link.up and not (bridge_prefix and link.name.startswith(bridge_prefix)):
                found.update(ipaddress.IPv4Interface(a).network for a in link.addresses)
        for dst, dev in self._routes:
            if dst.prefixlen and not (bridge_prefix and dev and dev.startswith(bridge_prefix)):
                found.add(dst)
        return sorted(found)

    @_op
    def underlay_mtu(self, local_ip: str) -> int:
        local_ip = ipv4(local_ip, "local underlay address")
        for link in self._ns[HOST].values():
            if any(a.split("/")[0] == local_ip for a in link.addresses):
                return link.mtu
        raise KernelError(f"no interface in the host namespace has address {local_ip}")

    # ---- local bridge networks ----------------------------------------------------------------------

    @_op
    def ensure_bridge(self, name: str, address: str | None, mtu: int, parent: str | None) -> None:
        check_ifname(name, "bridge name")
        if parent is not None:
            check_ifname(parent, "parent interface name")
            if parent == name:
                raise InvalidRequest(f"bridge {name} cannot be its own parent")
        want = parse_interface(address) if address else None
        check_mtu(mtu)
        host = self._ns[HOST]
        link = host.get(name)
        if link is not None and link.kind != "bridge":
            raise KernelError(f"bridge {name}: an interface of that name exists and is a "
                              f"{'plain device' if link.kind == 'device' else link.kind}, not a bridge")
        if parent is not None:
            port = host.get(parent)
            if port is None:
                raise KernelError(f"bridge {name}: parent interface {parent} does not exist")
            if port.master not in (None, name):
                raise KernelError(f"bridge {name}: parent interface {parent} is already enslaved to {port.master}")
        self._bridge(HOST, name, want, mtu)
        if parent is not None:
            self._set(host[parent], "master", name)
            self._set(host[parent], "up", True)

    @_op
    def delete_bridge(self, name: str, parent: str | None) -> None:
        check_ifname(name, "bridge name")
        if parent is not None:
            check_ifname(parent, "parent interface name")
        self._delete_kind(HOST, name, "bridge", f"delete bridge {name}")

    @_op
    def ensure_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                        address: str, mac: str, mtu: int, gateway: str | None) -> None:
        check_ifname(bridge, "bridge name")
        check_ifname(host_ifname, "host interface name")
        check_ifname(ifname, "container interface name")
        want, mac, mtu = parse_interface(address), parse_mac(mac), check_mtu(mtu)
        netns_path = self._path(netns_path)
        gateway = None if gateway is None else ipv4(gateway, "gateway")
        what = f"endpoint {host_ifname}"
        br = self._ns[HOST].get(bridge)
        if br is None:
            raise KernelError(f"{what}: bridge {bridge} does not exist")
        if br.kind != "bridge":
            raise KernelError(f"{what}: {bridge} is not a bridge")
        self._netns(netns_path, what)
        host, peer = self._veth(HOST, host_ifname, netns_path, ifname, mac, mtu, replace_peer=True, what=what)
        self._set(host, "master", bridge)
        self._set(host, "mtu", mtu)
        self._set(host, "up", True)
        self._container_end(netns_path, peer, want, mac, mtu, gateway)
        self._guard(HOST, host_ifname, mac, want)

    @_op
    def delete_endpoint(self, host_ifname: str) -> None:
        check_ifname(host_ifname, "host interface name")
        self._delete_kind(HOST, host_ifname, "veth", f"delete endpoint {host_ifname}")
        self._unguard(HOST, host_ifname)

    @_op
    def set_ip_forward(self, enabled: bool) -> None:
        if self.ip_forward != bool(enabled):
            self.ip_forward = bool(enabled)
            self.changes += 1

    @_op
    def apply_firewall(self, table: str, networks: list[BridgeRule]) -> None:
        networks = list(networks)
        doc = render_firewall(table, networks)
        self._table(table, doc if networks else None)

    @_op
    def apply_port_maps(self, rules: list[PortRule]) -> None:
        rules = list(rules)
        doc = render_port_maps(rules)
        self._table(PORTS_TABLE, doc if rules else None)

    def _table(self, name: str, doc: dict | None) -> None:
        if self.tables.get(name) != doc:
            self.changes += 1
        if doc is None:
            self.tables.pop(name, None)
        else:
            self.tables[name] = doc

    # ---- overlay sandboxes ----------------------------------------------------------------------------

    @_op
    def ensure_sandbox(self, path: str, vni: int, gateway_cidr: str, mtu: int, local_ip: str,
                       port: int, tmp_name: str | None = None) -> bool:
        path = self._path(path, "sandbox path")
        int_in(vni, 1, 2**24 - 1, "VNI")
        check_mtu(mtu)
        int_in(port, 1, 65535, "VXLAN port")
        gateway = parse_interface(gateway_cidr)
        local_ip = ipv4(local_ip, "local underlay address") if local_ip else ""   # "": the route's source
        tmp_name = check_ifname(tmp_name or default_tmp_name(vni), "temporary VXLAN name")
        what = f"sandbox {path}: VXLAN device (VNI {vni}, port {port})"
        want = (vni, local_ip, port)
        self._new_ns(path)
        links = self._ns[path]
        if SANDBOX_BRIDGE in links and links[SANDBOX_BRIDGE].kind != "bridge":
            self._del(path, SANDBOX_BRIDGE)   # everything in a sandbox is ours
        self._bridge(path, SANDBOX_BRIDGE, gateway, mtu)
        vx = self._vxlan(path)
        created = vx is None or vx.vxlan != want
        if created:
            # In the order of the real one: the old device goes, then a leftover under the temporary name.
            self._del(path, SANDBOX_VXLAN)
            stale = self._ns[HOST].get(tmp_name)
            if stale is not None and stale.kind != "vxlan":
                raise KernelError(f"{what}: temporary VXLAN name {tmp_name} is taken by a non-VXLAN interface "
                                  f"in the host namespace")
            self._del(HOST, tmp_name)
            # The VXLAN socket lives in the host namespace: one device per VNI and port per host.
            if any(self._vxlan(p) is not None and self._vxlan(p).vxlan[::2] == (vni, port) for p in self._ns):
                raise KernelError(f"{what}: File exists")
            vx = self._add(path, FakeLink(SANDBOX_VXLAN, "vxlan", mtu, vxlan=want))
        self._port(vx, SANDBOX_BRIDGE, mtu, False)
        self._repair_chain(path, SANDBOX_BRIDGE, mtu, False, True)
        for link in list(links.values()):   # endpoint veths on no bridge go back on one
            if link.kind == "veth" and link.master is None and not bridgechain.is_link(SANDBOX_BRIDGE, link.name):
                self._place(path, SANDBOX_BRIDGE, link, link.mtu, False)
        self._set(links["lo"], "up", True)
        return created

    @_op
    def delete_sandbox(self, path: str, tmp_name: str | None = None) -> None:
        path = self._path(path, "sandbox path")
        if tmp_name is not None:
            check_ifname(tmp_name, "temporary VXLAN name")
        vx = self._vxlan(path)
        if vx is not None and tmp_name is None:
            tmp_name = default_tmp_name(vx.vxlan[0])
        self._drop_ns(path)
        if tmp_name is not None:
            self._delete_kind(HOST, tmp_name, "vxlan", f"delete sandbox {path}: leftover {tmp_name}")

    @_op
    def ensure_overlay_endpoint(self, sandbox_path: str, netns_path: str, host_ifname: str, ifname: str,
                                address: str, mac: str, mtu: int) -> None:
        host_ifname, ifname, want, mac, mtu = self._endpoint_args(host_ifname, ifname, address, mac, mtu)
        sandbox_path, netns_path = self._path(sandbox_path, "sandbox path"), self._path(netns_path)
        what = f"overlay endpoint {host_ifname} in {sandbox_path}"
        if sandbox_path not in self._ns:
            raise KernelError(f"no overlay sandbox at {sandbox_path} (ensure_sandbox first)")
        br = self._ns[sandbox_path].get(SANDBOX_BRIDGE)
        if br is None or br.kind != "bridge":
            raise KernelError(f"{what}: sandbox has no {SANDBOX_BRIDGE} (ensure_sandbox first)")
        self._netns(netns_path, what)
        host, peer = self._veth(sandbox_path, host_ifname, netns_path, ifname, mac, mtu, replace_peer=False,
                                what=what)
        self._place(sandbox_path, SANDBOX_BRIDGE, host, mtu, False)
        self._container_end(netns_path, peer, want, mac, mtu, None)
        self._guard(sandbox_path, host_ifname, mac, want)

    @_op
    def delete_overlay_endpoint(self, sandbox_path: str, host_ifname: str) -> None:
        check_ifname(host_ifname, "host interface name")
        sandbox_path = self._path(sandbox_path, "sandbox path")
        if sandbox_path in self._ns:
            self._delete_kind(sandbox_path, host_ifname, "veth",
                              f"delete overlay endpoint {host_ifname} in {sandbox_path}")
            self._unguard(sandbox_path, host_ifname)

    @_op
    def list_overlay_endpoints(self, sandbox_path: str) -> list[str]:
        sandbox_path = self._path(sandbox_path, "sandbox path")
        return sorted(n for n, link in self._ns.get(sandbox_path, {}).items()
                      if link.kind == "veth" and not bridgechain.is_link(SANDBOX_BRIDGE, n))

    @_op
    def add_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        sandbox_path = self._path(sandbox_path, "sandbox path")
        peers = check_peers(peers)
        vx = self._vxlan_or_fail(sandbox_path)
        for p in peers:  # replace semantics, as the kernel's: FDB first, then the neighbour
            self._add_fdb(vx, p.mac, p.vtep)
        for p in peers:
            if vx.neigh.get(p.ip) != p.mac:
                vx.neigh[p.ip] = p.mac
                self.changes += 1

    def _add_fdb(self, vx: FakeLink, mac: str, vtep: str) -> None:
        vteps = vx.fdb.setdefault(mac, [])
        if not vteps:
            vteps.append(vtep)
        elif vteps[0] != vtep:
            vteps[0] = vtep   # `bridge fdb replace` rewrites the first destination
        else:
            return
        self.changes += 1

    @_op
    def remove_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        sandbox_path = self._path(sandbox_path, "sandbox path")
        peers = check_peers(peers)
        vx = self._vxlan(sandbox_path)
        if vx is None:
            return
        for p in peers:
            self._remove_entries(vx, [p.ip], [(p.mac, p.vtep)])

    def _remove_entries(self, vx: FakeLink, ips: Iterable[str], fdb: Iterable[tuple[str, str]]) -> None:
        for ip in ips:
            if vx.neigh.pop(ip, None) is not None:
                self.changes += 1
        for mac, vtep in fdb:
            vteps = vx.fdb.get(mac, [])
            if vtep in vteps:
                vteps.remove(vtep)
                self.changes += 1
                if not vteps:
                    del vx.fdb[mac]

    @_op
    def list_peers(self, sandbox_path: str) -> set[Peer]:
        vx = self._vxlan(self._path(sandbox_path, "sandbox path"))
        if vx is None:
            return set()
        return {Peer(ip, mac, vtep) for ip, mac in vx.neigh.items() for vtep in vx.fdb.get(mac, ())}

    @_op
    def sync_peers(self, sandbox_path: str, wanted: Iterable[Peer]) -> int:
        sandbox_path = self._path(sandbox_path, "sandbox path")
        want_neigh, want_fdb = peer_tables(check_peers(wanted))
        vx = self._vxlan_or_fail(sandbox_path)
        fdb = {(mac, vtep) for mac, vteps in vx.fdb.items() for vtep in vteps}
        stale_neigh = [ip for ip in vx.neigh if ip not in want_neigh]
        stale_fdb = [(mac, vtep) for mac, vtep in fdb if want_fdb.get(mac) != vtep]
        new_fdb = [(mac, vtep) for mac, vtep in want_fdb.items() if (mac, vtep) not in fdb]
        new_neigh = [(ip, mac) for ip, mac in want_neigh.items() if vx.neigh.get(ip) != mac]
        self._remove_entries(vx, stale_neigh, stale_fdb)
        for mac, vtep in new_fdb:
            self._add_fdb(vx, mac, vtep)
        for ip, mac in new_neigh:
            vx.neigh[ip] = mac
            self.changes += 1
        return len(stale_neigh) + len(stale_fdb) + len(new_fdb) + len(new_neigh)

    # ---- the gateway bridge ---------------------------------------------------------------------------

    @_op
    def ensure_gwbridge(self, name: str, gateway_cidr: str, mtu: int) -> None:
        check_ifname(name, "gateway bridge name")
        gateway = parse_interface(gateway_cidr)
        check_mtu(mtu)
        link = self._ns[HOST].get(name)
        if link is not None and link.kind != "bridge":
            raise KernelError(f"gateway bridge {name}: an interface named {name} exists and is not a bridge")
        self._bridge(HOST, name, gateway, mtu)
        self._repair_chain(HOST, name, mtu, True, False)
        if not self.ip_forward:
            self.ip_forward = True
            self.changes += 1

    @_op
    def delete_gwbridge(self, name: str) -> None:
        check_ifname(name, "gateway bridge name")
        self._delete_kind(HOST, name, "bridge", f"delete gateway bridge {name}")
        for link in [n for n in self._ns[HOST] if bridgechain.parse(name, n) is not None]:
            self._del(HOST, link)

    @_op
    def ensure_gw_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                           address: str, mac: str, mtu: int, gateway_ip: str) -> None:
        host_ifname, ifname, want, mac, mtu = self._endpoint_args(host_ifname, ifname, address, mac, mtu)
        check_ifname(bridge, "gateway bridge name")
        gateway = ipv4(gateway_ip, "gateway address")
        netns_path = self._path(netns_path)
        what = f"gateway endpoint {host_ifname}"
        br = self._ns[HOST].get(bridge)
        if br is None or br.kind != "bridge":
            raise KernelError(f"{what}: no gateway bridge {bridge} (ensure_gwbridge first)")
        self._netns(netns_path, what)
        host, peer = self._veth(HOST, host_ifname, netns_path, ifname, mac, mtu, replace_peer=False, what=what)
        self._place(HOST, bridge, host, mtu, True)
        self._container_end(netns_path, peer, want, mac, mtu, gateway)
        self._guard(HOST, host_ifname, mac, want)

    @_op
    def delete_gw_endpoint(self, host_ifname: str) -> None:
        check_ifname(host_ifname, "host interface name")
        self._delete_kind(HOST, host_ifname, "veth", f"delete gateway endpoint {host_ifname}")
        self._unguard(HOST, host_ifname)

    @_op
    def list_antispoof(self, netns_path: str | None = None) -> list[str]:
        key = HOST if netns_path is None else self._path(netns_path, "namespace path")
        return sorted(self.guards.get(key, {}))

    def _guard(self, ns: str, port: str, mac: str, address) -> None:
        entry = (mac, str(address.ip))
        if ns == HOST and ANTISPOOF_TABLE not in self.tables:
            self.tables[ANTISPOOF_TABLE] = {"nftables": []}   # made with the first port, kept (as the real one)
        if self.guards.setdefault(ns, {}).get(port) != entry:
            self.guards[ns][port] = entry
            self.changes += 1

    def _unguard(self, ns: str, port: str) -> None:
        if self.guards.get(ns, {}).pop(port, None) is not None:
            self.changes += 1

    @_op
    def apply_overlay_firewall(self, gwbridge: str, gw_subnet: str) -> None:
        self._table(OVERLAY_TABLE, render_overlay_firewall(gwbridge, gw_subnet))

    @_op
    def delete_overlay_firewall(self) -> None:
        self._table(OVERLAY_TABLE, None)

    # ---- WireGuard ------------------------------------------------------------------------------------

    def kill_tunnel(self, ifname: str) -> None:
        """The tunnel's process died (wireguard-go crashed, or was killed)."""
        self.tunnels.pop(ifname, None)

    @_op
    def wireguard(self) -> Implementation:
        return self.wg_impl

    @_op
    def ensure_tunnel(self, spec: TunnelSpec) -> bool:
        check_ifname(spec.ifname, "WireGuard interface name")
        int_in(spec.port, 1, 65535, "WireGuard port")
        int_in(spec.mtu, 576, 65535, "tunnel MTU")
        key_bytes(spec.private_key, "WireGuard private key")
        if f"{ipv4(spec.source, 'tunnel source address')}/32" not in spec.addresses:
            raise InvalidRequest(f"tunnel source {spec.source} is not one of the tunnel's addresses")
        if self.wg_impl.kind == "none":
            raise KernelError(self.wg_impl.problem)
        started = spec.ifname not in self.tunnels
        if self.tunnels.get(spec.ifname) != spec:
            self.changes += 1
        self.tunnels[spec.ifname] = spec
        if started:
            self.tunnel_starts[spec.ifname] += 1
        return started

    @_op
    def delete_tunnel(self, ifname: str) -> None:
        check_ifname(ifname, "WireGuard interface name")
        if self.tunnels.pop(ifname, None) is not None:
            self.changes += 1

    @_op
    def list_tunnels(self, prefix: str) -> list[str]:
        return sorted(n for n in self.tunnels if n.startswith(prefix))

    @_op
    def tunnel_status(self, ifname: str) -> list[PeerStatus]:
        spec = self.tunnels.get(check_ifname(ifname, "WireGuard interface name"))
        if spec is None:
            return []
        return [PeerStatus(p.public_key, p.endpoint, 0.0, 0, 0, (p.allowed_ip,)) for p in sorted(spec.peers)]

    @_op
    def apply_tunnel_firewall(self, ifnames: list[str], vxlan_port: int, vnis: list[int]) -> None:
        self._table(TUNNEL_TABLE, render_tunnel_firewall(list(ifnames), vxlan_port, list(vnis)))

    @_op
    def delete_tunnel_firewall(self) -> None:
        self._table(TUNNEL_TABLE, None)

    @_op
    def send_tunnel_probes(self, addrs: list[str]) -> None:
        # Answered when some tunnel has a peer key with that address and the test has not cut it off.
        routed = {p.allowed_ip.split("/")[0] for t in self.tunnels.values() for p in t.peers}
        self._probed |= {ipv4(a, "tunnel address") for a in addrs} & routed - self.unreachable

    @_op
    def tunnel_probe_replies(self) -> set[str]:
        out, self._probed = self._probed, set()
        return out

    # ---- data-path probes -----------------------------------------------------------------------------

    @_op
    def open_probe(self, local_ip: str, port: int, mtu: int) -> "FakeProbeChannel":
        local_ip = ipv4(local_ip, "local underlay address")
        int_in(port, 1, 65535, "UDP port")
        check_mtu(mtu)
        link = self._ns[HOST].get(PROBE_DEVICE)
        if link is not None and link.kind != "vxlan":
            raise KernelError(f"probe device {PROBE_DEVICE}: the name {PROBE_DEVICE} is taken by a non-VXLAN "
                              "interface")
        if link is None or link.vxlan != (PROBE_VNI, local_ip, port):
            self._add(HOST, FakeLink(PROBE_DEVICE, "vxlan", mtu, up=True, vxlan=(PROBE_VNI, local_ip, port)))
        else:
            self._set(link, "mtu", mtu)
            self._set(link, "up", True)
        return FakeProbeChannel(self.probe_net, local_ip)

    @_op
    def delete_probe(self) -> None:
        link = self._ns[HOST].get(PROBE_DEVICE)
        if link is not None:
            if link.kind != "vxlan":
                raise KernelError(f"delete probe device {PROBE_DEVICE}: that interface is not a vxlan")
            self._del(HOST, PROBE_DEVICE)

    @_op
    def kernel_features(self) -> dict[str, str | None]:
        return dict(self.features)

    # ---- the resolver's sockets in containers -------------------------------------------------------

    @_op
    def open_dns_sockets(self, netns_path: str):
        """Real sockets, on 127.0.0.1 with ports the kernel picks (there is no namespace to listen in):
        a test sends its queries to `dns_addresses[netns_path]`."""
        self._netns(self._path(netns_path), "resolver sockets")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(64)
        udp.setblocking(False)
        tcp.setblocking(False)
        self.dns_addresses[netns_path] = (udp.getsockname(), tcp.getsockname())
        return udp, tcp

    @_op
    def sync_vips(self, netns_path: str, wanted: dict[str, tuple[str, ...]]) -> int:
        netns_path = self._path(netns_path)
        self._netns(netns_path, "service VIPs")
        wanted = vip.check(wanted)
        observed = self.vips.get(netns_path)
        text, cmds, result = vip.plan_sync(observed or {}, wanted, observed is not None)
        if result:
            self.vips[netns_path] = result
        elif observed is not None:
            self.vips[netns_path] = {}
        self.changes += bool(text or cmds)
        return len(text) + len(cmds)

    @_op
    def apply_mesh(self, netns_path, rules, masquerade_out) -> None:
        key = HOST if netns_path is None else self._path(netns_path)
        if netns_path is not None:
            self._netns(key, "routing mesh")
        text = mesh.render(list(rules), netns_path is None, masquerade_out) if rules else None
        if self.mesh.get(key) != text:
            self.changes += 1
        if text is None:
            self.mesh.pop(key, None)
        else:
            self.mesh[key] = text

    async def close(self) -> None:
        self._closed = True
