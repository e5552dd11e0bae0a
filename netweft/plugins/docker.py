"""Docker's remote network and IPAM driver protocol (libnetwork docs/remote.md, docs/ipam.md): the typed
bodies dockerd sends and the pure rules for reading them. netweftd serves it (netweft/daemon/docker_driver.py).

Every body is decoded into one of these structs before anything reads it; a wrong type, an absurd
size or a value that is not an address is refused in one line. Unknown fields are ignored, as Docker
adds fields across versions.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Annotated, Any

import msgspec

from netweft.errors import InvalidRequest

MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"
IMPLEMENTS = ["NetworkDriver", "IpamDriver"]
POOL_PREFIX = "netweft:"
GATEWAY_REQUEST = "com.docker.network.gateway"          # RequestAddressType of a network's gateway
GENERIC = "com.docker.network.generic"                  # the -o options of `docker network create`
INTERNAL = "com.docker.network.internal"
NAME_OPT = "netweft.name"                               # -o netweft.name=NAME: the overlay's name in netweft
DOCKER_LABEL = "netweft.docker.network-id"              # the label tying a netweft overlay to a Docker network
ADDRESS_SPACE = "netweft"
TMP_PREFIX = "nwd"                                      # a Docker endpoint's container end before Docker moves it

Str = Annotated[str, msgspec.Meta(max_length=256)]
ID = Annotated[str, msgspec.Meta(max_length=128)]
Options = Annotated[dict[Str, Any], msgspec.Meta(max_length=256)]


class _Body(msgspec.Struct, kw_only=True):
    pass


class IPData(_Body):
    AddressSpace: Str = ""
    Pool: Str = ""
    Gateway: Str = ""
    AuxAddresses: Annotated[dict[Str, Str], msgspec.Meta(max_length=1024)] | None = None


class CreateNetwork(_Body):
    NetworkID: ID
    Options: Options | None = None
    IPv4Data: Annotated[list[IPData], msgspec.Meta(max_length=16)] | None = None
    IPv6Data: Annotated[list[IPData], msgspec.Meta(max_length=16)] | None = None


class NetworkRef(_Body):
    NetworkID: ID


class EndpointInterface(_Body):
    Address: Str = ""
    AddressIPv6: Str = ""
    MacAddress: Str = ""


class CreateEndpoint(_Body):
    NetworkID: ID
    EndpointID: ID
    Interface: EndpointInterface | None = None
    Options: Options | None = None


class EndpointRef(_Body):
    NetworkID: ID
    EndpointID: ID
    Options: Options | None = None


class Join(_Body):
    NetworkID: ID
    EndpointID: ID
    SandboxKey: Annotated[str, msgspec.Meta(min_length=2, max_length=4096, pattern=r"\A/[^\x00]*\Z")]
    Options: Options | None = None


class Discovery(_Body):
    DiscoveryType: int = 0
    DiscoveryData: Any = None


class RequestPool(_Body):
    AddressSpace: Str = ""
    Pool: Str = ""
    SubPool: Str = ""
    Options: Annotated[dict[Str, Str], msgspec.Meta(max_length=256)] | None = None
    V6: bool = False


class PoolRef(_Body):
    PoolID: Str


class RequestAddress(_Body):
    PoolID: Str
    Address: Str = ""
    Options: Annotated[dict[Str, Str], msgspec.Meta(max_length=256)] | None = None


class ReleaseAddress(_Body):
    PoolID: Str
    Address: Str


class Empty(_Body):
    pass


# ------------------------------------------------------------------ pools
def pool_id(subnet: IPv4Network, sub_pool: IPv4Network | None) -> str:
    """A pool's ID carries its subnet (and --ip-range): any host's driver reads it without shared state."""
    return f"{POOL_PREFIX}{subnet}" + (f":{sub_pool}" if sub_pool else "")


def parse_pool_id(value: str) -> tuple[IPv4Network, IPv4Network | None]:
    if not value.startswith(POOL_PREFIX):
        raise InvalidRequest(f"pool {value[:80]!r} is not one of netweft's (netweft:SUBNET)")
    subnet, _, sub = value[len(POOL_PREFIX):].partition(":")
    try:
        return IPv4Network(subnet), (IPv4Network(sub) if sub else None)
    except ValueError:
        raise InvalidRequest(f"pool {value[:80]!r} is not one of netweft's (netweft:SUBNET)") from None


def parse_cidr_address(value: str, what: str) -> IPv4Interface:
    """ "198.18.0.5/24" (or a bare address) as Docker sends them."""
    try:
        return IPv4Interface(value)
    except ValueError:
        raise InvalidRequest(f"{what} {value[:80]!r} is not an IPv4 address") from None


def parse_address(value: str, what: str) -> IPv4Address:
    return parse_cidr_address(value, what).ip


def generic_options(opts: dict | None) -> dict[str, str]:
    """The -o options of `docker network create` (strings only)."""
    generic = (opts or {}).get(GENERIC) or {}
    if not isinstance(generic, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in generic.items()):
        raise InvalidRequest("network options (-o) must be KEY=VALUE strings")
    return dict(generic)


def overlay_name(network_id: str, opts: dict[str, str]) -> str:
    return opts.get(NAME_OPT) or f"docker-{network_id[:12]}"


def error_body(message: str) -> bytes:
    return msgspec.json.encode({"Err": " ".join(message.split())})
