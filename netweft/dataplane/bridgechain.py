"""Bridges past the kernel's port limit: a bridge and its extension bridges, acting as one.

A Linux bridge takes at most 1,023 ports (BR_MAX_PORTS is 1,024 and port number 0 is never used): the
next `ip link set ... master` is refused with EXFULL ("Exchange full"). An overlay gives every container
one port on its sandbox's br0 and one on the host's gateway bridge, so both would stop near 1,000
containers per host.

The layout (the choice is argued in dataplane/overlay.py's module docstring):

    br0 ── vxlan0, containers 1..FIRST_PORTS, br0-1a, br0-2a, ...
     └─ br0-1a ═ veth ═ br0-1b ── br0-1 (an extension: no address) ── the next EXTENSION_PORTS containers
     └─ br0-2a ═ veth ═ br0-2b ── br0-2 ── ...

The first bridge keeps its name, address and role (br0 with the overlay's gateway address; the gateway
bridge with the egress gateway). Extension N is bridge `<first>-N`, joined to the first bridge by the veth
pair `<first>-Na` (a port of the first bridge) and `<first>-Nb` (a port of the extension). A container port
goes to the lowest bridge with room (first fit), so the first ~1,000 containers keep today's one-bridge path
and a port freed on the first bridge is taken again before an extension's.

Pure: names and bookkeeping; dataplane/overlay.py (real) and dataplane/fake.py make the links.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from netweft.errors import PoolExhausted

MAX_PORTS = 1023        # ports one Linux bridge takes (BR_MAX_PORTS - 1: port number 0 is reserved)
FIRST_PORTS = 1000      # container ports on the first bridge; its other 23 ports: vxlan0 and extension links
EXTENSION_PORTS = MAX_PORTS - 1   # an extension's ports, minus its link to the first bridge
MAX_EXTENSIONS = 20     # ≈21,000 containers per chain; each takes a port of the first bridge (≤ 22 left)
NAME_MAX = 11           # a first bridge's name: "-20a" must still fit in IFNAMSIZ (15)


@dataclass(frozen=True)
class Extension:
    number: int         # 1, 2, ...
    bridge: str         # <first>-N
    trunk: str          # <first>-Na: the link's end on the first bridge
    branch: str         # <first>-Nb: the link's end on the extension


def extension(first: str, number: int) -> Extension:
    base = f"{first}-{number}"
    return Extension(number, base, base + "a", base + "b")


def _pattern(first: str) -> re.Pattern:
    return re.compile(re.escape(first) + r"-([1-9][0-9]?)([ab]?)\Z")


def parse(first: str, name: str) -> tuple[int, str] | None:
    """(N, "" | "a" | "b") if `name` is extension N of `first` ("") or one end of its link; else None."""
    if not name.startswith(first + "-"):
        return None
    m = _pattern(first).match(name)
    if m is None or int(m.group(1)) > MAX_EXTENSIONS:
        return None
    return int(m.group(1)), m.group(2)


def is_link(first: str, name: str) -> bool:
    """True for an end of a link between `first` and one of its extensions (not a container port)."""
    found = parse(first, name)
    return found is not None and found[1] != ""


def capacity(number: int) -> int:
    """Container ports bridge `number` of a chain takes (0: the first bridge). Read at call time, so a test
    can make chains grow after a few ports."""
    return FIRST_PORTS if number == 0 else EXTENSION_PORTS


def full_message(first: str, count: int) -> str:
    return (f"bridge {first} is full: {count} container ports on it and its {MAX_EXTENSIONS} extension bridges "
            f"(a Linux bridge takes at most {MAX_PORTS} ports); remove a container on this host, or use "
            "another network")


class Chain:
    """Which bridge of a chain each container port is on, as this process made or last saw it.

    The kernel stays the truth: the owner refreshes this from a dump when it starts using a chain, when a
    bridge was remade, and when the kernel refuses a port as full; between those, each attach and detach
    keeps it in step, so choosing a bridge costs no dump."""

    def __init__(self, first: str):
        self.first = first
        self.where: dict[str, int] = {}   # container port -> bridge number (0: the first)
        self.counts: dict[int, int] = {0: 0}
        self.extensions: set[int] = set()

    def learn(self, ports: dict[str, int], extensions: set[int]) -> None:
        """Start over from what a dump showed: container port -> bridge number, the extensions present."""
        self.where = dict(ports)
        self.extensions = set(extensions)
        self.counts = {0: 0, **{n: 0 for n in self.extensions}}
        for n in self.where.values():
            self.counts[n] = self.counts.get(n, 0) + 1

    def placed(self, port: str, number: int) -> None:
        old = self.where.get(port)
        if old == number:
            return
        if old is not None:
            self.counts[old] -= 1
        self.where[port] = number
        self.counts[number] = self.counts.get(number, 0) + 1
        if number:
            self.extensions.add(number)

    def removed(self, port: str) -> None:
        old = self.where.pop(port, None)
        if old is not None:
            self.counts[old] -= 1

    def choose(self) -> int:
        """The bridge for a new container port: the lowest with room (a new extension if none has).
        PoolExhausted when every extension is taken."""
        for number in range(MAX_EXTENSIONS + 1):
            if self.counts.get(number, 0) < capacity(number):
                return number
        raise PoolExhausted(full_message(self.first, len(self.where)))

    def full(self, number: int) -> None:
        """The kernel said bridge `number` is full: count it so (the caller refreshes from a dump later)."""
        self.counts[number] = max(self.counts.get(number, 0), capacity(number))


def check_first(first: str) -> None:
    """A first bridge's name must leave room for its extensions' names (PoolExhausted when it would grow)."""
    if len(first.encode()) > NAME_MAX:
        raise PoolExhausted(f"bridge {first} is full, and its name is too long (over {NAME_MAX} bytes) to add "
                            "extension bridges; remove a container on this host")
