"""The agent's side of services: the node's assigned tasks against its task containers, as a pure diff.

Each round (when the watch says its tasks or the services changed) the agent fetches its assignments (manager/services.py, GET /tasks/assigned) and looks at
the containers it runs for tasks; `plan` says what to do:
- a wanted task (desired running, not finished) without a container: start one;
- a container running for a task the manager does not yet know as running: report "running";
- a container that exited while its task was wanted: report "complete" (exit 0) or "failed" (the
  manager replaces it; the container goes once the task is shut down);
- a task the manager wants shut down: stop and remove its container, report "shutdown" if it ran;
- a container for a task the manager no longer lists: remove it.
The runner (daemon/tasks.py) carries the actions out through the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from netweft.model.services import FINISHED, ServiceSpec, Task, TaskStatus


class Assignment(msgspec.Struct, kw_only=True):
    task: Task
    name: str
    service: ServiceSpec | None = None
    ingress: str = ""                 # the ingress network it joins (its service publishes ports), or ""


class Published(msgspec.Struct, kw_only=True):
    """A port a service publishes: every host answers it (mode ingress) or hosts with a task (mode host)."""
    service: str
    protocol: str
    published: int
    target: int
    mode: str


class Assignments(msgspec.Struct, kw_only=True):
    """GET /tasks/assigned."""
    tasks: list[Assignment] = []
    published: list[Published] = []
    ingress: str = ""


@dataclass(frozen=True)
class LocalTask:
    """A container this host runs for a task."""
    task_id: str
    container: str                    # its name
    status: str                       # running | exited | created
    exit_code: int | None = None
    container_id: str = ""


@dataclass
class TaskActions:
    start: list[Assignment] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)           # container names (stopped first)
    report: list[TaskStatus] = field(default_factory=list)


def plan(assignments: list[Assignment], local: list[LocalTask], failed_starts: dict[str, str] | None = None
         ) -> TaskActions:
    """`failed_starts`: task id -> why its container could not be started (reported as "rejected")."""
    out = TaskActions()
    by_task = {lt.task_id: lt for lt in local}
    failed_starts = failed_starts or {}
    wanted = {a.task.id for a in assignments}
    for a in assignments:
        t = a.task
        lt = by_task.get(t.id)
        if t.desired_state == "shutdown" or a.service is None:
            if lt is not None:
                out.remove.append(lt.container)
                if t.state not in FINISHED:
                    out.report.append(TaskStatus(id=t.id, state="shutdown", message="stopped as asked",
                                                 exit_code=lt.exit_code, container_id=lt.container_id))
            elif t.state not in FINISHED:
                out.report.append(TaskStatus(id=t.id, state="shutdown", message="stopped as asked"))
            continue
        if t.state in FINISHED:
            continue   # the manager replaces it; the container goes when it is shut down
        if lt is None:
            if t.id in failed_starts:
                out.report.append(TaskStatus(id=t.id, state="rejected", error=failed_starts[t.id][:256]))
            else:
                out.start.append(a)
            continue
        if lt.status == "running":
            if t.state != "running":
                out.report.append(TaskStatus(id=t.id, state="running", message="started",
                                             container_id=lt.container_id))
        elif lt.status == "exited":
            code = lt.exit_code if lt.exit_code is not None else -1
            out.report.append(TaskStatus(id=t.id, state="complete" if code == 0 else "failed",
                                         message=f"task exited with code {code}", exit_code=code,
                                         container_id=lt.container_id, error="" if code == 0 else
                                         f"task: non-zero exit ({code})"))
    for lt in local:
        if lt.task_id not in wanted:
            out.remove.append(lt.container)
    return out
