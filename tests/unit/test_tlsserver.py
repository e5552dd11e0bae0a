"""The cluster API's TLS listener (netweft/manager/tlsserver.py): mutual TLS over its own start_tls, with
a small read buffer per connection; large bodies both ways still pass whole."""
import asyncio
from datetime import timedelta

import aiohttp
from aiohttp import web

from netweft import pki
from netweft.manager import tlsserver


def creds(ca, node_id, role):
    key = pki.new_node_key()
    return pki.sign_node_cert(ca, pki.make_csr(key), node_id, role, "c", timedelta(hours=1)), pki.key_to_pem(key)


def test_large_bodies_pass_both_ways_over_the_lean_listener():
    ca = pki.create_root_ca("c")
    server_ctx = pki.server_ssl_context(ca.cert_pem, *creds(ca, "m1", "manager"), require_client_cert=True)
    client_ctx = pki.client_ssl_context(ca.cert_pem, *creds(ca, "w1", "worker"))
    body = bytes(range(256)) * 4096   # 1 MiB, many TLS records, more than the read buffer

    async def main():
        async def echo(request):
            der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            data = await request.read()
            return web.Response(body=data + pki.cert_identity(der).node_id.encode())

        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        server = await tlsserver.serve_tls(runner, "127.0.0.1", 0, server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"https://127.0.0.1:{port}/echo", data=body, ssl=client_ctx) as r:
                    got = await r.read()
        finally:
            server.close()
            await runner.cleanup()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 20))
    assert got == body + b"w1"
    assert tlsserver._LeanTLS.max_size == tlsserver.READ_BUFFER


def test_a_large_write_is_encrypted_and_handed_on_a_record_at_a_time():
    """The outgoing BIO keeps the capacity of its largest write: the listener never gives it more than
    WRITE_PIECE at once, and hands what it encrypted to the socket before the next piece."""
    from collections import deque

    class Sink:
        def __init__(self):
            self.sizes, self.pending, self.sent = [], b"", []

        def write(self, data):
            self.sizes.append(len(data))
            self.pending += bytes(data)
            return len(data)

    p = tlsserver._LeanTLS.__new__(tlsserver._LeanTLS)
    sink = Sink()
    body = bytes(range(256)) * 1024 + b"tail"   # 256 KiB and a bit
    p._sslobj, p._write_backlog, p._write_buffer_size = sink, deque([b"head", body]), 4 + len(body)

    def process_outgoing():
        if sink.pending:
            sink.sent.append(sink.pending)
            sink.pending = b""
    p._process_outgoing = process_outgoing
    p._do_write()
    assert max(sink.sizes) <= tlsserver.WRITE_PIECE and len(sink.sent) == len(sink.sizes)
    assert b"".join(sink.sent) == b"head" + body and p._write_buffer_size == 0 and not p._write_backlog


def test_agent_connections_get_descriptors_above_what_select_can_hold():
    """libnftables waits with select(): a descriptor past FD_SETSIZE aborts the process. Connections
    accepted by the listener live above it (when the limit allows), leaving the low ones to such code."""
    import resource
    import socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = hard == resource.RLIM_INFINITY or hard > tlsserver.SELECT_FDS + 64
    if room and soft != resource.RLIM_INFINITY and soft <= tlsserver.SELECT_FDS + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, tlsserver.SELECT_FDS * 2), hard))
    ca = pki.create_root_ca("c")
    server_ctx = pki.server_ssl_context(ca.cert_pem, *creds(ca, "m1", "manager"), require_client_cert=True)
    client_ctx = pki.client_ssl_context(ca.cert_pem, *creds(ca, "w1", "worker"))

    async def main():
        async def where(request):
            return web.json_response({"fd": request.transport.get_extra_info("socket").fileno()})

        app = web.Application()
        app.router.add_get("/fd", where)
        runner = web.AppRunner(app)
        await runner.setup()
        server = await tlsserver.serve_tls(runner, "127.0.0.1", 0, server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"https://127.0.0.1:{port}/fd", ssl=client_ctx) as r:
                    fd = (await r.json())["fd"]
            low = socket.socket()   # a new descriptor of this process is still a low one
            try:
                return fd, low.fileno()
            finally:
                low.close()
        finally:
            server.close()
            await runner.cleanup()
        return None

    try:
        fd, low = asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if room:
        assert fd >= tlsserver.SELECT_FDS and low < tlsserver.SELECT_FDS
    else:   # no room above: the connection works on the descriptor it got
        assert fd < tlsserver.SELECT_FDS


def test_the_listener_sends_no_session_tickets():
    """No client resumes a session; the tickets cost a third of a mutual-TLS handshake's server CPU."""
    ca = pki.create_root_ca("c")
    server_ctx = pki.server_ssl_context(ca.cert_pem, *creds(ca, "m1", "manager"), require_client_cert=True)
    client_ctx = pki.client_ssl_context(ca.cert_pem, *creds(ca, "w1", "worker"))

    async def main():
        async def hello(request):
            return web.Response(text="hi")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        server = await tlsserver.serve_tls(runner, "127.0.0.1", 0, server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            tls = writer.get_extra_info("ssl_object")
            writer.close()
            return answer, tls
        finally:
            server.close()
            await runner.cleanup()

    answer, tls = asyncio.run(asyncio.wait_for(main(), 20))
    assert answer.endswith(b"hi") and tls.version() == "TLSv1.3"
    assert server_ctx.num_tickets == 0 and (tls.session is None or not tls.session.has_ticket)
