"""Cluster-wide overlay networks and endpoints on the manager, and the watch stream that carries them.

Every change happens in one store transaction together with the new revision, so two allocations
can never hand out the same address or VNI, and a revision names exactly one state. Agents watch
from a revision: they get what they missed (or a snapshot if it is too old), then live changes.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

from netweft import validate
from netweft.store.local import Store
from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound
from netweft.ipam import address as ipam

log = logging.getLogger("netweft.manager.overlays")

VNI_FIRST = 4096
VNI_LAST = (1 << 24) - 1
HISTORY = 50_000          # events kept for resuming watchers; older ones get a snapshot


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Overlays:
    def __init__(self, store: Store, spec_fn):
        self.store, self.spec = store, spec_fn
        rev = store.get("settings", "revision")
        self.rev = rev["Rev"] if rev else 0
        self.first_kept = self.rev + 1  # events before this revision are not in memory (restart, trimming)
        self.history: deque[dict] = deque()
        self.watchers: set[asyncio.Queue] = set()

    # --------------------------------------------------------------- events
    def _commit(self, puts: list[tuple[str, dict]], deletes: list[tuple[str, dict]]) -> None:
        """Write objects and the new revision in one transaction, then tell the watchers."""
        events = []
        with self.store.tx():
            for kind, obj in puts:
                self.store.put(kind, obj["ID"], obj.get("Name") if kind == "swnetworks" else None, obj)
                events.append((kind, "put", obj))
            for kind, obj in deletes:
                self.store.delete(kind, obj["ID"])
                events.append((kind, "delete", obj))
            rev = self.rev + 1
            self.store.put("settings", "revision", "revision", {"Rev": rev})
            batch = {"Type": "events", "Rev": rev,
                     "Events": [{"Kind": "network" if k == "swnetworks" else "endpoint", "Action": a, "Object": o}
                                for k, a, o in events]}
            # The revision and the watchers move only once the write is durable (one commit per change).
            self.store.on_commit(lambda: self._publish(batch))

    def _publish(self, batch: dict) -> None:
        self.rev = batch["Rev"]
        self.history.append(batch)
        while len(self.history) > HISTORY:
            self.first_kept = self.history.popleft()["Rev"] + 1
        for q in list(self.watchers):
            q.put_nowait(batch)

    def snapshot(self) -> dict:
        return {"Type": "snapshot", "Rev": self.rev, "Networks": self.store.list("swnetworks"),
                "Endpoints": self.store.list("swendpoints")}

    def since(self, rev: int) -> list[dict] | None:
        """Batches after rev, or None when some of them are no longer known (the watcher needs a snapshot)."""
        if rev == self.rev:
            return []
        if rev > self.rev or rev + 1 < self.first_kept:
            return None
        return [b for b in self.history if b["Rev"] > rev]

    # ------------------------------------------------------------- networks
    def network(self, ref: str) -> dict:
        net = self.store.find("swnetworks", ref)
        if net is None:
            raise NotFound(f"network {ref!r} not found; see `netweft network ls`")
        return net

    def endpoints(self, net_id: str | None = None) -> list[dict]:
        eps = self.store.list("swendpoints")
        return [e for e in eps if net_id is None or e["NetworkID"] == net_id]

    def create_network(self, req: dict) -> dict:
        with self.store.tx():  # the checks and the write see one state
            return self._create_network(req)

    def _create_network(self, req: dict) -> dict:
        name = validate.check_name(req.get("Name", ""), "network")
        if self.store.by_name("swnetworks", name):
            raise Conflict(f"network {name!r} already exists; choose another name or remove it first")
        options = dict(req.get("Options") or {})
        if validate.ENCRYPTED_OPT in options:
            raise InvalidRequest("encrypted overlay networks are not supported yet (this kernel has no IPsec ESP; "
                                 "WireGuard-based encryption is planned): create the network without -o encrypted")
        unknown = set(options) - {validate.MTU_OPT, validate.VXLANID_OPT}
        if unknown:
            raise InvalidRequest(f"unknown overlay option(s) {', '.join(sorted(unknown))}: supported are "
                                 f"{validate.MTU_OPT} and {validate.VXLANID_OPT}")
        mtu = validate.parse_mtu(options[validate.MTU_OPT]) if validate.MTU_OPT in options else None
        labels = dict(req.get("Labels") or {})
        if any(not k.strip() for k in labels):
            raise InvalidRequest("invalid label: the key is empty; expected KEY=VALUE")
        others = self.store.list("swnetworks")
        vnis = {n["VNI"] for n in others}
        if validate.VXLANID_OPT in options:
            try:
                vni = int(options[validate.VXLANID_OPT])
            except ValueError:
                raise InvalidRequest(f"invalid VXLAN ID {options[validate.VXLANID_OPT]!r}: expected a number") from None
            if not 1 <= vni <= VNI_LAST:
                raise InvalidRequest(f"invalid VXLAN ID {vni}: it must be between 1 and {VNI_LAST}")
            if vni in vnis:
                raise Conflict(f"VXLAN ID {vni} is already used by another network")
        else:
            vni = next(v for v in range(VNI_FIRST, VNI_LAST + 1) if v not in vnis)
        cfgs = (req.get("IPAM") or {}).get("Config") or [{}]
        if len(cfgs) != 1:
            raise InvalidRequest("exactly one IPAM config (subnet) per network is supported")
        c = cfgs[0]
        taken = [(IPv4Network(o["IPAM"]["Config"][0]["Subnet"]), o["Name"]) for o in others]
        if c.get("Subnet"):
            subnet = ipam.parse_network(c["Subnet"])
            for other, oname in taken:
                if subnet.overlaps(other):
                    raise Conflict(f"subnet {subnet} overlaps {other} of network {oname!r}; choose another subnet")
        else:
            if c.get("Gateway") or c.get("IPRange") or c.get("AuxiliaryAddresses"):
                raise InvalidRequest("--gateway, --ip-range and --aux-address need --subnet")
            spec = self.spec()
            pools = [ipam.AddressPool(IPv4Network(p), spec["SubnetSize"]) for p in spec["DefaultAddrPool"]]
            subnet = ipam.allocate_subnet(pools, [t for t, _ in taken])
        cfg = ipam.build_subnet_config(subnet, c.get("Gateway") or None, c.get("IPRange") or None,
                                       c.get("AuxiliaryAddresses") or {})
        net = {"Name": name, "ID": secrets.token_hex(32), "Created": utcnow(), "Scope": "swarm",
               "Driver": "overlay", "EnableIPv6": False,
               "IPAM": {"Driver": "default", "Options": {}, "Config": [cfg.to_doc()]},
               "Internal": bool(req.get("Internal")), "Attachable": bool(req.get("Attachable")),
               "Ingress": False, "Options": options, "Labels": labels, "VNI": vni, "MTU": mtu}
        self._commit([("swnetworks", net)], [])
        log.info("overlay network created", extra={"network": name, "subnet": str(subnet), "vni": vni})
        return net

    def remove_network(self, ref: str) -> None:
        net = self.network(ref)
        eps = self.endpoints(net["ID"])
        if eps:
            where = sorted({f"{e['ContainerName']} on {e['Hostname']}" for e in eps})
            raise Conflict(f"network {net['Name']!r} has endpoints ({', '.join(where[:5])}"
                           f"{' ...' if len(where) > 5 else ''}); disconnect or remove them first")
        self._commit([], [("swnetworks", net)])
        log.info("overlay network removed", extra={"network": net["Name"]})

    # ------------------------------------------------------------ endpoints
    def create_endpoint(self, node: dict, req: dict) -> dict:
        with self.store.tx():  # the address is chosen and recorded in one transaction
            return self._create_endpoint(node, req)

    def _create_endpoint(self, node: dict, req: dict) -> dict:
        net = self.network(str(req.get("NetworkID", "")))
        ctr_id = str(req.get("ContainerID", ""))
        for e in self.endpoints(net["ID"]):
            if e["NodeID"] == node["ID"] and e["ContainerID"] == ctr_id:
                return e  # a retried request: same answer, nothing allocated twice
        if not net["Attachable"] and not req.get("Service"):
            raise Forbidden(f"network {net['Name']!r} is not attachable: it is kept for services; "
                            "create it with --attachable to run plain containers on it")
        aliases = [validate.check_hostname(a) for a in req.get("Aliases") or []]
        cfg = ipam.SubnetConfig.from_doc(net["IPAM"]["Config"][0])
        in_use = {IPv4Address(e["IP"]) for e in self.endpoints(net["ID"])}
        ip = ipam.check_requested_ip(cfg, req["IPAddress"], in_use) if req.get("IPAddress") \
            else ipam.allocate_ip(cfg, in_use)
        ep = {"ID": secrets.token_hex(32), "NetworkID": net["ID"], "NodeID": node["ID"],
              "Hostname": node["Description"]["Hostname"], "VTEP": node["Status"]["Addr"],
              "IP": str(ip), "PrefixLen": cfg.subnet.prefixlen, "MAC": ipam.mac_for_ip(ip),
              "ContainerID": ctr_id, "ContainerName": str(req.get("ContainerName", "")), "Aliases": aliases}
        self._commit([("swendpoints", ep)], [])
        return ep

    def delete_endpoint(self, node: dict, ep_id: str) -> None:
        ep = self.store.get("swendpoints", ep_id)
        if ep is None:
            return  # already gone: deleting is idempotent
        if ep["NodeID"] != node["ID"]:
            raise Forbidden("this endpoint belongs to another node")
        self._commit([], [("swendpoints", ep)])

    def purge_node(self, node_id: str) -> int:
        """A node left or was removed: its endpoints disappear from every host's tables."""
        eps = [e for e in self.endpoints() if e["NodeID"] == node_id]
        if eps:
            self._commit([], [("swendpoints", e) for e in eps])
            log.info("endpoints of a departed node purged", extra={"node": node_id, "count": len(eps)})
        return len(eps)

    def bulk_endpoints(self, node: dict, net_id: str, count: int, vtep: str) -> int:
        """Synthetic remote endpoints for scale tests and benchmarks (manager certificate only)."""
        net = self.network(net_id)
        cfg = ipam.SubnetConfig.from_doc(net["IPAM"]["Config"][0])
        in_use = {IPv4Address(e["IP"]) for e in self.endpoints(net["ID"])}
        eps = []
        for i, ip in enumerate(ipam.allocate_ips(cfg, in_use, count)):
            eps.append({"ID": secrets.token_hex(32), "NetworkID": net["ID"], "NodeID": f"synthetic-{vtep}",
                        "Hostname": f"synthetic-{vtep}", "VTEP": vtep, "IP": str(ip),
                        "PrefixLen": cfg.subnet.prefixlen, "MAC": ipam.mac_for_ip(ip), "ContainerID": f"syn{i}",
                        "ContainerName": f"syn{i}", "Aliases": []})
        self._commit([("swendpoints", e) for e in eps], [])
        return len(eps)
