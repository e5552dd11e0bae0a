"""The overlay agent: the cluster's overlay state on this host, and the kernel made to match it.

It keeps a local copy of every overlay network and endpoint, fed by the manager's watch stream
(a snapshot, then changes with revisions; a reconnect resumes from the last revision). The copy
is saved, so after a restart the data plane is reconciled from it even with no manager in reach.
Sandboxes exist only on hosts with local endpoints; remote endpoints are static FDB + neighbour
entries, changed incrementally per event and fully re-synced after a snapshot or a restart.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Network
from urllib.parse import quote

from netweft.dataplane.overlay import GWBRIDGE, Peer
from netweft.store.local import get_setting, put_setting
from netweft.errors import Forbidden, NetweftError, Unavailable
from netweft.ipam import address as ipam

log = logging.getLogger("netweft.agent.overlay")

SANDBOX_VETH = "nwv"   # container's port in the sandbox
GW_VETH = "nwg"        # container's port on the gateway bridge (host namespace)
VXLAN_TMP = "nwx"      # a VXLAN device's name in the host namespace before it moves into its sandbox
CACHE_KEY = "overlay-cache"


class OverlayAgent:
    def __init__(self, engine, client, node_id: str, vtep: str, port: int):
        self.engine, self.client = engine, client
        self.node_id, self.vtep, self.port = node_id, vtep, port
        self.sandbox_dir = os.path.join(engine.exec_root, "sandboxes")
        os.makedirs(self.sandbox_dir, mode=0o700, exist_ok=True)
        cache = get_setting(engine.store, CACHE_KEY) or {}
        self.rev: int = cache.get("Rev", 0)
        self.networks: dict[str, dict] = {n["ID"]: n for n in cache.get("Networks", [])}
        self.endpoints: dict[str, dict] = {e["ID"]: e for e in cache.get("Endpoints", [])}
        # Endpoints removed here while no manager was reachable: released when one is.
        self.pending_release: list[str] = cache.get("PendingRelease", [])
        self.task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self._save_pending = False
        self._mtu: dict[str, int] = {}
        self._gw: dict | None = None  # the gateway bridge, once ensured in this life of the agent

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.reconcile()
        self.task = asyncio.ensure_future(self._watch_loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self._save()

    def _save(self) -> None:
        self._save_pending = False
        put_setting(self.engine.store, CACHE_KEY, {"Rev": self.rev, "Networks": list(self.networks.values()),
                                                   "Endpoints": list(self.endpoints.values()),
                                                   "PendingRelease": self.pending_release})

    def _save_soon(self) -> None:
        # Saving lags by a moment at most: resuming from a slightly older revision replays idempotent events.
        if not self._save_pending:
            self._save_pending = True
            asyncio.get_running_loop().call_later(0.2, self._save)

    # ------------------------------------------------------------------ the watch
    async def _watch_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for batch in self.client.stream(f"/watch?since={self.rev}"):
                    backoff = 0.1
                    if not self.connected.is_set():
                        self.connected.set()
                        await self._release_pending()
                    await self.apply(batch)
            except asyncio.CancelledError:
                raise
            except Forbidden as e:
                log.error("the manager refuses this node's watch; overlays stay as they are until it rejoins",
                          extra={"reason": str(e)})
                return
            except NetweftError as e:
                log.warning("watch interrupted; the data plane keeps its last state", extra={"reason": str(e)})
            except Exception:
                log.exception("watch failed; retrying")
            self.connected.clear()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def apply(self, batch: dict) -> None:
        kind = batch.get("Type")
        if kind == "ping" or batch.get("Rev", 0) <= self.rev and kind != "snapshot":
            return
        if kind == "snapshot":
            self.networks = {n["ID"]: n for n in batch["Networks"]}
            self.endpoints = {e["ID"]: e for e in batch["Endpoints"]}
            self.rev = batch["Rev"]
            self._save_soon()
            await self.reconcile()
            return
        add: dict[str, list[Peer]] = defaultdict(list)
        remove: dict[str, list[Peer]] = defaultdict(list)
        for ev in batch["Events"]:
            obj = ev["Object"]
            if ev["Kind"] == "network":
                if ev["Action"] == "put":
                    self.networks[obj["ID"]] = obj
                else:
                    self.networks.pop(obj["ID"], None)
                continue
            old = self.endpoints.pop(obj["ID"], None)
            if old is not None and old["NodeID"] != self.node_id:
                remove[old["NetworkID"]].append(self.peer(old))
            if ev["Action"] == "put":
                self.endpoints[obj["ID"]] = obj
                if obj["NodeID"] != self.node_id:
                    add[obj["NetworkID"]].append(self.peer(obj))
        self.rev = batch["Rev"]
        self._save_soon()
        active = self.local_networks()
        for net_id, peers in remove.items():
            if net_id in active:
                await self.engine.kov("remove_peers", self.sandbox(net_id), peers)
        for net_id, peers in add.items():
            if net_id in active:
                await self.engine.kov("add_peers", self.sandbox(net_id), peers)

    # ------------------------------------------------------------------ views
    @staticmethod
    def peer(ep: dict) -> Peer:
        return Peer(ip=ep["IP"], mac=ep["MAC"], vtep=ep["VTEP"])

    def sandbox(self, net_id: str) -> str:
        return os.path.join(self.sandbox_dir, net_id[:12])

    def find_network(self, ref: str) -> dict | None:
        hit = self.networks.get(ref) or next((n for n in self.networks.values() if n["Name"] == ref), None)
        if hit is None and len(ref) >= 3:
            hits = [n for n in self.networks.values() if n["ID"].startswith(ref)]
            hit = hits[0] if len(hits) == 1 else None
        return self.docker_view(hit) if hit else None

    async def fetch_network(self, ref: str) -> dict | None:
        """Look a network up at the manager (the watch stream may be a few ms behind); None if unknown."""
        try:
            net = await self.client.call("GET", f"/networks/{quote(ref, safe='')}")
        except NetweftError as e:
            if getattr(e, "status", None) == 404:
                return None
            raise
        self.networks.setdefault(net["ID"], net)
        return self.docker_view(net)

    @staticmethod
    def docker_view(net: dict) -> dict:
        view = {k: v for k, v in net.items() if k not in ("ID", "VNI", "MTU")}
        return {"Name": net["Name"], "Id": net["ID"], **view,
                "Options": {**net["Options"], "com.docker.network.driver.overlay.vxlanid_list": str(net["VNI"])}}

    def local_containers(self) -> list[tuple[dict, dict]]:
        """(container, endpoint) of every local overlay endpoint, from the local store."""
        out = []
        for ctr in self.engine.store.list("containers"):
            for ep in ctr["NetworkSettings"]["Networks"].values():
                if ep.get("Driver") == "overlay":
                    out.append((ctr, ep))
        return out

    def local_networks(self) -> set[str]:
        return {ep["NetworkID"] for _, ep in self.local_containers()}

    def remote_peers(self, net_id: str) -> set[Peer]:
        return {self.peer(e) for e in self.endpoints.values()
                if e["NetworkID"] == net_id and e["NodeID"] != self.node_id}

    def view(self, net: dict) -> dict:
        """Docker-shaped inspect: local Containers, and Peers (hosts with endpoints on the network)."""
        prefix = IPv4Network(net["IPAM"]["Config"][0]["Subnet"]).prefixlen
        containers = {ctr["Id"]: {"Name": ctr["Name"], "EndpointID": ep["EndpointID"], "MacAddress": ep["MacAddress"],
                                  "IPv4Address": f"{ep['IPAddress']}/{prefix}", "IPv6Address": ""}
                      for ctr, ep in self.local_containers() if ep["NetworkID"] == net["Id"]}
        peers = sorted({(e["Hostname"], e["VTEP"]) for e in self.endpoints.values() if e["NetworkID"] == net["Id"]})
        return {**net, "Containers": containers, "Peers": [{"Name": h, "IP": ip} for h, ip in peers]}

    # ------------------------------------------------------------------ kernel
    async def uplink_mtu(self) -> int:
        """The MTU of the host's underlay interface: egress through the gateway bridge leaves by it."""
        if "uplink" not in self._mtu:
            self._mtu["uplink"] = await self.engine.kov("underlay_mtu", self.vtep)
        return self._mtu["uplink"]

    async def mtu(self, net: dict) -> int:
        if net.get("MTU"):
            return net["MTU"]
        if self.vtep not in self._mtu:
            self._mtu[self.vtep] = await self.engine.kov("default_mtu", self.vtep)
        return self._mtu[self.vtep]

    async def ensure_sandbox(self, net: dict) -> None:
        cfg = net["IPAM"]["Config"][0]
        gw = f"{cfg['Gateway']}/{IPv4Network(cfg['Subnet']).prefixlen}"
        path = self.sandbox(net["ID"])
        await self.engine.kov("ensure_sandbox", path, net["VNI"], gw, await self.mtu(net), self.vtep,
                              self.port, f"{VXLAN_TMP}{net['VNI']:06x}")

    async def ensure_gwbridge(self) -> dict:
        """The gateway bridge and its firewall: programmed once per agent life (and at every reconcile)."""
        if self._gw is not None:
            return self._gw
        gw = get_setting(self.engine.store, "gwbridge")
        if gw is None:
            taken = [IPv4Network(n["IPAM"]["Config"][0]["Subnet"]) for n in self.engine.store.list("networks")]
            taken += await self.engine.k("host_routes", "nw-")
            subnet = ipam.allocate_subnet(self.engine.pools, taken)
            gw = {"Subnet": str(subnet), "Gateway": str(next(subnet.hosts()))}
            put_setting(self.engine.store, "gwbridge", gw)
            await self.engine._apply_firewall(self.engine.store.list("networks"))
        prefix = IPv4Network(gw["Subnet"]).prefixlen
        await self.engine.kov("ensure_gwbridge", GWBRIDGE, f"{gw['Gateway']}/{prefix}", await self.uplink_mtu())
        await self.engine.kov("apply_overlay_firewall", GWBRIDGE, gw["Subnet"])
        self._gw = gw
        return gw

    async def program_endpoint(self, ctr: dict, net: dict, ep: dict) -> None:
        """Sandbox, container port, gateway port: everything of one local endpoint. Idempotent."""
        await self.ensure_sandbox(net)
        mtu = await self.mtu(net)
        ns = self.engine.netns_path(ctr["Id"])
        await self.engine.kov("ensure_endpoint", self.sandbox(net["ID"]), ns, ep["HostInterface"], ep["Interface"],
                              f"{ep['IPAddress']}/{ep['IPPrefixLen']}", ep["MacAddress"], mtu)
        if ep.get("GwInterface"):
            gw = await self.ensure_gwbridge()
            prefix = IPv4Network(gw["Subnet"]).prefixlen
            await self.engine.kov("ensure_gw_endpoint", ns, GWBRIDGE, ep["GwHostInterface"], ep["GwInterface"],
                                  f"{ep['GwIP']}/{prefix}", ipam.mac_for_ip(IPv4Address(ep["GwIP"])),
                                  await self.uplink_mtu(),
                                  gw["Gateway"])

    async def reconcile(self) -> None:
        """Level-triggered: make every sandbox, port and peer table match the local copy."""
        t0 = time.monotonic()
        self._gw = None  # a reconcile checks the gateway bridge again
        wanted = set()
        for ctr, ep in self.local_containers():
            net = self.networks.get(ep["NetworkID"])
            if net is None:
                log.warning("endpoint of an unknown overlay network kept as it is",
                            extra={"container": ctr["Name"], "network": ep["NetworkID"]})
                continue
            wanted.add(net["ID"])
            await self.program_endpoint(ctr, net, ep)
        changed = 0
        for net_id in wanted:
            changed += await self.engine.kov("sync_peers", self.sandbox(net_id), self.remote_peers(net_id))
        for name in os.listdir(self.sandbox_dir):
            if not any(n[:12] == name for n in wanted):
                log.info("removing stale overlay sandbox", extra={"sandbox": name})
                await self.engine.kov("delete_sandbox", os.path.join(self.sandbox_dir, name))
        gw_ports = {ep.get("GwHostInterface") for _, ep in self.local_containers()}
        for name in await self.engine.k("list_links", GW_VETH):
            if name not in gw_ports:
                await self.engine.kov("delete_gw_endpoint", name)
        for name in await self.engine.k("list_links", VXLAN_TMP):
            log.info("removing stale VXLAN device", extra={"link": name})
            await self.engine.kov("delete_sandbox", os.path.join(self.sandbox_dir, "none"), name)
        log.info("overlays reconciled", extra={"networks": len(wanted), "peer_changes": changed,
                                               "ms": round((time.monotonic() - t0) * 1000)})

    # ------------------------------------------------------------------ attach
    async def attach(self, ctr: dict, net: dict, ip: str | None, aliases: list[str], ifname: str,
                     first: bool) -> dict:
        raw = self.networks[net["Id"]]
        ep = await self.client.call("POST", "/endpoints", {
            "NetworkID": net["Id"], "ContainerID": ctr["Id"], "ContainerName": ctr["Name"],
            "IPAddress": ip, "Aliases": aliases})
        # Our own endpoint is in the copy now, whatever the stream's timing.
        self.endpoints[ep["ID"]] = ep
        rec = {"NetworkID": net["Id"], "EndpointID": ep["ID"], "IPAddress": ep["IP"], "IPPrefixLen": ep["PrefixLen"],
               "Gateway": "", "MacAddress": ep["MAC"], "Aliases": ep["Aliases"], "Interface": ifname,
               "HostInterface": SANDBOX_VETH + ep["ID"][:12], "Driver": "overlay"}
        try:
            if first and not raw["Internal"]:
                rec.update(await self._gw_port(ep["ID"], ifname))
            new_sandbox = net["Id"] not in self.local_networks()
            await self.program_endpoint(ctr, raw, rec)
            if new_sandbox:
                await self.engine.kov("sync_peers", self.sandbox(net["Id"]), self.remote_peers(net["Id"]))
        except BaseException:
            await self._unprogram(ctr, rec, last=net["Id"] not in self.local_networks())
            await self._release(ep["ID"])
            raise
        return rec

    async def _gw_port(self, ep_id: str, ifname: str) -> dict:
        gw = await self.ensure_gwbridge()
        cfg = ipam.build_subnet_config(IPv4Network(gw["Subnet"]), gw["Gateway"])
        used = {IPv4Address(ep["GwIP"]) for _, ep in self.local_containers() if ep.get("GwIP")}
        ip = ipam.allocate_ip(cfg, used)
        n = int(ifname[3:]) + 1
        return {"GwInterface": f"eth{n}", "GwHostInterface": GW_VETH + ep_id[:12], "GwIP": str(ip),
                "Gateway": gw["Gateway"]}

    async def _unprogram(self, ctr: dict, ep: dict, last: bool) -> None:
        await self.engine.kov("delete_endpoint", self.sandbox(ep["NetworkID"]), ep["HostInterface"])
        if ep.get("GwHostInterface"):
            await self.engine.kov("delete_gw_endpoint", ep["GwHostInterface"])
        if last:
            await self.engine.kov("delete_sandbox", self.sandbox(ep["NetworkID"]))

    async def _release(self, ep_id: str) -> None:
        try:
            await self.client.call("DELETE", f"/endpoints/{ep_id}")
        except NetweftError as e:
            log.warning("could not release an endpoint at the manager", extra={"endpoint": ep_id, "reason": str(e)})
            raise
        self.endpoints.pop(ep_id, None)

    async def _release_pending(self) -> None:
        while self.pending_release:
            await self._release(self.pending_release[0])
            self.pending_release.pop(0)
            self._save()
            log.info("endpoint removed while no manager was reachable is now released")

    async def detach(self, ctr: dict, ep: dict) -> None:
        """Release the address at the manager; if none is reachable, remove locally now and release later."""
        try:
            await self._release(ep["EndpointID"])
        except Unavailable as e:
            log.warning("no manager reachable: the endpoint goes here now and is released when one is",
                        extra={"endpoint": ep["EndpointID"], "reason": str(e)})
            self.pending_release.append(ep["EndpointID"])
            self._save()
        others = [e for c, e in self.local_containers()
                  if e["NetworkID"] == ep["NetworkID"] and e["EndpointID"] != ep["EndpointID"]]
        await self._unprogram(ctr, ep, last=not others)

    async def teardown(self) -> None:
        """This node leaves the swarm: every overlay endpoint, sandbox and the gateway bridge go."""
        await self.stop()
        for ctr, ep in self.local_containers():
            await self._unprogram(ctr, ep, last=False)
            ctr = self.engine.store.get("containers", ctr["Id"])
            ctr["NetworkSettings"]["Networks"] = {k: v for k, v in ctr["NetworkSettings"]["Networks"].items()
                                                  if v.get("EndpointID") != ep["EndpointID"]}
            with self.engine.store.tx():
                self.engine.store.put("containers", ctr["Id"], ctr["Name"], ctr)
        for name in os.listdir(self.sandbox_dir):
            await self.engine.kov("delete_sandbox", os.path.join(self.sandbox_dir, name))
        await self.engine.kov("delete_overlay_firewall")
        await self.engine.kov("delete_gwbridge", GWBRIDGE)
        self._gw = None
        with self.engine.store.tx():
            self.engine.store.delete("settings", CACHE_KEY)
            self.engine.store.delete("settings", "gwbridge")
