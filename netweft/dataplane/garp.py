"""ARP announcements into a sandbox bridge when an endpoint appears, so nobody waits for an ARP retry.

A container that sent to an address before that address's endpoint was programmed (a client retrying a
service that is starting, `ping` started before `run`) holds an INCOMPLETE neighbour entry, and its
kernel asks again only after `retrans_time` (1 s by default), and after three misses gives up until the
next packet. So however fast an endpoint propagates, the first reply would wait up to a second. A
gratuitous ARP reply (sender = target = the new address, to the broadcast address) sent out of the
sandbox bridge reaches every container of the network on this host, and Linux updates an entry it
already has from any ARP it receives: the waiting one resolves at once and its queued packets leave.
With `arp_accept` at its default (0) no entry is created, so containers that never asked learn nothing.

A reply and not a request: the VXLAN device answers requests itself (`proxy`), which would echo each
announcement back into the bridge. The frame's Ethernet source is the bridge's own MAC (receivers read the
address from the ARP body): with the endpoint's MAC there, a bridge beyond the first one (bridgechain.py)
would learn the endpoint on its link to the first bridge and drop the endpoint's traffic. Sending is best
effort: the kernel's own retry is still there.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ARP_REPLY = 2
# Bounds the frames one call floods (a resync after a restart can bring thousands of entries, and
# entries that old are not what anybody is waiting for).
MAX_PER_CALL = 256
# An announcement is flooded to every port of the bridge (chain), and each container's kernel takes it in:
# with thousands of containers on a network on one host, each one cost tens of ms of CPU, on every run
# (the largest cost that grew with the count, measured with py-spy in bench/bench_scale.py). Past this
# many ports none is sent; a container that asked too early then has the kernel's own retry (≤ 1 s).
MAX_FLOOD_PORTS = 128
SIOCGIFHWADDR = 0x8927


def announcement(ip: str, mac: str, source: bytes) -> bytes:
    """The Ethernet frame, from MAC `source` (6 bytes), announcing that `ip` is at `mac` (42 bytes). Both come
    checked (Peer, endpoint arguments); a wrong length is a ValueError all the same."""
    hw = bytes.fromhex(mac.replace(":", ""))
    if len(hw) != 6 or len(source) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    addr = ipaddress.IPv4Address(ip).packed
    arp = (b"\x00\x01"              # hardware: Ethernet
           + b"\x08\x00"            # protocol: IPv4
           + b"\x06\x04"            # address lengths
           + ARP_REPLY.to_bytes(2, "big")
           + hw + addr              # sender
           + hw + addr)             # target: the same, as gratuitous ARP has it
    return BROADCAST + source + ETH_P_ARP.to_bytes(2, "big") + arp


class Announcer:
    """A packet socket of one namespace (opened by the caller inside it) that announces addresses on one
    of its interfaces."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def open(cls) -> "Announcer":
        """In the calling thread's network namespace. Send-only: protocol 0 receives nothing."""
        return cls(socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0))

    def announce(self, ifname: str, entries) -> int:
        """Send one announcement per (ip, mac), at most MAX_PER_CALL; the number sent. Failures are
        ignored (best effort, see the module docstring)."""
        sent = 0
        source = self.mac_of(ifname)
        if source is None:
            return 0   # no such interface (yet)
        for ip, mac in list(entries)[:MAX_PER_CALL]:
            try:
                self.sock.sendto(announcement(ip, mac, source), (ifname, 0))
            except (OSError, ValueError):
                break   # the interface is gone or down: the rest would fail the same way
            sent += 1
        return sent

    def mac_of(self, ifname: str) -> bytes | None:
        """The interface's MAC address in the socket's namespace, None if there is no such interface."""
        try:
            return fcntl.ioctl(self.sock.fileno(), SIOCGIFHWADDR, struct.pack("16s16x", ifname.encode()))[18:24]
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()
