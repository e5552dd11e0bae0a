"""The encrypted overlays' tunnel on this host: keys, the WireGuard interface, the fail-closed rules, probes.

While some encrypted network has endpoints here, this host runs a WireGuard interface per key it holds
(`nwwg` + node ID + slot: one, two during a key rotation, on the WireGuard port and the next), each with a
peer per key of every other node, and nftables rules that drop any VXLAN of an encrypted network leaving
or entering through another interface. One route sends the tunnel block into the current key's interface
with that interface's address as source; a rotation's switch is that route replaced: key and source change
in one step, so no packet leaves under a key its peers would not accept from that source. The overlay agent calls ensure() before it programs an
encrypted network, so no such VXLAN device exists without them. The rest runs in a loop:
- the key rotation (agent/keyring.py), published to the managers (POST /tunnel);
- supervision: the interface (and wireguard-go) made again if it died, removed with the last encrypted
  network, leftovers removed at start;
- a probe per second through the tunnel to each peer host sharing an encrypted network; a peer that stops
  answering is down, logged once with the reason, and shown by `network inspect`. Its packets are dropped
  by WireGuard (no session) and by the rules (any other path): never sent in clear.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import msgspec

from netweft.agent import keyring
from netweft.agent.keyring import KeyRing, PeerTunnel
from netweft.dataplane.api import DataPlane
from netweft.dataplane.wgconf import NO_WIREGUARD, WG_OVERHEAD, Implementation, TunnelPeer, TunnelSpec
from netweft.errors import InvalidRequest, NetweftError, Unavailable
from netweft.ipam.tunnel import TUNNEL_NET
from netweft.model.codec import convert
from netweft.model.cluster import TunnelAnswer
from netweft.model.objects import IPv4, Network, Node
from netweft.store.local import Store, get_setting, put_setting

log = logging.getLogger("netweft.agent.tunnels")

IFNAME_PREFIX = "nwwg"
KEYS_SETTING = "wireguard-keys"
TICK = 1.0


def current_addr(node: Node | None) -> str | None:
    """Where encrypted VXLAN to `node` goes: the tunnel address of its current key (None without one)."""
    if node is None:
        return None
    return next((k.addr for k in node.tunnel_keys if k.current), None)


class TunnelHost(Protocol):
    """What the tunnel needs of the overlay agent."""
    nodes: dict[str, Node]

    def encrypted_networks(self) -> list[Network]:
        """Encrypted networks with endpoints on this host."""

    def hosts_on(self, net_id: str) -> set[str]:
        """IDs of the nodes with endpoints on the network."""

    async def uplink_mtu(self) -> int: ...


class TunnelAgent:
    def __init__(self, host: TunnelHost, dp: DataPlane, client, store: Store, node_id: str, vxlan_port: int,
                 wg_port: int, key_period: float = keyring.DEFAULT_PERIOD):
        self.host, self.dp, self.client, self.store = host, dp, client, store
        self.node_id, self.vxlan_port, self.wg_port, self.period = node_id, vxlan_port, wg_port, key_period
        self.ifnames = {slot: f"{IFNAME_PREFIX}{node_id[:10]}{slot}" for slot in (0, 1)}
        self.grace = min(keyring.GRACE, max(2.0, key_period / 2))
        self.addrs: list[str] = []           # this node's tunnel address pair, from the managers
        self.ring: KeyRing | None = None
        self.peers: dict[str, PeerTunnel] = {}   # by node id
        self.impl: Implementation | None = None
        self.running = False                 # the interface is up, as far as this agent made it
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._fw: tuple | None = None
        self._up: set[str] = set()           # interfaces this agent made
        self._swept = False                  # leftovers of an earlier life looked for
        self._logged: set[str] = set()
        self._load()

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        doc = get_setting(self.store, KEYS_SETTING)
        if doc is None:
            return
        try:
            self.ring = msgspec.json.decode(doc["ring"], type=KeyRing)
            self.addrs = convert(doc.get("addrs") or [], list[IPv4], "saved tunnel addresses")
        except (InvalidRequest, KeyError, TypeError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("the saved WireGuard keys are unreadable; making new ones", extra={"reason": str(e)})
            self.ring = None

    def _save(self) -> None:
        # The local store is root-only (0600): the private keys never leave this host.
        put_setting(self.store, KEYS_SETTING, {"ring": msgspec.json.encode(self.ring).decode(), "addrs": self.addrs})

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.impl = await self.dp.wireguard()
        for name in await self.dp.list_tunnels(IFNAME_PREFIX):
            if name not in self.ifnames.values():   # a crash's leftover (this host was another node before)
                log.info("removing a stale WireGuard interface", extra={"link": name})
                await self.dp.delete_tunnel(name)
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def teardown(self) -> None:
        """This host leaves the swarm: the interface, the rules and the keys go."""
        await self.stop()
        for name in self.ifnames.values():
            await self.dp.delete_tunnel(name)
        await self.dp.delete_tunnel_firewall()
        self.running, self._fw, self.ring, self.addrs = False, None, None, []
        with self.store.tx():
            self.store.delete("settings", KEYS_SETTING)

    def kick(self) -> None:
        """Something changed (a node's keys, an encrypted network here): act now rather than at the next tick."""
        self._kick.set()

    # ------------------------------------------------------------------ the tunnel
    async def ensure(self) -> None:
        """Rules, keys (published), interface: before any encrypted VXLAN device exists. Raises with the
        reason when this host cannot have the tunnel."""
        async with self._lock:
            await self._ensure_locked()

    async def _ensure_locked(self) -> None:
        if self.impl is None:
            self.impl = await self.dp.wireguard()
        if self.impl.kind == "none":
            raise InvalidRequest(self.impl.problem or NO_WIREGUARD)
        nets = self.host.encrypted_networks()
        vnis = sorted({n.vni for n in nets if n.vni is not None})
        fw = (tuple(self.ifnames.values()), tuple(vnis))
        if vnis and self._fw != fw:
            await self.dp.apply_tunnel_firewall(list(self.ifnames.values()), self.vxlan_port, vnis)
            self._fw = fw
        if self.ring is None:
            self.ring = keyring.fresh(time.time())
            self._save()
        if not self.ring.published or len(self.addrs) != 2:
            try:
                await self._publish()
            except Unavailable as e:
                if len(self.addrs) != 2:
                    raise
                # The tunnel keeps working on what the peers know; the publish is retried each tick.
                self._once(f"publish {e}", "cannot publish this host's WireGuard keys; retrying", reason=str(e))
        await self._apply()
        self.running = True

    async def _apply(self) -> None:
        """Every interface of the ring as it should be (the current one last: it takes the route), the
        interface of a key no longer held removed."""
        for spec in await self._specs():
            restarted = await self.dp.ensure_tunnel(spec)
            if restarted and self.running and spec.ifname in self._up:
                log.warning("a WireGuard interface was gone (wireguard-go died?); started again",
                            extra={"link": spec.ifname, "implementation": self.impl.kind})
            elif restarted:
                log.info("WireGuard interface up", extra={"link": spec.ifname, "implementation": self.impl.kind,
                                                          "port": spec.port, "addr": spec.source})
            self._up.add(spec.ifname)
        held = {self.ifnames[slot] for slot in self.ring.keys}
        for name in await self.dp.list_tunnels(IFNAME_PREFIX + self.node_id[:10]):
            if name not in held:
                await self.dp.delete_tunnel(name)
                self._up.discard(name)

    async def _publish(self) -> None:
        body = {"Port": self.wg_port, "Keys": [{"PublicKey": k, "Slot": s, "Current": c}
                                               for k, s, c in self.ring.public()]}
        try:
            answer = convert(await self.client.call("POST", "/tunnel", body), TunnelAnswer, "answer to POST /tunnel")
        except Unavailable as e:
            if len(self.addrs) != 2:
                raise Unavailable(f"cannot publish this host's WireGuard key: {e}") from None
            raise
        self.addrs = list(answer.addrs)
        self.ring = msgspec.structs.replace(self.ring, published=True)
        self._save()

    async def _specs(self) -> list[TunnelSpec]:
        ring = self.ring
        peers = []
        for node in self.host.nodes.values():
            if node.id == self.node_id or not node.addr:
                continue
            for k in node.tunnel_keys:
                port = k.port or node.tunnel_port
                if port:
                    peers.append(TunnelPeer(k.public_key, f"{node.addr}:{port}", f"{k.addr}/32"))
        mtu = await self.host.uplink_mtu() - WG_OVERHEAD
        return [TunnelSpec(ifname=self.ifnames[slot], private_key=ring.keys[slot].private, port=self.wg_port + slot,
                           addresses=(f"{self.addrs[slot]}/32",), source=self.addrs[slot],
                           route=str(TUNNEL_NET) if slot == ring.current else None, mtu=mtu,
                           peers=tuple(sorted(peers)))
                for slot in sorted(ring.keys, key=lambda s: s == ring.current)]

    async def _remove(self, quiet: bool = False) -> None:
        for name in self.ifnames.values():
            await self.dp.delete_tunnel(name)
        await self.dp.delete_tunnel_firewall()
        self.running, self._fw = False, None
        self._up.clear()
        self.peers.clear()
        if not quiet:
            log.info("WireGuard interfaces removed with the last encrypted network here",
                     extra={"links": list(self.ifnames.values())})

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), TICK)
            self._kick.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except NetweftError as e:
                self._once(f"tick {e}", "the encrypted overlays' tunnel could not be made; retrying", reason=str(e))
            except Exception as e:  # noqa: BLE001 - a bug here must not end the loop
                self._once(f"tick {e!r}", "the encrypted overlays' tunnel loop failed; retrying", reason=repr(e))

    async def tick(self) -> None:
        async with self._lock:
            if not self.host.encrypted_networks():
                # Leftovers of an earlier life (interfaces, rules naming VNIs that a clear network may reuse)
                # go once; after that only what this agent made.
                if self.running or not self._swept:
                    await self._remove(quiet=not self.running)
                self._swept = True
                return
            if self.ring is not None:
                rotating = [n.id for n in self.host.nodes.values()
                            if n.id != self.node_id and n.state == "ready" and len(n.tunnel_keys) > 1]
                nxt = keyring.step(self.ring, time.time(), self.period, grace=self.grace,
                                   switch_ok=keyring.may_switch(self.node_id, rotating))
                if nxt is not None:
                    await self._rotate(nxt)
            await self._ensure_locked()
        await self._probe()

    async def _rotate(self, nxt: KeyRing) -> None:
        old = self.ring
        self.ring = nxt
        self._save()
        if nxt.phase != "steady":
            # The next key's interface exists before it is announced; a switch is made here before it is
            # published, so a peer moving to the new address meets the new key.
            await self._apply()
        await self._publish()
        if nxt.phase == "steady":
            await self._apply()   # the old key's interface goes once no peer lists it
        log.info("WireGuard key rotation", extra={"phase": nxt.phase, "slot": nxt.current,
                                                  "previous_phase": old.phase})

    # ------------------------------------------------------------------ probes
    def _watched(self) -> dict[str, Node | None]:
        ids: set[str] = set()
        for net in self.host.encrypted_networks():
            ids |= self.host.hosts_on(net.id)
        ids.discard(self.node_id)
        return {i: self.host.nodes.get(i) for i in ids}

    async def _probe(self) -> None:
        now = time.monotonic()
        answered = await self.dp.tunnel_probe_replies()
        watched = self._watched()
        for gone in set(self.peers) - set(watched):
            del self.peers[gone]
        status = {}
        for name in self.ifnames.values():
            for st in await self.dp.tunnel_status(name):
                if st.public_key not in status or st.last_handshake > status[st.public_key].last_handshake:
                    status[st.public_key] = st
        targets = []
        for node_id, node in watched.items():
            p = self.peers.setdefault(node_id, PeerTunnel(since=now))
            addr = current_addr(node)
            if addr is not None and addr in answered:
                p.last_answer = now
            key = next((k.public_key for k in node.tunnel_keys if k.current), None) if node else None
            st = status.get(key) if key else None
            age = time.time() - st.last_handshake if st is not None and st.last_handshake else None
            name = node.hostname if node is not None else node_id
            state, reason = keyring.verdict(p, now, hostname=name, endpoint=st.endpoint if st else None,
                                            has_key=addr is not None, handshake_age=age,
                                            port=node.tunnel_port if node and node.tunnel_port else self.wg_port)
            if state != p.state:
                if state == "down":
                    log.warning("encrypted overlay traffic to a host is dropped", extra={"peer": name,
                                                                                       "reason": reason})
                elif state == "up" and p.state == "down":
                    log.info("the WireGuard tunnel to a host is up again", extra={"peer": name})
                p.state, p.since = state, now
            p.reason = reason
            if addr is not None:
                if p.first_probe is None:
                    p.first_probe = now
                targets.append(addr)
        if targets:
            await self.dp.send_tunnel_probes(targets)

    # ------------------------------------------------------------------ views
    def view(self, net_id: str) -> dict:
        """`network inspect` of an encrypted network: the implementation and the tunnel to each peer host."""
        now_m, now_w = time.monotonic(), time.time()
        cur = self.ring.current if self.ring is not None else 0
        out = {"Implementation": (self.impl.view() if self.impl else {}), "Interface": self.ifnames[cur],
               "Port": self.wg_port + cur, "Peers": []}
        if self.ring is not None:
            out["KeyPhase"] = self.ring.phase
            out["KeyAge"] = int(now_w - self.ring.keys[self.ring.current].created)
        for node_id in sorted(self.host.hosts_on(net_id) - {self.node_id}):
            node = self.host.nodes.get(node_id)
            p = self.peers.get(node_id, PeerTunnel())
            out["Peers"].append({"Name": node.hostname if node else node_id, "Tunnel": p.state,
                                 "TunnelAddr": current_addr(node) or "", "Reason": p.reason,
                                 "Since": int(now_m - p.since) if p.since else 0})
        return out

    def _once(self, key: str, message: str, **extra) -> None:
        if key in self._logged:
            return
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged.add(key)
        log.warning(message, extra=extra)

