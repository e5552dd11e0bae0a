"""Unit tests for netweft.pki: CA, join tokens, node certificates, TLS."""

import asyncio
import hashlib
import ipaddress
import os
import random
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from netweft.errors import InvalidRequest, NetweftError
from netweft import pki

UTC = timezone.utc
DAY = timedelta(days=1)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ca():
    return pki.create_root_ca("cluster-a")


@pytest.fixture(scope="module")
def other_ca():
    return pki.create_root_ca("cluster-b")


def issue(ca, node_id="node1", role="worker", cluster_id="cluster-a", expiry=90 * DAY, **kw):
    """A fresh key and a certificate for it: (cert_pem, key_pem)."""
    key = pki.new_node_key()
    cert = pki.sign_node_cert(ca, pki.make_csr(key), node_id, role, cluster_id, expiry, **kw)
    return cert, pki.key_to_pem(key)


# ---------------------------------------------------------------- root CA

def test_root_ca_certificate(ca):
    cert = ca.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "netweft-root-ca"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster-a"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)  # self-signed
    assert ca.cluster_id == "cluster-a"
    assert ca.can_sign


def test_root_ca_expiry():
    short = pki.create_root_ca("c", expiry=timedelta(days=10))
    nb, na = short.cert.not_valid_before_utc, short.cert.not_valid_after_utc
    assert timedelta(days=10) <= na - nb <= timedelta(days=10, minutes=2)


def test_digest_is_base36_sha256_of_der(ca):
    d = ca.digest()
    assert len(d) == 50 and set(d) <= set("0123456789abcdefghijklmnopqrstuvwxyz")
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert int(d, 36) == int(hashlib.sha256(der).hexdigest(), 16)


def test_digest_stable_across_pem_roundtrip(ca):
    again = pki.RootCA.from_pem(ca.cert_pem)
    assert again.digest() == ca.digest()
    assert pki.ca_digest(ca.cert_pem.decode()) == ca.digest()
    assert not again.can_sign and again.key_pem is None


def test_from_pem_with_key_can_sign(ca):
    loaded = pki.RootCA.from_pem(ca.cert_pem, ca.key_pem)
    cert, _ = issue(loaded)
    assert pki.verify_node_cert(ca.cert_pem, cert).node_id == "node1"


def test_from_pem_rejects_mismatched_key(ca, other_ca):
    with pytest.raises(InvalidRequest, match="does not match"):
        pki.RootCA.from_pem(ca.cert_pem, other_ca.key_pem)


def test_from_pem_rejects_non_ca(ca):
    cert, _ = issue(ca)
    with pytest.raises(InvalidRequest, match="not a CA"):
        pki.RootCA.from_pem(cert)


def test_from_pem_rejects_junk():
    with pytest.raises(InvalidRequest, match="invalid certificate"):
        pki.RootCA.from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_signing_without_key_refused(ca):
    public_only = pki.RootCA.from_pem(ca.cert_pem)
    with pytest.raises(NetweftError, match="cannot sign"):
        issue(public_only)


def test_single_ca_certificate_is_the_one_cert_re_encoded(ca):
    assert pki.single_ca_certificate(ca.cert_pem) == ca.cert_pem
    assert pki.single_ca_certificate(ca.cert_pem.decode()) == ca.cert_pem
    assert pki.single_ca_certificate(b"\n  " + ca.cert_pem + b"\n\n") == ca.cert_pem
    assert pki.single_ca_certificate(ca.cert_pem.replace(b"\n", b"\r\n")) == ca.cert_pem


def test_single_ca_certificate_refuses_an_appended_ca(ca, other_ca):
    # A man in the middle serves the real CA (whose digest the token names) plus its own.
    for bundle in (ca.cert_pem + other_ca.cert_pem, other_ca.cert_pem + ca.cert_pem, ca.cert_pem + ca.cert_pem):
        with pytest.raises(InvalidRequest, match="exactly one PEM CA certificate, got 2 PEM blocks"):
            pki.single_ca_certificate(bundle)


@pytest.mark.parametrize("junk", [
    b"", b"hello", b"junk\n{cert}", b"{cert}junk", b"{cert}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
])
def test_single_ca_certificate_refuses_anything_else(ca, junk):
    with pytest.raises(InvalidRequest) as e:
        pki.single_ca_certificate(junk.replace(b"{cert}", ca.cert_pem))
    assert "\n" not in str(e.value)


def test_single_ca_certificate_refuses_a_node_certificate(ca):
    with pytest.raises(InvalidRequest, match="not a CA"):
        pki.single_ca_certificate(issue(ca)[0])


@pytest.mark.parametrize("value", [None, 5, "\u00e9", ["x"]])
def test_single_ca_certificate_refuses_non_pem_values(value):
    with pytest.raises(InvalidRequest):
        pki.single_ca_certificate(value)


# ---------------------------------------------------------------- join tokens

def test_token_format_and_match(ca):
    token = pki.make_join_token(ca.digest())
    prefix, version, digest, secret = token.split("-")
    assert (prefix, version, digest) == ("SWMTKN", "1", ca.digest())
    assert len(secret) == 25
    assert pki.parse_join_token(token) == (1, ca.digest(), secret)
    assert pki.parse_join_token(token).digest == pki.ca_digest(ca.cert_pem)


def test_token_of_other_ca_does_not_match(ca, other_ca):
    assert pki.parse_join_token(pki.make_join_token(other_ca.digest())).digest != pki.ca_digest(ca.cert_pem)


def test_tokens_are_random(ca):
    tokens = {pki.make_join_token(ca.digest()) for _ in range(50)}
    assert len(tokens) == 50


def test_secret_matches(ca):
    t1 = pki.make_join_token(ca.digest())
    t2 = pki.make_join_token(ca.digest())
    assert pki.secret_matches(t1, t1)
    assert pki.secret_matches(" " + t1 + "\n", t1)
    assert not pki.secret_matches(t1, t2)
    assert not pki.secret_matches("", t1)
    assert not pki.secret_matches("SWMTKN-1-é", t1)  # non-ASCII must not crash
    assert not pki.secret_matches(None, t1)


GOOD_DIGEST = "0" * 49 + "1"
GOOD_SECRET = "a" * 25


@pytest.mark.parametrize(
    "token, reason",
    [
        ("", "must start with SWMTKN-"),
        ("hello", "must start with SWMTKN-"),
        (f"swmtkn-1-{GOOD_DIGEST}-{GOOD_SECRET}", "must start with SWMTKN-"),
        (f"SWMTKN-1-{GOOD_DIGEST}", "expected SWMTKN-<version>-<CA digest>-<secret>"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{GOOD_SECRET}-FIPS", "expected SWMTKN"),
        (f"SWMTKN-2-{GOOD_DIGEST}-{GOOD_SECRET}", "unsupported version '2'"),
        (f"SWMTKN-01-{GOOD_DIGEST}-{GOOD_SECRET}", "unsupported version"),
        (f"SWMTKN-1-{GOOD_DIGEST[:-1]}-{GOOD_SECRET}", "CA digest must be 50 base-36"),
        (f"SWMTKN-1-{GOOD_DIGEST.upper()}Z-{GOOD_SECRET}", "CA digest must be 50 base-36"),
        (f"SWMTKN-1-{'+' + GOOD_DIGEST[1:]}-{GOOD_SECRET}", "CA digest must be 50 base-36"),
        (f"SWMTKN-1-{'z' * 50}-{GOOD_SECRET}", "CA digest out of range"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{GOOD_SECRET}a", "secret must be 25 base-36"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{'A' * 25}", "secret must be 25 base-36"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{'a' * 12 + '_' + 'a' * 12}", "secret must be 25 base-36"),
        (f"SWMTKN-1-{GOOD_DIGEST}-{'z' * 25}", "secret out of range"),
    ],
)
def test_malformed_tokens_rejected_with_reason(token, reason):
    with pytest.raises(InvalidRequest) as exc:
        pki.parse_join_token(token)
    msg = str(exc.value)
    assert msg.startswith("invalid join token: ")
    assert reason in msg
    assert "\n" not in msg
    if len(token) > 40:
        assert token not in msg  # a token is a secret: never echoed


def test_parse_join_token_raises_on_malformed(ca):
    with pytest.raises(InvalidRequest, match="invalid join token"):
        pki.parse_join_token("SWMTKN-1-short-x")


def test_parse_tolerates_surrounding_whitespace(ca):
    token = pki.make_join_token(ca.digest())
    assert pki.parse_join_token(f"  {token}\n").digest == ca.digest()


@given(st.integers(min_value=0, max_value=2**256 - 1))
def test_token_roundtrip_any_digest(n):
    digest = pki._base36(n, 50)
    parsed = pki.parse_join_token(pki.make_join_token(digest))
    assert parsed.version == 1 and int(parsed.digest, 36) == n
    assert len(parsed.secret) == 25 and int(parsed.secret, 36) < 2**128


@given(st.text(max_size=120))
def test_parse_arbitrary_text_only_raises_invalid_request(text):
    try:
        parsed = pki.parse_join_token(text)
    except InvalidRequest as e:
        assert str(e).startswith("invalid join token: ")
    else:
        assert text.strip().startswith("SWMTKN-1-") and len(parsed.digest) == 50


@given(st.data())
@settings(max_examples=200)
def test_token_with_one_char_removed_or_inserted_is_rejected(data):
    token = pki.make_join_token(GOOD_DIGEST)
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    if data.draw(st.booleans()):
        mutated = token[:i] + token[i + 1:]
    else:
        mutated = token[:i] + data.draw(st.sampled_from("-a0Z_")) + token[i:]
    with pytest.raises(InvalidRequest):
        pki.parse_join_token(mutated)


# ---------------------------------------------------------------- CSR and signing

def test_csr_has_no_identity_and_valid_signature():
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.new_node_key()))
    assert len(csr.subject) == 0
    assert csr.is_signature_valid


@pytest.mark.parametrize("role, ou", [("manager", "swarm-manager"), ("worker", "swarm-worker")])
def test_sign_and_verify_roundtrip(ca, role, ou):
    before = datetime.now(UTC)
    cert_pem, _ = issue(ca, node_id="n7", role=role, expiry=30 * DAY)
    ident = pki.verify_node_cert(ca.cert_pem, cert_pem)
    assert (ident.node_id, ident.role, ident.cluster_id) == ("n7", role, "cluster-a")
    assert ident.is_manager == (role == "manager")
    # Backdated a minute for clock skew; lasts `expiry` from now.
    assert before - timedelta(minutes=1, seconds=2) <= ident.not_before <= before
    assert abs(ident.not_after - (before + 30 * DAY)) < timedelta(seconds=5)

    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.serial_number == ident.serial
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == ou
    assert pki.cert_identity(cert) == ident
    assert pki.cert_identity(cert_pem.decode()) == ident
    assert pki.cert_identity(cert.public_bytes(serialization.Encoding.DER)) == ident


def test_manager_and_worker_sans(ca):
    mgr = x509.load_pem_x509_certificate(
        issue(ca, "m1", "manager", ip_sans=["192.0.2.10", ipaddress.ip_address("2001:db8::1")])[0]
    )
    san = mgr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["m1", "netweft-manager"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::1")
    ]
    wrk = x509.load_pem_x509_certificate(issue(ca, "w1", "worker")[0])
    san = wrk.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["w1"]


def test_node_cert_extensions(ca):
    cert = x509.load_pem_x509_certificate(issue(ca)[0])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_serials_are_random(ca):
    serials = {pki.cert_identity(issue(ca)[0]).serial for _ in range(10)}
    assert len(serials) == 10


def test_identity_comes_from_ca_not_csr(ca):
    # A CSR asking to be a manager of another cluster gets only what the CA decides.
    key = pki.new_node_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, "evil"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "swarm-manager"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "other"),
        ]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("netweft-manager")]), False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_pem = pki.sign_node_cert(ca, csr, "w9", "worker", "cluster-a", DAY)
    ident = pki.verify_node_cert(ca.cert_pem, cert_pem)
    assert (ident.node_id, ident.role, ident.cluster_id) == ("w9", "worker", "cluster-a")
    san = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "netweft-manager" not in san.get_values_for_type(x509.DNSName)


def test_csr_with_bad_signature_refused(ca):
    # Swap in another key's public key: the CSR signature no longer verifies.
    key, other = pki.new_node_key(), pki.new_node_key()
    good = x509.load_pem_x509_csr(pki.make_csr(key))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    old_pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    new_pub = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    i = der.index(old_pub)
    der[i:i + len(old_pub)] = new_pub
    bad_pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidRequest, match="invalid CSR: bad signature"):
        pki.sign_node_cert(ca, bad_pem, "n1", "worker", "cluster-a", DAY)


def test_an_expiry_past_the_calendar_is_one_line_not_an_overflow(ca):
    key = pki.new_node_key()
    with pytest.raises(InvalidRequest, match="at most 3650 days") as e:
        pki.sign_node_cert(ca, pki.make_csr(key), "n1", "worker", "cluster-a", timedelta(days=3_000_000))
    assert "\n" not in str(e.value)
    # Far, but within the calendar: capped by the CA, as before.
    cert = pki.sign_node_cert(ca, pki.make_csr(key), "n1", "worker", "cluster-a", timedelta(days=100_000))
    assert pki.cert_identity(cert).not_after == pki.validity(ca.cert)[1]


def test_csr_junk_and_weak_keys_refused(ca):
    with pytest.raises(InvalidRequest, match="invalid CSR"):
        pki.sign_node_cert(ca, b"not a csr", "n1", "worker", "cluster-a", DAY)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidRequest, match="2048"):
        pki.sign_node_cert(ca, pki.make_csr(weak), "n1", "worker", "cluster-a", DAY)
    rsa_ok = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert pki.sign_node_cert(ca, pki.make_csr(rsa_ok), "n1", "worker", "cluster-a", DAY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(role="admin"), "invalid role"),
        (dict(node_id=""), "invalid node ID"),
        (dict(node_id="a b"), "invalid node ID"),
        (dict(cluster_id=""), "cluster ID"),
        (dict(expiry=timedelta(0)), "expiry must be positive"),
        (dict(ip_sans=["not-an-ip"]), "invalid IP SAN"),
    ],
)
def test_sign_argument_validation(ca, kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        issue(ca, **kwargs)


def test_node_cert_capped_at_ca_expiry():
    short = pki.create_root_ca("c", expiry=timedelta(days=5))
    ident = pki.cert_identity(issue(short, cluster_id="c", expiry=timedelta(days=90))[0])
    assert ident.not_after == short.cert.not_valid_after_utc


# ---------------------------------------------------------------- verification

def test_cert_from_other_ca_refused(ca, other_ca):
    cert_pem, _ = issue(other_ca, cluster_id="cluster-b")
    with pytest.raises(InvalidRequest, match="not issued by this cluster's CA"):
        pki.verify_node_cert(ca.cert_pem, cert_pem)


def test_cert_from_impostor_ca_with_same_name_refused(ca):
    impostor = pki.create_root_ca("cluster-a")  # same subject, different key
    cert_pem, _ = issue(impostor)
    with pytest.raises(InvalidRequest, match="not issued by this cluster's CA"):
        pki.verify_node_cert(ca.cert_pem, cert_pem)


def test_expired_cert_refused_naming_expiry(ca):
    # Issued (in the CA's lifetime) for a day, checked a day and a bit later.
    issued_at = ca.cert.not_valid_before_utc + timedelta(minutes=5)
    cert_pem, _ = issue(ca, expiry=DAY, now=issued_at)
    ident = pki.cert_identity(cert_pem)
    assert ident.not_after == (issued_at + DAY).replace(microsecond=0)
    with pytest.raises(InvalidRequest) as exc:
        pki.verify_node_cert(ca.cert_pem, cert_pem, now=ident.not_after + timedelta(seconds=1))
    assert str(exc.value) == (
        f"certificate expired on {ident.not_after.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    )
    # Still fine just before the end.
    pki.verify_node_cert(ca.cert_pem, cert_pem, now=ident.not_after - timedelta(seconds=1))


def test_not_yet_valid_cert_refused(ca):
    cert_pem, _ = issue(ca, now=datetime.now(UTC) + 2 * DAY)
    with pytest.raises(InvalidRequest, match="not valid before"):
        pki.verify_node_cert(ca.cert_pem, cert_pem)


def test_naive_now_is_utc(ca):
    cert_pem, _ = issue(ca)
    naive = datetime.now(UTC).replace(tzinfo=None)
    assert pki.verify_node_cert(ca.cert_pem, cert_pem, now=naive).node_id == "node1"


def test_expired_ca_refused():
    short = pki.create_root_ca("c", expiry=timedelta(days=2))
    cert_pem, _ = issue(short, cluster_id="c", expiry=DAY)
    with pytest.raises(InvalidRequest, match="cluster CA expired on"):
        pki.verify_node_cert(short.cert_pem, cert_pem, now=datetime.now(UTC) + 3 * DAY)
    with pytest.raises(InvalidRequest, match="cluster CA expired on"):
        issue(short, cluster_id="c", now=datetime.now(UTC) + 3 * DAY)


def test_cluster_id_must_match_ca(ca):
    cert_pem, _ = issue(ca, cluster_id="someone-else")
    with pytest.raises(InvalidRequest, match="belongs to cluster 'someone-else'"):
        pki.verify_node_cert(ca.cert_pem, cert_pem)


def test_verify_against_ca_bundle(ca, other_ca):
    # During a CA rotation both roots are trusted.
    bundle = ca.cert_pem + other_ca.cert_pem
    assert pki.verify_node_cert(bundle, issue(ca)[0]).cluster_id == "cluster-a"
    assert pki.verify_node_cert(bundle, issue(other_ca, cluster_id="cluster-b")[0])


def test_cert_identity_needs_node_identity(ca):
    with pytest.raises(InvalidRequest, match="unknown role"):
        pki.cert_identity(ca.cert_pem)  # the CA has no OU


# ---------------------------------------------------------------- renewal timing

@given(
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    lifetime=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=3650)),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_renewal_time_within_50_to_80_percent(start, lifetime, seed):
    nb = start.replace(tzinfo=UTC)
    na = nb + lifetime
    t = pki.renewal_time(nb, na, rng=random.Random(seed))
    assert nb + lifetime * 0.5 <= t <= nb + lifetime * 0.8


class _FixedRng:
    def __init__(self, value):
        self.value = value

    def uniform(self, a, b):
        return a + (b - a) * self.value


@pytest.mark.parametrize("frac, expected", [(0.0, 50), (1.0, 80), (0.5, 65)])
def test_renewal_time_bounds_are_reachable(frac, expected):
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    t = pki.renewal_time(nb, nb + timedelta(hours=100), rng=_FixedRng(frac))
    assert t == nb + timedelta(hours=expected)


def test_renewal_time_spreads_out():
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    times = {pki.renewal_time(nb, nb + 90 * DAY) for _ in range(20)}
    assert len(times) > 1


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize(
    "text, expected",
    [
        ("90d", timedelta(days=90)),
        ("2160h", timedelta(hours=2160)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2160h0m0s", timedelta(hours=2160)),
        ("1.5h", timedelta(minutes=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m500ms", timedelta(minutes=1, milliseconds=500)),
        ("1d12h", timedelta(hours=36)),
        (" 10m ", timedelta(minutes=10)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text, expected):
    assert pki.parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "90", "d", "10x", "-5m", "+5m", "1h 30m", "h1", "1.h", ".5h", "1h30",
     "ten minutes", "5M", "1e3s", "١٠s", "99999999999999999999d"],
)
def test_parse_duration_rejects_junk(text):
    with pytest.raises(InvalidRequest, match="duration"):
        pki.parse_duration(text)


def test_parse_duration_rejects_non_string():
    with pytest.raises(InvalidRequest):
        pki.parse_duration(90)


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(["d", "h", "m", "s"])),
        min_size=1, max_size=5,
    )
)
def test_parse_duration_sums_parts(parts):
    text = "".join(f"{n}{unit}" for n, unit in parts)
    unit = {"d": DAY, "h": timedelta(hours=1), "m": timedelta(minutes=1), "s": timedelta(seconds=1)}
    assert pki.parse_duration(text) == sum((n * unit[u] for n, u in parts), timedelta(0))


@given(st.text(max_size=30))
def test_parse_duration_only_raises_invalid_request(text):
    try:
        assert pki.parse_duration(text) >= timedelta(0)
    except InvalidRequest:
        pass


# ---------------------------------------------------------------- files

def test_save_pem_atomic_and_modes(tmp_path, ca):
    cert_path, key_path = tmp_path / "ca.crt", tmp_path / "ca.key"
    pki.save_pem(cert_path, ca.cert_pem)
    pki.save_pem(key_path, ca.key_pem, private=True)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o644
    assert pki.load_pem(cert_path) == ca.cert_pem
    loaded = pki.RootCA.from_pem(pki.load_pem(cert_path), pki.load_pem(key_path))
    assert loaded.digest() == ca.digest()
    # Overwrite in place, leaving no temp files behind.
    pki.save_pem(key_path, ca.key_pem.decode(), private=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_save_pem_failure_leaves_no_temp(tmp_path):
    target = tmp_path / "dir-in-the-way"
    target.mkdir()
    with pytest.raises(OSError):
        pki.save_pem(target, b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["dir-in-the-way"]


def test_key_pem_roundtrip():
    key = pki.new_node_key()
    again = pki.load_private_key(pki.key_to_pem(key))
    assert again.private_numbers() == key.private_numbers()
    with pytest.raises(InvalidRequest, match="invalid private key"):
        pki.load_private_key(b"junk")


# ---------------------------------------------------------------- TLS

def handshake(server_ctx, client_ctx, server_hostname=None):
    """Run a TLS handshake over a socketpair and exchange one message.

    Returns (server_error, client_error, client_received). With TLS 1.3 the client
    may finish its handshake before the server rejects its certificate, so the
    client's error can surface on the first read instead.
    """
    s_sock, c_sock = socket.socketpair()
    for s in (s_sock, c_sock):
        s.settimeout(10)
    result = {}

    def serve():
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as tls:
                result["peer"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            result["server_error"] = e
        finally:
            s_sock.close()

    t = threading.Thread(target=serve)
    t.start()
    client_error, received = None, b""
    try:
        with client_ctx.wrap_socket(c_sock, server_hostname=server_hostname) as tls:
            received = tls.recv(2)
    except (ssl.SSLError, OSError) as e:
        client_error = e
    finally:
        c_sock.close()
        t.join(10)
    return result.get("server_error"), client_error, received, result.get("peer")


@pytest.fixture(scope="module")
def manager_creds(ca):
    return issue(ca, "mgr1", "manager", ip_sans=["127.0.0.1"])


def test_mutual_tls_succeeds(ca, manager_creds):
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=True)
    client_cert, client_key = issue(ca, "w1", "worker")
    client = pki.client_ssl_context(ca.cert_pem, client_cert, client_key)
    s_err, c_err, got, peer = handshake(server, client)
    assert (s_err, c_err, got) == (None, None, b"ok")
    # The server learns who the client is from its certificate.
    ident = pki.verify_node_cert(ca.cert_pem, peer)
    assert (ident.node_id, ident.role) == ("w1", "worker")


def test_client_hostname_forced_to_manager_name(ca, manager_creds):
    # Callers dialling by IP (or passing any name) still verify "netweft-manager".
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=False)
    client = pki.client_ssl_context(ca.cert_pem)
    assert handshake(server, client, server_hostname="192.0.2.99")[:3] == (None, None, b"ok")


def test_client_cert_from_other_ca_refused(ca, other_ca, manager_creds):
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=True)
    # The client trusts the right CA but presents a cert from another cluster.
    foreign = issue(other_ca, "x1", "manager", cluster_id="cluster-b")
    client = pki.client_ssl_context(ca.cert_pem, *foreign)
    s_err, c_err, got, _ = handshake(server, client)
    assert isinstance(s_err, ssl.SSLError)
    assert got != b"ok"


def test_client_cert_from_other_ca_refused_even_if_optional(ca, other_ca, manager_creds):
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=False)
    foreign = issue(other_ca, "x1", "worker", cluster_id="cluster-b")
    client = pki.client_ssl_context(ca.cert_pem, *foreign)
    s_err, _, got, _ = handshake(server, client)
    assert isinstance(s_err, ssl.SSLError) and got != b"ok"


def test_no_client_cert_refused_when_required(ca, manager_creds):
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=True)
    client = pki.client_ssl_context(ca.cert_pem)
    s_err, _, got, _ = handshake(server, client)
    assert isinstance(s_err, ssl.SSLError)
    assert "certificate" in str(s_err).lower()
    assert got != b"ok"


def test_no_client_cert_allowed_when_optional(ca, manager_creds):
    # E.g. a joining node, which has only its token yet.
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=False)
    client = pki.client_ssl_context(ca.cert_pem)
    s_err, c_err, got, peer = handshake(server, client)
    assert (s_err, c_err, got, peer) == (None, None, b"ok", None)


def test_worker_cannot_serve_as_manager(ca):
    # A worker's certificate lacks the netweft-manager SAN: clients refuse it.
    server = pki.server_ssl_context(ca.cert_pem, *issue(ca, "w2", "worker"),
                                    require_client_cert=False)
    s_err, c_err, got, _ = handshake(server, pki.client_ssl_context(ca.cert_pem))
    assert isinstance(c_err, ssl.SSLCertVerificationError)
    assert "netweft-manager" in str(c_err) or "hostname" in str(c_err).lower()
    assert got != b"ok"


def test_server_from_other_ca_refused(ca, other_ca):
    server = pki.server_ssl_context(
        other_ca.cert_pem, *issue(other_ca, "m9", "manager", cluster_id="cluster-b"),
        require_client_cert=False,
    )
    _, c_err, got, _ = handshake(server, pki.client_ssl_context(ca.cert_pem))
    assert isinstance(c_err, ssl.SSLCertVerificationError)
    assert got != b"ok"


def test_tls12_minimum(ca, manager_creds):
    server = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=False)
    client = pki.client_ssl_context(ca.cert_pem)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    # A TLS 1.2-only client still works; a TLS 1.1 one doesn't get in.
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(server, client)[:3] == (None, None, b"ok")


def test_client_context_needs_cert_and_key_together(ca, manager_creds):
    with pytest.raises(InvalidRequest, match="together"):
        pki.client_ssl_context(ca.cert_pem, manager_creds[0])


def test_ssl_context_with_bad_ca_refused(manager_creds):
    with pytest.raises(InvalidRequest, match="invalid CA certificate"):
        pki.client_ssl_context("garbage")


def test_mutual_tls_over_asyncio_loopback(ca, manager_creds):
    # The path aiohttp uses (wrap_bio), connecting by IP to 127.0.0.1.
    server_ctx = pki.server_ssl_context(ca.cert_pem, *manager_creds, require_client_cert=True)
    client_ctx = pki.client_ssl_context(ca.cert_pem, *issue(ca, "w3", "worker"))

    async def main():
        seen = {}

        async def on_conn(reader, writer):
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            seen["client"] = pki.cert_identity(der)
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            data = await reader.read(2)
            writer.close()
        return data, seen["client"]

    data, client = asyncio.run(asyncio.wait_for(main(), 10))
    assert data == b"hi"
    assert (client.node_id, client.role) == ("w3", "worker")
