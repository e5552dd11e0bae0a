"""What runs in a container's process between fork and exec: enter its namespaces, set up its files, exec.

The supervisor (supervisor.py) forks; the child calls `child(spec, log_fd, err_fd)`, which never returns.
In its own network namespace, a container gets lo up and a fresh read-only sysfs, so that
/sys/class/net lists its interfaces and not the host's.

Spec fields: netns (path or null), hostname, hosts_file, resolv_file (paths or null),
cmd (list), env (dict, optional), cwd (optional, default "/"), log, state_dir.

Files the supervisor writes into state_dir (each atomically): starttime (the container process's start
time from /proc/PID/stat, to recognise pid reuse), pid (only once the command was
exec'd: exit_code without pid means a failed start), exit_code (128+N if killed by
signal N; 127 if the command could not be executed; 125 if namespace setup failed).
"""

import ctypes
import fcntl
import os
import signal
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MNT_DETACH = 2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

EXIT_SETUP_FAILED = 125
EXIT_EXEC_FAILED = 127
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _describe(e):
    """One readable line for an exception (OSError's str() starts with "[Errno N]")."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def _mount(source, target, flags, fstype=None):
    _check(_libc.mount(source.encode() if source else b"none", target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags), None),
           f"mount {source or ''} on {target}")


def _loopback_up():
    """Bring up lo of the namespace we are in: every container has a working 127.0.0.1, --network none too."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _detach_nsfs_mounts():
    """Drop this mount namespace's copies of namespace bind mounts (e.g. other containers'
    netns files): otherwise they keep those namespaces alive for as long as we run."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] != "nsfs":
            continue
        # mountinfo escapes spaces etc. as octal (\040).
        target = left.split(" ")[4].encode().decode("unicode_escape")
        _libc.umount2(target.encode("latin-1"), MNT_DETACH)  # best effort


def proc_starttime(pid):
    """Start time of pid in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(data[data.rindex(b")") + 2:].split()[19])


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _container_env(spec):
    # Containers do not inherit the daemon's environment (as in Docker).
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if spec.get("hostname"):
        env["HOSTNAME"] = spec["hostname"]
    env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
    return env


def own_mount_namespace():
    """Give the calling process (the supervisor) a mount namespace of its own, a slave of the host's, without
    other namespaces' pins (nsfs mounts). Each container's mount namespace is copied from it, and copying,
    then detaching, one netns file mount per container on the host made every start cost in proportion to the
    containers there (an RCU grace period per detached mount). Returns an fd on the host's root, through
    which `child` opens a container's netns file (made after this, so not seen here), or None if the
    namespace cannot be had (then containers are copied from the host's, as before)."""
    host_root = os.open("/", os.O_PATH | os.O_DIRECTORY)   # not inherited by what the containers exec
    try:
        _check(_libc.unshare(CLONE_NEWNS), "unshare")
        # A slave: the host's later mounts (a new disk) still reach new containers; ours never go back.
        _mount(None, "/", MS_REC | MS_SLAVE)
    except OSError:
        os.close(host_root)
        return None
    _detach_nsfs_mounts()
    return host_root


def _open_netns(path, host_root):
    if host_root is None or not path.startswith("/"):
        return os.open(path, os.O_RDONLY)
    return os.open(path.lstrip("/"), os.O_RDONLY, dir_fd=host_root)   # resolved in the host's mounts


def child(spec, err_w, host_root=None):
    """Runs in the forked container process; never returns. Errors go to the container's log (already on
    fds 1 and 2) and, as one line, to err_w (a close-on-exec pipe: EOF without data means exec succeeded).
    `host_root`: see own_mount_namespace."""
    def fail(code, message):
        message = message.replace("\n", " ")
        try:
            os.write(2, (message + "\n").encode())
            os.write(err_w, message.encode())
        finally:
            os._exit(code)

    try:
        # stdin from /dev/null, stdout and stderr to the container's log; nothing else of the supervisor's
        # survives exec (its sockets and pipes are close-on-exec).
        null_fd = os.open("/dev/null", os.O_RDONLY)
        log_fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null_fd)
        os.close(log_fd)
        # Own session and process group, so stop() can signal everything the container spawned.
        os.setsid()
        # Python ignores SIGPIPE/SIGXFSZ and the supervisor ignores TERM/INT/HUP and catches CHLD; ignored
        # dispositions survive exec, so restore the defaults for the command.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # The daemon's umask 077 protects its secrets; a container's files follow Docker's default.
        os.umask(0o022)
        if spec.get("netns"):
            try:
                fd = _open_netns(spec["netns"], host_root)
            except OSError as e:
                raise OSError(e.errno, f"cannot open network namespace {spec['netns']}: {e.strerror}")
            _check(_libc.setns(fd, CLONE_NEWNET), f"cannot enter network namespace {spec['netns']}")
            os.close(fd)
        _check(_libc.unshare(CLONE_NEWUTS | CLONE_NEWNS), "unshare")
        # Private first: without it our bind mounts (and the unmounts below) would
        # propagate to the host's mount namespace.
        _mount(None, "/", MS_REC | MS_PRIVATE)
        _detach_nsfs_mounts()
        if spec.get("netns"):
            _loopback_up()
            # A sysfs mounted from inside the namespace shows its interfaces: /sys/class/net/eth0/mtu is the
            # container's. Read-only, as Docker mounts it.
            _mount("sysfs", "/sys", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "sysfs")
        if spec.get("hosts_file"):
            _mount(spec["hosts_file"], "/etc/hosts", MS_BIND)
        if spec.get("resolv_file"):
            _mount(spec["resolv_file"], "/etc/resolv.conf", MS_BIND)
        if spec.get("hostname"):
            name = spec["hostname"].encode()
            _check(_libc.sethostname(name, len(name)), f"sethostname {spec['hostname']!r}")
        os.chdir(spec.get("cwd") or "/")
        cmd = [str(a) for a in spec["cmd"]]
        env = _container_env(spec)
    except BaseException as e:
        fail(EXIT_SETUP_FAILED, f"netweft: container setup failed: {_describe(e)}")
    try:
        os.execvpe(cmd[0], cmd, env)
    except BaseException as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _describe(e)
        if isinstance(e, FileNotFoundError) and "/" not in cmd[0]:
            reason = f"executable file not found in $PATH ({env['PATH']})"
        fail(EXIT_EXEC_FAILED, f"netweft: cannot run {cmd[0]!r}: {reason}")
    os._exit(EXIT_EXEC_FAILED)  # not reached
