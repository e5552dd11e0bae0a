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

import contextlib
import errno
import ipaddress
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netweft.dataplane import netns
from netweft.dataplane.firewall import BridgeRule, render_firewall
from netweft.errors import InvalidRequest, KernelError

IFNAMSIZ = 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
# How long to retry creating a veth whose name is still held by a namespace being torn down.
EEXIST_RETRY_SECONDS = 5.0


def _check_ifname(name: str, what: str = "interface name") -> None:
    if not name or len(name.encode()) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name) \
            or name in (".", ".."):
        raise InvalidRequest(f"invalid {what} {name!r} (1-{IFNAMSIZ} bytes, no '/' or spaces)")


def _interface(address: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(address)
    except ValueError:
        raise InvalidRequest(f"invalid IPv4 address {address!r}, expected e.g. 198.18.0.5/24") from None
    if "/" not in address:
        raise InvalidRequest(f"address {address!r} needs a prefix length, e.g. {address}/24")
    if iface.network.prefixlen == 0 or iface.ip.is_unspecified or iface.ip.is_multicast or iface.ip.is_loopback:
        raise InvalidRequest(f"address {address} cannot be given to an interface")
    return iface


def _mac(mac: str) -> str:
    parts = mac.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise InvalidRequest(f"invalid MAC address {mac!r}")
    if int(parts[0], 16) & 1:
        raise InvalidRequest(f"MAC address {mac} is multicast")
    return ":".join(parts)


def _random_mac() -> str:
    # Locally administered, unicast.
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _describe(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        text = os.strerror(e.code) if e.code else str(e)
        extra = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else ""
        return f"{text} ({extra})" if extra and extra != text else text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


@contextlib.contextmanager
def _failing(what: str) -> Iterator[None]:
    """Turn a kernel/netlink failure into a one-line KernelError saying what we were doing."""
    try:
        yield
    except (NetlinkError, OSError) as e:
        raise KernelError(f"{what}: {_describe(e)}") from None


@contextlib.contextmanager
def _ignore(*codes: int) -> Iterator[None]:
    """Swallow NetlinkErrors with the given codes (e.g. ENODEV when deleting what is gone)."""
    try:
        yield
    except NetlinkError as e:
        if e.code not in codes:
            raise


def _kind(link) -> str | None:
    return link.get(("linkinfo", "kind")) if link is not None else None


def _is_up(link) -> bool:
    return bool(link["flags"] & IFF_UP)


def _get_link(ipr: IPRoute, name: str):
    """The RTM_NEWLINK message for `name`, or None if there is no such link."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _ensure_ipv4(ipr: IPRoute, index: int, want: ipaddress.IPv4Interface | None) -> None:
    """Make `want` the only IPv4 address of link `index` (no address if None)."""

    def current() -> set[tuple[str, int]]:
        return {(a.get("address"), a["prefixlen"])
                for a in ipr.addr("dump", family=socket.AF_INET, index=index)}

    target = (str(want.ip), want.network.prefixlen) if want else None
    for address, prefixlen in current() - {target}:
        with _ignore(errno.EADDRNOTAVAIL):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    # Deleting a primary address can take its secondaries with it, so look again.
    if target and target not in current():
        ipr.addr("add", index=index, address=target[0], prefixlen=target[1],
                 broadcast=str(want.network.broadcast_address))


def _open_route_socket(ns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket living in namespace `ns_fd` (entered just long enough to open it)."""
    with netns.entered(ns_fd):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # kernel explains some refusals
    except OSError:
        pass
    return sock


def _same_netns(fd: int) -> bool:
    """True if the calling thread is in namespace `fd` already."""
    mine = os.stat("/proc/thread-self/ns/net")
    other = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino)


class Kernel:
    """Local bridge networks in the host namespace. See the module docstring for threading rules.

    `run_dir` is netweft's runtime directory (created if missing); the Kernel itself keeps no files
    there.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._host_fd = netns.current_netns_fd()
        self._owner: int | None = None
        self._ipr: IPRoute | None = None
        self._nft = None  # nftables.Nftables, created lazily inside the host namespace
        self._closed = False

    # ---- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release handles. Call from the thread that used the Kernel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
        self._nft = None
        os.close(self._host_fd)

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _claim_thread(self) -> None:
        if self._closed:
            raise RuntimeError("Kernel is closed")
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("Kernel used from a second thread; its netlink handles belong to the first")

    @property
    def _host(self) -> IPRoute:
        self._claim_thread()
        if self._ipr is None:
            with _failing("open netlink socket in host namespace"):
                self._ipr = self._iproute(self._host_fd)
        return self._ipr

    @staticmethod
    def _iproute(ns_fd: int) -> IPRoute:
        sock = _open_route_socket(ns_fd)
        try:
            return IPRoute(use_socket=sock)
        except BaseException:
            sock.close()
            raise

    @contextlib.contextmanager
    def _in_host(self) -> Iterator[None]:
        """Run the block with the calling thread in the host namespace."""
        if _same_netns(self._host_fd):
            yield
        else:
            with netns.entered(self._host_fd):
                yield

    def _link_name(self, index: int) -> str:
        try:
            return self._host.link("get", index=index)[0].get("ifname")
        except NetlinkError:
            return f"#{index}"

    # ---- queries --------------------------------------------------------------------------------

    # Namespaces go through the kernel thread too, so they stay ordered with the links in them.
    def create_netns(self, path: str) -> None:
        with _failing(f"create network namespace {path}"):
            netns.create_netns(path)

    def delete_netns(self, path: str) -> None:
        with _failing(f"delete network namespace {path}"):
            netns.delete_netns(path)

    def link_exists(self, name: str) -> bool:
        try:
            _check_ifname(name)
        except InvalidRequest:
            return False  # such a name cannot exist
        with _failing(f"look up link {name}"):
            return _get_link(self._host, name) is not None

    def link_master(self, name: str) -> str | None:
        """Name of the master (e.g. bridge) of host link `name`; None if it has none or does not exist."""
        _check_ifname(name)
        with _failing(f"look up link {name}"):
            link = _get_link(self._host, name)
            if link is None or not link.get("master"):
                return None
            return self._link_name(link.get("master"))

    def list_links(self, prefix: str) -> list[str]:
        """Names of host links starting with `prefix`, sorted."""
        with _failing("list links"):
            names = [link.get("ifname") for link in self._host.link("dump")]
        return sorted(n for n in names if n and n.startswith(prefix))

    def ipv4_addresses(self) -> dict[str, list[str]]:
        """Global IPv4 addresses of the host's interfaces, by interface name (for --advertise-addr)."""
        with _failing("list addresses"):
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
        with _failing("list routes"):
            ipr = self._host
            names = {link["index"]: link.get("ifname") or "" for link in ipr.link("dump")}
            routes = ipr.route("dump", family=socket.AF_INET)
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
        _check_ifname(name, "bridge name")
        if parent is not None:
            _check_ifname(parent, "parent interface name")
            if parent == name:
                raise InvalidRequest(f"bridge {name} cannot be its own parent")
        want = _interface(address) if address else None
        ipr = self._host
        with _failing(f"bridge {name}"):
            link = _get_link(ipr, name)
            if link is None:
                # A fixed MAC: otherwise the bridge takes the lowest port MAC and changes it as
                # ports come and go, leaving stale gateway entries in the containers' ARP caches.
                # No MTU here: only an MTU set afterwards counts as chosen by the user; one given at
                # creation is overridden by the ports' MTU as soon as a port joins.
                ipr.link("add", ifname=name, kind="bridge", address=_random_mac())
                link = _get_link(ipr, name)
            elif _kind(link) != "bridge":
                raise KernelError(f"bridge {name}: an interface of that name exists and is a "
                                  f"{_kind(link) or 'plain device'}, not a bridge")
            index = link["index"]

            if parent is not None:
                with _failing(f"bridge {name}: parent {parent}"):
                    port = _get_link(ipr, parent)
                    if port is None:
                        raise KernelError(f"bridge {name}: parent interface {parent} does not exist")
                    master = port.get("master")
                    if master and master != index:
                        raise KernelError(f"bridge {name}: parent interface {parent} is already "
                                          f"enslaved to {self._link_name(master)}")
                    if master != index:
                        ipr.link("set", index=port["index"], master=index)
                    if not _is_up(port):
                        ipr.link("set", index=port["index"], state="up")

            # After the parent joined. (When mtu equals the bridge's current MTU the kernel ignores the
            # request and keeps following the smallest port MTU; endpoints use the same MTU anyway.)
            if link.get("mtu") != mtu:
                ipr.link("set", index=index, mtu=mtu)
            _ensure_ipv4(ipr, index, want)
            if not _is_up(link):
                ipr.link("set", index=index, state="up")

    def delete_bridge(self, name: str, parent: str | None) -> None:
        """Release `parent` from the bridge and delete bridge `name`. Idempotent."""
        _check_ifname(name, "bridge name")
        if parent is not None:
            _check_ifname(parent, "parent interface name")
        ipr = self._host
        with _failing(f"delete bridge {name}"):
            link = _get_link(ipr, name)
            if link is not None and _kind(link) != "bridge":
                raise KernelError(f"delete bridge {name}: that interface is not a bridge")
            if parent is not None and link is not None:
                port = _get_link(ipr, parent)
                if port is not None and port.get("master") == link["index"]:
                    ipr.link("set", index=port["index"], master=0)
            if link is not None:
                with _ignore(errno.ENODEV):
                    ipr.link("del", index=link["index"])

    # ---- endpoints ------------------------------------------------------------------------------

    def ensure_endpoint(self, netns_path: str, bridge: str, host_ifname: str, ifname: str,
                        address: str, mac: str, mtu: int, gateway: str | None) -> None:
        """A veth pair: `host_ifname` on `bridge` in the host, `ifname` in the namespace at
        `netns_path` with `mac` and exactly IPv4 `address`, both up with MTU `mtu`; loopback up; and a
        default route via `gateway` if given. Repairs a partial pair (e.g. after a crash)."""
        _check_ifname(bridge, "bridge name")
        _check_ifname(host_ifname, "host interface name")
        _check_ifname(ifname, "container interface name")
        want = _interface(address)
        mac = _mac(mac)
        gw = None
        if gateway is not None:
            try:
                gw = ipaddress.IPv4Address(gateway)
            except ValueError:
                raise InvalidRequest(f"invalid gateway {gateway!r}") from None
        ipr = self._host
        what = f"endpoint {host_ifname}"
        with _failing(what):
            br = _get_link(ipr, bridge)
            if br is None:
                raise KernelError(f"{what}: bridge {bridge} does not exist")
            if _kind(br) != "bridge":
                raise KernelError(f"{what}: {bridge} is not a bridge")
        ns_fd = netns.open_netns(netns_path)
        try:
            with _failing(f"{what}: open netlink socket in {netns_path}"):
                cipr = self._iproute(ns_fd)
            try:
                with _failing(what):
                    host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)
                    if not self._is_pair(host, peer, ns_fd):
                        self._create_veth(cipr, ns_fd, host, peer, host_ifname, ifname, mac, mtu)
                        host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)
                        if host is None or peer is None:
                            raise KernelError(f"{what}: veth pair vanished right after creation")

                    # Host side.
                    if host.get("master") != br["index"]:
                        ipr.link("set", index=host["index"], master=br["index"])
                    if host.get("mtu") != mtu:
                        ipr.link("set", index=host["index"], mtu=mtu)
                    if not _is_up(host):
                        ipr.link("set", index=host["index"], state="up")

                    # Container side.
                    pidx = peer["index"]
                    if (peer.get("address") or "").lower() != mac:
                        cipr.link("set", index=pidx, address=mac)
                    if peer.get("mtu") != mtu:
                        cipr.link("set", index=pidx, mtu=mtu)
                    _ensure_ipv4(cipr, pidx, want)
                    if not _is_up(peer):
                        cipr.link("set", index=pidx, state="up")
                    lo = _get_link(cipr, "lo")
                    if lo is not None and not _is_up(lo):
                        cipr.link("set", index=lo["index"], state="up")
                    if gw is not None:
                        self._ensure_default_route(cipr, pidx, gw)
            finally:
                cipr.close()
        finally:
            os.close(ns_fd)

    def _is_pair(self, host, peer, ns_fd: int) -> bool:
        """True if `host` (host namespace) and `peer` (namespace `ns_fd`) are the two ends of one veth."""
        if host is None or peer is None or _kind(host) != "veth" or _kind(peer) != "veth":
            return False
        if host.get("link") != peer["index"] or peer.get("link") != host["index"]:
            return False
        # Indexes are per namespace; the peer namespace id pins down which namespace.
        nsid = (self._host.get_netnsid(fd=ns_fd) or {}).get("nsid")
        return nsid is not None and nsid >= 0 and host.get("link_netnsid") == nsid

    def _create_veth(self, cipr: IPRoute, ns_fd: int, host, peer, host_ifname: str, ifname: str,
                     mac: str, mtu: int) -> None:
        """Replace whatever holds the two names with a fresh veth pair, peer created in place."""
        ipr = self._host
        if host is not None and _kind(host) != "veth":
            raise KernelError(f"endpoint {host_ifname}: an interface of that name exists and is "
                              f"not a veth")
        deadline = time.monotonic() + EEXIST_RETRY_SECONDS
        while True:
            # Stale ends: a half-made pair, or one whose other end is in a namespace being destroyed.
            if host is not None:
                with _ignore(errno.ENODEV):
                    ipr.link("del", index=host["index"])
            if peer is not None:
                with _ignore(errno.ENODEV):
                    cipr.link("del", index=peer["index"])
            try:
                ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu,
                         peer={"ifname": ifname, "net_ns_fd": ns_fd, "address": mac, "mtu": mtu})
                return
            except NetlinkError as e:
                if e.code != errno.EEXIST or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
            host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)
            if host is not None and _kind(host) != "veth":
                raise KernelError(f"endpoint {host_ifname}: an interface of that name exists and "
                                  f"is not a veth")

    @staticmethod
    def _ensure_default_route(cipr: IPRoute, oif: int, gw: ipaddress.IPv4Address) -> None:
        defaults = [r for r in cipr.route("dump", family=socket.AF_INET)
                    if r["dst_len"] == 0 and (r.get("table") or r["table"]) == RT_TABLE_MAIN]
        if len(defaults) == 1 and defaults[0].get("gateway") == str(gw) and defaults[0].get("oif") == oif:
            return
        cipr.route("replace", dst="0.0.0.0/0", gateway=str(gw), oif=oif)

    def delete_endpoint(self, host_ifname: str) -> None:
        """Delete the veth whose host end is `host_ifname` (its peer goes with it). Idempotent."""
        _check_ifname(host_ifname, "host interface name")
        ipr = self._host
        with _failing(f"delete endpoint {host_ifname}"):
            link = _get_link(ipr, host_ifname)
            if link is None:
                return
            if _kind(link) != "veth":
                raise KernelError(f"delete endpoint {host_ifname}: that interface is not a veth")
            with _ignore(errno.ENODEV):
                ipr.link("del", index=link["index"])

    # ---- host settings and firewall -------------------------------------------------------------

    def set_ip_forward(self, enabled: bool) -> None:
        """Set net.ipv4.ip_forward in the host namespace (written only if it differs)."""
        self._claim_thread()
        value = "1" if enabled else "0"
        with _failing("set net.ipv4.ip_forward"), self._in_host():
            # /proc/sys/net belongs to the namespace of the thread that opens the file.
            with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
                if f.read().strip() != value:
                    f.seek(0)
                    f.write(value + "\n")

    def _nft_cmd(self, cmd: dict, what: str) -> None:
        self._claim_thread()
        with self._in_host():
            if self._nft is None:
                import nftables  # pip-nftables over the system libnftables

                try:
                    self._nft = nftables.Nftables()
                except OSError as e:
                    raise KernelError(f"{what}: cannot load libnftables: {e}") from None
            rc, _output, error = self._nft.json_cmd(cmd)
        if rc != 0:
            lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
            detail = lines[0] if lines else f"libnftables returned {rc}"
            # Messages look like "internal:0:0-0: Error: ..."; the location says nothing for JSON input.
            if "Error:" in detail:
                detail = detail[detail.index("Error:") + len("Error:"):].strip()
            raise KernelError(f"{what}: {detail}")

    def apply_firewall(self, table: str, networks: list[BridgeRule]) -> None:
        """Atomically replace nftables table `inet <table>` with rules for `networks`
        (see firewall.render_firewall); an empty list deletes the table."""
        self._nft_cmd(render_firewall(table, list(networks)), f"nftables table {table}")

    def delete_firewall(self, table: str) -> None:
        """Delete nftables table `inet <table>`. Idempotent."""
        self._nft_cmd(render_firewall(table, []), f"delete nftables table {table}")
