"""Several managers on etcd (issue 8), on real lab hosts: h1..h3 managers, each with an etcd member beside it
(`swarm init --store etcd`), the others workers.

Each test builds one lab and runs several scenarios in it (a lab with three etcd members takes ~10 s to
build). Timings (leader takeover, convergence after a heal) are printed, never asserted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from datetime import datetime

from lab_fixture import (HEARTBEAT, LogWatch, cluster_call, new_lab_name, node_files, node_table, run_cli, swarm_dir,
                         wait_for)
from netweft.lab.lab import Lab
from test_concurrency import programmed

MANAGERS = ("h1", "h2", "h3")
ATTACHES_PER_HOST = 25   # 100 concurrent attaches from 4 hosts (1,000: bench/bench_ha_attach.py)


@pytest.fixture
def ha_lab():
    labs: list[Lab] = []

    def make(n: int) -> Lab:
        lab = Lab(new_lab_name())
        labs.append(lab)
        lab.up(n, managers=3, init_opts={"HeartbeatPeriod": HEARTBEAT, "Store": "etcd"}, progress=lambda *a: None)
        return lab
    try:
        yield make
    finally:
        for lab in labs:
            lab.down(quiet=True)


# ------------------------------------------------------------------ helpers

_MEMBERS = r"""
import asyncio, json, sys
from netweft.manager import hastore
async def main():
    s = hastore.open_store(sys.argv[1], json.loads(sys.argv[2]))
    try:
        print(json.dumps(sorted(m.name for m in await s.members())))
    finally:
        await s.close()
asyncio.run(main())
"""


def etcd_members(lab: Lab, via: str) -> list[str]:
    """The names (node IDs) of the etcd cluster's members, asked with `via`'s store certificate."""
    st = lab.client(via).call("GET", "/info")["Swarm"]
    eps = [f"{lab.address(h)}:2379" for h in MANAGERS]
    argv, env = lab.exec_argv(via, [sys.executable, "-c", _MEMBERS, str(swarm_dir(lab, via)), json.dumps(eps)])
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert st["Store"] == "etcd"
    return json.loads(r.stdout)


def node_id(lab: Lab, host: str) -> str:
    return lab.client(host).call("GET", "/info")["Swarm"]["NodeID"]


def leader(lab: Lab, via: str) -> str | None:
    rows = node_table(lab, via)
    return next((r["HOSTNAME"] for r in rows if r["MANAGER STATUS"] == "Leader"), None)


def kill_etcd(lab: Lab, host: str) -> None:
    pid = int((swarm_dir(lab, host) / "etcd" / "etcd.pid").read_text())
    os.kill(pid, signal.SIGKILL)


def cut(lab: Lab, host: str, up: bool) -> None:
    """Take the host's port on the underlay switch down (or up again)."""
    subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", host, "up" if up else "down"], check=True)


def ips_on(lab: Lab, host: str, net: str = "ov") -> dict[str, str]:
    return {c["Name"]: c["NetworkSettings"]["Networks"][net]["IPAddress"]
            for c in lab.client(host).call("GET", "/containers/json?all=1") if net in c["NetworkSettings"]["Networks"]}


def attach_many(lab: Lab, hosts: list[str], per_host: int, prefix: str, results: dict) -> list[threading.Thread]:
    """Start per_host containers on `ov` from each host, 4 at a time per host; results[name] = ok or error."""
    def worker(host: str, names: list[str]) -> None:
        c = lab.client(host, timeout=120)
        for name in names:
            try:
                c.call("POST", "/containers/create", {"Name": name, "NetworkMode": "ov", "Cmd": ["sleep", "1000"]})
                results[name] = "ok"
            except Exception as e:  # noqa: BLE001 - an attach may fail while the leader dies: recorded
                results[name] = str(e)
    threads = []
    for host in hosts:
        names = [f"{prefix}{host}x{i:03d}" for i in range(per_host)]
        for k in range(4):
            t = threading.Thread(target=worker, args=(host, names[k::4]), daemon=True)
            t.start()
            threads.append(t)
    return threads


def streams_on(lab: Lab, host: str) -> dict[str, float]:
    """node id -> when (epoch s) its latest watch opened on this manager, from the manager's whole log."""
    w = LogWatch(lab, host)
    w.offset = 0
    return {e["node"]: datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
            for e in w.entries() if e.get("msg") == "watch opened"}


def all_programmed(lab: Lab, hosts: list[str], net_id: str) -> bool:
    ips = {h: set(ips_on(lab, h).values()) for h in hosts}
    return all(programmed(lab, h, net_id) >= {ip for o in hosts if o != h for ip in ips[o]} for h in hosts)


# ------------------------------------------------------------------ tests

def test_leader_killed_during_attaches_then_a_manager_host_lost_then_a_manager_demoted(ha_lab):
    lab = ha_lab(5)
    assert [r["MANAGER STATUS"] for r in sorted(node_table(lab, "h2"), key=lambda r: r["HOSTNAME"])] == \
        ["Leader", "Reachable", "Reachable", "", ""]
    assert len(etcd_members(lab, "h2")) == 3
    # Workers know every manager (the join answer, then the watch).
    assert sorted(lab.client("h5").call("GET", "/info")["Swarm"]["Managers"]) == \
        [f"{lab.address(h)}:2377" for h in MANAGERS]
    run_cli(lab, "h2", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/22", "ov")
    net_id = json.loads(run_cli(lab, "h2", "network", "inspect", "ov").stdout)[0]["Id"]

    # A worker's certificate does not enroll it in the store.
    w5 = node_files(lab, "h5")
    r = cluster_call(lab, "h5", "POST", "/managers/enroll", ca=w5["ca"], cert=w5["cert"], key=w5["key"],
                     body={"CSR": "x"}, manager=f"{lab.address('h2')}:2377")
    assert r.get("status") == 403 and "manager certificate" in r["body"], r

    # 1. kill -9 the leader's netweftd while 4 hosts attach at once.
    workers = {node_id(lab, h): h for h in ("h4", "h5")}
    on_h1 = [n for n in workers if n in streams_on(lab, "h1") and
             streams_on(lab, "h1")[n] >= max(streams_on(lab, m).get(n, 0) for m in ("h2", "h3"))]
    results: dict[str, str] = {}
    hosts = ["h2", "h3", "h4", "h5"]
    threads = attach_many(lab, hosts, ATTACHES_PER_HOST, "a", results)
    wait_for(lambda: len(results) >= 10, 120, "the first attaches")
    t0 = time.monotonic()
    killed_at = time.time()
    lab.stop_daemon("h1", signal.SIGKILL)
    new = wait_for(lambda: leader(lab, "h2") not in (None, "h1") and leader(lab, "h2"), 30, "a new leader")
    print(f"\nnew leader {new} {time.monotonic() - t0:.2f} s after the leader's netweftd was killed")
    for n in on_h1:   # the workers whose watch was on h1 move to another manager
        moved = wait_for(lambda: max(streams_on(lab, "h2").get(n, 0), streams_on(lab, "h3").get(n, 0)) > killed_at,
                         30, f"{workers[n]}'s watch on another manager")
        at = max(streams_on(lab, "h2").get(n, 0), streams_on(lab, "h3").get(n, 0))
        print(f"{workers[n]}'s watch moved to another manager {at - killed_at:.2f} s after the kill ({moved})")
    for t in threads:
        t.join(300)
    acked = {n for n, r in results.items() if r == "ok"}
    failed = {n: r for n, r in results.items() if r != "ok"}
    print(f"{len(acked)} attaches acknowledged, {len(failed)} refused while the leader died: "
          f"{sorted(set(failed.values()))[:3]}")
    assert len(results) == ATTACHES_PER_HOST * len(hosts)
    ips = {h: ips_on(lab, h) for h in hosts}
    every = [ip for v in ips.values() for ip in v.values()]
    assert len(every) == len(set(every)), "duplicate IPs"
    present = {n for v in ips.values() for n in v}
    assert acked <= present, f"acknowledged attaches missing: {sorted(acked - present)[:5]}"
    # Every host programmed every other host's endpoints: the managers (all of them) hold them all.
    wait_for(lambda: all_programmed(lab, hosts, net_id), 60, "every host holding every remote endpoint")

    # 2. The old leader comes back as a manager (its etcd member kept serving meanwhile).
    lab.start_daemon("h1")
    wait_for(lambda: {r["HOSTNAME"]: r["MANAGER STATUS"] for r in node_table(lab, "h1")}.get("h1") == "Reachable",
             60, "h1 reachable again")

    # 3. A whole manager host dies (netweftd and etcd, -9): networks and attaches still work.
    holder = {n: max(MANAGERS, key=lambda m: streams_on(lab, m).get(n, 0)) for n in workers}
    victim = next((holder[n] for n in workers if holder[n] != new), next(h for h in MANAGERS if h != new))
    moving = [n for n in workers if holder[n] == victim]
    killed_at = time.time()
    lab.stop_daemon(victim, signal.SIGKILL)
    kill_etcd(lab, victim)
    others = [m for m in MANAGERS if m != victim]
    for n in moving:   # a worker whose manager died watches another one
        wait_for(lambda: max(streams_on(lab, m).get(n, 0) for m in others) > killed_at, 30,
                 f"{workers[n]}'s watch on another manager")
        at = max(streams_on(lab, m).get(n, 0) for m in others)
        print(f"{workers[n]}'s watch reopened on another manager {at - killed_at:.2f} s after its manager died")
    via = next(h for h in MANAGERS if h != victim)
    run_cli(lab, via, "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.8.0/24", "ov2")
    run_cli(lab, "h4", "run", "-d", "--name", "after1", "--network", "ov2", "--", "sleep", "1000")
    run_cli(lab, "h5", "run", "-d", "--name", "after2", "--network", "ov2", "--", "sleep", "1000")
    ip = ips_on(lab, "h4", "ov2")["after1"]
    assert run_cli(lab, "h5", "exec", "after2", "--", "ping", "-c1", "-w5", ip, check=False).returncode == 0
    wait_for(lambda: {r["HOSTNAME"]: r["MANAGER STATUS"] for r in node_table(lab, via)}.get(victim) == "Unreachable",
             30, f"{victim} unreachable in node ls")
    lab.start_daemon(victim)  # its etcd member is restarted by netweftd
    wait_for(lambda: {r["HOSTNAME"]: r["MANAGER STATUS"] for r in node_table(lab, via)}.get(victim) == "Reachable",
             60, f"{victim} reachable again")

    # 4. Demote a manager: its etcd member leaves the etcd cluster, it goes on as a worker.
    gone = node_id(lab, "h3")
    run_cli(lab, "h1", "node", "demote", "h3")
    wait_for(lambda: gone not in etcd_members(lab, "h1"), 30, "h3's etcd member gone")
    assert len(etcd_members(lab, "h2")) == 2
    wait_for(lambda: lab.client("h3").call("GET", "/info")["Swarm"]["Role"] == "worker", 30, "h3 a worker")
    wait_for(lambda: not (swarm_dir(lab, "h3") / "etcd").exists(), 30, "h3's etcd data removed")
    run_cli(lab, "h3", "run", "-d", "--name", "w3", "--network", "ov2", "--", "sleep", "1000")


def test_a_manager_cut_off_refuses_writes_and_all_managers_restart(ha_lab):
    lab = ha_lab(4)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    net_id = json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["Id"]
    for h in ("h2", "h3", "h4"):
        run_cli(lab, h, "run", "-d", "--name", f"c{h}", "--network", "ov", "--", "sleep", "1000")

    # 1. h2 (a manager) off the underlay for 30 s: it refuses writes, the others go on.
    cut(lab, "h2", up=False)
    t_cut = time.monotonic()
    try:
        r = run_cli(lab, "h2", "network", "create", "-d", "overlay", "--subnet", "198.18.4.0/24", "split",
                    check=False, timeout=90)
        assert r.returncode != 0, "a manager cut off from the others accepted a write"
        print(f"\nthe cut-off manager refused the write: {r.stderr.strip()[:200]}")
        run_cli(lab, "h4", "run", "-d", "--name", "during", "--network", "ov", "--", "sleep", "1000")
        time.sleep(max(0.0, 30 - (time.monotonic() - t_cut)))
    finally:
        cut(lab, "h2", up=True)
    t_heal = time.monotonic()
    during = ips_on(lab, "h4")["during"]
    wait_for(lambda: during in programmed(lab, "h2", net_id), 60, "h2 programming the endpoint made during the cut")
    print(f"h2 converged {time.monotonic() - t_heal:.2f} s after the heal")
    assert "split" not in run_cli(lab, "h3", "network", "ls").stdout   # no split brain
    assert run_cli(lab, "h2", "exec", "ch2", "--", "ping", "-c1", "-w5", during, check=False).returncode == 0

    # 2. Every manager restarts: the revision keeps growing and the worker resumes with events, no snapshot.
    worker = node_id(lab, "h4")
    logs = {h: LogWatch(lab, h) for h in MANAGERS}
    for h in MANAGERS:
        lab.stop_daemon(h)
    for h in MANAGERS:
        lab.start_daemon(h)
    listening = [logs[h].wait(lambda e: e.get("msg") == "cluster API listening", 60, f"{h}'s manager") for h in MANAGERS]
    opened = wait_for(lambda: next((e for h in MANAGERS for e in logs[h].entries()
                                    if e.get("msg") == "watch opened" and e.get("node") == worker), None),
                      60, "the worker's watch on a restarted manager")
    assert opened["sent"] == "events" and 0 < opened["since"] <= opened["rev"], opened
    assert all(e["rev"] >= opened["since"] for e in listening)
    run_cli(lab, "h4", "run", "-d", "--name", "after", "--network", "ov", "--", "sleep", "1000")
    ip = ips_on(lab, "h4")["after"]
    assert run_cli(lab, "h3", "exec", "ch3", "--", "ping", "-c1", "-w5", ip, check=False).returncode == 0

    # 3. A manager leaves (--force): its etcd member leaves the etcd cluster with it, and its files go.
    gone = node_id(lab, "h3")
    assert gone in etcd_members(lab, "h1")
    run_cli(lab, "h3", "swarm", "leave", "--force", timeout=90)
    wait_for(lambda: gone not in etcd_members(lab, "h1"), 30, "h3's etcd member gone")
    assert not swarm_dir(lab, "h3").exists()
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--subnet", "198.18.5.0/24", "stillworks")


def test_managers_on_an_etcd_the_operator_runs(make_lab, tmp_path):
    """`swarm init --store etcd://IP:2379 --store-cacert/--store-cert/--store-key`: netweft runs no etcd member;
    a manager that joins gets the client certificate at enrollment."""
    from datetime import timedelta
    from netweft import pki
    lab = make_lab(3, swarm=False)
    etcd_ip = lab.address("h3")   # the operator's etcd runs on h3 (not a netweft node here)
    certs = lab.host_dir("h3") / "etcd-certs"
    certs.mkdir(mode=0o700)
    ca = pki.create_root_ca("operator")
    pki.save_pem(certs / "ca.pem", ca.cert_pem)
    for name, sans in (("server", [etcd_ip]), ("client", [])):
        key = pki.new_node_key()
        pki.save_pem(certs / f"{name}.pem", pki.sign_node_cert(ca, pki.make_csr(key), "x" + name, "manager",
                                                               "operator", timedelta(days=1), ip_sans=sans))
        pki.save_pem(certs / f"{name}-key.pem", pki.key_to_pem(key), private=True)
    url = f"https://{etcd_ip}:2379"
    argv, env = lab.exec_argv("h3", [
        "etcd", "--name", "op1", "--data-dir", str(lab.host_dir("h3") / "etcd-data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
        "--initial-cluster", "op1=http://127.0.0.1:2380", "--cert-file", str(certs / "server.pem"),
        "--key-file", str(certs / "server-key.pem"), "--trusted-ca-file", str(certs / "ca.pem"), "--client-cert-auth"])
    with open(lab.host_dir("h3") / "etcd.log", "ab") as log:
        etcd = subprocess.Popen(argv, env=env, stdout=log, stderr=log)   # lab.down kills it with h3
    try:
        run_cli(lab, "h1", "swarm", "init", "--advertise-addr", lab.address("h1"), "--store", f"etcd://{etcd_ip}:2379",
                "--store-cacert", str(certs / "ca.pem"), "--store-cert", str(certs / "client.pem"),
                "--store-key", str(certs / "client-key.pem"), "--dispatcher-heartbeat", HEARTBEAT, timeout=90)
        assert not (swarm_dir(lab, "h1") / "etcd").exists()   # no member of its own
        token = run_cli(lab, "h1", "swarm", "join-token", "-q", "manager").stdout.strip()
        run_cli(lab, "h2", "swarm", "join", "--token", token, "--advertise-addr", lab.address("h2"),
                f"{lab.address('h1')}:2377", timeout=90)
        wait_for(lambda: [r["MANAGER STATUS"] for r in sorted(node_table(lab, "h2"), key=lambda r: r["HOSTNAME"])]
                 == ["Leader", "Reachable"], 30, "two managers, h1 the leader")
        run_cli(lab, "h2", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
        run_cli(lab, "h1", "run", "-d", "--name", "a", "--network", "ov", "--", "sleep", "1000")
        run_cli(lab, "h2", "run", "-d", "--name", "b", "--network", "ov", "--", "sleep", "1000")
        ip = ips_on(lab, "h1")["a"]
        assert run_cli(lab, "h2", "exec", "b", "--", "ping", "-c1", "-w5", ip, check=False).returncode == 0
        # The cluster CA's key is in the store, sealed: not on the managers' disks.
        assert not (swarm_dir(lab, "h1") / "ca.key").exists() and not (swarm_dir(lab, "h2") / "ca.key").exists()
    finally:
        etcd.kill()
        etcd.wait(20)
