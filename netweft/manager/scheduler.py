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
- a task of an older service version is replaced by a rolling update (`_roll`): `parallelism` tasks at a time,
  `delay` seconds between batches, stop-first or start-first, paused by a failed new task (or not);
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
from netweft.model.services import FINISHED, Service, Task, UpdateStatus

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
    services: list[Service] = field(default_factory=list)   # services whose update status changed
    wake: float | None = None                           # seconds until a delayed update batch is due

    def empty(self) -> bool:
        return not (self.create or self.update or self.delete or self.services)


def _live(t: Task) -> bool:
    return t.desired_state == "running" and t.state not in FINISHED


def schedule(services: list[Service], tasks: list[Task], nodes: list[Node], now: float,
             down_since: dict[str, float], new_id: Callable[[], str], stamp: str = "",
             grace: float = DOWN_GRACE, clock: float | None = None) -> Plan:
    """The plan that brings tasks to what the services want. `down_since`: node id -> when the manager
    first saw it Down. `new_id` makes task ids; `stamp` is the time written into changed tasks; `clock`
    the wall clock in seconds (update delays; `now` if not given)."""
    plan = Plan()
    clock = now if clock is None else clock
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
            """Whether a live task may go on; if not, it is stopped here. A task of an older version may go
            on: the rolling update (below) replaces it in its turn."""
            if t.node_id and node_lost(t.node_id):
                stop(t, "its node is down", orphan=True)
            elif t.node_id not in may_stay:
                stop(t, "its node is drained or no longer satisfies the constraints")
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

        def settle(ts: list[Task], extra: str) -> tuple[Task | None, Task | None]:
            """One group's live tasks (a slot's, or a global service's on one node) down to at most one of
            the current version and one older one; returns them (current, older)."""
            keep = [t for t in ts if _live(t) and check(t)]
            cur = [t for t in keep if t.spec_version == svc.version]
            old = [t for t in keep if t.spec_version != svc.version]
            for t in cur[1:] + old[1:]:
                stop(t, extra)
            if cur and old and (cur[0].state == "running" or svc.spec.update_config.order == "stop-first"):
                stop(old[0], "the service was updated")
                return cur[0], None
            return (cur[0] if cur else None), (old[0] if old else None)

        groups: dict[object, tuple[Task | None, Task | None]] = {}
        if svc.spec.mode == "replicated":
            slots: dict[int, list[Task]] = {}
            for t in mine:
                slots.setdefault(t.slot, []).append(t)
            for slot, ts in sorted(slots.items()):
                if slot > svc.spec.replicas or slot < 1:
                    for t in ts:
                        if _live(t):
                            stop(t, "the service was scaled down")
                    continue
                # One live task per slot: extras (a race of two managers) are shut down.
                groups[slot] = settle(ts, "another task holds this slot")
            rolled = _roll(svc, groups, mine, clock, stamp, plan, stop, lambda slot: place(slot) or bool(eligible))
            for slot in range(1, svc.spec.replicas + 1):
                ts = slots.get(slot, [])
                if not any(_live(changed.get(t.id, t)) for t in ts) and slot not in rolled:
                    place(slot)
        else:
            per_node: dict[str, list[Task]] = {}
            for t in mine:
                per_node.setdefault(t.node_id, []).append(t)
            for node_id, ts in sorted(per_node.items()):
                groups[node_id] = settle(ts, "another task runs on this node")
            ok = {n.id for n in eligible}
            rolled = _roll(svc, groups, mine, clock, stamp, plan, stop,
                           lambda node_id: node_id in ok and (place(0, by_node[node_id]) or True))
            for n in eligible:
                if not any(_live(changed.get(t.id, t)) for t in per_node.get(n.id, [])) and n.id not in rolled:
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


def _roll(svc: Service, groups: dict, mine: list[Task], clock: float, stamp: str, plan: Plan, stop,
          replace) -> set:
    """One round of the service's rolling update over its groups (slot or node -> (current task, older
    task)): which older tasks are replaced now, and the update's status. Returns the groups whose new task
    this round placed itself (start-first: beside the old one)."""
    cfg = svc.spec.update_config
    silent = svc.update_status is None      # never updated: nothing to report
    status = svc.update_status or UpdateStatus(state="updating")
    rollback = status.state.startswith("rollback")
    active = status.state in ("updating", "rollback_started")
    in_flight = [k for k, (cur, _) in groups.items() if cur is not None and cur.state != "running"]
    waiting = sorted((k for k, (cur, old) in groups.items() if cur is None and old is not None), key=str)
    out: set = set()

    def set_status(**fields) -> None:
        new = msgspec.structs.replace(status, **fields)
        if new != status and not silent:
            plan.services.append(msgspec.structs.replace(svc, update_status=new))

    if status.state in ("paused", "rollback_paused"):
        return out   # until the operator updates again (or rolls back)
    if active and not silent and cfg.failure_action == "pause":
        bad = next((t for t in mine if t.spec_version == svc.version and t.state in ("failed", "rejected")), None)
        if bad is not None:
            what = "rollback" if rollback else "update"
            set_status(state="rollback_paused" if rollback else "paused",
                       message=f"{what} paused due to failure or early termination of task {bad.id}")
            return out
    if not waiting:
        if not in_flight and active:
            set_status(state="rollback_completed" if rollback else "completed", completed=stamp,
                       message=f"{'rollback' if rollback else 'update'} completed", batch_done=0.0)
        return out
    budget = (cfg.parallelism or len(waiting)) - len(in_flight)
    if budget <= 0:
        return out
    if cfg.delay > 0:
        started = any(t.spec_version == svc.version for t in mine)   # a batch ran already
        if started and not in_flight:
            if status.batch_done <= 0:
                set_status(batch_done=clock)
                plan.wake = cfg.delay if plan.wake is None else min(plan.wake, cfg.delay)
                return out
            if clock < status.batch_done + cfg.delay:
                left = status.batch_done + cfg.delay - clock
                plan.wake = left if plan.wake is None else min(plan.wake, left)
                return out
        set_status(batch_done=0.0)
    for k in waiting[:budget]:
        _, old = groups[k]
        if cfg.order == "stop-first":
            stop(old, "the service was updated")
        elif replace(k):
            out.add(k)
    return out


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
