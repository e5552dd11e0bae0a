"""Bad input gets one clear line, a non-zero exit, and changes nothing (store and kernel)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def snapshot(d) -> tuple:
    nets = d.cli("network", "ls", "--format", "json").stdout
    ctrs = d.cli("ps", "-a", "-q").stdout
    links = sorted(l["ifname"] for l in json.loads(d.host.ip("-j", "link").stdout))
    return nets, ctrs, links


@pytest.fixture
def seeded(daemon, host):
    d = daemon
    host.ip("link", "add", "nwt-dummy", "type", "ifb")
    host.ip("addr", "add", "198.18.100.1/24", "dev", "nwt-dummy")
    host.ip("link", "set", "nwt-dummy", "up")  # a host route: 198.18.100.0/24
    d.cli("network", "create", "--subnet", "198.18.20.0/24", "--ip-range", "198.18.20.0/25",
          "--aux-address", "router=198.18.20.5", "base")
    d.cli("run", "-d", "--name", "taken", "--network", "base", "--ip", "198.18.20.10", "--", "sleep", "1000")
    d.cli("network", "create", "--subnet", "198.18.21.0/30", "tiny")  # one usable address after the gateway
    d.cli("run", "-d", "--name", "filler", "--network", "tiny", "--", "sleep", "1000")
    return d


CASES = [
    # (argv, words the error must contain)
    (["network", "create", "--subnet", "198.18.30.0/33", "n"], "invalid subnet"),
    (["network", "create", "--subnet", "banana", "n"], "invalid subnet"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--gateway", "198.18.31.1", "n"], "gateway"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--gateway", "nope", "n"], "invalid gateway"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--ip-range", "198.18.31.0/25", "n"], "ip-range"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--aux-address", "x=198.18.31.3", "n"], "aux-address"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--aux-address", "x", "n"], "KEY=VALUE"),
    (["network", "create", "--subnet", "198.18.20.128/25", "n"], "overlaps 198.18.20.0/24 of network 'base'"),
    (["network", "create", "--subnet", "198.18.100.0/25", "n"], "route of this host"),
    (["network", "create", "--subnet", "198.18.30.0/24", "base"], "already exists"),
    (["network", "create", "--subnet", "198.18.30.0/24", "-o", "com.docker.network.driver.mtu=67", "n"], "MTU"),
    (["network", "create", "--subnet", "198.18.30.0/24", "-o", "com.docker.network.driver.mtu=70000", "n"], "MTU"),
    (["network", "create", "--subnet", "198.18.30.0/24", "-o", "com.docker.network.driver.mtu=x", "n"], "MTU"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--label", "novalue", "n"], "KEY=VALUE"),
    (["network", "create", "--subnet", "198.18.30.0/24", "--label", "=v", "n"], "KEY=VALUE"),
    (["network", "create", "--subnet", "198.18.30.0/24", "-o", "parent=nosuchif0", "n"], "does not exist"),
    (["network", "create", "--subnet", "198.18.30.0/24", "-o", "parent=lo", "n"], "loopback interface"),
    (["network", "create", "--subnet", "198.18.30.0/24", "bad name"], "invalid network name"),
    (["network", "create", "-d", "overlay", "ov"], "need a swarm"),
    (["network", "create", "-d", "macvlan", "n"], "unknown driver"),
    (["network", "rm", "base"], "containers attached (taken)"),
    (["network", "rm", "ghost"], "not found"),
    (["network", "inspect", "ghost"], "not found"),
    (["network", "connect", "ghost", "taken"], "not found"),
    (["network", "connect", "base", "ghost"], "not found"),
    (["network", "connect", "base", "taken"], "already connected"),
    (["run", "-d", "--name", "c", "--network", "base", "--ip", "198.18.21.9", "--", "true"], "not inside"),
    (["run", "-d", "--name", "c", "--network", "base", "--ip", "198.18.20.10", "--", "true"], "already in use"),
    (["run", "-d", "--name", "c", "--network", "base", "--ip", "198.18.20.1", "--", "true"], "gateway"),
    (["run", "-d", "--name", "c", "--network", "base", "--ip", "198.18.20.5", "--", "true"], "aux-address"),
    (["run", "-d", "--name", "c", "--network", "base", "--ip", "1.2.3", "--", "true"], "invalid IP"),
    (["run", "-d", "--name", "taken", "--network", "base", "--", "true"], "already in use"),
    (["run", "-d", "--name", "c", "--network", "tiny", "--", "true"], "no free address"),
    (["run", "-d", "--name", "c", "--network", "ghost", "--", "true"], "not found"),
    (["run", "-d", "--name", "c", "--network", "base", "--mac-address", "zz", "--", "true"], "MAC"),
    (["run", "-d", "--name", "c", "--network", "base", "--hostname", "-bad", "--", "true"], "hostname"),
    (["run", "-d", "--name", "c", "--network", "none", "--ip", "198.18.20.40", "--", "true"], "need a network"),
    (["run", "-d", "--name", "c", "--network", "base", "--", "/no/such/binary"], "no/such/binary"),
    (["stop", "ghost"], "not found"),
    (["rm", "ghost"], "not found"),
    (["rm", "taken"], "running"),
    (["exec", "ghost", "--", "true"], "not found"),
    (["logs", "ghost"], "not found"),
]


def test_every_bad_input_is_refused_and_changes_nothing(seeded):
    d = seeded
    before = snapshot(d)
    for argv, words in CASES:
        r = d.cli(*argv, check=False)
        assert r.returncode != 0, f"{argv} was accepted"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, f"{argv}: expected one line, got {r.stderr!r}"
        assert words in lines[0], f"{argv}: {lines[0]!r} does not say {words!r}"
        assert snapshot(d) == before, f"{argv} changed state"


def test_unknown_daemon_says_how_to_start_it(tmp_path):
    cli = str(Path(sys.executable).parent / "netweft")
    r = subprocess.run([cli, "-H", f"unix://{tmp_path}/none.sock", "network", "ls"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "is it running" in r.stderr and "netweftd" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_daemon_rejects_bad_pool_flag(tmp_path):
    d = str(Path(sys.executable).parent / "netweftd")
    r = subprocess.run([d, "-H", f"unix://{tmp_path}/s.sock", "--data-root", str(tmp_path / "d"),
                        "--exec-root", str(tmp_path / "r"), "--default-address-pool", "base=nope"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0 and "address pool" in r.stderr


def _fake_daemon(path: Path, answer: bytes | None):
    """A unix-socket server standing in for a broken netweftd: it answers `answer` raw, or hangs up."""
    import socket
    import threading
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if answer is not None:
                    conn.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize("answer,words", [
    (None, "closed the connection"),
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 39\r\n\r\nTraceback (most recent call last):\n  x\n",
     "answered 500 Internal Server Error without an explanation"),   # a non-JSON error: not its text
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{nope", "broken JSON"),
    (b"garbage\r\n\r\n", "closed the connection"),
])
def test_cli_never_prints_library_internals(tmp_path, answer, words):
    sock = tmp_path / "broken.sock"
    srv = _fake_daemon(sock, answer)
    try:
        cli = str(Path(sys.executable).parent / "netweft")
        r = subprocess.run([cli, "-H", f"unix://{sock}", "network", "ls"], capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "http.client" not in r.stderr and "Exception" not in r.stderr
