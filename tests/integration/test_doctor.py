"""`netweft doctor` in a 3-host lab (issue 13, item 1): all is well first (exit 0); then, asked on h2, it names
a blocked data-path port (UDP 4789 dropped at h3, which shares an overlay with h2), a lowered MTU on one underlay link (the switch's port to
h1) and a stopped manager (h1's daemon), each in its own line, and exits 1."""
from __future__ import annotations

import subprocess

from lab_fixture import run_cli


def doctor(lab) -> tuple[int, list[str]]:
    r = run_cli(lab, "h2", "doctor", check=False, timeout=90)
    assert r.stderr == "", r.stderr
    return r.returncode, r.stdout.splitlines()


def lines(out: list[str], *words: str) -> list[str]:
    return [l for l in out if all(w in l for w in words)]


def test_doctor_names_a_blocked_port_a_lowered_mtu_and_a_stopped_manager(lab3):
    lab = lab3
    # A host hears of the hosts it shares a network with (and the managers): h2 and h3 share one.
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    for h in ("h2", "h3"):
        run_cli(lab, h, "run", "-d", "--name", f"c{h}", "--network", "ov", "--", "sleep", "1000")
    rc, out = doctor(lab)
    assert rc == 0 and out[-1] == "all is well", "\n".join(out)
    assert not [l for l in out[:-1] if not l.startswith("ok ")], "\n".join(out)
    assert lines(out, "kernel: VXLAN: available") and lines(out, "WireGuard:")
    assert lines(out, "clock: within") and lines(out, "certificate: this node's certificate is valid until")

    subprocess.run(["nsenter", f"--net={lab.ns_path('h3')}", "nft",
                    "add table inet nwtblock; add chain inet nwtblock in { type filter hook input priority -10; }; "
                    "add rule inet nwtblock in udp dport 4789 drop"], check=True)
    subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", "h1", "mtu", "1400"], check=True)
    rc, out = doctor(lab)
    text = "\n".join(out)
    assert rc == 1, text
    blocked = lines(out, "FAIL", "UDP 4789", "h3 (192.0.2.13)")
    assert len(blocked) == 1 and "open UDP 4789" in blocked[0], text
    mtu = lines(out, "FAIL", "path MTU", "h1 (192.0.2.11)")
    assert len(mtu) == 1 and "is 1400" in mtu[0] and "mtu=1350" in mtu[0], text
    assert lines(out, "ok ", "TCP 2377 to manager h1") and lines(out, "ok ", "UDP 4789", "h1 (192.0.2.11)"), text
    assert len([l for l in out if l.startswith(("FAIL", "WARN"))]) == 2, text

    lab.stop_daemon("h1")
    rc, out = doctor(lab)
    text = "\n".join(out)
    assert rc == 1, text
    manager = lines(out, "FAIL", "manager h1 (192.0.2.11:2377) is unreachable (connection refused)")
    assert len(manager) == 1 and "start its daemon" in manager[0], text
    # Its daemon answers probes too: the data-path line says the daemon is the likely cause.
    assert "daemon" in lines(out, "FAIL", "UDP 4789", "h1 (192.0.2.11)")[0], text
    assert len(lines(out, "FAIL", "UDP 4789", "h3 (192.0.2.13)")) == 1, text


def test_doctor_outside_a_swarm_and_a_leftover_bridge(daemon, host):
    r = daemon.cli("doctor", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok    swarm: this host is in no swarm" in r.stdout and r.stdout.splitlines()[-1] == "all is well"
    # A bridge an earlier daemon (another --data-root) left behind.
    host.ip("link", "add", "nw-deadbeef01", "type", "bridge")
    r = daemon.cli("doctor", check=False)
    assert r.returncode == 1
    left = [l for l in r.stdout.splitlines() if "nw-deadbeef01" in l]
    assert len(left) == 1 and left[0].startswith("WARN  leftovers:") and "ip link del nw-deadbeef01" in left[0]
