"""A node's membership of the cluster: joining, heartbeats, certificate renewal, calls to the manager.

Joining never trusts on first use: the manager's CA certificate is fetched over an unverified
TLS connection, checked against the digest in the join token, and only then is the token's
secret sent, over TLS verified against that CA. Afterwards every call is mutual TLS.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from datetime import datetime, timezone

import aiohttp

from netweft.errors import Forbidden, InvalidRequest, NetweftError, Unavailable
from netweft.manager import pki
from netweft.manager.cluster import files

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


async def _request(ctx: ssl.SSLContext, method: str, url: str, body: dict | None = None):
    try:
        async with aiohttp.ClientSession(timeout=CALL_TIMEOUT) as s:
            async with s.request(method, url, json=body, ssl=ctx) as r:
                if r.status >= 400:
                    try:
                        msg = (await r.json())["message"]
                    except Exception:
                        msg = (await r.text()).strip() or r.reason
                    err = {401: Forbidden, 403: Forbidden}.get(r.status, NetweftError)(msg)
                    err.status = r.status
                    raise err
                if r.content_type == "application/json":
                    return await r.json()
                return await r.read()
    except aiohttp.ClientConnectorCertificateError as e:
        raise Unavailable(f"the manager at {url.split('/')[2]} presented a certificate that this node does "
                          f"not trust (another cluster, or expired): {e.certificate_error}") from None
    except aiohttp.ClientSSLError as e:
        raise Unavailable(f"TLS with the manager at {url.split('/')[2]} failed: {e}") from None
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        raise Unavailable(f"cannot reach the manager at {url.split('/')[2]}: {e or 'timed out'}") from None


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


class NodeAgent:
    """Runs on every member but the leader: heartbeats, renewal, and mutual-TLS calls to the manager."""

    def __init__(self, swarm_dir: str, managers: list[str], advertise: str, period: float,
                 on_event=None):
        self.dir, self.managers, self.advertise, self.period = swarm_dir, managers, advertise, period
        self.on_event = on_event or (lambda kind, info: None)
        self.tasks: list[asyncio.Task] = []
        self.problem: str | None = None  # one line an operator should see (expired, removed, unreachable)
        self.role = self.identity().role
        self._ctx: ssl.SSLContext | None = None

    def identity(self) -> pki.NodeIdentity:
        return pki.cert_identity(pki.load_pem(files(self.dir)["cert"]))

    def ctx(self) -> ssl.SSLContext:
        if self._ctx is None:
            f = files(self.dir)
            self._ctx = pki.client_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]),
                                               pki.load_pem(f["key"]))
        return self._ctx

    def check_expiry(self) -> bool:
        ident = self.identity()
        if ident.not_after <= datetime.now(timezone.utc):
            self.problem = (f"this node's certificate expired on {ident.not_after:%Y-%m-%d %H:%M:%S} UTC (the node "
                            "was off for longer than its lifetime); rejoin: `netweft swarm leave --force` then "
                            "`netweft swarm join --token TOKEN MANAGER` with a token from a manager")
            log.error("node certificate expired", extra={"reason": self.problem})
            return False
        return True

    async def call(self, method: str, path: str, body: dict | None = None):
        if self.problem and "expired" in self.problem:
            raise Unavailable(self.problem)
        last: Exception | None = None
        for addr in self.managers:
            try:
                return await _request(self.ctx(), method, manager_url(addr, path), body)
            except Unavailable as e:
                last = e
        raise last or Unavailable("no manager address known")

    def start(self) -> None:
        if not self.check_expiry():
            return
        self.tasks = [asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self._renewals())]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

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
        pki.save_pem(f["key"], pki.key_to_pem(key), private=True)
        pki.save_pem(f["cert"], cert)
        self._ctx = None
        old, self.role = self.role, pki.cert_identity(cert).role
        ident = self.identity()
        log.info("certificate renewed", extra={"not_after": ident.not_after.isoformat(), "role": self.role})
        if old != self.role:
            self.on_event("role", {"role": self.role})

    async def _renewals(self) -> None:
        while True:
            ident = self.identity()
            at = pki.renewal_time(ident.not_before, ident.not_after, random)
            await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))
            try:
                await self.renew()
            except NetweftError as e:
                log.warning("certificate renewal failed; retrying", extra={"reason": str(e)})
                await asyncio.sleep(min(30.0, self.period))
