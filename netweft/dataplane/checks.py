"""Argument checks shared by the real and the fake data plane, so both refuse the same requests.

Pure: no kernel, no pyroute2. Every refusal is an InvalidRequest with one line, raised before anything
changes.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable

from netweft.errors import InvalidRequest
from netweft.model.objects import Peer

IFNAMSIZ = 15
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}\Z")


def check_ifname(name: str, what: str = "interface name") -> str:
    if not isinstance(name, str) or not name or len(name.encode()) > IFNAMSIZ or "/" in name \
            or any(c.isspace() for c in name) or name in (".", ".."):
        raise InvalidRequest(f"invalid {what} {name!r} (1-{IFNAMSIZ} bytes, no '/' or spaces)")
    return name


def parse_interface(address: str) -> ipaddress.IPv4Interface:
    """An IPv4 address with prefix length (e.g. 198.18.0.5/24) that can be given to an interface."""
    try:
        if not isinstance(address, str):
            raise TypeError
        iface = ipaddress.IPv4Interface(address)
    except (ValueError, TypeError):
        raise InvalidRequest(f"invalid IPv4 address {address!r}, expected e.g. 198.18.0.5/24") from None
    if "/" not in address:
        raise InvalidRequest(f"address {address!r} needs a prefix length, e.g. {address}/24")
    if iface.network.prefixlen == 0 or iface.ip.is_unspecified or iface.ip.is_multicast or iface.ip.is_loopback:
        raise InvalidRequest(f"address {address} cannot be given to an interface")
    return iface


def parse_mac(mac: str) -> str:
    """A unicast MAC address written as six hex pairs, in lower case."""
    low = mac.lower() if isinstance(mac, str) else ""
    if not _MAC_RE.match(low):
        raise InvalidRequest(f"invalid MAC address {mac!r}")
    # The zero MAC as a peer's would be the VXLAN default destination (all flooding to one VTEP).
    if low == "ff:ff:ff:ff:ff:ff":
        raise InvalidRequest(f"MAC address {mac} is the broadcast address")
    if int(low[:2], 16) & 1:
        raise InvalidRequest(f"MAC address {mac} is multicast")
    if low == "00:00:00:00:00:00":
        raise InvalidRequest(f"MAC address {mac} is all zeros")
    return low


def unicast_mac(mac: str) -> bool:
    """True for a well-formed MAC that can be a host's (not zero, broadcast or multicast)."""
    try:
        parse_mac(mac)
    except InvalidRequest:
        return False
    return True


def ipv4(address: str, what: str = "IPv4 address") -> str:
    """A dotted-quad IPv4 address in canonical form."""
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address))
    except (OSError, TypeError):
        raise InvalidRequest(f"invalid {what} {address!r}") from None


def int_in(value: int, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"invalid {what} {value!r} (expected {low}-{high})")
    return value


def check_mtu(mtu: int) -> int:
    return int_in(mtu, 68, 65535, "MTU")


def check_path(path: str, what: str = "namespace path") -> str:
    """An absolute path for a pinned namespace."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or path.rstrip("/") == "":
        raise InvalidRequest(f"invalid {what} {path!r} (an absolute file path)")
    return path


def default_tmp_name(vni: int) -> str:
    """Host-namespace name a new VXLAN device has before it moves into its sandbox (VNI is unique per
    host and port, so this is too)."""
    return f"nwt-vx{vni:06x}"


def make_peer(ip: str, mac: str, vtep: str) -> Peer:
    """A Peer in canonical form (what the kernel reports back), or InvalidRequest."""
    try:
        return _canonical_peer(ip, mac, vtep)
    except TypeError:  # an unhashable field (a list...): not a peer
        raise InvalidRequest(f"invalid peer {(ip, mac, vtep)!r}") from None


@functools.lru_cache(maxsize=1 << 16)  # the same peers reach every host: checked once (Peers are immutable)
def _canonical_peer(ip: str, mac: str, vtep: str) -> Peer:
    return Peer(ipv4(ip, "peer IP"), parse_mac(mac), ipv4(vtep, "VTEP address"))


def check_peers(peers: Iterable[Peer]) -> list[Peer]:
    """The peers, each a netweft.model.objects.Peer, in canonical form. (A Struct made in Python is not
    validated by msgspec, so every field is checked here.)

    A peer whose MAC is well formed but not a host's (zero, broadcast, multicast) is left out rather
    than refused: programmed, it would take the network's flooded traffic; refused, one such record
    (forged, or stored before managers refused it) would stop every other peer of its network."""
    out = []
    for p in peers:
        if not isinstance(p, Peer):
            raise InvalidRequest(f"expected a Peer, got {p!r}")
        if isinstance(p.mac, str) and _MAC_RE.match(p.mac.lower()) and not unicast_mac(p.mac):
            continue
        out.append(make_peer(p.ip, p.mac, p.vtep))
    return out


def peer_tables(peers: list[Peer]) -> tuple[dict[str, str], dict[str, str]]:
    """The neighbour table (ip -> mac) and FDB (mac -> vtep) that `peers` ask for; a peer set that
    contradicts itself is refused."""
    neigh: dict[str, str] = {}
    fdb: dict[str, str] = {}
    for p in peers:
        if neigh.setdefault(p.ip, p.mac) != p.mac:
            raise InvalidRequest(f"peer IP {p.ip} listed with two MAC addresses")
        if fdb.setdefault(p.mac, p.vtep) != p.vtep:
            raise InvalidRequest(f"peer MAC {p.mac} listed with two VTEPs")
    return neigh, fdb
