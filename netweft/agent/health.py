"""Live data-path health: this host probes every peer host it shares an overlay with, through VXLAN itself.

Each round (every PROBE_INTERVAL) sends each peer one small probe, every BIG_EVERY rounds a full-size one, DF set
(dataplane/probe.py says how they travel: the data path's UDP port, encapsulated as overlay traffic is).
A probe not answered within PROBE_TIMEOUT is lost. From the last results per peer, `assess` (pure) says
healthy, degraded (loss, or an MTU black hole: small probes pass, full-size ones don't) or unreachable
(several in a row lost), with words naming the likely cause. A change is logged once and reported to the
managers (POST /health), which keep it in the Node document; `node ls`, `network inspect` and the
managers' decision to withdraw a dead host's endpoints read it there.

One asyncio task per host, not one per peer: a round is a burst of sends and a dictionary of pending
sequence numbers; answers are matched by the packet socket's reader callback. A host with a thousand
peers then costs one task, a thousand small sends a second and no timers per probe.

The same task answers other hosts' probes (in the reader callback), but only for nodes of the cluster,
and only to the address the managers know for that node: a forged probe never makes us send elsewhere.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from netweft.dataplane import probe as wire
from netweft.dataplane.api import VXLAN_OVERHEAD, DataPlane, ProbeChannel
from netweft.errors import NetweftError, Unavailable
from netweft.model.codec import to_builtins
from netweft.model.objects import Node, PeerHealth

log = logging.getLogger("netweft.agent.health")

PROBE_INTERVAL = 1.0        # seconds between rounds
PROBE_TIMEOUT = 1.0         # an answer later than this is a loss
WINDOW = 5                  # small probes the loss figure is taken over
UNREACHABLE_AFTER = 3       # this many small probes lost in a row: unreachable
BIG_WINDOW = 3              # full-size probes kept
MTU_LOST_AFTER = 2          # this many full-size probes lost in a row, while small ones pass: an MTU problem
DEGRADED_LOSS = 0.2         # share of small probes lost that makes a path degraded
BIG_EVERY = 2               # a full-size probe every this many rounds (a path's MTU rarely changes; they cost bytes)
REPORT_PERIOD = 10.0        # the figures (loss, latency) are sent to the managers at least this often
SMALL = 160                 # bytes of a small probe frame (Ethernet header included; two 64-letter node IDs fit)
RETRY_OPEN = 10.0           # seconds before trying again to open the probe device after a failure


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Verdict:
    state: str
    loss: float
    rtt_ms: float | None
    mtu_ok: bool | None
    reason: str


def median(values: Sequence[float]) -> float:
    """The median (as statistics.median, whose module costs a daemon ≈0.8 MiB for this one function)."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def assess(small: Sequence[float | None], big: Sequence[bool], *, port: int, big_size: int,
           peer_down: bool = False, send_error: str | None = None) -> Verdict:
    """The state of one path from its last results: `small` round trips in ms (None: lost), oldest first;
    `big` whether each full-size probe came back; `big_size` the outer packet's size (the underlay MTU).
    Pure."""
    n = len(small)
    lost = sum(1 for r in small if r is None)
    loss = round(lost / n, 3) if n else 0.0
    rtts = [r for r in small if r is not None]
    rtt = round(median(rtts), 3) if rtts else None
    run = 0
    for r in reversed(small):
        if r is not None:
            break
        run += 1
    big_run = 0
    for ok in reversed(big):
        if ok:
            break
        big_run += 1
    mtu_ok = None if not big else (big_run < MTU_LOST_AFTER if rtts else None)
    if send_error:
        return Verdict("unreachable", loss, rtt, mtu_ok, f"probes cannot leave this host: {send_error}")
    if n < 2:
        return Verdict("unknown", loss, rtt, mtu_ok, "")
    if run >= UNREACHABLE_AFTER:
        if peer_down:
            why = ("no probe comes back and the managers see the host down: the host or its daemon is "
                   "probably down")
        else:
            why = (f"no probe comes back while the managers see the host up: UDP {port} (the data path) is "
                   "probably blocked between the two hosts (a firewall?)")
        return Verdict("unreachable", loss, rtt, None, why)
    if rtts and big_run >= MTU_LOST_AFTER:
        return Verdict("degraded", loss, rtt, False,
                       f"small probes pass but full-size ones ({big_size} bytes on the wire, DF set) are lost: an "
                       "MTU black hole on the path; give every underlay link the same MTU, or lower the overlay MTU "
                       "(-o com.docker.network.driver.mtu=N)")
    # Losses before the first answer of the window are an outage that ended, not a flaky link.
    first_ok = next((i for i, r in enumerate(small) if r is not None), n)
    flaky = sum(1 for r in small[first_ok:] if r is None) / n if n else 0.0
    if flaky >= DEGRADED_LOSS:
        return Verdict("degraded", loss, rtt, mtu_ok, "probes are lost now and then (see the loss figure): a "
                       "congested or faulty link between the hosts")
    return Verdict("healthy", loss, rtt, mtu_ok, "")


class HealthHost(Protocol):
    """What the prober needs from the overlay agent."""
    dp: DataPlane
    node_id: str
    vtep: str
    port: int
    client: object
    nodes: dict[str, Node]

    def probe_targets(self) -> dict[str, str]:
        """node ID -> VTEP of the peer hosts this host shares an overlay with."""

    async def underlay_mtu(self) -> int: ...


PENDING = object()


class Results:
    """The last results of one kind of probe to one peer, in the order the probes were sent (an answer may
    come after a later probe's): seq -> PENDING, then a round trip (float) or a loss (None)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.slots: dict[int, object] = {}

    def sent(self, seq: int) -> None:
        self.slots[seq] = PENDING

    def resolve(self, seq: int, value) -> None:
        if seq in self.slots:
            self.slots[seq] = value
        resolved = [k for k, v in self.slots.items() if v is not PENDING]
        for k in resolved[:max(0, len(resolved) - self.keep)]:
            del self.slots[k]

    def values(self) -> list:
        return [v for v in self.slots.values() if v is not PENDING]


@dataclass
class PathRecord:
    vtep: str
    small: Results = field(default_factory=lambda: Results(WINDOW))
    big: Results = field(default_factory=lambda: Results(BIG_WINDOW))
    send_error: str | None = None
    health: PeerHealth = field(default_factory=PeerHealth)


class Prober:
    def __init__(self, host: HealthHost, interval: float = PROBE_INTERVAL, timeout: float = PROBE_TIMEOUT):
        self.host, self.interval, self.timeout = host, interval, timeout
        self.channel: ProbeChannel | None = None
        self.paths: dict[str, PathRecord] = {}
        self._pending: dict[int, tuple[str, int, bool, asyncio.Future | None]] = {}   # seq -> node, sent, big, waiter
        self._seq = 0
        self._rounds = 0
        self._big = SMALL
        self._dirty = False
        self._reported_at = 0.0
        self._task: asyncio.Task | None = None
        self._reporting: asyncio.Task | None = None
        self._open_failed = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        for t in (self._task, self._reporting):
            if t is not None:
                t.cancel()
        await asyncio.gather(*(t for t in (self._task, self._reporting) if t is not None), return_exceptions=True)
        self._task = self._reporting = None
        self._close()

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for _, _, _, waiter in self._pending.values():
            if waiter is not None and not waiter.done():
                waiter.cancel()
        self._pending.clear()

    async def _open(self) -> bool:
        try:
            mtu = await self.host.underlay_mtu()
            overlay_mtu = mtu - VXLAN_OVERHEAD
            self.channel = await self.host.dp.open_probe(self.host.vtep, self.host.port, overlay_mtu)
        except NetweftError as e:
            if self._open_failed != str(e):
                log.warning("cannot open the data-path probe device; data-path health is unknown until it can",
                            extra={"reason": str(e)})
            self._open_failed = str(e)
            return False
        self._big = overlay_mtu + wire.ETH_HEADER   # a full-size inner frame: the outer packet is the underlay MTU
        self.channel.start(asyncio.get_running_loop(), self._on_frame)
        self._open_failed = ""
        return True

    # ------------------------------------------------------------------ views
    def health(self) -> dict[str, PeerHealth]:
        return {node_id: p.health for node_id, p in self.paths.items()}

    def peer_health(self, node_id: str) -> PeerHealth | None:
        p = self.paths.get(node_id)
        return p.health if p is not None else None

    # ------------------------------------------------------------------ the round
    async def _run(self) -> None:
        while True:
            if self.channel is None and not await self._open():
                await asyncio.sleep(RETRY_OPEN)
                continue
            try:
                self._round()
            except Exception as e:   # a bug here must not end health checking for the daemon's life
                log.error("a data-path probe round failed", extra={"reason": str(e) or type(e).__name__})
            await asyncio.sleep(self.interval)

    def _round(self) -> None:
        now = time.monotonic_ns()
        self._expire(now)
        self._rounds += 1
        big = self._rounds % BIG_EVERY == 1 or BIG_EVERY == 1
        targets = self.host.probe_targets()
        for node_id in list(self.paths):
            if node_id not in targets:
                del self.paths[node_id]
                self._dirty = True
        for node_id, vtep in targets.items():
            rec = self.paths.get(node_id)
            if rec is None or rec.vtep != vtep:
                rec = self.paths[node_id] = PathRecord(vtep)
                self._dirty = True
            err = self._send(node_id, vtep, SMALL, now, big=False)
            if err is None and big:
                err = self._send(node_id, vtep, self._big, now, big=True)
            rec.send_error = err
        for node_id, rec in self.paths.items():
            self._evaluate(node_id, rec)
        if self._dirty or time.monotonic() - self._reported_at >= REPORT_PERIOD:
            if self._reporting is None or self._reporting.done():
                self._reporting = asyncio.ensure_future(self._report())

    def _send(self, node_id: str, vtep: str, size: int, now: int, big: bool,
              waiter: asyncio.Future | None = None) -> str | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        frame = wire.encode(wire.Probe(wire.REQUEST, seq, now, self.host.node_id, node_id, size))
        err = self.channel.send(vtep, frame)
        if err is None or big:
            # A full-size probe refused here (EMSGSIZE) is as lost as one dropped on the way.
            self._pending[seq] = (node_id, now, big, waiter)
            rec = self.paths.get(node_id) if waiter is None else None
            if rec is not None:
                (rec.big if big else rec.small).sent(seq)
            return None
        return err

    def _expire(self, now: int) -> None:
        limit = now - int(self.timeout * 1e9)
        for seq, (node_id, sent, big, waiter) in list(self._pending.items()):
            if sent > limit:
                continue
            del self._pending[seq]
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(None)
                continue
            rec = self.paths.get(node_id)
            if rec is not None:
                (rec.big.resolve(seq, False) if big else rec.small.resolve(seq, None))

    def _evaluate(self, node_id: str, rec: PathRecord) -> None:
        node = self.host.nodes.get(node_id)
        v = assess(rec.small.values(), rec.big.values(), port=self.host.port,
                   big_size=self._big + VXLAN_OVERHEAD - wire.ETH_HEADER,
                   peer_down=node is not None and node.state == "down", send_error=rec.send_error)
        old = rec.health
        changed = (v.state, v.mtu_ok, v.reason) != (old.state, old.mtu_ok, old.reason)
        rec.health = PeerHealth(state=v.state, loss=v.loss, rtt_ms=v.rtt_ms, mtu_ok=v.mtu_ok, reason=v.reason,
                                since=now_rfc3339() if v.state != old.state or not old.since else old.since)
        if not changed:
            return
        self._dirty = True
        name = f"{node.hostname if node else node_id} ({rec.vtep})"
        if v.state == "healthy" and old.state in ("unknown",):
            log.info(f"data path to {name} is healthy", extra={"peer": node_id, "rtt_ms": v.rtt_ms})
        elif v.state == "healthy":
            log.info(f"data path to {name} is healthy again", extra={"peer": node_id, "rtt_ms": v.rtt_ms,
                                                                      "was": old.state})
        elif v.state != "unknown":
            log.warning(f"data path to {name} is {v.state}: {v.reason}",
                        extra={"peer": node_id, "loss": v.loss, "mtu_ok": v.mtu_ok})

    async def _report(self) -> None:
        """The current health to the managers; kept dirty (sent again next round) if none is reachable."""
        self._dirty = False
        body = {"Health": {k: to_builtins(v) for k, v in self.health().items()}}
        try:
            await self.host.client.call("POST", "/health", body)
            self._reported_at = time.monotonic()
        except Unavailable:
            self._dirty = True
        except NetweftError as e:   # refused (an older manager?): again with the next change or period
            self._reported_at = time.monotonic()
            log.debug("the managers refused a health report", extra={"reason": str(e)})

    # ------------------------------------------------------------------ frames
    def _on_frame(self, frame: bytes) -> None:
        p = wire.parse(frame)
        if p is None or p.dst != self.host.node_id:
            return
        if p.kind == wire.REQUEST:
            node = self.host.nodes.get(p.src)
            if node is None or self.channel is None:
                return   # not a node of this cluster: no answer, and never to an address it names itself
            size = min(p.size, max(self._big, SMALL))
            self.channel.send(node.addr, wire.encode(wire.Probe(wire.REPLY, p.seq, p.sent_ns, self.host.node_id,
                                                                p.src, size)))
            return
        pending = self._pending.get(p.seq)
        if pending is None or pending[0] != p.src or pending[1] != p.sent_ns:
            return
        del self._pending[p.seq]
        node_id, sent, big, waiter = pending
        rtt = (time.monotonic_ns() - sent) / 1e6
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(rtt)
            return
        rec = self.paths.get(node_id)
        if rec is not None:
            (rec.big.resolve(p.seq, True) if big else rec.small.resolve(p.seq, round(rtt, 3)))

    # ------------------------------------------------------------------ on demand (doctor)
    async def check(self, node_id: str, vtep: str, sizes: Sequence[int],
                    timeout: float = 1.0) -> dict[int, float | None]:
        """Probe one host once per size (inner frame bytes) and wait: size -> round trip in ms, or None."""
        if self.channel is None and not await self._open():
            raise Unavailable(f"the probe device cannot be opened: {self._open_failed}")
        loop = asyncio.get_running_loop()
        waiters: dict[int, asyncio.Future] = {}
        now = time.monotonic_ns()
        for size in sizes:
            fut = loop.create_future()
            waiters[size] = fut
            self._send(node_id, vtep, max(SMALL, size), now, big=True, waiter=fut)
        done: dict[int, float | None] = {}
        deadline = loop.time() + timeout
        for size, fut in waiters.items():
            try:
                done[size] = await asyncio.wait_for(fut, max(0.01, deadline - loop.time()))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                done[size] = None
        for seq in [s for s, v in self._pending.items() if v[3] in waiters.values()]:
            del self._pending[seq]
        return done

    @property
    def full_size(self) -> int:
        return self._big
