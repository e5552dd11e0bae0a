"""The daemon's local HTTP API (unix socket). Shapes follow Docker's Engine API where it has them.

This is the edge: every body and query string is parsed here into the typed structs of
netweft.model.api, and the values a person typed are judged (netweft.validate, netweft.ipam) before
the engine sees anything. Bad input is a 400 naming the field, never a 500, and nothing is stored.
The engine still receives Docker-shaped dicts (msgspec.to_builtins of the parsed struct).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from datetime import datetime, timezone
from typing import TypeVar

import msgspec
from netweft.http import web

from netweft import validate
from netweft.daemon import removal
from netweft.errors import Conflict, Forbidden, InvalidRequest, NetweftError, NotFound
from netweft.ipam import address as ipam
from netweft.model import api as m
from netweft.model import codec

log = logging.getLogger("netweft.api")

T = TypeVar("T")
MAX_BODY = 1024 * 1024          # the largest real body (1024 aux addresses) is a few tens of KiB
LOG_CHUNK = 64 * 1024           # a container's log is streamed in pieces this big, never read whole

# Docker's predefined networks, answered by the API as Docker's daemon does: name -> driver.
PREDEFINED = {"host": "host", "none": "null"}


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NetweftError as e:
        log.info("request refused", extra={"path": request.path, "status": e.status, "reason": str(e)})
        return json_error(e.status, str(e))
    except web.HTTPRequestEntityTooLarge:
        log.info("request refused", extra={"path": request.path, "status": 413, "reason": "body too large"})
        return json_error(413, f"request body too large: at most {MAX_BODY // 1024} KiB")
    except web.HTTPException as e:  # aiohttp's own answers (no such route, wrong method): JSON like the rest
        if e.status < 400:
            raise
        message = {404: "page not found", 405: f"method {request.method} not allowed on {request.path}"}
        return json_error(e.status, message.get(e.status, e.reason))
    except Exception:  # a bug or a kernel surprise: log it whole, tell the caller one line without internals
        log.exception("request failed", extra={"path": request.path})
        return json_error(500, "netweftd failed on this request (an internal error); its log has the details")


async def body(request: web.Request, type_: type[T] = dict) -> T:
    """The request's JSON body parsed as type_ (a struct of netweft.model.api); no body reads as {}."""
    data = await request.read() if request.can_read_body else b""
    if not data.strip():
        data = b"{}"
    try:
        return codec.decode(data, type_)
    except RecursionError:  # msgspec recurses on nesting, even inside fields it ignores
        raise InvalidRequest("request body is nested too deeply") from None


def params(request: web.Request, type_: type[T]) -> T:
    """The query string parsed as type_: strings converted (force=1, t=5), unknown parameters ignored."""
    try:
        return msgspec.convert(dict(request.query), type_, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidRequest(_query_words(str(e), request)) from None


def _query_words(msg: str, request: web.Request) -> str:
    text, _, where = msg.partition(" - at `$.")
    name = where.rstrip("`")
    if text.startswith("Object missing required field"):
        return f"missing query parameter {text.split('`')[1]}"
    if text.startswith("Expected `bool`"):
        text = "expected 1, 0, true or false"
    value = request.query.get(name, "")
    shown = repr(value if len(value) <= 40 else value[:40] + "...")
    return f"invalid query parameter {name}={shown}: {text[0].lower()}{text[1:]}"


def network_filters(request: web.Request) -> m.NetworkFilters:
    raw = params(request, m.NetworkListQuery).filters
    if not raw:
        return m.NetworkFilters()
    try:
        return codec.decode(raw, m.NetworkFilters, "filters")
    except RecursionError:
        raise InvalidRequest("filters are nested too deeply") from None
    except InvalidRequest as e:
        raise InvalidRequest(f"{e} (filters are a JSON object such as {{\"name\": [\"mgmt\"]}}; "
                             f"the keys are {', '.join(m.NetworkFilters.__struct_fields__)})") from None


# ------------------------------------------------------------------ predefined networks
def predefined_id(name: str) -> str:
    # Stable across restarts and the same on every host, as the name is.
    return hashlib.sha256(f"netweft predefined network {name}".encode()).hexdigest()


def predefined_name(ref: str, exact: bool) -> str | None:
    """host or none when ref names one: its name or ID (or, when not exact, a prefix of the ID)."""
    for name in PREDEFINED:
        pid = predefined_id(name)
        if ref in (name, pid) or (not exact and ref and pid.startswith(ref)):
            return name
    return None


def predefined_view(name: str, engine, created: str) -> dict:
    """Docker-shaped inspect of host or none; Containers are the containers started with that mode."""
    members = {c["Id"]: {"Name": c["Name"], "EndpointID": "", "MacAddress": "", "IPv4Address": "", "IPv6Address": ""}
               for c in engine.list_containers(all=True) if c["HostConfig"]["NetworkMode"] == name}
    return {"Name": name, "Id": predefined_id(name), "Created": created, "Scope": "local",
            "Driver": PREDEFINED[name], "EnableIPv6": False, "IPAM": {"Driver": "default", "Options": None, "Config": []},
            "Internal": False, "Attachable": False, "Ingress": False, "ConfigFrom": {"Network": ""},
            "ConfigOnly": False, "Containers": members, "Options": {}, "Labels": {}}


def refuse_predefined(name: str) -> None:
    raise InvalidRequest(f"network {name!r} is predefined: a container uses it from the start "
                         f"(`netweft run --network {name}`) and cannot be connected to or disconnected from it")


def host_hostname() -> str | None:
    """The machine's hostname, for a --network host container without --hostname (Docker's default)."""
    name = socket.gethostname()
    try:
        return validate.check_hostname(name)
    except InvalidRequest:
        return None  # a name we could not set (e.g. with '_'): the engine picks one


# ------------------------------------------------------------------ judging values
def check_network_create(req: m.NetworkCreate) -> None:
    validate.check_name(req.Name, "network")
    if req.Name in PREDEFINED:
        raise Conflict(f"network {req.Name!r} is predefined; choose another name")
    validate.check_driver_options(req.Driver, req.Options)
    if req.EnableIPv6:
        raise InvalidRequest("IPv6 networks are not supported: create the network without --ipv6")
    if req.IPAM.Driver not in ("", "default"):
        raise InvalidRequest(f"IPAM driver {req.IPAM.Driver!r} is not supported: leave it out (default)")
    for k in req.Labels:
        if not k.strip():
            raise InvalidRequest("invalid label: the key is empty; expected KEY=VALUE")


def check_endpoint(ip: str | None, mac: str | None, aliases: list[str]) -> None:
    if ip:
        ipam.parse_address(ip)
    if mac:
        ipam.parse_mac(mac)
    for a in aliases:
        validate.check_hostname(a)


def check_container_create(req: m.ContainerCreate) -> None:
    if req.Name:
        validate.check_name(req.Name, "container")
    if req.Hostname:
        validate.check_hostname(req.Hostname)
    check_endpoint(req.IPAddress, req.MacAddress, req.Aliases or [])


def read_log_chunk(path: str, pos: int) -> bytes:
    """At most LOG_CHUNK bytes of a log from offset pos (b"" at its end or if there is no log yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            return f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


def build_app(daemon) -> web.Application:
    """daemon has .engine (local networks and containers) and .info() (daemon facts)."""
    engine = daemon.engine
    routes = web.RouteTableDef()
    started = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    @routes.get("/_ping")
    async def ping(request):
        return web.Response(text="OK")

    @routes.get("/info")
    async def info(request):
        return web.json_response(daemon.info())

    @routes.get("/openapi.json")
    async def openapi(request):
        from importlib import resources   # here only: it loads pathlib and zipfile, ≈1.5 MiB for one file
        text = resources.files("netweft.daemon").joinpath("openapi.json").read_text()
        return web.Response(text=text, content_type="application/json")

    @routes.get("/networks")
    async def network_list(request):
        f = network_filters(request)
        nets = [n for n in engine.list_networks() if f.matches(n)]
        nets += [v for v in (predefined_view(p, engine, started) for p in PREDEFINED) if f.matches(v, builtin=True)]
        return web.json_response(nets)

    @routes.post("/networks/create")
    async def network_create(request):
        req = await body(request, m.NetworkCreate)
        check_network_create(req)
        net = await engine.create_network(codec.to_builtins(req))
        return web.json_response({"Id": net["Id"], "Warning": ""}, status=201)

    @routes.post("/networks/prune")
    async def network_prune(request):
        return web.json_response({"NetworksDeleted": await engine.prune_networks()})

    @routes.get("/networks/{ref}")
    async def network_inspect(request):
        ref = request.match_info["ref"]
        name = predefined_name(ref, exact=True)
        if name is None:
            try:
                return web.json_response(engine.network_view(await engine.network(ref)))
            except NotFound:
                name = predefined_name(ref, exact=False)
                if name is None:
                    raise
        return web.json_response(predefined_view(name, engine, started))

    @routes.delete("/networks/{ref}")
    async def network_remove(request):
        name = predefined_name(request.match_info["ref"], exact=True)
        if name is not None:
            raise Forbidden(f"{name} is a pre-defined network and cannot be removed")
        await engine.remove_network(request.match_info["ref"])
        return web.Response(status=204)

    @routes.post("/networks/{ref}/connect")
    async def network_connect(request):
        req = await body(request, m.NetworkConnect)
        if (name := predefined_name(request.match_info["ref"], exact=True)) is not None:
            refuse_predefined(name)
        if not req.Container:
            raise InvalidRequest("Container is empty: name the container to connect")
        cfg = req.EndpointConfig or m.EndpointConfig()
        ipam_cfg = cfg.IPAMConfig or m.EndpointIPAMConfig()
        if ipam_cfg.IPv6Address:
            raise InvalidRequest("IPv6 addresses are not supported: leave IPv6Address out")
        ip, mac, aliases = ipam_cfg.IPv4Address or None, cfg.MacAddress or None, cfg.Aliases or []
        check_endpoint(ip, mac, aliases)
        ep = await engine.connect(request.match_info["ref"], req.Container, ip=ip, aliases=aliases, mac=mac)
        return web.json_response(ep)

    @routes.post("/networks/{ref}/disconnect")
    async def network_disconnect(request):
        req = await body(request, m.NetworkDisconnect)
        if (name := predefined_name(request.match_info["ref"], exact=True)) is not None:
            refuse_predefined(name)
        if not req.Container:
            raise InvalidRequest("Container is empty: name the container to disconnect")
        await engine.disconnect(request.match_info["ref"], req.Container)
        return web.Response(status=200)

    @routes.get("/containers/json")
    async def container_list(request):
        return web.json_response(engine.list_containers(all=params(request, m.ContainerListQuery).all))

    @routes.post("/containers/create")
    async def container_create(request):
        start = params(request, m.ContainerCreateQuery).start
        req = await body(request, m.ContainerCreate)
        check_container_create(req)
        if req.NetworkMode == "host" and not req.Hostname:
            req.Hostname = host_hostname()  # as Docker: a host-network container has the host's name
        return web.json_response(await engine.create_container(codec.to_builtins(req), start=start), status=201)

    @routes.get("/containers/{ref}/json")
    async def container_inspect(request):
        return web.json_response(engine.container_view(engine.container(request.match_info["ref"])))

    @routes.post("/containers/{ref}/start")
    async def container_start(request):
        return web.json_response(await engine.start_container(request.match_info["ref"]))

    @routes.post("/containers/{ref}/stop")
    async def container_stop(request):
        await engine.stop_container(request.match_info["ref"], params(request, m.StopQuery).t)
        return web.Response(status=204)

    @routes.delete("/containers/{ref}")
    async def container_remove(request):
        await engine.remove_container(request.match_info["ref"], force=params(request, m.ForceQuery).force)
        return web.Response(status=204)

    @routes.post("/containers/remove")
    async def containers_remove(request):
        """Several containers removed together (daemon/removal.py): one result per name, in order."""
        req = await body(request, m.ContainersRemove)
        results = await removal.remove_containers(engine, req.Names, req.Force)
        return web.json_response([{"Name": n, "Error": None if e is None else str(e),
                                   "Status": None if e is None else e.status} for n, e in zip(req.Names, results)])

    @routes.get("/containers/{ref}/logs")
    async def container_logs(request):
        follow = params(request, m.LogsQuery).follow
        ctr = engine.container(request.match_info["ref"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        pos = 0
        while True:
            chunk = read_log_chunk(ctr["LogPath"], pos)
            if chunk:
                pos += len(chunk)
                await resp.write(chunk)
                continue
            if not follow or not engine.container_view(ctr)["State"]["Running"]:
                # One last read: the process may have written just before exiting.
                if follow:
                    follow = False
                    continue
                break
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app.add_routes(routes)
    for extra in getattr(daemon, "extra_routes", []):
        app.add_routes(extra)
    return app
