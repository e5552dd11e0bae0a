"""An HTTP/1.1 server for netweftd's sockets: routes, middlewares, JSON and streamed answers.

The names and shapes are those of the aiohttp.web subset the daemon was written against (Application,
RouteTableDef, Request, Response, StreamResponse, json_response, HTTPException, AppRunner, UnixSite,
TCPSite), so a handler reads the same; what it does not use does not exist here. A request the parser
refuses (netweft.http.wire) is answered with its status and {"message": one line}, and the connection closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote

from netweft.http import wire
from netweft.http.wire import Headers, ProtocolError

log = logging.getLogger("netweft.http")

KEEPALIVE = 75.0   # seconds an idle connection is kept open (as aiohttp)
DISCARD_MAX = 64 * 1024 * 1024   # bytes of an unread or refused body read and thrown away
DISCARD_TIME = 10.0              # seconds that may take
REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
           301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout",
           409: "Conflict", 410: "Gone", 411: "Length Required", 413: "Request Entity Too Large", 415:
           "Unsupported Media Type", 422: "Unprocessable Entity", 429: "Too Many Requests", 431:
           "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
Handler = Callable[["Request"], Awaitable["StreamResponse"]]


def reason_of(status: int) -> str:
    return REASONS.get(status, "Unknown")


# ------------------------------------------------------------------ answers
class StreamResponse:
    """An answer written as it goes (chunked): prepare(), write()s, write_eof()."""

    def __init__(self, *, status: int = 200, reason: str | None = None, headers: dict | None = None):
        self.status, self.reason = status, reason or reason_of(status)
        self.headers: dict[str, str] = dict(headers or {})
        self.prepared = False
        self.eof_sent = False
        self._conn: _Connection | None = None
        self._chunked = False

    def _set(self, name: str, value: str) -> None:
        if not any(k.lower() == name.lower() for k in self.headers):
            self.headers[name] = value

    async def prepare(self, request: Request) -> StreamResponse:
        if self.prepared:
            return self
        self._conn = request._conn
        self._chunked = request.version >= 1 and request.method != "HEAD"
        if self._chunked:
            self.headers["Transfer-Encoding"] = "chunked"
        else:
            request._conn.keep = False   # an HTTP/1.0 reader learns the end when the connection closes
        self._set("Content-Type", "application/octet-stream")
        self.prepared = True
        await self._conn.send(self._head(request._conn.keep))
        return self

    def _head(self, keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if not keep:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def write(self, data: bytes) -> None:
        if not self.prepared or self.eof_sent:
            raise RuntimeError("write() before prepare() or after write_eof()")
        if data and not self._conn.head_only:
            await self._conn.send(wire.chunk(data) if self._chunked else data)

    async def write_eof(self, data: bytes = b"") -> None:
        if self.eof_sent:
            return
        if data:
            await self.write(data)
        self.eof_sent = True
        if self._chunked:
            await self._conn.send(wire.LAST_CHUNK)


class Response(StreamResponse):
    """A whole answer: a body (bytes) or text, sent with its Content-Length."""

    def __init__(self, *, body: bytes | None = None, status: int = 200, reason: str | None = None,
                 text: str | None = None, headers: dict | None = None, content_type: str | None = None,
                 charset: str | None = None):
        super().__init__(status=status, reason=reason, headers=headers)
        if text is not None:
            body = text.encode(charset or "utf-8")
            content_type = f"{content_type or 'text/plain'}; charset={charset or 'utf-8'}"
        elif content_type is not None and charset:
            content_type = f"{content_type}; charset={charset}"
        self.body = body or b""
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        elif body is not None:
            self._set("Content-Type", "application/octet-stream")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    async def _send_whole(self, conn: _Connection) -> None:
        self.prepared = self.eof_sent = True
        if self.status in (204, 304) or self.status < 200:
            self.headers = {k: v for k, v in self.headers.items() if k.lower() != "content-type"}
            await conn.send(self._head(conn.keep))
            return
        self.headers["Content-Length"] = str(len(self.body))
        head = self._head(conn.keep)
        await conn.send(head if conn.head_only else head + self.body)


def json_response(data=None, *, status: int = 200, reason: str | None = None, headers: dict | None = None,
                  content_type: str = "application/json", dumps=json.dumps) -> Response:
    return Response(text=dumps(data), status=status, reason=reason, headers=headers, content_type=content_type)


class HTTPException(Response, Exception):
    """Raised by a handler (or the router) to answer with its status."""
    status_code = 500

    def __init__(self, *, reason: str | None = None, text: str | None = None, headers: dict | None = None,
                 content_type: str | None = None):
        status = self.status_code
        Response.__init__(self, status=status, reason=reason, headers=headers, content_type=content_type,
                          text=text if text is not None else f"{status}: {reason or reason_of(status)}")
        Exception.__init__(self, self.reason)


class HTTPBadRequest(HTTPException):
    status_code = 400


class HTTPNotFound(HTTPException):
    status_code = 404


class HTTPMethodNotAllowed(HTTPException):
    status_code = 405


class HTTPRequestEntityTooLarge(HTTPException):
    status_code = 413


# ------------------------------------------------------------------ routes
class Route:
    """METHOD /path/{name}: a template matched segment by segment ({name} is one segment, decoded)."""

    def __init__(self, method: str, path: str, handler: Handler):
        if not path.startswith("/"):
            raise ValueError(f"a route's path starts with /: {path!r}")
        self.method, self.path, self.handler = method.upper(), path, handler
        self.canonical = path
        self.resource = self   # aiohttp's request.match_info.route.resource.canonical
        names = re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", path)
        self.names = names
        self.regex = None
        if names:
            pattern = re.sub(r"\\\{([A-Za-z_][A-Za-z0-9_]*)\\\}", r"(?P<\1>[^{}/]+)", re.escape(path))
            self.regex = re.compile(pattern)


class RouteTableDef(list):
    """Routes declared with decorators: @routes.get("/path")."""

    def route(self, method: str, path: str):
        def register(handler: Handler) -> Handler:
            self.append(Route(method, path, handler))
            return handler
        return register

    def get(self, path: str):
        return self.route("GET", path)

    def post(self, path: str):
        return self.route("POST", path)

    def put(self, path: str):
        return self.route("PUT", path)

    def delete(self, path: str):
        return self.route("DELETE", path)


class MatchInfo(dict):
    def __init__(self, route: Route | None, values: dict[str, str]):
        super().__init__(values)
        self.route = route if route is not None else _NoRoute()


class _NoRoute:
    resource = None


class Router:
    def __init__(self) -> None:
        self._static: dict[str, dict[str, Route]] = {}   # path -> method -> route
        self._dynamic: list[Route] = []

    def add_route(self, method: str, path: str, handler: Handler) -> Route:
        route = Route(method, path, handler)
        if route.regex is None:
            self._static.setdefault(path, {})[route.method] = route
        else:
            self._dynamic.append(route)
        return route

    def add_get(self, path: str, handler: Handler) -> Route:
        return self.add_route("GET", path, handler)

    def resolve(self, method: str, raw_path: str) -> tuple[Route | None, dict[str, str], int]:
        """(route, values, 0), or (None, {}, 404 or 405)."""
        look = "GET" if method == "HEAD" else method
        found_path = False
        static = self._static.get(unquote(raw_path))
        if static is not None:
            found_path = True
            if look in static:
                return static[look], {}, 0
        for route in self._dynamic:
            m = route.regex.fullmatch(raw_path)
            if m is None:
                continue
            found_path = True
            if route.method == look:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}, 0
        return None, {}, 405 if found_path else 404


def middleware(fn):
    """A middleware: async fn(request, handler) -> response (the outermost is the first in the list)."""
    fn.__middleware_version__ = 1
    return fn


class Application:
    def __init__(self, *, middlewares=(), client_max_size: int = 1024 ** 2):
        self.middlewares = list(middlewares)
        self.router = Router()
        self.client_max_size = client_max_size

    def add_routes(self, routes) -> None:
        for r in routes:
            self.router.add_route(r.method, r.canonical, r.handler)

    async def _handle(self, request: Request) -> StreamResponse:
        route, values, refused = self.router.resolve(request.method, request.raw_path)
        request.match_info = MatchInfo(route, values)
        if route is not None:
            handler: Handler = route.handler
        else:
            async def handler(_request):
                raise HTTPNotFound() if refused == 404 else HTTPMethodNotAllowed()
        for mw in reversed(self.middlewares):
            handler = _bind(mw, handler)
        return await handler(request)


def _bind(mw, inner: Handler) -> Handler:
    async def call(request):
        return await mw(request, inner)
    return call


# ------------------------------------------------------------------ requests
class URL:
    def __init__(self, raw_path: str, raw_query: str):
        self.raw_path, self.raw_query_string = raw_path, raw_query
        self.path = unquote(raw_path)


class Request:
    def __init__(self, conn: _Connection, method: str, target: str, version: int, headers: Headers,
                 body: wire.BodyReader, app: Application):
        self._conn, self.method, self.version, self.headers, self._body, self.app = \
            conn, method, version, headers, body, app
        raw_path, _, raw_query = target.partition("?")
        self.raw_path = raw_path
        self.rel_url = URL(raw_path, raw_query)
        self.path = self.rel_url.path
        self.match_info: MatchInfo = MatchInfo(None, {})
        self._query: dict[str, str] | None = None
        self._read: bytes | None = None

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters (the first value of a repeated one)."""
        if self._query is None:
            q: dict[str, str] = {}
            for k, v in parse_qsl(self.rel_url.raw_query_string, keep_blank_values=True):
                q.setdefault(k, v)
            self._query = q
        return self._query

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.writer.transport

    @property
    def can_read_body(self) -> bool:
        return not self._body.done

    @property
    def body_exists(self) -> bool:
        return self._body.framing == "chunked" or not self._body.done or self._body.received > 0

    async def read(self) -> bytes:
        """The whole body (at most the app's client_max_size bytes: more is a 413)."""
        if self._read is None:
            if self.version >= 1 and (self.headers.get("Expect") or "").lower() == "100-continue" \
                    and not self._body.done and self._body.received == 0:
                await self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")   # curl waits for it before a big body
            try:
                self._read = await self._body.read_all(self.app.client_max_size)
            except ProtocolError as e:
                self._conn.keep = False   # the rest of the body is not read: the connection cannot go on
                if e.status == 413:
                    raise HTTPRequestEntityTooLarge() from None
                raise HTTPBadRequest(reason=str(e)) from None
        return self._read

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", "replace")

    async def json(self):
        return json.loads(await self.read())


# ------------------------------------------------------------------ connections
class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app: Application):
        self.reader, self.writer, self.app = reader, writer, app
        self.keep = True
        self.head_only = False
        self.busy = False

    async def send(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.writer.write(data)
        await self.writer.drain()

    async def serve(self) -> None:
        try:
            while self.keep:
                try:
                    head = await asyncio.wait_for(wire.read_head(self.reader), KEEPALIVE)
                except (asyncio.TimeoutError, ConnectionError):
                    return
                if head is None:
                    return
                self.busy = True
                try:
                    first, headers = head
                    method, target, version = wire.parse_request_line(first)
                    framing, length = wire.body_framing(headers, request=True)
                except ProtocolError as e:
                    await self._refuse(e)
                    return
                self.keep = wire.keep_alive(version, headers)
                self.head_only = method == "HEAD"
                body = wire.BodyReader(self.reader, framing, length)
                request = Request(self, method, target, version, headers, body, self.app)
                await self._answer(request)
                if not body.done and not await self._discard(body):
                    self.keep = False
                self.busy = False
        except ProtocolError as e:
            await self._refuse(e)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writer.close()

    async def _discard(self, body: wire.BodyReader) -> bool:
        """Read what the handler left of the body (a refused one too: a client still sending it would see its
        connection reset before it reads the answer), within bounds; whether the connection can go on."""
        try:
            async with asyncio.timeout(DISCARD_TIME):
                while body.received < DISCARD_MAX and await body.read_some():
                    pass
        except (ProtocolError, TimeoutError):
            return False
        return body.done

    async def _answer(self, request: Request) -> None:
        try:
            resp = await self.app._handle(request)
        except HTTPException as e:
            resp = e
        except (ConnectionError, asyncio.CancelledError):
            raise
        except ProtocolError:
            raise
        except Exception:
            log.exception("request failed", extra={"path": request.path})
            resp = Response(status=500, text="500: Internal Server Error")
        if isinstance(resp, Response) and not resp.prepared:
            await resp._send_whole(self)
            return
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write_eof()

    async def _refuse(self, e: ProtocolError) -> None:
        log.debug("HTTP request refused", extra={"reason": str(e), "status": e.status})
        self.keep = False
        body = json.dumps({"message": str(e)}).encode()
        head = (f"HTTP/1.1 {e.status} {reason_of(e.status)}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            await self.send(head + body)
        except ConnectionError:
            pass


# ------------------------------------------------------------------ serving
class AppRunner:
    """Serves one application on its sites; cleanup() stops them, letting running requests finish a moment."""

    def __init__(self, app: Application, *, access_log=None, handle_signals: bool = False,
                 shutdown_timeout: float = 2.0):
        self.app, self.shutdown_timeout = app, shutdown_timeout
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: dict[asyncio.Task, _Connection] = {}

    async def setup(self) -> None:
        pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(reader, writer, self.app)
        task = asyncio.current_task()
        self.connections[task] = conn
        try:
            await conn.serve()
        finally:
            self.connections.pop(task, None)

    async def cleanup(self) -> None:
        for server in self.servers:
            server.close()
        self.servers.clear()
        idle = [t for t, c in self.connections.items() if not c.busy]
        for t in idle:
            t.cancel()
        busy = [t for t, c in self.connections.items() if c.busy]
        if busy:
            await asyncio.wait(busy, timeout=self.shutdown_timeout)
        rest = list(self.connections)
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


class UnixSite:
    def __init__(self, runner: AppRunner, path: str, *, shutdown_timeout: float | None = None):
        self.runner, self.path = runner, path

    async def start(self) -> None:
        self.runner.servers.append(await asyncio.start_unix_server(self.runner._client, self.path,
                                                                   limit=wire.MAX_HEAD))


class TCPSite:
    def __init__(self, runner: AppRunner, host: str, port: int, *, shutdown_timeout: float | None = None):
        self.runner, self.host, self.port = runner, host, port

    async def start(self) -> None:
        self.runner.servers.append(await asyncio.start_server(self.runner._client, self.host, self.port,
                                                              limit=wire.MAX_HEAD, reuse_address=True))
