"""Issue 13 item 4: `netweft events`, derived from the cluster store's history (so --since works on any host)."""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import time

from lab_fixture import run_cli, wait_for
from observe_lab import node_ids, olab, set_health  # noqa: F401


def events(lab, host, *args) -> list[dict]:
    r = run_cli(lab, host, "events", "--format", "json", *args)
    return [json.loads(l) for l in r.stdout.splitlines() if l]


class Follow:
    """`netweft events` left running in a lab host, read line by line."""

    def __init__(self, lab, host, *args):
        argv, env = lab.exec_argv(host, ["netweft", "events", *args])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def next(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise AssertionError(f"no event line within {timeout} s (stderr: {self.stop()})")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"the event stream ended: {self.stop()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode()[-500:]


def test_network_events_in_order_with_since_filters_and_json_on_every_host(olab):
    lab = olab
    t0 = time.time() - 1
    # From t0 on: under load the command may connect after the first changes; the history it then reads
    # first must join the live stream without a gap or a repeat.
    live = Follow(lab, "h2", "--since", str(t0), "--filter", "network=ev", "--format", "json")
    try:
        run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.31.0/24", "ev")
        run_cli(lab, "h2", "run", "-d", "--name", "e2", "--network", "ev", "--", "sleep", "600")
        run_cli(lab, "h2", "rm", "-f", "e2")
        run_cli(lab, "h1", "network", "rm", "ev")
        want = [("network", "create"), ("network", "connect"), ("network", "disconnect"), ("network", "remove")]
        # Live, on a worker (relayed from the managers): the four, in order, as JSON lines.
        got = [json.loads(live.next()) for _ in want]
        assert [(e["Type"], e["Action"]) for e in got] == want
    finally:
        live.stop()
    connect = got[1]
    assert connect["Actor"]["Attributes"]["name"] == "ev" and connect["Actor"]["Attributes"]["node"] == "h2"
    assert connect["Actor"]["Attributes"]["container_name"] == "e2" and connect["scope"] == "swarm"
    assert [e["rev"] for e in got] == sorted(e["rev"] for e in got)
    assert all(t0 <= e["time"] <= time.time() + 1 for e in got)
    # The past, from the store's history, the same on the leader and on the workers.
    since, until = str(t0), str(time.time() + 0.5)
    seen = {}
    for host in ("h1", "h2", "h3"):
        evs = events(lab, host, "--since", since, "--until", until, "--filter", "network=ev")
        seen[host] = [(e["Type"], e["Action"], e["rev"]) for e in evs]
    assert [(t, a) for t, a, _ in seen["h1"]] == want
    assert seen["h1"] == seen["h2"]
    # A worker sees the connects of others only on networks it is on: h3 never was on ev.
    assert seen["h3"] == [seen["h1"][0], seen["h1"][3]]
    # Filters: values of one key ORed, keys ANDed.
    evs = events(lab, "h1", "--since", since, "--until", until, "-f", "network=ev", "-f", "event=connect",
                 "-f", "event=remove")
    assert [e["Action"] for e in evs] == ["connect", "remove"]
    evs = events(lab, "h1", "--since", since, "--until", until, "-f", "type=network", "-f", "node=h2")
    assert [e["Action"] for e in evs if e["Actor"]["Attributes"]["name"] == "ev"] == ["connect", "disconnect"]
    assert events(lab, "h1", "--since", since, "--until", until, "-f", "network=ev", "-f", "node=h3") == []
    # A relative --since and Docker's default text lines.
    text = run_cli(lab, "h2", "events", "--since", "10m", "--until", "0s", "-f", "network=ev").stdout.splitlines()
    assert len(text) == 4 and " network create " in text[0] and "(name=ev, subnet=198.18.31.0/24, type=overlay)" \
        in text[0]


def test_node_and_health_events(olab):
    lab = olab
    ids = node_ids(lab)
    t0 = time.time() - 1
    live = Follow(lab, "h1", "--filter", "type=health", "--filter", "type=node", "--format", "json")
    try:
        time.sleep(0.5)
        set_health(lab, ids["h2"], {ids["h3"]: {"state": "unreachable", "loss": 1.0, "mtu_ok": False,
                                                "reason": "no probe reply from h3: UDP 4789 blocked?"}})
        ev = json.loads(live.next())
        assert (ev["Type"], ev["Action"], ev["Actor"]["ID"]) == ("health", "unreachable", ids["h2"])
        a = ev["Actor"]["Attributes"]
        assert (a["name"], a["peer"], a["previous"], a["loss"], a["mtu_ok"]) == ("h2", "h3", "unknown", "1", "false")
        assert a["reason"] == "no probe reply from h3: UDP 4789 blocked?"
        set_health(lab, ids["h2"], {ids["h3"]: {"state": "healthy", "loss": 0.0, "rtt_ms": 0.4, "mtu_ok": True}})
        ev = json.loads(live.next())
        # (h2's own probe report, every 10 s, may have cleared the hand-written state in between: unknown)
        assert ev["Action"] == "healthy" and ev["Actor"]["Attributes"]["previous"] in ("unreachable", "unknown")
        # A host going down and coming back.
        lab.stop_daemon("h3")
        ev = json.loads(live.next(timeout=30))
        assert (ev["Type"], ev["Action"], ev["Actor"]["Attributes"]["name"]) == ("node", "down", "h3")
        lab.start_daemon("h3", ["--metrics-addr", "127.0.0.1:9323", "--dashboard-addr", "127.0.0.1:9324"])
        ev = json.loads(live.next(timeout=30))
        assert (ev["Type"], ev["Action"], ev["Actor"]["Attributes"]["previous"]) == ("node", "ready", "down")
    finally:
        live.stop()
        set_health(lab, ids["h2"], {})
    # The whole story again from the history: the lab's joins came before t0; a node filter by name.
    evs = events(lab, "h2", "--since", str(t0), "--until", str(time.time() + 0.5), "-f", "node=h3")
    assert [(e["Type"], e["Action"]) for e in evs] == [("health", "unreachable"), ("health", "healthy"),
                                                       ("node", "down"), ("node", "ready")]
    joins = events(lab, "h1", "--since", "1h", "--until", "0s", "-f", "event=join")
    assert sorted(e["Actor"]["Attributes"]["name"] for e in joins) == ["h1", "h2", "h3"]


def test_local_networks_events_merge_with_the_clusters_in_time_order(olab):
    lab = olab
    t0 = time.time() - 1
    live = Follow(lab, "h2", "--filter", "type=network", "--format", "json")
    try:
        time.sleep(0.5)
        run_cli(lab, "h1", "network", "create", "-d", "overlay", "--subnet", "198.18.32.0/24", "ovmix")
        run_cli(lab, "h2", "network", "create", "--subnet", "198.19.42.0/24", "brmix")
        run_cli(lab, "h1", "network", "rm", "ovmix")
        run_cli(lab, "h2", "network", "rm", "brmix")
        want = [("ovmix", "create", "swarm"), ("brmix", "create", "local"), ("ovmix", "remove", "swarm"),
                ("brmix", "remove", "local")]
        got = [json.loads(live.next()) for _ in want]
        assert [(e["Actor"]["Attributes"]["name"], e["Action"], e["scope"]) for e in got] == want
    finally:
        live.stop()
    evs = events(lab, "h2", "--since", str(t0), "--until", str(time.time() + 0.5), "-f", "type=network")
    assert [(e["Actor"]["Attributes"]["name"], e["Action"], e["scope"]) for e in evs] == want
    assert [e["timeNano"] for e in evs] == sorted(e["timeNano"] for e in evs)
    # Another host's local networks are its own.
    assert [e["Actor"]["Attributes"]["name"] for e in events(lab, "h3", "--since", str(t0), "--until", "0s",
                                                            "-f", "type=network")] == ["ovmix", "ovmix"]


def test_event_refusals_are_one_line(olab):
    lab = olab
    for args, words in [(["--filter", "colour=red"], "invalid filter 'colour=red'"),
                        (["--since", "yesterday"], "invalid --since 'yesterday'"),
                        (["--format", "{{.Type}}"], "invalid --format"),
                        (["--filter", "type=container"], "invalid filter type='container': the types are "
                                                         "network, node, health")]:
        r = run_cli(lab, "h2", "events", "--until", "0s", *args, check=False)
        assert r.returncode != 0 and words in r.stderr and r.stdout == "", (args, r.stderr)
