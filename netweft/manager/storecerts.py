"""The managers' etcd certificates (embedded etcd, issue 8): renewed before they expire, and revoked when
their manager is demoted or removed. A mixin of Manager (through ha.py).

- Renewal: each manager signs its own next store certificate with the store CA (every manager holds its
  key, sealed in the store) at 50-80 % of the lifetime, records its serial, then swaps store.pem (one
  rename: certificate and key together). etcd 3.4 reads --cert-file/--key-file at every TLS handshake,
  so its member serves and presents the new certificate from the next connection on, without a restart;
  the manager's own etcd client opens a new channel with it (store/etcd.py renew_credentials).
- Revocation: the store keeps every unexpired serial issued to each manager (CA/store-issued). A node
  that is no longer a manager has its serials moved to the store CRL (CA/store-crl, signed by the store
  CA). Every manager writes that CRL to store-crl.pem, which its etcd member reads at every accepted
  connection (--client-crl-file, --peer-crl-file): a revoked certificate opens no new connection to any
  member. The leader reconciles this every second (level-triggered); a demote or removal does it at once.
  Connections already open stay open (etcd checks at accept): the demoted manager's own member, to which
  its client connects first, leaves the etcd cluster at the same time, which ends those.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

from netweft import pki
from netweft.errors import NetweftError, NotFound
from netweft.manager import hastore, leader
from netweft.manager.watch import CA, NODES
from netweft.model import codec
from netweft.pki import crl as crlmod
from netweft.store.api import Compare, Put

log = logging.getLogger("netweft.manager")

ISSUED, REVOKED = "store-issued", "store-crl"   # keys of the CA kind
RECONCILE_EVERY = 1.0      # seconds between two revocation checks by the leader
CRL_SYNC_EVERY = 0.2       # seconds between two checks of the stored CRL against this host's file
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


# ------------------------------------------------------------------ pure logic

def store_cert_expiry(spec: dict) -> timedelta:
    """A manager's etcd certificate lifetime: the spec's StoreCertExpiry, else the node certificates'."""
    return timedelta(seconds=float(spec.get("StoreCertExpiry") or spec["CertExpiry"]))


def issued_with(issued: dict, node_id: str, serial: int, not_after: str, now: datetime) -> dict:
    """The issued map with one more serial for node_id (expired ones dropped)."""
    out = {k: crlmod.current([(s, t, k) for s, t in v], now) for k, v in issued.items()}
    out = {k: [[s, t] for s, t, _ in v] for k, v in out.items() if v}
    out.setdefault(node_id, [])
    if not any(s == serial for s, _ in out[node_id]):
        out[node_id].append([serial, not_after])
    return out


def revocation_plan(issued: dict, revoked: list, managers: set[str], now: datetime) -> tuple[dict, list] | None:
    """(issued, revoked) after moving every serial of a node that is no longer a manager to the revoked list
    and dropping what expired; None when nothing changes."""
    new_issued: dict[str, list] = {}
    moved: list = []
    for node_id, serials in issued.items():
        live = crlmod.current([(s, t, node_id) for s, t in serials], now)
        if node_id in managers:
            if live:
                new_issued[node_id] = [[s, t] for s, t, _ in live]
        else:
            moved += live
    new_revoked = [list(e) for e in crlmod.current([*map(tuple, revoked), *moved], now)]
    if new_issued == issued and new_revoked == [list(e) for e in revoked]:
        return None
    return new_issued, new_revoked


# ------------------------------------------------------------------ the manager's part

class StoreCerts:
    def _store_tasks(self) -> list[asyncio.Task]:
        if self.store_ca is None:   # an etcd the operator runs: its certificates are the operator's
            return []
        return [asyncio.ensure_future(self._renew_store_cert()), asyncio.ensure_future(self._sync_crl()),
                asyncio.ensure_future(self._reconcile_revocations())]

    async def _record_issued(self, node_id: str, cert_pem: bytes) -> None:
        """Record a store certificate's serial before anyone uses it (a demotion then revokes it). Refused for a
        node that is no longer a manager: its demotion may have revoked its serials already."""
        ident = pki.cert_identity(cert_pem)

        def plan():
            node = self.state.get(NODES, node_id)
            if node is None or node.role != "manager":
                raise NotFound(f"node {node_id} is not a manager: no etcd certificate for it")
            issued = self.state.get(CA, ISSUED) or {}
            new = issued_with(issued, node_id, ident.serial, ident.not_after.isoformat(), datetime.now(timezone.utc))
            return [Compare(CA, ISSUED, self.state.mod_rev(CA, ISSUED))], [Put(CA, ISSUED, codec.encode(new))], None
        await self.hub.commit(plan)

    def sign_store_cert_for(self, node_id: str, csr_pem: bytes, addr: str) -> bytes:
        return hastore.sign_store_cert(self.store_ca, csr_pem, node_id, self.cluster()["id"], addr,
                                       store_cert_expiry(self.spec()))

    async def _renew_store_cert(self) -> None:
        """This manager's etcd certificate (client, server and peer), renewed at 50-80 % of its lifetime."""
        recorded = False
        while True:
            backoff = RETRY_FIRST
            while True:
                try:
                    _, cert, _ = hastore.load_store_pair(self.dir)
                    if not recorded:   # the one made at init (or before an upgrade): on record too
                        await self._record_issued(self.node_id, cert)
                        recorded = True
                    break
                except Exception as e:
                    log.error("reading this manager's etcd certificate failed; retrying",
                              extra={"reason": str(e) or type(e).__name__})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
            ident = pki.cert_identity(cert)
            at = pki.renewal_time(ident.not_before + pki.CLOCK_SKEW, ident.not_after)
            await asyncio.sleep(max(0.0, (at - datetime.now(timezone.utc)).total_seconds()))
            backoff = RETRY_FIRST
            while True:
                try:
                    await self.renew_store_cert()
                    break
                except Exception as e:
                    log.error("renewing this manager's etcd certificate failed; retrying",
                              extra={"reason": str(e) or type(e).__name__, "retry_s": backoff})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)

    async def renew_store_cert(self) -> None:
        """Sign, record, then swap store.pem; then this manager's etcd client presents it on new connections."""
        me = self.state.get(NODES, self.node_id)
        if me is None:
            raise NotFound("this manager is no longer in the cluster")
        key = pki.new_node_key()
        cert = self.sign_store_cert_for(self.node_id, pki.make_csr(key), me.addr)
        await self._record_issued(self.node_id, cert)
        ca_pem = self.store_ca.cert_pem
        hastore.save_store_pair(self.dir, None, cert, pki.key_to_pem(key))
        self.store.renew_credentials(ca_pem, cert, pki.key_to_pem(key))
        ident = pki.cert_identity(cert)
        log.info("etcd certificate renewed", extra={"node": self.node_id, "serial": f"{ident.serial:x}",
                                                    "not_after": ident.not_after.isoformat()})

    # ------------------------------------------------------------ revocation
    async def revoke_store_certs(self) -> int:
        """Move the serials of every node that is no longer a manager to the store CRL (one compare-and-write);
        this host's CRL file is written at once. Returns how many were revoked."""
        out = {"n": 0}
        if self._revocation_plan() is None:   # the usual case: no transaction at all
            return 0

        def plan():
            stored = self.state.get(CA, REVOKED) or {}
            got = self._revocation_plan()
            if got is None:
                out["n"] = 0
                return [], [], None
            new_issued, new_revoked = got
            out["n"] = len({e[0] for e in new_revoked} - {e[0] for e in stored.get("revoked", [])})
            compares = [Compare(CA, ISSUED, self.state.mod_rev(CA, ISSUED)),
                        Compare(CA, REVOKED, self.state.mod_rev(CA, REVOKED))]
            ops = [Put(CA, ISSUED, codec.encode(new_issued))]
            if new_revoked != stored.get("revoked", []) or not stored:   # the CRL itself only when it changes
                pem = crlmod.make_crl(self.store_ca, new_revoked).decode()
                ops.append(Put(CA, REVOKED, codec.encode({"revoked": new_revoked, "pem": pem})))
            return compares, ops, None
        await self.hub.commit(plan)
        self._write_crl()
        if out["n"]:
            log.info("etcd certificates revoked: every etcd member refuses them from the next connection",
                     extra={"certificates": out["n"]})
        return out["n"]

    def _revocation_plan(self) -> tuple[dict, list] | None:
        issued = self.state.get(CA, ISSUED) or {}
        stored = self.state.get(CA, REVOKED) or {}
        managers = {n.id for n in self.state.nodes() if n.role == "manager"}
        return revocation_plan(issued, stored.get("revoked", []), managers, datetime.now(timezone.utc))

    async def _reconcile_revocations(self) -> None:
        await leader.every(RECONCILE_EVERY, self.is_leader, self.revoke_store_certs,
                           "revoking etcd certificates failed; retrying")

    def _write_crl(self) -> bool:
        stored = self.state.get(CA, REVOKED)
        if not stored or not stored.get("pem"):
            return False
        pem = stored["pem"].encode()
        try:
            crlmod.revoked_serials(pem, self.store_ca)   # only a CRL of our store CA reaches etcd
        except NetweftError as e:
            log.error("the store CRL in the cluster store is refused", extra={"reason": str(e)})
            return False
        return hastore.save_crl(self.dir, pem)

    async def _sync_crl(self) -> None:
        """The stored CRL to this host's file, which the etcd member reads per connection."""
        seen = -1
        while True:
            rev = self.state.mod_rev(CA, REVOKED)
            if rev != seen:
                try:
                    if self._write_crl():
                        log.info("store CRL updated on this host", extra={"rev": rev})
                    seen = rev
                except OSError as e:
                    log.error("writing the store CRL failed; retrying", extra={"reason": str(e)})
            await asyncio.sleep(CRL_SYNC_EVERY)

    def store_crl_pem(self) -> str | None:
        stored = self.state.get(CA, REVOKED)
        return stored.get("pem") if stored else None
