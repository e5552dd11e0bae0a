"""Encrypted overlay networks (issue 10), on lab hosts with wireguard-go (this kernel has no WireGuard).

What goes on the wire is read with tcpdump on the underlay switch's port of a host: an encrypted network's
traffic is WireGuard (UDP 51820) only, with no VXLAN of its VNI and not one byte of what the containers
said; the same exchange on an unencrypted network shows it (so the capture can see it when it is there).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import struct
import subprocess
import time
from contextlib import contextmanager

import pytest

from lab_fixture import LogWatch, new_lab_name, run_cli, wait_for
from netweft.dataplane.tunnel import uapi_exchange
from netweft.dataplane.wgconf import PeerStatus, parse_get
from netweft.errors import KernelError
from netweft.lab.lab import Lab

SEC, CLR = "198.18.10.0/24", "198.18.11.0/24"
WG_PORT = 51820
VXLAN_PORT = 4789

SERVER = r"""
import http.server, sys
marker = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = marker + b" answers " + self.path.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

CLIENT = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}:8080/{sys.argv[2]}", timeout=10).read().decode())
"""


def cli(lab, host, *args, check=True, timeout=60):
    return run_cli(lab, host, *args, check=check, timeout=timeout)


def ns_run(lab: Lab, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={lab.ns_path(host)}", *argv], capture_output=True, text=True,
                          check=check, timeout=30)


def inspect(lab, host, net) -> dict:
    return json.loads(cli(lab, host, "network", "inspect", net).stdout)[0]


def vni(lab, net) -> int:
    return int(inspect(lab, "h1", net)["Options"]["com.docker.network.driver.overlay.vxlanid_list"])


def http(lab, host, ctr, server_ip, path) -> str:
    r = cli(lab, host, "exec", ctr, "--", "python3", "-c", CLIENT, server_ip, path, check=False)
    return r.stdout + r.stderr


def ping(lab, host, ctr, ip, count=1, check=False, *extra) -> subprocess.CompletedProcess:
    return cli(lab, host, "exec", ctr, "--", "ping", "-c", str(count), "-W", "1", *extra, ip, check=check)


# ---- the capture ------------------------------------------------------------------------------------

@contextmanager
def capture(lab: Lab, host: str, path: str):
    """tcpdump on the switch's port of `host` (every frame to and from it) into `path`, while the block runs."""
    proc = subprocess.Popen(["nsenter", f"--net={lab.ns_path('sw')}", "tcpdump", "-Z", "root", "--immediate-mode", "-i", host, "-U", "-n", "-s", "0",
                             "-w", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()   # "listening on ...": the capture runs
        assert b"listening" in line, line
        yield
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def frames(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) >= 24 and struct.unpack("<I", data[:4])[0] == 0xA1B2C3D4, "not a pcap file"
    out, pos = [], 24
    while pos + 16 <= len(data):
        incl = struct.unpack("<I", data[pos + 8:pos + 12])[0]
        out.append(data[pos + 16:pos + 16 + incl])
        pos += 16 + incl
    return out


def udp(frame: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of an Ethernet/IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
    return sport, dport, frame[22 + ihl:]


def wire_facts(path: str, vnis: list[int], marker: bytes) -> dict:
    """What a capture holds: frames, WireGuard datagrams, VXLAN per VNI, plaintext marker bytes."""
    fs = frames(path)
    facts = {"frames": len(fs), "wireguard": 0, "marker": sum(f.count(marker) for f in fs)}
    facts.update({v: 0 for v in vnis})
    for f in fs:
        u = udp(f)
        if u is None:
            continue
        if WG_PORT in u[:2]:
            facts["wireguard"] += 1
        if u[1] == VXLAN_PORT and len(u[2]) >= 8:
            v = int.from_bytes(u[2][4:7], "big")
            if v in facts:
                facts[v] += 1
    return facts


def tunnel_peers(lab: Lab, host: str) -> dict[str, PeerStatus]:
    """The WireGuard peers of a host's interfaces (one per key it holds), read from wireguard-go's control sockets."""
    prefix = inspect(lab, host, "sec")["Encryption"]["Interface"][:-1]
    peers = {}
    for name in os.listdir("/var/run/wireguard"):
        if not (name.startswith(prefix) and name.endswith(".sock")):
            continue
        try:
            peers.update(parse_get(uapi_exchange(f"/var/run/wireguard/{name}", "get=1\n\n", 0)).peers)
        except (OSError, KernelError):
            continue   # an old key's interface going away
    return peers


# ---- the lab --------------------------------------------------------------------------------------

def up(n: int, daemon_args: list[str] | None = None, **init_opts) -> Lab:
    lab = Lab(new_lab_name())
    try:
        lab.up(n, daemon_args=daemon_args, init_opts={"HeartbeatPeriod": "500ms", **init_opts},
               progress=lambda *a: None)
    except BaseException:
        lab.down(quiet=True)
        raise
    return lab


@pytest.fixture(scope="module")
def lab():
    """h1 and h2 with a container each on an encrypted and an unencrypted network (c1 runs an HTTP server);
    h3 in the swarm with nothing on them."""
    lab = up(3)
    try:
        marker = "NWT" + secrets.token_hex(8)
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "-o", "encrypted", "--subnet", SEC, "sec")
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", CLR, "clr")
        cli(lab, "h1", "run", "-d", "--name", "c1", "--network", "sec", "--ip", "198.18.10.11", "--",
            "python3", "-c", SERVER, marker)
        cli(lab, "h1", "network", "connect", "--ip", "198.18.11.11", "clr", "c1")
        cli(lab, "h2", "run", "-d", "--name", "c2", "--network", "sec", "--ip", "198.18.10.12", "--",
            "sleep", "3600")
        cli(lab, "h2", "network", "connect", "--ip", "198.18.11.12", "clr", "c2")
        lab.marker = marker
        wait_for(lambda: marker in http(lab, "h2", "c2", "198.18.10.11", "x"), 20, "HTTP over the encrypted network")
        yield lab
    finally:
        lab.down(quiet=True)


def test_encrypted_traffic_never_shows_on_the_wire_and_clear_traffic_does(lab, tmp_path):
    marker = lab.marker.encode()
    vs, vc = vni(lab, "sec"), vni(lab, "clr")
    # A container on both networks: each reaches the other over each, side by side.
    for ip in ("198.18.10.12", "198.18.11.12"):
        assert ping(lab, "h1", "c1", ip).returncode == 0, ip
    enc = tmp_path / "enc.pcap"
    with capture(lab, "h2", str(enc)):
        out = http(lab, "h2", "c2", "198.18.10.11", lab.marker + "-asked")
        assert f"{lab.marker} answers /{lab.marker}-asked" in out, out
    facts = wire_facts(str(enc), [vs, vc], marker)
    assert facts["marker"] == 0 and facts[vs] == 0 and facts["wireguard"] > 0, facts
    clear = tmp_path / "clear.pcap"
    with capture(lab, "h2", str(clear)):
        out = http(lab, "h2", "c2", "198.18.11.11", lab.marker + "-asked")
        assert f"{lab.marker} answers /{lab.marker}-asked" in out, out
    facts = wire_facts(str(clear), [vs, vc], marker)
    assert facts["marker"] >= 2 and facts[vc] > 0 and facts[vs] == 0, facts


def test_full_overlay_mtu_crosses_with_df_on_the_encrypted_network(lab):
    links = json.loads(cli(lab, "h1", "exec", "c1", "--", "ip", "-j", "-4", "addr").stdout)
    mtu_of = {a["local"]: link["mtu"] for link in links for a in link.get("addr_info", [])}
    mtus = {"sec": mtu_of["198.18.10.11"], "clr": mtu_of["198.18.11.11"]}
    assert mtus == {"sec": 1500 - 50 - 60, "clr": 1500 - 50}, mtus
    for net, ip in (("sec", "198.18.10.12"), ("clr", "198.18.11.12")):
        r = ping(lab, "h1", "c1", ip, 1, False, "-M", "do", "-s", str(mtus[net] - 28))
        assert r.returncode == 0, f"{net}: DF ping of MTU {mtus[net]} failed: {r.stdout}{r.stderr}"
    r = ping(lab, "h1", "c1", "198.18.10.12", 1, False, "-M", "do", "-s", str(mtus["sec"] - 27))
    assert r.returncode != 0 and f"mtu={mtus['sec']}" in r.stderr, r.stdout + r.stderr


def test_blocked_wireguard_port_drops_encrypted_traffic_and_says_why(lab, tmp_path):
    logs = LogWatch(lab, "h1")
    block = ["nft", "-f", "-"]
    rules = ("table inet nwtblock {\n chain in { type filter hook input priority -50; udp dport 51820 drop\n }\n"
             " chain out { type filter hook output priority -50; udp dport 51820 drop\n }\n}\n")
    subprocess.run(["nsenter", f"--net={lab.ns_path('h2')}", *block], input=rules, text=True, check=True)
    try:
        pcap = tmp_path / "blocked.pcap"
        with capture(lab, "h2", str(pcap)):
            assert ping(lab, "h1", "c1", "198.18.10.12", 3).returncode != 0   # encrypted: no way through
            assert ping(lab, "h1", "c1", "198.18.11.12").returncode == 0      # the clear network is unaffected

            def down():
                peers = inspect(lab, "h1", "sec")["Encryption"]["Peers"]
                return next((p for p in peers if p["Name"] == "h2" and p["Tunnel"] == "down"), None)
            peer = wait_for(down, 30, "inspect on h1 to show the tunnel to h2 down")
            out = http(lab, "h2", "c2", "198.18.10.11", lab.marker)
            assert lab.marker not in out
        assert f"UDP {WG_PORT}" in peer["Reason"] and "never sent in clear" in peer["Reason"], peer
        line = logs.wait(lambda r: r.get("msg") == "encrypted overlay traffic to a host is dropped"
                         and r.get("peer") == "h2", 10, "the log line")
        assert f"UDP {WG_PORT}" in line["reason"]
        facts = wire_facts(str(pcap), [vni(lab, "sec")], lab.marker.encode())
        assert facts["marker"] == 0 and facts[vni(lab, "sec")] == 0, facts
        # ICMP of the encrypted network never shows in clear either: nothing carries 198.18.10.x outside WireGuard.
        assert not any(f[12:14] == b"\x08\x00" and f[26:29] == bytes([198, 18, 10]) for f in frames(str(pcap)))
    finally:
        ns_run(lab, "h2", "nft", "delete", "table", "inet", "nwtblock", check=False)
    wait_for(lambda: ping(lab, "h1", "c1", "198.18.10.12").returncode == 0, 30, "the tunnel to come back")
    wait_for(lambda: all(p["Tunnel"] == "up" for p in inspect(lab, "h1", "sec")["Encryption"]["Peers"]), 15,
             "inspect to show it up")


def test_misrouted_encrypted_vxlan_is_dropped_by_the_firewall(lab, tmp_path):
    """Whatever routes it there, VXLAN of an encrypted network never leaves through the underlay: a host route
    sending h2's tunnel address out of eth0 meets the nftables rule."""
    h2_addr = next(p["TunnelAddr"] for p in inspect(lab, "h1", "sec")["Encryption"]["Peers"] if p["Name"] == "h2")
    ns_run(lab, "h1", "ip", "route", "add", f"{h2_addr}/32", "via", lab.address("h2"), "dev", "eth0")
    try:
        pcap = tmp_path / "misrouted.pcap"
        with capture(lab, "h1", str(pcap)):
            assert ping(lab, "h1", "c1", "198.18.10.12", 3).returncode != 0
        facts = wire_facts(str(pcap), [vni(lab, "sec")], lab.marker.encode())
        assert facts[vni(lab, "sec")] == 0, facts
        table = json.loads(ns_run(lab, "h1", "nft", "-j", "list", "table", "inet", "netweft-wg").stdout)
        drops = [e["counter"]["packets"] for item in table["nftables"] if "rule" in item
                 and item["rule"]["chain"] == "output" for e in item["rule"]["expr"] if "counter" in e]
        assert drops and drops[0] > 0, table
    finally:
        ns_run(lab, "h1", "ip", "route", "del", f"{h2_addr}/32", check=False)
    wait_for(lambda: ping(lab, "h1", "c1", "198.18.10.12").returncode == 0, 15, "traffic after the route is gone")


def test_dead_wireguard_go_is_restarted(lab):
    logs = LogWatch(lab, "h2")
    ifname = inspect(lab, "h2", "sec")["Encryption"]["Interface"]
    pidfile = lab.host_dir("h2") / "run" / "wireguard" / f"{ifname}.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    logs.wait(lambda r: "started again" in r.get("msg", ""), 15, "wireguard-go restarted")
    assert int(pidfile.read_text()) != pid
    wait_for(lambda: ping(lab, "h2", "c2", "198.18.10.11").returncode == 0, 15, "traffic through the new one")


def test_private_keys_stay_on_their_host(lab):
    """Each host's private keys are in its root-only store and nowhere else: not in the managers' store, not in
    anything another host holds."""
    import sqlite3
    privates = {}
    for host in ("h1", "h2"):
        db = lab.host_dir(host) / "data" / "netweft.db"
        assert db.stat().st_mode & 0o077 == 0, oct(db.stat().st_mode)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            doc = json.loads(c.execute("SELECT doc FROM settings WHERE id = ?", ("wireguard-keys",)).fetchone()[0])
        privates[host] = [k["private"] for k in json.loads(doc["ring"])["keys"].values()]
    assert all(privates.values())
    # h1 is the manager: its cluster store is in its swarm directory.
    elsewhere = {"h1": [lab.host_dir("h2") / "data", lab.host_dir("h1") / "data" / "swarm"],
                 "h2": [lab.host_dir("h1") / "data", lab.host_dir("h3") / "data"]}
    for host, keys_ in privates.items():
        for d in elsewhere[host]:
            for f in [*d.rglob("*"), d.parent / "netweftd.log"]:
                if f.is_file():
                    data = f.read_bytes()
                    for k in keys_:
                        assert k.encode() not in data and bytes.fromhex(base64_hex(k)) not in data, (host, f)


def base64_hex(b64: str) -> str:
    import base64
    return base64.b64decode(b64).hex()


def test_refusals_change_nothing(lab):
    before = cli(lab, "h1", "network", "ls", "--format", "json").stdout
    cases = [
        (["network", "create", "-d", "overlay", "-o", "encrypted=no", "x"], "invalid -o encrypted='no'", "h1"),
        (["network", "create", "-d", "overlay", "--subnet", "198.19.244.0/22", "x"], "tunnel addresses (reserved)",
         "h1"),
        (["network", "create", "--subnet", "198.19.240.0/24", "x"], "tunnel addresses (reserved)", "h3"),
    ]
    for argv, words, host in cases:
        r = cli(lab, host, *argv, check=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (argv, r.stderr)
    assert cli(lab, "h1", "network", "ls", "--format", "json").stdout == before
    # A host without WireGuard: it says so in `info`, refuses -o encrypted and attaching to an encrypted network.
    lab.stop_daemon("h3")
    lab.start_daemon("h3", ["--wireguard-go", "/nonexistent/wireguard-go"])
    wg = json.loads(cli(lab, "h3", "info").stdout)["WireGuard"]
    assert wg["Implementation"] == "none" and "apt-get install wireguard-go" in wg["Problem"], wg
    for argv in (["network", "create", "-d", "overlay", "-o", "encrypted", "y"],
                 ["run", "-d", "--name", "c3", "--network", "sec", "--", "sleep", "60"]):
        r = cli(lab, "h3", *argv, check=False)
        assert r.returncode != 0 and "apt-get install wireguard-go" in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert cli(lab, "h3", "ps", "-a", "-q").stdout.strip() == ""
    assert cli(lab, "h1", "network", "ls", "--format", "json").stdout == before
    assert not any(p["Name"] == "h3" for p in inspect(lab, "h1", "sec")["Encryption"]["Peers"])
    # `info` on a host with it names it.
    wg = json.loads(cli(lab, "h1", "info").stdout)["WireGuard"]
    assert wg["Implementation"] == "wireguard-go" and wg["Path"] and wg["Version"].startswith("v"), wg


def test_rotation_under_ping_loses_nothing_and_a_removed_host_is_cut_off():
    lab = up(3, ["--wireguard-key-rotation", "4s"], WireguardPort=51830)
    try:
        cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "-o", "encrypted", "--subnet", SEC, "sec")
        for i in (1, 2, 3):
            cli(lab, f"h{i}", "run", "-d", "--name", f"c{i}", "--network", "sec", "--ip", f"198.18.10.1{i}", "--",
                "sleep", "3600")
        wait_for(lambda: ping(lab, "h1", "c1", "198.18.10.12").returncode == 0, 20, "h1 to reach h2")
        keys_before = set(tunnel_peers(lab, "h2"))
        # 20 echoes a second for 15 s, across several rotations of every host's key.
        r = cli(lab, "h1", "exec", "c1", "--", "ping", "-i", "0.05", "-c", "300", "-W", "2", "198.18.10.12",
                timeout=90)
        summary = next(line for line in r.stdout.splitlines() if "packets transmitted" in line)
        assert " 0% packet loss" in summary and "300 received" in summary, summary
        keys_after = set(tunnel_peers(lab, "h2"))
        assert keys_after - keys_before, "no key was rotated during the ping"
        # swarm init --wireguard-port 51830: every host listens there (and on 51831 while rotating).
        ports = {p.endpoint.rsplit(":", 1)[1] for p in tunnel_peers(lab, "h2").values()}
        assert ports and ports <= {"51830", "51831"}, ports
        # h3 is removed: its keys are gone from every host at once, and nothing of theirs reaches it any more.
        h3_keys = {k for k, p in tunnel_peers(lab, "h1").items() if (p.endpoint or "").startswith(lab.address("h3"))}
        assert h3_keys
        node_id = json.loads(cli(lab, "h3", "info").stdout)["Swarm"]["NodeID"]
        cli(lab, "h1", "node", "rm", "--force", node_id)
        for host in ("h1", "h2"):
            wait_for(lambda: not (set(tunnel_peers(lab, host)) & h3_keys), 10, f"h3's keys gone from {host}")
            wait_for(lambda: not any((p.endpoint or "").startswith(lab.address("h3"))
                                     for p in tunnel_peers(lab, host).values()), 10, f"no peer at h3 on {host}")
        assert ping(lab, "h3", "c3", "198.18.10.11", 2).returncode != 0
        assert ping(lab, "h1", "c1", "198.18.10.12").returncode == 0
        # The last encrypted endpoint of a host goes: its wireguard-go processes and rules go with it.
        prefix = inspect(lab, "h1", "sec")["Encryption"]["Interface"][:-1]
        cli(lab, "h1", "rm", "-f", "c1")
        wait_for(lambda: not any(n.startswith(prefix) for n in os.listdir("/var/run/wireguard")), 15,
                 "h1's WireGuard interfaces removed")
        # (the rules go right after the interfaces)
        wait_for(lambda: ns_run(lab, "h1", "nft", "list", "table", "inet", "netweft-wg", check=False).returncode != 0,
                 10, "h1's tunnel rules removed")
        assert not [link for link in json.loads(ns_run(lab, "h1", "ip", "-j", "link").stdout)
                    if link["ifname"].startswith(prefix)]
    finally:
        lab.down(quiet=True)
