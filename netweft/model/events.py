"""What `netweft events` streams: one ClusterEvent per thing that happened in the cluster, and the filters.

Cluster events are derived from the cluster store's change history (netweft/manager/events.py), so
every manager tells the same story, from the same revisions, whichever host asks; a host's local
(bridge) networks have events of scope "local" (netweft/daemon/local_events.py). Types and actions:

  network  create, remove, connect, disconnect   (connect/disconnect: an endpoint came or went)
  node     join, ready, down, remove             (ready: back after being down)
  health   healthy, degraded, unreachable        (the data path from one node to a peer changed state)

Docker's JSON shape (Type, Action, Actor.ID, Actor.Attributes, scope, time, timeNano) is made by
`docker_view`, at the API edge.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from netweft.errors import InvalidRequest

TYPES = ("network", "node", "health")
ACTIONS = {"network": ("create", "remove", "connect", "disconnect"), "node": ("join", "ready", "down", "remove"),
           "health": ("healthy", "degraded", "unreachable")}

_Value = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Values = Annotated[list[_Value], msgspec.Meta(max_length=64)]


class ClusterEvent(msgspec.Struct, kw_only=True, frozen=True):
    type: Literal["network", "node", "health"]
    action: str
    id: str                                  # the network's or the node's ID
    attributes: dict[str, str] = {}          # name, node, network, container, ip, peer, state, reason...
    rev: int = 0                             # the cluster store revision it happened at
    time_ns: int = 0                         # when (Unix time, nanoseconds)
    scope: Literal["swarm", "local"] = "swarm"   # local: a bridge network of one host (not in the store)


class EventFilters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Docker's meaning: the values of one key are ORed, the keys ANDed. network and node match a name or an
    ID (an ID also by a prefix of 3 characters or more)."""
    type: _Values = []
    event: _Values = []
    network: _Values = []
    node: _Values = []

    def check(self) -> "EventFilters":
        for t in self.type:
            if t not in TYPES:
                raise InvalidRequest(f"invalid filter type={t!r}: the types are {', '.join(TYPES)}")
        known = {a for acts in ACTIONS.values() for a in acts}
        for a in self.event:
            if a not in known:
                raise InvalidRequest(f"invalid filter event={a!r}: the events are {', '.join(sorted(known))}")
        return self

    @staticmethod
    def _hit(values: list[str], name: str, ident: str) -> bool:
        return any(v == name or v == ident or (len(v) >= 3 and ident.startswith(v)) for v in values)

    def matches(self, ev: ClusterEvent) -> bool:
        a = ev.attributes
        if self.type and ev.type not in self.type:
            return False
        if self.event and ev.action not in self.event:
            return False
        if self.network:
            if ev.type != "network" or not self._hit(self.network, a.get("name", ""), ev.id):
                return False
        if self.node:
            if ev.type == "network":
                if not self._hit(self.node, a.get("node", ""), a.get("node_id", "")):
                    return False
            elif not (self._hit(self.node, a.get("name", ""), ev.id)
                      or self._hit(self.node, a.get("peer", ""), a.get("peer_id", ""))):
                return False
        return True


def parse_filters(raw: str | None) -> EventFilters:
    """?filters={"type":["network"],...} (Docker's JSON) into checked EventFilters."""
    from netweft.model import codec
    if not raw:
        return EventFilters()
    try:
        f = codec.decode(raw, EventFilters, "filters")
    except InvalidRequest as e:
        raise InvalidRequest(f"{e} (filters are a JSON object such as {{\"type\": [\"network\"]}}; the keys are "
                             f"{', '.join(EventFilters.__struct_fields__)})") from None
    return f.check()


def docker_view(ev: ClusterEvent) -> dict:
    """The event as `docker events --format json` prints it (plus netweft's store revision)."""
    return {"Type": ev.type, "Action": ev.action, "Actor": {"ID": ev.id, "Attributes": dict(ev.attributes)},
            "scope": ev.scope, "time": ev.time_ns // 1_000_000_000, "timeNano": ev.time_ns, "rev": ev.rev}
