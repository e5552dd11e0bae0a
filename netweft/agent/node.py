"""A node's membership of the cluster: joining, heartbeats, certificate renewal, calls to the manager.

Joining never trusts on first use: the manager's CA certificate is fetched over an unverified
TLS connection, checked against the digest in the join token, and only then is the token's
secret sent, over TLS verified against that CA. Afterwards every call is mutual TLS.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import random
import ssl
import time
from datetime import datetime, timezone

import msgspec

from netweft.http import client as http

from netweft.errors import Forbidden, InvalidRequest, NetweftError, Unavailable
from netweft import pki
from netweft.validate import HOSTNAME_RE
from netweft.model import codec
from netweft.model.cluster import HeartbeatAnswer, JoinAnswer, RenewAnswer
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair

log = logging.getLogger("netweft.agent")

CALL_TIMEOUT = http.ClientTimeout(total=15, connect=5)
# With several managers a dead one costs little: connect fast, then try the next.
FAILOVER_TIMEOUT = http.ClientTimeout(total=15, sock_connect=1.5)  # not connect: that counts the wait for a pooled connection
CA_MAX_SIZE = 64 * 1024  # what GET /ca may send back: one certificate is ~1 KiB
WATCH_LINE_MAX = 256 * 1024 * 1024   # one watch line (a snapshot of a big cluster); more is a broken stream
# What a person should know when a manager cannot be reached from a running node.
DATA_PLANE_HINT = "containers keep their networking; retry when it is back"
JOIN_HINT = "check the manager address and that its daemon is running"


def manager_url(addr: str, path: str) -> str:
    host, _, port = addr.rpartition(":")
    return f"https://{host}:{port}{path}"


def parse_manager_addr(text: str) -> str:
    """HOST[:PORT] with HOST an IPv4 address or a hostname: it goes into a URL, so nothing else."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "2377"
    if not port.isdigit() or not 0 < int(port) < 65536 or not HOSTNAME_RE.fullmatch(host):
        raise InvalidRequest(f"invalid manager address {text!r}: expected HOST[:PORT], HOST an IPv4 address "
                             "or a hostname, PORT 1-65535 (default 2377)")
    return f"{host}:{int(port)}"


# A watch line as plain dicts and lists (json.loads gives the same, 3-4x slower: every agent decodes every line
# of its stream). A malformed line raises msgspec.DecodeError, a ValueError, as json.loads would.
_decode_line = msgspec.json.Decoder().decode


class LineSplitter:
    """Splits a byte stream into lines: each byte scanned once (a big snapshot stays linear), a line
    longer than `limit` refused."""

    def __init__(self, limit: int = WATCH_LINE_MAX):
        self.buf, self.limit, self._scanned = bytearray(), limit, 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        lines, start, pos = [], 0, self._scanned
        while (end := self.buf.find(b"\n", pos)) >= 0:
            if end > start:
                lines.append(bytes(self.buf[start:end]))
            start = pos = end + 1
        del self.buf[:start]
        self._scanned = len(self.buf)
        if len(self.buf) > self.limit:
            raise InvalidRequest(f"a watch line is larger than {self.limit // (1024 * 1024)} MiB; "
                                 "the stream is taken again")
        return lines


_ERRNO_WORDS = {errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "no route to host",
                errno.ENETUNREACH: "network unreachable", errno.ETIMEDOUT: "timed out",
                errno.ECONNRESET: "connection reset", errno.EPIPE: "connection reset"}


def unreachable_reason(e: BaseException) -> str:
    """Why a manager could not be reached, in a few words (never the library's text)."""
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, http.ServerDisconnectedError):
        return "it closed the connection"
    if isinstance(e, http.ClientPayloadError):
        return "the connection broke mid-answer"
    os_error = getattr(e, "os_error", None) or (e if isinstance(e, OSError) else None)
    code = getattr(os_error, "errno", None)
    if code in _ERRNO_WORDS:
        return _ERRNO_WORDS[code]
    if code:
        return os.strerror(code).lower()
    return "connection failed"


def _tls_reason(e: BaseException) -> str:
    text = str(e).lower()
    if "alert certificate expired" in text:
        return "it refuses this node's certificate: expired"
    if "alert unknown ca" in text or "alert bad certificate" in text or "certificate required" in text:
        return "it refuses this node's certificate (another cluster's, or none)"
    return "the TLS handshake failed"


async def _request(ctx: ssl.SSLContext | None, method: str, url: str, body: dict | None = None,
                   session: http.ClientSession | None = None, hint: str = DATA_PLANE_HINT,
                   max_size: int | None = None, timeout: http.ClientTimeout | None = None):
    """One call to a manager; errors become one-line NetweftErrors. A given session is kept open."""
    own = session is None
    s = session or http.ClientSession()
    where = url.split("/")[2]
    try:
        kwargs = {"ssl": ctx} if ctx is not None else {}
        async with s.request(method, url, json=body, timeout=timeout or CALL_TIMEOUT, **kwargs) as r:
            if r.status >= 400:
                try:
                    msg = str((await r.json())["message"])
                except Exception:
                    msg = (await r.text()).strip() or r.reason
                err = (Forbidden if r.status in (401, 403) else NetweftError)(" ".join(msg.split()))
                err.status = r.status
                raise err
            if max_size is not None:
                data = await r.content.read(max_size + 1)
                if len(data) > max_size:
                    raise InvalidRequest(f"the manager at {where} sent an answer larger than {max_size // 1024} KiB")
                return data
            if r.content_type == "application/json":
                return await r.json()
            return await r.read()
    except http.ClientConnectorCertificateError as e:
        why = getattr(e.certificate_error, "verify_message", None) or "verification failed"
        raise Unavailable(f"the manager at {where} presented a certificate that this node does "
                          f"not trust (another cluster, or expired): {why}") from None
    except http.ClientSSLError as e:
        raise Unavailable(f"TLS with the manager at {where} failed: {_tls_reason(e)}") from None
    except (http.ClientConnectionError, http.ClientPayloadError, asyncio.TimeoutError) as e:
        raise Unavailable(f"manager {where} is unreachable ({unreachable_reason(e)}); {hint}") from None
    except ValueError:  # a 2xx answer that is not the JSON it claims to be
        raise Unavailable(f"the manager at {where} sent an answer that is not valid JSON") from None
    finally:
        if own:
            await s.close()


async def fetch_ca(addr: str) -> bytes:
    """The manager's CA certificate, over TLS we cannot verify yet (the caller checks the digest)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return await _request(ctx, "GET", manager_url(addr, "/ca"), hint=JOIN_HINT, max_size=CA_MAX_SIZE)


async def join(token: str, addr: str, hostname: str, advertise: str | None, swarm_dir: str) -> dict:
    """Join the cluster at addr; writes the node's key, certificate and the CA into swarm_dir."""
    _, digest, _ = pki.parse_join_token(token)
    fetched = await fetch_ca(addr)
    # Exactly one certificate, and only that one is hashed, trusted and saved: with a bundle, a
    # man in the middle could append its own CA, pass the digest check and collect the secret.
    try:
        ca_pem = pki.single_ca_certificate(fetched)
    except InvalidRequest as e:
        raise Forbidden(f"the manager at {addr} did not send one CA certificate ({e}): refusing to join and "
                        "sending nothing; check the manager address") from None
    if pki.ca_digest(ca_pem) != digest:
        raise Forbidden(f"the manager at {addr} does not hold the CA named in the join token (digest mismatch): "
                        "refusing to join and sending nothing; check the token and the manager address")
    key = pki.new_node_key()
    ctx = pki.client_ssl_context(ca_pem)
    resp = await _request(ctx, "POST", manager_url(addr, "/join"),
                          {"Token": token, "CSR": pki.make_csr(key).decode(), "Hostname": hostname,
                           "AdvertiseAddr": advertise}, hint=JOIN_HINT)
    answer = codec.convert(resp, JoinAnswer, "join answer from the manager")
    cert = answer.certificate.encode()
    pki.verify_node_cert(ca_pem, cert)  # the manager must sign with the CA we checked
    os.makedirs(swarm_dir, mode=0o700, exist_ok=True)
    f = files(swarm_dir)
    pki.save_pem(f["ca"], ca_pem)
    pki.save_pem(f["key"], pki.key_to_pem(key), private=True)
    pki.save_pem(f["cert"], cert)
    return codec.to_builtins(answer)


class ClusterClient:
    """Mutual-TLS calls to the managers with this node's certificate, over kept-alive sessions.

    Several managers (etcd): the client knows them all (the join answer, then every node event of the
    watch), spreads nodes over them (each starts at the manager its node ID hashes to) and sticks to
    the one that answered last; a manager that does not answer, or answers 503 (no quorum behind it),
    is skipped for the next one at once.

    Whoever renews the node's certificate (NodeAgent for a member, the manager itself on the leader)
    replaces the files; the next call sees the certificate file change and opens a session that
    presents the new pair. Calls and streams already running on the old session finish on it; it is
    closed when the last of them ends.
    """

    def __init__(self, swarm_dir: str, managers: list[str], node_id: str = "", on_managers=None):
        self.dir, self.managers = swarm_dir, list(managers)
        self.on_managers = on_managers or (lambda managers: None)
        self._preferred: str | None = None
        self._spread = int(hashlib.sha256(node_id.encode()).hexdigest()[:8], 16) if node_id else 0
        self._manager_nodes: dict[str, tuple[str, bool]] = {}   # node id -> (cluster API address, ready)
        self._session: http.ClientSession | None = None
        self._stamp: tuple | None = None   # the certificate file the current session was made from
        self._users: dict[http.ClientSession, int] = {}
        self._retired: set[http.ClientSession] = set()
        self.expired: str | None = None

    # ------------------------------------------------------------ which manager
    def prefer(self, addr: str) -> None:
        self._preferred = addr

    def order(self) -> list[str]:
        """The managers in the order to try them: the one that answered last, else this node's share."""
        ms = self.managers
        if not ms:
            return []
        start = ms.index(self._preferred) if self._preferred in ms else self._spread % len(ms)
        return ms[start:] + ms[:start]

    def _skip(self, addr: str) -> None:
        """addr failed: start at the next one from now on."""
        ms = self.order()
        if len(ms) > 1 and ms[0] == addr:
            self._preferred = ms[1]

    def learn(self, message: dict) -> None:
        """Keep the manager list from the watch's node objects (a snapshot's, or node events)."""
        if not isinstance(message, dict):
            return
        nodes: list = []
        if message.get("type") == "snapshot":
            nodes = message.get("nodes") or []
            fresh: dict[str, tuple[str, bool]] = {}
        elif message.get("type") == "events":
            # Events change what is known; before any snapshot, what is known is the list we were given.
            fresh = dict(self._manager_nodes) or {f"addr:{a}": (a, True) for a in self.managers}
            for ev in message.get("events") or ():
                if isinstance(ev, dict) and ev.get("kind") == "node" and isinstance(ev.get("object"), dict):
                    if ev.get("action") == "delete":
                        fresh.pop(str(ev["object"].get("id")), None)
                    else:
                        nodes.append(ev["object"])
            if not nodes and len(fresh) == len(self._manager_nodes):
                return
        else:
            return
        by_addr = any(k.startswith("addr:") for k in fresh)   # managers known only by the address given
        for n in nodes:
            if not isinstance(n, dict):
                continue
            nid, addr, vtep = str(n.get("id", "")), n.get("manager_addr"), n.get("addr")
            if n.get("role") != "manager" and nid not in fresh and not by_addr:
                continue   # a worker that was no manager here: nothing to change (most node events)
            if not (isinstance(addr, str) and addr):
                if not (isinstance(vtep, str) and vtep):
                    continue
                addr = f"{vtep}:2377"
            try:
                addr = parse_manager_addr(addr)
            except InvalidRequest:
                continue
            fresh.pop(f"addr:{addr}", None)
            if n.get("role") == "manager":
                fresh[nid] = (addr, n.get("state") == "ready")
            else:
                fresh.pop(nid, None)
        if not fresh:
            return
        self._manager_nodes = fresh
        managers = sorted({a for a, _ in fresh.values()})
        if managers != sorted(self.managers):
            log.info("managers known", extra={"managers": managers})
            self.managers = managers
            self.on_managers(managers)

    def reset(self) -> None:
        """Make the next call load the node's certificate again (e.g. right after a renewal)."""
        self._stamp = None

    async def close(self) -> None:
        for s in [self._session, *self._retired]:
            if s is not None:
                await s.close()
        self._session, self._stamp = None, None
        self._retired.clear()
        self._users.clear()

    def _cert_stamp(self) -> tuple | None:
        try:
            st = os.stat(files(self.dir)["cert"])
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def session(self) -> http.ClientSession:
        """The session presenting the node's current certificate."""
        stamp = self._cert_stamp()
        if self._session is not None and stamp == self._stamp:
            return self._session
        f = files(self.dir)
        try:
            ctx = pki.client_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]), pki.load_pem(f["key"]))
        except (NetweftError, ssl.SSLError, OSError):
            if self._session is not None:
                return self._session  # caught between a renewal's two writes: the old pair still works
            raise Unavailable(f"cannot load this node's certificate and key from {self.dir}; "
                              "if they are gone, leave and join the swarm again") from None
        old, self._session, self._stamp = self._session, http.ClientSession(
            connector=http.TCPConnector(ssl=ctx, limit=8)), stamp
        if old is not None:
            if self._users.get(old):
                self._retired.add(old)
            else:
                asyncio.ensure_future(old.close())
        return self._session

    def _hold(self) -> http.ClientSession:
        s = self.session()
        self._users[s] = self._users.get(s, 0) + 1
        return s

    def _release(self, s: http.ClientSession) -> None:
        n = self._users.get(s, 1) - 1
        if n > 0:
            self._users[s] = n
            return
        self._users.pop(s, None)
        if s in self._retired:
            self._retired.discard(s)
            asyncio.ensure_future(s.close())

    async def call(self, method: str, path: str, body: dict | None = None):
        if self.expired:
            raise Unavailable(self.expired)
        down: list[tuple[str, str]] = []
        order = self.order()
        for addr in order:
            s = self._hold()
            try:
                result = await _request(None, method, manager_url(addr, path), body, session=s,
                                        timeout=CALL_TIMEOUT if len(order) == 1 else FAILOVER_TIMEOUT)
                self._preferred = addr
                return result
            except NetweftError as e:
                if len(order) == 1 or not (isinstance(e, Unavailable) or getattr(e, "status", 0) == 503):
                    raise
                down.append((addr, str(e)))
                self._skip(addr)
            finally:
                self._release(s)
        if not down:
            raise Unavailable("no manager address known; leave and join the swarm again")
        raise Unavailable("no manager is reachable: " + "; ".join(f"{a}: {why}" for a, why in down))

    async def call_at(self, addr: str, method: str, path: str, body: dict | None = None):
        """One call to the manager at `addr` (HOST:PORT) only, not the first that answers (doctor asks each)."""
        if self.expired:
            raise Unavailable(self.expired)
        s = self._hold()
        try:
            return await _request(None, method, manager_url(addr, path), body, session=s)
        finally:
            self._release(s)

    async def stream(self, path: str, read_timeout: float = 10.0):
        """Yield the JSON lines of a streamed response (the watch); ends when the connection does."""
        if self.expired:
            raise Unavailable(self.expired)
        order = self.order()
        if not order:
            raise Unavailable("no manager address known; leave and join the swarm again")
        addr = order[0]
        several = len(order) > 1
        s = self._hold()
        ok = False
        try:
            async with s.get(manager_url(addr, path),
                             timeout=http.ClientTimeout(total=None, sock_read=min(read_timeout, 5.0) if several
                                                           else read_timeout, sock_connect=2 if several else 5)) as r:
                if r.status >= 400:
                    msg = " ".join((await r.text()).split())
                    try:
                        msg = str(json.loads(msg)["message"])
                    except (ValueError, KeyError, TypeError):
                        pass
                    err = (Forbidden if r.status in (401, 403) else NetweftError)(msg)
                    err.status = r.status
                    raise err
                lines = LineSplitter()
                async for chunk in r.content.iter_any():
                    for line in lines.feed(chunk):
                        message = _decode_line(line)
                        ok = True
                        self._preferred = addr
                        self.learn(message)
                        yield message
        except http.ClientSSLError as e:
            raise Unavailable(f"watch stream from manager {addr}: {_tls_reason(e)}") from None
        except (http.ClientConnectionError, http.ClientPayloadError, asyncio.TimeoutError) as e:
            self._skip(addr)  # the next stream goes to another manager
            raise Unavailable(f"watch stream from manager {addr} ended ({unreachable_reason(e)}); "
                              f"{DATA_PLANE_HINT}") from None
        except NetweftError as e:
            if getattr(e, "status", 0) == 503 or not ok:
                self._skip(addr)
            raise
        finally:
            self._release(s)


class NodeAgent:
    """Runs on every member but the leader: heartbeats, renewal, and mutual-TLS calls to the manager."""

    def __init__(self, swarm_dir: str, managers: list[str], advertise: str, period: float,
                 on_event=None, node_id: str = ""):
        self.dir, self.managers, self.advertise, self.period = swarm_dir, managers, advertise, period
        self.on_event = on_event or (lambda kind, info: None)
        self.tasks: list[asyncio.Task] = []
        self.problem: str | None = None  # one line an operator should see (expired, removed, unreachable)
        repair_node_pair(swarm_dir)
        self.role = self.identity().role
        self.client = ClusterClient(swarm_dir, managers, node_id,
                                    on_managers=lambda ms: self.on_event("managers", {"managers": ms}))

    def identity(self) -> pki.NodeIdentity:
        return pki.cert_identity(pki.load_pem(files(self.dir)["cert"]))

    def check_expiry(self) -> bool:
        ident = self.identity()
        if ident.not_after <= datetime.now(timezone.utc):
            self.problem = (f"this node's certificate expired on {ident.not_after:%Y-%m-%d %H:%M:%S} UTC (the node "
                            "was off for longer than its lifetime); rejoin: `netweft swarm leave --force` then "
                            "`netweft swarm join --token TOKEN MANAGER` with a token from a manager")
            self.client.expired = self.problem
            log.error("node certificate expired", extra={"reason": self.problem})
            return False
        return True

    async def call(self, method: str, path: str, body: dict | None = None):
        return await self.client.call(method, path, body)

    def start(self) -> None:
        if not self.check_expiry():
            return
        self.tasks = [asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self._renewals())]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()

    async def _heartbeats(self) -> None:
        while True:
            started = time.monotonic()
            try:
                resp = codec.convert(await self.call("POST", "/heartbeat", {"Addr": self.advertise}),
                                     HeartbeatAnswer, "heartbeat answer from the manager")
                if self.problem:
                    log.info("manager reachable again")
                self.problem = None
                self.period = resp.period
                if resp.role != self.role:
                    log.info("role changed by a manager; renewing the certificate now",
                             extra={"from": self.role, "to": resp.role})
                    await self.renew()
            except Forbidden as e:
                self.problem = str(e)
                log.error("the manager refuses this node", extra={"reason": str(e)})
                self.on_event("refused", {"reason": str(e)})
                return
            except NetweftError as e:
                if self.problem != str(e):
                    log.warning("heartbeat failed", extra={"reason": str(e)})
                self.problem = str(e)
            # One period from the start of the last one, not from its answer: a manager that answers in
            # seconds (busy) must not stretch the gap past the Down limit (3 periods).
            await asyncio.sleep(max(self.period / 4, self.period - (time.monotonic() - started)))

    async def renew(self) -> None:
        key = pki.new_node_key()
        resp = codec.convert(await self.call("POST", "/renew", {"CSR": pki.make_csr(key).decode()}),
                             RenewAnswer, "renewal answer from the manager")
        f = files(self.dir)
        cert = resp.certificate.encode()
        pki.verify_node_cert(pki.load_pem(f["ca"]), cert)
        save_node_pair(self.dir, pki.key_to_pem(key), cert)
        self.client.reset()
        old, self.role = self.role, pki.cert_identity(cert).role
        ident = self.identity()
        log.info("certificate renewed", extra={"not_after": ident.not_after.isoformat(), "role": self.role})
        if old != self.role:
            self.on_event("role", {"role": self.role})

    async def _renewals(self) -> None:
        while True:
            ident = self.identity()
            # not_before is backdated by CLOCK_SKEW; the lifetime runs from the signing time.
            at = pki.renewal_time(ident.not_before + pki.CLOCK_SKEW, ident.not_after, random)
            await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))
            try:
                await self.renew()
            except Forbidden as e:
                log.error("the manager refuses to renew this node's certificate; renewals stop",
                          extra={"reason": str(e)})
                return
            except NetweftError as e:
                log.warning("certificate renewal failed; retrying", extra={"reason": str(e)})
                await asyncio.sleep(min(30.0, self.period))
