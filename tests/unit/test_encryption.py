"""Encrypted overlays without a kernel: WireGuard keys and control protocol, the reserved tunnel block, the
fail-closed rules, the key rotation, the managers' POST /tunnel, and the agent's tunnel on the fake data plane."""
import asyncio
import base64
import json
import time

import msgspec
import pytest

from netweft.agent import keyring
from netweft.agent.keyring import Key, KeyRing, PeerTunnel
from netweft.agent.tunnels import current_addr
from netweft.daemon.swarm import validate_wg_port
from netweft.dataplane.firewall import render_tunnel_firewall
from netweft.dataplane.wgconf import (DeviceState, PeerStatus, TunnelPeer, TunnelSpec, from_hex, key_bytes,
                                      new_private_key, parse_errno, parse_get, public_key, render_set, to_hex)
from netweft.errors import Conflict, InvalidRequest, KernelError, PoolExhausted
from netweft.ipam import tunnel
from netweft.manager.tunnels import set_tunnel
from netweft.model import codec
from netweft.model.cluster import TunnelKeyRequest, TunnelUpdate
from netweft.model.objects import Network, Node, TunnelKey
from netweft.model.watch import NodeEvent

from test_agent_fake import ME, OTHER, VTEP, FakeManager, Host, attach, events, run, settle
from test_watch import Manager


# ---- keys and the control protocol ----------------------------------------------------------------------

def test_keys_are_32_bytes_and_the_public_key_is_derived():
    priv = new_private_key()
    assert len(base64.b64decode(priv)) == 32 and public_key(priv) == public_key(priv)
    assert public_key(priv) != public_key(new_private_key())
    assert from_hex(to_hex(priv)) == priv
    for bad in ("", "abc", "A" * 44, priv[:-1] + "x", priv + "\n", 5):
        with pytest.raises(InvalidRequest):
            key_bytes(bad)
    with pytest.raises(KernelError):
        from_hex("zz" * 32)


def spec(peers=(), key=None, port=51820):
    return TunnelSpec(ifname="nwwgabc0", private_key=key or PRIV, port=port, addresses=("198.19.240.2/32",),
                      source="198.19.240.2", route="198.19.240.0/21", mtu=1440, peers=tuple(peers))


PRIV, P1, P2 = new_private_key(), public_key(new_private_key()), public_key(new_private_key())
PEER1 = TunnelPeer(P1, "192.0.2.12:51820", "198.19.240.4/32")
PEER2 = TunnelPeer(P2, "192.0.2.13:51820", "198.19.240.6/32")


def test_render_set_sends_only_what_differs():
    full = render_set(spec([PEER1]), None)
    assert full.startswith("set=1\n") and full.endswith("\n\n")
    assert f"private_key={to_hex(PRIV)}" in full and "listen_port=51820" in full
    assert f"public_key={to_hex(P1)}\nendpoint=192.0.2.12:51820\nreplace_allowed_ips=true\nallowed_ip=198.19.240.4/32" in full
    have = DeviceState(PRIV, 51820, {P1: PeerStatus(P1, "192.0.2.12:51820", 0, 0, 0, ("198.19.240.4/32",))})
    assert render_set(spec([PEER1]), have) is None           # converged: nothing sent, sessions kept
    out = render_set(spec([PEER2]), have)                    # one peer goes, another comes; the key stays
    assert "private_key" not in out and f"public_key={to_hex(P1)}\nremove=true" in out and to_hex(P2) in out
    moved = render_set(spec([TunnelPeer(P1, "192.0.2.99:51820", "198.19.240.4/32")]), have)
    assert "endpoint=192.0.2.99:51820" in moved and "remove" not in moved
    assert "listen_port=51821" in render_set(spec([PEER1], port=51821), have)


def test_parse_get_reads_device_and_peers_and_refuses_garbage():
    text = (f"private_key={to_hex(PRIV)}\nlisten_port=51820\npublic_key={to_hex(P1)}\nendpoint=192.0.2.12:51820\n"
            "last_handshake_time_sec=100\nlast_handshake_time_nsec=500000000\nrx_bytes=10\ntx_bytes=20\n"
            f"allowed_ip=198.19.240.4/32\npublic_key={to_hex(P2)}\nallowed_ip=198.19.240.6/32\nerrno=0\n\n")
    st = parse_get(text)
    assert st.private_key == PRIV and st.port == 51820
    assert st.peers[P1] == PeerStatus(P1, "192.0.2.12:51820", 100.5, 10, 20, ("198.19.240.4/32",))
    assert st.peers[P2].last_handshake == 0 and st.peers[P2].endpoint is None
    for bad in ("listen_port=x\n\n", "garbage\n\n", "public_key=12\n\n", "errno=2\n\n"):
        with pytest.raises(KernelError):
            parse_get(bad)
    assert parse_errno("errno=0\n\n") == 0 and parse_errno("errno=22\n\n") == 22
    with pytest.raises(KernelError):
        parse_errno("nothing\n\n")


# ---- the reserved block -------------------------------------------------------------------------------

def test_tunnel_pairs_come_from_the_reserved_block_and_never_collide():
    from ipaddress import IPv4Network
    assert tunnel.pair(1) == ("198.19.240.2", "198.19.240.3")
    assert tunnel.allocate_pair(set()) == tunnel.pair(1)               # pair 0 holds the network address
    assert tunnel.allocate_pair({"198.19.240.2", "198.19.240.5"}) == tunnel.pair(3)
    assert tunnel.pair_index("198.19.240.5") == 2 and tunnel.pair_index("10.0.0.1") is None
    everything = {a for i in range(1, 1024) for a in tunnel.pair(i)}
    with pytest.raises(PoolExhausted):
        tunnel.allocate_pair(everything)
    with pytest.raises(PoolExhausted):
        tunnel.pair(1024)
    for subnet in ("198.19.240.0/24", "198.19.0.0/16", "198.18.0.0/15", "198.19.247.128/25"):
        with pytest.raises(Conflict, match="tunnel addresses"):
            tunnel.check_not_tunnels(IPv4Network(subnet))
    for subnet in ("198.18.0.0/16", "198.19.0.0/17", "198.19.248.0/21", "10.0.0.0/8", "172.17.0.0/16"):
        tunnel.check_not_tunnels(IPv4Network(subnet))     # the default pools and the lab's are clear of it


def test_pool_allocation_skips_the_block():
    from ipaddress import IPv4Network
    from netweft.ipam import address as ipam
    pool = [ipam.AddressPool(IPv4Network("198.19.224.0/19"), 21)]
    taken = [IPv4Network(f"198.19.{n}.0/21") for n in (224, 232, 248)]
    with pytest.raises(PoolExhausted):
        ipam.allocate_subnet(pool, taken + [tunnel.TUNNEL_NET])


# ---- fail-closed rules --------------------------------------------------------------------------------

def test_tunnel_firewall_drops_clear_vxlan_of_encrypted_vnis_both_ways():
    doc = render_tunnel_firewall(["nwwgabc0", "nwwgabc1"], 4789, [4097, 4096, 4096])
    rules = [c["add"]["rule"] for c in doc["nftables"] if "rule" in c.get("add", {})]
    assert [r["chain"] for r in rules] == ["output", "input"]
    text = json.dumps(rules)
    assert '"offset": 96, "len": 24' in text and '"set": [4096, 4097]' in text
    assert '"set": ["nwwgabc0", "nwwgabc1"]' in text and text.count('"drop": null') == 2
    single = json.dumps(render_tunnel_firewall(["nwwgabc0"], 4789, [4096]))
    assert '"right": 4096' in single and '"right": "nwwgabc0"' in single
    for args in ((["nwwgabc0"], 4789, []), (["nwwgabc0"], 0, [4096]), (["nwwgabc0"], 4789, [1 << 24]),
                 ("nwwgabc0", 4789, [4096]), ([], 4789, [4096]), (["bad name"], 4789, [4096]),
                 (["nwwgabc0"], True, [4096])):
        with pytest.raises(InvalidRequest):
            render_tunnel_firewall(*args)


# ---- the key rotation ---------------------------------------------------------------------------------

def test_rotation_makes_announces_switches_and_drops_in_order():
    ring = keyring.fresh(1000.0)
    assert keyring.step(ring, 99999, 60) is None                       # not published yet: nothing moves
    ring = msgspec.structs.replace(ring, published=True)
    assert keyring.step(ring, 1059, 60) is None                        # not due
    announced = keyring.step(ring, 1060, 60)
    assert announced.phase == "announced" and announced.current == 0 and set(announced.keys) == {0, 1}
    assert not announced.published and announced.keys[0] == ring.keys[0]
    assert [c for _, _, c in announced.public()] == [True, False]       # the old key is still current
    announced = msgspec.structs.replace(announced, published=True)
    assert keyring.step(announced, 1061, 60) is None                   # settling
    assert keyring.step(announced, 1063, 60, switch_ok=False) is None  # another host is switching
    switched = msgspec.structs.replace(keyring.step(announced, 1063, 60), published=True)
    assert switched.phase == "switched" and switched.current == 1 and switched.private == announced.keys[1].private
    assert keyring.step(switched, 1064, 60) is None                    # grace: the old key still a peer
    steady = keyring.step(switched, 1073, 60)
    assert steady.phase == "steady" and set(steady.keys) == {1} and steady.current == 1
    # The next rotation counts from the new key's creation and goes back to slot 0.
    steady = msgspec.structs.replace(steady, published=True)
    assert keyring.step(steady, 1119, 60) is None
    assert set(keyring.step(steady, 1121, 60).keys) == {0, 1}


def test_switches_go_one_host_at_a_time_lowest_id_first():
    assert keyring.may_switch("a", [])
    assert keyring.may_switch("a", ["b", "c"])
    assert not keyring.may_switch("b", ["a"])


def test_a_peer_is_down_after_unanswered_probes_with_the_reason():
    p = PeerTunnel()
    kw = dict(hostname="h2", endpoint="192.0.2.12:51820", has_key=True, handshake_age=None, port=51820)
    assert keyring.verdict(p, 10, **kw)[0] == "unknown"                  # not probed yet
    p.first_probe = 10
    assert keyring.verdict(p, 12, **kw)[0] == "unknown"                  # too early to say
    state, why = keyring.verdict(p, 14, **kw)
    assert state == "down" and "no WireGuard handshake ever" in why and "UDP 51820" in why and "\n" not in why
    p.last_answer = 20
    assert keyring.verdict(p, 21, **kw) == ("up", "")
    state, why = keyring.verdict(p, 30, **{**kw, "handshake_age": 42.0})
    assert state == "down" and "for 10 s" in why and "42 s ago" in why
    state, why = keyring.verdict(PeerTunnel(), 30, **{**kw, "has_key": False})
    assert state == "down" and "published no WireGuard key" in why


# ---- the managers: POST /tunnel ------------------------------------------------------------------------

def test_tunnel_update_refusals():
    good = {"Port": 51820, "Keys": [{"PublicKey": P1, "Slot": 0, "Current": True}]}
    assert codec.decode(json.dumps(good), TunnelUpdate).keys[0].public_key == P1
    bad = [{**good, "Port": 0}, {**good, "Port": 65535}, {**good, "Keys": []},
           {**good, "Keys": [{"PublicKey": P1, "Slot": 2, "Current": True}]},
           {**good, "Keys": [{"PublicKey": "x", "Slot": 0, "Current": True}]},
           {**good, "Keys": [{"PublicKey": P1, "Slot": 0, "Current": False}]},
           {**good, "Keys": [{"PublicKey": P1, "Slot": 0, "Current": True}, {"PublicKey": P2, "Slot": 0,
                                                                              "Current": False}]},
           {**good, "Keys": [{"PublicKey": P1, "Slot": 0, "Current": True}, {"PublicKey": P1, "Slot": 1,
                                                                              "Current": False}]},
           {**good, "Keys": [{"PublicKey": P1, "Slot": 0, "Current": True}] * 3},
           {**good, "PrivateKey": PRIV}]
    for body in bad:
        with pytest.raises(InvalidRequest) as e:
            codec.decode(json.dumps(body), TunnelUpdate)
        assert "\n" not in str(e.value)


def test_managers_give_each_node_its_own_pair_and_keep_it(tmp_path):
    async def main():
        m = await Manager.open(tmp_path / "c.db")
        a, b = await m.node("a", "192.0.2.11"), await m.node("b", "192.0.2.12")
        upd = TunnelUpdate(port=51820, keys=[TunnelKeyRequest(public_key=P1, slot=0, current=True)])
        ra = await set_tunnel(m.hub, a, upd)
        rb = await set_tunnel(m.hub, b, upd)
        assert ra["Addrs"] == list(tunnel.pair(1)) and rb["Addrs"] == list(tunnel.pair(2))
        rev = m.hub.state.rev
        assert await set_tunnel(m.hub, a, upd) == ra and m.hub.state.rev == rev   # unchanged: nothing written
        rot = TunnelUpdate(port=51820, keys=[TunnelKeyRequest(public_key=P1, slot=0, current=False),
                                             TunnelKeyRequest(public_key=P2, slot=1, current=True)])
        assert (await set_tunnel(m.hub, a, rot))["Addrs"] == ra["Addrs"]
        node = m.hub.state.get("nodes", a)
        assert node.tunnel_keys == [TunnelKey(public_key=P2, addr=ra["Addrs"][1], current=True, port=51821),
                                    TunnelKey(public_key=P1, addr=ra["Addrs"][0], current=False, port=51820)]
        assert current_addr(node) == ra["Addrs"][1]
        await m.close()
    run(main())


def test_wireguard_port_refusals():
    assert validate_wg_port(51820, 4789, 2377) == 51820
    for port, why in ((80, "between 1024"), (65535, "between 1024"), (4789, "VXLAN"), (4788, "VXLAN"),
                      (2376, "cluster API")):
        with pytest.raises(InvalidRequest, match=why):
            validate_wg_port(port, 4789, 2377)


# ---- the agent's tunnel on the fake data plane ---------------------------------------------------------

SEC = Network(id="e3" * 32, name="sec", driver="overlay", scope="swarm", created="now", subnet="198.18.9.0/24",
              gateway="198.18.9.1", attachable=True, vni=4200, encrypted=True)


class TunnelManager(FakeManager):
    """FakeManager with POST /tunnel and the nodes."""

    def __init__(self):
        super().__init__()
        self.networks[SEC.id] = SEC
        self.tunnel_posts: list[dict] = []

    async def call(self, method, path, body=None):
        if method == "POST" and path == "/tunnel":
            await asyncio.sleep(0)
            if self.down:
                from netweft.errors import Unavailable
                raise Unavailable("cannot reach the manager at 192.0.2.11:2377: connection refused")
            self.tunnel_posts.append(body)
            return {"Addrs": list(tunnel.pair(1))}
        return await super().call(method, path, body)


def other_node(*keys_: tuple[str, str, bool]) -> Node:
    return Node(id=OTHER, hostname="h2", role="worker", addr=VTEP[OTHER], tunnel_port=51820,
                tunnel_addrs=list(tunnel.pair(2)),
                tunnel_keys=[TunnelKey(public_key=k, addr=a, current=c, port=51820 + tunnel.pair(2).index(a))
                             for k, a, c in keys_])


@pytest.fixture
def tenv(tmp_path):
    from netweft.dataplane.fake import FakeDataPlane
    dp = FakeDataPlane()
    dp.add_host_interface("eth0", f"{VTEP[ME]}/24")
    return tmp_path, dp, Host(tmp_path), TunnelManager()


def tagent(tenv, period=keyring.DEFAULT_PERIOD):
    from netweft.agent.overlay import OverlayAgent
    _, dp, host, mgr = tenv
    return OverlayAgent(host, dp, mgr, ME, VTEP[ME], 4789, wg_port=51820, key_period=period)


def test_an_encrypted_network_gets_rules_and_tunnel_before_its_vxlan(tenv):
    _, dp, host, mgr = tenv
    agent = tagent(tenv)

    async def go():
        order = []
        for name in ("apply_tunnel_firewall", "ensure_tunnel", "ensure_sandbox"):
            real = getattr(dp, name)

            async def spy(*a, _real=real, _name=name, **k):
                order.append(_name)
                return await _real(*a, **k)
            setattr(dp, name, spy)
        remote = mgr.endpoint(OTHER, SEC)
        agent.on_message(events(mgr.rev, NodeEvent(action="put", object=other_node((P1, tunnel.pair(2)[0], True)))))
        ep = await attach(agent, dp, "c1", SEC)
        assert order[:3] == ["apply_tunnel_firewall", "ensure_tunnel", "ensure_sandbox"]
        assert dp.link("eth0", "/run/nwt/netns/c1").mtu == 1500 - 50 - 60
        sb = agent.sandbox(SEC.id)
        assert dp.link("vxlan0", sb).vxlan == (4200, "", 4789)          # no fixed source: the tunnel route's
        # The remote endpoint is reached at its host's tunnel address, not its underlay address.
        assert {p.vtep for p in await dp.list_peers(sb)} == {tunnel.pair(2)[0]}
        t = dp.tunnels[agent.tunnels.ifnames[0]]
        assert t.route == "198.19.240.0/21" and t.source == tunnel.pair(1)[0] and t.mtu == 1440
        assert [(p.public_key, p.endpoint, p.allowed_ip) for p in t.peers] == \
            [(P1, "192.0.2.12:51820", f"{tunnel.pair(2)[0]}/32")]
        fw = json.dumps(dp.tables["netweft-wg"])
        assert "4200" in fw and agent.tunnels.ifnames[0] in fw
        assert mgr.tunnel_posts[0]["Port"] == 51820 and mgr.tunnel_posts[0]["Keys"][0]["Current"] is True
        assert "Private" not in json.dumps(mgr.tunnel_posts)      # the private key never leaves the host
        # Its key moves (a rotation): the peer entry moves to the new address in place, the old key stays a peer.
        agent.on_message(events(mgr.rev + 1, NodeEvent(action="put", object=other_node(
            (P2, tunnel.pair(2)[1], True), (P1, tunnel.pair(2)[0], False)))))
        await settle()
        assert {p.vtep for p in await dp.list_peers(sb)} == {tunnel.pair(2)[1]}
        await agent.tunnels.tick()
        t = dp.tunnels[agent.tunnels.ifnames[0]]
        assert {p.public_key for p in t.peers} == {P1, P2}
        # A removed node: its keys go from the tunnel at once, and its endpoints from the sandbox.
        agent.on_message(events(mgr.rev + 2, NodeEvent(action="delete", object=other_node())))
        await settle()
        await agent.tunnels.tick()
        assert dp.tunnels[agent.tunnels.ifnames[0]].peers == ()
        # The last encrypted endpoint here: sandbox, tunnel and rules go.
        await agent.detach(ep)
        await agent.tunnels.tick()
        assert dp.tunnels == {} and "netweft-wg" not in dp.tables
        assert remote
    run(go())


def test_a_dead_tunnel_is_made_again_and_a_host_without_wireguard_refuses(tenv):
    _, dp, host, mgr = tenv
    agent = tagent(tenv)

    async def go():
        await attach(agent, dp, "c1", SEC)
        name = agent.tunnels.ifnames[0]
        dp.kill_tunnel(name)
        await agent.tunnels.tick()
        assert name in dp.tunnels and dp.tunnel_starts[name] == 2
        # Another host of the same kind but without WireGuard: the attach is refused and nothing stays.
        from netweft.dataplane.fake import FakeDataPlane
        from netweft.dataplane.wgconf import NO_WIREGUARD, Implementation
        dp2 = FakeDataPlane()
        dp2.add_host_interface("eth0", f"{VTEP[ME]}/24")
        dp2.wg_impl = Implementation("none", problem=NO_WIREGUARD)
        from netweft.agent.overlay import OverlayAgent
        a2 = OverlayAgent(host, dp2, mgr, ME, VTEP[ME], 4789)
        await dp2.create_netns("/run/nwt/netns/c9")
        from netweft.model.objects import Owner
        with pytest.raises(InvalidRequest, match="apt-get install wireguard-go"):
            await a2.attach(Owner(kind="netweft", id="c9"), SEC.id, "/run/nwt/netns/c9", "eth0", gw_ifname=None)
        assert dp2.tunnels == {} and await dp2.list_netns(a2.sandbox_dir) == []
    run(go())


def test_rotation_on_the_agent_publishes_each_phase(tenv):
    _, dp, host, mgr = tenv
    agent = tagent(tenv, period=2.0)
    agent.tunnels.grace = 0.0

    async def go():
        await attach(agent, dp, "c1", SEC)
        t = agent.tunnels
        first = t.ring.private
        # Pretend time passed: the key is old.
        t.ring = msgspec.structs.replace(t.ring, keys={0: Key(first, time.time() - 10)})
        await t.tick()
        assert t.ring.phase == "announced" and set(dp.tunnels) == set(t.ifnames.values())
        assert [k["Current"] for k in mgr.tunnel_posts[-1]["Keys"]] == [True, False]
        t.ring = msgspec.structs.replace(t.ring, since=time.time() - 10)
        await t.tick()
        assert t.ring.phase == "switched" and t.ring.current == 1
        assert dp.tunnels[t.ifnames[1]].route and dp.tunnels[t.ifnames[0]].route is None
        assert mgr.tunnel_posts[-1]["Keys"][0] == {"PublicKey": public_key(t.ring.private), "Slot": 1,
                                                  "Current": True}
        await t.tick()
        assert t.ring.phase == "steady" and set(dp.tunnels) == {t.ifnames[1]} and len(mgr.tunnel_posts[-1]["Keys"]) == 1
        assert t.ring.private != first
        # The keys survive a restart (root-only local store), never in what the managers got.
        again = tagent(tenv, period=2.0)
        assert again.tunnels.ring.private == t.ring.private
    run(go())


def test_leftovers_go_at_start_and_a_peer_that_stops_answering_is_down_with_the_reason(tenv, caplog):
    _, dp, host, mgr = tenv
    stale = "nwwgzzzzzzzzzz0"   # another node identity's interface, left by an earlier life of this host
    run(dp.ensure_tunnel(TunnelSpec(stale, PRIV, 51820, ("198.19.240.8/32",), "198.19.240.8", None, 1440)))
    agent = tagent(tenv)

    async def go():
        await agent.tunnels.start()
        await agent.tunnels.stop()   # its loop: this test ticks by hand
        assert stale not in dp.tunnels
        mgr.endpoint(OTHER, SEC)
        addr = tunnel.pair(2)[0]
        agent.on_message(events(mgr.rev, NodeEvent(action="put", object=other_node((P1, addr, True)))))
        await attach(agent, dp, "c1", SEC)
        t = agent.tunnels
        await t.tick()
        await t.tick()
        assert [p["Tunnel"] for p in t.view(SEC.id)["Peers"]] == ["up"]
        dp.unreachable.add(addr)
        await t.tick()         # the answer to the last probe sent before the cut still arrives
        p = t.peers[OTHER]
        p.last_answer -= 10    # ten seconds without an answer (after probing for longer)
        p.first_probe -= 20
        await t.tick()
        [view] = t.view(SEC.id)["Peers"]
        assert view["Tunnel"] == "down" and "h2 (192.0.2.12:51820)" in view["Reason"] and "UDP 51820" in view["Reason"]
        assert any(r.getMessage() == "encrypted overlay traffic to a host is dropped" for r in caplog.records)
        dp.unreachable.clear()
        await t.tick()
        await t.tick()
        assert [p["Tunnel"] for p in t.view(SEC.id)["Peers"]] == ["up"]
        await agent.stop()
    run(go())
