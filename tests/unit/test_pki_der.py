"""pki.der reads a certificate's serial, validity and subject as cryptography does, and refuses damage with
InvalidRequest only; the daemon's imports stay lean (no cryptography, etcd client or all of pyroute2 at start)."""
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from netweft import pki
from netweft.errors import InvalidRequest
from netweft.pki import der

DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def ca():
    return pki.create_root_ca("cluster-a")


@pytest.fixture(scope="module")
def node_pem(ca):
    key = pki.new_node_key()
    return pki.sign_node_cert(ca, pki.make_csr(key), "node-1", "manager", "cluster-a", 90 * DAY,
                              ip_sans=["192.0.2.7"])


def same_as_cryptography(pem: bytes) -> None:
    c = x509.load_pem_x509_certificate(pem)
    f = der.read(pem)
    assert f.serial == c.serial_number
    assert (f.not_before, f.not_after) == pki.validity(c)
    want = {}
    for attr in c.subject:
        want.setdefault(attr.oid.dotted_string, str(attr.value))
    assert f.subject == want


def test_node_certificate_as_cryptography_reads_it(node_pem):
    same_as_cryptography(node_pem)


def test_ca_certificate_and_generalized_time():
    same_as_cryptography(pki.create_root_ca("c").cert_pem)
    far = pki.create_root_ca("c", expiry=timedelta(days=365 * 40))  # after 2049: GeneralizedTime
    assert der.read(far.cert_pem).not_after.year >= 2066
    same_as_cryptography(far.cert_pem)


def test_der_and_str_inputs(node_pem):
    d = x509.load_pem_x509_certificate(node_pem).public_bytes(serialization.Encoding.DER)
    assert der.read(d) == der.read(node_pem) == der.read(node_pem.decode())


def test_cert_identity_reads_pem_without_cryptography_objects(node_pem):
    ident = pki.cert_identity(node_pem)
    assert (ident.node_id, ident.role, ident.cluster_id) == ("node-1", "manager", "cluster-a")
    assert ident == pki.cert_identity(x509.load_pem_x509_certificate(node_pem))


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x02\x02\x00",
                                  b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----",
                                  b"-----BEGIN CERTIFICATE-----\nnothing ends"])
def test_junk_refused(junk):
    with pytest.raises(InvalidRequest, match="invalid certificate"):
        der.read(junk)


def test_truncated_refused(node_pem):
    d = der.to_der(node_pem)
    for cut in (1, 10, 100, len(d) // 2):
        with pytest.raises(InvalidRequest):
            der.read(d[:cut])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_certificate_only_invalid_request(node_pem, data):
    d = bytearray(der.to_der(node_pem))
    for _ in range(data.draw(st.integers(1, 4))):
        d[data.draw(st.integers(0, len(d) - 1))] = data.draw(st.integers(0, 255))
    try:
        der.read(bytes(d))
    except InvalidRequest:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_invalid_request(raw):
    try:
        der.read(raw)
    except InvalidRequest:
        pass


def test_daemon_imports_stay_lean():
    # A lazy module (netweft.daemon.memory.lazy_module) is in sys.modules before its code has run.
    code = ("import sys, netweft.daemon.main; m = sys.modules; "
            "loaded = [k for k in m if type(m[k]).__name__ != '_LazyModule']; "
            "print(sum(k.startswith('pyroute2') for k in loaded), "
            "[k for k in loaded if k.split('.')[0] in ('cryptography', 'aetcd', 'grpc', 'dnspython')"
            " or k.startswith('netweft.manager.') or k == 'unittest'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split(" ", 1)
    assert out[1].strip() == "[]"
    # pyroute2's package __init__ alone pulls ~160, IPRoute ~100: both wait for the first netlink handle
    assert int(out[0]) < 10


def test_pyroute2_parts_loads_iproute_on_first_use():
    code = ("import sys; from netweft.dataplane import pyroute2_parts as p; "
            "a = 'pyroute2.iproute.linux' in sys.modules; "
            "from pyroute2.netlink.exceptions import NetlinkError; "
            "print(a, p.IPRoute.__module__, p.NetlinkError is NetlinkError, type(__import__('pyroute2').NDB).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()
    assert out == ["False", "pyroute2.iproute.linux", "True", "type"]
