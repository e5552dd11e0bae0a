"""The host's one resolver: 127.0.0.11 in every container on a user network, served by the daemon's loop.

How queries reach it: no process runs in a container and no packet is rewritten. For each container
the daemon opens a UDP socket and a TCP listener bound to 127.0.0.11:53 *inside the container's
network namespace* (a socket belongs to the namespace it was created in, and keeps working from a
thread anywhere once made: DataPlane.open_dns_sockets), and serves them all from its own event loop.
A container's lo holds 127.0.0.0/8, so its queries to 127.0.0.11 land on that socket; nothing from
outside the container can reach a loopback address in it. The socket a query arrives on says who
asked, so the answer is scoped to the asker's networks without looking at addresses. The cost per
container is two file descriptors and no nftables rule; a query costs one dictionary lookup when the
answer was given before (the answer cache, per set of networks, emptied when a name changes) and a
hand-read question plus one lookup per network otherwise.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Iterable

from dnslib import QTYPE, RCODE

from netweft.dns import wire
from netweft.dns.forward import Forwarder
from netweft.dns.names import NameRecord, NameTable

log = logging.getLogger("netweft.dns")

CACHE_ENTRIES = 4096          # per scope; emptied when full (a flood of distinct names costs no memory)
TCP_IDLE = 10.0               # seconds a TCP client may keep a connection without asking
TCP_CLIENTS = 16              # connections at once per container
MAX_FORWARDS_PER_ASKER = 64   # forwarded queries at once per container (the Forwarder has a host-wide cap)
READ_BATCH = 64               # UDP queries read per wake-up of one socket


class Scope:
    """The networks of some containers; those with the same networks share a scope and its cache."""
    __slots__ = ("networks", "cache", "generation", "users")

    def __init__(self, networks: tuple[str, ...]):
        self.networks = networks
        self.cache: dict[bytes, bytes] = {}   # query without its ID -> answer without its ID
        self.generation = -1
        self.users = 0


class _Asker:
    """One container's sockets. UDP is read straight off the socket (add_reader, up to a batch of
    queries per wake-up): asyncio's datagram transport costs about half the time of a cached answer."""
    __slots__ = ("resolver", "key", "sock", "scope", "forwards", "tcp", "tcp_tasks", "tcp_clients", "closed", "loop")

    def __init__(self, resolver: "Resolver", key: str, sock: socket.socket):
        self.resolver, self.key, self.sock = resolver, key, sock
        self.scope: Scope | None = None
        self.forwards = 0
        self.tcp: socket.socket | None = None   # the listener: accepted from add_reader (an asyncio Server per
        self.tcp_tasks: set[asyncio.Task] | None = None   # container costs ~1 KiB of objects and closures)
        self.tcp_clients = 0
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def readable(self) -> None:
        sock, resolver = self.sock, self.resolver
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # e.g. ECONNREFUSED reported for an earlier answer: nothing to do
                continue
            scope = self.scope
            if scope is None:
                continue
            answer = resolver.answer(data, scope, wire.UDP_LIMIT)
            if answer:
                self._send(answer, addr)
            elif answer == b"":
                continue
            elif self.forwards < MAX_FORWARDS_PER_ASKER:
                self.forwards += 1
                self.loop.create_task(self._forward(data, addr))
            else:
                refused = wire.error_reply(data, RCODE.SERVFAIL)
                if refused is not None:
                    self._send(refused, addr)

    def _send(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:   # a full buffer or a vanished asker: the client retries
            pass

    async def _forward(self, data: bytes, addr) -> None:
        try:
            answer = await self.resolver.forward(data, tcp=False)
            if answer is not None and not self.closed:
                self._send(answer, addr)
        finally:
            self.forwards -= 1

    def acceptable(self) -> None:
        try:
            conn, _ = self.tcp.accept()
        except OSError:   # nothing to accept after all, or the client gave up
            return
        if self.tcp_clients >= TCP_CLIENTS or self.closed:
            conn.close()
            return
        conn.setblocking(False)
        task = self.loop.create_task(self._serve_conn(conn))
        if self.tcp_tasks is None:
            self.tcp_tasks = set()
        self.tcp_tasks.add(task)
        task.add_done_callback(self.tcp_tasks.discard)

    async def _serve_conn(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        await self.serve_tcp(reader, writer)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.tcp_clients >= TCP_CLIENTS:
            writer.close()
            return
        self.tcp_clients += 1
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE))[0]
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                scope = self.scope
                if scope is None:
                    break
                answer = self.resolver.answer(data, scope, 65535)
                if answer == b"":
                    break
                if answer is None:
                    answer = await self.resolver.forward(data, tcp=True)
                if answer is None:
                    break
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self.tcp_clients -= 1
            writer.close()


class Resolver:
    def __init__(self, forwarder: Forwarder, table: NameTable | None = None):
        self.forwarder = forwarder
        self.table = table or NameTable()
        self._askers: dict[str, _Asker] = {}
        self._scopes: dict[tuple[str, ...], Scope] = {}

    # ------------------------------------------------------------------ containers
    async def attach(self, key: str, udp: socket.socket, tcp: socket.socket | None, networks: Iterable[str]) -> None:
        """Serve a container's sockets (it takes them over), answering from `networks`."""
        self.detach(key)
        loop = asyncio.get_running_loop()
        udp.setblocking(False)
        asker = _Asker(self, key, udp)
        asker.loop = loop
        loop.add_reader(udp.fileno(), asker.readable)
        if tcp is not None:
            tcp.setblocking(False)
            tcp.listen(TCP_CLIENTS)
            asker.tcp = tcp
            loop.add_reader(tcp.fileno(), asker.acceptable)
        self._askers[key] = asker
        self.set_networks(key, networks)

    def set_networks(self, key: str, networks: Iterable[str]) -> None:
        asker = self._askers.get(key)
        if asker is None:
            return
        if asker.scope is not None:
            self._release(asker.scope)
        nets = tuple(dict.fromkeys(networks))
        scope = self._scopes.get(nets)
        if scope is None:
            scope = self._scopes[nets] = Scope(nets)
        scope.users += 1
        asker.scope = scope

    def _release(self, scope: Scope) -> None:
        scope.users -= 1
        if scope.users <= 0:
            self._scopes.pop(scope.networks, None)

    def detach(self, key: str) -> None:
        asker = self._askers.pop(key, None)
        if asker is None:
            return
        if asker.scope is not None:
            self._release(asker.scope)
            asker.scope = None
        asker.closed = True
        asker.loop.remove_reader(asker.sock.fileno())
        asker.sock.close()
        if asker.tcp is not None:
            asker.loop.remove_reader(asker.tcp.fileno())
            asker.tcp.close()
            for task in list(asker.tcp_tasks or ()):
                task.cancel()

    def attached(self) -> list[str]:
        return list(self._askers)

    def networks_of(self, key: str) -> tuple[str, ...] | None:
        asker = self._askers.get(key)
        return asker.scope.networks if asker is not None and asker.scope is not None else None

    # ------------------------------------------------------------------ names
    def set_network(self, net_id: str, records: Iterable[NameRecord]) -> bool:
        return self.table.set_network(net_id, records)

    def update_network(self, net_id: str, changes: dict) -> bool:
        return self.table.update_network(net_id, changes)

    def remove_network(self, net_id: str) -> bool:
        return self.table.remove_network(net_id)

    # ------------------------------------------------------------------ answering
    def answer(self, data: bytes, scope: Scope, limit: int) -> bytes | None:
        """The answer from the table (or an error answer), or None: not a name of the asker's networks,
        forward it. Malformed messages get b"" (no answer at all)."""
        if scope.generation != self.table.generation:
            scope.cache.clear()
            scope.generation = self.table.generation
        key = data[2:]
        hit = scope.cache.get(key)
        if hit is not None:
            return data[:2] + hit
        q = wire.read_question(data)
        if q is not None and q.qtype == wire.TYPE_A and q.qclass == wire.CLASS_IN:
            addrs = self.table.lookup(scope.networks, q.name)
            if addrs is None:
                return None
            answer = wire.answer_a(data, q, addrs)
        else:
            answer = self._slow(data, scope, limit)
            if answer is None or answer == b"":
                return answer
        if limit == wire.UDP_LIMIT:   # a TCP answer may be larger than UDP allows: not cached
            if len(scope.cache) >= CACHE_ENTRIES:
                scope.cache.clear()
            scope.cache[key] = answer[2:]
        return answer

    def _slow(self, data: bytes, scope: Scope, limit: int) -> bytes | None:
        req = wire.parse(data)
        if req is None or req.header.qr:
            return b""
        if req.header.opcode != 0 or len(req.questions) != 1:
            return wire.reply(req, rcode=RCODE.NOTIMP if req.header.opcode else RCODE.FORMERR)
        q = req.q
        name = str(q.qname)
        limit = min(limit, wire.udp_limit(req)) if limit == wire.UDP_LIMIT else limit
        if q.qtype == QTYPE.PTR:
            ptr = self.table.lookup_ptr(scope.networks, name)
            return wire.reply(req, ptr=ptr, limit=limit) if ptr is not None else None
        addrs = self.table.lookup(scope.networks, name)
        if addrs is None:
            return None
        # A name of ours: A records for A (and ANY), nothing for other types (no IPv6 here).
        return wire.reply(req, addresses=addrs if q.qtype in (QTYPE.A, QTYPE.ANY) else (), limit=limit)

    async def forward(self, data: bytes, tcp: bool) -> bytes | None:
        answer = await self.forwarder.query(data, tcp=tcp)
        if answer is None:
            return wire.error_reply(data, RCODE.SERVFAIL)
        return answer

    def close(self) -> None:
        for key in list(self._askers):
            self.detach(key)
        self.forwarder.close()
