"""Where the overlay's single-stream cost is: netweft's data path rebuilt by hand, with variants, side by side.

Two simulated hosts (namespaces on a switch bridge, as the lab's underlay), and on each, pairs of
containers across them over:
  bridge    netweft's path: container veth -> sandbox br0 -> vxlan0 (UDP socket in the host) and back
  tc-bpf    the same devices, plus tc programs that skip br0: on the sandbox end of the container's veth,
            bpf_redirect to vxlan0; on vxlan0's ingress, frames for that container's MAC go
            bpf_redirect_peer straight into the container (no bridge, no backlog hop)
  direct    the VXLAN device itself in the container (no veth, no bridge): the upper bound of removing hops
  underlay  host -> host
plus knobs tried on the bridge path (--variants): `gro` (GRO on both veth ends: veth NAPI) and `bigtcp`
(IPv4 BIG TCP: gso/gro_ipv4_max_size 192 KiB on the veths).

The tc programs are 4 and 15 instructions, hand-assembled (no compiler here) and loaded with bpf(2). They
bypass the bridge's nftables (netweft's anti-spoofing), so they are a measurement, not the product.

Measured here (Dec 2026, kernel 6.18, 8 rounds, ratio to underlay): bridge 0.747, tc-bpf 0.743, gro 0.751,
bigtcp 0.178 (vxlan0's tso_max_size is 64 KiB: bigger skbs are segmented in software there), direct 0.808.
The skbs stay ~54 KB GSO packets end to end on veths, so GRO has nothing to merge; removing every hop
(direct) gains 8 %; the rest is VXLAN encapsulation itself.

Everything is in nwt-bp<hex>-* namespaces, removed at the end (also on failure or Ctrl-C).

    sudo .venv/bin/python bench/bench_overlay_paths.py [--rounds N] [--seconds S] [--variants gro,bigtcp]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _lab import iperf, iperf_server as server, median  # noqa: E402

PORT = 5298
UL = "203.0.113"
CLONE_NEWNET = 0x40000000
SYS_BPF = 321                   # x86_64
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
HELPER_REDIRECT, HELPER_REDIRECT_PEER = 23, 155
IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE = 63, 64


def sh(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def in_ns(path: str, fn):
    """fn() run in a thread inside the namespace at `path` (setns affects the calling thread only)."""
    out: list = []

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            out.append(e)
        finally:
            os.close(fd)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


# ---- hand-assembled tc programs ----------------------------------------------------------------------

def _ins(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def prog_redirect(helper: int, ifindex: int, only_dst_mac: str | None = None) -> bytes:
    """return helper(ifindex, 0), for every frame or only for frames to `only_dst_mac` (else TC_ACT_OK)."""
    call = _ins(0xb7, 1, imm=ifindex) + _ins(0xb7, 2, imm=0) + _ins(0x85, imm=helper) + _ins(0x95)
    if only_dst_mac is None:
        return call
    mac = bytes.fromhex(only_dst_mac.replace(":", ""))
    (a,), (b,) = struct.unpack("<i", mac[:4]), struct.unpack("<H", mac[4:])
    return (_ins(0x61, 2, 1, 76) + _ins(0x61, 3, 1, 80)          # r2 = skb->data, r3 = skb->data_end
            + _ins(0xbf, 4, 2) + _ins(0x07, 4, imm=6)             # r4 = r2 + 6
            + _ins(0x2d, 4, 3, 8)                                 # if r4 > r3: pass
            + _ins(0x61, 5, 2, 0) + _ins(0x56, 5, off=6, imm=a)   # dst MAC bytes 0-3
            + _ins(0x69, 5, 2, 4) + _ins(0x56, 5, off=4, imm=b)   # dst MAC bytes 4-5
            + call + _ins(0xb7, 0, imm=0) + _ins(0x95))           # pass: TC_ACT_OK


def load_prog(code: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    lic = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("<IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"nwt_bench")
    buf = ctypes.create_string_buffer(attr.ljust(144, b"\0"), 144)
    fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, buf, 144)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_PROG_LOAD: {log.value.decode(errors='replace')[-300:]}")
    return fd


def attach_ingress(ns_path: str, dev: str, code: bytes) -> None:
    def run():
        from netweft.dataplane.pyroute2_parts import IPRoute
        fd = load_prog(code)
        ipr = IPRoute()
        try:
            idx = ipr.link_lookup(ifname=dev)[0]
            ipr.tc("add", "clsact", idx)
            ipr.tc("add-filter", "bpf", idx, ":1", fd=fd, name="nwt_bench", parent="ffff:fff2", classid=1,
                   direct_action=True)
        finally:
            ipr.close()
            os.close(fd)   # the filter holds the program
    in_ns(ns_path, run)


def ifindex(ns_path: str, dev: str) -> int:
    return in_ns(ns_path, lambda: socket.if_nametoindex(dev))


def set_big_tcp(ns_path: str, dev: str, size: int) -> None:
    """IFLA_GSO/GRO_IPV4_MAX_SIZE (pyroute2 0.9 has no names for them): a hand-packed RTM_NEWLINK."""
    def run():
        idx = socket.if_nametoindex(dev)
        body = struct.pack("=BxHiII", 0, 0, idx, 0, 0) + b"".join(
            struct.pack("=HHI", 8, t, size) for t in (IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE))
        msg = struct.pack("=IHHII", 16 + len(body), 16, 0x1 | 0x4, 1, 0) + body
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
            s.send(msg)
            err = struct.unpack("=i", s.recv(4096)[16:20])[0]
        if err:
            raise OSError(-err, f"set BIG TCP on {dev}")
    in_ns(ns_path, run)


def set_gro(ns_path: str, dev: str) -> None:
    def run():
        from pyroute2.ethtool.ethtool import Ethtool
        e = Ethtool()
        try:
            f = e.get_features(dev)
            f.features["rx-gro"].enable = True
            e.set_features(dev, f)
        finally:
            e.close()
    in_ns(ns_path, run)


def no_bridge_netfilter() -> None:
    for knob in ("iptables", "ip6tables", "arptables"):
        try:
            with open(f"/proc/sys/net/bridge/bridge-nf-call-{knob}", "w") as f:
                f.write("0")
        except FileNotFoundError:
            return  # no br_netfilter


# ---- topology ------------------------------------------------------------------------------------------

class Topo:
    def __init__(self) -> None:
        self.p = f"nwt-bp{secrets.token_hex(3)}"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.p}-{name}"

    def path(self, name: str) -> str:
        return f"/run/netns/{self.ns(name)}"

    def add_ns(self, name: str) -> None:
        self.made.append(name)
        sh("ip", "netns", "add", self.ns(name))
        sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")

    def down(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", self.ns(name)], capture_output=True)
        self.made.clear()

    def underlay(self) -> None:
        self.add_ns("sw")
        sw = self.ns("sw")
        sh("ip", "-n", sw, "link", "add", "ul", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "ul", "up")
        for i in (1, 2):
            h = f"h{i}"
            self.add_ns(h)
            sh("ip", "-n", sw, "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", self.ns(h))
            sh("ip", "-n", sw, "link", "set", h, "master", "ul", "up")
            sh("ip", "-n", self.ns(h), "addr", "add", f"{UL}.{i}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(h), "link", "set", "eth0", "up")

    def vxlan(self, i: int, vni: int, into: str, name: str, mac: str) -> None:
        """A VXLAN device made in host i (its socket stays there), moved into namespace `into`."""
        h = self.ns(f"h{i}")
        sh("ip", "-n", h, "link", "add", "vxtmp", "type", "vxlan", "id", str(vni), "dstport", "4789",
           "local", f"{UL}.{i}", "nolearning", "proxy")
        sh("ip", "-n", h, "link", "set", "vxtmp", "mtu", "1450", "address", mac, "netns", self.ns(into),
           "name", name)

    def bridged_pair(self, tag: str, vni: int, net: int) -> dict:
        """Sandboxes s<tag>1/2 (br0 + vxlan0) and containers c<tag>1/2 on veths: netweft's layout."""
        macs = {i: f"02:42:c6:12:{net:02x}:{10 + i:02x}" for i in (1, 2)}
        for i in (1, 2):
            s, c = f"s{tag}{i}", f"c{tag}{i}"
            self.add_ns(s)
            self.add_ns(c)
            sn, cn = self.ns(s), self.ns(c)
            in_ns(self.path(s), no_bridge_netfilter)  # as netweft's sandboxes
            sh("ip", "-n", sn, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", sn, "link", "set", "br0", "mtu", "1450")
            sh("ip", "-n", sn, "addr", "add", f"198.18.{net}.1/24", "dev", "br0")
            sh("ip", "-n", sn, "link", "set", "br0", "up")
            self.vxlan(i, vni, s, "vxlan0", f"02:42:c6:13:{net:02x}:{10 + i:02x}")
            sh("ip", "-n", sn, "link", "set", "vxlan0", "master", "br0", "up")
            sh("ip", "-n", sn, "link", "add", "ve", "type", "veth", "peer", "name", "eth0", "netns", cn)
            sh("ip", "-n", sn, "link", "set", "ve", "mtu", "1450", "master", "br0", "up")
            sh("ip", "-n", cn, "link", "set", "eth0", "mtu", "1450", "address", macs[i])
            sh("ip", "-n", cn, "addr", "add", f"198.18.{net}.1{i}/24", "dev", "eth0")
            sh("ip", "-n", cn, "link", "set", "eth0", "up")
        for i in (1, 2):
            j = 3 - i
            sn = self.ns(f"s{tag}{i}")
            sh("bridge", "-n", sn, "fdb", "add", macs[j], "dev", "vxlan0", "dst", f"{UL}.{j}", "self", "permanent")
            sh("ip", "-n", sn, "neigh", "add", f"198.18.{net}.1{j}", "lladdr", macs[j], "dev", "vxlan0",
               "nud", "permanent")
        return {"macs": macs, "client": self.path(f"c{tag}1"), "server": self.path(f"c{tag}2"),
                "ip": f"198.18.{net}.12"}

    def direct_pair(self, vni: int, net: int) -> dict:
        macs = {i: f"02:42:c6:12:{net:02x}:{10 + i:02x}" for i in (1, 2)}
        for i in (1, 2):
            c = f"cd{i}"
            self.add_ns(c)
            self.vxlan(i, vni, c, "eth0", macs[i])
            sh("ip", "-n", self.ns(c), "addr", "add", f"198.18.{net}.1{i}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(c), "link", "set", "eth0", "up")
        for i in (1, 2):
            j = 3 - i
            cn = self.ns(f"cd{i}")
            sh("bridge", "-n", cn, "fdb", "add", macs[j], "dev", "eth0", "dst", f"{UL}.{j}", "self", "permanent")
            sh("ip", "-n", cn, "neigh", "add", f"198.18.{net}.1{j}", "lladdr", macs[j], "dev", "eth0",
               "nud", "permanent")
        return {"client": self.path("cd1"), "server": self.path("cd2"), "ip": f"198.18.{net}.12"}

    def bypass(self, tag: str, pair: dict) -> None:
        """The tc programs of the tc-bpf variant on pair <tag>."""
        for i in (1, 2):
            sb = self.path(f"s{tag}{i}")
            attach_ingress(sb, "ve", prog_redirect(HELPER_REDIRECT, ifindex(sb, "vxlan0")))
            attach_ingress(sb, "vxlan0", prog_redirect(HELPER_REDIRECT_PEER, ifindex(sb, "ve"), pair["macs"][i]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--variants", default="", help="extra bridge-path variants: gro,bigtcp")
    ap.add_argument("--no-rt", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, bpf)")
    rt = not args.no_rt
    extra = [v for v in args.variants.split(",") if v]
    print(f"bench_overlay_paths rounds={args.rounds} seconds={args.seconds} rt={rt} variants={extra}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, kernel {os.uname().release}")
    t = Topo()
    procs: list[subprocess.Popen] = []
    old = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        t.underlay()
        cases = {"bridge": t.bridged_pair("a", 4201, 200)}
        bpf = t.bridged_pair("b", 4202, 201)
        t.bypass("b", bpf)
        cases["tc-bpf"] = bpf
        net = 202
        for v in extra:
            tag = {"gro": "g", "bigtcp": "t"}.get(v)
            if tag is None:
                raise SystemExit(f"unknown variant {v} (gro, bigtcp)")
            pair = t.bridged_pair(tag, 4200 + net, net)
            for i in (1, 2):
                for ns_path, dev in ((t.path(f"s{tag}{i}"), "ve"), (t.path(f"c{tag}{i}"), "eth0")):
                    if v == "gro":
                        set_gro(ns_path, dev)
                    else:
                        set_big_tcp(ns_path, dev, 196608)
            cases[v] = pair
            net += 1
        cases["direct"] = t.direct_pair(4200 + net, net)
        cases["underlay"] = {"client": t.path("h1"), "server": t.path("h2"), "ip": f"{UL}.2"}
        for c in cases.values():
            procs.append(subprocess.Popen(server(["nsenter", f"--net={c['server']}", "iperf3", "-s", "-p",
                                                  str(PORT)], rt), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        got: dict[str, list[float]] = {k: [] for k in cases}
        names = list(cases)
        print(f"\niperf3 TCP, 1 stream, {args.rounds} rounds x {args.seconds} s (+1 s omitted), order rotating")
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                c = cases[k]
                got[k].append(iperf(["nsenter", f"--net={c['client']}", "iperf3", "-p", str(PORT), "-c", c["ip"]],
                                    args.seconds, 1, rt))
            print(f"  round {r + 1}: " + "  ".join(f"{k} {got[k][-1]:5.2f}" for k in names), flush=True)
        m = {k: median(v) for k, v in got.items()}
        print("\nmedians, Gbit/s: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
        print("ratio to underlay: " + ", ".join(f"{k} {v / m['underlay']:.3f}" for k, v in m.items()))
        print("ratio to bridge:   " + ", ".join(f"{k} {v / m['bridge']:.3f}" for k, v in m.items()))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        t.down()
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    main()
