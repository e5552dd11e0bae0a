"""The daemon's local HTTP API (unix socket). Shapes follow Docker's Engine API where it has them."""
from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

from aiohttp import web

from netweft.errors import InvalidRequest, NetweftError

log = logging.getLogger("netweft.api")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except NetweftError as e:
        log.info("request refused", extra={"path": request.path, "status": e.status, "reason": str(e)})
        return web.json_response({"message": str(e)}, status=e.status)
    except web.HTTPException:
        raise
    except Exception as e:  # a bug or a kernel surprise: log it whole, tell the caller one line
        log.exception("request failed", extra={"path": request.path})
        return web.json_response({"message": f"internal error: {e}"}, status=500)


async def body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except json.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def query_filters(request: web.Request) -> dict[str, list[str]]:
    raw = request.query.get("filters")
    if not raw:
        return {}
    try:
        filters = json.loads(raw)
    except json.JSONDecodeError:
        raise InvalidRequest("filters must be JSON, e.g. {\"name\": [\"mgmt\"]}") from None
    return {k: v if isinstance(v, list) else [v] for k, v in filters.items()}


def build_app(daemon) -> web.Application:
    """daemon has .engine (local networks and containers) and .info() (daemon facts)."""
    engine = daemon.engine
    routes = web.RouteTableDef()

    @routes.get("/_ping")
    async def ping(request):
        return web.Response(text="OK")

    @routes.get("/info")
    async def info(request):
        return web.json_response(daemon.info())

    @routes.get("/openapi.json")
    async def openapi(request):
        text = resources.files("netweft.daemon").joinpath("openapi.json").read_text()
        return web.Response(text=text, content_type="application/json")

    @routes.get("/networks")
    async def network_list(request):
        return web.json_response(engine.list_networks(query_filters(request)))

    @routes.post("/networks/create")
    async def network_create(request):
        net = await engine.create_network(await body(request))
        return web.json_response({"Id": net["Id"], "Warning": ""}, status=201)

    @routes.post("/networks/prune")
    async def network_prune(request):
        return web.json_response({"NetworksDeleted": await engine.prune_networks()})

    @routes.get("/networks/{ref}")
    async def network_inspect(request):
        return web.json_response(engine.network_view(await engine.network(request.match_info["ref"])))

    @routes.delete("/networks/{ref}")
    async def network_remove(request):
        await engine.remove_network(request.match_info["ref"])
        return web.Response(status=204)

    @routes.post("/networks/{ref}/connect")
    async def network_connect(request):
        b = await body(request)
        cfg = b.get("EndpointConfig") or {}
        ep = await engine.connect(request.match_info["ref"], b.get("Container", ""),
                                  ip=(cfg.get("IPAMConfig") or {}).get("IPv4Address") or None,
                                  aliases=cfg.get("Aliases") or [], mac=cfg.get("MacAddress") or None)
        return web.json_response(ep)

    @routes.post("/networks/{ref}/disconnect")
    async def network_disconnect(request):
        b = await body(request)
        await engine.disconnect(request.match_info["ref"], b.get("Container", ""))
        return web.Response(status=200)

    @routes.get("/containers/json")
    async def container_list(request):
        return web.json_response(engine.list_containers(all=request.query.get("all") in ("1", "true")))

    @routes.post("/containers/create")
    async def container_create(request):
        start = request.query.get("start", "1") in ("1", "true")
        return web.json_response(await engine.create_container(await body(request), start=start), status=201)

    @routes.get("/containers/{ref}/json")
    async def container_inspect(request):
        return web.json_response(engine.container_view(engine.container(request.match_info["ref"])))

    @routes.post("/containers/{ref}/start")
    async def container_start(request):
        return web.json_response(await engine.start_container(request.match_info["ref"]))

    @routes.post("/containers/{ref}/stop")
    async def container_stop(request):
        t = request.query.get("t", "10")
        try:
            timeout = float(t)
        except ValueError:
            raise InvalidRequest(f"invalid stop timeout {t!r}: expected seconds") from None
        await engine.stop_container(request.match_info["ref"], timeout)
        return web.Response(status=204)

    @routes.delete("/containers/{ref}")
    async def container_remove(request):
        await engine.remove_container(request.match_info["ref"], force=request.query.get("force") in ("1", "true"))
        return web.Response(status=204)

    @routes.get("/containers/{ref}/logs")
    async def container_logs(request):
        ctr = engine.container(request.match_info["ref"])
        follow = request.query.get("follow") in ("1", "true")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        pos = 0
        while True:
            try:
                with open(ctr["LogPath"], "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
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

    app = web.Application(middlewares=[errors_middleware], client_max_size=4 * 1024 * 1024)
    app.add_routes(routes)
    for extra in getattr(daemon, "extra_routes", []):
        app.add_routes(extra)
    return app
