"""netweft.http.wire: HTTP/1.1 heads and bodies parsed strictly; each refusal one line with its status."""
from __future__ import annotations

import asyncio

import pytest

from netweft.http import wire
from netweft.http.wire import BodyReader, Headers, ProtocolError


def stream(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader(limit=wire.MAX_HEAD)
    r.feed_data(data)
    r.feed_eof()
    return r


def head(data: bytes):
    return asyncio.run(_in_loop(lambda: wire.read_head(stream(data))))


async def _in_loop(make):
    return await make()   # a StreamReader is made inside the loop it is read in


def refused(fn, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        r = fn(*args)
        if asyncio.iscoroutine(r):
            asyncio.run(r)
    assert "\n" not in str(e.value)
    return e.value


def refused_async(make) -> ProtocolError:
    return refused(lambda: _in_loop(make))


# ------------------------------------------------------------------ request and status lines
def test_a_request_line_gives_method_target_and_version():
    assert wire.parse_request_line(b"GET /networks?filters=%7B%7D HTTP/1.1") == ("GET", "/networks?filters=%7B%7D", 1)
    assert wire.parse_request_line(b"POST /x HTTP/1.0") == ("POST", "/x", 0)


@pytest.mark.parametrize("line, words, status", [
    (b"GET /x", "expected METHOD /path HTTP/1.1", 400),
    (b"GET  /x HTTP/1.1", "expected METHOD /path HTTP/1.1", 400),
    (b"GET /x HTTP/1.1 extra", "expected METHOD /path HTTP/1.1", 400),
    (b"get /x HTTP/1.1", "method", 400),
    (b"G\x00T /x HTTP/1.1", "method", 400),
    (b"GET http://evil/x HTTP/1.1", "target", 400),
    (b"GET * HTTP/1.1", "target", 400),
    (b"GET /a\x7fb HTTP/1.1", "target", 400),
    (b"GET /\xff HTTP/1.1", "target", 400),
    (b"GET /x HTTP/2.0", "HTTP version", 505),
    (b"GET /x HTTP/1.10", "HTTP version", 505),
    (b"GET /x http/1.1", "HTTP version", 505),
])
def test_a_bad_request_line_is_refused(line, words, status):
    e = refused(wire.parse_request_line, line)
    assert words in str(e) and e.status == status


def test_a_status_line_gives_version_status_and_reason():
    assert wire.parse_status_line(b"HTTP/1.1 404 Not Found") == (1, 404, "Not Found")
    assert wire.parse_status_line(b"HTTP/1.0 200 ") == (0, 200, "")


@pytest.mark.parametrize("line", [b"HTTP/1.1 20 OK", b"HTTP/1.1 abc OK", b"HTTP/3 200 OK", b"HTTP/1.1 099 x",
                                  b"HTTP/1.1 200 O\x00K", b"200 OK"])
def test_a_bad_status_line_is_refused(line):
    assert "bad status line" in str(refused(wire.parse_status_line, line))


# ------------------------------------------------------------------ heads
def test_a_head_is_read_with_its_headers_in_order_and_without_case():
    first, h = head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A:  1 \r\nx-a: 2\r\n\r\nBODY")
    assert first == b"GET / HTTP/1.1"
    assert h.get("HOST") == "x" and h["x-A"] == "1" and h.getall("X-A") == ["1", "2"] and "host" in h
    assert h.items() == [("Host", "x"), ("X-A", "1"), ("x-a", "2")]


def test_a_stream_that_ends_before_a_head_is_no_request():
    assert head(b"") is None


@pytest.mark.parametrize("data, words, status", [
    (b"GET / HTTP/1.1\nHost: x\n\n", "CRLF", 400),
    (b"GET / HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", "CRLF", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", "ended inside a head", 400),
    (b"GET / HTTP/1.1\r\nHost: x", "ended inside a line", 400),
    (b"\r\nGET / HTTP/1.1\r\n\r\n", "empty line", 400),
    (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", "NAME: VALUE", 400),
    (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "NAME: VALUE", 400),
    (b"GET / HTTP/1.1\r\n: x\r\n\r\n", "NAME: VALUE", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "NAME: VALUE", 400),
    (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", "control characters", 400),
    (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", "folded", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", "longer than 8190 bytes", 431),
    (b"GET / HTTP/1.1\r\nA: " + b"a" * 70000 + b"\r\n\r\n", "longer than 8190 bytes", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"A%d: 1\r\n" % i for i in range(101)) + b"\r\n", "more than 100 header", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"A%d: %s\r\n" % (i, b"v" * 8000) for i in range(9)) + b"\r\n",
     "larger than 64 KiB", 431),
])
def test_a_bad_head_is_refused(data, words, status):
    e = refused_async(lambda: wire.read_head(stream(data)))
    assert words in str(e) and e.status == status


# ------------------------------------------------------------------ framing
def h(*pairs) -> Headers:
    return Headers(list(pairs))


def test_framing_by_length_chunks_or_connection_close():
    assert wire.body_framing(h(("Content-Length", "12")), request=True) == ("length", 12)
    assert wire.body_framing(h(("Content-Length", "12"), ("Content-Length", "12")), request=True) == ("length", 12)
    assert wire.body_framing(h(("Transfer-Encoding", "Chunked")), request=True) == ("chunked", 0)
    assert wire.body_framing(h(), request=True) == ("length", 0)
    assert wire.body_framing(h(), request=False) == ("close", 0)


@pytest.mark.parametrize("pairs, words, status", [
    ((("Content-Length", "1"), ("Transfer-Encoding", "chunked")), "both Content-Length and Transfer-Encoding", 400),
    ((("Content-Length", "1"), ("Content-Length", "2")), "conflicting Content-Length", 400),
    ((("Content-Length", "1, 2"),), "conflicting Content-Length", 400),
    ((("Content-Length", "-1"),), "bad Content-Length", 400),
    ((("Content-Length", "+1"),), "bad Content-Length", 400),
    ((("Content-Length", "0x10"),), "bad Content-Length", 400),
    ((("Content-Length", "9" * 16),), "bad Content-Length", 400),
    ((("Content-Length", ""),), "bad Content-Length", 400),
    ((("Transfer-Encoding", "gzip, chunked"),), "only chunked", 501),
    ((("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")), "only chunked", 501),
    ((("Transfer-Encoding", "identity"),), "only chunked", 501),
])
def test_ambiguous_or_unknown_framing_is_refused(pairs, words, status):
    e = refused(wire.body_framing, h(*pairs), True)
    assert words in str(e) and e.status == status


def test_keep_alive_follows_the_version_and_connection_header():
    assert wire.keep_alive(1, h()) and not wire.keep_alive(1, h(("Connection", "Close")))
    assert not wire.keep_alive(0, h()) and wire.keep_alive(0, h(("Connection", "keep-alive")))


# ------------------------------------------------------------------ bodies
def body(data: bytes, framing: str, length: int = 0, limit: int = 1 << 20) -> bytes:
    return asyncio.run(_in_loop(lambda: BodyReader(stream(data), framing, length).read_all(limit)))


def test_bodies_by_length_by_chunks_and_to_the_end():
    assert body(b"hello, next", "length", 5) == b"hello"
    assert body(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT", "chunked") == b"hello, world"
    assert body(b"all of it", "close") == b"all of it"
    assert body(b"", "length", 0) == b""


def test_what_follows_a_body_is_left_for_the_next_message():
    async def go():
        r = stream(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        assert await BodyReader(r, "chunked").read_all(100) == b"abc"
        return await wire.read_head(r)
    assert asyncio.run(go())[0] == b"GET / HTTP/1.1"


@pytest.mark.parametrize("data, framing, length, words, status", [
    (b"abc", "length", 5, "closed before the end of the body", 400),
    (b"3\r\nabc\r\n", "chunked", 0, "closed before the end of the body", 400),
    (b"3\r\nab", "chunked", 0, "closed before the end of the body", 400),
    (b"3\r\nabcX\r\n0\r\n\r\n", "chunked", 0, "not followed by CRLF", 400),
    (b"x\r\nabc\r\n0\r\n\r\n", "chunked", 0, "bad chunk size", 400),
    (b"-3\r\nabc\r\n0\r\n\r\n", "chunked", 0, "bad chunk size", 400),
    (b"\r\nabc\r\n0\r\n\r\n", "chunked", 0, "bad chunk size", 400),
    (b"1000000000000000\r\n", "chunked", 0, "bad chunk size", 400),
    (b"3" + b";x" * 600 + b"\r\nabc\r\n0\r\n\r\n", "chunked", 0, "longer than 1024 bytes", 431),
    (b"0\r\nBad trailer\r\n\r\n", "chunked", 0, "NAME: VALUE", 400),
    (b"0\r\nA: 1\r\n", "chunked", 0, "closed inside the trailers", 400),
    (b"x" * 11, "length", 11, "larger than 10 bytes", 413),
    (b"6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n", "chunked", 0, "larger than 10 bytes", 413),
])
def test_a_bad_or_too_big_body_is_refused(data, framing, length, words, status):
    e = refused_async(lambda: BodyReader(stream(data), framing, length).read_all(10 if status == 413 else 1 << 20))
    assert words in str(e) and e.status == status


def test_a_too_big_length_is_refused_before_any_byte_is_read():
    left = []

    async def go():
        r = stream(b"x" * 5)
        left.append(r)
        return await BodyReader(r, "length", 1 << 40).read_all(1024)
    assert refused_async(go).status == 413 and len(left[0]._buffer) == 5


def test_chunks_are_framed_for_writing():
    assert wire.chunk(b"hello") == b"5\r\nhello\r\n" and wire.chunk(b"") == b""
    assert wire.LAST_CHUNK == b"0\r\n\r\n"
