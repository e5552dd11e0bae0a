"""Issue 13 item 9 on a real daemon: --config FILE drives it, `netweft version` names both sides."""
import json
import sys
import time

from conftest import Daemon

_GET = r"""
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
    print(r.status); print(r.read().decode())
"""


def test_a_daemon_started_from_a_config_file(host, root):
    conf = root / "netweftd.toml"
    conf.write_text('log-level = "debug"\nmetrics-addr = "127.0.0.1:9333"\n'
                    'default-address-pool = ["base=198.19.0.0/16,size=24"]\n')
    d = Daemon(host, root, extra=["--config", str(conf)])
    try:
        r = host.run(sys.executable, "-c", _GET, "http://127.0.0.1:9333/metrics")
        assert r.returncode == 0 and r.stdout.startswith("200\n") and "netweft_api_requests_total" in r.stdout
        assert '"level": "debug"' in (root / "netweftd.log").read_text()
        v = d.cli("version", "--format", "json")
        out = json.loads(v.stdout)
        assert out["Client"]["Version"] == out["Server"]["Version"]
        text = d.cli("version").stdout
        assert "Client:\n Version:" in text and "Server: netweftd\n Version:" in text
        # Outside a swarm, events are this host's local networks' (kept since the daemon started).
        t0 = time.time() - 1
        d.cli("network", "create", "--subnet", "198.19.77.0/24", "lbr")
        d.cli("run", "-d", "--name", "l1", "--network", "lbr", "--", "sleep", "600")
        d.cli("rm", "-f", "l1")
        d.cli("network", "rm", "lbr")
        e = d.cli("events", "--since", str(t0), "--until", str(time.time() + 0.5), "--format", "json")
        evs = [json.loads(line) for line in e.stdout.splitlines()]
        assert [(x["Type"], x["Action"], x["scope"]) for x in evs] == [
            ("network", a, "local") for a in ("create", "connect", "disconnect", "remove")]
        assert evs[1]["Actor"]["Attributes"]["container_name"] == "l1" and evs[1]["Actor"]["Attributes"]["name"] == "lbr"
        e = d.cli("events", "--since", str(t0), "--until", "0s", "-f", "event=disconnect")
        assert len(e.stdout.splitlines()) == 1 and " network disconnect " in e.stdout
    finally:
        d.stop()
