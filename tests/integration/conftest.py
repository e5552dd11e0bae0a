"""Real-kernel fixtures: simulated hosts are network namespaces named nwt-*, daemons run in them.

Everything a test makes lives under one /tmp/nwt-* root and nwt-* namespaces, and is removed
by netweft.lab.cleanup at teardown, also when the test fails.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netweft.lab.cleanup import clean

BIN = Path(sys.executable).parent


def sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


class Namespace:
    """A network namespace the test owns (a simulated host, a LAN, or 'the outside')."""

    def __init__(self, name: str):
        self.name = name
        self.path = f"/run/netns/{name}"
        sh("ip", "netns", "add", name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.name, *args, check=check)

    def run(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        return sh("nsenter", f"--net={self.path}", *args, check=check, timeout=timeout)


class Daemon:
    """A netweftd in a host namespace, with its own socket, data root and exec root."""

    def __init__(self, host: Namespace, root: Path, extra: list[str] | None = None):
        self.host, self.root = host, root
        self.sock = root / "netweft.sock"
        self.extra = extra or ["--default-address-pool", "base=198.19.0.0/16,size=24"]
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def env(self) -> dict:
        return {**os.environ, "NETWEFT_HOST": f"unix://{self.sock}"}

    def start(self) -> None:
        self.log = open(self.root / "netweftd.log", "ab")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.host.path}", str(BIN / "netweftd"), "-H", f"unix://{self.sock}",
             "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "run"),
             "--docker-plugin-socket", str(self.root / "docker-plugin.sock"), *self.extra],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"netweftd exited: {(self.root / 'netweftd.log').read_text()[-2000:]}")
            if self.cli("info", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("netweftd did not come up in 20 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.log.close()

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the netweft CLI as an operator would, inside the host namespace."""
        r = subprocess.run(["nsenter", f"--net={self.host.path}", str(BIN / "netweft"), *args],
                           capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"netweft {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def exec(self, ctr: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.cli("exec", ctr, "--", *cmd, check=check)

    def ping(self, ctr: str, ip: str, deadline: int = 3) -> bool:
        """One reply within the deadline (a fresh link may lose the first ARP request)."""
        return self.exec(ctr, "ping", "-c1", "-i0.2", f"-w{deadline}", ip).returncode == 0


@pytest.fixture
def root(request):
    """The test's state root; at teardown everything of the test goes: processes, namespaces, mounts, files."""
    r = Path(f"/tmp/nwt-{secrets.token_hex(3)}")
    r.mkdir(mode=0o700)
    yield r
    clean([str(r)], ns_prefixes=(f"{r.name}-",), quiet=True)


@pytest.fixture
def make_ns(root):
    def make(role: str) -> Namespace:
        return Namespace(f"{root.name}-{role}")
    return make


@pytest.fixture
def host(make_ns):
    return make_ns("h1")


@pytest.fixture
def daemon(host, root):
    d = Daemon(host, root)
    yield d
    d.stop()


# Multi-host fixtures (lab3, make_lab) and helpers live in lab_fixture.py.
from lab_fixture import lab3, make_lab  # noqa: E402,F401
