"""The cluster's security on real daemons in a lab (issue 7, items 1, 2, 3, 6, 7, 8, 9 and 15):
join trust, secrets at rest, typed bodies on the cluster API, removal closing connections, limits on the
open calls, roles declared per route, the leader's renewed certificate, a manager that is down.

Every lab is h1 (leader, 192.0.2.11:2377) plus workers. Waits poll with generous deadlines; nothing
asserts how fast something happened, only that it happened without the thing that used to be needed.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lab_fixture import LogWatch, cluster_call, node_files, nodes, run_cli, swarm_dir, swarm_info, wait_for
from netweft import pki
from netweft.lab.lab import Lab
from netweft.manager import auth
from netweft.manager.cluster import Manager

MANAGER = "192.0.2.11:2377"


def token(lab: Lab, role: str = "worker") -> str:
    return run_cli(lab, "h1", "swarm", "join-token", "-q", role).stdout.strip()


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI failed with exactly one line on stderr naming the problem."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def leave(lab: Lab, host: str) -> None:
    run_cli(lab, host, "swarm", "leave")
    assert not swarm_dir(lab, host).exists()


def no_tracebacks(lab: Lab, host: str = "h1") -> None:
    text = (lab.host_dir(host) / "netweftd.log").read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


# ------------------------------------------------------------------ many calls from inside a host, one process

_CALLS = r"""
import asyncio, json, ssl, sys
import aiohttp
from netweft import pki
spec = json.load(sys.stdin)
if spec.get("ca"):
    ctx = pki.client_ssl_context(spec["ca"], spec.get("cert"), spec.get("key"))
else:
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
async def one(s, c):
    try:
        kw = {"json": c["body"]} if "body" in c else {"data": c.get("data", "").encode()} if "data" in c else {}
        async with s.request(c["method"], spec["base"] + c["path"], ssl=ctx, **kw) as r:
            return {"status": r.status, "body": await r.text(), "retry_after": r.headers.get("Retry-After")}
    except (aiohttp.ClientError, ssl.SSLError, OSError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
async def fresh(c):
    # A fresh connection per call: a refused TLS handshake must not hide the next call's answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(force_close=True)) as s:
        return await one(s, c)
async def main():
    if spec["parallel"]:
        return await asyncio.gather(*(fresh(c) for c in spec["calls"]))
    return [await fresh(c) for c in spec["calls"]]
print(json.dumps(asyncio.run(main())))
"""


def cluster_calls(lab: Lab, host: str, calls: list[dict], *, ca: bytes | None, cert: bytes | None = None,
                  key: bytes | None = None, manager: str = MANAGER, parallel: bool = False) -> list[dict]:
    """Several HTTPS calls ({"method", "path", ["body"|"data"]}) from inside `host` to a manager, in one
    process, one after the other or all at once; each answer is {"status", "body", "retry_after"} or
    {"error"} (TLS or connection failure)."""
    spec = {"base": f"https://{manager}", "calls": calls, "parallel": parallel, "ca": ca.decode() if ca else None,
            "cert": cert.decode() if cert else None, "key": key.decode() if key else None}
    argv, env = lab.exec_argv(host, [sys.executable, "-c", _CALLS])
    r = subprocess.run(argv, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def message(answer: dict) -> str:
    """The one-line reason of a refused call."""
    msg = json.loads(answer["body"])["message"]
    assert msg and "\n" not in msg, answer
    return msg


# ------------------------------------------------------------------ item 1: join trust

FAKE_MANAGER = r"""
import asyncio, json, sys
from pathlib import Path
from netweft import pki
spec = json.load(sys.stdin)
record = open(spec["record"], "a")
ctx = pki.server_ssl_context(spec["fake_ca"], spec["cert"], spec["key"], require_client_cert=False)

async def handle(reader, writer):
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    finally:
        record.write(json.dumps({"raw": data.decode("latin-1")}) + "\n")
        record.flush()
    if data.startswith(b"GET /ca "):
        status, body, ctype = "200 OK", spec["served"].encode(), "application/x-pem-file"
    else:
        status, body, ctype = "401 Unauthorized", b'{"message": "fake manager: no"}', "application/json"
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, spec["host"], spec["port"], ssl=ctx)
    Path(spec["ready"]).write_text("ready")
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def start_fake_manager(lab: Lab, served: bytes, fake_ca: pki.RootCA):
    """A man in the middle on h2's address, port 2377: a perfect manager certificate under its own CA;
    it serves `served` on GET /ca, refuses everything else and records every request it gets."""
    key = pki.new_node_key()
    cert = pki.sign_node_cert(fake_ca, pki.make_csr(key), "fake-manager", "manager", "impostor",
                              timedelta(hours=1), ip_sans=[lab.address("h2")])
    record, ready = lab.root / "fake-manager.jsonl", lab.root / "fake-manager.ready"
    spec = {"fake_ca": fake_ca.cert_pem.decode(), "served": served.decode(), "cert": cert.decode(),
            "key": pki.key_to_pem(key).decode(), "host": lab.address("h2"), "port": 2377, "record": str(record),
            "ready": str(ready)}
    argv, env = lab.exec_argv("h2", [sys.executable, "-c", FAKE_MANAGER])
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    wait_for(lambda: ready.exists() or proc.poll() is not None, 20, "the fake manager to listen")
    assert proc.poll() is None, proc.stderr.read()

    def requests() -> list[str]:
        return [json.loads(line)["raw"] for line in record.read_text().splitlines()] if record.exists() else []
    return proc, requests


@pytest.mark.parametrize("order", ["real-then-fake", "fake-then-real"])
def test_join_refuses_a_ca_bundle_with_an_appended_ca_and_sends_no_secret(lab3, order):
    leave(lab3, "h3")
    real_ca = node_files(lab3, "h1")["ca"]
    fake_ca = pki.create_root_ca("impostor")
    served = real_ca + fake_ca.cert_pem if order == "real-then-fake" else fake_ca.cert_pem + real_ca
    # The real CA's digest, so a client that hashes only one block (or the first) would pass the check,
    # then trust the impostor's CA for the TLS that carries the secret.
    real_digest = pki.parse_join_token(token(lab3)).digest
    assert real_digest == pki.ca_digest(real_ca)
    proc, requests = start_fake_manager(lab3, served, fake_ca)
    try:
        canary = "0canary" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(18))
        known = {n["ID"] for n in nodes(lab3)}
        r = run_cli(lab3, "h3", "swarm", "join", "--token", f"SWMTKN-1-{real_digest}-{canary}",
                    f"{lab3.address('h2')}:2377", check=False)
        one_line_error(r, "did not send one CA certificate", "2 PEM blocks", "sending nothing")
        assert canary not in r.stderr
        got = requests()
        assert len(got) == 1 and got[0].startswith("GET /ca HTTP/1.1\r\n"), got
        assert not any(canary in raw for raw in got)
        # Nothing saved, nothing trusted, nothing joined.
        assert swarm_info(lab3, "h3")["LocalNodeState"] == "inactive" and not swarm_dir(lab3, "h3").exists()
        assert {n["ID"] for n in nodes(lab3)} == known
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_joined_node_trusts_and_keeps_exactly_the_one_ca(lab3):
    ca = node_files(lab3, "h2")["ca"]
    assert ca == node_files(lab3, "h1")["ca"]
    assert ca.count(b"-----BEGIN") == 1
    assert pki.ca_digest(ca) == pki.parse_join_token(token(lab3)).digest


# ------------------------------------------------------------------ item 2: secrets at rest

# Files under a data or exec root that may keep read bits for others, and why. Everything else, directories
# included, has no group or other permission bit at all.
MAY_BE_READABLE = {
    "ca.crt": "the cluster's CA certificate: public (its digest is in every join token)",
    "node.crt": "the node's certificate: public, it is shown to every peer in each TLS handshake",
    # A container's /etc/hosts and /etc/resolv.conf (bound in from its state directory, itself 0700): its
    # processes read them whatever user they run as; they hold names and addresses, no secret.
    "hosts": "a container's /etc/hosts", "resolv.conf": "a container's /etc/resolv.conf",
}


def is_namespace_file(path: Path, root_dev: int) -> bool:
    """A network namespace bound onto a file (nsfs, mode 0444 from the kernel): another file system,
    unreachable for others behind the 0700 root, and useless without CAP_SYS_ADMIN."""
    return path.lstat().st_dev != root_dev


def modes_under(root: Path) -> list[tuple[str, int, str]]:
    """(path relative to root, permission bits, kind) of the root and everything under it."""
    out = [(".", stat.S_IMODE(root.lstat().st_mode), "dir")]
    dev = root.lstat().st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else
                    "nsfs" if is_namespace_file(p, dev) else "socket" if stat.S_ISSOCK(st.st_mode) else "file")
            out.append((str(p.relative_to(root)), stat.S_IMODE(st.st_mode), kind))
    return out


def exposed(lab: Lab, host: str) -> list[str]:
    """Everything under the host's data and exec roots that others could read or write, with no reason to."""
    bad = []
    for root in ("data", "run"):
        for rel, mode, kind in modes_under(lab.host_dir(host) / root):
            if kind in ("link", "nsfs") or not mode & 0o077:
                continue
            if kind == "file" and os.path.basename(rel) in MAY_BE_READABLE and not mode & 0o033:
                continue
            bad.append(f"{host}:{root}/{rel} {mode:04o} ({kind})")
    return bad


def secret_files(lab: Lab, host: str, needles: list[bytes]) -> dict[Path, bytes]:
    """Regular files under the host's data and exec roots that contain one of the needles (-> which one)."""
    found = {}
    for root in ("data", "run"):
        dev = (lab.host_dir(host) / root).lstat().st_dev
        for dirpath, _, filenames in os.walk(lab.host_dir(host) / root):
            for name in filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                if not stat.S_ISREG(st.st_mode) or is_namespace_file(p, dev) or st.st_size > 64 * 1024 * 1024:
                    continue
                data = p.read_bytes()
                hits = [n for n in needles if n in data]
                if hits:
                    found[p] = hits[0]
    return found


def daemon_umask(lab: Lab, host: str) -> str:
    pid = int((lab.host_dir(host) / "netweftd.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:"))


def test_secrets_at_rest_are_root_only_whatever_the_callers_umask(make_lab):
    old = os.umask(0)  # the daemons (and the lab's files) are started by a caller with umask 000
    try:
        lab = make_lab(3)
        run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.7.0/24", "ov")
        run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--", "sleep", "1000")
        run_cli(lab, "h1", "network", "create", "--subnet", "198.18.8.0/24", "br")
        run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "br", "--", "sleep", "1000")
    finally:
        os.umask(old)
    for h in ("h1", "h2", "h3"):
        assert daemon_umask(lab, h) == "0077"
    # The files that hold secrets are found by what they hold, wherever the layout puts them: the store
    # with the join tokens (and its WAL), the private keys. There are some, and each is the daemon's alone.
    manager_token = token(lab, "manager").encode()
    for h in ("h1", "h2"):
        holders = secret_files(lab, h, [manager_token, b"PRIVATE KEY"])
        assert any(b"PRIVATE KEY" in why for why in holders.values()), holders
        for path in holders:
            assert not stat.S_IMODE(path.stat().st_mode) & 0o077, (path, oct(path.stat().st_mode))
    assert any(manager_token in why for why in secret_files(lab, "h1", [manager_token]).values())
    assert [e for h in ("h1", "h2", "h3") for e in exposed(lab, h)] == []

    # What an older version (or an operator's chmod) left open is closed at the next start.
    lab.stop_daemon("h2")
    d2 = lab.host_dir("h2") / "data"
    for p in [d2, d2 / "swarm", *d2.glob("netweft.db*"), d2 / "swarm" / "node.key"]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert exposed(lab, "h2")
    lab.start_daemon("h2")
    assert exposed(lab, "h2") == []
    assert swarm_info(lab, "h2")["LocalNodeState"] == "active"


# ------------------------------------------------------------------ item 6: node rm closes connections

_WATCH = r"""
import asyncio, json, sys, time
import aiohttp
from netweft import pki
spec = json.load(sys.stdin)
ctx = pki.client_ssl_context(spec["ca"], spec["cert"], spec["key"])
async def main():
    async with aiohttp.ClientSession() as s:
        async with s.get(spec["url"], ssl=ctx, timeout=aiohttp.ClientTimeout(total=None)) as r:
            await r.content.readline()
            print("started", flush=True)
            try:
                while await r.content.readline():
                    pass
                print("ended", flush=True)
            except aiohttp.ClientError as e:
                print("ended", flush=True)
asyncio.run(main())
"""


def established_to_manager(lab: Lab, host: str) -> set[str]:
    """Local ends of the host's established TCP connections to the leader's cluster API."""
    argv, env = lab.exec_argv(host, ["ss", "-Htn", "state", "established", "dst", MANAGER])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return {line.split()[2] for line in out.splitlines() if line.strip()}


def line_within(proc: subprocess.Popen, seconds: float) -> str | None:
    """The process's next output line, or None if none comes within `seconds` (never hangs the test)."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline().strip() if ready else None


def test_node_rm_closes_the_removed_nodes_watch_and_connections_at_once(lab3):
    creds = node_files(lab3, "h2")
    spec = {"url": f"https://{MANAGER}/watch?since=0", **{k: v.decode() for k, v in creds.items()}}
    # A node has one watch stream: h2's daemon is frozen so that its agent does not take the stream back
    # from the test's (its connections stay open meanwhile, as the kernel keeps them).
    h2d = int((lab3.host_dir("h2") / "netweftd.pid").read_text())
    os.kill(h2d, signal.SIGSTOP)
    argv, env = lab3.exec_argv("h2", [sys.executable, "-c", _WATCH])
    watcher = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        watcher.stdin.write(json.dumps(spec))
        watcher.stdin.close()
        assert line_within(watcher, 30) == "started"
        # h2's own agent holds connections too (its watch, kept-alive calls).
        before = wait_for(lambda: established_to_manager(lab3, "h2"), 10, "h2's connections to the manager")
        log = LogWatch(lab3, "h1")
        run_cli(lab3, "h1", "node", "rm", "--force", "h2")
        e = log.wait(lambda e: e.get("msg") == "node removed; its certificate is refused from now on",
                     what="the removal in the leader's log")
        assert e["connections_closed"] >= 2, e  # the test's watch and at least the agent's
        # The stream ends now: an idle watch would otherwise get a ping every 2 s, for ever. (30 s is only
        # a bound for a loaded machine: without the removal closing it, the stream would not end at all.)
        assert line_within(watcher, 30) == "ended"
        assert watcher.wait(timeout=20) == 0
        wait_for(lambda: not (established_to_manager(lab3, "h2") & before), 20,
                 "h2's connections from before the removal to be gone")
        # New calls with that certificate are refused, with the reason.
        r = cluster_call(lab3, "h2", "GET", "/watch?since=0", **creds)
        assert r.get("status") == 403 and "removed" in message(r), r
    finally:
        os.kill(h2d, signal.SIGCONT)
        watcher.kill()
        watcher.wait(timeout=10)
    no_tracebacks(lab3)


# ------------------------------------------------------------------ item 8: roles declared on every route

def cluster_routes() -> list[tuple[str, str, frozenset | None]]:
    """(method, path with its variables filled, declared roles) of every route of the real cluster app."""
    from netweft.manager.services import Services
    from netweft.manager.tasklogs import LogRelay
    bare = Manager.__new__(Manager)   # the routes only: no store, no CA, nothing served
    bare.services = Services.__new__(Services)
    bare.logs = LogRelay(lambda: None)
    app = bare.build_app()
    out = []
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info["formatter"].replace("{", "").replace("}", "")
        out.append((route.method, path, auth.roles_of(route.handler)))
    return out


def refusal_calls(routes) -> list[dict]:
    return [{"method": m, "path": p, "body": {}} if m in ("POST", "PUT", "PATCH") else {"method": m, "path": p}
            for m, p, _ in routes]


def test_every_route_declares_its_roles_and_only_ca_and_join_are_open():
    routes = cluster_routes()
    assert len(routes) >= 15
    undeclared = [(m, p) for m, p, roles in routes if not roles]
    assert undeclared == []
    assert sorted((m, p) for m, p, roles in routes if auth.OPEN in roles) == [("GET", "/ca"), ("HEAD", "/ca"),
                                                                             ("POST", "/join")]
    assert all(auth.MANAGER in roles and auth.WORKER not in roles for m, p, roles in routes if p.startswith("/admin/"))


def test_every_cluster_route_refuses_strangers_other_clusters_removed_nodes_and_workers_on_manager_calls(lab3):
    routes = cluster_routes()
    closed = [r for r in routes if auth.OPEN not in r[2]]
    managers_only = [r for r in closed if auth.WORKER not in r[2]]
    assert managers_only and len(closed) > len(managers_only)
    worker = node_files(lab3, "h2")
    log = LogWatch(lab3, "h1")

    def check(answers, routes, status, words):
        for (method, path, _), a in zip(routes, answers):
            assert a.get("status") == status, (method, path, a)
            if method != "HEAD":  # a HEAD answer has no body: its reason is in the leader's log
                assert words in message(a), (method, path, a)
        logged = [e for e in log.entries() if e.get("msg") == "cluster call refused" and e.get("status") == status]
        for method, path, _ in routes:
            assert any(e["path"] == path and words in e["reason"] for e in logged), (method, path)

    # No certificate at all: every closed route (the open ones are open by design: /ca, /join).
    check(cluster_calls(lab3, "h2", refusal_calls(closed), ca=worker["ca"]), closed, 401,
          "node certificate is required")
    # A worker's certificate on every manager route.
    check(cluster_calls(lab3, "h2", refusal_calls(managers_only), **worker), managers_only, 403,
          "needs a manager certificate")
    # A certificate of another cluster (claiming this cluster's ID and the leader's node ID): the TLS
    # handshake itself is refused, on every route, open ones included, each with a line in the leader's log.
    other = pki.create_root_ca(swarm_info(lab3, "h1")["ClusterID"])
    key = pki.new_node_key()
    foreign = pki.sign_node_cert(other, pki.make_csr(key), swarm_info(lab3, "h1")["NodeID"], "manager",
                                 swarm_info(lab3, "h1")["ClusterID"], timedelta(hours=1))
    handshakes = len([e for e in log.entries() if e.get("msg") == "TLS handshake refused"])
    answers = cluster_calls(lab3, "h2", refusal_calls(routes), ca=worker["ca"], cert=foreign,
                            key=pki.key_to_pem(key))
    assert all("error" in a or a.get("status") == 401 for a in answers), answers
    refusals = wait_for(lambda: [e for e in log.entries() if e.get("msg") == "TLS handshake refused"][handshakes:],
                        20, "the refused handshakes in the leader's log")
    assert all("cluster" in e["reason"] for e in refusals), refusals
    # One line per address per interval, not one per handshake: a stranger cannot flood the log.
    time.sleep(1)
    assert len([e for e in log.entries() if e.get("msg") == "TLS handshake refused"][handshakes:]) == 1
    # A removed node's certificate: every closed route.
    removed = node_files(lab3, "h3")
    run_cli(lab3, "h1", "node", "rm", "--force", "h3")
    check(cluster_calls(lab3, "h3", refusal_calls(closed), **removed), closed, 403, "removed from the cluster")
    no_tracebacks(lab3)


# ------------------------------------------------------------------ item 7: limits on the open calls

def test_open_calls_take_small_bodies_and_are_rate_limited_per_address(lab3):
    leave(lab3, "h3")
    ca = node_files(lab3, "h1")["ca"]
    big = [{"method": "POST", "path": "/join", "data": "x" * (64 * 1024 + 1)},
           {"method": "GET", "path": "/ca", "data": "x" * (100 * 1024)}]
    for a in cluster_calls(lab3, "h3", big, ca=ca):
        assert a.get("status") == 413 and "64 KiB" in message(a), a
    # A burst from one address, all at once: some pass, the rest get 429 with a one-line reason and Retry-After.
    answers = cluster_calls(lab3, "h3", [{"method": "GET", "path": "/ca"}] * int(3 * auth.OPEN_BURST), ca=ca,
                            parallel=True)
    statuses = [a.get("status") for a in answers]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses
    limited = [a for a in answers if a.get("status") == 429]
    assert limited, statuses
    assert "too many unauthenticated calls from 192.0.2.13" in message(limited[0])
    assert int(limited[0]["retry_after"]) >= 1
    # Another address is not affected; members' calls are not counted.
    assert cluster_calls(lab3, "h2", [{"method": "GET", "path": "/ca"}], ca=ca)[0]["status"] == 200
    hb = [{"method": "POST", "path": "/heartbeat", "body": {"Addr": lab3.address("h2")}}] * 30
    assert {a["status"] for a in cluster_calls(lab3, "h2", hb, **node_files(lab3, "h2"))} == {200}
    # Once the bucket refills, h3 joins as usual.
    time.sleep(auth.OPEN_BURST / auth.OPEN_RATE + 1)
    run_cli(lab3, "h3", "swarm", "join", "--token", token(lab3), MANAGER)
    assert swarm_info(lab3, "h3")["LocalNodeState"] == "active"
    no_tracebacks(lab3)


# ------------------------------------------------------------------ item 3 (cluster API): typed bodies

def test_bad_bodies_on_the_cluster_api_get_400_naming_the_field_and_change_nothing(lab3):
    worker = node_files(lab3, "h2")
    h2 = swarm_info(lab3, "h2")["NodeID"]
    before = {n["ID"]: (n["Status"]["Addr"], n["Spec"]["Role"], n["Certificate"]) for n in nodes(lab3)}
    csr = pki.make_csr(pki.new_node_key()).decode()
    agent_calls = [
        ("/heartbeat", {"Addr": 5}, "$.Addr"),
        ("/heartbeat", {"Addr": "5"}, "$.Addr"),
        ("/heartbeat", {"Addr": "192.0.2.12\n"}, "$.Addr"),
        ("/heartbeat", {"Addr": "127.0.0.1"}, "$.Addr"),
        ("/heartbeat", {"Addr": "0.0.0.0"}, "$.Addr"),
        ("/heartbeat", {"Addr": "224.0.0.1"}, "$.Addr"),
        ("/heartbeat", {"Addr": ["192.0.2.99"]}, "$.Addr"),
        ("/heartbeat", {"Addr": "192.0.2.99", "Role": "manager"}, "Role"),
        ("/heartbeat", [], "object"),
        ("/renew", {"CSR": 5}, "$.CSR"),
        ("/renew", {"CSR": "x" * 100_000}, "$.CSR"),
        ("/renew", {}, "CSR"),
        ("/renew", {"CSR": "not a csr"}, "invalid CSR"),
        ("/renew", {"CSR": csr, "Role": "manager"}, "Role"),
        ("/leave", {"Force": True}, "Force"),
    ]
    calls = [{"method": "POST", "path": p, "body": b} for p, b, _ in agent_calls]
    calls.append({"method": "POST", "path": "/heartbeat", "data": "[" * 50_000 + "]" * 50_000})
    calls.append({"method": "POST", "path": "/heartbeat", "data": "{not json"})
    for (path, body, field), a in zip(agent_calls + [("/heartbeat", "deep", "request body")] * 2,
                                      cluster_calls(lab3, "h2", calls, **worker)):
        assert a.get("status") == 400, (path, body, a)
        assert field in message(a), (path, body, a)

    tok = token(lab3)
    join = {"Token": tok, "CSR": csr, "Hostname": "h9", "AdvertiseAddr": "192.0.2.19"}
    join_calls = [
        ({**join, "Hostname": "h9\n"}, "$.Hostname"),
        ({**join, "Hostname": "h 9"}, "$.Hostname"),
        ({**join, "Hostname": 9}, "$.Hostname"),
        ({**join, "AdvertiseAddr": 5}, "$.AdvertiseAddr"),
        ({**join, "AdvertiseAddr": "5"}, "$.AdvertiseAddr"),
        ({**join, "AdvertiseAddr": "127.0.0.1"}, "$.AdvertiseAddr"),
        ({**join, "Token": ["x"]}, "$.Token"),
        ({**join, "CSR": "x" * 20_000}, "$.CSR"),
        ({**join, "Role": "manager"}, "Role"),
        ({k: v for k, v in join.items() if k != "Hostname"}, "Hostname"),
    ]
    answers = cluster_calls(lab3, "h3", [{"method": "POST", "path": "/join", "body": b} for b, _ in join_calls],
                            ca=worker["ca"])
    for (body, field), a in zip(join_calls, answers):
        assert a.get("status") == 400 and field in message(a), (body, a)

    after = {n["ID"]: (n["Status"]["Addr"], n["Spec"]["Role"], n["Certificate"]) for n in nodes(lab3)}
    assert after == before
    assert swarm_info(lab3, "h2")["Error"] == "" and before[h2][0] == lab3.address("h2")
    no_tracebacks(lab3)
    # The same calls with good bodies still work.
    ok = cluster_calls(lab3, "h2", [{"method": "POST", "path": "/heartbeat", "body": {"Addr": lab3.address("h2")}},
                                    {"method": "POST", "path": "/heartbeat", "body": {}}], **worker)
    assert [a["status"] for a in ok] == [200, 200]


# ------------------------------------------------------------------ item 9: the leader's renewed certificate

def test_the_leader_attaches_and_watches_after_several_renewals_of_its_certificate(make_lab):
    lab = make_lab(2, CertExpiry="12s")
    serials = [pki.cert_identity(node_files(lab, "h1")["cert"]).serial]

    def renewed_three_times():
        s = pki.cert_identity(node_files(lab, "h1")["cert"]).serial
        if s != serials[-1]:
            serials.append(s)
        return len(serials) >= 4
    wait_for(renewed_three_times, 90, "three renewals of the leader's certificate", interval=0.2)
    first = serials[0]
    assert pki.cert_identity(node_files(lab, "h1")["cert"]).not_after > datetime.now(timezone.utc)
    # Well past the end of the leader's first certificate: what its own client presents must be a later one.
    log = LogWatch(lab, "h1")
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.9.0/24", "ov")
    run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "ov", "--ip", "198.18.9.11", "--", "sleep", "1000")
    # A container started on h2 afterwards reaches h1 through the leader's watch (h1 learns h2's endpoint).
    run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--ip", "198.18.9.12", "--", "sleep", "1000")
    for host, ctr, ip in (("h1", "c1", "198.18.9.12"), ("h2", "c2", "198.18.9.11")):
        ok = wait_for(lambda: run_cli(lab, host, "exec", ctr, "--", "ping", "-c1", "-w2", ip,
                                      check=False).returncode == 0, 30, f"{ctr} on {host} to reach {ip}")
        assert ok
    # One more renewal later, attaching still works.
    wait_for(lambda: pki.cert_identity(node_files(lab, "h1")["cert"]).serial not in serials, 30,
             "another renewal of the leader's certificate", interval=0.2)
    run_cli(lab, "h1", "run", "-d", "--name", "c3", "--network", "ov", "--", "sleep", "1000")
    refused = [e for e in log.entries() if e.get("msg") in ("cluster call refused", "TLS handshake refused")]
    assert refused == [], refused
    assert first != pki.cert_identity(node_files(lab, "h1")["cert"]).serial
    no_tracebacks(lab)


# ------------------------------------------------------------------ item 15 (part): the manager is down

def test_with_the_manager_down_a_worker_says_which_manager_and_that_containers_keep_working(make_lab):
    lab = make_lab(2)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.10.0/24", "ov")
    run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--", "sleep", "1000")
    lab.stop_daemon("h1")
    r = run_cli(lab, "h2", "run", "-d", "--name", "c3", "--network", "ov", "--", "sleep", "1000", check=False)
    line = one_line_error(r, f"manager {MANAGER} is unreachable (connection refused)",
                          "containers keep their networking", "retry when it is back")
    assert "aiohttp" not in line and "Errno" not in line and "ssl:" not in line
