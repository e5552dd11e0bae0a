"""The `netweft` entry point: the hot commands on a lean path, everything else through click.

Importing click and building the command tree costs more than the daemon's answer to `ps` (tens of ms
against one). So `network ls|create|rm`, `ps`, `run -d` and `rm`, written the plain ways, are parsed here by a
small table of their options and sent with the lean client; any argument this parser does not fully
understand (help, a typo, a short-flag cluster, a value click would refuse) goes to click, which then
parses the whole command line and answers exactly as it always has: help, usage errors and all.
"""
from __future__ import annotations

import sys

# option -> (destination, kind): "flag" (no value), "one" (a value; given twice goes to click, which refuses
# it where it should), "many" (repeatable)
_NETWORK_LS = {"-q": ("quiet", "flag"), "--quiet": ("quiet", "flag"), "-f": ("filters", "many"),
               "--filter": ("filters", "many"), "--format": ("fmt", "one"), "--no-trunc": ("no_trunc", "flag")}
_NETWORK_CREATE = {"-d": ("driver", "one"), "--driver": ("driver", "one"), "--subnet": ("subnet", "one"),
                   "--gateway": ("gateway", "one"), "--ip-range": ("ip_range", "one"),
                   "--aux-address": ("aux", "many"), "--internal": ("internal", "flag"),
                   "--attachable": ("attachable", "flag"), "--label": ("label", "many"),
                   "-o": ("opt", "many"), "--opt": ("opt", "many")}
_PS = {"-a": ("all", "flag"), "--all": ("all", "flag"), "-q": ("quiet", "flag"), "--quiet": ("quiet", "flag")}
_RUN = {"-d": ("detach", "flag"), "--detach": ("detach", "flag"), "--name": ("name", "one"),
        "--hostname": ("hostname", "one"), "--network": ("network", "one"), "--net": ("network", "one"),
        "--ip": ("ip", "one"), "--mac-address": ("mac", "one"), "--network-alias": ("alias", "many"),
        "-e": ("env", "many"), "--env": ("env", "many")}
_RM = {"-f": ("force", "flag"), "--force": ("force", "flag")}


class _Unsure(Exception):
    """This argv is for click."""


def parse(args: list[str], spec: dict) -> tuple[dict, list[str]]:
    """Options and positionals as click would read them (interspersed; `--` ends options)."""
    opts: dict = {}
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            pos.extend(args[i:])
            break
        if not a.startswith("-") or a == "-":
            pos.append(a)
            continue
        name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if name not in spec:
            raise _Unsure
        dest, kind = spec[name]
        if kind == "flag":
            if eq:
                raise _Unsure
            opts[dest] = True
            continue
        if not eq:
            if i >= len(args):
                raise _Unsure
            value = args[i]
            i += 1
        if kind == "one":
            if dest in opts:
                raise _Unsure
            opts[dest] = value
        else:
            opts.setdefault(dest, []).append(value)
    return opts, pos


def key_values(items: list[str], allow_bare: bool = False) -> dict[str, str]:
    """validate.parse_key_values for well-formed input; anything it would refuse goes to click to be refused."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if (not sep and not allow_bare) or not key.strip():
            raise _Unsure
        out[key.strip()] = value
    return out


def _lines(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")


def run_lean(argv: list[str]) -> int:
    """Run a hot command and return its exit code; raise _Unsure to leave it to click."""
    host = None
    while argv and argv[0].startswith("-"):
        name, eq, value = argv[0].partition("=")
        if name not in ("-H", "--host") or (eq and name == "-H"):
            raise _Unsure
        if not eq:
            if len(argv) < 2:
                raise _Unsure
            value, argv = argv[1], argv[1:]
        host, argv = value, argv[1:]
    if not argv:
        raise _Unsure
    cmd, rest = argv[0], argv[1:]
    if cmd == "network" and rest:
        cmd, rest = "network " + rest[0], rest[1:]
    spec = {"network ls": _NETWORK_LS, "network create": _NETWORK_CREATE, "ps": _PS,
            "run": _RUN, "rm": _RM}.get(cmd)
    if spec is None:
        raise _Unsure
    o, pos = parse(rest, spec)

    from netweft.cli import render
    from netweft.apiclient.client import ApiError, Client, DaemonUnreachable

    try:
        if cmd == "network ls":
            from netweft.apiclient import leanjson
            fmt = o.get("fmt", "table")
            if pos or fmt not in ("table", "json"):
                raise _Unsure
            filters: dict[str, list[str]] = {}
            for item in o.get("filters", []):
                key, sep, value = item.partition("=")
                if not sep or key not in render.FILTER_KEYS:
                    raise _Unsure
                filters.setdefault(key, []).append(value)
            nets = Client(host).call("GET", "/networks", filters=leanjson.dumps(filters) if filters else None)
            _lines(render.network_ls(nets, o.get("quiet", False), fmt, o.get("no_trunc", False)))
            return 0
        if cmd == "ps":
            if pos:
                raise _Unsure
            ctrs = Client(host).call("GET", "/containers/json", all=1 if o.get("all") else None)
            _lines(render.ps(ctrs, o.get("quiet", False)))
            return 0
        if cmd == "network create":
            if len(pos) != 1:
                raise _Unsure
            body = render.network_create_body(
                pos[0], o.get("driver", "bridge"), o.get("subnet"), o.get("gateway"), o.get("ip_range"),
                key_values(o.get("aux", [])), o.get("internal", False), o.get("attachable", False),
                key_values(o.get("label", [])), key_values(o.get("opt", []), allow_bare=True))
            _lines([Client(host).call("POST", "/networks/create", body)["Id"]])
            return 0
        if cmd == "run":
            if not o.get("detach") or not pos:  # attached runs stream logs: click's path
                raise _Unsure
            body = render.run_body(o.get("name"), o.get("hostname"), o.get("network"), o.get("ip"), o.get("mac"),
                                   o.get("alias", []), pos, key_values(o.get("env", [])))
            _lines([Client(host).call("POST", "/containers/create", body)["Id"]])
            return 0
        # rm: several at once, each answered in order, as main.rm (network rm is click's: removing the
        # ingress network asks first)
        if not pos:
            raise _Unsure
        from netweft.cli.remove import remove
        return remove(Client(host), pos, bool(o.get("force")))
    except (ApiError, DaemonUnreachable) as e:
        sys.stderr.write(f"Error: {e}\n")
        return 1


def main() -> None:
    try:
        code = run_lean(sys.argv[1:])
        sys.stdout.flush()
    except _Unsure:
        code = None
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `netweft ... | head`: the reader is gone, nothing left to say
        sys.stderr.close()
        code = 1
    if code is None:  # outside the except block: click's errors must not carry this one as their context
        from netweft.cli.main import main as click_main
        click_main()
        return
    sys.exit(code)


if __name__ == "__main__":
    main()
