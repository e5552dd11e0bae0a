"""Cluster-wide overlay networks and their endpoints: the allocations (subnet, VNI, address, MAC).

Every change is one compare-and-write transaction on the cluster store (Hub.commit): it reads the
manager's view, decides, and lands only if what it decided from is unchanged, else it decides again.
What an allocation decides from is covered by a guard object whose revision moves with it:

    allocations/networks        the set of networks (names, subnets, VNIs)
    allocations/net/<id>        the endpoints of one network (addresses, MACs)
    allocations/node/<id>       the endpoints of one node (so a node's purge misses none)

so two managers (with etcd) can never hand out the same thing. Within this process a lock keeps
its own requests from conflicting with each other.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

from netweft import metrics, validate
from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound, PoolExhausted
from netweft.ipam import address as ipam
from netweft.ipam import tunnel
from netweft.manager import ingress
from netweft.manager.watch import ALLOCATIONS, ENDPOINTS, NETWORKS, NODES, Hub
from netweft.model import codec
from netweft.model.api import NetworkCreate
from netweft.model.objects import NAME_PATTERN, Endpoint, Hostname, Network
from netweft.model.watch import EndpointRequest
from netweft.store.api import Compare, Delete, Put

log = logging.getLogger("netweft.manager.overlays")

VNI_FIRST = 4096
VNI_LAST = validate.VNI_LAST
GUARD = b"{}"   # a guard's value does not matter, only its revision
NETWORKS_GUARD = "networks"
MAX_NODE_ENDPOINTS = 4096   # overlay endpoints one node may hold: one node cannot take every address

_NAME = re.compile(NAME_PATTERN)


def net_guard(net_id: str) -> str:
    return f"net/{net_id}"


def node_guard(node_id: str) -> str:
    return f"node/{node_id}"


_ID = re.compile(r"\A[a-z0-9]{1,64}\Z")
_REV = re.compile(r"\A[0-9]{1,18}\Z")


class AttachQuery:
    """What POST /endpoints?... asks of the answer's state (the network's endpoints grow with the network):
    `state=none`: none (a reservation); `anchor=EP&since=REV`: none if the asker's copy is current at REV
    and its endpoint EP has been on the network since a revision <= REV (then the watch has carried the
    network to the asker since: see `Overlays._anchored`); by default all of them."""

    __slots__ = ("state", "anchor", "since")

    def __init__(self, state: bool = True, anchor: str | None = None, since: int | None = None):
        self.state, self.anchor, self.since = state, anchor, since

    @classmethod
    def parse(cls, query) -> "AttachQuery":
        unknown = set(query) - {"state", "anchor", "since"}
        if unknown:
            raise InvalidRequest(f"unknown query parameter {sorted(unknown)[0][:40]!r} of POST /endpoints")
        state = query.get("state", "all")
        if state not in ("all", "none"):
            raise InvalidRequest(f"invalid state={state[:40]!r} of POST /endpoints: all or none")
        anchor, since = query.get("anchor"), query.get("since")
        if (anchor is None) != (since is None):
            raise InvalidRequest("POST /endpoints takes anchor= and since= together")
        if anchor is not None and not _ID.match(anchor):
            raise InvalidRequest(f"invalid anchor={anchor[:80]!r} of POST /endpoints: an endpoint ID")
        if since is not None and not _REV.match(since):
            raise InvalidRequest(f"invalid since={since[:40]!r} of POST /endpoints: a revision")
        return cls(state == "all", anchor, int(since) if since is not None else None)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def subnet_config(net: Network) -> ipam.SubnetConfig:
    return ipam.SubnetConfig(subnet=IPv4Network(net.subnet), gateway=IPv4Address(net.gateway),
                             ip_range=IPv4Network(net.ip_range) if net.ip_range else None,
                             aux={k: IPv4Address(v) for k, v in net.aux_addresses.items()})


class _Taken:
    """Addresses in use, as integers, asked with IPv4Address (what ipam.check_requested_ip does)."""

    def __init__(self, ints: set[int]):
        self.ints = ints

    def __contains__(self, ip: IPv4Address) -> bool:
        return int(ip) in self.ints


class Overlays:
    def __init__(self, hub: Hub, spec_fn):
        self.hub, self.spec = hub, spec_fn
        self._lock = asyncio.Lock()
        # async () -> [(prefix, words)]: the routes and addresses of the leader's host (daemon/collisions.py),
        # which an explicit subnet must not overlap and automatic choices skip. None: no host to ask.
        self.host_claims = None
        # Set by manager/services.py: may (node, owner) join non-attachable network (a service's task)?
        # and may this network go (the ingress network is kept while services publish ports)?
        self.may_attach = None
        self.check_removal = None

    @property
    def state(self):
        return self.hub.state

    # ------------------------------------------------------------- networks
    def network(self, ref: str) -> Network:
        net = self.state.find_network(ref)
        if net is None:
            raise NotFound(f"network {ref!r} not found; see `netweft network ls`")
        return net

    def network_bytes(self, ref: str) -> bytes:
        """GET /networks/{ref}: the stored Network JSON, as it is."""
        return self.state.kinds[NETWORKS][self.network(ref).id].raw

    async def create_network(self, body) -> dict:
        """A new overlay network from a Docker-shaped NetworkCreate (a dict, JSON bytes, or the struct);
        returns the Network as plain JSON types. The engine of the leader calls this directly."""
        if isinstance(body, (bytes, str)):
            req = codec.decode(body, NetworkCreate, "network create request")
        elif isinstance(body, NetworkCreate):
            req = body
        else:
            req = codec.convert(body, NetworkCreate, "network create request")
        spec = self._check_request(req)
        claims = await self.host_claims() if self.host_claims is not None else []
        async with self._lock:
            net, _ = await self.hub.commit(lambda: self._plan_network(req, spec, claims))
        metrics.allocated("network")
        log.info("overlay network created", extra={"network": net.name, "subnet": net.subnet, "vni": net.vni})
        return codec.to_builtins(net)

    @staticmethod
    def _check_request(req: NetworkCreate) -> dict:
        """What can be refused without looking at the other networks. Returns the parsed options."""
        if not _NAME.match(req.Name):
            raise InvalidRequest(f"invalid network name {req.Name[:80]!r}: use letters, digits, '_', '.', '-' "
                                 "(starting with a letter or digit, at most 64 characters)")
        if req.Driver != "overlay":
            raise InvalidRequest(f"the cluster creates overlay networks only, not {req.Driver[:40]!r}: "
                                 "create other networks on the host itself")
        if req.Ingress:
            ingress.check_request(req)
        if req.EnableIPv6:
            raise InvalidRequest("IPv6 is not supported on overlay networks yet: create the network without --ipv6")
        if req.IPAM.Driver not in ("", "default"):
            raise InvalidRequest(f"IPAM driver {req.IPAM.Driver[:40]!r} is not supported: use the default one")
        options = validate.check_driver_options("overlay", dict(req.Options))
        if options.get(validate.ENCRYPTED_OPT, "") not in ("", "true", "1"):
            raise InvalidRequest(f"invalid -o encrypted={options[validate.ENCRYPTED_OPT][:40]!r}: give -o encrypted "
                                 "alone (or =true)")
        out: dict = {"mtu": validate.parse_mtu(options[validate.MTU_OPT]) if validate.MTU_OPT in options else None,
                     "vni": validate.parse_vni(options[validate.VXLANID_OPT]) if validate.VXLANID_OPT in options
                     else None, "options": options}
        if len(req.IPAM.Config) > 1:
            raise InvalidRequest("exactly one IPAM config (subnet) per network is supported")
        c = req.IPAM.Config[0] if req.IPAM.Config else None
        if c is not None and not c.Subnet and (c.Gateway or c.IPRange or c.AuxiliaryAddresses):
            raise InvalidRequest("--gateway, --ip-range and --aux-address need --subnet")
        if c is not None and c.Subnet:
            out["cfg"] = ipam.build_subnet_config(ipam.parse_network(c.Subnet), c.Gateway or None,
                                                  c.IPRange or None, dict(c.AuxiliaryAddresses))
            tunnel.check_not_tunnels(out["cfg"].subnet)
        return out

    def _plan_network(self, req: NetworkCreate, spec: dict, claims=()):
        st = self.state
        nets = st.networks()
        if req.Name in st.names:
            raise Conflict(f"network {req.Name!r} already exists; choose another name or remove it first")
        if req.Name in st.kinds[NETWORKS]:
            raise Conflict(f"network name {req.Name!r} is the ID of another network; choose another name")
        if req.Ingress:
            ingress.check_unique(nets)
        vnis = {n.vni for n in nets}
        vni = spec["vni"]
        if vni is None:
            vni = next((v for v in range(VNI_FIRST, VNI_LAST + 1) if v not in vnis), None)
            if vni is None:
                raise PoolExhausted("no VXLAN ID left; remove unused overlay networks")
        elif vni in vnis:
            raise Conflict(f"VXLAN ID {vni} is already used by another network")
        taken = [(IPv4Network(n.subnet), n.name) for n in nets]
        cfg = spec.get("cfg")
        if cfg is not None:
            for other, oname in taken:
                if cfg.subnet.overlaps(other):
                    raise Conflict(f"subnet {cfg.subnet} overlaps {other} of network {oname!r}; "
                                   "choose another subnet")
            for other, what in claims:
                if cfg.subnet.overlaps(other):
                    raise Conflict(f"subnet {cfg.subnet} overlaps {other} of {what} (the manager's host; containers "
                                   "could not reach it); choose another subnet")
        else:
            cluster = self.spec()
            pools = [ipam.AddressPool(IPv4Network(p), cluster["SubnetSize"]) for p in cluster["DefaultAddrPool"]]
            allocate = ingress.top_subnet if req.Ingress else ipam.allocate_subnet
            cfg = ipam.build_subnet_config(allocate(pools, [t for t, _ in taken] + [c for c, _ in claims] +
                                                    [tunnel.TUNNEL_NET]))
        net_id = secrets.token_hex(32)
        while net_id in st.names or net_id in st.kinds[NETWORKS]:
            net_id = secrets.token_hex(32)
        net = Network(id=net_id, name=req.Name, driver="overlay", scope="swarm", created=utcnow(),
                      subnet=str(cfg.subnet), gateway=str(cfg.gateway),
                      ip_range=str(cfg.ip_range) if cfg.ip_range else None,
                      aux_addresses={k: str(v) for k, v in cfg.aux.items()},
                      internal=req.Internal, attachable=req.Attachable, options=spec["options"],
                      encrypted=validate.ENCRYPTED_OPT in spec["options"],
                      labels=dict(req.Labels), mtu=spec["mtu"], vni=vni, ingress=req.Ingress)
        compares = [Compare(ALLOCATIONS, NETWORKS_GUARD, st.mod_rev(ALLOCATIONS, NETWORKS_GUARD))]
        ops = [Put(NETWORKS, net.id, codec.encode(net)), Put(ALLOCATIONS, NETWORKS_GUARD, GUARD),
               Put(ALLOCATIONS, net_guard(net.id), GUARD)]
        return compares, ops, net

    async def remove_network(self, ref: str) -> None:
        async with self._lock:
            net, _ = await self.hub.commit(lambda: self._plan_remove(ref))
        metrics.released("network")
        log.info("overlay network removed", extra={"network": net.name})

    def _plan_remove(self, ref: str):
        st = self.state
        net = self.network(ref)
        if self.check_removal is not None:
            self.check_removal(net)
        eps = st.endpoints_of(net.id)
        if eps:
            where = sorted({f"{e.owner.name or e.owner.id[:12]} on {e.hostname or e.node_id}" for e in eps})
            raise Conflict(f"network {net.name!r} has endpoints ({', '.join(where[:5])}"
                           f"{' ...' if len(where) > 5 else ''}); disconnect or remove them first")
        compares = [Compare(NETWORKS, net.id, st.mod_rev(NETWORKS, net.id)),
                    Compare(ALLOCATIONS, net_guard(net.id), st.mod_rev(ALLOCATIONS, net_guard(net.id))),
                    Compare(ALLOCATIONS, NETWORKS_GUARD, st.mod_rev(ALLOCATIONS, NETWORKS_GUARD))]
        ops = [Delete(NETWORKS, net.id), Delete(ALLOCATIONS, net_guard(net.id)),
               Put(ALLOCATIONS, NETWORKS_GUARD, GUARD)]
        return compares, ops, net

    # ------------------------------------------------------------ endpoints
    async def create_endpoint(self, node_id: str, req: EndpointRequest, query: AttachQuery | None = None) -> bytes:
        """POST /endpoints: an address on an overlay for one of the node's endpoints. Returns the
        Attachment JSON: the endpoint, and its network with every endpoint at the creation's revision
        (unless the query says the asker needs none: then `partial`, the cost independent of the network)."""
        query = query or AttachQuery()
        aliases = codec.convert(req.aliases, list[Hostname], "endpoint request aliases")
        ip = ipam.parse_address(req.ip) if req.ip else None
        mac = ipam.parse_mac(req.mac) if req.mac else None
        async with self._lock:
            (ep, parts), rev = await self.hub.commit(lambda: self._plan_endpoint(node_id, req, ip, mac, aliases,
                                                                                 query))
        net_raw, ep_raw, others, seen = parts
        metrics.allocated("endpoint", int(ep is not None))
        if ep is None:
            # A retried request: the endpoint it made before, with the endpoints at the revision they
            # were read at (the commit's wait may have moved the state on since; an agent taking a later
            # revision would skip the events in between).
            rev = seen
        if others is None:
            return b'{"rev":%d,"endpoint":%s,"network":%s,"endpoints":[],"partial":true}' % (rev, ep_raw, net_raw)
        # The nodes of the network's endpoints too: the watch sends an agent only the nodes it shares a network
        # with, and this one may be new to it.
        nodes = b",".join(self.state.network_nodes(req.network_id))
        return b'{"rev":%d,"endpoint":%s,"network":%s,"endpoints":[%s],"nodes":[%s]}' % (
            rev, ep_raw, net_raw, b",".join(others), nodes)

    def _anchored(self, node_id: str, net_id: str, query: AttachQuery) -> bool:
        """Does the asker need none of the network's endpoints? Its anchor endpoint is on the network, the
        node's, unchanged since a revision <= `since`: the network has been in the node's watch scope all
        that time (an endpoint of the node on it), so the watch has brought or brings every change after
        `since` to the asker, whose copy is current at `since`. O(1)."""
        if not query.state:
            return True
        if query.anchor is None:
            return False
        ep = self.state.get(ENDPOINTS, query.anchor)
        return (ep is not None and ep.node_id == node_id and ep.network_id == net_id
                and self.state.mod_rev(ENDPOINTS, query.anchor) <= query.since)

    def _plan_endpoint(self, node_id: str, req: EndpointRequest, ip: IPv4Address | None, mac: str | None,
                       aliases: list[str], query: AttachQuery):
        st = self.state
        node = st.get(NODES, node_id)
        if node is None:
            raise Forbidden(f"node {node_id} is not a member of this cluster")
        net = st.get(NETWORKS, req.network_id)
        if net is None:
            raise NotFound(f"network {req.network_id!r} not found; see `netweft network ls`")
        # Whatever the request says: only the managers will place service tasks on such a network.
        if not net.attachable and not (self.may_attach and self.may_attach(node.id, req.owner, net.id)):
            raise Forbidden(f"network {net.name!r} is not attachable: it is kept for services; "
                            "create it with --attachable to run plain containers on it")
        eps = st.kinds[ENDPOINTS]
        net_raw = st.kinds[NETWORKS][net.id].raw
        known = st.owners.get((net.id, node.id, req.owner.kind, req.owner.id))
        partial = self._anchored(node.id, net.id, query)
        if known is not None:
            others = None if partial else [eps[e].raw for e in st.net_eps[net.id]]
            return [], [], (None, (net_raw, eps[known].raw, others, st.rev))
        held = sum(st.node_nets.get(node.id, {}).values())
        if held >= MAX_NODE_ENDPOINTS:
            raise Conflict(f"node {node.hostname!r} already holds {held} overlay endpoints, the most one node may "
                           "hold; remove containers from it first")
        cfg = subnet_config(net)
        used = st.net_ips[net.id]
        if ip is not None:
            ip = ipam.check_requested_ip(cfg, str(ip), _Taken(used))
        else:
            ip = self._lowest_free(net.id, cfg, used)
        macs = st.net_macs[net.id]
        if mac is not None:
            if mac in macs:
                raise Conflict(f"MAC address {mac} is already used on network {net.name!r}; choose another one")
        else:
            mac = ipam.mac_for_ip(ip)
            while mac in macs:  # taken by an operator's choice for another address
                mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        ep = Endpoint(id=secrets.token_hex(32), network_id=net.id, node_id=node.id, hostname=node.hostname,
                      vtep=node.addr, ip=str(ip), prefix_len=IPv4Network(net.subnet).prefixlen, mac=mac,
                      owner=req.owner, aliases=aliases, ip_requested=req.ip is not None)
        raw = codec.encode(ep)
        # The network's endpoints at the creation's revision: those of now, and this one (the guard
        # of the network's endpoints is compared, so none can change in between).
        others = None if partial else [eps[e].raw for e in st.net_eps.get(net.id, ())] + [raw]
        compares = [Compare(NETWORKS, net.id, st.mod_rev(NETWORKS, net.id)),
                    Compare(ALLOCATIONS, net_guard(net.id), st.mod_rev(ALLOCATIONS, net_guard(net.id))),
                    Compare(NODES, node.id, st.mod_rev(NODES, node.id)),
                    Compare(ALLOCATIONS, node_guard(node.id), st.mod_rev(ALLOCATIONS, node_guard(node.id)))]
        ops = [Put(ENDPOINTS, ep.id, raw), Put(ALLOCATIONS, net_guard(net.id), GUARD),
               Put(ALLOCATIONS, node_guard(node.id), GUARD)]
        return compares, ops, (ep, (net_raw, raw, others, st.rev))

    def _lowest_free(self, net_id: str, cfg: ipam.SubnetConfig, used: set[int]) -> IPv4Address:
        """The lowest address of the ip-range (or subnet) neither reserved nor in use, searched from the
        network's hint (no free address below it) so that filling a big network stays linear."""
        first, last = ipam.usable_hosts(cfg.subnet)
        if cfg.ip_range is not None:
            first = max(first, int(cfg.ip_range.network_address))
            last = min(last, int(cfg.ip_range.broadcast_address))
        reserved = {int(a) for a in cfg.reserved()}
        n = max(first, self.state.net_low.get(net_id, first))
        while n <= last and (n in used or n in reserved):
            n += 1
        if n > last:
            where = f"ip-range {cfg.ip_range}" if cfg.ip_range else f"subnet {cfg.subnet}"
            raise PoolExhausted(f"no free address left in {where}; remove a container or use a larger subnet")
        self.state.net_low[net_id] = n
        return IPv4Address(n)

    async def delete_endpoint(self, node_id: str, ep_id: str) -> None:
        """DELETE /endpoints/{id}: idempotent; only the node that owns the endpoint may delete it."""
        await self.hub.sync()  # an endpoint made a moment ago through another manager is known
        async with self._lock:
            ep, _ = await self.hub.commit(lambda: self._plan_delete(node_id, ep_id))
        metrics.released("endpoint", int(ep is not None))

    def _plan_delete(self, node_id: str, ep_id: str):
        st = self.state
        ep = st.get(ENDPOINTS, ep_id)
        if ep is None:
            return [], [], None  # already gone
        if ep.node_id != node_id:
            raise Forbidden(f"endpoint {ep_id[:12]} belongs to another node; a node deletes only its own")
        compares = [Compare(ENDPOINTS, ep.id, st.mod_rev(ENDPOINTS, ep.id))]
        ops = [Delete(ENDPOINTS, ep.id), Put(ALLOCATIONS, net_guard(ep.network_id), GUARD),
               Put(ALLOCATIONS, node_guard(node_id), GUARD)]
        return compares, ops, ep

    async def delete_endpoints(self, node_id: str, ep_ids: list[str]) -> None:
        """POST /endpoints/release: delete_endpoint of each, in one transaction; refused whole if one belongs
        to another node."""
        await self.hub.sync()
        async with self._lock:
            n, _ = await self.hub.commit(lambda: self._plan_delete_many(node_id, ep_ids))
        metrics.released("endpoint", n)

    def _plan_delete_many(self, node_id: str, ep_ids: list[str]):
        st = self.state
        compares, ops, nets = [], [], set()
        for ep_id in dict.fromkeys(ep_ids):
            ep = st.get(ENDPOINTS, ep_id)
            if ep is None:
                continue   # already gone
            if ep.node_id != node_id:
                raise Forbidden(f"endpoint {ep_id[:12]} belongs to another node; a node deletes only its own")
            compares.append(Compare(ENDPOINTS, ep.id, st.mod_rev(ENDPOINTS, ep.id)))
            ops.append(Delete(ENDPOINTS, ep.id))
            nets.add(ep.network_id)
        if ops:
            ops += [Put(ALLOCATIONS, net_guard(n), GUARD) for n in sorted(nets)]
            ops.append(Put(ALLOCATIONS, node_guard(node_id), GUARD))
        return compares, ops, len(compares)

    def purge_plan(self, node_id: str) -> tuple[list[Compare], list, int]:
        """Compares and ops that delete every endpoint of a node (it left or was removed)."""
        st = self.state
        eps = [e for net in st.node_nets.get(node_id, ()) for e in st.net_eps.get(net, {}).values()
               if e.node_id == node_id]
        compares = [Compare(ALLOCATIONS, node_guard(node_id), st.mod_rev(ALLOCATIONS, node_guard(node_id)))]
        ops: list = [Delete(ENDPOINTS, e.id) for e in eps]
        ops += [Put(ALLOCATIONS, net_guard(n), GUARD) for n in {e.network_id for e in eps}]
        ops.append(Delete(ALLOCATIONS, node_guard(node_id)))
        return compares, ops, len(eps)
