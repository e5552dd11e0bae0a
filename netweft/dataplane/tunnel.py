"""The real WireGuard tunnel of the encrypted overlays: one interface per host, in the host namespace.

Two implementations behind one class:
- the kernel module (where the kernel has it): a `wireguard` link configured over generic netlink with
  pyroute2's WireGuard. This code path is present but untested here: the machines this project is built
  on have no kernel WireGuard.
- wireguard-go (Debian's package), a process per interface, supervised here: started when the tunnel is
  ensured and missing, started again if it died, stopped with delete_tunnel, and configured through its
  control socket /var/run/wireguard/IFNAME.sock. That directory is shared by every namespace of the
  machine, so interface names derive from the node ID and are unique machine-wide.

Addresses, MTU, the route of the tunnel block and the link state are set over rtnetlink for both.
`Tunnel` is synchronous; the data plane calls it from its kernel thread (which is in the host namespace,
so the process it starts and its UDP socket live there too).
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import time

from netweft.dataplane.checks import check_ifname, int_in, ipv4
from netweft.dataplane.firewall import TUNNEL_TABLE, render_delete_tunnel_firewall, render_tunnel_firewall
from netweft.dataplane.nlutil import delete_link, ensure_mtu, ensure_up, failing, get_link, ignore, link_kind
from netweft.dataplane.wgconf import (MAX_ANSWER, NO_WIREGUARD, DeviceState, Implementation, PeerStatus, TunnelSpec,
                                      key_bytes, parse_errno, parse_get, render_set)
from netweft.errors import InvalidRequest, KernelError

SOCKET_DIR = "/var/run/wireguard"
START_TIMEOUT = 5.0
ICMP_ECHO, ICMP_ECHOREPLY = 8, 0


def detect(wireguard_go: str | None = None) -> Implementation:
    """The kernel module if the running kernel has it, else wireguard-go (at `wireguard_go` or on PATH)."""
    if os.path.isdir("/sys/module/wireguard") or _module_available("wireguard"):
        return Implementation("kernel", version=os.uname().release)
    path = wireguard_go if wireguard_go is not None else shutil.which("wireguard-go")
    if not path or not os.access(path, os.X_OK) or not os.path.isfile(path):
        return Implementation("none", problem=NO_WIREGUARD)
    if not os.path.exists("/dev/net/tun"):
        return Implementation("none", path=path, problem="wireguard-go needs /dev/net/tun, which this host lacks: "
                              "load the tun module (modprobe tun) and restart netweftd")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Implementation("none", path=path, problem=f"{path} does not run ({e}): reinstall wireguard-go")
    version = next((w for w in out.split() if w.startswith("v")), out.strip()[:40])
    return Implementation("wireguard-go", path=path, version=version)


def _module_available(name: str) -> bool:
    release = os.uname().release
    for f in ("modules.builtin", "modules.dep"):
        with contextlib.suppress(OSError):
            with open(f"/lib/modules/{release}/{f}") as fh:
                if any(line.split(":")[0].endswith(f"/{name}.ko") or f"/{name}.ko." in line.split(":")[0]
                       for line in fh):
                    return True
    return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Tunnel:
    """This host's WireGuard interfaces; uses the Overlay's host handles (same thread, same namespace)."""

    def __init__(self, overlay, run_dir: str, impl: Implementation):
        self.ov = overlay
        self.impl = impl
        self.dir = os.path.join(run_dir, "wireguard")
        self._procs: dict[str, subprocess.Popen] = {}
        self._icmp: socket.socket | None = None
        self._icmp_id = os.getpid() & 0xFFFF
        self._seq = 0

    # ---- processes (wireguard-go) ---------------------------------------------------------------

    def _pidfile(self, ifname: str) -> str:
        return os.path.join(self.dir, f"{ifname}.pid")

    @staticmethod
    def _socket(ifname: str) -> str:
        return os.path.join(SOCKET_DIR, f"{ifname}.sock")

    def _pid(self, ifname: str) -> int | None:
        """The pid of our wireguard-go for `ifname` if it runs (checked against its command line)."""
        proc = self._procs.get(ifname)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            self._procs.pop(ifname, None)
            return None
        try:
            with open(self._pidfile(ifname)) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if argv and os.path.basename(argv[0].decode(errors="replace")) == "wireguard-go" and ifname.encode() in argv:
            return pid
        return None

    def running(self, ifname: str) -> bool:
        if self.impl.kind == "kernel":
            return get_link(self.ov._host, ifname) is not None
        return self._pid(ifname) is not None and os.path.exists(self._socket(ifname))

    def _start(self, ifname: str) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._stop(ifname)   # a half-dead one (no socket, or a stale TUN link)
        with self.ov._in_host(), open(os.path.join(self.dir, f"{ifname}.log"), "ab") as log:
            # -f: stay in the foreground, our child; its TUN device and UDP socket are made in this namespace.
            proc = subprocess.Popen([self.impl.path, "-f", ifname], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                     "WG_PROCESS_FOREGROUND": "1"}, start_new_session=True)
        self._procs[ifname] = proc
        with open(self._pidfile(ifname), "w") as f:
            f.write(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self._socket(ifname)) and get_link(self.ov._host, ifname) is not None):
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    with open(os.path.join(self.dir, f"{ifname}.log"), "rb") as f:
                        tail = f.read()[-300:].decode(errors="replace").strip().splitlines()
                self._stop(ifname)
                last = tail[-1] if tail else "no output"
                raise KernelError(f"wireguard-go for {ifname} did not start: {last}")
            time.sleep(0.02)

    def _stop(self, ifname: str) -> None:
        pid = self._pid(ifname)
        proc = self._procs.pop(ifname, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if proc is not None and proc.poll() is not None:
                    break
                if proc is None and not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if proc is not None:
                    proc.wait(2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pidfile(ifname))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._socket(ifname))
        with failing(f"delete WireGuard interface {ifname}"), ignore(errno.ENODEV):
            link = get_link(self.ov._host, ifname)
            if link is not None and link_kind(link) in ("tun", "wireguard", None):
                self.ov._host.link("del", index=link["index"])

    # ---- the control socket ---------------------------------------------------------------------

    def _uapi(self, ifname: str, request: str) -> str:
        with failing(f"WireGuard control socket of {ifname}"):
            return uapi_exchange(self._socket(ifname), request)

    def _get(self, ifname: str) -> DeviceState:
        if self.impl.kind == "kernel":
            return self._kernel_get(ifname)
        return parse_get(self._uapi(ifname, "get=1\n\n"))

    # ---- the tunnel -----------------------------------------------------------------------------

    def ensure(self, spec: TunnelSpec) -> bool:
        """The interface as `spec` says (started if missing or dead). True if it was (re)started."""
        check_ifname(spec.ifname, "WireGuard interface name")
        int_in(spec.port, 1, 65535, "WireGuard port")
        int_in(spec.mtu, 576, 65535, "tunnel MTU")
        source = ipv4(spec.source, "tunnel source address")
        route = ipaddress.IPv4Network(spec.route) if spec.route else None
        addrs = {ipaddress.IPv4Interface(a) for a in spec.addresses}
        if ipaddress.IPv4Interface(f"{source}/32") not in addrs:
            raise InvalidRequest(f"tunnel source {source} is not one of the tunnel's addresses")
        key_bytes(spec.private_key, "WireGuard private key")
        if self.impl.kind == "none":
            raise KernelError(self.impl.problem or NO_WIREGUARD)
        started = False
        if not self.running(spec.ifname):
            if self.impl.kind == "kernel":
                with failing(f"create WireGuard interface {spec.ifname}"):
                    self.ov._host.link("add", ifname=spec.ifname, kind="wireguard")
            else:
                self._start(spec.ifname)
            started = True
        have = None
        if not started:
            try:
                have = self._get(spec.ifname)
            except KernelError:
                if self.impl.kind == "kernel":
                    raise
                # Dying (killed: its threads still going down) or wedged: a new one takes its place.
                self._start(spec.ifname)
                started = True
        if self.impl.kind == "kernel":
            self._kernel_set(spec, have)
        else:
            request = render_set(spec, have)
            if request is not None:
                code = parse_errno(self._uapi(spec.ifname, request))
                if code != 0:
                    raise KernelError(f"wireguard-go refused the configuration of {spec.ifname}: "
                                      f"{os.strerror(code) if code < 4096 else code}")
        self._ensure_link(spec, addrs, route, source)
        return started

    def _ensure_link(self, spec: TunnelSpec, addrs: set, route: ipaddress.IPv4Network | None, source: str) -> None:
        ipr = self.ov._host
        with failing(f"WireGuard interface {spec.ifname}"):
            link = get_link(ipr, spec.ifname)
            if link is None:
                raise KernelError("it vanished")
            idx = link["index"]
            ensure_mtu(ipr, link, spec.mtu)
            have = {ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                    for a in ipr.addr("dump", index=idx, family=socket.AF_INET)}
            for a in addrs - have:
                ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
            for a in have - addrs:
                with ignore(errno.EADDRNOTAVAIL):
                    ipr.addr("del", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
            ensure_up(ipr, link)
            self._loose_rp_filter(spec.ifname)
            if route is None:
                return
            routes = [r for r in ipr.route("dump", family=socket.AF_INET, table=254)
                      if r["dst_len"] == route.prefixlen and r.get_attr("RTA_DST") == str(route.network_address)]
            ok = [r for r in routes if r.get_attr("RTA_OIF") == idx and r.get_attr("RTA_PREFSRC") == source]
            if not ok or len(routes) > 1:
                # One atomic replace moves encrypted VXLAN to this interface (its key) and its source address
                # together: a key rotation's switch, with no packet in between under the wrong pair.
                ipr.route("replace", dst=str(route), oif=idx, prefsrc=source, table=254, scope=253)

    def _loose_rp_filter(self, ifname: str) -> None:
        """During a rotation peers still send to the old interface while the route points at the new one:
        strict reverse-path filtering would drop that. Loose mode (2) for our interfaces only."""
        with self.ov._in_host(), contextlib.suppress(FileNotFoundError):
            with open(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter", "r+") as f:
                if f.read().strip() != "2":
                    f.seek(0)
                    f.write("2")

    def delete(self, ifname: str) -> None:
        check_ifname(ifname, "WireGuard interface name")
        if self.impl.kind == "kernel":
            with failing(f"delete WireGuard interface {ifname}"):
                delete_link(self.ov._host, ifname, "wireguard")
            return
        self._stop(ifname)

    def list(self, prefix: str) -> list[str]:
        """Our WireGuard interfaces: links named `prefix`* and wireguard-go pidfiles (a crash's leftovers)."""
        names = set()
        with failing("list WireGuard interfaces"):
            for link in self.ov._host.link("dump"):
                name = link.get_attr("IFLA_IFNAME")
                if name and name.startswith(prefix) and link_kind(link) in ("tun", "wireguard"):
                    names.add(name)
        with contextlib.suppress(FileNotFoundError):
            names |= {f[:-4] for f in os.listdir(self.dir) if f.endswith(".pid") and f.startswith(prefix)}
        return sorted(names)

    def status(self, ifname: str) -> list[PeerStatus]:
        check_ifname(ifname, "WireGuard interface name")
        if not self.running(ifname):
            return []
        return sorted(self._get(ifname).peers.values(), key=lambda p: p.public_key)

    # ---- the kernel module (untested here: no kernel WireGuard on this machine) -------------------

    def _wg(self):
        from pyroute2 import WireGuard
        return WireGuard()

    def _kernel_get(self, ifname: str) -> DeviceState:
        with failing(f"WireGuard interface {ifname}"), contextlib.closing(self._wg()) as wg:
            msgs = wg.info(ifname)
        private = port = None
        peers: dict[str, PeerStatus] = {}
        for msg in msgs:
            private = private or (msg.get_attr("WGDEVICE_A_PRIVATE_KEY") or b"").decode() or None
            port = port or msg.get_attr("WGDEVICE_A_LISTEN_PORT")
            for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                key = p.get_attr("WGPEER_A_PUBLIC_KEY").decode()
                ep = p.get_attr("WGPEER_A_ENDPOINT") or {}
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                ips = tuple(f"{a['addr']}" for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if "addr" in a)
                peers[key] = PeerStatus(key, f"{ep['addr']}:{ep['port']}" if ep else None,
                                        float(hs.get("tv_sec", 0)), p.get_attr("WGPEER_A_RX_BYTES") or 0,
                                        p.get_attr("WGPEER_A_TX_BYTES") or 0, ips)
        return DeviceState(private, port, peers)

    def _kernel_set(self, spec: TunnelSpec, have: DeviceState | None) -> None:
        want = {p.public_key: p for p in spec.peers}
        old = have.peers if have is not None else {}
        with failing(f"configure WireGuard interface {spec.ifname}"), contextlib.closing(self._wg()) as wg:
            if have is None or have.private_key != spec.private_key or have.port != spec.port:
                wg.set(spec.ifname, private_key=spec.private_key, listen_port=spec.port)
            for key in set(old) - set(want):
                wg.set(spec.ifname, peer={"public_key": key, "remove": True})
            for key, p in want.items():
                cur = old.get(key)
                if cur is not None and cur.endpoint == p.endpoint and cur.allowed_ips == (p.allowed_ip,):
                    continue
                host, _, port = p.endpoint.rpartition(":")
                wg.set(spec.ifname, peer={"public_key": key, "endpoint_addr": host, "endpoint_port": int(port),
                                          "allowed_ips": [p.allowed_ip]})

    # ---- firewall --------------------------------------------------------------------------------

    def apply_firewall(self, ifnames: list[str], vxlan_port: int, vnis: list[int]) -> None:
        self.ov._nft_cmd(render_tunnel_firewall(ifnames, vxlan_port, vnis), f"nftables table {TUNNEL_TABLE}")

    def delete_firewall(self) -> None:
        self.ov._nft_cmd(render_delete_tunnel_firewall(), f"delete nftables table {TUNNEL_TABLE}")

    # ---- probes through the tunnel ----------------------------------------------------------------

    def _probe_socket(self) -> socket.socket:
        if self._icmp is None:
            with failing("open the tunnel probe socket"), self.ov._in_host():
                s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                s.setblocking(False)
            self._icmp = s
        return self._icmp

    def send_probes(self, addrs: list[str]) -> None:
        """One ICMP echo to each tunnel address (answers are read by probe_replies)."""
        s = self._probe_socket()
        self._seq = (self._seq + 1) & 0xFFFF
        for addr in addrs:
            ipv4(addr, "tunnel address")
            body = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, self._icmp_id, self._seq) + b"netweft-probe"
            body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
            with contextlib.suppress(OSError):   # no route (the tunnel is down): no answer, which is the news
                s.sendto(body, (addr, 0))

    def probe_replies(self) -> set[str]:
        """Tunnel addresses that answered an echo of ours since the last call."""
        s = self._probe_socket()
        out = set()
        while True:
            try:
                data, (src, _) = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return out
            ihl = (data[0] & 0x0F) * 4 if data else 0
            if len(data) >= ihl + 8:
                typ, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if typ == ICMP_ECHOREPLY and ident == self._icmp_id:
                    out.add(src)

    def close(self) -> None:
        if self._icmp is not None:
            self._icmp.close()
            self._icmp = None
        # wireguard-go processes outlive the daemon (the data plane stays as it is when netweftd stops).
        self._procs.clear()


def uapi_exchange(path: str, request: str, listen_wait: float = 1.0) -> str:
    """One request on a wireguard-go control socket and its answer (ends with a blank line)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        deadline = time.monotonic() + listen_wait
        while True:
            try:
                s.connect(path)
                break
            except ConnectionRefusedError:
                # A wireguard-go just started binds its socket a moment before it listens.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        s.sendall(request.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_ANSWER:
                raise KernelError("answer too long")
    return buf.decode(errors="replace")
