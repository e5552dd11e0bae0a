"""The cluster store on etcd 3: the backend for several managers (issue 8).

Every object is the etcd key PREFIX + kind + "/" + key; its revisions are etcd's own, so the store
revision agents resume from is etcd's revision (an empty etcd is at revision 1, not 0). A
transaction is one etcd Txn (compares on mod_revision, mod_revision 0 = absent); a watch is one
etcd watch over the prefix from since+1 with prev_kv (a delete carries the last value), resumed
from the last revision seen when the connection drops, and Compacted when etcd has compacted past it.

We speak gRPC through aetcd's generated stubs (aetcd.rpc) on our own grpc.aio channel: aetcd's
Client opens only plaintext channels and hides the watch's compact_revision, both of which we need.
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import grpc
import msgspec
from aetcd import rpc

from netweft.errors import Unavailable
from netweft.store.api import (ClusterStore, Changes, Compacted, Compare, Delete, Event, Put, Record, TxnResult,
                               key_range)

PREFIX = "/netweft/"


class Member(msgspec.Struct, frozen=True):
    """One etcd member: its ID, name (empty until it started), peer and client URLs."""
    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]
TIMEOUT = 10.0       # seconds for one unary call (etcd answers in ms; longer means no quorum)
LEASE_TIMEOUT = 2.0  # seconds for a lease call: a leader that cannot renew in time steps down
RETRIES, RETRY_DELAY = 3, 0.2   # a call that found its member gone is tried again (on the next endpoint)
RECONNECT = 0.5      # seconds between two attempts to resume a broken watch
CHANNEL_GRACE = 10.0  # seconds calls in flight keep the old channel after a certificate renewal


class EtcdStore(ClusterStore):
    """endpoints: "HOST:PORT" strings (several: IP addresses, tried in turn). cacert/cert/key: PEM bytes
    for mutual TLS (cacert alone: server TLS only); none of them: plain http. server_name: the name
    the servers' certificates are checked for (default: the endpoint's host; needed with several)."""

    def __init__(self, endpoints: list[str], cacert: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, prefix: str = PREFIX, server_name: str | None = None):
        if not endpoints:
            raise ValueError("no etcd endpoint given: pass HOST:PORT")
        if (cert is None) != (key is None):
            raise ValueError("an etcd client certificate needs its key, and a key its certificate")
        if cert is not None and cacert is None:
            raise ValueError("an etcd client certificate needs the CA certificate (cacert) too")
        if not prefix.endswith("/"):
            raise ValueError(f"etcd key prefix {prefix!r} must end with '/'")
        self.prefix = prefix
        if len(endpoints) == 1:
            target = endpoints[0]
        else:  # gRPC's static resolver: pick_first over the list, so a dead member is skipped
            for ep in endpoints:
                host = ep.rpartition(":")[0]
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise ValueError(f"etcd endpoint {ep!r}: several endpoints must be IPv4:PORT") from None
            target = "ipv4:" + ",".join(endpoints)
        # Keepalive pings find a connection that went silent (a member cut off, no reset) within seconds, not
        # after TCP's retransmissions; etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
        keepalive = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 2000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
        self.target, self._server_name, self._keepalive = target, server_name, keepalive
        self._open_channel(cacert, cert, key)
        self._closed = False
        self._watches: set[asyncio.Future] = set()
        self._moved: set = set()        # watch calls ended to move to a new channel (renew_credentials)

    def _open_channel(self, cacert: bytes | None, cert: bytes | None, key: bytes | None) -> None:
        if cacert is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._keepalive)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=cacert, private_key=key, certificate_chain=cert)
            # With several endpoints gRPC has no single host name to check the servers' certificates
            # against: server_name names the one every member's certificate carries.
            opts = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
            self._channel = grpc.aio.secure_channel(self.target, creds, options=opts + self._keepalive)
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._cluster = rpc.ClusterStub(self._channel)

    def renew_credentials(self, cacert: bytes, cert: bytes, key: bytes, grace: float = CHANNEL_GRACE) -> None:
        """Present a renewed client certificate: gRPC fixes a channel's credentials, so calls from now on go
        over a new channel; the watches resume on it at once (from their last revision), calls in flight
        finish on the old one, which closes after `grace` seconds."""
        self._check_open()
        old = self._channel
        self._open_channel(cacert, cert, key)
        for call in list(self._watches):
            self._moved.add(call)
            call.cancel()
        asyncio.get_running_loop().call_later(grace, lambda: asyncio.ensure_future(old.close()))

    # ---------------------------------------------------------------- keys
    def _key(self, kind: str, key: str) -> bytes:
        if not kind or "/" in kind:
            raise ValueError(f"object kind {kind!r} must be a non-empty name without '/'")
        return (self.prefix + kind + "/" + key).encode()

    def _split(self, ekey: bytes) -> tuple[str, str]:
        kind, _, key = ekey.decode()[len(self.prefix):].partition("/")
        return kind, key

    def _key_range(self, kind: str, prefix: str) -> tuple[bytes, bytes]:
        start, end = key_range(self._key(kind, prefix).decode())
        return start.encode(), end.encode()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cluster store is closed")

    def _unavailable(self, e: grpc.aio.AioRpcError) -> Unavailable:
        """gRPC's error as one line for a person (its own text is a multi-line debug string)."""
        details = " ".join((e.details() or "").split())[:120]
        if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED) or "no leader" in details:
            return Unavailable(f"the cluster store (etcd at {self.target}) has no quorum here "
                               f"({e.code().name}: {details or 'no answer'}): this manager is cut off from the "
                               "others, or too few managers are up; retry, or use another manager")
        if "unhealthy cluster" in details:
            return Unavailable(f"etcd at {self.target} refuses: {details}")
        return Unavailable(f"the cluster store (etcd at {self.target}) failed the call ({e.code().name}): "
                           "check that etcd is running, reachable and trusts this node's certificate")

    async def _range(self, req):
        return await self._unary(self._kv.Range, req)

    async def _unary(self, method, req, timeout: float = TIMEOUT):
        """One call; UNAVAILABLE (the member we were connected to went away: gRPC fails the call, then picks
        the next endpoint) is retried a few times before it is an error. A transaction retried this way
        may have landed the first time: its compares then fail, and the caller re-reads and decides again."""
        self._check_open()
        for attempt in range(RETRIES + 1):
            try:
                return await method(req, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRIES or self._closed:
                    raise self._unavailable(e) from None
            await asyncio.sleep(RETRY_DELAY)

    # ---------------------------------------------------------------- reads
    async def get(self, kind: str, key: str) -> Record | None:
        resp = await self._range(rpc.RangeRequest(key=self._key(kind, key)))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return Record(kind, key, kv.value, kv.create_revision, kv.mod_revision)

    async def list(self, kind: str, prefix: str = "") -> tuple[int, list[Record]]:
        start, end = self._key_range(kind, prefix)
        # One Range: the objects and the revision come from one snapshot; etcd returns them ordered by key.
        resp = await self._range(rpc.RangeRequest(key=start, range_end=end))
        return resp.header.revision, [Record(kind, self._split(kv.key)[1], kv.value, kv.create_revision,
                                             kv.mod_revision) for kv in resp.kvs]

    async def snapshot(self, kinds: tuple[str, ...]) -> tuple[int, dict[str, list[Record]]]:
        # One Range over the whole prefix: every kind from one etcd snapshot.
        start, end = self._range_all()
        resp = await self._range(rpc.RangeRequest(key=start, range_end=end))
        out: dict[str, list[Record]] = {k: [] for k in kinds}
        for kv in resp.kvs:
            kind, key = self._split(kv.key)
            if kind in out:
                out[kind].append(Record(kind, key, kv.value, kv.create_revision, kv.mod_revision))
        return resp.header.revision, out

    async def revision(self) -> int:
        # count_only over our (maybe empty) prefix: just the header, whatever the store holds
        resp = await self._range(rpc.RangeRequest(key=self.prefix.encode(), count_only=True))
        return resp.header.revision

    # ---------------------------------------------------------------- writes
    async def txn(self, compares: list[Compare], ops: list[Put | Delete]) -> TxnResult:
        keys = [(op.kind, op.key) for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError("a transaction may name each key once")
        self._check_open()
        req = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=self._key(c.kind, c.key),
                                 mod_revision=c.mod_rev) for c in compares],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(op.kind, op.key), value=op.value,
                                                              lease=op.lease))
                     if isinstance(op, Put) else
                     rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key(op.kind, op.key)))
                     for op in ops])
        # A txn that changes nothing (only deletes of absent keys) makes no new etcd revision, as in SQLite.
        resp = await self._unary(self._kv.Txn, req)
        return TxnResult(resp.succeeded, resp.header.revision)

    async def compact(self, rev: int) -> None:
        """Forget the history up to rev (the objects stay); a watch from before it gets Compacted.
        A revision already compacted is no error."""
        try:
            await self._unary(self._kv.Compact, rpc.CompactionRequest(revision=rev))
        except Unavailable as e:
            if "OUT_OF_RANGE" not in str(e):
                raise

    # ---------------------------------------------------------------- leases
    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ttl seconds; objects put with it go when it expires or is revoked."""
        resp = await self._unary(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), timeout=LEASE_TIMEOUT)
        return resp.ID

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease: its TTL afresh, or 0 if it has expired (its objects are gone)."""
        self._check_open()
        call = self._lease.LeaseKeepAlive(timeout=LEASE_TIMEOUT)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            resp = await call.read()
            return 0 if resp is grpc.aio.EOF else resp.TTL
        except grpc.aio.AioRpcError as e:
            raise self._unavailable(e) from None
        finally:
            call.cancel()

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self._unary(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease), timeout=LEASE_TIMEOUT)
        except Unavailable:
            pass  # it expires by itself

    # ---------------------------------------------------------------- members
    async def members(self) -> list[Member]:
        resp = await self._unary(self._cluster.MemberList, rpc.MemberListRequest())
        return [Member(m.ID, m.name, list(m.peerURLs), list(m.clientURLs)) for m in resp.members]

    async def member_add(self, peer_url: str) -> tuple[int, list[Member]]:
        """Add a member (it starts afterwards with --initial-cluster-state existing); its ID and all members."""
        resp = await self._unary(self._cluster.MemberAdd, rpc.MemberAddRequest(peerURLs=[peer_url]))
        return resp.member.ID, [Member(m.ID, m.name, list(m.peerURLs), list(m.clientURLs)) for m in resp.members]

    async def member_remove(self, member_id: int) -> bool:
        """Remove a member; False if there was no such member."""
        try:
            await self._unary(self._cluster.MemberRemove, rpc.MemberRemoveRequest(ID=member_id))
        except Unavailable as e:
            if "NOT_FOUND" in str(e):
                return False
            raise
        return True

    # ---------------------------------------------------------------- watch
    async def watch(self, since: int) -> AsyncIterator[Changes]:
        start, end = self._range_all()
        last = since
        while not self._closed:
            call = self._watch.Watch()
            self._watches.add(call)
            try:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=start, range_end=end, start_revision=last + 1, prev_kv=True)))
                async for resp in call:
                    if resp.compact_revision and resp.canceled:
                        raise Compacted(last, resp.compact_revision)
                    if resp.canceled:
                        raise RuntimeError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
                    for changes in self._group(resp.events):
                        if changes.rev > last:  # a resumed watch may repeat nothing, but be sure
                            yield changes
                            last = changes.rev
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                if self._closed:
                    return  # closed under us: the watch ends
                if call in self._moved:   # moved to a renewed channel: resume there now
                    self._moved.discard(call)
                    self._watches.discard(call)
                    continue
                if isinstance(e, asyncio.CancelledError):
                    raise
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._unavailable(e) from None
            finally:
                self._watches.discard(call)
                call.cancel()
            if self._closed:
                return
            await asyncio.sleep(RECONNECT)  # the member went away: resume from `last` (on another one)

    def _range_all(self) -> tuple[bytes, bytes]:
        start, end = key_range(self.prefix)
        return start.encode(), end.encode()

    def _group(self, events) -> list[Changes]:
        """etcd's events (one revision's events always arrive in one response) as Changes per revision."""
        out: list[Changes] = []
        for ev in events:
            rev = ev.kv.mod_revision  # for a delete: the revision of the delete
            if not out or out[-1].rev != rev:
                out.append(Changes(rev, []))
            kind, key = self._split(ev.kv.key)
            if ev.type == rpc.Event.DELETE:
                out[-1].events.append(Event(rev, kind, key, "delete", ev.prev_kv.value))
            else:
                out[-1].events.append(Event(rev, kind, key, "put", ev.kv.value))
        return out

    # ---------------------------------------------------------------- close
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for call in list(self._watches):
            call.cancel()
        await self._channel.close()
