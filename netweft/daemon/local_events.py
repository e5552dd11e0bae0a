"""Events of this host's local (bridge) networks: create, remove, connect, disconnect.

They live in no cluster store, so they are kept here, in memory, since the daemon started (the last KEEP),
and handed to each open `netweft events` stream as they happen. GET /events merges them with the cluster's
(netweft/daemon/events_api.py).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from netweft.model.events import ClusterEvent, docker_view
from netweft.model.objects import Endpoint, Network

KEEP = 10_000
QUEUE = 4096   # a stream this many events behind loses the oldest (it is told by an error line)


class LocalEvents:
    def __init__(self, hostname: str = "", keep: int = KEEP):
        self.hostname = hostname
        self.kept: deque[ClusterEvent] = deque(maxlen=keep)
        self.subscribers: set[asyncio.Queue] = set()

    def network(self, action: str, net: Network, ep: Endpoint | None = None, container: str = "") -> None:
        attrs = {"name": net.name, "type": net.driver, "subnet": net.subnet}
        if ep is not None:
            attrs.update(container=ep.owner.id, container_name=container or ep.owner.name, endpoint=ep.id, ip=ep.ip,
                         node=self.hostname)
        self.emit(ClusterEvent(type="network", action=action, id=net.id, attributes=attrs, time_ns=time.time_ns(),
                               scope="local"))

    def emit(self, ev: ClusterEvent) -> None:
        self.kept.append(ev)
        for q in list(self.subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(("local", docker_view(ev), ev))

    def since(self, since_ns: int | None) -> list[ClusterEvent]:
        return [] if since_ns is None else [e for e in self.kept if e.time_ns >= since_ns]

    def subscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.add(q)

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)
