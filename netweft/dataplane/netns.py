"""Network namespaces pinned by bind mounts in a directory of our choosing.

A namespace lives as long as something refers to it; we pin each one by bind-mounting its nsfs file
onto a plain file (like `ip netns add`, but not under /var/run/netns). Namespaces are per thread on
Linux, so we create one in a short-lived thread: the thread unshares, mounts its own namespace onto
the file and exits, leaving the rest of the process where it was. Mounts are per process (per mount
namespace), so the mount made by that thread is visible to all threads.

Python 3.11 has no os.setns/os.unshare, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Iterator

from netweft.errors import KernelError

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs file is

_libc = ctypes.CDLL(None, use_errno=True)


def _oserror(what: str, path: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}", path)


def is_netns(path: str) -> bool:
    """True if `path` is a network namespace file (a bind mount we made, or /proc/PID/ns/net)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # Only nsfs files answer this ioctl; a plain file gives ENOTTY.
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def create_netns(path: str) -> None:
    """Create a new network namespace pinned at `path`. Does nothing if `path` already is one."""
    if is_netns(path):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # The mount point must exist. A plain file left by an earlier crash is reused.
    try:
        created = True
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except FileExistsError:
        created = False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)

    failure: list[OSError] = []

    def pin() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            failure.append(_oserror("unshare(CLONE_NEWNET)", path))
            return
        if _libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), b"none", MS_BIND, None) != 0:
            failure.append(_oserror("bind mount", path))

    t = threading.Thread(target=pin, name="netweft-netns-create")
    t.start()
    t.join()
    if failure:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise KernelError(f"cannot create network namespace {path}: {failure[0].strerror}")


def delete_netns(path: str) -> None:
    """Unpin and remove the namespace at `path`; the kernel frees it once nothing else uses it.

    Idempotent. MNT_DETACH lets the unmount succeed even if someone holds the file open.
    """
    for _ in range(16):  # a crashed retry may have stacked several mounts on the same file
        if not is_netns(path):
            break
        if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
            e = _oserror("umount", path)
            if e.errno == errno.EINVAL:  # not a mount point, e.g. a /proc/PID/ns/net file
                break
            raise KernelError(f"cannot unmount network namespace {path}: {e.strerror}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError(f"cannot remove network namespace file {path}: {e.strerror}") from None


def list_netns(directory: str) -> list[str]:
    """Paths of the namespace files in `directory`, sorted."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [p for p in (os.path.join(directory, n) for n in names) if is_netns(p)]


def open_netns(path: str) -> int:
    """An O_RDONLY file descriptor for the namespace at `path`; the caller closes it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
            raise OSError(errno.EINVAL, "not a network namespace")
    except OSError:
        os.close(fd)
        raise KernelError(f"{path} is not a network namespace") from None
    return fd


def current_netns_fd() -> int:
    """A file descriptor for the calling thread's network namespace; the caller closes it."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def setns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise KernelError(f"setns failed: {os.strerror(code)}")


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the block with the calling thread inside namespace `fd`, then move it back.

    If moving back fails the thread would keep working in the wrong namespace, so that is fatal.
    """
    home = current_netns_fd()
    try:
        setns(fd)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                os.abort()
    finally:
        os.close(home)
