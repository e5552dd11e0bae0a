"""Published ports: a host port DNATed to an endpoint of this host (CNI's portMappings).

Kept in the local store beside the endpoints (settings "published-ports": endpoint ID -> its ports) and
rendered whole into one nftables table on every change and at start, from the endpoint records that
still exist: a port of an endpoint that is gone is never published. The destination is an address the
host routes to: an overlay endpoint's port on the gateway bridge, or a bridge network endpoint's own.
"""
from __future__ import annotations

import logging

from netweft.dataplane.firewall import PortRule
from netweft.errors import Conflict, InvalidRequest
from netweft.ipam import address as ipam
from netweft.model.codec import convert, to_builtins
from netweft.model.objects import Endpoint
from netweft.model.runtimes import PublishedPort
from netweft.store.local import ENDPOINTS, get_setting, put_setting

log = logging.getLogger("netweft.ports")

KEY = "published-ports"


def load(store) -> dict[str, list[PublishedPort]]:
    doc = get_setting(store, KEY) or {}
    try:
        return convert(doc.get("Endpoints", {}), dict[str, list[PublishedPort]], "published ports")
    except InvalidRequest as e:
        log.warning("the published ports are unreadable; none are published", extra={"reason": str(e)})
        return {}


def _save(store, published: dict[str, list[PublishedPort]]) -> None:
    put_setting(store, KEY, {"Endpoints": to_builtins(published)})


def destination(ep: Endpoint) -> str | None:
    """Where the host sends a published port's traffic for this endpoint (None: it has no such address)."""
    if ep.node_id:
        return ep.gw_ip   # an overlay endpoint: reached through its port on the gateway bridge
    return ep.ip


def rules(store) -> list[PortRule]:
    out = []
    eps = {d["id"]: d for d in store.list(ENDPOINTS)}
    for ep_id, ports in load(store).items():
        doc = eps.get(ep_id)
        if doc is None:
            continue
        ep = convert(doc, Endpoint, "endpoint record")
        dest = destination(ep)
        if dest is None:
            continue
        out += [PortRule(p.protocol, p.host_port, p.host_ip, dest, p.container_port) for p in ports]
    return out


def check(ep: Endpoint, ports: list[PublishedPort], published: dict[str, list[PublishedPort]]) -> None:
    if ports and destination(ep) is None:
        raise InvalidRequest("this endpoint has no address the host can reach (an --internal overlay): "
                             "it cannot publish ports")
    taken = {}
    for other, ps in published.items():
        if other != ep.id:
            for p in ps:
                taken[(p.protocol, p.host_port, p.host_ip)] = other
    mine = set()
    for p in ports:
        if p.host_ip:
            ipam.parse_address(p.host_ip)
        keys = [(p.protocol, p.host_port, p.host_ip)]
        keys += [(p.protocol, p.host_port, "")] if p.host_ip else \
            [k for k in taken if k[:2] == (p.protocol, p.host_port)]
        for k in keys:
            if k in taken or k in mine:
                raise Conflict(f"{p.protocol} port {p.host_port} of this host is already published; "
                               "choose another host port")
        mine.add((p.protocol, p.host_port, p.host_ip))


async def publish(engine, ep: Endpoint, ports: list[PublishedPort]) -> None:
    """Publish an endpoint's ports (replacing what it had): refused whole if one is taken."""
    async with engine.lock:
        published = load(engine.store)
        check(ep, ports, published)
        before = dict(published)
        if ports:
            published[ep.id] = list(ports)
        else:
            published.pop(ep.id, None)
        _save(engine.store, published)
        try:
            await _apply(engine)
        except BaseException:
            _save(engine.store, before)
            raise
    if ports:
        log.info("ports published", extra={"endpoint": ep.id, "ports": [p.host_port for p in ports]})


async def unpublish(engine, ep_ids: list[str]) -> None:
    async with engine.lock:
        published = load(engine.store)
        if not any(i in published for i in ep_ids):
            return
        for i in ep_ids:
            published.pop(i, None)
        _save(engine.store, published)
        await _apply(engine)


async def apply(engine) -> None:
    """Make the kernel's published ports the stored ones (at start: whatever a crash left)."""
    async with engine.lock:
        await _apply(engine)


async def _apply(engine) -> None:
    rs = rules(engine.store)
    if rs:
        await engine.dp.set_ip_forward(True)
    await engine.dp.apply_port_maps(rs)
