"""Services on a 3-host lab: tasks spread and named as Docker's, progress, names in DNS (tasks.S, dnsrr),
a killed task replaced (and gone from DNS), drain, a Down node's tasks moved after the grace period, scale,
inspect shapes, the ingress network kept while a service publishes ports, rm."""
from __future__ import annotations

import json

from lab_fixture import run_cli, wait_for
from netweft.lab.lab import Lab


def task_views(lab: Lab, service: str) -> list[dict]:
    return lab.client("h1").call("GET", "/tasks", service=service)


def running(lab: Lab, service: str) -> list[dict]:
    return [t for t in task_views(lab, service) if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]


def getent(lab: Lab, host: str, ctr: str, name: str) -> list[str]:
    r = run_cli(lab, host, "exec", ctr, "--", "getent", "ahostsv4", name, check=False)
    return sorted({line.split()[0] for line in r.stdout.splitlines() if line.strip()})


def addr(t: dict) -> str:
    return t["NetworksAttachments"][0]["Addresses"][0].split("/")[0]


def test_services_end_to_end(lab3):
    lab = lab3
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "ov")   # not attachable: services only
    r = run_cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "3", "--network", "ov",
                "-e", "GREETING=hi", "--", "sleep", "infinity", timeout=180)
    assert "overall progress: 3 out of 3 tasks" in r.stdout and "verify: Service converged" in r.stdout
    sid = r.stdout.split()[0]
    ts = running(lab, "web")
    assert sorted(t["Node"] for t in ts) == ["h1", "h2", "h3"]            # spread
    assert sorted(t["Slot"] for t in ts) == [1, 2, 3]
    assert all(t["Name"] == f"web.{t['Slot']}.{t['ID']}" for t in ts)      # Docker's task names
    ls = run_cli(lab, "h2", "service", "ls", check=False)                 # a worker: not a manager
    assert ls.returncode != 0 and "not a swarm manager" in ls.stderr
    assert "3/3" in run_cli(lab, "h1", "service", "ls").stdout
    view = json.loads(run_cli(lab, "h1", "service", "inspect", "web").stdout)[0]
    assert view["ID"] == sid and view["Spec"]["Mode"] == {"Replicated": {"Replicas": 3}}
    assert view["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["GREETING=hi"]
    assert view["Spec"]["TaskTemplate"]["Networks"][0]["Target"] == \
        json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["Id"]

    # DNS: tasks.web lists every running task from any task; dnsrr: the service name gives task IPs.
    by_node = {t["Node"]: t for t in ts}
    one = by_node["h2"]
    assert wait_for(lambda: getent(lab, "h2", one["Name"], "tasks.web") == sorted(addr(t) for t in ts), 15,
                    "tasks.web from a task")
    run_cli(lab, "h1", "service", "create", "--name", "rr", "--replicas", "2", "--endpoint-mode", "dnsrr",
            "--network", "ov", "--", "sleep", "infinity", timeout=180)
    rr = running(lab, "rr")
    assert wait_for(lambda: getent(lab, "h2", one["Name"], "rr") == sorted(addr(t) for t in rr), 15,
                    "rr (dnsrr) from a task of web")

    # A killed task is replaced; its address leaves tasks.web.
    victim = by_node["h3"]
    run_cli(lab, "h3", "stop", "-t", "0", victim["Name"])
    wait_for(lambda: len(running(lab, "web")) == 3 and victim["ID"] not in {t["ID"] for t in running(lab, "web")},
             30, "the killed task replaced")
    old = [t for t in task_views(lab, "web") if t["ID"] == victim["ID"]][0]
    assert old["DesiredState"] == "shutdown" and old["Status"]["State"] in ("failed", "complete")
    now = running(lab, "web")
    assert wait_for(lambda: getent(lab, "h2", one["Name"], "tasks.web") == sorted(addr(t) for t in now), 15,
                    "tasks.web without the killed task")

    # Drain moves tasks off a node; the ingress network is kept while a service publishes ports.
    run_cli(lab, "h1", "node", "update", "--availability", "drain", "h3")
    wait_for(lambda: len(running(lab, "web")) == 3 and all(t["Node"] != "h3" for t in running(lab, "web")),
             30, "tasks moved off the drained h3")
    run_cli(lab, "h1", "service", "create", "--name", "pub", "-d", "--publish", "published=8080,target=80",
            "--", "sleep", "infinity")
    r = run_cli(lab, "h1", "network", "rm", "-f", "ingress", check=False)
    assert r.returncode != 0 and "in use by services publishing ports (pub)" in r.stderr
    run_cli(lab, "h1", "service", "rm", "pub")

    # Scale, then remove: the tasks' containers go from every host.
    r = run_cli(lab, "h1", "service", "scale", "web=1", timeout=120)
    assert "overall progress: 1 out of 1 tasks" in r.stdout
    run_cli(lab, "h1", "service", "rm", "web", "rr")
    for h in ("h1", "h2", "h3"):
        wait_for(lambda: run_cli(lab, h, "ps", "-a", "-q").stdout.strip() == "", 30, f"task containers gone on {h}")
    assert json.loads(run_cli(lab, "h1", "node", "ls", "--format", "json").stdout.splitlines()[0])


def test_a_down_nodes_tasks_come_back_elsewhere_after_the_grace_period(lab3):
    lab = lab3
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "ov")
    run_cli(lab, "h1", "service", "create", "--name", "g", "--mode", "global", "--network", "ov", "--",
            "sleep", "infinity", timeout=180)
    assert sorted(t["Node"] for t in running(lab, "g")) == ["h1", "h2", "h3"]
    run_cli(lab, "h1", "service", "create", "--name", "w", "--replicas", "3", "--constraint", "node.role==worker",
            "--", "sleep", "infinity", timeout=180)
    assert sorted(t["Node"] for t in running(lab, "w")) == ["h2", "h2", "h3"] or \
        sorted(t["Node"] for t in running(lab, "w")) == ["h2", "h3", "h3"]
    lab.stop_daemon("h3", sig=9)   # the host dies: its heartbeats stop
    wait_for(lambda: len(running(lab, "w")) == 3 and all(t["Node"] == "h2" for t in running(lab, "w")), 60,
             "w's tasks back on h2 after h3 was Down past the grace period")
    assert sorted(t["Node"] for t in running(lab, "g")) == ["h1", "h2"]
    # A host that leaves the swarm stops and removes its task containers.
    assert run_cli(lab, "h2", "ps", "-q").stdout.strip()
    run_cli(lab, "h2", "swarm", "leave")
    wait_for(lambda: run_cli(lab, "h2", "ps", "-a", "-q").stdout.strip() == "", 30, "h2's task containers gone")
