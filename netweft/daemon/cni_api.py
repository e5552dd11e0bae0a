"""The local API's side of the CNI plugin: /cni/add, /cni/del, /cni/check, /cni/gc, /cni/status.

A CNI attachment is an endpoint owned by (kind "cni", "<container ID>:<ifname>") in the namespace the
runtime made (CNI_NETNS). It goes through the engine's one path for endpoints (Engine.attach_owner), so
the agent programs, keeps and repairs it like a netweft container's, and it outlives a daemon restart.
"""
from __future__ import annotations

import logging
import os
from ipaddress import IPv4Network

from netweft.http import web

from netweft import validate
from netweft.daemon import ports
from netweft.errors import Conflict, InvalidRequest, NotFound, Unavailable
from netweft.ipam import address as ipam
from netweft.model.codec import to_builtins
from netweft.model.objects import Endpoint, Network, Owner
from netweft.model.runtimes import CniAttach, CniEndpoint, CniGC, CniGCResult, CniRef, CniStatus, owner_id
from netweft.store.local import get_setting

log = logging.getLogger("netweft.cni")

KIND = "cni"


def gw_ifname_for(ifname: str) -> str:
    """The gateway-bridge port's name inside the container, beside `ifname` (eth0 -> eth0gw)."""
    return (ifname + "gw")[-15:] if len(ifname) <= 13 else "gw" + ifname[-13:]


def good_aliases(names: list[str]) -> list[str]:
    """The aliases that are hostnames (a runtime's may not be: podman sends container names with '_')."""
    out = []
    for n in names:
        try:
            out.append(validate.check_hostname(n))
        except InvalidRequest:
            log.info("a CNI alias that is not a hostname is left out", extra={"alias": n[:80]})
    return list(dict.fromkeys(out))


def endpoint_answer(engine, net: Network, ep: Endpoint) -> CniEndpoint:
    gw_prefix = None
    if ep.gw_ip:
        gw = get_setting(engine.store, "gwbridge")
        gw_prefix = IPv4Network(gw["Subnet"]).prefixlen if gw else None
    return CniEndpoint(endpoint_id=ep.id, network_id=net.id, network=net.name, ifname=ep.ifname or "", mac=ep.mac,
                       ip=ep.ip, prefix_len=ep.prefix_len, gateway=ep.gateway, gw_ifname=ep.gw_ifname,
                       gw_mac=ipam.mac_for_ip(ipam.parse_address(ep.gw_ip)) if ep.gw_ip else None,
                       gw_ip=ep.gw_ip, gw_prefix_len=gw_prefix, subnet=net.subnet)


def routes(engine) -> web.RouteTableDef:
    from netweft.daemon.api import body
    r = web.RouteTableDef()

    def find(req: CniRef, net: Network) -> Endpoint | None:
        return next((e for e in engine.owned_endpoints(KIND, owner_id(req.container_id, req.ifname))
                     if e.network_id == net.id), None)

    @r.post("/cni/add")
    async def add(request):
        req = await body(request, CniAttach)
        if not os.path.exists(req.netns):
            raise NotFound(f"network namespace {req.netns} does not exist; the runtime must create it before ADD")
        owner = Owner(kind=KIND, id=owner_id(req.container_id, req.ifname), name=req.container_id[:12])
        net, ep = await engine.attach_owner(owner, req.network, req.netns, req.ifname, ip=req.ip, mac=req.mac,
                                            aliases=good_aliases(req.aliases), gw_ifname=gw_ifname_for(req.ifname))
        if req.ip and ep.ip != req.ip or req.mac and ep.mac != req.mac:
            raise Conflict(f"attachment {req.container_id[:12]}/{req.ifname} already exists with {ep.ip} {ep.mac}; "
                           "delete it first")
        if req.ports:
            try:
                await ports.publish(engine, ep, req.ports)
            except BaseException:
                await engine.detach_owner(KIND, owner.id, net.id)
                raise
        return web.json_response(to_builtins(endpoint_answer(engine, net, ep)))

    @r.post("/cni/del")
    async def delete(request):
        req = await body(request, CniRef)
        try:
            net = await engine.network(req.network)
        except NotFound:
            net = None   # gone with its network: remove whatever this attachment still holds anywhere
        except Unavailable:
            net = None
        n = await engine.detach_owner(KIND, owner_id(req.container_id, req.ifname), net.id if net else None)
        return web.json_response({"removed": n})

    @r.post("/cni/check")
    async def check(request):
        req = await body(request, CniRef)
        net = await engine.network(req.network)
        ep = find(req, net)
        if ep is None:
            raise NotFound(f"container {req.container_id[:12]} has no interface {req.ifname} on network "
                           f"{net.name!r}")
        if req.netns and ep.sandbox_key != req.netns:
            raise Conflict(f"interface {req.ifname} of container {req.container_id[:12]} is in {ep.sandbox_key}, "
                           f"not {req.netns}")
        if not os.path.exists(ep.sandbox_key):
            raise NotFound(f"the network namespace {ep.sandbox_key} of container {req.container_id[:12]} is gone")
        return web.json_response(to_builtins(endpoint_answer(engine, net, ep)))

    @r.post("/cni/gc")
    async def gc(request):
        req = await body(request, CniGC)
        net = await engine.network(req.network)
        keep = {owner_id(v.container_id, v.ifname) for v in req.valid}
        removed = []
        for ep in engine.endpoints_of_kind(KIND):
            if ep.network_id == net.id and ep.owner.id not in keep:
                await engine.detach_owner(KIND, ep.owner.id, net.id)
                removed.append(ep.owner.id)
        if removed:
            log.info("CNI garbage collection", extra={"network": net.name, "removed": len(removed)})
        return web.json_response(to_builtins(CniGCResult(removed=removed)))

    @r.post("/cni/status")
    async def status(request):
        req = await body(request, CniStatus)
        net = await engine.network(req.network)
        if net.driver == "overlay":
            agent = engine.overlay_agent
            if agent is None:
                raise Unavailable("this node is not part of a swarm: it cannot attach to overlay networks")
        return web.json_response({"network": net.name, "driver": net.driver})

    return r

