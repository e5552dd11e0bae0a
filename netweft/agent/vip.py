"""Service VIPs on this host: which VIPs each local container's namespace balances, over which tasks.

From the overlay agent's copy of the cluster (every host's endpoints of the networks this host is on): a
network's VIPs are its endpoints owned by a service (manager/services.py allocates one per service and
network); a VIP's backends are the endpoints carrying the alias tasks.<service> (the service's task
containers, wherever they run). Every local container on the network balances the network's VIPs in its
own namespace (dataplane/vip.py), so a connection leaves the container already addressed to a task.
The balancer follows the copy every FOLLOW_PERIOD seconds and programs only namespaces whose VIPs
changed; a failure is logged once and retried on the next change or round.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from netweft.dataplane.api import DataPlane
from netweft.errors import NetweftError
from netweft.model.objects import Endpoint

log = logging.getLogger("netweft.agent.vip")

FOLLOW_PERIOD = 0.1
RETRY_PERIOD = 2.0


def network_vips(endpoints: Iterable[Endpoint]) -> dict[str, tuple[str, ...]]:
    """VIP -> its tasks' addresses (sorted), for one network's endpoints."""
    eps = list(endpoints)
    vips = {ep.owner.name: ep.ip for ep in eps if ep.owner.kind == "service" and ep.owner.name}
    out = {}
    for name, vip in vips.items():
        alias = f"tasks.{name}"
        out[vip] = tuple(sorted({ep.ip for ep in eps if ep.owner.kind != "service" and alias in ep.aliases}))
    return out


def namespace_vips(local: Iterable[Endpoint], per_network: dict[str, dict[str, tuple[str, ...]]]
                   ) -> dict[str, dict[str, tuple[str, ...]]]:
    """Namespace -> the VIPs of every network its endpoints are on (local netweft containers)."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for ep in local:
        if ep.owner.kind == "service" or not ep.sandbox_key:
            continue
        out.setdefault(ep.sandbox_key, {}).update(per_network.get(ep.network_id, {}))
    return out


class ServiceBalancer:
    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane
        self.programmed: dict[str, dict[str, tuple[str, ...]]] = {}
        self._seen = None
        self._failed_at: dict[str, float] = {}
        self._logged: set[str] = set()

    async def run(self, agent_of: Callable[[], object]) -> None:
        """Follow the overlay agent (agent_of() gives it, or None outside a swarm) until cancelled."""
        while True:
            await asyncio.sleep(FOLLOW_PERIOD)
            agent = agent_of()
            if agent is None:
                self.programmed.clear()
                self._seen = None
                continue
            key = (tuple((n, ns.rev, len(ns.endpoints)) for n, ns in agent.nets.items()),
                   tuple(sorted(agent.local)))
            if key == self._seen and not self._failed_at:
                continue
            self._seen = key
            try:
                await self.sync(agent)
            except Exception:   # one bad record must not stop balancing; the next change retries
                log.exception("service VIPs: a round failed")

    async def sync(self, agent) -> int:
        if not self.programmed and not self._failed_at and not any(
                e.owner.kind == "service" for eps in [agent.local, *(ns.endpoints for ns in agent.nets.values())]
                for e in eps.values()):
            return 0   # no VIP anywhere, none programmed: the common case costs one look per endpoint, no more
        per_network = {}
        for net_id, ns in agent.nets.items():
            eps = {**{e.id: e for e in agent.local.values() if e.network_id == net_id}, **ns.endpoints}
            per_network[net_id] = network_vips(eps.values())
        wanted = namespace_vips(agent.local.values(), per_network)
        loop = asyncio.get_running_loop()
        changes = 0
        for path, vips in wanted.items():
            if self.programmed.get(path, {}) == vips and path not in self._failed_at:
                continue
            if path in self._failed_at and loop.time() - self._failed_at[path] < RETRY_PERIOD:
                continue
            try:
                changes += await self.dp.sync_vips(path, vips)
                if vips:
                    self.programmed[path] = vips
                else:
                    self.programmed.pop(path, None)   # the same as never programmed (no VIPs)
                self._failed_at.pop(path, None)
            except NetweftError as e:
                self._failed_at[path] = loop.time()
                if path not in self._logged:
                    self._logged.add(path)
                    log.warning("service VIPs: cannot program a container's namespace; retrying",
                                extra={"netns": path, "reason": str(e)})
        for path in [p for p in self.programmed if p not in wanted]:
            del self.programmed[path]      # the container is gone with its namespace and its table
            self._failed_at.pop(path, None)
            self._logged.discard(path)
        return changes
