"""Service logs across hosts, the hosts' part (the managers relay: manager/tasklogs.py).

- `LogAgent` (every host in a swarm) holds GET /tasks/logs/requests on a manager and answers each request
  for one of its task containers with POSTs of line batches (the tail, then, with follow, new lines until
  the container stops or the caller leaves). Requests are parsed with their bounds; a request for a task
  this host has no container of gets one error line; at most SERVING requests at once.
- The local API's GET /services/{ref}/logs (a manager's daemon, as Docker's `service logs`) reads this
  host's tasks' logs itself and asks the managers for the others', one stream per task, and merges them
  into one ndjson stream for the CLI: {"out": "web.1.ID@NODE    | line"} or {"err": "..."}.

Log files hold raw output without times: --timestamps shows when the task's host read each line (for a
followed line, within POLL of when it was written; for older lines, when `service logs` ran).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from urllib.parse import quote

import msgspec

from netweft.http import client as http
from netweft.http import web

from netweft.agent.node import LineSplitter, manager_url
from netweft.errors import InvalidRequest, NetweftError, NotFound
from netweft.model import codec
from netweft.model.tasklogs import BATCH_LINES, LINE_MAX, AgentMessage, LogBatch, LogLine, LogReply, LogRequest

log = logging.getLogger("netweft.tasklogs")

POLL = 0.25                  # seconds between looks at a followed log (and at most this many POSTs a second)
HEARTBEAT = 5.0              # seconds: a followed quiet log still asks whether its caller is there
SERVING = 8                  # requests this host answers at once
MAX_BACK = 64 << 20          # bytes of a log read back for --tail (or all)
BATCH_BYTES = 256 << 10      # characters in one batch
READ = 256 << 10
MAX_TASKS = 256              # tasks one `service logs` shows
REQUEST_LINE_MAX = 64 << 10  # one line of a manager's request stream
RATE_RETRIES = 30            # a batch refused by the managers' rate limit is sent again, a second apart
TASK_LABEL = "com.docker.swarm.task.id"
_decode_msg = msgspec.json.Decoder(AgentMessage)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _pieces(raw: bytes) -> list[str]:
    """One line of output as log lines of at most LINE_MAX characters."""
    text = raw.decode(errors="replace")
    return [text[i:i + LINE_MAX] for i in range(0, len(text), LINE_MAX)] or [""]


def tail_start(path: str, tail: int) -> tuple[int, int]:
    """(offset where the last `tail` lines start (-1: all, at most MAX_BACK bytes back), size now)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0, 0
    if tail < 0:
        return max(0, size - MAX_BACK), size
    if tail == 0:
        return size, size
    with open(path, "rb") as f:
        block, start = 64 << 10, size
        while start > 0 and size - start < MAX_BACK:
            start = max(0, start - block)
            f.seek(start)
            data = f.read(size - start)
            # Lines end with "\n"; the last may not yet. tail+1 newlines back is where the tail starts.
            body = data[:-1] if data.endswith(b"\n") else data
            n = body.count(b"\n")
            if n >= tail:
                cut = len(body)
                for _ in range(tail):
                    cut = body.rfind(b"\n", 0, cut)
                return start + cut + 1, size
            block *= 2
    return max(0, size - MAX_BACK), size


async def read_log(path: str, tail: int, follow: bool, alive: Callable[[], bool],
                   poll: float = POLL) -> AsyncIterator[list[LogLine]]:
    """Batches of a log's lines: the last `tail` (-1: all), then with follow the new ones until alive() is
    False. With follow, an empty batch at least every HEARTBEAT seconds."""
    pos, _ = tail_start(path, tail)
    rest = b""
    quiet_since = time.monotonic()
    last_look = False
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read(READ)
        except FileNotFoundError:
            data = b""
        if data:
            pos += len(data)
            parts = (rest + data).split(b"\n")
            rest = parts.pop()
            if len(rest) > LINE_MAX * 4:   # a huge line without a newline: sent in pieces
                parts.append(rest)
                rest = b""
            batch: list[LogLine] = []
            size = 0
            ts = _now()
            for raw in parts:
                for text in _pieces(raw):
                    batch.append(LogLine(ts=ts, text=text))
                    size += len(text)
                    if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                        yield batch
                        batch, size = [], 0
            if batch:
                yield batch
            quiet_since = time.monotonic()
            continue
        if not follow or last_look:
            if rest:
                yield [LogLine(ts=_now(), text=t) for t in _pieces(rest)]
            return
        if not alive():
            last_look = True   # one more read: it may have written just before it stopped
            continue
        if time.monotonic() - quiet_since >= HEARTBEAT:
            quiet_since = time.monotonic()
            yield []
        await asyncio.sleep(poll)


class LogAgent:
    """This host's end: answers the managers' log requests for its task containers."""

    def __init__(self, engine):
        self.engine = engine
        self._task: asyncio.Task | None = None
        self.serving: set[asyncio.Task] = set()
        self._said: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self.serving] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def container_of(self, task_id: str) -> dict | None:
        for ctr in self.engine.store.list("containers"):
            if (ctr["Config"].get("Labels") or {}).get(TASK_LABEL) == task_id:
                return ctr
        return None

    def running(self, ctr_id: str) -> bool:
        ctr = self.engine.store.find("containers", ctr_id)
        return ctr is not None and bool(self.engine.container_view(ctr)["State"]["Running"])

    async def _loop(self) -> None:
        turn, failures = 0, 0
        while True:
            agent = self.engine.overlay_agent
            order = agent.client.order() if agent is not None else []
            if not order:
                await asyncio.sleep(1.0)
                continue
            addr = order[turn % len(order)]
            try:
                await self._requests(agent.client, addr)
                failures = 0
            except asyncio.CancelledError:
                raise
            except (NetweftError, http.ClientError, asyncio.TimeoutError, ValueError) as e:
                turn += 1   # another manager next time
                failures += 1
                why = f"{addr}: {type(e).__name__}: {e}"[:300]
                if why not in self._said:
                    self._said.add(why)
                    log.info("log request stream ended; reconnecting", extra={"reason": why})
            await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))

    async def _requests(self, client, addr: str) -> None:
        s = client.session()
        timeout = http.ClientTimeout(total=None, sock_read=10, sock_connect=5)
        async with s.get(manager_url(addr, "/tasks/logs/requests"), timeout=timeout) as r:
            if r.status >= 400:
                raise NetweftError(f"the manager answered {r.status}")
            lines = LineSplitter(REQUEST_LINE_MAX)
            async for chunk in r.content.iter_any():
                for line in lines.feed(chunk):
                    try:
                        msg = _decode_msg.decode(line)
                    except (msgspec.ValidationError, msgspec.DecodeError) as e:
                        log.warning("a log request could not be read; skipped", extra={"reason": str(e)[:200]})
                        continue
                    if isinstance(msg, LogRequest):
                        self._take(client, addr, msg)

    def _take(self, client, addr: str, req: LogRequest) -> None:
        if len(self.serving) >= SERVING:
            t = asyncio.ensure_future(self._post(client, addr, req.id, LogBatch(
                end=True, error=f"too many log requests on this host (at most {SERVING} at once); retry")))
        else:
            t = asyncio.ensure_future(self._serve(client, addr, req))
        self.serving.add(t)
        t.add_done_callback(self.serving.discard)

    async def _post(self, client, addr: str, rid: str, batch: LogBatch) -> bool:
        """Send one batch; whether to go on."""
        for _ in range(RATE_RETRIES):
            try:
                got = await client.call_at(addr, "POST", f"/tasks/logs/{rid}", msgspec.to_builtins(batch))
                return codec.convert(got, LogReply, "log reply").more
            except NetweftError as e:
                if getattr(e, "status", 0) != 429:
                    return False   # the request is gone (the caller left, or it timed out)
                await asyncio.sleep(1.0)   # this node's calls are rate-limited: slower, not cut short
        return False

    async def _serve(self, client, addr: str, req: LogRequest) -> None:
        ctr = self.container_of(req.task)
        if ctr is None:
            await self._post(client, addr, req.id, LogBatch(
                end=True, error=f"task {req.task[:12]} has no container on this host (it is not running)"))
            return
        try:
            async for batch in read_log(ctr["LogPath"], req.tail, req.follow, lambda: self.running(ctr["Id"])):
                if not await self._post(client, addr, req.id, LogBatch(lines=batch)):
                    return
            await self._post(client, addr, req.id, LogBatch(end=True))
        except OSError as e:
            await self._post(client, addr, req.id, LogBatch(end=True, error=f"cannot read the task's log: "
                                                                           f"{e.strerror or e}"))


# ---------------------------------------------------------------------- the local API
def parse_query(query) -> tuple[int, bool, bool, bool]:
    """?tail=N|all&follow=&timestamps=&no_trunc= -> (tail, follow, timestamps, no_trunc)."""
    from netweft.manager.tasklogs import parse_query as tail_follow
    tail, follow = tail_follow(query)
    flags = []
    for k in ("timestamps", "no_trunc"):
        v = query.get(k, "0")
        if v not in ("0", "1", "true", "false"):
            raise InvalidRequest(f"invalid {k} {v[:20]!r}: 1 or 0")
        flags.append(v in ("1", "true"))
    return tail, follow, flags[0], flags[1]


def prefix(view: dict, no_trunc: bool) -> str:
    """Docker's `service logs` prefix: SERVICE.SLOT.TASKID@NODE (the ID cut at 12 unless --no-trunc)."""
    name = view["Name"]
    service, _, rest = name.partition(".")
    slot, _, tid = rest.rpartition(".")
    return f"{service}.{slot}.{tid if no_trunc else tid[:12]}@{view['Node'] or '?'}"


def routes(daemon) -> web.RouteTableDef:
    r = web.RouteTableDef()
    swarm = daemon.swarm

    async def admin(method, path, local):
        value = swarm.admin(method, path, None, local=local)
        while asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        return value

    async def local_lines(view, tail, follow) -> AsyncIterator[tuple[str, str, str]]:
        ctr = daemon.tasklogs.container_of(view["ID"])
        if ctr is None:
            yield "err", "", "it has no container on this host (it is not running)"
            return
        async for batch in read_log(ctr["LogPath"], tail, follow, lambda: daemon.tasklogs.running(ctr["Id"])):
            for ln in batch:
                yield "out", ln.ts, ln.text

    async def remote_lines(view, tail, follow) -> AsyncIterator[tuple[str, str, str]]:
        agent = daemon.engine.overlay_agent
        if agent is None:
            yield "err", "", "this host is not in a swarm"
            return
        client = agent.client
        path = f"/admin/tasks/{quote(view['ID'], safe='')}/logs?tail={tail if tail >= 0 else 'all'}" \
               f"&follow={int(follow)}"
        why = []
        for addr in client.order():
            s = client.session()
            try:
                async with s.get(manager_url(addr, path), timeout=http.ClientTimeout(
                        total=None, sock_read=15, sock_connect=5)) as resp:
                    if resp.status == 503:   # not this manager: the task's node streams to another
                        why.append(addr)
                        continue
                    if resp.status >= 400:
                        text = (await resp.content.read(4096)).decode(errors="replace")
                        try:
                            text = str(json.loads(text)["message"])
                        except (ValueError, KeyError, TypeError):
                            pass
                        yield "err", "", " ".join(text.split())[:300]
                        return
                    lines = LineSplitter(4 * LINE_MAX + 4096)
                    async for chunk in resp.content.iter_any():
                        for line in lines.feed(chunk):
                            msg = json.loads(line)
                            if not isinstance(msg, dict):
                                continue
                            if "line" in msg:
                                yield "out", str(msg.get("ts", ""))[:40], str(msg["line"])[:LINE_MAX]
                            elif "error" in msg:
                                yield "err", "", str(msg["error"])[:300]
                            elif msg.get("end"):
                                return
                    yield "err", "", "the manager ended the stream early"
                    return
            except (http.ClientError, asyncio.TimeoutError, InvalidRequest, ValueError) as e:
                why.append(f"{addr} ({type(e).__name__})")
        yield "err", "", f"no manager relays this task's node ({', '.join(why) or 'none known'}); retry"

    @r.get("/services/{ref}/logs")
    async def logs(request):
        """Every task's log, on whichever host it runs, as ndjson lines for the CLI."""
        ref = request.match_info["ref"]
        tail, follow, stamps, no_trunc = parse_query(request.query)
        svc = lambda: swarm.manager.services   # noqa: E731
        views = await admin("GET", f"/tasks?service={quote(ref, safe='')}", lambda: svc().task_views(ref))
        views = [v for v in views if v["NodeID"] and (v["DesiredState"] == "running"
                                                      or v["Status"]["State"] == "running")]
        me = (swarm.state() or {}).get("NodeID", "")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        out: asyncio.Queue = asyncio.Queue(maxsize=1024)
        if len(views) > MAX_TASKS:
            await resp.write(_j({"err": f"the service has {len(views)} tasks: showing the first {MAX_TASKS}"}))
            views = views[:MAX_TASKS]

        async def pump(view):
            head = prefix(view, no_trunc)
            lines = local_lines(view, tail, follow) if view["NodeID"] == me else remote_lines(view, tail, follow)
            try:
                async for kind, ts, text in lines:
                    if kind == "out":
                        await out.put({"out": f"{head}    | " + (f"{ts} " if stamps and ts else "") + text})
                    else:
                        await out.put({"err": f"{head}: {text}"})
            finally:
                await lines.aclose()

        pumps = [asyncio.ensure_future(pump(v)) for v in views]
        done = asyncio.ensure_future(asyncio.gather(*pumps, return_exceptions=True))
        try:
            while True:
                getter = asyncio.ensure_future(out.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await resp.write(_j(getter.result()))
                    continue
                getter.cancel()
                while not out.empty():
                    await resp.write(_j(out.get_nowait()))
                break
            await resp.write_eof()
        except ConnectionError:
            pass   # the caller went away
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return resp

    return r


def _j(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"
