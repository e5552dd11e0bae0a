"""Services on the managers: the operator's calls, the tasks each node runs, and the scheduling loop.

Services and tasks are objects of the cluster store (kinds "services" and "tasks"), read through the
Hub's state like nodes and networks. The leader runs the scheduler (manager/scheduler.py, pure) in a
loop: at once after an operator's call or an agent's report, and every ROUND seconds (node changes: drain,
Down, the grace period), it plans and writes the difference in one transaction.

A node hears of its tasks and of every service through its watch (manager/watch.py: task events to
the task's node, service events to all); it then asks for its assignments (GET /tasks/assigned: the
node's tasks with what is needed to run them) and reports its tasks' states (POST /tasks/status); a node
can report only its own tasks. An update makes a new version of the service, which the scheduler rolls
out over the tasks as its update config says (scheduler._roll); `rollback` returns to the previous spec. Docker-shaped JSON (service and task inspect) is made here, at the API edge.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime, timezone
from ipaddress import IPv4Network

import msgspec
from aiohttp import web

from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound
from netweft.manager import ingress, scheduler
from netweft.manager.auth import MANAGER, WORKER, allow
from netweft.model import codec
from netweft.ipam import address as ipam
from netweft.manager.overlays import GUARD, net_guard, subnet_config
from netweft.manager.watch import ALLOCATIONS, ENDPOINTS
from netweft.model.objects import Endpoint, Network, Node, Owner
from netweft.model.services import PortConfig, Service, ServiceSpec, Task, TaskStatus, UpdateConfig, UpdateStatus
from netweft.store.api import Compare, Delete, Put

log = logging.getLogger("netweft.manager.services")

SERVICES, TASKS = "services", "tasks"
ROUND = 1.0                  # seconds between scheduling rounds without changes
INGRESS_SANDBOX = "ingress-sbox"   # the container holding each host's end of the routing mesh
MAX_NAME = 32                # a task's container name (SERVICE.SLOT.ID) must fit 64 characters


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    """25 lowercase letters and digits (128 bits), as swarmkit's IDs."""
    n = secrets.randbits(128)
    out = ""
    for _ in range(25):
        n, r = divmod(n, 36)
        out += "0123456789abcdefghijklmnopqrstuvwxyz"[r]
    return out


class ServiceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /admin/services and /admin/services/{ref}/update: a ServiceSpec with networks by name or ID."""
    name: str
    command: list[str]
    env: dict[str, str] = {}
    mode: str = "replicated"
    replicas: int | None = None
    networks: list[str] = []
    ports: list[PortConfig] = []
    endpoint_mode: str = "vip"
    constraints: list[str] = []
    labels: dict[str, str] = {}
    update_config: UpdateConfig | None = None      # None: as before (an update keeps the service's)


def update_config_view(c: UpdateConfig) -> dict:
    """Docker's UpdateConfig (Delay in nanoseconds)."""
    return {"Parallelism": c.parallelism, "Delay": int(c.delay * 1e9), "FailureAction": c.failure_action,
            "Order": c.order, "MaxFailureRatio": 0}


class Services:
    def __init__(self, hub, overlays):
        self.hub, self.overlays = hub, overlays
        self.down_since: dict[str, float] = {}
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._wake: float | None = None     # seconds until a delayed update batch is due
        # What the overlay allocations ask of services (manager/overlays.py).
        overlays.may_attach = self.may_attach
        overlays.check_removal = lambda net: ingress.check_removal(net, [s.spec for s in self.services()])

    def may_attach(self, node_id: str, owner, net_id: str) -> bool:
        """A task's container may join its service's networks, attachable or not: the owner is a netweft
        container named after a live task of that node whose service is on the network."""
        if owner.kind != "netweft":
            return False
        ingress = net_id in self.state.ingress
        if ingress and owner.name == INGRESS_SANDBOX:   # each host's ingress sandbox (the routing mesh)
            return True
        svcs = {s.id: s for s in self.services()}
        for t in self.tasks():
            if t.node_id == node_id and t.name[:64] == owner.name and t.desired_state == "running":
                svc = svcs.get(t.service_id)
                return svc is not None and (net_id in svc.spec.networks or (ingress and self.publishes(svc)))
        return False

    @property
    def state(self):
        return self.hub.state

    # ------------------------------------------------------------------ reads
    def services(self) -> list[Service]:
        return [e.obj for e in self.state.kinds[SERVICES].values()]

    def tasks(self) -> list[Task]:
        return [e.obj for e in self.state.kinds[TASKS].values()]

    def service(self, ref: str) -> Service:
        svcs = self.services()
        hit = next((s for s in svcs if s.id == ref or s.spec.name == ref), None)
        if hit is None and len(ref) >= 3:
            hits = [s for s in svcs if s.id.startswith(ref)]
            hit = hits[0] if len(hits) == 1 else None
        if hit is None:
            raise NotFound(f"service {ref!r} not found; see `netweft service ls`")
        return hit

    # ------------------------------------------------------------------ operator calls
    def _spec(self, req: ServiceRequest, old: Service | None = None) -> ServiceSpec:
        if len(req.name) > MAX_NAME:
            raise InvalidRequest(f"service name {req.name[:80]!r} is longer than {MAX_NAME} characters")
        if req.mode not in ("replicated", "global"):
            raise InvalidRequest(f"invalid --mode {req.mode[:40]!r}: replicated or global")
        if req.mode == "global" and req.replicas is not None:
            raise InvalidRequest("--replicas cannot be used with --mode global")
        if req.endpoint_mode not in ("vip", "dnsrr"):
            raise InvalidRequest(f"invalid --endpoint-mode {req.endpoint_mode[:40]!r}: vip or dnsrr")
        if req.endpoint_mode == "dnsrr" and any(p.mode == "ingress" for p in req.ports):
            raise InvalidRequest("--endpoint-mode dnsrr cannot publish ports in ingress mode; use mode=host")
        for c in req.constraints:
            try:
                scheduler.parse_constraint(c)
            except scheduler.ConstraintError as e:
                raise InvalidRequest(str(e)) from None
        nets: list[str] = []
        for ref in req.networks:
            net = self.overlays.network(ref)
            if net.ingress:
                raise InvalidRequest(f"network {net.name!r} is the ingress network: services join it by "
                                     "publishing ports, not with --network")
            if net.id not in nets:
                nets.append(net.id)
        seen = set()
        for p in req.ports:
            key = (p.published or p.target, p.protocol)
            if p.published is not None and key in seen:
                raise InvalidRequest(f"port {key[0]}/{key[1]} is published twice")
            seen.add(key)
        replicas = req.replicas if req.replicas is not None else (old.spec.replicas if old else 1)
        doc = {"name": req.name, "command": req.command, "env": req.env, "mode": req.mode, "replicas": replicas,
               "networks": nets, "ports": [codec.to_builtins(p) for p in req.ports],
               "endpoint_mode": req.endpoint_mode, "constraints": req.constraints, "labels": req.labels,
               "update_config": codec.to_builtins(req.update_config or (old.spec.update_config if old
                                                                        else UpdateConfig()))}
        return codec.convert(doc, ServiceSpec, "service")

    def _check_ports(self, spec: ServiceSpec, sid: str | None) -> None:
        mine = {(p.published, p.protocol) for p in spec.ports if p.published and p.mode == "ingress"}
        for s in self.services():
            if s.id == sid:
                continue
            for p in s.spec.ports:
                if p.mode == "ingress" and (p.published, p.protocol) in mine:
                    raise Conflict(f"port {p.published}/{p.protocol} is already published by service "
                                   f"{s.spec.name!r}")

    def _vip_ops(self, svc: Service, old: Service | None) -> tuple[list, list]:
        """Compares and ops that give the service one VIP endpoint on each of its networks (vip mode) and
        remove those it no longer needs. A VIP is an Endpoint of no node (owner kind "service"): its address
        is allocated like any other, every host on the network hears of it through the watch, answers the
        service's name with it, and balances it over the tasks (dataplane/vip.py)."""
        st = self.state
        have = {e.network_id: e for e in self._vip_endpoints(svc.id)}
        want = set(svc.spec.networks) if svc.spec.endpoint_mode == "vip" else set()
        compares, ops = [], []
        for net_id, ep in have.items():
            if net_id not in want:
                ops += [Delete(ENDPOINTS, ep.id), Put(ALLOCATIONS, net_guard(net_id), GUARD)]
        for net_id in want - set(have):
            net = st.get("networks", net_id)
            if net is None:
                continue
            ip = self.overlays._lowest_free(net.id, subnet_config(net), st.net_ips[net.id])
            ep = Endpoint(id=secrets.token_hex(32), network_id=net.id, ip=str(ip),
                          prefix_len=IPv4Network(net.subnet).prefixlen, mac=ipam.mac_for_ip(ip),
                          owner=Owner(kind="service", id=svc.id, name=svc.spec.name))
            compares += [Compare("networks", net.id, st.mod_rev("networks", net.id)),
                         Compare(ALLOCATIONS, net_guard(net.id), st.mod_rev(ALLOCATIONS, net_guard(net.id)))]
            ops += [Put(ENDPOINTS, ep.id, codec.encode(ep)), Put(ALLOCATIONS, net_guard(net.id), GUARD)]
        return compares, ops

    def _vip_endpoints(self, service_id: str) -> list[Endpoint]:
        return [e.obj for e in self.state.kinds[ENDPOINTS].values()
                if e.obj.owner.kind == "service" and e.obj.owner.id == service_id]

    async def create(self, body: bytes) -> dict:
        req = codec.decode(body, ServiceRequest, "service create request")
        spec = self._spec(req)

        def plan():
            if any(s.spec.name == spec.name for s in self.services()):
                raise Conflict(f"service {spec.name!r} already exists; choose another name or remove it first")
            self._check_ports(spec, None)
            ports = self._assign_ports(spec, None)
            svc = Service(id=new_id(), spec=msgspec.structs.replace(spec, ports=ports), created=utcnow(),
                          updated=utcnow())
            compares, ops = self._vip_ops(svc, None)
            return [Compare(SERVICES, svc.id, 0), *compares], [Put(SERVICES, svc.id, codec.encode(svc)), *ops], svc

        async with self._lock:
            svc, _ = await self.hub.commit(plan)
        self._kick.set()
        log.info("service created", extra={"service": svc.spec.name, "id": svc.id})
        return {"ID": svc.id}

    def _assign_ports(self, spec: ServiceSpec, sid: str | None) -> list[PortConfig]:
        """Ingress ports without a published port get one from 30000-32767 (Docker's range)."""
        used = {p.published for s in self.services() if s.id != sid for p in s.spec.ports if p.published}
        out = []
        for p in spec.ports:
            if p.published is None and p.mode == "ingress":
                port = next((n for n in range(30000, 32768) if n not in used), None)
                if port is None:
                    raise Conflict("no free port left in 30000-32767 to publish; give published=PORT")
                used.add(port)
                p = msgspec.structs.replace(p, published=port)
            out.append(p)
        return out

    async def update(self, ref: str, body: bytes) -> dict:
        req = codec.decode(body, ServiceRequest, "service update request")

        def new_version():
            old = self.service(ref)
            if req.name != old.spec.name:
                raise InvalidRequest("a service cannot be renamed; create another one")
            spec = self._spec(req, old)
            self._check_ports(spec, old.id)
            spec = msgspec.structs.replace(spec, ports=self._assign_ports(spec, old.id))
            # Only the replica count (or how updates roll) changed: not a new version (no task is replaced).
            scale_only = msgspec.structs.replace(spec, replicas=old.spec.replicas,
                                                 update_config=old.spec.update_config) == old.spec
            svc = msgspec.structs.replace(old, spec=spec, updated=utcnow(),
                                          version=old.version if scale_only else old.version + 1)
            if not scale_only:   # a rolling update starts (manager/scheduler.py replaces the tasks)
                svc = msgspec.structs.replace(svc, previous_spec=old.spec, update_status=UpdateStatus(
                    state="updating", started=utcnow(), message="update in progress"))
            return old, svc

        return await self._replace(new_version)

    async def rollback(self, ref: str) -> dict:
        """`service rollback`: the spec before the last update comes back, rolled out as an update is (the
        rolled-back spec becomes the previous one: a second rollback undoes the first, as Docker's)."""
        def new_version():
            old = self.service(ref)
            if old.previous_spec is None:
                raise Conflict(f"service {old.spec.name!r} has no previous spec to roll back to "
                               "(it was never updated)")
            spec = old.previous_spec
            self._check_ports(spec, old.id)
            svc = msgspec.structs.replace(old, spec=spec, previous_spec=old.spec, updated=utcnow(),
                                          version=old.version + 1, update_status=UpdateStatus(
                                              state="rollback_started", started=utcnow(),
                                              message="rollback in progress"))
            return old, svc

        return await self._replace(new_version)

    async def _replace(self, new_version) -> dict:
        """Commit the service `new_version()` gives (computed under the lock from the current state, with
        the one it replaces) and its VIP changes, and wake the scheduler."""
        def plan():
            old, svc = new_version()
            compares, ops = self._vip_ops(svc, old)
            return ([Compare(SERVICES, old.id, self.state.mod_rev(SERVICES, old.id)), *compares],
                    [Put(SERVICES, svc.id, codec.encode(svc)), *ops], svc)

        async with self._lock:
            svc, _ = await self.hub.commit(plan)
        self._kick.set()
        return {"ID": svc.id, "Version": svc.version}

    async def remove(self, ref: str) -> None:
        def plan():
            svc = self.service(ref)
            ops = [Delete(SERVICES, svc.id)]
            for ep in self._vip_endpoints(svc.id):
                ops += [Delete(ENDPOINTS, ep.id), Put(ALLOCATIONS, net_guard(ep.network_id), GUARD)]
            return [], ops, svc

        async with self._lock:
            svc, _ = await self.hub.commit(plan)
        self._kick.set()
        log.info("service removed", extra={"service": svc.spec.name})

    # ------------------------------------------------------------------ agents
    def ingress_network(self) -> str:
        return next(iter(self.state.ingress), "")

    @staticmethod
    def publishes(svc: Service) -> bool:
        """Its tasks join the ingress network: it publishes ports (mode=host ones too: a task needs an
        overlay endpoint to have an address on the host's gateway bridge)."""
        return any(p.published for p in svc.spec.ports)

    def assigned(self, node: Node) -> bytes:
        """GET /tasks/assigned: the node's tasks, each with its service's spec (None once removed) and the
        ingress network it joins if it publishes ports; and every published port of the cluster (each host
        answers them all: the routing mesh)."""
        svcs = {s.id: s for s in self.services()}
        ingress_id = self.ingress_network()
        tasks = []
        for t in self.tasks():
            if t.node_id != node.id:
                continue
            s = svcs.get(t.service_id)
            tasks.append({"task": t, "name": t.name, "service": s.spec if s else None,
                          "ingress": ingress_id if s is not None and self.publishes(s) else ""})
        published = [{"service": s.spec.name, "protocol": p.protocol, "published": p.published, "target": p.target,
                      "mode": p.mode} for s in svcs.values() for p in s.spec.ports if p.published]
        return codec.encode({"tasks": tasks, "published": published, "ingress": ingress_id})

    async def report(self, node: Node, body: bytes) -> None:
        """POST /tasks/status: states of the node's own tasks; others' are refused, unknown ones skipped."""
        statuses = codec.decode(body, list[TaskStatus], "task status report")
        if len(statuses) > 10000:
            raise InvalidRequest("too many task states in one report (at most 10000)")

        def plan():
            ops, compares = [], []
            for st in statuses:
                t = self.state.get(TASKS, st.id)
                if t is None:
                    continue
                if t.node_id != node.id:
                    raise Forbidden(f"task {st.id[:12]} runs on another node; a node reports only its own")
                if (t.state, t.message, t.error, t.exit_code, t.container_id) == (
                        st.state, st.message, st.error, st.exit_code, st.container_id):
                    continue
                if t.state in ("complete", "failed", "shutdown", "rejected", "orphaned") and st.state == "running":
                    continue   # a finished task never runs again
                new = msgspec.structs.replace(t, state=st.state, message=st.message, error=st.error,
                                              exit_code=st.exit_code, container_id=st.container_id or t.container_id,
                                              updated=utcnow())
                compares.append(Compare(TASKS, t.id, self.state.mod_rev(TASKS, t.id)))
                ops.append(Put(TASKS, t.id, codec.encode(new)))
            return compares, ops, None

        await self.hub.commit(plan)
        self._kick.set()

    # ------------------------------------------------------------------ the scheduling loop (leader)
    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        """The scheduling loop; the manager runs it as one of its tasks (and cancels it)."""
        while True:
            try:   # sooner than a round when an update's delay ends before it
                await asyncio.wait_for(self._kick.wait(), min(ROUND, self._wake if self._wake else ROUND))
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await self.schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:   # the next round retries; one bad object must not stop scheduling
                log.exception("scheduling round failed")
                await asyncio.sleep(ROUND)

    async def schedule_once(self) -> scheduler.Plan:
        now = time.monotonic()
        nodes = self.state.nodes()
        for n in nodes:
            if n.state == "down":
                self.down_since.setdefault(n.id, now)
            else:
                self.down_since.pop(n.id, None)

        def plan():
            p = scheduler.schedule(self.services(), self.tasks(), self.state.nodes(), now, self.down_since,
                                   new_id, utcnow(), clock=time.time())
            ops = [Put(TASKS, t.id, codec.encode(t)) for t in p.create + p.update]
            ops += [Delete(TASKS, i) for i in p.delete]
            ops += [Put(SERVICES, s.id, codec.encode(s)) for s in p.services]
            compares = [Compare(TASKS, t.id, self.state.mod_rev(TASKS, t.id)) for t in p.update]
            compares += [Compare(SERVICES, s.id, self.state.mod_rev(SERVICES, s.id)) for s in p.services]
            return compares, ops, p

        async with self._lock:
            first = plan()[2]
            self._wake = first.wake
            if first.empty():   # the usual round: nothing to write, no transaction
                return scheduler.Plan()
            p, _ = await self.hub.commit(plan)
        if not p.empty():
            log.info("tasks scheduled", extra={"new_tasks": len(p.create), "changed_tasks": len(p.update),
                                               "deleted_tasks": len(p.delete)})
        return p

    # ------------------------------------------------------------------ Docker-shaped views
    def service_view(self, svc: Service) -> dict:
        spec = svc.spec
        running, desired = scheduler.service_running(svc, self.tasks(), self.state.nodes())
        ports = [{"Protocol": p.protocol, "TargetPort": p.target, "PublishedPort": p.published,
                  "PublishMode": p.mode} for p in spec.ports]
        docker_spec = {
            "Name": spec.name, "Labels": dict(spec.labels),
            "TaskTemplate": {"ContainerSpec": {"Image": "", "Command": list(spec.command),
                                               "Env": [f"{k}={v}" for k, v in spec.env.items()]},
                             "Placement": {"Constraints": list(spec.constraints)},
                             "Networks": [{"Target": n} for n in spec.networks]},
            "Mode": {"Replicated": {"Replicas": spec.replicas}} if spec.mode == "replicated" else {"Global": {}},
            "EndpointSpec": {"Mode": spec.endpoint_mode, "Ports": ports},
        }
        vips = [{"NetworkID": ep.network_id, "Addr": f"{ep.ip}/{ep.prefix_len}"}
                for ep in sorted(self._vip_endpoints(svc.id), key=lambda e: e.network_id)]
        docker_spec["UpdateConfig"] = update_config_view(spec.update_config)
        view = {"ID": svc.id, "Version": {"Index": svc.version}, "CreatedAt": svc.created, "UpdatedAt": svc.updated,
                "Spec": docker_spec, "Endpoint": {"Spec": docker_spec["EndpointSpec"], "Ports": ports,
                                                  "VirtualIPs": vips},
                "ServiceStatus": {"RunningTasks": running, "DesiredTasks": desired}}
        if svc.update_status is not None:
            u = svc.update_status
            view["UpdateStatus"] = {"State": u.state, "StartedAt": u.started, "Message": u.message,
                                    **({"CompletedAt": u.completed} if u.completed else {})}
        if svc.previous_spec is not None:
            view["PreviousSpec"] = {"Name": svc.previous_spec.name,
                                    "UpdateConfig": update_config_view(svc.previous_spec.update_config)}
        return view

    def task_view(self, t: Task) -> dict:
        node = self.state.get("nodes", t.node_id) if t.node_id else None
        attachments = []
        for e in self.state.kinds["endpoints"].values():
            ep = e.obj
            if ep.owner.kind == "netweft" and ep.owner.name == t.name[:64]:
                net: Network | None = self.state.get("networks", ep.network_id)
                if net is not None:
                    attachments.append({"Network": {"ID": net.id, "Spec": {"Name": net.name}},
                                        "Addresses": [f"{ep.ip}/{ep.prefix_len}"]})
        return {"ID": t.id, "Version": {"Index": 1}, "CreatedAt": t.created, "UpdatedAt": t.updated,
                "Name": t.name, "ServiceID": t.service_id, "Slot": t.slot or None, "NodeID": t.node_id,
                "Node": node.hostname if node else "",
                "Status": {"Timestamp": t.updated, "State": t.state, "Message": t.message, "Err": t.error,
                           "ContainerStatus": {"ContainerID": t.container_id, "ExitCode": t.exit_code}},
                "DesiredState": t.desired_state, "NetworksAttachments": attachments}

    def task_views(self, service: str | None = None) -> list[dict]:
        sid = self.service(service).id if service else None
        ts = [t for t in self.tasks() if sid is None or t.service_id == sid]
        ts.sort(key=lambda t: (t.service_name, t.slot, t.node_id, t.created, t.id))
        return [self.task_view(t) for t in ts]

    # ------------------------------------------------------------------ routes
    def routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/tasks/assigned")
        @allow(WORKER)
        async def assigned(request):
            return web.Response(body=self.assigned(request["node"]), content_type="application/json")

        @routes.post("/tasks/status")
        @allow(WORKER)
        async def status(request):
            await self.report(request["node"], await request.read())
            return web.json_response({})

        @routes.get("/admin/services")
        @allow(MANAGER)
        async def ls(request):
            return web.json_response([self.service_view(s) for s in
                                      sorted(self.services(), key=lambda s: s.spec.name)])

        @routes.post("/admin/services")
        @allow(MANAGER)
        async def create(request):
            return web.json_response(await self.create(await request.read()))

        @routes.get("/admin/services/{ref}")
        @allow(MANAGER)
        async def get(request):
            return web.json_response(self.service_view(self.service(request.match_info["ref"])))

        @routes.post("/admin/services/{ref}/update")
        @allow(MANAGER)
        async def update(request):
            return web.json_response(await self.update(request.match_info["ref"], await request.read()))

        @routes.post("/admin/services/{ref}/rollback")
        @allow(MANAGER)
        async def rollback(request):
            return web.json_response(await self.rollback(request.match_info["ref"]))

        @routes.delete("/admin/services/{ref}")
        @allow(MANAGER)
        async def rm(request):
            await self.remove(request.match_info["ref"])
            return web.json_response({})

        @routes.get("/admin/tasks")
        @allow(MANAGER)
        async def tasks(request):
            return web.json_response(self.task_views(request.query.get("service") or None))

        return routes

