"""A node's membership of the cluster: joining, heartbeats, certificate renewal, calls to the manager.

Joining never trusts on first use: the manager's CA certificate is fetched over an unverified
TLS connection, checked against the digest in the join token, and only then is the token's
secret sent, over TLS verified against that CA. Afterwards every call is mutual TLS.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
from datetime import datetime, timezone

import aiohttp

from netweft.errors import Forbidden, InvalidRequest, NetweftError, Unavailable
from netweft import pki
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair

log = logging.getLogger("netweft.agent")

CALL_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


def manager_url(addr: str, path: str) -> str:
    host, _, port = addr.rpartition(":")
    return f"https://{host}:{port}{path}"


def parse_manager_addr(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "2377"
    try:
        p = int(port)
        assert 0 < p < 65536
    except (ValueError, AssertionError):
        raise InvalidRequest(f"invalid manager address {text!r}: expected HOST[:PORT]") from None
    return f"{host}:{p}"


async def _request(ctx: ssl.SSLContext | None, method: str, url: str, body: dict | None = None,
                   session: aiohttp.ClientSession | None = None):
    """One call to a manager; errors become one-line NetweftErrors. A given session is kept open."""
    own = session is None
    s = session or aiohttp.ClientSession()
    where = url.split("/")[2]
    try:
        kwargs = {"ssl": ctx} if ctx is not None else {}
        async with s.request(method, url, json=body, timeout=CALL_TIMEOUT, **kwargs) as r:
            if r.status >= 400:
                try:
                    msg = (await r.json())["message"]
                except Exception:
                    msg = (await r.text()).strip() or r.reason
                err = (Forbidden if r.status in (401, 403) else NetweftError)(msg)
                err.status = r.status
                raise err
            if r.content_type == "application/json":
                return await r.json()
            return await r.read()
    except aiohttp.ClientConnectorCertificateError as e:
        raise Unavailable(f"the manager at {where} presented a certificate that this node does "
                          f"not trust (another cluster, or expired): {e.certificate_error}") from None
    except aiohttp.ClientSSLError as e:
        raise Unavailable(f"TLS with the manager at {where} failed: {e}") from None
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        raise Unavailable(f"cannot reach the manager at {where}: {e or 'timed out'}") from None
    finally:
        if own:
            await s.close()


async def fetch_ca(addr: str) -> bytes:
    """The manager's CA certificate, over TLS we cannot verify yet (the caller checks the digest)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return await _request(ctx, "GET", manager_url(addr, "/ca"))


async def join(token: str, addr: str, hostname: str, advertise: str | None, swarm_dir: str) -> dict:
    """Join the cluster at addr; writes the node's key, certificate and the CA into swarm_dir."""
    _, digest, _ = pki.parse_join_token(token)
    ca_pem = await fetch_ca(addr)
    try:
        actual = pki.ca_digest(ca_pem)
    except Exception:
        raise InvalidRequest(f"the manager at {addr} sent something that is not a CA certificate") from None
    if actual != digest:
        raise Forbidden(f"the manager at {addr} does not hold the CA named in the join token (digest mismatch): "
                        "refusing to join and sending nothing; check the token and the manager address")
    key = pki.new_node_key()
    ctx = pki.client_ssl_context(ca_pem)
    resp = await _request(ctx, "POST", manager_url(addr, "/join"),
                          {"Token": token, "CSR": pki.make_csr(key).decode(), "Hostname": hostname,
                           "AdvertiseAddr": advertise})
    cert = resp["Certificate"].encode()
    pki.verify_node_cert(ca_pem, cert)  # the manager must sign with the CA we checked
    os.makedirs(swarm_dir, mode=0o700, exist_ok=True)
    f = files(swarm_dir)
    pki.save_pem(f["ca"], ca_pem)
    pki.save_pem(f["key"], pki.key_to_pem(key), private=True)
    pki.save_pem(f["cert"], cert)
    return resp


class ClusterClient:
    """Mutual-TLS calls to the managers with this node's certificate; one kept-alive session."""

    def __init__(self, swarm_dir: str, managers: list[str]):
        self.dir, self.managers = swarm_dir, managers
        self._session: aiohttp.ClientSession | None = None
        self.expired: str | None = None

    def reset(self) -> None:
        """Drop the session (after a renewal: the next call presents the new certificate)."""
        if self._session is not None:
            asyncio.ensure_future(self._session.close())
        self._session = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            f = files(self.dir)
            ctx = pki.client_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]), pki.load_pem(f["key"]))
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=8))
        return self._session

    async def call(self, method: str, path: str, body: dict | None = None):
        if self.expired:
            raise Unavailable(self.expired)
        last: Exception | None = None
        for addr in self.managers:
            try:
                return await _request(None, method, manager_url(addr, path), body, session=self.session())
            except Unavailable as e:
                last = e
        raise last or Unavailable("no manager address known")

    async def stream(self, path: str, read_timeout: float = 10.0):
        """Yield the JSON lines of a streamed response (the watch); ends when the connection does."""
        if self.expired:
            raise Unavailable(self.expired)
        addr = self.managers[0]
        try:
            async with self.session().get(manager_url(addr, path),
                                          timeout=aiohttp.ClientTimeout(total=None, sock_read=read_timeout,
                                                                        sock_connect=5)) as r:
                if r.status >= 400:
                    msg = (await r.text()).strip()
                    raise (Forbidden if r.status in (401, 403) else NetweftError)(msg)
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line:
                            yield json.loads(line)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
            raise Unavailable(f"watch stream from {addr} ended: {e or 'timed out'}") from None


class NodeAgent:
    """Runs on every member but the leader: heartbeats, renewal, and mutual-TLS calls to the manager."""

    def __init__(self, swarm_dir: str, managers: list[str], advertise: str, period: float,
                 on_event=None):
        self.dir, self.managers, self.advertise, self.period = swarm_dir, managers, advertise, period
        self.on_event = on_event or (lambda kind, info: None)
        self.tasks: list[asyncio.Task] = []
        self.problem: str | None = None  # one line an operator should see (expired, removed, unreachable)
        repair_node_pair(swarm_dir)
        self.role = self.identity().role
        self.client = ClusterClient(swarm_dir, managers)

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
            try:
                resp = await self.call("POST", "/heartbeat", {"Addr": self.advertise})
                if self.problem:
                    log.info("manager reachable again")
                self.problem = None
                self.period = resp.get("Period", self.period)
                if resp.get("Role") and resp["Role"] != self.role:
                    log.info("role changed by a manager; renewing the certificate now",
                             extra={"from": self.role, "to": resp["Role"]})
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
            await asyncio.sleep(self.period)

    async def renew(self) -> None:
        key = pki.new_node_key()
        resp = await self.call("POST", "/renew", {"CSR": pki.make_csr(key).decode()})
        f = files(self.dir)
        cert = resp["Certificate"].encode()
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
