"""Services and their tasks (swarmkit's words): what the managers store and the scheduler decides over.

A Service is the operator's wish (a command, how many copies or one per node, networks, published
ports, where it may run); a Task is one copy of it on one node, with a slot (replicated: 1..replicas;
global: one per node) and the state its node reports. The managers create, place and remove tasks; the
node's agent runs its tasks as containers and reports their state. Docker-shaped JSON is made from
these at the API edge (Services.service_view and task_view in manager/services.py). A service's VIPs
are Endpoints owned by it (Owner kind "service"), stored and watched like every endpoint.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from netweft.model.objects import Labels, Name, ObjectID, ShortText

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Command = Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(min_length=1, max_length=256)]
Constraint = Annotated[str, msgspec.Meta(max_length=512)]

TASK_STATES = ("new", "pending", "assigned", "starting", "running", "complete", "failed", "shutdown", "rejected",
               "orphaned")
TaskState = Literal["new", "pending", "assigned", "starting", "running", "complete", "failed", "shutdown",
                    "rejected", "orphaned"]
# A task in one of these has stopped for good: the scheduler replaces it (if still wanted).
FINISHED = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned"})


class PortConfig(msgspec.Struct, frozen=True, kw_only=True):
    """--publish published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]"""
    target: Port
    published: Port | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    mode: Literal["ingress", "host"] = "ingress"


class UpdateConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How an update replaces the tasks (Docker's --update-*): `parallelism` tasks at a time (0: all at
    once), `delay` seconds between batches, the new task started before the old one stops (start-first)
    or after (stop-first), and what a failed new task does to the update (pause it, or continue)."""
    parallelism: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 1
    delay: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 0.0
    order: Literal["stop-first", "start-first"] = "stop-first"
    failure_action: Literal["pause", "continue"] = "pause"


class UpdateStatus(msgspec.Struct, kw_only=True):
    """Where the service's last update (or rollback) stands (Docker's UpdateStatus)."""
    state: Literal["updating", "paused", "completed", "rollback_started", "rollback_paused",
                   "rollback_completed"] = "updating"
    started: ShortText = ""
    completed: ShortText = ""
    message: ShortText = ""
    batch_done: float = 0.0        # wall clock (s) when the last batch finished running; 0 while one runs


class ServiceSpec(msgspec.Struct, kw_only=True):
    name: Name
    command: Command
    env: Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=256)],
                        Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(max_length=256)] = {}
    mode: Literal["replicated", "global"] = "replicated"
    replicas: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 1
    networks: Annotated[list[ObjectID], msgspec.Meta(max_length=16)] = []
    ports: Annotated[list[PortConfig], msgspec.Meta(max_length=64)] = []
    endpoint_mode: Literal["vip", "dnsrr"] = "vip"
    constraints: Annotated[list[Constraint], msgspec.Meta(max_length=32)] = []
    labels: Labels = {}
    update_config: UpdateConfig = UpdateConfig()


class Service(msgspec.Struct, kw_only=True):
    id: ObjectID
    spec: ServiceSpec
    version: Annotated[int, msgspec.Meta(ge=1)] = 1   # moves on each update
    created: ShortText = ""
    updated: ShortText = ""
    update_status: UpdateStatus | None = None
    previous_spec: ServiceSpec | None = None          # what `service rollback` returns to


class Task(msgspec.Struct, kw_only=True):
    id: ObjectID
    service_id: ObjectID
    service_name: Name
    slot: Annotated[int, msgspec.Meta(ge=0)] = 0      # replicated: 1..replicas; global: 0 (node_id says where)
    node_id: ShortText = ""                            # "" until assigned
    spec_version: Annotated[int, msgspec.Meta(ge=1)] = 1
    desired_state: Literal["running", "shutdown"] = "running"
    state: TaskState = "new"
    message: ShortText = ""
    error: ShortText = ""
    exit_code: int | None = None
    container_id: ShortText = ""
    created: ShortText = ""
    updated: ShortText = ""

    @property
    def name(self) -> str:
        """Docker's task name: SERVICE.SLOT.ID (global: SERVICE.NODE.ID)."""
        return f"{self.service_name}.{self.slot if self.slot else self.node_id}.{self.id}"


class TaskStatus(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an agent reports of one of its tasks (POST /tasks/status)."""
    id: Annotated[str, msgspec.Meta(pattern=r"\A[a-z0-9]{1,64}\Z")]
    state: TaskState
    message: Annotated[str, msgspec.Meta(max_length=256)] = ""
    error: Annotated[str, msgspec.Meta(max_length=256)] = ""
    exit_code: int | None = None
    container_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
