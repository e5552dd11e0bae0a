"""Data-path health without a kernel: the probe wire format (hostile frames dropped), the pure verdict, the
prober between fake hosts over a FakeProbeNet (blocked, MTU black hole, recovery, forged probes), and the
leader's withdrawal rule (manager/liveness.py)."""
import asyncio
import struct

import pytest

from netweft.agent import health
from netweft.agent.health import Prober, assess
from netweft.dataplane import probe as wire
from netweft.dataplane.fake import FakeDataPlane, FakeProbeNet
from netweft.errors import InvalidRequest, Unavailable
from netweft.manager import liveness
from netweft.model.objects import Node, PeerHealth
from netweft import validate

A, B, C = "nodea", "nodeb", "nodec"
ADDR = {A: "192.0.2.11", B: "192.0.2.12", C: "192.0.2.13"}


# ------------------------------------------------------------------ wire format

def test_a_probe_survives_encoding_and_is_padded_to_its_size():
    p = wire.Probe(wire.REQUEST, 7, 123456789, A, B, 300)
    frame = wire.encode(p)
    assert len(frame) == 300 and frame[12:14] == struct.pack("!H", wire.ETHERTYPE)
    assert frame[6:12] == wire.node_mac(A) and frame[6] & 0x03 == 0x02   # locally administered unicast
    assert wire.parse(frame) == p


@pytest.mark.parametrize("mangle", [
    lambda f: f[:20],                                         # too short
    lambda f: f[:12] + b"\x08\x00" + f[14:],                  # IPv4, not a probe
    lambda f: f[:14] + b"XXXX" + f[18:],                      # wrong magic
    lambda f: f[:18] + b"\x09" + f[19:],                      # unknown version
    lambda f: f[:19] + b"\x07" + f[20:],                      # unknown kind
    lambda f: f[:32] + b"\x41" + f[33:],                      # node ID length past the frame's IDs
    lambda f: f[:33] + b"N" + f[34:],                         # an upper-case letter in a node ID
    lambda f: f[:32] + b"\x00" + f[33:],                      # empty node ID
])
def test_a_frame_that_is_not_a_well_formed_probe_is_dropped(mangle):
    frame = wire.encode(wire.Probe(wire.REQUEST, 1, 1, A, B, 160))
    assert wire.parse(mangle(frame)) is None


def test_encode_refuses_what_parse_would_drop():
    with pytest.raises(ValueError):
        wire.encode(wire.Probe(wire.REQUEST, 1, 1, "Not-An-ID", B, 160))
    with pytest.raises(ValueError):
        wire.encode(wire.Probe(wire.REQUEST, 1, 1, A, B, 20))


def test_the_probe_vni_is_refused_to_overlays():
    with pytest.raises(InvalidRequest, match="reserved for netweft's data-path probes"):
        validate.parse_vni(str(validate.PROBE_VNI))
    assert validate.parse_vni("4096") == 4096


def test_the_vxlan_header_carries_the_vni():
    assert wire.vxlan_header(4095) == bytes([0x08, 0, 0, 0, 0, 0x0F, 0xFF, 0])


# ------------------------------------------------------------------ verdicts

def v(small, big=(True, True), **kw):
    return assess(list(small), list(big), port=4789, big_size=1500, **kw)


def test_a_path_whose_probes_all_come_back_is_healthy():
    out = v([0.5, 0.7, 0.6])
    assert (out.state, out.loss, out.rtt_ms, out.mtu_ok, out.reason) == ("healthy", 0.0, 0.6, True, "")


def test_too_few_results_are_unknown():
    assert v([0.5], big=()).state == "unknown"


def test_three_lost_in_a_row_is_unreachable_and_names_the_port_when_the_host_is_up():
    out = v([0.5, None, None, None])
    assert out.state == "unreachable" and out.mtu_ok is None
    assert "UDP 4789" in out.reason and "blocked" in out.reason


def test_unreachable_and_down_for_the_managers_says_the_host_is_down():
    out = v([None, None, None], big=(False,), peer_down=True)
    assert out.state == "unreachable" and "host or its daemon is probably down" in out.reason


def test_small_probes_passing_and_full_size_lost_is_an_mtu_black_hole():
    out = v([0.5, 0.5, 0.5], big=(True, False, False))
    assert out.state == "degraded" and out.mtu_ok is False
    assert "MTU black hole" in out.reason and "1500 bytes" in out.reason


def test_scattered_loss_is_degraded_but_an_outage_that_ended_is_not():
    assert v([0.5, None, 0.5, None, 0.5]).state == "degraded"
    assert v([None, None, 0.5, 0.5, 0.5]).state == "healthy"


def test_a_probe_that_cannot_leave_this_host_says_so():
    out = v([0.5, 0.5], send_error="network unreachable")
    assert out.state == "unreachable" and "cannot leave this host: network unreachable" in out.reason


def test_the_reason_does_not_change_while_the_state_lasts():
    # A reason that changed every round would log and rewrite the store every round.
    assert v([0.5, None, None, None]).reason == v([None, None, None, None, None]).reason


# ------------------------------------------------------------------ the prober between fake hosts

class Host:
    """What the prober needs of an overlay agent, for one fake host."""

    def __init__(self, me: str, net: FakeProbeNet, peers: list[str]):
        self.node_id, self.vtep, self.port = me, ADDR[me], 4789
        self.dp = FakeDataPlane(probe_net=net)
        self.dp.add_host_interface("eth0", f"{self.vtep}/24")
        self.nodes = {n: Node(id=n, hostname=n, role="worker", addr=ADDR[n]) for n in ADDR}
        self.peers = peers
        self.reports: list[dict] = []
        self.client = self

    def probe_targets(self):
        return {p: ADDR[p] for p in self.peers}

    async def underlay_mtu(self):
        return await self.dp.underlay_mtu(self.vtep)

    async def call(self, method, path, body=None):
        assert (method, path) == ("POST", "/health")
        self.reports.append(body)
        return {}


async def until(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def probers(net, interval=0.02):
    ha, hb = Host(A, net, [B]), Host(B, net, [A])
    return ha, hb, Prober(ha, interval=interval, timeout=0.05), Prober(hb, interval=interval, timeout=0.05)


def test_two_hosts_probe_each_other_and_report_healthy():
    async def main():
        net = FakeProbeNet()
        ha, hb, pa, pb = probers(net)
        pa.start(), pb.start()
        try:
            # The first probes may go before B listens: the window forgets them.
            await until(lambda: (pa.health().get(B, PeerHealth()).state, pa.health().get(B, PeerHealth()).loss)
                        == ("healthy", 0.0))
            h = pa.health()[B]
            assert h.mtu_ok is True and h.rtt_ms is not None and h.since
            await until(lambda: ha.reports and ha.reports[-1]["Health"].get(B, {}).get("state") == "healthy")
            assert ha.dp.link("nwprobe").vxlan == (wire.PROBE_VNI, ADDR[A], 4789)
        finally:
            await pa.stop(), await pb.stop()
    asyncio.run(main())


def test_blocking_the_path_makes_it_unreachable_and_unblocking_healthy_again(caplog):
    async def main():
        net = FakeProbeNet()
        ha, hb, pa, pb = probers(net)
        pa.start(), pb.start()
        try:
            await until(lambda: pa.health().get(B, PeerHealth()).state == "healthy")
            net.block(ADDR[A], ADDR[B], both=False)   # only A -> B: B's answers to A are never asked for
            await until(lambda: pa.health()[B].state == "unreachable")
            assert "UDP 4789" in pa.health()[B].reason
            net.unblock(ADDR[A], ADDR[B])
            await until(lambda: pa.health()[B].state == "healthy")
        finally:
            await pa.stop(), await pb.stop()
    with caplog.at_level("INFO", logger="netweft.agent.health"):
        asyncio.run(main())
    changes = [r.getMessage() for r in caplog.records if "data path to nodeb" in r.getMessage()]
    # Each change once: healthy, unreachable, healthy again (no line per round).
    assert len([m for m in changes if "unreachable" in m]) == 1, changes
    assert any("healthy again" in m for m in changes)


def test_a_lower_path_mtu_is_an_mtu_black_hole():
    async def main():
        net = FakeProbeNet()
        ha, hb, pa, pb = probers(net)
        pa.start(), pb.start()
        try:
            net.path_mtu[(ADDR[A], ADDR[B])] = 1400
            await until(lambda: pa.health().get(B, PeerHealth()).mtu_ok is False)
            assert pa.health()[B].state == "degraded" and "MTU" in pa.health()[B].reason
            # On demand (doctor): the sizes that pass and those that do not.
            got = await pa.check(B, ADDR[B], [1300, 1400 - 36, 1400 - 35, 1464])
            assert got[1300] is not None and got[1364] is not None
            assert got[1365] is None and got[1464] is None
        finally:
            await pa.stop(), await pb.stop()
    asyncio.run(main())


def test_a_probe_from_a_stranger_or_for_another_node_gets_no_answer():
    async def main():
        net = FakeProbeNet()
        hb = Host(B, net, [])
        pb = Prober(hb, interval=0.02, timeout=0.05)
        pb.start()
        spy = net.channels  # the stranger's own channel, to see what comes back
        seen = []
        from netweft.dataplane.fake import FakeProbeChannel
        stranger = FakeProbeChannel(net, "192.0.2.99")
        stranger.start(asyncio.get_running_loop(), seen.append)
        try:
            await until(lambda: ADDR[B] in spy)
            # Claims to be node A: the answer goes to A's known address, never to the stranger.
            stranger.send(ADDR[B], wire.encode(wire.Probe(wire.REQUEST, 1, 1, A, B, 160)))
            stranger.send(ADDR[B], wire.encode(wire.Probe(wire.REQUEST, 2, 1, "zzz", B, 160)))   # not a node
            stranger.send(ADDR[B], wire.encode(wire.Probe(wire.REQUEST, 3, 1, A, C, 160)))       # not for B
            stranger.send(ADDR[B], b"\x00" * 60)
            await asyncio.sleep(0.1)
            assert seen == []
        finally:
            stranger.close()
            await pb.stop()
    asyncio.run(main())


def test_a_host_that_cannot_open_its_probe_device_keeps_running(caplog):
    async def main():
        net = FakeProbeNet()
        h = Host(A, net, [B])
        h.dp.fail_on("open_probe", times=5)
        p = Prober(h, interval=0.02, timeout=0.05)
        p.start()
        await asyncio.sleep(0.05)
        assert p.channel is None and not p._task.done()
        with pytest.raises(Unavailable, match="probe device"):
            await p.check(B, ADDR[B], [200])
        await p.stop()
    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert any("cannot open the data-path probe device" in r.getMessage() for r in caplog.records)


def test_a_peer_that_leaves_the_targets_leaves_the_report():
    async def main():
        net = FakeProbeNet()
        ha, hb, pa, pb = probers(net)
        pa.start(), pb.start()
        try:
            await until(lambda: B in pa.health())
            ha.peers = []
            await until(lambda: ha.reports and ha.reports[-1]["Health"] == {})
        finally:
            await pa.stop(), await pb.stop()
    asyncio.run(main())


# ------------------------------------------------------------------ the leader's rule

def node(i, state="ready", health=None, withdrawn=False):
    return Node(id=i, hostname=i, role="worker", addr=ADDR.get(i, "192.0.2.99"), state=state,
                health={k: PeerHealth(state=s) for k, s in (health or {}).items()}, withdrawn=withdrawn)


def test_sharers_are_the_hosts_on_a_common_network():
    assert liveness.sharers({A: ["n1"], B: ["n1", "n2"], C: ["n2"], "d": ["n3"]}) == \
        {A: {B}, B: {A, C}, C: {B}, "d": set()}


def test_one_nodes_sharers_are_those_of_the_whole_map():
    nets = {A: ["n1"], B: ["n1", "n2"], C: ["n2"], "d": ["n3"]}
    members = {"n1": {A, B}, "n2": {B, C}, "n3": {"d"}}
    assert {n: liveness.sharers_of(n, nets, members) for n in nets} == liveness.sharers(nets)
    assert liveness.sharers_of("e", nets, members) == set()


def test_down_and_unreachable_from_every_ready_sharer_is_withdrawn():
    nets = {A: ["n1"], B: ["n1"], C: ["n1"]}
    nodes = {A: node(A, "down"), B: node(B, health={A: "unreachable"}), C: node(C, health={A: "unreachable"})}
    assert liveness.withdrawals(nodes, nets) == {A: True}


def test_cut_off_from_the_managers_only_keeps_its_endpoints():
    nets = {A: ["n1"], B: ["n1"], C: ["n1"]}
    nodes = {A: node(A, "down"), B: node(B, health={A: "healthy"}), C: node(C, health={A: "unreachable"})}
    assert liveness.withdrawals(nodes, nets) == {}


def test_unreachable_but_up_for_the_managers_keeps_its_endpoints():
    nets = {A: ["n1"], B: ["n1"]}
    assert liveness.withdrawals({A: node(A), B: node(B, health={A: "unreachable"})}, nets) == {}


def test_nobody_reporting_or_only_down_reporters_decide_nothing():
    nets = {A: ["n1"], B: ["n1"]}
    assert liveness.withdrawals({A: node(A, "down"), B: node(B)}, nets) == {}
    assert liveness.withdrawals({A: node(A, "down"), B: node(B, "down", health={A: "unreachable"})}, nets) == {}
    # A reporter that does not share a network with it is not asked.
    assert liveness.withdrawals({A: node(A, "down"), B: node(B, health={A: "unreachable"})}, {A: ["n1"],
                                                                                           B: ["n2"]}) == {}


def test_a_withdrawn_host_is_reinstated_when_either_signal_ends():
    nets = {A: ["n1"], B: ["n1"]}
    back = {A: node(A, "ready", withdrawn=True), B: node(B, health={A: "unreachable"})}
    assert liveness.withdrawals(back, nets) == {A: False}
    path = {A: node(A, "down", withdrawn=True), B: node(B, health={A: "healthy"})}
    assert liveness.withdrawals(path, nets) == {A: False}


def test_the_median_is_statistics_median():
    import statistics

    from netweft.agent.health import median
    for values in ([1.0], [3.0, 1.0], [5.0, 1.0, 3.0], [0.4, 0.1, 0.3, 0.2], [2.0, 2.0, 9.0, 1.0, 7.0, 3.0]):
        assert median(values) == statistics.median(values)
