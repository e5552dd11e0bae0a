"""The local engine: networks, endpoints and containers of one host.

Every mutating request runs under one lock and in the order validate -> kernel -> store,
undoing kernel changes if a later step fails, so a refused request changes nothing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

from netweft import validate
from netweft.dataplane.firewall import BridgeRule
from netweft.dataplane.kernel import Kernel
from netweft.dataplane.overlay import GWBRIDGE, Overlay
from netweft.errors import Conflict, InvalidRequest, NotFound
from netweft.ipam import address as ipam
from netweft.runtime import container as runtime
from netweft.store.local import Store

log = logging.getLogger("netweft.engine")

FIREWALL_TABLE = "netweft"
BRIDGE_PREFIX = "nw-"
VETH_PREFIX = "nwv"
SPECIAL_MODES = ("host", "none")
DEFAULT_MTU = 1500


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return secrets.token_hex(32)


class Engine:
    def __init__(self, data_root: str, exec_root: str, pools: list[ipam.AddressPool]):
        self.data_root, self.exec_root, self.pools = data_root, exec_root, pools
        self.netns_dir = os.path.join(exec_root, "netns")
        self.ctr_dir = os.path.join(data_root, "containers")
        for d in (self.netns_dir, self.ctr_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(data_root, "netweft.db"))
        self.lock = asyncio.Lock()
        # One thread owns every netlink and nftables handle: they are bound to the thread's netns.
        self._kx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self.kernel: Kernel | None = None
        self.overlay_kernel: Overlay | None = None  # made in the kernel thread on first use
        self.swarm = None           # the daemon's Swarm role, set by the daemon
        self.overlay_agent = None   # an OverlayAgent while this node is in a swarm

    async def k(self, fn_name: str, *args, **kwargs):
        """Run one Kernel method in the kernel thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kx, lambda: getattr(self.kernel, fn_name)(*args, **kwargs))

    async def kov(self, fn_name: str, *args, **kwargs):
        """Run one Overlay (VXLAN data plane) method in the kernel thread."""
        def call():
            if self.overlay_kernel is None:
                self.overlay_kernel = Overlay()
            return getattr(self.overlay_kernel, fn_name)(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._kx, call)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.kernel = await loop.run_in_executor(self._kx, Kernel, self.exec_root)
        await self.reconcile()

    async def close(self) -> None:
        if self.kernel is not None:
            await self.k("close")
        if self.overlay_kernel is not None:
            await self.kov("close")
        self._kx.shutdown(wait=True)
        self.store.close()

    # ---------------------------------------------------------------- lookups
    async def network(self, ref: str) -> dict:
        net = self.store.find("networks", ref)
        if net is None and self.overlay_agent is not None:
            # Not in the local copy yet (created a moment ago elsewhere)? Ask the manager.
            net = self.overlay_agent.find_network(ref) or await self.overlay_agent.fetch_network(ref)
        if net is None:
            raise NotFound(f"network {ref!r} not found; see `netweft network ls`")
        return net

    def container(self, ref: str) -> dict:
        ctr = self.store.find("containers", ref)
        if ctr is None:
            raise NotFound(f"container {ref!r} not found; see `netweft ps -a`")
        return ctr

    def endpoints_on(self, net_id: str) -> list[tuple[dict, dict]]:
        """(container, endpoint) pairs attached to a network."""
        out = []
        for ctr in self.store.list("containers"):
            for ep in ctr["NetworkSettings"]["Networks"].values():
                if ep["NetworkID"] == net_id:
                    out.append((ctr, ep))
        return out

    def ctr_state_dir(self, ctr_id: str) -> str:
        return os.path.join(self.ctr_dir, ctr_id)

    def netns_path(self, ctr_id: str) -> str:
        return os.path.join(self.netns_dir, ctr_id[:12])

    # --------------------------------------------------------------- networks
    async def create_network(self, req: dict) -> dict:
        async with self.lock:
            name = validate.check_name(req.get("Name", ""), "network")
            if self.store.by_name("networks", name) or name in SPECIAL_MODES or \
                    (self.overlay_agent is not None and self.overlay_agent.find_network(name)):
                raise Conflict(f"network {name!r} already exists; choose another name or remove it first")
            driver = req.get("Driver") or "bridge"
            if driver == "overlay":
                return await self._create_overlay(req)
            if driver != "bridge":
                raise InvalidRequest(f"unknown driver {driver!r}: use -d bridge or -d overlay")
            options = dict(req.get("Options") or {})
            labels = dict(req.get("Labels") or {})
            for k in labels:
                if not k.strip():
                    raise InvalidRequest("invalid label: the key is empty; expected KEY=VALUE")
            mtu = validate.parse_mtu(options[validate.MTU_OPT]) if validate.MTU_OPT in options else DEFAULT_MTU
            parent = options.get(validate.PARENT_OPT) or None
            net_id = new_id()
            bridge = options.get(validate.BRIDGE_NAME_OPT) or BRIDGE_PREFIX + net_id[:12]
            validate.check_ifname(bridge, "bridge name")
            if parent:
                validate.check_ifname(parent, "parent interface")
            others = self.store.list("networks")
            for other in others:
                if other["bridge"] == bridge:
                    raise Conflict(f"bridge name {bridge!r} is already used by network {other['Name']!r}")
                if parent and other.get("parent") == parent:
                    raise Conflict(f"parent interface {parent!r} is already used by network {other['Name']!r}")
            if await self.k("link_exists", bridge):
                raise Conflict(f"an interface named {bridge!r} already exists on this host; choose another bridge name")
            if parent and not await self.k("link_exists", parent):
                raise InvalidRequest(f"parent interface {parent!r} does not exist on this host")

            ipam_cfg = (req.get("IPAM") or {}).get("Config") or [{}]
            if len(ipam_cfg) != 1:
                raise InvalidRequest("exactly one IPAM config (subnet) per network is supported")
            c = ipam_cfg[0]
            # Overlay subnets count too: a container on both would get two routes to one prefix.
            taken = [(IPv4Network(o["IPAM"]["Config"][0]["Subnet"]), f"network {o['Name']!r}")
                     for o in self.all_networks()]
            routes = [] if parent else [(r, "a route of this host") for r in await self.k("host_routes", BRIDGE_PREFIX)]
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
            net = {
                "Name": name, "Id": net_id, "Created": now(), "Scope": "local", "Driver": "bridge",
                "EnableIPv6": False,
                "IPAM": {"Driver": "default", "Options": {}, "Config": [cfg.to_doc()]},
                "Internal": bool(req.get("Internal")), "Attachable": bool(req.get("Attachable", True)),
                "Ingress": False, "Options": options, "Labels": labels,
                "bridge": bridge, "mtu": mtu, "parent": parent,
            }
            try:
                await self._program_network(net)
                await self._apply_firewall(others + [net])
            except BaseException:
                await self.k("delete_bridge", bridge, parent)
                await self._apply_firewall(others)
                raise
            with self.store.tx():
                self.store.put("networks", net_id, name, net)
            log.info("network created", extra={"network": name, "id": net_id, "subnet": str(subnet)})
            return net

    async def _create_overlay(self, req: dict) -> dict:
        if self.swarm is None or self.swarm.state() is None:
            raise InvalidRequest("overlay networks need a swarm: run `netweft swarm init` (or join one) first")
        if self.store.by_name("networks", req.get("Name", "")):
            raise Conflict(f"network {req.get('Name')!r} already exists; choose another name or remove it first")
        net = await self.swarm.admin("POST", "/networks", req,
                                     local=lambda: self.swarm.manager.overlays.create_network(req))
        if self.overlay_agent is not None:  # known here at once, whatever the watch stream's timing
            self.overlay_agent.networks[net["ID"]] = net
        return self.overlay_agent.docker_view(net) if self.overlay_agent else {**net, "Id": net["ID"]}

    async def _program_network(self, net: dict) -> None:
        cfg = ipam.SubnetConfig.from_doc(net["IPAM"]["Config"][0])
        # On a parent (LAN) network the gateway is a router on that LAN, not us.
        address = None if net.get("parent") else f"{cfg.gateway}/{cfg.subnet.prefixlen}"
        await self.k("ensure_bridge", net["bridge"], address, net["mtu"], net.get("parent"))

    async def _apply_firewall(self, nets: list[dict]) -> None:
        rules = [BridgeRule(bridge=n["bridge"], subnet=n["IPAM"]["Config"][0]["Subnet"], internal=n["Internal"],
                            masquerade=not n["Internal"] and not n.get("parent")) for n in nets]
        gw = self.store.get("settings", "gwbridge")
        if gw is not None:
            # The overlays' gateway bridge is one of ours too: no forwarding between it and bridge networks.
            # (Its masquerade lives in the overlay table.)
            rules.append(BridgeRule(bridge=GWBRIDGE, subnet=gw["Subnet"], internal=False, masquerade=False))
        if any(r.masquerade for r in rules):
            await self.k("set_ip_forward", True)
        await self.k("apply_firewall", FIREWALL_TABLE, rules)

    def network_view(self, net: dict) -> dict:
        """Docker-shaped inspect output: the stored document plus live Containers."""
        if net["Driver"] == "overlay":
            return self.overlay_agent.view(net)
        view = {k: v for k, v in net.items() if k not in ("bridge", "mtu", "parent")}
        prefix = IPv4Network(net["IPAM"]["Config"][0]["Subnet"]).prefixlen
        view["Containers"] = {
            ctr["Id"]: {"Name": ctr["Name"], "EndpointID": ep["EndpointID"], "MacAddress": ep["MacAddress"],
                        "IPv4Address": f"{ep['IPAddress']}/{prefix}", "IPv6Address": ""}
            for ctr, ep in self.endpoints_on(net["Id"])}
        return view

    def all_networks(self) -> list[dict]:
        nets = self.store.list("networks")
        if self.overlay_agent is not None:
            nets += [self.overlay_agent.docker_view(n) for n in self.overlay_agent.networks.values()]
        return nets

    def list_networks(self, filters: dict[str, list[str]] | None = None) -> list[dict]:
        out = []
        for net in self.all_networks():
            if filters and not _matches(net, filters):
                continue
            out.append(self.network_view(net))
        return out

    async def remove_network(self, ref: str) -> None:
        async with self.lock:
            net = await self.network(ref)
            if net["Driver"] == "overlay":
                await self.swarm.admin("DELETE", f"/networks/{net['Id']}", local=lambda:
                                       self.swarm.manager.overlays.remove_network(net["Id"]))
                self.overlay_agent.networks.pop(net["Id"], None)
                return
            attached = [ctr["Name"] for ctr, _ in self.endpoints_on(net["Id"])]
            if attached:
                raise Conflict(f"network {net['Name']!r} has containers attached ({', '.join(attached)}); "
                               "disconnect or remove them first")
            rest = [n for n in self.store.list("networks") if n["Id"] != net["Id"]]
            await self._apply_firewall(rest)
            await self.k("delete_bridge", net["bridge"], net.get("parent"))
            with self.store.tx():
                self.store.delete("networks", net["Id"])
            log.info("network removed", extra={"network": net["Name"], "id": net["Id"]})

    async def prune_networks(self) -> list[str]:
        removed = []
        for net in self.store.list("networks"):  # swarm networks are pruned on a manager, not per host
            if not self.endpoints_on(net["Id"]):
                await self.remove_network(net["Id"])
                removed.append(net["Name"])
        return removed

    # -------------------------------------------------------------- endpoints
    async def connect(self, net_ref: str, ctr_ref: str, ip: str | None = None,
                      aliases: list[str] | None = None, mac: str | None = None) -> dict:
        async with self.lock:
            net, ctr = await self.network(net_ref), self.container(ctr_ref)
            ep = await self._connect(net, ctr, ip, aliases or [], mac)
            self._write_hosts(ctr)
            with self.store.tx():
                self.store.put("containers", ctr["Id"], ctr["Name"], ctr)
            return ep

    async def _connect(self, net: dict, ctr: dict, ip: str | None, aliases: list[str], mac: str | None) -> dict:
        """Allocate and program one endpoint; records it in ctr (the caller stores ctr)."""
        mode = ctr["HostConfig"]["NetworkMode"]
        if mode in SPECIAL_MODES:
            raise InvalidRequest(f"container {ctr['Name']!r} uses --network {mode}; it cannot join other networks")
        nets = ctr["NetworkSettings"]["Networks"]
        if net["Name"] in nets:
            raise Conflict(f"container {ctr['Name']!r} is already connected to network {net['Name']!r}")
        for a in aliases:
            validate.check_hostname(a)
        used_if = {e["Interface"] for e in nets.values()} | {e["GwInterface"] for e in nets.values()
                                                              if e.get("GwInterface")}
        if net["Driver"] == "overlay":
            ifname = next(f"eth{i}" for i in range(len(used_if) + 2) if f"eth{i}" not in used_if)
            ep = await self.overlay_agent.attach(ctr, net, ip, aliases, ifname, first=not nets)
            nets[net["Name"]] = ep
            log.info("endpoint attached", extra={"network": net["Name"], "container": ctr["Name"],
                                                 "ip": ep["IPAddress"]})
            return ep
        cfg = ipam.SubnetConfig.from_doc(net["IPAM"]["Config"][0])
        in_use = {IPv4Address(e["IPAddress"]) for _, e in self.endpoints_on(net["Id"])}
        addr = ipam.check_requested_ip(cfg, ip, in_use) if ip else ipam.allocate_ip(cfg, in_use)
        mac = ipam.parse_mac(mac) if mac else ipam.mac_for_ip(addr)
        ifname = next(f"eth{i}" for i in range(len(used_if) + 1) if f"eth{i}" not in used_if)
        first = not nets
        gateway = str(cfg.gateway) if first and not net["Internal"] else None
        ep_id = new_id()
        ep = {"NetworkID": net["Id"], "EndpointID": ep_id, "IPAddress": str(addr),
              "IPPrefixLen": cfg.subnet.prefixlen, "Gateway": str(cfg.gateway) if gateway else "",
              "MacAddress": mac, "Aliases": aliases, "Interface": ifname,
              "HostInterface": VETH_PREFIX + ep_id[:12]}
        try:
            await self._program_endpoint(ctr, net, ep)
        except BaseException:
            await self.k("delete_endpoint", ep["HostInterface"])
            raise
        nets[net["Name"]] = ep
        log.info("endpoint attached", extra={"network": net["Name"], "container": ctr["Name"], "ip": str(addr)})
        return ep

    async def _program_endpoint(self, ctr: dict, net: dict, ep: dict) -> None:
        await self.k("ensure_endpoint", self.netns_path(ctr["Id"]), net["bridge"], ep["HostInterface"],
                     ep["Interface"], f"{ep['IPAddress']}/{ep['IPPrefixLen']}", ep["MacAddress"], net["mtu"],
                     ep["Gateway"] or None)

    async def disconnect(self, net_ref: str, ctr_ref: str) -> None:
        async with self.lock:
            net, ctr = await self.network(net_ref), self.container(ctr_ref)
            ep = ctr["NetworkSettings"]["Networks"].get(net["Name"])
            if ep is None:
                raise NotFound(f"container {ctr['Name']!r} is not connected to network {net['Name']!r}")
            await self._delete_endpoint(ctr, ep)
            del ctr["NetworkSettings"]["Networks"][net["Name"]]
            self._write_hosts(ctr)
            with self.store.tx():
                self.store.put("containers", ctr["Id"], ctr["Name"], ctr)

    # ------------------------------------------------------------- containers
    async def create_container(self, req: dict, start: bool = True) -> dict:
        async with self.lock:
            ctr_id = new_id()
            name = req.get("Name") or f"ctr-{ctr_id[:8]}"
            validate.check_name(name, "container")
            if self.store.by_name("containers", name):
                raise Conflict(f"container name {name!r} is already in use; remove it or choose another name")
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
                "Config": {"Hostname": hostname, "Cmd": cmd, "Env": req.get("Env") or {}},
                "HostConfig": {"NetworkMode": mode},
                "NetworkSettings": {"SandboxKey": "" if mode == "host" else self.netns_path(ctr_id),
                                    "Networks": {}},
                "LogPath": os.path.join(state_dir, "log"),
            }
            os.makedirs(state_dir, mode=0o700)
            try:
                if mode != "host":
                    await self.k("create_netns", self.netns_path(ctr_id))
                if net is not None:
                    await self._connect(net, ctr, req.get("IPAddress"), req.get("Aliases") or [],
                                        req.get("MacAddress"))
                self._write_hosts(ctr)
                runtime.write_resolv(os.path.join(state_dir, "resolv.conf"), *_host_resolvers())
                if start:
                    await self._start_process(ctr)
            except BaseException:
                await self._teardown_container(ctr)
                raise
            with self.store.tx():
                self.store.put("containers", ctr_id, name, ctr)
            return self.container_view(ctr)

    async def _start_process(self, ctr: dict) -> None:
        """Start the container's process off the event loop: starting a shim takes tens of ms."""
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
        }
        await asyncio.get_running_loop().run_in_executor(None, runtime.start, spec)

    def _write_hosts(self, ctr: dict) -> None:
        if ctr["HostConfig"]["NetworkMode"] == "host":
            return
        names = [ctr["Config"]["Hostname"]]
        if ctr["Name"] != ctr["Config"]["Hostname"]:
            names.append(ctr["Name"])
        entries = [(ep["IPAddress"], names + ep["Aliases"]) for ep in ctr["NetworkSettings"]["Networks"].values()]
        runtime.write_hosts(os.path.join(self.ctr_state_dir(ctr["Id"]), "hosts"), ctr["Config"]["Hostname"], entries)

    async def start_container(self, ref: str) -> dict:
        async with self.lock:
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
        async with self.lock:
            await self._teardown_container(ctr)
            with self.store.tx():
                self.store.delete("containers", ctr["Id"])
            log.info("container removed", extra={"container": ctr["Name"], "id": ctr["Id"]})

    async def _delete_endpoint(self, ctr: dict, ep: dict) -> None:
        if ep.get("Driver") == "overlay":
            if self.overlay_agent is None:
                raise Conflict("this node left its swarm; its overlay endpoints are already gone")
            await self.overlay_agent.detach(ctr, ep)
        else:
            await self.k("delete_endpoint", ep["HostInterface"])

    async def _teardown_container(self, ctr: dict) -> None:
        for ep in list(ctr["NetworkSettings"]["Networks"].values()):
            if ep.get("Driver") == "overlay" and self.overlay_agent is None:
                continue  # the swarm is gone and with it the overlay's data plane
            await self._delete_endpoint(ctr, ep)
        if ctr["HostConfig"]["NetworkMode"] != "host":
            await self.k("delete_netns", self.netns_path(ctr["Id"]))
        shutil.rmtree(self.ctr_state_dir(ctr["Id"]), ignore_errors=True)

    def container_view(self, ctr: dict) -> dict:
        status, value = runtime.status(self.ctr_state_dir(ctr["Id"]))
        state = {"Status": {"running": "running", "exited": "exited"}.get(status, "created"),
                 "Running": status == "running", "Pid": value if status == "running" else 0,
                 "ExitCode": value if status == "exited" else 0}
        return {**ctr, "State": state}

    def list_containers(self, all: bool = False) -> list[dict]:
        views = [self.container_view(c) for c in self.store.list("containers")]
        return [v for v in views if all or v["State"]["Running"]]

    # -------------------------------------------------------------- reconcile
    async def reconcile(self) -> None:
        """Make the kernel match the store: after a restart, a crash or a reboot. Idempotent."""
        async with self.lock:
            nets = self.store.list("networks")
            by_id = {n["Id"]: n for n in nets}
            for net in nets:
                await self._program_network(net)
            await self._apply_firewall(nets)
            wanted_links = {n["bridge"] for n in nets}
            wanted_ns = set()
            for ctr in self.store.list("containers"):
                if ctr["HostConfig"]["NetworkMode"] == "host":
                    continue
                path = self.netns_path(ctr["Id"])
                wanted_ns.add(os.path.basename(path))
                await self.k("create_netns", path)
                for ep in ctr["NetworkSettings"]["Networks"].values():
                    if ep.get("Driver") == "overlay":
                        continue  # the overlay agent reconciles these
                    wanted_links.add(ep["HostInterface"])
                    await self._program_endpoint(ctr, by_id[ep["NetworkID"]], ep)
            for name in await self.k("list_links", VETH_PREFIX):
                if name not in wanted_links:
                    log.info("removing stale endpoint link", extra={"link": name})
                    await self.k("delete_endpoint", name)
            for name in await self.k("list_links", BRIDGE_PREFIX):
                if name not in wanted_links:
                    log.info("removing stale bridge", extra={"link": name})
                    await self.k("delete_bridge", name, None)
            for name in os.listdir(self.netns_dir):
                if name not in wanted_ns:
                    log.info("removing stale namespace", extra={"netns": name})
                    await self.k("delete_netns", os.path.join(self.netns_dir, name))
            log.info("reconciled", extra={"networks": len(nets)})


def _matches(net: dict, filters: dict[str, list[str]]) -> bool:
    for key, values in filters.items():
        if key == "name" and not any(v in net["Name"] for v in values):
            return False
        if key == "driver" and net["Driver"] not in values:
            return False
        if key == "id" and not any(net["Id"].startswith(v) for v in values):
            return False
        if key == "label":
            for v in values:
                k, sep, val = v.partition("=")
                if k not in net["Labels"] or (sep and net["Labels"][k] != val):
                    return False
        if key == "scope" and net["Scope"] not in values:
            return False
    return True


def _host_resolvers() -> tuple[list[str], list[str]]:
    """Nameservers and search domains of the host, minus loopback ones that mean nothing in a container."""
    servers, search = [], []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
                    servers.append(parts[1])
                elif parts and parts[0] == "search":
                    search = parts[1:]
    except OSError:
        pass
    return servers, search


