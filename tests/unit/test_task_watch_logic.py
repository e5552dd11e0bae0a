"""Tasks reach their node through the watch: the overlay agent hands task and service events (and each
(re)connection) to its observers, the task runner's hook wants a round for those, and the data plane's copy is
not touched by them."""
from __future__ import annotations

import asyncio

from netweft.model.objects import Node
from netweft.model.watch import NodeEvent

from test_agent_fake import ME, env, events, new_agent, run, settle  # noqa: F401


def test_task_and_service_events_go_to_the_observers_and_touch_nothing_else(env):
    from netweft.daemon.tasks import TaskRunner
    from netweft.model.services import Service, ServiceSpec, Task
    from netweft.model.watch import ServiceEvent, TaskEvent
    _, dp, host, mgr = env
    agent = new_agent(env)
    seen = []
    agent.observers.append(seen.append)
    runner = TaskRunner.__new__(TaskRunner)          # only its watch hook: no engine needed
    runner._due, runner._wake = False, asyncio.Event()
    agent.observers.append(runner.observe)

    async def go():
        svc = Service(id="s1", spec=ServiceSpec(name="web", command=["sleep", "1"]))
        task = Task(id="t1", service_id="s1", service_name="web", slot=1, node_id=ME)
        agent.on_message(events(mgr.rev + 1, ServiceEvent(action="put", object=svc),
                                TaskEvent(action="put", object=task)))
        await settle()
        assert [type(e).__name__ for e in seen] == ["ServiceEvent", "TaskEvent"]
        assert agent.bad_rev is None and agent.rev == mgr.rev + 1
        assert runner._due and runner._wake.is_set()    # the runner looks at its tasks at once
        runner._due = False
        agent.on_message(events(mgr.rev + 2, NodeEvent(action="put", object=Node(id="zz", hostname="zz",
                                                                                 role="worker", addr="192.0.2.99"))))
        assert not runner._due                         # a node event is not the runner's business
        agent._on_connect()                            # a (re)connection: a round, whatever was missed
        assert runner._due and seen[-1] is None
    run(go())
