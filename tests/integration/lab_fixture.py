"""Multi-host fixtures: a real lab (netweft.lab.Lab) of simulated hosts with a netweftd each.

`lab3` is a 3-host swarm (h1 leader, h2 and h3 workers, heartbeat 500 ms) named t + 6 hex chars;
`make_lab(n, swarm=..., **init_opts)` builds others. Every lab a test builds is removed at
teardown with lab.down(), also when the test fails.

Helpers talk to the lab as an operator or a peer would:
  run_cli(lab, host, *args)        the real `netweft` CLI inside the host's namespace
  cluster_call(lab, host, ...)     one HTTPS call to a manager's cluster API (port 2377) from inside a
                                   host, with the client certificate the test chooses (or none)
  LogWatch(lab, host)              the JSON lines a daemon logs from now on
  wait_for(fn, timeout, what)      poll with a generous deadline (no timing asserts)
"""
from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netweft.lab.lab import NETNS_DIR, Lab
from netweft import pki

HEARTBEAT = "500ms"


def new_lab_name() -> str:
    while True:
        name = "test" + secrets.token_hex(3)  # test labs are test<hex>: see tests/conftest.py
        if not Lab(name).root.exists() and not (NETNS_DIR / f"nwl-{name}-sw").exists():
            return name


def build_lab(n: int = 3, swarm: bool = True, mtu: int = 1500, **init_opts) -> Lab:
    """A lab with a fresh name; Lab.up removes what it made if it fails half-way."""
    lab = Lab(new_lab_name())
    lab.up(n, swarm=swarm, mtu=mtu, init_opts={"HeartbeatPeriod": HEARTBEAT, **init_opts}, progress=lambda *a: None)
    return lab


@pytest.fixture
def make_lab():
    """Factory: make_lab(n=3, swarm=True, mtu=1500, **init_opts) -> Lab; all of them go at teardown."""
    labs: list[Lab] = []

    def make(n: int = 3, swarm: bool = True, mtu: int = 1500, **init_opts) -> Lab:
        lab = Lab(new_lab_name())
        labs.append(lab)  # registered before up: a Ctrl-C half-way is cleaned too
        lab.up(n, swarm=swarm, mtu=mtu, init_opts={"HeartbeatPeriod": HEARTBEAT, **init_opts},
               progress=lambda *a: None)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down(quiet=True)


@pytest.fixture
def lab3():
    """Three hosts, h1 leader, h2 and h3 workers, heartbeat 500 ms."""
    lab = Lab(new_lab_name())
    try:
        lab.up(3, init_opts={"HeartbeatPeriod": HEARTBEAT}, progress=lambda *a: None)
        yield lab
    finally:
        lab.down(quiet=True)


# ------------------------------------------------------------------ operator's view

def run_cli(lab: Lab, host: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real `netweft` CLI inside a lab host, talking to that host's daemon."""
    argv, env = lab.exec_argv(host, ["netweft", *args])
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"[{host}] netweft {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def parse_table(text: str) -> list[dict]:
    """Rows of a CLI table as dicts, cut at the header's column offsets (cells may be empty)."""
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    names = [header[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
    return [{n: row[s:e].strip() for n, s, e in zip(names, starts, starts[1:] + [None])} for row in lines[1:]]


def node_table(lab: Lab, host: str = "h1") -> list[dict]:
    return parse_table(run_cli(lab, host, "node", "ls").stdout)


def nodes(lab: Lab, host: str = "h1") -> list[dict]:
    """`node ls --format json` on a manager."""
    return [json.loads(l) for l in run_cli(lab, host, "node", "ls", "--format", "json").stdout.splitlines() if l]


def node_state(lab: Lab, node_id: str, via: str = "h1") -> str | None:
    """'ready', 'down', or None when the manager no longer knows the node."""
    return next((n["Status"]["State"] for n in nodes(lab, via) if n["ID"] == node_id), None)


def swarm_info(lab: Lab, host: str) -> dict:
    return json.loads(run_cli(lab, host, "info").stdout)["Swarm"]


def swarm_dir(lab: Lab, host: str) -> Path:
    return lab.host_dir(host) / "data" / "swarm"


def node_files(lab: Lab, host: str) -> dict[str, bytes]:
    """A node's CA, certificate and key as they are now (PEM)."""
    d = swarm_dir(lab, host)
    return {"ca": pki.load_pem(d / "ca.crt"), "cert": pki.load_pem(d / "node.crt"), "key": pki.load_pem(d / "node.key")}


def wait_for(fn, timeout: float, what: str, interval: float = 0.1):
    """fn() until it returns something truthy; AssertionError naming `what` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# ------------------------------------------------------------------ logs

class LogWatch:
    """The JSON lines a lab daemon writes to its log after this object was made."""

    def __init__(self, lab: Lab, host: str):
        self.path = lab.host_dir(host) / "netweftd.log"
        self.offset = self.path.stat().st_size

    def entries(self) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        out = []
        for line in data.decode(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait(self, pred, timeout: float = 10, what: str = "a log line") -> dict:
        return wait_for(lambda: next((e for e in self.entries() if pred(e)), None), timeout, what)


# ------------------------------------------------------------------ cluster API as a peer

_CALL = r"""
import asyncio, json, ssl, sys
import aiohttp
from netweft import pki
spec = json.load(sys.stdin)
if spec.get("ca"):
    ctx = pki.client_ssl_context(spec["ca"], spec.get("cert"), spec.get("key"))
else:
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
async def main():
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.request(spec["method"], spec["url"], json=spec.get("body"), ssl=ctx) as r:
                return {"status": r.status, "body": await r.text()}
    except (aiohttp.ClientError, ssl.SSLError, OSError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(asyncio.run(main())))
"""


def cluster_call(lab: Lab, host: str, method: str, path: str, *, ca: bytes | None, cert: bytes | None = None,
                 key: bytes | None = None, body: dict | None = None, manager: str | None = None) -> dict:
    """One HTTPS call from inside `host` to a manager (default h1:2377), verifying the manager against `ca`
    and presenting cert/key if given. Returns {"status", "body"} or {"error"} (TLS/connection failure)."""
    manager = manager or f"{lab.address('h1')}:2377"
    spec = {"method": method, "url": f"https://{manager}{path}", "body": body,
            "ca": ca.decode() if ca else None, "cert": cert.decode() if cert else None,
            "key": key.decode() if key else None}
    argv, env = lab.exec_argv(host, [sys.executable, "-c", _CALL])
    r = subprocess.run(argv, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"cluster call helper failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)
