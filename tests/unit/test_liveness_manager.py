"""The leader keeps each node's data-path health (POST /health) in its Node document and withdraws a host that
is down and unreachable from every host sharing a network with it, on a real manager and store (no kernel)."""
import asyncio
import contextlib

import msgspec
import pytest

from netweft import pki
from netweft.errors import Forbidden, InvalidRequest
from netweft.manager import cluster
from netweft.model import codec
from netweft.model.cluster import HealthReport
from netweft.model.objects import Owner, PeerHealth
from netweft.model.watch import EndpointRequest

SPEC = {"CertExpiry": 3600, "HeartbeatPeriod": 5.0, "DataPathPort": 4789, "DefaultAddrPool": ["198.18.0.0/15"],
        "SubnetSize": 24}


@contextlib.asynccontextmanager
async def manager(tmp_path):
    """A started leader on its own store (no kernel) and its init answer."""
    swarm = str(tmp_path / "swarm")
    made = await cluster.Manager.init_cluster(swarm, "lead", "192.0.2.11", ("127.0.0.1", 0), SPEC)
    m = cluster.Manager(swarm, made["node_id"])
    await m.start(("127.0.0.1", 0))
    try:
        yield m, made
    finally:
        await m.stop()


async def join(m, name: str, addr: str) -> str:
    csr = pki.make_csr(pki.new_node_key()).decode()
    return (await m.join(m.cluster()["join_tokens"]["worker"], csr, name, addr))["NodeID"]


def report(**views) -> HealthReport:
    return HealthReport(health={k: PeerHealth(state=v) for k, v in views.items()})


def test_health_is_stored_and_a_dead_host_withdrawn_then_reinstated(tmp_path):
    async def main():
        async with manager(tmp_path) as (m, made):
            b, c = await join(m, "b", "192.0.2.12"), await join(m, "c", "192.0.2.13")
            net = await m.overlays.create_network({"Name": "ov", "Driver": "overlay", "Attachable": True,
                                                   "IPAM": {"Config": [{"Subnet": "198.18.0.0/24"}]}})
            for node in (b, c, made["node_id"]):
                await m.overlays.create_endpoint(node, EndpointRequest(network_id=net["id"],
                                                                       owner=Owner(kind="netweft", id=f"x{node}")))
            lead = m.node(made["node_id"])
            await m.record_health(m.node(b), report(**{c: "unreachable", made["node_id"]: "healthy"}))
            assert m.node(b).health[c].state == "unreachable"
            assert not m.node(c).withdrawn   # up for the managers: a blocked path alone withdraws nothing
            await m._update(c, lambda n: msgspec.structs.replace(n, state="down"))
            await m.record_health(lead, report(**{c: "healthy"}))
            await m.evaluate_liveness()
            assert not m.node(c).withdrawn   # the leader's host still reaches it
            await m.record_health(lead, report(**{c: "unreachable"}))
            assert m.node(c).withdrawn
            assert m.data_path_view(m.node(c))["State"] == "unreachable"
            await m.heartbeat(m.node(c), None)   # back: reinstated with its heartbeat
            assert not m.node(c).withdrawn and m.node(c).state == "ready"
            # Views of unknown nodes and of itself are not kept.
            await m.record_health(m.node(b), report(**{b: "healthy", "zzz": "healthy", c: "healthy"}))
            assert set(m.node(b).health) == {c}
    asyncio.run(main())


def test_a_health_report_is_parsed_strictly():
    with pytest.raises(InvalidRequest):
        codec.decode(b'{"Health": {}, "Extra": 1}', HealthReport)
    with pytest.raises(InvalidRequest):
        codec.decode(b'{"Health": {"NODE-1": {"state": "healthy"}}}', HealthReport)
    with pytest.raises(InvalidRequest):
        codec.decode(b'{"Health": {"n1": {"state": "fine"}}}', HealthReport)
    with pytest.raises(InvalidRequest):
        codec.decode(b'{"Health": {"n1": {"state": "healthy", "loss": 2}}}', HealthReport)
    ok = codec.decode(b'{"Health": {"n1": {"state": "degraded", "loss": 0.4, "mtu_ok": false}}}', HealthReport)
    assert ok.health["n1"].mtu_ok is False


def test_a_heartbeat_after_leave_is_refused_and_the_node_stays_down(tmp_path):
    # A heartbeat sent just before `swarm leave` can arrive after it: it must not bring the node back.
    async def main():
        async with manager(tmp_path) as (m, _):
            b = await join(m, "b", "192.0.2.12")
            stale = m.node(b)
            await m.leave(stale)
            with pytest.raises(Forbidden, match="left the swarm; join again"):
                await m.heartbeat(m.node(b), None)
            with pytest.raises(Forbidden):
                await m.heartbeat(stale, None)   # the copy the request was authorised with is re-read
            assert m.node(b).state == "down" and m.node(b).left
    asyncio.run(main())
