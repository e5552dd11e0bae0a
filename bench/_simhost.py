"""Simulated hosts for the scale benchmark: the real agent code (NodeAgent, ClusterClient with mutual TLS,
OverlayAgent and its Watcher) on the fake data plane, many of them in one asyncio process.

Each simulated host joins through the real join (a worker token, its own key and certificate), heartbeats,
and watches the managers over its own mutual-TLS connection; its overlay agent programs the fake data plane.
What a real host pays on its own CPU for its own data path and nothing else (the data-path health prober,
N probes per host per round, and the periodic 3-s resync of the host's own sandboxes) is left out unless
asked for: N of them in one process would measure this process, not the managers.
"""
from __future__ import annotations

import asyncio
import contextvars
import ctypes
import os
import ssl
import subprocess
import time

from netweft.agent import node as agent_node
from netweft.http import client as http
from netweft.agent.overlay import OverlayAgent
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import NetweftError, Unavailable
from netweft.model.objects import Owner
from netweft.store.local import Store

CLONE_NEWNET = 0x40000000
# The managers limit unauthenticated calls (the join) per source address, as they should: each simulated
# host connects from its own address (a few per address), as real hosts do, not all from one.
SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("source", default=None)


class _SourceSession(http.ClientSession):
    def __init__(self, *args, **kw):
        if kw.get("connector") is None and SOURCE.get():
            kw["connector"] = _source_connector()
        super().__init__(*args, **kw)


def _source_connector(*args, **kw) -> http.TCPConnector:
    if SOURCE.get():
        kw.setdefault("local_addr", (SOURCE.get(), 0))
    return http.TCPConnector(*args, **kw)


class _ClientFromSource:
    """netweft.http.client as the agent code sees it, but its sessions connect from the simulated host's address."""
    ClientSession = _SourceSession
    TCPConnector = staticmethod(_source_connector)

    def __getattr__(self, name):
        return getattr(http, name)


agent_node.http = _ClientFromSource()


class _SslWithoutSystemRoots:
    """ssl as the join sees it, but a context made for fetching the CA (verification off: the join checks
    the digest) skips loading the system's trust store: 20 % of the simulated side's time at 1,000 joins,
    and nothing a manager sees."""

    def create_default_context(self, *args, **kw):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def __getattr__(self, name):
        return getattr(ssl, name)


agent_node.ssl = _SslWithoutSystemRoots()


def add_source_addresses(netns_name: str, addrs: list[str], prefixlen: int) -> None:
    """Secondary addresses on eth0 of the lab host the simulated hosts run in (its namespace goes with the lab)."""
    batch = "".join(f"addr add {a}/{prefixlen} dev eth0\n" for a in addrs)
    subprocess.run(["ip", "-n", netns_name, "-batch", "-"], input=batch, text=True, check=True)


def enter_netns(path: str) -> None:
    """Move this process (its main thread, and every thread made afterwards) into the network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class TimedDataPlane(FakeDataPlane):
    """The fake data plane, noting when the peer with a watched IP is first programmed into a sandbox."""

    def __init__(self):
        super().__init__()
        self.watch_ip: str | None = None
        self.arrived = asyncio.Event()
        self.arrived_at = 0.0
        self.first_seen: dict[str, float] = {}   # peer IP -> when it was first programmed here

    def expect(self, ip: str) -> None:
        self.watch_ip, self.arrived_at = ip, 0.0
        self.arrived.clear()

    def _seen(self, peers) -> None:
        now = time.monotonic()
        for p in peers:
            self.first_seen.setdefault(p.ip, now)
        if self.watch_ip is not None and not self.arrived.is_set() and self.watch_ip in self.first_seen:
            self.arrived_at = self.first_seen[self.watch_ip]
            self.arrived.set()

    async def add_peers(self, path, peers):
        await super().add_peers(path, peers)
        self._seen(peers)

    async def sync_peers(self, path, peers):
        r = await super().sync_peers(path, peers)
        self._seen(peers)
        return r


class SimOverlayAgent(OverlayAgent):
    """The overlay agent, its saves of the copy spaced for a host that has 1/`share` of a CPU.

    The agent spaces its saves so they take ~5 % of its host's time; N agents in one process would
    take N x 5 % of one core and starve everything else. Nothing else differs."""
    share = 1
    snapshots = 0   # snapshots applied, by every simulated host of the process (a resume should need none)

    def _on_snapshot(self, msg: dict, rev: int) -> None:
        SimOverlayAgent.snapshots += 1
        super()._on_snapshot(msg, rev)

    def _save_soon(self) -> None:
        if self._save_handle is None:
            delay = max(0.2, 20 * self._save_cost * self.share)
            self._save_handle = asyncio.get_running_loop().call_later(delay, self._save)


class _Host:
    """What the overlay agent asks of its engine."""

    def __init__(self, root: str):
        self.store = Store(os.path.join(root, "db", "netweft.db"))
        self.sandbox_dir = os.path.join(root, "sandboxes")

    async def gateway_subnet(self):
        return "198.19.0.0/24", "198.19.0.1"

    async def gateway_released(self):
        pass


class SimHost:
    def __init__(self, root: str, name: str, addr: str, source: str | None = None):
        self.root, self.name, self.addr, self.source = root, name, addr, source
        self.swarm_dir = os.path.join(root, "swarm")
        self.dp = TimedDataPlane()
        self.dp.add_host_interface("eth0", f"{addr}/24")
        self.node: agent_node.NodeAgent | None = None
        self.overlay: SimOverlayAgent | None = None
        self.node_id = ""

    async def join(self, token: str, manager: str, tries: int = 30) -> None:
        SOURCE.set(self.source)   # this task's context, and that of every task it starts
        for attempt in range(tries):
            try:
                ans = await agent_node.join(token, manager, self.name, self.addr, self.swarm_dir)
                break
            except NetweftError as e:   # a manager too busy to answer in time (or 503): retry, as an operator would
                if attempt == tries - 1 or not (isinstance(e, Unavailable) or getattr(e, "status", 0) == 503):
                    raise
                await asyncio.sleep(min(10, 1 + attempt))
        self.node_id, self.managers, self.period = ans["NodeID"], ans["Managers"], ans["HeartbeatPeriod"]

    async def start(self, resync: bool = False, prober: bool = False) -> None:
        SOURCE.set(self.source)
        self.node = agent_node.NodeAgent(self.swarm_dir, self.managers, self.addr, self.period, node_id=self.node_id)
        self.node.start()
        self.overlay = SimOverlayAgent(_Host(self.root), self.dp, self.node.client, self.node_id, self.addr, 4789)
        ov = self.overlay
        await ov.tunnels.start()
        await ov.resync(full=True)
        ov.tasks = [asyncio.ensure_future(ov.watcher.run())]
        if resync:
            ov.tasks.append(asyncio.ensure_future(ov._resync_loop()))
        if prober:
            ov.prober.start()

    async def attach(self, network_id: str, owner: str, tries: int = 10):
        netns = f"/run/nwt-sim/{self.name}/{owner}"
        await self.dp.create_netns(netns)
        for attempt in range(tries):
            try:
                return await self.overlay.attach(Owner(kind="netweft", id=owner, name=owner), network_id, netns,
                                                 "eth0", gw_ifname=None)
            except Unavailable:   # a manager too busy to answer in time; the same owner gets the same endpoint
                if attempt == tries - 1:
                    raise
                await asyncio.sleep(min(10, 1 + attempt))

    async def stop(self) -> None:
        if self.overlay is not None:
            await self.overlay.stop()
        if self.node is not None:
            await self.node.stop()
