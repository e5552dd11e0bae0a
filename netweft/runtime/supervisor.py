"""The container supervisor: one long-lived process per host (per daemon), parent of all its containers.

`python -m netweft.runtime.supervisor SOCKET` binds SOCKET, then its first process exits (so whoever started it
returns at once and it is reparented to init): it outlives netweftd, so a daemon restart neither kills
containers nor loses their exit codes. One process for all containers instead of a Python shim each: a
container costs no memory beyond its own process and a few bytes here.

It serves one request per connection, a JSON line: {"op": "start", "spec": {...}} forks the container
(launch.child does the namespaces and exec) and answers {"pid": N} once it has exec'd, or {"error": LINE,
"exit_code": N} once the failed start is reaped; {"op": "ping"} answers {"pid": its own pid}. Every exit is
recorded in the container's state dir (starttime, pid, exit_code: see launch.py), where container.status()
reads it: the files, not this process, are the record, so readers need no connection.

A second supervisor for the same socket exits at once (an flock on SOCKET.lock). TERM, INT and HUP are
ignored: a stray signal must not take every container's exit code with it. When a container's main process
exits, what is left of its process group is killed (as a pid namespace does when its init exits).
"""

import fcntl
import json
import os
import selectors
import signal
import socket
import sys
import time

from netweft.runtime.launch import EXIT_SETUP_FAILED, child, own_mount_namespace, proc_starttime, write_atomic

MAX_REQUEST = 1 << 20


class _Start:
    """A container between fork and the answer to its starter."""

    def __init__(self, pid, conn, err_r, state_dir):
        self.pid, self.conn, self.err_r, self.state_dir = pid, conn, err_r, state_dir
        self.error = b""
        self.execed = None  # None until the err pipe is at EOF; then True (exec'd) or False (failed)


class Supervisor:
    def __init__(self, listener: socket.socket, host_root: int | None = None):
        self.listener = listener
        self.host_root = host_root   # see launch.own_mount_namespace
        self.sel = selectors.DefaultSelector()
        self.state_dirs: dict[int, str] = {}     # pid -> state dir, for every live child
        self.starting: dict[int, _Start] = {}    # pid -> its start, until answered
        self.buffers: dict[socket.socket, bytes] = {}
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD reaches the wakeup fd
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self.sel.register(wake_r, selectors.EVENT_READ, self._wake)

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select():
                try:
                    key.data(key.fileobj)
                except Exception as e:  # one bad request or file must not stop the others' supervision
                    print(f"supervisor: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self._reap()  # also after requests: a SIGCHLD may have come between select and the handlers

    # ------------------------------------------------------------ requests
    def _accept(self, listener) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.buffers[conn] = b""
        self.sel.register(conn, selectors.EVENT_READ, self._read)

    def _read(self, conn) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = self.buffers[conn] + data
        if not data or b"\n" in buf or len(buf) > MAX_REQUEST:
            self.sel.unregister(conn)
            del self.buffers[conn]
            self._request(conn, buf.split(b"\n", 1)[0])
        else:
            self.buffers[conn] = buf

    def _request(self, conn, line: bytes) -> None:
        try:
            req = json.loads(line)
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            return self._answer(conn, {"error": "the supervisor got a request it cannot read"})
        if op == "ping":
            return self._answer(conn, {"pid": os.getpid()})
        if op != "start":
            return self._answer(conn, {"error": f"the supervisor does not know the request {op!r}"})
        spec = req.get("spec")
        if not (isinstance(spec, dict) and all(isinstance(spec.get(k), str) and spec[k] for k in ("state_dir", "log"))
                and isinstance(spec.get("cmd"), list) and spec["cmd"]):
            return self._answer(conn, {"error": "the supervisor needs a spec with state_dir, log and cmd"})
        self._start(conn, spec)

    def _answer(self, conn, reply: dict) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the starter is gone; the files say what happened
        finally:
            conn.close()

    def _start(self, conn, spec: dict) -> None:
        err_r, err_w = os.pipe()  # close-on-exec (Python's default): EOF without data means exec succeeded
        pid = os.fork()
        if pid == 0:
            try:
                os.close(err_r)
                child(spec, err_w, self.host_root)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        os.close(err_w)
        st = _Start(pid, conn, err_r, spec["state_dir"])
        self.state_dirs[pid] = spec["state_dir"]
        self.starting[pid] = st
        os.set_blocking(err_r, False)
        self.sel.register(err_r, selectors.EVENT_READ, lambda fd: self._err_data(st))

    def _err_data(self, st: _Start) -> None:
        try:
            chunk = os.read(st.err_r, 4096)
        except BlockingIOError:
            return
        if chunk:
            st.error += chunk
            return
        self._exec_done(st)

    def _exec_done(self, st: _Start) -> None:
        """The err pipe is at EOF: the child exec'd (no error) or gave up. Record it; answer a success now,
        a failure once the child is reaped and its exit code recorded."""
        if st.execed is not None:
            return
        self.sel.unregister(st.err_r)
        os.close(st.err_r)
        st.execed = not st.error
        _write(st.state_dir, "starttime", proc_starttime(st.pid))  # before pid: whoever sees pid can check it
        if st.execed:
            _write(st.state_dir, "pid", st.pid)
            self.starting.pop(st.pid, None)
            self._answer(st.conn, {"pid": st.pid})

    # ------------------------------------------------------------ children
    def _wake(self, fd) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            st = self.starting.pop(pid, None)
            if st is not None and st.execed is None:
                # Exited before we saw the pipe's EOF: everything it wrote is there now. Recorded while the
                # zombie still shows its start time.
                os.set_blocking(st.err_r, True)
                while chunk := os.read(st.err_r, 4096):
                    st.error += chunk
                self._exec_done(st)
            # Before reaping: kill what is left of its process group; the unreaped zombie guarantees the
            # group id has not been reused.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            state_dir = self.state_dirs.pop(pid, None)
            if state_dir is not None:
                _write(state_dir, "exit_code", code)
            if st is not None and not st.execed:
                self._answer(st.conn, {"error": st.error.decode(errors="replace").strip(), "exit_code": code})


def _write(state_dir: str, name: str, value) -> None:
    try:
        write_atomic(os.path.join(state_dir, name), f"{value}\n")
    except OSError:
        pass  # the container was removed meanwhile (rm -f): nobody will read it


def _serving(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(argv) -> None:
    path = argv[1]
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + 5
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if _serving(path) or time.monotonic() > deadline:
                sys.exit(0)  # another supervisor serves this socket (or is about to)
            time.sleep(0.01)
    if _serving(path):
        sys.exit(0)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    listener.setblocking(False)
    # Ready: the first process exits so its starter returns; the second one supervises, reparented to init.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    os.chdir("/")
    null_fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    write_atomic(path + ".pid", f"{os.getpid()}\n")
    host_root = own_mount_namespace()
    if host_root is None:
        print("supervisor: no mount namespace of its own; each start copies the host's", file=sys.stderr, flush=True)
    Supervisor(listener, host_root).run()


if __name__ == "__main__":
    main(sys.argv)
