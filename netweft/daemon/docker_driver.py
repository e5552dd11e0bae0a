"""Docker's remote network + IPAM driver, served by netweftd on its own unix socket (by default Docker's
plugin directory, /run/docker/plugins/netweft.sock; `--docker-plugin-socket` moves it, and a spec file
`unix:///PATH` in /etc/docker/plugins/netweft.spec points Docker at it).

`docker network create -d netweft --ipam-driver netweft --subnet S NAME` makes a netweft overlay (on a
manager), labelled with Docker's network ID (or, with -o netweft.name=NET, adopts netweft network NET,
whose subnet must be S: podman's, Docker's and netweft's containers then share one overlay): the driver's scope is global, so every dockerd of the
cluster that shares Docker's cluster store sees the network, and each host's driver finds the overlay
by that label at the managers. Addresses come from the managers: the IPAM driver's RequestAddress
reserves an endpoint there for a fresh owner; CreateEndpoint ties Docker's endpoint to it; Join
attaches it, by the engine's one endpoint path, into the container's namespace (Docker's SandboxKey,
made in this host's namespace for Docker to move in: the container's namespace does not exist yet at
Join). The record then names where the interface lives after the move (the sandbox as dockerd sees it,
/proc/<dockerd>/root<SandboxKey>, eth<N>), so the agent's resync checks the pair there. Docker's own
gateway service is disabled: a Docker container on a netweft overlay reaches the overlay, not beyond it.

What the driver keeps itself (Docker does not replay CreateNetwork or CreateEndpoint after a restart of
either daemon): Docker endpoint -> owner and reservations, in the local store; the overlays are the
cluster's.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
from ipaddress import IPv4Network

import msgspec
from netweft.http import web

from netweft.errors import InvalidRequest, NetweftError, NotFound, Unavailable
from netweft.ipam import address as ipam
from netweft.model.codec import convert, to_builtins
from netweft.model.objects import Network, Owner
from netweft.plugins import docker as d
from netweft.store.local import get_setting, put_setting

log = logging.getLogger("netweft.docker")

KIND = "docker"
STATE_KEY = "docker-driver"
DEFAULT_SOCKET = "/run/docker/plugins/netweft.sock"
MAX_BODY = 256 * 1024


class Reservation(msgspec.Struct, kw_only=True):
    owner: str                  # the owner ID the endpoint is held for at the managers
    network_id: str             # the netweft overlay
    ip: str
    mac: str
    endpoint_id: str            # the managers' endpoint


class DockerEndpoint(msgspec.Struct, kw_only=True):
    owner: str
    network_id: str
    ip: str
    mac: str


class State(msgspec.Struct, kw_only=True):
    reservations: dict[str, Reservation] = {}     # "<overlay id>|<ip>" -> what is held
    endpoints: dict[str, DockerEndpoint] = {}     # Docker's endpoint ID -> its owner


def peer_pid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return pid or None


class DockerDriver:
    def __init__(self, engine):
        self.engine = engine
        self._nets: dict[str, str] = {}   # Docker network ID -> overlay ID, learnt

    # ------------------------------------------------------------------ state
    def _load(self) -> State:
        doc = get_setting(self.engine.store, STATE_KEY)
        if doc is None:
            return State()
        try:
            return convert(doc, State, "Docker driver state")
        except InvalidRequest as e:
            log.warning("the Docker driver's state is unreadable; starting afresh", extra={"reason": str(e)})
            return State()

    def _save(self, st: State) -> None:
        put_setting(self.engine.store, STATE_KEY, to_builtins(st))

    def _agent(self):
        agent = self.engine.overlay_agent
        if agent is None:
            raise Unavailable("this host is not in a netweft swarm: run `netweft swarm init` or `join` first")
        return agent

    async def _overlay(self, docker_id: str) -> Network | None:
        """The overlay of a Docker network, by its label, asked of the managers if not known here."""
        agent = self._agent()
        known = self._nets.get(docker_id)
        if known:
            net = agent.find_network(known)
            if net is not None:
                return net
        for net in await agent.fetch_networks():
            if net.labels.get(d.DOCKER_LABEL) == docker_id:
                self._nets[docker_id] = net.id
                return net
        return None

    async def _overlay_for(self, docker_id: str, ip: str) -> Network | None:
        """A Docker network's overlay: by its label, or (one netweft network adopted with -o netweft.name)
        the overlay whose subnet holds the address (overlay subnets never overlap)."""
        net = await self._overlay(docker_id)
        if net is not None:
            return net
        addr = ipam.parse_address(ip)
        return next((n for n in await self._agent().fetch_networks() if addr in IPv4Network(n.subnet)), None)

    async def _overlay_of_subnet(self, subnet: IPv4Network) -> Network:
        for net in await self._agent().fetch_networks():
            if IPv4Network(net.subnet) == subnet:
                return net
        raise NotFound(f"no netweft network has subnet {subnet} yet; create the Docker network first "
                       "(docker network create -d netweft --ipam-driver netweft --subnet ...)")

    # ------------------------------------------------------------------ network driver
    async def create_network(self, req: d.CreateNetwork) -> dict:
        if req.IPv6Data:
            raise InvalidRequest("IPv6 is not supported on netweft networks: create it without --ipv6")
        if not req.IPv4Data or len(req.IPv4Data) != 1 or not req.IPv4Data[0].Pool:
            raise InvalidRequest("a netweft network needs exactly one IPv4 subnet (--subnet)")
        if await self._overlay(req.NetworkID) is not None:
            return {}   # made already (from another host, or a replay)
        opts = d.generic_options(req.Options)
        data = req.IPv4Data[0]
        subnet = ipam.parse_network(data.Pool)
        if d.NAME_OPT in opts:
            # An existing netweft network, adopted: other runtimes' containers may already be on it.
            existing = next((n for n in await self._agent().fetch_networks() if n.name == opts[d.NAME_OPT]), None)
            if existing is not None:
                if IPv4Network(existing.subnet) != subnet:
                    raise InvalidRequest(f"netweft network {existing.name!r} has subnet {existing.subnet}, not "
                                         f"{subnet}: give --subnet {existing.subnet}")
                log.info("Docker network adopts a netweft network", extra={"docker_network": req.NetworkID,
                                                                            "network": existing.name})
                return {}
        gateway = str(d.parse_address(data.Gateway, "gateway")) if data.Gateway else None
        internal = (req.Options or {}).get(d.INTERNAL) is True
        body = {"Name": d.overlay_name(req.NetworkID, opts), "Driver": "overlay", "Attachable": True,
                "Internal": internal, "Labels": {d.DOCKER_LABEL: req.NetworkID},
                "Options": {k: v for k, v in opts.items() if k != d.NAME_OPT},
                "IPAM": {"Config": [{"Subnet": str(subnet), "Gateway": gateway or "",
                                     "AuxiliaryAddresses": dict(data.AuxAddresses or {})}]}}
        net = await self.engine.create_network(body)
        self._nets[req.NetworkID] = net["Id"]
        log.info("Docker network created", extra={"docker_network": req.NetworkID, "network": net["Name"]})
        return {}

    async def delete_network(self, req: d.NetworkRef) -> dict:
        net = await self._overlay(req.NetworkID)
        if net is None:
            return {}
        try:
            await self.engine.remove_network(net.id)
        except NotFound:
            pass
        self._nets.pop(req.NetworkID, None)
        log.info("Docker network removed", extra={"docker_network": req.NetworkID, "network": net.name})
        return {}

    async def create_endpoint(self, req: d.CreateEndpoint) -> dict:
        iface = req.Interface or d.EndpointInterface()
        if iface.AddressIPv6:
            raise InvalidRequest("IPv6 is not supported on netweft networks")
        if not iface.Address:
            raise InvalidRequest("the endpoint has no IPv4 address: Docker's IPAM gave none")
        ip = str(d.parse_address(iface.Address, "endpoint address"))
        net = await self._overlay_for(req.NetworkID, ip)
        if net is None:
            raise NotFound(f"Docker network {req.NetworkID[:12]} has no netweft network; recreate it")
        mac = ipam.parse_mac(iface.MacAddress) if iface.MacAddress else None
        st = self._load()
        res = st.reservations.get(f"{net.id}|{ip}")
        owner = res.owner if res else "ep-" + secrets.token_hex(8)
        chosen = mac or (res.mac if res else ipam.mac_for_ip(ipam.parse_address(ip)))
        st.endpoints[req.EndpointID] = DockerEndpoint(owner=owner, network_id=net.id, ip=ip, mac=chosen)
        self._save(st)
        return {} if mac else {"Interface": {"MacAddress": chosen}}

    async def join(self, req: d.Join, pid: int | None) -> dict:
        st = self._load()
        ep = st.endpoints.get(req.EndpointID)
        if ep is None:
            raise NotFound(f"endpoint {req.EndpointID[:12]} is unknown to netweft's driver; recreate the container")
        # The veth's container end is made here, in this host's namespace, named for the owner; Docker moves
        # it into the container (whose namespace does not exist yet at Join) and names it eth<N>.
        tmp = d.TMP_PREFIX + ep.owner[-12:]
        owner = Owner(kind=KIND, id=ep.owner, name=req.EndpointID[:12])
        here = f"/proc/{os.getpid()}/ns/net"
        box = f"/proc/{pid}/root{req.SandboxKey}" if pid else req.SandboxKey
        index = len([e for e in self.engine.endpoints_of_kind(KIND) if e.sandbox_key == box])
        _net, made = await self.engine.attach_owner(owner, ep.network_id, here, tmp, ip=ep.ip, mac=ep.mac)
        if made.sandbox_key == here and self.engine.overlay_agent is not None:
            # Where the resync finds it once Docker has moved it: the sandbox as dockerd sees it.
            await self.engine.overlay_agent.relocate(made, box, f"eth{index}")
        return {"InterfaceName": {"SrcName": tmp, "DstPrefix": "eth"}, "DisableGatewayService": True}

    async def leave(self, req: d.EndpointRef) -> dict:
        ep = self._load().endpoints.get(req.EndpointID)
        if ep is not None:
            await self.engine.detach_owner(KIND, ep.owner)
        return {}

    async def delete_endpoint(self, req: d.EndpointRef) -> dict:
        st = self._load()
        ep = st.endpoints.pop(req.EndpointID, None)
        if ep is not None:
            await self.engine.detach_owner(KIND, ep.owner)
            self._save(st)
        return {}

    # ------------------------------------------------------------------ IPAM driver
    async def request_pool(self, req: d.RequestPool) -> dict:
        if req.V6:
            raise InvalidRequest("IPv6 is not supported on netweft networks: create it without --ipv6")
        if not req.Pool:
            raise InvalidRequest("netweft's IPAM driver needs the subnet: give --subnet")
        subnet = ipam.parse_network(req.Pool)
        sub = ipam.parse_network(req.SubPool) if req.SubPool else None
        if sub is not None and not sub.subnet_of(subnet):
            raise InvalidRequest(f"--ip-range {sub} is not inside --subnet {subnet}")
        return {"PoolID": d.pool_id(subnet, sub), "Pool": str(subnet), "Data": {}}

    async def request_address(self, req: d.RequestAddress) -> dict:
        subnet, _sub = d.parse_pool_id(req.PoolID)
        opts = req.Options or {}
        if opts.get("RequestAddressType") == d.GATEWAY_REQUEST:
            gw = d.parse_address(req.Address, "gateway") if req.Address else next(subnet.hosts())
            if gw not in subnet:
                raise InvalidRequest(f"gateway {gw} is not inside {subnet}")
            return {"Address": f"{gw}/{subnet.prefixlen}", "Data": {}}
        net = await self._overlay_of_subnet(subnet)
        ip = str(d.parse_address(req.Address, "address")) if req.Address else None
        mac = opts.get("com.docker.network.endpoint.macaddress") or None
        owner = Owner(kind=KIND, id="ep-" + secrets.token_hex(8), name="docker")
        ep = await self._agent().reserve(owner, net.id, ip=ip, mac=ipam.parse_mac(mac) if mac else None)
        st = self._load()
        st.reservations[f"{net.id}|{ep.ip}"] = Reservation(owner=owner.id, network_id=net.id, ip=ep.ip, mac=ep.mac,
                                                           endpoint_id=ep.id)
        self._save(st)
        return {"Address": f"{ep.ip}/{subnet.prefixlen}", "Data": {}}

    async def release_address(self, req: d.ReleaseAddress) -> dict:
        subnet, _ = d.parse_pool_id(req.PoolID)
        ip = str(d.parse_address(req.Address, "address"))
        st = self._load()
        key = next((k for k, r in st.reservations.items() if r.ip == ip and ipam.parse_address(r.ip) in subnet),
                   None)
        if key is None:
            return {}   # a gateway, or released already
        res = st.reservations.pop(key)
        if self.engine.owned_endpoints(KIND, res.owner):
            await self.engine.detach_owner(KIND, res.owner)
        else:
            try:
                await self._agent().release(res.endpoint_id)
            except Unavailable:
                st.reservations[key] = res   # kept: released when Docker asks again, or by hand
                raise
        self._save(st)
        return {}


def app(engine) -> web.Application:
    """The driver's HTTP app: every body parsed into its struct; errors are {"Err": one line}."""
    driver = DockerDriver(engine)
    routes = web.RouteTableDef()

    def answer(doc: dict) -> web.Response:
        return web.Response(body=msgspec.json.encode(doc), content_type="application/json")

    def handle(path: str, type_, fn, with_pid: bool = False):
        @routes.post(path)
        async def handler(request):
            data = await request.read()
            try:
                req = msgspec.json.decode(data.strip() or b"{}", type=type_)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                msg = f"bad {path.lstrip('/')} request: {' '.join(str(e).split())[:300]}"
                log.info("Docker driver request refused", extra={"path": path, "reason": msg})
                return web.Response(status=400, body=d.error_body(msg), content_type="application/json")
            except RecursionError:
                return web.Response(status=400, body=d.error_body(f"bad {path.lstrip('/')} request: nested too "
                                                                  "deeply"), content_type="application/json")
            try:
                out = await (fn(req, peer_pid(request)) if with_pid else fn(req))
            except NetweftError as e:
                log.info("Docker driver request refused", extra={"path": path, "reason": str(e)})
                return web.Response(status=e.status, body=d.error_body(str(e)),
                                    content_type="application/json")
            except Exception:
                log.exception("Docker driver request failed", extra={"path": path})
                return web.Response(status=500, body=d.error_body("netweftd failed on this request (an internal "
                                                                  "error); its log has the details"),
                                    content_type="application/json")
            return answer(out)
        return handler

    async def nothing(_req):
        return {}

    async def ok(doc):
        return doc

    handle("/Plugin.Activate", d.Empty, lambda _r: ok({"Implements": d.IMPLEMENTS}))
    handle("/NetworkDriver.GetCapabilities", d.Empty,
           lambda _r: ok({"Scope": "global", "ConnectivityScope": "global"}))
    handle("/NetworkDriver.CreateNetwork", d.CreateNetwork, driver.create_network)
    handle("/NetworkDriver.DeleteNetwork", d.NetworkRef, driver.delete_network)
    handle("/NetworkDriver.AllocateNetwork", d.Empty, lambda _r: ok({"Options": {}}))
    handle("/NetworkDriver.FreeNetwork", d.Empty, nothing)
    handle("/NetworkDriver.CreateEndpoint", d.CreateEndpoint, driver.create_endpoint)
    handle("/NetworkDriver.EndpointOperInfo", d.EndpointRef, lambda _r: ok({"Value": {}}))
    handle("/NetworkDriver.DeleteEndpoint", d.EndpointRef, driver.delete_endpoint)
    handle("/NetworkDriver.Join", d.Join, driver.join, with_pid=True)
    handle("/NetworkDriver.Leave", d.EndpointRef, driver.leave)
    handle("/NetworkDriver.DiscoverNew", d.Discovery, nothing)
    handle("/NetworkDriver.DiscoverDelete", d.Discovery, nothing)
    handle("/NetworkDriver.ProgramExternalConnectivity", d.EndpointRef, nothing)
    handle("/NetworkDriver.RevokeExternalConnectivity", d.EndpointRef, nothing)
    handle("/IpamDriver.GetCapabilities", d.Empty,
           lambda _r: ok({"RequiresMACAddress": False, "RequiresRequestReplay": False}))
    handle("/IpamDriver.GetDefaultAddressSpaces", d.Empty,
           lambda _r: ok({"LocalDefaultAddressSpace": d.ADDRESS_SPACE, "GlobalDefaultAddressSpace": d.ADDRESS_SPACE}))
    handle("/IpamDriver.RequestPool", d.RequestPool, driver.request_pool)
    handle("/IpamDriver.ReleasePool", d.PoolRef, nothing)
    handle("/IpamDriver.RequestAddress", d.RequestAddress, driver.request_address)
    handle("/IpamDriver.ReleaseAddress", d.ReleaseAddress, driver.release_address)

    @web.middleware
    async def unknown(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return web.Response(status=e.status, body=d.error_body(f"{request.method} {request.path[:80]} is not "
                                                                   "part of Docker's driver protocol"),
                                content_type="application/json")

    application = web.Application(middlewares=[unknown], client_max_size=MAX_BODY)
    application.add_routes(routes)
    return application


class Served:
    """The driver's socket while netweftd runs; close() removes it (Docker then sees the plugin gone)."""

    def __init__(self, runner: web.AppRunner | None, path: str):
        self.runner, self.path = runner, path

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


async def serve(engine, path: str) -> Served:
    """Serve the driver on unix socket `path` ("" serves nothing), root's alone (Docker runs as root)."""
    if not path:
        return Served(None, path)
    runner = web.AppRunner(app(engine), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, path, shutdown_timeout=2.0).start()
    finally:
        os.umask(old)
    log.info("Docker network and IPAM driver ready", extra={"socket": path})
    return Served(runner, path)
