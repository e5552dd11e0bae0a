"""The scheduler: which tasks should exist, and where. Pure logic: the managers' state in, a plan out.

Level-triggered, like a Kubernetes controller: whatever happened before, each round compares the services
with their tasks and the nodes, and plans the difference:
- replicated: one live task per slot 1..replicas; extra slots are shut down; global: one live task per
  eligible node;
- a task's node must be eligible: ready, availability active (drain: its tasks move; pause: they stay
  but no new ones come), and the service's constraints hold (node.hostname, node.role, node.labels.K,
  with == or !=). A task on a node that is Down is replaced once the node has been Down for the grace
  period (its old task is marked orphaned), not before: a short network cut must not reshuffle a cluster;
- a task that exited (complete or failed, the restart policy being "any") is replaced, on any eligible node;
- a task of an older service version is replaced (all at once: no rolling-update parallelism yet);
- new tasks go where the service has the fewest live tasks, then where the fewest tasks run at all
  (spread), ties by node id;
- finished tasks are kept as history, HISTORY per slot (or per node), then deleted; tasks of a removed
  service are shut down and deleted once stopped (or once their node is gone).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from netweft.model.objects import Node
from netweft.model.services import FINISHED, Service, Task

HISTORY = 5                   # finished tasks kept per slot (Docker's task-history-retention-limit)
DOWN_GRACE = 5.0              # seconds a node may be Down before its tasks are placed elsewhere

_CONSTRAINT = re.compile(r"\A\s*node\.(hostname|role|id|labels\.([A-Za-z0-9_.\-/]{1,256}))\s*(==|!=)\s*(\S.*?)\s*\Z")


class ConstraintError(ValueError):
    pass


def parse_constraint(text: str) -> tuple[str, str | None, bool, str]:
    """(attribute, label key, equal?, value) of node.hostname==H, node.role!=R, node.labels.K==V."""
    m = _CONSTRAINT.match(text)
    if m is None:
        raise ConstraintError(f"invalid constraint {text[:80]!r}: expected node.hostname==NAME, node.role==manager"
                              "|worker, node.id==ID or node.labels.KEY==VALUE (or !=)")
    attr, key, op, value = m.group(1), m.group(2), m.group(3), m.group(4)
    if attr.startswith("labels."):
        attr = "labels"
    if attr == "role" and value not in ("manager", "worker"):
        raise ConstraintError(f"invalid constraint {text[:80]!r}: node.role is manager or worker")
    return attr, key, op == "==", value


def satisfies(node: Node, constraints: list[str]) -> bool:
    for c in constraints:
        attr, key, equal, value = parse_constraint(c)
        have = node.labels.get(key) if attr == "labels" else getattr(node, attr)
        if (have == value) != equal:
            return False
    return True


@dataclass
class Plan:
    create: list[Task] = field(default_factory=list)
    update: list[Task] = field(default_factory=list)    # changed copies of existing tasks
    delete: list[str] = field(default_factory=list)     # task ids

    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)


def _live(t: Task) -> bool:
    return t.desired_state == "running" and t.state not in FINISHED


def schedule(services: list[Service], tasks: list[Task], nodes: list[Node], now: float,
             down_since: dict[str, float], new_id: Callable[[], str], stamp: str = "",
             grace: float = DOWN_GRACE) -> Plan:
    """The plan that brings tasks to what the services want. `down_since`: node id -> when the manager
    first saw it Down. `new_id` makes task ids; `stamp` is the time written into changed tasks."""
    plan = Plan()
    by_node = {n.id: n for n in nodes}
    changed: dict[str, Task] = {}

    def change(t: Task, **fields) -> Task:
        new = msgspec.structs.replace(changed.get(t.id, t), updated=stamp, **fields)
        changed[t.id] = new
        return new

    # Load per node (live tasks of every service), for spreading.
    load = Counter(t.node_id for t in tasks if _live(t) and t.node_id)
    services_by_id = {s.id: s for s in services}

    def node_lost(node_id: str) -> bool:
        """The node is gone, or Down for longer than the grace period."""
        n = by_node.get(node_id)
        if n is None:
            return True
        return n.state == "down" and now - down_since.get(node_id, now) >= grace

    def stop(t: Task, reason: str, orphan: bool = False) -> None:
        if orphan:
            change(t, desired_state="shutdown", state="orphaned", message=reason)
        else:
            change(t, desired_state="shutdown", message=reason)
        if t.node_id and load[t.node_id] > 0:
            load[t.node_id] -= 1

    # Tasks of removed services: shut down, deleted once stopped or their node is lost.
    for t in tasks:
        if t.service_id in services_by_id:
            continue
        if t.state in FINISHED or not t.node_id or node_lost(t.node_id):
            plan.delete.append(t.id)
        elif t.desired_state != "shutdown":
            stop(t, "the service was removed")

    for svc in sorted(services, key=lambda s: s.id):
        mine = [t for t in tasks if t.service_id == svc.id]
        try:
            eligible = [n for n in nodes if n.state == "ready" and n.availability == "active"
                        and satisfies(n, svc.spec.constraints)]
            may_stay = {n.id for n in nodes if n.availability != "drain" and satisfies(n, svc.spec.constraints)}
        except ConstraintError:
            eligible, may_stay = [], set()
        for t in mine:   # exited with the task still wanted: kept as history, replaced below
            if t.desired_state == "running" and t.state in FINISHED:
                change(t, desired_state="shutdown", message=t.message or f"task exited ({t.state})")
        svc_load = Counter(t.node_id for t in mine if _live(t))

        def check(t: Task) -> bool:
            """Whether a live task may go on; if not, it is stopped here."""
            if t.node_id and node_lost(t.node_id):
                stop(t, "its node is down", orphan=True)
            elif t.node_id not in may_stay:
                stop(t, "its node is drained or no longer satisfies the constraints")
            elif t.spec_version != svc.version:
                stop(t, "the service was updated")
            else:
                return True
            svc_load[t.node_id] -= 1
            return False

        def place(slot: int, node: Node | None = None) -> None:
            if node is None:
                if not eligible:
                    return   # no suitable node: the task waits (pending) for one
                node = min(eligible, key=lambda n: (svc_load[n.id], load[n.id], n.id))
            t = Task(id=new_id(), service_id=svc.id, service_name=svc.spec.name, slot=slot, node_id=node.id,
                     spec_version=svc.version, state="assigned", created=stamp, updated=stamp)
            plan.create.append(t)
            svc_load[node.id] += 1
            load[node.id] += 1

        if svc.spec.mode == "replicated":
            slots: dict[int, list[Task]] = {}
            for t in mine:
                slots.setdefault(t.slot, []).append(t)
            for slot, ts in sorted(slots.items()):
                live = [t for t in ts if _live(t)]
                if slot > svc.spec.replicas or slot < 1:
                    for t in live:
                        stop(t, "the service was scaled down")
                    continue
                # One live task per slot: extras (a race of two managers) are shut down.
                keep = [t for t in live if check(t)]
                for t in keep[1:]:
                    stop(t, "another task holds this slot")
            for slot in range(1, svc.spec.replicas + 1):
                ts = slots.get(slot, [])
                if not any(_live(changed.get(t.id, t)) for t in ts):
                    place(slot)
        else:
            per_node: dict[str, list[Task]] = {}
            for t in mine:
                per_node.setdefault(t.node_id, []).append(t)
            for node_id, ts in per_node.items():
                keep = [t for t in ts if _live(t) and check(t)]
                for t in keep[1:]:
                    stop(t, "another task runs on this node")
            for n in eligible:
                if not any(_live(changed.get(t.id, t)) for t in per_node.get(n.id, [])):
                    place(0, n)

        # History: finished tasks beyond HISTORY per slot (per node for global) are deleted.
        groups: dict[object, list[Task]] = {}
        for t in mine:
            t2 = changed.get(t.id, t)
            if t2.desired_state == "shutdown" and t2.state in FINISHED:
                groups.setdefault(t.slot if svc.spec.mode == "replicated" else t.node_id, []).append(t2)
        for ts in groups.values():
            ts.sort(key=lambda t: (t.updated, t.id), reverse=True)
            for t in ts[HISTORY:]:
                plan.delete.append(t.id)
                changed.pop(t.id, None)

    deleted = set(plan.delete)
    plan.update = [t for t in changed.values() if t.id not in deleted]
    return plan


def service_running(svc: Service, tasks: list[Task], nodes: list[Node]) -> tuple[int, int]:
    """(running, desired) for `service ls` and progress: tasks running of the current version, and how many
    are wanted (replicated: replicas; global: one per eligible node)."""
    current = [t for t in tasks if t.service_id == svc.id and t.desired_state == "running"]
    running = sum(1 for t in current if t.state == "running" and t.spec_version == svc.version)
    if svc.spec.mode == "replicated":
        return running, svc.spec.replicas
    try:
        return running, sum(1 for n in nodes if n.state == "ready" and n.availability == "active"
                            and satisfies(n, svc.spec.constraints))
    except ConstraintError:
        return running, 0
