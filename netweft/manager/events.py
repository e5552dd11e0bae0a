"""Cluster events (netweft/model/events.py) derived from the cluster store's change history.

Manager transactions also write the `clock` object (the manager's wall time; at most every 100 ms, a
revision without it happened within 100 ms of the last one that has it), so the history says when
things happened: `events --since 10m` replays the store's kept history from any manager,
then follows new revisions live. `Deriver` is the pure part: it keeps the last value of each node,
network and endpoint and turns one revision's changes into events (a put of an unknown network is a
create, of a known node whose state changed a down or a ready, a change of a peer's health state a
health event...).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone

import msgspec
from aiohttp import web

from netweft.errors import InvalidRequest
from netweft.manager.watch import CLOCK, ENDPOINTS, NETWORKS, NODES, ClusterState, decode
from netweft.model.events import ClusterEvent, EventFilters, docker_view, parse_filters
from netweft.model.objects import Endpoint, Network, Node
from netweft.store.api import Changes, ClusterStore, Compacted

log = logging.getLogger("netweft.manager.events")

PING = 2.0           # seconds between keep-alive lines of an idle event stream
_KINDS = (NODES, NETWORKS, ENDPOINTS)


def _clock(changes: Changes) -> int | None:
    for ev in changes.events:
        if ev.kind == CLOCK and ev.action == "put":
            try:
                return int(ev.value)
            except ValueError:
                return None
    return None


def _iso_ns(text: str) -> int | None:
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except (ValueError, AttributeError):
        return None


class Deriver:
    """Turns revisions into events. `prev` holds the last value seen of each object; `complete` says the
    walk began at the store's first revision (so a node seen for the first time has just joined)."""

    JOIN_WINDOW_NS = 10 * 10**9   # a node first seen this close to its creation time joined then

    def __init__(self, complete: bool = False):
        self.prev: dict[tuple[str, str], object] = {}
        self.complete = complete

    def seed(self, state: ClusterState) -> None:
        for kind in _KINDS:
            for key, entry in state.kinds[kind].items():
                self.prev[(kind, key)] = entry.obj

    def _name(self, kind: str, key: str, attr: str = "hostname") -> str:
        obj = self.prev.get((kind, key))
        return getattr(obj, attr, "") if obj is not None else ""

    def derive(self, changes: Changes, when_ns: int) -> list[ClusterEvent]:
        out: list[ClusterEvent] = []
        for sev in changes.events:
            if sev.kind not in _KINDS:
                continue
            try:
                obj = decode(sev.kind, sev.value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue   # the manager logs unreadable objects; here they are no event
            old = self.prev.get((sev.kind, sev.key))
            made = self._events(sev.kind, sev.action, old, obj, when_ns)
            out += [msgspec.structs.replace(e, rev=changes.rev, time_ns=when_ns) for e in made]
            if sev.action == "put":
                self.prev[(sev.kind, sev.key)] = obj
            else:
                self.prev.pop((sev.kind, sev.key), None)
        return out

    def _events(self, kind: str, action: str, old, obj, when_ns: int) -> list[ClusterEvent]:
        if kind == NETWORKS:
            net: Network = obj
            attrs = {"name": net.name, "type": net.driver, "subnet": net.subnet}
            if action == "delete":
                return [ClusterEvent(type="network", action="remove", id=net.id, attributes=attrs)]
            return [] if old is not None else [ClusterEvent(type="network", action="create", id=net.id,
                                                            attributes=attrs)]
        if kind == ENDPOINTS:
            ep: Endpoint = obj
            if action == "put" and old is not None:
                return []
            attrs = {"name": self._name(NETWORKS, ep.network_id, "name") or ep.network_id[:12], "type": "overlay",
                     "container": ep.owner.id, "container_name": ep.owner.name, "endpoint": ep.id, "ip": ep.ip,
                     "node": ep.hostname or self._name(NODES, ep.node_id), "node_id": ep.node_id}
            return [ClusterEvent(type="network", action="connect" if action == "put" else "disconnect",
                                 id=ep.network_id, attributes=attrs)]
        node: Node = obj
        attrs = {"name": node.hostname, "role": node.role, "addr": node.addr}
        if action == "delete":
            return [ClusterEvent(type="node", action="remove", id=node.id, attributes=attrs)]
        if old is None:
            created = _iso_ns(node.created)
            joined = self.complete or (created is not None and abs(when_ns - created) <= self.JOIN_WINDOW_NS)
            return [ClusterEvent(type="node", action="join", id=node.id, attributes=attrs)] if joined else []
        out = []
        if old.state != node.state and node.state in ("ready", "down"):
            out.append(ClusterEvent(type="node", action=node.state, id=node.id,
                                    attributes={**attrs, "previous": old.state}))
        for peer in sorted(set(old.health) | set(node.health)):
            before = old.health[peer].state if peer in old.health else "unknown"
            h = node.health.get(peer)
            if h is None or h.state == before or h.state == "unknown":
                continue
            a = {"name": node.hostname, "peer": self._name(NODES, peer) or peer, "peer_id": peer, "state": h.state,
                 "previous": before, "loss": f"{h.loss:g}"}
            if h.rtt_ms is not None:
                a["rtt_ms"] = f"{h.rtt_ms:g}"
            if h.mtu_ok is not None:
                a["mtu_ok"] = str(h.mtu_ok).lower()
            if h.reason:
                a["reason"] = h.reason
            out.append(ClusterEvent(type="health", action=h.state, id=node.id, attributes=a))
        return out


async def events(store: ClusterStore, state: ClusterState, since_ns: int | None, until_ns: int | None,
                 visible: Callable[[ClusterEvent], bool] = lambda e: True) -> AsyncIterator[ClusterEvent | None]:
    """The events from since_ns (None: from now) until until_ns (None: forever), in revision order; None
    every PING seconds without one (a keep-alive), CAUGHT_UP once the history is told. History comes
    from the store's kept change log."""
    if since_ns is None:
        deriver, start = Deriver(), state.rev
        deriver.seed(state)
    else:
        deriver, start = Deriver(complete=True), 0
    live_from = state.rev
    last_ns, told = 0, False
    while True:
        try:
            async for c in _revisions(store, start):
                if c is None or c is CAUGHT_UP:
                    if until_ns is not None and start >= live_from and time.time_ns() > until_ns:
                        return
                    if c is None:
                        yield None
                    elif start >= live_from and not told:
                        told = True
                        yield CAUGHT_UP   # the history is told: what follows happens now
                    continue
                start = c.rev
                when = _clock(c) or (time.time_ns() if c.rev > live_from else last_ns)
                last_ns = max(last_ns, when)
                if until_ns is not None and when > until_ns:
                    return
                for ev in deriver.derive(c, when):
                    if (since_ns is None or ev.time_ns >= since_ns) and visible(ev):
                        yield ev
            return
        except Compacted as e:
            # The history before e.compacted is gone: begin there, knowing nothing of older objects.
            if start > 0:
                raise
            start, deriver.complete = e.compacted, False


_END = object()
CAUGHT_UP = Changes(-1, [])   # _revisions: every revision the store had has been read


async def _revisions(store: ClusterStore, since: int) -> AsyncIterator[Changes | None]:
    """The store's watch from `since`, read by a task of its own into a bounded queue (a keep-alive timeout
    must not cancel, and so end, the store's generator); CAUGHT_UP whenever the queue runs dry, and None
    after each PING seconds without a revision."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=1024)   # a slow reader holds the store's reading back
    failed: list[BaseException] = []

    async def pump() -> None:
        try:
            async with contextlib.aclosing(store.watch(since)) as changes:
                async for c in changes:
                    await queue.put(c)
        except Exception as e:
            failed.append(e)
        await queue.put(_END)

    task = asyncio.ensure_future(pump())
    caught_up = False
    try:
        while True:
            if queue.empty() and not caught_up:
                caught_up = True
                yield CAUGHT_UP
                continue
            if queue.empty():
                try:
                    async with asyncio.timeout(PING):
                        item = await queue.get()
                except TimeoutError:
                    yield None
                    continue
            else:
                item = queue.get_nowait()
            if item is _END:
                if failed:
                    raise failed[0]
                return
            caught_up = False
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def parse_ns(text: str | None, name: str) -> int | None:
    """?since=/?until= as Unix time in nanoseconds (the CLI turns 10m or an RFC 3339 time into that)."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise InvalidRequest(f"invalid {name} {text[:32]!r}: expected Unix time in nanoseconds")
    return int(text)


async def serve(request: web.Request, store: ClusterStore, state_fn: Callable[[], ClusterState],
                visible: Callable[[ClusterEvent], bool]) -> web.StreamResponse:
    """GET /events?since=NS&until=NS&filters=JSON: Docker-shaped events as JSON lines, pings when idle."""
    since, until = parse_ns(request.query.get("since"), "since"), parse_ns(request.query.get("until"), "until")
    filters: EventFilters = parse_filters(request.query.get("filters"))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    enc = msgspec.json.Encoder()
    try:
        async for ev in events(store, state_fn(), since, until, lambda e: filters.matches(e) and visible(e)):
            if ev is None:
                await resp.write(b'{"type":"ping"}\n')
            elif ev is CAUGHT_UP:
                await resp.write(b'{"type":"caught-up"}\n')
            else:
                await resp.write(enc.encode(docker_view(ev)) + b"\n")
        await resp.write_eof()
    except (ConnectionError, Compacted):
        pass   # the reader went away, or the history moved past it: it asks again
    return resp


def visible_to(node: Node, state_fn: Callable[[], ClusterState]) -> Callable[[ClusterEvent], bool]:
    """What a node may see: a manager everything; a worker what it already learns from its watch and GET
    /networks (nodes, health, every overlay's create and remove), its own connects and disconnects, and
    those of the networks it has endpoints on now."""
    if node.role == "manager":
        return lambda e: True
    return lambda e: (e.type != "network" or e.action in ("create", "remove")
                      or e.attributes.get("node_id") == node.id or e.id in state_fn().scope(node.id))
