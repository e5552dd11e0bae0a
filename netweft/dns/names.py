"""The names a host's resolver answers, per network: pure data, no I/O.

Each network has its own table (name -> addresses, address -> name for reverse lookups), precomputed
when the network's endpoints or services change, so a query costs a dictionary lookup per network the
asker is on. A container is answered only from the tables of the networks it shares with the target:
that is the scoping, and it falls out of asking only the asker's networks.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_ADDRESSES = 256      # per name: a service's tasks; more would not fit a DNS answer anyway


def normalize(name: str) -> str:
    """A query name as the tables key it: lowercase, without the root dot."""
    return name.rstrip(".").lower()


def reverse_name(ip: str) -> str:
    """The in-addr.arpa name of an IPv4 address (198.18.0.5 -> 5.0.18.198.in-addr.arpa)."""
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@dataclass(frozen=True, slots=True)
class NameRecord:
    """One name on one network: a container's name or alias, a service, tasks.<service>, pointing at
    one or more IPv4 addresses. `reverse`: the addresses' PTR answer is this name."""
    name: str
    addresses: tuple[str, ...]
    reverse: bool = True


@dataclass(slots=True)
class NetworkNames:
    forward: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ptr: dict[str, str] = field(default_factory=dict)   # reverse name -> name


def build(records: Iterable[NameRecord]) -> NetworkNames:
    """One network's table. A name given twice (two containers with one alias) answers with every
    address, in the order given, without repeats; names that are not valid DNS names are skipped."""
    forward: dict[str, list[str]] = {}
    ptr: dict[str, str] = {}
    for r in records:
        key = normalize(r.name)
        if not _valid_name(key):
            continue
        addrs = forward.setdefault(key, [])
        for a in r.addresses:
            if a not in addrs and len(addrs) < MAX_ADDRESSES and _valid_ipv4(a):
                addrs.append(a)
                if r.reverse:
                    ptr.setdefault(reverse_name(a), r.name.rstrip("."))
    return NetworkNames({k: tuple(v) for k, v in forward.items()}, ptr)


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


def _valid_ipv4(a: str) -> bool:
    try:
        ipaddress.IPv4Address(a)
        return True
    except ValueError:
        return False


class NameTable:
    """Every network's table on this host, and a generation that moves on each change (answer caches
    compare it)."""

    def __init__(self) -> None:
        self._nets: dict[str, NetworkNames] = {}
        self._records: dict[str, tuple[NameRecord, ...]] = {}
        self.generation = 0

    def set_network(self, net_id: str, records: Iterable[NameRecord]) -> bool:
        """Replace a network's names; True if they changed."""
        records = tuple(records)
        if self._records.get(net_id) == records:
            return False
        self._records[net_id] = records
        self._nets[net_id] = build(records)
        self.generation += 1
        return True

    def remove_network(self, net_id: str) -> bool:
        if net_id not in self._nets:
            return False
        del self._nets[net_id], self._records[net_id]
        self.generation += 1
        return True

    def networks(self) -> list[str]:
        return list(self._nets)

    def records(self, net_id: str) -> tuple[NameRecord, ...]:
        return self._records.get(net_id, ())

    def lookup(self, networks: Iterable[str], name: str) -> tuple[str, ...] | None:
        """Addresses of `name` on the asker's networks (the union, first network first), or None if no
        network of the asker knows it (then the query is forwarded)."""
        key = normalize(name)
        found: list[str] | None = None
        for net_id in networks:
            table = self._nets.get(net_id)
            addrs = table.forward.get(key) if table is not None else None
            if addrs:
                if found is None:
                    found = list(addrs)
                else:
                    found.extend(a for a in addrs if a not in found)
        return tuple(found) if found is not None else None

    def lookup_ptr(self, networks: Iterable[str], name: str) -> str | None:
        key = normalize(name)
        for net_id in networks:
            table = self._nets.get(net_id)
            if table is not None and key in table.ptr:
                return table.ptr[key]
        return None
