"""The overlay agent: this host's share of the cluster's overlay state, and the kernel made to match it.

The local copy: the nodes, the overlay networks in this host's scope (netweft/model/watch.py) with their
endpoints, each network with the revision it is current at, and the stream's revision. It is saved in
the local store, so a restarted agent reconciles with no manager in reach. This host's own overlay
endpoints are first-class records in the local store (kind "endpoints"), whoever owns them (a netweft
container, a CNI attachment): the agent programs every record and deletes none it did not remove.

Three things change the kernel, one network at a time, under that network's lock:
- attach and detach. An attach holds the lock from before POST /endpoints until its endpoint is
  programmed. The answer (an Attachment) carries the network's state at revision R; it replaces the
  copy's if newer, and the network's watch events that arrive meanwhile are held and then applied only
  above R. So no attach computes peers while events of its network are being applied (issue 7, item 11).
- watch events, applied to the copy one object at a time as they arrive (an object that cannot be
  decoded is logged once and skipped, the others go on), then programmed as a delta of peers by the
  network's flush.
- the periodic resync: desired vs observed for every sandbox and the gateway bridge (agent/reconcile.py),
  which repairs drift and retries whatever failed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol
from urllib.parse import quote

import msgspec

from netweft import metrics
from netweft.agent import keyring, reconcile
from netweft.agent.health import Prober
from netweft.agent.reconcile import DesiredNetwork, Gateway, GwPort, ObservedNetwork, Port
from netweft.agent.tunnels import TunnelAgent, current_addr
from netweft.dataplane.wgconf import DEFAULT_WG_PORT, WG_OVERHEAD
from netweft.agent.watcher import Watcher
from netweft.dataplane.checks import unicast_mac
from netweft.dataplane.api import GWBRIDGE, VXLAN_OVERHEAD, DataPlane
from netweft.errors import InvalidRequest, NetweftError, NotFound, PoolExhausted, Unavailable
from netweft.ipam import address as ipam
from netweft.ipam.inuse import InUse
from netweft.model.codec import convert, encode, to_builtins
from netweft.model.objects import Endpoint, Network, Node, Owner, Peer, PeerHealth, Revision, Sandbox
from netweft.model.watch import (RELEASE_MAX, Attachment, EndpointRequest, Event, NetworkEvent, NodeEvent,
                                 ServiceEvent, TaskEvent)
from netweft.store.local import ENDPOINTS, Store, endpoint_name, get_setting, put_setting_encoded

log = logging.getLogger("netweft.agent.overlay")

SANDBOX_VETH = "nwv"   # an endpoint's port in its sandbox
GW_VETH = "nwg"        # an endpoint's port on the gateway bridge (host namespace)
VXLAN_TMP = "nwx"      # a VXLAN device's name in the host namespace before it moves into its sandbox
CACHE_KEY = "overlay-cache"
RESYNC_PERIOD = 3.0    # seconds between full resyncs (drift repair, retries)
RELEASE_PARALLEL = 16  # addresses released at the managers at once by a detach of many (`rm -f` of thousands)
RETRY_BAD_FIRST, RETRY_BAD_CAP = 3.0, 60.0   # a fresh snapshot while some record could not be applied


class OverlayHost(Protocol):
    """What the overlay agent needs from the engine that runs it, and no more."""
    store: Store            # the host's local store: endpoint records, the agent's saved copy
    sandbox_dir: str        # where the sandbox namespaces are pinned

    async def gateway_subnet(self) -> tuple[str, str]:
        """(subnet, gateway IP) of the gateway bridge: chosen once among the host's free subnets, kept."""

    async def gateway_released(self) -> None:
        """The gateway bridge is gone (this host left its swarm)."""


@dataclass
class NetState:
    """One network of the copy: its state at `rev`, and the peer changes not programmed yet."""
    network: Network
    rev: int
    endpoints: dict[str, Endpoint]
    pending: dict[Peer, bool] = field(default_factory=dict)   # peer -> add (True) or remove (False)


class _NetCopy(msgspec.Struct):
    network: Network
    rev: Revision
    endpoints: list[Endpoint] = []


class _Saved(msgspec.Struct):
    """The copy as saved in the local store."""
    rev: Revision = 0
    nodes: list[Node] = []
    networks: list[_NetCopy] = []
    pending_release: list[str] = []
    orphans: list[EndpointRequest] = []
    want_snapshot: bool = False   # something could not be applied: a restarted agent takes a snapshot too


def _kept(old: Endpoint | None, new: Endpoint) -> Endpoint:
    """The copy already held if `new` equals it (the watch repeating an attach's answer, a snapshot repeating the
    copy): one object per endpoint, not one per message that carried it. Else `new`, its strings that thousands
    of endpoints repeat (network, node, hostname, VTEP) shared with theirs."""
    if old is not None and old == new:
        return old
    new.network_id, new.node_id, new.hostname = (sys.intern(new.network_id), sys.intern(new.node_id),
                                                 sys.intern(new.hostname))
    if new.vtep is not None:
        new.vtep = sys.intern(new.vtep)
    return new


def _repairs(out: reconcile.Outcome) -> int:
    """Steps of a resync that changed something: drift repaired, or work that had failed done now."""
    n = 0
    for step, result in out.done:
        if step.op.startswith("delete_") or step.op in ("add_peers", "remove_peers"):
            n += 1
        elif step.op == "sync_peers" and result:
            n += 1
        elif step.op == "ensure_sandbox" and result is True:
            n += 1
    return n


class OverlayAgent:
    def __init__(self, host: OverlayHost, dataplane: DataPlane, client, node_id: str, vtep: str, port: int,
                 wg_port: int = DEFAULT_WG_PORT, key_period: float = keyring.DEFAULT_PERIOD):
        self.host, self.dp, self.client = host, dataplane, client
        self.store = host.store
        self.node_id, self.vtep, self.port = node_id, vtep, port
        self.sandbox_dir = host.sandbox_dir
        os.makedirs(self.sandbox_dir, mode=0o700, exist_ok=True)
        self.nets: dict[str, NetState] = {}
        self.nodes: dict[str, Node] = {}
        # node -> the revision its object here is of: an attach answer's nodes (at its revision) never replace
        # a newer one the watch brought (watch/peer scoping: see netweft/model/watch.py)
        self._node_revs: dict[str, int] = {}
        self.rev = 0                     # the stream's position
        self.bad_rev: int | None = None  # the first revision holding an object that could not be applied
        self.pending_release: list[str] = []   # endpoints removed while no manager was reachable
        # Attaches whose answer never came (a timeout, a cut): the manager may hold an endpoint for the owner.
        self.orphans: list[EndpointRequest] = []
        self._releasing: asyncio.Task | None = None
        self.local: dict[str, Endpoint] = {}   # this host's overlay endpoint records (the store's, mirrored)
        self._local_by_net: dict[str, dict[str, Endpoint]] = {}   # self.local by network (asked on every attach)
        # network -> {local endpoint: the revision its attach answered}: an endpoint the managers still hold
        # and whose network's copy is current past that revision vouches that the watch has carried that
        # network since, so an attach asks only for its own endpoint (O(1) in the network's size).
        self._anchors: dict[str, dict[str, int]] = {}
        self._gw_inuse: InUse | None = None     # gateway bridge addresses of the local records
        self._locks: dict[str, asyncio.Lock] = {}       # per network, by sandbox name
        self._held: dict[str, list] = {}                # per network: stream items held during an attach
        self._flushing: set[str] = set()
        self._gw_lock = asyncio.Lock()
        self._gw_claims: dict[str, str] = {}            # gateway port -> IP, of attaches in progress
        self._gw: Gateway | None = None
        self._gw_ensured = False
        self._sandbox_checked: dict[str, tuple[tuple, float]] = {}   # path -> (ensure_sandbox args, when)
        self._underlay_mtu: int | None = None
        self._logged: set[str] = set()
        self._save_handle: asyncio.Handle | None = None
        self._save_cost = 0.0   # seconds the last save of the copy took
        self._resync_cost = 0.0   # seconds the last periodic resync took
        self._want_snapshot = False
        self._retry_bad = RETRY_BAD_FIRST
        self._retry_bad_at = 0.0
        self.tasks: list[asyncio.Task] = []
        self.watcher = Watcher(client, since=self._since, handle=self.on_message, on_connect=self._on_connect)
        # Who else hears the watch: f(event) per event, f(None) at each (re)connection (daemon/tasks.py).
        self.observers: list = []
        self._load()
        # Encrypted networks: this host's WireGuard tunnel (agent/tunnels.py).
        self.tunnels = TunnelAgent(self, dataplane, client, self.store, node_id, port, wg_port, key_period)
        self._targets: tuple[tuple, dict[str, str]] = ((), {})
        self.prober = Prober(self)   # data-path health of the peer hosts (agent/health.py)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.tunnels.start()
        await self.resync(full=True)
        self.tasks = [asyncio.ensure_future(self.watcher.run()), asyncio.ensure_future(self._resync_loop())]
        self.prober.start()

    async def stop(self) -> None:
        if self._releasing is not None:
            self.tasks.append(self._releasing)
            self._releasing = None
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        await self.prober.stop()
        await self.tunnels.stop()
        self._save()

    @property
    def connected(self) -> asyncio.Event:
        return self.watcher.connected

    def _load(self) -> None:
        doc = get_setting(self.store, CACHE_KEY)
        if doc is not None:
            try:
                saved = convert(doc, _Saved, "saved overlay state")
            except InvalidRequest as e:
                log.warning("the saved overlay state is unreadable; starting from a fresh snapshot",
                            extra={"reason": str(e)})
                saved = _Saved()
            self.rev = saved.rev
            self.nodes = {n.id: n for n in saved.nodes}
            self.nets = {c.network.id: NetState(c.network, c.rev, {e.id: e for e in c.endpoints})
                         for c in saved.networks}
            self.pending_release = list(saved.pending_release)
            self.orphans = list(saved.orphans)
            self._want_snapshot = saved.want_snapshot
        for doc in self.store.list(ENDPOINTS):
            if not doc.get("node_id"):
                continue  # a local (bridge) network's endpoint: the engine's
            try:
                ep = convert(doc, Endpoint, "endpoint record")
            except InvalidRequest as e:
                self._once(f"record {doc.get('id')}", "an endpoint record is unreadable; left as it is",
                           reason=str(e))
                continue
            self._add_local(ep)

    def _add_local(self, ep: Endpoint) -> None:
        old = self.local.get(ep.id)
        if old is not None and self._gw_inuse is not None and old.gw_ip:
            self._gw_inuse.discard(old.gw_ip)
        self.local[ep.id] = ep
        self._local_by_net.setdefault(ep.network_id, {})[ep.id] = ep
        if self._gw_inuse is not None and ep.gw_ip:
            self._gw_inuse.add(ep.gw_ip)

    def _drop_local(self, ep_id: str) -> None:
        old = self.local.pop(ep_id, None)
        if old is None:
            return
        on_net = self._local_by_net.get(old.network_id, {})
        on_net.pop(ep_id, None)
        if not on_net:
            self._local_by_net.pop(old.network_id, None)
        anchors = self._anchors.get(old.network_id)
        if anchors is not None:
            anchors.pop(ep_id, None)
            if not anchors:
                del self._anchors[old.network_id]
        if self._gw_inuse is not None and old.gw_ip:
            self._gw_inuse.discard(old.gw_ip)

    def _anchor(self, net_id: str) -> tuple[str, int] | None:
        """(local endpoint, the network copy's revision) for an attach that needs no state, or None: the copy
        has no network state vouched for by an endpoint the watch has carried it with."""
        ns, anchors = self.nets.get(net_id), self._anchors.get(net_id)
        if ns is None or not anchors or net_id in self._held:
            return None
        ep_id, rev = next(iter(anchors.items()))   # the oldest: its revision is the lowest
        return (ep_id, ns.rev) if rev <= ns.rev else None

    def _save(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        # The saved revision moves only past what was applied: not past an object that could not be.
        rev = self.rev if self.bad_rev is None else max(0, self.bad_rev - 1)
        saved = _Saved(rev=rev, nodes=list(self.nodes.values()),
                       networks=[_NetCopy(ns.network, ns.rev, list(ns.endpoints.values()))
                                 for ns in self.nets.values()],
                       pending_release=list(self.pending_release), orphans=list(self.orphans),
                       want_snapshot=self._want_snapshot or self.bad_rev is not None)
        t0 = time.monotonic()
        # Encoded straight to JSON: as builtins first, thousands of short-lived dicts a save (one per endpoint) would
        # be scattered over the heap between long-lived objects, which then pin its pages.
        put_setting_encoded(self.store, CACHE_KEY, encode(saved).decode())
        self._save_cost = time.monotonic() - t0

    def _save_soon(self) -> None:
        # Saving lags by a moment at most: resuming from a slightly older revision replays idempotent events.
        # The copy grows with the endpoints (thousands on one host): saves are spaced so that they take at
        # most ~5 % of the time, else every attach would pay for all the others.
        if self._save_handle is None:
            delay = max(0.2, 20 * self._save_cost)
            self._save_handle = asyncio.get_running_loop().call_later(delay, self._save)

    def _once(self, key: str, message: str, **extra) -> None:
        """Log a problem once per agent life (the resync retries it every few seconds)."""
        if key in self._logged:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(key)
        log.warning(message, extra=extra)

    # ------------------------------------------------------------------ views (for the engine)
    def sandbox(self, net_id: str) -> str:
        return os.path.join(self.sandbox_dir, net_id[:12])

    def networks(self) -> list[Network]:
        """The overlay networks in this host's scope."""
        return [ns.network for ns in self.nets.values()]

    def find_network(self, ref: str) -> Network | None:
        """A network of the copy by ID, name or unique ID prefix."""
        if ref in self.nets:
            return self.nets[ref].network
        hit = next((ns.network for ns in self.nets.values() if ns.network.name == ref), None)
        if hit is None and len(ref) >= 3:
            hits = [ns.network for ns in self.nets.values() if ns.network.id.startswith(ref)]
            hit = hits[0] if len(hits) == 1 else None
        return hit

    async def fetch_network(self, ref: str) -> Network | None:
        """A network looked up at the managers (it need not be in this host's scope); None if unknown."""
        try:
            doc = await self.client.call("GET", f"/networks/{quote(ref, safe='')}")
        except NetweftError as e:
            if getattr(e, "status", None) == 404 or isinstance(e, NotFound):
                return None
            raise
        return convert(doc, Network, "network from the manager")

    async def fetch_networks(self) -> list[Network]:
        """Every overlay network of the cluster, from the managers."""
        return convert(await self.client.call("GET", "/networks"), list[Network], "networks from the manager")

    def peers_view(self, net_id: str) -> list[tuple[str, str, PeerHealth | None]]:
        """(hostname, VTEP, data-path health or None) of every host with an endpoint on the network, as far as
        the copy knows (this host's own health: None)."""
        ns = self.nets.get(net_id)
        if ns is None:
            return []
        hosts = {(e.hostname, self._vtep(e) or "", e.node_id) for e in ns.endpoints.values()}
        out = []
        for hostname, vtep, node_id in sorted(hosts):
            h = self.prober.peer_health(node_id) if node_id != self.node_id else None
            out.append((hostname, vtep, h))
        return out

    def probe_targets(self) -> dict[str, str]:
        """node ID -> VTEP of the hosts this host shares an overlay with (those with endpoints on a network
        with endpoints here): the data-path prober's targets. Recomputed only when the copy moved."""
        key = (self.rev, len(self.local), len(self.nodes), tuple(sorted(self._local_networks())))
        if self._targets[0] != key:
            out = {}
            for net_id in self._local_networks():
                ns = self.nets.get(net_id)
                for e in (ns.endpoints.values() if ns is not None else ()):
                    if e.node_id and e.node_id != self.node_id and e.node_id not in out:
                        vtep = self._vtep(e)
                        if vtep:
                            out[e.node_id] = vtep
            self._targets = (key, out)
        return self._targets[1]

    async def underlay_mtu(self) -> int:
        return await self._uplink_mtu()

    # ------------------------------------------------------------------ peers
    def _vtep(self, ep: Endpoint) -> str | None:
        node = self.nodes.get(ep.node_id)
        return node.addr if node is not None else ep.vtep

    def _peer(self, ep: Endpoint | None) -> Peer | None:
        """The endpoint as this host programs it, or None for its own endpoints (and unreachable ones).
        A MAC that is no host's (zero, broadcast, multicast) would be VXLAN's flood destination: never a peer.
        On an encrypted network the VTEP is the node's tunnel address (None until it has published a key)."""
        if ep is None or ep.node_id == self.node_id or not unicast_mac(ep.mac):
            return None
        node = self.nodes.get(ep.node_id)
        if node is not None and node.withdrawn:
            return None   # down for the managers and unreachable on the data path (manager/liveness.py)
        ns = self.nets.get(ep.network_id)
        if ns is not None and ns.network.encrypted:
            vtep = current_addr(node)
        else:
            vtep = self._vtep(ep)
        return Peer(ep.ip, ep.mac, vtep) if vtep else None

    def remote_peers(self, net_id: str) -> frozenset[Peer]:
        ns = self.nets.get(net_id)
        if ns is None:
            return frozenset()
        return frozenset(p for p in map(self._peer, ns.endpoints.values()) if p is not None)

    @staticmethod
    def _delta(ns: NetState, old: Peer | None, new: Peer | None) -> None:
        if old == new:
            return
        if old is not None:
            ns.pending[old] = False
        if new is not None:
            ns.pending[new] = True

    def local_on(self, net_id: str) -> list[Endpoint]:
        """This host's endpoint records on one network."""
        return list(self._local_by_net.get(net_id, {}).values())

    def _local_networks(self) -> set[str]:
        return set(self._local_by_net)

    # ------------------------------------------------------------------ the watch
    def _since(self) -> int:
        # A snapshot when asked for, or when a local endpoint's network is missing from the copy (a crash
        # before the copy was saved): resuming would bring only that network's later changes.
        if self._want_snapshot or any(e.network_id not in self.nets for e in self.local.values()):
            return 0
        return self.rev

    def _on_connect(self) -> None:
        self._kick_releases()
        for f in self.observers:
            f(None)

    def _kick_releases(self) -> None:
        """Release what waits for a manager, in one task at a time."""
        if (self.pending_release or self.orphans) and (self._releasing is None or self._releasing.done()):
            self._releasing = asyncio.ensure_future(self._release_pending())

    def _bad(self, rev: int, what: str, reason: str) -> None:
        self._once(f"bad {what} {reason}", f"a {what} from the watch could not be applied; skipped, retried "
                   "by a later resync", reason=reason, rev=rev)
        self.bad_rev = rev if self.bad_rev is None else min(self.bad_rev, rev)

    def on_message(self, msg: dict) -> None:
        """One line of the watch: applied to the copy at once, object by object; the kernel follows."""
        metrics.watch_message(msg)
        rev = msg.get("rev") if isinstance(msg, dict) else None
        if not isinstance(rev, int) or isinstance(rev, bool) or rev < 0:
            self._bad(self.rev + 1, "message", "no revision")
            return
        kind = msg.get("type")
        if kind == "ping":
            self.rev = max(self.rev, rev)   # nothing in this host's scope changed up to rev
            return
        if kind == "snapshot":
            self._on_snapshot(msg, rev)
        elif kind == "events" and isinstance(msg.get("events"), list):
            touched: set[str] = set()
            for raw in msg["events"]:
                try:
                    ev = convert(raw, Event, "watch event")
                except InvalidRequest as e:
                    self._bad(rev, "watch event", str(e))
                    continue
                self._route(rev, ev, touched)
            self._finish(rev, touched)
        else:
            self._bad(rev, "message", f"unknown message type {str(kind)[:40]!r}")
            return
        self._save_soon()

    def _route(self, rev: int, ev, touched: set[str]) -> None:
        for f in self.observers:
            f(ev)
        if isinstance(ev, (ServiceEvent, TaskEvent)):
            return   # not the data plane's: the observers' (service tasks)
        if isinstance(ev, NodeEvent):
            self._node_revs[ev.object.id] = rev
            self._apply_node(ev, touched)
            return
        net_id = ev.object.id if isinstance(ev, NetworkEvent) else ev.object.network_id
        held = self._held.get(net_id)
        if held is not None:
            held.append((rev, ev))   # an attach of this network is installing its state
            return
        self._apply(rev, ev, touched)

    def _apply(self, rev: int, ev, touched: set[str]) -> None:
        """One network or endpoint event, if newer than the network's state."""
        if isinstance(ev, NetworkEvent):
            net = ev.object
            ns = self.nets.get(net.id)
            if ev.action == "put":
                if ns is None:
                    self.nets[net.id] = NetState(net, rev - 1, {})   # enters the scope; its endpoints follow
                elif rev > ns.rev:
                    ns.network = net
            elif ns is not None and rev > ns.rev and net.id not in self._local_by_net:
                del self.nets[net.id]
            touched.add(net.id)
            return
        ep = ev.object
        ns = self.nets.get(ep.network_id)
        if ns is None or rev <= ns.rev:
            return   # not in this host's scope, or already in its state (an attachment covered it)
        old = ns.endpoints.get(ep.id)
        if ev.action == "put":
            ep = ns.endpoints[ep.id] = _kept(old, ep)
            self._delta(ns, self._peer(old), self._peer(ep))
        else:
            ns.endpoints.pop(ep.id, None)
            self._delta(ns, self._peer(old), None)
        touched.add(ep.network_id)

    def _apply_node(self, ev: NodeEvent, touched: set[str]) -> None:
        node_id = ev.object.id
        old = self.nodes.get(node_id)
        self.tunnels.kick()   # its WireGuard keys may have changed
        if ev.action == "put" and old is not None and (old.addr, old.withdrawn) == (ev.object.addr,
                                                                                     ev.object.withdrawn) \
                and current_addr(old) == current_addr(ev.object):
            self.nodes[node_id] = ev.object   # its VTEPs are the same, not withdrawn either: no peer changes
            return
        affected = [(ns, e) for ns in self.nets.values() for e in ns.endpoints.values() if e.node_id == node_id]
        before = [self._peer(e) for _, e in affected]
        if ev.action == "put":
            self.nodes[node_id] = ev.object
        else:
            self.nodes.pop(node_id, None)
        for (ns, e), old in zip(affected, before):
            self._delta(ns, old, self._peer(e))
            touched.add(ns.network.id)

    def _learn_nodes(self, nodes: list[Node], rev: int) -> None:
        """The nodes an attach answer brought (those on the network joined, at `rev`), unless the watch
        brought a newer object of one; peers on the networks already here follow their changes."""
        fresh = {n.id: n for n in nodes if n.id != self.node_id and self._node_revs.get(n.id, -1) < rev}
        if not fresh:
            return
        affected = [(ns, e) for ns in self.nets.values() for e in ns.endpoints.values() if e.node_id in fresh]
        before = [self._peer(e) for _, e in affected]
        self.nodes.update(fresh)
        self._node_revs.update(dict.fromkeys(fresh, rev))
        touched: set[str] = set()
        for (ns, e), old in zip(affected, before):
            self._delta(ns, old, self._peer(e))
            touched.add(ns.network.id)
        for net_id in touched:
            self._schedule_flush(net_id)
        self.tunnels.kick()   # their WireGuard keys

    def _finish(self, rev: int, touched: set[str]) -> None:
        """After a whole message at rev: every network not being attached is current at rev."""
        for net_id, ns in self.nets.items():
            if net_id not in self._held:
                ns.rev = max(ns.rev, rev)
        self.rev = max(self.rev, rev)
        for net_id in touched:
            self._schedule_flush(net_id)

    def _on_snapshot(self, msg: dict, rev: int) -> None:
        self._want_snapshot = False
        self.bad_rev = None
        nodes, networks, endpoints = ([self._decode(msg, key, t, rev) for key, t in
                                       (("nodes", Node), ("networks", Network), ("endpoints", Endpoint))])
        by_net: dict[str, list[Endpoint]] = {}
        for e in endpoints:
            by_net.setdefault(e.network_id, []).append(e)
        before = {net_id: self.remote_peers(net_id) for net_id in self.nets if net_id not in self._held}
        self.nodes = {n.id: n for n in nodes}
        self._node_revs = dict.fromkeys(self.nodes, rev)
        listed = set()
        for net in networks:
            listed.add(net.id)
            if net.id in self._held:
                self._held[net.id].append((rev, ("state", net, by_net.get(net.id, []))))
                continue
            self._set_state(net, rev, by_net.get(net.id, []), force=True)
        for net_id in list(self.nets):
            ns = self.nets[net_id]
            if net_id in listed or net_id in self._held:
                continue
            if net_id in self._local_networks():
                self._once(f"unlisted {net_id}", "a network with endpoints on this host is not in the manager's "
                           "snapshot; it is kept as it is", network=ns.network.name)
            else:
                del self.nets[net_id]
        for net_id, ns in self.nets.items():
            if net_id in self._held:
                continue
            old, new = before.get(net_id, frozenset()), self.remote_peers(net_id)
            for p in old - new:
                ns.pending[p] = False
            for p in new - old:
                ns.pending[p] = True
            ns.rev = rev   # the snapshot is the truth, even below what was held (a manager's history restarted)
            self._schedule_flush(net_id)
        self.rev = rev
        self.tunnels.kick()
        log.info("watch snapshot applied", extra={"rev": rev, "networks": len(self.nets)})

    def _decode(self, msg: dict, key: str, type_, rev: int) -> list:
        items = msg.get(key)
        if not isinstance(items, list):
            self._bad(rev, "snapshot", f"no list of {key}")
            return []
        out = []
        for raw in items:
            try:
                out.append(convert(raw, type_, f"{type_.__name__.lower()} in the snapshot"))
            except InvalidRequest as e:
                self._bad(rev, type_.__name__.lower(), str(e))
        return out

    def _set_state(self, net: Network, rev: int, endpoints: list[Endpoint], force: bool = False) -> NetState:
        """The network's whole state at rev, unless the copy holds a newer one (`force`: even then); peer
        changes become pending."""
        ns = self.nets.get(net.id)
        if ns is not None and ns.rev > rev and not force:
            return ns
        if ns is None:
            ns = self.nets[net.id] = NetState(net, rev, {})
        old = self.remote_peers(net.id)
        held = ns.endpoints
        ns.network, ns.rev, ns.endpoints = net, rev, {e.id: _kept(held.get(e.id), e) for e in endpoints}
        new = self.remote_peers(net.id)
        for p in old - new:
            ns.pending[p] = False
        for p in new - old:
            ns.pending[p] = True
        return ns

    def _release_held(self, net_id: str) -> None:
        """Apply what the stream brought for this network while its attach ran, above the state installed."""
        items = self._held.pop(net_id, [])
        touched: set[str] = set()
        current = None
        for rev, item in items:
            if current is not None and rev != current:
                self._bump(net_id, current)
            current = rev
            if isinstance(item, tuple):
                _, net, eps = item
                self._set_state(net, rev, eps)
                touched.add(net_id)
            else:
                self._apply(rev, item, touched)
        if current is not None:
            self._bump(net_id, current)
        self._schedule_flush(net_id)

    def _bump(self, net_id: str, rev: int) -> None:
        ns = self.nets.get(net_id)
        if ns is not None:
            ns.rev = max(ns.rev, rev)

    # ------------------------------------------------------------------ programming peers
    def _lock(self, net_id: str) -> asyncio.Lock:
        return self._locks.setdefault(net_id[:12], asyncio.Lock())

    def _schedule_flush(self, net_id: str) -> None:
        ns = self.nets.get(net_id)
        if ns is None or not ns.pending or net_id in self._flushing:
            return
        self._flushing.add(net_id)
        asyncio.ensure_future(self._flush(net_id))

    async def _flush(self, net_id: str) -> None:
        try:
            async with self._lock(net_id):
                while True:
                    ns = self.nets.get(net_id)
                    if ns is None or not ns.pending:
                        break
                    if net_id not in self._local_by_net:
                        ns.pending.clear()   # no sandbox here: the copy is all there is to update
                        break
                    await self._flush_locked(ns)
        finally:
            self._flushing.discard(net_id)

    async def _flush_locked(self, ns: NetState) -> None:
        ops, ns.pending = ns.pending, {}
        if not ops:
            return
        path = self.sandbox(ns.network.id)
        add = [p for p, add in ops.items() if add]
        # A peer whose VTEP moved (a host's new address or WireGuard key) is replaced in place by its add:
        # removing it first would leave a moment with no entry for its MAC, and its packets would be lost.
        moved = {(p.ip, p.mac) for p in add}
        remove = [p for p, add in ops.items() if not add and (p.ip, p.mac) not in moved]
        t0 = time.monotonic()
        try:
            if remove:
                await self.dp.remove_peers(path, remove)
            if add:
                await self.dp.add_peers(path, add)
            metrics.reconciled("flush", time.monotonic() - t0)
        except Exception as e:  # the copy holds them: the next resync programs them
            metrics.reconciled("flush", time.monotonic() - t0, 1)
            self._once(f"flush {ns.network.id} {e}", "could not program peers of an overlay; the resync retries",
                       network=ns.network.name, reason=str(e))

    # ------------------------------------------------------------------ desired state
    async def _mtu(self, net: Network) -> int:
        if net.mtu:
            return net.mtu
        # An encrypted network's VXLAN travels inside WireGuard: room for both headers.
        return await self._uplink_mtu() - VXLAN_OVERHEAD - (WG_OVERHEAD if net.encrypted else 0)

    def _local_ip(self, net: Network) -> str:
        """VXLAN's source: the underlay address, or for an encrypted network none fixed (the tunnel route's
        source, which moves with the WireGuard key)."""
        return "" if net.encrypted else self.vtep

    # ---- for the tunnel (agent/tunnels.py) ----
    def encrypted_networks(self) -> list[Network]:
        """Encrypted networks in this host's scope (with endpoints here, or being attached)."""
        return [ns.network for ns in self.nets.values() if ns.network.encrypted]

    def hosts_on(self, net_id: str) -> set[str]:
        ns = self.nets.get(net_id)
        return {e.node_id for e in ns.endpoints.values()} if ns is not None else set()

    async def uplink_mtu(self) -> int:
        return await self._uplink_mtu()

    async def _uplink_mtu(self) -> int:
        if self._underlay_mtu is None:
            self._underlay_mtu = await self.dp.underlay_mtu(self.vtep)
        return self._underlay_mtu

    def _sandbox_spec(self, net: Network, mtu: int) -> Sandbox:
        if net.vni is None:
            raise InvalidRequest(f"overlay network {net.name!r} has no VNI")
        prefix = IPv4Network(net.subnet).prefixlen
        return Sandbox(network_id=net.id, path=self.sandbox(net.id), vni=net.vni,
                       gateway_cidr=f"{net.gateway}/{prefix}", mtu=mtu)

    @staticmethod
    def _port(ep: Endpoint, mtu: int) -> Port:
        return Port(ep.id, ep.sandbox_key, ep.host_ifname, ep.ifname, f"{ep.ip}/{ep.prefix_len}", ep.mac, mtu)

    def _desired(self, ns: NetState, local: list[Endpoint], mtu: int) -> DesiredNetwork:
        """Synchronous on purpose: peers and the pending changes they cover are taken at one instant."""
        ns.pending.clear()
        return DesiredNetwork(sandbox=self._sandbox_spec(ns.network, mtu), local_ip=self._local_ip(ns.network),
                              port=self.port,
                              tmp_name=f"{VXLAN_TMP}{ns.network.vni:06x}",
                              ports=tuple(self._port(e, mtu) for e in sorted(local, key=lambda e: e.id)),
                              peers=self.remote_peers(ns.network.id))

    async def _gateway(self) -> Gateway:
        if self._gw is None:
            subnet, gateway = await self.host.gateway_subnet()
            prefix = IPv4Network(subnet).prefixlen
            self._gw = Gateway(GWBRIDGE, f"{gateway}/{prefix}", subnet, await self._uplink_mtu())
        return self._gw

    async def _gw_port(self, ep: Endpoint) -> GwPort:
        gw = await self._gateway()
        prefix = IPv4Network(gw.subnet).prefixlen
        return GwPort(ep.id, ep.sandbox_key, ep.gw_host_ifname, ep.gw_ifname, f"{ep.gw_ip}/{prefix}",
                      ipam.mac_for_ip(IPv4Address(ep.gw_ip)), gw.mtu, ep.gateway)

    # ------------------------------------------------------------------ resync
    async def _resync_loop(self) -> None:
        while True:
            # A resync looks at every port and peer of the host (kernel dumps): with thousands of endpoints it
            # is spaced so that it takes at most ~5 % of the time, else every attach would wait on its locks.
            await asyncio.sleep(max(RESYNC_PERIOD, 20 * self._resync_cost))
            t0 = time.monotonic()
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._once(f"resync {e}", "overlay resync failed; retrying", reason=str(e))
            self._resync_cost = time.monotonic() - t0
            if self.bad_rev is not None and time.monotonic() >= self._retry_bad_at and self.connected.is_set():
                # Something the watch brought could not be applied: take a fresh snapshot (backing off).
                self._want_snapshot = True
                self._retry_bad_at = time.monotonic() + self._retry_bad
                self._retry_bad = min(RETRY_BAD_CAP, self._retry_bad * 2)
                self.watcher.restart()
            elif self.bad_rev is None:
                self._retry_bad = RETRY_BAD_FIRST
            if self.connected.is_set():
                self._kick_releases()   # an answer lost to a slow manager does not end the watch

    async def resync(self, full: bool = False) -> None:
        """Level-triggered: make every sandbox, port, peer table and the gateway bridge match the copy and
        the local records; delete what no record wants. One network at a time, under its lock; a network
        whose lock is held is left to the next round. `full`: also look into every owner's namespace (at
        start); otherwise only what is missing from the sandboxes and the gateway bridge is made again."""
        t0 = time.monotonic()
        names = {e.network_id[:12]: e.network_id for e in self.local.values()}
        repaired = failed = 0
        for name in sorted(set(names) | set(await self.dp.list_netns(self.sandbox_dir))):
            lock = self._locks.setdefault(name, asyncio.Lock())
            if lock.locked():
                continue   # an attach may wait on a frozen manager: the other networks are not held up by it
            async with lock:
                out = await self._resync_network(name, full)
            if out is not None:
                repaired += _repairs(out)
                failed += len(out.failed)
        async with self._gw_lock:
            out = await self._resync_gateway(full)
        repaired += _repairs(out)
        failed += len(out.failed)
        for name in (await self.dp.list_links(VXLAN_TMP)) if full else ():   # a crash's leftover: only at start
            log.info("removing a stale VXLAN device", extra={"link": name})
            await self.dp.delete_sandbox(os.path.join(self.sandbox_dir, "none"), name)
        metrics.reconciled("resync", time.monotonic() - t0, failed)
        if repaired or failed:
            log.info("overlays resynced", extra={"repaired": repaired, "failed": failed,
                                                 "ms": round((time.monotonic() - t0) * 1000)})

    async def _resync_network(self, name: str, full: bool) -> reconcile.Outcome | None:
        """One sandbox, under its network's lock: everything is looked at afresh here (an attach or a detach
        may have run while this waited for the lock)."""
        path = os.path.join(self.sandbox_dir, name)
        local = [e for e in self.local.values() if e.network_id[:12] == name]
        exists = name in await self.dp.list_netns(self.sandbox_dir)
        desired = None
        if local:
            net_id = local[0].network_id
            ns = self.nets.get(net_id)
            if ns is None:
                self._once(f"unknown {net_id}", "endpoints of an overlay network this host does not know are kept "
                           "as they are", network=net_id)
                return None
            try:
                if ns.network.encrypted:
                    await self.tunnels.ensure()
                mtu = await self._mtu(ns.network)
                while ns.pending and exists:   # what the watch brought is programmed first: the diff is drift
                    await self._flush_locked(ns)
                desired = self._desired(ns, local, mtu)
            except NetweftError as e:
                self._once(f"desired {net_id} {e}", "cannot program an overlay network", network=ns.network.name,
                           reason=str(e))
                return None
        obs = await self._observe(path, exists)
        if desired is None and obs.exists:
            log.info("removing a stale overlay sandbox", extra={"sandbox": name})
        out = await reconcile.execute(self.dp, reconcile.plan_network(path, desired, obs, full))
        self._report(out)
        return out

    async def _observe(self, path: str, exists: bool) -> ObservedNetwork:
        if not exists:
            return ObservedNetwork(False)
        try:
            ports = frozenset(await self.dp.list_overlay_endpoints(path))
        except NetweftError:
            ports = None
        try:
            peers = frozenset(await self.dp.list_peers(path))
        except NetweftError:
            peers = None   # no VXLAN device: the plan programs the whole table once it is back
        return ObservedNetwork(True, ports, peers)

    async def _resync_gateway(self, full: bool) -> reconcile.Outcome:
        # Records and claims at one instant: an attach's port is in one or the other (its claim goes only
        # once its record is in), and no port is made while this holds the gateway lock.
        eps = [e for e in self.local.values() if e.gw_host_ifname]
        keep = set(self._gw_claims)
        gw_ports, gateway = [], None
        if eps:
            try:
                gateway = await self._gateway()
                gw_ports = [await self._gw_port(e) for e in eps]
            except NetweftError as e:
                self._once(f"gateway {e}", "cannot program the gateway bridge", reason=str(e))
                return reconcile.Outcome()
        observed = set(await self.dp.list_links(GW_VETH))
        attached = None
        if not full and gateway is not None:   # a port left without its bridge (the bridge was remade) is made again
            attached = set(await self.dp.list_ports(GWBRIDGE))
        out = await reconcile.execute(self.dp, reconcile.plan_gateway(gateway, gw_ports, observed, keep=keep,
                                                                      attached=attached))
        self._report(out)
        return out

    def _report(self, out: reconcile.Outcome) -> None:
        for step, e in out.failed:
            self._once(f"{step!r} {e}", "an overlay step failed; the resync retries it", step=repr(step)[:200],
                       reason=str(e))

    # ------------------------------------------------------------------ attach, detach
    async def attach(self, owner: Owner, network_id: str, netns: str, ifname: str, *, gw_ifname: str | None,
                     ip: str | None = None, mac: str | None = None, aliases: list[str] | tuple = ()) -> Endpoint:
        """An endpoint of `owner` on an overlay: an address from the managers, then programmed here and
        recorded in the local store. `gw_ifname`: also a port on the gateway bridge with the default route."""
        req = EndpointRequest(network_id=network_id, owner=owner, ip=ip, mac=mac, aliases=list(aliases))
        async with self._lock(network_id):
            anchor = self._anchor(network_id)
            self._held[network_id] = []
            answer = None
            path = "/endpoints" if anchor is None else f"/endpoints?anchor={anchor[0]}&since={anchor[1]}"
            try:
                answer = await self.client.call("POST", path, to_builtins(req))
                att = convert(answer, Attachment, "answer of the manager to POST /endpoints")
                if att.endpoint.network_id != network_id or att.network.id != network_id:
                    raise InvalidRequest("the manager answered POST /endpoints with another network")
                if att.partial and anchor is None:
                    raise InvalidRequest("the manager answered POST /endpoints without the network's state")
            except BaseException as e:
                self._release_held(network_id)
                if answer is not None or isinstance(e, (Unavailable, asyncio.CancelledError)):
                    # No answer (timed out, cut, cancelled) or a bad one: the manager may have made it.
                    self._orphan(EndpointRequest(network_id=network_id, owner=owner))
                raise
            _kept(None, att.endpoint)   # its shared strings: the local record made from it keeps them
            new_here = network_id not in self._local_by_net
            self._learn_nodes(att.nodes, att.rev)
            if att.partial and anchor is not None and not new_here:
                # Only the endpoint: the copy is current at its revision and the watch brings the rest.
                self.nets[network_id].endpoints.setdefault(att.endpoint.id, att.endpoint)
            else:
                self._set_state(att.network, att.rev, att.endpoints).endpoints.setdefault(att.endpoint.id,
                                                                                           att.endpoint)
            self._release_held(network_id)
            self._save_soon()
            ep = att.endpoint
            ep = msgspec.structs.replace(ep, sandbox_key=netns, ifname=ifname, host_ifname=SANDBOX_VETH + ep.id[:12])
            try:
                if gw_ifname:
                    gw = await self._gateway()
                    ep = msgspec.structs.replace(ep, gw_ifname=gw_ifname, gw_host_ifname=GW_VETH + ep.id[:12],
                                                 gw_ip=self._claim_gw_ip(GW_VETH + ep.id[:12], gw),
                                                 gateway=gw.cidr.split("/")[0])
                await self._program(ep, new_here)
                self._put_record(ep)
                self._anchors.setdefault(network_id, {})[ep.id] = att.rev
            except BaseException as e:
                log.warning("overlay attach failed; undoing it", extra={"network": network_id, "reason": str(e)})
                await self._unprogram(ep, last=new_here)
                if new_here:
                    self.nets.pop(network_id, None)
                asyncio.ensure_future(self._release_quietly(ep.id))
                raise
            finally:
                if ep.gw_host_ifname:
                    self._gw_claims.pop(ep.gw_host_ifname, None)
        return ep

    async def reserve(self, owner: Owner, network_id: str, ip: str | None = None, mac: str | None = None) -> Endpoint:
        """An address on an overlay held at the managers for `owner` and programmed nowhere yet (an IPAM
        driver's RequestAddress): a later attach of the same owner gets this very endpoint."""
        req = EndpointRequest(network_id=network_id, owner=owner, ip=ip, mac=mac)
        answer = await self.client.call("POST", "/endpoints?state=none", to_builtins(req))
        return convert(answer, Attachment, "answer of the manager to POST /endpoints").endpoint

    async def release(self, ep_id: str) -> None:
        """Release an address held at the managers (idempotent)."""
        await self._release(ep_id)

    async def relocate(self, ep: Endpoint, sandbox_key: str, ifname: str) -> Endpoint:
        """The runtime moved the container end of an endpoint (Docker moves the interface a driver made into
        the container and renames it): where the resync finds it from now on."""
        async with self._lock(ep.network_id):
            moved = msgspec.structs.replace(self.local.get(ep.id, ep), sandbox_key=sandbox_key, ifname=ifname)
            self._put_record(moved)
        return moved

    def _claim_gw_ip(self, port: str, gw: Gateway) -> str:
        """A free address on the gateway bridge: taken and claimed at one instant (no await in between)."""
        inuse = self._gw_inuse
        if inuse is None or str(inuse.cfg.subnet) != gw.subnet or str(inuse.cfg.gateway) != gw.cidr.split("/")[0]:
            inuse = self._gw_inuse = InUse(ipam.build_subnet_config(IPv4Network(gw.subnet), gw.cidr.split("/")[0]))
            for e in self.local.values():
                if e.gw_ip:
                    inuse.add(e.gw_ip)
        found = inuse.lowest_free({int(IPv4Address(ip)) for ip in self._gw_claims.values()})
        if found is None:
            raise PoolExhausted(f"the gateway bridge {GWBRIDGE} ({gw.subnet}) is full: its "
                                f"{len(inuse) + len(self._gw_claims)} addresses are taken by overlay containers on "
                                "this host; remove one, or attach to an --internal overlay (no gateway port)")
        ip = str(found)
        self._gw_claims[port] = ip
        return ip

    async def _program(self, ep: Endpoint, new_sandbox: bool) -> None:
        """Sandbox, port and (first endpoint of the network here) the whole peer table; caller holds the lock."""
        ns = self.nets[ep.network_id]
        mtu = await self._mtu(ns.network)
        sb = self._sandbox_spec(ns.network, mtu)
        if ns.network.encrypted:
            await self.tunnels.ensure()   # rules and tunnel before the VXLAN device: never a packet in clear
        args = (sb.path, sb.vni, sb.gateway_cidr, mtu, self._local_ip(ns.network), self.port, f"{VXLAN_TMP}{sb.vni:06x}")
        # A sandbox checked moments ago with the same settings is trusted (checking costs ~10 ms of netlink per
        # attach); the resync checks it again, and an endpoint that cannot be made has it checked at once.
        checked_args, checked_at = self._sandbox_checked.get(sb.path, (None, 0.0))
        trusted = not new_sandbox and checked_args == args and time.monotonic() - checked_at < RESYNC_PERIOD
        created = False if trusted else await self._ensure_sandbox(args)
        p = self._port(ep, mtu)
        try:
            await self.dp.ensure_overlay_endpoint(sb.path, p.netns, p.host_ifname, p.ifname, p.address, p.mac, p.mtu)
        except NetweftError:
            if not trusted:
                raise
            created = await self._ensure_sandbox(args)
            await self.dp.ensure_overlay_endpoint(sb.path, p.netns, p.host_ifname, p.ifname, p.address, p.mac, p.mtu)
        if ep.gw_host_ifname:
            gp = await self._gw_port(ep)
            async with self._gw_lock:
                if not self._gw_ensured:  # once per agent life; the resync checks it again
                    await self.dp.ensure_gwbridge(self._gw.bridge, self._gw.cidr, self._gw.mtu)
                    await self.dp.apply_overlay_firewall(self._gw.bridge, self._gw.subnet)
                    self._gw_ensured = True
                await self.dp.ensure_gw_endpoint(gp.netns, self._gw.bridge, gp.host_ifname, gp.ifname, gp.address,
                                                 gp.mac, gp.mtu, gp.gateway_ip)
        if new_sandbox or created:
            ns.pending.clear()
            await self.dp.sync_peers(sb.path, self.remote_peers(ep.network_id))
        else:
            await self._flush_locked(ns)

    async def _ensure_sandbox(self, args: tuple) -> bool:
        """dp.ensure_sandbox(*args), remembered as checked now (see _program)."""
        self._sandbox_checked.pop(args[0], None)
        created = await self.dp.ensure_sandbox(*args)
        self._sandbox_checked[args[0]] = (args, time.monotonic())
        return created

    async def _unprogram(self, ep: Endpoint, last: bool) -> None:
        """Best effort: what stays behind is stale to the next resync, which removes it."""
        path = self.sandbox(ep.network_id)
        try:
            if ep.host_ifname:
                await self.dp.delete_overlay_endpoint(path, ep.host_ifname)
            if ep.gw_host_ifname:
                async with self._gw_lock:
                    await self.dp.delete_gw_endpoint(ep.gw_host_ifname)
            if last:
                self._sandbox_checked.pop(path, None)
                await self.dp.delete_sandbox(path)
        except NetweftError as e:
            self._once(f"unprogram {ep.id} {e}", "could not remove an overlay endpoint from the kernel; the resync "
                       "retries", endpoint=ep.id, reason=str(e))

    def _put_record(self, ep: Endpoint) -> None:
        with self.store.tx():
            self.store.put(ENDPOINTS, ep.id, endpoint_name(ep.owner, ep.network_id), to_builtins(ep))
        self._add_local(ep)

    def _delete_record(self, ep_id: str) -> None:
        with self.store.tx():
            self.store.delete(ENDPOINTS, ep_id)
        self._drop_local(ep_id)

    async def detach(self, ep: Endpoint) -> None:
        """Remove a local endpoint here now, and release its address at the managers (later if none is
        reachable)."""
        async with self._lock(ep.network_id):
            self._delete_record(ep.id)
            last = ep.network_id not in self._local_by_net
            await self._unprogram(ep, last)
            if last:   # the network leaves this host's scope with its last endpoint here
                self.nets.pop(ep.network_id, None)
            self._save_soon()
        try:
            await self._release(ep.id)
        except Unavailable as e:
            log.warning("no manager reachable: the endpoint is gone here and its address is released when one is",
                        extra={"endpoint": ep.id, "reason": str(e)})
            self.pending_release.append(ep.id)
            self._save()
        except NetweftError as e:
            log.warning("the manager refused to release an endpoint", extra={"endpoint": ep.id, "reason": str(e)})

    async def detach_many(self, eps: list[Endpoint]) -> None:
        """detach() of many local endpoints (`rm -f` of many): per network, under its lock once, the records
        go in one transaction and the kernel's veths and anti-spoofing elements in one operation each; then
        the addresses are released at the managers, several at a time. What the kernel refuses is left to
        the resync (the records are gone), as detach leaves it."""
        by_net: dict[str, list[Endpoint]] = {}
        for ep in eps:
            by_net.setdefault(ep.network_id, []).append(ep)
        for net_id, group in by_net.items():
            async with self._lock(net_id):
                with self.store.tx():
                    for ep in group:
                        self.store.delete(ENDPOINTS, ep.id)
                for ep in group:
                    self._drop_local(ep.id)
                last = net_id not in self._local_by_net
                await self._unprogram_many(net_id, group, last)
                if last:
                    self.nets.pop(net_id, None)
                self._save_soon()
        sem = asyncio.Semaphore(RELEASE_PARALLEL)

        async def release(ep_id: str) -> None:
            async with sem:
                try:
                    await self._release(ep_id)
                except Unavailable:
                    self.pending_release.append(ep_id)
                except NetweftError as e:
                    log.warning("the manager refused to release an endpoint", extra={"endpoint": ep_id,
                                                                                      "reason": str(e)})

        async def release_chunk(ids: list[str]) -> None:
            async with sem:
                try:
                    await self.client.call("POST", "/endpoints/release", {"ids": ids})
                    return
                except Unavailable:
                    self.pending_release.extend(ids)
                    return
                except NetweftError:
                    pass   # an older manager (no such call), or one refused: each on its own, as detach does
            await asyncio.gather(*(release(i) for i in ids))
        pending = len(self.pending_release)
        chunks = [[ep.id for ep in group[i:i + RELEASE_MAX]] for group in by_net.values()
                  for i in range(0, len(group), RELEASE_MAX)]
        await asyncio.gather(*(release_chunk(ids) for ids in chunks))
        if len(self.pending_release) > pending:
            log.warning("no manager reachable: endpoints are gone here and their addresses are released when "
                        "one is", extra={"endpoints": len(self.pending_release) - pending})
            self._save()

    async def _unprogram_many(self, net_id: str, eps: list[Endpoint], last: bool) -> None:
        """_unprogram of several endpoints of one network, each kind of link deleted in one go."""
        path = self.sandbox(net_id)
        try:
            ports = [ep.host_ifname for ep in eps if ep.host_ifname]
            if ports:
                await self.dp.delete_overlay_endpoints(path, ports)
            gw_ports = [ep.gw_host_ifname for ep in eps if ep.gw_host_ifname]
            if gw_ports:
                async with self._gw_lock:
                    await self.dp.delete_gw_endpoints(gw_ports)
            if last:
                self._sandbox_checked.pop(path, None)
                await self.dp.delete_sandbox(path)
        except NetweftError as e:
            self._once(f"unprogram {net_id} {e}", "could not remove overlay endpoints from the kernel; the resync "
                       "retries", network=net_id, endpoints=len(eps), reason=str(e))

    async def _release(self, ep_id: str) -> None:
        try:
            await self.client.call("DELETE", f"/endpoints/{ep_id}")
        except NetweftError as e:
            if getattr(e, "status", None) != 404:
                raise

    async def _release_quietly(self, ep_id: str) -> None:
        try:
            await self._release(ep_id)
        except Unavailable:
            self.pending_release.append(ep_id)
            self._save_soon()
        except NetweftError as e:
            log.warning("could not release an endpoint at the manager", extra={"endpoint": ep_id, "reason": str(e)})

    def _orphan(self, req: EndpointRequest) -> None:
        if req not in self.orphans:
            self.orphans.append(req)
        self._save()

    async def _release_orphan(self, req: EndpointRequest) -> None:
        """The endpoint the managers may hold for an attach whose answer was lost: asked for again (POST
        /endpoints is idempotent per owner) and released, unless the owner has attached again since. Under
        the network's lock, so that no attach of the same owner runs in between."""
        async with self._lock(req.network_id):
            if any(e.network_id == req.network_id and (e.owner.kind, e.owner.id) == (req.owner.kind, req.owner.id)
                   for e in self.local.values()):
                return   # attached again since: that endpoint is in use
            try:
                answer = await self.client.call("POST", "/endpoints?state=none", to_builtins(req))
            except Unavailable:
                raise
            except NetweftError:
                return   # refused (the network is gone, say): nothing is held for this owner
            await self._release(convert(answer, Attachment, "answer of the manager to POST /endpoints").endpoint.id)
        log.info("an endpoint whose attach lost its answer is released", extra={"network": req.network_id,
                                                                                 "owner": req.owner.id})

    async def _release_pending(self) -> None:
        while self.orphans:
            req = self.orphans[0]
            try:
                await self._release_orphan(req)
            except Unavailable:
                return   # again at the next connection or resync
            except NetweftError as e:
                log.warning("could not release an endpoint whose attach lost its answer",
                            extra={"network": req.network_id, "owner": req.owner.id, "reason": str(e)})
            if req in self.orphans:
                self.orphans.remove(req)
            self._save()
        while self.pending_release:
            ep_id = self.pending_release[0]
            try:
                await self._release(ep_id)
            except Unavailable:
                return   # again at the next connection
            except NetweftError as e:
                log.warning("the manager refused to release an endpoint", extra={"endpoint": ep_id, "reason": str(e)})
            if self.pending_release and self.pending_release[0] == ep_id:
                self.pending_release.pop(0)
            self._save()
            log.info("an endpoint removed while no manager was reachable is now released", extra={"endpoint": ep_id})

    # ------------------------------------------------------------------ leaving
    async def teardown(self) -> None:
        """This host leaves the swarm: every overlay endpoint record, sandbox and the gateway bridge go."""
        await self.stop()
        for ep in list(self.local.values()):
            await self._unprogram(ep, last=False)
            self._delete_record(ep.id)
        self._sandbox_checked.clear()
        for name in await self.dp.list_netns(self.sandbox_dir):
            await self.dp.delete_sandbox(os.path.join(self.sandbox_dir, name))
        for name in await self.dp.list_links(GW_VETH):
            await self.dp.delete_gw_endpoint(name)
        await self.dp.delete_overlay_firewall()
        await self.dp.delete_gwbridge(GWBRIDGE)
        await self.dp.delete_probe()
        self.nets.clear()
        await self.tunnels.teardown()
        with self.store.tx():
            self.store.delete("settings", CACHE_KEY)
        await self.host.gateway_released()
