"""The leader's Down judgment from the managers' reports (manager/downjudge.py): pure logic, a fake clock."""
from __future__ import annotations

import pytest

from netweft.manager.downjudge import Judge, make_report, parse_report

LIMIT = 15.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


def judge(clock) -> Judge:
    j = Judge(LIMIT, stale=LIMIT, clock=clock)
    assert j.down(["n1", "n2", "n9"], [], term=1) == []   # becomes the leader now, these nodes Ready: grace
    return j


def past_grace(clock) -> None:
    clock.t += LIMIT + 1


def test_a_report_holds_ages_of_recent_nodes_only():
    r = make_report({"a": 95.0, "b": 60.0, "c": 100.5}, now=100.0, keep=30.0)
    assert r == {"ages": {"a": 5.0, "c": 0.0}}
    assert parse_report(r) == {"a": 5.0, "c": 0.0}


@pytest.mark.parametrize("obj", [None, [], "x", {"n1": 1.5}, {"ages": []}, {"ages": "x"},
                                 {"ages": {str(i): 1 for i in range(100_001)}}])
def test_what_is_not_a_report_says_nothing(obj):
    assert parse_report(obj) is None


def test_bad_entries_of_a_report_are_dropped():
    assert parse_report({"ages": {"a": 1, "b": -1, "c": "2", "d": float("nan"), "e": True, "f": float("inf")}}) \
        == {"a": 1.0}


def test_no_node_is_down_during_the_grace_after_becoming_leader(clock):
    j = judge(clock)
    j.observe("m1", 1, {"ages": {"n1": 100.0}})   # heard 100 s ago
    assert j.down(["n1", "n2"], ["m1"], term=1) == []
    clock.t += LIMIT - 1
    assert j.down(["n1", "n2"], ["m1"], term=1) == []
    clock.t += 2
    j.observe("m1", 2, {"ages": {"n1": 116.0}})
    assert j.down(["n1", "n2"], ["m1"], term=1) == ["n1", "n2"]
    assert j.down(["n1"], ["m1"], term=2) == []       # a new term (led again): a new grace


def test_a_node_heard_lately_by_any_manager_is_up(clock):
    j = judge(clock)
    past_grace(clock)
    j.observe("m1", 5, {"ages": {"n1": 40.0}})        # its old manager last heard it long ago
    j.observe("m2", 7, {"ages": {"n1": 1.0}})         # it failed over: the new one hears it
    assert j.down(["n1"], ["m1", "m2"], term=1) == []
    assert j.last_heard("n1") == (clock.t - 1.0, "m2")


def test_its_serving_manager_saying_it_is_late_makes_it_down(clock):
    j = judge(clock)
    past_grace(clock)
    j.observe("m1", 1, {"ages": {"n1": 2.0, "n2": 2.0}})
    j.observe("m2", 1, {"ages": {}})
    assert j.down(["n1", "n2"], ["m1", "m2"], term=1) == []
    for rev in range(2, 10):                          # m1 keeps reporting: n1 ages, n2 is heard
        clock.t += 2.5
        j.observe("m1", rev, {"ages": {"n1": 2.0 + (rev - 1) * 2.5, "n2": 0.5}})
        j.observe("m2", rev, {"ages": {}})
    assert j.down(["n1", "n2"], ["m1", "m2"], term=1) == ["n1"]


def test_a_late_report_never_makes_a_node_look_older(clock):
    """The leader busy or its watch behind: the same report read again is one report, and one that arrives
    late counts from its arrival, so the node looks fresher, not staler."""
    j = judge(clock)
    j.observe("m1", 1, {"ages": {"n1": 1.0}})
    clock.t += LIMIT + 1
    j.observe("m1", 1, {"ages": {"n1": 1.0}})         # nothing new yet (the publisher is slow)
    assert j.down(["n1"], ["m1"], term=1) == []       # m1 is up and has not spoken lately: it has not said so
    clock.t += 30                                      # the next report arrives 30 s late, saying 2 s
    j.observe("m1", 2, {"ages": {"n1": 2.0}})
    assert j.down(["n1"], ["m1"], term=1) == []


def test_a_silent_manager_holds_its_nodes_until_it_is_gone(clock):
    j = judge(clock)
    j.observe("m1", 1, {"ages": {"n1": 0.0}})
    j.observe("m2", 1, {"ages": {"n2": 0.0}})
    clock.t += 3 * LIMIT                               # m1 stops reporting (busy), m2 reports n2 as old
    j.observe("m2", 2, {"ages": {"n2": 3 * LIMIT}})
    assert j.down(["n1", "n2"], ["m1", "m2"], term=1) == ["n2"]
    assert j.down(["n1", "n2"], ["m2"], term=1) == ["n1", "n2"]   # m1 is gone (its lease expired)


def test_a_node_of_a_manager_that_died_has_time_to_fail_over(clock):
    j = judge(clock)
    past_grace(clock)
    j.observe("m1", 1, {"ages": {"n1": 0.5}})
    j.observe("m2", 1, {"ages": {}})
    clock.t += 3                                       # m1 dies: its key goes, its last report stays here
    assert j.down(["n1"], ["m2"], term=1) == []
    clock.t += 3
    j.observe("m2", 2, {"ages": {"n1": 0.2}})         # n1 heartbeats to m2 now
    clock.t += LIMIT
    j.observe("m2", 3, {"ages": {"n1": 0.1}})
    assert j.down(["n1"], ["m2"], term=1) == []
    clock.t += LIMIT + 1                               # n1 dies too, m2 is silent about it now
    j.observe("m2", 4, {"ages": {}})
    assert j.down(["n1"], ["m2"], term=1) == ["n1"]


def test_a_node_nobody_mentions_waits_for_every_present_manager_to_report(clock):
    j = judge(clock)
    past_grace(clock)
    assert j.down(["n9"], ["m1", "m2"], term=1) == []  # first seen Ready now
    clock.t += LIMIT + 1
    j.observe("m1", 1, {"ages": {}})
    assert j.down(["n9"], ["m1", "m2"], term=1) == []  # m2 (just started) may serve it
    j.observe("m2", 1, {"ages": {}})
    assert j.down(["n9"], ["m1", "m2"], term=1) == ["n9"]


def test_reports_of_managers_no_longer_managers_are_forgotten(clock):
    j = judge(clock)
    j.observe("m1", 1, {"ages": {"n1": 0.0}})
    j.forget(["m1"])
    assert j.last_heard("n1") == (None, None)


def test_an_unreadable_report_keeps_the_last_good_one(clock):
    j = judge(clock)
    j.observe("m1", 1, {"ages": {"n1": 0.0}})
    j.observe("m1", 2, {"n1": 123456789.0})           # an older manager's wall times: says nothing
    assert j.last_heard("n1") == (clock.t, "m1")


def test_a_node_just_joined_at_another_manager_is_not_down_before_it_is_in_a_report(clock):
    j = judge(clock)
    past_grace(clock)
    j.observe("m1", 1, {"ages": {"n1": 0.5}})
    assert j.down(["n1"], ["m1"], term=1) == []
    clock.t += 1
    assert j.down(["n1", "n5"], ["m1"], term=1) == []   # n5 joined (at m2, say): no report has it yet
    clock.t += LIMIT + 0.5
    j.observe("m1", 2, {"ages": {"n1": 0.5}})
    assert j.down(["n1", "n5"], ["m1"], term=1) == ["n5"]   # still in no report: it never heartbeated


def test_a_node_back_ready_is_not_down_again_before_a_report_has_its_heartbeat(clock):
    """Down, then Ready again by a heartbeat at some manager: the reports the leader holds still say it is old
    until the next one arrives; becoming Ready is itself a heartbeat."""
    j = judge(clock)
    past_grace(clock)
    j.observe("m1", 1, {"ages": {"n1": 20.0}})
    assert j.down(["n1"], ["m1"], term=1) == ["n1"]    # was Ready since the grace began: Down
    assert j.down([], ["m1"], term=1) == []             # (marked Down: not Ready, not a candidate)
    clock.t += 1
    assert j.down(["n1"], ["m1"], term=1) == []         # Ready again: a heartbeat reached some manager
    clock.t += LIMIT + 0.5
    j.observe("m1", 2, {"ages": {"n1": 40.0}})          # and never again
    assert j.down(["n1"], ["m1"], term=1) == ["n1"]
