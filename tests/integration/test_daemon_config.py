"""Issue 13 item 9 on a real daemon: --config FILE drives it, `netweft version` names both sides."""
import json
import subprocess
import sys

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
        # Events come from a cluster: outside one, one line says so.
        e = d.cli("events", "--until", "0s", check=False)
        assert e.returncode == 1 and e.stderr.strip().splitlines() == [
            "Error: this node is not part of a swarm: events come from the cluster's store; run `netweft swarm "
            "init` or `netweft swarm join` first"]
    finally:
        d.stop()
