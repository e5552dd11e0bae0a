"""Other runtimes on netweft: podman through the CNI plugin, dockerd through the remote driver.

On a 2-host lab (h1, h2; an overlay `ov`, a netweft container `pinger` on h2):
  (a) podman run on h1 -> reachable from h2: from the start of `podman run -d --ip X` to the first reply
      of a ping already running in h2's container; also `podman run`'s own time and the plugin's ADD time
      (its own log line, measured inside the plugin).
  (b) the same `podman run` on h1 on podman's own bridge plugin (bridge + host-local, one host).
  (c) the plugin's ADD+DEL driven directly (env + stdin, a fresh namespace each), netweft on a netweft
      bridge network and on the overlay, against podman's bridge plugin.
  (d) dockerd on h1 and h2 with a netweft network: `docker run -d --ip X` on h2 -> first reply of a ping
      already running in a Docker container on h1, against Docker's own overlay figures on this kind of
      machine (the shared baseline script docker-swarm-baseline.sh: 2.05 s and 2.08 s run -> first reply).
Medians of a few rounds. Everything made (the lab, podman's and dockerd's containers and state) is
removed at the end, also on failure or Ctrl-C.

    sudo .venv/bin/python bench/bench_cni.py [--rounds 5] [--no-docker]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from _lab import Bench, median

from netweft.lab.clients import Dockerd, Podman, busybox_rootfs, docker_store_url, start_docker_store

BIN = Path(sys.executable).parent
# Docker 20.10 swarm overlay on this kind of machine (docker-swarm-baseline.sh, 2026-12-03): run -> first reply.
DOCKER_OVERLAY_RUN_TO_REPLY = (2.051, 2.076)


class Pinger:
    """A ping started before the container exists; records when its first reply came."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.done_at: float | None = None
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.done_at = time.perf_counter()

    def result(self, timeout: float = 90) -> float | None:
        self.thread.join(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
            return None
        return self.done_at if self.proc.returncode == 0 else None


def ping_argv(target: str) -> list[str]:
    return ["ping", "-n", "-q", "-c1", "-i0.02", "-w60", target]


def fmt(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    if not values:
        return "n/a"
    return (f"median {median(values) * scale:.3f} {unit} (min {min(values) * scale:.3f}, "
            f"max {max(values) * scale:.3f}, n={len(values)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-docker", action="store_true")
    args = ap.parse_args()
    with Bench() as b:
        lab = b.lab(2)
        work = lab.root / "bench-cni"
        work.mkdir()
        rootfs = busybox_rootfs(work / "rootfs")
        cni_bin = work / "cni-bin"
        subprocess.run([str(BIN / "netweft"), "install-cni", "--bin-dir", str(cni_bin)], check=True,
                       capture_output=True)
        plugin = str(cni_bin / "netweft")

        def nw(host: str, *a: str) -> subprocess.CompletedProcess:
            argv, env = lab.exec_argv(host, ["netweft", *a])
            return subprocess.run(argv, env=env, capture_output=True, text=True, check=True)

        nw("h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.100.0/24", "ov")
        nw("h1", "network", "create", "--subnet", "198.19.240.0/24", "lbr")
        nw("h2", "run", "-d", "--name", "pinger", "--network", "ov", "--", "sleep", "infinity")
        pod = Podman(lab.ns_path("h1"), work / "podman", cni_bin)
        docker: list[Dockerd] = []
        try:
            log = work / "cni.log"
            pod.add_network("ov", "ov", lab.socket("h1"), log=str(log))
            (pod.conf_dir / "pbr.conflist").write_text(json.dumps({
                "cniVersion": "1.0.0", "name": "pbr", "plugins": [{
                    "type": "bridge", "bridge": "nwtpbr0", "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.250.0/24"}]]}}]}))
            reach, run_ov, run_br, adds = [], [], [], []
            for i in range(args.rounds):
                ip = f"198.18.100.{20 + i}"
                argv, env = lab.exec_argv("h2", ["netweft", "exec", "pinger", "--", *ping_argv(ip)])
                pinger = Pinger(argv, env)
                time.sleep(0.3)   # the pinger is running before the container exists
                t0 = time.perf_counter()
                pod("run", "-d", "--name", f"ov{i}", "--network", "ov", "--ip", ip, "--rootfs", str(rootfs),
                    "sleep", "1000")
                run_ov.append(time.perf_counter() - t0)
                done = pinger.result()
                if done is not None:
                    reach.append(done - t0)
                adds.append([json.loads(l) for l in log.read_text().splitlines() if '"ADD"' in l][-1]["ms"] / 1000)
                t0 = time.perf_counter()
                pod("run", "-d", "--name", f"br{i}", "--network", "pbr", "--rootfs", str(rootfs), "sleep", "1000")
                run_br.append(time.perf_counter() - t0)
                pod("rm", "-f", "-t", "0", f"ov{i}", f"br{i}")
            print(f"podman 4.3 (CNI), {args.rounds} rounds")
            print(f"  (a) podman run on h1 -> first reply from h2 (netweft overlay): {fmt(reach)}")
            print(f"      podman run -d itself, netweft overlay:                   {fmt(run_ov)}")
            print(f"      netweft plugin's own ADD time inside podman run:         {fmt(adds, 'ms', 1000)}")
            print(f"  (b) podman run -d itself, podman's bridge plugin (one host):   {fmt(run_br)}")

            # (c) The plugins driven directly, a fresh namespace each time.
            direct = {"netweft overlay": [], "netweft bridge network": [], "CNI bridge + host-local": []}
            confs = {
                "netweft overlay": {"cniVersion": "1.0.0", "name": "ov", "type": "netweft", "network": "ov",
                                    "socket": lab.socket("h1")},
                "netweft bridge network": {"cniVersion": "1.0.0", "name": "lbr", "type": "netweft",
                                           "network": "lbr", "socket": lab.socket("h1")},
                "CNI bridge + host-local": {"cniVersion": "1.0.0", "name": "pbr2", "type": "bridge",
                                            "bridge": "nwtpbr1", "isGateway": True, "ipMasq": False,
                                            "ipam": {"type": "host-local", "dataDir": str(work / "host-local"),
                                                     "ranges": [[{"subnet": "198.19.251.0/24"}]]}},
            }
            for i in range(args.rounds * 2):
                ns = work / f"ns{i}"
                ns.touch()
                subprocess.run(["unshare", f"--net={ns}", "true"], check=True)
                try:
                    for name, conf in confs.items():
                        exe = plugin if conf["type"] == "netweft" else "/usr/lib/cni/bridge"
                        argv = ["nsenter", f"--net={lab.ns_path('h1')}", exe]
                        direct[name].append(plugin_add_del_in(argv, conf, str(ns), f"bench{i}"))
                finally:
                    subprocess.run(["umount", str(ns)], capture_output=True)
                    ns.unlink()
            print(f"  (c) plugin ADD driven directly (env + stdin; process start included), {args.rounds * 2} each:")
            for name, v in direct.items():
                print(f"      {name:26s} {fmt(v, 'ms', 1000)}")
        finally:
            pod.close()

        if not args.no_docker:
            try:
                start_docker_store(lab.ns_path("h1"), lab.address("h1"), work / "docker-store")
                store = docker_store_url(lab.address("h1"))
                for h in ("h1", "h2"):
                    dk = Dockerd(lab.ns_path(h), work / f"docker-{h}", str(lab.host_dir(h) / "docker-plugin.sock"),
                                 cluster_store=store)
                    docker.append(dk)
                    dk.import_rootfs(rootfs)
                d1, d2 = docker
                d1("network", "create", "-d", "netweft", "--ipam-driver", "netweft", "--subnet", "198.18.101.0/24", "dn")
                d1("run", "-d", "--name", "dpinger", "--network", "dn", "nwt-busybox:1", "sleep", "100000")
                pid = json.loads(d1("inspect", "dpinger").stdout)[0]["State"]["Pid"]
                reach, runs = [], []
                for i in range(args.rounds):
                    ip = f"198.18.101.{20 + i}"
                    pinger = Pinger(["nsenter", "-t", str(pid), "-n", *ping_argv(ip)])
                    time.sleep(0.3)
                    t0 = time.perf_counter()
                    d2("run", "-d", "--name", f"d{i}", "--network", "dn", "--ip", ip, "nwt-busybox:1", "sleep", "1000")
                    runs.append(time.perf_counter() - t0)
                    done = pinger.result()
                    if done is not None:
                        reach.append(done - t0)
                    d2("rm", "-f", f"d{i}")
                print(f"dockerd 20.10 with netweft's remote driver, {args.rounds} rounds")
                print(f"  (d) docker run on h2 -> first reply from h1 (netweft network): {fmt(reach)}")
                print(f"      docker run -d itself:                                     {fmt(runs)}")
                print(f"      Docker's own swarm overlay, same kind of machine:           "
                      f"{' and '.join(f'{v:.3f} s' for v in DOCKER_OVERLAY_RUN_TO_REPLY)} (run -> first reply)")
            finally:
                for dk in docker:
                    dk.close()


def plugin_add_del_in(argv: list[str], conf: dict, netns: str, cid: str) -> float:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_NETNS": netns, "CNI_PATH": "/usr/lib/cni"}
    t = time.perf_counter()
    r = subprocess.run(argv, input=json.dumps(conf), capture_output=True, text=True, env={**env, "CNI_COMMAND": "ADD"})
    add = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{argv[-1]} ADD failed: {r.stdout.strip()[:300]} {r.stderr.strip()[:300]}")
    subprocess.run(argv, input=json.dumps(conf), capture_output=True, text=True, env={**env, "CNI_COMMAND": "DEL"})
    return add


if __name__ == "__main__":
    main()
