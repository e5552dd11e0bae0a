"""An HTTP/1.1 client for a node's calls to the managers: keep-alive connections, TLS, timeouts, streamed bodies.

The names are those of the aiohttp client subset the agent was written against (ClientSession, ClientTimeout,
TCPConnector, the ClientError family), so callers read the same. Answers are parsed by netweft.http.wire as
strictly as requests are: a broken head or body is a ClientPayloadError, never a half-believed answer.
"""
from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from netweft.http import wire
from netweft.http.wire import ProtocolError

MAX_READ = 256 * 1024 * 1024   # a whole answer read at once (read(), json()): a longer one is a broken stream
IDLE = 15.0                    # seconds a kept-alive connection waits in the pool for the next call


class ClientError(Exception):
    pass


class ClientConnectionError(ClientError):
    pass


class ClientOSError(ClientConnectionError, OSError):
    pass


class ClientConnectorError(ClientOSError):
    """The connection could not be made; os_error says why."""

    def __init__(self, where: str, os_error: OSError):
        self.os_error = os_error
        super().__init__(os_error.errno, f"cannot connect to {where}: {os_error.strerror or os_error}")


class ClientSSLError(ClientConnectorError):
    pass


class ClientConnectorCertificateError(ClientSSLError):
    def __init__(self, where: str, certificate_error: ssl.SSLCertVerificationError):
        self.certificate_error = certificate_error
        super().__init__(where, certificate_error)


class ServerConnectionError(ClientConnectionError):
    pass


class ServerDisconnectedError(ServerConnectionError):
    def __init__(self, message: str = "the server closed the connection"):
        super().__init__(message)


class ServerTimeoutError(ServerConnectionError, asyncio.TimeoutError):
    pass


class ClientPayloadError(ClientError):
    pass


@dataclass(frozen=True)
class ClientTimeout:
    """total: the whole call, body included; connect: getting a connection; sock_connect: the TCP and TLS
    handshake; sock_read: the longest wait for the next bytes. None: no limit."""
    total: float | None = None
    connect: float | None = None
    sock_read: float | None = None
    sock_connect: float | None = None


DEFAULT_TIMEOUT = ClientTimeout(total=300, sock_connect=30)


class _Clock:
    def __init__(self, timeout: ClientTimeout):
        self.t = timeout
        self.deadline = time.monotonic() + timeout.total if timeout.total is not None else None

    def left(self, limit: float | None) -> float | None:
        if self.deadline is None:
            return limit
        rest = max(0.0, self.deadline - time.monotonic())
        return rest if limit is None else min(rest, limit)

    async def run(self, aw, limit: float | None, what: str):
        wait = self.left(limit)
        if wait is None:
            return await aw
        try:
            return await asyncio.wait_for(aw, wait)
        except asyncio.TimeoutError:
            raise ServerTimeoutError(f"{what} timed out") from None


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self) -> bool:
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and time.monotonic() - self.idle_since < IDLE)

    def close(self) -> None:
        self.writer.close()


class TCPConnector:
    """Opens connections (TLS with `ssl` for https) and keeps up to `limit` idle ones per server for reuse."""

    def __init__(self, *, ssl: ssl.SSLContext | None = None, limit: int = 100,
                 local_addr: tuple[str, int] | None = None):
        self.ssl, self.limit, self.local_addr = ssl, limit, local_addr
        self._idle: dict[tuple, list[_Conn]] = {}
        self.closed = False

    async def acquire(self, key: tuple, host: str, port: int, ctx: ssl.SSLContext | None,
                      clock: _Clock) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        where = f"{host}:{port}"
        t = clock.t
        limit = t.sock_connect if t.sock_connect is not None else t.connect
        try:
            reader, writer = await clock.run(asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=host if ctx is not None else None, limit=wire.MAX_HEAD,
                local_addr=self.local_addr), limit, "connecting")
        except ssl.SSLCertVerificationError as e:
            raise ClientConnectorCertificateError(where, e) from None
        except ssl.SSLError as e:
            raise ClientSSLError(where, e) from None
        except ServerTimeoutError:
            raise
        except OSError as e:
            raise ClientConnectorError(where, e) from None
        return _Conn(reader, writer), False

    def release(self, key: tuple, conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if self.closed or len(idle) >= self.limit:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def close(self) -> None:
        self.closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class StreamContent:
    """A response body as it arrives."""

    def __init__(self, resp: ClientResponse):
        self._resp = resp

    async def read(self, n: int = -1) -> bytes:
        """n bytes (fewer at the end of the body); with n < 0, the whole body."""
        if n < 0:
            return await self._resp.read()
        out = bytearray()
        while len(out) < n and (data := await self._resp._read_some(n - len(out))):
            out += data
        return bytes(out)

    async def iter_any(self):
        while data := await self._resp._read_some(wire.READ):
            yield data


class ClientResponse:
    def __init__(self, session: ClientSession, key: tuple, conn: _Conn, method: str, status: int, reason: str,
                 headers: wire.Headers, body: wire.BodyReader, keep: bool, clock: _Clock):
        self._session, self._key, self._conn, self.method = session, key, conn, method
        self.status, self.reason, self.headers = status, reason, headers
        self._body, self._keep, self._clock = body, keep, clock
        self.content = StreamContent(self)
        self._whole: bytes | None = None

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "application/octet-stream").split(";")[0].strip().lower()

    async def _read_some(self, n: int) -> bytes:
        if self._conn is None:
            return b""
        try:
            data = await self._clock.run(self._body.read_some(n), self._clock.t.sock_read, "reading the answer")
        except ProtocolError as e:
            self._drop()
            raise ClientPayloadError(f"the answer is broken: {e}") from None
        except ssl.SSLError as e:
            self._drop()
            raise ClientSSLError("the server", e) from None
        except (ServerTimeoutError, asyncio.CancelledError):
            self._drop()
            raise
        except OSError as e:
            self._drop()
            raise ClientOSError(e.errno, e.strerror or str(e)) from None
        if self._body.done:
            self.release()
        return data

    async def read(self) -> bytes:
        if self._whole is None:
            out = bytearray()
            while data := await self._read_some(wire.READ):
                out += data
                if len(out) > MAX_READ:
                    self._drop()
                    raise ClientPayloadError(f"an answer larger than {MAX_READ // (1024 * 1024)} MiB")
            self._whole = bytes(out)
        return self._whole

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", "replace")

    async def json(self):
        data = (await self.read()).strip()
        return jsonlib.loads(data) if data else None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the whole body was read, else closes."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._keep and self._body.done and not self._session.closed:
            self._session.connector.release(self._key, conn)
        else:
            conn.close()

    close = release


class _Call:
    """session.get(...) and friends: `async with` it (released at the end), or await it."""

    def __init__(self, coro):
        self._coro = coro
        self._resp: ClientResponse | None = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self) -> ClientResponse:
        self._resp = await self._coro
        return self._resp

    async def __aexit__(self, *exc) -> None:
        if self._resp is not None:
            self._resp.release()


class ClientSession:
    def __init__(self, *, connector: TCPConnector | None = None, timeout: ClientTimeout = DEFAULT_TIMEOUT):
        self.connector = connector or TCPConnector()
        self.timeout = timeout
        self.closed = False

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed = True
        await self.connector.close()

    def request(self, method: str, url: str, *, json=None, data: bytes | None = None,
                timeout: ClientTimeout | None = None, ssl: ssl.SSLContext | None = None,
                headers: dict | None = None) -> _Call:
        return _Call(self._request(method.upper(), url, json, data, timeout or self.timeout, ssl, headers))

    def get(self, url: str, **kw) -> _Call:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw) -> _Call:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw) -> _Call:
        return self.request("DELETE", url, **kw)

    async def _request(self, method, url, json_body, data, timeout, ctx, extra) -> ClientResponse:
        if self.closed:
            raise ClientConnectionError("the session is closed")
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ClientError(f"unsupported URL {url[:80]!r}: http:// or https:// with a host")
        tls = u.scheme == "https"
        host, port = u.hostname, u.port or (443 if tls else 80)
        if tls and ctx is None:
            ctx = self.connector.ssl or _default_context()
        if not tls:
            ctx = None
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc}", "Accept: */*", "User-Agent: netweft"]
        if json_body is not None:
            data = jsonlib.dumps(json_body).encode()
            lines.append("Content-Type: application/json")
        if data is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(data or b'')}")
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (data or b"")
        key = (host, port, id(ctx) if ctx is not None else None)
        clock = _Clock(timeout)
        for attempt in (1, 2):
            conn, reused = await self.connector.acquire(key, host, port, ctx, clock)
            try:
                conn.writer.write(message)
                await clock.run(conn.writer.drain(), timeout.sock_read, "sending the request")
                head = await clock.run(wire.read_head(conn.reader), timeout.sock_read, "waiting for the answer")
                if head is None:
                    raise ServerDisconnectedError()
                version, status, reason = wire.parse_status_line(head[0])
                headers = head[1]
                if method == "HEAD" or status in (204, 304) or status < 200:
                    framing, length = "length", 0
                else:
                    framing, length = wire.body_framing(headers, request=False)
            except ProtocolError as e:
                conn.close()
                raise ClientPayloadError(f"the answer is broken: {e}") from None
            except ssl.SSLError as e:
                conn.close()
                raise ClientSSLError(f"{host}:{port}", e) from None
            except ServerDisconnectedError:
                conn.close()
                if reused and attempt == 1:
                    continue   # a kept-alive connection the server closed meanwhile: once more on a fresh one
                raise
            except (ServerTimeoutError, asyncio.CancelledError):
                conn.close()
                raise
            except OSError as e:
                conn.close()
                if reused and attempt == 1 and isinstance(e, (ConnectionResetError, BrokenPipeError)):
                    continue
                raise ClientOSError(e.errno, e.strerror or str(e)) from None
            keep = wire.keep_alive(version, headers) and framing != "close"
            body = wire.BodyReader(conn.reader, framing, length)
            resp = ClientResponse(self, key, conn, method, status, reason, headers, body, keep, clock)
            if body.done:
                resp.release()
            return resp
        raise ServerDisconnectedError()   # not reached: the second attempt returns or raises


_DEFAULT_CTX: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    global _DEFAULT_CTX
    if _DEFAULT_CTX is None:
        _DEFAULT_CTX = ssl.create_default_context()
    return _DEFAULT_CTX
