"""Several managers (issue 8), the parts without etcd or a kernel: sealed CA keys, store endpoints, the enroll
bodies, and how an agent learns, orders and skips the managers."""
from __future__ import annotations

import json
import os

import pytest

from netweft.agent.node import ClusterClient
from netweft.errors import InvalidRequest
from netweft.manager import hastore
from netweft.model import codec
from netweft.model.cluster import EnrollAnswer, EnrollRequest, JoinAnswer
from netweft.pki import sealed


def test_a_sealed_secret_opens_only_with_its_key_and_purpose(tmp_path):
    key = sealed.new_key()
    box = sealed.seal(key, "ca-key", b"secret")
    assert b"secret" not in box.encode()
    assert sealed.unseal(key, "ca-key", box) == b"secret"
    for k, purpose, text in ((sealed.new_key(), "ca-key", box), (key, "store-ca-key", box),
                             (key, "ca-key", box[:-4] + "AAAA"), (key, "ca-key", "not base64!")):
        with pytest.raises(InvalidRequest, match="does not open"):
            sealed.unseal(k, purpose, text)
    sealed.save_key(str(tmp_path), key)
    assert os.stat(tmp_path / sealed.KEY_FILE).st_mode & 0o777 == 0o600
    assert sealed.load_key(str(tmp_path)) == key


def test_a_manager_key_is_checked():
    with pytest.raises(InvalidRequest, match="32 bytes"):
        sealed.decode_key(sealed.encode_key(b"short"))
    with pytest.raises(InvalidRequest, match="base64"):
        sealed.decode_key("***")
    with pytest.raises(InvalidRequest, match="no manager key"):
        sealed.load_key("/nonexistent")


def test_store_endpoints_are_parsed_or_refused_in_one_line():
    assert hastore.parse_endpoints("etcd://192.0.2.5:2379,192.0.2.6") == ["192.0.2.5:2379", "192.0.2.6:2379"]
    for bad in ("http://192.0.2.5:2379", "etcd://", "etcd://host:2379", "etcd://192.0.2.5:99999",
                "etcd://192.0.2.5:x", "etcd://" + ",".join(["192.0.2.5"] * 17)):
        with pytest.raises(InvalidRequest) as e:
            hastore.parse_endpoints(bad)
        assert "\n" not in str(e.value)


def test_store_certificates_name_the_manager_for_any_address():
    from netweft import pki
    ca = hastore.make_store_ca("c1")
    key = pki.new_node_key()
    cert = hastore.sign_store_cert(ca, pki.make_csr(key), "n1", "c1", "192.0.2.12")
    ident = pki.verify_node_cert(ca.cert_pem, cert)
    assert ident.role == "manager"
    text = pki.load_cert(cert).extensions.get_extension_for_class(
        __import__("cryptography").x509.SubjectAlternativeName).value
    assert pki.MANAGER_HOSTNAME in text.get_values_for_type(__import__("cryptography").x509.DNSName)
    assert {str(i) for i in text.get_values_for_type(__import__("cryptography").x509.IPAddress)} == \
        {"192.0.2.12", "127.0.0.1"}


def test_enroll_bodies():
    assert codec.decode(json.dumps({"CSR": "PEM"}), EnrollRequest).csr == "PEM"
    for bad in ({}, {"CSR": ""}, {"CSR": "PEM", "Role": "manager"}):
        with pytest.raises(InvalidRequest):
            codec.decode(json.dumps(bad), EnrollRequest)
    a = codec.convert({"ManagerKey": "k", "StoreCA": "ca", "StoreCert": "c", "Endpoints": ["192.0.2.1:2379"],
                       "InitialCluster": "n1=https://192.0.2.1:2380", "Later": 1}, EnrollAnswer)
    assert (a.store_key, a.initial_cluster) == (None, "n1=https://192.0.2.1:2380")
    with pytest.raises(InvalidRequest, match="Endpoints"):
        codec.convert({"ManagerKey": "k", "StoreCA": "ca", "StoreCert": "c", "Endpoints": []}, EnrollAnswer)
    join = {"NodeID": "abc", "Role": "manager", "ClusterID": "c1", "Certificate": "PEM",
            "Managers": ["192.0.2.11:2377"], "HeartbeatPeriod": 5.0, "DataPathPort": 4789, "Store": "etcd"}
    assert codec.convert(join, JoinAnswer).store == "etcd"
    with pytest.raises(InvalidRequest):
        codec.convert({**join, "Store": "zookeeper"}, JoinAnswer)


MGRS = ["192.0.2.11:2377", "192.0.2.12:2377", "192.0.2.13:2377"]


def node(i: int, role: str = "manager", state: str = "ready") -> dict:
    return {"id": f"n{i}", "role": role, "addr": f"192.0.2.{10 + i}", "state": state,
            "manager_addr": f"192.0.2.{10 + i}:2377" if role == "manager" else ""}


def test_nodes_are_spread_over_the_managers_and_stick_to_the_one_that_answered(tmp_path):
    starts = {ClusterClient(str(tmp_path), MGRS, f"node{i}").order()[0] for i in range(30)}
    assert starts == set(MGRS)   # thirty nodes start at all three managers
    c = ClusterClient(str(tmp_path), MGRS, "nodeX")
    first = c.order()
    assert sorted(first) == MGRS and first == first[first.index(first[0]):] + first[:0]
    c._skip(first[0])
    assert c.order()[0] == first[1]
    c.prefer(MGRS[2])
    assert c.order() == [MGRS[2], MGRS[0], MGRS[1]]
    c._skip(MGRS[1])        # not the first: no change
    assert c.order()[0] == MGRS[2]


def test_the_watch_tells_an_agent_every_manager(tmp_path):
    told = []
    c = ClusterClient(str(tmp_path), MGRS[:1], "w", on_managers=told.append)
    c.learn({"type": "snapshot", "rev": 5, "nodes": [node(1), node(2), node(4, "worker")]})
    assert c.managers == MGRS[:2] and told == [MGRS[:2]]
    c.learn({"type": "events", "rev": 6, "events": [{"kind": "node", "action": "put", "object": node(3)}]})
    assert c.managers == MGRS
    c.learn({"type": "events", "rev": 7, "events": [{"kind": "node", "action": "put", "object": node(2, "worker")}]})
    assert c.managers == [MGRS[0], MGRS[2]]
    c.learn({"type": "events", "rev": 8, "events": [{"kind": "node", "action": "delete", "object": node(3)}]})
    assert c.managers == [MGRS[0]]
    c.learn({"type": "ping", "rev": 9})
    c.learn({"type": "events", "rev": 10, "events": [{"kind": "endpoint", "action": "put", "object": {}}]})
    assert c.managers == [MGRS[0]] and len(told) == 4


def test_events_before_any_snapshot_add_to_the_managers_given(tmp_path):
    c = ClusterClient(str(tmp_path), MGRS[:2], "w")
    c.learn({"type": "events", "rev": 6, "events": [{"kind": "node", "action": "put", "object": node(1)}]})
    assert c.managers == MGRS[:2]   # a resumed stream names one manager: the others stay known
    c.learn({"type": "events", "rev": 7, "events": [{"kind": "node", "action": "put", "object": node(3)}]})
    assert c.managers == MGRS


def test_a_hostile_watch_cannot_plant_a_manager_address(tmp_path):
    c = ClusterClient(str(tmp_path), MGRS[:1], "w")
    bad = {**node(2), "manager_addr": "evil/path?x=1:2377"}
    c.learn({"type": "snapshot", "rev": 1, "nodes": [node(1), bad, "junk", {"role": "manager"}]})
    assert c.managers == MGRS[:1]


# ------------------------------------------------------------------ the election, on a store with leases

class LeasedStore:
    """SQLiteStore plus etcd's leases, enough for the election: a lease expires when it is not kept alive
    (expire() stands for the clock), and the objects put with it go in one revision."""

    def __init__(self, store):
        self.s, self.leases, self.next = store, {}, 1   # lease -> keys put with it

    def __getattr__(self, name):
        return getattr(self.s, name)

    async def lease_grant(self, ttl):
        lease, self.next = self.next, self.next + 1
        self.leases[lease] = set()
        return lease

    async def lease_keepalive(self, lease):
        return 3 if lease in self.leases else 0

    async def lease_revoke(self, lease):
        await self.expire(lease)

    async def expire(self, lease):
        from netweft.store.api import Delete
        keys = self.leases.pop(lease, set())
        if keys:
            await self.s.txn([], [Delete(k, n) for k, n in keys])

    async def txn(self, compares, ops):
        r = await self.s.txn(compares, ops)
        if r.ok:
            for op in ops:
                if getattr(op, "lease", 0) in self.leases:
                    self.leases[op.lease].add((op.kind, op.key))
        return r


def test_one_leader_at_a_time_and_another_takes_over_when_its_lease_goes(tmp_path):
    import asyncio
    from netweft.manager.leader import Coordination
    from netweft.manager.watch import Hub
    from netweft.store.sqlite import SQLiteStore

    async def until(cond, what):
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(what)

    async def main():
        store = LeasedStore(await SQLiteStore.open(str(tmp_path / "c.db")))
        hub = Hub(store)
        await hub.start()
        a, b = (Coordination(store, hub, n, f"192.0.2.{i}:2377", ttl=1) for i, n in ((11, "na"), (12, "nb")))
        ta = asyncio.ensure_future(a.run())
        await until(a.is_leader, "a elected")
        tb = asyncio.ensure_future(b.run())
        await until(lambda: b.reachable("nb") and a.reachable("nb"), "b present")
        await asyncio.sleep(0.6)
        assert a.is_leader() and not b.is_leader() and b.leader()["node_id"] == "na"
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        await store.expire(a.lease)             # a died: its lease runs out, its keys go
        await until(b.is_leader, "b takes over")
        assert not a.reachable("na") and b.leader()["addr"] == "192.0.2.12:2377"
        assert not a.is_leader()                # a's old lease is not the leader's any more
        await b.publish_heartbeats({"ages": {"w1": 1.5}})
        await b.hub.sync()
        assert a.hub.state.get("heartbeats", "nb") == {"ages": {"w1": 1.5}}
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
        await b.stop()                          # a manager that stops gives up its lease at once
        await hub.sync()
        assert b.leader() is None and not b.reachable("nb")
        await hub.stop()
        await store.close()
    asyncio.run(main())


def test_the_etcd_member_runs_with_tls_everywhere_and_pre_vote(tmp_path):
    from netweft.daemon.etcdmember import EtcdMember
    m = EtcdMember(str(tmp_path), "n1", "192.0.2.11")
    argv = m.argv("n1=https://192.0.2.11:2380", "new")
    for flag in ("--client-cert-auth", "--peer-client-cert-auth", "--pre-vote"):
        assert flag in argv
    assert argv[argv.index("--data-dir") + 1] == str(tmp_path / "etcd" / "data")
    assert argv[argv.index("--trusted-ca-file") + 1].endswith("store-ca.crt")
    assert argv[argv.index("--listen-peer-urls") + 1] == "https://192.0.2.11:2380"
    assert m._running_pid() is None   # no pid file: nothing to adopt


def test_a_node_joined_at_another_manager_is_looked_up_again_once_the_view_caught_up():
    """A manager whose view is behind must not refuse (403: its agent stops for good) a node that joined at
    another manager a moment ago: it catches up with the store first; a view that cannot answers 503."""
    import asyncio

    from netweft.errors import NetweftError, Unavailable
    from netweft.manager.ha import ManagersOnEtcd, UnknownNode

    class Hub:
        def __init__(self, m):
            self.m, self.rev = m, 5

        async def wait(self, rev):
            if self.m.stalled:
                await asyncio.sleep(3600)
            self.rev = rev

    class Store:
        def __init__(self):
            self.fail = False

        async def revision(self):
            if self.fail:
                raise NetweftError("etcd unreachable")
            return 9

    class M(ManagersOnEtcd):
        ha, stalled = True, False

        def __init__(self):
            self.hub, self.store = Hub(self), Store()

        def _peer(self, request):
            if self.hub.rev < 9:
                raise UnknownNode("node n1 is not a member of this cluster")
            return ("ident", "node", "worker")

    async def main():
        m = M()
        assert await m._peer_caught_up(None) == ("ident", "node", "worker") and m.hub.rev == 9
        m.hub.rev, m.store.fail = 5, True
        with pytest.raises(Unavailable, match="behind"):
            await m._peer_caught_up(None)
        m.store.fail, m.stalled = False, True
        import netweft.manager.ha as ha
        ha.CATCH_UP, old = 0.05, ha.CATCH_UP
        try:
            with pytest.raises(Unavailable, match="behind"):
                await m._peer_caught_up(None)
        finally:
            ha.CATCH_UP = old
        m.ha = False   # one manager (SQLite): its view is the store; an unknown node is refused at once
        with pytest.raises(UnknownNode):
            await m._peer_caught_up(None)
    asyncio.run(main())
