"""The manager's cache of verified node certificates: same answers as pki.verify_node_cert, fewer checks."""
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization

from netweft import pki
from netweft.errors import InvalidRequest
from netweft.manager.peercerts import VerifiedCerts

DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def ca():
    return pki.create_root_ca("cluster-a")


def der_of(ca, node_id="node1", expiry=90 * DAY, cluster_id="cluster-a"):
    pem = pki.sign_node_cert(ca, pki.make_csr(pki.new_node_key()), node_id, "worker", cluster_id, expiry)
    return pki.load_cert(pem).public_bytes(serialization.Encoding.DER)


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, ca_pem, der, now=None):
        self.calls += 1
        return pki.verify_node_cert(ca_pem, der, now)


def test_a_certificate_is_checked_once_then_remembered(ca):
    check = Counting()
    cache = VerifiedCerts(verify=check)
    der = der_of(ca)
    first = cache.verify(ca.cert_pem, der)
    for _ in range(5):
        assert cache.verify(ca.cert_pem, bytes(der)) == first
    assert first.node_id == "node1" and check.calls == 1 and cache.hits == 5


def test_a_refused_certificate_is_not_remembered(ca):
    other = pki.create_root_ca("cluster-b")
    check = Counting()
    cache = VerifiedCerts(verify=check)
    der = der_of(other, cluster_id="cluster-b")
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="not issued by this cluster's CA"):
            cache.verify(ca.cert_pem, der)
    assert check.calls == 2 and len(cache) == 0


def test_an_expired_certificate_is_refused_even_when_remembered(ca):
    now = [datetime.now(timezone.utc)]
    cache = VerifiedCerts(clock=lambda: now[0], verify=lambda c, d: pki.verify_node_cert(c, d, now[0]))
    der = der_of(ca, expiry=timedelta(hours=1))
    cache.verify(ca.cert_pem, der)
    now[0] += timedelta(hours=2)
    with pytest.raises(InvalidRequest, match="expired"):
        cache.verify(ca.cert_pem, der)
    assert len(cache) == 0


def test_a_new_ca_forgets_every_certificate(ca):
    other = pki.create_root_ca("cluster-a")
    cache = VerifiedCerts()
    der = der_of(ca)
    cache.verify(ca.cert_pem, der)
    with pytest.raises(InvalidRequest, match="not issued by this cluster's CA"):
        cache.verify(other.cert_pem, der)
    assert len(cache) == 0


def test_the_cache_is_bounded(ca):
    cache = VerifiedCerts(max_entries=3)
    ders = [der_of(ca, f"node{i}") for i in range(5)]
    for d in ders:
        cache.verify(ca.cert_pem, d)
    assert len(cache) == 3
    check = Counting()
    cache._verify = check
    cache.verify(ca.cert_pem, ders[-1])   # recent: kept
    cache.verify(ca.cert_pem, ders[0])    # oldest: went first
    assert check.calls == 1
