"""Anti-spoofing (issue 13, item 6) in a lab: a container sends on a network only from its own IP and MAC there.
A container that adds another address, or changes its MAC, reaches nobody with it, on an overlay (a container
on another host, one on the same host) and on a local bridge network; with its own addresses it still does.
What the receivers see is read with tcpdump inside them."""
from __future__ import annotations

import subprocess
import time

from lab_fixture import run_cli

SPOOF_IP, SPOOF_MAC = "198.18.0.99", "02:42:de:ad:be:ef"


def sniff(lab, host, ctr, bpf):
    """tcpdump inside a container, started now; stop() returns the packet lines it printed."""
    argv, env = lab.exec_argv(host, ["netweft", "exec", ctr, "--", "tcpdump", "-i", "eth0", "-n", "-e", "-l",
                                     "-U", bpf])
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)   # tcpdump is listening

    def stop():
        run_cli(lab, host, "exec", ctr, "--", "pkill", "-INT", "-x", "tcpdump", check=False)
        out, _ = p.communicate(timeout=20)
        return [l for l in out.splitlines() if l.strip()]
    return stop


def ex(lab, host, ctr, *cmd, check=True):
    return run_cli(lab, host, "exec", ctr, "--", *cmd, check=check)


def ping(lab, host, ctr, ip, *extra):
    return ex(lab, host, ctr, "ping", "-c2", "-i0.2", "-w2", *extra, ip, check=False).returncode == 0


def test_spoofed_addresses_and_macs_reach_nobody(lab3):
    lab = lab3
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
    run_cli(lab, "h2", "run", "-d", "--name", "a", "--network", "ov", "--ip", "198.18.0.12", "--", "sleep", "1000")
    run_cli(lab, "h2", "run", "-d", "--name", "b", "--network", "ov", "--ip", "198.18.0.22", "--", "sleep", "1000")
    run_cli(lab, "h3", "run", "-d", "--name", "c", "--network", "ov", "--ip", "198.18.0.13", "--", "sleep", "1000")
    # The sniffer sees what does arrive (so an empty capture below means nothing arrived).
    stop = sniff(lab, "h3", "c", "src host 198.18.0.12")
    assert ping(lab, "h2", "a", "198.18.0.13") and ping(lab, "h2", "a", "198.18.0.22")
    assert any("198.18.0.12 > 198.18.0.13" in line for line in stop())

    # Another address: nothing from it arrives, on the other host or next door.
    bpf = f"src host {SPOOF_IP} or ether src {SPOOF_MAC}"
    stops = [sniff(lab, "h3", "c", bpf), sniff(lab, "h2", "b", bpf)]
    ex(lab, "h2", "a", "ip", "addr", "add", f"{SPOOF_IP}/24", "dev", "eth0")
    ping(lab, "h2", "a", "198.18.0.13", "-I", SPOOF_IP)
    ping(lab, "h2", "a", "198.18.0.22", "-I", SPOOF_IP)
    ex(lab, "h2", "a", "arping", "-c1", "-w1", "-s", SPOOF_IP, "198.18.0.22", check=False)
    # Its own address still works.
    assert ping(lab, "h2", "a", "198.18.0.13") and ping(lab, "h2", "a", "198.18.0.22")
    # Another MAC: nothing it sends arrives.
    ex(lab, "h2", "a", "ip", "addr", "del", f"{SPOOF_IP}/24", "dev", "eth0")
    ex(lab, "h2", "a", "ip", "link", "set", "eth0", "address", SPOOF_MAC)
    assert not ping(lab, "h2", "a", "198.18.0.13") and not ping(lab, "h2", "a", "198.18.0.22")
    seen = [stop() for stop in stops]
    assert seen == [[], []], seen

    # A local bridge network: the same.
    run_cli(lab, "h1", "network", "create", "--subnet", "198.18.50.0/24", "lan")
    run_cli(lab, "h1", "run", "-d", "--name", "x", "--network", "lan", "--ip", "198.18.50.10", "--", "sleep", "1000")
    run_cli(lab, "h1", "run", "-d", "--name", "y", "--network", "lan", "--ip", "198.18.50.11", "--", "sleep", "1000")
    assert ping(lab, "h1", "x", "198.18.50.11")
    stop = sniff(lab, "h1", "y", "src host 198.18.50.99 or ether src " + SPOOF_MAC)
    ex(lab, "h1", "x", "ip", "addr", "add", "198.18.50.99/24", "dev", "eth0")
    ping(lab, "h1", "x", "198.18.50.11", "-I", "198.18.50.99")
    assert ping(lab, "h1", "x", "198.18.50.11")
    ex(lab, "h1", "x", "ip", "link", "set", "eth0", "address", SPOOF_MAC)
    ping(lab, "h1", "x", "198.18.50.11")
    assert stop() == []
