"""Pure validation of what operators type: names, labels, options, MTU. No I/O."""
from __future__ import annotations

import re

from netweft.errors import InvalidRequest

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$")
IFNAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")

MTU_OPT = "com.docker.network.driver.mtu"
BRIDGE_NAME_OPT = "com.docker.network.bridge.name"
PARENT_OPT = "parent"
VXLANID_OPT = "com.docker.network.driver.overlay.vxlanid_list"
ENCRYPTED_OPT = "encrypted"


def check_name(name: str, what: str) -> str:
    if not name or len(name) > 64 or not NAME_RE.match(name):
        raise InvalidRequest(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit, at most 64 characters)")
    return name


def check_hostname(name: str) -> str:
    if not HOSTNAME_RE.match(name) or len(name) > 64:
        raise InvalidRequest(f"invalid hostname {name!r}: use letters, digits and '-' "
                             "(dot-separated labels, at most 64 characters)")
    return name


def check_ifname(name: str, what: str) -> str:
    if not IFNAME_RE.match(name):
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
