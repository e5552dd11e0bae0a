"""The managers' state in memory, and the watch that carries it to every agent (see netweft/model/watch.py).

`ClusterState` holds the cluster store's objects at one revision (decoded, with their encoded bytes
and mod revisions) and the indexes the manager reads: endpoints by network, networks by node, the
addresses and MACs in use. `Hub` keeps it current by watching the store from its revision, and fans
each revision out to the agents' watch streams:

- each revision becomes a `Batch` whose events are encoded once (the stored bytes are the wire
  form); a watcher gets the events of its scope, and watchers with the same selection share one frame;
- a node reaches only the agents that need it (`ClusterState.visible`): itself, every agent when it is a
  manager (agents keep the list of managers), the agents that share a network with it, and the managers'
  own agents (a few; they answer every host's data-path probes, `netweft doctor`'s included). A node's first
  endpoint on a network carries the node along to that network's watchers, and the answer to an attach
  carries the nodes of the network joined, so an agent has every peer's node without hearing of every
  join, heartbeat transition and key of the cluster (hosts x hosts at 10,000 hosts);
- each watcher has a bounded queue: one that falls too far behind is cut off (its stream closes with
  one log line) and resumes from the revision it had;
- writes are coalesced: a watcher writes at once after a quiet spell, but at most once per `gap`
  (which grows with the number of watchers), so a burst of revisions costs each socket a few
  writes of several frames, not one TLS write per revision; a write is at most WRITE_CHUNK and the
  next waits for the socket to drain, so no socket holds more than about that much;
- a resume (?since=REV) is served from the batches of the latest revisions kept in memory (their frames
  shared with every watcher), else from the store's change log, which survives restarts; a snapshot only
  when that log no longer reaches back (or on a first connection).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from ipaddress import IPv4Address

import msgspec
from aiohttp import web

from netweft.errors import Conflict, InvalidRequest, NetweftError, Unavailable
from netweft.model.objects import ID_PATTERN, Endpoint, Network, Node
from netweft.model.services import Service, Task
from netweft.store.api import Changes, ClusterStore, Compacted, Put

log = logging.getLogger("netweft.manager.watch")

# Store kinds the manager keeps, and the watch's name of those it sends.
NODES, NETWORKS, ENDPOINTS, CLUSTER, ALLOCATIONS = "nodes", "networks", "endpoints", "cluster", "allocations"
# Several managers (etcd): the sealed CA, the elected leader, who is up, whom each heard from.
CA, ELECTION, PRESENCE, HEARTBEATS = "ca", "election", "managers", "heartbeats"
SERVICES, TASKS = "services", "tasks"    # manager/services.py
KINDS = (NODES, NETWORKS, ENDPOINTS, CLUSTER, ALLOCATIONS, CA, ELECTION, PRESENCE, HEARTBEATS, SERVICES, TASKS)
WATCHED = {NODES: b"node", NETWORKS: b"network", ENDPOINTS: b"endpoint",
           SERVICES: b"service", TASKS: b"task"}   # services: to every node; a task: to its node
_TYPES = {NODES: Node, NETWORKS: Network, ENDPOINTS: Endpoint, SERVICES: Service, TASKS: Task}
CLOCK = "clock"   # not kept in the state: commits rewrite it with the time (see manager/events.py)
CLOCK_EVERY = 0.1  # seconds: a commit sooner after the last stamp carries none (its time is the last one's)

PING = 2.0                    # seconds between keep-alive lines on an idle stream
QUEUE_FRAMES = 1024           # a watcher this many revisions behind is cut off...
QUEUE_BYTES = 64 << 20        # ... or this many bytes behind
WRITE_CHUNK = 64 << 10        # frames written to the socket together, up to this size
# Coalescing: a watcher writes at most once per gap = watchers x GAP_PER_WATCHER (at most MAX_GAP): the
# manager then spends about as much time writing as waiting in a burst, whatever the number of watchers.
GAP_PER_WATCHER = 50e-6       # seconds: about what one TLS write costs here
MAX_GAP = 0.5                 # seconds
MAX_ASKED = 1024              # networks a watcher may name in ?networks=
# The latest revisions' batches are kept in memory: a burst of agents resuming (a manager restarted, or failed
# over to this one) is served from them, each frame encoded once for all, not from the store per agent.
RECENT_REVS = 4096
RECENT_BYTES = 8 << 20
CATCH_UP = 5.0                # seconds this manager's view may take to reach a revision before it gives up

_ID = re.compile(ID_PATTERN)
_decoders = {kind: msgspec.json.Decoder(t) for kind, t in _TYPES.items()}
_any = msgspec.json.Decoder()


def decode(kind: str, raw: bytes):
    return _decoders[kind].decode(raw) if kind in _decoders else _any.decode(raw)


class Entry:
    __slots__ = ("obj", "raw", "mod_rev")

    def __init__(self, obj, raw: bytes, mod_rev: int):
        self.obj, self.raw, self.mod_rev = obj, raw, mod_rev


# ---------------------------------------------------------------------------- state
class ClusterState:
    """The store's objects at revision `rev`, and the indexes the manager needs."""

    def __init__(self) -> None:
        self.rev = 0
        self.kinds: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.net_eps: dict[str, dict[str, Endpoint]] = defaultdict(dict)   # network -> endpoint id -> endpoint
        self.node_nets: dict[str, Counter] = defaultdict(Counter)          # node -> network -> endpoints on it
        self.net_ips: dict[str, set[int]] = defaultdict(set)               # network -> addresses in use
        self.net_macs: dict[str, set[str]] = defaultdict(set)              # network -> MACs in use
        self.net_low: dict[str, int] = {}       # network -> no free address below this one (a search hint)
        self.owners: dict[tuple[str, str, str, str], str] = {}             # (network, node, kind, id) -> endpoint
        self.names: dict[str, str] = {}                                    # network name -> id
        self.ingress: set[str] = set()      # the ingress network (one, at most): every node watches it
        self.net_nodes: dict[str, Counter] = defaultdict(Counter)          # network -> node -> endpoints on it
        self.managers: set[str] = set()     # nodes with the manager role: every agent hears of them

    # ------------------------------------------------------------ reads
    def get(self, kind: str, key: str):
        e = self.kinds[kind].get(key)
        return e.obj if e else None

    def mod_rev(self, kind: str, key: str) -> int:
        e = self.kinds[kind].get(key)
        return e.mod_rev if e else 0

    def nodes(self) -> list[Node]:
        return [e.obj for e in self.kinds[NODES].values()]

    def networks(self) -> list[Network]:
        return [e.obj for e in self.kinds[NETWORKS].values()]

    def find_network(self, ref: str) -> Network | None:
        """Docker-style reference: full ID, name, or a unique ID prefix (3 characters at least)."""
        nets = self.kinds[NETWORKS]
        hit = nets.get(ref) or nets.get(self.names.get(ref, ""))
        if hit is None and len(ref) >= 3:
            hits = [e for k, e in nets.items() if k.startswith(ref)]
            hit = hits[0] if len(hits) == 1 else None
        return hit.obj if hit else None

    def endpoints_of(self, net_id: str) -> list[Endpoint]:
        return list(self.net_eps.get(net_id, {}).values())

    def scope(self, node_id: str, asked: Iterable[str] = ()) -> set[str]:
        """The networks a node watches: those it has endpoints on, and those it asked for (existing or not:
        a network it asked for still reaches it when it is removed)."""
        out = set(self.node_nets.get(node_id, ())).union(asked, self.ingress)
        if node_id in self.managers:
            out.add(MANAGERS_KEY)
        return out

    def visible(self, node_id: str, scope: Iterable[str]) -> set[str]:
        """The nodes an agent with this scope is sent: itself, the managers, the nodes on its networks (every
        node, for a manager's agent)."""
        if node_id in self.managers:
            return set(self.kinds[NODES])
        out = {node_id} | self.managers
        for net in scope:
            out.update(self.net_nodes.get(net, ()))
        return out

    def node_keys(self, node_id: str) -> tuple[str, ...]:
        """The Batch keys of a node's event: the networks it has endpoints on, and its own key."""
        return (*self.node_nets.get(node_id, ()), MANAGERS_KEY, own_key(node_id))

    def network_nodes(self, net_id: str) -> list[bytes]:
        """The stored bytes of the nodes with endpoints on a network (what an agent joining it needs)."""
        nodes = self.kinds[NODES]
        return [nodes[n].raw for n in self.net_nodes.get(net_id, ()) if n in nodes]

    # ------------------------------------------------------------ changes
    def put(self, kind: str, key: str, raw: bytes, mod_rev: int):
        obj = decode(kind, raw)
        old = self.kinds[kind].get(key)
        if old is not None:
            self._unindex(kind, old.obj)
        self.kinds[kind][key] = Entry(obj, raw, mod_rev)
        self._index(kind, obj)
        return obj

    def delete(self, kind: str, key: str):
        old = self.kinds[kind].pop(key, None)
        if old is None:
            return None
        self._unindex(kind, old.obj)
        return old.obj

    def _index(self, kind: str, obj) -> None:
        if kind == ENDPOINTS:
            self.net_eps[obj.network_id][obj.id] = obj
            self.node_nets[obj.node_id][obj.network_id] += 1
            self.net_ips[obj.network_id].add(int(IPv4Address(obj.ip)))
            self.net_macs[obj.network_id].add(obj.mac)
            self.owners[(obj.network_id, obj.node_id, obj.owner.kind, obj.owner.id)] = obj.id
            self.net_nodes[obj.network_id][obj.node_id] += 1
        elif kind == NODES:
            if obj.role == "manager":
                self.managers.add(obj.id)
        elif kind == NETWORKS:
            self.names[obj.name] = obj.id
            if obj.ingress:
                self.ingress.add(obj.id)

    def _unindex(self, kind: str, obj) -> None:
        if kind == ENDPOINTS:
            eps = self.net_eps[obj.network_id]
            eps.pop(obj.id, None)
            if not eps:
                del self.net_eps[obj.network_id]
            nets = self.node_nets[obj.node_id]
            nets[obj.network_id] -= 1
            if nets[obj.network_id] <= 0:
                del nets[obj.network_id]
            if not nets:
                del self.node_nets[obj.node_id]
            ip = int(IPv4Address(obj.ip))
            self.net_ips[obj.network_id].discard(ip)
            self.net_macs[obj.network_id].discard(obj.mac)
            if ip < self.net_low.get(obj.network_id, ip + 1):
                self.net_low[obj.network_id] = ip
            self.owners.pop((obj.network_id, obj.node_id, obj.owner.kind, obj.owner.id), None)
            on = self.net_nodes[obj.network_id]
            on[obj.node_id] -= 1
            if on[obj.node_id] <= 0:
                del on[obj.node_id]
            if not on:
                del self.net_nodes[obj.network_id]
        elif kind == NODES:
            self.managers.discard(obj.id)
        elif kind == NETWORKS:
            if self.names.get(obj.name) == obj.id:
                del self.names[obj.name]
            self.ingress.discard(obj.id)
            for index in (self.net_ips, self.net_macs, self.net_low):
                if not index.get(obj.id):
                    index.pop(obj.id, None)


# ---------------------------------------------------------------------------- batches
MANAGERS_KEY = "@managers"   # the Batch key of what every manager's agent gets (every node's events)


def own_key(node_id: str) -> str:
    """The Batch key of what only one node is sent (its tasks, its own node object): no network's ID."""
    return "@" + node_id


def event_bytes(kind: str, action: str, raw: bytes) -> bytes:
    """One watch event (NodeEvent/NetworkEvent/EndpointEvent), made from the stored object's bytes."""
    return b'{"kind":"%s","action":"%s","object":%s}' % (WATCHED[kind], action.encode(), raw)


class Batch:
    """One revision's changes as the watch sends them, each event encoded once.

    `events` is [(keys, encoded event)], in the store's order: keys is None for an event every watcher
    gets, else the networks (or own_key(node)) whose watchers get it; `touched[key]` the nodes whose
    endpoints on `key` changed (a node that loses its last endpoint on a network still hears of it).
    `frame(keys)` is cached per selection."""

    __slots__ = ("rev", "events", "touched", "has_nodes", "_frames", "everyone")

    def __init__(self, rev: int):
        self.rev = rev
        self.events: list[tuple[tuple[str, ...] | None, bytes]] = []
        self.touched: dict[str, set[str]] = {}
        self.has_nodes = False
        self._frames: dict[tuple, bytes | None] = {}
        self.everyone: set[str] = set()

    def add(self, kind: str, action: str, raw: bytes, obj, keys: tuple[str, ...] | None = None) -> None:
        """One event. A node event goes to every watcher unless `keys` names those it goes to (the node's
        networks and own key: ClusterState.node_keys)."""
        net = None
        if kind == NODES:
            if keys is not None:
                for k in keys:
                    self.touched.setdefault(k, set())
                self.touched[keys[-1]].add(obj.id)
            else:
                self.has_nodes = True
            self.events.append((keys, event_bytes(kind, action, raw)))
            return
        if kind == ENDPOINTS:
            net = obj.network_id
            self.touched.setdefault(net, set()).add(obj.node_id)
        elif kind == NETWORKS:
            net = obj.id
            self.touched.setdefault(net, set())
            if obj.ingress:   # every node watches the ingress network: its removal reaches them all too
                self.everyone.add(net)
        elif kind == TASKS:   # the task's node only: a key no network has, touched by that node
            net = own_key(obj.node_id)
            self.touched.setdefault(net, set()).add(obj.node_id)
        else:
            self.has_nodes = True
        self.events.append((None if net is None else (net,), event_bytes(kind, action, raw)))

    def select(self, node_id: str, scope: set[str]) -> tuple:
        return tuple(n for n, nodes in self.touched.items()
                     if n in scope or node_id in nodes or n in self.everyone)

    def select_for(self, node_id: str, on: Iterable[str], asked: frozenset, ingress: set[str]) -> tuple:
        """select() without building the node's scope: `on` holds the networks it has endpoints on."""
        return tuple(n for n, nodes in self.touched.items()
                     if n in on or n in asked or n in ingress or node_id in nodes or n in self.everyone)

    def frame(self, nets: tuple) -> bytes | None:
        """The Events line carrying node events and those of `nets`; None if that is nothing."""
        if nets in self._frames:
            return self._frames[nets]
        picked = [b for keys, b in self.events if keys is None or any(k in nets for k in keys)]
        out = (b'{"type":"events","rev":%d,"events":[%s]}\n' % (self.rev, b",".join(picked))) if picked else None
        self._frames[nets] = out
        return out


# ---------------------------------------------------------------------------- watchers
class Watcher:
    """One open watch stream: a bounded queue of (rev, frame) between the hub and the socket."""

    def __init__(self, node_id: str, hostname: str, asked: frozenset[str],
                 max_frames: int = QUEUE_FRAMES, max_bytes: int = QUEUE_BYTES):
        self.node_id, self.hostname, self.asked = node_id, hostname, asked
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self.frames: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.ready = asyncio.Event()
        self.ended: str | None = None      # why the stream ends, once it must
        self.rev = 0                       # the last revision handed to the socket
        self.since = self.start = 0        # asked from; subscribed at
        self.first: tuple[bytes, ...] | None = None   # the snapshot to send first (its parts), if it gets one
        self.wrote = -1e9                  # when it last wrote changes (monotonic): see coalesce_wait

    def offer(self, rev: int, frame: bytes) -> bool:
        """Queue a frame; False (and nothing queued) if that would pass the bounds."""
        if self.frames and (len(self.frames) >= self.max_frames or self.size + len(frame) > self.max_bytes):
            return False
        self.frames.append((rev, frame))
        self.size += len(frame)
        self.ready.set()
        return True

    def end(self, reason: str) -> None:
        """The stream closes: what is queued is dropped (the agent resumes from the revision it has)."""
        if self.ended is None:
            self.ended = reason
            self.frames.clear()
            self.size = 0
            self.ready.set()

    def take(self, limit: int = WRITE_CHUNK) -> list[tuple[int, bytes]]:
        out, size = [], 0
        while self.frames and (not out or size + len(self.frames[0][1]) <= limit):
            rev, frame = self.frames.popleft()
            self.size -= len(frame)
            size += len(frame)
            out.append((rev, frame))
        if not self.frames:
            self.ready.clear()
        return out


def coalesce_wait(now: float, wrote: float, watchers: int, per_watcher: float = GAP_PER_WATCHER,
                  max_gap: float = MAX_GAP) -> float:
    """Seconds a watcher with frames waits before writing them: none after a quiet spell (one change goes
    out at once), else until `gap` has passed since its last write, gathering what comes meanwhile."""
    gap = min(max_gap, watchers * per_watcher)
    return max(0.0, wrote + gap - now)


def pieces(parts: Iterable[bytes], size: int) -> Iterable[bytes | memoryview]:
    """The bytes of parts in order, in pieces of at most `size` bytes: views of a large part (no copies),
    small parts joined (a snapshot's nodes are one part each: one write per node would cost a TLS write each)."""
    run: list[bytes] = []
    held = 0
    for part in parts:
        if len(part) >= size:
            if run:
                yield b"".join(run)
                run, held = [], 0
            view = memoryview(part)
            for i in range(0, len(view), size):
                yield view[i:i + size]
            continue
        if held + len(part) > size:
            yield b"".join(run)
            run, held = [], 0
        run.append(part)
        held += len(part)
    if run:
        yield b"".join(run)


def parse_query(query) -> tuple[int, frozenset[str]]:
    """?since=REV&networks=ID,ID -> (since, the networks asked for)."""
    text = query.get("since", "0")
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidRequest(f"invalid since {text[:32]!r}: expected a revision number (0 or more)")
    names = [n for n in query.get("networks", "").split(",") if n]
    if len(names) > MAX_ASKED:
        raise InvalidRequest(f"too many networks in ?networks= ({len(names)}): at most {MAX_ASKED}")
    for n in names:
        if not _ID.match(n):
            raise InvalidRequest(f"invalid network ID {n[:80]!r} in ?networks=: expected lowercase letters and digits")
    return int(text), frozenset(names)


# ---------------------------------------------------------------------------- the hub
class Hub:
    """Keeps a ClusterState current from the store's watch and serves the agents' watch streams."""

    def __init__(self, store: ClusterStore, max_frames: int = QUEUE_FRAMES, max_bytes: int = QUEUE_BYTES,
                 ping: float = PING):
        self.store, self.ping = store, ping
        self.state = ClusterState()
        self.watchers: set[Watcher] = set()
        # Who may want a batch, without asking every watcher: by node, and by network asked for.
        self._by_node: dict[str, Watcher] = {}
        self._askers: dict[str, set[Watcher]] = defaultdict(set)
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._stamped = -CLOCK_EVERY
        self._nodes_part: tuple[int, bytes] = (-1, b"")   # (revision, the nodes of a snapshot at it)
        self.recent: deque[Batch] = deque()   # the batches of the revisions after recent_from that have events
        self.recent_from = 0
        self._recent_bytes = 0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._load()
        self._task = asyncio.ensure_future(self._follow())

    def close_watchers(self, reason: str = "the manager is stopping") -> None:
        """End every watch stream (their agents resume from their revisions, here or elsewhere)."""
        for w in list(self.watchers):
            self._end(w, reason)

    async def stop(self, reason: str = "the manager is stopping") -> None:
        self.close_watchers(reason)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def _load(self) -> None:
        """Every object at one revision (retried until the kinds were read at the same one)."""
        rev, kinds = await self.store.snapshot(KINDS)
        state = ClusterState()
        for kind, records in kinds.items():
            for r in records:
                try:
                    state.put(kind, r.key, r.value, r.mod_rev)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    log.error("unreadable object in the cluster store skipped",
                              extra={"kind": kind, "key": r.key, "reason": str(e)})
        state.rev = rev
        self.state = state
        self.recent.clear()
        self.recent_from, self._recent_bytes = rev, 0

    async def _follow(self) -> None:
        while True:
            try:
                async for changes in self.store.watch(self.state.rev):
                    self.apply(changes)
                return  # the store closed
            except asyncio.CancelledError:
                raise
            except Compacted:
                # Only if this manager stalled past the whole kept history: start over from a listing.
                log.warning("the cluster store's history moved past this manager's view; reloading")
                await self._load()
                for w in list(self.watchers):
                    self._end(w, "the manager reloaded its view of the cluster store")
            except Exception as e:  # the store failing (disk, lock): say so, keep trying
                log.error("reading the cluster store's changes failed; retrying", extra={"reason": str(e)})
                await asyncio.sleep(1.0)

    async def wait(self, rev: int) -> None:
        """Until the state holds revision rev (read-your-writes after a transaction)."""
        if self.state.rev >= rev:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((rev, fut))
        await fut

    async def sync(self) -> None:
        """Until the state holds every revision the store has now."""
        await self.wait(await self.store.revision())

    async def commit(self, plan, tries: int = 100):
        """Compare-and-write with retries: plan() reads self.state and returns (compares, ops, result) or
        raises a refusal; the ops land only if the compares hold, else the state catches up and plan() runs
        again. Returns (result, revision); the state holds that revision when this returns."""
        for _ in range(tries):
            compares, ops, result = plan()
            # The clock rides along (every CLOCK_EVERY s at most): the history says when things happened
            # (manager/events.py).
            stamp = bool(ops) and time.monotonic() - self._stamped >= CLOCK_EVERY
            r = await self.store.txn(compares, ops + [Put(CLOCK, "time", str(time.time_ns()).encode())]
                                     if stamp else ops)
            try:
                async with asyncio.timeout(CATCH_UP):
                    await self.wait(r.rev)
            except TimeoutError:
                raise Unavailable("this manager's view of the cluster store is behind (its watch is stalled); "
                                  "retry, or use another manager") from None
            if r.ok:
                if stamp:
                    self._stamped = time.monotonic()
                return result, r.rev
        raise Conflict("the cluster store is too busy to complete this change (it kept changing underneath); "
                       "retry")

    # ------------------------------------------------------------ changes
    def apply(self, changes: Changes) -> Batch:
        """Apply one revision to the state and hand its batch to the watchers (all in one step of the loop)."""
        batch = Batch(changes.rev)
        st = self.state
        for ev in changes.events:
            if ev.kind not in st.kinds:
                continue  # a kind this manager does not use (written by a newer one)
            was_manager = ev.kind == NODES and ev.key in st.managers
            new_ep = ev.kind == ENDPOINTS and ev.key not in st.kinds[ENDPOINTS]
            try:
                if ev.action == "put":
                    obj = self.state.put(ev.kind, ev.key, ev.value, ev.rev)
                else:
                    obj = self.state.delete(ev.kind, ev.key)
                    if obj is None and ev.kind in WATCHED:
                        obj = decode(ev.kind, ev.value)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                log.error("unreadable change in the cluster store skipped",
                          extra={"kind": ev.kind, "key": ev.key, "rev": ev.rev, "reason": str(e)})
                continue
            if ev.kind == NODES:
                # A manager (or one that was), or a node leaving: every agent; else those sharing a network.
                everyone = was_manager or ev.action != "put" or obj.role == "manager"
                batch.add(NODES, ev.action, ev.value, obj, None if everyone else st.node_keys(obj.id))
            elif ev.kind in WATCHED:
                if new_ep and ev.action == "put":
                    self._carry_node(batch, obj)
                batch.add(ev.kind, ev.action, ev.value, obj)
        st.rev = changes.rev
        self._publish(batch)
        self._remember(batch)
        still = []
        for rev, fut in self._waiters:
            if rev <= changes.rev:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((rev, fut))
        self._waiters = still
        return batch

    def _carry_node(self, batch: Batch, ep: Endpoint, first: bool = True) -> None:
        """A node's first endpoint on a network: the node rides along to that network's watchers, which
        may never have heard of it (a node event reaches only those sharing a network with it). `first`
        False: whether it is the first is not known (the change log): it rides along anyway."""
        st = self.state
        if ep.node_id in st.managers or (first and st.net_nodes.get(ep.network_id, {}).get(ep.node_id) != 1):
            return
        node = st.kinds[NODES].get(ep.node_id)
        if node is not None:
            batch.add(NODES, "put", node.raw, node.obj, (ep.network_id,))

    def _recipients(self, batch: Batch) -> Iterable[Watcher]:
        """The watchers a batch may concern: every one for an event to all (a manager's node, the ingress
        network), else the watchers of the nodes it touched, of the nodes on its networks and of those who
        asked for them: a change on a network of 10 hosts costs 10 checks, not one per host of the cluster."""
        st = self.state
        if batch.has_nodes or batch.everyone or not st.ingress.isdisjoint(batch.touched):
            return list(self.watchers)
        out: set[Watcher] = set()
        by_node = self._by_node
        for key, nodes in batch.touched.items():
            if key == MANAGERS_KEY:
                out.update(by_node[n] for n in st.managers if n in by_node)
                continue
            for n in nodes:
                if n in by_node:
                    out.add(by_node[n])
            for n in st.net_nodes.get(key, ()):
                if n in by_node:
                    out.add(by_node[n])
            out.update(self._askers.get(key, ()))
        return out

    def _publish(self, batch: Batch) -> None:
        if not batch.events:
            return
        st, no_nets = self.state, {}
        for w in self._recipients(batch):
            on = st.node_nets.get(w.node_id, no_nets)
            if w.node_id in st.managers:
                on = {**on, MANAGERS_KEY: 1}
            nets = batch.select_for(w.node_id, on, w.asked, st.ingress)
            frame = batch.frame(nets) if (nets or batch.has_nodes) else None
            if frame is not None and not w.offer(batch.rev, frame):
                self._end(w, f"cut off: more than {len(w.frames)} revisions ({w.size >> 10} KiB) behind; "
                             "it resumes from its revision")

    def _remember(self, batch: Batch) -> None:
        if batch.events:
            self.recent.append(batch)
            self._recent_bytes += sum(len(b) for _, b in batch.events)
        while self.recent and (len(self.recent) > RECENT_REVS or self._recent_bytes > RECENT_BYTES):
            old = self.recent.popleft()
            self._recent_bytes -= sum(len(b) for _, b in old.events)
            self.recent_from = old.rev

    def _end(self, w: Watcher, reason: str) -> None:
        self.watchers.discard(w)
        if self._by_node.get(w.node_id) is w:
            del self._by_node[w.node_id]
        for net in w.asked:
            askers = self._askers.get(net)
            if askers is not None:
                askers.discard(w)
                if not askers:
                    del self._askers[net]
        w.end(reason)

    def disconnect(self, node_id: str, reason: str = "the node was removed") -> int:
        """End every watch stream of a node; returns how many."""
        mine = [self._by_node[node_id]] if node_id in self._by_node else []   # one stream per node: subscribe()
        for w in mine:
            self._end(w, reason)
        return len(mine)

    # ------------------------------------------------------------ what a watcher is sent first
    def snapshot(self, node_id: str, asked: Iterable[str] = ()) -> bytes:
        """The node's whole scope at the current revision, as one Snapshot line."""
        return b"".join(self.snapshot_parts(node_id, asked))

    def snapshot_parts(self, node_id: str, asked: Iterable[str] = ()) -> tuple[bytes, ...]:
        """snapshot() in pieces, sharing the stored bytes rather than copying them per watcher (1,000 agents
        reconnecting at once): the nodes it may see (ClusterState.visible) are the stored objects themselves,
        or, when that is every node, one bytes object shared by every snapshot made at this revision."""
        st = self.state
        scope = st.scope(node_id, asked)
        visible = st.visible(node_id, scope)
        all_nodes = st.kinds[NODES]
        if len(visible) >= len(all_nodes) and visible.issuperset(all_nodes):
            if self._nodes_part[0] != st.rev:
                self._nodes_part = (st.rev, b",".join(e.raw for e in all_nodes.values()))
            nodes: list[bytes] = [self._nodes_part[1]]
        else:
            nodes = []
            for n in sorted(visible):
                e = all_nodes.get(n)
                if e is not None:
                    nodes += (b",", e.raw) if nodes else (e.raw,)
        nets = sorted(n for n in scope if n in st.kinds[NETWORKS])
        networks = b",".join(st.kinds[NETWORKS][n].raw for n in nets)
        eps = b",".join(st.kinds[ENDPOINTS][ep].raw for n in nets for ep in st.net_eps.get(n, ()))
        return (b'{"type":"snapshot","rev":%d,"nodes":[' % st.rev, *nodes,
                b'],"networks":[%s],"endpoints":[%s]}\n' % (networks, eps))

    async def missed(self, node_id: str, asked: frozenset[str], since: int, until: int):
        """The Events lines of revisions (since, until] for a resuming node, from the store's change log:
        node events, and those of the networks in its current scope or of its own endpoints.
        Raises Compacted when the log no longer reaches back to since."""
        if since >= until:
            return
        scope = self.state.scope(node_id, asked)
        if since >= self.recent_from:
            # Every revision in (since, until] is in memory: the batches the live watchers were sent.
            batches = list(self.recent)
            for batch in batches[bisect.bisect_right(batches, since, key=lambda b: b.rev):]:
                if batch.rev > until:
                    break
                frame = batch.frame(batch.select(node_id, scope))
                if frame is not None:
                    yield batch.rev, frame
            return
        async with contextlib.aclosing(self.store.watch(since)) as changes:
            async for c in changes:
                if c.rev > until:
                    break
                batch = Batch(c.rev)
                for ev in c.events:
                    if ev.kind in WATCHED:
                        try:
                            obj = decode(ev.kind, ev.value)
                        except (msgspec.ValidationError, msgspec.DecodeError):
                            continue
                        if ev.kind == NODES:
                            # Whom it reaches is judged by the nodes' networks of now (the log has no index).
                            seen = ev.action != "put" or obj.role == "manager" or obj.id in self.state.managers
                            batch.add(NODES, ev.action, ev.value, obj, None if seen else self.state.node_keys(obj.id))
                        else:
                            if ev.kind == ENDPOINTS and ev.action == "put":
                                self._carry_node(batch, obj, first=False)
                            batch.add(ev.kind, ev.action, ev.value, obj)
                frame = batch.frame(batch.select(node_id, scope)) if batch.events else None
                if frame is not None:
                    yield c.rev, frame
                if c.rev >= until:
                    break

    # ------------------------------------------------------------ the stream
    def subscribe(self, node_id: str, hostname: str, since: int, asked: frozenset[str] = frozenset()) -> Watcher:
        """A new watcher of node_id from revision `since`. From now on every new revision reaches its
        queue; what it gets first is decided here, before any await, so that a snapshot is exactly
        the state at the subscription's revision (`w.start`).

        One stream per node: a new one ends the node's older ones (an agent that reconnects has given
        up on them; a node opening many would cost a snapshot and a queue each)."""
        self.disconnect(node_id, "replaced by a newer watch stream of this node")
        w = Watcher(node_id, hostname, asked, self.max_frames, self.max_bytes)
        self.watchers.add(w)
        self._by_node[node_id] = w
        for net in asked:
            self._askers[net].add(w)
        w.since, w.start = since, self.state.rev
        w.first = self.snapshot_parts(node_id, asked) if since == 0 or since > w.start else None
        return w

    async def frames(self, w: Watcher) -> AsyncIterator[bytes]:
        """What the stream of w carries: the snapshot or the missed events, then each batch of its scope
        as it comes, and a ping when there was nothing for `ping` seconds. Ends when w is ended."""
        mode = "snapshot" if w.first is not None else ("events" if w.since < w.start else "nothing")
        sent = False
        if w.first is None and w.since < w.start:
            try:
                async for rev, frame in self.missed(w.node_id, w.asked, w.since, w.start):
                    yield frame
                    w.rev, sent = rev, True
            except Compacted:
                # The change log no longer reaches back to its revision: a snapshot of now instead.
                mode, w.first, w.start = "snapshot", self.snapshot_parts(w.node_id, w.asked), self.state.rev
                w.frames = deque((r, f) for r, f in w.frames if r > w.start)
                w.size = sum(len(f) for _, f in w.frames)
        if w.first is not None:
            # Dropped once handed over (a watcher lives for days; its snapshot need not), and written in
            # pieces: each waits for the socket to drain, so a connection holds at most about WRITE_CHUNK of
            # it in encrypted copies, whatever the size of the cluster.
            parts, w.first = w.first, None
            if sum(map(len, parts)) <= WRITE_CHUNK:
                yield b"".join(parts)
            else:
                for piece in pieces(parts, WRITE_CHUNK):
                    yield piece
            del parts
            sent = True
        w.rev = max(w.rev, w.start)
        if not sent and not w.frames:
            # A resume with nothing to catch up on is acknowledged at once, not at the first ping: after a
            # manager restart every agent knows within a round trip that its stream is back.
            yield b'{"type":"ping","rev":%d}\n' % w.rev
        log.info("watch opened", extra={"node": w.node_id, "hostname": w.hostname, "since": w.since,
                                        "rev": w.start, "sent": mode})
        while True:
            if not w.frames and w.ended is None:
                try:
                    async with asyncio.timeout(self.ping):
                        await w.ready.wait()
                except TimeoutError:
                    if w.frames or w.ended is not None:
                        continue  # something came as the wait ended: send that, not a ping ahead of it
                    # Nothing for this node since its last line: it holds every revision up to now.
                    w.rev = max(w.rev, self.state.rev)
                    yield b'{"type":"ping","rev":%d}\n' % w.rev
                    continue
            if w.ended is not None:
                return
            wait = coalesce_wait(time.monotonic(), w.wrote, len(self.watchers))
            if wait > 0:
                await asyncio.sleep(wait)   # what comes meanwhile goes in the same write
                if w.ended is not None:
                    return
            chunk = w.take()
            w.wrote = time.monotonic()
            yield chunk[0][1] if len(chunk) == 1 else b"".join(f for _, f in chunk)
            w.rev = chunk[-1][0]

    async def serve(self, request: web.Request, node: Node) -> web.StreamResponse:
        """GET /watch?since=REV[&networks=ID,...] for `node` (the caller, by its certificate)."""
        since, asked = parse_query(request.query)
        if since > self.state.rev:
            # Resumed here after another manager (several managers, one store): catch up to its revision
            # first, so that it gets the events it missed, not a snapshot.
            try:
                async with asyncio.timeout(CATCH_UP):
                    await self.sync()
            except (TimeoutError, NetweftError):
                pass
        w = self.subscribe(node.id, node.hostname, since, asked)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        t0 = time.monotonic()
        lines = self.frames(w)
        try:
            await resp.prepare(request)
            async for data in lines:
                await resp.write(data)
            await resp.write_eof()
        except ConnectionError:
            # A worker restarting or leaving: one line (below), never a traceback.
            w.ended = w.ended or "the node disconnected"
        except asyncio.CancelledError:
            w.ended = w.ended or "the manager is stopping"
            raise
        finally:
            await lines.aclose()
            self._end(w, "closed")
            self._closed_line(w, t0)
        return resp

    @staticmethod
    def _closed_line(w: Watcher, t0: float) -> None:
        level = logging.WARNING if w.ended.startswith("cut off") else logging.INFO
        log.log(level, "watch closed", extra={"node": w.node_id, "hostname": w.hostname, "rev": w.rev,
                                              "reason": w.ended, "s": round(time.monotonic() - t0, 1)})
