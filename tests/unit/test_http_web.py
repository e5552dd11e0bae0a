"""netweft.http.web and netweft.http.client against each other, and against raw bytes from a hostile peer."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from netweft.http import client, web

PORT_HOST = "127.0.0.1"


def app(max_size: int = 1024) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/things/{ref}")
    async def thing(request):
        return web.json_response({"ref": request.match_info["ref"], "query": request.query,
                                  "template": request.match_info.route.resource.canonical})

    @routes.post("/things/create")
    async def create(request):
        body = await request.read() if request.can_read_body else b""
        return web.json_response({"got": body.decode()}, status=201)

    @routes.delete("/things/{ref}")
    async def remove(request):
        return web.Response(status=204)

    @routes.get("/stream")
    async def stream(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(json.dumps({"n": i}).encode() + b"\n")
        await resp.write_eof()
        return resp

    @routes.get("/boom")
    async def boom(request):
        raise RuntimeError("a bug")

    a = web.Application(client_max_size=max_size)
    a.add_routes(routes)
    return a


async def serve(a: web.Application, path: str) -> web.AppRunner:
    runner = web.AppRunner(a)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


async def raw(path: str, data: bytes) -> bytes:
    r, w = await asyncio.open_unix_connection(path)
    w.write(data)
    await w.drain()
    out = await asyncio.wait_for(r.read(), 10)
    w.close()
    return out


def split(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def on_server(tmp_path, a, fn):
    async def go():
        path = str(tmp_path / "s.sock")
        runner = await serve(a, path)
        try:
            return await fn(path)
        finally:
            await runner.cleanup()
    return asyncio.run(go())


# ------------------------------------------------------------------ the server, raw
def test_routes_params_and_query_are_decoded(tmp_path):
    out = on_server(tmp_path, app(), lambda p: raw(p, b"GET /things/a%2Fb?x=1&x=2&y=%20 HTTP/1.1\r\nHost: s\r\n"
                                                      b"Connection: close\r\n\r\n"))
    status, headers, body = split(out)
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"ref": "a/b", "query": {"x": "1", "y": " "}, "template": "/things/{ref}"}
    assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"


def test_keep_alive_serves_several_requests_on_one_connection_chunked_bodies_too(tmp_path):
    req = (b"POST /things/create HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n\r\nabc"
           b"POST /things/create HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n"
           b"DELETE /things/x HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    out = on_server(tmp_path, app(), lambda p: raw(p, req))
    assert out.count(b"HTTP/1.1 201 Created") == 2 and b'{"got": "abc"}' in out and b'{"got": "def"}' in out
    assert out.endswith(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")


def test_a_stream_is_chunked_and_a_head_request_gets_no_body(tmp_path):
    out = on_server(tmp_path, app(), lambda p: raw(p, b"GET /stream HTTP/1.1\r\nConnection: close\r\n\r\n"))
    status, headers, body = split(out)
    assert headers["transfer-encoding"] == "chunked" and body == b'9\r\n{"n": 0}\n\r\n9\r\n{"n": 1}\n\r\n' \
        b'9\r\n{"n": 2}\n\r\n0\r\n\r\n'
    out = on_server(tmp_path, app(), lambda p: raw(p, b"HEAD /things/x HTTP/1.1\r\nConnection: close\r\n\r\n"))
    status, headers, body = split(out)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""


def test_an_http_1_0_reader_gets_a_stream_until_the_connection_closes(tmp_path):
    out = on_server(tmp_path, app(), lambda p: raw(p, b"GET /stream HTTP/1.0\r\n\r\n"))
    status, headers, body = split(out)
    assert "transfer-encoding" not in headers and body == b'{"n": 0}\n{"n": 1}\n{"n": 2}\n'


def test_no_route_wrong_method_and_a_bug_answer_without_internals(tmp_path):
    async def go(p):
        return [split(await raw(p, f"{m} {u} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()))
                for m, u in (("GET", "/nothing"), ("POST", "/things/x"), ("GET", "/boom"))]
    (s1, _, b1), (s2, _, b2), (s3, _, b3) = on_server(tmp_path, app(), go)
    assert (s1, b1) == (404, b"404: Not Found") and (s2, b2) == (405, b"405: Method Not Allowed")
    assert (s3, b3) == (500, b"500: Internal Server Error")


def test_middlewares_see_the_route_and_turn_refusals_into_their_own_answers(tmp_path):
    seen = []

    @web.middleware
    async def outer(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            return web.json_response({"message": e.reason}, status=e.status)

    async def inner(request, handler):
        seen.append(request.match_info.route.resource and request.match_info.route.resource.canonical)
        return await handler(request)
    a = app(max_size=4)
    a.middlewares[:] = [outer, inner]

    async def go(p):
        return [split(await raw(p, r)) for r in (
            b"GET /things/1 HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /none HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"POST /things/create HTTP/1.1\r\nContent-Length: 5\r\n\r\n12345")]
    (s1, _, _), (s2, _, b2), (s3, h3, b3) = on_server(tmp_path, a, go)
    assert seen == ["/things/{ref}", None, "/things/create"]
    assert (s1, s2, json.loads(b2)) == (200, 404, {"message": "Not Found"})
    assert s3 == 413 and json.loads(b3) == {"message": "Request Entity Too Large"} and h3["connection"] == "close"


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GET /x HTTP/2.0\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", 400, "the target is not a path"),
    (b"POST /things/create HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400,
     "both Content-Length and Transfer-Encoding"),
    (b"POST /things/create HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "only chunked"),
    (b"GET /things/x HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "more than 100 header lines"),
    (b"GET /things/x HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n", 431, "longer than 8190 bytes"),
])
def test_a_request_the_parser_refuses_gets_one_json_line_and_the_connection_closes(tmp_path, request_bytes,
                                                                                  status, words):
    s, headers, body = split(on_server(tmp_path, app(), lambda p: raw(p, request_bytes)))
    assert s == status and headers["connection"] == "close" and words in json.loads(body)["message"]
    assert body.count(b"\n") == 0


def test_a_refused_body_is_read_away_so_the_client_sees_the_answer(tmp_path):
    big = b"x" * (3 * 1024 * 1024)
    out = on_server(tmp_path, app(), lambda p: raw(p, b"POST /things/create HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                                                    % len(big) + big))
    assert split(out)[0] == 413


# ------------------------------------------------------------------ the client against it
def on_tcp(a, fn):
    async def go():
        runner = web.AppRunner(a)
        await runner.setup()
        site = web.TCPSite(runner, PORT_HOST, 0)
        await site.start()
        port = runner.servers[0].sockets[0].getsockname()[1]
        try:
            return await fn(f"http://{PORT_HOST}:{port}")
        finally:
            await runner.cleanup()
    return asyncio.run(go())


def test_the_client_calls_streams_and_reuses_its_connection():
    async def go(base):
        async with client.ClientSession() as s:
            async with s.get(base + "/things/a?b=c") as r:
                one = (r.status, r.content_type, await r.json())
            async with s.post(base + "/things/create", json={"k": 1}) as r:
                two = (r.status, await r.json())
            async with s.get(base + "/stream") as r:
                lines = b"".join([c async for c in r.content.iter_any()])
            async with s.delete(base + "/things/x") as r:
                three = (r.status, await r.read())
            pooled = sum(len(v) for v in s.connector._idle.values())
        return one, two, lines, three, pooled
    one, two, lines, three, pooled = on_tcp(app(), go)
    assert one == (200, "application/json", {"ref": "a", "query": {"b": "c"}, "template": "/things/{ref}"})
    assert two == (201, {"got": '{"k": 1}'})
    assert lines == b'{"n": 0}\n{"n": 1}\n{"n": 2}\n' and three == (204, b"") and pooled == 1


def test_the_client_reads_at_most_what_it_asks_for():
    async def go(base):
        async with client.ClientSession() as s:
            async with s.get(base + "/stream") as r:
                return await r.content.read(12)
    assert on_tcp(app(), go) == b'{"n": 0}\n{"n'


async def fake_server(answer: bytes, hold: float = 0.0):
    """A server that sends `answer` to whatever it is asked, then closes (after `hold` seconds)."""
    async def one(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(answer)
        await w.drain()
        await asyncio.sleep(hold)
        w.close()
    server = await asyncio.start_server(one, PORT_HOST, 0)
    return server, f"http://{PORT_HOST}:{server.sockets[0].getsockname()[1]}"


def against(answer: bytes, fn, hold: float = 0.0):
    async def go():
        server, base = await fake_server(answer, hold)
        try:
            async with client.ClientSession() as s:
                return await fn(s, base)
        finally:
            server.close()
    return asyncio.run(go())


async def read_all(s, base):
    async with s.get(base + "/") as r:
        return r.status, await r.read()


def test_the_client_takes_a_body_delimited_by_the_connection_closing():
    assert against(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", read_all) == (200, b"until the end")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"SSH-2.0-OpenSSH\r\n\r\n",
])
def test_a_broken_answer_is_a_payload_error_never_believed(answer):
    with pytest.raises(client.ClientPayloadError, match="the answer is broken"):
        against(answer, read_all)


def test_a_server_that_closes_at_once_is_a_disconnect():
    with pytest.raises(client.ServerDisconnectedError):
        against(b"", read_all)


def test_a_silent_server_is_a_timeout():
    async def call(s, base):
        async with s.get(base + "/", timeout=client.ClientTimeout(sock_read=0.2)):
            pass
    with pytest.raises(asyncio.TimeoutError):
        against(b"", call, hold=5.0)


def test_a_refused_connection_keeps_its_os_error():
    async def go():
        async with client.ClientSession() as s:
            await s.get("http://127.0.0.1:9/")   # discard port: nothing listens in a test namespace
    with pytest.raises(client.ClientConnectorError) as e:
        asyncio.run(go())
    assert e.value.os_error.errno is not None and isinstance(e.value, client.ClientConnectionError)


def test_a_kept_alive_connection_the_server_closed_meanwhile_is_not_trusted():
    async def go():
        server, base = await fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        try:
            async with client.ClientSession() as s:
                first = await read_all(s, base)       # the server closes it right after: stale in the pool
                await asyncio.sleep(0.05)
                return first, await read_all(s, base)
        finally:
            server.close()
    first, second = asyncio.run(go())
    assert first == second == (200, b"ok")


def test_the_worker_daemon_does_not_load_aiohttp():
    # Everything a worker's netweftd imports to start (the manager is loaded only on a manager).
    code = ("import sys, netweft.daemon.main, netweft.agent.node, netweft.agent.overlay, netweft.daemon.tasklogs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl', 'multidict')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.strip()
    assert out == "[]"


def test_a_kept_alive_connection_that_dies_on_reuse_is_retried_once_on_a_fresh_one():
    connections = []

    async def one(r, w):   # answers one request per connection; the next one on it is dropped unanswered
        connections.append(w)
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.readuntil(b"\r\n\r\n")
        w.close()

    async def go():
        server = await asyncio.start_server(one, PORT_HOST, 0)
        base = f"http://{PORT_HOST}:{server.sockets[0].getsockname()[1]}"
        try:
            async with client.ClientSession() as s:
                return await read_all(s, base), await read_all(s, base), len(connections)
        finally:
            server.close()
    assert asyncio.run(go()) == ((200, b"ok"), (200, b"ok"), 2)


def test_a_client_that_expects_100_continue_is_told_to_send_its_body(tmp_path):
    async def go(p):
        r, w = await asyncio.open_unix_connection(p)
        w.write(b"POST /things/create HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
                b"Connection: close\r\n\r\n")
        first = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        w.write(b"abc")
        rest = await asyncio.wait_for(r.read(), 10)
        w.close()
        return first, rest
    first, rest = on_server(tmp_path, app(), go)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n" and split(rest)[0] == 201 and split(rest)[2] == b'{"got": "abc"}'
