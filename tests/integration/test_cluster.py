"""A secure cluster on real daemons in a lab (no mocks): membership, tokens, mutual TLS and the
roles in certificates, revocation, heartbeats, certificate renewal and expiry, lab hygiene.

Every lab is h1 (leader, 192.0.2.11:2377) plus workers, heartbeat 500 ms. Waits poll with generous
deadlines; nothing asserts how fast something happened.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from lab_fixture import (LogWatch, cluster_call, new_lab_name, node_files, node_state, node_table, nodes, run_cli,
                         swarm_dir, swarm_info, wait_for)
from netweft.lab.cleanup import nsfs_mounts
from netweft.lab.lab import NETNS_DIR, Lab
from netweft import pki

MANAGER = "192.0.2.11:2377"


def token(lab: Lab, role: str = "worker") -> str:
    return run_cli(lab, "h1", "swarm", "join-token", "-q", role).stdout.strip()


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI failed with exactly one line on stderr (and nothing on stdout) that names the problem."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def leave(lab: Lab, host: str) -> str:
    """The host leaves the swarm; returns the node ID it had."""
    node_id = swarm_info(lab, host)["NodeID"]
    assert run_cli(lab, host, "swarm", "leave").stdout.strip() == "Node left the swarm."
    assert swarm_info(lab, host)["LocalNodeState"] == "inactive"
    assert not swarm_dir(lab, host).exists()
    return node_id


def refusals(log: LogWatch, path: str, status: int) -> list[dict]:
    return [e for e in log.entries() if e.get("msg") == "cluster call refused" and e.get("path") == path
            and e.get("status") == status]


def issued(ident: pki.NodeIdentity) -> datetime:
    """When a certificate was signed: not_before is backdated by pki.CLOCK_SKEW against clock drift."""
    return ident.not_before + pki.CLOCK_SKEW


# ------------------------------------------------------------------ membership

def test_init_gives_three_ready_nodes_and_inspect_shows_no_tokens(lab3):
    ids = {h: swarm_info(lab3, h)["NodeID"] for h in ("h1", "h2", "h3")}
    rows = {r["HOSTNAME"]: r for r in node_table(lab3, "h1")}
    assert sorted(rows) == ["h1", "h2", "h3"]
    for h, r in rows.items():
        assert r["STATUS"] == "Ready" and r["AVAILABILITY"] == "Active", r
        assert r["ADDRESS"] == lab3.address(h)
        assert r["ID"].split()[0] == ids[h]
    assert rows["h1"]["ID"] == f"{ids['h1']} *"  # the node the CLI talks to
    assert rows["h1"]["MANAGER STATUS"] == "Leader"
    assert rows["h2"]["MANAGER STATUS"] == rows["h3"]["MANAGER STATUS"] == ""

    out = run_cli(lab3, "h1", "swarm", "inspect").stdout
    assert "SWMTKN" not in out and "BEGIN CERTIFICATE" not in out
    s = json.loads(out)
    assert "JoinTokens" not in s
    assert s["ID"] == swarm_info(lab3, "h1")["ClusterID"] == swarm_info(lab3, "h2")["ClusterID"]
    assert s["Leader"] == {"NodeID": ids["h1"], "Addr": MANAGER}
    assert datetime.fromisoformat(s["RootCA"]["NotAfter"]) > datetime.now(timezone.utc) + timedelta(days=3000)
    assert s["RootCA"]["Digest"] == pki.ca_digest(node_files(lab3, "h2")["ca"])
    assert s["Spec"]["HeartbeatPeriod"] == 0.5

    # Certificates carry the roles; only the leader holds the CA key.
    assert pki.cert_identity(node_files(lab3, "h1")["cert"]).role == "manager"
    for h in ("h2", "h3"):
        ident = pki.verify_node_cert(node_files(lab3, "h1")["ca"], node_files(lab3, h)["cert"])
        assert (ident.role, ident.node_id, ident.cluster_id) == ("worker", ids[h], s["ID"])
        assert not (swarm_dir(lab3, h) / "ca.key").exists()
    assert (swarm_dir(lab3, "h1") / "ca.key").exists()

    # A worker's daemon never loads aiohttp (≈14 MiB resident); only a manager's cluster API still uses it.
    def maps(h: str) -> str:
        with open(f"/proc/{int((lab3.host_dir(h) / 'netweftd.pid').read_text())}/maps") as f:
            return f.read()
    assert "/aiohttp/" not in maps("h2") and "/aiohttp/" not in maps("h3") and "/aiohttp/" in maps("h1")


def test_worker_leave_shows_down_on_the_manager(lab3):
    old = leave(lab3, "h3")
    assert node_state(lab3, old) == "down"  # the manager was told at once, no heartbeat timeout needed
    assert node_state(lab3, swarm_info(lab3, "h2")["NodeID"]) == "ready"


def test_join_with_manager_token_gives_a_reachable_manager_that_forwards(lab3):
    leave(lab3, "h3")
    r = run_cli(lab3, "h3", "swarm", "join", "--token", token(lab3, "manager"), MANAGER)
    assert r.stdout.strip() == "This node joined a swarm as a manager."
    me = swarm_info(lab3, "h3")
    assert me["Role"] == "manager" and not me["Leader"] and me["Error"] == ""
    assert pki.cert_identity(node_files(lab3, "h3")["cert"]).role == "manager"

    for via in ("h1", "h3"):  # the leader's own list, and the same list forwarded from the new manager
        rows = {r["ID"].split()[0]: r for r in node_table(lab3, via)}
        new = rows[me["NodeID"]]
        assert (new["HOSTNAME"], new["STATUS"], new["MANAGER STATUS"]) == ("h3", "Ready", "Reachable")
        leader = rows[swarm_info(lab3, "h1")["NodeID"]]
        assert leader["MANAGER STATUS"] == "Leader"
        me_row = new if via == "h3" else leader
        assert me_row["ID"].endswith(" *")
    # Other manager commands forward too.
    assert json.loads(run_cli(lab3, "h3", "swarm", "inspect").stdout)["ID"] == me["ClusterID"]
    assert json.loads(run_cli(lab3, "h3", "node", "inspect", "self").stdout)[0]["ID"] == me["NodeID"]


def test_node_rm_needs_force_for_a_ready_node_then_its_certificate_is_refused_everywhere(lab3):
    victim = swarm_info(lab3, "h2")["NodeID"]
    refused(run_cli(lab3, "h1", "node", "rm", "h2", check=False), "h2", "not down", "--force")
    assert node_state(lab3, victim) == "ready"

    creds = node_files(lab3, "h2")  # what a removed (or stolen) node still holds
    log = LogWatch(lab3, "h1")
    assert run_cli(lab3, "h1", "node", "rm", "--force", "h2").stdout.strip() == "h2"
    assert node_state(lab3, victim) is None
    assert "h2" not in [r["HOSTNAME"] for r in node_table(lab3, "h1")]

    csr = pki.make_csr(pki.new_node_key()).decode()
    calls = [("POST", "/heartbeat", {"Addr": lab3.address("h2")}), ("POST", "/renew", {"CSR": csr}),
             ("POST", "/leave", None), ("GET", "/admin/nodes", None), ("GET", "/admin/swarm", None),
             ("POST", "/admin/join-token/rotate?role=worker", None)]
    for method, path, body in calls:
        r = cluster_call(lab3, "h2", method, path, body=body, **creds)
        assert r.get("status") == 403, (path, r)
        assert "removed from the cluster" in json.loads(r["body"])["message"], (path, r)
    for method, path, body in calls:
        entries = log.wait(lambda e: e.get("msg") == "cluster call refused" and e.get("path") == path.split("?")[0]
                           and e.get("status") == 403, what=f"refusal of {path} in the leader's log")
        assert entries["peer"] == lab3.address("h2") and "removed" in entries["reason"]
    # The removed node's own daemon learns it from its next heartbeat.
    err = wait_for(lambda: swarm_info(lab3, "h2")["Error"], 10, "h2 to report its removal")
    assert "removed" in err
    # The rest of the cluster carries on.
    assert node_state(lab3, swarm_info(lab3, "h3")["NodeID"]) == "ready"


# ------------------------------------------------------------------ join tokens

FAKE_MANAGER = r"""
import asyncio, json, ssl, sys
from pathlib import Path
from netweft import pki
spec = json.load(sys.stdin)
record = open(spec["record"], "a")
ctx = pki.server_ssl_context(spec["ca"], spec["cert"], spec["key"], require_client_cert=False)

async def handle(reader, writer):
    data, head = b"", b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            chunk = await reader.read(65536)
            if not chunk:
                break
            rest += chunk
        data = head + b"\r\n\r\n" + rest
    finally:
        # Every byte the client sent over TLS, before any parsing can drop something.
        record.write(json.dumps({"raw": data.decode("latin-1")}) + "\n")
        record.flush()
    if head.startswith(b"GET /ca "):
        status, body, ctype = "200 OK", spec["ca"].encode(), "application/x-pem-file"
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


@pytest.fixture
def fake_manager(lab3):
    """An impostor manager on h2's address, port 2377: its own CA (a perfect manager certificate under it)
    serves GET /ca and refuses everything else; it records every request's raw bytes."""
    fake_ca = pki.create_root_ca("impostor")
    key = pki.new_node_key()
    cert = pki.sign_node_cert(fake_ca, pki.make_csr(key), "fake-manager", "manager", "impostor",
                              timedelta(hours=1), ip_sans=[lab3.address("h2")])
    record, ready = lab3.root / "fake-manager.jsonl", lab3.root / "fake-manager.ready"
    spec = {"ca": fake_ca.cert_pem.decode(), "cert": cert.decode(), "key": pki.key_to_pem(key).decode(),
            "host": lab3.address("h2"), "port": 2377, "record": str(record), "ready": str(ready)}
    argv, env = lab3.exec_argv("h2", [sys.executable, "-c", FAKE_MANAGER])
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 20, "the fake manager to listen")
        assert proc.poll() is None, proc.stderr.read()

        def requests() -> list[str]:
            return [json.loads(l)["raw"] for l in record.read_text().splitlines()] if record.exists() else []
        yield f"{lab3.address('h2')}:2377", fake_ca, requests
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_join_checks_the_ca_digest_before_it_sends_the_secret(lab3, fake_manager):
    addr, fake_ca, requests = fake_manager
    leave(lab3, "h3")
    real_digest = pki.parse_join_token(token(lab3)).digest
    canary = "0canary" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(18))
    known = {n["ID"] for n in nodes(lab3)}

    r = run_cli(lab3, "h3", "swarm", "join", "--token", f"SWMTKN-1-{real_digest}-{canary}", addr, check=False)
    refused(r, "does not hold the CA named in the join token", "sending nothing")
    assert canary not in r.stderr
    got = requests()
    assert len(got) == 1 and got[0].startswith("GET /ca HTTP/1.1\r\n"), got
    assert not any(canary in raw for raw in got)
    assert swarm_info(lab3, "h3")["LocalNodeState"] == "inactive" and not swarm_dir(lab3, "h3").exists()
    assert {n["ID"] for n in nodes(lab3)} == known

    # Control: the recorder does see a secret when one is sent. A token naming the impostor's own CA is
    # (rightly) trusted, so the client goes on to POST /join with its secret.
    canary2 = "0control" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(17))
    r = run_cli(lab3, "h3", "swarm", "join", "--token", f"SWMTKN-1-{fake_ca.digest()}-{canary2}", addr,
                check=False)
    refused(r, "fake manager: no")
    got = requests()[1:]
    assert [raw.split(" ", 2)[:2] for raw in got] == [["GET", "/ca"], ["POST", "/join"]]
    assert canary2 in got[1] and canary not in got[1]


def test_join_with_a_wrong_secret_is_refused(lab3):
    leave(lab3, "h3")
    log = LogWatch(lab3, "h1")
    digest = pki.parse_join_token(token(lab3)).digest
    wrong = f"SWMTKN-1-{digest}-{pki.make_join_token(digest).rsplit('-', 1)[1]}"
    refused(run_cli(lab3, "h3", "swarm", "join", "--token", wrong, MANAGER, check=False),
            "invalid join token", "netweft swarm join-token worker")
    log.wait(lambda e: e.get("msg") == "cluster call refused" and e.get("path") == "/join" and e["status"] == 401,
             what="the refused join in the leader's log")
    assert swarm_info(lab3, "h3")["LocalNodeState"] == "inactive" and not swarm_dir(lab3, "h3").exists()
    # A malformed token is refused before anything is sent.
    refused(run_cli(lab3, "h3", "swarm", "join", "--token", "SWMTKN-1-abc-def", MANAGER, check=False),
            "invalid join token", "CA digest")
    assert sorted(n["Description"]["Hostname"] for n in nodes(lab3)) == ["h1", "h2", "h3"]  # the old, Down h3


def test_rotating_the_worker_token_refuses_the_old_one_and_keeps_members(lab3):
    old, manager_token = token(lab3), token(lab3, "manager")
    new = run_cli(lab3, "h1", "swarm", "join-token", "--rotate", "-q", "worker").stdout.strip()
    assert new != old and new.startswith("SWMTKN-1-")
    assert pki.parse_join_token(new).digest == pki.parse_join_token(old).digest  # same CA
    assert token(lab3) == new and token(lab3, "manager") == manager_token

    leave(lab3, "h3")
    refused(run_cli(lab3, "h3", "swarm", "join", "--token", old, MANAGER, check=False), "invalid join token",
            "rotated")
    assert swarm_info(lab3, "h3")["LocalNodeState"] == "inactive"
    run_cli(lab3, "h3", "swarm", "join", "--token", new, MANAGER)
    assert node_state(lab3, swarm_info(lab3, "h3")["NodeID"]) == "ready"

    time.sleep(2.5)  # several heartbeat periods (and the 1.5 s Down limit) with the new token in place
    h2 = swarm_info(lab3, "h2")
    assert h2["Error"] == "" and node_state(lab3, h2["NodeID"]) == "ready"


# ------------------------------------------------------------------ roles and mutual TLS

def test_cluster_api_refuses_wrong_role_missing_and_foreign_certificates(lab3):
    log = LogWatch(lab3, "h1")
    worker = node_files(lab3, "h2")
    me = lab3.address("h2")

    # A worker certificate on a manager-only call.
    r = cluster_call(lab3, "h2", "GET", "/admin/nodes", **worker)
    assert r.get("status") == 403 and "manager certificate" in json.loads(r["body"])["message"], r
    # The same certificate is fine on an agent call.
    assert cluster_call(lab3, "h2", "POST", "/heartbeat", body={"Addr": me}, **worker).get("status") == 200

    # No client certificate at all.
    r = cluster_call(lab3, "h2", "POST", "/heartbeat", body={}, ca=worker["ca"])
    assert r.get("status") == 401 and "node certificate is required" in json.loads(r["body"])["message"], r
    # ...while the open calls stay open.
    assert cluster_call(lab3, "h2", "GET", "/ca", ca=worker["ca"]) == {"status": 200, "body": worker["ca"].decode()}

    for path, status, words in (("/admin/nodes", 403, "manager certificate"),
                                ("/heartbeat", 401, "node certificate is required")):
        wait_for(lambda: refusals(log, path, status), 10, f"{path} refusal in the leader's log")
        e = refusals(log, path, status)[0]
        assert e["peer"] == me and words in e["reason"], e

    # A manager certificate of another cluster (even one claiming this cluster's ID).
    other = pki.create_root_ca("other-cluster")
    cluster_id = swarm_info(lab3, "h1")["ClusterID"]
    handshakes = len([e for e in log.entries() if e.get("msg") == "TLS handshake refused"])
    for claimed in ("other-cluster", cluster_id):
        key = pki.new_node_key()
        cert = pki.sign_node_cert(other, pki.make_csr(key), swarm_info(lab3, "h1")["NodeID"], "manager", claimed,
                                  timedelta(hours=1))
        for method, path in (("GET", "/admin/nodes"), ("POST", "/heartbeat")):
            r = cluster_call(lab3, "h2", method, path, body={} if method == "POST" else None, ca=worker["ca"],
                             cert=cert, key=pki.key_to_pem(key))
            assert "error" in r or r.get("status") == 401, r
    # Logged once per address per interval (a stranger cannot flood the log), with the reason.
    found = wait_for(lambda: [e for e in log.entries() if e.get("msg") == "TLS handshake refused"][handshakes:],
                     10, "the refused handshake in the leader's log")
    assert found[0]["peer"].startswith(me + ":") and "cluster" in found[0]["reason"], found[0]


def test_a_demoted_manager_loses_manager_calls_even_with_its_old_certificate(lab3):
    leave(lab3, "h3")
    run_cli(lab3, "h3", "swarm", "join", "--token", token(lab3, "manager"), MANAGER)
    old = node_files(lab3, "h3")
    assert cluster_call(lab3, "h3", "GET", "/admin/nodes", **old).get("status") == 200
    me = swarm_info(lab3, "h3")["NodeID"]
    run_cli(lab3, "h1", "node", "demote", me)
    # The node renews into a worker certificate at its next heartbeat...
    wait_for(lambda: pki.cert_identity(node_files(lab3, "h3")["cert"]).role == "worker", 10,
             "h3's worker certificate")
    refused(run_cli(lab3, "h3", "node", "ls", check=False), "not a swarm manager")
    # ...and a copy of its manager certificate (a node that never renews) must not keep the role.
    r = cluster_call(lab3, "h3", "GET", "/admin/nodes", **old)
    assert r.get("status") == 403, r


@pytest.mark.parametrize("args", [["node", "ls"], ["node", "rm", "h1"], ["node", "promote", "h2"],
                                  ["swarm", "join-token", "worker"], ["swarm", "inspect"]])
def test_manager_commands_on_a_worker_give_one_clear_line(lab3, args):
    refused(run_cli(lab3, "h2", *args, check=False), "not a swarm manager", "netweft node promote")


# ------------------------------------------------------------------ liveness and certificate lifetime

def test_heartbeats_mark_a_stopped_node_down_and_a_restarted_one_ready(lab3):
    h2 = swarm_info(lab3, "h2")["NodeID"]
    log = LogWatch(lab3, "h1")
    lab3.stop_daemon("h2")
    wait_for(lambda: node_state(lab3, h2) == "down", 15, "h2 Down after missed heartbeats")
    e = log.wait(lambda e: e.get("msg") == "node down: missed heartbeats", what="the Down in the leader's log")
    assert e["hostname"] == "h2"
    assert node_state(lab3, swarm_info(lab3, "h3")["NodeID"]) == "ready"
    lab3.start_daemon("h2")
    wait_for(lambda: node_state(lab3, h2) == "ready", 15, "h2 Ready again")
    assert swarm_info(lab3, "h2")["Error"] == ""


def test_certificates_renew_between_50_and_80_percent_of_their_lifetime(make_lab):
    lab = make_lab(2, CertExpiry="20s")
    h2 = swarm_info(lab, "h2")["NodeID"]
    first = pki.cert_identity(node_files(lab, "h2")["cert"])
    leader_first = pki.cert_identity(node_files(lab, "h1")["cert"])
    assert first.not_after - issued(first) == timedelta(seconds=20)

    renewed = wait_for(lambda: (lambda i: i if i.serial != first.serial else None)(
        pki.cert_identity(node_files(lab, "h2")["cert"])), 25, "h2's certificate to be renewed")
    life = first.not_after - issued(first)
    slack = timedelta(seconds=2)  # certificate times have whole seconds
    assert issued(first) + life * 0.5 - slack <= issued(renewed) <= issued(first) + life * 0.8 + slack, \
        (first, renewed)
    assert renewed.node_id == h2 and renewed.role == "worker"
    assert renewed.not_after - issued(renewed) == timedelta(seconds=20)

    # Past the leader's first certificate's end: the leader renewed its own and serves the new one.
    time.sleep(max(0.0, (leader_first.not_after - datetime.now(timezone.utc)).total_seconds()) + 1)
    assert pki.cert_identity(node_files(lab, "h1")["cert"]).serial != leader_first.serial
    r = cluster_call(lab, "h2", "POST", "/heartbeat", body={"Addr": lab.address("h2")}, **node_files(lab, "h2"))
    assert r.get("status") == 200, r
    assert node_state(lab, h2) == "ready" and swarm_info(lab, "h2")["Error"] == ""
    assert pki.cert_identity(node_files(lab, "h2")["cert"]).not_after > datetime.now(timezone.utc)


def test_a_node_off_longer_than_its_certificate_is_told_to_rejoin(make_lab):
    lab = make_lab(2, CertExpiry="10s")
    lab.stop_daemon("h2")
    end = pki.cert_identity(node_files(lab, "h2")["cert"]).not_after
    time.sleep(max(0.0, (end - datetime.now(timezone.utc)).total_seconds()) + 1)
    lab.start_daemon("h2")

    s = swarm_info(lab, "h2")
    assert s["LocalNodeState"] == "error"
    assert "expired" in s["Error"] and "rejoin" in s["Error"] and "swarm join" in s["Error"], s
    refused(run_cli(lab, "h2", "node", "ls", check=False), "expired", "rejoin")

    # Following the advice works.
    run_cli(lab, "h2", "swarm", "leave", "--force")
    run_cli(lab, "h2", "swarm", "join", "--token", token(lab), MANAGER)
    s = swarm_info(lab, "h2")
    assert s["LocalNodeState"] == "active" and s["Error"] == ""
    assert node_state(lab, s["NodeID"]) == "ready"


# ------------------------------------------------------------------ the lab itself

def _start_time(pid: int) -> str | None:
    """A live process's start time (tells it from a later process with the same pid); None if gone or a
    zombie (dead, waiting for init to reap it)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _lab_processes(lab: Lab, ns_inodes: set[int] = frozenset()) -> dict[int, str]:
    """Processes (pid -> start time) that mention the lab's directory or live in one of its namespaces."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if (str(lab.root) in cmdline or ns in ns_inodes) and _start_time(pid):
            out[pid] = _start_time(pid)
    return out


def test_lab_up_and_down_leave_nothing_behind():
    name = new_lab_name()
    lab = Lab(name)
    netweft = [os.path.join(os.path.dirname(sys.executable), "netweft"), "lab"]
    try:
        r = subprocess.run([*netweft, "up", "--hosts", "2", "--name", name], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert name in subprocess.run([*netweft, "ls"], capture_output=True, text=True).stdout
        # Give h1 a container so that its daemon has namespaces mounted under the lab's directory.
        run_cli(lab, "h1", "network", "create", "--subnet", "198.18.0.0/24", "n1")
        run_cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "n1", "--", "sleep", "1000")
        namespaces = [p for p in os.listdir(NETNS_DIR) if p.startswith(f"nwl-{name}-")]
        assert sorted(namespaces) == [f"nwl-{name}-{h}" for h in ("h1", "h2", "sw")]
        inodes = {os.stat(NETNS_DIR / p).st_ino for p in namespaces}
        mounts = [m for m in nsfs_mounts() if m.startswith(str(lab.root) + "/")]
        assert mounts, "expected the container's namespaces under the lab directory"
        inodes |= {os.stat(m).st_ino for m in mounts}
        procs = _lab_processes(lab, inodes)
        assert len(procs) >= 3  # two daemons and the container at least

        r = subprocess.run([*netweft, "down", name], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not [p for p in os.listdir(NETNS_DIR) if p.startswith(f"nwl-{name}-")]
        assert not [m for m in nsfs_mounts() if m.startswith(str(lab.root))]
        # (namespace inodes can be reused by others once ours are gone: check the processes we saw, by start time)
        assert not [pid for pid, started in procs.items() if _start_time(pid) == started]
        assert not _lab_processes(lab)
        assert not lab.root.exists()
        assert name not in subprocess.run([*netweft, "ls"], capture_output=True, text=True).stdout
    finally:
        lab.down(quiet=True)


@pytest.mark.parametrize("expiry, words", [("3000000d", "at most 3650d"), ("3651d", "at most 3650d"),
                                           ("99999999999d", "too large")])
def test_swarm_init_refuses_a_cert_expiry_beyond_the_cas_lifetime_in_one_line(daemon, expiry, words):
    r = daemon.cli("swarm", "init", "--advertise-addr", "192.0.2.10", "--cert-expiry", expiry, check=False)
    assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not part of a swarm" in daemon.cli("node", "ls", check=False).stderr  # no swarm left behind
    daemon.log.flush()
    assert "Traceback" not in (daemon.root / "netweftd.log").read_text()
