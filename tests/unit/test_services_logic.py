"""Services on the managers (store, refusals, reports, the scheduling round) and the agent's task plan."""
from __future__ import annotations

import json

import msgspec
import pytest

from netweft.agent.services import Assignment, LocalTask, plan
from netweft.errors import Conflict, Forbidden, InvalidRequest, NotFound
from netweft.manager.services import Services
from netweft.model.objects import Owner
from netweft.model.services import ServiceSpec, Task

from test_watch import Manager, run


def body(**kw) -> bytes:
    return json.dumps({"name": "web", "command": ["sleep", "1"], **kw}).encode()


async def setup(tmp_path):
    m = await Manager.open(tmp_path / "c.db")
    for i, n in enumerate(("a", "b", "c"), 1):
        await m.node(n, f"192.0.2.{i}")
    svcs = Services(m.hub, m.ov)
    return m, svcs


def test_create_schedule_report_and_views(tmp_path):
    async def main():
        m, s = await setup(tmp_path)
        ov = await m.ov.create_network({"Name": "ov", "Driver": "overlay"})
        sid = (await s.create(body(replicas=3, networks=["ov"], env={"K": "V"})))["ID"]
        with pytest.raises(Conflict, match="already exists"):
            await s.create(body())
        p = await s.schedule_once()
        assert len(p.create) == 3 and sorted(t.node_id for t in p.create) == ["a", "b", "c"]
        node_a = m.hub.state.get("nodes", "a")
        mine = msgspec.json.decode(s.assigned(node_a))["tasks"]
        assert len(mine) == 1 and mine[0]["service"]["networks"] == [ov["id"]] and mine[0]["ingress"] == ""
        tid = mine[0]["task"]["id"]
        # A task's container may join the (non-attachable) network; others may not.
        name = mine[0]["name"]
        assert s.may_attach("a", Owner(kind="netweft", id="x", name=name), ov["id"])
        assert not s.may_attach("b", Owner(kind="netweft", id="x", name=name), ov["id"])
        assert not s.may_attach("a", Owner(kind="cni", id="x", name=name), ov["id"])
        await s.report(node_a, json.dumps([{"id": tid, "state": "running"}]).encode())
        node_b = m.hub.state.get("nodes", "b")
        with pytest.raises(Forbidden, match="another node"):
            await s.report(node_b, json.dumps([{"id": tid, "state": "failed"}]).encode())
        with pytest.raises(InvalidRequest):
            await s.report(node_a, b'[{"id": "x", "state": "dancing"}]')
        view = s.service_view(s.service("web"))
        assert view["ServiceStatus"] == {"RunningTasks": 1, "DesiredTasks": 3}
        assert view["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["K=V"]
        t = [v for v in s.task_views("web") if v["ID"] == tid][0]
        assert t["Name"] == f"web.{t['Slot']}.{tid}" and t["Status"]["State"] == "running" and t["Node"] == "a"
        # Scale only: same version, no task replaced; another change: a new version.
        assert (await s.update(sid, body(replicas=1, networks=["ov"], env={"K": "V"})))["Version"] == 1
        assert (await s.update(sid, body(replicas=1, networks=["ov"], env={"K": "W"})))["Version"] == 2
        await s.remove("web")
        with pytest.raises(NotFound):
            s.service("web")
        await m.close()
    run(main())


def test_refusals_change_nothing(tmp_path):
    async def main():
        m, s = await setup(tmp_path)
        await m.ov.create_network({"Name": "ingress", "Driver": "overlay", "Ingress": True})
        for kw, msg in ((dict(name="x" * 40), "longer than"), (dict(mode="both"), "--mode"),
                        (dict(mode="global", replicas=2), "--replicas"), (dict(endpoint_mode="x"), "endpoint-mode"),
                        (dict(constraints=["node.role==king"]), "invalid constraint"),
                        (dict(networks=["ingress"]), "ingress network"), (dict(networks=["nope"]), None),
                        (dict(endpoint_mode="dnsrr", ports=[{"target": 80, "published": 80}]), "dnsrr")):
            with pytest.raises((InvalidRequest, NotFound), match=msg):
                await s.create(body(**kw))
        with pytest.raises(InvalidRequest):
            await s.create(b'{"name": "web", "command": [], "bogus": 1}')
        await s.create(body(name="a", ports=[{"target": 80, "published": 8080}]))
        with pytest.raises(Conflict, match="already published by service 'a'"):
            await s.create(body(name="b", ports=[{"target": 81, "published": 8080}]))
        auto = (await s.create(body(name="c", ports=[{"target": 80}])))["ID"]
        assert s.service(auto).spec.ports[0].published == 30000
        assert s.services() and len(s.services()) == 2
        await m.close()
    run(main())


def spec(**kw) -> ServiceSpec:
    return ServiceSpec(name="web", command=["sleep", "1"], networks=["n1"], **kw)


def a(tid: str, state="assigned", desired="running", service=True) -> Assignment:
    return Assignment(task=Task(id=tid, service_id="s", service_name="web", slot=1, node_id="a", state=state,
                                desired_state=desired), name=f"web.1.{tid}", service=spec() if service else None)


def test_agent_plan():
    local = [LocalTask("t2", "web.1.t2", "running", container_id="c2"),
             LocalTask("t3", "web.1.t3", "exited", 1), LocalTask("t4", "web.1.t4", "running"),
             LocalTask("gone", "web.1.gone", "running"), LocalTask("t6", "web.1.t6", "exited", 0)]
    out = plan([a("t1"), a("t2"), a("t3", "running"), a("t4", "running", desired="shutdown"), a("t5"),
                a("t6", "running")], local, failed_starts={"t5": "no such command"})
    assert [x.task.id for x in out.start] == ["t1"]
    assert sorted(out.remove) == ["web.1.gone", "web.1.t4"]
    states = {r.id: (r.state, r.exit_code) for r in out.report}
    assert states == {"t2": ("running", None), "t3": ("failed", 1), "t4": ("shutdown", None),
                      "t5": ("rejected", None), "t6": ("complete", 0)}
    # A removed service's task: stopped and removed.
    out = plan([a("t7", "running", service=False)], [LocalTask("t7", "web.1.t7", "running")])
    assert out.remove == ["web.1.t7"] and out.report[0].state == "shutdown"


def test_update_rolls_and_rollback_swaps_specs(tmp_path):
    async def main():
        m, s = await setup(tmp_path)
        sid = (await s.create(body(replicas=2, update_config={"parallelism": 1, "delay": 2.5,
                                                              "order": "start-first", "failure_action": "continue"})))["ID"]
        view = s.service_view(s.service(sid))
        assert view["Spec"]["UpdateConfig"] == {"Parallelism": 1, "Delay": 2_500_000_000, "FailureAction": "continue",
                                                "Order": "start-first", "MaxFailureRatio": 0}
        assert "UpdateStatus" not in view and "PreviousSpec" not in view
        with pytest.raises(Conflict, match="no previous spec to roll back to"):
            await s.rollback("web")
        assert s.service("web").version == 1                      # the refusal changed nothing
        # Only the update config: no new version, no task replaced; the config is kept by later updates.
        assert (await s.update(sid, body(replicas=2, update_config={"parallelism": 2})))["Version"] == 1
        assert (await s.update(sid, body(replicas=2, env={"K": "W"})))["Version"] == 2
        svc = s.service(sid)
        assert svc.spec.update_config.parallelism == 2 and svc.update_status.state == "updating"
        assert svc.previous_spec.env == {} and s.service_view(svc)["UpdateStatus"]["State"] == "updating"
        assert (await s.rollback("web"))["Version"] == 3
        svc = s.service(sid)
        assert svc.spec.env == {} and svc.previous_spec.env == {"K": "W"}
        assert svc.update_status.state == "rollback_started"
        with pytest.raises(InvalidRequest):
            await s.update(sid, body(update_config={"parallelism": -1}))
        with pytest.raises(InvalidRequest):
            await s.update(sid, body(update_config={"order": "sideways"}))
        await m.close()
    run(main())


def test_the_watch_carries_each_node_its_own_tasks_and_every_node_the_services(tmp_path):
    from test_watch import ids, pending

    async def main():
        m, s = await setup(tmp_path)
        ws = {n: m.hub.subscribe(n, n, m.hub.state.rev) for n in ("a", "b", "c")}
        await s.create(body(replicas=2))
        for w in ws.values():                          # every node hears of the service (routing mesh)
            assert ids(pending(w), "service") == [s.service("web").id]
        p = await s.schedule_once()
        placed = {t.node_id: t.id for t in p.create}
        assert len(placed) == 2
        for n, w in ws.items():                        # a node hears of its own task only
            assert ids(pending(w), "task") == ([placed[n]] if n in placed else [])
        # A resuming agent gets the missed task events of its node too.
        frames = [f async for _, f in m.hub.missed("a", frozenset(), 0, m.hub.state.rev)]
        got = [e.object.id for f in frames for line in f.splitlines()
               for e in msgspec.json.decode(line, type=__import__("netweft.model.watch", fromlist=["x"]).WatchMessage
                                            ).events if type(e).__name__ == "TaskEvent"]
        assert got == ([placed["a"]] if "a" in placed else [])
        await m.close()
    run(main())
