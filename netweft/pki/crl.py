"""Certificate revocation lists for the store CA (etcd's --client-crl-file / --peer-crl-file).

Pure functions: which serials are revoked (each kept until its certificate would have expired anyway,
after which a CRL entry is useless) and the signed PEM CRL that lists them. etcd 3.4 matches a peer's
certificate serial against the list at every accepted connection.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from netweft.errors import InvalidRequest

CRL_LIFETIME = timedelta(days=3650)   # etcd does not check nextUpdate; the list is rewritten at every change


def parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"invalid time {str(text)[:40]!r} in the revocation list") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def current(entries, now: datetime) -> list[tuple[int, str, str]]:
    """The entries whose certificates have not expired yet, one per serial, ordered by serial."""
    out: dict[int, tuple[int, str, str]] = {}
    for serial, not_after, node_id in entries:
        if parse_time(not_after) > now:
            out[int(serial)] = (int(serial), str(not_after), str(node_id))
    return [out[k] for k in sorted(out)]


def make_crl(ca, entries, now: datetime | None = None) -> bytes:
    """A CRL signed by `ca` (a pki.RootCA holding its key) listing every entry's serial."""
    from cryptography import x509   # only managers sign: keep it off a worker's daemon
    from cryptography.hazmat.primitives import hashes, serialization
    if ca.key is None:
        raise InvalidRequest("this manager holds no store CA key and cannot sign a revocation list")
    now = now or datetime.now(timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - timedelta(minutes=1)).next_update(now + CRL_LIFETIME))
    for serial, _not_after, _node in entries:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(serial))
                                      .revocation_date(now - timedelta(minutes=1)).build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoked_serials(crl_pem: bytes, ca) -> set[int]:
    """The serials a CRL lists, after checking it is the store CA's (a CRL from elsewhere is refused)."""
    from cryptography import x509
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError:
        raise InvalidRequest("the store revocation list is not a PEM CRL") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.cert.public_key()):
        raise InvalidRequest("the store revocation list is not signed by this cluster's store CA")
    return {r.serial_number for r in crl}
