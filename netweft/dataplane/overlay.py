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
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netweft.dataplane import netns
from netweft.dataplane.nlbatch import NeighBatch, open_route_socket
from netweft.errors import InvalidRequest, KernelError

SANDBOX_BRIDGE = "br0"
SANDBOX_VXLAN = "vxlan0"
DEFAULT_PORT = 4789
VXLAN_OVERHEAD = 50          # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
OVERLAY_TABLE = "netweft-ov"

IFNAMSIZ = 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
EEXIST_RETRY_SECONDS = 3.0   # a namespace being torn down can hold a name / VNI for a moment


# ---- validation ---------------------------------------------------------------------------------

def _check_ifname(name: str, what: str = "interface name") -> str:
    if not isinstance(name, str) or not name or len(name.encode()) > IFNAMSIZ or "/" in name \
            or any(c.isspace() for c in name) or name in (".", ".."):
        raise InvalidRequest(f"invalid {what} {name!r} (1-{IFNAMSIZ} bytes, no '/' or spaces)")
    return name


def _interface(address: str) -> ipaddress.IPv4Interface:
    try:
        if "/" not in address:
            raise ValueError
        return ipaddress.IPv4Interface(address)
    except (ValueError, TypeError):
        raise InvalidRequest(f"invalid IPv4 address {address!r}, expected e.g. 198.18.0.5/24") from None


def _ipv4(address: str, what: str = "IPv4 address") -> str:
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address))
    except (OSError, TypeError):
        raise InvalidRequest(f"invalid {what} {address!r}") from None


def _mac(mac: str) -> str:
    try:
        raw = bytes.fromhex(mac.replace(":", "")) if len(mac) == 17 and mac.count(":") == 5 else b""
    except (ValueError, AttributeError, TypeError):
        raw = b""
    if len(raw) != 6:
        raise InvalidRequest(f"invalid MAC address {mac!r}")
    if raw[0] & 1:
        raise InvalidRequest(f"MAC address {mac} is multicast")
    return raw.hex(":")


def _int_in(value: int, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"invalid {what} {value!r} (expected {low}-{high})")
    return value


@dataclass(frozen=True)
class Peer:
    """A remote endpoint: its overlay IP and MAC, and the underlay IP of the host (VTEP) it lives on."""

    ip: str
    mac: str
    vtep: str

    def __post_init__(self) -> None:
        # Canonical forms, so peers read back from the kernel compare equal to the ones we were given.
        object.__setattr__(self, "ip", _ipv4(self.ip, "peer IP"))
        object.__setattr__(self, "mac", _mac(self.mac))
        object.__setattr__(self, "vtep", _ipv4(self.vtep, "VTEP address"))


# ---- pyroute2 helpers ---------------------------------------------------------------------------

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
    except KernelError as e:
        raise KernelError(f"{what}: {e}") from None
    except (NetlinkError, OSError) as e:
        raise KernelError(f"{what}: {_describe(e)}") from None


@contextlib.contextmanager
def _ignore(*codes: int) -> Iterator[None]:
    """Swallow NetlinkErrors with the given codes (e.g. ENODEV when deleting)."""
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


def _ensure_ipv4(ipr: IPRoute, index: int, want: ipaddress.IPv4Interface) -> None:
    """Make `want` the only IPv4 address of link `index`."""

    def current() -> set[tuple[str, int]]:
        return {(a.get("local") or a.get("address"), a["prefixlen"])
                for a in ipr.addr("dump", family=socket.AF_INET, index=index)}

    target = (str(want.ip), want.network.prefixlen)
    for address, prefixlen in current() - {target}:
        with _ignore(errno.EADDRNOTAVAIL):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
    # Deleting a primary address can take its secondaries with it, so look again.
    if target not in current():
        ipr.addr("add", index=index, address=target[0], prefixlen=target[1],
                 broadcast=str(want.network.broadcast_address))


def _ensure_up(ipr: IPRoute, link) -> None:
    if not _is_up(link):
        ipr.link("set", index=link["index"], state="up")


def _ensure_mtu(ipr: IPRoute, link, mtu: int) -> None:
    if link.get("mtu") != mtu:
        ipr.link("set", index=link["index"], mtu=mtu)


def _nsid(ipr: IPRoute, fd: int) -> int | None:
    """The id that `ipr`'s namespace gives namespace `fd`, None if it has none."""
    nsid = (ipr.get_netnsid(fd=fd) or {}).get("nsid")
    return nsid if nsid is not None and 0 <= nsid < 2**31 else None


def _open_iproute(ns_fd: int) -> IPRoute:
    """An IPRoute whose socket lives in namespace `ns_fd` (entered just long enough to open it)."""
    with netns.entered(ns_fd):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # kernel explains some refusals
        return IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise


def _close_iproute(ipr: IPRoute) -> None:
    sock = getattr(ipr, "use_socket", None)
    with contextlib.suppress(Exception):
        ipr.close()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


class _Sandbox:
    """Open handles on one sandbox namespace."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)  # which namespace; notices one replaced under the same path
        self.ipr = _open_iproute(fd)
        try:
            with netns.entered(fd):
                sock = open_route_socket()
            self.nl = NeighBatch(sock)
        except BaseException:
            _close_iproute(self.ipr)
            raise

    def close(self) -> None:
        _close_iproute(self.ipr)
        with contextlib.suppress(OSError):
            self.nl.close()
        os.close(self.fd)


# ---- the firewall (pure) ------------------------------------------------------------------------

def _meta(key: str, op: str, value) -> dict:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _clamp_mss() -> list[dict]:
    # `tcp flags syn tcp option maxseg size set rt mtu`: SYN and SYN-ACK, MSS lowered to fit the route out.
    return [{"match": {"op": "in", "left": {"payload": {"protocol": "tcp", "field": "flags"}}, "right": "syn"}},
            {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                        "value": {"rt": {"key": "mtu"}}}}]


def render_overlay_firewall(gwbridge: str, gw_subnet: str, table: str = OVERLAY_TABLE) -> dict:
    """The libnftables JSON command that atomically replaces table `inet <table>` for the gateway bridge.

    - forward: nothing is routed from the gateway bridge back into it. Together with isolated bridge
      ports (no L2 path between containers on the gateway bridge) this keeps overlays apart: a
      container's only way to a container on another overlay would be through the host.
    - forward: TCP MSS of SYNs crossing the gateway bridge is clamped to the route MTU, so a smaller
      uplink (or a smaller gateway bridge) never blackholes TCP. Overlay traffic itself needs no clamp:
      both ends sit on the overlay MTU, so their own SYNs already advertise the right MSS, and the
      sandbox only bridges.
    - postrouting: the gateway bridge subnet is masqueraded when it leaves through another interface.
    """
    _check_ifname(gwbridge, "gateway bridge name")
    try:
        net = ipaddress.IPv4Network(gw_subnet, strict=False)
    except (ValueError, TypeError):
        raise InvalidRequest(f"invalid gateway bridge subnet {gw_subnet!r}") from None
    tbl = {"family": "inet", "name": table}

    def rule(chain: str, comment: str, *expr: dict) -> dict:
        return {"add": {"rule": {"family": "inet", "table": table, "chain": chain, "comment": comment,
                                 "expr": list(expr)}}}

    return {"nftables": [
        # "add" then "delete" never fails, whether or not the table exists; then build it afresh.
        {"add": {"table": dict(tbl)}},
        {"delete": {"table": dict(tbl)}},
        {"add": {"table": dict(tbl)}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "forward", "type": "filter",
                           "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "postrouting", "type": "nat",
                           "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        rule("forward", f"no routing between {gwbridge} ports",
             _meta("iifname", "==", gwbridge), _meta("oifname", "==", gwbridge), {"drop": None}),
        rule("forward", f"clamp MSS out of {gwbridge}", _meta("iifname", "==", gwbridge), *_clamp_mss()),
        rule("forward", f"clamp MSS into {gwbridge}", _meta("oifname", "==", gwbridge), *_clamp_mss()),
        rule("postrouting", f"masquerade {gwbridge}",
             {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}}},
             _meta("oifname", "!=", gwbridge), {"masquerade": None}),
    ]}


def render_delete_overlay_firewall(table: str = OVERLAY_TABLE) -> dict:
    tbl = {"family": "inet", "name": table}
    return {"nftables": [{"add": {"table": dict(tbl)}}, {"delete": {"table": dict(tbl)}}]}


def default_tmp_name(vni: int) -> str:
    """Host-namespace name a new VXLAN device has before it moves into its sandbox (VNI is unique per
    host and port, so this is too)."""
    return f"nwt-vx{vni:06x}"


# ---- the data plane -----------------------------------------------------------------------------

class Overlay:
    """The overlay data plane of one host (the namespace of the constructing thread); see module doc."""

    def __init__(self) -> None:
        self._host_fd = netns.current_netns_fd()
        self._owner: int | None = None
        self._ipr: IPRoute | None = None
        self._nft = None  # nftables.Nftables, created lazily inside the host namespace
        self._sandboxes: dict[str, _Sandbox] = {}
        self._closed = False

    # ---- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release all handles. Call from the thread that used the Overlay. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sb in self._sandboxes.values():
            sb.close()
        self._sandboxes.clear()
        if self._ipr is not None:
            _close_iproute(self._ipr)
            self._ipr = None
        self._nft = None
        os.close(self._host_fd)

    def __enter__(self) -> "Overlay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _claim_thread(self) -> None:
        if self._closed:
            raise RuntimeError("Overlay is closed")
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("Overlay used from a second thread; its netlink handles belong to the first")

    @property
    def _host(self) -> IPRoute:
        self._claim_thread()
        if self._ipr is None:
            with _failing("open netlink socket in host namespace"):
                self._ipr = _open_iproute(self._host_fd)
        return self._ipr

    @contextlib.contextmanager
    def _in_host(self) -> Iterator[None]:
        """Run the block with the calling thread in the host namespace."""
        mine = os.stat("/proc/thread-self/ns/net")
        host = os.fstat(self._host_fd)
        if (mine.st_dev, mine.st_ino) == (host.st_dev, host.st_ino):
            yield
        else:
            with netns.entered(self._host_fd):
                yield

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
            with _failing(f"open netlink sockets in sandbox {path}"):
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
        with _failing(f"sandbox {sb.path}"):
            link = _get_link(sb.ipr, SANDBOX_VXLAN)
        if link is None or _kind(link) != "vxlan":
            raise KernelError(f"sandbox {sb.path} has no VXLAN device {SANDBOX_VXLAN} (ensure_sandbox first)")
        return link["index"]

    # ---- MTU ------------------------------------------------------------------------------------

    def underlay_mtu(self, local_ip: str) -> int:
        """MTU of the host interface that holds `local_ip`."""
        local_ip = _ipv4(local_ip, "local underlay address")
        ipr = self._host
        with _failing(f"find the interface holding {local_ip}"):
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

        Repairs whatever is partly there; a vxlan0 with other settings is recreated. Returns True if
        vxlan0 was (re)created: the peers live on it, so they must be programmed (again).
        `tmp_name` is vxlan0's name in the host namespace before the move (default from the VNI).
        """
        _int_in(vni, 1, 2**24 - 1, "VNI")
        _int_in(mtu, 68, 65535, "MTU")
        _int_in(port, 1, 65535, "VXLAN port")
        gateway = _interface(gateway_cidr)
        local_ip = _ipv4(local_ip, "local underlay address")
        tmp_name = _check_ifname(tmp_name or default_tmp_name(vni), "temporary VXLAN name")
        self._claim_thread()

        netns.create_netns(path)
        sb = self._sandbox(path)
        ipr = sb.ipr
        with _failing(f"sandbox {path}: bridge {SANDBOX_BRIDGE}"):
            br = self._ensure_bridge(ipr, SANDBOX_BRIDGE, gateway, mtu, ours=True)
        with _failing(f"sandbox {path}: VXLAN device (VNI {vni}, port {port})"):
            vx = _get_link(ipr, SANDBOX_VXLAN)
            created = vx is None or not self._vxlan_matches(sb, vx, vni, local_ip, port)
            if created:
                self._create_vxlan(sb, vx, vni, local_ip, port, mtu, tmp_name)
                vx = _get_link(ipr, SANDBOX_VXLAN)
            _ensure_mtu(ipr, vx, mtu)
            if vx.get("master") != br:
                ipr.link("set", index=vx["index"], master=br)
            _ensure_up(ipr, vx)
        with _failing(f"sandbox {path}: bring up lo"):
            _ensure_up(ipr, _get_link(ipr, "lo"))
        return created

    def _vxlan_matches(self, sb: _Sandbox, vx, vni: int, local_ip: str, port: int) -> bool:
        if _kind(vx) != "vxlan":
            return False

        def data(key: str):
            return vx.get(("linkinfo", "data", key))

        # link_netnsid is where the device's UDP socket lives; it must be the host namespace.
        host_nsid = _nsid(sb.ipr, self._host_fd)
        return (data("vxlan_id") == vni and data("vxlan_port") == port and data("vxlan_local") == local_ip
                and data("vxlan_learning") == 0 and data("vxlan_proxy") == 1
                and data("vxlan_group") is None   # no default destination: no flooding
                and host_nsid is not None and vx.get("link_netnsid") == host_nsid)

    def _create_vxlan(self, sb: _Sandbox, old, vni: int, local_ip: str, port: int, mtu: int,
                      tmp_name: str) -> None:
        host = self._host
        if old is not None:
            with _ignore(errno.ENODEV):
                sb.ipr.link("del", index=old["index"])
        self._delete_tmp_vxlan(tmp_name)  # left by a crash between create and move
        # Created here, in the host namespace, so the UDP socket it opens when up stays here.
        deadline = time.monotonic() + EEXIST_RETRY_SECONDS
        while True:
            try:
                host.link("add", ifname=tmp_name, kind="vxlan", vxlan_id=vni, vxlan_local=local_ip,
                          vxlan_port=port, vxlan_learning=0, vxlan_proxy=1, mtu=mtu)
                break
            except NetlinkError as e:
                # A sandbox namespace being destroyed may still hold the VNI for a moment.
                if e.code != errno.EEXIST or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        tmp = _get_link(host, tmp_name)
        try:
            # Move and rename in one step.
            host.link("set", index=tmp["index"], net_ns_fd=sb.fd, ifname=SANDBOX_VXLAN)
        except BaseException:
            with contextlib.suppress(NetlinkError):
                host.link("del", index=tmp["index"])
            raise

    def _delete_tmp_vxlan(self, tmp_name: str) -> None:
        host = self._host
        stale = _get_link(host, tmp_name)
        if stale is None:
            return
        if _kind(stale) != "vxlan":
            raise KernelError(f"temporary VXLAN name {tmp_name} is taken by a non-VXLAN interface in the "
                              f"host namespace")
        with _ignore(errno.ENODEV):
            host.link("del", index=stale["index"])

    @staticmethod
    def _ensure_bridge(ipr: IPRoute, name: str, gateway: ipaddress.IPv4Interface, mtu: int,
                       ours: bool) -> int:
        """Bridge `name` with `gateway` as its only address, `mtu`, up; returns its index.

        `ours`: an interface of that name that is not a bridge may be replaced (inside a sandbox
        everything is ours; in the host namespace it is not).
        """
        link = _get_link(ipr, name)
        if link is not None and _kind(link) != "bridge":
            if not ours:
                raise KernelError(f"an interface named {name} exists and is not a bridge")
            ipr.link("del", index=link["index"])
            link = None
        if link is None:
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            link = _get_link(ipr, name)
        _ensure_mtu(ipr, link, mtu)  # set explicitly, so the bridge does not follow its ports
        _ensure_ipv4(ipr, link["index"], gateway)
        _ensure_up(ipr, link)
        return link["index"]

    def delete_sandbox(self, path: str, tmp_name: str | None = None) -> None:
        """Remove the sandbox at `path` with everything in it (its endpoints' veths included).

        The devices are deleted one by one before the namespace goes, so the VXLAN device and its UDP
        socket in the host namespace are gone when this returns (a namespace is destroyed
        asynchronously). Idempotent.
        """
        self._claim_thread()
        if netns.is_netns(path):
            sb = self._sandbox(path)
            with _failing(f"delete sandbox {path}"):
                vx = _get_link(sb.ipr, SANDBOX_VXLAN)
                if vx is not None and _kind(vx) == "vxlan" and tmp_name is None:
                    tmp_name = default_tmp_name(vx.get(("linkinfo", "data", "vxlan_id")))
                # vxlan0 first (frees the host UDP socket), then veths (their container ends go too).
                links = sorted(sb.ipr.get_links(), key=lambda link: link.get("ifname") != SANDBOX_VXLAN)
                for link in links:
                    if link.get("ifname") != "lo":
                        with _ignore(errno.ENODEV):
                            sb.ipr.link("del", index=link["index"])
        self._forget(path)
        netns.delete_netns(path)
        if tmp_name is not None:
            with _failing(f"delete sandbox {path}: leftover {tmp_name}"):
                self._delete_tmp_vxlan(_check_ifname(tmp_name, "temporary VXLAN name"))

    # ---- endpoints ------------------------------------------------------------------------------

    def ensure_endpoint(self, sandbox_path: str, ctr_netns_path: str, host_ifname: str, ifname: str,
                        address_cidr: str, mac: str, mtu: int) -> None:
        """Attach a container to the overlay: a veth with `host_ifname` in the sandbox (port of br0, up)
        and `ifname` in the container (`address_cidr`, `mac`, `mtu`, up). No default route."""
        args = self._endpoint_args(host_ifname, ifname, address_cidr, mac, mtu)
        sb = self._sandbox(sandbox_path)
        what = f"overlay endpoint {host_ifname} in {sandbox_path}"
        with _failing(what):
            br = _get_link(sb.ipr, SANDBOX_BRIDGE)
        if br is None:
            raise KernelError(f"{what}: sandbox has no {SANDBOX_BRIDGE} (ensure_sandbox first)")
        self._ensure_veth(sb.ipr, ctr_netns_path, *args, master=br["index"], isolated=False,
                          gateway=None, what=what)

    def delete_endpoint(self, sandbox_path: str, host_ifname: str) -> None:
        """Delete the endpoint veth `host_ifname` of the sandbox (its container end goes with it).
        Idempotent, also when the sandbox is gone."""
        _check_ifname(host_ifname, "host interface name")
        self._claim_thread()
        if not netns.is_netns(sandbox_path):
            return
        sb = self._sandbox(sandbox_path)
        self._delete_veth(sb.ipr, host_ifname, f"delete overlay endpoint {host_ifname} in {sandbox_path}")

    @staticmethod
    def _endpoint_args(host_ifname: str, ifname: str, address_cidr: str, mac: str, mtu: int) -> tuple:
        return (_check_ifname(host_ifname, "host interface name"), _check_ifname(ifname),
                _interface(address_cidr), _mac(mac), _int_in(mtu, 68, 65535, "MTU"))

    def _ensure_veth(self, ipr: IPRoute, ctr_path: str, host_ifname: str, ifname: str,
                     address: ipaddress.IPv4Interface, mac: str, mtu: int, *, master: int,
                     isolated: bool, gateway: ipaddress.IPv4Address | None, what: str) -> None:
        """A veth between namespace `ipr` (end `host_ifname`, port of bridge `master`) and the container
        (end `ifname`); recreated unless both ends are one pair, then every setting checked."""
        ctr_fd = netns.open_netns(ctr_path)
        try:
            with _failing(what):
                cipr = _open_iproute(ctr_fd)
                try:
                    host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)
                    if not self._is_pair(ipr, host, peer, ctr_fd):
                        self._create_veth(ipr, cipr, ctr_fd, host, peer, host_ifname, ifname, mac, mtu)
                        host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)
                    # Our end.
                    _ensure_mtu(ipr, host, mtu)
                    if host.get("master") != master:
                        ipr.link("set", index=host["index"], master=master)
                        host = ipr.link("get", index=host["index"])[0]
                    want = {"isolated": int(isolated), "mode": 0}  # mode is hairpin: never
                    if any(host.get(("linkinfo", "slave_data", k)) != v for k, v in want.items()):
                        ipr.link("set", index=host["index"], kind="bridge_slave", **want)
                    _ensure_up(ipr, host)
                    # Container end.
                    if (peer.get("address") or "").lower() != mac:
                        cipr.link("set", index=peer["index"], address=mac)
                    _ensure_mtu(cipr, peer, mtu)
                    _ensure_ipv4(cipr, peer["index"], address)
                    _ensure_up(cipr, peer)
                    _ensure_up(cipr, _get_link(cipr, "lo"))
                    if gateway is not None:
                        self._ensure_default_route(cipr, peer["index"], gateway)
                finally:
                    _close_iproute(cipr)
        finally:
            os.close(ctr_fd)

    @staticmethod
    def _is_pair(ipr: IPRoute, host, peer, ctr_fd: int) -> bool:
        """True if `host` (in `ipr`'s namespace) and `peer` (container) are the two ends of one veth."""
        if host is None or peer is None or _kind(host) != "veth" or _kind(peer) != "veth":
            return False
        if host.get("link") != peer["index"] or peer.get("link") != host["index"]:
            return False
        # Indexes are per namespace; the peer's namespace id pins down which namespace.
        nsid = _nsid(ipr, ctr_fd)
        return nsid is not None and host.get("link_netnsid") == nsid

    @staticmethod
    def _create_veth(ipr: IPRoute, cipr: IPRoute, ctr_fd: int, host, peer, host_ifname: str, ifname: str,
                     mac: str, mtu: int) -> None:
        """Replace whatever holds the two names with a fresh veth pair, container end created in place."""
        deadline = time.monotonic() + EEXIST_RETRY_SECONDS
        while True:
            if host is not None and _kind(host) != "veth":
                raise KernelError(f"an interface named {host_ifname} exists and is not a veth")
            if peer is not None and _kind(peer) != "veth":
                raise KernelError(f"the container has an interface named {ifname} that is not a veth")
            # Stale ends: a half-made pair, or one whose other end is in a namespace being destroyed.
            for handle, link in ((ipr, host), (cipr, peer)):
                if link is not None:
                    with _ignore(errno.ENODEV):
                        handle.link("del", index=link["index"])
            try:
                ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu,
                         peer={"ifname": ifname, "net_ns_fd": ctr_fd, "address": mac, "mtu": mtu})
                return
            except NetlinkError as e:
                if e.code != errno.EEXIST or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
            host, peer = _get_link(ipr, host_ifname), _get_link(cipr, ifname)

    @staticmethod
    def _ensure_default_route(cipr: IPRoute, oif: int, gw: ipaddress.IPv4Address) -> None:
        defaults = [r for r in cipr.route("dump", family=socket.AF_INET)
                    if r["dst_len"] == 0 and (r.get("table") or r["table"]) == RT_TABLE_MAIN]
        if len(defaults) == 1 and defaults[0].get("gateway") == str(gw) and defaults[0].get("oif") == oif:
            return
        cipr.route("replace", dst="0.0.0.0/0", gateway=str(gw), oif=oif)

    @staticmethod
    def _delete_veth(ipr: IPRoute, name: str, what: str) -> None:
        with _failing(what):
            link = _get_link(ipr, name)
            if link is None:
                return
            if _kind(link) != "veth":
                raise KernelError("that interface is not a veth")
            with _ignore(errno.ENODEV):
                ipr.link("del", index=link["index"])

    # ---- remote endpoints -----------------------------------------------------------------------

    def add_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        """Program remote endpoints: FDB MAC -> VTEP, then neighbour IP -> MAC (replacing existing)."""
        peers = _peer_list(peers)
        sb = self._sandbox(sandbox_path)
        vx = self._vxlan_index(sb)
        with _failing(f"sandbox {sandbox_path}"):
            # FDB first, so an ARP answer (from the neighbour) never points at a MAC with nowhere to go.
            sb.nl.add_fdb(vx, [(p.mac, p.vtep) for p in peers])
            sb.nl.add_neighbours(vx, [(p.ip, p.mac) for p in peers])

    def remove_peers(self, sandbox_path: str, peers: Iterable[Peer]) -> None:
        """Remove remote endpoints (neighbour by IP, FDB entry by MAC and VTEP). Absent ones are fine."""
        peers = _peer_list(peers)
        if not netns.is_netns(sandbox_path):
            return  # nothing left to remove
        sb = self._sandbox(sandbox_path)
        with _failing(f"sandbox {sandbox_path}"):
            vx = _get_link(sb.ipr, SANDBOX_VXLAN)
            if vx is None or _kind(vx) != "vxlan":
                return  # no VXLAN device, no peers
            vx = vx["index"]
            sb.nl.delete_neighbours(vx, [p.ip for p in peers])
            sb.nl.delete_fdb(vx, [(p.mac, p.vtep) for p in peers])

    def list_peers(self, sandbox_path: str) -> set[Peer]:
        """Remote endpoints as the kernel has them: permanent neighbours on vxlan0 joined with its FDB
        entries by MAC."""
        sb = self._sandbox(sandbox_path)
        vx = self._vxlan_index(sb)
        with _failing(f"sandbox {sandbox_path}"):
            neighbours = sb.nl.neighbours(vx)
            fdb = sb.nl.fdb(vx)
        vteps = defaultdict(list)
        for mac, vtep in fdb:
            vteps[mac].append(vtep)
        return {Peer(ip, mac, vtep) for ip, mac in neighbours.items() for vtep in vteps.get(mac, ())}

    def sync_peers(self, sandbox_path: str, wanted: Iterable[Peer]) -> int:
        """Make the remote endpoints exactly `wanted`, changing only what differs. Neighbour and FDB
        tables are compared separately, so half-programmed peers (e.g. after a crash) are repaired too.
        Returns the number of kernel entries changed."""
        wanted = _peer_list(wanted)
        want_neigh: dict[str, str] = {}
        want_fdb: dict[str, str] = {}
        for p in wanted:
            if want_neigh.setdefault(p.ip, p.mac) != p.mac:
                raise InvalidRequest(f"peer IP {p.ip} listed with two MAC addresses")
            if want_fdb.setdefault(p.mac, p.vtep) != p.vtep:
                raise InvalidRequest(f"peer MAC {p.mac} listed with two VTEPs")
        sb = self._sandbox(sandbox_path)
        vx = self._vxlan_index(sb)
        with _failing(f"sandbox {sandbox_path}"):
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
        return len(stale_neigh) + len(stale_fdb) + len(new_fdb) + len(new_neigh)

    # ---- gateway bridge -------------------------------------------------------------------------

    def ensure_gwbridge(self, name: str, gateway_cidr: str, mtu: int) -> None:
        """The host's gateway bridge `name` with `gateway_cidr`, `mtu`, up; IPv4 forwarding on in the host
        namespace (egress is routed)."""
        _check_ifname(name, "gateway bridge name")
        gateway = _interface(gateway_cidr)
        _int_in(mtu, 68, 65535, "MTU")
        with _failing(f"gateway bridge {name}"):
            self._ensure_bridge(self._host, name, gateway, mtu, ours=False)
            self._set_ip_forward()

    def delete_gwbridge(self, name: str) -> None:
        """Delete the gateway bridge (its ports stay, detached). Idempotent."""
        _check_ifname(name, "gateway bridge name")
        ipr = self._host
        with _failing(f"delete gateway bridge {name}"):
            link = _get_link(ipr, name)
            if link is None:
                return
            if _kind(link) != "bridge":
                raise KernelError("that interface is not a bridge")
            with _ignore(errno.ENODEV):
                ipr.link("del", index=link["index"])

    def ensure_gw_endpoint(self, ctr_netns_path: str, bridge: str, host_ifname: str, ifname: str,
                           address_cidr: str, mac: str, mtu: int, gateway_ip: str) -> None:
        """Attach a container to the gateway bridge: veth `host_ifname` (isolated port of `bridge`, no
        hairpin) to `ifname` in the container with `address_cidr`, `mac`, `mtu` and the default route
        via `gateway_ip`."""
        args = self._endpoint_args(host_ifname, ifname, address_cidr, mac, mtu)
        _check_ifname(bridge, "gateway bridge name")
        gateway = ipaddress.IPv4Address(_ipv4(gateway_ip, "gateway address"))
        what = f"gateway endpoint {host_ifname}"
        ipr = self._host
        with _failing(what):
            br = _get_link(ipr, bridge)
        if br is None or _kind(br) != "bridge":
            raise KernelError(f"{what}: no gateway bridge {bridge} (ensure_gwbridge first)")
        self._ensure_veth(ipr, ctr_netns_path, *args, master=br["index"], isolated=True,
                          gateway=gateway, what=what)

    def delete_gw_endpoint(self, host_ifname: str) -> None:
        """Delete the gateway-bridge veth `host_ifname` (its container end goes with it). Idempotent."""
        _check_ifname(host_ifname, "host interface name")
        self._delete_veth(self._host, host_ifname, f"delete gateway endpoint {host_ifname}")

    def _set_ip_forward(self) -> None:
        with self._in_host():
            # /proc/sys/net belongs to the namespace of the thread that opens the file.
            with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
                if f.read().strip() != "1":
                    f.seek(0)
                    f.write("1\n")

    # ---- firewall -------------------------------------------------------------------------------

    def apply_overlay_firewall(self, gwbridge: str, gw_subnet: str) -> None:
        """Atomically replace nftables table `inet netweft-ov` (see render_overlay_firewall)."""
        self._nft_cmd(render_overlay_firewall(gwbridge, gw_subnet), f"nftables table {OVERLAY_TABLE}")

    def delete_overlay_firewall(self) -> None:
        """Delete nftables table `inet netweft-ov`. Idempotent."""
        self._nft_cmd(render_delete_overlay_firewall(), f"delete nftables table {OVERLAY_TABLE}")

    def _nft_cmd(self, cmd: dict, what: str) -> None:
        self._claim_thread()
        with self._in_host():
            if self._nft is None:
                import nftables  # pip-nftables over the system libnftables

                try:
                    # A libnftables context stays bound to the namespace it is first used in.
                    self._nft = nftables.Nftables()
                except OSError as e:
                    raise KernelError(f"{what}: cannot load libnftables: {e}") from None
            rc, _output, error = self._nft.json_cmd(cmd)
        if rc != 0:
            lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
            detail = lines[0] if lines else f"libnftables returned {rc}"
            if "Error:" in detail:  # "internal:0:0-0: Error: ..." — the location means nothing for JSON
                detail = detail[detail.index("Error:") + len("Error:"):].strip()
            raise KernelError(f"{what}: {detail}")


def _peer_list(peers: Iterable[Peer]) -> list[Peer]:
    peers = list(peers)
    for p in peers:
        if not isinstance(p, Peer):
            raise InvalidRequest(f"expected a Peer, got {p!r}")
    return peers
