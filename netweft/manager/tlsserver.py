"""Serve an aiohttp app over TLS, logging refused handshakes with their reason (one line per address
per interval, with how many were held back: a stranger cannot flood the log).

asyncio only logs TLS handshake failures in debug mode; a cluster operator needs to see
"peer X presented a certificate of another cluster" in the daemon log. So we accept plain
TCP, upgrade each connection with loop.start_tls() ourselves, and log what fails.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import ssl
from asyncio import sslproto

from aiohttp import web

from netweft.manager.auth import LogThrottle

log = logging.getLogger("netweft.cluster.tls")

# Bytes a connection may hold unsent (in the TLS layer, and again in the socket's transport) before its
# writer waits for the peer: with thousands of watch streams, a slow reader costs at most about this.
WRITE_BUFFER = 32 << 10
# asyncio's TLS layer keeps a 256 KiB read buffer per connection: a quarter of a MiB of RSS for every
# agent's watch and every kept-alive call, 0.5 GiB at 1,000 hosts. A TLS record is at most 16 KiB, and
# what agents send is small (a heartbeat is under 1 KiB): one record per read is enough.
READ_BUFFER = 16 << 10


# asyncio encrypts each write whole into the connection's outgoing memory BIO, and OpenSSL's memory BIO keeps
# the capacity of the largest write for the connection's life (measured: a 448-KiB snapshot written once
# leaves 455 KiB per connection). Encrypted and handed to the socket a TLS record's worth at a time, every
# connection keeps about 20 KiB, whatever was written through it.
WRITE_PIECE = 16 << 10


class _LeanTLS(sslproto.SSLProtocol):
    max_size = READ_BUFFER

    def _do_write(self):
        try:
            while self._write_backlog:
                data = self._write_backlog[0]
                piece = data if len(data) <= WRITE_PIECE else memoryview(data)[:WRITE_PIECE]
                count = self._sslobj.write(piece)
                if count < len(data):
                    self._write_backlog[0] = memoryview(data)[count:]
                    self._write_buffer_size -= count
                else:
                    del self._write_backlog[0]
                    self._write_buffer_size -= len(data)
                self._process_outgoing()
        except sslproto.SSLAgainErrors:
            pass
        self._process_outgoing()


async def _start_tls(loop, transport: asyncio.Transport, protocol, ctx: ssl.SSLContext, timeout: float):
    """loop.start_tls(server_side=True) with the lean read buffer (the same steps as asyncio's)."""
    waiter = loop.create_future()
    tls = _LeanTLS(loop, protocol, ctx, waiter, server_side=True, ssl_handshake_timeout=timeout,
                   call_connection_made=False)
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resume.cancel()
        raise
    return tls._app_transport


class _Gate(asyncio.Protocol):
    def __init__(self, factory, ctx: ssl.SSLContext, handshake_timeout: float, throttle: LogThrottle):
        self.factory, self.ctx, self.timeout, self.throttle = factory, ctx, handshake_timeout, throttle

    def connection_made(self, transport: asyncio.Transport) -> None:
        # Hold the ClientHello until start_tls has put its protocol in place.
        transport.pause_reading()
        asyncio.ensure_future(self._upgrade(transport))

    def data_received(self, data: bytes) -> None:  # never reached: reading is paused until TLS takes over
        pass

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        app_protocol = self.factory()
        try:
            tls = await _start_tls(asyncio.get_running_loop(), transport, app_protocol, self.ctx, self.timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
            held = self.throttle.admit(peer[0] if peer else "?")  # one line per address per interval
            if held is not None:
                log.warning("TLS handshake refused", extra={"peer": f"{peer[0]}:{peer[1]}" if peer else "?",
                                                            "reason": _reason(e), "not_logged_before": held})
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        tls.set_write_buffer_limits(high=WRITE_BUFFER)
        app_protocol.connection_made(tls)


def _reason(e: BaseException) -> str:
    text = getattr(e, "reason", None) or str(e) or type(e).__name__
    if "TLSV1_ALERT_UNKNOWN_CA" in text or "tlsv1 alert unknown ca" in text.lower():
        return "the peer does not trust this cluster's CA (it belongs to another cluster)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return "the peer's certificate is not from this cluster's CA, or it has expired"
    return text


# Agents' connections are moved to file descriptors from this one up. A library that still waits with
# select() aborts the whole process on a descriptor past FD_SETSIZE (glibc: "bit out of range 0 -
# FD_SETSIZE on fd_set"): libnftables 1.0.6 does, and a manager serving 1,000 agents (two connections each)
# otherwise hands it descriptor 2,000 when it opens a namespace's nftables socket after they connected.
SELECT_FDS = 1024


class _HighFdListener(socket.socket):
    """A listening socket whose accepted connections get descriptors >= SELECT_FDS (while the limit allows)."""

    def accept(self):
        conn, addr = super().accept()
        try:
            fd = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, SELECT_FDS)
        except OSError:   # the descriptor limit is at or below SELECT_FDS: keep the one we have
            return conn, addr
        high = socket.socket(conn.family, conn.type, conn.proto, fileno=fd)
        conn.close()
        return high, addr


def listener(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = _HighFdListener(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_tls(runner: web.AppRunner, host: str, port: int, ctx: ssl.SSLContext,
                    handshake_timeout: float = 10.0) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    throttle = LogThrottle()
    # No TLS 1.3 session tickets: no client of the managers resumes a session (a ticket made before a manager
    # restart could not be read after it anyway), and making the two OpenSSL sends by default (the session, the
    # client's certificate in it, encrypted) was a third of the server's CPU per mutual-TLS handshake here
    # (3.4 -> 2.3 ms, OpenSSL 3.0): 1,000 agents reconnecting after a restart is 2,000 handshakes.
    ctx.num_tickets = 0
    return await loop.create_server(lambda: _Gate(runner.server, ctx, handshake_timeout, throttle),
                                    sock=listener(host, port))
