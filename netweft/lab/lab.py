"""A cluster on one machine: N simulated hosts as network namespaces on one underlay switch.

Layout of lab NAME:
  /run/netns/nwl-NAME-sw        the underlay switch (a bridge `ul` in its own namespace)
  /run/netns/nwl-NAME-hI        host I: eth0 = 192.0.2.(10+I)/24 on the switch, a netweftd
  /run/netweft-lab/NAME/hI/     that daemon's socket, data root, exec root and log
Nothing has a route out of the lab; `lab down` (or `make clean-lab`) removes all of it.
"""
from __future__ import annotations

import ipaddress
import re
import signal
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from netweft.dataplane.netns import create_netns
from netweft.dataplane.nlutil import netns_iproute

from netweft.apiclient.client import Client
from netweft.errors import Conflict, InvalidRequest, NotFound
from netweft.lab.cleanup import clean

LAB_ROOT = Path("/run/netweft-lab")
NETNS_DIR = Path("/run/netns")
DEFAULT_UNDERLAY = "192.0.2.0/24"
# Address safety: everything a lab allocates stays in the benchmarking range 198.18.0.0/15.
LAB_LOCAL_POOL = "base=198.19.0.0/16,size=24"     # gateway bridges, local bridge networks
LAB_OVERLAY_POOL = "198.18.0.0/16"                # overlay subnets
BIN = Path(sys.executable).parent


class Lab:
    def __init__(self, name: str):
        # Namespaces are nwl-NAME-*: no '-' in NAME, so one lab's prefix never matches another's.
        if not re.fullmatch(r"[a-z0-9]{1,12}", name or ""):
            raise InvalidRequest(f"invalid lab name {name!r}: use 1-12 lowercase letters and digits")
        self.name = name
        self.root = LAB_ROOT / name
        self.state_file = self.root / "lab.json"

    # ------------------------------------------------------------ naming
    def ns(self, host: str) -> str:
        return f"nwl-{self.name}-{host}"

    def ns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.ns(host))

    def host_dir(self, host: str) -> Path:
        return self.root / host

    def socket(self, host: str) -> str:
        return f"unix://{self.host_dir(host) / 'netweft.sock'}"

    def client(self, host: str, timeout: float = 120) -> Client:
        return Client(self.socket(host), timeout=timeout)

    # ------------------------------------------------------------- state
    def exists(self) -> bool:
        return self.state_file.exists()

    def state(self) -> dict:
        if not self.exists():
            raise NotFound(f"lab {self.name!r} does not exist; see `netweft lab ls`")
        return json.loads(self.state_file.read_text())

    def hosts(self) -> list[str]:
        return list(self.state()["hosts"])

    def address(self, host: str) -> str:
        return self.state()["hosts"][host]["address"]

    @staticmethod
    def all() -> list["Lab"]:
        if not LAB_ROOT.is_dir():
            return []
        return [Lab(p.name) for p in sorted(LAB_ROOT.iterdir()) if (p / "lab.json").exists()]

    # ---------------------------------------------------------------- up
    def up(self, n: int, underlay: str = DEFAULT_UNDERLAY, mtu: int = 1500, swarm: bool = True,
           daemon_args: list[str] | None = None, init_opts: dict | None = None, progress=print,
           managers: int = 1) -> None:
        """Build the hosts and daemons; with swarm, h1 inits (with init_opts, the API's
        /swarm/init fields), h2..h<managers> join as managers and the others as workers."""
        if not 1 <= managers <= n:
            raise InvalidRequest(f"--managers must be between 1 and the number of hosts ({n})")
        if not 1 <= n <= 200:
            raise InvalidRequest("--hosts must be between 1 and 200")
        if self.exists() or (NETNS_DIR / self.ns("sw")).exists():
            raise Conflict(f"lab {self.name!r} already exists; remove it with `netweft lab down {self.name}`")
        net = ipaddress.ip_network(underlay)
        addrs = list(net.hosts())[10:10 + n]
        if len(addrs) < n:
            raise InvalidRequest(f"underlay {underlay} is too small for {n} hosts")
        self.root.mkdir(parents=True, mode=0o700)
        me = os.getpid()
        hosts = {f"h{i + 1}": {"address": str(addrs[i]), "prefixlen": net.prefixlen} for i in range(n)}
        state = {"name": self.name, "underlay": underlay, "mtu": mtu, "hosts": hosts, "created": time.time(),
                 "managers": managers}
        self.state_file.write_text(json.dumps(state, indent=2))
        try:
            progress(f"lab {self.name}: underlay switch {underlay} (MTU {mtu})")
            self._make_switch(mtu)
            for host, h in hosts.items():
                self._make_host(host, h["address"], h["prefixlen"], mtu)
                self.start_daemon(host, daemon_args)
                progress(f"  {host}: {h['address']}, netweftd up")
            if swarm:
                self.form_swarm(progress, init_opts, managers)
        except BaseException:
            if os.getpid() == me:  # never from a forked copy of this process
                self.down(quiet=True)
            raise

    # Namespaces and links are made without forking (pyroute2's NetNS forks helpers, and a forked
    # copy of this process must never run its cleanup paths).
    def _make_switch(self, mtu: int) -> None:
        create_netns(self.ns_path("sw"))
        with netns_iproute(self.ns_path("sw")) as (_, sw):
            sw.link("add", ifname="ul", kind="bridge")
            sw.link("set", index=sw.link_lookup(ifname="ul")[0], mtu=mtu, state="up")
            sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")

    def _make_host(self, host: str, address: str, prefixlen: int, mtu: int) -> None:
        create_netns(self.ns_path(host))
        self.host_dir(host).mkdir(mode=0o700)
        with netns_iproute(self.ns_path(host)) as (host_fd, h), netns_iproute(self.ns_path("sw")) as (_, sw):
            # Created in the switch; the host end goes straight into the host namespace.
            sw.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host_fd})
            idx = sw.link_lookup(ifname=host)[0]
            sw.link("set", index=idx, master=sw.link_lookup(ifname="ul")[0], mtu=mtu, state="up")
            idx = h.link_lookup(ifname="eth0")[0]
            h.link("set", index=idx, mtu=mtu, state="up")
            h.addr("add", index=idx, address=address, prefixlen=prefixlen)
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")

    def start_daemon(self, host: str, daemon_args: list[str] | None = None) -> None:
        d = self.host_dir(host)
        with open(d / "netweftd.log", "ab") as logf:
            proc = subprocess.Popen(
                ["nsenter", f"--net={self.ns_path(host)}", str(BIN / "netweftd"), "-H", self.socket(host),
                 "--data-root", str(d / "data"), "--exec-root", str(d / "run"), "--hostname", host,
                 "--default-address-pool", LAB_LOCAL_POOL, "--docker-plugin-socket", str(d / "docker-plugin.sock"),
                 *(daemon_args or [])],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        (d / "netweftd.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + 30
        c = self.client(host, timeout=5)
        while True:
            if proc.poll() is not None:
                tail = (d / "netweftd.log").read_text()[-800:]
                raise RuntimeError(f"netweftd on {host} exited at start: {tail}")
            try:
                c.call("GET", "/_ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"netweftd on {host} did not answer within 30 s; see {d}/netweftd.log")
                time.sleep(0.05)

    def stop_daemon(self, host: str, sig: int = 15) -> None:
        pidfile = self.host_dir(host) / "netweftd.pid"
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, sig)
        except (OSError, ValueError):
            return
        for i in range(400):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if i == 300:  # 15 s and still there: a stop must stop
                os.kill(pid, signal.SIGKILL)
            # The daemon is our child only when this process started it; reap it if so.
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)

    def form_swarm(self, progress=print, init_opts: dict | None = None, managers: int = 1) -> None:
        hosts = self.hosts()
        first = hosts[0]
        t0 = time.monotonic()
        init = self.client(first).call("POST", "/swarm/init", {"AdvertiseAddr": self.address(first),
                                                                "DefaultAddrPool": [LAB_OVERLAY_POOL],
                                                                **(init_opts or {})})
        progress(f"  {first}: swarm init ({time.monotonic() - t0:.2f} s), manager at {self.address(first)}:2377")
        manager_token = None
        if managers > 1:
            manager_token = self.client(first).call("GET", "/swarm")["JoinTokens"]["Manager"]
        for i, host in enumerate(hosts[1:], start=2):
            role = "manager" if i <= managers else "worker"
            t0 = time.monotonic()
            self.client(host).call("POST", "/swarm/join", {
                "JoinToken": manager_token if role == "manager" else init["JoinTokens"]["Worker"],
                "RemoteAddrs": [f"{self.address(first)}:2377"], "AdvertiseAddr": self.address(host)})
            progress(f"  {host}: joined as {role} ({time.monotonic() - t0:.2f} s)")

    # ----------------------------------------------------------- exec, down
    def exec_argv(self, host: str, argv: list[str]) -> tuple[list[str], dict]:
        if host not in self.hosts():
            raise NotFound(f"lab {self.name!r} has no host {host!r}; it has {', '.join(self.hosts())}")
        env = {**os.environ, "NETWEFT_HOST": self.socket(host),
               "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        return ["nsenter", f"--net={self.ns_path(host)}", *argv], env

    def down(self, quiet: bool = False) -> dict:
        return clean([str(self.root)], ns_prefixes=(f"nwl-{self.name}-",), quiet=quiet)
