"""The few fields of an X.509 certificate a node reads about itself (serial, validity, subject), from PEM or DER,
without `cryptography`: a worker reads its own certificate at start and before each renewal, and loading
`cryptography` for that alone costs the daemon ~9 MiB. No signature or trust check here (pki.verify_node_cert).
"""
from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timezone
from typing import NamedTuple

from netweft.errors import InvalidRequest

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----")
SEQUENCE, SET, INTEGER, OID, UTCTIME, GENTIME, VERSION = 0x30, 0x31, 0x02, 0x06, 0x17, 0x18, 0xA0
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


class CertFields(NamedTuple):
    serial: int
    not_before: datetime  # aware, UTC
    not_after: datetime
    subject: dict[str, str]  # dotted OID -> value (the first of each)


def _bad(why: str) -> InvalidRequest:
    return InvalidRequest(f"invalid certificate: {why}")


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at pos."""
    if pos + 2 > end:
        raise _bad("truncated")
    tag, n = buf[pos], buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > end:
            raise _bad("bad length")
        n = int.from_bytes(buf[pos:pos + k], "big")
        pos += k
    if pos + n > end:
        raise _bad("truncated")
    return tag, pos, pos + n


def _expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    t, s, e = _tlv(buf, pos, end)
    if t != tag:
        raise _bad(f"expected tag {tag:#x}, found {t:#x}")
    return s, e


def _oid(raw: bytes) -> str:
    if not raw:
        raise _bad("empty OID")
    parts, n = [], 0
    for b in raw:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    if not parts or n:
        raise _bad("truncated OID")
    first = parts[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(p) for p in head + parts[1:])


_UTCTIME = re.compile(r"([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})Z")
_GENTIME = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})Z")


def _time(tag: int, raw: bytes) -> datetime:
    try:
        text = raw.decode("ascii")
        if tag not in (UTCTIME, GENTIME):
            raise ValueError(f"tag {tag:#x}")
        # Not datetime.strptime: its _strptime and calendar modules stay loaded in the daemon for this.
        m = (_UTCTIME if tag == UTCTIME else _GENTIME).fullmatch(text)
        if m is None:
            raise ValueError(f"time data {text!r} does not match the format")
        year = int(m[1])
        if tag == UTCTIME:
            year += 2000 if year < 69 else 1900   # strptime's %y pivot, as before
        dt = datetime(year, *(int(g) for g in m.groups()[1:]))
    except ValueError as e:
        raise _bad(f"bad time: {e}") from None
    return dt.replace(tzinfo=timezone.utc)


def _name(buf: bytes, start: int, end: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = start
    while pos < end:
        s, e = _expect(buf, pos, end, SET)
        p = s
        while p < e:
            a, ae = _expect(buf, p, e, SEQUENCE)
            os_, oe = _expect(buf, a, ae, OID)
            vt, vs, ve = _tlv(buf, oe, ae)
            if vt not in _STRINGS:
                raise _bad(f"name attribute of type {vt:#x}")
            try:
                out.setdefault(_oid(buf[os_:oe]), buf[vs:ve].decode(_STRINGS[vt]))
            except UnicodeDecodeError:
                raise _bad("undecodable name attribute") from None
            p = ae
        pos = e
    return out


def to_der(data: bytes | str) -> bytes:
    """DER of the first certificate in PEM, or DER unchanged."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if raw.lstrip().startswith(b"-----BEGIN"):
        m = _PEM.search(raw)
        if not m:
            raise _bad("no PEM certificate block")
        try:
            return base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            raise _bad("bad base64") from None
    return raw


def read(data: bytes | str) -> CertFields:
    """Serial, validity and subject of a certificate (PEM or DER)."""
    buf = to_der(data)
    cs, ce = _expect(buf, 0, len(buf), SEQUENCE)
    ts, te = _expect(buf, cs, ce, SEQUENCE)  # tbsCertificate
    tag, s, e = _tlv(buf, ts, te)
    if tag == VERSION:
        tag, s, e = _tlv(buf, e, te)
    if tag != INTEGER:
        raise _bad("no serial number")
    serial = int.from_bytes(buf[s:e], "big", signed=True)
    _, e = _expect(buf, e, te, SEQUENCE)              # signature algorithm
    _, e = _expect(buf, e, te, SEQUENCE)              # issuer
    vs, ve = _expect(buf, e, te, SEQUENCE)            # validity
    t1, s1, e1 = _tlv(buf, vs, ve)
    t2, s2, e2 = _tlv(buf, e1, ve)
    not_before, not_after = _time(t1, buf[s1:e1]), _time(t2, buf[s2:e2])
    ss, se = _expect(buf, ve, te, SEQUENCE)           # subject
    return CertFields(serial, not_before, not_after, _name(buf, ss, se))
