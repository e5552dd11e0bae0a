"""The read-only web dashboard (`netweftd --dashboard-addr IP:PORT`): hosts, networks, endpoints and the
host-to-host data-path health matrix, updating live over server-sent events.

Served by managers: the leader answers from its state, another manager from the leader's
GET /admin/overview; a worker's page says it is no manager. It has no login, so it is off by default,
meant for 127.0.0.1 (reach it through an SSH tunnel), and guarded against other sites' pages: only GET,
a Host header that is an IP address or localhost (a DNS-rebinding page gets 421), no cross-origin
anything, and a Content-Security-Policy that lets the page load nothing but its own three files.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from importlib import resources

import msgspec
from netweft.http import web

from netweft.daemon.listen import serve_tcp
from netweft.errors import NetweftError
from netweft.manager.overview import overview

log = logging.getLogger("netweft.dashboard")

POLL = 0.5            # seconds between looks at the leader's revision (another manager: FORWARD_POLL)
FORWARD_POLL = 1.0
KEEPALIVE = 15.0      # an SSE comment line when nothing changed for this long
ASSETS = {"/": ("index.html", "text/html"), "/dashboard.js": ("dashboard.js", "text/javascript"),
          "/dashboard.css": ("dashboard.css", "text/css")}
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
NOT_MANAGER = ("this node is not a swarm manager: the dashboard shows the cluster from a manager's state; "
               "open it on a manager")


def host_allowed(host: str | None) -> bool:
    """An IP literal (with an optional port) or localhost: a name another site controls is not ours."""
    if not host:
        return False
    if host.startswith("["):                       # [IPv6]:port
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@web.middleware
async def guard(request: web.Request, handler):
    if request.method not in ("GET", "HEAD"):
        return web.json_response({"error": "the dashboard is read-only"}, status=405, headers=HEADERS)
    if not host_allowed(request.headers.get("Host")):
        return web.json_response({"error": "open the dashboard by IP address or localhost"}, status=421,
                                 headers=HEADERS)
    resp = await handler(request)
    resp.headers.update(HEADERS)
    return resp


class DashboardServer:
    def __init__(self, daemon, addr: tuple[str, int]):
        self.daemon, self.addr = daemon, addr
        self.runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task] = set()

    async def start(self) -> None:
        app = web.Application(middlewares=[guard])
        for path in ASSETS:
            app.router.add_get(path, self.asset)
        app.router.add_get("/api/overview", self.overview_json)
        app.router.add_get("/api/stream", self.stream)
        self.runner = await serve_tcp(app, self.addr, "--dashboard-addr")
        extra = {"url": f"http://{self.addr[0]}:{self.addr[1]}/"}
        if not ipaddress.ip_address(self.addr[0]).is_loopback:
            log.warning("the dashboard has no login and listens beyond this host: anyone who reaches it sees the "
                        "cluster; prefer 127.0.0.1 and an SSH tunnel", extra=extra)
        else:
            log.info("dashboard served", extra=extra)

    async def stop(self) -> None:
        for t in list(self._streams):
            t.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def asset(self, request: web.Request) -> web.Response:
        name, ctype = ASSETS[request.path]
        text = resources.files("netweft.daemon").joinpath("dashboard", name).read_text()
        return web.Response(text=text, content_type=ctype)

    async def current(self) -> dict:
        """The overview: the leader's own, or fetched from the leader by another manager."""
        swarm = self.daemon.swarm
        st = swarm.state()
        if st is None:
            raise NetweftError("this node is not part of a swarm: the dashboard shows a cluster")
        if swarm.manager is not None and swarm.manager.hub is not None:
            return {**overview(swarm.manager.state, swarm.manager.node_id), "served_by": self.daemon.hostname}
        if st.get("Role") != "manager" or swarm.agent is None:
            raise NetweftError(NOT_MANAGER)
        return {**await swarm.agent.call("GET", "/admin/overview"), "served_by": self.daemon.hostname}

    async def overview_json(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self.current())
        except NetweftError as e:
            return web.json_response({"error": str(e)}, status=503)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the overview now, then again each time the cluster's revision moves."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        task = asyncio.current_task()
        self._streams.add(task)
        last_rev, last_error, idle = None, None, 0.0
        try:
            while True:
                t0 = time.monotonic()
                swarm = self.daemon.swarm
                local = swarm.manager is not None and swarm.manager.hub is not None
                if local and last_rev == swarm.manager.state.rev:
                    data = None   # nothing new: no snapshot is built
                else:
                    try:
                        view = await self.current()
                        data = None if view["rev"] == last_rev else view
                        last_error = None
                    except NetweftError as e:
                        data = None
                        if str(e) != last_error:
                            last_error = str(e)
                            await resp.write(b"event: problem\ndata: " + json.dumps({"error": str(e)}).encode() +
                                             b"\n\n")
                if data is not None:
                    last_rev, idle = data["rev"], 0.0
                    await resp.write(b"event: overview\ndata: " + msgspec.json.encode(data) + b"\n\n")
                elif idle >= KEEPALIVE:
                    idle = 0.0
                    await resp.write(b": keep-alive\n\n")
                # A big cluster's overview costs: never more than a tenth of the loop on it.
                pause = max(POLL if local else FORWARD_POLL, 10 * (time.monotonic() - t0))
                await asyncio.sleep(pause)
                idle += pause
        except ConnectionError:
            pass   # the page was closed
        finally:
            self._streams.discard(task)
        return resp
