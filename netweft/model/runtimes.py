"""What other runtimes' adapters send netweftd's local API: the CNI plugin's requests and their answers.

The CNI plugin (netweft/plugins/cni.py) is a short-lived process; it turns the runtime's environment and
network configuration into one of these and posts it to /cni/{add,del,check,gc}. Both ends decode with
these types; unknown fields are refused (the plugin and the daemon ship together).
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from netweft.model.objects import IFNAME_PATTERN, MAC, IPv4, ShortText

# CNI's container ID: "alphanumeric plus _ . -", non-empty (the spec's rule, bounded).
CONTAINER_ID_PATTERN = r"\A[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}\Z"
ContainerID = Annotated[str, msgspec.Meta(pattern=CONTAINER_ID_PATTERN)]
CniIfName = Annotated[str, msgspec.Meta(pattern=IFNAME_PATTERN)]
NetnsPath = Annotated[str, msgspec.Meta(min_length=2, max_length=4096, pattern=r"\A/[^\x00]*\Z")]
NetRef = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Alias = Annotated[str, msgspec.Meta(max_length=253)]


class PublishedPort(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A port of this host published to a container's port (CNI's portMappings, in netweft's words)."""
    protocol: Literal["tcp", "udp", "sctp"] = "tcp"
    host_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    host_ip: Annotated[str, msgspec.Meta(max_length=64)] = ""     # "": every address of this host
    container_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]


class CniAttach(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /cni/add: attach (container_id, ifname) in `netns` to `network`."""
    container_id: ContainerID
    ifname: CniIfName
    netns: NetnsPath
    network: NetRef
    ip: IPv4 | None = None
    mac: MAC | None = None
    aliases: Annotated[list[Alias], msgspec.Meta(max_length=64)] = []
    ports: Annotated[list[PublishedPort], msgspec.Meta(max_length=1024)] = []


class CniRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /cni/del and /cni/check: one attachment of one network. `netns` may be gone (DEL)."""
    container_id: ContainerID
    ifname: CniIfName
    network: NetRef
    netns: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class CniAttachmentRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    container_id: ContainerID
    ifname: CniIfName


class CniGC(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /cni/gc: every CNI endpoint on `network` but these attachments goes."""
    network: NetRef
    valid: Annotated[list[CniAttachmentRef], msgspec.Meta(max_length=100_000)] = []


class CniStatus(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /cni/status: can `network` take attachments now?"""
    network: NetRef


class CniEndpoint(msgspec.Struct, kw_only=True):
    """The answer to /cni/add and /cni/check: what the plugin's CNI result is made of."""
    endpoint_id: ShortText
    network_id: ShortText
    network: ShortText
    ifname: CniIfName
    mac: MAC
    ip: IPv4
    prefix_len: int
    gateway: IPv4 | None = None          # the default route's next hop, when this endpoint gives one
    gw_ifname: CniIfName | None = None   # overlays: the port on the gateway bridge (the way out)
    gw_mac: MAC | None = None
    gw_ip: IPv4 | None = None
    gw_prefix_len: int | None = None
    subnet: ShortText = ""


class CniGCResult(msgspec.Struct, kw_only=True):
    removed: list[ShortText] = []


def owner_id(container_id: str, ifname: str) -> str:
    """A CNI attachment's owner ID: the runtime names an attachment by (container ID, interface name)."""
    return f"{container_id}:{ifname}"
