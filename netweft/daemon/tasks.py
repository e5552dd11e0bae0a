"""Service tasks on this host: the agent's plan (agent/services.py) carried out with the engine, and the
local API's service commands (forwarded to the leader like the other administrative calls).

Every POLL seconds, while the host is in a swarm, the runner fetches its assignments, compares them
with its task containers (netweft containers labelled with their task's ID) and starts, removes and
reports. A task container is named after its task (SERVICE.SLOT.ID, cut at 64 characters), is on the
service's networks with the aliases `tasks.SERVICE` (and SERVICE itself with --endpoint-mode dnsrr),
and is removed as soon as it exits, so its name leaves DNS at once; the manager starts a replacement.
"""
from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from netweft.agent.services import Assignment, Assignments, LocalTask, plan
from netweft.daemon.mesh import SANDBOX, RoutingMesh
from netweft.errors import NetweftError, NotFound
from netweft.model.codec import convert, to_builtins

log = logging.getLogger("netweft.tasks")

POLL = 0.3                         # seconds between looks at the assignments (at the managers)
EXIT_POLL = 0.1                    # seconds between looks at the task containers (on this host)
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

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def local(self) -> list[LocalTask]:
        out = []
        for ctr in self.engine.store.containing("containers", f'"{TASK_LABEL}"'):   # polled: not every container
            task_id = (ctr["Config"].get("Labels") or {}).get(TASK_LABEL)
            if not task_id:
                continue
            state = self.engine.container_view(ctr)["State"]
            out.append(LocalTask(task_id=task_id, container=ctr["Name"], status=state["Status"],
                                 exit_code=state["ExitCode"] if state["Status"] == "exited" else None,
                                 container_id=ctr["Id"]))
        return out

    async def _loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(EXIT_POLL)
            agent = self.engine.overlay_agent
            if agent is None:
                if self._in_swarm is not False:   # at start, or it just left: once, not every tick
                    self._in_swarm = False
                    try:
                        await self.leave()
                    except Exception:
                        log.exception("service tasks: removing the task containers of a left swarm failed")
                continue
            self._in_swarm = True
            tick += 1
            try:
                if tick % round(POLL / EXIT_POLL):
                    await self.reap(agent.client)
                else:
                    await self.round(agent.client)
            except asyncio.CancelledError:
                raise
            except NetweftError as e:
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
        exited = [lt for lt in self.local() if lt.status == "exited"]
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

    async def round(self, client) -> None:
        got = convert(await client.call("GET", "/tasks/assigned"), Assignments, "task assignments")
        assignments = got.tasks
        self._logged.clear()
        local = self.local()
        wanted = {a.task.id for a in assignments}
        self.failed = {k: v for k, v in self.failed.items() if k in wanted}
        actions = plan(assignments, local, self.failed)
        exited = [lt for lt in local if lt.status == "exited" and lt.task_id in wanted]
        report = list(actions.report)
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

    @r.get("/services/{ref}/logs")
    async def logs(request):
        """The logs of the service's tasks that run on this host, each line prefixed with its task."""
        ref = request.match_info["ref"]
        views = await admin("GET", f"/tasks?service={_q(ref)}", local=lambda: svc().task_views(ref))
        out, elsewhere = [], []
        for v in views:
            ctr = daemon.engine.store.find("containers", v["Name"][:64])
            if ctr is None:
                if v["DesiredState"] == "running" and v["Node"]:
                    elsewhere.append(f"{v['Name']}@{v['Node']}")
                continue
            try:
                with open(ctr["LogPath"], "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            out += [f"{v['Name']}@{v['Node']}    | {line}" for line in text.splitlines()]
        return web.json_response({"Lines": out, "Elsewhere": elsewhere})

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
