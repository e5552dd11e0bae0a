"""DNS messages: what the resolver reads from containers and writes back. Pure functions over bytes.

dnslib parses and builds every message, except the one shape that is almost all of the traffic: a
standard query for one A record (with or without an EDNS OPT record). That one is read and answered
here by hand, because dnslib's full parse and pack costs ≈60 µs a query and this ≈3 µs (FIELD-NOTES
"DNS": ≈10,000 q/s against ≈30,000 q/s). Everything the fast path does not recognise goes to dnslib;
whatever dnslib cannot parse is dropped (a client retries; a malformed message gets no answer).
"""
from __future__ import annotations

import socket
import struct

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSError, DNSRecord

TTL = 600                 # seconds; Docker's embedded DNS answers with 600 too
UDP_LIMIT = 512           # without EDNS
EDNS_LIMIT = 1232         # the size we advertise and honour at most with EDNS
TYPE_A, TYPE_AAAA, TYPE_PTR, TYPE_OPT, CLASS_IN = 1, 28, 12, 41, 1
_HEADER = struct.Struct("!HHHHHH")
_OPT = b"\x00" + struct.pack("!HHIH", TYPE_OPT, EDNS_LIMIT, 0, 0)   # our OPT record: no options
_A_RR = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, TTL, 4)  # name: a pointer to the question


class Question:
    """The one question of a standard query, read by the fast path."""
    __slots__ = ("name", "qtype", "qclass", "end", "edns")

    def __init__(self, name: str, qtype: int, qclass: int, end: int, edns: bool):
        self.name, self.qtype, self.qclass, self.end, self.edns = name, qtype, qclass, end, edns


def read_question(data: bytes) -> Question | None:
    """The question of a plain query (QR=0, opcode 0, one question, no answers or authority, at most
    an OPT record), or None for anything else (dnslib's turn)."""
    if len(data) < 17 or len(data) > 4096:
        return None
    _, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if flags & 0xF800 or qd != 1 or an or ns or ar > 1:    # a response, or an opcode other than QUERY
        return None
    labels = []
    i = 12
    n = len(data)
    while True:
        if i >= n:
            return None
        length = data[i]
        if length == 0:
            i += 1
            break
        if length > 63 or i + 1 + length > n:       # compression pointers never appear in a question
            return None
        labels.append(data[i + 1:i + 1 + length])
        i += 1 + length
    if i + 4 > n:
        return None
    qtype, qclass = struct.unpack_from("!HH", data, i)
    end = i + 4
    edns = False
    if ar:
        # The OPT record: root name, type 41, then class (size), ttl, rdlength and options.
        if end + 11 > n or data[end] != 0 or struct.unpack_from("!H", data, end + 1)[0] != TYPE_OPT:
            return None
        rdlen = struct.unpack_from("!H", data, end + 9)[0]
        if end + 11 + rdlen != n:
            return None
        edns = True
    elif end != n:
        return None
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    return Question(name, qtype, qclass, end, edns)


def answer_a(data: bytes, q: Question, addresses: tuple[str, ...]) -> bytes:
    """The answer to the fast path's query: the question as asked (case kept), then one A record per
    address, as many as fit (TC set when some did not)."""
    limit = EDNS_LIMIT if q.edns else UDP_LIMIT
    question = data[12:q.end]
    room = limit - 12 - len(question) - (len(_OPT) if q.edns else 0)
    fit = min(len(addresses), max(0, room // 16))
    flags = 0x8480 | (data[2] << 8 & 0x0100)        # QR, AA, RA; RD as asked
    if fit < len(addresses):
        flags |= 0x0200                              # TC: retry over TCP for the rest
    out = [data[:2], struct.pack("!HHHHH", flags, 1, fit, 0, 1 if q.edns else 0), question]
    for a in addresses[:fit]:
        out.append(_A_RR + socket.inet_aton(a))
    if q.edns:
        out.append(_OPT)
    return b"".join(out)


def parse(data: bytes) -> DNSRecord | None:
    """A message parsed by dnslib, or None if it is not one."""
    try:
        return DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, struct.error, UnicodeDecodeError):
        return None
    except Exception:   # dnslib raises assorted errors on hostile input; none of them may stop the resolver
        return None


def reply(request: DNSRecord, *, addresses: tuple[str, ...] = (), ptr: str | None = None,
          rcode: int = RCODE.NOERROR, limit: int | None = None) -> bytes:
    """A reply built by dnslib: A records for an A question, a PTR record, an empty answer (a known
    name asked for another type: NOERROR with no records, so the client does not wait), or an error
    code. `limit`: the size a UDP answer must fit in (TC set when it does not)."""
    r = request.reply(ra=1, aa=1)
    r.header.rcode = rcode
    q = request.q
    if rcode == RCODE.NOERROR:
        if q.qtype == QTYPE.A:
            for a in addresses:
                r.add_answer(RR(q.qname, QTYPE.A, rdata=A(a), ttl=TTL))
        elif q.qtype == QTYPE.PTR and ptr:
            r.add_answer(RR(q.qname, QTYPE.PTR, rdata=PTR(ptr + "."), ttl=TTL))
    data = r.pack()
    if limit is not None and len(data) > limit:
        r.rr = []
        r.header.tc = 1
        data = r.pack()
    return data


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """An error answer (SERVFAIL, REFUSED, FORMERR) to a message dnslib can read, else None."""
    req = parse(data)
    if req is None or req.header.qr:
        return None
    return reply(req, rcode=rcode)


def udp_limit(request: DNSRecord) -> int:
    """The largest UDP answer the asker takes: 512, or its EDNS size (at most ours)."""
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_LIMIT, min(EDNS_LIMIT, rr.rclass))
    return UDP_LIMIT

