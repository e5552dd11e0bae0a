"""The routing mesh: a published port answers on every host's underlay address, from a client outside the
cluster (a namespace on the underlay), spread over the tasks of every host, also through a host without a
task; mode=host answers only where a task runs. Then the ingress network is re-made with MTU 1200 and its
own subnet and gateway: tasks get MTU 1200 and the published port works again."""
from __future__ import annotations

import collections
import json

from lab_fixture import run_cli, wait_for
from conftest import sh

SERVER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80)); s.listen(128)\nwhile True:\n"
          "    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")
CLIENT = ("import socket, collections, sys, json\nn = collections.Counter()\n"
          "for i in range(int(sys.argv[3])):\n    try:\n"
          "        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
          "        n[c.recv(100).decode()] += 1; c.close()\n"
          "    except OSError as e:\n        n['error ' + type(e).__name__] += 1\nprint(json.dumps(n))")


def outside(lab, ns) -> None:
    """Plug the test's namespace into the lab's underlay switch as 192.0.2.200."""
    sw = lab.ns("sw")
    sh("ip", "-n", sw, "link", "add", "nwto0", "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    sh("ip", "-n", sw, "link", "set", "nwto0", "master", "ul", "up")
    ns.ip("addr", "add", "192.0.2.200/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")


def ask(ns, host_ip: str, port: int, n: int) -> collections.Counter:
    import sys
    r = ns.run(sys.executable, "-c", CLIENT, host_ip, str(port), str(n), timeout=120)
    assert r.returncode == 0, r.stderr
    return collections.Counter(json.loads(r.stdout))


def task_hosts(lab, service: str) -> dict[str, str]:
    """Container hostname -> node of the running tasks."""
    return {t["Status"]["ContainerStatus"]["ContainerID"][:12]: t["Node"]
            for t in lab.client("h1").call("GET", "/tasks", service=service)
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"}


def test_published_ports_answer_on_every_host(lab3, make_ns):
    lab = lab3
    out = make_ns("out")
    outside(lab, out)
    run_cli(lab, "h1", "service", "create", "--name", "web", "--replicas", "2", "--constraint",
            "node.hostname!=h3", "--publish", "published=8080,target=80", "--", "python3", "-c", SERVER,
            timeout=180)
    tasks = task_hosts(lab, "web")
    assert sorted(tasks.values()) == ["h1", "h2"]
    addrs = {h: lab.address(h) for h in ("h1", "h2", "h3")}
    for h, ip in addrs.items():   # h3 runs no task and answers too
        got = wait_for(lambda: (c := ask(out, ip, 8080, 20)) and set(c) == set(tasks) and c, 30,
                       f"port 8080 through {h} reaching both tasks")
        assert sum(got.values()) == 20

    # mode=host: only the host with a task answers.
    run_cli(lab, "h1", "service", "create", "--name", "local", "--constraint", "node.hostname==h2",
            "--publish", "published=9090,target=80,mode=host", "--", "python3", "-c", SERVER, timeout=180)
    only = task_hosts(lab, "local")
    wait_for(lambda: set(ask(out, addrs["h2"], 9090, 5)) == set(only), 30, "mode=host port on h2")
    assert all(k.startswith("error") for k in ask(out, addrs["h1"], 9090, 3))

    # Re-make the ingress network (refused while published; removed with the services gone first).
    run_cli(lab, "h1", "service", "rm", "web", "local")
    wait_for(lambda: run_cli(lab, "h1", "network", "rm", "-f", "ingress", check=False).returncode == 0, 30,
             "ingress removable")
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--ingress", "--subnet", "198.18.77.0/24",
            "--gateway", "198.18.77.254", "-o", "com.docker.network.driver.mtu=1200", "ingress")
    run_cli(lab, "h1", "service", "create", "--name", "web2", "--replicas", "2", "--publish",
            "published=8080,target=80", "--", "python3", "-c", SERVER, timeout=180)
    t = next(t for t in lab.client("h1").call("GET", "/tasks", service="web2") if t["DesiredState"] == "running")
    assert t["NetworksAttachments"][0]["Addresses"][0].startswith("198.18.77.")
    mtu = run_cli(lab, t["Node"], "exec", t["Name"][:64], "--", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    link = json.loads(run_cli(lab, t["Node"], "exec", t["Name"][:64], "--", "ip", "-j", "link", "show",
                              "eth0").stdout)[0]
    assert link["mtu"] == 1200, (mtu, link)
    tasks = task_hosts(lab, "web2")
    for h, ip in addrs.items():
        wait_for(lambda: set(ask(out, ip, 8080, 20)) == set(tasks), 30, f"port 8080 through {h} after re-making")
