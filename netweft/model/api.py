"""Bodies and query strings of the local API (unix socket), shaped as Docker's Engine API has them: the API edge.

Unknown fields are ignored, as Docker does (its clients send fields we do not use); known fields are
typed and bounded, so a wrong type or an absurd size is a 400 naming the field. Optional strings accept
null, as Docker's clients send it. Values (names, addresses) are judged after parsing, by netweft.validate
and netweft.ipam, whose refusals say what was typed.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from netweft.model.objects import Labels, ShortText

Str = Annotated[str, msgspec.Meta(max_length=256)]
# An argument or environment value: up to 4 KiB, never a NUL byte (exec cannot pass one).
Arg = Annotated[str, msgspec.Meta(max_length=4096, pattern=r"\A[^\x00]*\Z")]
EnvName = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"\A[^=\x00]+\Z")]
Aliases = Annotated[list[Str], msgspec.Meta(max_length=64)]


class IPAMConfig(msgspec.Struct, kw_only=True):
    Subnet: Str = ""
    Gateway: Str = ""
    IPRange: Str = ""
    AuxiliaryAddresses: Annotated[dict[Str, Str], msgspec.Meta(max_length=1024)] = {}


class IPAM(msgspec.Struct, kw_only=True):
    Driver: Str = "default"
    Config: Annotated[list[IPAMConfig], msgspec.Meta(max_length=16)] = []
    Options: Labels = {}


class NetworkCreate(msgspec.Struct, kw_only=True):
    """POST /networks/create (and, forwarded by a manager's engine, the cluster's POST /admin/networks)."""
    Name: Annotated[str, msgspec.Meta(max_length=256)]
    Driver: Str = "bridge"
    Internal: bool = False
    Attachable: bool = False
    Ingress: bool = False
    EnableIPv6: bool = False
    IPAM: IPAM = msgspec.field(default_factory=IPAM)
    Options: Labels = {}
    Labels: Labels = {}
    Scope: ShortText = ""


class EndpointIPAMConfig(msgspec.Struct, kw_only=True):
    IPv4Address: Str | None = None
    IPv6Address: Str | None = None


class EndpointConfig(msgspec.Struct, kw_only=True):
    IPAMConfig: EndpointIPAMConfig | None = None
    Aliases: Aliases | None = None
    MacAddress: Str | None = None


class NetworkConnect(msgspec.Struct, kw_only=True):
    """POST /networks/{ref}/connect"""
    Container: Str
    EndpointConfig: EndpointConfig | None = None


class NetworkDisconnect(msgspec.Struct, kw_only=True):
    """POST /networks/{ref}/disconnect"""
    Container: Str
    Force: bool = False


class ContainerCreate(msgspec.Struct, kw_only=True):
    """POST /containers/create: a lightweight container on at most one network (flat, unlike Docker's)."""
    Name: Str | None = None
    Hostname: Str | None = None
    NetworkMode: Str | None = None      # a network's name or ID, host or none (the default)
    IPAddress: Str | None = None
    MacAddress: Str | None = None
    Aliases: Aliases | None = None
    Cmd: Annotated[list[Arg], msgspec.Meta(max_length=4096)] = []
    Env: Annotated[dict[EnvName, Arg], msgspec.Meta(max_length=1024)] | None = None


class SwarmInit(msgspec.Struct, kw_only=True):
    """POST /swarm/init (durations as Go/Docker duration strings: 90d, 2160h, 500ms)."""
    AdvertiseAddr: Str | None = None
    ListenAddr: Str | None = None
    DataPathPort: int | None = None
    DefaultAddrPool: Annotated[list[Str], msgspec.Meta(max_length=64)] | None = None
    SubnetSize: int | None = None
    CertExpiry: Str | None = None
    HeartbeatPeriod: Str | None = None
    WireguardPort: int | None = None
    Store: Str | None = None            # "etcd" (a member beside each manager) or "etcd://HOST:2379,..."
    StoreCACert: Annotated[str, msgspec.Meta(max_length=65536)] | None = None   # PEM, for an external etcd
    StoreCert: Annotated[str, msgspec.Meta(max_length=65536)] | None = None
    StoreKey: Annotated[str, msgspec.Meta(max_length=65536)] | None = None
    StoreCertExpiry: Str | None = None  # the managers' etcd certificates' lifetime (default: CertExpiry)


class SwarmJoin(msgspec.Struct, kw_only=True):
    """POST /swarm/join"""
    JoinToken: Str = ""
    RemoteAddrs: Annotated[list[Str], msgspec.Meta(max_length=16)] = []
    AdvertiseAddr: Str | None = None


class NodeUpdate(msgspec.Struct, kw_only=True, omit_defaults=True):
    """POST /nodes/{ref}/update (forwarded as is to the leader from another manager)."""
    Role: Literal["manager", "worker"] | None = None
    Availability: Literal["active", "pause", "drain"] | None = None
    LabelsAdd: Labels | None = None
    LabelsRemove: Annotated[list[Str], msgspec.Meta(max_length=256)] | None = None


# ------------------------------------------------------------------ query strings
# Parsed from strings (decode with strict=False): booleans are 1/0/true/false, as Docker's clients send them.

class ForceQuery(msgspec.Struct):
    force: bool = False


class ContainersRemove(msgspec.Struct, kw_only=True):
    """POST /containers/remove (netweft's own): `rm` of many containers in one request, each answered."""
    Names: Annotated[list[Str], msgspec.Meta(min_length=1, max_length=5000)]
    Force: bool = False


class ContainerListQuery(msgspec.Struct):
    all: bool = False


class ContainerCreateQuery(msgspec.Struct):
    start: bool = True


class StopQuery(msgspec.Struct):
    t: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 10.0


class LogsQuery(msgspec.Struct):
    follow: bool = False


class RotateQuery(msgspec.Struct):
    role: Literal["worker", "manager"]


class NetworkListQuery(msgspec.Struct):
    filters: Annotated[str, msgspec.Meta(max_length=65536)] = ""


# Docker sends each filter as a list of values, older clients as a map of value -> true.
FilterValues = Annotated[list[Str], msgspec.Meta(max_length=64)] | Annotated[dict[Str, bool],
                                                                              msgspec.Meta(max_length=64)]
NetworkType = Literal["custom", "builtin"]


class NetworkFilters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The filters of GET /networks, with Docker's meaning: values of one key are ORed, keys ANDed,
    label filters all apply. name matches a part of the name, id a prefix, the others exactly."""
    name: FilterValues = []
    id: FilterValues = []
    driver: FilterValues = []
    label: FilterValues = []
    scope: FilterValues = []
    type: list[NetworkType] | dict[NetworkType, bool] = []

    @staticmethod
    def _values(v) -> list[str]:
        return [k for k, on in v.items() if on] if isinstance(v, dict) else list(v)

    def matches(self, net: dict, builtin: bool = False) -> bool:
        """net: a Docker-shaped network (Name, Id, Driver, Scope, Labels)."""
        name, ids, driver = self._values(self.name), self._values(self.id), self._values(self.driver)
        scope, types = self._values(self.scope), self._values(self.type)
        if name and not any(v in net["Name"] for v in name):
            return False
        if ids and not any(net["Id"].startswith(v) for v in ids):
            return False
        if driver and net["Driver"] not in driver:
            return False
        if scope and net["Scope"] not in scope:
            return False
        if types and ("builtin" if builtin else "custom") not in types:
            return False
        labels = net.get("Labels") or {}
        for v in self._values(self.label):
            key, sep, value = v.partition("=")
            if key not in labels or (sep and labels[key] != value):
                return False
        return True


def peer_health_view(h) -> dict:
    """A PeerHealth as the API shows it (`network inspect`'s peers, `node inspect`'s DataPath): Docker's case."""
    return {"State": h.state, "Loss": h.loss, "RttMs": h.rtt_ms, "MtuOk": h.mtu_ok, "Reason": h.reason,
            "Since": h.since}
