"""Issue 13 item 5: the read-only dashboard, opened in headless Chromium against a lab, updating live."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lab_fixture import run_cli
from observe_lab import DASHBOARD, http_get, node_ids, olab, set_health  # noqa: F401

DRIVER = Path(__file__).with_name("cdp_driver.py")
URL = f"http://{DASHBOARD}/"


class Browser:
    """cdp_driver.py (and its Chromium) inside a lab host's namespace."""

    def __init__(self, lab, host: str, url: str, profile: str):
        argv, env = lab.exec_argv(host, [sys.executable, str(DRIVER), url, profile])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True)
        first = self.proc.stdout.readline()
        if not first:
            raise AssertionError(f"the browser driver did not start: {self.proc.stderr.read()[-2000:]}")
        assert json.loads(first) == {"ready": True}

    def send(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the browser driver died: {self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def until(self, js: str, what: str, timeout: float = 20):
        out = self.send(until=js, timeout=timeout)
        assert "value" in out, f"the page never showed {what} (last: {out.get('last')!r})"
        return out["value"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def cell(frm: str, to: str) -> str:
    return f"document.querySelector('#health td[data-from=\"{frm}\"][data-to=\"{to}\"] span')"


def test_the_dashboard_shows_the_cluster_and_updates_live_in_chromium(olab):
    lab = olab
    ids = node_ids(lab)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.40.0/24", "web")
    run_cli(lab, "h2", "run", "-d", "--name", "w2", "--network", "web", "--", "sleep", "600")
    run_cli(lab, "h3", "run", "-d", "--name", "w3", "--network", "web", "--", "sleep", "600")
    ok = {"state": "healthy", "loss": 0.0, "rtt_ms": 0.31, "mtu_ok": True}
    set_health(lab, ids["h1"], {ids["h2"]: {**ok, "rtt_ms": 0.27}, ids["h3"]: {**ok, "rtt_ms": 0.35}})
    set_health(lab, ids["h2"], {ids["h3"]: ok, ids["h1"]: {**ok, "rtt_ms": 0.29}})
    set_health(lab, ids["h3"], {ids["h2"]: {"state": "unreachable", "loss": 1.0, "mtu_ok": False,
                                            "reason": "no reply from h2 on UDP 4789"}})
    profile = tempfile.mkdtemp(prefix="nwt-chromium-")
    browser = Browser(lab, "h1", URL, profile)
    try:
        rows = browser.until("document.querySelectorAll('#nodes tbody tr').length === 3 && "
                             "[...document.querySelectorAll('#nodes tbody tr')].map(r => r.innerText)",
                             "three hosts")
        assert [r.split("\t")[:3] for r in rows] == [["h1", "manager (leader)", "ready"], ["h2", "worker", "ready"],
                                                     ["h3", "worker", "ready"]]
        assert browser.until("document.getElementById('status').textContent === 'live'", "a live stream")
        net = browser.until("(r => r && r.innerText)(document.querySelector('#networks tr[data-network=\"web\"]'))",
                            "the network web")
        assert net.split("\t")[:5] == ["web", "198.18.40.0/24", "198.18.40.1", net.split("\t")[3], "2"]
        eps = browser.until("document.querySelectorAll('#endpoints tbody tr').length === 2 && "
                            "[...document.querySelectorAll('#endpoints tbody tr')].map(r => r.innerText)",
                            "two endpoints")
        assert sorted(e.split("\t")[0] + "@" + e.split("\t")[2] for e in eps) == ["w2@h2", "w3@h3"]
        # The health matrix: row = prober, column = peer; never-probed pairs say so.
        assert browser.until(f"{cell('h3', 'h2')}.className", "h3->h2") == "cell unreachable"
        assert browser.until(f"{cell('h3', 'h2')}.textContent", "h3->h2") == "unreachable 100%"
        assert "no reply from h2 on UDP 4789" in browser.send(eval=f"{cell('h3', 'h2')}.title")["value"]
        assert browser.send(eval=f"{cell('h2', 'h3')}.textContent")["value"] == "healthy 0% 0.31 ms"
        assert browser.send(eval=f"{cell('h3', 'h1')}.textContent")["value"] == "not probed"
        assert browser.send(eval=f"{cell('h2', 'h2')}.className")["value"] == "cell self"
        rev = browser.send(eval="document.getElementById('rev').textContent")["value"]

        # Live: the page changes without a reload.
        browser.send(eval="window.__same_page = true")
        run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.41.0/24", "db")
        run_cli(lab, "h2", "run", "-d", "--name", "d2", "--network", "db", "--", "sleep", "600")
        set_health(lab, ids["h3"], {ids["h2"]: {"state": "degraded", "loss": 0.2, "rtt_ms": 12.5, "mtu_ok": True,
                                                "reason": "a fifth of the probes to h2 were lost"}})
        browser.until("!!document.querySelector('#networks tr[data-network=\"db\"]')", "the new network db")
        browser.until("!!document.querySelector('#endpoints tr[data-endpoint=\"d2\"]')", "the new endpoint d2")
        assert browser.until(f"{cell('h3', 'h2')}.className === 'cell degraded' && {cell('h3', 'h2')}.textContent",
                             "h3->h2 degraded") == "degraded 20% 12.5 ms"
        shot = Path(profile) / "dashboard.png"
        assert browser.send(shot=str(shot))["bytes"] > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("NETWEFT_DASHBOARD_SCREENSHOT"):   # how docs/dashboard.png is made
            shutil.copy(shot, os.environ["NETWEFT_DASHBOARD_SCREENSHOT"])
        lab.stop_daemon("h3")
        browser.until("(r => r && r.innerText.includes('down'))(document.querySelector('#nodes tr[data-node=\"h3\"]'))",
                      "h3 down")
        assert browser.send(eval="window.__same_page === true")["value"] is True
        assert int(browser.send(eval="document.getElementById('rev').textContent")["value"]) > int(rev)
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        lab.start_daemon("h3", ["--metrics-addr", "127.0.0.1:9323", "--dashboard-addr", DASHBOARD])
        for host, ctr in (("h2", "w2"), ("h3", "w3"), ("h2", "d2")):
            run_cli(lab, host, "rm", "-f", ctr, check=False)
        for net in ("web", "db"):
            run_cli(lab, "h1", "network", "rm", net, check=False)
        for h in ("h1", "h2", "h3"):
            set_health(lab, ids[h], {})


_REQ = r"""
import json, sys, urllib.request, urllib.error
method, url, host = sys.argv[1:4]
req = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        print(json.dumps({"status": r.status, "headers": dict(r.headers), "body": r.read(4096).decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "headers": dict(e.headers), "body": e.read().decode()}))
"""


def request(lab, host, method, path, host_header=""):
    argv, env = lab.exec_argv(host, [sys.executable, "-c", _REQ, method, f"http://{DASHBOARD}{path}", host_header])
    return json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True, timeout=60).stdout)


def test_the_dashboard_is_read_only_and_guarded(olab):
    lab = olab
    r = request(lab, "h1", "GET", "/")
    assert r["status"] == 200 and "default-src 'none'" in r["headers"]["Content-Security-Policy"]
    assert r["headers"]["X-Frame-Options"] == "DENY" and "Access-Control-Allow-Origin" not in r["headers"]
    assert request(lab, "h1", "POST", "/api/overview")["status"] == 405
    # A page of another site, its name rebound to this address, is refused by name.
    r = request(lab, "h1", "GET", "/api/overview", host_header="evil.example:9324")
    assert r["status"] == 421 and "by IP address or localhost" in r["body"]
    assert request(lab, "h1", "GET", "/api/overview", host_header="localhost:9324")["status"] == 200
    # A worker serves the page but no cluster: it says why in one line.
    r = request(lab, "h2", "GET", "/api/overview")
    assert r["status"] == 503 and json.loads(r["body"])["error"].startswith("this node is not a swarm manager")
    status, _, body = http_get(lab, "h1", f"http://{DASHBOARD}/api/overview")
    o = json.loads(body)
    assert status == 200 and [n["hostname"] for n in o["nodes"]] == ["h1", "h2", "h3"] and o["served_by"] == "h1"


def test_another_manager_serves_the_leaders_view(olab):
    """A promoted manager's dashboard and events come from the leader's state (forwarded over mutual TLS)."""
    lab = olab
    run_cli(lab, "h1", "node", "promote", "h2")
    try:
        from lab_fixture import wait_for
        o = wait_for(lambda: (r := http_get(lab, "h2", f"http://{DASHBOARD}/api/overview"))[0] == 200 and
                     json.loads(r[2]), timeout=30, what="h2's dashboard as a manager")
        assert o["served_by"] == "h2" and [n["role"] for n in o["nodes"]] == ["manager", "manager", "worker"]
        assert [n["hostname"] for n in o["nodes"] if n["leader"]] == ["h1"]
        evs = run_cli(lab, "h2", "events", "--since", "1h", "--until", "0s", "--format", "json",
                      "-f", "event=join").stdout.splitlines()
        assert sorted(json.loads(e)["Actor"]["Attributes"]["name"] for e in evs) == ["h1", "h2", "h3"]
    finally:
        run_cli(lab, "h1", "node", "demote", "h2", check=False)
