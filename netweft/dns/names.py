"""The names a host's resolver answers, per network: pure data, no I/O.

Each network has its own table (name -> addresses, address -> name for reverse lookups), precomputed
when the network's endpoints or services change, so a query costs a dictionary lookup per network the
asker is on. A container is answered only from the tables of the networks it shares with the target:
that is the scoping, and it falls out of asking only the asker's networks.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

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


class NetworkNames:
    """One network's table, changed group by group (a group: one endpoint's records), so a change costs what
    it touches, not the size of the network. Groups are ordered by their `order` key; the answers are those
    of `build` over every group's records in that order."""
    __slots__ = ("forward", "ptr", "_groups", "_name_groups", "_addr_names", "_accepted")

    def __init__(self) -> None:
        self.forward: dict[str, tuple[str, ...]] = {}
        self.ptr: dict[str, str] = {}   # reverse name -> name
        self._groups: dict[str, tuple[tuple, tuple[NameRecord, ...]]] = {}
        # name key -> groups with a record of that name: one group ID, or a set of them (most names have one group,
        # and a set of one costs 216 bytes: thousands of containers, two names each)
        self._name_groups: dict[str, str | set[str]] = {}
        self._addr_names: dict[str, dict[str, int]] = {}   # address -> name keys with it (how many records)
        # name key -> address -> (position, reverse, name as given): which record put the address there
        self._accepted: dict[str, dict[str, tuple[tuple, bool, str]]] = {}

    def records(self) -> tuple[NameRecord, ...]:
        return tuple(r for _, recs in sorted(self._groups.values(), key=lambda g: g[0]) for r in recs)

    def update(self, changes: dict[str, tuple[tuple, tuple[NameRecord, ...]] | None]) -> bool:
        """Put (order, records) for each group id, or remove it (None); True if any answer changed."""
        names: set[str] = set()
        for gid, new in changes.items():
            old = self._groups.pop(gid, None)
            if old == new:
                if old is not None:
                    self._groups[gid] = old
                continue
            for group, sign in ((old, -1), (new, 1)):
                if group is None:
                    continue
                for r in group[1]:
                    key = normalize(r.name)
                    if not _valid_name(key):
                        continue
                    names.add(key)
                    if sign > 0:
                        gids = self._name_groups.get(key)
                        if gids is None or gids == gid:
                            self._name_groups[key] = gid
                        elif isinstance(gids, str):
                            self._name_groups[key] = {gids, gid}
                        else:
                            gids.add(gid)
                    for a in set(r.addresses):
                        counts = self._addr_names.setdefault(a, {})
                        counts[key] = counts.get(key, 0) + sign
                        if counts[key] <= 0:
                            del counts[key]
                            if not counts:
                                del self._addr_names[a]
                if sign < 0:
                    for key in {normalize(r.name) for r in group[1]}:
                        gids = self._name_groups.get(key)
                        if gids == gid:
                            del self._name_groups[key]
                        elif isinstance(gids, set):
                            gids.discard(gid)
            if new is not None:
                self._groups[gid] = new
        changed, addrs = False, set()
        for key in names:
            before = self._accepted.pop(key, {})
            after = self._accept(key)
            addrs.update(before, after)
            if after or key in self._name_groups and self._name_groups[key]:
                self._accepted[key] = after
                fwd = tuple(after)
                if self.forward.get(key) != fwd:
                    self.forward[key], changed = fwd, True
            else:
                self._name_groups.pop(key, None)
                if self.forward.pop(key, None) is not None:
                    changed = True
        for a in addrs:
            best = min(((acc[a][0], acc[a][2]) for k in self._addr_names.get(a, ())
                        if (acc := self._accepted.get(k)) is not None and a in acc and acc[a][1]), default=None)
            rname = reverse_name(a)
            if best is None:
                changed |= self.ptr.pop(rname, None) is not None
            elif self.ptr.get(rname) != best[1]:
                self.ptr[rname], changed = best[1], True
        return changed

    def _accept(self, key: str) -> dict[str, tuple[tuple, bool, str]]:
        """The addresses of one name, in answer order, each with the record that put it there."""
        out: dict[str, tuple[tuple, bool, str]] = {}
        gids = self._name_groups.get(key, ())
        for gid in sorted((gids,) if isinstance(gids, str) else gids, key=lambda g: (self._groups[g][0], g)):
            order, recs = self._groups[gid]
            for i, r in enumerate(recs):
                if normalize(r.name) != key:
                    continue
                for j, a in enumerate(r.addresses):
                    if a not in out and len(out) < MAX_ADDRESSES and _valid_ipv4(a):
                        out[a] = ((order, gid, i, j), r.reverse, r.name.rstrip("."))
        return out


def build(records: Iterable[NameRecord]) -> NetworkNames:
    """One network's table. A name given twice (two containers with one alias) answers with every
    address, in the order given, without repeats; names that are not valid DNS names are skipped."""
    names = NetworkNames()
    names.update({str(i): ((i,), (r,)) for i, r in enumerate(records)})
    return names


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
        self.generation = 0

    def set_network(self, net_id: str, records: Iterable[NameRecord]) -> bool:
        """Replace a network's names; True if they changed."""
        records = tuple(records)
        old = self._nets.get(net_id)
        if old is not None and old.records() == records:
            return False
        self._nets[net_id] = build(records)
        self.generation += 1
        return True

    def update_network(self, net_id: str, changes: dict[str, tuple[tuple, tuple[NameRecord, ...]] | None]) -> bool:
        """Change some groups of a network's names (see NetworkNames.update); a network left without groups
        is removed. True if its answers changed."""
        table = self._nets.get(net_id)
        if table is None:
            if not any(changes.values()):
                return False
            table = self._nets[net_id] = NetworkNames()
        changed = table.update(changes)
        if not table._groups:
            del self._nets[net_id]
        if changed:
            self.generation += 1
        return changed

    def remove_network(self, net_id: str) -> bool:
        if net_id not in self._nets:
            return False
        del self._nets[net_id]
        self.generation += 1
        return True

    def networks(self) -> list[str]:
        return list(self._nets)

    def records(self, net_id: str) -> tuple[NameRecord, ...]:
        table = self._nets.get(net_id)
        return table.records() if table is not None else ()
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
