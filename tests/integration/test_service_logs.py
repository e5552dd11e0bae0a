"""`service logs` across 3 hosts: every task's lines, prefixed as Docker's (web.SLOT.ID@NODE    | ), with --tail,
--timestamps and --follow; from a worker it is refused (a manager command, as Docker's); the relay's routes
refuse a worker's forged answer and a worker calling the managers' side, each with one line."""
from __future__ import annotations

import re
import secrets
import subprocess
import time

from lab_fixture import cluster_call, node_files, run_cli, wait_for

# Each task prints a numbered line every 0.2 s, the first few at once.
TALKER = ("import socket, sys, time\nh = socket.gethostname()\ni = 0\nwhile True:\n"
          "    print(f'line {i} from {h}', flush=True); i += 1\n    time.sleep(0.01 if i < 5 else 0.2)")


def lines_by_task(out: str) -> dict[str, list[str]]:
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"\A(web\.\d\.[a-z0-9]{12}@h\d)    \| (.*)\Z", line)
        assert m, line
        got.setdefault(m.group(1), []).append(m.group(2))
    return got


def test_service_logs_show_every_hosts_tasks(lab3):
    lab = lab3
    run_cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "3", "--", "python3", "-c", TALKER,
            timeout=180)
    tasks = [t for t in lab.client("h1").call("GET", "/tasks", service="web") if t["DesiredState"] == "running"]
    want = {f"web.{t['Slot']}.{t['ID'][:12]}@{t['Node']}" for t in tasks}
    assert {t["Node"] for t in tasks} == {"h1", "h2", "h3"}
    # A host's agent opens its log-request stream to the manager a moment after it starts: until then the
    # CLI says "retry" for that host's task.
    wait_for(lambda: set(lines_by_task(run_cli(lab, "h1", "service", "logs", "web", check=False).stdout)) == want,
             30, "logs of the 3 tasks")
    got = lines_by_task(run_cli(lab, "h1", "service", "logs", "web").stdout)
    for head, lines in got.items():
        assert lines[0].startswith("line 0 from ") and len(lines) >= 5, (head, lines)

    tail = lines_by_task(run_cli(lab, "h1", "service", "logs", "--tail", "2", "web").stdout)
    assert set(tail) == want and all(len(v) == 2 for v in tail.values()), tail
    stamped = lines_by_task(run_cli(lab, "h1", "service", "logs", "-t", "--tail", "1", "web").stdout)
    assert all(re.match(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z line \d+ from ", v[0]) for v in stamped.values())
    full = run_cli(lab, "h1", "service", "logs", "--no-trunc", "--tail", "1", "web").stdout
    assert {t["ID"] for t in tasks} == set(re.findall(r"^web\.\d\.([a-z0-9]+)@", full, re.M))

    # --follow: new lines keep coming from each of the 3 hosts.
    argv, env = lab.exec_argv("h1", ["netweft", "service", "logs", "-f", "--tail", "0", "web"])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (set(seen) == want and min(seen.values()) >= 3):
            line = proc.stdout.readline()
            if not line:
                break
            head = line.split("    | ")[0]
            seen[head] = seen.get(head, 0) + 1
        assert set(seen) == want and min(seen.values()) >= 3, (seen, proc.stderr.read() if proc.poll() else "")
    finally:
        proc.kill()
        proc.wait(timeout=10)

    # A manager's command: a worker is told so.
    r = run_cli(lab, "h2", "service", "logs", "web", check=False)
    assert r.returncode != 0 and "not a swarm manager" in r.stderr
    # The relay's refusals: a worker forging an answer for a request it was not sent, a worker asking the
    # managers' side, a bad query.
    files = node_files(lab, "h2")
    ca, cert, key = files["ca"], files["cert"], files["key"]
    r = cluster_call(lab, "h2", "POST", f"/tasks/logs/{secrets.token_hex(16)}", ca=ca, cert=cert, key=key,
                     body={"lines": [{"text": "forged"}]})
    assert r["status"] == 404 and "is not open" in str(r["body"])
    r = cluster_call(lab, "h2", "GET", f"/admin/tasks/{tasks[0]['ID']}/logs", ca=ca, cert=cert, key=key)
    assert r["status"] == 403
    files1 = node_files(lab, "h1")
    r = cluster_call(lab, "h1", "GET", f"/admin/tasks/{tasks[0]['ID']}/logs?tail=-5", ca=files1["ca"],
                     cert=files1["cert"], key=files1["key"])
    assert r["status"] == 400 and "invalid tail" in str(r["body"])
    run_cli(lab, "h1", "service", "rm", "web")
