"""Real clients on netweft networks, in lab hosts: podman (CNI backend) and dockerd (remote driver).

Each test removes what its runtimes made (containers, their namespaces) before the lab goes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab_fixture import run_cli, wait_for
from netweft.lab.clients import Dockerd, Podman, busybox_rootfs, docker_store_url, start_docker_store
from netweft.lab.lab import Lab


@pytest.fixture
def rootfs(root) -> Path:
    return busybox_rootfs(root / "rootfs")


@pytest.fixture
def cni_bin(root) -> Path:
    from conftest import BIN
    d = root / "cni-bin"
    subprocess.run([str(BIN / "netweft"), "install-cni", "--bin-dir", str(d)], check=True, capture_output=True)
    return d


@pytest.fixture
def podmans(root, cni_bin):
    made: list[Podman] = []

    def make(lab: Lab, host: str) -> Podman:
        p = Podman(lab.ns_path(host), root / f"podman-{lab.name}-{host}", cni_bin)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


def endpoints(lab: Lab, host: str, net: str) -> dict:
    return json.loads(run_cli(lab, host, "network", "inspect", net).stdout)[0]["Containers"]


def test_podman_on_two_hosts_fixed_ip_and_mac_ping_and_rm(make_lab, podmans, rootfs):
    lab = make_lab(2)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.70.0/24", "ov")
    pods = {}
    for i, host in enumerate(("h1", "h2"), start=1):
        p = pods[host] = podmans(lab, host)
        p.add_network("ov", "ov", lab.socket(host))
        p("run", "-d", "--name", f"c{i}", "--network", "ov", "--ip", f"198.18.70.{10 + i}",
          "--mac-address", f"02:00:c6:12:46:{10 + i:02x}", "--rootfs", str(rootfs), "sleep", "1000")
    for host, ip, mac in (("h1", "198.18.70.11", "02:00:c6:12:46:0b"), ("h2", "198.18.70.12", "02:00:c6:12:46:0c")):
        link = pods[host]("exec", "c1" if host == "h1" else "c2", "ip", "addr", "show", "eth0").stdout
        assert f"inet {ip}/24" in link and mac in link, link
    assert pods["h1"]("exec", "c1", "ping", "-c1", "-W3", "198.18.70.12", check=False).returncode == 0
    assert pods["h2"]("exec", "c2", "ping", "-c1", "-W3", "198.18.70.11", check=False).returncode == 0
    # The endpoints are netweft's records, owned by CNI attachments; the manager knows both.
    mine = endpoints(lab, "h2", "ov")
    assert [c["IPv4Address"] for c in mine.values()] == ["198.18.70.12/24"]
    # podman rm: the endpoint is gone here, at the manager, and from the other host's peers.
    pods["h2"]("rm", "-f", "-t", "0", "c2")
    wait_for(lambda: endpoints(lab, "h2", "ov") == {}, 20, "the endpoint gone on h2")
    wait_for(lambda: all(c["IPv4Address"] != "198.18.70.12/24" for c in endpoints(lab, "h1", "ov").values()),
             20, "the endpoint gone from h1's view")
    assert pods["h1"]("exec", "c1", "ping", "-c1", "-W1", "198.18.70.12", check=False).returncode != 0


def test_podman_published_port_on_an_overlay(make_lab, podmans, rootfs):
    lab = make_lab(2)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.71.0/24", "ov")
    p = podmans(lab, "h1")
    p.add_network("ov", "ov", lab.socket("h1"))
    p("run", "-d", "--name", "web", "--network", "ov", "-p", "8080:80", "--rootfs", str(rootfs),
      "httpd", "-f", "-p", "80", "-h", "/www")
    url = f"http://{lab.address('h1')}:8080/index.html"
    argv, env = lab.exec_argv("h2", [sys.executable, "-c", "import sys, urllib.request; "
                                     f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"])
    got = wait_for(lambda: subprocess.run(argv, env=env, capture_output=True, text=True).stdout, 20,
                   "the published port answering from another host")
    assert got == "hello from a container\n"
    # Taken host ports are refused, in one line; the container is not started.
    r = p("run", "-d", "--name", "web2", "--network", "ov", "-p", "8080:80", "--rootfs", str(rootfs),
          "httpd", "-f", "-p", "80", check=False)
    assert r.returncode != 0 and "port 8080 of this host is already published" in r.stderr, r.stderr
    p("rm", "-f", "-t", "0", "web")
    assert subprocess.run(argv, env=env, capture_output=True, text=True).returncode != 0


@pytest.fixture
def dockerds(root):
    made: list[Dockerd] = []

    def make(lab: Lab, host: str, store: str) -> Dockerd:
        dk = Dockerd(lab.ns_path(host), root / f"docker-{lab.name}-{host}", str(lab.host_dir(host) / "docker-plugin.sock"),
                     cluster_store=store)
        made.append(dk)
        return dk

    try:
        yield make
    finally:
        for dk in made:
            dk.close()


def docker_cluster(lab: Lab, root: Path, dockerds, rootfs: Path, hosts=("h1", "h2")) -> dict:
    """dockerd on each host, sharing Docker's cluster store (an etcd on h1), the busybox image imported."""
    start_docker_store(lab.ns_path("h1"), lab.address("h1"), root / f"docker-store-{lab.name}")
    store = docker_store_url(lab.address("h1"))
    out = {}
    for h in hosts:
        out[h] = dockerds(lab, h, store)
        out[h].import_rootfs(rootfs)
    return out


def test_docker_network_across_two_hosts_survives_restarts_and_rm_removes_it_everywhere(make_lab, dockerds, rootfs,
                                                                                       root):
    lab = make_lab(2)
    dk = docker_cluster(lab, root, dockerds, rootfs)
    dk["h1"]("network", "create", "-d", "netweft", "--ipam-driver", "netweft", "--subnet", "198.18.80.0/24", "dn")
    # Global scope: h2's dockerd sees it; netweft made an overlay for it, known on every host.
    assert "dn global" in dk["h2"]("network", "ls", "--format", "{{.Name}} {{.Scope}}").stdout.splitlines()
    dk["h1"]("run", "-d", "--name", "ca", "--network", "dn", "--ip", "198.18.80.10", "nwt-busybox:1", "sleep", "1000")
    dk["h2"]("run", "-d", "--name", "cb", "--network", "dn", "nwt-busybox:1", "sleep", "1000")
    ip_b = json.loads(dk["h2"]("inspect", "cb").stdout)[0]["NetworkSettings"]["Networks"]["dn"]["IPAddress"]
    assert ip_b.startswith("198.18.80.") and ip_b != "198.18.80.10"
    assert dk["h2"]("exec", "cb", "ping", "-c1", "-W3", "198.18.80.10", check=False).returncode == 0
    assert dk["h1"]("exec", "ca", "ping", "-c1", "-W3", ip_b, check=False).returncode == 0
    assert "inet 198.18.80.10/24" in dk["h1"]("exec", "ca", "ip", "addr", "show", "eth0").stdout
    # The overlay netweft made for it, with both containers' endpoints (any host's view).
    name = "docker-" + dk["h1"]("network", "inspect", "dn", "-f", "{{.Id}}").stdout.strip()[:12]
    assert sorted(c["IPv4Address"] for c in endpoints(lab, "h1", name).values()) == ["198.18.80.10/24"]
    # netweftd restarts on h2: the running container keeps its network; Docker's later calls still work.
    lab.stop_daemon("h2")
    lab.start_daemon("h2")
    assert dk["h1"]("exec", "ca", "ping", "-c1", "-W3", ip_b, check=False).returncode == 0
    # dockerd restarts on h2: the network is still there (Docker's store), containers can join it again.
    dk["h2"].stop()
    dk["h2"].start()
    assert "dn" in dk["h2"]("network", "ls", "--format", "{{.Name}}").stdout.split()
    dk["h2"]("rm", "-f", "cb")
    dk["h2"]("run", "-d", "--name", "cc", "--network", "dn", "--ip", "198.18.80.30", "nwt-busybox:1", "sleep", "1000")
    assert dk["h1"]("exec", "ca", "ping", "-c1", "-W3", "198.18.80.30", check=False).returncode == 0
    # Removing the containers releases their endpoints; docker network rm (on a manager host, where netweft
    # removes overlays) removes it everywhere.
    dk["h1"]("rm", "-f", "ca")
    dk["h2"]("rm", "-f", "cc")
    dk["h1"]("network", "rm", "dn")
    for h in ("h1", "h2"):
        assert "dn" not in dk[h]("network", "ls", "--format", "{{.Name}}").stdout.split()
        r = run_cli(lab, h, "network", "inspect", name, check=False)
        assert r.returncode != 0 and "not found" in r.stderr, r.stdout


def test_podman_docker_and_netweft_containers_on_one_overlay_on_three_hosts(make_lab, podmans, dockerds, rootfs,
                                                                            root):
    lab = make_lab(3)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", "198.18.72.0/24", "ov")
    pod = podmans(lab, "h1")
    pod.add_network("ov", "ov", lab.socket("h1"))
    pod("run", "-d", "--name", "from-podman", "--network", "ov", "--ip", "198.18.72.11", "--rootfs", str(rootfs),
        "sleep", "1000")
    dk = docker_cluster(lab, root, dockerds, rootfs, hosts=("h2",))["h2"]
    dk("network", "create", "-d", "netweft", "--ipam-driver", "netweft", "--subnet", "198.18.72.0/24",
       "-o", "netweft.name=ov", "dov")
    dk("run", "-d", "--name", "from-docker", "--network", "dov", "--ip", "198.18.72.12", "nwt-busybox:1", "sleep", "1000")
    run_cli(lab, "h3", "run", "-d", "--name", "from-netweft", "--network", "ov", "--ip", "198.18.72.13", "--",
            "sleep", "1000")
    pings = {
        "podman": lambda ip: pod("exec", "from-podman", "ping", "-c1", "-W3", ip, check=False).returncode == 0,
        "docker": lambda ip: dk("exec", "from-docker", "ping", "-c1", "-W3", ip, check=False).returncode == 0,
        "netweft": lambda ip: run_cli(lab, "h3", "exec", "from-netweft", "--", "ping", "-c1", "-W3", ip,
                                      check=False).returncode == 0,
    }
    ips = {"podman": "198.18.72.11", "docker": "198.18.72.12", "netweft": "198.18.72.13"}
    for src, ping in pings.items():
        for dst, ip in ips.items():
            if src != dst:
                assert ping(ip), f"{src} -> {dst} ({ip})"
    owners = sorted(c["IPv4Address"] for c in endpoints(lab, "h1", "ov").values())
    assert owners == ["198.18.72.11/24"]
    # The Docker network only adopted it: removing it leaves the netweft network to its other users.
    dk("rm", "-f", "from-docker")
    dk("network", "rm", "dov")
    assert run_cli(lab, "h3", "network", "inspect", "ov", check=False).returncode == 0
    run_cli(lab, "h3", "rm", "-f", "from-netweft")
