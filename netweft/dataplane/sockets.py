"""Sockets opened inside another network namespace: how the host's resolver listens in each container.

A socket belongs to the namespace of the thread that created it, for its whole life, whichever thread
or namespace uses it afterwards. So the kernel thread steps into the container's namespace, creates and
binds the sockets, and steps back; the daemon's loop then serves them like any other socket.
"""
from __future__ import annotations

import os
import socket

from netweft.dataplane import netns
from netweft.errors import KernelError

DNS_ADDRESS = "127.0.0.11"
DNS_PORT = 53


def open_dns_sockets(netns_path: str, address: str = DNS_ADDRESS, port: int = DNS_PORT) -> tuple[socket.socket,
                                                                                                  socket.socket]:
    """(UDP socket, listening TCP socket) bound to address:port inside the namespace at netns_path."""
    fd = netns.open_netns(netns_path)
    udp = tcp = None
    try:
        with netns.entered(fd):
            try:
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.bind((address, port))
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((address, port))
                tcp.listen(64)
            except OSError as e:
                for s in (udp, tcp):
                    if s is not None:
                        s.close()
                raise KernelError(f"cannot listen on {address}:{port} in namespace {netns_path}: "
                                  f"{e.strerror}") from None
    finally:
        os.close(fd)
    udp.setblocking(False)
    tcp.setblocking(False)
    return udp, tcp
