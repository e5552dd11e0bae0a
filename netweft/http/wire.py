"""HTTP/1.1 on the wire: heads and bodies parsed strictly, for the server and the client alike.

Every byte comes from a peer and is hostile until parsed: a request line, a header count or size, a length or
a chunk over its limit, or anything the RFC 9112 grammar does not allow, is a ProtocolError with one line
saying what was wrong and the status to answer with. Nothing lenient: no bare LF, no folded headers, no
Content-Length next to Transfer-Encoding, no transfer coding but chunked (request smuggling lives there).
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

MAX_LINE = 8190          # a request, status or header line (as aiohttp and nginx)
MAX_HEADERS = 100        # header lines in one head
MAX_HEAD = 64 * 1024     # a whole head; also the stream reader's line limit
MAX_CHUNK_LINE = 1024    # a chunk-size line with its extensions
READ = 64 * 1024         # what one read of a body asks for

_METHOD = re.compile(rb"[A-Z]{1,20}")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")          # origin-form only: no absolute URLs, no '*', no spaces
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # no control characters (CR, LF, NUL) inside a value
_VERSION = re.compile(rb"HTTP/1\.([01])")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(rb"[0-9]{1,15}")


class ProtocolError(Exception):
    """The peer broke the protocol: str() is the one line to tell it (or log), status the answer's."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Headers:
    """Header fields in arrival order, looked up without regard to case."""

    def __init__(self, pairs: list[tuple[str, str]] | None = None):
        self._pairs: list[tuple[str, str]] = []
        self._index: dict[str, list[str]] = {}
        for name, value in pairs or ():
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        self._pairs.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._index.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def __getitem__(self, name: str) -> str:
        values = self._index.get(name.lower())
        if not values:
            raise KeyError(name)
        return values[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)


def parse_request_line(line: bytes) -> tuple[str, str, int]:
    """b"GET /path?q HTTP/1.1" -> (method, target, minor version)."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise ProtocolError("bad request line: expected METHOD /path HTTP/1.1")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise ProtocolError("bad request line: the method is not an upper-case word")
    if not _TARGET.fullmatch(target):
        raise ProtocolError("bad request line: the target is not a path starting with /")
    v = _VERSION.fullmatch(version)
    if v is None:
        raise ProtocolError("unsupported HTTP version: only HTTP/1.0 and HTTP/1.1", 505)
    return method.decode(), target.decode(), int(v.group(1))


def parse_status_line(line: bytes) -> tuple[int, int, str]:
    """b"HTTP/1.1 200 OK" -> (minor version, status, reason)."""
    version, _, rest = line.partition(b" ")
    v = _VERSION.fullmatch(version)
    code, _, reason = rest.partition(b" ")
    if v is None or len(code) != 3 or not code.isdigit() or not _VALUE.fullmatch(reason):
        raise ProtocolError("bad status line")
    status = int(code)
    if status < 100:
        raise ProtocolError("bad status line")
    return int(v.group(1)), status, reason.decode("latin-1")


def parse_header_line(line: bytes) -> tuple[str, str]:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise ProtocolError("bad header line: expected NAME: VALUE, NAME a token (no spaces, no folding)")
    value = value.strip(b" \t")
    if not _VALUE.fullmatch(value):
        raise ProtocolError(f"bad header {name.decode()}: control characters in its value")
    return name.decode(), value.decode("latin-1")


def body_framing(headers: Headers, request: bool) -> tuple[str, int]:
    """How the body after this head is delimited: ("length", n), ("chunked", 0), or, for a response
    without either, ("close", 0): it runs until the connection closes (a request without either has none)."""
    te = headers.getall("Transfer-Encoding")
    cl = headers.getall("Content-Length")
    if te:
        if cl:
            raise ProtocolError("both Content-Length and Transfer-Encoding: send one of them")
        codings = [c.strip().lower() for v in te for c in v.split(",")]
        if codings != ["chunked"]:
            raise ProtocolError(f"unsupported Transfer-Encoding {', '.join(codings)[:40]!r}: only chunked", 501)
        return "chunked", 0
    if cl:
        values = {c.strip() for v in cl for c in v.split(",")}
        if len(values) != 1:
            raise ProtocolError("conflicting Content-Length values")
        value = values.pop()
        if not _DIGITS.fullmatch(value.encode()):
            raise ProtocolError(f"bad Content-Length {value[:20]!r}: expected a number of bytes")
        return "length", int(value)
    return ("length", 0) if request else ("close", 0)


def keep_alive(minor: int, headers: Headers) -> bool:
    tokens = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    if minor == 0:
        return "keep-alive" in tokens
    return "close" not in tokens


async def read_line(reader: asyncio.StreamReader, limit: int = MAX_LINE) -> bytes | None:
    """One CRLF-ended line without its CRLF; None when the stream ended before any byte of it."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("the stream ended inside a line") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"a line is longer than {limit} bytes", 431) from None
    if len(line) > limit + 2:
        raise ProtocolError(f"a line is longer than {limit} bytes", 431)
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise ProtocolError("a line does not end with CRLF")
    return line[:-2]


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, Headers] | None:
    """(first line, headers) of the next message; None if the stream ended cleanly before it."""
    first = await read_line(reader)
    if first is None:
        return None
    if not first:
        raise ProtocolError("an empty line where a request or status line was expected")
    headers, size = Headers(), len(first)
    while True:
        line = await read_line(reader)
        if line is None:
            raise ProtocolError("the stream ended inside a head")
        if not line:
            return first, headers
        size += len(line) + 2
        if len(headers) >= MAX_HEADERS:
            raise ProtocolError(f"more than {MAX_HEADERS} header lines", 431)
        if size > MAX_HEAD:
            raise ProtocolError(f"a head larger than {MAX_HEAD // 1024} KiB", 431)
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("a folded header line (obsolete line folding is not accepted)")
        headers.add(*parse_header_line(line))


class BodyReader:
    """The body of one message, as framed by its head; decoded from chunks where it came in chunks."""

    def __init__(self, reader: asyncio.StreamReader, framing: str, length: int = 0):
        self._reader, self.framing = reader, framing
        self._left = length if framing == "length" else 0   # bytes left of the body or of the current chunk
        self.done = framing == "length" and length == 0
        self.received = 0

    async def read_some(self, n: int = READ) -> bytes:
        """Up to n bytes as they arrive; b"" at the body's end."""
        if self.done:
            return b""
        if self.framing == "chunked" and self._left == 0:
            self._left = await self._chunk_size()
            if self._left == 0:
                await self._trailers()
                self.done = True
                return b""
        want = min(n, self._left) if self.framing != "close" else n
        data = await self._reader.read(want)
        if not data:
            if self.framing == "close":
                self.done = True
                return b""
            raise ProtocolError("the connection closed before the end of the body")
        self.received += len(data)
        if self.framing != "close":
            self._left -= len(data)
            if self._left == 0:
                if self.framing == "length":
                    self.done = True
                else:
                    try:
                        end = await self._reader.readexactly(2)
                    except asyncio.IncompleteReadError:
                        raise ProtocolError("the connection closed before the end of the body") from None
                    if end != b"\r\n":
                        raise ProtocolError("a chunk is not followed by CRLF")
        return data

    async def read_all(self, limit: int) -> bytes:
        """The whole body; a ProtocolError 413 once it is larger than limit bytes."""
        if self.framing == "length" and self._left > limit:
            raise ProtocolError(f"a body larger than {limit} bytes", 413)
        out = bytearray()
        while chunk := await self.read_some():
            out += chunk
            if len(out) > limit:
                raise ProtocolError(f"a body larger than {limit} bytes", 413)
        return bytes(out)

    async def _chunk_size(self) -> int:
        line = await read_line(self._reader, MAX_CHUNK_LINE)
        if line is None:
            raise ProtocolError("the connection closed before the end of the body")
        size = line.split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size):
            raise ProtocolError("bad chunk size: expected hexadecimal digits")
        return int(size, 16)

    async def _trailers(self) -> None:
        for _ in range(MAX_HEADERS + 1):
            line = await read_line(self._reader)
            if line is None:
                raise ProtocolError("the connection closed inside the trailers")
            if not line:
                return
            parse_header_line(line)
        raise ProtocolError(f"more than {MAX_HEADERS} trailer lines", 431)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"
