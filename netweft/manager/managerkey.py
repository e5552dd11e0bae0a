"""The managers' key, which seals the CA keys in the shared store (netweft/pki/sealed.py), rotated (issue 8).
A mixin of Manager (through ha.py).

- `netweft swarm unlock-key --rotate` (Docker's name for the key that guards a manager's secrets; there is
  no autolock here: managers keep the key on disk, 0600) or a manager leaving the managers makes a new key:
  written first as manager.key.next, then the CA keys re-sealed under it in one compare-and-write of CA/root,
  then manager.key replaced. A crash in between leaves a key that opens the store (the old one until the
  write landed, the next one after).
- CA/root names the managers that held the key it is sealed with ("holders"). The leader rotates whenever a
  holder is no longer a manager (demoted, removed): level-triggered, so a rotation that failed is retried.
- Every manager checks that its key opens CA/root whenever CA/root changes (and at start). If it does not,
  it asks the other managers for the key over mutual TLS (GET /managers/key, a current manager's
  certificate required; the answer is checked by opening CA/root with it), and saves it.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from netweft import pki
from netweft.errors import Conflict, InvalidRequest, NetweftError, Unavailable
from netweft.manager import hastore
from netweft.manager.watch import CA, NODES, PRESENCE
from netweft.model import codec
from netweft.pki import sealed
from netweft.pki.nodepair import files
from netweft.store.api import Compare, Put

log = logging.getLogger("netweft.manager")

ROOT = "root"
CHECK_EVERY = 0.5          # seconds between two looks at CA/root for a new seal
FETCH_TIMEOUT = 5.0        # seconds for one manager to answer GET /managers/key
FETCH_RETRY_MAX = 10.0


def opens(key: bytes, rec: dict) -> bool:
    """Whether `key` opens the CA key sealed in the CA/root record."""
    try:
        sealed.unseal(key, "ca-key", rec["key"])
        return True
    except (InvalidRequest, KeyError, TypeError):
        return False


def resealed(rec: dict, key: bytes, ca_key_pem: bytes, store_ca_key_pem: bytes | None, holders: list[str]) -> dict:
    """CA/root with its keys sealed under `key`, held by `holders`."""
    out = {**rec, "key": sealed.seal(key, "ca-key", ca_key_pem), "holders": sorted(holders)}
    if store_ca_key_pem is not None:
        out["store_key"] = sealed.seal(key, "store-ca-key", store_ca_key_pem)
    return out


def stale_holders(rec: dict, managers: set[str]) -> list[str]:
    """The holders of the current key that are no longer managers (a rotation is due when any)."""
    return sorted(set(rec.get("holders", [])) - managers)


class ManagerKey:
    # ------------------------------------------------------------ opening the store's secrets
    async def _manager_key(self, rec: dict) -> bytes:
        """A key that opens CA/root: this manager's, the next one a crashed rotation left, or another manager's."""
        for load in (lambda: sealed.load_key(self.dir), lambda: sealed.load_next_key(self.dir)):
            try:
                key = load()
            except InvalidRequest:
                continue
            if opens(key, rec):
                if key != self._disk_key():
                    sealed.save_key(self.dir, key)
                sealed.drop_next_key(self.dir)
                return key
        return await self._fetch_key(rec)

    def _disk_key(self) -> bytes | None:
        try:
            return sealed.load_key(self.dir)
        except InvalidRequest:
            return None

    async def _fetch_key(self, rec: dict) -> bytes:
        """The key from another manager over mutual TLS; saved once it opens CA/root."""
        f = files(self.dir)
        ctx = pki.client_ssl_context(pki.load_pem(f["ca"]), pki.load_pem(f["cert"]), pki.load_pem(f["key"]))
        others = [n for n in self.state.nodes() if n.role == "manager" and n.id != self.node_id]
        others.sort(key=lambda n: self.state.get(PRESENCE, n.id) is None)   # reachable ones first
        reasons = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as s:
            for n in others:
                addr = n.manager_addr or f"{n.addr}:2377"
                try:
                    async with s.get(f"https://{addr}/managers/key", ssl=ctx) as r:
                        body = await r.read()
                        if r.status != 200:
                            reasons.append(f"{addr}: {r.status}")
                            continue
                    key = sealed.decode_key(codec.decode(body, dict).get("ManagerKey", ""))
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, NetweftError, AttributeError) as e:
                    reasons.append(f"{addr}: {type(e).__name__}")
                    continue
                if opens(key, rec):
                    sealed.save_key(self.dir, key)
                    log.info("manager key received from another manager", extra={"from": addr})
                    return key
                reasons.append(f"{addr}: its key does not open the store either")
        raise Unavailable("this manager's key no longer opens the CA key in the cluster store (it was rotated) and "
                          f"no other manager handed over the new one ({'; '.join(reasons)[:200] or 'none is known'}); "
                          "it retries: start another manager")

    async def _follow_key(self) -> None:
        """Whenever CA/root changes: does this manager's key still open it? If not, fetch the new key."""
        seen, backoff = -1, CHECK_EVERY
        while True:
            await asyncio.sleep(backoff if seen == -2 else CHECK_EVERY)
            rev = self.state.mod_rev(CA, ROOT)
            if rev == seen:
                continue
            rec = self.state.get(CA, ROOT)
            try:
                if rec is not None:
                    await self._manager_key(rec)
                    if rec.get("store_key"):   # the disk copy follows the seal (hastore.renew_offline)
                        hastore.save_sealed_store_ca(self.dir, rec["store_key"])
                seen, backoff = rev, CHECK_EVERY
            except NetweftError as e:
                log.warning("fetching the rotated manager key failed; retrying", extra={"reason": str(e)})
                seen, backoff = -2, min(backoff * 2, FETCH_RETRY_MAX)

    # ------------------------------------------------------------ rotation
    async def rotate_manager_key(self) -> dict:
        """A new key; the CA keys re-sealed under it in one compare-and-write; the other managers fetch it."""
        if not self.ha:
            raise Conflict("this cluster keeps its CA key on its one manager's disk (swarm init without --store "
                           "etcd): there is no managers' key to rotate")
        key = sealed.new_key()
        sealed.save_next_key(self.dir, key)     # before the write: a crash after it still finds this key
        out = {}

        def plan():
            rec = self.state.get(CA, ROOT)
            if rec is None:
                raise Unavailable("the cluster store holds no CA; nothing to re-seal")
            managers = sorted(n.id for n in self.state.nodes() if n.role == "manager")
            new = resealed(rec, key, self.ca.key_pem, self.store_ca.key_pem if self.store_ca else None, managers)
            out["holders"] = managers
            return [Compare(CA, ROOT, self.state.mod_rev(CA, ROOT))], [Put(CA, ROOT, codec.encode(new))], None
        try:
            _, rev = await self.hub.commit(plan)
        except BaseException:
            sealed.drop_next_key(self.dir)
            raise
        sealed.save_key(self.dir, key)
        sealed.drop_next_key(self.dir)
        log.info("manager key rotated: the CA keys are sealed under a new key; the other managers fetch it",
                 extra={"rev": rev, "managers": len(out["holders"])})
        return {"Managers": len(out["holders"])}

    async def _add_holder(self, node_id: str) -> None:
        """A manager that was handed the key (enrolled) holds it: its demotion must rotate it."""
        def plan():
            rec = self.state.get(CA, ROOT)
            if rec is None or node_id in rec.get("holders", []):
                return [], [], None
            # a record from before holders were kept: every manager may hold the key
            held = rec["holders"] if "holders" in rec else [n.id for n in self.state.nodes() if n.role == "manager"]
            new = {**rec, "holders": sorted({*held, node_id})}
            return [Compare(CA, ROOT, self.state.mod_rev(CA, ROOT))], [Put(CA, ROOT, codec.encode(new))], None
        rec = self.state.get(CA, ROOT)
        if rec is not None and node_id not in rec.get("holders", []):
            await self.hub.commit(plan)

    async def rotate_if_held_by_others(self) -> bool:
        """Rotate when a holder of the key is no longer a manager. True if it rotated."""
        rec = self.state.get(CA, ROOT)
        if rec is None:
            return False
        if "holders" not in rec:   # a record from before holders were kept
            await self._add_holder(self.node_id)
            return False
        gone = stale_holders(rec, {n.id for n in self.state.nodes() if n.role == "manager"})
        if not gone:
            return False
        log.info("a manager that held the managers' key left the managers: rotating it", extra={"nodes": gone})
        await self.rotate_manager_key()
        return True

    def key_for_manager(self, node) -> dict:
        """GET /managers/key: this manager's key, only while it opens CA/root (never hand over a stale one)."""
        rec = self.state.get(CA, ROOT)
        key = self._disk_key()
        if rec is None or key is None or not opens(key, rec):
            raise Conflict("this manager does not hold the current managers' key either; ask another manager")
        me = self.state.get(NODES, node.id)
        if me is None or me.role != "manager":
            raise Conflict("only a current manager is handed the managers' key")
        log.info("manager key handed over", extra={"node": node.id})
        return {"ManagerKey": sealed.encode_key(key)}

