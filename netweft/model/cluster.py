"""The bodies of the cluster API's membership calls (/join, /renew, /heartbeat, /leave) and their answers.

The manager decodes the requests strictly (unknown fields refused): they come from strangers (/join)
or from nodes that may be compromised. The agent decodes the answers leniently (unknown fields
ignored), so a newer manager may add fields. Field names stay those of the wire (PascalCase, as
swarmkit's JSON), so old and new nodes keep talking.
"""
from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec

from netweft.model.objects import Hostname, IPv4, ObjectID, PeerHealth, WireGuardKey

# A PEM certificate or CSR of any key we accept (P-256..P-521, RSA up to 8192 bits) is far below this.
PEM = Annotated[str, msgspec.Meta(min_length=1, max_length=16 * 1024)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ManagerAddr = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def vtep_problem(addr: str) -> str | None:
    """Why an IPv4 address cannot be a node's underlay address (its VTEP on every host), or None."""
    ip = ipaddress.IPv4Address(addr)
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_reserved:
        return "a reserved or broadcast address"
    return None


def _check_vtep(addr: str | None, field: str) -> None:
    if addr is None:
        return
    why = vtep_problem(addr)
    if why:
        # msgspec reports this as the decode error; say which field, as its own messages do.
        raise ValueError(f"{addr} is {why}, not a node address (it becomes this node's VTEP on every host): "
                         f"give the host's unicast underlay address - at `$.{field}`")


class JoinRequest(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /join (no certificate yet): the token's secret proves the right to join."""
    token: Token
    csr: PEM = msgspec.field(name="CSR")
    hostname: Hostname
    advertise_addr: IPv4 | None = None   # None: the manager uses the address the call came from

    def __post_init__(self) -> None:
        _check_vtep(self.advertise_addr, "AdvertiseAddr")


class JoinAnswer(msgspec.Struct, rename="pascal", kw_only=True):
    node_id: ObjectID = msgspec.field(name="NodeID")
    role: Literal["manager", "worker"]
    cluster_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = msgspec.field(name="ClusterID")
    certificate: PEM
    managers: Annotated[list[ManagerAddr], msgspec.Meta(min_length=1, max_length=64)]
    heartbeat_period: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    data_path_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    wireguard_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 51820
    store: Literal["sqlite", "etcd"] = "sqlite"   # etcd: a manager enrolls (POST /managers/enroll) next


class RenewRequest(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /renew: a new key's CSR; identity and role come from the caller's certificate and the store."""
    csr: PEM = msgspec.field(name="CSR")


class RenewAnswer(msgspec.Struct, rename="pascal", kw_only=True):
    certificate: PEM
    role: Literal["manager", "worker"]


class HeartbeatRequest(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /heartbeat: I am alive, at this underlay address (None: keep the one the manager has)."""
    addr: IPv4 | None = None

    def __post_init__(self) -> None:
        _check_vtep(self.addr, "Addr")


class HeartbeatAnswer(msgspec.Struct, rename="pascal", kw_only=True):
    period: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    role: Literal["manager", "worker"]
    availability: Literal["active", "pause", "drain"] = "active"


class LeaveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /leave: no fields (an empty body is the same)."""


class TunnelKeyRequest(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    public_key: WireGuardKey
    slot: Literal[0, 1]          # which of the node's two tunnel addresses this key sends from
    current: bool


class TunnelUpdate(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /tunnel: this node's WireGuard port and public keys (the private ones never leave the node)."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65534)]   # slot 0's; slot 1's is port + 1
    keys: Annotated[list[TunnelKeyRequest], msgspec.Meta(min_length=1, max_length=2)]

    def __post_init__(self) -> None:
        if sum(k.current for k in self.keys) != 1:
            raise ValueError("exactly one key must be current - at `$.Keys`")
        if len({k.slot for k in self.keys}) != len(self.keys) or len({k.public_key for k in self.keys}) != len(self.keys):
            raise ValueError("two keys share a slot or a public key - at `$.Keys`")


class TunnelAnswer(msgspec.Struct, rename="pascal", kw_only=True):
    addrs: Annotated[list[IPv4], msgspec.Meta(min_length=2, max_length=2)]


class EnrollRequest(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /managers/enroll (a manager certificate, mutual TLS): the CSR of the new manager's etcd key."""
    csr: PEM = msgspec.field(name="CSR")


B64Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Endpoint = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class EnrollAnswer(msgspec.Struct, rename="pascal", kw_only=True):
    """What a new manager needs for the shared store: the key the CA keys are sealed with, its etcd
    certificate, where etcd is, and (embedded etcd) how to start its own member as an `existing` one."""
    manager_key: B64Key
    store_ca: PEM = msgspec.field(name="StoreCA")
    store_cert: PEM
    store_key: PEM | None = None     # an external etcd: the operator's client key, shared by the managers
    endpoints: Annotated[list[Endpoint], msgspec.Meta(min_length=1, max_length=64)]
    initial_cluster: Annotated[str, msgspec.Meta(max_length=8192)] = ""   # empty: an external etcd
    store_crl: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)] | None = \
        msgspec.field(name="StoreCRL", default=None)   # embedded etcd: the revoked certificates


class HealthReport(msgspec.Struct, rename="pascal", forbid_unknown_fields=True, kw_only=True):
    """POST /health: what this node's data-path probes say of each peer host (agent/health.py), by node ID."""
    health: Annotated[dict[ObjectID, PeerHealth], msgspec.Meta(max_length=10000)] = {}
