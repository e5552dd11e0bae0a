"""What a container beyond the first bridge pays per packet (dataplane/bridgechain.py), beside one on it.

Two simulated hosts on a veth underlay, each with the overlay data plane (dataplane/overlay.py, the real
code) and one overlay sandbox; host a also has the gateway bridge and an "outside" namespace behind its
uplink (reached only through masquerade). On host a: container `near` on the first bridges (br0, the
gateway bridge), container `far` on their first extensions (one veth and one bridge more each way); on
host b: container `remote`. The first bridge is made to hold one container so that the second lands on an
extension: its path is the one containers 1,001 and up take.

Per round, interleaved: ping RTT (200 echoes 5 ms apart, the average) and single-stream iperf3 from near and
from far, to remote over the overlay and to the outside through the gateway bridge. Prints the medians
over rounds and far/near.

Everything lives in nwt-bc<hex>-* namespaces and /tmp/nwt-bc<hex>, removed at the end (also on failure).

    sudo .venv/bin/python bench/bench_bridge_chain.py [--rounds 3] [--seconds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import median  # noqa: E402

from netweft.dataplane import bridgechain, netns  # noqa: E402
from netweft.dataplane.overlay import Overlay, Peer  # noqa: E402
from netweft.lab.cleanup import clean  # noqa: E402

VNI, PORT, GW = 4545, 4789, "nw_gwbridge"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def in_ns(path: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--net={path}", *argv, check=check)


class Host:
    def __init__(self, prefix: str, role: str):
        self.name = f"{prefix}-{role}"
        self.path = f"/run/netns/{self.name}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.pool = ThreadPoolExecutor(1, initializer=netns.setns, initargs=(fd,))
            self.ov = self.pool.submit(Overlay).result()
        finally:
            os.close(fd)

    def __call__(self, method: str, *args):
        return self.pool.submit(getattr(self.ov, method), *args).result()

    def close(self) -> None:
        self.pool.submit(self.ov.close).result()
        self.pool.shutdown()


def link(a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
    sh("ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)
    for ns, ifname, cidr in ((a, a_if, a_ip), (b, b_if, b_ip)):
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")


def rtt_ms(src: str, dst: str) -> float:
    out = in_ns(src, "ping", "-q", "-c", "200", "-i", "0.005", dst).stdout
    return float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1))


def gbits(src: str, dst: str, seconds: int) -> float:
    for _ in range(20):
        r = in_ns(src, "iperf3", "-c", dst, "-t", str(seconds), "-O", "1", "-J", check=False)
        try:
            return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            time.sleep(0.3)   # the server is not listening yet, or still busy with the last client
    raise RuntimeError(f"iperf3 from {src} to {dst} failed: {r.stdout[-300:]} {r.stderr[-300:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3)
    args = p.parse_args()
    bridgechain.FIRST_PORTS = 1   # the second container goes to an extension
    prefix = f"nwt-bc{secrets.token_hex(3)}"
    root = f"/tmp/{prefix}"
    os.mkdir(root, 0o700)
    hosts: list[Host] = []
    servers: list[subprocess.Popen] = []
    try:
        a, b = Host(prefix, "a"), Host(prefix, "b")
        hosts += [a, b]
        sh("ip", "netns", "add", f"{prefix}-out")
        out = f"/run/netns/{prefix}-out"
        link(a.name, "ul0", "192.0.2.1/24", b.name, "ul0", "192.0.2.2/24")
        link(a.name, "up0", "203.0.113.1/24", f"{prefix}-out", "eth0", "203.0.113.2/24")
        ctr = {}
        for name in ("near", "far", "remote"):
            ctr[name] = os.path.join(root, name)
            netns.create_netns(ctr[name])
        sa, sb = os.path.join(root, "sb-a"), os.path.join(root, "sb-b")
        a("ensure_sandbox", sa, VNI, "198.18.0.1/24", 1450, "192.0.2.1", PORT)
        b("ensure_sandbox", sb, VNI, "198.18.0.1/24", 1450, "192.0.2.2", PORT)
        a("ensure_gwbridge", GW, "198.19.0.1/24", 1500)
        a("apply_overlay_firewall", GW, "198.19.0.0/24")
        peers = {"near": ("198.18.0.2", "02:42:c6:12:00:02"), "far": ("198.18.0.3", "02:42:c6:12:00:03"),
                 "remote": ("198.18.0.4", "02:42:c6:12:00:04")}
        for i, name in enumerate(("near", "far")):
            ip, mac = peers[name]
            a("ensure_endpoint", sa, ctr[name], f"nwv{name}", "eth0", f"{ip}/24", mac, 1450)
            a("ensure_gw_endpoint", ctr[name], GW, f"nwg{name}", "eth1", f"198.19.0.{2 + i}/24",
              f"02:42:c6:13:00:{2 + i:02x}", 1500, "198.19.0.1")
        b("ensure_endpoint", sb, ctr["remote"], "nwvremote", "eth0", f"{peers['remote'][0]}/24", peers["remote"][1],
          1450)
        a("add_peers", sa, [Peer(*peers["remote"], "192.0.2.2")])
        b("add_peers", sb, [Peer(*peers[n], "192.0.2.1") for n in ("near", "far")])
        masters = {n: json.loads(in_ns(path, "ip", "-j", "link", "show", dev).stdout)[0].get("master")
                   for n, path, dev in (("near", sa, "nwvnear"), ("far", sa, "nwvfar"),
                                        ("near gw", a.path, "nwgnear"), ("far gw", a.path, "nwgfar"))}
        print(f"bridges: {masters}")
        assert masters == {"near": "br0", "far": "br0-1", "near gw": GW, "far gw": f"{GW}-1"}, masters
        servers.append(subprocess.Popen(["nsenter", f"--net={ctr['remote']}", "iperf3", "-s"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers.append(subprocess.Popen(["nsenter", f"--net={out}", "iperf3", "-s"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for src in ("near", "far"):   # warm up ARP and conntrack
            in_ns(ctr[src], "ping", "-c", "2", "-W", "2", peers["remote"][0], check=False)
            in_ns(ctr[src], "ping", "-c", "2", "-W", "2", "203.0.113.2", check=False)
        results: dict[tuple[str, str, str], list[float]] = {}
        targets = {"overlay": peers["remote"][0], "egress": "203.0.113.2"}
        for r in range(args.rounds):
            for path, dst in targets.items():
                for src in ("near", "far") if r % 2 == 0 else ("far", "near"):
                    results.setdefault((path, src, "rtt"), []).append(rtt_ms(ctr[src], dst))
                    results.setdefault((path, src, "tcp"), []).append(gbits(ctr[src], dst, args.seconds))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        print(f"\n{'path':8} {'':10} {'near (first bridge)':>20} {'far (extension)':>16} {'far/near':>9}")
        for path in targets:
            for what, unit in (("rtt", "ms"), ("tcp", "Gbit/s")):
                near, far = median(results[(path, "near", what)]), median(results[(path, "far", what)])
                print(f"{path:8} {what + ' ' + unit:10} {near:20.3f} {far:16.3f} {far / near:9.3f}")
        print(f"(medians of {args.rounds} rounds; rtt: average of 200 pings 5 ms apart; tcp: iperf3 single stream "
              f"{args.seconds} s)")
    finally:
        for s in servers:
            s.kill()
            s.wait()
        for h in hosts:
            try:
                h.close()
            except Exception:
                pass
        clean([root], ns_prefixes=(f"{prefix}-",), quiet=True)


if __name__ == "__main__":
    main()
