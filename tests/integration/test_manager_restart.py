"""The managers' own cluster store on real daemons: the revision and its history survive a restart of the
leader (agents resume with events, not a snapshot), the store is not the host's database and is private,
and a watch stream closing is one line in the manager's log."""
from __future__ import annotations

import stat

from lab_fixture import LogWatch, run_cli, swarm_dir, swarm_info, wait_for


def watch_opened(log: LogWatch, hostname: str):
    return lambda e: e.get("msg") == "watch opened" and e.get("hostname") == hostname


def ping(lab, host, ctr, ip) -> bool:
    return run_cli(lab, host, "exec", ctr, "--", "ping", "-c1", "-i0.2", "-w5", ip, check=False).returncode == 0


def test_agents_resume_with_the_missed_events_after_the_leader_restarts(make_lab):
    lab = make_lab(3)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "ov", "--ip", "198.18.0.12", "--", "sleep", "1000")
    # h2 is away while the leader restarts and the network changes: it must hear of c3 when it is back.
    lab.stop_daemon("h2")
    lab.stop_daemon("h1")
    log = LogWatch(lab, "h1")
    lab.start_daemon("h1")
    started = log.wait(lambda e: e.get("msg") == "cluster API listening", what="the leader's cluster API")
    assert started["rev"] > 0  # the revision survived the restart
    run_cli(lab, "h3", "run", "-d", "--name", "c3", "--network", "ov", "--ip", "198.18.0.13", "--", "sleep", "1000")
    lab.start_daemon("h2")
    opened = log.wait(watch_opened(log, "h2"), timeout=30, what="h2's watch in the leader's log")
    assert opened["sent"] == "events" and 0 < opened["since"] < opened["rev"], opened
    assert ping(lab, "h2", "c2", "198.18.0.13")
    assert ping(lab, "h3", "c3", "198.18.0.12")


def test_the_cluster_store_is_its_own_private_file_and_holds_the_tokens(make_lab):
    lab = make_lab(2)
    db = swarm_dir(lab, "h1") / "cluster.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    token = run_cli(lab, "h1", "swarm", "join-token", "-q", "worker").stdout.strip()
    secret = token.rsplit("-", 1)[1].encode()
    assert any(secret in p.read_bytes() for p in db.parent.glob("cluster.db*"))
    for p in (lab.host_dir("h1") / "data").rglob("*"):  # and nowhere else, the host's database included
        if p.is_file() and not p.name.startswith("cluster.db"):
            assert secret not in p.read_bytes(), p
    # Leaving removes it with the rest of the swarm state.
    run_cli(lab, "h1", "swarm", "leave", "--force")
    assert not db.exists()


def test_a_watch_stream_closing_is_one_line_in_the_managers_log(make_lab):
    lab = make_lab(2)
    node = swarm_info(lab, "h2")["NodeID"]
    log = LogWatch(lab, "h1")
    lab.stop_daemon("h2")  # a worker restarting
    closed = log.wait(lambda e: e.get("msg") == "watch closed" and e.get("node") == node, timeout=20,
                      what="the closed watch in the leader's log")
    assert closed["level"] == "info" and closed["reason"] == "the node disconnected", closed
    lab.start_daemon("h2")
    log.wait(watch_opened(log, "h2"), timeout=30, what="h2 watching again")
    run_cli(lab, "h2", "swarm", "leave")  # a worker leaving
    wait_for(lambda: len([e for e in log.entries() if e.get("msg") == "watch closed"
                          and e.get("node") == node]) >= 2, 20, "the second closed watch")
    text = (lab.host_dir("h1") / "netweftd.log").read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]
    assert not [e for e in log.entries() if e.get("level") == "error"], log.entries()
