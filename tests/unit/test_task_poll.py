"""The task runner's exit poll (daemon/tasks.py) reads only its task containers' documents, not every container's:
a scan (the rounds) finds them, containers it starts are added, removed ones drop out; a task container made by
someone else is found at the next scan."""
from __future__ import annotations

from netweft.daemon.tasks import TASK_LABEL, TaskRunner


class Store:
    def __init__(self):
        self.docs: dict[str, dict] = {}
        self.scans = self.gets = 0

    def containing(self, kind, text):
        self.scans += 1
        return [d for d in self.docs.values() if text in str(d).replace("'", '"')]

    def get(self, kind, id):
        self.gets += 1
        return self.docs.get(id)


class Engine:
    def __init__(self):
        self.store = Store()

    def container_view(self, ctr):
        return {"State": {"Status": ctr["status"], "ExitCode": 0}}


def ctr(i: int, task: bool = True, status: str = "running") -> dict:
    return {"Id": f"c{i}", "Name": f"n{i}", "status": status,
            "Config": {"Labels": {TASK_LABEL: f"t{i}"} if task else {}}}


def test_the_exit_poll_reads_only_the_task_containers_the_last_scan_found():
    engine = Engine()
    for i in range(50):
        engine.store.docs[f"c{i}"] = ctr(i, task=i < 3)
    runner = TaskRunner(engine)
    assert sorted(lt.container for lt in runner.local()) == ["n0", "n1", "n2"] and engine.store.scans == 1
    engine.store.docs["c1"]["status"] = "exited"
    del engine.store.docs["c2"]
    engine.store.docs["c90"] = ctr(90)              # made by someone else: not polled until the next scan
    got = runner.local(scan=False)
    assert sorted((lt.container, lt.status) for lt in got) == [("n0", "running"), ("n1", "exited")]
    assert engine.store.scans == 1 and engine.store.gets == 3
    engine.store.gets = 0
    runner.local(scan=False)
    assert engine.store.gets == 2                   # c2 was dropped
    assert sorted(lt.container for lt in runner.local()) == ["n0", "n1", "n90"]


def test_the_first_poll_scans():
    engine = Engine()
    engine.store.docs["c0"] = ctr(0)
    assert [lt.container for lt in TaskRunner(engine).local(scan=False)] == ["n0"] and engine.store.scans == 1
