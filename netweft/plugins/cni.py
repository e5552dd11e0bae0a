"""The CNI plugin `netweft`: a short-lived process a runtime (podman, containerd, Kubernetes) runs per
command, that asks the local netweftd to attach the runtime's namespace to a netweft network.

Network configuration (stdin), per the CNI spec 0.4.0 / 1.0.0 / 1.1.0:
    {"cniVersion": "1.0.0", "name": "ov", "type": "netweft", "network": "ov",
     "socket": "unix:///run/netweft/netweft.sock", "log": "/var/log/netweft-cni.log"}
`network` defaults to `name`; `socket` to the standard one; `log`, if given, gets one JSON line per
command with the plugin's own time. Capabilities it honours (runtimeConfig): ips, mac, aliases,
portMappings (published by netweftd);
CNI_ARGS IP= and MAC= too (podman's --ip and --mac-address arrive there).

Commands: ADD, DEL, CHECK, VERSION; with 1.1.0 also STATUS and GC. A result goes to stdout; an error is
CNI's error JSON {cniVersion, code, msg, details} on stdout with a non-zero exit, its msg one line.
DEL succeeds when the daemon, the namespace or the endpoint is already gone (the runtime must be able
to clean up); GC removes the network's CNI endpoints the runtime no longer lists.

Kept quick to start: the standard library's json and socket, nothing of the daemon's (netweftd decodes
what it is sent with its typed model).
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time

SUPPORTED = ("0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/netweft/netweft.sock"
TIMEOUT = 120.0        # an overlay attach may wait on a manager; kubelet's own timeout is longer

# CNI's well-known error codes (SPEC.md "Error"); 100 and up are this plugin's own.
E_VERSION, E_FIELD, E_UNKNOWN_CONTAINER, E_ENV, E_IO, E_DECODE, E_CONFIG, E_TRY_AGAIN = 1, 2, 3, 4, 5, 6, 7, 11
E_NOT_AVAILABLE = 50
E_REFUSED = 100        # netweftd refused the request; msg is its reason
E_CHECK = 101          # CHECK: the container's attachment is not what prevResult says

_CONTAINER_ID = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,255}\Z")
_IFNAME = re.compile(r"\A[a-zA-Z0-9_.-]{1,15}\Z")
_MAC = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# ------------------------------------------------------------------ the network configuration
class NetConf:
    """The fields of the network configuration this plugin reads, checked (others are the runtime's)."""

    def __init__(self, doc: dict):
        self.cniVersion = _field(doc, "cniVersion", str, required=True)
        self.name = _field(doc, "name", str, required=True)
        self.type = _field(doc, "type", str, required=True)
        self.network = _field(doc, "network", str)
        self.socket = _field(doc, "socket", str)
        self.log = _field(doc, "log", str)
        rc = _field(doc, "runtimeConfig", dict) or {}
        self.ips = _strings(rc, "ips", "runtimeConfig.")
        self.mac = _field(rc, "mac", str, "runtimeConfig.")
        # CNI's convention is {"<network name>": [names]}; a plain list is taken too.
        aliases = rc.get("aliases")
        self.aliases = _strings({"aliases": aliases.get(self.name, [])} if isinstance(aliases, dict) else rc,
                                "aliases", "runtimeConfig.")
        self.ports = []
        for m in _field(rc, "portMappings", list, "runtimeConfig.") or []:
            if not isinstance(m, dict) or not all(isinstance(m.get(k), int) for k in ("hostPort", "containerPort")):
                raise CniError(E_CONFIG, "invalid network configuration: runtimeConfig.portMappings holds an entry "
                               "without hostPort and containerPort numbers")
            proto, host_ip = m.get("protocol") or "tcp", m.get("hostIP") or ""
            if not isinstance(proto, str) or not isinstance(host_ip, str):
                raise CniError(E_CONFIG, "invalid network configuration: runtimeConfig.portMappings protocol and "
                               "hostIP must be strings")
            self.ports.append({"protocol": proto.lower(), "host_port": m["hostPort"], "host_ip": host_ip,
                               "container_port": m["containerPort"]})
        self.prevResult = _field(doc, "prevResult", dict) or None
        self.valid_attachments = []
        for a in _field(doc, "cni.dev/valid-attachments", list) or []:
            if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) \
                    or not isinstance(a.get("ifname"), str):
                raise CniError(E_CONFIG, "invalid network configuration: cni.dev/valid-attachments holds an entry "
                               "without containerID and ifname strings")
            self.valid_attachments.append((a["containerID"], a["ifname"]))


def _field(doc: dict, key: str, type_: type, where: str = "", required: bool = False):
    value = doc.get(key)
    if value is None:
        if required:
            raise CniError(E_CONFIG, f"invalid network configuration: {where}{key} is missing")
        return "" if type_ is str else None
    if not isinstance(value, type_):
        raise CniError(E_CONFIG, f"invalid network configuration: {where}{key} must be a "
                       f"{ {str: 'string', dict: 'object', list: 'list'}[type_] }, not {type(value).__name__}")
    if type_ is str and len(value) > 4096:
        raise CniError(E_CONFIG, f"invalid network configuration: {where}{key} is longer than 4096 characters")
    return value


def _strings(doc: dict, key: str, where: str) -> list[str]:
    values = _field(doc, key, list, where) or []
    if len(values) > 64 or not all(isinstance(v, str) and len(v) <= 256 for v in values):
        raise CniError(E_CONFIG, f"invalid network configuration: {where}{key} must be a list of at most 64 "
                       "short strings")
    return values


def parse_conf(data: bytes) -> NetConf:
    if not data.strip():
        raise CniError(E_DECODE, "no network configuration on stdin: the runtime must send it as JSON")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CniError(E_DECODE, f"the network configuration is not JSON: {_words(str(e))}") from None
    if not isinstance(doc, dict):
        raise CniError(E_DECODE, "the network configuration is not a JSON object")
    conf = NetConf(doc)
    if conf.cniVersion not in SUPPORTED:
        raise CniError(E_VERSION, f"CNI version {conf.cniVersion[:20]!r} is not supported; use one of "
                       f"{', '.join(SUPPORTED)}")
    if conf.type != "netweft":
        raise CniError(E_CONFIG, f"this is the netweft plugin, the configuration says type {conf.type[:40]!r}")
    if not conf.name.strip():
        raise CniError(E_CONFIG, "the network configuration has no name")
    if conf.socket and not conf.socket.startswith("unix:///"):
        raise CniError(E_CONFIG, f"socket {conf.socket[:80]!r} is not unix:///PATH")
    if conf.mac and not _MAC.match(conf.mac.lower()):
        raise CniError(E_CONFIG, f"runtimeConfig.mac {conf.mac[:40]!r} is not a MAC address")
    return conf


def _words(text: str) -> str:
    return " ".join(text.split())[:300]


def socket_path(conf: NetConf) -> str:
    return conf.socket[len("unix://"):] if conf.socket else DEFAULT_SOCKET


def cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS "K1=V1;K2=V2" as a dict (malformed pairs are an error: the runtime sent them)."""
    out = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(E_ENV, f"CNI_ARGS has a pair without KEY=VALUE: {pair[:80]!r}")
        out[key] = value
    return out


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# ------------------------------------------------------------------ talking to netweftd
class DaemonUnreachable(Exception):
    pass


def call(sock: str, path: str, body: dict, timeout: float = TIMEOUT) -> tuple[int, dict]:
    """One HTTP/1.0 POST to netweftd over its unix socket: (status, JSON answer)."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.0\r\nHost: netweftd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(sock)
        except OSError as e:
            raise DaemonUnreachable(f"cannot reach netweftd at {sock} ({e.strerror or e}); is it running?") from None
        s.sendall(head + data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise DaemonUnreachable(f"netweftd at {sock} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise DaemonUnreachable(f"netweftd at {sock} closed the connection ({e.strerror or e})") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    header, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(header.split(b" ", 2)[1])
        answer = json.loads(payload) if payload.strip() else {}
    except (IndexError, ValueError):
        raise DaemonUnreachable(f"netweftd at {sock} answered something that is not its API") from None
    return status, answer if isinstance(answer, dict) else {}


def ask(conf: NetConf, path: str, body: dict, unreachable_code: int = E_TRY_AGAIN) -> dict:
    try:
        status, answer = call(socket_path(conf), path, body)
    except DaemonUnreachable as e:
        raise CniError(unreachable_code, str(e)) from None
    if status >= 400:
        msg = str(answer.get("message") or f"netweftd answered {status}")
        code = E_NOT_AVAILABLE if path == "/cni/status" else E_REFUSED
        raise CniError(code, " ".join(msg.split()), f"netweftd status {status}")
    return answer


# ------------------------------------------------------------------ results
def build_result(version: str, ep: dict, netns: str) -> dict:
    """A CNI result (SPEC.md "Success") for one endpoint: its interface and, on overlays, the port on the
    gateway bridge that carries the default route."""
    v4 = {"version": "4"} if version_key(version) < (1, 0, 0) else {}
    interfaces = [{"name": ep["ifname"], "mac": ep["mac"], "sandbox": netns}]
    ips = [{**v4, "address": f"{ep['ip']}/{ep['prefix_len']}", "interface": 0}]
    routes = []
    if ep.get("gw_ifname") and ep.get("gw_ip"):
        interfaces.append({"name": ep["gw_ifname"], "mac": ep["gw_mac"], "sandbox": netns})
        ips.append({**v4, "address": f"{ep['gw_ip']}/{ep['gw_prefix_len']}", "gateway": ep["gateway"],
                    "interface": 1})
    elif ep.get("gateway"):
        ips[0]["gateway"] = ep["gateway"]
    if ep.get("gateway"):
        routes.append({"dst": "0.0.0.0/0", "gw": ep["gateway"]})
    return {"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": {}}


# ------------------------------------------------------------------ commands
def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(E_ENV, f"{name} is not set: the runtime must set it for CNI_COMMAND "
                       f"{os.environ.get('CNI_COMMAND', '')[:10]}")
    return value


def _attachment_env(need_netns: bool) -> tuple[str, str, str]:
    cid, ifname = _env("CNI_CONTAINERID"), _env("CNI_IFNAME")
    netns = _env("CNI_NETNS", required=need_netns)
    if not _CONTAINER_ID.match(cid):
        raise CniError(E_ENV, f"CNI_CONTAINERID {cid[:80]!r} is not alphanumeric plus _ . -")
    if not _IFNAME.match(ifname):
        raise CniError(E_ENV, f"CNI_IFNAME {ifname[:80]!r} is not an interface name (at most 15 of a-z 0-9 _ . -)")
    if netns and not netns.startswith("/"):
        raise CniError(E_ENV, f"CNI_NETNS {netns[:80]!r} is not an absolute path")
    return cid, ifname, netns


def cmd_add(conf: NetConf) -> dict:
    cid, ifname, netns = _attachment_env(need_netns=True)
    if not os.path.exists(netns):
        raise CniError(E_UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
    args = cni_args(os.environ.get("CNI_ARGS", ""))
    ip = args.get("IP") or (conf.ips[0] if conf.ips else None)
    if ip and "/" in ip:
        ip = ip.split("/", 1)[0]   # runtimeConfig ips may carry a prefix length
    mac = args.get("MAC") or conf.mac or None
    body = {"container_id": cid, "ifname": ifname, "netns": netns, "network": conf.network or conf.name,
            "ip": ip, "mac": mac.lower() if mac else None, "aliases": list(conf.aliases), "ports": conf.ports}
    ep = ask(conf, "/cni/add", body)
    return build_result(conf.cniVersion, ep, netns)


def cmd_del(conf: NetConf) -> None:
    cid, ifname, netns = _attachment_env(need_netns=False)
    body = {"container_id": cid, "ifname": ifname, "network": conf.network or conf.name, "netns": netns}
    try:
        ask(conf, "/cni/del", body)
    except CniError as e:
        if e.code == E_TRY_AGAIN:
            return   # no daemon: nothing it holds can be removed now; its GC or the next DEL does it
        raise


def cmd_check(conf: NetConf) -> None:
    cid, ifname, netns = _attachment_env(need_netns=True)
    if conf.prevResult is None:
        raise CniError(E_CONFIG, "CHECK needs prevResult in the network configuration")
    body = {"container_id": cid, "ifname": ifname, "network": conf.network or conf.name, "netns": netns}
    ep = ask(conf, "/cni/check", body)
    prev = conf.prevResult
    want = f"{ep['ip']}/{ep['prefix_len']}"
    if not any(isinstance(i, dict) and i.get("address") == want for i in prev.get("ips") or []):
        raise CniError(E_CHECK, f"prevResult has no address {want}, which {ifname} has")
    if not any(isinstance(i, dict) and i.get("name") == ifname and str(i.get("mac", ep["mac"])).lower() == ep["mac"]
               for i in prev.get("interfaces") or []):
        raise CniError(E_CHECK, f"prevResult has no interface {ifname} with MAC {ep['mac']}")


def cmd_status(conf: NetConf) -> None:
    ask(conf, "/cni/status", {"network": conf.network or conf.name}, unreachable_code=E_NOT_AVAILABLE)


def cmd_gc(conf: NetConf) -> None:
    valid = [{"container_id": cid, "ifname": ifname} for cid, ifname in conf.valid_attachments
             if _CONTAINER_ID.match(cid) and _IFNAME.match(ifname)]
    ask(conf, "/cni/gc", {"network": conf.network or conf.name, "valid": valid})


def run(command: str, stdin: bytes) -> dict | None:
    """One CNI command; returns what goes to stdout (None: nothing), raises CniError."""
    if command == "VERSION":
        version = "1.1.0"
        if stdin.strip():
            try:
                version = str(json.loads(stdin).get("cniVersion") or version)
            except (ValueError, AttributeError):
                pass
        return {"cniVersion": version, "supportedVersions": list(SUPPORTED)}
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        raise CniError(E_ENV, f"CNI_COMMAND {command[:20]!r} is not ADD, DEL, CHECK, VERSION, STATUS or GC")
    conf = parse_conf(stdin)
    if command in ("STATUS", "GC") and version_key(conf.cniVersion) < (1, 1, 0):
        raise CniError(E_VERSION, f"{command} needs cniVersion 1.1.0; the configuration says {conf.cniVersion}")
    if command == "ADD":
        return cmd_add(conf)
    {"DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}[command](conf)
    return None


def _log(conf_bytes: bytes, command: str, started: float, error: CniError | None) -> None:
    """One JSON line per command to the configuration's `log`, with the plugin's own time."""
    try:
        path = json.loads(conf_bytes).get("log") if conf_bytes.strip() else None
    except (ValueError, AttributeError):
        return
    if not isinstance(path, str) or not path.startswith("/"):
        return
    line = {"time": time.time(), "command": command, "container": os.environ.get("CNI_CONTAINERID", "")[:64],
            "ms": round((time.perf_counter() - started) * 1000, 2), "ok": error is None}
    if error is not None:
        line["code"], line["msg"] = error.code, error.msg
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    command = os.environ.get("CNI_COMMAND", "")
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        stdin = b""   # then the command says what is missing
    version = "1.1.0"
    try:
        v = json.loads(stdin).get("cniVersion") if stdin.strip() else None
        version = v if isinstance(v, str) and v in SUPPORTED else version
    except (ValueError, AttributeError):
        pass
    err = None
    try:
        if not command:
            raise CniError(E_ENV, "CNI_COMMAND is not set: this is a CNI plugin, run by a container runtime")
        out = run(command, stdin)
        if out is not None:
            sys.stdout.write(json.dumps(out) + "\n")
    except CniError as e:
        err = e
        sys.stdout.write(json.dumps({"cniVersion": version, "code": e.code, "msg": e.msg,
                                     "details": e.details}) + "\n")
    except Exception as e:   # a bug: still CNI's error JSON, one line, never a traceback
        err = CniError(E_REFUSED + 99, f"the netweft CNI plugin failed ({type(e).__name__}: {_words(str(e))})")
        sys.stdout.write(json.dumps({"cniVersion": version, "code": err.code, "msg": err.msg, "details": ""}) + "\n")
    sys.stdout.flush()
    if command in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        _log(stdin, command, started, err)
    return 1 if err else 0


if __name__ == "__main__":
    sys.exit(main())
