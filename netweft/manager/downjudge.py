"""Which nodes the leader of several managers (etcd) marks Down, from each manager's report of its own agents.

Each manager keeps the liveness of the agents that heartbeat to it and publishes it in one write every half
period: `heartbeats/<manager id>` = {"ages": {node id: seconds since this manager last heard from it}} (nodes
heard in the last REPORT_KEEP periods), on the manager's lease. An age is measured on one host, so no clocks
of two hosts are ever compared.

The leader notes when each report reached it, by its own clock: a node was last heard at (arrival - age). A
report that reaches the leader late (its watch behind, its event loop busy) makes a node look fresher, never
staler, so load delays a Down and never invents one. A node is Down when nobody heard it within `limit`:
  - never within the grace after this manager became the leader (the reports it inherited may be old);
  - never while the manager that heard it last (its "server") is present but has not reported within `stale`:
    only the manager that serves a node, or that manager being gone, says it is Down;
  - a node becomes Ready only by joining or heartbeating: the time the leader first saw it Ready counts as
    one heartbeat (a node that joined, or came back, at another manager a moment ago is in no report yet);
  - a node no report mentions is Down once every present manager has reported.
Reports of managers that went are kept here (their keys go with their leases), so a node whose manager died
has `limit` from its last heartbeat there to show up in another manager's report (agents fail over in ~2 s).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

REPORT_KEEP = 6   # periods a node stays in its manager's report after it was last heard
MAX_NODES = 100_000   # a report larger than this is not one (hostile or corrupt): ignored


def make_report(seen: Mapping[str, float], now: float, keep: float) -> dict:
    """The report of one manager: `seen` is node -> when it last heard from it, `now` the same clock."""
    return {"ages": {n: round(max(0.0, now - t), 2) for n, t in seen.items() if now - t < keep}}


def parse_report(obj: object) -> dict[str, float] | None:
    """A report's ages as read from the store, or None when it is not one (garbage, or an older manager's map
    of wall times, which is not comparable): such a manager says nothing either way."""
    if not isinstance(obj, dict) or not isinstance(obj.get("ages"), dict) or len(obj["ages"]) > MAX_NODES:
        return None
    out = {}
    for node, age in obj["ages"].items():
        if isinstance(node, str) and isinstance(age, (int, float)) and not isinstance(age, bool) \
                and math.isfinite(age) and age >= 0:
            out[node] = float(age)
    return out


class Judge:
    """The leader's judgment (pure logic; the clock is injected). observe() every report as it changes,
    down() the ready nodes to mark Down now."""

    def __init__(self, limit: float, stale: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.stale, self.clock = limit, stale, clock
        # manager -> (when its report reached this manager, the report's revision, node -> last heard)
        self.reports: dict[str, tuple[float, int, dict[str, float]]] = {}
        self.since = clock()                   # when this manager became the leader (reset by down())
        self.known: dict[str, float] = {}      # Ready node -> when down() first had it
        self._term: object = None

    def observe(self, manager: str, rev: int, obj: object) -> None:
        """A manager's report as the store has it now (rev: its revision; the same rev twice is one report)."""
        known = self.reports.get(manager)
        if known is not None and known[1] == rev:
            return
        ages = parse_report(obj)
        if ages is None:
            return
        now = self.clock()
        self.reports[manager] = (now, rev, {n: now - a for n, a in ages.items()})

    def last_heard(self, node: str) -> tuple[float | None, str | None]:
        """When (this clock) any manager last heard from node, and which one (None, None: none did)."""
        best, who = None, None
        for mgr, (_, _, heard) in self.reports.items():
            t = heard.get(node)
            if t is not None and (best is None or t > best):
                best, who = t, mgr
        return best, who

    def silent(self, present: Iterable[str]) -> set[str]:
        """Present managers that have not reported within `stale` (or not at all yet)."""
        now = self.clock()
        return {m for m in present if m not in self.reports or now - self.reports[m][0] > self.stale}

    def down(self, nodes: Iterable[str], present: Iterable[str], term: object) -> list[str]:
        """The nodes (of `nodes`, those Ready) that are Down now. present: the managers holding their lease;
        term: anything that changes when this manager becomes the leader again (its grace starts then)."""
        now = self.clock()
        if term != self._term:
            self._term, self.since = term, now
        nodes = list(nodes)
        self.known = {n: self.known.get(n, now) for n in nodes}
        if now - self.since <= self.limit:
            return []
        present = set(present)
        silent = self.silent(present)
        out = []
        for node in nodes:
            heard, server = self.last_heard(node)
            if now - max(heard or self.known[node], self.known[node]) <= self.limit:
                continue
            if server is None:
                if silent:
                    continue   # a present manager that has not said anything yet may serve it
            elif server in present and server in silent:
                continue       # its manager is up but has not reported lately: it has not said so
            out.append(node)
        return out

    def forget(self, managers: Iterable[str]) -> None:
        """Managers no longer in the cluster (removed or demoted): their reports say nothing any more."""
        for m in managers:
            self.reports.pop(m, None)
