"""Forwarding: names the cluster does not know go to the host's resolvers, from the host's namespace.

Limits, as a stub resolver's user expects them: each upstream gets TIMEOUT seconds, in order, so an
answer (or SERVFAIL) comes well before glibc's own 5 s retry; at most MAX_IN_FLIGHT forwarded queries
at once for the whole host (a container flooding unknown names gets SERVFAIL beyond that, the others
keep their share of the table's answers, which never wait on this). UDP queries go out of one socket
under fresh random IDs; an answer is taken only from the upstream it was sent to, with the ID and the
question sent (anything else on the socket is ignored). A truncated answer is passed on as it is: the
client asks again over TCP, and TCP queries are forwarded over TCP.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import struct

log = logging.getLogger("netweft.dns")

TIMEOUT = 2.0
MAX_IN_FLIGHT = 1024
DNS_PORT = 53


def question_bytes(data: bytes) -> bytes | None:
    """The question section's bytes (name, type, class) of a one-question message, lowercased, or None."""
    if len(data) < 12 or struct.unpack_from("!H", data, 4)[0] != 1:
        return None
    i = 12
    while i < len(data):
        n = data[i]
        if n == 0:
            end = i + 5
            return data[12:end].lower() if end <= len(data) else None
        if n > 63:
            return None
        i += 1 + n
    return None


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, forwarder: "Forwarder"):
        self.forwarder = forwarder

    def datagram_received(self, data: bytes, addr) -> None:
        self.forwarder._on_answer(data, addr)

    def error_received(self, exc: Exception) -> None:   # ICMP unreachable: the waiting query times out
        pass


class Forwarder:
    def __init__(self, upstreams: list[str], timeout: float = TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT,
                 port: int = DNS_PORT):
        self.upstreams = list(upstreams)
        self.timeout, self.max_in_flight, self.port = timeout, max_in_flight, port
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, tuple[asyncio.Future, tuple[str, int], bytes]] = {}
        self.in_flight = 0

    async def _socket(self) -> asyncio.DatagramTransport:
        if self._transport is None or self._transport.is_closing():
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: _Upstream(self),
                                                                     local_addr=("0.0.0.0", 0))
        return self._transport

    def _on_answer(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        qid = struct.unpack_from("!H", data)[0]
        pending = self._pending.get(qid)
        if pending is None:
            return
        fut, sent_to, question = pending
        if (addr[0], addr[1]) != sent_to or question_bytes(data) != question or not data[2] & 0x80:
            return   # not the answer we wait for (spoofed, stray, or a query): keep waiting
        if not fut.done():
            fut.set_result(data)

    async def query(self, data: bytes, tcp: bool = False) -> bytes | None:
        """The upstreams' answer to a query (with the asker's ID), or None if none answered in time or
        too many queries are in flight (the caller answers SERVFAIL)."""
        question = question_bytes(data)
        if question is None or not self.upstreams or self.in_flight >= self.max_in_flight:
            return None
        self.in_flight += 1
        try:
            for server in self.upstreams:
                try:
                    answer = await (self._tcp(server, data) if tcp else self._udp(server, data, question))
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    answer = None
                if answer is not None:
                    return data[:2] + answer[2:]
            return None
        finally:
            self.in_flight -= 1

    async def _udp(self, server: str, data: bytes, question: bytes) -> bytes | None:
        transport = await self._socket()
        loop = asyncio.get_running_loop()
        qid = secrets.randbelow(65536)
        while qid in self._pending:
            qid = secrets.randbelow(65536)
        fut = loop.create_future()
        target = (server, self.port)
        self._pending[qid] = (fut, target, question)
        try:
            transport.sendto(struct.pack("!H", qid) + data[2:], target)
            return await asyncio.wait_for(fut, self.timeout)
        finally:
            del self._pending[qid]

    async def _tcp(self, server: str, data: bytes) -> bytes | None:
        async def ask() -> bytes:
            reader, writer = await asyncio.open_connection(server, self.port)
            try:
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                return await reader.readexactly(size)
            finally:
                writer.close()
        answer = await asyncio.wait_for(ask(), self.timeout)
        return answer if question_bytes(answer) == question_bytes(data) and answer[:2] == data[:2] else None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
