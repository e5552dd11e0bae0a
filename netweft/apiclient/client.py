"""A small synchronous client of netweftd's API over its unix socket.

Quick to import on purpose: every `netweft` command pays for what this module imports, and the hot ones
(`ps`, `network ls`) take less time in the daemon than Python takes to import `http.client` and `socket`
(tens of ms). So a request is one HTTP/1.1 exchange written by hand on a `_socket` (C, no imports);
`http.client` is loaded only to stream (`logs -f`).
"""
from __future__ import annotations

import _socket
from netweft.apiclient import leanjson as json
import os

DEFAULT_HOST = "unix:///run/netweft/netweft.sock"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


class ApiError(Exception):
    """The daemon refused the request; str() is its one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DaemonUnreachable(Exception):
    pass


class _Reply:
    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


def _dechunk(data: bytes) -> bytes | None:
    """The body of a chunked transfer; None if it is cut short."""
    out, i = [], 0
    while True:
        eol = data.find(b"\r\n", i)
        if eol < 0:
            return None
        try:
            size = int(data[i:eol].split(b";", 1)[0], 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(out)
        start = eol + 2
        if len(data) < start + size:
            return None
        out.append(data[start:start + size])
        i = start + size + 2


class Client:
    def __init__(self, host: str | None = None, timeout: float | None = 120):
        self.host = host or os.environ.get("NETWEFT_HOST") or DEFAULT_HOST
        if not self.host.startswith("unix://"):
            raise DaemonUnreachable(f"unsupported daemon address {self.host!r}: use unix:///PATH")
        self.path = self.host[len("unix://"):]
        self.timeout = timeout

    # ------------------------------------------------------------ the exchange
    def _unreachable(self, e: OSError) -> DaemonUnreachable:
        if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
            return DaemonUnreachable(
                f"cannot reach netweftd at {self.path}: is it running? Start it with `netweftd &` "
                f"(as root), or point -H/NETWEFT_HOST at a running daemon")
        if isinstance(e, PermissionError):
            return DaemonUnreachable(f"permission denied on {self.path}: run as root or as a member "
                                     "of the netweft group")
        if isinstance(e, TimeoutError):
            return DaemonUnreachable(f"netweftd at {self.path} did not answer within {self.timeout:g} s; "
                                     "its log may say why")
        return DaemonUnreachable(f"netweftd at {self.path} closed the connection without answering; "
                                 "is it still running? Its log may say why")

    def _exchange(self, method: str, url: str, body: dict | None) -> _Reply:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {url} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        elif method in ("POST", "PUT", "DELETE"):
            head += "Content-Length: 0\r\n"
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                s.sendall(head.encode() + b"\r\n" + data)
            except OSError as e:
                raise self._unreachable(e) from None
            buf, end, length, chunks, got = b"", -1, None, [], 0
            while length is None or got < length:
                try:
                    piece = s.recv(65536)
                except OSError as e:
                    if end < 0:
                        raise self._unreachable(e) from None
                    if isinstance(e, TimeoutError):
                        raise DaemonUnreachable("netweftd stopped answering in the middle of a reply; "
                                                "its log may say why") from None
                    break
                if not piece:
                    break
                if end < 0:
                    buf += piece
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    headers = self._headers(buf[:end])
                    cl = headers[2].get("content-length")
                    length = int(cl) if cl and cl.isdigit() else None
                    piece = buf[end + 4:]
                chunks.append(piece)
                got += len(piece)
        finally:
            s.close()
        if end < 0:
            raise self._unreachable(OSError())
        status, reason, hdrs = headers
        raw = b"".join(chunks)
        if "chunked" in hdrs.get("transfer-encoding", ""):
            raw = _dechunk(raw)
        elif length is not None:
            raw = raw[:length] if len(raw) >= length else None
        if raw is None:
            raise DaemonUnreachable("netweftd closed the connection in the middle of a reply; is it still running?")
        return _Reply(status, reason, hdrs, raw)

    def _headers(self, head: bytes) -> tuple[int, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not (len(code) == 3 and code.isdigit()):
            raise self._unreachable(OSError())
        hdrs = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                hdrs[k.strip().lower()] = v.strip()
        return int(code), reason, hdrs

    @staticmethod
    def _error(status: int, reason: str, raw: bytes) -> ApiError:
        try:
            msg = json.loads(raw)["message"]
        except (ValueError, KeyError, TypeError):  # not netweftd's JSON: its text would be some library's
            msg = f"netweftd answered {status} {reason} without an explanation; its log may say more"
        return ApiError(status, str(msg))

    def call(self, method: str, path: str, body: dict | None = None, **query):
        url = path + query_string(query)
        reply = self._exchange(method, url, body)
        if reply.status >= 400:
            raise self._error(reply.status, reply.reason, reply.body)
        if not reply.body:
            return None
        if reply.headers.get("content-type", "").startswith("application/json"):
            try:
                return json.loads(reply.body)
            except ValueError:
                raise DaemonUnreachable(f"netweftd at {self.path} answered {method} {path} with broken JSON; "
                                        "is something else listening on its socket?") from None
        return reply.body

    def stream(self, path: str, **query):
        """Yield chunks of a streamed response (logs -f)."""
        import http.client

        conn = _UnixConnection(http.client, self.path, self.timeout)
        try:
            try:
                conn.request("GET", path + query_string(query))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise self._unreachable(e if isinstance(e, OSError) else OSError()) from None
            if resp.status >= 400:
                raise self._error(resp.status, resp.reason, resp.read())
            while True:
                try:
                    chunk = resp.read1(65536)
                except (OSError, http.client.HTTPException):
                    raise DaemonUnreachable("netweftd closed the connection while streaming; "
                                            "is it still running?") from None
                if not chunk:
                    break
                yield chunk
        finally:
            conn.close()


def call_each(client: Client, calls: list[tuple], workers: int = 16) -> list:
    """Client.call for each (method, path, query) at once, `workers` in flight (`rm -f` of thousands);
    the results in order, an ApiError or DaemonUnreachable in place of a failed call's."""
    if len(calls) <= 1:
        workers = 1
    results: list = [None] * len(calls)
    todo = iter(range(len(calls)))

    def work():
        for i in todo:   # a shared iterator: each index goes to one worker (next() holds the GIL)
            method, path, query = calls[i]
            try:
                results[i] = client.call(method, path, **query)
            except (ApiError, DaemonUnreachable) as e:
                results[i] = e
    if workers == 1:
        work()
        return results
    import threading
    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(calls)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _UnixConnection(http_client, path: str, timeout: float | None):
    """An http.client connection to a unix socket (made here so http.client loads only when streaming)."""

    class Conn(http_client.HTTPConnection):
        def connect(self):
            import socket  # http.client reads through socket.socket.makefile; it imported socket already
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if self.timeout is not None:
                self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return Conn("localhost", timeout=timeout)


def quote(s: str) -> str:
    """Percent-encode everything but unreserved characters (urllib.parse.quote(s, safe=''))."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in s.encode())


def query_string(query: dict) -> str:
    q = [(k, v) for k, v in query.items() if v is not None]
    return ("?" + "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in q)) if q else ""


def ref(name: str) -> str:
    return quote(name)
