"""A node's key and certificate are replaced so that a crash never leaves a mismatched pair, and the node's
client presents the current pair to the managers."""
import asyncio
import os
import socket
from datetime import timedelta

import pytest

from netweft import pki
from netweft.agent.node import ClusterClient, LineSplitter, parse_manager_addr
from netweft.errors import InvalidRequest, Unavailable
from netweft.pki.nodepair import files, repair_node_pair, save_node_pair


def make_pair(ca):
    key = pki.new_node_key()
    cert = pki.sign_node_cert(ca, pki.make_csr(key), "node1", "worker", "c1", timedelta(hours=1))
    return pki.key_to_pem(key), cert


def matches(d) -> bool:
    f = files(d)
    cert = pki.load_cert(pki.load_pem(f["cert"]))
    key = pki.load_private_key(pki.load_pem(f["key"]))
    return key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_save_then_crash_between_writes_is_repaired(tmp_path):
    ca = pki.create_root_ca("c1")
    d = str(tmp_path)
    save_node_pair(d, *make_pair(ca))
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")
    # A crash after the new certificate landed but before the new key replaced the old one:
    key2, cert2 = make_pair(ca)
    pki.save_pem(files(d)["key"] + ".new", key2, private=True)
    pki.save_pem(files(d)["cert"], cert2)
    assert not matches(d)
    repair_node_pair(d)
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")


def test_crash_before_certificate_keeps_old_pair(tmp_path):
    ca = pki.create_root_ca("c1")
    d = str(tmp_path)
    save_node_pair(d, *make_pair(ca))
    key2, _ = make_pair(ca)
    pki.save_pem(files(d)["key"] + ".new", key2, private=True)  # crash: the certificate never came
    repair_node_pair(d)
    assert matches(d) and not os.path.exists(files(d)["key"] + ".new")


# ------------------------------------------------------------------ the client presents the current pair

def setup_node(d: str):
    ca = pki.create_root_ca("c1")
    pki.save_pem(files(d)["ca"], ca.cert_pem)
    save_node_pair(d, *make_pair(ca))
    return ca


def test_client_picks_up_a_renewed_certificate_and_keeps_running_streams(tmp_path):
    d = str(tmp_path)
    ca = setup_node(d)

    async def go():
        client = ClusterClient(d, ["192.0.2.11:2377"])
        s1 = client.session()
        assert client.session() is s1                   # nothing changed: the same kept-alive session
        held = client._hold()                           # a watch stream running on s1
        assert held is s1
        save_node_pair(d, *make_pair(ca))               # the renewal (by the agent or, on the leader, the manager)
        s2 = client.session()
        assert s2 is not s1 and not s2.closed
        await asyncio.sleep(0)
        assert not s1.closed                            # the running stream is not cut
        client._release(held)
        await asyncio.sleep(0.05)
        assert s1.closed                                # ...and its session goes when the stream ends
        # A renewal without a stream in flight closes the old session at once.
        save_node_pair(d, *make_pair(ca))
        s3 = client.session()
        await asyncio.sleep(0.05)
        assert s2.closed and not s3.closed
        await client.close()
        assert s3.closed
    asyncio.run(go())


def test_client_keeps_the_old_pair_while_a_renewal_is_half_written(tmp_path):
    d = str(tmp_path)
    ca = setup_node(d)

    async def go():
        client = ClusterClient(d, ["192.0.2.11:2377"])
        s1 = client.session()
        key2, cert2 = make_pair(ca)
        pki.save_pem(files(d)["key"] + ".new", key2, private=True)
        pki.save_pem(files(d)["cert"], cert2)           # the new certificate is there, its key not yet
        assert client.session() is s1                   # mismatched pair: keep presenting the old one
        os.replace(files(d)["key"] + ".new", files(d)["key"])
        s2 = client.session()
        assert s2 is not s1
        await client.close()
    asyncio.run(go())


def test_client_without_a_usable_pair_says_so_in_one_line(tmp_path):
    d = str(tmp_path)

    async def go():
        client = ClusterClient(d, ["192.0.2.11:2377"])
        with pytest.raises(Unavailable, match="cannot load this node's certificate and key"):
            client.session()
    asyncio.run(go())


# ------------------------------------------------------------------ a manager that cannot be reached

def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_manager_is_named_in_one_line_with_what_still_works(tmp_path):
    d = str(tmp_path)
    setup_node(d)
    addr = f"127.0.0.1:{closed_port()}"

    async def go():
        client = ClusterClient(d, [addr])
        try:
            with pytest.raises(Unavailable) as e:
                await client.call("POST", "/endpoints", {})
            with pytest.raises(Unavailable) as w:
                async for _ in client.stream("/watch?since=0"):
                    pass
        finally:
            await client.close()
        return str(e.value), str(w.value)
    call, watch = asyncio.run(go())
    assert call == (f"manager {addr} is unreachable (connection refused); containers keep their networking; "
                    "retry when it is back")
    assert watch.startswith(f"watch stream from manager {addr} ended (connection refused)")
    assert "aiohttp" not in call + watch and "Errno" not in call + watch


def test_several_unreachable_managers_are_each_named(tmp_path):
    d = str(tmp_path)
    setup_node(d)
    addrs = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]

    async def go():
        client = ClusterClient(d, addrs)
        try:
            with pytest.raises(Unavailable) as e:
                await client.call("GET", "/networks/x")
        finally:
            await client.close()
        return str(e.value)
    msg = asyncio.run(go())
    assert msg.startswith("no manager is reachable: ") and "\n" not in msg
    assert all(f"manager {a} is unreachable (connection refused)" in msg for a in addrs)


# ------------------------------------------------------------------ what goes into a manager's URL, and its stream

@pytest.mark.parametrize("text", ["x/y#z", "a b", ":2377", "", "mgr:0", "mgr:65536", "mgr:12a", "mgr\n",
                                  "mgr:2377\n", "-mgr", "mgr..example", "user@mgr:2377"])
def test_a_manager_address_is_an_ipv4_address_or_a_hostname_and_a_port(text):
    with pytest.raises(InvalidRequest, match="invalid manager address .*expected HOST\\[:PORT\\]"):
        parse_manager_addr(text)


def test_a_manager_address_gets_the_default_port():
    assert parse_manager_addr("192.0.2.11") == "192.0.2.11:2377"
    assert parse_manager_addr("mgr-1.example:02400") == "mgr-1.example:2400"


def test_watch_lines_are_split_across_chunks_and_an_endless_line_is_refused():
    s = LineSplitter(limit=64)
    assert s.feed(b'{"a"') == []
    assert s.feed(b":1}") == []
    assert s.feed(b'\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.feed(b":3}\n") == [b'{"c":3}']
    assert s.buf == bytearray()
    for _ in range(8):
        s.feed(b"x" * 8)          # 64 bytes and no end of line yet: still a line
    with pytest.raises(InvalidRequest, match="a watch line is larger than"):
        s.feed(b"x")
