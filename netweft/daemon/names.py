"""Container names: keeps the host's resolver (netweft/dns) in step with this host's containers and networks.

Who asks: each netweft container on a network gets the resolver's sockets in its namespace (see
dns/resolver.py for how queries reach it) and `nameserver 127.0.0.11` in its resolv.conf; it is
answered from the networks its endpoints are on. What is answered: per network, the name of every
endpoint's owner (a container's name), a netweft container's short ID, and the endpoint's aliases. Local
networks' names come from the engine's endpoint records, told by the engine as they change; overlays'
from the overlay agent's copy of the cluster (every host's endpoints of the networks this host is on),
followed every FOLLOW_PERIOD seconds, looked at only for networks whose revision moved. A table is changed
endpoint by endpoint (those whose record is not the one it was built from), so a run or rm costs the same
with ten or thousands of endpoints on the network; it changes (and answer caches empty) only when its names
did.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable

from netweft.dns.forward import Forwarder
from netweft.dns.names import NameRecord
from netweft.errors import InvalidRequest, NetweftError
from netweft.model.objects import Endpoint

log = logging.getLogger("netweft.dns")

RESOLVER_ADDRESS = "127.0.0.11"
FOLLOW_PERIOD = 0.1
SPECIAL_MODES = ("host", "none")


def parse_upstream(text: str) -> str:
    """A --dns server: an IPv4 address (loopback too: forwarding happens in the host's namespace)."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise InvalidRequest(f"invalid --dns {text!r}: expected the IPv4 address of a DNS server") from None


def host_upstreams(path: str = "/etc/resolv.conf") -> tuple[list[str], list[str]]:
    """The host's nameservers (loopback ones too: queries are forwarded from the host's namespace) and
    search domains."""
    servers, search = [], []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append(parts[1])
                elif parts and parts[0] == "search":
                    search = parts[1:]
    except OSError:
        pass
    return servers, search


def endpoint_records(endpoints: Iterable[Endpoint]) -> list[NameRecord]:
    """The names of a network's endpoints, in a stable order (by address). The owner's name answers
    reverse lookups of the address."""
    out = []
    for ep in sorted(endpoints, key=lambda e: (e.ip, e.id)):
        names = [ep.owner.name] if ep.owner.name else []
        if ep.owner.kind == "netweft":
            names.append(ep.owner.id[:12])
        names += ep.aliases
        for i, name in enumerate(dict.fromkeys(names)):
            out.append(NameRecord(name, (ep.ip,), reverse=i == 0))
    return out


class ContainerNames:
    def __init__(self, engine, upstreams: list[str] | None = None):
        self.engine = engine
        servers, self.search = host_upstreams()
        self._upstreams = upstreams if upstreams else servers
        self._resolver = None
        self._revs: dict[str, int] = {}      # overlay -> the agent's revision its table was built at
        self._applied: dict[str, dict[str, Endpoint]] = {}   # network -> the endpoints its table was built from
        self._task: asyncio.Task | None = None

    @property
    def resolver(self):
        """The resolver, made on first use: until a container is on a network, a daemon does not load the DNS
        library (dnslib, ≈1.4 MiB resident)."""
        if self._resolver is None:
            from netweft.dns.resolver import Resolver
            self._resolver = Resolver(Forwarder(self._upstreams))
        return self._resolver

    def resolv_conf(self) -> tuple[list[str], list[str], list[str]]:
        """(nameservers, search, options) of a container's resolv.conf: the resolver, the host's search
        domains, and ndots:0 so a bare name is asked as it is first."""
        return [RESOLVER_ADDRESS], self.search, ["ndots:0"]

    async def start(self) -> None:
        for ctr in self.engine.store.list("containers"):
            try:
                await self.container_changed(ctr)
            except NetweftError as e:
                log.warning("container names: cannot serve a container", extra={"container": ctr["Name"],
                                                                                "reason": str(e)})
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._resolver is not None:
            self._resolver.close()

    # ------------------------------------------------------------------ told by the engine
    async def container_changed(self, ctr: dict) -> None:
        """A container was made, connected or disconnected: its sockets, its scope, its networks' names."""
        if ctr["HostConfig"]["NetworkMode"] in SPECIAL_MODES:
            return
        eps = self.engine.endpoints_of(ctr["Id"])
        nets = [ep.network_id for ep in eps]
        old = self.resolver.networks_of(ctr["Id"])
        if old is None:
            udp, tcp = await self.engine.dp.open_dns_sockets(self.engine.netns_path(ctr["Id"]))
            await self.resolver.attach(ctr["Id"], udp, tcp, nets)
        else:
            self.resolver.set_networks(ctr["Id"], nets)
        for net_id in nets:   # only this container's endpoints change in its networks' tables
            self._apply_some(net_id, {ep.id: ep for ep in eps if ep.network_id == net_id})
        for net_id in set(old or ()) - set(nets):   # disconnected: rare, the table is rebuilt
            self.refresh(net_id)

    def container_removed(self, ctr_id: str, net_ids: Iterable[str],
                          endpoints: Iterable[Endpoint] | None = None) -> None:
        """`endpoints`: the container's, whose names go (without them, its networks' tables are rebuilt)."""
        self.containers_removed([ctr_id], net_ids, endpoints)

    def containers_removed(self, ctr_ids: Iterable[str], net_ids: Iterable[str],
                           endpoints: Iterable[Endpoint] | None = None) -> None:
        """container_removed of many (`rm -f` of thousands)."""
        for ctr_id in ctr_ids:
            self.resolver.detach(ctr_id)
        if endpoints is None:
            for net_id in set(net_ids):
                self.refresh(net_id)
            return
        gone: dict[str, dict[str, None]] = {}
        for ep in endpoints:
            gone.setdefault(ep.network_id, {})[ep.id] = None
        for net_id, eps in gone.items():
            self._apply_some(net_id, eps)

    def refresh(self, net_id: str) -> None:
        """Rebuild one network's names from what this host knows now."""
        agent = self.engine.overlay_agent
        if agent is not None and net_id in agent.nets:
            # An overlay: the agent's copy holds this host's endpoints too (an attach puts its own in); the
            # local records are not read (thousands of them, decoded on every run and rm).
            eps = {**{e.id: e for e in agent.local_on(net_id)}, **agent.nets[net_id].endpoints}
            self._revs[net_id] = agent.nets[net_id].rev
        else:
            eps = {e.id: e for e in self.engine.endpoints_on(net_id)}
        self._apply(net_id, eps)

    def _apply(self, net_id: str, eps: dict[str, Endpoint]) -> None:
        """Bring a network's table to `eps`, changing only the endpoints that differ from last time."""
        old = self._applied.get(net_id, {})
        changes: dict[str, tuple | None] = {}
        for ep_id, ep in eps.items():
            was = old.get(ep_id)
            if was is not ep and was != ep:
                changes[ep_id] = ((ep.ip, ep.id), tuple(endpoint_records([ep])))
        for ep_id in old.keys() - eps.keys():
            changes[ep_id] = None
        if eps:
            self._applied[net_id] = eps
        else:
            self._applied.pop(net_id, None)
        if changes:
            self.resolver.update_network(net_id, changes)

    def _apply_some(self, net_id: str, eps: dict[str, Endpoint | None]) -> None:
        """Change only these endpoints in a network's table (None: gone): a run or rm costs the same with
        thousands of endpoints on the network. A table not built yet is built whole."""
        applied = self._applied.get(net_id)
        if applied is None:
            self.refresh(net_id)
            return
        changes: dict[str, tuple | None] = {}
        for ep_id, ep in eps.items():
            was = applied.get(ep_id)
            if ep is None:
                if applied.pop(ep_id, None) is not None:
                    changes[ep_id] = None
            elif was is not ep and was != ep:
                applied[ep_id] = ep
                changes[ep_id] = ((ep.ip, ep.id), tuple(endpoint_records([ep])))
        if not applied:
            self._applied.pop(net_id, None)
        if changes:
            self.resolver.update_network(net_id, changes)

    # ------------------------------------------------------------------ following the overlay agent
    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_PERIOD)
            try:
                self._follow_once()
            except Exception:   # a bad record must not end name service; the next round retries
                log.exception("container names: could not follow the cluster's endpoints")

    def _follow_once(self) -> None:
        if self._resolver is None:
            return   # no container has asked for names yet: its first one builds its networks' tables
        agent = self.engine.overlay_agent
        nets = agent.nets if agent is not None else {}
        for net_id, ns in list(nets.items()):
            if self._revs.get(net_id) != ns.rev:
                self._revs[net_id] = ns.rev
                self._apply(net_id, {**{e.id: e for e in agent.local_on(net_id)}, **ns.endpoints})
        for net_id in [n for n in self._revs if n not in nets]:
            del self._revs[net_id]
            self._applied.pop(net_id, None)
            self.resolver.remove_network(net_id)
