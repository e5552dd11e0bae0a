"""Small netlink helpers shared by the bridge and overlay data planes.

Links are pyroute2 RTM_NEWLINK messages. Helpers that refuse raise `KernelError` without saying what
the caller was doing; wrap them in `failing(what)`, which puts that in front.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from netweft.dataplane.pyroute2_parts import NetlinkError, iproute

from netweft.dataplane import netns
from netweft.dataplane.checks import IFNAMSIZ, check_ifname, parse_interface, parse_mac  # noqa: F401 (re-exported)
from netweft.dataplane.nlbatch import NETLINK_EXT_ACK, NETLINK_ROUTE, SOL_NETLINK, NeighBatch, open_route_socket
from netweft.errors import KernelError

if TYPE_CHECKING:
    from netweft.dataplane.pyroute2_parts import IPRoute

IFF_UP = 0x1
RT_TABLE_MAIN = 254
# How long to retry creating a link whose name (or VNI) a namespace being torn down still holds.
EEXIST_RETRY_SECONDS = 5.0


# ---- errors -------------------------------------------------------------------------------------

def describe(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        text = os.strerror(e.code) if e.code else str(e)
        extra = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else ""
        return f"{text} ({extra})" if extra and extra != text else text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


@contextlib.contextmanager
def failing(what: str) -> Iterator[None]:
    """Turn a kernel/netlink failure (or a KernelError) into a one-line KernelError starting with
    what we were doing."""
    try:
        yield
    except KernelError as e:
        raise KernelError(f"{what}: {e}") from None
    except (NetlinkError, OSError) as e:
        raise KernelError(f"{what}: {describe(e)}") from None


@contextlib.contextmanager
def ignore(*codes: int) -> Iterator[None]:
    """Swallow NetlinkErrors with the given codes (e.g. ENODEV when deleting what is gone)."""
    try:
        yield
    except NetlinkError as e:
        if e.code not in codes:
            raise


def retry_eexist(add: Callable[[], object]) -> None:
    """Call `add` again while the kernel answers EEXIST, for up to EEXIST_RETRY_SECONDS: a namespace
    being torn down can hold a name or a VNI for a moment."""
    deadline = time.monotonic() + EEXIST_RETRY_SECONDS
    while True:
        try:
            add()
            return
        except NetlinkError as e:
            if e.code != errno.EEXIST or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


# ---- links and addresses ------------------------------------------------------------------------

def link_kind(link) -> str | None:
    return link.get(("linkinfo", "kind")) if link is not None else None


def is_up(link) -> bool:
    return bool(link["flags"] & IFF_UP)


def get_link(ipr: IPRoute, name: str):
    """The RTM_NEWLINK message for `name`, or None if there is no such link."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def ensure_up(ipr: IPRoute, link) -> None:
    if not is_up(link):
        ipr.link("set", index=link["index"], state="up")


def ensure_mtu(ipr: IPRoute, link, mtu: int) -> None:
    if link.get("mtu") != mtu:
        ipr.link("set", index=link["index"], mtu=mtu)


def ensure_ipv4(ipr: IPRoute, index: int, want: ipaddress.IPv4Interface | None) -> None:
    """Make `want` the only IPv4 address of link `index` (no address if None)."""

    def current() -> set[tuple[str, int]]:
        return {(a.get("local") or a.get("address"), a["prefixlen"])
                for a in ipr.addr("dump", family=socket.AF_INET, index=index)}

    target = (str(want.ip), want.network.prefixlen) if want else None
    for address, prefixlen in current() - {target}:
        with ignore(errno.EADDRNOTAVAIL):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    # Deleting a primary address can take its secondaries with it, so look again.
    if target and target not in current():
        ipr.addr("add", index=index, address=target[0], prefixlen=target[1],
                 broadcast=str(want.network.broadcast_address))


def ensure_default_route(ipr: IPRoute, oif: int, gw: ipaddress.IPv4Address) -> None:
    """The main table's only IPv4 default route is via `gw` out of link `oif`."""
    defaults = [r for r in ipr.route("dump", family=socket.AF_INET)
                if r["dst_len"] == 0 and (r.get("table") or r["table"]) == RT_TABLE_MAIN]
    if len(defaults) == 1 and defaults[0].get("gateway") == str(gw) and defaults[0].get("oif") == oif:
        return
    ipr.route("replace", dst="0.0.0.0/0", gateway=str(gw), oif=oif)


def delete_link(ipr: IPRoute, name: str, kind: str) -> None:
    """Delete link `name`, which must be a `kind` (e.g. "veth"). Idempotent."""
    link = get_link(ipr, name)
    if link is None:
        return
    if link_kind(link) != kind:
        raise KernelError(f"that interface is not a {kind}")
    with ignore(errno.ENODEV):
        ipr.link("del", index=link["index"])


# ---- veth pairs ---------------------------------------------------------------------------------

def netnsid(ipr: IPRoute, fd: int) -> int | None:
    """The id that `ipr`'s namespace gives namespace `fd`, None if it has none."""
    nsid = (ipr.get_netnsid(fd=fd) or {}).get("nsid")
    return nsid if nsid is not None and 0 <= nsid < 2**31 else None


def _is_veth_pair(ipr: IPRoute, host, peer, peer_fd: int) -> bool:
    """True if `host` (in `ipr`'s namespace) and `peer` (namespace `peer_fd`) are the two ends of one veth."""
    if host is None or peer is None or link_kind(host) != "veth" or link_kind(peer) != "veth":
        return False
    if host.get("link") != peer["index"] or peer.get("link") != host["index"]:
        return False
    # Indexes are per namespace; the peer's namespace id pins down which namespace.
    nsid = netnsid(ipr, peer_fd)
    return nsid is not None and host.get("link_netnsid") == nsid


def ensure_veth(ipr: IPRoute, cipr: IPRoute, peer_fd: int, host_ifname: str, ifname: str, mac: str,
                mtu: int, *, replace_peer: bool) -> tuple:
    """The links (host, peer) of one veth: `host_ifname` in `ipr`'s namespace, `ifname` in namespace
    `peer_fd` (`cipr`). Unless they already are one pair, whatever holds the two names is replaced by a
    fresh pair (peer created in place with `mac`). A `host_ifname` that is not a veth is refused; so is
    an `ifname` that is not a veth, unless `replace_peer`."""
    host, peer = get_link(ipr, host_ifname), get_link(cipr, ifname)
    if _is_veth_pair(ipr, host, peer, peer_fd):
        return host, peer

    def create() -> None:
        stale_host, stale_peer = get_link(ipr, host_ifname), get_link(cipr, ifname)
        if stale_host is not None and link_kind(stale_host) != "veth":
            raise KernelError(f"an interface named {host_ifname} exists and is not a veth")
        if stale_peer is not None and link_kind(stale_peer) != "veth" and not replace_peer:
            raise KernelError(f"the container has an interface named {ifname} that is not a veth")
        # Stale ends: a half-made pair, or one whose other end is in a namespace being destroyed.
        for handle, link in ((ipr, stale_host), (cipr, stale_peer)):
            if link is not None:
                with ignore(errno.ENODEV):
                    handle.link("del", index=link["index"])
        ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu,
                 peer={"ifname": ifname, "net_ns_fd": peer_fd, "address": mac, "mtu": mtu})

    retry_eexist(create)
    host, peer = get_link(ipr, host_ifname), get_link(cipr, ifname)
    if host is None or peer is None:
        raise KernelError("veth pair vanished right after creation")
    return host, peer


def ensure_container_end(cipr: IPRoute, peer, address: ipaddress.IPv4Interface, mac: str, mtu: int,
                         gateway: ipaddress.IPv4Address | None) -> None:
    """Veth end `peer` has `mac`, `mtu`, exactly IPv4 `address` and is up; loopback is up; and the
    default route goes via `gateway` if given."""
    if (peer.get("address") or "").lower() != mac:
        cipr.link("set", index=peer["index"], address=mac)
    ensure_mtu(cipr, peer, mtu)
    ensure_ipv4(cipr, peer["index"], address)
    ensure_up(cipr, peer)
    lo = get_link(cipr, "lo")
    if lo is not None:
        ensure_up(cipr, lo)
    if gateway is not None:
        ensure_default_route(cipr, peer["index"], gateway)


# ---- sockets and namespaces ---------------------------------------------------------------------

def open_iproute(ns_fd: int) -> IPRoute:
    """An IPRoute whose socket lives in namespace `ns_fd` (entered just long enough to open it)."""
    with netns.entered(ns_fd):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # kernel explains some refusals
        return iproute(use_socket=sock)
    except BaseException:
        sock.close()
        raise


def close_iproute(ipr: IPRoute) -> None:
    sock = getattr(ipr, "use_socket", None)
    with contextlib.suppress(Exception):
        ipr.close()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


@contextlib.contextmanager
def netns_iproute(path: str) -> Iterator[tuple[int, IPRoute]]:
    """A descriptor of the namespace at `path` and an IPRoute in it, both closed afterwards (an open
    socket would keep a deleted namespace, and its links, alive)."""
    fd = netns.open_netns(path)
    try:
        with failing(f"open netlink socket in {path}"):
            ipr = open_iproute(fd)
        try:
            yield fd, ipr
        finally:
            close_iproute(ipr)
    finally:
        os.close(fd)


class HostHandles:
    """What Kernel and Overlay share: the host namespace (that of the constructing thread), the one
    thread allowed to use them, and their netlink socket and libnftables context there."""

    def __init__(self) -> None:
        self._host_fd = netns.current_netns_fd()
        self._owner: int | None = None
        self._ipr: IPRoute | None = None
        self._nft = None  # nftables.Nftables, created lazily inside the host namespace
        self._nl: NeighBatch | None = None  # raw netlink for big dumps (thousands of links), lazily
        self._closed = False

    def close(self) -> None:
        """Release handles. Call from the thread that used the object. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ipr is not None:
            close_iproute(self._ipr)
            self._ipr = None
        self._nft = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        os.close(self._host_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _claim_thread(self) -> None:
        name = type(self).__name__
        if self._closed:
            raise RuntimeError(f"{name} is closed")
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError(f"{name} used from a second thread; its netlink handles belong to the first")

    @property
    def _host(self) -> IPRoute:
        self._claim_thread()
        if self._ipr is None:
            with failing("open netlink socket in host namespace"):
                self._ipr = open_iproute(self._host_fd)
        return self._ipr

    @property
    def _host_nl(self) -> NeighBatch:
        self._claim_thread()
        if self._nl is None:
            with failing("open netlink socket in host namespace"), netns.entered(self._host_fd):
                self._nl = NeighBatch(open_route_socket())
        return self._nl

    @contextlib.contextmanager
    def _in_host(self) -> Iterator[None]:
        """Run the block with the calling thread in the host namespace (entered only if elsewhere)."""
        mine = os.stat("/proc/thread-self/ns/net")
        host = os.fstat(self._host_fd)
        if (mine.st_dev, mine.st_ino) == (host.st_dev, host.st_ino):
            yield
        else:
            with netns.entered(self._host_fd):
                yield

    def _set_ip_forward(self, enabled: bool) -> None:
        """Set net.ipv4.ip_forward in the host namespace (written only if it differs)."""
        self._claim_thread()
        value = "1" if enabled else "0"
        with failing("set net.ipv4.ip_forward"), self._in_host():
            # /proc/sys/net belongs to the namespace of the thread that opens the file.
            with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
                if f.read().strip() != value:
                    f.seek(0)
                    f.write(value + "\n")

    def _nft_cmd(self, cmd: dict, what: str):
        """Run a libnftables JSON command in the host namespace; a refusal is one KernelError line. Returns
        libnftables' JSON output (for list commands)."""
        self._claim_thread()
        with self._in_host():
            if self._nft is None:
                self._nft = new_nft(what)
            return nft_run(self._nft, cmd, what)


def new_nft(what: str):
    """A libnftables context: make it (and use it first) inside the namespace it is for; it stays bound there."""
    import nftables  # pip-nftables over the system libnftables

    try:
        return nftables.Nftables()
    except OSError as e:
        raise KernelError(f"{what}: cannot load libnftables: {e}") from None


def nft_run(nft, cmd: dict, what: str):
    """Run a libnftables JSON command; a refusal is one KernelError line. Returns its JSON output."""
    rc, output, error = nft.json_cmd(cmd)
    if rc != 0:
        lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
        detail = lines[0] if lines else f"libnftables returned {rc}"
        # Messages look like "internal:0:0-0: Error: ..."; the location says nothing for JSON input.
        if "Error:" in detail:
            detail = detail[detail.index("Error:") + len("Error:"):].strip()
        raise KernelError(f"{what}: {detail}")
    return output
