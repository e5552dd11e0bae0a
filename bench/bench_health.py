"""Data-path health and anti-spoofing, measured in a 3-host lab (h1 leader; containers a on h2, b on h3, one overlay).

- detection: seconds from blocking UDP 4789 at h3 until h2's `network inspect` shows h3 unreachable, and from
  unblocking until healthy again (the probes run every second; unreachable after 3 lost in a row);
- withdrawal: seconds from both signals (h3 Down and unreachable, as `node ls` shows them) until h3's VTEP is
  gone from h2's sandbox FDB, after killing h3's daemon and downing its underlay link (once, at the end);
- anti-spoofing cost: one TCP stream a -> b over the overlay (iperf3, 3 s) with the per-port checks, and with a
  bypass rule inserted first in the hook chain of both sandboxes, interleaved; medians and the ratio.

Usage: bench/bench_health.py [--rounds N]   (default 3; keep it short on a shared machine)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _lab import Bench, in_host, median  # noqa: E402


def cli(lab, host, *args, check=True):
    argv, env = lab.exec_argv(host, ["netweft", *args])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise RuntimeError(f"netweft {' '.join(args)} on {host}: {r.stderr.strip()}")
    return r


def peer_state(lab, host, peer) -> str:
    view = lab.client(host).call("GET", "/networks/ov")
    return next(((p.get("Health") or {}).get("State", "") for p in view["Peers"] if p["Name"] == peer), "")


def until(fn, timeout=60.0, step=0.05) -> float:
    t0 = time.monotonic()
    while not fn():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("timed out")
        time.sleep(step)
    return time.monotonic() - t0


def nft(lab, host, script, check=True):
    return subprocess.run(in_host(lab, host, ["nft", *script.split(" ", 0)]), capture_output=True, text=True,
                          check=check)


def sandbox(lab, host, net_id):
    return str(lab.host_dir(host) / "run" / "sandboxes" / net_id[:12])


def iperf(lab, ip) -> float:
    argv, env = lab.exec_argv("h3", ["netweft", "exec", "b", "--", "iperf3", "-s", "-1"])
    srv = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = cli(lab, "h2", "exec", "a", "--", "iperf3", "-c", ip, "-t", "3", "-J").stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with Bench() as b:
        lab = b.lab(3)
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.0.0/24", "ov")
        cli(lab, "h2", "run", "-d", "--name", "a", "--network", "ov", "--ip", "198.18.0.12", "--", "sleep", "9999")
        cli(lab, "h3", "run", "-d", "--name", "b", "--network", "ov", "--ip", "198.18.0.13", "--", "sleep", "9999")
        net_id = json.loads(cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["Id"]
        until(lambda: peer_state(lab, "h2", "h3") == "healthy")

        bad, good = [], []
        for _ in range(args.rounds):
            nft(lab, "h3", "add table inet nwtbench; add chain inet nwtbench in "
                           "{ type filter hook input priority -10; }; add rule inet nwtbench in udp dport 4789 drop")
            bad.append(until(lambda: peer_state(lab, "h2", "h3") == "unreachable"))
            nft(lab, "h3", "delete table inet nwtbench")
            good.append(until(lambda: peer_state(lab, "h2", "h3") == "healthy"))
            time.sleep(1)
        print(f"detection: unreachable after blocking UDP 4789: median {median(bad):.1f} s "
              f"({', '.join(f'{x:.1f}' for x in bad)}); healthy after unblocking: median {median(good):.1f} s")

        with_checks, bypassed = [], []
        sbs = {h: sandbox(lab, h, net_id) for h in ("h2", "h3")}
        for _ in range(args.rounds):
            with_checks.append(iperf(lab, "198.18.0.13"))
            for h, sb in sbs.items():
                subprocess.run(["nsenter", f"--net={sb}", "nft", "insert rule bridge netweft_as prerouting accept"],
                               check=True)
            bypassed.append(iperf(lab, "198.18.0.13"))
            for h, sb in sbs.items():
                out = subprocess.run(["nsenter", f"--net={sb}", "nft", "-a", "list", "chain", "bridge", "netweft_as",
                                      "prerouting"], capture_output=True, text=True, check=True).stdout
                handle = next(l.split("# handle ")[1] for l in out.splitlines() if l.strip().startswith("accept"))
                subprocess.run(["nsenter", f"--net={sb}", "nft", "delete rule bridge netweft_as prerouting handle",
                                handle.strip()], check=True)
        m1, m2 = median(with_checks), median(bypassed)
        print(f"overlay TCP a->b with anti-spoofing: median {m1:.2f} Gbit/s "
              f"({', '.join(f'{x:.2f}' for x in with_checks)}); bypassed: median {m2:.2f} Gbit/s ({', '.join(f'{x:.2f}' for x in bypassed)}); ratio {m1 / m2:.2f}")

        h3 = lab.address("h3")
        os.kill(int((lab.host_dir("h3") / "netweftd.pid").read_text()), signal.SIGKILL)
        subprocess.run(["ip", "-n", lab.ns("sw"), "link", "set", "h3", "down"], check=True)
        t_kill = time.monotonic()

        def both():
            nodes = {n["Description"]["Hostname"]: n for n in lab.client("h1").call("GET", "/nodes")}
            n = nodes["h3"]
            return n["Status"]["State"] == "down" and n["DataPath"]["State"] == "unreachable"
        until(both, step=0.1)
        t_both = time.monotonic()

        def gone():
            out = subprocess.run(["nsenter", f"--net={sbs['h2']}", "bridge", "-j", "fdb", "show", "dev", "vxlan0"],
                                 capture_output=True, text=True).stdout
            return all(e.get("dst") != h3 for e in json.loads(out or "[]"))
        until(gone, step=0.02)
        print(f"withdrawal: both signals {t_both - t_kill:.1f} s after the kill (heartbeat 500 ms); "
              f"h3 gone from h2's peer table {time.monotonic() - t_both:.2f} s after both")


if __name__ == "__main__":
    main()
