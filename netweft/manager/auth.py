"""Who may call what on the cluster API, how often and with how much: the guard in front of every route.

Each route declares the roles that may call it, next to its handler (as swarmkit declares them next
to each RPC):

    @routes.post("/heartbeat")
    @allow(WORKER)            # any member node (a manager is a node too)
    async def heartbeat(request): ...

OPEN routes need no certificate (GET /ca, POST /join): they are rate-limited per source address and
take small bodies. WORKER routes are rate-limited per node. MANAGER routes need a manager by both the certificate and the node's current role
in the store, so a demoted manager's old certificate does not keep the role. A route that declares
nothing is refused, whoever calls it.

The guard also remembers which TLS connections belong to which node, so that removing a node closes
them (and its watch stream) at once instead of at their next request.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Callable, TypeVar

from aiohttp import web

from netweft.errors import Forbidden, NetweftError
from netweft.model import codec

log = logging.getLogger("netweft.manager")

T = TypeVar("T")

OPEN, WORKER, MANAGER = "open", "worker", "manager"
_ROLES = (OPEN, WORKER, MANAGER)

OPEN_BODY_LIMIT = 64 * 1024          # a join request is ~1 KiB
BODY_LIMIT = 4 * 1024 * 1024         # authenticated calls: the largest (network create) is a few KiB
OPEN_RATE, OPEN_BURST = 5.0, 20.0    # calls per second per source address on open routes; a join is 2
# Per node on the routes every member may call: each can fan out to every host (an endpoint, a new
# address in a heartbeat). Far above what an agent needs (a heartbeat per period, two calls per attach).
NODE_RATE, NODE_BURST = 50.0, 500.0


class TooLarge(NetweftError):
    status = 413


class TooManyRequests(NetweftError):
    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NoSuchCall(NetweftError):
    """404/405 from the router, in words."""

    def __init__(self, status: int, method: str, path: str):
        super().__init__(f"the cluster API has no call {path}" if status == 404 else
                         f"the cluster API does not take {method} on {path}")
        self.status = status


# ------------------------------------------------------------------ declarations

def allow(*roles: str):
    """Declare who may call the decorated handler: OPEN, or any of WORKER and MANAGER."""
    for r in roles:
        if r not in _ROLES:
            raise ValueError(f"unknown role {r!r}")
    if not roles or (OPEN in roles and len(roles) > 1):
        raise ValueError("declare OPEN alone, or WORKER and/or MANAGER")

    def mark(handler):
        handler.netweft_roles = frozenset(roles)
        return handler
    return mark


def roles_of(handler) -> frozenset[str] | None:
    return getattr(handler, "netweft_roles", None)


def check_role(roles: frozenset[str], cert_role: str, stored_role: str) -> None:
    """Refuse a member that the route does not admit. WORKER admits every member node; MANAGER
    admits a node that is a manager by its certificate and by its current role in the store."""
    if WORKER in roles:
        return
    if MANAGER in roles and cert_role == stored_role == MANAGER:
        return
    if MANAGER in roles and cert_role == MANAGER:
        raise Forbidden("this call needs a manager certificate of a current manager: this node was demoted "
                        "to worker, and its old manager certificate no longer counts")
    raise Forbidden("this call needs a manager certificate; worker certificates reach only agent calls "
                    "(heartbeat, renew, leave, watch, endpoints)")


# ------------------------------------------------------------------ rate limit

class RateLimiter:
    """A token bucket per key (a source address): `burst` calls at once, then `rate` per second.

    Pure logic with an injectable clock. At most `max_keys` buckets are kept: full (idle) buckets
    go first, then the least recently used, so a flood from many addresses cannot grow memory.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when), least recently used first

    def take(self, key: str) -> float:
        """Spend one token: 0.0 if the call may go ahead, else the seconds until it may."""
        now = self.clock()
        tokens, when = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - when) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        for k, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * self.rate >= self.burst:
                del self._buckets[k]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class LogThrottle:
    """At most one log line per key (a peer address, with what it did) per `interval` seconds, so that a stranger cannot
    flood the log: `admit(key)` is None while the key is quiet, else the number of lines held back since
    its last one. Bounded like RateLimiter: the oldest keys go first."""

    def __init__(self, interval: float = 10.0, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.interval, self.max_keys, self.clock = interval, max_keys, clock
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (when it last logged, lines held back since)

    def admit(self, key: str) -> int | None:
        now = self.clock()
        last, held = self._keys.pop(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._keys[key] = (last, held + 1)
            return None
        self._keys[key] = (now, 0)
        while len(self._keys) > self.max_keys:
            del self._keys[next(iter(self._keys))]
        return held


# ------------------------------------------------------------------ bodies

async def read_body(request: web.Request, type_: type[T], empty_ok: bool = False) -> T:
    """The request body decoded into type_ (see netweft.model.codec): one-line 400s naming the field.
    The guard has already refused bodies over the route's limit."""
    data = await request.read()
    if empty_ok and not data.strip():
        data = b"{}"
    return codec.decode(data, type_)


# ------------------------------------------------------------------ the guard

class Admission:
    """The cluster API's middleware: rate limit, roles, body size, and live connections per node.

    `authenticate(request)` (plain or async) returns (identity from the verified certificate, the
    node as stored, its current role in the store), or raises Unauthorized/Forbidden.
    """

    def __init__(self, authenticate, limiter: RateLimiter | None = None, node_limiter: RateLimiter | None = None):
        self.authenticate = authenticate
        self.limiter = limiter if limiter is not None else RateLimiter(OPEN_RATE, OPEN_BURST)
        self.node_limiter = node_limiter if node_limiter is not None else RateLimiter(NODE_RATE, NODE_BURST)
        self._conns: dict[str, set[asyncio.Transport]] = {}
        self.log_throttle = LogThrottle()

    async def _member(self, request: web.Request):
        got = self.authenticate(request)
        return await got if inspect.isawaitable(got) else got

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        peer = request.remote
        limit = BODY_LIMIT
        try:
            match = request.match_info
            if match.http_exception is not None:
                await self._member(request)  # strangers learn nothing about which paths exist
                raise NoSuchCall(match.http_exception.status, request.method, request.path)
            roles = roles_of(match.handler)
            if roles is None:
                raise Forbidden(f"{request.method} {request.path} declares no roles, so nobody may call it")
            if OPEN in roles:
                wait = self.limiter.take(peer or "?")
                if wait:
                    secs = max(1, round(wait))
                    raise TooManyRequests(f"too many unauthenticated calls from {peer}; retry in {secs} s", secs)
                limit = OPEN_BODY_LIMIT
                ident = node = None
            else:
                ident, node, stored_role = await self._member(request)
                check_role(roles, ident.role, stored_role)
                if WORKER in roles:
                    wait = self.node_limiter.take(ident.node_id)
                    if wait:
                        secs = max(1, round(wait))
                        raise TooManyRequests(f"too many calls from node {ident.node_id}; retry in {secs} s", secs)
                self._track(ident.node_id, request.transport)
                limit = BODY_LIMIT
            if request.content_length is not None and request.content_length > limit:
                raise TooLarge(f"request body of {request.content_length} bytes is larger than this call's "
                               f"limit of {limit // 1024} KiB")
            request = request.clone(client_max_size=limit)
            if ident is not None:
                request["ident"], request["node"] = ident, node
            if request.body_exists:
                await request.read()  # a chunked body over the limit stops here
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, peer, TooLarge(f"request body is larger than this call's limit of "
                                                         f"{limit // 1024} KiB"))
        except NetweftError as e:
            return self._refuse(request, peer, e)

    def _refuse(self, request: web.Request, peer: str | None, e: NetweftError) -> web.Response:
        message = str(e).replace("\n", " ")
        # One line per address, route and status per interval: a stranger cannot flood the log (the
        # route, not the path: a path of its own making would be a new key each time).
        route = getattr(request.match_info.route.resource, "canonical", None) if request.match_info.route else None
        held = self.log_throttle.admit(f"{peer} {route or '?'} {e.status}")
        if held is not None:
            log.warning("cluster call refused", extra={"peer": peer, "path": request.path, "status": e.status,
                                                       "reason": message, "not_logged_before": held})
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, TooManyRequests) else None
        return web.json_response({"message": message}, status=e.status, headers=headers)

    # ------------------------------------------------------------ connections
    def _track(self, node_id: str, transport) -> None:
        if transport is None:
            return
        conns = self._conns.setdefault(node_id, set())
        conns -= {t for t in conns if t.is_closing()}
        conns.add(transport)

    def disconnect(self, node_id: str) -> int:
        """Abort every open connection of a node (its watch stream included); returns how many."""
        conns = [t for t in self._conns.pop(node_id, ()) if not t.is_closing()]
        for t in conns:
            t.abort()
        return len(conns)

