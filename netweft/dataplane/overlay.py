"""The overlay data plane: VXLAN sandboxes, remote endpoints, the gateway bridge and its firewall.

Per overlay network and host there is one *sandbox* network namespace (as in Docker's overlay driver)
holding a bridge `br0` with the network's gateway address and a VXLAN device `vxlan0` enslaved to it.
Containers get a veth whose one end is a port of br0. The VXLAN device is created in the host namespace
and then moved into the sandbox, so its UDP socket stays in the host namespace where the underlay is.
Learning is off and there is no default destination (no flooding): every remote endpoint is programmed
as a static FDB entry (MAC -> VTEP) plus a permanent neighbour (IP -> MAC) on vxlan0, and `proxy` makes
vxlan0 answer ARP from those neighbours. Those entries are written in bulk by `nlbatch`.

Egress goes through a gateway bridge in the host namespace (Docker's docker_gwbridge): each container
gets a second veth on it with the default route, and traffic leaving it is masqueraded. Its ports are
isolated from each other and nothing is routed from it back into it, so two overlays never meet there.

More than a thousand containers per host (dataplane/bridgechain.py). A Linux bridge takes at most 1,023
ports, and every container takes one on br0 and one on the gateway bridge. So each of the two grows
extension bridges: br0-1, br0-2, ... (nw_gwbridge-1, ...), each joined to the first bridge by a veth pair
and holding 1,022 containers, made when the ones before are full; a container port goes to the lowest
bridge with room. Containers 1..1,000 are on the first bridge as before, with the same per-packet path;
one on an extension crosses one veth and one bridge more each way (bench/bench_bridge_chain.py measures
it). Extensions have no address and no ARP. On the gateway bridge the link's end on the first bridge is
an isolated port, so an extension's containers reach the host but no container on another bridge, and the
overlay firewall neither routes from an extension nor tracks connections while frames are bridged
through one (br_netfilter would masquerade them there). The first bridges' MACs are pinned (a bridge
otherwise takes its lowest port's, and changes it as ports come and go).
Why this layout and not another:
- macvlan/ipvlan ports on vxlan0, or routed veths for egress: no limit, but no port of ours on a bridge
  either, which is where anti-spoofing (antispoof.py) checks what a container sends, and where the
  agent, the fake and the repairs find a container's port. The chain keeps all of that as it is.
- several VXLAN devices (one per bridge): the kernel takes one device per VNI and UDP port per host.
- a VLAN-aware bridge or a tree of equal bridges: the limit is per bridge, and every container would pay
  an extra hop; a chain makes only containers past the first thousand pay it.

`Overlay` is synchronous and blocking; the daemon calls it from one worker thread. Every method is
idempotent: it looks at what exists and changes only what differs, so it can be re-run after a crash.
Kernel refusals raise `KernelError` with one line; malformed arguments raise `InvalidRequest`.

Threading and namespaces (as in kernel.py):
- "Host" is the network namespace of the thread that constructed the Overlay.
- pyroute2's sync IPRoute keeps per-thread state, so an Overlay belongs to the first thread using it.
- Netlink sockets for another namespace are opened by entering it just long enough (no helper process).
  Host and sandbox sockets stay open; container namespaces get a socket per call, closed afterwards
  (an open socket would keep a deleted container namespace, and its veth, alive).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from netweft.dataplane.pyroute2_parts import NetlinkError

IFF_NOARP = 0x80

if TYPE_CHECKING:  # pyroute2's IPRoute is loaded on first use
    from netweft.dataplane.pyroute2_parts import IPRoute

from netweft.dataplane import antispoof, garp, netns, nlveth
from netweft.dataplane.bridgechain import (MAX_EXTENSIONS, Chain, check_first, extension, full_message, is_link,
                                           parse as parse_chain_name)
from netweft.dataplane.api import DEFAULT_VXLAN_PORT, GWBRIDGE, VXLAN_OVERHEAD  # noqa: F401 (re-exported)
from netweft.dataplane.checks import (check_path, check_peers, default_tmp_name, int_in as _int_in, ipv4 as _ipv4,
                                      make_peer, peer_tables)
from netweft.dataplane.garp import Announcer
from netweft.dataplane.firewall import (OVERLAY_TABLE, render_delete_overlay_firewall,  # noqa: F401
                                        render_overlay_firewall)
from netweft.dataplane.nlbatch import NeighBatch, open_route_socket
from netweft.dataplane.probe import PROBE_DEVICE, PROBE_VNI, RealProbeChannel
from netweft.dataplane.nlutil import (HostHandles, check_ifname, close_iproute, delete_link,
                                      ensure_container_end, ensure_ipv4, ensure_mtu, ensure_up, ensure_veth,
                                      failing, get_link, ignore, link_kind, netns_iproute, netnsid,
                                      new_nft, nft_run, open_iproute, parse_interface, parse_mac,
                                      retry_eexist)
from netweft.errors import KernelError, PoolExhausted
from netweft.model.objects import Peer as ModelPeer

SANDBOX_BRIDGE = "br0"
SANDBOX_VXLAN = "vxlan0"
DEFAULT_PORT = DEFAULT_VXLAN_PORT


def Peer(ip: str, mac: str, vtep: str) -> ModelPeer:  # noqa: N802 (reads like the constructor it was)
    """A remote endpoint as a canonical netweft.model.objects.Peer (InvalidRequest if malformed).
    Kept for callers written before the model existed; new code uses the model's Peer."""
    return make_peer(ip, mac, vtep)


class _Sandbox:
    """Open handles on one sandbox namespace."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)  # which namespace; notices one replaced under the same path
        self.nft = None                      # its libnftables context, made inside it on first use
        self.guarded = antispoof.Guarded()   # its anti-spoofing ports, as that context knows them
        self.bridges: _Bridges | None = None  # br0 and its extensions, learned on first use
        self.ipr = open_iproute(fd)
        try:
            with netns.entered(fd):
                self.garp = Announcer.open()
                try:
                    sock = open_route_socket()
                except BaseException:
                    self.garp.close()
                    raise
            self.nl = NeighBatch(sock)
        except BaseException:
            close_iproute(self.ipr)
            raise

    def close(self) -> None:
        close_iproute(self.ipr)
        with contextlib.suppress(OSError):
            self.nl.close()
        self.garp.close()
        self.nft = None   # its socket would keep a deleted namespace alive
        os.close(self.fd)


class _Bridges:
    """A chain of bridges (dataplane/bridgechain.py) in one namespace, as this process last saw it."""

    def __init__(self, first: str, in_sandbox: bool):
        self.chain = Chain(first)
        self.indexes: dict[int, int] = {}   # bridge number -> its ifindex
        self.in_sandbox = in_sandbox        # a sandbox: every veth is ours, no port is isolated
        self.mtu: int | None = None         # the MTU its extensions were last made or checked with

    def number(self, master: int | None) -> int | None:
        for number, index in self.indexes.items():
            if index == master:
                return number
        return None


# ---- the data plane -----------------------------------------------------------------------------

class Overlay(HostHandles):
    """The overlay data plane of one host (the namespace of the constructing thread); see module doc."""

    def __init__(self) -> None:
        super().__init__()
        self._sandboxes: dict[str, _Sandbox] = {}
        self._gw_guarded = antispoof.Guarded()   # the gateway bridge's anti-spoofing ports (host namespace)
        self._gw_bridges: dict[str, _Bridges] = {}   # gateway bridge name -> its chain

    def close(self) -> None:
        """Release all handles. Call from the thread that used the Overlay. Idempotent."""
        for sb in self._sandboxes.values():
            sb.close()
        self._sandboxes.clear()
        super().close()

    def _sandbox(self, path: str) -> _Sandbox:
        """Open (or reuse) handles on the sandbox at `path`."""
        self._claim_thread()
        sb = self._sandboxes.get(path)
        if sb is not None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == sb.ident:
                    return sb
            except OSError:
                pass
            self._forget(path)  # the namespace there was deleted or replaced
        if not netns.is_netns(path):
            raise KernelError(f"no overlay sandbox at {path} (ensure_sandbox first)")
        fd = netns.open_netns(path)
        try:
            with failing(f"open netlink sockets in sandbox {path}"):
                sb = _Sandbox(path, fd)
        except BaseException:
            os.close(fd)
            raise
        self._sandboxes[path] = sb
        return sb

    def _forget(self, path: str) -> None:
        sb = self._sandboxes.pop(path, None)
        if sb is not None:
            sb.close()

    def _vxlan_index(self, sb: _Sandbox) -> int:
        with failing(f"sandbox {sb.path}"):
            link = get_link(sb.ipr, SANDBOX_VXLAN)
        if link is None or link_kind(link) != "vxlan":
            raise KernelError(f"sandbox {sb.path} has no VXLAN device {SANDBOX_VXLAN} (ensure_sandbox first)")
        return link["index"]

    # ---- MTU ------------------------------------------------------------------------------------

    def underlay_mtu(self, local_ip: str) -> int:
        """MTU of the host interface that holds `local_ip`."""
        local_ip = _ipv4(local_ip, "local underlay address")
        ipr = self._host
        with failing(f"find the interface holding {local_ip}"):
            for a in ipr.addr("dump", family=socket.AF_INET):
                if (a.get("local") or a.get("address")) == local_ip:
                    return ipr.link("get", index=a["index"])[0].get("mtu")
        raise KernelError(f"no interface in the host namespace has address {local_ip}")

    def default_mtu(self, local_ip: str) -> int:
        """Overlay MTU that fits the underlay: its MTU minus the VXLAN encapsulation."""
        return self.underlay_mtu(local_ip) - VXLAN_OVERHEAD

    # ---- sandboxes ------------------------------------------------------------------------------

    def ensure_sandbox(self, path: str, vni: int, gateway_cidr: str, mtu: int, local_ip: str,
                       port: int = DEFAULT_PORT, tmp_name: str | None = None) -> bool:
        """The sandbox namespace at `path` with br0 (holding `gateway_cidr`) and vxlan0 (VNI `vni`,
        source `local_ip`, UDP `port`, socket in the host namespace), all with `mtu`, all up.

        Repairs whatever is partly there or was deleted by hand: the namespace, br0 (its endpoint veths
        are put back on it), vxlan0 (recreated if missing or with other settings). Returns True if
        vxlan0 was (re)created: the peers live on it, so they must be programmed (again).
        `tmp_name` is vxlan0's name in the host namespace before the move (default from the VNI).
        """
        check_path(path, "sandbox path")
        _int_in(vni, 1, 2**24 - 1, "VNI")
        _int_in(mtu, 68, 65535, "MTU")
        _int_in(port, 1, 65535, "VXLAN port")
        gateway = parse_interface(gateway_cidr)
        # "": no fixed source, the route's (encrypted overlays: the tunnel route's source switches with the key).
        local_ip = _ipv4(local_ip, "local underlay address") if local_ip else None
        tmp_name = check_ifname(tmp_name or default_tmp_name(vni), "temporary VXLAN name")
        self._claim_thread()

        with failing(f"sandbox {path}"):
            netns.create_netns(path)
        sb = self._sandbox(path)
        ipr = sb.ipr
        with failing(f"sandbox {path}: bridge {SANDBOX_BRIDGE}"):
            had_bridge = link_kind(get_link(ipr, SANDBOX_BRIDGE)) == "bridge"
            br = self._ensure_bridge(ipr, SANDBOX_BRIDGE, gateway, mtu, ours=True)
        with failing(f"sandbox {path}: VXLAN device (VNI {vni}, port {port})"):
            vx = get_link(ipr, SANDBOX_VXLAN)
            created = vx is None or not self._vxlan_matches(sb, vx, vni, local_ip, port)
            if created:
                self._create_vxlan(sb, vx, vni, local_ip, port, mtu, tmp_name)
                vx = get_link(ipr, SANDBOX_VXLAN)
            ensure_mtu(ipr, vx, mtu)
            if vx.get("master") != br:
                ipr.link("set", index=vx["index"], master=br)
            ensure_up(ipr, vx)
        with failing(f"sandbox {path}: extension bridges and endpoint ports"):
            # A br0 deleted by hand took its ports along: they are put back (first fit). Only then, or on
            # first use: a look at every port would make each attach cost more with each endpoint.
            if sb.bridges is None:
                sb.bridges = _Bridges(SANDBOX_BRIDGE, in_sandbox=True)
                had_bridge = False
            self._ensure_chain(ipr, sb.nl, sb.bridges, br, mtu, ours=True, force=not had_bridge)
        with failing(f"sandbox {path}: bring up lo"):
            ensure_up(ipr, get_link(ipr, "lo"))
        self._no_bridge_netfilter(sb)
        return created

    @staticmethod
    def _no_bridge_netfilter(sb: _Sandbox) -> None:
        """Where br_netfilter is loaded, every frame bridged in a namespace goes through that namespace's
        IP hooks. A sandbox filters nothing, so it opts out: measured ~5-10 % more overlay throughput."""
        with netns.entered(sb.fd):  # /proc/sys/net follows the calling thread's namespace
            for knob in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
                try:
                    with open(f"/proc/sys/net/bridge/{knob}", "r+") as f:
                        if f.read().strip() != "0":
                            f.seek(0)
                            f.write("0")
                except FileNotFoundError:
                    return  # no br_netfilter: nothing to opt out of

    def _vxlan_matches(self, sb: _Sandbox, vx, vni: int, local_ip: str, port: int) -> bool:
        if link_kind(vx) != "vxlan":
            return False

        def data(key: str):
            return vx.get(("linkinfo", "data", key))

        # link_netnsid is where the device's UDP socket lives; it must be the host namespace.
        host_nsid = netnsid(sb.ipr, self._host_fd)
        return (data("vxlan_id") == vni and data("vxlan_port") == port and data("vxlan_local") == local_ip
                and data("vxlan_learning") == 0 and data("vxlan_proxy") == 1
                and data("vxlan_group") is None   # no default destination: no flooding
                and host_nsid is not None and vx.get("link_netnsid") == host_nsid)

    def _create_vxlan(self, sb: _Sandbox, old, vni: int, local_ip: str, port: int, mtu: int,
                      tmp_name: str) -> None:
        host = self._host
        if old is not None:
            with ignore(errno.ENODEV):
                sb.ipr.link("del", index=old["index"])
        self._delete_tmp_vxlan(tmp_name)  # left by a crash between create and move
        # Created here, in the host namespace, so the UDP socket it opens when up stays here.
        local = {"vxlan_local": local_ip} if local_ip else {}
        retry_eexist(lambda: host.link("add", ifname=tmp_name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
                                       vxlan_learning=0, vxlan_proxy=1, mtu=mtu, **local))
        tmp = get_link(host, tmp_name)
        try:
            # Move and rename in one step.
            host.link("set", index=tmp["index"], net_ns_fd=sb.fd, ifname=SANDBOX_VXLAN)
        except BaseException:
            with contextlib.suppress(NetlinkError):
                host.link("del", index=tmp["index"])
            raise

    def _delete_tmp_vxlan(self, tmp_name: str) -> None:
        host = self._host
        stale = get_link(host, tmp_name)
        if stale is None:
            return
        if link_kind(stale) != "vxlan":
            raise KernelError(f"temporary VXLAN name {tmp_name} is taken by a non-VXLAN interface in the "
                              f"host namespace")
        with ignore(errno.ENODEV):
            host.link("del", index=stale["index"])

    @staticmethod
    def _ensure_bridge(ipr: IPRoute, name: str, gateway: ipaddress.IPv4Interface | None, mtu: int,
                       ours: bool) -> int:
        """Bridge `name` with `gateway` as its only address, `mtu`, up; returns its index.

        `ours`: an interface of that name that is not a bridge may be replaced (inside a sandbox
        everything is ours; in the host namespace it is not).
        """
        link = get_link(ipr, name)
        if link is not None and link_kind(link) != "bridge":
            if not ours:
                raise KernelError(f"an interface named {name} exists and is not a bridge")
            ipr.link("del", index=link["index"])
            link = None
        # A bridge with a MAC of its own choosing takes its lowest port's, and changes it when ports come
        # and go (an extension's link, a container): every container's ARP entry for the gateway goes stale.
        # A MAC set by hand stays; this one is the gateway's (as Docker derives a container's), so a bridge
        # remade keeps it too.
        mac = "02:42:" + ":".join(f"{b:02x}" for b in gateway.ip.packed) if gateway is not None else None
        if link is None:
            # No MTU here: only an MTU set afterwards sticks; one given at creation is not "set by the
            # user" for the kernel, and the bridge falls back to 1500 when its last port leaves.
            ipr.link("add", ifname=name, kind="bridge", **({"address": mac} if mac else {}))
            link = get_link(ipr, name)
        if mac is not None and (link.get("address") or "").lower() != mac:
            ipr.link("set", index=link["index"], address=mac)
        ensure_mtu(ipr, link, mtu)  # set explicitly, so the bridge does not follow its ports
        ensure_ipv4(ipr, link["index"], gateway)
        ensure_up(ipr, link)
        return link["index"]

    def delete_sandbox(self, path: str, tmp_name: str | None = None) -> None:
        """Remove the sandbox at `path` with everything in it (its endpoints' veths included).

        The devices are deleted one by one before the namespace goes, so the VXLAN device and its UDP
        socket in the host namespace are gone when this returns (a namespace is destroyed
        asynchronously). Idempotent.
        """
        check_path(path, "sandbox path")
        if tmp_name is not None:
            check_ifname(tmp_name, "temporary VXLAN name")
        self._claim_thread()
        if netns.is_netns(path):
            sb = self._sandbox(path)
            with failing(f"delete sandbox {path}"):
                vx = get_link(sb.ipr, SANDBOX_VXLAN)
                if vx is not None and link_kind(vx) == "vxlan" and tmp_name is None:
                    tmp_name = default_tmp_name(vx.get(("linkinfo", "data", "vxlan_id")))
                # vxlan0 first (frees the host UDP socket), then veths (their container ends go too).
                links = sorted(sb.ipr.get_links(), key=lambda link: link.get("ifname") != SANDBOX_VXLAN)
                for link in links:
                    if link.get("ifname") != "lo":
                        with ignore(errno.ENODEV):
                            sb.ipr.link("del", index=link["index"])
        self._forget(path)
        with failing(f"delete sandbox {path}"):
            netns.delete_netns(path)
        if tmp_name is not None:
            with failing(f"delete sandbox {path}: leftover {tmp_name}"):
                self._delete_tmp_vxlan(tmp_name)

    # ---- endpoints ------------------------------------------------------------------------------

    def ensure_endpoint(self, sandbox_path: str, ctr_netns_path: str, host_ifname: str, ifname: str,
                        address_cidr: str, mac: str, mtu: int) -> None:
        """Attach a container to the overlay: a veth with `host_ifname` in the sandbox (port of br0, up)
        and `ifname` in the container (`address_cidr`, `mac`, `mtu`, up). No default route."""
        args = self._endpoint_args(host_ifname, ifname, address_cidr, mac, mtu)
        sb = self._sandbox(sandbox_path)
        what = f"overlay endpoint {host_ifname} in {sandbox_path}"
        with failing(what):
            br = get_link(sb.ipr, SANDBOX_BRIDGE)
        if br is None:
            raise KernelError(f"{what}: sandbox has no {SANDBOX_BRIDGE} (ensure_sandbox first)")
        if sb.bridges is None:
            sb.bridges = _Bridges(SANDBOX_BRIDGE, in_sandbox=True)
            with failing(what):
                self._ensure_chain(sb.ipr, sb.nl, sb.bridges, br["index"], args[4], ours=True, force=True)
        self._ensure_veth(sb.ipr, sb.nl, ctr_netns_path, *args, bridges=sb.bridges, first=br["index"], isolated=False,
                          gateway=None, what=what)
        antispoof.add_port(self._sandbox_nft(sb), sb.guarded, args[0], args[3], str(args[2].ip))
        _announce(sb, [(str(args[2].ip), args[3])])

    def delete_endpoint(self, sandbox_path: str, host_ifname: str) -> None:
        """Delete the endpoint veth `host_ifname` of the sandbox (its container end goes with it).
        Idempotent, also when the sandbox is gone."""
        check_ifname(host_ifname, "host interface name")
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return
        sb = self._sandbox(sandbox_path)
        with failing(f"delete overlay endpoint {host_ifname} in {sandbox_path}"):
            delete_link(sb.ipr, host_ifname, "veth")
        if sb.bridges is not None:
            sb.bridges.chain.removed(host_ifname)
        antispoof.delete_port(self._sandbox_nft(sb), sb.guarded, host_ifname)

    def delete_endpoints(self, sandbox_path: str, host_ifnames: list[str]) -> None:
        """delete_endpoint for many at once (`rm -f` of many): one group delete, one nftables transaction."""
        for name in host_ifnames:
            check_ifname(name, "host interface name")
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return
        sb = self._sandbox(sandbox_path)
        with failing(f"delete {len(host_ifnames)} overlay endpoints in {sandbox_path}"):
            _delete_veths(sb.nl, host_ifnames)
        if sb.bridges is not None:
            for name in host_ifnames:
                sb.bridges.chain.removed(name)
        antispoof.delete_ports(self._sandbox_nft(sb), sb.guarded, host_ifnames)

    @staticmethod
    def _sandbox_nft(sb: _Sandbox):
        """run(cmd, what) with the sandbox's own libnftables context (a context is bound to one namespace)."""
        def run(cmd: dict, what: str):
            with netns.entered(sb.fd):
                if sb.nft is None:
                    sb.nft = new_nft(what)
                return nft_run(sb.nft, cmd, what)
        return run

    def list_antispoof(self, sandbox_path: str | None = None) -> list[str]:
        if sandbox_path is None:
            return antispoof.list_ports(self._nft_cmd)
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return []
        return antispoof.list_ports(self._sandbox_nft(self._sandbox(sandbox_path)))

    def list_endpoints(self, sandbox_path: str) -> list[str]:
        """Names of the endpoint veths in the sandbox (their sandbox ends), sorted; none without a sandbox."""
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return []
        sb = self._sandbox(sandbox_path)
        with failing(f"list endpoints of sandbox {sandbox_path}"):
            veths = [v for v in sb.nl.links(kind="veth") if not is_link(SANDBOX_BRIDGE, v[1])]
        br = sb.bridges
        if br is not None:   # the resync's dump also corrects the chain's counts (ports gone with their owner)
            br.chain.learn({name: n for _, name, _, master in veths
                            if (n := br.number(master)) is not None}, br.chain.extensions)
        return sorted(name for _, name, _, _ in veths)

    @staticmethod
    def _endpoint_args(host_ifname: str, ifname: str, address_cidr: str, mac: str, mtu: int) -> tuple:
        return (check_ifname(host_ifname, "host interface name"), check_ifname(ifname),
                parse_interface(address_cidr), parse_mac(mac), _int_in(mtu, 68, 65535, "MTU"))

    def _ensure_veth(self, ipr: IPRoute, nl: NeighBatch, ctr_path: str, host_ifname: str, ifname: str,
                     address: ipaddress.IPv4Interface, mac: str, mtu: int, *, bridges: _Bridges, first: int,
                     isolated: bool, gateway: ipaddress.IPv4Address | None, what: str) -> None:
        """A veth between namespace `ipr` (end `host_ifname`, a port of the chain `bridges`, whose first
        bridge is `first`) and the container (end `ifname`); recreated unless both ends are one pair, then
        every setting checked."""
        bridges.indexes[0] = first
        if self._fresh_veth(nl, ctr_path, host_ifname, ifname, address, mac, mtu, bridges, isolated, gateway, what):
            return
        with failing(what), netns_iproute(ctr_path) as (ctr_fd, cipr):
            host, peer = ensure_veth(ipr, cipr, ctr_fd, host_ifname, ifname, mac, mtu, replace_peer=False)
            # Our end.
            ensure_mtu(ipr, host, mtu)
            on = bridges.number(host.get("master"))
            if on is not None:
                bridges.chain.placed(host_ifname, on)
            else:
                self._attach_port(ipr, bridges, host["index"], host_ifname, mtu)
                host = ipr.link("get", index=host["index"])[0]
            want = {"isolated": int(isolated), "mode": 0}  # mode is hairpin: never
            if any(host.get(("linkinfo", "slave_data", k)) != v for k, v in want.items()):
                ipr.link("set", index=host["index"], kind="bridge_slave", **want)
            ensure_up(ipr, host)
            ensure_container_end(cipr, peer, address, mac, mtu, gateway)

    def _fresh_veth(self, nl: NeighBatch, ctr_path: str, host_ifname: str, ifname: str,
                    address: ipaddress.IPv4Interface, mac: str, mtu: int, bridges: _Bridges, isolated: bool,
                    gateway: ipaddress.IPv4Address | None, what: str) -> bool:
        """The fast path (nlveth.py): a fresh container's endpoint made in a few messages, on the chain's
        bridge with room if that bridge exists. False: nothing decided, take the general path."""
        try:
            number = bridges.chain.choose()
        except PoolExhausted:
            return False
        master = bridges.indexes.get(number) if number == 0 or number in bridges.chain.extensions else None
        if master is None:
            return False
        with failing(what):
            ctr_fd = netns.open_netns(ctr_path)
        try:
            made = nlveth.create_fresh(nl.sock, ctr_fd, host_ifname, ifname, mac, mtu, master=master,
                                       isolated=isolated, address=address, gateway=gateway)
        finally:
            os.close(ctr_fd)
        if made:
            bridges.chain.placed(host_ifname, number)
        return made

    # ---- bridge chains: past the kernel's 1,023 ports per bridge (dataplane/bridgechain.py) -------------

    def _attach_port(self, ipr: IPRoute, bridges: _Bridges, index: int, name: str, mtu: int) -> None:
        """Make link `index` a port of the chain: of the lowest bridge with room (a new extension if none)."""
        chain = bridges.chain
        for _ in range(MAX_EXTENSIONS + 2):
            number = chain.choose()
            if number == 0:
                master = bridges.indexes[0]
            else:
                check_first(chain.first)
                master = bridges.indexes.get(number) if number in chain.extensions else None
                if master is None:
                    master = self._ensure_extension(ipr, bridges, number, mtu)[0]
            try:
                ipr.link("set", index=index, master=master)
            except NetlinkError as e:
                if e.code != errno.EXFULL:
                    raise
                chain.full(number)   # ports this process does not know of: take the next bridge
                continue
            chain.placed(name, number)
            return
        raise PoolExhausted(full_message(chain.first, len(chain.where)))

    def _ensure_chain(self, ipr: IPRoute, nl: NeighBatch, bridges: _Bridges, first: int, mtu: int, *,
                      ours: bool, force: bool) -> None:
        """The chain's extensions there, each joined to the first bridge (index `first`), with `mtu`.

        `force` (first use, or the first bridge was remade): learn the chain from the kernel, and in a
        sandbox put every endpoint veth that is on no bridge back on one. Otherwise a few lookups by name
        check that each known extension and its link are in place (nothing at all without extensions),
        and only a missing part leads to the same repair."""
        bridges.indexes[0] = first
        if not force and bridges.mtu == mtu and self._chain_intact(nl, bridges, first):
            return
        loose = self._learn_chain(nl, bridges, first)
        remade = False
        for number in sorted(bridges.chain.extensions):
            remade |= self._ensure_extension(ipr, bridges, number, mtu, ours)[1]
        if remade:   # an extension deleted by hand released its ports
            loose = self._learn_chain(nl, bridges, first)
        for index, name in loose:
            self._attach_port(ipr, bridges, index, name, mtu)
        bridges.mtu = mtu

    @staticmethod
    def _chain_intact(nl: NeighBatch, bridges: _Bridges, first: int) -> bool:
        for number in sorted(bridges.chain.extensions):
            ext = extension(bridges.chain.first, number)
            bridge, trunk, branch = nl.link(ext.bridge), nl.link(ext.trunk), nl.link(ext.branch)
            if bridge is None or bridge[2] != "bridge" or trunk is None or trunk[3] != first \
                    or branch is None or branch[3] != bridge[0]:
                return False
            bridges.indexes[number] = bridge[0]
        return True

    @staticmethod
    def _learn_chain(nl: NeighBatch, bridges: _Bridges, first: int) -> list[tuple[int, str]]:
        """Read the chain from the kernel: its bridges, its extensions (a bridge or a link end left of one),
        which bridge each container port is on. Returns the sandbox's endpoint veths on no bridge of it."""
        name0 = bridges.chain.first
        numbers, extensions = {first: 0}, set()
        for index, name, _, _ in nl.links(kind="bridge"):
            found = parse_chain_name(name0, name)
            if found is not None and not found[1]:
                numbers[index] = found[0]
                extensions.add(found[0])
        bridges.indexes = {number: index for index, number in numbers.items()}
        if bridges.in_sandbox:
            links = nl.links(kind="veth")   # every veth in a sandbox is an endpoint or a link of the chain
        else:
            links = [link for index in numbers for link in nl.links(master=index)]
        ports, loose = {}, []
        for index, name, kind, master in links:
            found = parse_chain_name(name0, name)
            if found is not None and found[1]:
                extensions.add(found[0])
            elif kind == "veth" and master in numbers:
                ports[name] = numbers[master]
            elif bridges.in_sandbox:
                loose.append((index, name))
        bridges.chain.learn(ports, extensions)
        return loose

    def _ensure_extension(self, ipr: IPRoute, bridges: _Bridges, number: int, mtu: int,
                          ours: bool = True) -> tuple[int, bool]:
        """Extension `number`: its bridge (no address, `mtu`, up) and the veth joining it to the first bridge.
        Returns (its index, whether its bridge was made afresh). On the gateway bridge the link's end on
        the first bridge is isolated like a container port, so the extension's containers reach the host but
        no container on another bridge of the chain; the other end is not, so they reach it."""
        ext = extension(bridges.chain.first, number)
        made = link_kind(get_link(ipr, ext.bridge)) != "bridge"
        index = self._ensure_bridge(ipr, ext.bridge, None, mtu, ours=ours)
        bridges.indexes[number] = index
        # No ARP on it: Linux answers ARP for any of its addresses on any interface, so a container would
        # get the extension's MAC for the gateway and its packets would be routed from there.
        if not ipr.link("get", index=index)[0]["flags"] & IFF_NOARP:
            ipr.link("set", index=index, arp=False)
        trunk, branch = get_link(ipr, ext.trunk), get_link(ipr, ext.branch)
        if not (link_kind(trunk) == link_kind(branch) == "veth" and trunk.get("link") == branch["index"]
                and branch.get("link") == trunk["index"]):
            for link in (trunk, branch):
                if link is None:
                    continue
                if link_kind(link) != "veth" and not ours:
                    raise KernelError(f"an interface named {link.get_attr('IFLA_IFNAME')} exists and is not a veth")
                with ignore(errno.ENODEV):
                    ipr.link("del", index=link["index"])
            retry_eexist(lambda: ipr.link("add", ifname=ext.trunk, kind="veth", mtu=mtu,
                                          peer={"ifname": ext.branch, "mtu": mtu}))
        for name, master, isolated in ((ext.trunk, bridges.indexes[0], not bridges.in_sandbox),
                                       (ext.branch, index, False)):
            link = get_link(ipr, name)
            ensure_mtu(ipr, link, mtu)
            if link.get("master") != master:
                ipr.link("set", index=link["index"], master=master)
                link = get_link(ipr, name)
            if link.get(("linkinfo", "slave_data", "isolated")) != int(isolated):
                ipr.link("set", index=link["index"], kind="bridge_slave", isolated=int(isolated))
            ensure_up(ipr, link)
        bridges.chain.extensions.add(number)
        bridges.chain.counts.setdefault(number, 0)
        return index, made

    # ---- remote endpoints -----------------------------------------------------------------------

    def add_peers(self, sandbox_path: str, peers: Iterable[ModelPeer]) -> None:
        """Program remote endpoints: FDB MAC -> VTEP, then neighbour IP -> MAC (replacing existing)."""
        peers = check_peers(peers)
        sb = self._sandbox(sandbox_path)
        vx = self._vxlan_index(sb)
        with failing(f"sandbox {sandbox_path}"):
            # FDB first, so an ARP answer (from the neighbour) never points at a MAC with nowhere to go.
            sb.nl.add_fdb(vx, [(p.mac, p.vtep) for p in peers])
            sb.nl.add_neighbours(vx, [(p.ip, p.mac) for p in peers])
        _announce(sb, [(p.ip, p.mac) for p in peers])

    def remove_peers(self, sandbox_path: str, peers: Iterable[ModelPeer]) -> None:
        """Remove remote endpoints (neighbour by IP, FDB entry by MAC and VTEP). Absent ones are fine."""
        peers = check_peers(peers)
        vx = self._vxlan_if_any(sandbox_path)
        if vx is None:
            return  # no sandbox or no VXLAN device: no peers
        sb, vx = vx
        with failing(f"sandbox {sandbox_path}"):
            sb.nl.delete_neighbours(vx, [p.ip for p in peers])
            sb.nl.delete_fdb(vx, [(p.mac, p.vtep) for p in peers])

    def list_peers(self, sandbox_path: str) -> set[ModelPeer]:
        """Remote endpoints as the kernel has them: permanent neighbours on vxlan0 joined with its FDB
        entries by MAC. None without a sandbox or its VXLAN device."""
        vx = self._vxlan_if_any(sandbox_path)
        if vx is None:
            return set()
        sb, vx = vx
        with failing(f"sandbox {sandbox_path}"):
            neighbours = sb.nl.neighbours(vx)
            fdb = sb.nl.fdb(vx)
        vteps = defaultdict(list)
        for mac, vtep in fdb:
            vteps[mac].append(vtep)
        # The kernel reports canonical forms: equal to the (canonicalised) peers programmed.
        return {ModelPeer(ip, mac, vtep) for ip, mac in neighbours.items() for vtep in vteps.get(mac, ())}

    def sync_peers(self, sandbox_path: str, wanted: Iterable[ModelPeer]) -> int:
        """Make the remote endpoints exactly `wanted`, changing only what differs. Neighbour and FDB
        tables are compared separately, so half-programmed peers (e.g. after a crash) are repaired too.
        Returns the number of kernel entries changed."""
        want_neigh, want_fdb = peer_tables(check_peers(wanted))
        sb = self._sandbox(sandbox_path)
        vx = self._vxlan_index(sb)
        with failing(f"sandbox {sandbox_path}"):
            neighbours = sb.nl.neighbours(vx)
            fdb = sb.nl.fdb(vx)
            stale_neigh = [ip for ip in neighbours if ip not in want_neigh]
            stale_fdb = [(mac, vtep) for mac, vtep in fdb if want_fdb.get(mac) != vtep]
            new_fdb = [(mac, vtep) for mac, vtep in want_fdb.items() if (mac, vtep) not in fdb]
            new_neigh = [(ip, mac) for ip, mac in want_neigh.items() if neighbours.get(ip) != mac]
            # Stop answering ARP for gone peers first; add FDB before neighbours (see add_peers).
            sb.nl.delete_neighbours(vx, stale_neigh)
            sb.nl.delete_fdb(vx, stale_fdb)
            sb.nl.add_fdb(vx, new_fdb)
            sb.nl.add_neighbours(vx, new_neigh)
        _announce(sb, new_neigh)
        return len(stale_neigh) + len(stale_fdb) + len(new_fdb) + len(new_neigh)

    def _vxlan_if_any(self, sandbox_path: str) -> tuple[_Sandbox, int] | None:
        """The sandbox and its vxlan0's index, or None if either is missing."""
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return None
        sb = self._sandbox(sandbox_path)
        with failing(f"sandbox {sandbox_path}"):
            vx = get_link(sb.ipr, SANDBOX_VXLAN)
        if vx is None or link_kind(vx) != "vxlan":
            return None
        return sb, vx["index"]

    # ---- gateway bridge -------------------------------------------------------------------------

    def ensure_gwbridge(self, name: str, gateway_cidr: str, mtu: int) -> None:
        """The host's gateway bridge `name` with `gateway_cidr`, `mtu`, up; IPv4 forwarding on in the host
        namespace (egress is routed)."""
        check_ifname(name, "gateway bridge name")
        gateway = parse_interface(gateway_cidr)
        _int_in(mtu, 68, 65535, "MTU")
        with failing(f"gateway bridge {name}"):
            had = link_kind(get_link(self._host, name)) == "bridge"
            first = self._ensure_bridge(self._host, name, gateway, mtu, ours=False)
            bridges = self._gw_bridges.get(name)
            if bridges is None:
                bridges = self._gw_bridges[name] = _Bridges(name, in_sandbox=False)
                had = False
            self._ensure_chain(self._host, self._host_nl, bridges, first, mtu, ours=False, force=not had)
            self._set_ip_forward(True)

    def delete_gwbridge(self, name: str) -> None:
        """Delete the gateway bridge and its extensions (its ports stay, detached). Idempotent."""
        check_ifname(name, "gateway bridge name")
        with failing(f"delete gateway bridge {name}"):
            delete_link(self._host, name, "bridge")
            nl = self._host_nl
            for index, link, kind, _ in nl.links(kind="bridge") + nl.links(kind="veth"):
                if parse_chain_name(name, link) is not None:
                    with ignore(errno.ENODEV):
                        self._host.link("del", index=index)
        self._gw_bridges.pop(name, None)

    def ensure_gw_endpoint(self, ctr_netns_path: str, bridge: str, host_ifname: str, ifname: str,
                           address_cidr: str, mac: str, mtu: int, gateway_ip: str) -> None:
        """Attach a container to the gateway bridge: veth `host_ifname` (isolated port of `bridge`, no
        hairpin) to `ifname` in the container with `address_cidr`, `mac`, `mtu` and the default route
        via `gateway_ip`."""
        args = self._endpoint_args(host_ifname, ifname, address_cidr, mac, mtu)
        check_ifname(bridge, "gateway bridge name")
        gateway = ipaddress.IPv4Address(_ipv4(gateway_ip, "gateway address"))
        what = f"gateway endpoint {host_ifname}"
        ipr = self._host
        with failing(what):
            br = get_link(ipr, bridge)
        if br is None or link_kind(br) != "bridge":
            raise KernelError(f"{what}: no gateway bridge {bridge} (ensure_gwbridge first)")
        bridges = self._gw_bridges.get(bridge)
        if bridges is None:
            bridges = self._gw_bridges[bridge] = _Bridges(bridge, in_sandbox=False)
            with failing(what):
                self._ensure_chain(ipr, self._host_nl, bridges, br["index"], args[4], ours=False, force=True)
        self._ensure_veth(ipr, self._host_nl, ctr_netns_path, *args, bridges=bridges, first=br["index"], isolated=True,
                          gateway=gateway, what=what)
        antispoof.add_port(self._nft_cmd, self._gw_guarded, args[0], args[3], str(args[2].ip))

    def delete_gw_endpoint(self, host_ifname: str) -> None:
        """Delete the gateway-bridge veth `host_ifname` (its container end goes with it). Idempotent."""
        check_ifname(host_ifname, "host interface name")
        with failing(f"delete gateway endpoint {host_ifname}"):
            delete_link(self._host, host_ifname, "veth")
        for bridges in self._gw_bridges.values():
            bridges.chain.removed(host_ifname)
        antispoof.delete_port(self._nft_cmd, self._gw_guarded, host_ifname)

    def delete_gw_endpoints(self, host_ifnames: list[str]) -> None:
        """delete_gw_endpoint for many at once: one group delete, one nftables transaction."""
        for name in host_ifnames:
            check_ifname(name, "host interface name")
        self._claim_thread()
        with failing(f"delete {len(host_ifnames)} gateway endpoints"):
            _delete_veths(self._host_nl, host_ifnames)
        for bridges in self._gw_bridges.values():
            for name in host_ifnames:
                bridges.chain.removed(name)
        antispoof.delete_ports(self._nft_cmd, self._gw_guarded, host_ifnames)

    # ---- data-path probes (dataplane/probe.py) ----------------------------------------------------

    def open_probe(self, local_ip: str, port: int, mtu: int):
        """The probe device (VXLAN, PROBE_VNI, learning off, no address, up) in the host namespace, made or
        repaired, and its two sockets opened there."""
        local_ip = _ipv4(local_ip, "local underlay address")
        _int_in(port, 1, 65535, "UDP port")
        _int_in(mtu, 68, 65535, "MTU")
        host = self._host
        with failing(f"probe device {PROBE_DEVICE}"):
            link = get_link(host, PROBE_DEVICE)

            def data(key: str):
                return link.get(("linkinfo", "data", key))
            if link is not None and not (link_kind(link) == "vxlan" and data("vxlan_id") == PROBE_VNI
                                         and data("vxlan_port") == port and data("vxlan_local") == local_ip
                                         and data("vxlan_learning") == 0 and data("vxlan_group") is None):
                if link_kind(link) != "vxlan":
                    raise KernelError(f"the name {PROBE_DEVICE} is taken by a non-VXLAN interface")
                with ignore(errno.ENODEV):
                    host.link("del", index=link["index"])
                link = None
            if link is None:
                retry_eexist(lambda: host.link("add", ifname=PROBE_DEVICE, kind="vxlan", vxlan_id=PROBE_VNI,
                                               vxlan_local=local_ip, vxlan_port=port, vxlan_learning=0, mtu=mtu))
                link = get_link(host, PROBE_DEVICE)
            ensure_mtu(host, link, mtu)
            ensure_up(host, get_link(host, PROBE_DEVICE))
        with self._in_host():
            try:
                return RealProbeChannel.open(PROBE_DEVICE, local_ip, port, PROBE_VNI)
            except OSError as e:
                raise KernelError(f"probe sockets on {PROBE_DEVICE}: {e.strerror or e}") from None

    def delete_probe(self) -> None:
        with failing(f"delete probe device {PROBE_DEVICE}"):
            delete_link(self._host, PROBE_DEVICE, "vxlan")

    # ---- firewall -------------------------------------------------------------------------------

    def apply_overlay_firewall(self, gwbridge: str, gw_subnet: str) -> None:
        """Atomically replace nftables table `inet netweft-ov` (see render_overlay_firewall)."""
        self._nft_cmd(render_overlay_firewall(gwbridge, gw_subnet), f"nftables table {OVERLAY_TABLE}")

    def delete_overlay_firewall(self) -> None:
        """Delete nftables table `inet netweft-ov`. Idempotent."""
        self._nft_cmd(render_delete_overlay_firewall(), f"delete nftables table {OVERLAY_TABLE}")


def _delete_veths(nl: NeighBatch, names: list[str]) -> None:
    """Delete the veths of these names (their peers go with them) in one group delete; a name that is not a
    veth is refused before anything is deleted, one already gone is fine."""
    indexes = []
    for name in names:
        link = nl.link(name)
        if link is None:
            continue
        if link[2] != "veth":
            raise KernelError(f"{name} is not a veth")
        indexes.append(link[0])
    nl.delete_links(indexes)


def _announce(sb: _Sandbox, entries) -> None:
    """ARP announcements of `entries` into the sandbox's bridge (see garp.py), unless so many containers
    are on it that the flood would cost each run in proportion to them (garp.MAX_FLOOD_PORTS)."""
    if sb.bridges is not None and len(sb.bridges.chain.where) > garp.MAX_FLOOD_PORTS:
        return
    sb.garp.announce(SANDBOX_BRIDGE, entries)
