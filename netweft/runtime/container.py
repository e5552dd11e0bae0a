"""Start, inspect and stop containers; called by the daemon (all synchronous and quick).

A container is a process in its own network, UTS and mount namespaces, a child of the host's one
supervisor (netweft.runtime.supervisor, started here when missing), which records its pid and exit code in
its state directory, so containers survive daemon restarts. There is no pid namespace: stop() signals the
container's process group, and the supervisor kills what is left of it when the main process exits.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from netweft.errors import Conflict, InvalidRequest, NetweftError
from netweft.runtime.launch import proc_starttime

START_TIMEOUT = 15.0   # a loaded host (2 cores, dozens of daemons) takes seconds to fork and set one up
POLL_INTERVAL = 0.02
# After the container process is gone, how long the supervisor may take to write exit_code.
EXIT_CODE_GRACE = 3.0
SUPERVISOR_SOCKET = "supervisor.sock"


class ContainerError(NetweftError):
    """A container could not be started."""
    status = 500


def _path(state_dir, name):
    return os.path.join(state_dir, name)


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _last_log_line(log):
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [l.strip() for l in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [l for l in lines if l]
    return lines[-1] if lines else ""


def _validate(spec):
    for key in ("log", "state_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise InvalidRequest(f"container spec needs {key!r} (a path)")
    cmd = spec.get("cmd")
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise InvalidRequest("container spec needs 'cmd', a non-empty list of strings")
    hostname = spec.get("hostname") or ""
    if len(hostname.encode()) > 64:
        raise InvalidRequest(f"hostname {hostname!r} is longer than 64 bytes")


def _supervisor_env():
    # The supervisor must import netweft even if it is not installed (e.g. run from a checkout).
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def supervisor_socket(spec: dict) -> str:
    """The supervisor's socket: the spec's `supervisor`, else SUPERVISOR_SOCKET next to the state dir."""
    return spec.get("supervisor") or os.path.join(os.path.dirname(os.path.abspath(spec["state_dir"])),
                                                  SUPERVISOR_SOCKET)


def _spawn_supervisor(path: str) -> None:
    """Start the supervisor of `path`; returns once it listens (or another one does)."""
    with open(path + ".log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "netweft.runtime.supervisor", path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                start_new_session=True, cwd="/", env=_supervisor_env())
    try:
        returncode = proc.wait(timeout=START_TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        returncode = None
    if returncode != 0:
        raise ContainerError(f"the container supervisor did not start: {_last_log_line(path + '.log')}")


def supervisor_call(path: str, request: dict, timeout: float = START_TIMEOUT) -> dict:
    """One request to the supervisor of `path`, started first if nobody listens there."""
    if len(path.encode()) > 107:
        raise ContainerError(f"supervisor socket path {path!r} is longer than a unix socket allows (107 bytes): "
                             "use a shorter --exec-root")
    for attempt in range(2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                if attempt:
                    raise ContainerError(f"the container supervisor at {path} does not answer; "
                                         f"see {path}.log") from None
                _spawn_supervisor(path)
                continue
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ContainerError(f"the container supervisor at {path} did not answer within {timeout:g} s") from None
        finally:
            s.close()
        try:
            return json.loads(data)
        except ValueError:
            raise ContainerError(f"the container supervisor at {path} hung up without an answer; "
                                 f"see {path}.log") from None
    raise AssertionError("not reached")


def start(spec: dict) -> int:
    """Start a container and return its pid. Raises ContainerError (with the log's last
    line) if it could not be started, e.g. its command does not exist (exit code 127)."""
    _validate(spec)
    state_dir = spec["state_dir"]
    os.makedirs(state_dir, exist_ok=True)
    if status(state_dir)[0] == "running":
        raise Conflict(f"a container is already running from {state_dir}")
    for name in ("pid", "exit_code", "starttime"):
        try:
            os.unlink(_path(state_dir, name))
        except FileNotFoundError:
            pass
    reply = supervisor_call(supervisor_socket(spec), {"op": "start", "spec": spec})
    if isinstance(reply.get("pid"), int):
        return reply["pid"]
    if "exit_code" in reply:
        raise ContainerError(f"container failed to start (exit code {reply['exit_code']}): "
                             f"{_last_log_line(spec['log']) or reply.get('error', '')}")
    raise ContainerError(f"container did not start: {reply.get('error') or 'the supervisor gave no reason'}")


def status(state_dir):
    """("running", pid) | ("exited", exit_code) | ("unknown", None).

    "unknown": never started, still starting, or its process is gone without an exit
    code (supervisor killed, host rebooted); a pid now used by another process is recognised
    by its different start time."""
    code = _read_int(_path(state_dir, "exit_code"))
    if code is not None:
        return ("exited", code)
    pid = _read_int(_path(state_dir, "pid"))
    if pid is None:
        return ("unknown", None)
    saved = _read_int(_path(state_dir, "starttime"))
    if saved is None or proc_starttime(pid) != saved:
        return ("unknown", None)
    return ("running", pid)


def _signal(pid, sig):
    # The container leads its own process group: signal everything it spawned.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _wait_for_exit_code(state_dir, timeout):
    """Wait until the supervisor records the exit code; give up after timeout, or a little
    after the container process is gone without one (the supervisor is dead)."""
    deadline = time.monotonic() + timeout
    gone_since = None
    while time.monotonic() < deadline:
        state = status(state_dir)
        if state[0] == "exited":
            return True
        if state[0] != "running":
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > EXIT_CODE_GRACE:
                return False
        time.sleep(POLL_INTERVAL)
    return False


def stop(state_dir, timeout=10):
    """SIGTERM the container, SIGKILL it after timeout seconds, wait for its exit code.
    Idempotent; returns status(state_dir) afterwards."""
    state, pid = status(state_dir)
    if state == "running":
        _signal(pid, signal.SIGTERM)
        if not _wait_for_exit_code(state_dir, timeout):
            state, pid = status(state_dir)
            if state == "running":
                _signal(pid, signal.SIGKILL)
            _wait_for_exit_code(state_dir, EXIT_CODE_GRACE)
    return status(state_dir)


def stop_all(state_dirs, timeout=10):
    """stop() of many containers at once (`rm -f` of thousands): all signalled, then waited for together,
    so that their exits overlap instead of queueing. Idempotent."""
    signalled = {}
    for d in state_dirs:
        state, pid = status(d)
        if state == "running":
            _signal(pid, signal.SIGTERM)
            signalled[d] = pid
    running = dict(signalled)
    deadline = time.monotonic() + timeout
    while True:
        running = {d: pid for d, pid in running.items() if status(d)[0] == "running"}
        if not running or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    for pid in running.values():
        _signal(pid, signal.SIGKILL)
    # As stop(): wait for the supervisor to record each exit code, not longer than EXIT_CODE_GRACE (a
    # supervisor that is gone records none).
    waiting = list(signalled)
    deadline = time.monotonic() + EXIT_CODE_GRACE
    while waiting and time.monotonic() < deadline:
        waiting = [d for d in waiting if status(d)[0] != "exited"]
        if waiting:
            time.sleep(POLL_INTERVAL)


def exec_argv(pid: int, cmd: list[str]) -> list[str]:
    """argv running cmd in the container's network, UTS and mount namespaces. The command
    keeps the caller's environment and is not part of the container's process group."""
    return ["nsenter", "-t", str(pid), "-n", "-u", "-m", "--", *cmd]


def write_hosts(path, hostname, entries):
    """Write a container's /etc/hosts. entries: [(ip, names)], names a list (or a
    space-separated str) of aliases; each line maps ip to the hostname, its first label when
    it has dots (foobar.example.com foobar, as Docker writes it) and the aliases."""
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "ff00::0\tip6-mcastprefix",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]
    for ip, names in entries:
        if isinstance(names, str):
            names = names.split()
        all_names = list(dict.fromkeys([*_host_names(hostname), *names]))  # dedup, keep order
        lines.append(f"{ip}\t{' '.join(n for n in all_names if n)}")
    if not entries and hostname:
        lines.append(f"127.0.1.1\t{' '.join(_host_names(hostname))}")  # still resolvable without an address
    _write_in_place(path, "\n".join(lines) + "\n")


def _host_names(hostname):
    short = hostname.split(".", 1)[0]
    return [hostname, short] if short and short != hostname else [hostname]


def write_resolv(path, nameservers, search=(), options=()):
    """Write a container's /etc/resolv.conf."""
    lines = [f"nameserver {ns}" for ns in nameservers]
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    _write_in_place(path, "\n".join(lines) + "\n")


def _write_in_place(path, text):
    # Not write-and-rename: a running container has the file's inode bind-mounted,
    # so an update must rewrite that same inode to be visible inside.
    with open(path, "w") as f:  # O_TRUNC keeps the inode
        f.write(text)
