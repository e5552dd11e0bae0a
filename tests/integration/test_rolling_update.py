"""A rolling update on 3 hosts: `service update --update-parallelism 1 --update-delay 1s --update-order
start-first` replaces the tasks one batch at a time (never more than one new task starting, never fewer than 3
running) while the VIP keeps answering; a new version whose tasks fail pauses the update (old tasks keep
answering), and `service rollback` brings the previous spec back."""
from __future__ import annotations

import collections
import json
import threading

from lab_fixture import run_cli, wait_for
from netweft.cli.service import spec_from_view
from test_vip import SERVER, connect


def views(lab) -> list[dict]:
    return lab.client("h1").call("GET", "/tasks", service="web")


def test_rolling_update_in_batches_while_the_vip_answers(lab3):
    lab = lab3
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
    run_cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "3", "--network", "ov",
            "-e", "V=1", "--", "python3", "-c", SERVER, timeout=180)
    run_cli(lab, "h1", "run", "-d", "--name", "cli", "--network", "ov", "--", "sleep", "infinity")
    web = json.loads(run_cli(lab, "h1", "service", "inspect", "web").stdout)[0]
    vip = web["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]
    wait_for(lambda: len(connect(lab, vip, 9)) == 3, 30, "the VIP reaching the 3 tasks")

    # Observers during the update: the clients' answers through the VIP, and the tasks' states.
    answers: collections.Counter = collections.Counter()
    seen: list[tuple[int, int, int]] = []     # (old running, new running, new not yet running)
    done = threading.Event()
    notes: list = []      # old tasks no longer running, as seen (for a failure's message)

    def clients():
        while not done.is_set():
            answers.update(connect(lab, vip, 10))

    def watch_tasks():
        while not done.is_set():
            vs = views(lab)
            live = [t for t in vs if t["DesiredState"] == "running"]
            gone = [(t["Name"], t["DesiredState"], t["Status"]["State"], t["Status"]["Message"]) for t in vs
                    if t["ID"] in first and (t["DesiredState"], t["Status"]["State"]) != ("running", "running")]
            if gone and len(notes) < 20:
                notes.append(gone)
            new = [t for t in live if t["ID"] not in first]
            seen.append((sum(1 for t in live if t["ID"] in first and t["Status"]["State"] == "running"),
                         sum(1 for t in new if t["Status"]["State"] == "running"),
                         sum(1 for t in new if t["Status"]["State"] != "running")))
            done.wait(0.1)

    first = {t["ID"] for t in views(lab) if t["DesiredState"] == "running"}
    threads = [threading.Thread(target=clients), threading.Thread(target=watch_tasks)]
    for t in threads:
        t.start()
    try:
        r = run_cli(lab, "h1", "service", "update", "--update-parallelism", "1", "--update-delay", "1s",
                    "--update-order", "start-first", "--env-add", "V=2", "web", timeout=180)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    assert "overall progress: 1 out of 3 tasks" in r.stdout and "overall progress: 3 out of 3 tasks" in r.stdout
    assert "verify: Service converged" in r.stdout
    # In batches of one: never two new tasks starting at once; start-first: never fewer than 3 running.
    assert all(starting <= 1 for _, _, starting in seen), seen
    assert all(old + new >= 3 for old, new, _ in seen), (seen, notes)
    assert any(old == 2 and new == 1 for old, new, _ in seen) and any(old == 1 and new == 2 for old, new, _ in seen), seen
    view = json.loads(run_cli(lab, "h1", "service", "inspect", "web").stdout)[0]
    assert view["UpdateStatus"]["State"] == "completed" and view["Spec"]["UpdateConfig"]["Parallelism"] == 1
    assert view["Spec"]["UpdateConfig"]["Delay"] == 1_000_000_000 and view["Spec"]["UpdateConfig"]["Order"] == "start-first"
    now = {t["ID"] for t in views(lab) if t["DesiredState"] == "running"}
    assert len(now) == 3 and not now & first
    # The VIP kept answering through the update (a connection caught by a task as it stopped may fail).
    ok = sum(n for k, n in answers.items() if not k.startswith("error"))
    assert ok >= 30 and ok >= 0.9 * sum(answers.values()), answers

    # A version whose tasks fail: the update pauses after the first batch; the old tasks keep answering.
    # (the CLI has no flag to change the command: the same request through the local API)
    cur = lab.client("h1").call("GET", "/services/web")
    spec = spec_from_view(cur)
    spec["command"] = ["python3", "-c", "import sys; sys.exit(3)"]
    lab.client("h1").call("POST", f"/services/{cur['ID']}/update", spec)
    wait_for(lambda: lab.client("h1").call("GET", "/services/web").get("UpdateStatus", {}).get("State") == "paused",
             60, "the update paused by the failing task")
    msg = lab.client("h1").call("GET", "/services/web")["UpdateStatus"]["Message"]
    assert msg.startswith("update paused due to failure or early termination of task")
    running_old = [t for t in views(lab) if t["DesiredState"] == "running" and t["Status"]["State"] == "running"]
    assert len(running_old) >= 2                        # only the first batch was touched
    wait_for(lambda: not any(k.startswith("error") for k in connect(lab, vip, 10)), 30, "the VIP answering")

    # Rollback: the previous spec (the server) comes back on every slot.
    r = run_cli(lab, "h1", "service", "rollback", "web", timeout=180)
    assert "rollback: rollback completed" in r.stdout, r.stdout
    view = json.loads(run_cli(lab, "h1", "service", "inspect", "web").stdout)[0]
    assert view["UpdateStatus"]["State"] == "rollback_completed"
    assert view["Spec"]["TaskTemplate"]["ContainerSpec"]["Command"][0] == "python3"
    assert "sys.exit" not in " ".join(view["Spec"]["TaskTemplate"]["ContainerSpec"]["Command"])
    wait_for(lambda: len(connect(lab, vip, 9)) == 3, 30, "the VIP reaching the 3 rolled-back tasks")
    run_cli(lab, "h1", "rm", "-f", "cli")
    run_cli(lab, "h1", "service", "rm", "web")
