"""The watch: how the managers' state reaches each agent. Both ends decode with these types.

GET /watch?since=REV[&networks=ID,ID]  (mutual TLS; the node is the certificate's)
A stream of newline-delimited JSON messages, each one `WatchMessage`:

- `snapshot`: the whole scope of this node at `rev` (sent when since=0, or when the missed revisions are
  no longer kept, or when the watcher was cut off for being too slow);
- `events`: the changes of one revision, in order; `rev` grows by at least one per message;
- `ping`: nothing changed; `rev` is the manager's current revision (keeps the stream alive).

The scope of a node: itself, the managers and the nodes with endpoints on its networks (a node's first
endpoint on a network brings that node along to the network's watchers; a node leaving the cluster reaches
every agent); the networks that have an endpoint on the node, plus those it names
in `networks`; and the endpoints of those networks. A network enters the scope when the node's first
endpoint on it is created: the answer to POST /endpoints carries that network's state at the
revision of the creation with the nodes of its endpoints (`Attachment`), and from then on the stream carries its changes with
larger revisions. A network leaves the scope with the node's last endpoint on it; the agent forgets
it then. On resume (since=REV) the manager sends the missed events of the networks in the current
scope, or a snapshot.

Services (to every node) and the node's own tasks come as events too (not in snapshots: the agent asks
for its assignments at each (re)connection, and again at each of these events).

The agent applies one object at a time; an object it cannot apply is logged and left to the periodic
full resync. Its saved revision is the one whose state it holds.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from netweft.model.objects import Endpoint, Network, Node, Owner, Revision
from netweft.model.services import Service, Task


class NodeEvent(msgspec.Struct, tag="node", tag_field="kind"):
    action: Literal["put", "delete"]
    object: Node


class NetworkEvent(msgspec.Struct, tag="network", tag_field="kind"):
    action: Literal["put", "delete"]
    object: Network


class EndpointEvent(msgspec.Struct, tag="endpoint", tag_field="kind"):
    action: Literal["put", "delete"]
    object: Endpoint


class ServiceEvent(msgspec.Struct, tag="service", tag_field="kind"):
    """Every node hears of every service (the routing mesh publishes every service's ports on each host)."""
    action: Literal["put", "delete"]
    object: Service


class TaskEvent(msgspec.Struct, tag="task", tag_field="kind"):
    """A node hears of its own tasks as they are assigned and change (daemon/tasks.py starts them)."""
    action: Literal["put", "delete"]
    object: Task


Event = Union[NodeEvent, NetworkEvent, EndpointEvent, ServiceEvent, TaskEvent]


class Snapshot(msgspec.Struct, tag="snapshot", tag_field="type"):
    rev: Revision
    nodes: list[Node]
    networks: list[Network]
    endpoints: list[Endpoint]


class Events(msgspec.Struct, tag="events", tag_field="type"):
    rev: Revision
    events: Annotated[list[Event], msgspec.Meta(max_length=1_000_000)]


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    rev: Revision


WatchMessage = Union[Snapshot, Events, Ping]


RELEASE_MAX = 60    # endpoints per POST /endpoints/release: they and their guards fit etcd's 128 ops


class EndpointRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /endpoints: a node asks for an address on an overlay for one of its endpoints.

    The node, its hostname and VTEP come from its certificate and the store, never from the body."""
    network_id: Annotated[str, msgspec.Meta(pattern=r"\A[a-z0-9]{1,64}\Z")]
    owner: Owner
    ip: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    mac: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    aliases: Annotated[list[Annotated[str, msgspec.Meta(max_length=253)]], msgspec.Meta(max_length=64)] = []


class Attachment(msgspec.Struct, kw_only=True):
    """The answer to POST /endpoints: the new endpoint, and its network's state at `rev`."""
    rev: Revision
    endpoint: Endpoint
    network: Network
    endpoints: list[Endpoint]
    # True: `endpoints` is left empty, the asker's copy of the network is current (it named an endpoint
    # the watch has carried the network with since a revision its copy is past: POST /endpoints?anchor=&since=).
    partial: bool = False
    # The nodes of the network's endpoints (not with `partial`): the watch sends each agent only the nodes
    # it shares a network with, so a network it joins may bring nodes it has never heard of.
    nodes: list[Node] = []


class EndpointRelease(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /endpoints/release: a node gives back several of its endpoints at once (`rm -f` of many); each as
    DELETE /endpoints/{id} would, in one store transaction."""
    ids: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"\A[a-z0-9]{1,64}\Z")]],
                   msgspec.Meta(min_length=1, max_length=RELEASE_MAX)]
