"""Cluster PKI: root CA, join tokens, node certificates, TLS contexts.

Pure logic on top of `cryptography` and `ssl`: no network I/O. The only file I/O is
in save_pem/load_pem (and the in-memory file that ssl needs to load a key pair).

Trust flow (as in swarmkit):
  1. `swarm init` creates a RootCA and two join tokens (worker, manager). A token is
     SWMTKN-1-<digest of the CA certificate>-<secret>.
  2. A joining host fetches the CA certificate and checks it against the digest in its
     token (parse_join_token(token).digest == ca_digest(ca)) before sending anything, so
     there is no trust on first use.
  3. It sends a CSR (make_csr) with the token; the manager checks the secret
     (secret_matches) and signs (sign_node_cert). The CA, not the CSR, decides the
     node ID, role and cluster: only the public key is taken from the CSR.
  4. From then on every connection is mutual TLS (server_ssl_context /
     client_ssl_context) and the role in the peer's certificate (cert_identity)
     decides what it may do. Nodes renew at renewal_time().

PEM values are returned as bytes; inputs accept bytes or str.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import random
import re
import secrets
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, NamedTuple, Union

import importlib

from netweft.errors import InvalidRequest, NetweftError
from netweft.pki import der


class _Lazy:
    """A cryptography module (or a class in one) imported on first use: it costs a daemon ~9 MiB, and a
    worker needs it only to join and renew (reading its own certificate goes through pki.der)."""

    def __init__(self, module: str, attr: str = ""):
        self._module, self._attr = module, attr

    def __getattr__(self, name: str):
        obj = importlib.import_module(self._module)
        return getattr(getattr(obj, self._attr) if self._attr else obj, name)


x509 = _Lazy("cryptography.x509")
hashes = _Lazy("cryptography.hazmat.primitives.hashes")
serialization = _Lazy("cryptography.hazmat.primitives.serialization")
ec = _Lazy("cryptography.hazmat.primitives.asymmetric.ec")
rsa = _Lazy("cryptography.hazmat.primitives.asymmetric.rsa")
ExtendedKeyUsageOID = _Lazy("cryptography.x509.oid", "ExtendedKeyUsageOID")
NameOID = _Lazy("cryptography.x509.oid", "NameOID")

ROOT_CN = "netweft-root-ca"
# Every manager certificate carries this DNS SAN, and clients verify managers by it,
# whatever address they dialled. Worker certificates lack it, so a worker cannot
# pose as a manager.
MANAGER_HOSTNAME = "netweft-manager"

ROLES = ("manager", "worker")
_ROLE_TO_OU = {"manager": "swarm-manager", "worker": "swarm-worker"}
_OU_TO_ROLE = {ou: role for role, ou in _ROLE_TO_OU.items()}

TOKEN_PREFIX = "SWMTKN"
TOKEN_VERSION = 1
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
DIGEST_LEN = 50  # ceil(log36(2**256)): a sha256 in base 36
SECRET_LEN = 25  # ceil(log36(2**128)): 128 random bits in base 36
_SECRET_BITS = 128

CLOCK_SKEW = timedelta(minutes=1)  # node certs start this far in the past

PemLike = Union[bytes, str]


# ---------------------------------------------------------------- small helpers

def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(dt: datetime) -> datetime:
    # Naive datetimes are taken as UTC, which is what certificates use.
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _as_bytes(data: PemLike) -> bytes:
    return data.encode("ascii") if isinstance(data, str) else bytes(data)


def _fmt_time(dt: datetime) -> str:
    return _utc(dt).strftime("%Y-%m-%d %H:%M:%S UTC")


def validity(cert: x509.Certificate) -> tuple[datetime, datetime]:
    """(not_before, not_after) of a certificate, in UTC."""
    try:
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42 only has the naive (UTC) properties
        return _utc(cert.not_valid_before), _utc(cert.not_valid_after)


def _base36(n: int, width: int) -> str:
    digits = []
    while n:
        n, r = divmod(n, 36)
        digits.append(_B36[r])
    return "".join(reversed(digits)).rjust(width, "0")


def _name_attr(name: x509.Name, oid) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def load_cert(data: Union[PemLike, x509.Certificate]) -> x509.Certificate:
    """A certificate from PEM (bytes/str), DER bytes, or an x509.Certificate."""
    if isinstance(data, x509.Certificate):
        return data
    raw = _as_bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)  # e.g. SSLSocket.getpeercert(True)
    except ValueError as e:
        raise InvalidRequest(f"invalid certificate: {e}") from None


def _load_certs(pem: PemLike) -> list[x509.Certificate]:
    # A CA "bundle" may hold several roots (e.g. old and new during a CA rotation).
    try:
        certs = x509.load_pem_x509_certificates(_as_bytes(pem))
    except ValueError as e:
        raise InvalidRequest(f"invalid CA certificate: {e}") from None
    return certs


def key_to_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: PemLike):
    try:
        return serialization.load_pem_private_key(_as_bytes(pem), password=None)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid private key: {e}") from None


def _same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


# ---------------------------------------------------------------- root CA

class RootCA:
    """The cluster's root certificate, plus its key when this node may sign."""

    def __init__(self, cert: x509.Certificate, key=None):
        self.cert = cert
        self.key = key

    @classmethod
    def from_pem(cls, cert_pem: PemLike, key_pem: PemLike | None = None) -> "RootCA":
        cert = load_cert(cert_pem)
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise InvalidRequest("invalid CA certificate: not a CA (basicConstraints)")
        key = None
        if key_pem is not None:
            key = load_private_key(key_pem)
            if not _same_public_key(key.public_key(), cert.public_key()):
                raise InvalidRequest("CA key does not match the CA certificate")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes | None:
        return None if self.key is None else key_to_pem(self.key)

    @property
    def can_sign(self) -> bool:
        return self.key is not None

    @property
    def cluster_id(self) -> str | None:
        return _name_attr(self.cert.subject, NameOID.ORGANIZATION_NAME)

    def digest(self) -> str:
        return ca_digest(self.cert)


def ca_digest(ca_cert: Union[PemLike, x509.Certificate]) -> str:
    """sha256 of the DER certificate, in base 36 zero-padded to 50 chars (as swarmkit)."""
    der = load_cert(ca_cert).public_bytes(serialization.Encoding.DER)
    return _base36(int.from_bytes(hashlib.sha256(der).digest(), "big"), DIGEST_LEN)


_ONE_PEM_CERT = re.compile(rb"\s*(-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----)\s*")


def single_ca_certificate(pem: PemLike) -> bytes:
    """The one CA certificate in `pem`, re-encoded: what a joining node may check against its token,
    trust and save. Anything else is refused: a bundle of several certificates would let whoever
    serves it slip its own CA in beside the one the token names (swarmkit hashes the whole bundle
    for the same reason)."""
    try:
        raw = _as_bytes(pem)
    except (TypeError, UnicodeEncodeError):
        raise InvalidRequest("expected one PEM CA certificate, got something else") from None
    blocks = raw.count(b"-----BEGIN")
    if blocks != 1:
        raise InvalidRequest(f"expected exactly one PEM CA certificate, got {blocks} PEM blocks")
    m = _ONE_PEM_CERT.fullmatch(raw)
    if m is None:
        raise InvalidRequest("expected exactly one PEM CA certificate and nothing else")
    return RootCA.from_pem(m.group(1)).cert_pem  # refuses a certificate that is not a CA


CA_LIFETIME = timedelta(days=3650)  # a node certificate never outlives its CA, so no expiry beyond this is useful


def create_root_ca(cluster_id: str, expiry: timedelta = CA_LIFETIME) -> RootCA:
    if not cluster_id:
        raise InvalidRequest("cluster ID must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, ROOT_CN),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + expiry)
        # path_length=1 leaves room for a cross-signed new root during CA rotation.
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return RootCA(cert, key)


# ---------------------------------------------------------------- join tokens

class JoinToken(NamedTuple):
    version: int
    digest: str
    secret: str


def make_join_token(ca_digest: str) -> str:
    secret = _base36(secrets.randbits(_SECRET_BITS), SECRET_LEN)
    return f"{TOKEN_PREFIX}-{TOKEN_VERSION}-{ca_digest}-{secret}"


def _token_error(reason: str) -> InvalidRequest:
    # Never echo the token itself: it is a secret.
    return InvalidRequest(f"invalid join token: {reason}")


def parse_join_token(token: str) -> JoinToken:
    if not isinstance(token, str):
        raise _token_error("not a string")
    parts = token.strip().split("-")
    if parts[0] != TOKEN_PREFIX:
        raise _token_error(f"must start with {TOKEN_PREFIX}-")
    if len(parts) != 4:
        raise _token_error(f"expected {TOKEN_PREFIX}-<version>-<CA digest>-<secret>")
    _, version, digest, secret = parts
    if version != str(TOKEN_VERSION):
        raise _token_error(f"unsupported version {version[:10]!r}")
    # A regex rather than int(x, 36) alone: int() also takes '+', '_' and upper case.
    if not re.fullmatch(rf"[0-9a-z]{{{DIGEST_LEN}}}", digest):
        raise _token_error(f"CA digest must be {DIGEST_LEN} base-36 characters")
    if int(digest, 36) >= 2**256:
        raise _token_error("CA digest out of range")
    if not re.fullmatch(rf"[0-9a-z]{{{SECRET_LEN}}}", secret):
        raise _token_error(f"secret must be {SECRET_LEN} base-36 characters")
    if int(secret, 36) >= 2**_SECRET_BITS:
        raise _token_error("secret out of range")
    return JoinToken(TOKEN_VERSION, digest, secret)


def secret_matches(token: str, expected_token: str) -> bool:
    """Constant-time comparison of a presented token with the cluster's token."""
    if not isinstance(token, str) or not isinstance(expected_token, str):
        return False
    return hmac.compare_digest(token.strip().encode(), expected_token.strip().encode())


# ---------------------------------------------------------------- keys and CSRs

def new_node_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key) -> bytes:
    # Empty subject: the CA picks the node's identity, so the CSR only proves the key.
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256()
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _check_csr_key(public_key) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
            return
        raise InvalidRequest(f"invalid CSR: unsupported curve {public_key.curve.name}")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= 2048:
            return
        raise InvalidRequest("invalid CSR: RSA key shorter than 2048 bits")
    raise InvalidRequest("invalid CSR: key must be ECDSA or RSA")


# ---------------------------------------------------------------- signing

_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def sign_node_cert(
    ca: RootCA,
    csr_pem: PemLike,
    node_id: str,
    role: str,
    cluster_id: str,
    expiry: timedelta,
    ip_sans: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    now: datetime | None = None,
) -> bytes:
    """Sign a node certificate; only the public key is taken from the CSR."""
    if not ca.can_sign:
        raise NetweftError("this node holds no CA key and cannot sign certificates")
    if role not in _ROLE_TO_OU:
        raise InvalidRequest(f"invalid role {role!r}: must be manager or worker")
    if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
        raise InvalidRequest(f"invalid node ID {node_id!r}")
    if not cluster_id:
        raise InvalidRequest("cluster ID must not be empty")
    if expiry <= timedelta(0):
        raise InvalidRequest("certificate expiry must be positive")
    try:
        ips = [ipaddress.ip_address(ip) for ip in ip_sans]
    except ValueError as e:
        raise InvalidRequest(f"invalid IP SAN: {e}") from None

    try:
        csr = x509.load_pem_x509_csr(_as_bytes(csr_pem))
    except ValueError as e:
        raise InvalidRequest(f"invalid CSR: {e}") from None
    if not csr.is_signature_valid:
        raise InvalidRequest("invalid CSR: bad signature")
    public_key = csr.public_key()
    _check_csr_key(public_key)

    now = _utc(now) if now is not None else _now()
    ca_not_before, ca_not_after = validity(ca.cert)
    if now > ca_not_after:
        raise InvalidRequest(f"cluster CA expired on {_fmt_time(ca_not_after)}")
    # A node certificate cannot usefully outlive the CA that vouches for it.
    try:
        not_after = min(now + expiry, ca_not_after)
    except OverflowError:  # past year 9999
        raise InvalidRequest(f"certificate expiry of {expiry.days} days is too large: at most "
                             f"{CA_LIFETIME.days} days (the cluster CA's lifetime)") from None

    dns = [node_id] + ([MANAGER_HOSTNAME] if role == "manager" else [])
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip) for ip in ips]
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _ROLE_TO_OU[role]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - CLOCK_SKEW, ca_not_before))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------- reading certs

@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    role: str  # "manager" | "worker"
    cluster_id: str
    serial: int
    not_before: datetime  # aware, UTC
    not_after: datetime

    @property
    def is_manager(self) -> bool:
        return self.role == "manager"


def cert_identity(cert: Union[PemLike, x509.Certificate]) -> NodeIdentity:
    """The node identity a certificate carries (no trust check: see verify_node_cert)."""
    if isinstance(cert, (bytes, bytearray, str)):  # PEM/DER: read without loading cryptography
        f = der.read(cert)
        node_id, ou, cluster_id = (f.subject.get(oid) for oid in (_CN, _OU, _O))
        serial, (not_before, not_after) = f.serial, (f.not_before, f.not_after)
    else:
        cert = load_cert(cert)
        node_id = _name_attr(cert.subject, NameOID.COMMON_NAME)
        ou = _name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        cluster_id = _name_attr(cert.subject, NameOID.ORGANIZATION_NAME)
        serial, (not_before, not_after) = cert.serial_number, validity(cert)
    if not node_id or not cluster_id:
        raise InvalidRequest("certificate carries no node identity")
    if ou not in _OU_TO_ROLE:
        raise InvalidRequest(f"certificate has unknown role {ou!r}")
    return NodeIdentity(node_id, _OU_TO_ROLE[ou], cluster_id, serial, not_before, not_after)


_CN, _OU, _O = "2.5.4.3", "2.5.4.11", "2.5.4.10"  # NameOID COMMON_NAME, ORGANIZATIONAL_UNIT_NAME, ORGANIZATION_NAME


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def verify_node_cert(
    ca_cert_pem: PemLike, cert_pem: Union[PemLike, x509.Certificate], now: datetime | None = None
) -> NodeIdentity:
    """Check a node certificate against the cluster CA (or CA bundle) and the clock."""
    now = _utc(now) if now is not None else _now()
    cert = load_cert(cert_pem)
    ca = next((c for c in _load_certs(ca_cert_pem) if _issued_by(cert, c)), None)
    if ca is None:
        raise InvalidRequest("certificate not issued by this cluster's CA")
    _, ca_not_after = validity(ca)
    if now > ca_not_after:
        raise InvalidRequest(f"cluster CA expired on {_fmt_time(ca_not_after)}")
    ident = cert_identity(cert)
    if now < ident.not_before:
        raise InvalidRequest(f"certificate not valid before {_fmt_time(ident.not_before)}")
    if now > ident.not_after:
        raise InvalidRequest(f"certificate expired on {_fmt_time(ident.not_after)}")
    ca_cluster = _name_attr(ca.subject, NameOID.ORGANIZATION_NAME)
    if ca_cluster is not None and ident.cluster_id != ca_cluster:
        raise InvalidRequest(
            f"certificate belongs to cluster {ident.cluster_id!r}, not {ca_cluster!r}"
        )
    return ident


# ---------------------------------------------------------------- renewal and durations

def renewal_time(not_before: datetime, not_after: datetime, rng=random) -> datetime:
    """A random time between 50% and 80% of the lifetime, so nodes don't renew in a herd."""
    return not_before + (not_after - not_before) * rng.uniform(0.5, 0.8)


_DURATION_UNITS = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}
# "ms" before "m" so that "5ms" is not read as "5m" + "s".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|d|h|m|s)")  # ASCII digits only


def parse_duration(text: str) -> timedelta:
    """Docker/Go style durations: "90d", "2160h", "1h30m", "45s", "1.5h", "2160h0m0s"."""
    if not isinstance(text, str):
        raise InvalidRequest(f"invalid duration {text!r}")
    s = text.strip()
    shown = repr(s if len(s) <= 40 else s[:40] + "...")  # keep the message one short line
    if s == "0":
        return timedelta(0)
    total, pos = timedelta(0), 0
    try:
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            total += _DURATION_UNITS[m.group(2)] * float(m.group(1))
            pos = m.end()
    except OverflowError:
        raise InvalidRequest(f"duration {shown} is too large") from None
    if pos == 0 or pos != len(s):
        raise InvalidRequest(
            f"invalid duration {shown}: expected e.g. 90d, 2160h, 1h30m, 45s"
        )
    return total


# ---------------------------------------------------------------- TLS contexts

def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: PemLike, key_pem: PemLike) -> None:
    # ssl only loads key pairs from a path. Prefer an anonymous in-memory file so the
    # key never touches disk; else a 0600 temp file removed at once.
    data = _as_bytes(cert_pem).rstrip(b"\n") + b"\n" + _as_bytes(key_pem)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("netweft-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    import tempfile   # where used: with shutil, bz2 and lzma it costs a daemon ≈1 MiB
    fd, path = tempfile.mkstemp(prefix="netweft-tls-")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def _load_ca(ctx: ssl.SSLContext, ca_cert_pem: PemLike) -> None:
    try:
        ctx.load_verify_locations(cadata=_as_bytes(ca_cert_pem).decode("ascii"))
    except (ssl.SSLError, ValueError) as e:
        raise InvalidRequest(f"invalid CA certificate: {e}") from None


def server_ssl_context(
    ca_cert_pem: PemLike, cert_pem: PemLike, key_pem: PemLike, require_client_cert: bool
) -> ssl.SSLContext:
    """TLS >= 1.2 server context. Without require_client_cert, a client certificate is
    still verified if one is presented (like Go's VerifyClientCertIfGiven), so joins
    (no cert yet) and renewals (cert) can share one listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert_chain(ctx, cert_pem, key_pem)
    _load_ca(ctx, ca_cert_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class _ManagerClientContext(ssl.SSLContext):
    """A client context that always verifies the server as MANAGER_HOSTNAME.

    Managers are dialled by IP address, but their certificates are checked against
    the fixed name every manager certificate carries. Forcing the name here means
    callers (asyncio, aiohttp, plain sockets) cannot forget it.
    """

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):
        return super().wrap_socket(sock, *args, server_hostname=MANAGER_HOSTNAME, **kwargs)

    def wrap_bio(self, incoming, outgoing, *args, server_hostname=None, **kwargs):
        return super().wrap_bio(incoming, outgoing, *args,
                                server_hostname=MANAGER_HOSTNAME, **kwargs)


def client_ssl_context(
    ca_cert_pem: PemLike, cert_pem: PemLike | None = None, key_pem: PemLike | None = None
) -> ssl.SSLContext:
    """TLS >= 1.2 client context trusting only the cluster CA; presents the node
    certificate if given. The server must hold a manager certificate."""
    if (cert_pem is None) != (key_pem is None):
        raise InvalidRequest("client certificate and key must be given together")
    ctx = _ManagerClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca_cert_pem)
    if cert_pem is not None:
        _load_cert_chain(ctx, cert_pem, key_pem)
    return ctx


# ---------------------------------------------------------------- files

def save_pem(path: str | os.PathLike, data: PemLike, private: bool = False) -> None:
    """Write atomically (temp file + rename): a crash leaves the old file or the new
    one, never half a key. Keys (private=True) get mode 0600, others 0644."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pem")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if not private:
                os.fchmod(f.fileno(), 0o644)
            f.write(_as_bytes(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_pem(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()
