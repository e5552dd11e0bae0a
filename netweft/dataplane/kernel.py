"""The one narrow interface to the kernel for local bridge networks.

`Kernel` is synchronous and blocking; the daemon calls it from one worker thread (run_in_executor).
Every method is idempotent: it looks at what exists and changes only what differs, so it can be re-run
after a crash. Kernel refusals raise `KernelError` with one line; malformed arguments raise
`InvalidRequest` before anything is changed.

Threading and namespaces:
- "Host" means the network namespace of the thread that constructed the Kernel. All host-side work
  goes there even if the calling thread is elsewhere.
- pyroute2's sync IPRoute keeps per-thread sockets and event loops, so the handles belong to the
  first thread that uses the Kernel; using it from another thread raises RuntimeError.
- Netlink sockets are opened with the setns trick: the thread enters the namespace, opens the
  socket, and goes back; the socket stays in that namespace. No helper process is forked.
- The host handle stays open. Container namespaces get a handle per call, closed afterwards: an
  open socket would keep a deleted namespace (and its veth) alive.
- libnftables and /proc/sys/net act on the calling thread's namespace, so they run inside the host
  namespace (entered only if the thread is not already there).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket

from netweft.dataplane.pyroute2_parts import NetlinkError

from netweft.dataplane import antispoof, bridgechain, netns
from netweft.dataplane.checks import check_mtu, check_path, ipv4
from netweft.dataplane.firewall import PORTS_TABLE, BridgeRule, PortRule, render_firewall, render_port_maps
from netweft.dataplane.nlutil import (RT_TABLE_MAIN, HostHandles, check_ifname, delete_link, describe,
                                      ensure_container_end, ensure_ipv4, ensure_mtu, ensure_up, ensure_veth,
                                      failing, get_link, ignore, link_kind, netns_iproute,
                                      parse_interface, parse_mac)
from netweft.errors import InvalidRequest, KernelError


IFF_LOOPBACK = 0x8   # linux/if.h


def _random_mac() -> str:
    # Locally administered, unicast.
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


class Kernel(HostHandles):
    """Local bridge networks in the host namespace. See the module docstring for threading rules.

    `run_dir` is netweft's runtime directory (created if missing); the Kernel itself keeps no files
    there.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        super().__init__()
        self._guarded = antispoof.Guarded()   # the host's anti-spoofing ports, as this context knows them

    def _link_name(self, index: int) -> str:
        try:
            return self._host.link("get", index=index)[0].get("ifname")
        except NetlinkError:
            return f"#{index}"

    # ---- queries --------------------------------------------------------------------------------

    # Namespaces go through the kernel thread too, so they stay ordered with the links in them.
    # (netns's own errors already name the namespace, so only other OSErrors get the prefix.)
    def create_netns(self, path: str) -> None:
        """A namespace pinned at `path`, its loopback up (as in every container engine)."""
        check_path(path)
        try:
            netns.create_netns(path)
        except OSError as e:
            raise KernelError(f"create network namespace {path}: {describe(e)}") from None
        with failing(f"create network namespace {path}: bring up lo"), netns_iproute(path) as (_, ipr):
            lo = get_link(ipr, "lo")
            if lo is not None:
                ensure_up(ipr, lo)

    def delete_netns(self, path: str) -> None:
        check_path(path)
        try:
            netns.delete_netns(path)
        except OSError as e:
            raise KernelError(f"delete network namespace {path}: {describe(e)}") from None

    def link_exists(self, name: str) -> bool:
        try:
            check_ifname(name)
        except InvalidRequest:
            return False  # such a name cannot exist
        with failing(f"look up link {name}"):
            return get_link(self._host, name) is not None

    def link_master(self, name: str) -> str | None:
        """Name of the master (e.g. bridge) of host link `name`; None if it has none or does not exist."""
        check_ifname(name)
        with failing(f"look up link {name}"):
            link = get_link(self._host, name)
            if link is None or not link.get("master"):
                return None
            return self._link_name(link.get("master"))

    def link_info(self, name: str) -> tuple[str | None, str | None, bool] | None:
        """(kind, master name, is_loopback) of host link `name` (kind None for a physical device or
        loopback); None if it does not exist (or cannot: a malformed name)."""
        try:
            check_ifname(name)
        except InvalidRequest:
            return None
        with failing(f"look up link {name}"):
            link = get_link(self._host, name)
            if link is None:
                return None
            master = self._link_name(link.get("master")) if link.get("master") else None
            return link_kind(link), master, bool(link["flags"] & IFF_LOOPBACK)

    def list_links(self, prefix: str) -> list[str]:
        """Names of host links starting with `prefix`, sorted."""
        names = [name for _, name, _, _ in self._host_nl.links()]
        return sorted(n for n in names if n and n.startswith(prefix))

    def list_ports(self, bridge: str) -> list[str]:
        """Names of host links enslaved to `bridge` or to one of its extension bridges (bridgechain.py),
        without the links between them, sorted; empty if there is no such bridge."""
        check_ifname(bridge, "bridge name")
        nl = self._host_nl
        members = []
        for index, name, _, _ in nl.links(kind="bridge"):
            found = bridgechain.parse(bridge, name)
            if name == bridge or (found is not None and not found[1]):
                members.append(index)
        names = [name for index in members for _, name, _, _ in nl.links(master=index)]
        return sorted(name for name in names if not bridgechain.is_link(bridge, name))

    def ipv4_addresses(self) -> dict[str, list[str]]:
        """Global IPv4 addresses of the host's interfaces, by interface name (for --advertise-addr)."""
        with failing("list addresses"):
            ipr = self._host
            names = {link["index"]: link.get("ifname") or "" for link in ipr.link("dump")}
            out: dict[str, list[str]] = {}
            for a in ipr.addr("dump", family=socket.AF_INET):
                if a["scope"] == 0:  # RT_SCOPE_UNIVERSE: not loopback or link-local
                    out.setdefault(names.get(a["index"], ""), []).append(a.get("address"))
        return out

    def host_routes(self, bridge_prefix: str) -> list[ipaddress.IPv4Network]:
        """Destinations of the host's main-table IPv4 routes, except the default route and routes
        out of bridges whose names start with `bridge_prefix` (our own networks)."""
        names = {index: name for index, name, _, _ in self._host_nl.links()}   # thousands of veths: not pyroute2
        with failing("list routes"):
            routes = self._host.route("dump", family=socket.AF_INET)
            result = set()
            for r in routes:
                table = r.get("table") or r["table"]  # RTA_TABLE holds ids > 255
                if table != RT_TABLE_MAIN or r["dst_len"] == 0:
                    continue
                oif = r.get("oif")
                if oif and bridge_prefix and names.get(oif, "").startswith(bridge_prefix):
                    continue
                result.add(ipaddress.IPv4Network(f"{r.get('dst')}/{r['dst_len']}", strict=False))
        return sorted(result)

    # ---- bridges --------------------------------------------------------------------------------

    def ensure_bridge(self, name: str, address: str | None, mtu: int, parent: str | None) -> None:
        """Bridge `name` exists, is up, has MTU `mtu`, exactly IPv4 `address` (none if None), and,
        if `parent` is given, has that existing host interface as a port."""
        check_ifname(name, "bridge name")
        if parent is not None:
            check_ifname(parent, "parent interface name")
            if parent == name:
                raise InvalidRequest(f"bridge {name} cannot be its own parent")
        want = parse_interface(address) if address else None
        check_mtu(mtu)
        ipr = self._host
        with failing(f"bridge {name}"):
            link = get_link(ipr, name)
            if link is None:
                # A fixed MAC: otherwise the bridge takes the lowest port MAC and changes it as
                # ports come and go, leaving stale gateway entries in the containers' ARP caches.
                # No MTU here: only an MTU set afterwards counts as chosen by the user; one given at
                # creation is overridden by the ports' MTU as soon as a port joins.
                ipr.link("add", ifname=name, kind="bridge", address=_random_mac())
                link = get_link(ipr, name)
            elif link_kind(link) != "bridge":
                raise KernelError(f"an interface of that name exists and is a "
                                  f"{link_kind(link) or 'plain device'}, not a bridge")
            index = link["index"]

            if parent is not None:
                port = get_link(ipr, parent)
                if port is None:
                    raise KernelError(f"parent interface {parent} does not exist")
                master = port.get("master")
                if master and master != index:
                    raise KernelError(f"parent interface {parent} is already enslaved to "
                                      f"{self._link_name(master)}")
                with failing(f"parent {parent}"):
                    if master != index:
                        ipr.link("set", index=port["index"], master=index)
                    ensure_up(ipr, port)

            # After the parent joined. (When mtu equals the bridge's current MTU the kernel ignores the
            # request and keeps following the smallest port MTU; endpoints use the same MTU anyway.)
            ensure_mtu(ipr, link, mtu)
            ensure_ipv4(ipr, index, want)
            ensure_up(ipr, link)

    def delete_bridge(self, name: str, parent: str | None) -> None:
        """Release `parent` from the bridge and delete bridge `name`. Idempotent."""
        check_ifname(name, "bridge name")
        if parent is not None:
            check_ifname(parent, "parent interface name")
        ipr = self._host
        with failing(f"delete bridge {name}"):
            link = get_link(ipr, name)
            if link is not None and link_kind(link) != "bridge":
                raise KernelError("that interface is not a bridge")
            if parent is not None and link is not None:
                port = get_link(ipr, parent)
                if port is not None and port.get("master") == link["index"]:
                    ipr.link("set", index=port["index"], master=0)
            if link is not None:
                with ignore(errno.ENODEV):
                    ipr.link("del", index=link["index"])

    # ---- endpoints ------------------------------------------------------------------------------

    def ensure_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                        address: str, mac: str, mtu: int, gateway: str | None) -> None:
        """A veth pair: `host_ifname` on `bridge` in the host, `ifname` in the namespace at
        `netns_path` with `mac` and exactly IPv4 `address`, both up with MTU `mtu`; loopback up; and a
        default route via `gateway` if given. Repairs a partial pair (e.g. after a crash)."""
        check_ifname(bridge, "bridge name")
        check_ifname(host_ifname, "host interface name")
        check_ifname(ifname, "container interface name")
        want = parse_interface(address)
        mac = parse_mac(mac)
        check_mtu(mtu)
        gw = None if gateway is None else ipaddress.IPv4Address(ipv4(gateway, "gateway"))
        ipr = self._host
        with failing(f"endpoint {host_ifname}"):
            br = get_link(ipr, bridge)
            if br is None:
                raise KernelError(f"bridge {bridge} does not exist")
            if link_kind(br) != "bridge":
                raise KernelError(f"{bridge} is not a bridge")
            with netns_iproute(netns_path) as (ns_fd, cipr):
                # A stale container interface of another kind is replaced (the namespace is ours).
                host, peer = ensure_veth(ipr, cipr, ns_fd, host_ifname, ifname, mac, mtu, replace_peer=True)
                if host.get("master") != br["index"]:
                    ipr.link("set", index=host["index"], master=br["index"])
                ensure_mtu(ipr, host, mtu)
                ensure_up(ipr, host)
                ensure_container_end(cipr, peer, want, mac, mtu, gw)
        antispoof.add_port(self._nft_cmd, self._guarded, host_ifname, mac, str(want.ip))

    def delete_endpoint(self, host_ifname: str) -> None:
        """Delete the veth whose host end is `host_ifname` (its peer goes with it). Idempotent."""
        check_ifname(host_ifname, "host interface name")
        with failing(f"delete endpoint {host_ifname}"):
            delete_link(self._host, host_ifname, "veth")
        antispoof.delete_port(self._nft_cmd, self._guarded, host_ifname)

    def list_antispoof(self) -> list[str]:
        return antispoof.list_ports(self._nft_cmd)

    # ---- host settings and firewall -------------------------------------------------------------

    def set_ip_forward(self, enabled: bool) -> None:
        """Set net.ipv4.ip_forward in the host namespace (written only if it differs)."""
        self._set_ip_forward(enabled)

    def apply_firewall(self, table: str, networks: list[BridgeRule]) -> None:
        """Atomically replace nftables table `inet <table>` with rules for `networks`
        (see firewall.render_firewall); an empty list deletes the table."""
        self._nft_cmd(render_firewall(table, list(networks)), f"nftables table {table}")

    def apply_port_maps(self, rules: list[PortRule]) -> None:
        """Atomically replace table `inet netweft-ports` with the published ports' DNAT rules."""
        self._nft_cmd(render_port_maps(list(rules)), f"nftables table {PORTS_TABLE}")

    def delete_firewall(self, table: str) -> None:
        """Delete nftables table `inet <table>`. Idempotent."""
        self._nft_cmd(render_firewall(table, []), f"delete nftables table {table}")
