"""A dockerd 20.10 in a lab host's namespace, to measure Docker beside netweft in the same run.

As FIELD-NOTES.md says: `nsenter --net` + `unshare -m` (never `ip netns exec`), a private tmpfs over /run and
/etc/docker inside its mount namespace (the plugin directories are machine-wide), no bridge, no iptables.
Its state lives under a /tmp/nwt-* root that `stop()` removes; dockerd is stopped with SIGTERM so it takes
its containerd down with it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

DOCKER_CLI = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"  # 20.10, as the daemon


class Dockerd:
    ADDR = "203.0.113.10"  # on a veth inside its namespace: swarm needs an address, nothing is sent

    def __init__(self):
        tag = secrets.token_hex(3)
        self.netns = f"nwt-dk{tag}-h1"  # its own namespace: netweft's manager holds 2377 in the lab's hosts
        self.netns_path = f"/run/netns/{self.netns}"
        self.root = Path(f"/tmp/nwt-dk{tag}")
        self.sock = self.root / "docker.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_API_VERSION": "1.41",
                "DOCKER_CONFIG": str(self.root / "cli")}

    def start(self, timeout: float = 60) -> "Dockerd":
        self.root.mkdir(mode=0o700)
        (self.root / "cli").mkdir()
        # Local networks from the benchmarking range, as netweft's lab does.
        (self.root / "daemon.json").write_text(json.dumps(
            {"default-address-pools": [{"base": "198.18.64.0/18", "size": 24}]}))
        ns = self.netns
        subprocess.run(["ip", "netns", "add", ns], check=True)
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                    ["addr", "add", f"{self.ADDR}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        r = self.root
        script = (f"mount -t tmpfs nwt-docker-run /run && mount -t tmpfs nwt-docker-etc /etc/docker && "
                  f"exec dockerd --data-root {r}/data --exec-root {r}/exec -H unix://{self.sock} "
                  f"--pidfile {r}/docker.pid --config-file {r}/daemon.json --bridge none --iptables=false "
                  f"--ip6tables=false --storage-driver vfs")
        self.log = open(r / "dockerd.log", "wb")
        self.proc = subprocess.Popen(["nsenter", f"--net={self.netns_path}", "unshare", "-m", "--propagation",
                                      "slave", "sh", "-c", script], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(r / 'dockerd.log').read_text()[-1500:]}")
            if self.cli("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout:g} s")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER_CLI, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def swarm_init(self) -> None:
        self.cli("swarm", "init", "--advertise-addr", self.ADDR, "--default-addr-pool", "198.18.128.0/17")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.cli("swarm", "leave", "--force", check=False, timeout=30)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc:
            self.log.close()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def docker_info(d: Dockerd) -> dict:
    return json.loads(d.cli("info", "--format", "{{json .}}").stdout)


def import_busybox(d: Dockerd, tag: str = "nwt-busybox") -> str:
    """A tiny image from the host's busybox (no image can be pulled here), as FIELD-NOTES.md describes."""
    rootfs = d.root / "rootfs"
    for sub in ("bin", "lib/x86_64-linux-gnu", "lib64", "etc"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/busybox", rootfs / "bin" / "busybox")
    for line in subprocess.run(["ldd", "/usr/bin/busybox"], capture_output=True, text=True).stdout.splitlines():
        lib = next((w for w in line.split() if w.startswith("/")), None)
        if lib:
            dest = rootfs / ("lib64" if "ld-linux" in lib else "lib/x86_64-linux-gnu") / os.path.basename(lib)
            shutil.copy2(lib, dest)
    for applet in ("sh", "sleep", "ping", "ip", "cat"):
        os.symlink("busybox", rootfs / "bin" / applet)
    tar = d.root / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    d.cli("import", str(tar), tag)
    return tag
