"""What netweftd checks when it starts, and what a container inherits from it."""
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def test_an_invalid_node_name_is_refused_in_one_line_before_anything_is_made(root):
    data, run = root / "data", root / "run"
    r = subprocess.run([str(BIN / "netweftd"), "-H", f"unix://{root}/s.sock", "--data-root", str(data),
                        "--exec-root", str(run), "--hostname", "bad_name"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("netweftd: this host's name 'bad_name' is not a valid cluster node name")
    assert "--hostname NAME" in last
    assert not data.exists() and not run.exists() and not (root / "s.sock").exists()


def test_a_container_does_not_inherit_the_daemons_umask(daemon):
    """The daemon keeps umask 077 for its secrets; files a container makes get Docker's 0644."""
    daemon.cli("run", "-d", "--name", "u", "--", "sh", "-c", "touch /tmp/nwt-umask-probe.$$; sleep 60")
    try:
        deadline = time.monotonic() + 10
        probes = []
        while not probes and time.monotonic() < deadline:
            probes = [p for p in os.listdir("/tmp") if p.startswith("nwt-umask-probe.")]
            time.sleep(0.05)
        assert probes, "the container did not start"
        assert all(os.stat(f"/tmp/{p}").st_mode & 0o777 == 0o644 for p in probes)
    finally:
        for p in os.listdir("/tmp"):
            if p.startswith("nwt-umask-probe."):
                os.unlink(f"/tmp/{p}")
        daemon.cli("rm", "-f", "u", check=False)
