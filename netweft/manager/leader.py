"""What several managers share through etcd besides the cluster's objects (issue 8):

- presence: each manager keeps `managers/<node id>` on a lease of its own; the key is there while the
  manager is (`node ls` shows it Reachable, else Unreachable);
- the leader for background duties (marking nodes Down, trimming the store's history): the manager
  that put `election/leader` on its lease, taken only while absent (a compare on absence, as etcd's
  concurrency/election campaigns). When the leader dies its lease expires (TTL seconds) and the
  next campaign wins. A leader that cannot renew its lease in time stops acting as one;
- heartbeats: each manager publishes how long ago it heard from each of its nodes (`heartbeats/<node id>`,
  one write every half period: downjudge.py), and the leader judges Down from these reports.
"""
from __future__ import annotations

import asyncio
import logging
import time

from netweft.errors import NetweftError
from netweft.manager.watch import ELECTION, HEARTBEATS, PRESENCE, Hub
from netweft.model import codec
from netweft.store.api import Compare, Put

log = logging.getLogger("netweft.manager.leader")

LEASE_TTL = 3          # seconds: a dead leader is replaced within about this
LEADER_KEY = "leader"


async def every(period: float, is_leader, duty, failed: str) -> None:
    """Run the duty `await duty()` every `period` seconds on the leader alone, forever; a failure is the
    warning `failed` and is retried at the next period."""
    while True:
        await asyncio.sleep(period)
        if not is_leader():
            continue
        try:
            await duty()
        except NetweftError as e:
            log.warning(failed, extra={"reason": str(e)})


class Coordination:
    def __init__(self, store, hub: Hub, node_id: str, manager_addr: str, ttl: int = LEASE_TTL):
        self.store, self.hub, self.node_id, self.manager_addr, self.ttl = store, hub, node_id, manager_addr, ttl
        self.lease = 0
        self._renewed = 0.0          # monotonic time of the last successful lease renewal
        self.leader_since = 0.0      # wall time this manager became the leader (0: it is not)
        self._problem: str | None = None

    # ------------------------------------------------------------ reads
    def leader(self) -> dict | None:
        """The elected leader's record {"node_id", "addr", "lease"}, or None while there is none."""
        return self.hub.state.get(ELECTION, LEADER_KEY)

    def is_leader(self) -> bool:
        rec = self.leader()
        return (self.lease != 0 and rec is not None and rec.get("node_id") == self.node_id
                and rec.get("lease") == self.lease and time.monotonic() - self._renewed < self.ttl)

    def reachable(self, node_id: str) -> bool:
        return self.hub.state.get(PRESENCE, node_id) is not None

    # ------------------------------------------------------------ the loop
    async def run(self) -> None:
        while True:
            try:
                self.lease = await self.store.lease_grant(self.ttl)
                self._renewed = time.monotonic()
                await self.store.txn([], [Put(PRESENCE, self.node_id, codec.encode(
                    {"addr": self.manager_addr, "lease": self.lease}), lease=self.lease)])
                if self._problem:
                    log.info("the cluster store is reachable again")
                self._problem = None
                while True:
                    await self._campaign()
                    await asyncio.sleep(self.ttl / 4)
                    t0 = time.monotonic()
                    if await self.store.lease_keepalive(self.lease) <= 0:
                        raise NetweftError("this manager's lease expired")
                    self._renewed = t0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                was = self.leader_since
                self.lease, self.leader_since = 0, 0.0
                if was:
                    log.warning("no longer the leader", extra={"reason": str(e)})
                if self._problem != str(e):
                    log.warning("cannot hold this manager's lease in the cluster store; retrying",
                                extra={"reason": str(e)})
                self._problem = str(e)
                await asyncio.sleep(0.5)

    async def _campaign(self) -> None:
        rec = self.leader()
        if rec is not None:
            if rec.get("node_id") == self.node_id and rec.get("lease") == self.lease:
                if not self.leader_since:
                    self.leader_since = time.time()
            elif self.leader_since:
                log.warning("no longer the leader", extra={"leader": rec.get("node_id")})
                self.leader_since = 0.0
            return
        value = codec.encode({"node_id": self.node_id, "addr": self.manager_addr, "lease": self.lease})
        r = await self.store.txn([Compare(ELECTION, LEADER_KEY, 0)],
                                 [Put(ELECTION, LEADER_KEY, value, lease=self.lease)])
        async with asyncio.timeout(self.ttl):
            await self.hub.wait(r.rev)
        if r.ok:
            self.leader_since = time.time()
            log.info("elected leader", extra={"node": self.node_id, "rev": r.rev})

    async def stop(self) -> None:
        if self.lease:
            await self.store.lease_revoke(self.lease)  # the next leader need not wait for the TTL
            self.lease = 0

    # ------------------------------------------------------------ heartbeats
    async def publish_heartbeats(self, report: dict) -> None:
        """This manager's report of its nodes (downjudge.make_report), on its lease: gone when it is."""
        await self.store.txn([], [Put(HEARTBEATS, self.node_id, codec.encode(report), lease=self.lease)])
