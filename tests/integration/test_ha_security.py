"""Several managers on etcd (issue 8), the secrets: the managers' etcd certificates renewed while writes go on,
revoked when their manager is demoted (every remaining member refuses them, on the client and the peer port),
and the managers' key rotated (on demand, and when a manager that held it is demoted).

One lab: h1..h3 managers (each with an etcd member), h4 a worker; the etcd certificates live 20 s.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from lab_fixture import HEARTBEAT, cluster_call, new_lab_name, node_files, run_cli, swarm_dir, wait_for
from netweft import pki
from netweft.lab.lab import Lab
from netweft.manager import hastore
from netweft.pki import sealed

MANAGERS = ("h1", "h2", "h3")
STORE_CERT_LIFETIME = "30s"   # renewed every 15-24 s; a manager stopped longer renews it before it starts


@pytest.fixture
def sec_lab():
    lab = Lab(new_lab_name())
    try:   # lab.down removes every process (etcd members included) and file, also when the test fails
        lab.up(4, managers=3, init_opts={"HeartbeatPeriod": HEARTBEAT, "Store": "etcd",
                                         "StoreCertExpiry": STORE_CERT_LIFETIME}, progress=lambda *a: None)
        yield lab
    finally:
        lab.down(quiet=True)


# ------------------------------------------------------------------ probes, run inside a lab host

_PROBE = r"""
import asyncio, http.client, json, ssl, sys
from netweft import pki
from netweft.manager import hastore
from netweft.store.etcd import EtcdStore
spec = json.load(sys.stdin)
ca = spec["ca"].encode()
# a manager's own files are read now, right before connecting (a renewal may have replaced them meanwhile)
pair = open(spec["file"], "rb").read() if spec.get("file") else spec["pair"].encode()
cert, key = hastore.split_pair(pair)

async def etcd():
    s = EtcdStore([spec["endpoint"]], cacert=ca, cert=cert, key=key, server_name=pki.MANAGER_HOSTNAME)
    try:
        if spec["op"] == "root":
            r = await asyncio.wait_for(s.get("ca", "root"), 10)
            return {"ok": json.loads(r.value)}
        return {"ok": await asyncio.wait_for(s.revision(), 10)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        await s.close()

def tls(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    ctx.check_hostname = False
    pki._load_cert_chain(ctx, cert, key)
    host, _, _ = spec["endpoint"].rpartition(":")
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        c.request("GET", "/members" if port == 2380 else "/version")
        r = c.getresponse()
        served = c.sock.getpeercert(binary_form=True)
        return {"ok": r.status, "served": str(pki.cert_identity(served).serial), "body": r.read().decode()[:300]}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        c.close()

if spec["op"] == "peer":
    print(json.dumps(tls(2380)))
elif spec["op"] == "client-tls":
    print(json.dumps(tls(2379)))
else:
    print(json.dumps(asyncio.run(etcd())))
"""


def probe(lab: Lab, host: str, op: str, target: str, ca: bytes, pair: bytes | None = None) -> dict:
    """From inside `host`: one etcd request to `target`'s member (a new connection) with the given certificate
    pair, or (None) with `host`'s own store.pem as it is when the request leaves."""
    spec = {"op": op, "endpoint": f"{lab.address(target)}:2379", "ca": ca.decode(),
            "pair": pair.decode() if pair else "", "file": "" if pair else str(swarm_dir(lab, host) / "store.pem")}
    argv, env = lab.exec_argv(host, [sys.executable, "-c", _PROBE])
    r = subprocess.run(argv, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def store_pair(lab: Lab, host: str) -> tuple[bytes, bytes]:
    """(store CA, store.pem) of a manager as they are now."""
    d = swarm_dir(lab, host)
    return pki.load_pem(d / "store-ca.crt"), pki.load_pem(d / "store.pem")


def serial(pair: bytes) -> int:
    return pki.cert_identity(hastore.split_pair(pair)[0]).serial


def serial_hex(pair: bytes) -> str:
    """As etcd prints a serial: the hex of its big-endian bytes."""
    n = serial(pair)
    return n.to_bytes((n.bit_length() + 7) // 8, "big").hex()


def manager_key(lab: Lab, host: str) -> bytes | None:
    try:
        return sealed.load_key(str(swarm_dir(lab, host)))
    except Exception:  # noqa: BLE001 - absent or being replaced: asked again
        return None


def opens(key: bytes, rec: dict) -> bool:
    try:
        sealed.unseal(key, "ca-key", rec["key"])
        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------ the test

def test_etcd_certificates_renewed_revoked_and_the_managers_key_rotated(sec_lab):
    lab = sec_lab
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    for h in MANAGERS:   # secrets are 0600
        d = swarm_dir(lab, h)
        for f in ("store.pem", "manager.key"):
            assert (d / f).stat().st_mode & 0o777 == 0o600, (h, f)
        assert (d / "store-crl.pem").exists()

    # 1. Renewal: every manager renews its etcd certificate twice while writes keep working; each member
    #    serves its current certificate (etcd reads the file per handshake: no restart).
    first = {h: serial(store_pair(lab, h)[1]) for h in MANAGERS}
    seen = {h: [first[h]] for h in MANAGERS}
    writes = 0

    def renewed_twice() -> bool:
        nonlocal writes
        for h in MANAGERS:
            s = serial(store_pair(lab, h)[1])
            if s != seen[h][-1]:
                seen[h].append(s)
        run_cli(lab, MANAGERS[writes % 3], "run", "-d", "--name", f"r{writes}", "--network", "ov", "--", "sleep", "1000")
        writes += 1
        return all(len(v) >= 3 for v in seen.values())
    wait_for(renewed_twice, 120, "two renewals of every manager's etcd certificate", interval=2)
    print(f"\n{writes} containers started on ov while every etcd certificate was renewed twice")
    for h in MANAGERS:
        before = serial(store_pair(lab, h)[1])
        got = probe(lab, h, "client-tls", h, store_pair(lab, h)[0])
        assert got.get("ok") == 200, got
        # the file's certificate then (a renewal may land meanwhile), never the one from init
        assert int(got["served"]) in (before, serial(store_pair(lab, h)[1])), (h, got["served"], before)
        assert int(got["served"]) != first[h]
    # The first certificates have expired: a manager whose etcd connection breaks reconnects with its renewed
    # one (its etcd client switched channels at each renewal).
    pid = int((swarm_dir(lab, "h2") / "etcd" / "etcd.pid").read_text())
    os.kill(pid, signal.SIGKILL)   # h2's manager talked to its own member: now to h1's or h3's (a new connection)
    wait_for(lambda: run_cli(lab, "h2", "network", "create", "-d", "overlay", "--subnet", "198.18.1.0/24",
                             "after-renewal", check=False).returncode == 0, 30, "a write through h2 after its member died")
    wait_for(lambda: run_cli(lab, "h3", "network", "inspect", "after-renewal", check=False).returncode == 0, 30,
             "the network seen through h3")

    # 2. Key rotation on demand (on a manager that may not lead): every manager gets the new key; then every
    #    manager restarts and the cluster works (each opens the CA key with the new key).
    old = {h: manager_key(lab, h) for h in MANAGERS}
    assert len(set(old.values())) == 1
    r = run_cli(lab, "h2", "swarm", "unlock-key", "--rotate")
    assert "rotated" in r.stdout
    wait_for(lambda: len({manager_key(lab, h) for h in MANAGERS} - {None}) == 1
             and manager_key(lab, "h1") not in (None, old["h1"]), 30, "the new key on every manager")
    for h in MANAGERS:
        lab.stop_daemon(h)
    starts = [threading.Thread(target=lab.start_daemon, args=(h,)) for h in MANAGERS]
    for t in starts:
        t.start()
    for t in starts:
        t.join(120)
    wait_for(lambda: run_cli(lab, "h1", "network", "create", "-d", "overlay", "--subnet", "198.18.2.0/24",
                             "after-restart", check=False).returncode == 0, 90, "a write after every manager restarted")
    run_cli(lab, "h4", "run", "-d", "--name", "w1", "--network", "ov", "--", "sleep", "1000")

    # A manager that was down during a rotation fetches the new key from another over mutual TLS at start.
    lab.stop_daemon("h3")
    before = manager_key(lab, "h1")
    run_cli(lab, "h1", "swarm", "unlock-key", "--rotate")
    assert manager_key(lab, "h3") == before != manager_key(lab, "h1")
    lab.start_daemon("h3")
    wait_for(lambda: manager_key(lab, "h3") == manager_key(lab, "h1"), 60, "h3 fetching the rotated key")
    wait_for(lambda: run_cli(lab, "h3", "network", "create", "-d", "overlay", "--subnet", "198.18.3.0/24",
                             "via-h3", check=False).returncode == 0, 60, "h3 serving writes")

    # Refusals: a worker's certificate is not handed the key; plain `unlock-key` says what to do.
    w4 = node_files(lab, "h4")
    got = cluster_call(lab, "h4", "GET", "/managers/key", ca=w4["ca"], cert=w4["cert"], key=w4["key"])
    assert got.get("status") == 403 and "manager certificate" in got["body"], got
    r = run_cli(lab, "h1", "swarm", "unlock-key", check=False)
    assert r.returncode != 0 and "--rotate" in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    r = run_cli(lab, "h4", "swarm", "unlock-key", "--rotate", check=False)
    assert r.returncode != 0 and "not a swarm manager" in r.stderr, r.stderr

    # 3. Demote h3: its etcd certificate is refused by the remaining members at once (client and peer port),
    #    and the key it held no longer opens the CA key in the store.
    # (h3's certificate taken right after a renewal: it lives long enough to be refused for its revocation)
    was = serial(store_pair(lab, "h3")[1])
    wait_for(lambda: serial(store_pair(lab, "h3")[1]) != was, 60, "a renewal of h3's etcd certificate", interval=0.2)
    h3_ca, h3_pair = store_pair(lab, "h3")
    h3_key = manager_key(lab, "h3")
    h3_node = node_files(lab, "h3")
    for target in ("h1", "h2"):   # before: it works (a control for the refusals below)
        assert "ok" in probe(lab, "h3", "etcd", target, h3_ca, h3_pair), target
    run_cli(lab, "h1", "node", "demote", "h3")
    for target in ("h1", "h2"):
        got = wait_for(lambda: "error" in (p := probe(lab, "h3", "etcd", target, h3_ca, h3_pair)) and p, 30,
                       f"{target}'s member refusing h3's etcd certificate")
        print(f"{target}'s etcd refuses h3's revoked certificate: {got['error'][:160]}")
        peer = probe(lab, "h3", "peer", target, h3_ca, h3_pair)
        assert "error" in peer, peer
        # refused because it is revoked (not because it expired meanwhile): the member says so
        revoked = f"certificate serial {serial_hex(h3_pair)} revoked"
        wait_for(lambda: revoked in (swarm_dir(lab, target) / "etcd" / "etcd.log").read_text(errors="replace"), 10,
                 f"{target}'s etcd naming h3's certificate revoked")
        ok = probe(lab, "h1", "peer", target, store_pair(lab, "h1")[0])   # the same request with a current cert
        assert ok.get("ok") == 200, ok
        assert "ok" in probe(lab, "h1", "etcd", target, store_pair(lab, "h1")[0])
    # h3 learns it was demoted (its etcd view stopped at the revocation: it asks another manager) and goes on
    # as a worker
    wait_for(lambda: lab.client("h3").call("GET", "/info")["Swarm"]["Role"] == "worker", 30, "h3 a worker")
    wait_for(lambda: manager_key(lab, "h1") not in (None, h3_key), 30, "the key rotated after the demotion")
    rec = wait_for(lambda: (p := probe(lab, "h1", "root", "h1", store_pair(lab, "h1")[0])).get("ok")
                   and not opens(h3_key, p["ok"]) and p["ok"], 30, "CA/root sealed under a key h3 never had")
    assert opens(manager_key(lab, "h1"), rec)
    # h3 (a worker now) is not handed the new key with its old manager certificate.
    got = cluster_call(lab, "h3", "GET", "/managers/key", ca=h3_node["ca"], cert=h3_node["cert"], key=h3_node["key"])
    assert got.get("status") == 403, got
    run_cli(lab, "h2", "network", "create", "-d", "overlay", "--subnet", "198.18.4.0/24", "after-demote")
