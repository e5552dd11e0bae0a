"""netweftd's configuration file: TOML whose keys are the daemon's long flags without the dashes.

    data-root = "/var/lib/netweft"
    default-address-pool = ["base=172.17.0.0/16,size=24"]
    metrics-addr = "127.0.0.1:9323"

A flag given on the command line wins over the file. A key that is no flag, or a value of the wrong
type, is refused in one line naming the file and the key, before the daemon does anything.
"""
from __future__ import annotations

import argparse

from netweft.errors import InvalidRequest

NOT_IN_FILE = {"config", "help", "version"}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The file's keys: each long flag of the parser (without --), mapped to its action."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt[2:] not in NOT_IN_FILE:
                out[opt[2:]] = action
    return out


def _check(path: str, key: str, value, action: argparse.Action):
    where = f"{path}: {key}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{where} must be true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise InvalidRequest(f"{where} must be a string or a list of strings")
        return items
    if action.type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"{where} must be a whole number")
        return value
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string (in quotes)")
    if action.choices and value not in action.choices:
        raise InvalidRequest(f"{where} = {value!r} is not one of {', '.join(action.choices)}")
    return value


def load(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """{dest: value} from the file, checked against the parser's flags."""
    import tomllib   # only with --config: half a MiB a daemon without one does not keep
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidRequest(f"config file {path} does not exist; create it or leave --config out") from None
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequest(f"{path}: not valid TOML ({e})") from None
    known = options(parser)
    out = {}
    for key, value in data.items():
        action = known.get(key)
        if action is None:
            raise InvalidRequest(f"{path}: unknown key {key!r}; the keys are the flags of `netweftd --help` "
                                 f"without the dashes: {', '.join(sorted(known))}")
        out[action.dest] = _check(path, key, value, action)
    return out


def apply(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; with --config FILE, the file's values become the defaults the command line overrides.
    A refused file ends the process with one line (exit status 2, as argparse does for bad flags)."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    try:
        values = load(args.config, parser)
    except InvalidRequest as e:
        parser.exit(2, f"netweftd: {e}\n")
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    parser.set_defaults(**{d: v for d, v in values.items() if d not in appended})
    args = parser.parse_args(argv)
    for dest in appended & values.keys():
        if getattr(args, dest) is None:   # a repeatable flag on the command line replaces the file's list
            setattr(args, dest, values[dest])
    return args


def listen_addr(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT of an opt-in TCP listener (--metrics-addr, --dashboard-addr); HOST an IPv4 address."""
    import ipaddress
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        p = int(port) if sep and port.isdigit() else 0
    except ValueError:
        p = 0
    if not 0 < p < 65536:
        raise InvalidRequest(f"invalid {flag} {text!r}: expected IPv4:PORT, e.g. 127.0.0.1:9323")
    return host, p
