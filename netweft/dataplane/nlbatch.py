"""Bulk neighbour and FDB programming with hand-packed netlink messages.

pyroute2 spends ≈220 µs of Python per message encoding it (FIELD-NOTES), which caps a remote-endpoint
update at ≈2,200 FDB+neighbour pairs/s. Here each message is one struct.pack; messages go to the kernel in
batches of a few hundred per send(), and every message carries NLM_F_ACK, so the kernel answers each one
and we check every answer. The first refusal is reported with what it was about.

Reads are plain dumps parsed with struct, for the same reason (a 10,000-entry dump through pyroute2 takes
seconds).

Only what the overlay needs: permanent IPv4 neighbours (`ip neigh replace IP lladdr MAC dev vxlan0 nud
permanent`), VXLAN FDB entries (`bridge fdb replace MAC dev vxlan0 dst VTEP self permanent`), and many links
deleted at once (`ip link set DEV group G` for each, then `ip link del group G`: `rm -f` of thousands).
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import socket
import struct
from collections.abc import Callable, Sequence

from netweft.errors import KernelError

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10   # error answers do not echo the whole request back
NETLINK_EXT_ACK = 11   # the kernel says why it refused, in a TLV after the error

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100   # in an error answer: the request was not echoed (NETLINK_CAP_ACK)
NLM_F_ACK_TLVS = 0x200  # in an error answer: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30

NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

AF_INET = socket.AF_INET
AF_BRIDGE = 7

BATCH = 256                # messages per send(); their answers must fit in the receive buffer
RCVBUF = 8 * 1024 * 1024   # room for a batch of answers (each one costs ≈1 KB of buffer) and big dumps
TIMEOUT = 10.0             # seconds to wait for the kernel before giving up

_HDR = struct.Struct("=IHHII")            # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")        # ifinfomsg: family, type, index, flags, change
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_GROUP = 27
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
_NDMSG = struct.Struct("=BxxxiHBB")       # ndmsg: family, ifindex, state, flags, type
_NLA = struct.Struct("=HH")               # nlattr: len, type
_ERR = struct.Struct("=i")
# Whole messages, so building one costs a single pack. Attributes are 4-byte aligned: a MAC (6 bytes)
# takes 2 bytes of padding.
_NEIGH_ADD = struct.Struct("=IHHII BxxxiHBB HH4s HH6sxx")   # dst, lladdr
_NEIGH_DEL = struct.Struct("=IHHII BxxxiHBB HH4s")          # dst
_FDB = struct.Struct("=IHHII BxxxiHBB HH6sxx HH4s")         # lladdr, dst

_ADD_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE  # replace: idempotent
_DEL_FLAGS = NLM_F_REQUEST | NLM_F_ACK


def ip_bytes(ip: str) -> bytes:
    return socket.inet_pton(AF_INET, ip)


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    return raw


def _mac_str(raw: bytes) -> str:
    return raw.hex(":")


def open_route_socket() -> socket.socket:
    """A raw NETLINK_ROUTE socket in the calling thread's namespace, set up for batches."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        try:
            # FORCE ignores rmem_max (we are root); fall back to what is allowed.
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass  # older kernels: answers are bigger / less informative, still correct
        sock.settimeout(TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


class NeighBatch:
    """Bulk neighbour/FDB work over one raw netlink socket (in whatever namespace it was opened)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._seq = 0
        # Anonymous pages: only what big answers ever filled is resident (a bytearray holds 1 MiB per handle).
        self._buf = mmap.mmap(-1, 1 << 20)

    def close(self) -> None:
        self._sock.close()

    @property
    def sock(self) -> socket.socket:
        """The raw socket, for nlveth's few messages (its sequence numbers never meet ours)."""
        return self._sock

    # ---- writes ---------------------------------------------------------------------------------

    def add_neighbours(self, ifindex: int, entries: Sequence[tuple[str, str]]) -> None:
        """Permanent IPv4 neighbours (ip, mac) on `ifindex`; an existing entry is replaced."""
        pack = _NEIGH_ADD.pack

        def build(e: tuple[str, str], seq: int) -> bytes:
            return pack(_NEIGH_ADD.size, RTM_NEWNEIGH, _ADD_FLAGS, seq, 0, AF_INET, ifindex, NUD_PERMANENT,
                        0, 0, 8, NDA_DST, ip_bytes(e[0]), 10, NDA_LLADDR, mac_bytes(e[1]))

        self._execute(entries, build, lambda e: f"add neighbour {e[0]} lladdr {e[1]}")

    def delete_neighbours(self, ifindex: int, ips: Sequence[str]) -> None:
        """Delete IPv4 neighbours on `ifindex`; ones already gone are fine."""
        pack = _NEIGH_DEL.pack

        def build(ip: str, seq: int) -> bytes:
            return pack(_NEIGH_DEL.size, RTM_DELNEIGH, _DEL_FLAGS, seq, 0, AF_INET, ifindex, 0, 0, 0,
                        8, NDA_DST, ip_bytes(ip))

        self._execute(ips, build, lambda ip: f"delete neighbour {ip}", ignore=(errno.ENOENT,))

    def add_fdb(self, ifindex: int, entries: Sequence[tuple[str, str]]) -> None:
        """Static FDB entries (mac, vtep) on VXLAN device `ifindex` (`self permanent`); replaces."""
        pack = _FDB.pack

        def build(e: tuple[str, str], seq: int) -> bytes:
            return pack(_FDB.size, RTM_NEWNEIGH, _ADD_FLAGS, seq, 0, AF_BRIDGE, ifindex, NUD_PERMANENT,
                        NTF_SELF, 0, 10, NDA_LLADDR, mac_bytes(e[0]), 8, NDA_DST, ip_bytes(e[1]))

        self._execute(entries, build, lambda e: f"add fdb {e[0]} dst {e[1]}")

    def delete_fdb(self, ifindex: int, entries: Sequence[tuple[str, str]]) -> None:
        """Delete FDB entries (mac, vtep) from VXLAN device `ifindex`; ones already gone are fine."""
        pack = _FDB.pack

        def build(e: tuple[str, str], seq: int) -> bytes:
            return pack(_FDB.size, RTM_DELNEIGH, _DEL_FLAGS, seq, 0, AF_BRIDGE, ifindex, 0,
                        NTF_SELF, 0, 10, NDA_LLADDR, mac_bytes(e[0]), 8, NDA_DST, ip_bytes(e[1]))

        self._execute(entries, build, lambda e: f"delete fdb {e[0]} dst {e[1]}", ignore=(errno.ENOENT,))

    def delete_links(self, indexes: Sequence[int]) -> None:
        """Delete links by index, all in one unregister: deleting a link waits for an RCU grace period
        (≈20 ms here), the kernel's group delete waits once for the lot. They are moved into a link group
        of their own (a random one: 0, the default, is everyone's), then the group is deleted. Links
        already gone are fine."""
        indexes = list(indexes)
        if not indexes:
            return
        group = (1 << 30) + secrets.randbelow(1 << 30)

        def move(index: int, seq: int) -> bytes:
            body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _NLA.pack(8, IFLA_GROUP) + struct.pack("=I", group)
            return _HDR.pack(16 + len(body), RTM_NEWLINK, _DEL_FLAGS, seq, 0) + body

        def delete(g: int, seq: int) -> bytes:
            body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _NLA.pack(8, IFLA_GROUP) + struct.pack("=I", g)
            return _HDR.pack(16 + len(body), RTM_DELLINK, _DEL_FLAGS, seq, 0) + body

        self._execute(indexes, move, lambda i: f"move link {i} into group {group}", ignore=(errno.ENODEV,))
        self._execute([group], delete, lambda g: f"delete link group {g}", ignore=(errno.ENODEV,))

    def _execute(self, items: Sequence, build: Callable[[object, int], bytes],
                 describe: Callable[[object], str], ignore: tuple[int, ...] = ()) -> None:
        items = list(items)
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            base = self._seq + 1
            self._seq += len(chunk)
            try:
                data = b"".join([build(item, base + i) for i, item in enumerate(chunk)])
            except (ValueError, OSError, struct.error) as e:
                raise KernelError(f"cannot encode netlink request: {e}") from None
            try:
                self._sock.send(data)
                errors = self._acks(base, len(chunk))
            except OSError as e:
                raise KernelError(f"{describe(chunk[0])} (batch of {len(chunk)}): netlink: "
                                  f"{_strerror(e)}") from None
            for seq in sorted(errors):
                code, text = errors[seq]
                if code not in ignore:
                    detail = os.strerror(code) + (f" ({text})" if text else "")
                    raise KernelError(f"{describe(chunk[seq - base])}: {detail}")

    def _acks(self, base: int, count: int) -> dict[int, tuple[int, str]]:
        """Wait for the answers to messages base..base+count-1; return the refusals by seq."""
        pending = count
        errors: dict[int, tuple[int, str]] = {}
        buf = self._buf
        view = memoryview(buf)
        while pending:
            n = self._sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                length, mtype, flags, seq, _pid = _HDR.unpack_from(buf, off)
                if length < 16:
                    break
                if mtype == NLMSG_ERROR and base <= seq < base + count:
                    pending -= 1
                    code = -_ERR.unpack_from(buf, off + 16)[0]
                    if code:
                        errors[seq] = (code, _ext_ack_text(view[off:off + length], flags))
                # Anything else (answers to an earlier, abandoned batch) is stale: skip it.
                off += (length + 3) & ~3
        return errors

    # ---- reads ----------------------------------------------------------------------------------

    def neighbours(self, ifindex: int) -> dict[str, str]:
        """Permanent IPv4 neighbours on `ifindex`: ip -> mac."""
        request = _NDMSG.pack(AF_INET, 0, 0, 0, 0) + _NLA.pack(8, NDA_IFINDEX) + struct.pack("=I", ifindex)
        out = {}
        for family, idx, state, _flags, attrs in self._dump(request):
            if family == AF_INET and idx == ifindex and state & NUD_PERMANENT \
                    and NDA_DST in attrs and NDA_LLADDR in attrs:
                out[socket.inet_ntop(AF_INET, attrs[NDA_DST])] = _mac_str(attrs[NDA_LLADDR])
        return out

    def fdb(self, ifindex: int) -> set[tuple[str, str]]:
        """The VXLAN device's own FDB entries with an IPv4 destination: {(mac, vtep)}."""
        # A bare ndmsg dumps every FDB of the namespace (only our sandbox's few devices); filter here.
        request = _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)
        out = set()
        for family, idx, _state, flags, attrs in self._dump(request):
            dst = attrs.get(NDA_DST)
            if family == AF_BRIDGE and idx == ifindex and flags & NTF_SELF and dst is not None \
                    and len(dst) == 4 and NDA_LLADDR in attrs:
                out.add((_mac_str(attrs[NDA_LLADDR]), socket.inet_ntop(AF_INET, dst)))
        return out

    def links(self, master: int | None = None, kind: str | None = None) -> list[tuple[int, str, str, int]]:
        """The namespace's links as (index, name, kind, master index or 0), without their statistics.
        `master` / `kind`: only the ports of that bridge / links of that kind (filtered by the kernel).
        A pyroute2 dump decodes every attribute of every link: seconds for thousands of veths."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _NLA.pack(8, IFLA_EXT_MASK) \
            + struct.pack("=I", RTEXT_FILTER_SKIP_STATS)
        if master is not None:
            body += _NLA.pack(8, IFLA_MASTER) + struct.pack("=I", master)
        if kind is not None:
            k = kind.encode() + b"\0"
            inner = _NLA.pack(4 + len(k), IFLA_INFO_KIND) + k + b"\0" * (-len(k) % 4)
            body += _NLA.pack(4 + len(inner), IFLA_LINKINFO) + inner
        return self._dump(body, RTM_GETLINK, "links")

    def link(self, name: str) -> tuple[int, str, str, int] | None:
        """One link by name, as links() gives it, or None if there is none (a few µs: no dump, no pyroute2)."""
        raw = name.encode() + b"\0"
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _NLA.pack(8, IFLA_EXT_MASK) \
            + struct.pack("=I", RTEXT_FILTER_SKIP_STATS) + _NLA.pack(4 + len(raw), IFLA_IFNAME) + raw \
            + b"\0" * (-len(raw) % 4)
        self._seq += 1
        seq = self._seq
        try:
            self._sock.send(_HDR.pack(16 + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body)
            buf = self._buf
            while True:
                n = self._sock.recv_into(buf)
                off = 0
                while off + 16 <= n:
                    length, mtype, _flags, mseq, _pid = _HDR.unpack_from(buf, off)
                    if length < 16:
                        break
                    if mseq == seq:
                        if mtype == NLMSG_ERROR:
                            code = -_ERR.unpack_from(buf, off + 16)[0]
                            if code == errno.ENODEV:
                                return None
                            raise OSError(code, os.strerror(code))
                        if mtype == RTM_NEWLINK:
                            return _link(buf, off, length)
                    off += (length + 3) & ~3
        except OSError as e:
            raise KernelError(f"get link {name}: netlink: {_strerror(e)}") from None

    def _dump(self, body: bytes, request: int = RTM_GETNEIGH, what: str = "neighbours") -> list:
        # The kernel flags a dump that raced with a change (NLM_F_DUMP_INTR); read it again then.
        for _ in range(10):
            try:
                entries, interrupted = self._dump_once(body, request)
            except OSError as e:
                raise KernelError(f"dump {what}: netlink: {_strerror(e)}") from None
            if not interrupted:
                return entries
        raise KernelError(f"dump {what}: table kept changing during the dump")

    def _dump_once(self, body: bytes, request: int = RTM_GETNEIGH) -> tuple[list, bool]:
        self._seq += 1
        seq = self._seq
        self._sock.send(_HDR.pack(16 + len(body), request, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        entries = []
        interrupted = False
        buf = self._buf
        while True:
            n = self._sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                length, mtype, flags, mseq, _pid = _HDR.unpack_from(buf, off)
                if length < 16:
                    break
                if mseq == seq:
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if mtype == NLMSG_DONE:
                        return entries, interrupted
                    if mtype == NLMSG_ERROR:
                        code = -_ERR.unpack_from(buf, off + 16)[0]
                        raise OSError(code, os.strerror(code))
                    if mtype == RTM_NEWNEIGH:
                        family, idx, state, nflags, _type = _NDMSG.unpack_from(buf, off + 16)
                        entries.append((family, idx, state, nflags, _attrs(buf, off + 28, off + length)))
                    elif mtype == RTM_NEWLINK:
                        entries.append(_link(buf, off, length))
                off += (length + 3) & ~3


def _link(buf: bytearray, off: int, length: int) -> tuple[int, str, str, int]:
    """(index, name, kind, master) of one RTM_NEWLINK message; only the attributes needed are read."""
    index = _IFINFO.unpack_from(buf, off + 16)[2]
    name, kind, master = "", "", 0
    a, end = off + 32, off + length
    unpack = _NLA.unpack_from
    while a + 4 <= end:
        alen, atype = unpack(buf, a)
        if alen < 4:
            break
        atype &= 0x3FFF
        if atype == IFLA_IFNAME:
            name = bytes(buf[a + 4:a + alen]).rstrip(b"\0").decode(errors="replace")
        elif atype == IFLA_MASTER:
            master = struct.unpack_from("=I", buf, a + 4)[0]
        elif atype == IFLA_LINKINFO:
            kind_raw = _attrs(buf, a + 4, a + alen).get(IFLA_INFO_KIND)
            kind = kind_raw.rstrip(b"\0").decode(errors="replace") if kind_raw else ""
        a += (alen + 3) & ~3
    return index, name, kind, master


def _attrs(buf: bytearray, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4:
            break
        out[atype & 0x3FFF] = bytes(buf[off + 4:off + alen])  # drop NLA_F_NESTED / NET_BYTEORDER bits
        off += (alen + 3) & ~3
    return out


def _ext_ack_text(msg: memoryview, flags: int) -> str:
    """The kernel's explanation in an error answer, if it gave one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # error code (4) + the request's header (16), or the whole request if it was not capped.
    if flags & NLM_F_CAPPED:
        off = 16 + 4 + 16
    else:
        off = 16 + 4 + _HDR.unpack_from(msg, 20)[0]
    for atype, value in _attrs(bytearray(msg), off, len(msg)).items():
        if atype == NLMSGERR_ATTR_MSG:
            return value.rstrip(b"\0").decode(errors="replace")
    return ""


def _strerror(e: OSError) -> str:
    if isinstance(e, TimeoutError) or e.errno is None:
        return "no answer from the kernel"
    if e.errno == errno.ENOBUFS:
        return "receive buffer overflowed, answers were lost (safe to retry)"
    return os.strerror(e.errno)

