"""Service logs across hosts, the managers' part: a relay between a caller and the agent of a task's node.

Workers listen on no port; each agent holds one long GET /tasks/logs/requests on a manager, and the
manager writes log requests down it (model/tasklogs.py). The agent answers a request with POSTs of line
batches to /tasks/logs/{id}; the manager hands them to the caller's GET /admin/tasks/{task}/logs stream,
through a small bounded queue (a slow caller slows the agent's POSTs down; it never grows memory).

Not the watch: the watch carries stored state with revisions, resumable, to every agent; a log request is
neither stored nor resumable, and a busy `logs -f` must neither queue behind nor cut off a node's watch.

Several managers: an agent's stream is on one of them; a caller asking another gets 503 ("not
connected here") and asks the next (daemon/tasklogs.py).

Limits (every peer is hostile): one request stream per node (a new one replaces the old); at most
PER_NODE requests open per node and OPEN in all; a request the agent does not start answering within
START_TIMEOUT ends with one line; a batch is parsed with its bounds (10,000 lines of 16 KiB, 4 MiB a body); POSTs for a
request go only from the node it was sent to; a request ends after MAX_BYTES unless it follows.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets

from aiohttp import web

from netweft.errors import Forbidden, NotFound, Unavailable
from netweft.manager.auth import TooManyRequests
from netweft.model import codec
from netweft.model.tasklogs import LogBatch, LogReply, LogRequest

log = logging.getLogger("netweft.manager.tasklogs")

PING = 2.0                 # seconds between keep-alive lines on an idle stream (both kinds)
START_TIMEOUT = 5.0        # seconds an agent has to start answering a request
PER_NODE = 16              # requests open per node
OPEN = 256                 # requests open on this manager
QUEUE = 16                 # batches waiting for a slow caller, per request
PUT_TIMEOUT = 30.0         # seconds a POST may wait for a slow caller before the request is ended
MAX_BYTES = 64 << 20       # characters relayed for one request that does not follow


class Channel:
    """One agent's request stream."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=PER_NODE * 2)
        self.closed = asyncio.Event()


class Pending:
    """One caller's request, between the caller's stream and the agent's POSTs."""

    def __init__(self, rid: str, node_id: str, follow: bool):
        self.id, self.node_id, self.follow = rid, node_id, follow
        self.batches: asyncio.Queue[LogBatch] = asyncio.Queue(maxsize=QUEUE)
        self.gone = False          # the caller left: the agent is told to stop
        self.size = 0


class LogRelay:
    def __init__(self, state, hostname=lambda node_id: node_id):
        self.state = state          # () -> the manager's ClusterState
        self.hostname = hostname
        self.channels: dict[str, Channel] = {}
        self.pending: dict[str, Pending] = {}

    # ------------------------------------------------------------------ the agent's side
    async def serve_requests(self, request: web.Request, node_id: str) -> web.StreamResponse:
        """GET /tasks/logs/requests: this node's requests as they come, a ping when idle."""
        old = self.channels.get(node_id)
        if old is not None:
            old.closed.set()            # one stream per node: the newer one wins
        ch = self.channels[node_id] = Channel(node_id)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            while not ch.closed.is_set():
                try:
                    line = await asyncio.wait_for(ch.outbox.get(), PING)
                except TimeoutError:
                    line = b'{"type":"ping"}\n'
                await resp.write(line)
        except ConnectionError:
            pass   # the caller went away
        finally:
            if self.channels.get(node_id) is ch:
                del self.channels[node_id]
                for p in [p for p in self.pending.values() if p.node_id == node_id]:
                    self._end(p, "the node's agent disconnected")
        return resp

    async def answer(self, node_id: str, rid: str, body: bytes) -> LogReply:
        """POST /tasks/logs/{id}: a batch of lines for a request sent to this node."""
        p = self.pending.get(rid)
        if p is None:
            raise NotFound(f"log request {rid[:40]!r} is not open (the caller left or it timed out); stop sending")
        if p.node_id != node_id:
            raise Forbidden(f"log request {rid[:40]!r} was sent to another node; a node answers only its own")
        batch = codec.decode(body, LogBatch, "log batch")
        if p.gone:
            return LogReply(more=False)
        p.size += sum(len(line.text) for line in batch.lines)
        if not p.follow and p.size > MAX_BYTES:
            batch = LogBatch(lines=batch.lines, end=True, error=f"log cut at {MAX_BYTES >> 20} MiB")
        try:
            await asyncio.wait_for(p.batches.put(batch), PUT_TIMEOUT)
        except TimeoutError:
            self._end(p, "the caller reads too slowly")
            return LogReply(more=False)
        return LogReply(more=not (batch.end or p.gone))

    # ------------------------------------------------------------------ the caller's side
    def _end(self, p: Pending, error: str = "") -> None:
        p.gone = True
        self.pending.pop(p.id, None)
        try:
            p.batches.put_nowait(LogBatch(end=True, error=error))
        except asyncio.QueueFull:
            pass   # the caller's loop sees `gone` when it drains the queue

    def open(self, task_id: str, tail: int, follow: bool) -> Pending:
        """A new request for a task's log, sent down its node's stream (refusals change nothing)."""
        t = self.state().get("tasks", task_id)
        if t is None:
            raise NotFound(f"task {task_id[:40]!r} not found; see `netweft service ps`")
        if not t.node_id:
            raise NotFound(f"task {task_id[:40]!r} is not on a node yet")
        ch = self.channels.get(t.node_id)
        if ch is None:
            raise Unavailable(f"node {self.hostname(t.node_id)!r} has no log channel to this manager; "
                              "ask another manager")
        if len(self.pending) >= OPEN or sum(1 for p in self.pending.values() if p.node_id == t.node_id) >= PER_NODE:
            raise TooManyRequests(f"too many log requests open for node {self.hostname(t.node_id)!r}; "
                                  "retry when some end", 1)
        req = LogRequest(id=secrets.token_hex(16), task=task_id, tail=tail, follow=follow)
        try:
            ch.outbox.put_nowait(codec.encode(req) + b"\n")
        except asyncio.QueueFull:
            raise TooManyRequests(f"too many log requests queued for node {self.hostname(t.node_id)!r}; "
                                  "retry", 1) from None
        p = self.pending[req.id] = Pending(req.id, t.node_id, follow)
        return p

    async def serve_logs(self, request: web.Request, task_id: str) -> web.StreamResponse:
        """GET /admin/tasks/{task}/logs?tail=N&follow=1: the task's lines as ndjson, then {"end": true}."""
        tail, follow = parse_query(request.query)
        p = self.open(task_id, tail, follow)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        started = False
        try:
            await resp.prepare(request)
            while True:
                try:
                    batch = await asyncio.wait_for(p.batches.get(), PING if started else START_TIMEOUT)
                except TimeoutError:
                    if p.gone and p.batches.empty():
                        break
                    if not started:
                        await resp.write(_line({"error": f"node {self.hostname(p.node_id)!r} did not answer the "
                                                         f"log request within {START_TIMEOUT:g} s"}))
                        break
                    await resp.write(b'{"ping":true}\n')
                    continue
                started = True
                if batch.lines:
                    await resp.write(b"".join(_line({"ts": ln.ts, "line": ln.text}) for ln in batch.lines))
                if batch.error:
                    await resp.write(_line({"error": batch.error}))
                if batch.end:
                    break
            await resp.write(b'{"end":true}\n')
        except ConnectionError:
            pass   # the caller went away
        finally:
            self._end(p)
        return resp


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def parse_query(query) -> tuple[int, bool]:
    """?tail=N|all&follow=0|1 -> (tail, -1 for all; follow)."""
    from netweft.errors import InvalidRequest
    from netweft.model.tasklogs import MAX_TAIL
    text = query.get("tail", "all")
    if text == "all":
        tail = -1
    elif text.isascii() and text.isdigit() and len(text) <= 7 and int(text) <= MAX_TAIL:
        tail = int(text)
    else:
        raise InvalidRequest(f"invalid tail {text[:20]!r}: a number of lines (at most {MAX_TAIL}) or all")
    follow = query.get("follow", "0")
    if follow not in ("0", "1", "true", "false"):
        raise InvalidRequest(f"invalid follow {follow[:20]!r}: 1 or 0")
    return tail, follow in ("1", "true")


def routes(relay: LogRelay) -> web.RouteTableDef:
    from netweft.manager.auth import MANAGER, WORKER, allow
    r = web.RouteTableDef()

    @r.get("/tasks/logs/requests")
    @allow(WORKER)
    async def requests(request):
        return await relay.serve_requests(request, request["node"].id)

    @r.post("/tasks/logs/{id}")
    @allow(WORKER)
    async def answer(request):
        reply = await relay.answer(request["node"].id, request.match_info["id"], await request.read())
        return web.Response(body=codec.encode(reply), content_type="application/json")

    @r.get("/admin/tasks/{id}/logs")
    @allow(MANAGER)
    async def task_logs(request):
        return await relay.serve_logs(request, request.match_info["id"])

    return r
