"""GET /events on the local API: what `netweft events` shows.

Cluster events (netweft/manager/events.py) come from the cluster store's history: on the leader from its
own store, on any other member relayed from the managers' GET /events over mutual TLS (a worker sees what
its watch already tells it), so --since shows the same past on every host. This host's local (bridge)
networks add their own events (netweft/daemon/local_events.py, kept in memory since the daemon started).
The two are merged: the past sorted by time once the managers say their history is told, then each event
as it comes.
"""
from __future__ import annotations

import asyncio
import json
import time

from netweft.http import web

from netweft.errors import NetweftError
from netweft.model.events import ClusterEvent, EventFilters, docker_view, parse_filters
from netweft.daemon.memory import lazy_module

events = lazy_module("netweft.manager.events")   # the manager's code: loaded when events are first asked for


def routes(daemon) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/events")
    async def stream(request):
        q = request.query
        since, until = events.parse_ns(q.get("since"), "since"), events.parse_ns(q.get("until"), "until")
        filters = parse_filters(q.get("filters"))   # refused here in one line, before any stream starts
        swarm, source = daemon.swarm, None
        if swarm.state() is not None:
            manager = swarm.manager
            if manager is not None and manager.hub is not None:
                source = leader_lines(manager, since, until, filters)
            elif swarm.agent is not None:
                source = swarm.agent.client.stream("/events?" + request.rel_url.raw_query_string)
        return await merged(request, daemon.engine.events, source, since, until, filters)

    return r


async def leader_lines(manager, since, until, filters: EventFilters):
    async for ev in events.events(manager.store, manager.state, since, until, filters.matches):
        if ev is None:
            yield {"type": "ping"}
        elif ev is events.CAUGHT_UP:
            yield {"type": "caught-up"}
        else:
            yield docker_view(ev)


async def merged(request: web.Request, local, source, since: int | None, until: int | None,
                 filters: EventFilters) -> web.StreamResponse:
    queue: asyncio.Queue = asyncio.Queue(maxsize=4096)
    lines = source.__aiter__() if source is not None else None
    first = None
    if lines is not None:
        try:
            first = await lines.__anext__()   # a refusal (or no manager) is this call's one-line answer
        except StopAsyncIteration:
            lines = None

    def wanted(ev: ClusterEvent) -> bool:
        return filters.matches(ev) and (until is None or ev.time_ns <= until)

    pending = [docker_view(e) for e in local.since(since) if wanted(e)]
    local.subscribe(queue)

    async def pump() -> None:
        try:
            async for line in lines:
                await queue.put(("cluster", line, None))
            await queue.put(("end", None, None))
        except NetweftError as e:
            await queue.put(("error", str(e), None))

    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def write(obj) -> None:
        await resp.write(json.dumps(obj).encode() + b"\n")

    async def tell_past() -> None:
        for v in sorted(pending, key=lambda v: v["timeNano"]):
            await write(v)
        pending.clear()

    async def tell(item) -> None:   # held back until the managers' past is told, so the past stays in order
        if told:
            await write(item)
        else:
            pending.append(item)

    told = lines is None   # no managers' history to wait for (not in a swarm, or nothing in the window)
    if first is not None:
        await queue.put(("cluster", first, None))
    task = asyncio.ensure_future(pump()) if lines is not None else None
    try:
        if told:
            await tell_past()
        while True:
            # A ping every few seconds: a reader that went away is noticed, its stream ended.
            timeout = events.PING
            if task is None and until is not None:   # no managers to end the stream: the clock does
                left = (until - time.time_ns()) / 1e9
                if left <= 0:
                    break
                timeout = min(timeout, left)
            try:
                kind, item, ev = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                if task is None:
                    await write({"type": "ping"})
                continue
            if kind == "local":
                if wanted(ev):
                    await tell(item)
                continue
            if kind == "cluster":
                t = item.get("type")
                if t == "caught-up":
                    if not told:
                        told = True
                        await tell_past()
                elif t != "ping" or told:
                    await tell(item)
                continue
            if not told:
                await tell_past()
            if kind == "error" or until is None:   # a stream without --until ends only when the managers go
                await write({"type": "error", "message": item or "the managers ended the event stream; run "
                                                                 "netweft events again"})
            break
        await resp.write_eof()
    except ConnectionError:
        pass   # the reader went away
    finally:
        local.unsubscribe(queue)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if lines is not None and hasattr(lines, "aclose"):
            await lines.aclose()
    return resp
