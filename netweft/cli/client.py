"""A small synchronous client of netweftd's API over its unix socket (quick to import: the CLI stays snappy)."""
from __future__ import annotations

import http.client
import json
import os
import socket
from urllib.parse import quote, urlencode

DEFAULT_HOST = "unix:///run/netweft/netweft.sock"


class ApiError(Exception):
    """The daemon refused the request; str() is its one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DaemonUnreachable(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Client:
    def __init__(self, host: str | None = None, timeout: float | None = 120):
        self.host = host or os.environ.get("NETWEFT_HOST") or DEFAULT_HOST
        if not self.host.startswith("unix://"):
            raise DaemonUnreachable(f"unsupported daemon address {self.host!r}: use unix:///PATH")
        self.path = self.host[len("unix://"):]
        self.timeout = timeout

    def _open(self, method: str, url: str, body: dict | None):
        conn = _UnixConnection(self.path, self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnreachable(
                f"cannot reach netweftd at {self.path}: is it running? Start it with `netweftd &` "
                f"(as root), or point -H/NETWEFT_HOST at a running daemon") from None
        except PermissionError:
            raise DaemonUnreachable(f"permission denied on {self.path}: run as root or as a member "
                                    "of the netweft group") from None
        except TimeoutError:
            raise DaemonUnreachable(f"netweftd at {self.path} did not answer within {self.timeout:g} s; "
                                    "its log may say why") from None
        except (OSError, http.client.HTTPException):  # reset, closed mid-answer: the daemon stopped or crashed
            raise DaemonUnreachable(f"netweftd at {self.path} closed the connection without answering; "
                                    "is it still running? Its log may say why") from None

    @staticmethod
    def _read(conn, resp) -> bytes:
        try:
            return resp.read()
        except TimeoutError:
            raise DaemonUnreachable("netweftd stopped answering in the middle of a reply; its log may say why") from None
        except (OSError, http.client.HTTPException):
            raise DaemonUnreachable("netweftd closed the connection in the middle of a reply; "
                                    "is it still running?") from None
        finally:
            conn.close()

    @staticmethod
    def _error(resp, raw: bytes) -> ApiError:
        try:
            msg = json.loads(raw)["message"]
        except (ValueError, KeyError, TypeError):  # not netweftd's JSON: its text would be some library's
            msg = f"netweftd answered {resp.status} {resp.reason} without an explanation; its log may say more"
        return ApiError(resp.status, str(msg))

    def call(self, method: str, path: str, body: dict | None = None, **query):
        q = {k: v for k, v in query.items() if v is not None}
        url = path + ("?" + urlencode(q) if q else "")
        conn, resp = self._open(method, url, body)
        raw = self._read(conn, resp)
        if resp.status >= 400:
            raise self._error(resp, raw)
        if not raw:
            return None
        if resp.getheader("Content-Type", "").startswith("application/json"):
            try:
                return json.loads(raw)
            except ValueError:
                raise DaemonUnreachable(f"netweftd at {self.path} answered {method} {path} with broken JSON; "
                                        "is something else listening on its socket?") from None
        return raw

    def stream(self, path: str, **query):
        """Yield chunks of a streamed response (logs -f)."""
        q = {k: v for k, v in query.items() if v is not None}
        conn, resp = self._open("GET", path + ("?" + urlencode(q) if q else ""), None)
        try:
            if resp.status >= 400:
                raise self._error(resp, resp.read())
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


def ref(name: str) -> str:
    return quote(name, safe="")
