"""GET /events on the local API: the cluster's events (netweft/manager/events.py) for `netweft events`.

On the leader they are read from its cluster store; on any other member they are relayed from the
managers' GET /events over mutual TLS (a worker sees what its watch already tells it). Either way
they come from the store's history, so --since shows the same past on every host.
"""
from __future__ import annotations

import json

from aiohttp import web

from netweft.errors import Unavailable
from netweft.manager import events
from netweft.model.events import parse_filters

NOT_IN_SWARM = ("this node is not part of a swarm: events come from the cluster's store; run `netweft swarm "
                "init` or `netweft swarm join` first")


def routes(daemon) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/events")
    async def stream(request):
        q = request.query
        # Refused here in one line, before a stream starts or a manager is asked.
        events.parse_ns(q.get("since"), "since"), events.parse_ns(q.get("until"), "until")
        parse_filters(q.get("filters"))
        swarm = daemon.swarm
        if swarm.state() is None:
            raise Unavailable(NOT_IN_SWARM)
        manager = swarm.manager
        if manager is not None and manager.hub is not None:
            return await events.serve(request, manager.store, lambda: manager.state, lambda e: True)
        client = swarm.agent.client if swarm.agent is not None else None
        if client is None:
            raise Unavailable(NOT_IN_SWARM)
        return await relay(request, client, "/events?" + request.rel_url.raw_query_string)

    return r


async def relay(request: web.Request, client, path: str) -> web.StreamResponse:
    """The managers' stream, line by line. A refusal before the first line is this call's refusal."""
    lines = client.stream(path).__aiter__()
    try:
        first = await lines.__anext__()   # raises the manager's refusal (or Unavailable) as it is
    except StopAsyncIteration:
        first = None                      # nothing happened in the window asked for
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        if first is not None:
            await resp.write(json.dumps(first).encode() + b"\n")
        async for line in lines:
            await resp.write(json.dumps(line).encode() + b"\n")
        await resp.write_eof()
    except ConnectionError:
        pass
    except Unavailable as e:   # the manager went away mid-stream: one last line says so
        await resp.write(json.dumps({"type": "error", "message": str(e)}).encode() + b"\n")
    finally:
        await lines.aclose()
    return resp
