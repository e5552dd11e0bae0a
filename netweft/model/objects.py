"""The domain model: Network, Endpoint, Node, Peer, Sandbox. One typed object for one thing.

These are what the manager stores and sends on the watch, what the agent and the engine keep, and
what the data plane is told to program. Docker-shaped JSON is made from them at the API edge only.
Every struct rejects wrong types when decoded (see netweft.model.codec.decode).
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Whole-string patterns: \A...\Z, so a trailing newline never passes (re.search with $ would let it).
NAME_PATTERN = r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}\Z"
HOSTNAME_PATTERN = (r"\A(?=.{1,64}\Z)[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
                    r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\Z")
IFNAME_PATTERN = r"\A[a-zA-Z0-9_.-]{1,15}\Z"
ID_PATTERN = r"\A[a-z0-9]{1,64}\Z"
IPV4_PATTERN = r"\A(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}\Z"
CIDR_PATTERN = IPV4_PATTERN[:-2] + r"/([0-9]|[12][0-9]|3[0-2])\Z"
MAC_PATTERN = r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Hostname = Annotated[str, msgspec.Meta(pattern=HOSTNAME_PATTERN)]
IfName = Annotated[str, msgspec.Meta(pattern=IFNAME_PATTERN)]
ObjectID = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
IPv4 = Annotated[str, msgspec.Meta(pattern=IPV4_PATTERN)]
CIDR = Annotated[str, msgspec.Meta(pattern=CIDR_PATTERN)]
MAC = Annotated[str, msgspec.Meta(pattern=MAC_PATTERN)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
Labels = Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=256)], Text],
                   msgspec.Meta(max_length=256)]
VNI = Annotated[int, msgspec.Meta(ge=1, le=(1 << 24) - 1)]
MTU = Annotated[int, msgspec.Meta(ge=68, le=65535)]
Revision = Annotated[int, msgspec.Meta(ge=0)]


class Network(msgspec.Struct, kw_only=True):
    """A network: local (driver bridge, scope local) or cluster-wide (driver overlay, scope swarm)."""
    id: ObjectID
    name: Name
    driver: Literal["bridge", "overlay"]
    scope: Literal["local", "swarm"]
    created: ShortText
    subnet: CIDR
    gateway: IPv4
    ip_range: CIDR | None = None
    aux_addresses: Annotated[dict[ShortText, IPv4], msgspec.Meta(max_length=1024)] = {}
    internal: bool = False
    attachable: bool = False
    ingress: bool = False
    encrypted: bool = False
    options: Labels = {}
    labels: Labels = {}
    mtu: MTU | None = None          # None: derived from the underlay (overlay) or 1500 (bridge)
    vni: VNI | None = None          # overlay only
    bridge: IfName | None = None    # bridge driver only: the host bridge's name
    parent: IfName | None = None    # bridge driver only: a host interface enslaved to the bridge


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    """Who an endpoint belongs to. The agent never removes an endpoint whose owner record it does not hold."""
    kind: Literal["netweft", "cni", "docker", "service"]   # service: a service's VIP on a network
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    name: ShortText = ""


class Endpoint(msgspec.Struct, kw_only=True):
    """One interface of one owner on one network, on one host: a first-class stored object.

    The cluster part (network, node, vtep, ip, mac, owner, aliases) is what every host needs to reach it;
    the local part (namespace, interface names, gateway port) matters only on its own host.
    """
    id: ObjectID
    network_id: ObjectID
    node_id: ShortText = ""         # "" for an endpoint of a local (bridge) network
    hostname: ShortText = ""        # the node's hostname, for people reading `network inspect`
    vtep: IPv4 | None = None        # the node's underlay address (overlay endpoints)
    ip: IPv4
    prefix_len: Annotated[int, msgspec.Meta(ge=0, le=32)]
    mac: MAC
    owner: Owner
    aliases: Annotated[list[Hostname], msgspec.Meta(max_length=64)] = []
    ip_requested: bool = False      # the operator chose the address (Docker shows IPAMConfig then)
    # Local part.
    sandbox_key: Annotated[str, msgspec.Meta(max_length=4096)] = ""   # the owner's network namespace path
    ifname: IfName | None = None            # inside the owner's namespace, e.g. eth0
    host_ifname: IfName | None = None       # the veth end on the bridge (host or overlay sandbox)
    gateway: IPv4 | None = None             # default route through this endpoint, if it gives one
    gw_ifname: IfName | None = None         # overlay egress: the port on the gateway bridge, inside
    gw_host_ifname: IfName | None = None    # ... and its end on the gateway bridge
    gw_ip: IPv4 | None = None


class Node(msgspec.Struct, kw_only=True):
    """A host of the cluster, as the managers know it."""
    id: ObjectID
    hostname: ShortText
    role: Literal["manager", "worker"]
    availability: Literal["active", "pause", "drain"] = "active"
    labels: Labels = {}
    state: Literal["ready", "down", "unknown"] = "ready"
    addr: IPv4                       # underlay address: the VTEP of its overlay endpoints
    manager_addr: ShortText = ""     # HOST:PORT of its cluster API, for managers
    created: ShortText = ""
    updated: ShortText = ""
    cert_serial: ShortText = ""
    cert_not_after: ShortText = ""
    # What this node's data-path probes say of each peer host it shares an overlay with (by node id).
    health: Annotated[dict[ShortText, "PeerHealth"], msgspec.Meta(max_length=10000)] = {}
    # Down for the managers and unreachable on the data path from every host sharing a network with it:
    # its endpoints are left out of every host's peer tables until either stops being true.
    withdrawn: bool = False
    # WireGuard (encrypted overlays): its UDP port, the tunnel address pair the managers gave it, and its public
    # keys (two while a rotation is under way; the one marked current is where encrypted VXLAN goes).
    tunnel_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    tunnel_addrs: Annotated[list[IPv4], msgspec.Meta(max_length=2)] = []
    tunnel_keys: Annotated[list["TunnelKey"], msgspec.Meta(max_length=2)] = []
    # It left the swarm (`swarm leave`): it stays Down, whatever a heartbeat sent before it left says.
    left: bool = False


class PeerHealth(msgspec.Struct, kw_only=True):
    """The data path from one host to one peer host, as its probes through the overlay measured it."""
    state: Literal["healthy", "degraded", "unreachable", "unknown"] = "unknown"
    loss: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0     # share of the last probes lost
    rtt_ms: Annotated[float, msgspec.Meta(ge=0)] | None = None  # median round trip of the last probes
    mtu_ok: bool | None = None       # a full-MTU DF probe got through (None: not probed yet)
    reason: ShortText = ""           # words naming the likely cause, when not healthy
    since: ShortText = ""            # RFC 3339 time the state began


WG_KEY_PATTERN = r"\A[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z"   # 32 bytes in base64, as `wg` prints them
WireGuardKey = Annotated[str, msgspec.Meta(pattern=WG_KEY_PATTERN)]


class TunnelKey(msgspec.Struct, frozen=True, kw_only=True):
    """One WireGuard public key of a node: the interface holding it listens on `port` and has address `addr`."""
    public_key: WireGuardKey
    addr: IPv4
    current: bool = False
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class Peer(msgspec.Struct, frozen=True, order=True):
    """A remote endpoint as a host sees it: overlay IP and MAC, and the VTEP of the host it lives on."""
    ip: IPv4
    mac: MAC
    vtep: IPv4


class Sandbox(msgspec.Struct, frozen=True, kw_only=True):
    """The per-host, per-overlay namespace holding the overlay's bridge and VXLAN device."""
    network_id: ObjectID
    path: str
    vni: VNI
    gateway_cidr: ShortText          # the bridge's address, e.g. 198.18.0.1/24
    mtu: MTU
