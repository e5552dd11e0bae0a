"""Pure validation of what operators type: names, labels, options, MTU, addresses. No I/O."""
from __future__ import annotations

import ipaddress
import re

from netweft.errors import InvalidRequest

# Matched with fullmatch: `$` would let a trailing newline through ("web\n").
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
                         r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*")
IFNAME_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")

MTU_OPT = "com.docker.network.driver.mtu"
BRIDGE_NAME_OPT = "com.docker.network.bridge.name"
PARENT_OPT = "parent"
VXLANID_OPT = "com.docker.network.driver.overlay.vxlanid_list"
ENCRYPTED_OPT = "encrypted"
VNI_LAST = (1 << 24) - 1
PROBE_VNI = 4095   # the data-path probes' VXLAN ID (dataplane/probe.py): no overlay may take it

# The driver options each driver understands (`-o KEY=VALUE`); anything else is refused, not ignored.
DRIVER_OPTIONS = {
    "bridge": (MTU_OPT, BRIDGE_NAME_OPT, PARENT_OPT),
    "overlay": (MTU_OPT, VXLANID_OPT, ENCRYPTED_OPT),
}


def check_name(name: str, what: str) -> str:
    if not name or len(name) > 64 or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit, at most 64 characters)")
    return name


def check_hostname(name: str) -> str:
    if len(name) > 64 or not HOSTNAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid hostname {name!r}: use letters, digits and '-' "
                             "(dot-separated labels, at most 64 characters)")
    return name


def check_ifname(name: str, what: str) -> str:
    if not IFNAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid {what} {name!r}: an interface name has 1-15 letters, digits, '_', '.', '-'")
    return name


def parse_mtu(text: str | int) -> int:
    try:
        mtu = int(text)
    except (TypeError, ValueError):
        raise InvalidRequest(f"invalid MTU {text!r}: expected a number between 68 and 65535") from None
    if not 68 <= mtu <= 65535:
        raise InvalidRequest(f"invalid MTU {mtu}: it must be between 68 and 65535")
    return mtu


def parse_vni(text: str) -> int:
    # Digits only: int() would also take " 12", "+12" and "1_2", and grind through a huge string.
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise InvalidRequest(f"invalid VXLAN ID {str(text)[:32]!r}: expected a number between 1 and {VNI_LAST}")
    vni = int(text)
    if not 1 <= vni <= VNI_LAST:
        raise InvalidRequest(f"invalid VXLAN ID {vni}: it must be between 1 and {VNI_LAST}")
    if vni == PROBE_VNI:
        raise InvalidRequest(f"VXLAN ID {vni} is reserved for netweft's data-path probes; choose another")
    return vni


def parse_key_values(items: list[str], what: str, allow_bare: bool = False) -> dict[str, str]:
    """K=V pairs (labels, options, aux addresses); an empty key or a missing '=' is refused,
    except that a bare KEY means KEY="" where allow_bare (driver options such as `-o encrypted`)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if (not sep and not allow_bare) or not key.strip():
            raise InvalidRequest(f"invalid {what} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def check_driver(driver: str) -> str:
    if driver not in DRIVER_OPTIONS:
        raise InvalidRequest(f"unknown driver {driver!r}: use -d bridge or -d overlay")
    return driver


def check_driver_options(driver: str, options: dict[str, str]) -> dict[str, str]:
    """Refuse options the driver does not know (a typo silently ignored is a network built wrong),
    and the values of known ones that can be judged without looking at the host."""
    known = DRIVER_OPTIONS[check_driver(driver)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidRequest(f"unknown {driver} driver option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(k[:64]) for k in unknown[:5])}{' ...' if len(unknown) > 5 else ''}: "
                             f"the known ones are {', '.join(known)}")
    if MTU_OPT in options:
        parse_mtu(options[MTU_OPT])
    if BRIDGE_NAME_OPT in options:
        check_ifname(options[BRIDGE_NAME_OPT], "bridge name")
    if PARENT_OPT in options:
        check_parent(options[PARENT_OPT])
    if VXLANID_OPT in options:
        parse_vni(options[VXLANID_OPT])
    return options


def check_parent(name: str) -> str:
    """A bridge network's parent (-o parent=IFACE) as typed: a plausible port for a bridge."""
    if not name:
        raise InvalidRequest("option parent needs an interface name, e.g. -o parent=eth1")
    check_ifname(name, "parent interface")
    if name == "lo":
        raise InvalidRequest("parent interface 'lo' is the loopback interface: it reaches no LAN and cannot be "
                             "a bridge port; name a physical, VLAN or dummy interface, e.g. -o parent=eth1")
    return name


def check_parent_link(name: str, kind: str | None, master: str | None, loopback: bool = False) -> None:
    """A parent interface as the host has it (facts read by the data plane): kind is the link kind
    ("bridge", "vxlan", ... or None for a physical one), master the bridge it is already a port of."""
    if loopback:
        raise InvalidRequest(f"parent interface {name!r} is a loopback interface: it reaches no LAN and cannot "
                             "be a bridge port; name a physical, VLAN or dummy interface")
    if kind == "bridge":
        raise InvalidRequest(f"parent interface {name!r} is itself a bridge and cannot be a port of another; "
                             "name a physical, VLAN or dummy interface")
    if master:
        raise InvalidRequest(f"parent interface {name!r} is already a port of {master!r}; free it first "
                             f"(ip link set {name} nomaster) or name another interface")


def parse_node_address(text: str, what: str) -> str:
    """An address other hosts will reach this one at (advertise address, heartbeat, VTEP): a unicast IPv4
    address that means the same host from everywhere, so not 0.0.0.0, loopback, multicast or broadcast."""
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidRequest(f"invalid {what} {text!r}: expected an IPv4 address such as 192.0.2.10") from None
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise InvalidRequest(f"invalid {what} {text}: other hosts cannot reach this host at it; "
                             "use an address of one of its interfaces")
    return str(ip)
