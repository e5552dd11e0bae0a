"""Concurrency: no lost peers when many containers start at once (issue 7 item 11), and no engine-wide lock
held across a call to a manager (item 22)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from lab_fixture import LogWatch, run_cli, wait_for
from netweft.lab.lab import Lab

HOSTS = ("h1", "h2", "h3")


def sandbox(lab: Lab, host: str, net_id: str) -> str:
    return str(lab.host_dir(host) / "run" / "sandboxes" / net_id[:12])


def programmed(lab: Lab, host: str, net_id: str) -> set[str]:
    """Remote endpoints the host's sandbox has both a permanent neighbour and an FDB entry for (by IP)."""
    sb = sandbox(lab, host, net_id)
    if not os.path.exists(sb):
        return set()
    neigh = json.loads(subprocess.run(["nsenter", f"--net={sb}", "ip", "-j", "neigh", "show", "dev", "vxlan0", "nud",
                                       "permanent"], capture_output=True, text=True).stdout or "[]")
    fdb = json.loads(subprocess.run(["nsenter", f"--net={sb}", "bridge", "-j", "fdb", "show", "dev", "vxlan0"],
                                    capture_output=True, text=True).stdout or "[]")
    macs = {e["mac"] for e in fdb if e.get("dst")}
    return {n["dst"] for n in neigh if n.get("lladdr") in macs}


def popen_cli(lab: Lab, host: str, *args: str) -> subprocess.Popen:
    argv, env = lab.exec_argv(host, ["netweft", *args])
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def containers(lab: Lab, host: str) -> dict[str, str]:
    """name -> overlay IP of the host's containers on `ov`."""
    return {c["Name"]: c["NetworkSettings"]["Networks"]["ov"]["IPAddress"]
            for c in lab.client(host).call("GET", "/containers/json?all=1") if "ov" in c["NetworkSettings"]["Networks"]}


def test_forty_containers_started_at_once_on_three_hosts_all_reach_each_other(make_lab):
    lab = make_lab(3)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    net_id = json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["Id"]
    logs = {h: LogWatch(lab, h) for h in HOSTS}
    procs = [popen_cli(lab, HOSTS[i % 3], "run", "-d", "--name", f"c{i:02d}", "--network", "ov", "--", "sleep", "1000")
             for i in range(40)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    last_run = time.monotonic()
    ips = {h: containers(lab, h) for h in HOSTS}
    assert sum(len(v) for v in ips.values()) == 40
    assert len({ip for v in ips.values() for ip in v.values()}) == 40
    remote = {h: {ip for o in HOSTS if o != h for ip in ips[o].values()} for h in HOSTS}

    def complete():
        return all(programmed(lab, h, net_id) == remote[h] for h in HOSTS)
    wait_for(complete, timeout=30, what="every host's sandbox holding every remote endpoint", interval=0.05)
    print(f"\nall 40 endpoints programmed on every host {time.monotonic() - last_run:.2f} s after the last run returned")
    # They came from the watch and the attaches, not from the periodic resync repairing a lost peer.
    for h in HOSTS:
        repairs = [e for e in logs[h].entries() if e.get("msg") == "overlays resynced" and e.get("repaired")]
        assert not repairs, f"{h}: the resync had to repair peers the events should have programmed: {repairs}"
        assert not [e for e in logs[h].entries() if e.get("level") in ("warning", "error")
                    and "overlay" in e.get("logger", "")], f"{h}: overlay warnings"
    # Traffic: every container pings one container on each other host and one on its own.
    names = {n: (h, ip) for h in HOSTS for n, ip in ips[h].items()}
    pings = []
    for n, (h, _) in sorted(names.items()):
        k = int(n[1:])
        targets = [names[f"c{(k + d) % 40:02d}"][1] for d in (1, 2, 3)]   # the next three: every host
        script = "for ip in " + " ".join(targets) + "; do ping -c1 -W2 -q $ip >/dev/null || echo unreachable $ip; done"
        pings.append((n, popen_cli(lab, h, "exec", n, "--", "sh", "-c", script)))
    for n, p in pings:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and not out.strip(), f"{n}: {out} {err}"


def test_a_local_run_completes_while_an_overlay_run_waits_for_a_frozen_manager(make_lab):
    lab = make_lab(2)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h2", "network", "create", "--subnet", "198.18.9.0/24", "lan")
    run_cli(lab, "h2", "run", "-d", "--name", "o1", "--network", "ov", "--", "sleep", "1000")  # ov in h2's scope
    manager = int((lab.host_dir("h1") / "netweftd.pid").read_text())
    stuck = None
    os.kill(manager, signal.SIGSTOP)
    try:
        stuck = popen_cli(lab, "h2", "run", "-d", "--name", "o2", "--network", "ov", "--", "sleep", "1000")
        # The overlay run has begun (its container is recorded) and now waits for the manager's answer.
        wait_for(lambda: "o2" in run_cli(lab, "h2", "ps", "-a").stdout, timeout=30, what="o2 being created")
        t0 = time.monotonic()
        run_cli(lab, "h2", "run", "-d", "--name", "l1", "--network", "lan", "--", "sleep", "1000")
        took = time.monotonic() - t0
        assert stuck.poll() is None, "the overlay run was expected to still wait for the frozen manager"
        assert json.loads(run_cli(lab, "h2", "inspect", "l1").stdout)[0]["State"]["Running"]
        print(f"\nlocal run took {took:.2f} s while an overlay run waited for a frozen manager")
    finally:
        os.kill(manager, signal.SIGCONT)
    _, err = stuck.communicate(timeout=120)
    assert stuck.returncode == 0, err   # and once the manager is back, the overlay run completes
    run_cli(lab, "h2", "exec", "o2", "--", "ping", "-c1", "-W3", "198.18.0.2")
