"""The managers' secrets on etcd, without etcd: revocation lists, the serial bookkeeping, the store.pem pair,
the managers' key files and its re-sealing (netweft/pki/crl.py, manager/storecerts.py, manager/managerkey.py)."""
from __future__ import annotations

import asyncio
import os
from datetime import datetime, timedelta, timezone

import pytest

from netweft import pki
from netweft.errors import Conflict, InvalidRequest
from netweft.manager import hastore, managerkey, storecerts
from netweft.pki import crl, sealed

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
LATER = (NOW + timedelta(days=1)).isoformat()
EARLIER = (NOW - timedelta(seconds=1)).isoformat()


@pytest.fixture(scope="module")
def store_ca():
    return pki.create_root_ca("c1-store")


def issue(ca, node_id="n1", expiry=timedelta(hours=1)) -> tuple[bytes, bytes]:
    key = pki.new_node_key()
    return hastore.sign_store_cert(ca, pki.make_csr(key), node_id, "c1", "192.0.2.1", expiry), pki.key_to_pem(key)


# ------------------------------------------------------------------ CRL

def test_crl_lists_the_serials_and_is_checked_against_the_store_ca(store_ca):
    pem = crl.make_crl(store_ca, [(5, LATER, "a"), (2 ** 150, LATER, "b")])
    assert crl.revoked_serials(pem, store_ca) == {5, 2 ** 150}
    assert crl.revoked_serials(crl.make_crl(store_ca, []), store_ca) == set()
    other = pki.create_root_ca("other-store")
    with pytest.raises(InvalidRequest, match="not signed by this cluster's store CA"):
        crl.revoked_serials(crl.make_crl(other, [(5, LATER, "a")]), store_ca)
    with pytest.raises(InvalidRequest, match="not a PEM CRL"):
        crl.revoked_serials(b"junk", store_ca)
    with pytest.raises(InvalidRequest, match="no store CA key"):
        crl.make_crl(pki.RootCA(store_ca.cert), [])


def test_current_drops_expired_and_duplicate_serials():
    assert crl.current([(3, LATER, "a"), (1, LATER, "b"), (3, LATER, "a"), (2, EARLIER, "c")], NOW) == \
        [(1, LATER, "b"), (3, LATER, "a")]
    with pytest.raises(InvalidRequest, match="invalid time"):
        crl.current([(1, "yesterday", "a")], NOW)


# ------------------------------------------------------------------ serial bookkeeping

def test_issued_with_adds_once_and_forgets_expired():
    issued = {"a": [[1, EARLIER]], "b": [[2, LATER]]}
    out = storecerts.issued_with(issued, "a", 7, LATER, NOW)
    assert out == {"a": [[7, LATER]], "b": [[2, LATER]]}
    assert storecerts.issued_with(out, "a", 7, LATER, NOW) == out


def test_revocation_plan_moves_the_serials_of_nodes_no_longer_managers():
    issued = {"m1": [[1, LATER]], "gone": [[2, LATER], [3, EARLIER]]}
    new_issued, revoked = storecerts.revocation_plan(issued, [], {"m1"}, NOW)
    assert new_issued == {"m1": [[1, LATER]]}
    assert revoked == [[2, LATER, "gone"]]
    assert storecerts.revocation_plan(new_issued, revoked, {"m1"}, NOW) is None   # nothing left to do
    # an expired revocation is dropped (its certificate opens nothing any more)
    assert storecerts.revocation_plan(new_issued, [[9, EARLIER, "x"], *revoked], {"m1"}, NOW) == (new_issued, revoked)


def test_store_cert_expiry_defaults_to_the_node_certificates():
    assert storecerts.store_cert_expiry({"CertExpiry": 90.0}) == timedelta(seconds=90)
    assert storecerts.store_cert_expiry({"CertExpiry": 90.0, "StoreCertExpiry": 20.0}) == timedelta(seconds=20)


# ------------------------------------------------------------------ store.pem

def test_store_pair_is_one_0600_file_swapped_whole(tmp_path, store_ca):
    cert, key = issue(store_ca)
    hastore.save_store_pair(str(tmp_path), store_ca.cert_pem, cert, key)
    assert os.stat(tmp_path / "store.pem").st_mode & 0o777 == 0o600
    assert hastore.load_store_pair(str(tmp_path)) == (store_ca.cert_pem, cert, key)
    cert2, key2 = issue(store_ca)
    hastore.save_store_pair(str(tmp_path), None, cert2, key2)
    assert hastore.load_store_pair(str(tmp_path))[1:] == (cert2, key2)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    (tmp_path / "store.pem").write_bytes(cert2)   # a certificate without its key
    with pytest.raises(InvalidRequest, match="no certificate and key pair"):
        hastore.load_store_pair(str(tmp_path))


def test_store_cert_stale_past_80_percent(tmp_path, store_ca):
    assert hastore.store_cert_stale(str(tmp_path))   # none at all
    cert, key = issue(store_ca, expiry=timedelta(seconds=100))
    hastore.save_store_pair(str(tmp_path), store_ca.cert_pem, cert, key)
    ident = pki.cert_identity(cert)
    start = ident.not_before + pki.CLOCK_SKEW
    assert not hastore.store_cert_stale(str(tmp_path), start + timedelta(seconds=70))
    assert hastore.store_cert_stale(str(tmp_path), start + timedelta(seconds=85))


def test_save_crl_writes_only_changes(tmp_path, store_ca):
    pem = crl.make_crl(store_ca, [])
    assert hastore.save_crl(str(tmp_path), pem)
    assert not hastore.save_crl(str(tmp_path), pem)
    assert (tmp_path / "store-crl.pem").read_bytes() == pem


# ------------------------------------------------------------------ the managers' key

def test_next_key_files_are_0600_and_dropped(tmp_path):
    key = sealed.new_key()
    sealed.save_next_key(str(tmp_path), key)
    assert os.stat(tmp_path / sealed.NEXT_KEY_FILE).st_mode & 0o777 == 0o600
    assert sealed.load_next_key(str(tmp_path)) == key
    sealed.drop_next_key(str(tmp_path))
    sealed.drop_next_key(str(tmp_path))
    with pytest.raises(InvalidRequest, match="no rotation"):
        sealed.load_next_key(str(tmp_path))


def test_resealed_record_opens_only_with_the_new_key(store_ca):
    old, new = sealed.new_key(), sealed.new_key()
    ca = pki.create_root_ca("c1")
    rec = {"cert": ca.cert_pem.decode(), "key": sealed.seal(old, "ca-key", ca.key_pem), "holders": ["a", "b"]}
    out = managerkey.resealed(rec, new, ca.key_pem, store_ca.key_pem, ["b", "a"])
    assert managerkey.opens(new, out) and not managerkey.opens(old, out)
    assert sealed.unseal(new, "store-ca-key", out["store_key"]) == store_ca.key_pem
    assert out["holders"] == ["a", "b"] and out["cert"] == rec["cert"]
    assert not managerkey.opens(new, {})


def test_stale_holders():
    assert managerkey.stale_holders({"holders": ["a", "b"]}, {"a", "c"}) == ["b"]
    assert managerkey.stale_holders({}, {"a"}) == []


def test_rotation_refused_on_one_manager_without_etcd(tmp_path):
    class OneManager(managerkey.ManagerKey):
        ha, dir = False, str(tmp_path)
    with pytest.raises(Conflict, match="no managers' key to rotate"):
        asyncio.run(OneManager().rotate_manager_key())
    assert not (tmp_path / sealed.NEXT_KEY_FILE).exists()   # the refusal changed nothing


def test_key_handed_over_only_while_it_opens_the_store_and_only_to_a_manager(tmp_path):
    from netweft.manager.watch import CA, NODES, ClusterState
    from netweft.model import codec
    from netweft.model.objects import Node

    key = sealed.new_key()
    sealed.save_key(str(tmp_path), key)
    ca = pki.create_root_ca("c1")
    state = ClusterState()
    state.put(CA, "root", codec.encode({"cert": ca.cert_pem.decode(), "key": sealed.seal(key, "ca-key", ca.key_pem)}), 2)
    state.put(NODES, "m2", codec.encode(Node(id="m2", hostname="h2", role="manager", addr="192.0.2.2")), 3)
    state.put(NODES, "w3", codec.encode(Node(id="w3", hostname="h3", role="worker", addr="192.0.2.3")), 4)

    class One(managerkey.ManagerKey):
        dir = str(tmp_path)
    one = One()
    one.state = state
    got = one.key_for_manager(state.get(NODES, "m2"))
    assert sealed.decode_key(got["ManagerKey"]) == key
    with pytest.raises(Conflict, match="only a current manager"):
        one.key_for_manager(state.get(NODES, "w3"))
    sealed.save_key(str(tmp_path), sealed.new_key())   # a stale key is never handed over
    with pytest.raises(Conflict, match="does not hold the current managers' key"):
        one.key_for_manager(state.get(NODES, "m2"))


def test_renew_offline_from_the_sealed_store_ca_key(tmp_path, store_ca):
    d = str(tmp_path)
    assert not hastore.renew_offline(d, "n1", "c1", "192.0.2.1")   # nothing kept: nothing done
    key = sealed.new_key()
    sealed.save_key(d, key)
    cert, ckey = issue(store_ca, expiry=timedelta(seconds=100))
    hastore.save_store_pair(d, store_ca.cert_pem, cert, ckey)
    hastore.save_sealed_store_ca(d, sealed.seal(key, "store-ca-key", store_ca.key_pem))
    assert os.stat(tmp_path / "store-ca.key.sealed").st_mode & 0o777 == 0o600
    assert hastore.renew_offline(d, "n1", "c1", "192.0.2.1")
    _, new, _ = hastore.load_store_pair(d)
    old_id, new_id = pki.cert_identity(cert), pki.cert_identity(new)
    assert new_id.serial != old_id.serial and new_id.not_after >= old_id.not_after
    assert new_id.not_after - new_id.not_before <= timedelta(seconds=100) + pki.CLOCK_SKEW
    sealed.save_key(d, sealed.new_key())   # a key that does not open it (rotated away): refused, nothing changed
    assert not hastore.renew_offline(d, "n1", "c1", "192.0.2.1")
    assert hastore.load_store_pair(d)[1] == new
