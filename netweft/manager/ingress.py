"""The ingress network: the one overlay the routing mesh uses, made at `swarm init` and re-made by operators.

Rules (Docker's): at most one network is the ingress; it is not attachable (only the routing mesh and
service tasks are on it); removing it is refused while a service publishes a port in ingress mode.
Every node watches it whether or not it has endpoints on it (manager/watch.py's scope), so a host sees a
new ingress network as soon as its watch delivers it.

`swarm init` makes one named "ingress" from the default address pool, from the top of the pool down: the
operator's own networks keep the start of the pool, as they had it before the cluster had an ingress.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Network

from netweft.errors import Conflict, InvalidRequest, NetweftError, PoolExhausted
from netweft.ipam.address import AddressPool, overlapping
from netweft.model.api import NetworkCreate
from netweft.model.objects import Network

log = logging.getLogger("netweft.manager.ingress")

DEFAULT_NAME = "ingress"


def check_request(req: NetworkCreate) -> None:
    """What an ingress request cannot be, whatever else exists."""
    if req.Attachable:
        raise InvalidRequest("an ingress network cannot be attachable: only the routing mesh and service tasks "
                             "use it; create it without --attachable")
    if req.Internal:
        raise InvalidRequest("an ingress network cannot be internal: published ports come in through it")


def check_unique(nets: list[Network]) -> None:
    """A second ingress network is refused."""
    other = next((n for n in nets if n.ingress), None)
    if other is not None:
        raise Conflict(f"an ingress network already exists ({other.name!r}); there is one per cluster: "
                       f"remove it first with `netweft network rm {other.name}`")


def top_subnet(pools: list[AddressPool], taken: list[IPv4Network]) -> IPv4Network:
    """The last subnet of the pools that overlaps nothing taken."""
    for pool in reversed(pools):
        step = 1 << (32 - pool.size)
        first = int(pool.base.network_address)
        n = int(pool.base.broadcast_address) + 1 - step
        while n >= first:
            cand = IPv4Network((n, pool.size))
            hit = overlapping(cand, taken)
            if hit is None:
                return cand
            n = min(n - step, (int(hit.network_address) - step) // step * step)
    raise PoolExhausted("the default address pools are exhausted; create the ingress network with --subnet")


def publishing_services(services: list) -> list[str]:
    """Names of services that publish a port in ingress mode (each has .name and .ports with .mode)."""
    return sorted(s.name for s in services
                  if any(getattr(p, "mode", "ingress") == "ingress" for p in getattr(s, "ports", ()) or ()))


def check_removal(net: Network, services: list) -> None:
    """Refuse removing the ingress network while the routing mesh carries published ports."""
    if not net.ingress:
        return
    names = publishing_services(services)
    if names:
        raise Conflict(f"ingress network {net.name!r} is in use by services publishing ports "
                       f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}); remove them or "
                       "their published ports first")


async def create_default(overlays) -> None:
    """`swarm init`'s ingress network. A failure is logged: the swarm works without it (no routing mesh)."""
    try:
        await overlays.create_network({"Name": DEFAULT_NAME, "Driver": "overlay", "Ingress": True})
    except NetweftError as e:
        log.warning("the ingress network could not be created; published ports need one: create it with "
                    "`netweft network create -d overlay --ingress NAME`", extra={"reason": str(e)})
