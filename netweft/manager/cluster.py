"""The manager: the cluster's source of truth (CA, join tokens, nodes) and its API on TCP 2377.

Until managers replicate (the HA issue), the first manager is the leader: it holds the store.
Managers that join later hold a manager certificate and forward administrative calls to it.
Every call but GET /ca and POST /join needs a node certificate of this cluster; each route declares
the roles that may call it (manager/auth.py), and a removed node is refused and disconnected at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from datetime import datetime, timedelta, timezone

from aiohttp import web

from netweft.store.local import Store, get_setting, put_setting
from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from netweft import pki
from netweft.manager import auth
from netweft.manager.auth import MANAGER, OPEN, WORKER, allow
from netweft.manager.overlays import Overlays
from netweft.model.cluster import HeartbeatRequest, JoinRequest, LeaveRequest, RenewRequest
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair
from netweft.manager.tlsserver import serve_tls

log = logging.getLogger("netweft.manager")

HEARTBEAT_MISSES = 3          # a node is Down after this many missed heartbeats
MIN_CERT_EXPIRY = timedelta(seconds=10)
WATCH_PING = 2.0              # seconds between keep-alive lines on an idle watch stream


def new_node_id() -> str:
    n = secrets.randbits(128)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(25, "0")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Manager:
    """The leader's cluster state and API. Pure state operations are plain methods; the API wraps them."""

    admission: auth.Admission | None = None  # the API's guard, once the API is built

    def __init__(self, store: Store, swarm_dir: str, node_id: str):
        self.store, self.dir, self.node_id = store, swarm_dir, node_id
        repair_node_pair(swarm_dir)
        f = files(swarm_dir)
        self.ca = pki.RootCA.from_pem(pki.load_pem(f["ca"]), pki.load_pem(f["ca_key"]))
        self.server: asyncio.base_events.Server | None = None
        self.runner: web.AppRunner | None = None
        self.tasks: list[asyncio.Task] = []
        # Heartbeats are kept in memory; the store only sees Ready/Down transitions.
        self.last_seen: dict[str, float] = {}
        self.overlays = Overlays(store, self.spec)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def init_cluster(store: Store, swarm_dir: str, hostname: str, advertise: str, listen: tuple[str, int],
                     spec: dict) -> str:
        """Create the root CA, the tokens and this node as the first manager; returns the node ID."""
        cluster_id = new_node_id()
        node_id = new_node_id()
        ca = pki.create_root_ca(cluster_id)
        key = pki.new_node_key()
        expiry = timedelta(seconds=spec["CertExpiry"])
        cert = pki.sign_node_cert(ca, pki.make_csr(key), node_id, "manager", cluster_id, expiry,
                                  ip_sans=[advertise])
        os.makedirs(swarm_dir, mode=0o700, exist_ok=True)
        f = files(swarm_dir)
        pki.save_pem(f["ca"], ca.cert_pem)
        pki.save_pem(f["ca_key"], ca.key_pem, private=True)
        pki.save_pem(f["key"], pki.key_to_pem(key), private=True)
        pki.save_pem(f["cert"], cert)
        digest = ca.digest()
        cluster = {"ID": cluster_id, "CreatedAt": utcnow(), "Spec": spec,
                   "JoinTokens": {"Worker": pki.make_join_token(digest), "Manager": pki.make_join_token(digest)},
                   "Leader": {"NodeID": node_id, "Addr": f"{advertise}:{listen[1]}"}, "Revoked": {}}
        ident = pki.cert_identity(cert)
        node = {"ID": node_id, "CreatedAt": utcnow(), "UpdatedAt": utcnow(),
                "Spec": {"Role": "manager", "Availability": "active", "Labels": {}},
                "Description": {"Hostname": hostname},
                "Status": {"State": "ready", "Addr": advertise},
                "ManagerStatus": {"Leader": True, "Reachability": "reachable", "Addr": f"{advertise}:{listen[1]}"},
                "Certificate": {"Serial": str(ident.serial), "NotAfter": ident.not_after.isoformat()}}
        with store.tx():
            store.put("settings", "cluster", "cluster", cluster)
            store.put("nodes", node_id, None, node)
        return node_id

    def cluster(self) -> dict:
        return get_setting(self.store, "cluster")

    def spec(self) -> dict:
        return self.cluster()["Spec"]

    async def start(self, listen: tuple[str, int]) -> None:
        f = files(self.dir)
        ctx = self.ctx = pki.server_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]),
                                                pki.load_pem(f["key"]), require_client_cert=False)
        # Watch streams never end by themselves: stop() ends them, and shutdown waits briefly.
        self.runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self.runner.setup()
        try:
            self.server = await serve_tls(self.runner, listen[0], listen[1], ctx)
        except OSError as e:
            await self.runner.cleanup()
            raise Conflict(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}; "
                           "choose another --listen-addr") from None
        now = time.monotonic()
        for node in self.store.list("nodes"):  # grace after a restart: nobody is Down yet
            self.last_seen[node["ID"]] = now
        self.tasks = [asyncio.ensure_future(self._monitor()), asyncio.ensure_future(self._renew_own_cert())]
        log.info("cluster API listening", extra={"addr": f"{listen[0]}:{listen[1]}"})

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for q in list(self.overlays.watchers):
            q.put_nowait(None)  # ends that watch stream: its agent reconnects to the next manager life
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------ node lookup
    def node(self, ref: str) -> dict:
        node = self.store.get("nodes", ref)
        if node is None:
            nodes = self.store.list("nodes")
            hits = [n for n in nodes if n["Description"]["Hostname"] == ref] or \
                   [n for n in nodes if n["ID"].startswith(ref)]
            if len(hits) > 1:
                raise Conflict(f"node reference {ref!r} is ambiguous; use the node ID")
            node = hits[0] if hits else None
        if node is None:
            raise NotFound(f"node {ref!r} not found; see `netweft node ls`")
        return node

    def _save(self, node: dict) -> None:
        node["UpdatedAt"] = utcnow()
        with self.store.tx():
            self.store.put("nodes", node["ID"], None, node)

    # ------------------------------------------------------- agent operations
    def join(self, token: str, csr_pem: str, hostname: str, addr: str) -> dict:
        pki.parse_join_token(token)  # malformed -> InvalidRequest with the reason
        cluster = self.cluster()
        tokens = cluster["JoinTokens"]
        if pki.secret_matches(token, tokens["Worker"]):
            role = "worker"
        elif pki.secret_matches(token, tokens["Manager"]):
            role = "manager"
        else:
            raise Unauthorized("invalid join token: it matches neither the current worker nor manager token "
                               "(was it rotated?); get one with `netweft swarm join-token worker` on a manager")
        node_id = new_node_id()
        cert = self._sign(csr_pem, node_id, role, addr)
        ident = pki.cert_identity(cert)
        node = {"ID": node_id, "CreatedAt": utcnow(), "UpdatedAt": utcnow(),
                "Spec": {"Role": role, "Availability": "active", "Labels": {}},
                "Description": {"Hostname": hostname}, "Status": {"State": "ready", "Addr": addr},
                "Certificate": {"Serial": str(ident.serial), "NotAfter": ident.not_after.isoformat()}}
        if role == "manager":
            node["ManagerStatus"] = {"Leader": False, "Reachability": "reachable", "Addr": f"{addr}:2377"}
        self._save(node)
        self.last_seen[node_id] = time.monotonic()
        log.info("node joined", extra={"node": node_id, "hostname": hostname, "role": role, "addr": addr})
        return {"NodeID": node_id, "Role": role, "ClusterID": cluster["ID"], "Certificate": cert.decode(),
                "CACert": self.ca.cert_pem.decode(), "Managers": [cluster["Leader"]["Addr"]],
                "HeartbeatPeriod": self.spec()["HeartbeatPeriod"], "DataPathPort": self.spec()["DataPathPort"]}

    def _sign(self, csr_pem: str, node_id: str, role: str, addr: str | None) -> bytes:
        expiry = timedelta(seconds=self.spec()["CertExpiry"])
        ips = [addr] if role == "manager" and addr else []
        return pki.sign_node_cert(self.ca, csr_pem.encode(), node_id, role, self.cluster()["ID"], expiry,
                                  ip_sans=ips)

    def renew(self, node: dict, csr_pem: str) -> dict:
        role = node["Spec"]["Role"]  # the desired role: a promotion or demotion lands with the renewal
        cert = self._sign(csr_pem, node["ID"], role, node["Status"]["Addr"])
        ident = pki.cert_identity(cert)
        node["Certificate"] = {"Serial": str(ident.serial), "NotAfter": ident.not_after.isoformat()}
        self._save(node)
        log.info("node certificate renewed", extra={"node": node["ID"], "role": role,
                                                    "not_after": ident.not_after.isoformat()})
        return {"Certificate": cert.decode(), "Role": role}

    def heartbeat(self, node: dict, addr: str | None) -> dict:
        self.last_seen[node["ID"]] = time.monotonic()
        if node["Status"]["State"] != "ready" or (addr and node["Status"]["Addr"] != addr):
            node["Status"] = {"State": "ready", "Addr": addr or node["Status"]["Addr"]}
            self._save(node)
            log.info("node ready", extra={"node": node["ID"], "hostname": node["Description"]["Hostname"]})
        return {"Period": self.spec()["HeartbeatPeriod"], "Role": node["Spec"]["Role"],
                "Availability": node["Spec"]["Availability"]}

    def leave(self, node: dict) -> None:
        node["Status"]["State"] = "down"
        self.last_seen.pop(node["ID"], None)
        self._save(node)
        self.overlays.purge_node(node["ID"])
        log.info("node left", extra={"node": node["ID"], "hostname": node["Description"]["Hostname"]})

    async def _monitor(self) -> None:
        while True:
            period = self.spec()["HeartbeatPeriod"]
            await asyncio.sleep(min(1.0, period / 4))
            limit = HEARTBEAT_MISSES * period
            now = time.monotonic()
            for node in self.store.list("nodes"):
                if node["ID"] == self.node_id or node["Status"]["State"] != "ready":
                    continue
                if now - self.last_seen.get(node["ID"], now) > limit:
                    node["Status"]["State"] = "down"
                    self._save(node)
                    log.warning("node down: missed heartbeats",
                                extra={"node": node["ID"], "hostname": node["Description"]["Hostname"],
                                       "after_s": limit})

    async def _renew_own_cert(self) -> None:
        """The leader signs its own renewals: same timing rule as every node (50-80 % of the lifetime)."""
        f = files(self.dir)
        while True:
            ident = pki.cert_identity(pki.load_pem(f["cert"]))
            at = pki.renewal_time(ident.not_before + pki.CLOCK_SKEW, ident.not_after)  # not_before is backdated
            await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))
            key = pki.new_node_key()
            node = self.node(self.node_id)
            cert = self.renew(node, pki.make_csr(key).decode())["Certificate"]
            save_node_pair(self.dir, pki.key_to_pem(key), cert.encode())
            self.ctx.load_cert_chain(f["cert"], f["key"])  # new handshakes present the renewed certificate

    # ---------------------------------------------------- admin operations
    def nodes(self) -> list[dict]:
        return [self.node_view(n) for n in self.store.list("nodes")]

    def node_view(self, node: dict) -> dict:
        view = dict(node)
        if node["ID"] == self.node_id:
            view["Status"] = {**node["Status"], "State": "ready"}
        return view

    def remove_node(self, ref: str, force: bool) -> None:
        node = self.node(ref)
        name = node["Description"]["Hostname"]
        if node["ID"] == self.node_id:
            raise Conflict(f"node {name!r} is the leader (this manager); it cannot remove itself: "
                           "use `netweft swarm leave --force` on it")
        if node["Spec"]["Role"] == "manager" and not force:
            raise Conflict(f"node {name!r} is a manager; demote it first (`netweft node demote {name}`) "
                           "or use --force")
        if node["Status"]["State"] == "ready" and not force:
            raise Conflict(f"node {name!r} is not down and can't be removed; stop its daemon first "
                           "or use --force")
        cluster = self.cluster()
        cluster["Revoked"][node["ID"]] = utcnow()
        with self.store.tx():
            self.store.delete("nodes", node["ID"])
            self.store.put("settings", "cluster", "cluster", cluster)
        self.last_seen.pop(node["ID"], None)
        self.overlays.purge_node(node["ID"])
        # Its open connections (a watch stream, kept-alive calls) end now, not at their next request.
        closed = self.admission.disconnect(node["ID"]) if self.admission is not None else 0
        log.info("node removed; its certificate is refused from now on", extra={"node": node["ID"],
                                                                              "hostname": name,
                                                                              "connections_closed": closed})

    def update_node(self, ref: str, role: str | None, availability: str | None, labels_add: dict | None,
                    labels_rm: list | None = None) -> dict:
        node = self.node(ref)
        if role is not None:
            if role not in pki.ROLES:
                raise InvalidRequest(f"invalid role {role!r}: use manager or worker")
            if node["ID"] == self.node_id and role != "manager":
                raise Conflict("the leader cannot be demoted: it holds the cluster store "
                               "(several managers come with the HA issue)")
            node["Spec"]["Role"] = role
            if role == "manager":
                node["ManagerStatus"] = {"Leader": False, "Reachability": "reachable",
                                         "Addr": f"{node['Status']['Addr']}:2377"}
            else:
                node.pop("ManagerStatus", None)
        if availability is not None:
            if availability not in ("active", "pause", "drain"):
                raise InvalidRequest(f"invalid availability {availability!r}: use active, pause or drain")
            node["Spec"]["Availability"] = availability
        for k in labels_rm or []:
            node["Spec"]["Labels"].pop(k, None)
        node["Spec"]["Labels"].update(labels_add or {})
        self._save(node)
        return self.node_view(node)

    def rotate_token(self, role: str) -> str:
        if role not in pki.ROLES:
            raise InvalidRequest(f"invalid role {role!r}: use worker or manager")
        cluster = self.cluster()
        key = role.capitalize()
        cluster["JoinTokens"][key] = pki.make_join_token(self.ca.digest())
        put_setting(self.store, "cluster", cluster)
        log.info("join token rotated; the old one is refused from now on", extra={"role": role})
        return cluster["JoinTokens"][key]

    def inspect(self) -> dict:
        c = self.cluster()
        _, not_after = pki.validity(self.ca.cert)
        return {"ID": c["ID"], "CreatedAt": c["CreatedAt"], "Spec": c["Spec"], "Leader": c["Leader"],
                "RootCA": {"Digest": self.ca.digest(), "NotAfter": not_after.isoformat(),
                           "CertPEM": self.ca.cert_pem.decode()},
                "JoinTokens": c["JoinTokens"]}

    # ------------------------------------------------------------ the API
    async def _watch(self, request: web.Request) -> web.StreamResponse:
        """Newline-delimited JSON: what the watcher missed (or a snapshot), then live batches, pings between."""
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise InvalidRequest("since must be a revision number") from None
        q: asyncio.Queue = asyncio.Queue()
        # No await between subscribing and reading the history: nothing can fall in between.
        self.overlays.watchers.add(q)
        try:
            missed = self.overlays.since(since) if since else None
            first = [self.overlays.snapshot()] if missed is None else missed
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for batch in first:
                await resp.write(json.dumps(batch).encode() + b"\n")
            while True:
                try:
                    batch = await asyncio.wait_for(q.get(), WATCH_PING)
                except asyncio.TimeoutError:
                    batch = {"Type": "ping", "Rev": self.overlays.rev}
                if batch is None:
                    break
                await resp.write(json.dumps(batch).encode() + b"\n")
        finally:
            self.overlays.watchers.discard(q)
        await resp.write_eof()
        return resp

    def _peer(self, request: web.Request) -> tuple[pki.NodeIdentity, dict, str]:
        """Who is calling: verified certificate -> identity -> a current, not removed node, and its role now."""
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
        if not der:
            raise Unauthorized("a node certificate is required for this call: join the cluster first "
                               "(netweft swarm join --token TOKEN MANAGER)")
        try:
            ident = pki.verify_node_cert(self.ca.cert_pem, der)
        except InvalidRequest as e:
            raise Unauthorized(str(e)) from None
        cluster = self.cluster()
        if ident.node_id in cluster["Revoked"]:
            raise Forbidden(f"node {ident.node_id} was removed from the cluster on "
                            f"{cluster['Revoked'][ident.node_id]}; it must leave and join again with a token")
        node = self.store.get("nodes", ident.node_id)
        if node is None:
            raise Forbidden(f"node {ident.node_id} is not a member of this cluster")
        return ident, node, node["Spec"]["Role"]

    def build_app(self) -> web.Application:
        routes = web.RouteTableDef()

        # Rate limit, declared roles (both the certificate's and the store's), body limits: see auth.py.
        self.admission = auth.Admission(self._peer)

        async def body(request) -> dict:
            try:
                data = await request.json()
            except (json.JSONDecodeError, ValueError):
                raise InvalidRequest("request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise InvalidRequest("request body must be a JSON object")
            return data

        @routes.get("/ca")
        @allow(OPEN)
        async def ca(request):
            return web.Response(body=self.ca.cert_pem, content_type="application/x-pem-file")

        @routes.post("/join")
        @allow(OPEN)
        async def join(request):
            b = await auth.read_body(request, JoinRequest)
            return web.json_response(self.join(b.token, b.csr, b.hostname, b.advertise_addr or request.remote))

        @routes.post("/renew")
        @allow(WORKER)
        async def renew(request):
            b = await auth.read_body(request, RenewRequest)
            return web.json_response(self.renew(request["node"], b.csr))

        @routes.post("/heartbeat")
        @allow(WORKER)
        async def heartbeat(request):
            b = await auth.read_body(request, HeartbeatRequest)
            return web.json_response(self.heartbeat(request["node"], b.addr))

        @routes.post("/leave")
        @allow(WORKER)
        async def leave(request):
            await auth.read_body(request, LeaveRequest, empty_ok=True)
            self.leave(request["node"])
            return web.json_response({})

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
            self.remove_node(request.match_info["ref"], request.query.get("force") in ("1", "true"))
            return web.json_response({})

        @routes.post("/admin/nodes/{ref}/update")
        @allow(MANAGER)
        async def a_node_update(request):
            b = await body(request)
            return web.json_response(self.update_node(request.match_info["ref"], b.get("Role"),
                                                      b.get("Availability"), b.get("LabelsAdd"),
                                                      b.get("LabelsRemove")))

        @routes.post("/admin/join-token/rotate")
        @allow(MANAGER)
        async def a_rotate(request):
            return web.json_response({"Token": self.rotate_token(request.query.get("role", ""))})

        @routes.get("/watch")
        @allow(WORKER)
        async def watch(request):
            return await self._watch(request)

        @routes.get("/networks/{ref}")
        @allow(WORKER)
        async def net_get(request):
            return web.json_response(self.overlays.network(request.match_info["ref"]))

        @routes.post("/endpoints")
        @allow(WORKER)
        async def ep_create(request):
            return web.json_response(self.overlays.create_endpoint(request["node"], await body(request)))

        @routes.delete("/endpoints/{id}")
        @allow(WORKER)
        async def ep_delete(request):
            self.overlays.delete_endpoint(request["node"], request.match_info["id"])
            return web.json_response({})

        @routes.post("/admin/networks")
        @allow(MANAGER)
        async def a_net_create(request):
            return web.json_response(self.overlays.create_network(await body(request)))

        @routes.delete("/admin/networks/{ref}")
        @allow(MANAGER)
        async def a_net_rm(request):
            self.overlays.remove_network(request.match_info["ref"])
            return web.json_response({})

        @routes.post("/admin/synthetic")
        @allow(MANAGER)
        async def a_synthetic(request):
            b = await body(request)
            return web.json_response({"Count": self.overlays.bulk_endpoints(
                request["node"], str(b.get("NetworkID", "")), int(b.get("Count", 0)), str(b.get("VTEP", "")))})

        @routes.delete("/admin/synthetic")
        @allow(MANAGER)
        async def a_synthetic_rm(request):
            return web.json_response({"Count": self.overlays.purge_node(f"synthetic-{request.query.get('vtep')}")})

        app = web.Application(middlewares=[self.admission.middleware], client_max_size=auth.BODY_LIMIT)
        app.add_routes(routes)
        return app
