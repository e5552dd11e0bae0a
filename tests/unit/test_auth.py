"""The cluster API's guard (manager/auth.py) and the typed bodies of its membership calls (model/cluster.py).

The guard runs here in a plain aiohttp app over loopback HTTP, with a stand-in for the certificate check
(the caller's identity comes from a test header); the real TLS path is covered by
tests/integration/test_security.py.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from netweft import pki
from netweft.errors import Forbidden, InvalidRequest, Unauthorized
from netweft.manager import auth
from netweft.manager.auth import MANAGER, OPEN, WORKER, Admission, RateLimiter, allow, check_role
from netweft.model import codec
from netweft.model.cluster import (HeartbeatAnswer, HeartbeatRequest, JoinAnswer, JoinRequest, LeaveRequest,
                                   RenewRequest, vtep_problem)

TOKEN = "SWMTKN-1-" + "a" * 50 + "-" + "b" * 25


# ------------------------------------------------------------------ the token bucket

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    rl = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("a")
    assert wait == pytest.approx(0.5)           # one token comes back every 1/rate s
    clock.t += 0.5
    assert rl.take("a") == 0.0
    assert rl.take("a") > 0


def test_bucket_is_per_key_and_refills_up_to_the_burst_only():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert rl.take("a") == rl.take("a") == 0.0 and rl.take("a") > 0
    assert rl.take("b") == 0.0                  # another address has its own bucket
    clock.t += 3600                             # a long pause refills to the burst, not beyond
    assert [rl.take("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert rl.take("a") > 0


def test_refused_calls_do_not_earn_or_cost_tokens():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert rl.take("a") == 0.0
    for _ in range(10):                         # hammering while empty changes nothing
        assert rl.take("a") == pytest.approx(1.0)
    clock.t += 1.0
    assert rl.take("a") == 0.0


def test_bucket_memory_is_bounded():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=2, max_keys=100, clock=clock)
    for i in range(10_000):
        rl.take(f"198.51.100.{i}")
        clock.t += 0.001
    assert len(rl) <= 100
    # The most recent (still limited) address is kept.
    rl.take("x")
    rl.take("x")
    assert rl.take("x") > 0


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 5), (1, 0.5)])
def test_bucket_arguments_checked(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


# ------------------------------------------------------------------ declarations and roles

def test_allow_marks_handlers_and_refuses_nonsense():
    @allow(WORKER, MANAGER)
    async def h(request):
        return None
    assert auth.roles_of(h) == {WORKER, MANAGER}

    async def bare(request):
        return None
    assert auth.roles_of(bare) is None
    for bad in [(), ("admin",), (OPEN, WORKER)]:
        with pytest.raises(ValueError):
            allow(*bad)


@pytest.mark.parametrize("roles, cert, stored, ok", [
    ({WORKER}, "worker", "worker", True),
    ({WORKER}, "manager", "manager", True),          # a manager is a node too
    ({WORKER}, "worker", "manager", True),           # promoted, certificate not renewed yet
    ({MANAGER}, "manager", "manager", True),
    ({MANAGER}, "worker", "worker", False),
    ({MANAGER}, "manager", "worker", False),         # demoted: the old certificate no longer counts
    ({MANAGER}, "worker", "manager", False),         # promoted: not until its manager certificate
    ({WORKER, MANAGER}, "worker", "worker", True),
])
def test_role_check_uses_certificate_and_store(roles, cert, stored, ok):
    if ok:
        check_role(frozenset(roles), cert, stored)
    else:
        with pytest.raises(Forbidden, match="manager certificate"):
            check_role(frozenset(roles), cert, stored)


# ------------------------------------------------------------------ the guard in an app

class Ident:
    def __init__(self, node_id: str, role: str):
        self.node_id, self.role = node_id, role


def fake_authenticate(request):
    """X-Test-Node: NODE:CERT_ROLE:STORED_ROLE stands for a verified certificate; 'removed:..' was removed."""
    who = request.headers.get("X-Test-Node")
    if not who:
        raise Unauthorized("a node certificate is required for this call: join the cluster first")
    node_id, cert_role, stored = who.split(":")
    if node_id == "removed":
        raise Forbidden(f"node {node_id} was removed from the cluster")
    return Ident(node_id, cert_role), {"ID": node_id}, stored


async def async_authenticate(request):
    await asyncio.sleep(0)
    return fake_authenticate(request)


def make_app(admission: Admission, seen: list) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/ca")
    @allow(OPEN)
    async def ca(request):
        return web.Response(text="CA")

    @routes.post("/join")
    @allow(OPEN)
    async def join(request):
        b = await auth.read_body(request, JoinRequest)
        seen.append(b)
        return web.json_response({"ok": True})

    @routes.post("/heartbeat")
    @allow(WORKER)
    async def heartbeat(request):
        b = await auth.read_body(request, HeartbeatRequest)
        seen.append((request["ident"].node_id, b))
        return web.json_response({"ok": True})

    @routes.post("/leave")
    @allow(WORKER)
    async def leave(request):
        seen.append(await auth.read_body(request, LeaveRequest, empty_ok=True))
        return web.json_response({})

    @routes.get("/admin/nodes")
    @allow(MANAGER)
    async def nodes(request):
        return web.json_response([])

    @routes.post("/admin/big")
    @allow(MANAGER)
    async def big(request):
        return web.json_response({"n": len(await request.read())})

    @routes.get("/forgotten")
    async def forgotten(request):  # declares nothing
        seen.append("forgotten ran")
        return web.json_response({})

    @routes.get("/hold")
    @allow(WORKER)
    async def hold(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"started\n")
        await asyncio.sleep(30)
        return resp

    app = web.Application(middlewares=[admission.middleware], client_max_size=auth.BODY_LIMIT)
    app.add_routes(routes)
    return app


def run(coro_fn, limiter=None, authenticate=fake_authenticate):
    async def main():
        seen: list = []
        admission = Admission(authenticate, limiter)
        async with TestClient(TestServer(make_app(admission, seen))) as client:
            return await coro_fn(client, seen, admission)
    return asyncio.run(main())


async def refused(resp, status: int, *words: str) -> str:
    assert resp.status == status, (resp.status, await resp.text())
    msg = (await resp.json())["message"]
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


W = {"X-Test-Node": "w1:worker:worker"}
M = {"X-Test-Node": "m1:manager:manager"}
JOIN = {"Token": TOKEN, "CSR": "csr", "Hostname": "h3", "AdvertiseAddr": "192.0.2.13"}


def test_routes_are_admitted_by_their_declared_roles():
    async def go(client, seen, _):
        assert (await client.get("/ca")).status == 200                       # open: no certificate
        await refused(await client.post("/heartbeat", json={}), 401, "certificate is required")
        assert (await client.post("/heartbeat", json={"Addr": "192.0.2.12"}, headers=W)).status == 200
        await refused(await client.get("/admin/nodes", headers=W), 403, "manager certificate")
        await refused(await client.get("/admin/nodes", headers={"X-Test-Node": "m1:manager:worker"}), 403,
                      "demoted")
        assert (await client.get("/admin/nodes", headers=M)).status == 200
        await refused(await client.post("/heartbeat", json={}, headers={"X-Test-Node": "removed:worker:worker"}),
                      403, "removed")
        assert seen == [("w1", HeartbeatRequest(addr="192.0.2.12"))]
    run(go)


def test_a_route_that_declares_nothing_is_refused_to_everyone():
    async def go(client, seen, _):
        for headers in ({}, W, M):
            await refused(await client.get("/forgotten", headers=headers), 403, "declares no roles")
        assert seen == []
    run(go)


def test_unknown_paths_tell_strangers_nothing_and_members_what_is_wrong():
    async def go(client, seen, _):
        await refused(await client.get("/nope"), 401, "certificate is required")
        await refused(await client.get("/nope", headers=W), 404, "no call /nope")
        await refused(await client.delete("/ca", headers=W), 405, "DELETE")
    run(go)


def test_async_authenticate_works_too():
    async def go(client, seen, _):
        assert (await client.post("/heartbeat", json={}, headers=W)).status == 200
        await refused(await client.get("/admin/nodes", headers=W), 403)
    run(go, authenticate=async_authenticate)


def test_open_routes_take_at_most_64_KiB():
    async def go(client, seen, _):
        big = {**JOIN, "Hostname": "h" * (64 * 1024)}
        await refused(await client.post("/join", json=big), 413, "64 KiB")
        # Without a Content-Length (chunked), the limit holds as the body is read.
        async def chunks():
            for _ in range(80):
                yield b"x" * 1024
        await refused(await client.post("/join", data=chunks()), 413, "64 KiB")
        # Even on GET /ca, which reads no body.
        await refused(await client.get("/ca", data=b"x" * (65 * 1024)), 413)
        assert seen == []
        assert (await client.post("/join", json=JOIN)).status == 200
    run(go)


def test_authenticated_routes_take_more_but_not_without_limit():
    async def go(client, seen, _):
        r = await client.post("/admin/big", data=b"x" * (1024 * 1024), headers=M)
        assert r.status == 200 and (await r.json())["n"] == 1024 * 1024
        await refused(await client.post("/admin/big", data=b"x" * (auth.BODY_LIMIT + 1), headers=M), 413)
        # The size check never runs before the caller is known: a stranger gets 401, not 413.
        await refused(await client.post("/admin/big", data=b"x" * (auth.BODY_LIMIT + 1)), 401)
    run(go)


def test_open_routes_are_rate_limited_per_source_address():
    clock = Clock()

    async def go(client, seen, _):
        statuses = [(await client.get("/ca")).status for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        r = await client.get("/ca")
        msg = await refused(r, 429, "too many unauthenticated calls from 127.0.0.1", "retry in 1 s")
        assert r.headers["Retry-After"] == "1"
        # Authenticated calls are not counted against the address.
        assert (await client.post("/heartbeat", json={}, headers=W)).status == 200
        clock.t += 1.0
        assert (await client.get("/ca")).status == 200
        assert "\n" not in msg
    run(go, limiter=RateLimiter(rate=1.0, burst=3, clock=clock))


def test_member_routes_are_rate_limited_per_node():
    clock = Clock()

    async def go(client, seen, _):
        w2 = {"X-Test-Node": "w2:worker:worker"}
        statuses = [(await client.post("/heartbeat", json={}, headers=W)).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = await client.post("/heartbeat", json={}, headers=W)
        await refused(r, 429, "too many calls from node w1", "retry in 1 s")
        assert r.headers["Retry-After"] == "1" and len(seen) == 3  # refused calls reach no handler
        assert (await client.post("/heartbeat", json={}, headers=w2)).status == 200  # another node
        assert (await client.get("/admin/nodes", headers=M)).status == 200  # manager routes: not counted
        clock.t += 1.0
        assert (await client.post("/heartbeat", json={}, headers=W)).status == 200
    async def main():
        seen: list = []
        admission = Admission(fake_authenticate, node_limiter=RateLimiter(rate=1.0, burst=3, clock=clock))
        async with TestClient(TestServer(make_app(admission, seen))) as client:
            await go(client, seen, admission)
    asyncio.run(main())


@pytest.mark.parametrize("body, field", [
    ({"Addr": 5}, "$.Addr"),
    ({"Addr": "192.0.2.300"}, "$.Addr"),
    ({"Addr": "192.0.2.12\n"}, "$.Addr"),
    ({"Addr": "127.0.0.1"}, "$.Addr"),
    ({"Addr": "0.0.0.0"}, "$.Addr"),
    ({"Addr": "224.0.0.5"}, "$.Addr"),
    ({"Addr": "192.0.2.12", "Role": "manager"}, "Role"),
    ([], "object"),
])
def test_bad_heartbeats_get_400_naming_the_field_and_reach_no_handler(body, field):
    async def go(client, seen, _):
        await refused(await client.post("/heartbeat", json=body, headers=W), 400, field)
        assert seen == []
    run(go)


def test_bodies_that_are_not_json_get_400():
    async def go(client, seen, _):
        for data in (b"", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000):
            await refused(await client.post("/heartbeat", data=data, headers=W), 400, "request body")
        # /leave alone may come empty; with fields it is refused.
        assert (await client.post("/leave", headers=W)).status == 200
        assert (await client.post("/leave", json={}, headers=W)).status == 200
        await refused(await client.post("/leave", json={"Force": True}, headers=W), 400, "Force")
        assert seen == [LeaveRequest(), LeaveRequest()]
    run(go)


def test_disconnect_aborts_the_nodes_open_connections_only():
    async def read_rest(resp) -> bytes:
        try:
            return await asyncio.wait_for(resp.content.read(), 5)
        except asyncio.TimeoutError:
            raise AssertionError("the stream kept going after disconnect") from None
        except Exception:  # aiohttp reports an aborted chunked stream as a payload error
            return b""

    async def go(client, seen, admission):
        held = await client.get("/hold", headers=W)
        other = await client.get("/hold", headers={"X-Test-Node": "w2:worker:worker"})
        assert await held.content.readline() == b"started\n" == await other.content.readline()
        assert admission.disconnect("w1") == 1
        assert await read_rest(held) == b""          # at once, not after the handler's 30 s
        assert not other.content.at_eof()            # another node's stream goes on
        assert admission.disconnect("w1") == 0
        assert admission.disconnect("w2") == 1
        assert await read_rest(other) == b""
        held.close()
        other.close()
    run(go)


# ------------------------------------------------------------------ the typed bodies

CSR = pki.make_csr(pki.new_node_key()).decode()


def test_join_request_parses_a_good_body():
    r = codec.decode(json.dumps({**JOIN, "CSR": CSR}), JoinRequest)
    assert (r.token, r.csr, r.hostname, r.advertise_addr) == (TOKEN, CSR, "h3", "192.0.2.13")
    r = codec.decode(json.dumps({"Token": TOKEN, "CSR": CSR, "Hostname": "h3"}), JoinRequest)
    assert r.advertise_addr is None


@pytest.mark.parametrize("change, field", [
    ({"Token": 5}, "$.Token"),
    ({"Token": "x" * 300}, "$.Token"),
    ({"Token": ""}, "$.Token"),
    ({"CSR": None}, "$.CSR"),
    ({"CSR": "x" * 100_000}, "$.CSR"),
    ({"Hostname": "h3\n"}, "$.Hostname"),
    ({"Hostname": "h 3"}, "$.Hostname"),
    ({"Hostname": ""}, "$.Hostname"),
    ({"Hostname": "a" * 65}, "$.Hostname"),
    ({"Hostname": ["h3"]}, "$.Hostname"),
    ({"AdvertiseAddr": 5}, "$.AdvertiseAddr"),
    ({"AdvertiseAddr": "5"}, "$.AdvertiseAddr"),
    ({"AdvertiseAddr": "192.0.2.13\n"}, "$.AdvertiseAddr"),
    ({"AdvertiseAddr": "127.0.0.1"}, "$.AdvertiseAddr"),
    ({"AdvertiseAddr": "255.255.255.255"}, "$.AdvertiseAddr"),
    ({"AdvertiseAddr": "2001:db8::1"}, "$.AdvertiseAddr"),
    ({"Role": "manager"}, "Role"),
])
def test_join_request_refusals_name_the_field(change, field):
    with pytest.raises(InvalidRequest) as e:
        codec.decode(json.dumps({**JOIN, "CSR": CSR, **change}), JoinRequest)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_join_request_needs_token_csr_and_hostname():
    for missing in ("Token", "CSR", "Hostname"):
        body = {k: v for k, v in {**JOIN, "CSR": CSR}.items() if k != missing}
        with pytest.raises(InvalidRequest, match=missing):
            codec.decode(json.dumps(body), JoinRequest)


def test_renew_request():
    assert codec.decode(json.dumps({"CSR": CSR}), RenewRequest).csr == CSR
    for body in ({}, {"CSR": 1}, {"CSR": CSR, "Role": "manager"}, {"CSR": ""}):
        with pytest.raises(InvalidRequest):
            codec.decode(json.dumps(body), RenewRequest)


@pytest.mark.parametrize("addr, ok", [("192.0.2.12", True), ("10.1.2.3", True), ("169.254.1.1", True),
                                      ("0.0.0.0", False), ("127.0.0.1", False), ("127.9.9.9", False),
                                      ("224.0.0.1", False), ("239.1.1.1", False), ("240.0.0.1", False),
                                      ("255.255.255.255", False)])
def test_vtep_addresses(addr, ok):
    assert (vtep_problem(addr) is None) == ok


def test_answers_ignore_unknown_fields_but_check_known_ones():
    a = codec.convert({"Period": 0.5, "Role": "worker", "Later": 1}, HeartbeatAnswer)
    assert (a.period, a.role, a.availability) == (0.5, "worker", "active")
    for bad in ({"Period": 0, "Role": "worker"}, {"Period": 1, "Role": "admin"}, {"Period": "1", "Role": "worker"}):
        with pytest.raises(InvalidRequest):
            codec.convert(bad, HeartbeatAnswer)
    join = {"NodeID": "abc", "Role": "worker", "ClusterID": "c1", "Certificate": "PEM", "CACert": "ignored",
            "Managers": ["192.0.2.11:2377"], "HeartbeatPeriod": 5.0, "DataPathPort": 4789}
    # WireguardPort: a manager from before encrypted overlays sends none; the default (51820) is taken.
    assert codec.to_builtins(codec.convert(join, JoinAnswer)) == {
        **{k: v for k, v in join.items() if k != "CACert"}, "WireguardPort": 51820,
        "Store": "sqlite"}  # an older manager: SQLite
    with pytest.raises(InvalidRequest, match="Managers"):
        codec.convert({**join, "Managers": []}, JoinAnswer)



# ------------------------------------------------------------------ the leader's own certificate

def test_a_failed_renewal_of_the_leaders_certificate_is_retried_not_the_end(tmp_path, monkeypatch, caplog):
    from netweft.manager import cluster
    from netweft.pki.nodepair import files
    monkeypatch.setattr(cluster, "RENEW_RETRY_FIRST", 0.05)
    spec = {"CertExpiry": 3, "HeartbeatPeriod": 5.0, "DataPathPort": 4789, "DefaultAddrPool": ["198.18.0.0/15"],
            "SubnetSize": 24}

    async def main():
        swarm = str(tmp_path / "swarm")
        made = await cluster.Manager.init_cluster(swarm, "lead", "192.0.2.1", ("127.0.0.1", 0), spec)
        m = cluster.Manager(swarm, made["node_id"])
        first = pki.cert_identity(pki.load_pem(files(swarm)["cert"])).serial
        failures = [OSError("disk full"), RuntimeError("store busy")]
        real_renew = m.renew

        async def flaky(node, csr):
            if failures:
                raise failures.pop(0)
            return await real_renew(node, csr)
        m.renew = flaky
        await m.start(("127.0.0.1", 0))
        try:
            for _ in range(200):  # renewal at 50-80 % of 3 s, then two retries
                if pki.cert_identity(pki.load_pem(files(swarm)["cert"])).serial != first:
                    break
                await asyncio.sleep(0.05)
            assert pki.cert_identity(pki.load_pem(files(swarm)["cert"])).serial != first
            assert not failures and all(not t.done() for t in m.tasks)  # the task goes on after a success too
        finally:
            await m.stop()
    asyncio.run(main())
    errors = [r for r in caplog.records if r.msg.startswith("renewing the leader's certificate failed")]
    assert [r.reason for r in errors] == ["disk full", "store busy"]


@pytest.mark.parametrize("remote, ok", [("192.0.2.13", True), ("127.0.0.1", False), ("0.0.0.0", False),
                                        ("224.0.0.1", False), ("255.255.255.255", False), ("::1", False),
                                        (None, False)])
def test_a_join_without_advertise_addr_checks_the_calls_source_as_a_vtep(remote, ok):
    from netweft.manager.cluster import join_addr
    assert join_addr("192.0.2.20", remote) == "192.0.2.20"  # advertised: JoinRequest has checked it
    if ok:
        assert join_addr(None, remote) == remote
    else:
        with pytest.raises(InvalidRequest, match="cannot be a node address") as e:
            join_addr(None, remote)
        assert "\n" not in str(e.value) and "--advertise-addr" in str(e.value)


# ------------------------------------------------------------------ refusals in the log

def test_log_throttle_one_line_per_key_and_interval_with_the_count_held_back():
    clock = Clock()
    t = auth.LogThrottle(interval=10.0, max_keys=3, clock=clock)
    assert t.admit("a") == 0
    assert [t.admit("a") for _ in range(5)] == [None] * 5
    assert t.admit("b") == 0  # another key is not held back
    clock.t += 10.0
    assert t.admit("a") == 5 and t.admit("a") is None
    for k in ("c", "d", "e"):
        t.admit(k)
    assert len(t._keys) == 3  # bounded: the oldest keys went


def test_refused_calls_from_one_address_are_logged_once_per_interval(caplog):
    async def go(client, seen, admission):
        for _ in range(50):  # a stranger hammering a closed route
            assert (await client.get("/admin/nodes")).status == 401
        for i in range(50):  # ...or paths of its own making
            assert (await client.get(f"/x{i}")).status == 401
        assert (await client.post("/heartbeat", json={}, headers={"X-Test-Node": "removed:worker:worker"})
                ).status == 403
    caplog.set_level("WARNING", logger="netweft.manager")
    run(go)
    lines = [r for r in caplog.records if r.msg == "cluster call refused"]
    assert [(r.path, r.status) for r in lines] == [("/admin/nodes", 401), ("/x0", 401), ("/heartbeat", 403)]
