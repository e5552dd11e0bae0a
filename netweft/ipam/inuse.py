"""Addresses in use in one subnet, kept up to date, with the lowest free one found in amortized O(1).

What an allocator asks on every attach: `allocate_ip` rebuilds the set of used addresses and scans from
the first host each time, which grows with the endpoints (thousands on one host's gateway bridge). Here
the set is kept as endpoints come and go, and the search starts from a hint below which nothing is free.
Pure: no I/O.
"""
from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

from netweft.ipam.address import SubnetConfig, usable_hosts


class InUse:
    def __init__(self, cfg: SubnetConfig):
        self.cfg = cfg
        self.first, self.last = usable_hosts(cfg.subnet)
        if cfg.ip_range is not None:
            self.first = max(self.first, int(cfg.ip_range.network_address))
            self.last = min(self.last, int(cfg.ip_range.broadcast_address))
        self.reserved = {int(a) for a in cfg.reserved()}
        self.used: Counter[int] = Counter()   # a count: two records naming one address release it once each
        self._low = self.first                 # no free address below it

    def __len__(self) -> int:
        return len(self.used)

    def add(self, ip: IPv4Address | str) -> None:
        self.used[int(IPv4Address(ip))] += 1

    def discard(self, ip: IPv4Address | str) -> None:
        n = int(IPv4Address(ip))
        c = self.used.get(n, 0)
        if c > 1:
            self.used[n] = c - 1
        elif c == 1:
            del self.used[n]
            self._low = min(self._low, n)

    def lowest_free(self, also: set[int] = frozenset()) -> IPv4Address | None:
        """The lowest address of the range neither reserved, used nor in `also` (claims in flight, not
        remembered); None when there is none."""
        n = self._low
        while n <= self.last and (n in self.used or n in self.reserved):
            n += 1
        self._low = n   # below n nothing is free; `also` is not remembered (claims come and go)
        while n <= self.last and (n in self.used or n in self.reserved or n in also):
            n += 1
        return IPv4Address(n) if n <= self.last else None
