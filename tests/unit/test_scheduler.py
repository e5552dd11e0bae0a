"""The scheduler as pure logic: spread, constraints, global mode, restarts, drain, Down past the grace period,
scale, update, removal, history."""
from __future__ import annotations

import itertools
from collections import Counter

import msgspec
import pytest

from netweft.manager.scheduler import HISTORY, ConstraintError, parse_constraint, schedule, service_running
from netweft.model.objects import Node
from netweft.model.services import Service, ServiceSpec, Task

ids = (f"t{i}" for i in itertools.count())


def new_id() -> str:
    return next(ids)


def nodes(n=3, **over) -> list[Node]:
    out = []
    for i in range(1, n + 1):
        kw = {"id": f"n{i}", "hostname": f"h{i}", "role": "manager" if i == 1 else "worker",
              "addr": f"192.0.2.{10 + i}"}
        kw.update(over.get(f"n{i}", {}))
        out.append(Node(**kw))
    return out


def svc(name="web", replicas=3, **spec) -> Service:
    return Service(id=f"s-{name}", spec=ServiceSpec(name=name, command=["sleep", "1"], replicas=replicas, **spec))


def converge(services, ns, tasks=None, now=100.0, down=None, rounds=3, run=True) -> list[Task]:
    """Apply plans (and let agents start what is assigned) until nothing changes."""
    tasks = {t.id: t for t in tasks or []}
    for _ in range(rounds):
        plan = schedule(services, list(tasks.values()), ns, now, down or {}, new_id)
        for t in plan.create + plan.update:
            tasks[t.id] = t
        for i in plan.delete:
            tasks.pop(i, None)
        if run:   # the agents: start what is assigned, stop what should stop
            for t in list(tasks.values()):
                if t.desired_state == "running" and t.state == "assigned":
                    tasks[t.id] = msgspec.structs.replace(t, state="running")
                elif t.desired_state == "shutdown" and t.state == "running":
                    tasks[t.id] = msgspec.structs.replace(t, state="shutdown")
    return list(tasks.values())


def live(tasks):
    return [t for t in tasks if t.desired_state == "running"]


def test_replicas_spread_one_per_node_and_slots_are_1_to_n():
    tasks = converge([svc(replicas=3)], nodes(3))
    assert sorted(t.slot for t in live(tasks)) == [1, 2, 3]
    assert sorted(t.node_id for t in live(tasks)) == ["n1", "n2", "n3"]
    tasks = converge([svc(replicas=7)], nodes(3), tasks)
    assert sorted(Counter(t.node_id for t in live(tasks)).values()) == [2, 2, 3]
    assert all(t.name.startswith(f"web.{t.slot}.") for t in tasks)


def test_spread_accounts_for_other_services_load():
    a = converge([svc("a", replicas=2)], nodes(3))
    both = converge([svc("a", replicas=2), svc("b", replicas=1)], nodes(3), a)
    b = [t for t in live(both) if t.service_name == "b"]
    assert b[0].node_id not in {t.node_id for t in live(a)}


@pytest.mark.parametrize("constraint,where", [
    ("node.hostname==h2", {"n2"}), ("node.hostname!=h2", {"n1", "n3"}),
    ("node.role==manager", {"n1"}), ("node.role==worker", {"n2", "n3"}),
    ("node.labels.zone==b", {"n3"}), ("node.labels.zone!=b", {"n1", "n2"}),
])
def test_constraints(constraint, where):
    ns = nodes(3, n3={"labels": {"zone": "b"}})
    tasks = converge([svc(replicas=4, constraints=[constraint])], ns)
    assert {t.node_id for t in live(tasks)} == where and len(live(tasks)) == 4


def test_a_bad_constraint_is_refused_in_one_line():
    for bad in ("hostname==h1", "node.role==king", "node.hostname=h1", "node.labels.==x"):
        with pytest.raises(ConstraintError, match="invalid constraint"):
            parse_constraint(bad)


def test_global_runs_one_task_per_eligible_node_and_follows_nodes():
    ns = nodes(3, n2={"availability": "pause"})
    tasks = converge([svc(mode="global")], ns)
    assert sorted(t.node_id for t in live(tasks)) == ["n1", "n3"]
    assert all(t.slot == 0 for t in tasks)
    ns = nodes(4)
    tasks = converge([svc(mode="global")], ns, tasks)
    assert sorted(t.node_id for t in live(tasks)) == ["n1", "n2", "n3", "n4"]
    tasks = converge([svc(mode="global")], nodes(4, n4={"availability": "drain"}), tasks)
    assert sorted(t.node_id for t in live(tasks)) == ["n1", "n2", "n3"]


def test_an_exited_task_is_replaced_and_kept_as_history():
    s = svc(replicas=1)
    tasks = converge([s], nodes(2))
    first = live(tasks)[0]
    tasks = [msgspec.structs.replace(first, state="failed", exit_code=1)]
    tasks = converge([s], nodes(2), tasks)
    assert len(live(tasks)) == 1 and live(tasks)[0].id != first.id and live(tasks)[0].slot == 1
    old = next(t for t in tasks if t.id == first.id)
    assert old.desired_state == "shutdown" and old.state == "failed"


def test_history_is_bounded_per_slot():
    s = svc(replicas=1)
    tasks = converge([s], nodes(1))
    for i in range(HISTORY + 3):
        cur = live(tasks)[0]
        tasks = [t if t.id != cur.id else msgspec.structs.replace(t, state="failed", updated=f"{i:04d}")
                 for t in tasks]
        tasks = converge([s], nodes(1), tasks)
    assert len([t for t in tasks if t.desired_state == "shutdown"]) == HISTORY
    assert len(live(tasks)) == 1


def test_drain_moves_tasks_pause_keeps_them():
    s = svc(replicas=3)
    tasks = converge([s], nodes(3))
    on2 = {t.id for t in live(tasks) if t.node_id == "n2"}
    paused = converge([s], nodes(3, n2={"availability": "pause"}), tasks)
    assert {t.id for t in live(paused) if t.node_id == "n2"} == on2
    drained = converge([s], nodes(3, n2={"availability": "drain"}), tasks)
    assert not [t for t in live(drained) if t.node_id == "n2"] and len(live(drained)) == 3
    assert all(next(t for t in drained if t.id == i).desired_state == "shutdown" for i in on2)


def test_a_down_node_keeps_its_tasks_until_the_grace_period_then_they_move():
    s = svc(replicas=3)
    tasks = converge([s], nodes(3))
    down = nodes(3, n3={"state": "down"})
    early = converge([s], down, tasks, now=102.0, down={"n3": 100.0}, run=False)
    assert any(t.node_id == "n3" for t in live(early))
    late = converge([s], down, tasks, now=106.0, down={"n3": 100.0})
    assert not any(t.node_id == "n3" for t in live(late)) and len(live(late)) == 3
    assert any(t.state == "orphaned" and t.node_id == "n3" for t in late)


def test_scale_down_and_update_and_removal():
    s = svc(replicas=3)
    tasks = converge([s], nodes(3))
    s1 = msgspec.structs.replace(s, spec=msgspec.structs.replace(s.spec, replicas=1))
    tasks = converge([s1], nodes(3), tasks)
    assert [t.slot for t in live(tasks)] == [1]
    s2 = msgspec.structs.replace(s1, version=2)
    old = live(tasks)[0]
    tasks = converge([s2], nodes(3), tasks)
    assert live(tasks)[0].id != old.id and live(tasks)[0].spec_version == 2
    assert service_running(s2, tasks, nodes(3)) == (1, 1)
    assert service_running(svc(mode="global"), [], nodes(3, n2={"availability": "drain"})) == (0, 2)
    tasks = converge([], nodes(3), tasks)
    assert tasks == []


def test_no_eligible_node_places_nothing():
    tasks = converge([svc(replicas=2, constraints=["node.hostname==nowhere"])], nodes(2))
    assert tasks == []
