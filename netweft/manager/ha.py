"""The manager's part in a cluster of several managers on etcd (issue 8): a mixin of Manager (cluster.py),
which holds the state it uses (store, hub, coord, ca, store_ca, seen_wall, ...).

- the CA comes from the store, its key sealed with the managers' key (netweft/pki/sealed.py);
- each manager publishes whom it heard from, the leader (leader.py) trims the store's history;
- a manager enrolls others (POST /managers/enroll): the managers' key, an etcd certificate from the store
  CA, and (embedded etcd) a member added before it starts;
- a demoted, removed or leaving manager's etcd member is removed; a manager that sees itself demoted
  tells the daemon, which stops it;
- the managers' etcd certificates are renewed and, when their manager goes, revoked (storecerts.py); the
  managers' key is rotated on demand and when a manager that held it goes (managerkey.py).
"""
from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from netweft import pki
from aiohttp import web

from netweft.errors import Conflict, Forbidden, NetweftError, Unavailable
from netweft.manager import auth, downjudge, hastore, leader
from netweft.manager.auth import MANAGER, allow
from netweft.manager.managerkey import ManagerKey
from netweft.manager.storecerts import StoreCerts
from netweft.manager.watch import CA, CATCH_UP, HEARTBEATS, NODES, PRESENCE
from netweft.model import codec
from netweft.model.objects import Node
from netweft.store.api import Compare, Put
from netweft.pki import crl as crlmod
from netweft.pki import sealed

log = logging.getLogger("netweft.manager")

HISTORY = 50_000              # revisions of history the leader keeps for agents that resume
TRIM_EVERY = 60.0             # seconds between two trims of the history by the leader
MEMBER_TRIES = 40             # tries (0.5 s apart) of a member change etcd refuses for the quorum's sake
STALE_VIEW = 3.0              # seconds without a store revision before a manager asks another what it is
DOWN_BATCH = 100              # nodes marked Down in one transaction (etcd allows 128 operations per txn)
SECRETS_EVERY = 1.0           # seconds between two checks by the leader of revocations and key holders


class UnknownNode(Forbidden):
    """A caller with a valid certificate whose node this manager's view does not hold."""


class ManagersOnEtcd(StoreCerts, ManagerKey):
    async def _peer_caught_up(self, request):
        """_peer (cluster.py), but a node that joined at another manager moments ago, which this manager's view
        may not hold yet, is looked up again once the view has reached the store's revision: refused
        (403), its agent would stop heartbeating for good; a view that cannot catch up answers 503 (retry)."""
        try:
            return self._peer(request)
        except UnknownNode:
            if not self.ha:
                raise
        try:
            async with asyncio.timeout(CATCH_UP):
                await self.hub.wait(await self.store.revision())
        except (TimeoutError, NetweftError):
            raise Unavailable("this manager's view of the cluster store is behind; retry, or use another "
                              "manager") from None
        return self._peer(request)

    async def _open_sealed(self) -> None:
        """The CA (and the store CA) from the store, their keys opened with this manager's key (or the rotated
        one, fetched from another manager)."""
        rec = self.state.get(CA, "root")
        if rec is None:
            raise Unavailable("etcd holds no cluster CA; leave the swarm (`netweft swarm leave --force`) and join again")
        key = await self._manager_key(rec)
        self.ca = pki.RootCA.from_pem(rec["cert"].encode(), sealed.unseal(key, "ca-key", rec["key"]))
        if rec.get("store_key"):
            self.store_ca = pki.RootCA.from_pem(rec["store_cert"].encode(),
                                                sealed.unseal(key, "store-ca-key", rec["store_key"]))
            hastore.save_sealed_store_ca(self.dir, rec["store_key"])

    def leader_id(self) -> str | None:
        if not self.ha:
            return self.cluster()["leader"]["node_id"]
        rec = self.coord.leader() if self.coord is not None else None
        return rec.get("node_id") if rec else None

    def is_leader(self) -> bool:
        return not self.ha or (self.coord is not None and self.coord.is_leader())

    def manager_addrs(self) -> list[str]:
        """Every manager's cluster API address: the reachable ones first."""
        mgrs = [n for n in self.state.nodes() if n.role == "manager"]
        if self.ha:
            mgrs.sort(key=lambda n: (self.state.get(PRESENCE, n.id) is None, n.id))
        return [n.manager_addr or f"{n.addr}:2377" for n in mgrs][:64] or [self.cluster()["leader"]["addr"]]

    async def _publish_seen(self) -> None:
        """How long ago this manager heard from each node (itself included), for the leader's Down check
        (downjudge.py): ages on this host's clock, in one write every half period."""
        while True:
            period = self.spec()["HeartbeatPeriod"]
            await asyncio.sleep(period / 2)
            now = time.time()
            self.seen_wall[self.node_id] = now
            keep = downjudge.REPORT_KEEP * period
            for k in [k for k, t in self.seen_wall.items() if now - t >= keep]:
                del self.seen_wall[k]
            try:
                await self.coord.publish_heartbeats(downjudge.make_report(self.seen_wall, now, keep))
                me = self.state.get(NODES, self.node_id)
                if me is not None and me.role == "manager" and me.state != "ready":  # back after being Down
                    await self._update(self.node_id, lambda n: msgspec.structs.replace(n, state="ready"))
            except NetweftError as e:
                log.debug("publishing heartbeats failed", extra={"reason": str(e)})

    def ha_down_nodes(self, nodes: list[Node], limit: float) -> set[str]:
        """The leader: which of these Ready nodes are Down now, from every manager's report (downjudge.py)."""
        judge = getattr(self, "_judge", None)
        if judge is None:
            judge = self._judge = downjudge.Judge(limit, stale=limit)
        judge.limit = judge.stale = limit
        for mgr, e in self.state.kinds[HEARTBEATS].items():
            judge.observe(mgr, e.mod_rev, e.obj)
        present = self.state.kinds[PRESENCE].keys()
        judge.forget([m for m in judge.reports if m not in present and (
            (n := self.state.get(NODES, m)) is None or n.role != "manager")])
        return set(judge.down([n.id for n in nodes], present, self.coord.leader_since))

    async def mark_down(self, node_ids: list[str], stamp: str, limit: float) -> None:
        """The leader: these Ready nodes Down, DOWN_BATCH per revision (one frame to every watcher instead of
        one per node); a node changed meanwhile is judged again at the next round."""
        for i in range(0, len(node_ids), DOWN_BATCH):
            def plan(chunk=node_ids[i:i + DOWN_BATCH]):
                compares, ops, done = [], [], []
                for nid in chunk:
                    n = self.state.get(NODES, nid)
                    if n is None or n.state != "ready":
                        continue
                    compares.append(Compare(NODES, nid, self.state.mod_rev(NODES, nid)))
                    ops.append(Put(NODES, nid, codec.encode(msgspec.structs.replace(n, state="down", updated=stamp))))
                    done.append(n)
                return compares, ops, done
            try:
                done, _ = await self.hub.commit(plan)
            except NetweftError as e:  # the store failing: say so, try again next round
                log.error("could not mark nodes down", extra={"nodes": len(node_ids), "reason": str(e)})
                return
            for n in done:
                log.warning("node down: missed heartbeats", extra={"node": n.id, "hostname": n.hostname, "after_s": limit})

    def _ha_tasks(self) -> list[asyncio.Task]:
        """The etcd certificates' and the managers' key's background duties (see storecerts.py, managerkey.py)."""
        return [*self._store_tasks(), asyncio.ensure_future(self._follow_key()),
                asyncio.ensure_future(self._reconcile_secrets())]

    async def _reconcile_secrets(self) -> None:
        """The leader: revoke the etcd certificates of, and rotate the key held by, managers that went."""
        await leader.every(SECRETS_EVERY, self.is_leader, self.forget_gone_managers,
                           "revoking a former manager's secrets failed; retrying")

    async def forget_gone_managers(self) -> None:
        """Nodes no longer managers: their etcd certificates refused by every member, the key they held
        replaced. Run at once by a demotion or removal, and every second by the leader."""
        if self.store_ca is not None:
            await self.revoke_store_certs()
        await self.rotate_if_held_by_others()

    async def after_manager_gone(self) -> None:
        """Right after a demotion or removal (the leader retries every second if this fails)."""
        try:
            await self.forget_gone_managers()
        except NetweftError as e:
            log.warning("revoking a former manager's secrets failed; the leader retries", extra={"reason": str(e)})

    def ha_routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/managers/key")
        @allow(MANAGER)
        async def manager_key(request):
            return web.json_response(self.key_for_manager(request["node"]))

        @routes.post("/admin/swarm/unlock-key/rotate")
        @allow(MANAGER)
        async def a_key_rotate(request):
            await auth.read_body(request, dict, empty_ok=True)
            return web.json_response(await self.rotate_manager_key())
        return routes

    async def _trim_history(self) -> None:
        async def trim():
            if self.state.rev > HISTORY:
                await self.store.compact(self.state.rev - HISTORY)
        await leader.every(TRIM_EVERY, self.is_leader, trim, "trimming the cluster store's history failed")

    async def _watch_self(self) -> None:
        """This manager demoted or removed (by another one): tell the daemon once, which stops it. Its view of
        the store may stop before it sees that (its etcd certificate is revoked at the demotion): when the view
        has not moved for a while, another manager is asked over mutual TLS (its node certificate) what it is."""
        rev, since = self.state.rev, time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            me = self.state.get(NODES, self.node_id)
            demoted = me is None or me.role != "manager"
            if self.state.rev != rev:
                rev, since = self.state.rev, time.monotonic()
            elif not demoted and time.monotonic() - since > STALE_VIEW:
                since = time.monotonic()
                demoted = await self._demoted_say_others()
            if demoted and self.on_demoted is not None:
                log.info("this manager was demoted or removed; it stops serving")
                self.on_demoted()
                return

    async def _demoted_say_others(self) -> bool:
        """Whether another manager answers this node's heartbeat with a worker role (or refuses it as removed)."""
        import aiohttp
        from netweft.pki.nodepair import files
        f = files(self.dir)
        ctx = pki.client_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]), pki.load_pem(f["key"]))
        others = [n for n in self.state.nodes() if n.role == "manager" and n.id != self.node_id]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
            for n in others:
                try:
                    async with s.post(f"https://{n.manager_addr or n.addr + ':2377'}/heartbeat", ssl=ctx,
                                      json={}) as r:
                        if r.status == 403:
                            return True      # removed from the cluster
                        if r.status == 200:
                            return (await r.json()).get("Role") == "worker"
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                    continue
        return False

    async def _drop_member(self, node: Node) -> bool:
        """Remove a manager's etcd member (embedded etcd: found by its name or peer URL); False if it had none."""
        if self.store_ca is None or not isinstance(self.store, hastore.EtcdStore):
            return False
        url = hastore.peer_url(node.addr)
        for m in await self.store.members():
            if m.name == node.id or url in m.peer_urls:
                # etcd refuses while a member restarted only moments ago (it would risk the quorum)
                for attempt in range(MEMBER_TRIES):
                    try:
                        await self.store.member_remove(m.id)
                        break
                    except Unavailable as e:
                        if attempt == MEMBER_TRIES - 1:
                            raise Unavailable(f"etcd refuses to remove {node.hostname}'s member now ({e}); "
                                              "nothing was changed: retry when every manager is up") from None
                        await asyncio.sleep(0.5)
                log.info("etcd member removed", extra={"node": node.id, "member": f"{m.id:x}"})
                return True
        return False

    async def enroll(self, node: Node, csr_pem: str) -> dict:
        """A new manager (joined with the manager token, or promoted) asks for what the shared store needs.
        Embedded etcd: its member is added here (before it starts, as etcd requires)."""
        if not self.ha:
            raise Conflict("this cluster keeps its state in one manager's store (swarm init without --store etcd): "
                           "there is nothing to enroll in")
        if node.role != "manager":
            raise Forbidden("only a manager enrolls in the cluster store")
        key = sealed.encode_key(await self._manager_key(self.state.get(CA, "root")))
        await self._add_holder(node.id)   # before it has the key: its demotion rotates it
        if self.store_ca is None:  # an etcd the operator runs: its client certificate is shared
            ca_pem, cert_pem, key_pem = hastore.load_store_pair(self.dir)
            return {"ManagerKey": key, "StoreCA": ca_pem.decode(), "StoreCert": cert_pem.decode(),
                    "StoreKey": key_pem.decode(), "Endpoints": self.store_endpoints}
        cert = self.sign_store_cert_for(node.id, csr_pem.encode(), node.addr)
        await self._record_issued(node.id, cert)   # before it is handed out: a demotion revokes it
        url = hastore.peer_url(node.addr)
        members = await self.store.members()
        mine = next((m for m in members if url in m.peer_urls), None)
        if mine is None:
            # etcd refuses a member while the last one added has not caught up (it would risk the quorum)
            for attempt in range(MEMBER_TRIES):
                try:
                    member_id, members = await self.store.member_add(url)
                    break
                except Unavailable:
                    if attempt == MEMBER_TRIES - 1:
                        raise
                    await asyncio.sleep(0.5)
            log.info("etcd member added", extra={"node": node.id, "member": f"{member_id:x}", "peer": url})
        else:
            member_id = mine.id
        initial = ",".join(f"{m.name or (node.id if m.id == member_id else f'{m.id:x}')}={m.peer_urls[0]}"
                           for m in members if m.peer_urls)
        endpoints = [u.removeprefix("https://") for m in members for u in m.client_urls]
        endpoints.append(hastore.client_endpoint(node.addr))
        return {"ManagerKey": key, "StoreCA": self.store_ca.cert_pem.decode(), "StoreCert": cert.decode(),
                "Endpoints": list(dict.fromkeys(endpoints)), "InitialCluster": initial,
                "StoreCRL": self.store_crl_pem() or crlmod.make_crl(self.store_ca, []).decode()}

    async def leave_managers(self) -> None:
        """This manager leaves for good (swarm leave --force): its endpoints go, it is marked down, its
        etcd member removed."""
        me = self.state.get(NODES, self.node_id)
        if me is not None:
            await self.leave(me)
            await self._drop_member(me)
