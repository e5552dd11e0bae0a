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
from aetcd import rpc

from netweft.errors import Unavailable
from netweft.store.api import (ClusterStore, Changes, Compacted, Compare, Delete, Event, Put, Record, TxnResult,
                               key_range)

PREFIX = "/netweft/"
TIMEOUT = 10.0       # seconds for one unary call (etcd answers in ms; longer means no quorum)
RECONNECT = 0.5      # seconds between two attempts to resume a broken watch


class EtcdStore(ClusterStore):
    """endpoints: "HOST:PORT" strings (several: IP addresses, tried in turn). cacert/cert/key: PEM bytes
    for mutual TLS (cacert alone: server TLS only); none of them: plain http."""

    def __init__(self, endpoints: list[str], cacert: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None, prefix: str = PREFIX):
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
        if cacert is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=cacert, private_key=key, certificate_chain=cert)
            self._channel = grpc.aio.secure_channel(target, creds)
        self.target = target
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._closed = False
        self._watches: set[asyncio.Future] = set()

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
        return Unavailable(f"the cluster store (etcd at {self.target}) failed the call ({e.code().name}): "
                           "check that etcd is running, reachable and trusts this node's certificate")

    async def _range(self, req):
        self._check_open()
        try:
            return await self._kv.Range(req, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise self._unavailable(e) from None

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
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(op.kind, op.key), value=op.value))
                     if isinstance(op, Put) else
                     rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key(op.kind, op.key)))
                     for op in ops])
        # A txn that changes nothing (only deletes of absent keys) makes no new etcd revision, as in SQLite.
        try:
            resp = await self._kv.Txn(req, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise self._unavailable(e) from None
        return TxnResult(resp.succeeded, resp.header.revision)

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
