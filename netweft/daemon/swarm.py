"""The daemon's swarm role: init, join, leave, and the node administration of `netweft swarm|node`.

On the leader, administrative calls run against the local Manager. On another manager they are
forwarded to the leader over mutual TLS with this node's manager certificate. On a worker they
are refused with a pointer to a manager, as Docker does.
"""
from __future__ import annotations

import inspect
import ipaddress
import logging
import os
import shutil
import time
from urllib.parse import quote

from aiohttp import web

from netweft.agent import node as agent
from netweft.agent.overlay import OverlayAgent
from netweft.store.local import get_setting, put_setting
from netweft.errors import Conflict, InvalidRequest, NetweftError, Unavailable
from netweft.model import api as m
from netweft.model import codec
from netweft import validate
from netweft.ipam.address import parse_network
from netweft import pki
from netweft.manager import ingress
from netweft.manager.cluster import MIN_CERT_EXPIRY, Manager

log = logging.getLogger("netweft.swarm")

DEFAULT_PORT = 2377
DEFAULT_SPEC = {"CertExpiry": 90 * 24 * 3600, "HeartbeatPeriod": 5.0, "DataPathPort": 4789,
                "DefaultAddrPool": ["10.0.0.0/8"], "SubnetSize": 24}
NOT_MANAGER = ("this node is not a swarm manager: run this on a manager, or promote this node "
               "(`netweft node promote NODE` on a manager)")
NOT_IN_SWARM = "this node is not part of a swarm: run `netweft swarm init` or `netweft swarm join` first"


def parse_listen(text: str | None) -> tuple[str, int]:
    if not text:
        return ("0.0.0.0", DEFAULT_PORT)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    try:
        ipaddress.IPv4Address(host)
        p = int(port)
        assert 0 < p < 65536
    except (ValueError, AssertionError):
        raise InvalidRequest(f"invalid --listen-addr {text!r}: expected IP[:PORT], e.g. 0.0.0.0:2377") from None
    return (host, p)


class Swarm:
    def __init__(self, daemon):
        self.daemon = daemon
        self.store = daemon.engine.store
        self.dir = os.path.join(daemon.args.data_root, "swarm")
        self.manager: Manager | None = None
        self.agent: agent.NodeAgent | None = None
        self.overlay: OverlayAgent | None = None
        self._leader_client: agent.ClusterClient | None = None
        daemon.engine.swarm = self

    def state(self) -> dict | None:
        return get_setting(self.store, "swarm")

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        st = self.state()
        if st is None:
            return
        if st.get("Leader"):
            self.manager = Manager(self.dir, st["NodeID"])
            await self.manager.start(tuple(st["ListenAddr"]))
        else:
            self.agent = agent.NodeAgent(self.dir, st["Managers"], st["AdvertiseAddr"], st["HeartbeatPeriod"],
                                         on_event=self._agent_event)
            self.agent.start()
        await self._start_overlay(st)

    async def _start_overlay(self, st: dict) -> None:
        """Every member, the leader included, runs the overlay agent over mutual TLS: one code path."""
        if self.agent is not None:
            client = self.agent.client
        else:
            client = self._leader_client = agent.ClusterClient(self.dir, st["Managers"])
        engine = self.daemon.engine
        self.overlay = OverlayAgent(engine.overlay_host, engine.dp, client, st["NodeID"], st["AdvertiseAddr"],
                                    st["DataPathPort"])
        self.daemon.engine.overlay_agent = self.overlay
        await self.overlay.start()

    async def stop(self) -> None:
        if self.overlay is not None:
            await self.overlay.stop()
            self.overlay = None
            self.daemon.engine.overlay_agent = None
        if self._leader_client is not None:
            await self._leader_client.close()
            self._leader_client = None
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None

    def _agent_event(self, kind: str, info: dict) -> None:
        st = self.state()
        if st is None:
            return
        if kind == "role":
            st["Role"] = info["role"]
        elif kind == "refused":
            st["Problem"] = info["reason"]
        put_setting(self.store, "swarm", st)

    async def _advertise(self, text: str | None) -> str:
        addrs = await self.daemon.engine.dp.ipv4_addresses()
        ours = {k: v for k, v in addrs.items() if not k.startswith(("nw", "docker", "veth"))}
        if text:
            if text in addrs:
                if not addrs[text]:
                    raise InvalidRequest(f"interface {text!r} has no IPv4 address to advertise")
                return validate.parse_node_address(addrs[text][0], f"--advertise-addr (interface {text})")
            try:
                ipaddress.IPv4Address(text)
            except ValueError:
                raise InvalidRequest(f"invalid --advertise-addr {text!r}: not an IPv4 address nor an interface "
                                     "of this host") from None
            # It becomes this node's VTEP on every host: it must mean this host from everywhere.
            return validate.parse_node_address(text, "--advertise-addr")
        flat = [a for v in ours.values() for a in v]
        if len(flat) == 1:
            return flat[0]
        if not flat:
            raise InvalidRequest("this host has no IPv4 address to advertise; use --advertise-addr")
        raise InvalidRequest(f"could not choose an IP address to advertise: this host has several "
                             f"({', '.join(flat)}); use --advertise-addr")

    # --------------------------------------------------------------------- init
    async def init(self, req: m.SwarmInit) -> dict:
        if self.state() is not None:
            raise Conflict("this node is already part of a swarm; use `netweft swarm leave` first")
        advertise = await self._advertise(req.AdvertiseAddr)
        listen = parse_listen(req.ListenAddr)
        spec = dict(DEFAULT_SPEC)
        if req.CertExpiry:
            expiry = pki.parse_duration(req.CertExpiry)
            if expiry < MIN_CERT_EXPIRY:
                raise InvalidRequest(f"--cert-expiry must be at least {int(MIN_CERT_EXPIRY.total_seconds())}s")
            if expiry > pki.CA_LIFETIME:
                raise InvalidRequest(f"--cert-expiry must be at most {pki.CA_LIFETIME.days}d, the cluster CA's "
                                     "lifetime (a certificate never outlives its CA)")
            spec["CertExpiry"] = expiry.total_seconds()
        if req.HeartbeatPeriod:
            hb = pki.parse_duration(req.HeartbeatPeriod).total_seconds()
            if not 0.1 <= hb <= 3600:
                raise InvalidRequest("--dispatcher-heartbeat must be between 100ms and 1h")
            spec["HeartbeatPeriod"] = hb
        if req.DataPathPort:
            port = req.DataPathPort
            if not 1024 <= port <= 49151:
                raise InvalidRequest("--data-path-port must be between 1024 and 49151")
            spec["DataPathPort"] = port
        if req.DefaultAddrPool:
            spec["DefaultAddrPool"] = [str(parse_network(p, "default address pool")) for p in req.DefaultAddrPool]
        if req.SubnetSize:
            size = req.SubnetSize
            smallest = max(parse_network(p).prefixlen for p in spec["DefaultAddrPool"])
            if not smallest <= size <= 29:
                raise InvalidRequest(f"--default-addr-pool-mask-length must be between {smallest} and 29")
            spec["SubnetSize"] = size
        t0 = time.monotonic()
        created = await Manager.init_cluster(self.dir, self.daemon.hostname, advertise, listen, spec)
        node_id = created["node_id"]
        st = {"NodeID": node_id, "ClusterID": created["cluster_id"], "Role": "manager",
              "Leader": True, "AdvertiseAddr": advertise, "ListenAddr": list(listen),
              "Managers": [f"{advertise}:{listen[1]}"], "HeartbeatPeriod": spec["HeartbeatPeriod"],
              "DataPathPort": spec["DataPathPort"]}
        self.manager = Manager(self.dir, node_id)
        try:
            await self.manager.start(listen)
        except BaseException:
            self.manager = None
            self._forget()
            raise
        put_setting(self.store, "swarm", st)
        await self._start_overlay(st)
        await ingress.create_default(self.manager.overlays)
        log.info("swarm initialised", extra={"node": node_id, "advertise": advertise,
                                             "ms": round((time.monotonic() - t0) * 1000)})
        tokens = created["join_tokens"]
        return {"NodeID": node_id, "JoinTokens": {"Worker": tokens["worker"], "Manager": tokens["manager"]},
                "ManagerAddr": f"{advertise}:{listen[1]}"}

    def _forget(self) -> None:
        """This host is no longer in a swarm. The cluster store (the leader's) lives in the swarm directory
        and goes with it; the host's own database keeps only host state."""
        with self.store.tx():
            self.store.delete("settings", "swarm")
        shutil.rmtree(self.dir, ignore_errors=True)

    # --------------------------------------------------------------------- join
    async def join(self, req: m.SwarmJoin) -> dict:
        if self.state() is not None:
            raise Conflict("this node is already part of a swarm; use `netweft swarm leave` first")
        token, remotes = req.JoinToken, req.RemoteAddrs
        if not token or not remotes:
            raise InvalidRequest("swarm join needs --token TOKEN and a manager address")
        addr = agent.parse_manager_addr(remotes[0])
        advertise = await self._advertise(req.AdvertiseAddr) if req.AdvertiseAddr else None
        if advertise is None:
            try:
                advertise = await self._advertise(None)
            except InvalidRequest:
                advertise = None  # the manager will use the address it sees
        try:
            resp = await agent.join(token, addr, self.daemon.hostname, advertise, self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        st = {"NodeID": resp["NodeID"], "ClusterID": resp["ClusterID"], "Role": resp["Role"], "Leader": False,
              "AdvertiseAddr": advertise, "Managers": resp["Managers"],
              "HeartbeatPeriod": resp["HeartbeatPeriod"], "DataPathPort": resp["DataPathPort"]}
        put_setting(self.store, "swarm", st)
        self.agent = agent.NodeAgent(self.dir, st["Managers"], advertise, st["HeartbeatPeriod"],
                                     on_event=self._agent_event)
        self.agent.start()
        await self._start_overlay(st)
        log.info("joined swarm", extra={"node": resp["NodeID"], "role": resp["Role"], "manager": addr})
        return {"NodeID": resp["NodeID"], "Role": resp["Role"]}

    # -------------------------------------------------------------------- leave
    async def leave(self, force: bool) -> None:
        st = self.state()
        if st is None:
            raise Conflict(NOT_IN_SWARM)
        if st.get("Leader") and not force:
            raise Conflict("this node is the swarm's only leader: leaving destroys the cluster (its CA, tokens and "
                           "node list); use `netweft swarm leave --force` if you mean it")
        if st["Role"] == "manager" and not st.get("Leader") and not force:
            raise Conflict("this node is a manager; demote it first (`netweft node demote` on the leader) "
                           "or use --force")
        if self.agent is not None and not st.get("Problem"):
            try:
                await self.agent.call("POST", "/leave")
            except NetweftError as e:
                if not force:
                    raise Unavailable(f"could not tell the manager that this node leaves ({e}); "
                                      "use --force to leave anyway") from None
        if self.overlay is not None:
            await self.overlay.teardown()
        await self.stop()
        self._forget()
        log.info("left the swarm", extra={"node": st["NodeID"]})

    # ------------------------------------------------------------ admin plumbing
    async def admin(self, method: str, path: str, body: dict | None = None, local=None):
        """Run an administrative call: locally on the leader, forwarded from another manager."""
        st = self.state()
        if st is None:
            raise Unavailable(NOT_IN_SWARM)
        if self.manager is not None:
            result = local()
            return await result if inspect.isawaitable(result) else result
        if st["Role"] != "manager":
            # An expired certificate is the more urgent news: it says how to get back in (rejoin).
            problem = self.agent.problem if self.agent is not None else None
            raise Unavailable(problem if problem and "expired" in problem else NOT_MANAGER)
        return await self.agent.call(method, "/admin" + path, body)

    def info(self) -> dict:
        st = self.state()
        if st is None:
            return {"LocalNodeState": "inactive"}
        problem = st.get("Problem") or (self.agent.problem if self.agent else None)
        return {"LocalNodeState": "error" if problem else "active", "NodeID": st["NodeID"],
                "ClusterID": st["ClusterID"], "Role": st["Role"], "Leader": bool(st.get("Leader")),
                "NodeAddr": st["AdvertiseAddr"], "Managers": st["Managers"], "Error": problem or ""}

    # ------------------------------------------------------------------ routes
    def routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()
        from netweft.daemon.api import body, params

        @routes.post("/swarm/init")
        async def init(request):
            return web.json_response(await self.init(await body(request, m.SwarmInit)))

        @routes.post("/swarm/join")
        async def join(request):
            return web.json_response(await self.join(await body(request, m.SwarmJoin)))

        @routes.post("/swarm/leave")
        async def leave(request):
            await self.leave(params(request, m.ForceQuery).force)
            return web.json_response({})

        @routes.get("/swarm")
        async def inspect(request):
            out = await self.admin("GET", "/swarm", local=lambda: self.manager.inspect())
            return web.json_response({**out, "Node": self.info()})

        @routes.post("/swarm/join-token/rotate")
        async def rotate(request):
            role = params(request, m.RotateQuery).role
            q = f"/join-token/rotate?role={role}"
            async def rotated():
                return {"Token": await self.manager.rotate_token(role)}
            return web.json_response(await self.admin("POST", q, local=rotated))

        @routes.get("/nodes")
        async def nodes(request):
            return web.json_response(await self.admin("GET", "/nodes", local=lambda: self.manager.nodes()))

        # A forwarded path carries the ref quoted: "x?force=1" names a node, it adds no parameter.
        @routes.get("/nodes/{ref}")
        async def node(request):
            ref = request.match_info["ref"]
            return web.json_response(await self.admin(
                "GET", f"/nodes/{quote(ref, safe='')}", local=lambda: self.manager.node_view(self.manager.node(ref))))

        @routes.delete("/nodes/{ref}")
        async def node_rm(request):
            ref, force = request.match_info["ref"], params(request, m.ForceQuery).force
            await self.admin("DELETE", f"/nodes/{quote(ref, safe='')}?force={int(force)}",
                             local=lambda: self.manager.remove_node(ref, force))
            return web.json_response({})

        @routes.post("/nodes/{ref}/update")
        async def node_update(request):
            ref, b = request.match_info["ref"], await body(request, m.NodeUpdate)
            return web.json_response(await self.admin(
                "POST", f"/nodes/{quote(ref, safe='')}/update", codec.to_builtins(b),
                local=lambda: self.manager.update_node(ref, b.Role, b.Availability, b.LabelsAdd, b.LabelsRemove)))

        return routes
