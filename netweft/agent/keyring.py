"""This host's WireGuard keys and their make-before-break rotation: pure state, no I/O.

A node has two tunnel addresses (slots 0 and 1). Its key generations alternate between them, so a peer
can hold the old key and the new one side by side, each allowed its own address. A rotation:

  steady     one key, current. When it is `period` old, a new key is made in the other slot:
  announced  both keys published, the old one current: every peer adds the new key (its own address, so
             nothing of the old one changes). After `settle` (the managers took it; the watch carries it to
             every host within milliseconds):
  switched   this host uses the new key and sends encrypted VXLAN from the new slot's address; published so,
             peers move their entries to that address. The old key stays a peer everywhere for `grace`, so
             what was in flight under it still arrives:
  steady     the old key is dropped here and from every peer.

Each step waits until the previous state was published (`published`): a manager that cannot be reached
holds a rotation where it is, never half way on some hosts.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgspec

from netweft.dataplane.wgconf import new_private_key, public_key

DEFAULT_PERIOD = 12 * 3600.0   # as Docker's key rotation
SETTLE = 2.0
GRACE = 10.0


class Key(msgspec.Struct, frozen=True):
    private: str      # base64; stays on this host (in its root-only local store)
    created: float    # wall-clock seconds


class KeyRing(msgspec.Struct, frozen=True, kw_only=True):
    keys: dict[int, Key]          # slot -> key
    current: int
    phase: str = "steady"         # steady | announced | switched
    since: float = 0.0
    published: bool = False

    def public(self) -> list[tuple[str, int, bool]]:
        """(public key, slot, current) of every key, the current first: what the managers are told."""
        return sorted(((public_key(k.private), slot, slot == self.current) for slot, k in self.keys.items()),
                      key=lambda t: not t[2])

    @property
    def private(self) -> str:
        return self.keys[self.current].private


def fresh(now: float, make=new_private_key) -> KeyRing:
    return KeyRing(keys={0: Key(make(), now)}, current=0, phase="steady", since=now)


def may_switch(node_id: str, rotating: list[str]) -> bool:
    """Whether this node may switch to its new key now, given the other ready nodes that list two keys (in a
    rotation). Two hosts switching at the same instant would each meet the other's old key in its first
    handshake, which the other can no longer answer: their packets in that moment would be lost. So switches
    go one at a time, the lowest node ID first (its announce reached the others `settle` before)."""
    return all(node_id < other for other in rotating)


def step(ring: KeyRing, now: float, period: float, settle: float = SETTLE, grace: float = GRACE,
         make=new_private_key, switch_ok: bool = True) -> KeyRing | None:
    """The next state of a rotation, or None when nothing is due (or the switch must wait its turn)."""
    if not ring.published:
        return None
    other = 1 - ring.current
    if ring.phase == "steady":
        if now - ring.keys[ring.current].created >= period:
            keys = {ring.current: ring.keys[ring.current], other: Key(make(), now)}
            return replace_ring(ring, keys=keys, phase="announced", since=now)
    elif ring.phase == "announced":
        if now - ring.since >= settle and other in ring.keys and switch_ok:
            return replace_ring(ring, current=other, phase="switched", since=now)
    elif ring.phase == "switched":
        if now - ring.since >= grace:
            return replace_ring(ring, keys={ring.current: ring.keys[ring.current]}, phase="steady", since=now)
    return None


def replace_ring(ring: KeyRing, **changes) -> KeyRing:
    return msgspec.structs.replace(ring, published=False, **changes)


# ---- a peer host's tunnel, as this host's probes see it ------------------------------------------------

DOWN_AFTER = 3.0    # seconds without an answer through the tunnel before a peer is down


@dataclass
class PeerTunnel:
    """What this host knows of its tunnel to one peer host."""
    state: str = "unknown"        # up | down | unknown
    since: float = 0.0
    reason: str = ""
    last_answer: float | None = None
    first_probe: float | None = None


def verdict(p: PeerTunnel, now: float, *, hostname: str, endpoint: str | None, has_key: bool,
            handshake_age: float | None, port: int) -> tuple[str, str]:
    """(state, reason) of one peer's tunnel from the probe history and WireGuard's own facts."""
    if not has_key:
        return "down", (f"{hostname} has published no WireGuard key (is netweftd running there, with WireGuard "
                        "installed?); its encrypted traffic is dropped")
    if p.last_answer is not None and now - p.last_answer <= DOWN_AFTER:
        return "up", ""
    if p.first_probe is None or now - p.first_probe <= DOWN_AFTER:
        return p.state if p.state != "down" else "unknown", p.reason
    waited = now - (p.last_answer if p.last_answer is not None else p.first_probe)
    where = f"{hostname} ({endpoint})" if endpoint else hostname
    if handshake_age is None:
        hs = "no WireGuard handshake ever"
    else:
        hs = f"last WireGuard handshake {int(handshake_age)} s ago"
    return "down", (f"no answer through the WireGuard tunnel to {where} for {int(waited)} s ({hs}): its encrypted "
                    f"traffic is dropped, never sent in clear; check that UDP {port} passes between the hosts")
