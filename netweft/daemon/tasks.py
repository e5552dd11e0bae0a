"""Service tasks on this host: the agent's plan (agent/services.py) carried out with the engine, and the
local API's service commands (forwarded to the leader like the other administrative calls).

While the host is in a swarm, the runner looks at its assignments and compares them with its task
containers (netweft containers labelled with their task's ID), then starts, removes and reports. It does
so when the watch says something changed (model/watch.py: this node's tasks and every service come as
events; the overlay agent hands them to `observe`), at each (re)connection of the watch, right after a
round that changed something (to report what it started), and every RESYNC seconds (level-triggered:
whatever was missed). A task container is named after its task (SERVICE.SLOT.ID, cut at 64 characters),
is on the service's networks with the aliases `tasks.SERVICE` (and SERVICE itself with --endpoint-mode
dnsrr), and is removed as soon as it exits, so its name leaves DNS at once; the manager starts a
replacement.
"""
from __future__ import annotations

import asyncio
import logging

from netweft.http import web

from netweft.agent.services import Assignment, Assignments, LocalTask, plan
from netweft.daemon.mesh import SANDBOX, RoutingMesh
from netweft.errors import NetweftError, NotFound
from netweft.model.codec import convert, to_builtins
from netweft.model.watch import NetworkEvent, ServiceEvent, TaskEvent

log = logging.getLogger("netweft.tasks")

RESYNC = 10.0                      # seconds between looks at the assignments when the watch said nothing
EXIT_POLL = 0.1                    # seconds between looks at the task containers (on this host)
DRAIN = 0.5                        # seconds between a stopping task leaving the VIPs and its stop
TASK_LABEL = "com.docker.swarm.task.id"
SERVICE_LABEL = "com.docker.swarm.service.name"


def container_name(a: Assignment) -> str:
    return a.name[:64]


def aliases(a: Assignment) -> list[str]:
    name = a.service.name
    return [name, f"tasks.{name}"] if a.service.endpoint_mode == "dnsrr" else [f"tasks.{name}"]


class TaskRunner:
    def __init__(self, engine):
        self.engine = engine
        self._task: asyncio.Task | None = None
        self.failed: dict[str, str] = {}      # task id -> why it could not start
        self.mesh = RoutingMesh(engine)
        self._in_swarm: bool | None = None
        self._logged: set[str] = set()
        self._due = True                  # a round is wanted (the watch said so, or the last one acted)
        self._wake = asyncio.Event()
        self._observed = None             # the overlay agent whose watch we observe
        self.rounds = 0                   # rounds run (tests and benchmarks look)
        self._known: set[str] | None = None   # task container ids: the last scan's, and those started since

    def observe(self, ev) -> None:
        """An event of the watch (None: the stream (re)connected): a round at once if it may concern us."""
        if ev is None or isinstance(ev, (TaskEvent, ServiceEvent)) or (
                isinstance(ev, NetworkEvent) and ev.object.ingress):
            self._due = True
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def local(self, scan: bool = True) -> list[LocalTask]:
        """This host's task containers. `scan`: found among every container (the rounds, leaving); else those
        the last scan found or this runner started since (the exit poll, ten times a second, must not read
        thousands of containers' documents)."""
        if scan or self._known is None:
            ctrs = self.engine.store.containing("containers", f'"{TASK_LABEL}"')   # a pre-filter in SQLite
        else:
            ctrs = [c for i in self._known if (c := self.engine.store.get("containers", i)) is not None]
        out = []
        self._known = set()
        for ctr in ctrs:
            task_id = (ctr["Config"].get("Labels") or {}).get(TASK_LABEL)
            if not task_id:
                continue
            self._known.add(ctr["Id"])
            state = self.engine.container_view(ctr)["State"]
            out.append(LocalTask(task_id=task_id, container=ctr["Name"], status=state["Status"],
                                 exit_code=state["ExitCode"] if state["Status"] == "exited" else None,
                                 container_id=ctr["Id"]))
        return out

    async def _loop(self) -> None:
        last = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(EXIT_POLL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            agent = self.engine.overlay_agent
            if agent is not None and agent is not self._observed:
                agent.observers.append(self.observe)
                self._observed, self._due = agent, True
            if agent is None:
                if self._in_swarm is not False:   # at start, or it just left: once, not every tick
                    self._in_swarm = False
                    try:
                        await self.leave()
                    except Exception:
                        log.exception("service tasks: removing the task containers of a left swarm failed")
                continue
            self._in_swarm = True
            try:
                if self._due or loop.time() - last >= RESYNC:
                    self._due = False
                    last = loop.time()
                    self.rounds += 1
                    if await self.round(agent.client):
                        self._due = True    # report what it started (or retry) in the next round
                else:
                    await self.reap(agent.client)
            except asyncio.CancelledError:
                raise
            except NetweftError as e:
                self._due = True   # retried at the next tick... after a pause: no manager, no hurry
                await asyncio.sleep(1.0)
                if str(e) not in self._logged:   # e.g. no manager reachable: once, not every round
                    self._logged.add(str(e))
                    log.warning("service tasks: cannot reach the managers; tasks keep running",
                                extra={"reason": str(e)})
            except Exception:
                log.exception("service tasks: a round failed")

    async def leave(self) -> None:
        """Out of the swarm (it left, or never joined): no task container and no ingress sandbox stays."""
        names = [lt.container for lt in self.local()]
        if self.mesh._sandbox() is not None:
            names.append(SANDBOX)
        for name in names:
            try:
                await self.engine.remove_container(name, force=True)
                log.info("removed a container of the swarm this host left", extra={"container": name})
            except NotFound:
                pass
            except NetweftError as e:
                log.warning("cannot remove a task container", extra={"container": name, "reason": str(e)})
        if names:
            self.mesh.host_applied = self.mesh.sbox_applied = None

    async def reap(self, client) -> None:
        """Between rounds: a task container that exited is removed at once (its addresses leave DNS and
        every VIP as its endpoints go) and its exit reported; the manager then replaces the task."""
        exited = [lt for lt in self.local(scan=False) if lt.status == "exited"]
        if not exited:
            return
        report = []
        for lt in exited:
            code = lt.exit_code if lt.exit_code is not None else -1
            report.append({"id": lt.task_id, "state": "complete" if code == 0 else "failed", "exit_code": code,
                           "message": f"task exited with code {code}", "container_id": lt.container_id,
                           "error": "" if code == 0 else f"task: non-zero exit ({code})"})
            try:
                await self.engine.remove_container(lt.container, force=True)
            except NetweftError as e:
                log.warning("service tasks: cannot remove a task container", extra={"container": lt.container,
                                                                                    "reason": str(e)})
        await client.call("POST", "/tasks/status", report)

    async def round(self, client) -> bool:
        """One look at the assignments; True if it started or removed a container."""
        got = convert(await client.call("GET", "/tasks/assigned"), Assignments, "task assignments")
        assignments = got.tasks
        self._logged.clear()
        local = self.local()
        wanted = {a.task.id for a in assignments}
        self.failed = {k: v for k, v in self.failed.items() if k in wanted}
        actions = plan(assignments, local, self.failed)
        exited = [lt for lt in local if lt.status == "exited" and lt.task_id in wanted]
        report = list(actions.report)
        running = {lt.container for lt in local if lt.status == "running"}
        await self._drain([n for n in dict.fromkeys(actions.remove) if n in running])
        for name in dict.fromkeys(actions.remove + [lt.container for lt in exited]):
            try:
                await self.engine.remove_container(name, force=True)
            except NotFound:
                pass
            except NetweftError as e:
                log.warning("service tasks: cannot remove a task container", extra={"container": name,
                                                                                    "reason": str(e)})
        for a in actions.start:
            try:
                await self._start(a)
            except NetweftError as e:
                self.failed[a.task.id] = str(e)
                log.warning("service tasks: cannot start a task", extra={"task": a.name, "reason": str(e)})
        if report:
            await client.call("POST", "/tasks/status", [to_builtins(s) for s in report])
        await self.mesh.sync(got)
        return bool(actions.start or actions.remove or exited)

    async def _drain(self, names: list[str]) -> None:
        """Running task containers about to be stopped leave their networks first, and DRAIN seconds pass:
        their addresses go from every host's VIP maps and DNS (through the watch) before they stop
        answering, so a rolling update or a scale-down refuses no new connection."""
        left = False
        for name in names:
            try:
                ctr = self.engine.container(name)
                for ep in self.engine.endpoints_of(ctr["Id"]):
                    await self.engine.disconnect(ep.network_id, ctr["Id"])
                    left = True
            except NetweftError as e:   # it is removed anyway
                log.info("service tasks: a task container could not leave its networks before it stops",
                         extra={"container": name, "reason": str(e)})
        if left:
            await asyncio.sleep(DRAIN)

    async def _start(self, a: Assignment) -> None:
        spec = a.service
        nets = list(spec.networks) + ([a.ingress] if a.ingress else [])
        # A leftover container of this task (a crash between create and start): replaced.
        for lt in self.local():
            if lt.task_id == a.task.id:
                await self.engine.remove_container(lt.container, force=True)
        req = {"Name": container_name(a), "Cmd": list(spec.command), "Env": dict(spec.env),
               "NetworkMode": nets[0] if nets else "none", "Aliases": aliases(a) if nets else [],
               "Labels": {TASK_LABEL: a.task.id, SERVICE_LABEL: spec.name}}
        view = await self.engine.create_container(req, start=False)
        if self._known is not None:
            self._known.add(view["Id"])   # the exit poll looks at it from now on
        try:
            for net in nets[1:]:
                await self.engine.connect(net, view["Id"], aliases=aliases(a))
            await self.engine.start_container(view["Id"])
        except BaseException:
            await self.engine.remove_container(view["Id"], force=True)
            raise
        log.info("task started", extra={"task": a.name, "container": view["Id"][:12]})


# ---------------------------------------------------------------------- the local API
def routes(daemon) -> web.RouteTableDef:
    """Service commands of the local API: forwarded to the leader (swarm.admin), as `network create -d overlay`."""
    r = web.RouteTableDef()
    swarm = daemon.swarm

    def svc():
        return swarm.manager.services

    async def admin(method, path, body=None, local=None):
        value = swarm.admin(method, path, body, local=local)
        while asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        return value

    @r.get("/services")
    async def ls(request):
        return web.json_response(await admin("GET", "/services", local=lambda: [
            svc().service_view(s) for s in sorted(svc().services(), key=lambda s: s.spec.name)]))

    @r.post("/services/create")
    async def create(request):
        body = await request.read()
        return web.json_response(await admin("POST", "/services", _json(body), local=lambda: svc().create(body)))

    @r.get("/services/{ref}")
    async def inspect(request):
        ref = request.match_info["ref"]
        return web.json_response(await admin("GET", f"/services/{_q(ref)}",
                                             local=lambda: svc().service_view(svc().service(ref))))

    @r.post("/services/{ref}/update")
    async def update(request):
        ref, body = request.match_info["ref"], await request.read()
        return web.json_response(await admin("POST", f"/services/{_q(ref)}/update", _json(body),
                                             local=lambda: svc().update(ref, body)))

    @r.post("/services/{ref}/rollback")
    async def rollback(request):
        ref = request.match_info["ref"]
        return web.json_response(await admin("POST", f"/services/{_q(ref)}/rollback", {},
                                             local=lambda: svc().rollback(ref)))

    @r.delete("/services/{ref}")
    async def rm(request):
        ref = request.match_info["ref"]
        await admin("DELETE", f"/services/{_q(ref)}", local=lambda: svc().remove(ref))
        return web.json_response({})

    @r.get("/tasks")
    async def tasks(request):
        service = request.query.get("service") or None
        path = "/tasks" + (f"?service={_q(service)}" if service else "")
        return web.json_response(await admin("GET", path, local=lambda: svc().task_views(service)))

    return r


def _q(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="")


def _json(body: bytes):
    import json
    try:
        return json.loads(body or b"{}")
    except ValueError:
        from netweft.errors import InvalidRequest
        raise InvalidRequest("the request body is not JSON") from None
