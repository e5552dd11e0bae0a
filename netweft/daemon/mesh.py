"""The routing mesh on this host: every published port answers on the host's own addresses.

While some service publishes a port in ingress mode, the host keeps an ingress sandbox: a netweft
container named `ingress-sbox` on the ingress network (so it has an address there and one on the gateway
bridge, with its default route through the host). A connection to HOST:PUBLISHED is DNATed to the
sandbox's gateway-bridge address; the sandbox DNATs it to one of the service's tasks on the ingress
network, whichever host runs it, and masquerades it so the answer returns through the sandbox and the
host. mode=host ports go straight to this host's own tasks (their gateway-bridge addresses), and only
where it has some. The tasks of a
port are the ingress network's endpoints with the alias tasks.<service>, from the overlay agent's copy
(every host watches the ingress network). The tables are in dataplane/mesh.py.
"""
from __future__ import annotations

import logging

from netweft.agent.services import Assignments
from netweft.dataplane.mesh import MeshRule
from netweft.errors import NetweftError, NotFound

log = logging.getLogger("netweft.mesh")

SANDBOX = "ingress-sbox"
SANDBOX_LABEL = "com.netweft.ingress-sandbox"
SERVICE_LABEL = "com.docker.swarm.service.name"


class RoutingMesh:
    def __init__(self, engine):
        self.engine = engine
        self.host_applied: list[MeshRule] | None = None
        self.sbox_applied: tuple | None = None

    def _sandbox(self) -> dict | None:
        return self.engine.store.find("containers", SANDBOX)

    async def _ensure_sandbox(self, ingress_id: str):
        """(namespace, gateway-bridge address, ingress interface) of this host's ingress sandbox."""
        ctr = self._sandbox()
        if ctr is not None:
            eps = self.engine.endpoints_of(ctr["Id"])
            if eps and eps[0].network_id == ingress_id and eps[0].gw_ip:
                return eps[0].sandbox_key, eps[0].gw_ip, eps[0].ifname
            await self.engine.remove_container(ctr["Id"], force=True)   # an older ingress network's
        view = await self.engine.create_container({"Name": SANDBOX, "NetworkMode": ingress_id,
                                                   "Cmd": ["sleep", "infinity"], "Labels": {SANDBOX_LABEL: "1"}})
        ep = self.engine.endpoints_of(view["Id"])[0]
        log.info("ingress sandbox ready", extra={"ip": ep.ip, "gw_ip": ep.gw_ip})
        return ep.sandbox_key, ep.gw_ip, ep.ifname

    async def _remove_sandbox(self) -> None:
        ctr = self._sandbox()
        if ctr is not None:
            try:
                await self.engine.remove_container(ctr["Id"], force=True)
            except NotFound:
                pass
            self.sbox_applied = None

    def _local_task_ips(self, service: str) -> list[str]:
        out = []
        for ctr in self.engine.store.list("containers"):
            if (ctr["Config"].get("Labels") or {}).get(SERVICE_LABEL) == service:
                # The task's address on the gateway bridge: the host reaches it directly.
                gw = [ep.gw_ip for ep in self.engine.endpoints_of(ctr["Id"]) if ep.gw_ip]
                if gw and self.engine.container_view(ctr)["State"]["Running"]:
                    out.append(gw[0])
        return sorted(out)

    async def sync(self, got: Assignments) -> None:
        agent = self.engine.overlay_agent
        ingress_ports = [p for p in got.published if p.mode == "ingress"]
        sbox = None
        try:
            if ingress_ports and got.ingress:
                sbox = await self._ensure_sandbox(got.ingress)
            else:
                await self._remove_sandbox()
        except NetweftError as e:
            log.warning("routing mesh: the ingress sandbox cannot be made", extra={"reason": str(e)})
        ns = agent.nets.get(got.ingress) if agent is not None and got.ingress else None
        ingress_eps = list(ns.endpoints.values()) if ns is not None else []
        host_rules, sbox_rules = [], []
        for p in ingress_ports:
            alias = f"tasks.{p.service}"
            backends = sorted({ep.ip for ep in ingress_eps if alias in ep.aliases})
            if sbox is not None:
                host_rules.append(MeshRule(p.protocol, p.published, ((sbox[1], p.published),)))
                sbox_rules.append(MeshRule(p.protocol, p.published, tuple((ip, p.target) for ip in backends)))
        for p in got.published:
            if p.mode == "host":
                local = self._local_task_ips(p.service)
                if local:
                    host_rules.append(MeshRule(p.protocol, p.published, tuple((ip, p.target) for ip in local)))
        if sbox is not None and (sbox[0], sbox_rules) != self.sbox_applied:
            await self.engine.dp.apply_mesh(sbox[0], sbox_rules, sbox[2])
            self.sbox_applied = (sbox[0], sbox_rules)
        if host_rules != self.host_applied:
            await self.engine.dp.apply_mesh(None, host_rules, None)
            self.host_applied = host_rules
