"""netweftd: one asyncio process per host. Wires the roles together and serves the local API."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import stat
import sys

# frozenlist's compiled extension (aiohttp's signal lists, nothing hot) drags in libstdc++: ≈1.5 MiB resident.
# Its pure-Python twin does the same job. Set before aiohttp is first imported.
os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")

from netweft.http import web  # noqa: E402

from netweft import __version__, validate
from netweft import metrics
from netweft.agent.vip import ServiceBalancer
from netweft.daemon import cni_api, config, docker_driver, doctor, events_api, logs, memory, tasklogs, tasks
from netweft.daemon.api import build_app
from netweft.daemon.engine import Engine
from netweft.daemon.names import ContainerNames, parse_upstream
from netweft.dataplane.real import RealDataPlane
from netweft.daemon.swarm import Swarm
from netweft.errors import NetweftError
from netweft.ipam.address import parse_pool
from netweft.pki import parse_duration

log = logging.getLogger("netweft.daemon")

# The socket's directory is shared with the API group; the exec root is not (it stays 0700), so it is a
# directory of its own beside the socket, not the socket's directory.
DEFAULT_SOCKET = "unix:///run/netweft/netweft.sock"
DEFAULT_EXEC_ROOT = "/run/netweft/exec"
DEFAULT_POOL = "base=172.17.0.0/16,size=24"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="netweftd",
        description="netweft daemon: owns this host's container networks. One per host, run as root.")
    p.add_argument("-H", "--host", default=DEFAULT_SOCKET,
                   help=f"API socket to listen on (default {DEFAULT_SOCKET})")
    p.add_argument("--data-root", default="/var/lib/netweft", help="state directory (default /var/lib/netweft)")
    p.add_argument("--exec-root", default=DEFAULT_EXEC_ROOT,
                   help=f"runtime directory: namespaces, sandboxes (default {DEFAULT_EXEC_ROOT})")
    p.add_argument("--default-address-pool", action="append", metavar="base=CIDR,size=N",
                   help=f"pool for local networks created without --subnet (default {DEFAULT_POOL}); repeatable")
    p.add_argument("--group", default="netweft",
                   help="group allowed to use the API socket if it exists (default netweft); else root only")
    p.add_argument("--hostname", default=None,
                   help="this node's name in the cluster (default: the machine's hostname)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--dns", action="append", metavar="IP",
                   help="DNS server the containers' resolver forwards unknown names to (default: the host's "
                        "/etc/resolv.conf nameservers); repeatable")
    p.add_argument("--version", action="version", version=f"netweftd {__version__}")
    p.add_argument("--wireguard-go", metavar="PATH", default=None,
                   help="wireguard-go to use where the kernel has no WireGuard (default: found on PATH)")
    p.add_argument("--wireguard-key-rotation", metavar="DURATION", default="12h", type=_duration,
                   help="how often each host makes a new WireGuard key, make-before-break (default 12h)")
    p.add_argument("--docker-plugin-socket", default=docker_driver.DEFAULT_SOCKET, metavar="PATH",
                   help="where Docker's network and IPAM driver is served (default "
                        f"{docker_driver.DEFAULT_SOCKET}; '' for none)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of flags (keys are the long flags without --); the command line overrides it")
    p.add_argument("--metrics-addr", metavar="IP:PORT", default=None,
                   help="serve Prometheus metrics on http://IP:PORT/metrics (off by default; no login: "
                        "keep it on 127.0.0.1 or a management network)")
    p.add_argument("--dashboard-addr", metavar="IP:PORT", default=None,
                   help="on a manager, serve the read-only web dashboard on http://IP:PORT/ (off by default). "
                        "It has no login and shows the whole cluster: bind it to 127.0.0.1 and reach it through "
                        "an SSH tunnel, or to a management network only")
    return config.apply(p, argv)


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text).total_seconds()
    except NetweftError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 2 <= seconds <= 365 * 86400:
        raise argparse.ArgumentTypeError("must be between 2s and 365d")
    return seconds


def secure_root(root: str) -> None:
    """The root and everything in it lose group and other permissions: the local store (and its WAL)
    holds the join tokens, the swarm directory the node's key. New files are private by the daemon's
    umask; this repairs what an older version or another umask left. Public certificates (*.crt) keep
    their read bits; other file systems mounted inside (namespace files) are not ours to change."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if (st.st_dev != dev or stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077
                        or (name.endswith(".crt") and stat.S_ISREG(st.st_mode))):
                    continue
                os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
            except FileNotFoundError:
                pass


def share_socket(sock: str, gid: int, roots: list[str]) -> str | None:
    """Let group gid use the API socket: the socket 0660, and its own directory (if it is a private one of
    root's, as by default) 0710 so the group can pass through it without listing it. Nothing above it is
    changed, and never a data or exec root (they stay 0700): a socket inside one is root's only, said in
    the returned warning."""
    os.chown(sock, 0, gid)
    os.chmod(sock, 0o660)
    d = os.path.dirname(os.path.realpath(sock))
    for root in map(os.path.realpath, roots):
        if d == root or d.startswith(root + os.sep):
            return (f"the API socket {sock} is inside {root}, which stays private to root: the group cannot "
                    "reach it; put the socket outside the data and exec roots (-H unix:///PATH)")
    st = os.stat(d)
    if st.st_uid == 0 and not st.st_mode & 0o007:   # a directory open to others (/run, /tmp) is not ours
        os.chown(d, 0, gid)
        os.chmod(d, 0o710)
    return None


def socket_path(host: str) -> str:
    if not host.startswith("unix://"):
        raise NetweftError(f"unsupported -H {host!r}: only unix:///PATH is supported")
    return host[len("unix://"):]


def observers(daemon, args: argparse.Namespace) -> list:
    """The listeners asked for with --metrics-addr and --dashboard-addr (modules loaded only then)."""
    out = []
    if args.metrics_addr:
        from netweft.daemon.metrics_server import MetricsServer
        out.append(MetricsServer(daemon, config.listen_addr(args.metrics_addr, "--metrics-addr")))
    if args.dashboard_addr:
        from netweft.daemon.dashboard import DashboardServer
        out.append(DashboardServer(daemon, config.listen_addr(args.dashboard_addr, "--dashboard-addr")))
    return out


class Daemon:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sock = socket_path(args.host)
        name = args.hostname or socket.gethostname()
        try:
            self.hostname = validate.check_hostname(name)
        except NetweftError:
            raise NetweftError(f"this host's name {name!r} is not a valid cluster node name (letters, digits, "
                               "'-' and dots, at most 64 characters); start netweftd with --hostname NAME") from None
        # Namespace paths are kept in the store and handed to the kernel: always absolute.
        args.data_root, args.exec_root = os.path.abspath(args.data_root), os.path.abspath(args.exec_root)
        for root in (args.data_root, args.exec_root):
            secure_root(root)
        self.pools = [parse_pool(p) for p in (args.default_address_pool or [DEFAULT_POOL])]
        # The one data plane of this host, injected into the engine (and through it, the overlay agent).
        self.dataplane = RealDataPlane(args.exec_root, wireguard_go=args.wireguard_go)
        self.engine = Engine(args.data_root, args.exec_root, self.pools, self.dataplane)
        self.engine.events.hostname = self.hostname
        self.swarm = Swarm(self)
        self.wireguard = None   # which WireGuard this host has, found at start (`info` shows it)
        self.extra_routes: list = [self.swarm.routes(), tasks.routes(self)]
        self.extra_routes.append(cni_api.routes(self.engine))
        self.extra_routes.append(events_api.routes(self))
        self.observers = observers(self, args)   # opt-in listeners: metrics, dashboard
        self.extra_routes.append(doctor.routes(self))
        self.engine.names = ContainerNames(self.engine, [parse_upstream(a) for a in args.dns or []])
        self.tasks = tasks.TaskRunner(self.engine)   # this host's service tasks
        self.tasklogs = tasklogs.LogAgent(self.engine)   # their logs, for `service logs` on any manager
        self.extra_routes.append(tasklogs.routes(self))
        self.balancer = ServiceBalancer(self.dataplane)   # service VIPs in this host's containers

    def info(self) -> dict:
        return {"Version": __version__, "Pid": os.getpid(), "DataRoot": self.args.data_root,
                "ExecRoot": self.args.exec_root, "Socket": self.sock,
                "DefaultAddressPools": [str(p) for p in self.pools], "Hostname": self.hostname,
                "Swarm": self.swarm.info(), "WireGuard": self.wireguard.view() if self.wireguard else {}}

    async def run(self) -> None:
        await self.dataplane.start()
        self.wireguard = await self.dataplane.wireguard()
        await self.engine.start()
        await self.swarm.start()
        await self.engine.names.start()
        self.tasks.start()
        self.tasklogs.start()
        balancing = asyncio.get_running_loop().create_task(self.balancer.run(lambda: self.engine.overlay_agent))
        app = build_app(self)
        app.middlewares[0:0] = metrics.middlewares("local")
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        os.makedirs(os.path.dirname(self.sock), mode=0o755, exist_ok=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            site = web.UnixSite(runner, self.sock, shutdown_timeout=2.0)
            await site.start()
        finally:
            os.umask(old)
        self._share_with_group()
        driver = await docker_driver.serve(self.engine, self.args.docker_plugin_socket)
        for o in self.observers:
            await o.start()
        log.info("netweftd ready", extra={"socket": self.sock, "pid": os.getpid()})
        asyncio.get_running_loop().call_later(memory.SETTLE, memory.trimmer.trim)   # start-up garbage handed back
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("netweftd stopping; the data plane stays as it is")
        await driver.close()
        await runner.cleanup()
        for o in self.observers:
            await o.stop()
        await self.tasks.stop()
        await self.tasklogs.stop()
        balancing.cancel()
        await asyncio.gather(balancing, return_exceptions=True)
        await self.swarm.stop()
        await self.engine.names.stop()
        await self.engine.close()
        await self.dataplane.close()

    def _share_with_group(self) -> None:
        import grp
        try:
            gid = grp.getgrnam(self.args.group).gr_gid
        except KeyError:
            return
        warning = share_socket(self.sock, gid, [self.args.data_root, self.args.exec_root])
        if warning:
            log.warning(warning)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Whatever the caller's umask: every file the daemon makes (store, keys, tokens) is root's alone.
    os.umask(0o077)
    logs.setup(args.log_level)
    if os.geteuid() != 0:
        print("netweftd: must run as root (it programs the kernel's network)", file=sys.stderr)
        sys.exit(1)
    memory.tune_malloc()
    memory.small_tls_buffers()
    try:
        daemon = Daemon(args)
        asyncio.run(daemon.run())
    except NetweftError as e:
        log.error("netweftd cannot start", extra={"reason": str(e)})
        print(f"netweftd: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
