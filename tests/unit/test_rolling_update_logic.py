"""Rolling updates as pure scheduling logic: batches of --update-parallelism, --update-delay between them,
stop-first and start-first, a failed new task pausing the update (or not), completion, rollback's states."""
from __future__ import annotations

import itertools

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from netweft.manager.scheduler import schedule
from netweft.model.objects import Node
from netweft.model.services import FINISHED, Service, ServiceSpec, Task, UpdateConfig, UpdateStatus

NODES = [Node(id=f"n{i}", hostname=f"h{i}", role="worker", addr=f"192.0.2.{10 + i}") for i in range(1, 4)]


class Cluster:
    """The scheduler's inputs, and agents that start and stop what they are told (one step per round)."""

    def __init__(self, replicas=4, mode="replicated", **cfg):
        self._ids = (f"t{i}" for i in itertools.count())
        spec = ServiceSpec(name="web", command=["sleep", "1"], replicas=replicas, mode=mode,
                           update_config=UpdateConfig(**cfg))
        self.svc = Service(id="s1", spec=spec)
        self.tasks: dict[str, Task] = {}
        self.clock = 1000.0
        self.wakes: list[float | None] = []
        self.settle()

    def round(self) -> None:
        p = schedule([self.svc], list(self.tasks.values()), NODES, 0.0, {}, lambda: next(self._ids),
                     stamp=f"{self.clock:012.3f}", clock=self.clock)
        for t in p.create + p.update:
            self.tasks[t.id] = t
        for i in p.delete:
            self.tasks.pop(i, None)
        for s in p.services:
            self.svc = s
        self.wakes.append(p.wake)

    def agents(self, fail: set[int] = frozenset()) -> None:
        """Start what is assigned (tasks of a version in `fail` fail instead); stop what should stop."""
        for t in list(self.tasks.values()):
            if t.desired_state == "running" and t.state == "assigned":
                self.tasks[t.id] = msgspec.structs.replace(t, state="failed" if t.spec_version in fail else "running")
            elif t.desired_state == "shutdown" and t.state not in FINISHED:
                self.tasks[t.id] = msgspec.structs.replace(t, state="shutdown")

    def settle(self, rounds=30) -> None:
        for _ in range(rounds):
            self.round()
            self.agents()

    def update(self, **cfg) -> None:
        spec = self.svc.spec
        if cfg:
            spec = msgspec.structs.replace(spec, update_config=msgspec.structs.replace(spec.update_config, **cfg))
        self.svc = msgspec.structs.replace(self.svc, spec=msgspec.structs.replace(spec, env={"V": str(self.svc.version)}),
                                           version=self.svc.version + 1, previous_spec=self.svc.spec,
                                           update_status=UpdateStatus(state="updating", started="x"))

    def live(self, version=None) -> list[Task]:
        return [t for t in self.tasks.values() if t.desired_state == "running" and t.state not in FINISHED
                and (version is None or t.spec_version == version)]


def test_stop_first_replaces_one_task_per_batch_and_completes():
    c = Cluster(replicas=4)
    c.update()
    seen = []
    for _ in range(12):
        c.round()
        new = [t for t in c.live(2)]
        old = [t for t in c.live(1)]
        seen.append((len(old), len(new)))
        # Never more than one slot in flight: parallelism 1, stop-first (4 live at most, 3 at least).
        assert len(old) + len(new) in (3, 4)
        assert sum(1 for t in new if t.state != "running") <= 1
        c.agents()
    assert c.svc.update_status.state == "completed" and c.svc.update_status.completed
    assert len(c.live(2)) == 4 and not c.live(1)
    assert (3, 1) in seen and (1, 3) in seen   # it went a batch at a time


def test_parallelism_two_and_zero():
    c = Cluster(replicas=4, parallelism=2)
    c.update()
    c.round()
    assert len(c.live(1)) == 2 and len(c.live(2)) == 2
    c.settle()
    assert c.svc.update_status.state == "completed"
    c.update(parallelism=0)   # all at once
    c.round()
    assert not c.live(2) and len(c.live(3)) == 4


def test_start_first_starts_the_new_task_before_the_old_one_stops():
    c = Cluster(replicas=3, order="start-first")
    c.update()
    c.round()
    assert len(c.live(1)) == 3 and len(c.live(2)) == 1      # the new one beside the old ones
    c.agents()
    c.round()                                             # the new one runs: its old one stops, next batch
    assert len(c.live(1)) == 2 and len(c.live(2)) == 2
    for _ in range(10):
        assert len(c.live()) >= 3                         # never fewer tasks than replicas
        c.agents()
        c.round()
    assert len(c.live(2)) == 3 and not c.live(1) and c.svc.update_status.state == "completed"


def test_delay_between_batches():
    c = Cluster(replicas=3, delay=10.0)
    c.update()
    c.round()
    c.agents()
    c.round()                                             # the first batch runs: the delay starts
    assert len(c.live(2)) == 1 and c.svc.update_status.batch_done == c.clock and c.wakes[-1] == 10.0
    c.clock += 4
    c.round()
    c.agents()
    assert len(c.live(2)) == 1 and 5.9 < c.wakes[-1] < 6.1   # still waiting
    c.clock += 6
    c.round()
    assert len(c.live(2)) == 2 and c.svc.update_status.batch_done == 0


def test_a_failed_new_task_pauses_the_update_and_old_tasks_keep_running():
    c = Cluster(replicas=3)
    c.update()
    c.round()
    c.agents(fail={2})
    for _ in range(5):
        c.round()
        c.agents(fail={2})
    u = c.svc.update_status
    assert u.state == "paused" and "update paused due to failure or early termination of task" in u.message
    assert len(c.live(1)) == 2       # no further batch


def test_failure_action_continue_goes_on():
    c = Cluster(replicas=3, failure_action="continue")
    c.update()
    for _ in range(10):
        c.round()
        c.agents(fail={2})
    assert not c.live(1) and c.svc.update_status.state == "completed"   # every slot moved on to version 2


def test_rollback_states():
    c = Cluster(replicas=2)
    c.update()
    c.settle()
    c.svc = msgspec.structs.replace(c.svc, spec=c.svc.previous_spec, previous_spec=c.svc.spec, version=3,
                                    update_status=UpdateStatus(state="rollback_started", started="y"))
    c.settle()
    assert c.svc.update_status.state == "rollback_completed" and len(c.live(3)) == 2


def test_global_mode_rolls_node_by_node():
    c = Cluster(mode="global", replicas=1)
    assert len(c.live(1)) == 3
    c.update()
    c.round()
    assert len(c.live(1)) == 2 and len(c.live(2)) == 1
    c.settle()
    assert len(c.live(2)) == 3 and {t.node_id for t in c.live(2)} == {"n1", "n2", "n3"}


def test_a_service_never_updated_gets_no_update_status():
    c = Cluster(replicas=2)
    assert c.svc.update_status is None and len(c.live(1)) == 2


@settings(max_examples=60, deadline=None)
@given(replicas=st.integers(1, 6), parallelism=st.integers(0, 4), start_first=st.booleans(),
       steps=st.lists(st.booleans(), min_size=1, max_size=40))
def test_any_interleaving_keeps_the_bounds_and_converges(replicas, parallelism, start_first, steps):
    """Whatever the agents' pace: never more than `parallelism` slots in flight, never fewer live tasks than
    replicas minus parallelism (stop-first) or replicas (start-first), and it always completes."""
    order = "start-first" if start_first else "stop-first"
    c = Cluster(replicas=replicas, parallelism=parallelism, order=order)
    c.update()
    width = parallelism or replicas
    for agents_move in steps:
        c.round()
        slots = {t.slot for t in c.live()}
        assert len(slots) >= replicas - (0 if start_first else width)
        assert sum(1 for t in c.live(2) if t.state != "running") <= width
        if agents_move:
            c.agents()
    c.settle(rounds=4 * replicas + 4)
    assert c.svc.update_status.state == "completed"
    assert sorted(t.slot for t in c.live(2)) == list(range(1, replicas + 1)) and not c.live(1)


def test_update_flags_parse_like_dockers():
    import click
    import pytest

    from netweft.cli.service import parse_duration, update_config
    assert parse_duration("10s") == 10 and parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5
    assert parse_duration("0") == 0
    for bad in ("10", "s", "1x", "-1s", "1s junk"):
        with pytest.raises(click.BadParameter, match="invalid duration"):
            parse_duration(bad)
    assert update_config(None, None, None, None) is None
    assert update_config(2, "1s", None, None) == {"parallelism": 2, "delay": 1.0, "order": "stop-first",
                                                  "failure_action": "pause"}
    old = {"parallelism": 3, "delay": 0.0, "order": "start-first", "failure_action": "continue"}
    assert update_config(None, None, None, "pause", old) == {**old, "failure_action": "pause"}
