"""The manager: the cluster's source of truth (CA, join tokens, nodes) and its API on TCP 2377.

Until managers replicate (the HA issue), the first manager is the leader: it holds the store.
Managers that join later hold a manager certificate and forward administrative calls to it.
Every call but GET /ca and POST /join needs a node certificate of this cluster; each route declares
the roles that may call it (manager/auth.py), and a removed node is refused and disconnected at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from datetime import datetime, timedelta, timezone

import msgspec
from aiohttp import web

from netweft.errors import Conflict, Forbidden, InvalidRequest, NetweftError, NotFound, Unauthorized, Unavailable
from netweft import metrics, pki
from netweft.manager import auth, events
from netweft.manager.auth import MANAGER, OPEN, WORKER, allow
from netweft.manager.overlays import AttachQuery, Overlays
from netweft.manager.overview import overview
from netweft.manager.watch import CA, CLOCK, CLUSTER, NODES, PRESENCE, ClusterState, Hub
from netweft.manager import hastore
from netweft.manager.leader import Coordination
from netweft.manager.ha import ManagersOnEtcd, UnknownNode
from netweft.pki import sealed
from netweft.manager.services import Services
from netweft.manager import tasklogs
from netweft.model import codec
from netweft.model.api import NodeUpdate, peer_health_view
from netweft.model.objects import Labels, Node, ShortText
from netweft.model.watch import EndpointRelease, EndpointRequest
from netweft.store.api import ClusterStore, Compare, Delete, Put
from netweft.store.sqlite import SQLiteStore
from netweft.model.cluster import (EnrollRequest, HeartbeatRequest, JoinRequest, LeaveRequest, RenewRequest,
                                   TunnelUpdate, vtep_problem)
from netweft.model.cluster import HealthReport
from netweft.manager import liveness
from netweft.manager.tunnels import DEFAULT_WG_PORT, set_tunnel
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair
from netweft.manager.tlsserver import serve_tls
from netweft.manager.peercerts import VerifiedCerts

log = logging.getLogger("netweft.manager")

HEARTBEAT_MISSES = 3          # a node is Down after this many missed heartbeats
HEALTH_REFRESH = 30.0         # seconds: a node's health figures are rewritten at most this often unless a state changed
MIN_CERT_EXPIRY = timedelta(seconds=10)
RENEW_RETRY_FIRST, RENEW_RETRY_MAX = 1.0, 60.0   # seconds between retries of a failed renewal of the leader's
STORE_FILE = "cluster.db"     # the cluster store, in the swarm directory (mode 0600: it holds the tokens)


def new_node_id() -> str:
    n = secrets.randbits(128)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(25, "0")


def join_addr(advertise: str | None, remote: str | None) -> str:
    """The joining node's address (its VTEP on every host): the one it advertises (checked by JoinRequest),
    else the one its call came from, which must pass the same check."""
    if advertise:
        return advertise
    try:
        why = vtep_problem(remote) if remote else "unknown"
    except ValueError:  # IPv6: the underlay is IPv4
        why = "not an IPv4 address"
    if why:
        raise InvalidRequest(f"this join came from {remote}, which cannot be a node address ({why}): "
                             "join with --advertise-addr set to the host's unicast IPv4 underlay address")
    return remote


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Manager(ManagersOnEtcd):
    """The leader's cluster state and API. Pure state operations are plain methods; the API wraps them."""

    admission: auth.Admission | None = None  # the API's guard, once the API is built
    host_claims = None   # async () -> this host's routes and addresses, for overlay subnets (set by the daemon)

    def __init__(self, swarm_dir: str, node_id: str, store_endpoints: list[str] | None = None,
                 on_demoted=None):
        """store_endpoints: etcd's (several managers); None: this manager's own SQLite store."""
        self.dir, self.node_id = swarm_dir, node_id
        self.store_endpoints = store_endpoints
        self.ha = store_endpoints is not None
        self.on_demoted = on_demoted       # called once when this manager is demoted or removed (etcd)
        self.coord: Coordination | None = None
        self.store_ca: pki.RootCA | None = None
        repair_node_pair(swarm_dir)
        f = files(swarm_dir)
        # With etcd the CA key is in the store, sealed with the managers' key (start() opens it).
        self.ca = None if self.ha else pki.RootCA.from_pem(pki.load_pem(f["ca"]), pki.load_pem(f["ca_key"]))
        self.server: asyncio.base_events.Server | None = None
        self.runner: web.AppRunner | None = None
        self.tasks: list[asyncio.Task] = []
        self.verified = VerifiedCerts()    # callers' certificates checked once, not on every call
        # Heartbeats are kept in memory; the store only sees Ready/Down transitions (with etcd, each
        # manager also publishes whom it heard from: see leader.py).
        self.last_seen: dict[str, float] = {}
        self.seen_wall: dict[str, float] = {}
        # The cluster's own store (not the host's local database); opened by start().
        self.store: ClusterStore | None = None
        self.hub: Hub | None = None
        self.overlays: Overlays | None = None
        self.health_written: dict[str, float] = {}   # node -> when its health was last written to the store

    # ------------------------------------------------------------------ setup
    @staticmethod
    async def init_cluster(swarm_dir: str, hostname: str, advertise: str, listen: tuple[str, int],
                           spec: dict, store: ClusterStore | None = None, manager_key: bytes | None = None,
                           store_ca: pki.RootCA | None = None, ids: tuple[str, str] | None = None) -> dict:
        """Create the root CA, the tokens and this node as the first manager, in a new cluster store:
        this node's SQLite file, or (store given) etcd, where the CA key (and the store CA's, for an
        embedded etcd) is kept sealed with manager_key. Returns {"node_id", "cluster_id", "join_tokens"}."""
        cluster_id, node_id = ids or (new_node_id(), new_node_id())
        ca = pki.create_root_ca(cluster_id)
        key = pki.new_node_key()
        expiry = timedelta(seconds=spec["CertExpiry"])
        cert = pki.sign_node_cert(ca, pki.make_csr(key), node_id, "manager", cluster_id, expiry,
                                  ip_sans=[advertise])
        os.makedirs(swarm_dir, mode=0o700, exist_ok=True)
        f = files(swarm_dir)
        pki.save_pem(f["ca"], ca.cert_pem)
        if store is None:
            pki.save_pem(f["ca_key"], ca.key_pem, private=True)
        pki.save_pem(f["key"], pki.key_to_pem(key), private=True)
        pki.save_pem(f["cert"], cert)
        digest = ca.digest()
        manager_addr = f"{advertise}:{listen[1]}"
        cluster = {"id": cluster_id, "created": utcnow(), "spec": spec,
                   "join_tokens": {"worker": pki.make_join_token(digest), "manager": pki.make_join_token(digest)},
                   "leader": {"node_id": node_id, "addr": manager_addr}, "revoked": {}}
        ident = pki.cert_identity(cert)
        node = Node(id=node_id, hostname=hostname, role="manager", addr=advertise, manager_addr=manager_addr,
                    created=utcnow(), updated=utcnow(), cert_serial=str(ident.serial),
                    cert_not_after=ident.not_after.isoformat())
        ops = [Put(CLUSTER, "cluster", codec.encode(cluster)), Put(NODES, node_id, codec.encode(node)),
               Put(CLOCK, "time", str(time.time_ns()).encode())]
        if store is None:
            store = await SQLiteStore.open(os.path.join(swarm_dir, STORE_FILE))
            try:
                r = await store.txn([Compare(CLUSTER, "cluster", 0)], ops)
            finally:
                await store.close()
        else:
            cluster["store"] = "etcd"
            sealed_ca = {"cert": ca.cert_pem.decode(), "key": sealed.seal(manager_key, "ca-key", ca.key_pem),
                         "holders": [node_id]}   # who holds the key (managerkey.py)
            if store_ca is not None:
                sealed_ca.update(store_cert=store_ca.cert_pem.decode(),
                                 store_key=sealed.seal(manager_key, "store-ca-key", store_ca.key_pem))
            ops = [Put(CLUSTER, "cluster", codec.encode(cluster)), ops[1], ops[2], Put(CA, "root", codec.encode(sealed_ca))]
            r = await store.txn([Compare(CLUSTER, "cluster", 0)], ops)
        if not r.ok:
            where = swarm_dir if isinstance(store, SQLiteStore) else "etcd"
            raise Conflict(f"{where} already holds a cluster; `netweft swarm leave --force` first "
                           "(or use an etcd that holds no netweft cluster)")
        return {"node_id": node_id, "cluster_id": cluster_id, "join_tokens": cluster["join_tokens"]}

    @property
    def state(self) -> ClusterState:
        return self.hub.state

    def cluster(self) -> dict:
        return self.state.get(CLUSTER, "cluster")

    def spec(self) -> dict:
        return self.cluster()["spec"]

    async def start(self, listen: tuple[str, int]) -> None:
        if self.ha:
            self.store = hastore.open_store(self.dir, self.store_endpoints)
        else:
            self.store = await SQLiteStore.open(os.path.join(self.dir, STORE_FILE))
        try:
            self.hub = Hub(self.store)
            await self.hub.start()
            if self.state.get(CLUSTER, "cluster") is None:
                where = "etcd" if self.ha else f"the cluster store in {self.dir}"
                raise Unavailable(f"{where} holds no cluster; "
                                  "leave the swarm (`netweft swarm leave --force`) and init or join again")
            if self.ha:
                await self._open_sealed()
            self.overlays = Overlays(self.hub, self.spec)
            self.overlays.host_claims = self.host_claims
            self.services = Services(self.hub, self.overlays)
            self.logs = tasklogs.LogRelay(lambda: self.state, self._hostname)
            f = files(self.dir)
            ctx = self.ctx = pki.server_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]),
                                                    pki.load_pem(f["key"]), require_client_cert=False)
            # Watch streams never end by themselves: stop() ends them, and shutdown waits briefly.
            self.runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                        shutdown_timeout=2.0)
            await self.runner.setup()
            try:
                self.server = await serve_tls(self.runner, listen[0], listen[1], ctx)
            except OSError as e:
                await self.runner.cleanup()
                self.runner = None
                raise Conflict(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}; "
                               "choose another --listen-addr") from None
        except BaseException:
            if self.hub is not None:
                await self.hub.stop()
            await self.store.close()
            raise
        now = time.monotonic()
        for node in self.state.nodes():  # grace after a restart: nobody is Down yet
            self.last_seen[node.id] = now
        self.tasks = [asyncio.ensure_future(self._monitor()), asyncio.ensure_future(self._renew_own_cert())]
        if self.ha:
            me = self.state.get(NODES, self.node_id)
            self.coord = Coordination(self.store, self.hub, self.node_id,
                                      (me.manager_addr if me else "") or f"{listen[0]}:{listen[1]}")
            self.tasks += [asyncio.ensure_future(self.coord.run()), asyncio.ensure_future(self._publish_seen()),
                           asyncio.ensure_future(self._trim_history()), asyncio.ensure_future(self._watch_self())]
            self.tasks += self._ha_tasks()   # etcd certificates renewed and revoked, managers' key rotated
        self.tasks.append(asyncio.ensure_future(self.services.run()))   # the scheduler
        log.info("cluster API listening", extra={"addr": f"{listen[0]}:{listen[1]}", "rev": self.state.rev})

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.coord is not None:
            try:
                async with asyncio.timeout(2):
                    await self.coord.stop()
            except (TimeoutError, NetweftError):
                pass
        if self.server is not None:
            self.server.close()
        if self.hub is not None:
            self.hub.close_watchers()  # their agents resume from their revisions at the next manager life
        if self.server is not None:
            await self.server.wait_closed()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.hub is not None:
            await self.hub.stop()
        if self.store is not None:
            await self.store.close()

    # ------------------------------------------------------------ node lookup
    def node(self, ref: str) -> Node:
        node = self.state.get(NODES, ref)
        if node is None:
            nodes = self.state.nodes()
            hits = [n for n in nodes if n.hostname == ref] or [n for n in nodes if n.id.startswith(ref)]
            if len(hits) > 1:
                raise Conflict(f"node reference {ref!r} is ambiguous; use the node ID")
            node = hits[0] if hits else None
        if node is None:
            raise NotFound(f"node {ref!r} not found; see `netweft node ls`")
        return node

    async def _update(self, node_id: str, change) -> Node:
        """Compare-and-write one node: change(node) returns the new node, or None for no change."""
        def plan():
            node = self.state.get(NODES, node_id)
            if node is None:
                raise NotFound(f"node {node_id!r} not found; see `netweft node ls`")
            new = change(node)
            if new is None:
                return [], [], node
            new = msgspec.structs.replace(new, updated=utcnow())
            return [Compare(NODES, node_id, self.state.mod_rev(NODES, node_id))], \
                [Put(NODES, node_id, codec.encode(new))], new
        node, _ = await self.hub.commit(plan)
        return node

    # ------------------------------------------------------- agent operations
    async def join(self, token: str, csr_pem: str, hostname: str, addr: str) -> dict:
        pki.parse_join_token(token)  # malformed -> InvalidRequest with the reason
        node_id = new_node_id()

        def plan():  # the token is checked against the same cluster state the new node is written to
            cluster = self.cluster()
            tokens = cluster["join_tokens"]
            if pki.secret_matches(token, tokens["worker"]):
                role = "worker"
            elif pki.secret_matches(token, tokens["manager"]):
                role = "manager"
            else:
                raise Unauthorized("invalid join token: it matches neither the current worker nor manager token "
                                   "(was it rotated?); get one with `netweft swarm join-token worker` on a manager")
            cert = self._sign(csr_pem, node_id, role, addr)
            ident = pki.cert_identity(cert)
            node = Node(id=node_id, hostname=hostname, role=role, addr=addr,
                        manager_addr=f"{addr}:2377" if role == "manager" else "", created=utcnow(),
                        updated=utcnow(), cert_serial=str(ident.serial), cert_not_after=ident.not_after.isoformat())
            return [Compare(CLUSTER, "cluster", self.state.mod_rev(CLUSTER, "cluster")), Compare(NODES, node_id, 0)], \
                [Put(NODES, node_id, codec.encode(node))], (node, cert, cluster)
        (node, cert, cluster), _ = await self.hub.commit(plan)
        self.last_seen[node_id] = time.monotonic()
        self.seen_wall[node_id] = time.time()
        log.info("node joined", extra={"node": node_id, "hostname": hostname, "role": node.role, "addr": addr})
        return {"NodeID": node_id, "Role": node.role, "ClusterID": cluster["id"], "Certificate": cert.decode(),
                "CACert": self.ca.cert_pem.decode(), "Managers": self.manager_addrs(),
                "HeartbeatPeriod": cluster["spec"]["HeartbeatPeriod"],
                "DataPathPort": cluster["spec"]["DataPathPort"],
                "WireguardPort": cluster["spec"].get("WireguardPort", DEFAULT_WG_PORT),
                "Store": cluster.get("store", "sqlite")}

    def _sign(self, csr_pem: str, node_id: str, role: str, addr: str | None) -> bytes:
        expiry = timedelta(seconds=self.spec()["CertExpiry"])
        ips = [addr] if role == "manager" and addr else []
        return pki.sign_node_cert(self.ca, csr_pem.encode(), node_id, role, self.cluster()["id"], expiry,
                                  ip_sans=ips)

    async def renew(self, node: Node, csr_pem: str) -> dict:
        out = {}

        def change(n: Node) -> Node:
            # The desired role: a promotion or demotion lands with the renewal.
            cert = self._sign(csr_pem, n.id, n.role, n.addr)
            ident = pki.cert_identity(cert)
            out.update(Certificate=cert.decode(), Role=n.role, not_after=ident.not_after.isoformat())
            return msgspec.structs.replace(n, cert_serial=str(ident.serial), cert_not_after=out["not_after"])
        await self._update(node.id, change)
        log.info("node certificate renewed", extra={"node": node.id, "role": out["Role"],
                                                    "not_after": out["not_after"]})
        return {"Certificate": out["Certificate"], "Role": out["Role"]}

    async def heartbeat(self, node: Node, addr: str | None) -> dict:
        node = self.state.get(NODES, node.id) or node   # as it is now: the request may have waited
        if node.left:   # a heartbeat sent just before its `swarm leave` must not bring it back
            raise Forbidden(f"node {node.id} left the swarm; join again with a token")
        self.last_seen[node.id] = time.monotonic()
        self.seen_wall[node.id] = time.time()
        if node.state != "ready" or (addr and node.addr != addr):
            node = await self._update(node.id, lambda n: None if n.left else msgspec.structs.replace(
                n, state="ready", addr=addr or n.addr, withdrawn=False))
            if node.left:   # it left while this heartbeat waited
                raise Forbidden(f"node {node.id} left the swarm; join again with a token")
            log.info("node ready", extra={"node": node.id, "hostname": node.hostname})
        return {"Period": self.spec()["HeartbeatPeriod"], "Role": node.role, "Availability": node.availability}

    async def record_health(self, node: Node, report: HealthReport) -> None:
        """A node's view of the data path to its peers, kept in its Node document. Written when a state
        changes, else at most every HEALTH_REFRESH (the figures alone would rewrite it every few seconds)."""
        known = {n.id for n in self.state.nodes()}
        health = {k: v for k, v in report.health.items() if k in known and k != node.id}

        def key(h: dict) -> dict:
            return {k: (v.state, v.mtu_ok, v.reason) for k, v in h.items()}

        def change(n: Node) -> Node | None:
            if key(n.health) == key(health) and time.monotonic() - self.health_written.get(n.id, 0) < HEALTH_REFRESH:
                return None
            self.health_written[n.id] = time.monotonic()
            return msgspec.structs.replace(n, health=health)
        before = key(node.health)
        await self._update(node.id, change)
        if before != key(health):
            await self.evaluate_liveness()

    async def evaluate_liveness(self) -> None:
        """Withdraw (or reinstate) hosts by manager/liveness.py's rule; one compare-and-write per node."""
        nodes = {n.id: n for n in self.state.nodes()}
        for node_id, want in liveness.withdrawals(nodes, self.state.node_nets).items():
            try:
                await self._update(node_id, lambda n: msgspec.structs.replace(n, withdrawn=want)
                                   if n.withdrawn != want else None)
            except NotFound:
                continue
            node = nodes[node_id]
            if want:
                log.warning("host withdrawn: down for the managers and unreachable on the data path from every "
                            "host sharing a network with it; its endpoints leave every host's peer tables",
                            extra={"node": node_id, "hostname": node.hostname})
            else:
                log.info("host reinstated: its endpoints are back in the peer tables",
                         extra={"node": node_id, "hostname": node.hostname})

    async def leave(self, node: Node) -> None:
        """The node is Down and its endpoints are gone from every host's tables, in one revision."""
        self.last_seen.pop(node.id, None)

        def plan():
            n = self.state.get(NODES, node.id)
            if n is None:
                raise NotFound(f"node {node.id!r} not found")
            compares, ops, count = self.overlays.purge_plan(node.id)
            # Its keys go too: no host keeps a WireGuard peer for a node that left.
            down = msgspec.structs.replace(n, state="down", updated=utcnow(), tunnel_keys=[], left=True)
            return compares + [Compare(NODES, n.id, self.state.mod_rev(NODES, n.id))], \
                ops + [Put(NODES, n.id, codec.encode(down))], count
        count, _ = await self.hub.commit(plan)
        log.info("node left", extra={"node": node.id, "hostname": node.hostname, "endpoints_purged": count})
        metrics.released("endpoint", count)

    async def _monitor(self) -> None:
        while True:
            period = self.spec()["HeartbeatPeriod"]
            await asyncio.sleep(min(1.0, period / 4))
            limit = HEARTBEAT_MISSES * period
            now = time.monotonic()
            if self.ha:  # the leader alone, from what every manager reports of its nodes (downjudge.py)
                if not self.is_leader():
                    continue
                down_now = self.ha_down_nodes([n for n in self.state.nodes() if n.state == "ready"], limit)
                late_ha: list[str] = []
            for node in self.state.nodes():
                if node.id == self.node_id or node.state != "ready":
                    continue
                if self.ha and self.state.get(PRESENCE, node.id) is not None:
                    late = False  # a manager that holds its lease is up (it may still be starting)
                elif self.ha:
                    late = node.id in down_now
                else:
                    late = now - self.last_seen.get(node.id, now) > limit
                if late and self.ha:
                    late_ha.append(node.id)   # marked in one revision below: one frame to each watcher
                elif late:
                    try:
                        await self._update(node.id, lambda n: msgspec.structs.replace(n, state="down")
                                           if n.state == "ready" else None)
                    except NotFound:
                        continue  # removed meanwhile
                    except Exception as e:  # the store failing: say so, try again next round
                        log.error("could not mark a node down", extra={"node": node.id, "reason": str(e)})
                        continue
                    log.warning("node down: missed heartbeats",
                                extra={"node": node.id, "hostname": node.hostname, "after_s": limit})
            if self.ha and late_ha:
                await self.mark_down(late_ha, utcnow(), limit)
            if any(n.state == "down" or n.withdrawn for n in self.state.nodes()):
                try:
                    await self.evaluate_liveness()
                except Exception as e:  # the store failing: try again next round
                    log.error("could not evaluate withdrawals", extra={"reason": str(e)})

    async def _renew_own_cert(self) -> None:
        """The leader signs its own renewals: same timing rule as every node (50-80 % of the lifetime).
        A failed renewal (store, disk) is retried with backoff: this certificate is also the cluster
        API's server certificate, so the task must never end before the manager does."""
        f = files(self.dir)
        while True:
            ident = pki.cert_identity(pki.load_pem(f["cert"]))
            at = pki.renewal_time(ident.not_before + pki.CLOCK_SKEW, ident.not_after)  # not_before is backdated
            await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))
            backoff = RENEW_RETRY_FIRST
            while True:
                try:
                    key = pki.new_node_key()
                    cert = (await self.renew(self.node(self.node_id), pki.make_csr(key).decode()))["Certificate"]
                    save_node_pair(self.dir, pki.key_to_pem(key), cert.encode())
                    self.ctx.load_cert_chain(f["cert"], f["key"])  # new handshakes present the renewed one
                    break
                except Exception as e:
                    log.error("renewing the leader's certificate failed; retrying",
                              extra={"reason": str(e) or type(e).__name__, "retry_s": backoff})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RENEW_RETRY_MAX)

    # ---------------------------------------------------- admin operations
    def nodes(self) -> list[dict]:
        return [self.node_view(n) for n in self.state.nodes()]

    def node_view(self, node: Node) -> dict:
        """Docker's shape of a node (`node ls`, `node inspect`): made here, at the API edge."""
        view = {"ID": node.id, "CreatedAt": node.created, "UpdatedAt": node.updated,
                "Spec": {"Role": node.role, "Availability": node.availability, "Labels": dict(node.labels)},
                "Description": {"Hostname": node.hostname},
                "Status": {"State": "ready" if node.id == self.node_id else node.state, "Addr": node.addr},
                "Certificate": {"Serial": node.cert_serial, "NotAfter": node.cert_not_after}}
        view["DataPath"] = self.data_path_view(node)
        if node.role == "manager":
            reach = "reachable"
            if self.ha and node.id != self.node_id and self.state.get(PRESENCE, node.id) is None:
                reach = "unreachable"
            view["ManagerStatus"] = {"Leader": node.id == self.leader_id(),
                                     "Reachability": reach, "Addr": node.manager_addr or f"{node.addr}:2377"}
        return view

    def data_path_view(self, node: Node) -> dict:
        """How the other hosts' probes see this node's data path (State: healthy, degraded, unreachable or
        unknown when nobody probes it), whether its endpoints are withdrawn, and its own probes' view."""
        nodes = {n.id: n for n in self.state.nodes()}
        seen: dict[str, dict] = {}
        for other in nodes.values():
            h = other.health.get(node.id)
            if h is not None and other.id != node.id:
                seen[other.hostname or other.id] = peer_health_view(h)
        states = {h["State"] for h in seen.values()} - {"unknown"}
        state = ("unknown" if not states else next(iter(states)) if len(states) == 1 else "degraded")
        own = {(nodes[k].hostname if k in nodes else k): peer_health_view(v) for k, v in node.health.items()}
        return {"State": state, "Withdrawn": node.withdrawn, "SeenBy": seen, "Probes": own}

    async def remove_node(self, ref: str, force: bool) -> None:
        node = self.node(ref)
        name = node.hostname
        if node.id == self.node_id:
            raise Conflict(f"node {name!r} is this manager; it cannot remove itself: "
                           "use `netweft swarm leave --force` on it")
        if node.role == "manager" and not force:
            raise Conflict(f"node {name!r} is a manager; demote it first (`netweft node demote {name}`) "
                           "or use --force")
        if node.state == "ready" and not force:
            raise Conflict(f"node {name!r} is not down and can't be removed; stop its daemon first "
                           "or use --force")

        if self.ha and node.role == "manager":
            await self._drop_member(node)   # first: a member left behind would count against the quorum

        def plan():  # the node, its endpoints and its revocation go in one revision
            if self.state.get(NODES, node.id) is None:
                raise NotFound(f"node {ref!r} not found; see `netweft node ls`")
            cluster = self.cluster()
            cluster = {**cluster, "revoked": {**cluster["revoked"], node.id: utcnow()}}
            compares, ops, count = self.overlays.purge_plan(node.id)
            compares += [Compare(NODES, node.id, self.state.mod_rev(NODES, node.id)),
                         Compare(CLUSTER, "cluster", self.state.mod_rev(CLUSTER, "cluster"))]
            ops += [Delete(NODES, node.id), Put(CLUSTER, "cluster", codec.encode(cluster))]
            return compares, ops, count
        count, _ = await self.hub.commit(plan)
        metrics.released("endpoint", count)
        if self.ha and node.role == "manager":
            await self.after_manager_gone()   # its etcd certificates revoked, the key it held rotated
        self.last_seen.pop(node.id, None)
        self.hub.disconnect(node.id)
        # Its open connections (a watch stream, kept-alive calls) end now, not at their next request.
        closed = self.admission.disconnect(node.id) if self.admission is not None else 0
        log.info("node removed; its certificate is refused from now on", extra={"node": node.id,
                                                                              "hostname": name,
                                                                              "endpoints_purged": count,
                                                                              "connections_closed": closed})

    async def update_node(self, ref: str, role: str | None, availability: str | None, labels_add: dict | None,
                          labels_rm: list | None = None) -> dict:
        node = self.node(ref)
        if role is not None and role not in pki.ROLES:
            raise InvalidRequest(f"invalid role {str(role)[:40]!r}: use manager or worker")
        if self.ha and role == "worker" and node.role == "manager":
            if not [n for n in self.state.nodes() if n.role == "manager" and n.id != node.id]:
                raise Conflict(f"node {node.hostname!r} is the last manager; promote another node first")
        elif node.id == self.node_id and role not in (None, "manager"):
            raise Conflict("the leader cannot be demoted: it holds the cluster store (a cluster made with "
                           "`swarm init --store etcd` has several managers)")
        if availability is not None and availability not in ("active", "pause", "drain"):
            raise InvalidRequest(f"invalid availability {str(availability)[:40]!r}: use active, pause or drain")
        labels_add = codec.convert(labels_add or {}, Labels, "labels to add")
        labels_rm = codec.convert(labels_rm or [], list[ShortText], "labels to remove")

        def change(n: Node) -> Node:
            labels = {k: v for k, v in n.labels.items() if k not in labels_rm}
            labels.update(labels_add)
            new_role = role or n.role
            return msgspec.structs.replace(
                n, role=new_role, availability=availability or n.availability,
                labels=codec.convert(labels, Labels, "labels"),
                manager_addr=(n.manager_addr or f"{n.addr}:2377") if new_role == "manager" else "")
        if self.ha and role == "worker" and node.role == "manager":
            await self._drop_member(node)   # first: if etcd refuses, nothing changed
        updated = await self._update(node.id, change)
        if self.ha and role == "worker" and node.role == "manager":
            await self.after_manager_gone()   # its etcd certificates revoked, the key it held rotated
        return self.node_view(updated)

    async def rotate_token(self, role: str) -> str:
        if role not in pki.ROLES:
            raise InvalidRequest(f"invalid role {role[:40]!r}: use worker or manager")
        token = pki.make_join_token(self.ca.digest())

        def plan():
            cluster = self.cluster()
            cluster = {**cluster, "join_tokens": {**cluster["join_tokens"], role: token}}
            return [Compare(CLUSTER, "cluster", self.state.mod_rev(CLUSTER, "cluster"))], \
                [Put(CLUSTER, "cluster", codec.encode(cluster))], None
        await self.hub.commit(plan)
        log.info("join token rotated; the old one is refused from now on", extra={"role": role})
        return token

    def inspect(self) -> dict:
        """Docker's shape of the swarm (`swarm inspect`; the CLI leaves the tokens out)."""
        c = self.cluster()
        _, not_after = pki.validity(self.ca.cert)
        leader = {"NodeID": c["leader"]["node_id"], "Addr": c["leader"]["addr"]}
        if self.ha:
            rec = self.coord.leader() if self.coord is not None else None
            leader = {"NodeID": rec["node_id"], "Addr": rec["addr"]} if rec else {"NodeID": "", "Addr": ""}
        return {"ID": c["id"], "CreatedAt": c["created"], "Spec": c["spec"], "Leader": leader,
                "Store": c.get("store", "sqlite"), "Managers": self.manager_addrs(),
                "RootCA": {"Digest": self.ca.digest(), "NotAfter": not_after.isoformat(),
                           "CertPEM": self.ca.cert_pem.decode()},
                "JoinTokens": {"Worker": c["join_tokens"]["worker"], "Manager": c["join_tokens"]["manager"]}}

    # ------------------------------------------------------------ the API
    def _peer(self, request: web.Request) -> tuple[pki.NodeIdentity, Node, str]:
        """Who is calling: verified certificate -> identity -> a current, not removed node, and its role now."""
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
        if not der:
            raise Unauthorized("a node certificate is required for this call: join the cluster first "
                               "(netweft swarm join --token TOKEN MANAGER)")
        try:
            ident = self.verified.verify(self.ca.cert_pem, der)
        except InvalidRequest as e:
            raise Unauthorized(str(e)) from None
        revoked = self.cluster()["revoked"]
        if ident.node_id in revoked:
            raise Forbidden(f"node {ident.node_id} was removed from the cluster on "
                            f"{revoked[ident.node_id]}; it must leave and join again with a token")
        node = self.state.get(NODES, ident.node_id)
        if node is None:
            raise UnknownNode(f"node {ident.node_id} is not a member of this cluster")
        return ident, node, node.role

    def build_app(self) -> web.Application:
        routes = web.RouteTableDef()

        # Rate limit, declared roles (both the certificate's and the store's), body limits: see auth.py.
        self.admission = auth.Admission(self._peer_caught_up)

        @routes.get("/ca")
        @allow(OPEN)
        async def ca(request):
            return web.Response(body=self.ca.cert_pem, content_type="application/x-pem-file")

        @routes.post("/join")
        @allow(OPEN)
        async def join(request):
            b = await auth.read_body(request, JoinRequest)
            return web.json_response(await self.join(b.token, b.csr, b.hostname,
                                                     join_addr(b.advertise_addr, request.remote)))

        @routes.post("/renew")
        @allow(WORKER)
        async def renew(request):
            b = await auth.read_body(request, RenewRequest)
            return web.json_response(await self.renew(request["node"], b.csr))

        @routes.post("/heartbeat")
        @allow(WORKER)
        async def heartbeat(request):
            b = await auth.read_body(request, HeartbeatRequest)
            return web.json_response(await self.heartbeat(request["node"], b.addr))

        @routes.get("/time")
        @allow(WORKER)
        async def clock(request):
            # `netweft doctor` measures this host's clock against each manager's.
            return web.json_response({"Time": time.time()})

        @routes.post("/health")
        @allow(WORKER)
        async def health(request):
            b = await auth.read_body(request, HealthReport)
            await self.record_health(request["node"], b)
            return web.json_response({})

        @routes.post("/leave")
        @allow(WORKER)
        async def leave(request):
            await auth.read_body(request, LeaveRequest, empty_ok=True)
            await self.leave(request["node"])
            return web.json_response({})

        @routes.post("/tunnel")
        @allow(WORKER)
        async def tunnel(request):
            b = await auth.read_body(request, TunnelUpdate)
            return web.json_response(await set_tunnel(self.hub, request["node"].id, b))

        @routes.post("/managers/enroll")
        @allow(MANAGER)
        async def enroll(request):
            b = await auth.read_body(request, EnrollRequest)
            return web.json_response(await self.enroll(request["node"], b.csr))

        @routes.get("/admin/swarm")
        @allow(MANAGER)
        async def a_swarm(request):
            return web.json_response(self.inspect())

        @routes.get("/admin/nodes")
        @allow(MANAGER)
        async def a_nodes(request):
            return web.json_response(self.nodes())

        @routes.get("/admin/nodes/{ref}")
        @allow(MANAGER)
        async def a_node(request):
            return web.json_response(self.node_view(self.node(request.match_info["ref"])))

        @routes.delete("/admin/nodes/{ref}")
        @allow(MANAGER)
        async def a_node_rm(request):
            await self.remove_node(request.match_info["ref"], request.query.get("force") in ("1", "true"))
            return web.json_response({})

        @routes.post("/admin/nodes/{ref}/update")
        @allow(MANAGER)
        async def a_node_update(request):
            b = await auth.read_body(request, NodeUpdate)
            return web.json_response(await self.update_node(request.match_info["ref"], b.Role, b.Availability,
                                                            b.LabelsAdd, b.LabelsRemove))

        @routes.post("/admin/join-token/rotate")
        @allow(MANAGER)
        async def a_rotate(request):
            return web.json_response({"Token": await self.rotate_token(request.query.get("role", ""))})

        @routes.get("/watch")
        @allow(WORKER)
        async def watch(request):
            return await self.hub.serve(request, request["node"])

        @routes.get("/admin/overview")
        @allow(MANAGER)
        async def a_overview(request):
            return web.json_response(overview(self.state, self.node_id))

        @routes.get("/events")
        @allow(WORKER)
        async def events_stream(request):
            return await events.serve(request, self.store, lambda: self.state,
                                      events.visible_to(request["node"], lambda: self.state))

        @routes.get("/networks")
        @allow(WORKER)
        async def net_list(request):
            # Every overlay, also outside the caller's watch scope: a host refuses a local network that
            # would clash with one by name or subnet.
            return web.Response(body=codec.encode(self.overlays.state.networks()), content_type="application/json")

        @routes.get("/networks/{ref}")
        @allow(WORKER)
        async def net_get(request):
            return web.Response(body=self.overlays.network_bytes(request.match_info["ref"]),
                                content_type="application/json")

        @routes.post("/endpoints")
        @allow(WORKER)
        async def ep_create(request):
            req = await auth.read_body(request, EndpointRequest)
            return web.Response(body=await self.overlays.create_endpoint(request["node"].id, req,
                                                                         AttachQuery.parse(request.query)),
                                content_type="application/json")

        @routes.delete("/endpoints/{id}")
        @allow(WORKER)
        async def ep_delete(request):
            await self.overlays.delete_endpoint(request["node"].id, request.match_info["id"])
            return web.json_response({})

        @routes.post("/endpoints/release")
        @allow(WORKER)
        async def ep_release(request):
            req = await auth.read_body(request, EndpointRelease)
            await self.overlays.delete_endpoints(request["node"].id, req.ids)
            return web.json_response({})

        @routes.post("/admin/networks")
        @allow(MANAGER)
        async def a_net_create(request):
            return web.json_response(await self.overlays.create_network(await request.read()))

        @routes.delete("/admin/networks/{ref}")
        @allow(MANAGER)
        async def a_net_rm(request):
            await self.overlays.remove_network(request.match_info["ref"])
            return web.json_response({})

        app = web.Application(middlewares=[*metrics.middlewares("cluster"), self.admission.middleware],
                              client_max_size=auth.BODY_LIMIT)
        app.add_routes(routes)
        app.add_routes(self.services.routes())
        app.add_routes(self.ha_routes())
        app.add_routes(tasklogs.routes(self.logs))   # service logs across hosts
        return app

    def _hostname(self, node_id: str) -> str:
        n = self.state.get(NODES, node_id)
        return n.hostname if n is not None else node_id
