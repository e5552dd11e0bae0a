"""netweftd's edge: the API socket shared with a group without opening the roots (finding 17 of the
issue-7 review: item 2 wants the exec root 0700), and container logs streamed in bounded pieces (16)."""
import os
import socket
import stat

from netweft.daemon import api
from netweft.daemon.main import DEFAULT_SOCKET, parse_args, share_socket, socket_path

GID = 1   # any group but root's


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_socket(path) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def test_by_default_the_socket_is_shared_and_the_exec_root_stays_private(tmp_path):
    args = parse_args([])
    sock = socket_path(DEFAULT_SOCKET)
    # The default layout: the exec root is not the socket's directory (the one directory shared).
    assert os.path.dirname(args.exec_root) == os.path.dirname(sock) != args.exec_root
    # The same layout under tmp_path: netweft/netweft.sock beside netweft/exec.
    sock, exec_root, data_root = tmp_path / "netweft/netweft.sock", tmp_path / "netweft/exec", tmp_path / "data"
    for d in (sock.parent, exec_root, data_root):   # as made under the daemon's umask 077
        os.makedirs(d, mode=0o700)
    s = make_socket(sock)
    try:
        assert share_socket(str(sock), GID, [str(data_root), str(exec_root)]) is None
        assert (mode(sock), os.stat(sock).st_gid) == (0o660, GID)
        assert (mode(sock.parent), os.stat(sock.parent).st_gid) == (0o710, GID)
        assert mode(exec_root) == mode(data_root) == 0o700
    finally:
        s.close()


def test_a_socket_inside_a_root_leaves_the_root_private_and_says_so(tmp_path):
    exec_root = tmp_path / "run"
    sock = exec_root / "netweft.sock"
    s = make_socket(sock)
    try:
        warning = share_socket(str(sock), GID, [str(tmp_path / "data"), str(exec_root)])
        assert "stays private to root" in warning and "\n" not in warning
        assert mode(exec_root) == 0o700 and os.stat(exec_root).st_gid == 0
    finally:
        s.close()


def test_a_directory_open_to_others_is_left_as_it_is(tmp_path):
    shared = tmp_path / "shared"
    os.makedirs(shared)
    os.chmod(shared, 0o1777)   # as /tmp
    s = make_socket(shared / "netweft.sock")
    try:
        assert share_socket(str(shared / "netweft.sock"), GID, [str(tmp_path / "run")]) is None
        assert mode(shared) == 0o1777 and os.stat(shared).st_gid == 0
    finally:
        s.close()


def test_a_log_is_read_in_bounded_pieces(tmp_path):
    log = tmp_path / "log"
    log.write_bytes(b"x" * (3 * api.LOG_CHUNK + 5))
    sizes, pos = [], 0
    while chunk := api.read_log_chunk(str(log), pos):
        sizes.append(len(chunk))
        pos += len(chunk)
    assert sizes == [api.LOG_CHUNK] * 3 + [5] and api.LOG_CHUNK == 64 * 1024
    assert api.read_log_chunk(str(tmp_path / "absent"), 0) == b""
