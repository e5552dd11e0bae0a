"""The etcd member beside a manager (`swarm init --store etcd`): started, restarted when it dies, stopped
with the daemon.

It runs as its own session (a netweftd killed with -9 leaves it serving, so the cluster keeps its quorum)
and a restarted netweftd adopts it through its pid file. Its data and log live in the swarm directory's
etcd/; peer and client TLS use the manager's store certificate (netweft/manager/hastore.py), so only
managers of this cluster reach it; it is renewed, and revoked certificates refused, through files etcd
reads per connection (manager/storecerts.py). A member removed from the cluster (demote, node rm, leave) exits by
itself and is not restarted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal

from netweft.errors import Unavailable
from netweft.manager.hastore import CLIENT_PORT, PEER_PORT, peer_url, store_files

log = logging.getLogger("netweft.etcd")

ETCD = "etcd"
RESTART_DELAY = 1.0
REMOVED_WORDS = (b"has been permanently removed", b"because it was removed", b"removed from the cluster")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is dead too
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


class EtcdMember:
    def __init__(self, swarm_dir: str, name: str, addr: str):
        self.swarm_dir, self.name, self.addr = swarm_dir, name, addr
        self.dir = os.path.join(swarm_dir, "etcd")
        self.data = os.path.join(self.dir, "data")
        self.pidfile = os.path.join(self.dir, "etcd.pid")
        self.logfile = os.path.join(self.dir, "etcd.log")
        self.conf = os.path.join(self.dir, "member.json")
        self.pid: int | None = None
        self.removed = False
        self._stopping = False
        self._task: asyncio.Task | None = None

    def argv(self, initial_cluster: str, state: str) -> list[str]:
        f = store_files(self.swarm_dir)
        client = f"https://{self.addr}:{CLIENT_PORT}"
        # etcd 3.4 reads the certificate and key files at every handshake and the CRL at every accepted
        # connection (client and peer): a renewal or a revocation written to these files applies to the next
        # connection, without a restart. Certificate and key are one file (swapped in one rename).
        crl = ["--client-crl-file", f["crl"], "--peer-crl-file", f["crl"]] if os.path.exists(f["crl"]) else []
        return [ETCD, "--name", self.name, "--data-dir", self.data,
                "--listen-client-urls", f"{client},https://127.0.0.1:{CLIENT_PORT}",
                "--advertise-client-urls", client,
                "--listen-peer-urls", f"https://{self.addr}:{PEER_PORT}",
                "--initial-advertise-peer-urls", peer_url(self.addr),
                "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
                "--cert-file", f["pair"], "--key-file", f["pair"], "--trusted-ca-file", f["ca"],
                "--client-cert-auth",
                "--peer-cert-file", f["pair"], "--peer-key-file", f["pair"], "--peer-trusted-ca-file", f["ca"],
                "--peer-client-cert-auth", *crl,
                # pre-vote: a member cut off does not bump the term and force a new election when it is back
                "--pre-vote",
                "--logger", "zap", "--log-outputs", "stderr"]

    # ------------------------------------------------------------ lifecycle
    async def start(self, initial_cluster: str | None = None, state: str = "new") -> None:
        """Start (or adopt) the member. The first start records how; later ones reuse it (etcd ignores the
        initial-cluster flags once its data directory exists)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if initial_cluster is not None:
            with open(self.conf, "w") as f:
                json.dump({"initial_cluster": initial_cluster, "state": state}, f)
        self._stopping = False
        pid = self._running_pid()
        if pid is not None:
            self.pid = pid
            log.info("etcd member adopted", extra={"pid": pid, "member": self.name})
        else:
            self._spawn()
        self._task = asyncio.ensure_future(self._supervise())

    def _running_pid(self) -> int | None:
        try:
            pid = int(open(self.pidfile).read())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError):
            return None
        return pid if cmd.startswith(ETCD.encode()) and self.data.encode() in cmd and _alive(pid) else None

    def _spawn(self) -> None:
        try:
            with open(self.conf) as f:
                conf = json.load(f)
        except (OSError, ValueError):
            raise Unavailable(f"the etcd member in {self.dir} has no configuration; leave the swarm "
                              "(`netweft swarm leave --force`) and join again") from None
        import subprocess
        with open(self.logfile, "ab") as logf:
            try:
                proc = subprocess.Popen(self.argv(conf["initial_cluster"], conf["state"]), stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=logf, cwd=self.dir, start_new_session=True)
            except FileNotFoundError:
                raise Unavailable("etcd is not installed: install Debian's etcd-server (`make install` does) "
                                  "or use the default store") from None
        self.pid = proc.pid
        self._proc = proc
        with open(self.pidfile, "w") as f:
            f.write(str(proc.pid))
        log.info("etcd member started", extra={"pid": proc.pid, "member": self.name, "state": conf["state"]})

    def _log_tail(self) -> bytes:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
                return f.read()
        except OSError:
            return b""

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self.pid is None or _alive(self.pid):
                continue
            if self._stopping:
                return
            tail = self._log_tail()
            if any(w in tail for w in REMOVED_WORDS):
                self.removed = True
                log.info("etcd member removed from the cluster; not restarted", extra={"member": self.name})
                return
            log.warning("etcd member exited; restarting it", extra={"pid": self.pid,
                                                                    "tail": tail[-300:].decode(errors="replace")})
            await asyncio.sleep(RESTART_DELAY)
            pid = self._running_pid()
            if pid is not None:  # another one serves this data directory: follow that one
                self.pid = pid
                continue
            try:
                self._spawn()
            except Unavailable as e:
                log.error("etcd member cannot restart", extra={"reason": str(e)})
                return

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        pid = self.pid
        if pid is None or not _alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        for i in range(200):
            if not _alive(pid):
                break
            if i == 150:
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        self.pid = None

    async def destroy(self) -> None:
        """Stop it and forget it: its data goes (a member that left never comes back as itself)."""
        await self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
