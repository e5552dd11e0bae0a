"""Data-path probes: small frames sent host to host through VXLAN itself, so that what they measure is
what containers get (a firewall dropping the data path's UDP port, an MTU black hole), not only whether
a host answers.

How: every host has one probe device, `nwprobe`, a VXLAN device on the data path's UDP port with a VNI
that no overlay may use (PROBE_VNI), learning off, no address, in the host namespace. A probe is sent by
encapsulating it here, in user space, and sending it with a plain UDP socket to the peer's VTEP and the
data path's port, with Don't Fragment set: on the wire it is the same UDP as an overlay's traffic, same
port, same size up to the underlay MTU. The peer's kernel decapsulates it (its VXLAN socket owns the
port) and hands it to its probe device, where a packet socket reads it; the answer goes back the same
way. So there are no FDB entries to program and no address to allocate: one device, two sockets, and
frames of ethertype ETHERTYPE only.

The wire format is pure (encode/parse below, unit-tested); `RealProbeChannel` is the I/O. Every frame
read is hostile until parsed: wrong ethertype, magic, version, length or node ID is dropped silently
(it costs nothing to drop, and telling a sender why would make us a reflector).
"""
from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from netweft.validate import PROBE_VNI  # noqa: F401 (reserved: overlays are refused it)

PROBE_DEVICE = "nwprobe"
ETHERTYPE = 0x88B5            # IEEE 802 local experimental ethertype: never a container's traffic
MAGIC = b"NWPR"
VERSION = 1
REQUEST, REPLY = 1, 2
ETH_HEADER = 14
VXLAN_HEADER = 8
_HEAD = struct.Struct("!4sBBIQ")          # magic, version, kind, seq, timestamp (sender's, ns)
_NODE_RE = re.compile(rb"\A[a-z0-9]{1,64}\Z")
MIN_FRAME = ETH_HEADER + _HEAD.size + 2 + 2   # the smallest frame that can carry two one-letter node IDs
BROADCAST = b"\xff" * 6
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2   # linux/in.h: set DF, never fragment locally
SOL_PACKET_ETH = socket.htons(ETHERTYPE)


@dataclass(frozen=True)
class Probe:
    kind: int          # REQUEST or REPLY
    seq: int
    sent_ns: int       # the requester's clock, echoed by the reply
    src: str           # node ID of the frame's sender
    dst: str           # node ID it is meant for
    size: int          # the whole inner frame, Ethernet header included


def node_mac(node_id: str) -> bytes:
    """A locally administered unicast MAC derived from a node ID (the probe frames' source address)."""
    import hashlib
    h = bytearray(hashlib.sha256(node_id.encode()).digest()[:6])
    h[0] = (h[0] & 0xFE) | 0x02
    return bytes(h)


def encode(p: Probe, dst_mac: bytes = BROADCAST) -> bytes:
    """The inner Ethernet frame of a probe, padded with zeros to p.size."""
    src, dst = p.src.encode(), p.dst.encode()
    if not (_NODE_RE.match(src) and _NODE_RE.match(dst)):
        raise ValueError("probe node IDs must be 1-64 lowercase letters and digits")
    body = _HEAD.pack(MAGIC, VERSION, p.kind, p.seq & 0xFFFFFFFF, p.sent_ns & (2**64 - 1)) + \
        bytes([len(src)]) + src + bytes([len(dst)]) + dst
    frame = dst_mac + node_mac(p.src) + struct.pack("!H", ETHERTYPE) + body
    if p.size < len(frame):
        raise ValueError(f"a probe frame needs at least {len(frame)} bytes")
    return frame + bytes(p.size - len(frame))


def parse(frame: bytes) -> Probe | None:
    """A probe frame as read from the probe device, or None for anything else."""
    if len(frame) < MIN_FRAME or frame[12:14] != struct.pack("!H", ETHERTYPE):
        return None
    off = ETH_HEADER
    magic, version, kind, seq, sent = _HEAD.unpack_from(frame, off)
    if magic != MAGIC or version != VERSION or kind not in (REQUEST, REPLY):
        return None
    off += _HEAD.size
    ids = []
    for _ in range(2):
        n = frame[off]
        raw = frame[off + 1:off + 1 + n]
        if len(raw) != n or not _NODE_RE.match(raw):
            return None
        ids.append(raw.decode())
        off += 1 + n
    return Probe(kind, seq, sent, ids[0], ids[1], len(frame))


def vxlan_header(vni: int) -> bytes:
    """RFC 7348: flags (I bit), 24 reserved bits, the VNI, 8 reserved bits."""
    return struct.pack("!II", 0x08000000, (vni & 0xFFFFFF) << 8)


class RealProbeChannel:
    """The two sockets of the probe device: a packet socket reading probe frames from `nwprobe` and a UDP
    socket sending encapsulated ones with DF. Made in the host namespace (the kernel thread); used from
    the event loop (non-blocking; the loop watches the packet socket)."""

    def __init__(self, rx: socket.socket, tx: socket.socket, port: int, vni: int):
        self.rx, self.tx, self.port = rx, tx, port
        self._vxlan = vxlan_header(vni)
        self._loop = None

    @classmethod
    def open(cls, ifname: str, local_ip: str, port: int, vni: int) -> "RealProbeChannel":
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, SOL_PACKET_ETH)
        try:
            rx.bind((ifname, ETHERTYPE))
            rx.setblocking(False)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tx.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
                tx.bind((local_ip, 0))
                tx.setblocking(False)
            except BaseException:
                tx.close()
                raise
        except BaseException:
            rx.close()
            raise
        return cls(rx, tx, port, vni)

    def start(self, loop, on_frame: Callable[[bytes], None]) -> None:
        self._loop = loop

        def readable() -> None:
            for _ in range(256):   # a burst is read in one go, a flood does not starve the loop
                try:
                    frame = self.rx.recv(65536)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                on_frame(frame)
        loop.add_reader(self.rx.fileno(), readable)

    def send(self, vtep: str, frame: bytes) -> str | None:
        """Send one frame to a peer's VTEP; None, or a few words why it could not leave this host."""
        try:
            self.tx.sendto(self._vxlan + frame, (vtep, self.port))
            return None
        except BlockingIOError:
            return "the send queue is full"
        except OSError as e:
            if e.errno == 90:   # EMSGSIZE: DF and larger than this host's route MTU
                return "larger than this host's route MTU"
            return (e.strerror or "send failed").lower()

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.rx.fileno())
            except (ValueError, OSError):
                pass
            self._loop = None
        self.rx.close()
        self.tx.close()
