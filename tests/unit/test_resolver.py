"""The host's resolver: name tables, the wire fast path against dnslib, scoping, forwarding and its
limits, hostile input. Real sockets on 127.0.0.1 (the fake data plane's resolver sockets), no kernel."""
from __future__ import annotations

import asyncio
import struct

import pytest
from dnslib import QTYPE, RCODE, DNSRecord, EDNS0

from netweft.dataplane.fake import FakeDataPlane
from netweft.dns import wire
from netweft.dns.forward import Forwarder, question_bytes
from netweft.dns.names import NameRecord, NameTable, build, reverse_name
from netweft.dns.resolver import Resolver, Scope


# ------------------------------------------------------------------ tables

def test_table_answers_per_network_and_scopes_by_the_askers_networks():
    t = NameTable()
    t.set_network("n1", [NameRecord("web", ("198.18.0.2",)), NameRecord("db", ("198.18.0.3",))])
    t.set_network("n2", [NameRecord("web", ("198.18.1.2",)), NameRecord("cache", ("198.18.1.4",))])
    assert t.lookup(["n1"], "web") == ("198.18.0.2",)
    assert t.lookup(["n1"], "cache") is None            # on n2 only: not for an asker on n1
    assert t.lookup(["n1", "n2"], "WEB.") == ("198.18.0.2", "198.18.1.2")
    assert t.lookup(["n3"], "web") is None
    assert t.lookup_ptr(["n2"], reverse_name("198.18.1.4")) == "cache"
    assert t.lookup_ptr(["n1"], reverse_name("198.18.1.4")) is None


def test_table_generation_moves_only_on_change():
    t = NameTable()
    assert t.set_network("n1", [NameRecord("a", ("198.18.0.2",))])
    g = t.generation
    assert not t.set_network("n1", [NameRecord("a", ("198.18.0.2",))])
    assert t.generation == g
    assert t.remove_network("n1") and t.generation == g + 1
    assert not t.remove_network("n1")


def test_build_merges_a_name_given_twice_and_skips_bad_names_and_addresses():
    names = build([NameRecord("svc", ("198.18.0.2",)), NameRecord("SVC", ("198.18.0.3", "198.18.0.2")),
                   NameRecord("x" * 64, ("198.18.0.9",)), NameRecord("bad", ("not-an-ip",)),
                   NameRecord("alias", ("198.18.0.2",), reverse=False)])
    assert names.forward["svc"] == ("198.18.0.2", "198.18.0.3")
    assert "x" * 64 not in names.forward
    assert names.forward["bad"] == ()
    assert names.ptr[reverse_name("198.18.0.2")] == "svc"


# ------------------------------------------------------------------ wire

def _query(name: str, qtype: str = "A", edns: bool = False, qid: int = 4242) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    return bytes(q.pack())


@pytest.mark.parametrize("edns", [False, True])
def test_fast_path_answer_parses_with_dnslib_and_keeps_the_askers_case(edns):
    data = _query("WeB.Example", edns=edns)
    q = wire.read_question(data)
    assert q is not None and q.name == "web.example" and q.qtype == 1 and q.edns == edns
    r = DNSRecord.parse(wire.answer_a(data, q, ("198.18.0.2", "198.18.0.3")))
    assert r.header.id == 4242 and r.header.qr and r.header.aa and r.header.rd and not r.header.tc
    assert str(r.q.qname) == "WeB.Example."
    assert [str(a.rdata) for a in r.rr] == ["198.18.0.2", "198.18.0.3"]
    assert all(a.ttl == wire.TTL for a in r.rr)
    assert bool([a for a in r.ar if a.rtype == QTYPE.OPT]) == edns


def test_fast_path_truncates_what_does_not_fit_in_512_bytes():
    data = _query("many")
    q = wire.read_question(data)
    addrs = tuple(f"198.18.0.{i}" for i in range(1, 101))
    out = wire.answer_a(data, q, addrs)
    r = DNSRecord.parse(out)
    assert len(out) <= 512 and r.header.tc and 0 < len(r.rr) < 100


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 11, b"\x00" * 17,
    _query("a")[:-1],                                         # cut short
    _query("a") + b"junk",                                    # trailing bytes
    bytes([0x12, 0x34, 0x81, 0x00]) + _query("a")[4:],        # a response
    _query("a")[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01",     # compression pointer in the question
    b"\x00\x01\x00\x00\x00\x02" + b"\x00" * 6 + b"\x01a\x00\x00\x01\x00\x01",   # two questions
])
def test_fast_path_leaves_anything_unusual_to_dnslib(data):
    assert wire.read_question(data) is None


def test_parse_never_raises_on_garbage():
    for junk in (b"\xff" * 40, b"\x00\x01" + b"\xff" * 10 + b"\x3f" + b"a" * 10, bytes(range(256))):
        wire.parse(junk)   # None or a record, never an exception


# ------------------------------------------------------------------ the resolver over real sockets

def run_async(body):
    def test():
        asyncio.run(body())
    test.__name__ = body.__name__
    return test


class Upstream(asyncio.DatagramProtocol):
    """A resolver standing in for the host's: knows outside.test, NXDOMAIN for the rest."""

    def __init__(self):
        self.seen: list[str] = []
        self.silent = False

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        req = DNSRecord.parse(data)
        self.seen.append(str(req.q.qname))
        if self.silent:
            return
        r = req.reply()
        if str(req.q.qname).rstrip(".") == "outside.test":
            r.add_answer(*__import__("dnslib").RR.fromZone("outside.test. 60 A 198.18.250.1"))
        else:
            r.header.rcode = RCODE.NXDOMAIN
        self.transport.sendto(r.pack(), addr)


async def _ask(addr, data: bytes, timeout: float = 3.0) -> DNSRecord | None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    class C(asyncio.DatagramProtocol):
        def datagram_received(self, d, a):
            if not fut.done():
                fut.set_result(d)
    tr, _ = await loop.create_datagram_endpoint(C, remote_addr=addr)
    try:
        tr.sendto(data)
        return DNSRecord.parse(await asyncio.wait_for(fut, timeout))
    except asyncio.TimeoutError:
        return None
    finally:
        tr.close()


async def _ask_tcp(addr, data: bytes) -> DNSRecord:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(struct.pack("!H", len(data)) + data)
    size = struct.unpack("!H", await reader.readexactly(2))[0]
    out = DNSRecord.parse(await reader.readexactly(size))
    writer.close()
    return out


async def _make():
    loop = asyncio.get_running_loop()
    up = Upstream()
    up_tr, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=("127.0.0.1", 0))
    port = up_tr.get_extra_info("sockname")[1]
    dp = FakeDataPlane()
    resolver = Resolver(Forwarder(["127.0.0.1"], timeout=0.5, port=port))
    resolver.set_network("n1", [NameRecord("a", ("198.18.0.2",)), NameRecord("b", ("198.18.0.3",))])
    resolver.set_network("n2", [NameRecord("b", ("198.18.1.3",)), NameRecord("c", ("198.18.1.4",))])
    askers = {}
    for key, nets in (("ctr-a", ["n1"]), ("ctr-c", ["n2"])):
        path = f"/run/fake/{key}"
        await dp.create_netns(path)
        udp, tcp = await dp.open_dns_sockets(path)
        await resolver.attach(key, udp, tcp, nets)
        askers[key] = dp.dns_addresses[path]
    return resolver, askers, up


def with_setup(body):
    """Run an async test body with (resolver, askers, upstream), all closed afterwards."""
    def test():
        async def main():
            made = await _make()
            try:
                await body(*made)
            finally:
                made[0].close()
                made[2].transport.close()
        asyncio.run(main())
    test.__name__ = body.__name__
    return test


@with_setup
async def test_names_answer_only_within_shared_networks_and_the_rest_is_forwarded(resolver, askers, up):
    udp_a, _ = askers["ctr-a"]
    udp_c, _ = askers["ctr-c"]
    r = await _ask(udp_a, _query("b"))
    assert [str(x.rdata) for x in r.rr] == ["198.18.0.3"]
    r = await _ask(udp_c, _query("b"))
    assert [str(x.rdata) for x in r.rr] == ["198.18.1.3"]
    # c is on n2 only: a (on n1) does not get it; the query goes to the upstream, which says NXDOMAIN.
    r = await _ask(udp_a, _query("c"))
    assert r.header.rcode == RCODE.NXDOMAIN and not r.rr and "c." in up.seen
    r = await _ask(udp_a, _query("outside.test", qid=777))
    assert r.header.id == 777 and [str(x.rdata) for x in r.rr] == ["198.18.250.1"]


@with_setup
async def test_known_name_other_types_and_reverse_lookups(resolver, askers, up):
    udp_a, tcp_a = askers["ctr-a"]
    r = await _ask(udp_a, _query("a", "AAAA"))
    assert r.header.rcode == RCODE.NOERROR and not r.rr and not up.seen   # NODATA, not forwarded
    r = await _ask(udp_a, _query(reverse_name("198.18.0.2"), "PTR"))
    assert str(r.rr[0].rdata) == "a."
    r = await _ask_tcp(tcp_a, _query("b", qid=9))
    assert r.header.id == 9 and [str(x.rdata) for x in r.rr] == ["198.18.0.3"]


@with_setup
async def test_a_name_change_is_answered_at_once_despite_the_cache(resolver, askers, up):
    udp_a, _ = askers["ctr-a"]
    assert [str(x.rdata) for x in (await _ask(udp_a, _query("b"))).rr] == ["198.18.0.3"]
    resolver.set_network("n1", [NameRecord("a", ("198.18.0.2",)), NameRecord("b", ("198.18.0.7",))])
    assert [str(x.rdata) for x in (await _ask(udp_a, _query("b"))).rr] == ["198.18.0.7"]
    resolver.set_networks("ctr-a", ["n2"])   # the container left n1 for n2
    assert [str(x.rdata) for x in (await _ask(udp_a, _query("c"))).rr] == ["198.18.1.4"]


@with_setup
async def test_silent_upstream_gives_servfail_in_time(resolver, askers, up):
    up.silent = True
    r = await _ask(askers["ctr-a"][0], _query("slow.test"), timeout=3)
    assert r is not None and r.header.rcode == RCODE.SERVFAIL


@with_setup
async def test_hostile_input_gets_no_answer_and_changes_nothing(resolver, askers, up):
    udp_a, tcp_a = askers["ctr-a"]
    g = resolver.table.generation
    for junk in (b"", b"\xff" * 3, bytes(range(256))):
        assert await _ask(udp_a, junk, timeout=0.3) is None
    # A query header with no question: FORMERR, as RFC 1035 has it.
    assert (await _ask(udp_a, b"\x00" * 40)).header.rcode == RCODE.FORMERR
    # A response sent to the resolver is not answered either (no reflection loops).
    resp = DNSRecord.parse(_query("a")).reply().pack()
    assert await _ask(udp_a, resp, timeout=0.3) is None
    assert resolver.table.generation == g and not up.seen
    # ... and it still answers.
    assert (await _ask(udp_a, _query("a"))).rr


@run_async
async def test_forwarder_ignores_answers_from_elsewhere_or_for_another_question():
    loop = asyncio.get_running_loop()
    # An "upstream" that answers with the wrong question, then from a wrong port: both ignored -> None.
    got = []

    class Liar(asyncio.DatagramProtocol):
        def connection_made(self, tr):
            self.tr = tr

        def datagram_received(self, data, addr):
            got.append(data)
            wrong = DNSRecord.parse(data).reply()
            wrong.q.qname = "other.test"
            self.tr.sendto(wrong.pack(), addr)
    tr, _ = await loop.create_datagram_endpoint(Liar, local_addr=("127.0.0.1", 0))
    f = Forwarder(["127.0.0.1"], timeout=0.3, port=tr.get_extra_info("sockname")[1])
    try:
        assert await f.query(_query("x.test")) is None and got
        assert f.in_flight == 0
    finally:
        f.close()
        tr.close()


@run_async
async def test_forwarder_limits_queries_in_flight():
    f = Forwarder(["127.0.0.1"], max_in_flight=0)
    assert await f.query(_query("x.test")) is None
    assert await Forwarder([]).query(_query("x.test")) is None


def test_question_bytes():
    assert question_bytes(_query("AbC")) == b"\x03abc\x00\x00\x01\x00\x01"
    assert question_bytes(b"\x00" * 5) is None


def test_scope_cache_is_bounded():
    from netweft.dns import resolver as mod
    r = Resolver(Forwarder([]))
    r.set_network("n1", [NameRecord(f"n{i}", ("198.18.0.2",)) for i in range(mod.CACHE_ENTRIES + 10)])
    s = Scope(("n1",))
    for i in range(mod.CACHE_ENTRIES + 10):
        assert r.answer(_query(f"n{i}"), s, wire.UDP_LIMIT)
    assert 0 < len(s.cache) <= mod.CACHE_ENTRIES


@run_async
async def test_fake_dataplane_refuses_resolver_sockets_in_a_missing_namespace():
    from netweft.errors import KernelError
    with pytest.raises(KernelError):
        await FakeDataPlane().open_dns_sockets("/run/fake/nope")


def _built_whole(records):
    """The table as it was computed before it was kept group by group: the reference."""
    from netweft.dns.names import MAX_ADDRESSES, _valid_ipv4, _valid_name, normalize
    forward, ptr = {}, {}
    for r in records:
        key = normalize(r.name)
        if not _valid_name(key):
            continue
        addrs = forward.setdefault(key, [])
        for a in r.addresses:
            if a not in addrs and len(addrs) < MAX_ADDRESSES and _valid_ipv4(a):
                addrs.append(a)
                if r.reverse:
                    ptr.setdefault(reverse_name(a), r.name.rstrip("."))
    return {k: tuple(v) for k, v in forward.items()}, ptr


def test_a_network_changed_group_by_group_answers_as_if_built_whole():
    """NetworkNames.update (one endpoint's records at a time) against build over every group in order: random
    groups sharing names, addresses, aliases, reverse flags, bad names and addresses, over many changes."""
    import random

    from netweft.dns.names import NetworkNames
    rnd = random.Random(12)
    names = ["web", "WEB.", "db", "x" * 64, "tasks.web", "a.b"]
    addrs = [f"198.18.0.{i}" for i in range(1, 9)] + ["not-an-ip"]
    table, groups = NetworkNames(), {}
    for step in range(600):
        gid = f"g{rnd.randrange(12)}"
        if rnd.random() < 0.3:
            change = None
        else:
            recs = tuple(NameRecord(rnd.choice(names), tuple(rnd.sample(addrs, rnd.randint(0, 3))),
                                    reverse=rnd.random() < 0.6) for _ in range(rnd.randint(1, 3)))
            change = ((rnd.choice(addrs[:4]), gid), recs)
        before = (dict(table.forward), dict(table.ptr))
        changed = table.update({gid: change})
        if change is None:
            groups.pop(gid, None)
        else:
            groups[gid] = change
        whole = _built_whole(r for _, g in sorted(groups.items(), key=lambda kv: (kv[1][0], kv[0])) for r in g[1])
        assert (table.forward, table.ptr) == whole, step
        assert changed == ((table.forward, table.ptr) != before), step


def test_a_table_updated_by_groups_moves_its_generation_only_on_change_and_drops_an_empty_network():
    t = NameTable()
    web = ((("198.18.0.2", "e1"), (NameRecord("web", ("198.18.0.2",)),)))
    assert t.update_network("n1", {"e1": web})
    g = t.generation
    assert not t.update_network("n1", {"e1": web}) and t.generation == g
    assert t.lookup(["n1"], "web") == ("198.18.0.2",)
    assert t.update_network("n1", {"e2": (("198.18.0.3", "e2"), (NameRecord("web", ("198.18.0.3",)),))})
    assert t.lookup(["n1"], "web") == ("198.18.0.2", "198.18.0.3")
    assert t.update_network("n1", {"e1": None})
    assert t.lookup(["n1"], "web") == ("198.18.0.3",) and t.lookup_ptr(["n1"], reverse_name("198.18.0.2")) is None
    assert t.update_network("n1", {"e2": None}) and t.networks() == []
    assert not t.update_network("n1", {"e3": None})
