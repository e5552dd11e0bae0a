"""Bodies of the local API (unix socket), shaped as Docker's Engine API has them: the API edge.

Unknown fields are ignored, as Docker does (its clients send fields we do not use); known fields are
typed and bounded, so a wrong type or an absurd size is a 400 naming the field.
"""
from __future__ import annotations

from typing import Annotated

import msgspec

from netweft.model.objects import Labels, ShortText

Str = Annotated[str, msgspec.Meta(max_length=256)]


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
