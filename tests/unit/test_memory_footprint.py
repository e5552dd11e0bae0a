"""What keeps a worker daemon small with many endpoints and lets it shrink again: a removed endpoint leaves no
entry in any of the agent's or the resolver's tables, the watch repeating an endpoint keeps one copy of it, the
local store's page cache is bounded, and the daemon's TLS connections read into small buffers."""
import asyncio
import os
import socket
import subprocess
import sys

from netweft.dns.forward import Forwarder
from netweft.dns.resolver import Resolver
from netweft.model.watch import EndpointEvent
from netweft.store.local import CACHE_KIB, ENDPOINTS, Store

from test_agent_fake import NET, OTHER, attach, env, events, new_agent, put, run, settle  # noqa: F401


def test_removed_endpoints_leave_no_entry_in_any_agent_table(env):  # noqa: F811
    _, dp, host, mgr = env
    agent = new_agent(env)

    async def go():
        remote = mgr.endpoint(OTHER)
        eps = [await attach(agent, dp, f"c{i}") for i in range(3)]
        mgr.rev += 1
        agent.on_message(events(mgr.rev, *(put(mgr.endpoints[e.id]) for e in eps)))
        await settle()
        assert len(agent.local) == 3 and agent._anchors and agent._gw_inuse is not None and len(agent._gw_inuse) == 3
        for ep in eps:
            await agent.detach(ep)
        await settle()
        return remote
    run(go())
    assert agent.local == {} and agent._local_by_net == {} and agent._anchors == {}
    assert agent._gw_claims == {} and len(agent._gw_inuse) == 0 and agent._held == {}
    assert NET.id not in agent.nets   # the network left this host's scope with its last endpoint here
    assert agent._sandbox_checked == {}
    assert host.store.list(ENDPOINTS) == []


def test_the_watch_repeating_an_endpoint_keeps_the_copy_held(env):  # noqa: F811
    _, dp, _, mgr = env
    agent = new_agent(env)

    async def go():
        a = await attach(agent, dp, "c1")
        held = agent.nets[NET.id].endpoints[a.id]
        mgr.rev += 1
        agent.on_message(events(mgr.rev, put(mgr.endpoints[a.id])))   # a new decoded object, equal
        await settle()
        assert agent.nets[NET.id].endpoints[a.id] is held
        # Other hosts' endpoints, each decoded from its own event: their network and node strings are shared.
        b, c = mgr.endpoint(OTHER), mgr.endpoint(OTHER)
        mgr.rev += 1
        agent.on_message(events(mgr.rev, put(b)))
        agent.on_message(events(mgr.rev + 1, put(c)))
        await settle()
        eb, ec = agent.nets[NET.id].endpoints[b.id], agent.nets[NET.id].endpoints[c.id]
        assert eb.network_id is ec.network_id and eb.node_id is ec.node_id and eb.vtep is ec.vtep
        # A changed endpoint replaces the held copy.
        mgr.rev += 2
        moved = mgr.endpoints[b.id]
        moved.mac = "02:42:c6:12:00:77"
        agent.on_message(events(mgr.rev, EndpointEvent(action="put", object=moved)))
        await settle()
        assert agent.nets[NET.id].endpoints[b.id].mac == "02:42:c6:12:00:77"
    run(go())


def test_the_resolver_forgets_a_detached_container(tmp_path):
    async def go():
        resolver = Resolver(Forwarder(["192.0.2.53"]))
        loop = asyncio.get_running_loop()
        socks = []
        for i in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            socks.append((udp, tcp))
            await resolver.attach(f"ctr{i}", udp, tcp, [NET.id] if i % 2 else [NET.id, "n2"])
        assert len(resolver._scopes) == 2
        fds_before = [(u.fileno(), t.fileno()) for u, t in socks]
        fds_before = [(fd, None) for pair in fds_before for fd in pair]
        for i in range(20):
            resolver.detach(f"ctr{i}")
        assert resolver._askers == {} and resolver._scopes == {}
        for udp, tcp in socks:
            assert udp.fileno() == -1 and tcp.fileno() == -1
        fds = {udp_fd for udp_fd, _ in fds_before}
        assert not fds & set(loop._selector.get_map())   # no reader left on the loop for them
        resolver.close()
    asyncio.run(go())


def test_the_local_store_page_cache_is_bounded(tmp_path):
    store = Store(str(tmp_path / "db" / "netweft.db"))
    assert store.db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
    store.close()


def test_small_tls_buffers_still_carry_large_bodies_both_ways():
    """The daemon's client side with asyncio's TLS read buffer cut down (memory.small_tls_buffers): 1 MiB each way
    through netweft's HTTP client against the cluster listener."""
    code = r'''
import asyncio
from datetime import timedelta
from aiohttp import web
from netweft import pki
from netweft.daemon import memory
from netweft.http import client as http
from netweft.manager import tlsserver
import asyncio.sslproto as sslproto

memory.small_tls_buffers()
assert sslproto.SSLProtocol.max_size == memory.TLS_BUFFER
ca = pki.create_root_ca("c")
def creds(node_id, role):
    key = pki.new_node_key()
    return pki.sign_node_cert(ca, pki.make_csr(key), node_id, role, "c", timedelta(hours=1)), pki.key_to_pem(key)
server_ctx = pki.server_ssl_context(ca.cert_pem, *creds("m1", "manager"), require_client_cert=True)
client_ctx = pki.client_ssl_context(ca.cert_pem, *creds("w1", "worker"))
body = bytes(range(256)) * 4096

async def main():
    async def echo(request):
        return web.Response(body=await request.read())
    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    server = await tlsserver.serve_tls(runner, "127.0.0.1", 0, server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with http.ClientSession() as s:
            async with s.request("POST", f"https://127.0.0.1:{port}/echo", data=body, ssl=client_ctx) as r:
                return await r.read()
    finally:
        server.close()
        await runner.cleanup()

print(asyncio.run(asyncio.wait_for(main(), 30)) == body)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_a_containers_lock_is_kept_only_while_a_connect_holds_or_awaits_it(tmp_path):
    from netweft.daemon.engine import Engine
    from netweft.dataplane.fake import FakeDataPlane
    from netweft.ipam.address import parse_pool
    from test_engine_fake import add_container, bridge_req, while_engine_busy

    engine = Engine(str(tmp_path / "data"), str(tmp_path / "run"), [parse_pool("base=198.18.0.0/16,size=24")],
                    FakeDataPlane())

    async def main():
        await engine.create_network(bridge_req("n1", "198.18.1.0/24"))
        await engine.create_network(bridge_req("n2", "198.18.2.0/24"))
        await add_container(engine, "c1")
        # Three connects at once, one lock among them: still one endpoint per network, two interfaces.
        got = await while_engine_busy(engine, engine.connect("n1", "c1"), engine.connect("n1", "c1"),
                                      engine.connect("n2", "c1"))
        assert sum(isinstance(g, dict) for g in got) == 2 and len(engine.store.list(ENDPOINTS)) == 2
        assert engine._ctr_locks == {}
    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.close())


def test_a_network_table_changed_group_by_group_answers_as_one_built_at_once():
    """NetworkNames keeps one group ID (not a set) for a name with one group: random puts and removals of groups
    sharing names give the answers of the table built from the remaining records, and leave nothing behind."""
    import random

    from netweft.dns.names import NameRecord, NetworkNames, build

    rnd = random.Random(7)
    names = ["a", "b", "web", "db", "tasks.web"]
    table, groups = NetworkNames(), {}
    for step in range(600):
        gid = f"g{rnd.randrange(12)}"
        if rnd.random() < 0.35:
            groups.pop(gid, None)
            table.update({gid: None})
        else:
            recs = tuple(NameRecord(n, (f"198.18.0.{rnd.randrange(1, 9)}",), reverse=i == 0)
                         for i, n in enumerate(rnd.sample(names, rnd.randrange(1, 3))))
            groups[gid] = ((int(gid[1:]), gid), recs)
            table.update({gid: groups[gid]})
        ordered = [r for _, recs in sorted(groups.values(), key=lambda g: g[0]) for r in recs]
        want = build(ordered)
        assert (table.forward, table.ptr) == (want.forward, want.ptr), step
    table.update({gid: None for gid in list(groups)})
    assert table.forward == table.ptr == table._name_groups == table._addr_names == table._accepted == {}
