"""The local engine: networks, endpoints and containers of one host.

Objects are the model's (netweft.model.objects): a local network is a Network (driver bridge) in the
local store; every endpoint of this host, on a local network or an overlay, is a first-class Endpoint
record (kind "endpoints") with its Owner: a netweft container today, another runtime next. A container
document holds what the runtime needs; its endpoints are the records it owns. The Docker-shaped views
(inspect, NetworkSettings, a network's Containers) are built from those objects here, at the API edge.

The kernel is reached only through the injected DataPlane. A request changes the kernel first and the
store last, undoing kernel changes when a later step fails, so a refused request changes nothing.
The engine's lock guards short check-and-write sections (names, addresses, the firewall); it is never
held across a call to a manager (issue 7, item 22): an overlay attach waits only on its own network in
the agent, and a `run` on a local network goes on meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

from netweft import validate
from netweft.daemon import collisions
from netweft.daemon.names import host_upstreams
from netweft.agent.overlay import OverlayAgent
from netweft.daemon import ports
from netweft.daemon.memory import trimmer
from netweft.daemon.local_events import LocalEvents
from netweft.dataplane.api import GWBRIDGE, DataPlane
from netweft.dataplane.firewall import BridgeRule
from netweft.errors import Conflict, InvalidRequest, NetweftError, NotFound, PoolExhausted, Unavailable
from netweft.ipam import address as ipam
from netweft.ipam import tunnel
from netweft.model.api import peer_health_view
from netweft.model.codec import convert, to_builtins
from netweft.model.objects import Endpoint, Network, Owner
from netweft.runtime import container as runtime
from netweft.store.local import ENDPOINTS, Store, endpoint_name, get_setting, owner_prefix, put_setting

log = logging.getLogger("netweft.engine")

FIREWALL_TABLE = "netweft"
BRIDGE_PREFIX = "nw-"
VETH_PREFIX = "nwv"
SPECIAL_MODES = ("host", "none")
DEFAULT_MTU = 1500
GWBRIDGE_PREFIX = 20  # the gateway bridge's subnet: 4,093 overlay containers on one host (Docker's is a /16)
FORMAT = 2            # the shape of the local store's documents (2: model objects, endpoint records)


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return secrets.token_hex(32)


class OverlayHost:
    """The narrow view of the engine that the overlay agent gets (agent.overlay.OverlayHost)."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.store = engine.store
        self.sandbox_dir = os.path.join(engine.exec_root, "sandboxes")

    async def gateway_subnet(self) -> tuple[str, str]:
        return await self._engine.gateway_subnet()

    async def gateway_released(self) -> None:
        await self._engine.gateway_released()


class Engine:
    def __init__(self, data_root: str, exec_root: str, pools: list[ipam.AddressPool], dataplane: DataPlane):
        self.data_root, self.exec_root, self.pools = data_root, exec_root, pools
        self.dp = dataplane
        self.netns_dir = os.path.join(exec_root, "netns")
        self.ctr_dir = os.path.join(data_root, "containers")
        for d in (self.netns_dir, self.ctr_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(data_root, "netweft.db"))
        self.lock = asyncio.Lock()
        self._ctr_locks: dict[str, asyncio.Lock] = {}   # one per container: its connects one at a time
        self.overlay_host = OverlayHost(self)
        self.swarm = None                              # the daemon's Swarm role, set by the daemon
        self.overlay_agent: OverlayAgent | None = None  # while this node is in a swarm
        self.events = LocalEvents()                     # local networks' events, for `netweft events`
        self.names = None                              # the containers' resolver (daemon.names), set by the daemon

    async def start(self) -> None:
        self._check_format()
        await self.reconcile()
        await ports.apply(self)

    async def close(self) -> None:
        self.store.close()

    def _check_format(self) -> None:
        """State written by an older netweft (before endpoints were records) is not migrated: pre-release,
        it is discarded once, and the reconcile removes what it left in the kernel."""
        if (get_setting(self.store, "format") or {}).get("Version") == FORMAT:
            return
        old = self.store.list("networks") + self.store.list("containers")
        if old:
            log.warning("discarding local networks and containers of an older netweft (no migration before "
                        "the first release)", extra={"documents": len(old)})
        with self.store.tx():
            for kind in ("networks", "containers", ENDPOINTS):
                self.store.clear(kind)
            self.store.delete("settings", "overlay-cache")
            self.store.put("settings", "format", "format", {"Version": FORMAT})

    # ---------------------------------------------------------------- lookups
    def _local_networks(self) -> list[Network]:
        out = []
        for doc in self.store.list("networks"):
            try:
                out.append(convert(doc, Network, "stored network"))
            except InvalidRequest as e:
                log.warning("a stored network is unreadable; ignored", extra={"reason": str(e)})
        return out

    async def network(self, ref: str) -> Network:
        doc = self.store.find("networks", ref)
        if doc is not None:
            return convert(doc, Network, "stored network")
        if self.overlay_agent is not None:
            # Not in this host's scope (no endpoint here yet)? Ask the managers.
            net = self.overlay_agent.find_network(ref) or await self.overlay_agent.fetch_network(ref)
            if net is not None:
                return net
        raise NotFound(f"network {ref!r} not found; see `netweft network ls`")

    def container(self, ref: str) -> dict:
        ctr = self.store.find("containers", ref)
        if ctr is None:
            raise NotFound(f"container {ref!r} not found; see `netweft ps -a`")
        return ctr

    def endpoints_of(self, ctr_id: str) -> list[Endpoint]:
        """The endpoints a netweft container owns, in interface order."""
        eps = []
        for doc in self.store.with_name_prefix(ENDPOINTS, owner_prefix("netweft", ctr_id)):
            try:
                eps.append(convert(doc, Endpoint, "endpoint record"))
            except InvalidRequest as e:
                log.warning("an endpoint record is unreadable; ignored", extra={"reason": str(e)})
        return sorted(eps, key=lambda e: (len(e.ifname or ""), e.ifname or ""))

    def endpoints_on(self, net_id: str) -> list[Endpoint]:
        """This host's endpoints on a network, whoever owns them."""
        out = []
        for doc in self.store.list(ENDPOINTS):
            if doc.get("network_id") == net_id:
                try:
                    out.append(convert(doc, Endpoint, "endpoint record"))
                except InvalidRequest:
                    pass
        return out

    def _insert_endpoint(self, ep: Endpoint) -> None:
        with self.store.tx():   # a plain insert: a second record for one owner and network is refused
            self.store.insert(ENDPOINTS, ep.id, endpoint_name(ep.owner, ep.network_id), to_builtins(ep))

    def _delete_endpoint_record(self, ep_id: str) -> None:
        with self.store.tx():
            self.store.delete(ENDPOINTS, ep_id)

    def ctr_state_dir(self, ctr_id: str) -> str:
        return os.path.join(self.ctr_dir, ctr_id)

    def netns_path(self, ctr_id: str) -> str:
        return os.path.join(self.netns_dir, ctr_id[:12])

    # --------------------------------------------------------------- networks
    async def create_network(self, req: dict) -> dict:
        name = validate.check_name(req.get("Name", ""), "network")
        driver = req.get("Driver") or "bridge"
        if name in SPECIAL_MODES:
            raise Conflict(f"network {name!r} already exists; choose another name or remove it first")
        if driver == "overlay":
            return await self._create_overlay(req, name)
        if driver != "bridge":
            raise InvalidRequest(f"unknown driver {driver!r}: use -d bridge or -d overlay")
        if req.get("Ingress"):
            raise InvalidRequest("--ingress needs -d overlay: the ingress network spans the swarm")
        overlays = await self._overlays_for_checks()   # may ask a manager: before the lock
        async with self.lock:
            if self.store.by_name("networks", name) or any(o.name == name for o in overlays):
                raise Conflict(f"network {name!r} already exists; choose another name or remove it first")
            if self.store.get("networks", name) or any(o.id == name for o in overlays):
                raise Conflict(f"network name {name!r} is the ID of another network; choose another name")
            net = await self._new_bridge_network(req, name, overlays)
            others = self._local_networks()
            try:
                await self._program_network(net)
                await self._apply_firewall(others + [net])
            except BaseException:
                await self.dp.delete_bridge(net.bridge, net.parent)
                await self._apply_firewall(others)
                raise
            with self.store.tx():
                self.store.put("networks", net.id, name, to_builtins(net))
        self.events.network("create", net)
        log.info("network created", extra={"network": name, "id": net.id, "subnet": net.subnet})
        return self.network_view(net)

    async def _overlays_for_checks(self) -> list[Network]:
        """Overlays a new local network must not clash with (name, subnet): the cluster's, from the managers,
        with those known here (without a reachable manager, only those)."""
        if self.overlay_agent is None:
            return []
        known = {n.id: n for n in self.overlay_agent.networks()}
        try:
            listed = await self.overlay_agent.fetch_networks() or []
        except Unavailable:
            listed = []
        known.update((n.id, n) for n in listed)
        return list(known.values())

    async def _new_bridge_network(self, req: dict, name: str, overlays: list[Network]) -> Network:
        options = dict(req.get("Options") or {})
        labels = dict(req.get("Labels") or {})
        for k in labels:
            if not k.strip():
                raise InvalidRequest("invalid label: the key is empty; expected KEY=VALUE")
        mtu = validate.parse_mtu(options[validate.MTU_OPT]) if validate.MTU_OPT in options else None
        parent = options.get(validate.PARENT_OPT) or None
        net_id = new_id()
        bridge = options.get(validate.BRIDGE_NAME_OPT) or BRIDGE_PREFIX + net_id[:12]
        validate.check_ifname(bridge, "bridge name")
        if parent:
            validate.check_ifname(parent, "parent interface")
        others = self._local_networks()
        for other in others:
            if other.bridge == bridge:
                raise Conflict(f"bridge name {bridge!r} is already used by network {other.name!r}")
            if parent and other.parent == parent:
                raise Conflict(f"parent interface {parent!r} is already used by network {other.name!r}")
        if await self.dp.link_exists(bridge):
            raise Conflict(f"an interface named {bridge!r} already exists on this host; choose another bridge name")
        if parent:
            info = await self.dp.link_info(parent)
            if info is None:
                raise InvalidRequest(f"parent interface {parent!r} does not exist on this host")
            kind, master, loopback = info
            validate.check_parent_link(parent, kind, master, loopback)
        ipam_cfg = (req.get("IPAM") or {}).get("Config") or [{}]
        if len(ipam_cfg) != 1:
            raise InvalidRequest("exactly one IPAM config (subnet) per network is supported")
        c = ipam_cfg[0]
        # Overlay subnets count too: a container on both would get two routes to one prefix.
        taken = [(IPv4Network(o.subnet), f"network {o.name!r}") for o in others + overlays]
        taken.append((tunnel.TUNNEL_NET, tunnel.TUNNEL_WHAT))
        routes = [] if parent else await collisions.host_claims(self.dp, BRIDGE_PREFIX)
        if c.get("Subnet"):
            subnet = ipam.parse_network(c["Subnet"])
            for other, what in taken + routes:
                if subnet.overlaps(other):
                    raise Conflict(f"subnet {subnet} overlaps {other} of {what}; choose another subnet")
        else:
            if c.get("Gateway") or c.get("IPRange") or c.get("AuxiliaryAddresses"):
                raise InvalidRequest("--gateway, --ip-range and --aux-address need --subnet")
            subnet = ipam.allocate_subnet(self.pools, [t for t, _ in taken + routes])
        cfg = ipam.build_subnet_config(subnet, c.get("Gateway") or None, c.get("IPRange") or None,
                                       c.get("AuxiliaryAddresses") or {})
        return Network(id=net_id, name=name, driver="bridge", scope="local", created=now(), subnet=str(cfg.subnet),
                       gateway=str(cfg.gateway), ip_range=str(cfg.ip_range) if cfg.ip_range else None,
                       aux_addresses={k: str(v) for k, v in cfg.aux.items()}, internal=bool(req.get("Internal")),
                       attachable=bool(req.get("Attachable", True)), options=options, labels=labels, mtu=mtu,
                       bridge=bridge, parent=parent)

    async def _create_overlay(self, req: dict, name: str) -> dict:
        if self.swarm is None or self.swarm.state() is None:
            raise InvalidRequest("overlay networks need a swarm: run `netweft swarm init` (or join one) first")
        if self.store.by_name("networks", name):
            raise Conflict(f"network {name!r} already exists; choose another name or remove it first")
        if validate.ENCRYPTED_OPT in (req.get("Options") or {}):
            wg = await self.dp.wireguard()
            if wg.kind == "none":
                raise InvalidRequest(f"-o encrypted refused: {wg.problem}")
        await self.refuse_host_overlap(((req.get("IPAM") or {}).get("Config") or [{}])[0].get("Subnet"), "subnet")
        doc = await _awaited(self.swarm.admin("POST", "/networks", req,
                                              local=lambda: self.swarm.manager.overlays.create_network(req)))
        return self.network_view(convert(doc, Network, "network from the manager"))

    async def refuse_host_overlap(self, text, what: str) -> None:
        """Refuse a subnet given by the operator that overlaps a route or an address of this host."""
        if not isinstance(text, str) or not text:
            return
        subnet = ipam.parse_network(text, what)
        hit = collisions.overlap(subnet, await collisions.host_claims(self.dp, BRIDGE_PREFIX))
        if hit is not None:
            raise Conflict(f"{what} {subnet} overlaps {hit[0]} of {hit[1]} (containers could not reach it); "
                           f"choose another {what}")

    async def _program_network(self, net: Network) -> None:
        # On a parent (LAN) network the gateway is a router on that LAN, not us.
        prefix = IPv4Network(net.subnet).prefixlen
        address = None if net.parent else f"{net.gateway}/{prefix}"
        await self.dp.ensure_bridge(net.bridge, address, net.mtu or DEFAULT_MTU, net.parent)

    async def _apply_firewall(self, nets: list[Network]) -> None:
        rules = [BridgeRule(bridge=n.bridge, subnet=n.subnet, internal=n.internal,
                            masquerade=not n.internal and not n.parent) for n in nets]
        gw = get_setting(self.store, "gwbridge")
        if gw is not None:
            # The overlays' gateway bridge is one of ours too: no forwarding between it and bridge networks.
            # (Its masquerade lives in the overlay table.)
            rules.append(BridgeRule(bridge=GWBRIDGE, subnet=gw["Subnet"], internal=False, masquerade=False))
        if any(r.masquerade for r in rules):
            await self.dp.set_ip_forward(True)
        await self.dp.apply_firewall(FIREWALL_TABLE, rules)

    async def gateway_subnet(self) -> tuple[str, str]:
        """The gateway bridge's subnet (for the overlay agent): a free one of the pools, chosen once."""
        async with self.lock:
            gw = get_setting(self.store, "gwbridge")
            if gw is None:
                nets = self._local_networks()
                overlays = self.overlay_agent.networks() if self.overlay_agent is not None else []
                taken = [IPv4Network(n.subnet) for n in nets + overlays] + [tunnel.TUNNEL_NET]
                taken += [net for net, _ in await collisions.host_claims(self.dp, BRIDGE_PREFIX)]
                try:  # room for GWBRIDGE_PREFIX's worth of overlay containers on this host, else the pools' size
                    subnet = ipam.allocate_subnet(self.pools, taken, GWBRIDGE_PREFIX)
                except PoolExhausted:
                    subnet = ipam.allocate_subnet(self.pools, taken)
                gw = {"Subnet": str(subnet), "Gateway": str(next(subnet.hosts()))}
                put_setting(self.store, "gwbridge", gw)
                await self._apply_firewall(nets)
            return gw["Subnet"], gw["Gateway"]

    async def gateway_released(self) -> None:
        async with self.lock:
            with self.store.tx():
                self.store.delete("settings", "gwbridge")
            await self._apply_firewall(self._local_networks())

    # ------------------------------------------------------------------ views
    def network_view(self, net: Network) -> dict:
        """Docker-shaped inspect output: the network and this host's endpoints on it (and, for an overlay,
        the hosts with endpoints on it)."""
        cfg = {"Subnet": net.subnet, "IPRange": net.ip_range or "", "Gateway": net.gateway,
               "AuxiliaryAddresses": dict(net.aux_addresses)}
        options = dict(net.options)
        if net.driver == "overlay" and net.vni is not None:
            options[validate.VXLANID_OPT] = str(net.vni)
        prefix = IPv4Network(net.subnet).prefixlen
        containers = {}
        for ep in self.endpoints_on(net.id):
            name = ep.owner.name
            if ep.owner.kind == "netweft":
                ctr = self.store.get("containers", ep.owner.id)
                name = ctr["Name"] if ctr else name
            containers[ep.owner.id] = {"Name": name, "EndpointID": ep.id, "MacAddress": ep.mac,
                                       "IPv4Address": f"{ep.ip}/{prefix}", "IPv6Address": ""}
        view = {"Name": net.name, "Id": net.id, "Created": net.created, "Scope": net.scope, "Driver": net.driver,
                "EnableIPv6": False, "IPAM": {"Driver": "default", "Options": {}, "Config": [cfg]},
                "Internal": net.internal, "Attachable": net.attachable, "Ingress": net.ingress,
                "Options": options, "Labels": dict(net.labels), "Containers": containers}
        if net.driver == "overlay":
            peers = self.overlay_agent.peers_view(net.id) if self.overlay_agent is not None else []
            view["Peers"] = [{"Name": h, "IP": ip, **({"Health": peer_health_view(hv)} if hv else {})}
                             for h, ip, hv in peers]
            if net.encrypted and self.overlay_agent is not None and net.id in {n.id for n in self.overlay_agent.networks()}:
                view["Encryption"] = self.overlay_agent.tunnels.view(net.id)
        return view

    def _network_name(self, net_id: str) -> str:
        doc = self.store.get("networks", net_id)
        if doc is not None:
            return doc["name"]
        net = self.overlay_agent.find_network(net_id) if self.overlay_agent is not None else None
        return net.name if net is not None else net_id

    @staticmethod
    def endpoint_view(ep: Endpoint) -> dict:
        """Docker's EndpointSettings of one endpoint (plus the interface names netweft chose)."""
        view = {"NetworkID": ep.network_id, "EndpointID": ep.id, "IPAddress": ep.ip, "IPPrefixLen": ep.prefix_len,
                "Gateway": ep.gateway or "", "MacAddress": ep.mac, "Aliases": list(ep.aliases),
                "IPAMConfig": {"IPv4Address": ep.ip} if ep.ip_requested else None,
                "Interface": ep.ifname, "HostInterface": ep.host_ifname}
        if ep.node_id:
            view.update({"Driver": "overlay", "GwInterface": ep.gw_ifname, "GwHostInterface": ep.gw_host_ifname,
                         "GwIP": ep.gw_ip})
        return view

    def all_networks(self) -> list[Network]:
        nets = self._local_networks()
        if self.overlay_agent is not None:
            nets += self.overlay_agent.networks()
        return nets

    def list_networks(self) -> list[dict]:
        return [self.network_view(n) for n in self.all_networks()]

    async def remove_network(self, ref: str) -> None:
        net = await self.network(ref)
        if net.driver == "overlay":   # the managers decide (and refuse while endpoints exist anywhere)
            await _awaited(self.swarm.admin("DELETE", f"/networks/{net.id}",
                                            local=lambda: self.swarm.manager.overlays.remove_network(net.id)))
            return
        async with self.lock:
            attached = [self._owner_name(e) for e in self.endpoints_on(net.id)]
            if attached:
                raise Conflict(f"network {net.name!r} has containers attached ({', '.join(attached)}); "
                               "disconnect or remove them first")
            rest = [n for n in self._local_networks() if n.id != net.id]
            await self._apply_firewall(rest)
            await self.dp.delete_bridge(net.bridge, net.parent)
            with self.store.tx():
                self.store.delete("networks", net.id)
        self.events.network("remove", net)
        log.info("network removed", extra={"network": net.name, "id": net.id})

    def _owner_name(self, ep: Endpoint) -> str:
        if ep.owner.kind == "netweft":
            ctr = self.store.get("containers", ep.owner.id)
            if ctr is not None:
                return ctr["Name"]
        return ep.owner.name or f"{ep.owner.kind} {ep.owner.id[:12]}"

    async def prune_networks(self) -> list[str]:
        removed = []
        for net in self._local_networks():  # swarm networks are pruned on a manager, not per host
            if not self.endpoints_on(net.id):
                try:
                    await self.remove_network(net.id)
                except Conflict:
                    continue   # a container joined it meanwhile
                removed.append(net.name)
        return removed

    # -------------------------------------------------------------- endpoints
    async def connect(self, net_ref: str, ctr_ref: str, ip: str | None = None,
                      aliases: list[str] | None = None, mac: str | None = None) -> dict:
        net, ctr = await self.network(net_ref), self.container(ctr_ref)
        ep = await self._connect(net, ctr, ip, aliases or [], mac)
        self._write_hosts(ctr)
        if self.names is not None:
            await self.names.container_changed(ctr)
        return self.endpoint_view(ep)

    def _container_lock(self, ctr_id: str) -> asyncio.Lock:
        return self._ctr_locks.setdefault(ctr_id, asyncio.Lock())

    async def _connect(self, net: Network, ctr: dict, ip: str | None, aliases: list[str], mac: str | None) -> Endpoint:
        """Allocate, record and program one endpoint of a container. One connect of a container at a time:
        the check "not yet connected" and the interface name stay true until its record is written. (A
        container's own lock, not the engine's: an overlay attach may wait on a manager.)"""
        lock = self._container_lock(ctr["Id"])
        try:
            async with lock:
                return await self._connect_locked(net, ctr, ip, aliases, mac)
        finally:   # not kept for the container's life (1,000 containers: 1,000 locks) once nobody holds or awaits it
            if self._ctr_locks.get(ctr["Id"]) is lock and not lock.locked() and not getattr(lock, "_waiters", None):
                del self._ctr_locks[ctr["Id"]]

    async def _connect_locked(self, net: Network, ctr: dict, ip: str | None, aliases: list[str],
                              mac: str | None) -> Endpoint:
        mode = ctr["HostConfig"]["NetworkMode"]
        if mode in SPECIAL_MODES:
            raise InvalidRequest(f"container {ctr['Name']!r} uses --network {mode}; it cannot join other networks")
        existing = self.endpoints_of(ctr["Id"])
        if any(e.network_id == net.id for e in existing):
            raise Conflict(f"container {ctr['Name']!r} is already connected to network {net.name!r}")
        for a in aliases:
            validate.check_hostname(a)
        used_if = {e.ifname for e in existing} | {e.gw_ifname for e in existing if e.gw_ifname}
        free = (f"eth{i}" for i in range(len(used_if) + 3) if f"eth{i}" not in used_if)
        ifname = next(free)
        first = not existing
        owner = Owner(kind="netweft", id=ctr["Id"], name=ctr["Name"])
        gw_ifname = next(free) if first and net.driver == "overlay" and not net.internal else None
        ep = await self._attach(net, owner, self.netns_path(ctr["Id"]), ifname, ip=ip, mac=mac, aliases=aliases,
                                gateway=first, gw_ifname=gw_ifname)
        if net.scope == "local":   # an overlay's connect is told by the cluster's history (manager/events.py)
            self.events.network("connect", net, ep, ctr["Name"])
        log.info("endpoint attached", extra={"network": net.name, "container": ctr["Name"], "ip": ep.ip})
        return ep

    async def _attach(self, net: Network, owner: Owner, netns: str, ifname: str, *, ip: str | None, mac: str | None,
                      aliases: list[str], gateway: bool, gw_ifname: str | None) -> Endpoint:
        """Allocate, record and program one endpoint of any owner into the namespace at `netns`: a netweft
        container's, or one another runtime made (CNI_NETNS, Docker's sandbox key). `gateway`: its default
        route (bridge networks); `gw_ifname`: an overlay endpoint's port on the gateway bridge (and route)."""
        trimmer.attached()
        if net.driver == "overlay":
            if self.overlay_agent is None:
                raise Unavailable("this node is not part of a swarm (any more): it cannot join overlay networks")
            return await self.overlay_agent.attach(owner, net.id, netns, ifname, gw_ifname=gw_ifname,
                                                   ip=ip, mac=mac, aliases=aliases)
        async with self.lock:   # the address is chosen and recorded at one instant
            on_net = self.endpoints_on(net.id)
            cfg = ipam.build_subnet_config(IPv4Network(net.subnet), net.gateway, net.ip_range, net.aux_addresses)
            in_use = {IPv4Address(e.ip) for e in on_net}
            addr = ipam.check_requested_ip(cfg, ip, in_use) if ip else ipam.allocate_ip(cfg, in_use)
            mac = ipam.parse_mac(mac) if mac else ipam.mac_for_ip(addr)
            if any(e.mac == mac for e in on_net):
                raise Conflict(f"MAC address {mac} is already used on network {net.name!r}; choose another one")
            ep_id = new_id()
            ep = Endpoint(id=ep_id, network_id=net.id, ip=str(addr), prefix_len=cfg.subnet.prefixlen, mac=mac,
                          owner=owner, aliases=list(aliases), ip_requested=bool(ip), sandbox_key=netns,
                          ifname=ifname, host_ifname=VETH_PREFIX + ep_id[:12],
                          gateway=net.gateway if gateway and not net.internal else None)
            self._insert_endpoint(ep)
        try:
            await self._program_endpoint(net, ep)
        except BaseException:
            await self.dp.delete_endpoint(ep.host_ifname)
            self._delete_endpoint_record(ep.id)
            raise
        return ep

    # ------------------------------------------------------ other runtimes' endpoints
    def owned_endpoints(self, kind: str, owner_id: str) -> list[Endpoint]:
        """The endpoints of one owner of any kind (a CNI attachment, a Docker endpoint)."""
        out = []
        for doc in self.store.with_name_prefix(ENDPOINTS, owner_prefix(kind, owner_id)):
            try:
                out.append(convert(doc, Endpoint, "endpoint record"))
            except InvalidRequest as e:
                log.warning("an endpoint record is unreadable; ignored", extra={"reason": str(e)})
        return out

    def endpoints_of_kind(self, kind: str) -> list[Endpoint]:
        """Every endpoint record of this host whose owner is of `kind`."""
        out = []
        for doc in self.store.list(ENDPOINTS):
            if (doc.get("owner") or {}).get("kind") == kind:
                try:
                    out.append(convert(doc, Endpoint, "endpoint record"))
                except InvalidRequest:
                    pass
        return out

    async def attach_owner(self, owner: Owner, net_ref: str, netns: str, ifname: str, *, ip: str | None = None,
                           mac: str | None = None, aliases: list[str] | tuple = (),
                           gw_ifname: str | None = None) -> tuple[Network, Endpoint]:
        """An endpoint of another runtime's namespace on a network, by the path a netweft container's
        connect takes. Once per owner and network: a repeated request answers the record there (a runtime
        retrying), unless it names another namespace."""
        net = await self.network(net_ref)
        for a in aliases:
            validate.check_hostname(a)
        async with self._container_lock(f"{owner.kind}/{owner.id}"):
            same = next((e for e in self.owned_endpoints(owner.kind, owner.id) if e.network_id == net.id), None)
            if same is not None:
                if same.sandbox_key != netns:
                    raise Conflict(f"{owner.kind} attachment {owner.id!r} is already on network {net.name!r} in "
                                   f"another namespace; delete it first")
                return net, same
            first = not any(e.sandbox_key == netns for e in self.endpoints_of_kind(owner.kind))
            ep = await self._attach(net, owner, netns, ifname, ip=ip, mac=mac, aliases=list(aliases),
                                    gateway=first, gw_ifname=gw_ifname if net.driver == "overlay" and first
                                    and not net.internal else None)
        if net.scope == "local":
            self.events.network("connect", net, ep, owner.name or owner.id)
        log.info("endpoint attached", extra={"network": net.name, "owner": f"{owner.kind} {owner.id}", "ip": ep.ip})
        return net, ep

    async def detach_owner(self, kind: str, owner_id: str, net_id: str | None = None) -> int:
        """Remove an owner's endpoints (on one network, or all): idempotent, also when its namespace is gone."""
        async with self._container_lock(f"{kind}/{owner_id}"):
            eps = [e for e in self.owned_endpoints(kind, owner_id) if net_id is None or e.network_id == net_id]
            for ep in eps:
                await self._delete_endpoint(ep)
        await ports.unpublish(self, [e.id for e in eps])
        self._ctr_locks.pop(f"{kind}/{owner_id}", None)
        for ep in eps:
            log.info("endpoint detached", extra={"owner": f"{kind} {owner_id}", "ip": ep.ip})
        return len(eps)

    async def _program_endpoint(self, net: Network, ep: Endpoint) -> None:
        await self.dp.ensure_endpoint(ep.sandbox_key, net.bridge, ep.host_ifname, ep.ifname,
                                      f"{ep.ip}/{ep.prefix_len}", ep.mac, net.mtu or DEFAULT_MTU, ep.gateway)

    async def disconnect(self, net_ref: str, ctr_ref: str) -> None:
        net, ctr = await self.network(net_ref), self.container(ctr_ref)
        ep = next((e for e in self.endpoints_of(ctr["Id"]) if e.network_id == net.id), None)
        if ep is None:
            raise NotFound(f"container {ctr['Name']!r} is not connected to network {net.name!r}")
        await self._delete_endpoint(ep)
        self._write_hosts(ctr)
        if self.names is not None:
            await self.names.container_changed(ctr)

    async def _delete_endpoint(self, ep: Endpoint) -> None:
        trimmer.released()
        if ep.node_id:   # an overlay endpoint
            if self.overlay_agent is None:
                self._delete_endpoint_record(ep.id)   # its data plane left with the swarm
            else:
                await self.overlay_agent.detach(ep)
            return
        await self.dp.delete_endpoint(ep.host_ifname)
        name = self._owner_name(ep)
        self._delete_endpoint_record(ep.id)
        try:
            net = self.store.get("networks", ep.network_id)
            if net is not None:
                self.events.network("disconnect", convert(net, Network, "network record"), ep, name)
        except InvalidRequest:
            pass   # an unreadable record is the reconcile's to report; the endpoint is gone all the same

    # ------------------------------------------------------------- containers
    async def create_container(self, req: dict, start: bool = True) -> dict:
        ctr_id = new_id()
        name = req.get("Name") or f"ctr-{ctr_id[:8]}"
        validate.check_name(name, "container")
        hostname = validate.check_hostname(req.get("Hostname") or ctr_id[:12])
        cmd = req.get("Cmd") or []
        if not cmd:
            raise InvalidRequest("no command given: netweft run [OPTIONS] -- CMD [ARGS...]")
        mode = req.get("NetworkMode") or "none"
        net = None
        if mode not in SPECIAL_MODES:
            net = await self.network(mode)
        elif req.get("IPAddress") or req.get("MacAddress") or req.get("Aliases"):
            raise InvalidRequest(f"--ip, --mac-address and --network-alias need a network, not --network {mode}")
        state_dir = self.ctr_state_dir(ctr_id)
        ctr = {
            "Id": ctr_id, "Name": name, "Created": now(),
            "Config": {"Hostname": hostname, "Cmd": cmd, "Env": req.get("Env") or {},
                       "Labels": dict(req.get("Labels") or {})},
            "HostConfig": {"NetworkMode": mode},
            "NetworkSettings": {"SandboxKey": "" if mode == "host" else self.netns_path(ctr_id)},
            "LogPath": os.path.join(state_dir, "log"),
        }
        async with self.lock:   # recorded first: the name is taken from now on
            if self.store.by_name("containers", name):
                raise Conflict(f"container name {name!r} is already in use; remove it or choose another name")
            os.makedirs(state_dir, mode=0o700)
            with self.store.tx():
                self.store.put("containers", ctr_id, name, ctr)
        try:
            if mode != "host":
                await self.dp.create_netns(self.netns_path(ctr_id))
            if net is not None:
                await self._connect(net, ctr, req.get("IPAddress"), req.get("Aliases") or [], req.get("MacAddress"))
            self._write_hosts(ctr)
            if net is not None and self.names is not None:   # on a network: the host's resolver at 127.0.0.11
                await self.names.container_changed(ctr)
                runtime.write_resolv(os.path.join(state_dir, "resolv.conf"), *self.names.resolv_conf())
            else:
                runtime.write_resolv(os.path.join(state_dir, "resolv.conf"), *_host_resolvers())
            if start:
                await self._start_process(ctr)
        except BaseException:
            await self._teardown_container(ctr)
            raise
        return self.container_view(ctr)

    async def _start_process(self, ctr: dict) -> None:
        """Start the container's process off the event loop (the host's supervisor forks it)."""
        state_dir = self.ctr_state_dir(ctr["Id"])
        for stale in ("pid", "exit_code", "starttime"):
            if os.path.exists(os.path.join(state_dir, stale)):
                os.unlink(os.path.join(state_dir, stale))
        mode = ctr["HostConfig"]["NetworkMode"]
        spec = {
            "netns": None if mode == "host" else self.netns_path(ctr["Id"]),
            "hostname": ctr["Config"]["Hostname"],
            "hosts_file": None if mode == "host" else os.path.join(state_dir, "hosts"),
            "resolv_file": None if mode == "host" else os.path.join(state_dir, "resolv.conf"),
            "cmd": ctr["Config"]["Cmd"], "env": ctr["Config"]["Env"],
            "log": ctr["LogPath"], "state_dir": state_dir,
            "supervisor": os.path.join(self.exec_root, "supervisor.sock"),
        }
        await asyncio.get_running_loop().run_in_executor(None, runtime.start, spec)

    def _write_hosts(self, ctr: dict) -> None:
        if ctr["HostConfig"]["NetworkMode"] == "host":
            return
        names = [ctr["Config"]["Hostname"]]
        if ctr["Name"] != ctr["Config"]["Hostname"]:
            names.append(ctr["Name"])
        # A service task's aliases are its service's names: DNS answers them with every task; in /etc/hosts
        # they would shadow the other tasks.
        task = "com.docker.swarm.task.id" in (ctr["Config"].get("Labels") or {})
        entries = [(ep.ip, names + ([] if task else list(ep.aliases))) for ep in self.endpoints_of(ctr["Id"])]
        runtime.write_hosts(os.path.join(self.ctr_state_dir(ctr["Id"]), "hosts"), ctr["Config"]["Hostname"], entries)

    async def start_container(self, ref: str) -> dict:
        ctr = self.container(ref)
        status, _ = runtime.status(self.ctr_state_dir(ctr["Id"]))
        if status == "running":
            raise Conflict(f"container {ctr['Name']!r} is already running")
        await self._start_process(ctr)
        return self.container_view(ctr)

    async def stop_container(self, ref: str, timeout: float = 10) -> None:
        ctr = self.container(ref)
        await asyncio.get_running_loop().run_in_executor(None, runtime.stop, self.ctr_state_dir(ctr["Id"]), timeout)

    async def remove_container(self, ref: str, force: bool = False) -> None:
        ctr = self.container(ref)
        status, _ = runtime.status(self.ctr_state_dir(ctr["Id"]))
        if status == "running":
            if not force:
                raise Conflict(f"container {ctr['Name']!r} is running; stop it first or use rm -f")
            await self.stop_container(ctr["Id"], timeout=0)
        await self._teardown_container(ctr)
        log.info("container removed", extra={"container": ctr["Name"], "id": ctr["Id"]})

    async def _teardown_container(self, ctr: dict) -> None:
        """Endpoints, namespace, files, then the document: what a crash half way leaves is still removable."""
        eps = self.endpoints_of(ctr["Id"])
        for ep in eps:
            await self._delete_endpoint(ep)
        if self.names is not None:
            self.names.container_removed(ctr["Id"], [ep.network_id for ep in eps], eps)
        if ctr["HostConfig"]["NetworkMode"] != "host":
            await self.dp.delete_netns(self.netns_path(ctr["Id"]))
        # Off the loop: unlinking files a dying container still has mounted waits for the kernel (≈20 ms).
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, self.ctr_state_dir(ctr["Id"]), True)
        with self.store.tx():
            self.store.delete("containers", ctr["Id"])
        self._ctr_locks.pop(ctr["Id"], None)

    def container_view(self, ctr: dict) -> dict:
        status, value = runtime.status(self.ctr_state_dir(ctr["Id"]))
        state = {"Status": {"running": "running", "exited": "exited"}.get(status, "created"),
                 "Running": status == "running", "Pid": value if status == "running" else 0,
                 "ExitCode": value if status == "exited" else 0}
        networks = {self._network_name(ep.network_id): self.endpoint_view(ep) for ep in self.endpoints_of(ctr["Id"])}
        settings = {**ctr.get("NetworkSettings", {}), "Networks": networks}
        return {**ctr, "NetworkSettings": settings, "State": state}

    def list_containers(self, all: bool = False) -> list[dict]:
        views = [self.container_view(c) for c in self.store.list("containers")]
        return [v for v in views if all or v["State"]["Running"]]

    # -------------------------------------------------------------- reconcile
    async def reconcile(self) -> None:
        """Make the kernel match the store: after a restart, a crash or a reboot. Idempotent. Overlay
        endpoints are the overlay agent's; endpoints of other owners are programmed, never removed."""
        async with self.lock:
            nets = self._local_networks()
            by_id = {n.id: n for n in nets}
            for net in nets:
                await self._program_network(net)
            await self._apply_firewall(nets)
            wanted_links = {n.bridge for n in nets}
            wanted_ns = set()
            containers = {c["Id"]: c for c in self.store.list("containers")}
            for ctr in containers.values():
                if ctr["HostConfig"]["NetworkMode"] == "host":
                    continue
                path = self.netns_path(ctr["Id"])
                wanted_ns.add(os.path.basename(path))
                await self.dp.create_netns(path)
            for doc in self.store.list(ENDPOINTS):
                if doc.get("node_id"):
                    continue   # an overlay endpoint: the overlay agent's
                try:
                    ep = convert(doc, Endpoint, "endpoint record")
                except InvalidRequest as e:
                    log.warning("an endpoint record is unreadable; left as it is", extra={"reason": str(e)})
                    continue
                net = by_id.get(ep.network_id)
                orphan = ep.owner.kind == "netweft" and ep.owner.id not in containers
                if net is None or orphan:
                    log.info("removing an endpoint record without its network or container", extra={"endpoint": ep.id})
                    self._delete_endpoint_record(ep.id)
                    continue
                wanted_links.add(ep.host_ifname)
                try:
                    await self._program_endpoint(net, ep)
                except NetweftError as e:   # its owner's namespace may be gone: the others still go on
                    log.warning("could not program an endpoint", extra={"endpoint": ep.id, "reason": str(e)})
            for name in await self.dp.list_links(VETH_PREFIX):
                if name not in wanted_links:
                    log.info("removing stale endpoint link", extra={"link": name})
                    await self.dp.delete_endpoint(name)
            for name in await self.dp.list_links(BRIDGE_PREFIX):
                if name not in wanted_links:
                    log.info("removing stale bridge", extra={"link": name})
                    await self.dp.delete_bridge(name, None)
            for name in await self.dp.list_netns(self.netns_dir):
                if name not in wanted_ns:
                    log.info("removing stale namespace", extra={"netns": name})
                    await self.dp.delete_netns(os.path.join(self.netns_dir, name))
            for name in os.listdir(self.ctr_dir):
                if name not in containers:   # files of a container an older life could not finish removing
                    await asyncio.get_running_loop().run_in_executor(None, runtime.stop, self.ctr_state_dir(name), 0)
                    shutil.rmtree(self.ctr_state_dir(name), ignore_errors=True)
            log.info("reconciled", extra={"networks": len(nets)})


async def _awaited(value):
    """A manager call's result: the leader's own manager answers with a coroutine, a forwarded call with data."""
    while asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        value = await value
    return value


def _host_resolvers() -> tuple[list[str], list[str]]:
    """Nameservers and search domains of the host, minus loopback ones that mean nothing in a container."""
    servers, search = host_upstreams()
    return [s for s in servers if not s.startswith("127.")], search
