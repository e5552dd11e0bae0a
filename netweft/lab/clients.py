"""Real container runtimes in lab hosts: podman (CNI backend) and dockerd, kept off the machine's own
configuration, with what they need on this kind of machine (FIELD-NOTES "Real clients on this machine").

Everything lives under one directory the caller owns (a test root, a lab host's directory); `close()`
removes every container and process made here, and only those.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
APPLETS = ("sh", "ping", "ip", "sleep", "cat", "hostname", "ls", "nc", "echo", "true", "wget", "httpd", "ifconfig",
           "route", "grep")
ULIMITS = '["nofile=20000:20000", "nproc=32768:32768"]'   # runc fails here without them (no CAP_SYS_RESOURCE)
DOCKER_STORE_PORT = 12379       # Docker's cluster store in a lab: not etcd's 2379, which netweft's own store may use
DOCKER = "/usr/bin/docker"       # the 20.10 client that matches dockerd (a newer one may sit in /usr/local/bin)


def busybox_rootfs(path: Path) -> Path:
    """A tiny root filesystem: Debian's busybox, the libraries it links, its applets."""
    if (path / "bin" / "busybox").exists():
        return path
    for d in ("bin", "lib/x86_64-linux-gnu", "lib64", "etc", "proc", "sys", "dev", "tmp", "www"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/busybox", path / "bin" / "busybox")
    out = subprocess.run(["ldd", "/usr/bin/busybox"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if lib.startswith("/"):
            dest = path / ("lib64" if lib.startswith("/lib64/") else "lib/x86_64-linux-gnu")
            shutil.copy2(os.path.realpath(lib), dest / os.path.basename(lib))
    for a in APPLETS:
        (path / "bin" / a).symlink_to("busybox")
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\n")
    (path / "www" / "index.html").write_text("hello from a container\n")
    return path


def _run(argv: list[str], env: dict | None = None, timeout: float = 120, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-6:])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


class Podman:
    """podman 4.3 with the CNI backend inside a host's network namespace, its state under `root`."""

    def __init__(self, netns: str, root: Path, cni_bin: Path):
        self.netns, self.root, self.cni_bin = netns, root, cni_bin
        self.conf_dir = root / "cni"
        for d in ("cni", "storage", "runroot", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "containers.conf").write_text(f"""[containers]
default_ulimits = {ULIMITS}
[network]
network_backend = "cni"
cni_plugin_dirs = ["{cni_bin}", "/usr/lib/cni"]
network_config_dir = "{self.conf_dir}"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
runtime = "runc"
lock_type = "file"
tmp_dir = "{root}/tmp"
""")
        (root / "storage.conf").write_text(f"""[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/runroot"
""")
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": str(root / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"), "HOME": str(root)}

    def add_network(self, name: str, network: str, socket: str, version: str = "1.0.0",
                    log: str | None = None) -> None:
        plugin = {"type": "netweft", "network": network, "socket": socket,
                  "capabilities": {"ips": True, "mac": True, "aliases": True, "portMappings": True}}
        if log:
            plugin["log"] = log
        (self.conf_dir / f"{name}.conflist").write_text(json.dumps(
            {"cniVersion": version, "name": name, "plugins": [plugin]}))

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(["nsenter", f"--net={self.netns}", "podman", *args], env=self.env, timeout=timeout, check=check)

    def close(self) -> None:
        try:
            self("rm", "-af", "-t", "0", check=False, timeout=120)
        except subprocess.TimeoutExpired:
            pass


class Dockerd:
    """dockerd 20.10 inside a host's network namespace (its own mount namespace, with a private plugin
    directory holding a spec file for netweft's driver socket), its state under `root`."""

    def __init__(self, netns: str, root: Path, plugin_socket: str | None, cluster_store: str | None = None):
        self.netns, self.root = netns, root
        self.sock = root / "docker.sock"
        self.plugin_socket, self.cluster_store = plugin_socket, cluster_store
        for d in ("data", "exec"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_HOST": f"unix://{self.sock}",
                    "DOCKER_API_VERSION": "1.41", "HOME": str(root)}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        extra = f" --cluster-store {self.cluster_store}" if self.cluster_store else ""
        r = self.root
        # Docker's plugin directories are machine-wide: private tmpfs copies here, the spec file in ours.
        spec = (f"mkdir /etc/docker/plugins && echo unix://{self.plugin_socket} > /etc/docker/plugins/netweft.spec && "
                if self.plugin_socket else "")
        script = ("mkdir -p /run/docker/plugins && mount -t tmpfs -o mode=755 nwt-plugins /run/docker/plugins && "
                  "mount -t tmpfs -o mode=755 nwt-etc-docker /etc/docker && " + spec +
                  f"exec dockerd --data-root {r}/data --exec-root {r}/exec -H unix://{self.sock} "
                  f"--pidfile {r}/docker.pid --bridge none --iptables=false --ip6tables=false "
                  f"--storage-driver vfs --log-level info{extra}")
        self.log = open(r / "dockerd.log", "ab")
        self.proc = subprocess.Popen(["nsenter", f"--net={self.netns}", "unshare", "-m", "--propagation", "slave",
                                      "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(r / 'dockerd.log').read_text()[-1500:]}")
            if self("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within 60 s: {(r / 'dockerd.log').read_text()[-1500:]}")

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([DOCKER, *args], env=self.env, timeout=timeout, check=check)

    def import_rootfs(self, rootfs: Path, tag: str = "nwt-busybox:1") -> str:
        tar = self.root / "rootfs.tar"
        if not tar.exists():
            _run(["tar", "-C", str(rootfs), "-cf", str(tar), "."])
        self("import", "-c", 'CMD ["/bin/sh"]', str(tar), tag)
        return tag

    def stop(self) -> None:
        """Stop dockerd (its containers stop with it) and wait for it and its containerd."""
        if self.proc is None:
            return
        pid = self._pid()
        if self.proc.poll() is None and pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()
        self._kill_children()

    def _pid(self) -> int | None:
        try:
            return int((self.root / "docker.pid").read_text())
        except (OSError, ValueError):
            return None

    def _kill_children(self) -> None:
        """containerd and its shims of this dockerd (by their exec root), if a stop left any."""
        mark = str(self.root / "exec")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if mark in cmd and ("containerd" in cmd):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        if self.proc is not None:
            try:
                self("rm", "-f", *self("ps", "-aq", check=False).stdout.split(), check=False, timeout=60)
            except (subprocess.TimeoutExpired, RuntimeError):
                pass
            self.stop()


def docker_store_url(addr: str) -> str:
    return f"etcd://{addr}:{DOCKER_STORE_PORT}"


def start_docker_store(netns: str, addr: str, data_dir: Path) -> subprocess.Popen:
    """An etcd speaking the v2 API, for dockerd's --cluster-store (how Docker shares global-scope networks
    between its daemons; netweft's own state is not in it). Plain HTTP: for the lab's underlay only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "etcd.log", "ab")
    peer, url = f"http://{addr}:{DOCKER_STORE_PORT + 1}", f"http://{addr}:{DOCKER_STORE_PORT}"
    proc = subprocess.Popen(["nsenter", f"--net={netns}", "etcd", "--name", "docker-store", "--data-dir", str(data_dir),
                             "--enable-v2=true", "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"docker-store={peer}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {(data_dir / 'etcd.log').read_text()[-800:]}")
        r = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c",
                            f"import urllib.request; urllib.request.urlopen('{url}/v2/keys', timeout=2)"],
                           capture_output=True)
        if r.returncode == 0:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("etcd did not answer within 30 s")
