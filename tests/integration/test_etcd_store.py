"""The cluster store's behaviour on both backends: SQLite (one manager) and etcd 3 (several managers).

etcd is a real process in a namespace the test creates, listening on a 192.0.2.x address of a bridge
there (this kernel has no dummy driver). The test process cannot reach that address from its own namespace, so each etcd
scenario runs in a child interpreter (multiprocessing spawn) that first joins the namespace; the
SQLite scenarios run in-process. Revisions are compared relative to the store's revision at the start:
an empty SQLite store is at 0, an empty etcd at 1.
"""
from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import secrets
import subprocess
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from netweft import pki
from netweft.errors import Unavailable
from netweft.store.api import Compacted, Compare, Delete, Put
from netweft.store.etcd import EtcdStore
from netweft.store.sqlite import SQLiteStore

CLONE_NEWNET = 0x40000000


@dataclass
class Backend:
    """Picklable: what a scenario needs to open stores, in this process (sqlite) or in the child (etcd)."""
    kind: str
    path: str                 # sqlite: the database file; etcd: the state root (TLS files)
    endpoint: str = ""
    netns: str = ""
    tls: bool = False

    async def open(self):
        if self.kind == "sqlite":
            return await SQLiteStore.open(self.path)
        if not self.tls:
            return EtcdStore([self.endpoint])
        read = lambda n: Path(self.path, n).read_bytes()  # noqa: E731
        return EtcdStore([self.endpoint], cacert=read("ca.pem"), cert=read("client.pem"), key=read("client-key.pem"))


async def compact(s, upto: int) -> None:
    """Forget the history up to `upto` (the objects stay): what each backend's trimming does."""
    if isinstance(s, EtcdStore):
        from aetcd import rpc
        await rpc.KVStub(s._channel).Compact(rpc.CompactionRequest(revision=upto, physical=True))
    else:
        await s._run(s._compact, upto)


def _child(scenario, backend: Backend, conn) -> None:
    """In a fresh interpreter: join the etcd namespace, run the scenario, send back None or the failure."""
    try:
        fd = os.open(f"/run/netns/{backend.netns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        os.close(fd)
        asyncio.run(asyncio.wait_for(scenario(backend), 60))
        conn.send(None)
    except BaseException:
        conn.send(traceback.format_exc())


def run(scenario, backend: Backend) -> None:
    if backend.kind == "sqlite":
        asyncio.run(asyncio.wait_for(scenario(backend), 60))
        return
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_child, args=(scenario, backend, theirs))
    p.start()
    try:
        if not mine.poll(90):
            raise AssertionError("the etcd scenario did not finish in 90 s")
        failure = mine.recv()
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    assert failure is None, f"etcd scenario failed:\n{failure}"


# ---------------------------------------------------------------- etcd in a namespace

class Etcd:
    def __init__(self, root: Path, netns: str, ip: str, tls: bool):
        self.root, self.netns, self.ip, self.tls = root, netns, ip, tls
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://{self.ip}:2379"
        args = ["nsenter", f"--net=/run/netns/{self.netns}", "etcd", "--name", "m1",
                "--data-dir", str(self.root / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "m1=http://127.0.0.1:2380", "--initial-cluster-state", "new"]
        if self.tls:
            args += ["--cert-file", str(self.root / "server.pem"), "--key-file", str(self.root / "server-key.pem"),
                     "--trusted-ca-file", str(self.root / "ca.pem"), "--client-cert-auth"]
        self.log = open(self.root / "etcd.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, cwd=self.root)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self.root / 'etcd.log').read_text()[-2000:]}")
            if b"ready to serve client requests" in (self.root / "etcd.log").read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError("etcd did not come up in 30 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()


def _write_tls(root: Path, ip: str) -> None:
    """A cluster CA (netweft.pki) and two manager certificates from it: one for etcd, one for the client."""
    ca = pki.create_root_ca("etcdtest")
    pki.save_pem(root / "ca.pem", ca.cert_pem)
    for name, sans in (("server", [ip]), ("client", [])):
        key = pki.new_node_key()
        cert = pki.sign_node_cert(ca, pki.make_csr(key), "m" + secrets.token_hex(6), "manager", "etcdtest",
                                  timedelta(days=1), ip_sans=sans)
        pki.save_pem(root / f"{name}.pem", cert)
        pki.save_pem(root / f"{name}-key.pem", pki.key_to_pem(key), private=True)


def _etcd_backend(request, tls: bool):
    root = request.getfixturevalue("root")  # /tmp/nwt-*, cleaned at teardown with its nwt-* namespaces
    ns = request.getfixturevalue("make_ns")("etcd")
    ip = f"192.0.2.{secrets.randbelow(200) + 10}"
    ns.ip("link", "add", "nwt0", "type", "bridge")  # this kernel has no dummy driver; a portless bridge does
    ns.ip("addr", "add", f"{ip}/24", "dev", "nwt0")
    ns.ip("link", "set", "nwt0", "up")
    if tls:
        _write_tls(root, ip)
    etcd = Etcd(root, ns.name, ip, tls)
    request.addfinalizer(etcd.kill)  # before the root's cleanup (finalizers run last-in first-out)
    etcd.start()
    return Backend("etcd", str(root), f"{ip}:2379", ns.name, tls), etcd


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "swarm" / "cluster.db"))
    return _etcd_backend(request, tls=False)[0]


@pytest.fixture
def etcd_backend(request):
    return _etcd_backend(request, tls=False)


async def next_changes(it, timeout=10.0):
    return await asyncio.wait_for(it.__anext__(), timeout)


# ---------------------------------------------------------------- scenarios (module level: the child imports them)

async def puts_and_revisions(b: Backend):
    s = await b.open()
    base = await s.revision()
    r1 = await s.txn([], [Put("nodes", "a", b'{"n":1}'), Put("nodes", "b", b'{"n":2}')])
    r2 = await s.txn([], [Put("nodes", "a", b'{"n":3}')])
    assert (r1.ok, r1.rev, r2.ok, r2.rev) == (True, base + 1, True, base + 2)
    a = await s.get("nodes", "a")
    assert (a.value, a.create_rev, a.mod_rev) == (b'{"n":3}', base + 1, base + 2)
    assert await s.get("nodes", "zz") is None
    rev, recs = await s.list("nodes")
    assert rev == base + 2 and [r.key for r in recs] == ["a", "b"]
    assert await s.revision() == base + 2
    await s.close()


async def list_by_prefix_and_kind(b: Backend):
    s = await b.open()
    await s.txn([], [Put("allocations", k, b"{}") for k in ("net/a1", "net/a2", "net/b1", "node/a1", "networks")]
                + [Put("nodes", "net/a9", b"{}"), Put("allocationsx", "net/a3", b"{}")])
    _, recs = await s.list("allocations", "net/a")
    assert [r.key for r in recs] == ["net/a1", "net/a2"]
    _, recs = await s.list("allocations", "net/")
    assert [r.key for r in recs] == ["net/a1", "net/a2", "net/b1"]
    _, recs = await s.list("allocations")
    assert len(recs) == 5 and {r.kind for r in recs} == {"allocations"}
    await s.close()


async def failed_compare_then_retry(b: Backend):
    s = await b.open()
    await s.txn([], [Put("allocations", "net/x", b"{}")])
    guard = (await s.get("allocations", "net/x")).mod_rev
    first = await s.txn([Compare("allocations", "net/x", guard)],
                        [Put("endpoints", "e1", b'{"ip":"198.18.0.2"}'), Put("allocations", "net/x", b"{}")])
    second = await s.txn([Compare("allocations", "net/x", guard)],
                         [Put("endpoints", "e2", b'{"ip":"198.18.0.2"}'), Put("allocations", "net/x", b"{}")])
    assert first.ok and not second.ok and second.rev == first.rev
    assert await s.get("endpoints", "e2") is None  # all or nothing
    guard = (await s.get("allocations", "net/x")).mod_rev
    again = await s.txn([Compare("allocations", "net/x", guard)],
                        [Put("endpoints", "e2", b'{"ip":"198.18.0.3"}'), Put("allocations", "net/x", b"{}")])
    assert again.ok and again.rev == first.rev + 1
    await s.close()


async def compare_on_absence(b: Backend):
    s = await b.open()
    assert (await s.txn([Compare("names", "ov", 0)], [Put("names", "ov", b'"id1"')])).ok
    assert not (await s.txn([Compare("names", "ov", 0)], [Put("names", "ov", b'"id2"')])).ok
    assert (await s.get("names", "ov")).value == b'"id1"'
    await s.close()


async def delete_nothing_and_key_once(b: Backend):
    s = await b.open()
    base = await s.revision()
    r = await s.txn([], [Delete("nodes", "ghost")])
    assert r.ok and r.rev == base and await s.revision() == base
    try:
        await s.txn([], [Put("nodes", "a", b"{}"), Delete("nodes", "a")])
        raise AssertionError("a key named twice in one transaction was accepted")
    except ValueError:
        pass
    await s.close()


async def watch_history_then_live(b: Backend):
    s = await b.open()
    base = await s.revision()
    await s.txn([], [Put("nodes", "a", b'"a1"')])
    await s.txn([], [Put("nodes", "b", b'"b1"')])
    it = s.watch(base)
    c1, c2 = await next_changes(it), await next_changes(it)
    assert (c1.rev, c1.events[0].key, c1.events[0].kind, c2.rev) == (base + 1, "a", "nodes", base + 2)
    await s.txn([], [Delete("nodes", "a"), Put("nodes", "c", b'"c1"')])
    c3 = await next_changes(it)
    assert c3.rev == base + 3
    assert [(e.action, e.key, e.value) for e in c3.events] == [("delete", "a", b'"a1"'), ("put", "c", b'"c1"')]
    it2 = s.watch(base + 2)
    assert (await next_changes(it2)).rev == base + 3
    await it.aclose()
    await it2.aclose()
    await s.close()


async def restart_phase1(b: Backend):
    s = await b.open()
    base = await s.revision()
    for i in range(5):
        await s.txn([], [Put("endpoints", f"e{i}", b"{}")])
    assert await s.revision() == base + 5
    await s.txn([], [Put("test", "base", str(base).encode())])  # remembered across the restart
    await s.close()


async def restart_phase2(b: Backend):
    s = await b.open()
    base = int((await s.get("test", "base")).value)
    assert await s.revision() == base + 6
    assert (await s.get("endpoints", "e4")).mod_rev == base + 5
    it = s.watch(base + 3)  # an agent that had this revision before the manager restarted
    assert [(await next_changes(it)).rev for _ in range(3)] == [base + 4, base + 5, base + 6]
    await it.aclose()
    assert (await s.txn([], [Put("endpoints", "e5", b"{}")])).rev == base + 7
    await s.close()


async def compacted_watch(b: Backend):
    s = await b.open()
    base = await s.revision()
    for i in range(30):
        await s.txn([], [Put("endpoints", f"e{i % 3}", str(i).encode())])
    await compact(s, base + 20)
    it = s.watch(base + 2)
    try:
        await next_changes(it)
        raise AssertionError("a watch from a compacted revision was not told so")
    except Compacted:
        pass
    it = s.watch(base + 25)
    assert (await next_changes(it)).rev == base + 26
    await it.aclose()
    _, recs = await s.list("endpoints")
    assert len(recs) == 3
    await s.close()


async def another_client(b: Backend):
    s = await b.open()
    other = await b.open()  # another connection: another manager, a tool
    base = await s.revision()
    it = s.watch(base)
    assert (await other.txn([], [Put("endpoints", "x", b"{}")])).rev == base + 1
    c = await next_changes(it)
    assert c.rev == base + 1 and c.events[0].key == "x"
    assert (await s.txn([Compare("endpoints", "x", base + 1)], [Put("endpoints", "x", b"{}")])).rev == base + 2
    assert not (await other.txn([Compare("endpoints", "x", base + 1)], [Delete("endpoints", "x")])).ok
    await it.aclose()
    await other.close()
    await s.close()


async def concurrent_allocations(b: Backend):
    a, c = await b.open(), await b.open()

    async def allocate(store, owner):
        while True:
            guard = await store.get("allocations", "net/x")
            _, eps = await store.list("endpoints")
            used = {int(r.value) for r in eps}
            ip = min(set(range(2, 100)) - used)
            r = await store.txn([Compare("allocations", "net/x", guard.mod_rev if guard else 0)],
                                [Put("endpoints", owner, str(ip).encode()), Put("allocations", "net/x", b"{}")])
            if r.ok:
                return ip
    ips = await asyncio.gather(*(allocate(a if i % 2 else c, f"c{i}") for i in range(20)))
    assert sorted(ips) == list(range(2, 22))
    await a.close()
    await c.close()


async def close_ends_watches(b: Backend):
    s = await b.open()
    it = s.watch(await s.revision())
    task = asyncio.ensure_future(next_changes(it))
    await asyncio.sleep(0.2)
    await s.close()
    try:
        await task
        raise AssertionError("the watch went on after close")
    except StopAsyncIteration:
        pass


async def only_our_prefix(b: Backend):
    """Keys outside /netweft/ (another user of the same etcd) are neither listed nor watched."""
    s = await b.open()
    from aetcd import rpc
    kv = rpc.KVStub(s._channel)
    base = await s.revision()
    it = s.watch(base)
    await kv.Put(rpc.PutRequest(key=b"/other/nodes/a", value=b"x"))
    await s.txn([], [Put("nodes", "a", b"mine")])
    c = await next_changes(it)
    assert c.rev == base + 2 and [(e.kind, e.key) for e in c.events] == [("nodes", "a")]
    _, recs = await s.list("nodes")
    assert [r.value for r in recs] == [b"mine"]
    await it.aclose()
    await s.close()


async def etcd_down(b: Backend):
    """A call to a stopped etcd fails in one line naming it, and the store still closes."""
    s = await b.open()
    for call in (s.revision(), s.get("nodes", "a"), s.txn([], [Put("nodes", "a", b"1")])):
        try:
            await call
            raise AssertionError("a call to a stopped etcd succeeded")
        except Unavailable as e:
            assert b.endpoint in str(e) and "\n" not in str(e), e
    await s.close()


async def tls_round_trip(b: Backend):
    s = await b.open()
    base = await s.revision()
    assert (await s.txn([Compare("names", "ov", 0)], [Put("names", "ov", b"1")])).rev == base + 1
    it = s.watch(base)
    assert (await next_changes(it)).events[0].value == b"1"
    await it.aclose()
    await s.close()


async def tls_without_client_cert_is_refused(b: Backend):
    s = EtcdStore([b.endpoint], cacert=Path(b.path, "ca.pem").read_bytes())
    try:
        await s.revision()
        raise AssertionError("etcd answered a client without a certificate")
    except Unavailable as e:  # the handshake is refused: etcd asks for a client certificate
        assert "\n" not in str(e) and "trusts this node's certificate" in str(e), e
    await s.close()


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("scenario", [puts_and_revisions, list_by_prefix_and_kind, failed_compare_then_retry,
                                      compare_on_absence, delete_nothing_and_key_once, watch_history_then_live,
                                      compacted_watch, another_client, concurrent_allocations, close_ends_watches],
                         ids=lambda f: f.__name__)
def test_store_behaviour(backend, scenario):
    run(scenario, backend)


def test_revision_and_history_survive_a_restart(backend):
    run(restart_phase1, backend)
    run(restart_phase2, backend)


def test_etcd_revision_and_history_survive_an_etcd_kill(etcd_backend):
    b, etcd = etcd_backend
    run(restart_phase1, b)
    etcd.kill()  # -9: only what etcd acknowledged counts
    run(etcd_down, b)
    etcd.start()
    run(restart_phase2, b)


def test_etcd_store_sees_only_its_prefix(etcd_backend):
    run(only_our_prefix, etcd_backend[0])


def test_etcd_with_mutual_tls_from_the_cluster_ca(request):
    b, _ = _etcd_backend(request, tls=True)
    run(tls_round_trip, b)
    run(tls_without_client_cert_is_refused, b)


def test_etcd_store_refuses_bad_options():
    for kw, what in (({"cert": b"x"}, "needs its key"), ({"cert": b"x", "key": b"y"}, "needs the CA"),
                     ({"prefix": "/netweft"}, "must end with")):
        with pytest.raises(ValueError, match=what):
            EtcdStore(["192.0.2.1:2379"], **kw)
    with pytest.raises(ValueError, match="IPv4:PORT"):
        EtcdStore(["etcd1:2379", "etcd2:2379"])
    with pytest.raises(ValueError, match="no etcd endpoint"):
        EtcdStore([])
