"""Local bridge networks on a real kernel: the management-network scenario and its edges."""
from __future__ import annotations

import json

from conftest import Daemon


def net_inspect(d: Daemon, name: str) -> dict:
    return json.loads(d.cli("network", "inspect", name).stdout)[0]


def ctr_inspect(d: Daemon, name: str) -> dict:
    return json.loads(d.cli("inspect", name).stdout)[0]


def run(d: Daemon, name: str, net: str | None = None, ip: str | None = None, hostname: str | None = None,
        *extra: str):
    args = ["run", "-d", "--name", name]
    if hostname:
        args += ["--hostname", hostname]
    if net:
        args += ["--network", net]
    if ip:
        args += ["--ip", ip]
    return d.cli(*args, *extra, "--", "sleep", "1000")


def test_management_network_hostnames_and_fixed_ips(daemon):
    d = daemon
    d.cli("network", "create", "-d", "bridge", "--subnet", "198.18.10.0/24", "--gateway", "198.18.10.1",
          "--label", "role=mgmt", "mgmt")
    run(d, "controller01", "mgmt", "198.18.10.11", "controller01")
    run(d, "compute01", "mgmt", "198.18.10.21", "compute01")
    assert d.ping("controller01", "198.18.10.21")
    assert d.ping("compute01", "198.18.10.11")
    assert d.exec("controller01", "hostname").stdout.strip() == "controller01"
    assert d.exec("compute01", "hostname").stdout.strip() == "compute01"
    hosts = d.exec("compute01", "cat", "/etc/hosts").stdout
    assert "198.18.10.21" in hosts and "compute01" in hosts
    # The container's address and MAC are what inspect says.
    c = ctr_inspect(d, "controller01")
    ep = c["NetworkSettings"]["Networks"]["mgmt"]
    assert ep["IPAddress"] == "198.18.10.11"
    addr = d.exec("controller01", "ip", "-j", "addr", "show", "eth0").stdout
    info = json.loads(addr)[0]
    assert info["address"] == ep["MacAddress"]
    assert any(a["local"] == "198.18.10.11" and a["prefixlen"] == 24 for a in info["addr_info"])
    # Docker-shaped inspect of the network.
    n = net_inspect(d, "mgmt")
    assert n["Driver"] == "bridge" and n["Scope"] == "local" and n["Labels"] == {"role": "mgmt"}
    assert n["IPAM"]["Config"][0]["Subnet"] == "198.18.10.0/24"
    assert {v["Name"]: v["IPv4Address"] for v in n["Containers"].values()} == {
        "controller01": "198.18.10.11/24", "compute01": "198.18.10.21/24"}
    ls = d.cli("network", "ls").stdout
    assert "mgmt" in ls and "bridge" in ls
    assert n["Id"][:12] in d.cli("network", "ls", "-q").stdout.split()
    assert d.cli("network", "ls", "--filter", "label=role=other", "-q").stdout.strip() == ""
    assert d.cli("network", "ls", "--filter", "type=custom", "-q").stdout.split() == [n["Id"][:12]]
    assert [json.loads(l)["Name"] for l in d.cli("network", "ls", "--format", "json").stdout.splitlines()] == [
        "host", "mgmt", "none"]


def test_networks_are_isolated(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.1.0/24", "a")
    d.cli("network", "create", "--subnet", "198.18.2.0/24", "b")
    run(d, "ca", "a", "198.18.1.10")
    run(d, "cb", "b", "198.18.2.10")
    assert d.ping("ca", "198.18.1.1")  # own gateway works
    assert not d.ping("ca", "198.18.2.10")
    assert not d.ping("cb", "198.18.1.10")


def make_outside(make_ns, host):
    """An 'outside' namespace on 203.0.113.0/24 with no route back to the container subnets."""
    out = make_ns("out")
    host.ip("link", "add", "uplink", "type", "veth", "peer", "name", "wan", "netns", out.name)
    host.ip("addr", "add", "203.0.113.1/24", "dev", "uplink")
    host.ip("link", "set", "uplink", "up")
    out.ip("addr", "add", "203.0.113.2/24", "dev", "wan")
    out.ip("link", "set", "wan", "up")
    return out


def test_egress_via_nat_but_not_from_internal(daemon, make_ns, host):
    d = daemon
    make_outside(make_ns, host)
    d.cli("network", "create", "--subnet", "198.18.3.0/24", "open")
    d.cli("network", "create", "--subnet", "198.18.4.0/24", "--internal", "closed")
    run(d, "egress", "open")
    run(d, "jail", "closed")
    assert d.ping("egress", "203.0.113.2")  # only possible through masquerade: outside has no route back
    assert not d.ping("jail", "203.0.113.2")
    assert not d.exec("jail", "ip", "route", "show", "default").stdout.strip()
    assert json.loads(d.cli("network", "inspect", "closed").stdout)[0]["Internal"] is True


def test_container_on_two_networks(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.5.0/24", "front")
    d.cli("network", "create", "--subnet", "198.18.6.0/24", "back")
    run(d, "web", "front", "198.18.5.10")
    run(d, "db", "back", "198.18.6.10")
    d.cli("network", "connect", "--ip", "198.18.6.20", "--alias", "webapp", "back", "web")
    assert d.ping("web", "198.18.5.1") and d.ping("web", "198.18.6.10")
    assert d.ping("db", "198.18.6.20")
    routes = json.loads(d.exec("web", "ip", "-j", "route", "show", "default").stdout)
    assert routes[0]["gateway"] == "198.18.5.1" and routes[0]["dev"] == "eth0"
    assert "webapp" in d.exec("web", "cat", "/etc/hosts").stdout
    d.cli("network", "disconnect", "back", "web")
    assert not d.ping("web", "198.18.6.10")
    assert "web" not in json.dumps(net_inspect(d, "back")["Containers"])


def test_host_and_none_modes(daemon, host):
    d = daemon
    host.ip("link", "add", "nwtifb7", "type", "ifb")
    d.cli("run", "-d", "--name", "hostnet", "--network", "host", "--", "sleep", "1000")
    d.cli("run", "-d", "--name", "nonet", "--network", "none", "--hostname", "lonely", "--", "sleep", "1000")
    links_host = {l["ifname"] for l in json.loads(d.exec("hostnet", "ip", "-j", "link").stdout)}
    assert "nwtifb7" in links_host
    links_none = {l["ifname"] for l in json.loads(d.exec("nonet", "ip", "-j", "link").stdout)}
    assert links_none == {"lo"}
    assert d.exec("nonet", "hostname").stdout.strip() == "lonely"
    d.cli("network", "create", "--subnet", "198.18.7.0/24", "x")
    r = d.cli("network", "connect", "x", "hostnet", check=False)
    assert r.returncode != 0 and "--network host" in r.stderr


def test_parent_interface_puts_container_on_lan_without_nat(daemon, make_ns, host):
    d = daemon
    lan = make_ns("lan")
    host.ip("link", "add", "lan0", "type", "veth", "peer", "name", "lanport", "netns", lan.name)
    lan.ip("addr", "add", "198.18.8.1/24", "dev", "lanport")
    lan.ip("link", "set", "lanport", "up")
    d.cli("network", "create", "--subnet", "198.18.8.0/24", "--gateway", "198.18.8.1", "-o", "parent=lan0", "lan")
    run(d, "onlan", "lan", "198.18.8.10")
    assert d.ping("onlan", "198.18.8.1")
    # The LAN sees the container's own address (no NAT): its neighbour table learned it.
    neigh = json.loads(lan.ip("-j", "neigh", "show", "dev", "lanport").stdout)
    assert any(n["dst"] == "198.18.8.10" for n in neigh)
    n = net_inspect(d, "lan")
    assert n["Options"]["parent"] == "lan0"


def test_mtu_option_honoured(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.9.0/24", "-o", "com.docker.network.driver.mtu=1400",
          "-o", "com.docker.network.bridge.name=nwt-mtubr", "small")
    run(d, "m", "small")
    link = json.loads(d.exec("m", "ip", "-j", "link", "show", "eth0").stdout)[0]
    assert link["mtu"] == 1400
    br = json.loads(d.host.ip("-j", "link", "show", "nwt-mtubr").stdout)[0]
    assert br["mtu"] == 1400


def test_restart_keeps_containers_reachable(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.11.0/24", "keep")
    run(d, "k1", "keep", "198.18.11.10", "k1")
    run(d, "k2", "keep", "198.18.11.11", "k2")
    before = (net_inspect(d, "keep"), ctr_inspect(d, "k1")["State"]["Pid"])
    d.stop()
    r = d.host.run("nsenter", "-t", str(before[1]), "-n", "ping", "-c1", "-W1", "198.18.11.11")
    assert r.returncode == 0, "the data plane must keep working while the daemon is down"
    d.start()
    after = (net_inspect(d, "keep"), ctr_inspect(d, "k1")["State"]["Pid"])
    assert after == before
    assert d.ping("k1", "198.18.11.11") and d.ping("k2", "198.18.11.10")
    run(d, "k3", "keep", "198.18.11.12")
    assert d.ping("k3", "198.18.11.10")


def test_restart_repairs_a_deleted_veth(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.12.0/24", "heal")
    run(d, "h1", "heal", "198.18.12.10")
    run(d, "h2", "heal", "198.18.12.11")
    veth = ctr_inspect(d, "h1")["NetworkSettings"]["Networks"]["heal"]["HostInterface"]
    d.stop()
    d.host.ip("link", "del", veth)
    d.start()
    assert d.ping("h1", "198.18.12.11")


def test_logs_ps_stop_start_rm(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.13.0/24", "life")
    r = d.cli("run", "--name", "once", "--network", "life", "--hostname", "echoer", "--", "sh", "-c",
              "echo hello from $(hostname); exit 3", check=False)
    assert r.returncode == 3 and "hello from echoer" in r.stdout
    assert "hello from echoer" in d.cli("logs", "once").stdout
    assert "exited (3)" in d.cli("ps", "-a").stdout
    assert "once" not in d.cli("ps").stdout
    run(d, "long", "life")
    d.cli("stop", "-t", "1", "long")
    assert ctr_inspect(d, "long")["State"]["Running"] is False
    d.cli("start", "long")
    assert ctr_inspect(d, "long")["State"]["Running"] is True
    assert d.ping("long", "198.18.13.1")
    assert d.cli("rm", "long", check=False).returncode != 0  # running: refused
    d.cli("rm", "-f", "long", "once")
    assert d.cli("ps", "-a", "-q").stdout.strip() == ""
    d.cli("network", "rm", "life")
    assert d.cli("network", "ls", "--filter", "type=custom", "-q").stdout.strip() == ""


def test_default_pool_and_prune(daemon):
    d = daemon
    d.cli("network", "create", "p1")
    d.cli("network", "create", "p2")
    s1 = net_inspect(d, "p1")["IPAM"]["Config"][0]["Subnet"]
    s2 = net_inspect(d, "p2")["IPAM"]["Config"][0]["Subnet"]
    assert s1 == "198.19.0.0/24" and s2 == "198.19.1.0/24"
    run(d, "user", "p2")
    out = d.cli("network", "prune", "-f").stdout
    assert "p1" in out and "p2" not in out
    assert d.cli("network", "ls", "--filter", "type=custom", "--format", "json").stdout.count("\n") == 1
