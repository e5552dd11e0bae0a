"""Node certificates already verified, so that a call does not verify its caller's certificate again.

Every call on the cluster API names its caller by its TLS client certificate. Checking that certificate
against the CA (a signature check in Python) on every call cost the manager a sixth of its time with a
thousand agents heartbeating and attaching. A certificate's bytes and the CA's decide the result of that
check; only the clock and the store (revocation, the node's role) change it later. So the identity is
kept per (CA, certificate) and the time window is checked again on each call; revocation and roles are
read from the store on each call by the caller of this cache, as before, so removing a node still cuts
it off at once.

Bounded: at most `max_entries` certificates (the least recently used go first), and a CA change (a
rotation) empties it.
"""
from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable

from netweft import pki

MAX_ENTRIES = 16384   # certificates kept: one per node (two while it renews) for clusters of 10,000 hosts


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _earliest_expiry(ca_pem: bytes) -> datetime:
    from cryptography import x509   # here: the daemon starts without loading cryptography
    try:
        return min(pki.validity(c)[1] for c in x509.load_pem_x509_certificates(bytes(ca_pem)))
    except ValueError:   # unreadable: verify_node_cert says so on every call (nothing is kept then)
        return datetime.min.replace(tzinfo=timezone.utc)


class VerifiedCerts:
    """verify(ca_pem, der) -> pki.NodeIdentity, as pki.verify_node_cert, remembering what passed."""

    def __init__(self, max_entries: int = MAX_ENTRIES, clock: Callable[[], datetime] = _now,
                 verify=pki.verify_node_cert):
        self.max_entries, self.clock, self._verify = max_entries, clock, verify
        self._ca: bytes | None = None
        self._ca_not_after: datetime | None = None
        self._known: OrderedDict[bytes, pki.NodeIdentity] = OrderedDict()
        self.hits = self.misses = 0

    def verify(self, ca_pem: bytes, der: bytes) -> pki.NodeIdentity:
        if ca_pem != self._ca:
            self._known.clear()
            self._ca = bytes(ca_pem)
            self._ca_not_after = _earliest_expiry(ca_pem)
        ident = self._known.get(der)
        if ident is None:
            self.misses += 1
            ident = self._verify(ca_pem, der)   # raises InvalidRequest: nothing is kept
            self._known[bytes(der)] = ident
            if len(self._known) > self.max_entries:
                self._known.popitem(last=False)
            return ident
        # Same bytes, same CA: only the clock can have changed the answer.
        now = self.clock()
        if now < ident.not_before or now > ident.not_after or now > self._ca_not_after:
            del self._known[der]
            return self._verify(ca_pem, der)   # says which window was missed, in verify_node_cert's words
        self.hits += 1
        self._known.move_to_end(der)
        return ident

    def __len__(self) -> int:
        return len(self._known)

