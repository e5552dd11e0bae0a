"""A container's veth made in a handful of hand-packed netlink messages: the fast path of an attach.

The general path (nlutil.ensure_veth and ensure_container_end) reads before it writes, so that it can
repair anything half made; through pyroute2 that is about twenty requests and two netlink handles per
endpoint, the largest CPU cost of `netweft run` (measured with py-spy in bench_run_ping.py). A fresh
container has nothing to repair. So an attach first tries to make the pair in one go:

  in the bridge's namespace: one RTM_NEWLINK creating the veth exclusively (host end up and enslaved,
  container end created in the container's namespace with its MAC and MTU), then the port flags;
  in the container's namespace: the address, the link up, loopback up and the default route, one batch.

Anything unexpected (a name taken, any refusal) answers False, and the caller goes the general way,
which finds what was made and finishes or replaces it. So this path never decides anything the general
one would decide differently.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from netweft.dataplane import netns
from netweft.dataplane.nlbatch import (_HDR, _IFINFO, IFLA_IFNAME, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_MASTER,
                                       NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR,
                                       RTM_NEWLINK, NeighBatch, mac_bytes, open_route_socket)
from netweft.errors import KernelError

NLM_F_EXCL = 0x200
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_MTU, IFLA_NET_NS_FD = 1, 4, 28
IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE, IFLA_BRPORT_ISOLATED = 4, 33     # mode is hairpin
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
LOOPBACK_INDEX = 1   # in every network namespace

_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_TIMEOUT = 5.0
# Sequence numbers of our own, far above those of nlbatch's NeighBatch, whose socket we may share: an
# answer that comes late to one never passes for an answer to the other.
_SEQ_BASE = 1 << 30
_next_seq = _SEQ_BASE


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(ifname: str) -> bytes:
    return ifname.encode() + b"\0"


def _msg(mtype: int, flags: int, body: bytes) -> bytes:
    return _HDR.pack(16 + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK | flags, 0, 0) + body


def veth_create(host_ifname: str, ifname: str, peer_fd: int, mac: str, mtu: int, master: int) -> bytes:
    """RTM_NEWLINK: the pair, exclusively; host end up in `master`, the other in namespace `peer_fd`."""
    peer = (_IFINFO.pack(0, 0, 0, 0, 0) + nla(IFLA_IFNAME, _name(ifname)) + nla(IFLA_NET_NS_FD, struct.pack("=I", peer_fd))
            + nla(IFLA_ADDRESS, mac_bytes(mac)) + nla(IFLA_MTU, struct.pack("=I", mtu)))
    info = nla(IFLA_INFO_KIND, b"veth\0") + nla(IFLA_INFO_DATA, nla(VETH_INFO_PEER, peer))
    body = (_IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + nla(IFLA_IFNAME, _name(host_ifname))
            + nla(IFLA_MTU, struct.pack("=I", mtu)) + nla(IFLA_MASTER, struct.pack("=I", master))
            + nla(IFLA_LINKINFO, info))
    return _msg(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def port_flags(host_ifname: str, isolated: bool) -> bytes:
    """RTM_NEWLINK on an existing bridge port: isolated or not, hairpin off."""
    data = nla(IFLA_BRPORT_ISOLATED, bytes([int(isolated)])) + nla(IFLA_BRPORT_MODE, b"\0")
    info = nla(IFLA_INFO_SLAVE_KIND, b"bridge\0") + nla(IFLA_INFO_SLAVE_DATA, data)
    return _msg(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0) + nla(IFLA_IFNAME, _name(host_ifname))
                + nla(IFLA_LINKINFO, info))


def link_up(index: int) -> bytes:
    return _msg(RTM_NEWLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP))


def address_add(index: int, address: ipaddress.IPv4Interface) -> bytes:
    ip = address.ip.packed
    body = (_IFADDR.pack(socket.AF_INET, address.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + nla(IFA_LOCAL, ip) + nla(IFA_ADDRESS, ip) + nla(IFA_BROADCAST, address.network.broadcast_address.packed))
    return _msg(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)


def default_route(index: int, gateway: ipaddress.IPv4Address) -> bytes:
    body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
            + nla(RTA_GATEWAY, gateway.packed) + nla(RTA_OIF, struct.pack("=I", index)))
    return _msg(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


def exchange(sock: socket.socket, messages: list[bytes]) -> tuple[list[int], dict[int, bytes]]:
    """Send the messages in one write and read every answer: (error code per message, 0 for success;
    {index from 1: data message} for requests that answer with one, e.g. RTM_GETLINK)."""
    global _next_seq
    base = _next_seq - 1
    _next_seq = _SEQ_BASE if _next_seq > (1 << 31) else _next_seq + len(messages)
    out = bytearray()
    for i, m in enumerate(messages, 1):
        out += m[:8] + struct.pack("=I", base + i) + m[12:]
    sock.send(out)
    codes: dict[int, int] = {}
    data: dict[int, bytes] = {}
    buf = bytearray(65536)
    while len(codes) < len(messages):
        n = sock.recv_into(buf)
        off = 0
        while off + 16 <= n:
            length, mtype, _flags, seq, _pid = _HDR.unpack_from(buf, off)
            if length < 16:
                break
            seq -= base
            if 1 <= seq <= len(messages):
                if mtype == NLMSG_ERROR:
                    codes[seq] = -struct.unpack_from("=i", buf, off + 16)[0]
                else:
                    data[seq] = bytes(buf[off:off + length])
            off += (length + 3) & ~3
    return [codes[s] for s in range(1, len(messages) + 1)], data


def _batch_in(fd: int) -> NeighBatch:
    with netns.entered(fd):
        sock = open_route_socket()
    sock.settimeout(_TIMEOUT)
    return NeighBatch(sock)


def create_fresh(host_sock: socket.socket, ctr_fd: int, host_ifname: str, ifname: str, mac: str, mtu: int, *,
                 master: int, isolated: bool, address: ipaddress.IPv4Interface,
                 gateway: ipaddress.IPv4Address | None) -> bool:
    """Make the whole endpoint if neither name exists yet; False (nothing decided) otherwise, or on any
    refusal: the caller's general path then finds what is there and completes or replaces it."""
    try:
        codes, _ = exchange(host_sock, [veth_create(host_ifname, ifname, ctr_fd, mac, mtu, master)])
        if codes[0]:
            return False
        if isolated:   # a new port is not isolated and has no hairpin: only isolation needs a message
            codes, _ = exchange(host_sock, [port_flags(host_ifname, True)])
            if codes[0]:
                return False
        nl = _batch_in(ctr_fd)
        try:
            link = nl.link(ifname)
            if link is None:
                return False
            index = link[0]
            msgs = [address_add(index, address), link_up(index), link_up(LOOPBACK_INDEX)]
            if gateway is not None:
                msgs.append(default_route(index, gateway))
            codes, _ = exchange(nl.sock, msgs)
        finally:
            nl.close()
        return not any(codes)
    except (OSError, ValueError, struct.error, KernelError):
        return False
