"""The CNI plugin driven as a runtime drives it: environment + network configuration on stdin, for every
command and spec version (CHECK too, which podman never sends), bad configurations, DEL of what is gone,
GC, STATUS, and an attachment that outlives a netweftd restart. Real kernel, one host."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, Daemon, sh

VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]


class Plugin:
    def __init__(self, root: Path, daemon: Daemon):
        self.bin_dir = root / "cni-bin"
        r = subprocess.run([str(BIN / "netweft"), "install-cni", "--bin-dir", str(self.bin_dir)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        self.path = self.bin_dir / "netweft"
        self.daemon = daemon
        self.log = root / "cni.log"

    def conf(self, version: str = "1.0.0", network: str = "n", **extra) -> dict:
        return {"cniVersion": version, "name": network, "type": "netweft", "network": network,
                "socket": f"unix://{self.daemon.sock}", "log": str(self.log), **extra}

    def run(self, command: str, conf, cid: str = "ctr1", ifname: str = "eth0", netns: str = "",
            args: str = "", env: dict | None = None) -> tuple[int, dict | None]:
        stdin = conf.decode() if isinstance(conf, bytes) else conf if isinstance(conf, str) else json.dumps(conf)
        e = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
             "CNI_IFNAME": ifname, "CNI_NETNS": netns, "CNI_ARGS": args, "CNI_PATH": str(self.bin_dir)}
        e.update(env or {})
        e = {k: v for k, v in e.items() if v is not None}
        r = subprocess.run(["nsenter", f"--net={self.daemon.host.path}", str(self.path)], input=stdin,
                           capture_output=True, text=True, env=e, timeout=60)
        out = r.stdout.strip()
        assert r.stderr == "", r.stderr
        assert "\n" not in out, out
        return r.returncode, json.loads(out) if out else None


@pytest.fixture
def plugin(root, daemon):
    return Plugin(root, daemon)


def netns(root: Path, name: str) -> str:
    """A namespace made as a runtime makes one (outside netweft), under the test's root."""
    path = root / name
    path.touch()
    sh("unshare", f"--net={path}", "true")
    return str(path)


def in_ns(path: str, *cmd: str) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--net={path}", *cmd, check=False)


def addr_of(path: str, ifname: str) -> tuple[str, str]:
    link = json.loads(in_ns(path, "ip", "-j", "addr", "show", ifname).stdout)[0]
    a = next(a for a in link["addr_info"] if a["family"] == "inet")
    return f"{a['local']}/{a['prefixlen']}", link["address"]


def error_of(code: int, out: dict, want: int) -> str:
    assert code != 0 and out["code"] == want, out
    assert set(out) == {"cniVersion", "code", "msg", "details"} and "\n" not in out["msg"], out
    return out["msg"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_for_each_spec_version(daemon, plugin, root, version):
    daemon.cli("network", "create", "--subnet", "198.18.60.0/24", "n")
    ns = netns(root, "ns1")
    code, res = plugin.run("ADD", plugin.conf(version), netns=ns, args="IgnoreUnknown=1;IP=198.18.60.7;MAC=02:aa:bb:cc:dd:07")
    assert code == 0, res
    assert res["cniVersion"] == version
    assert res["interfaces"] == [{"name": "eth0", "mac": "02:aa:bb:cc:dd:07", "sandbox": ns}]
    ip0 = {"address": "198.18.60.7/24", "gateway": "198.18.60.1", "interface": 0}
    assert res["ips"] == [{**ip0, "version": "4"} if version == "0.4.0" else ip0]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.18.60.1"}]
    assert addr_of(ns, "eth0") == ("198.18.60.7/24", "02:aa:bb:cc:dd:07")
    assert in_ns(ns, "ping", "-c1", "-W2", "198.18.60.1").returncode == 0
    # CHECK against the result just given: fine; against another address: refused.
    assert plugin.run("CHECK", plugin.conf(version, prevResult=res), netns=ns) == (0, None)
    bad = {**res, "ips": [{**res["ips"][0], "address": "198.18.60.8/24"}]}
    code, out = plugin.run("CHECK", plugin.conf(version, prevResult=bad), netns=ns)
    assert "198.18.60.7/24" in error_of(code, out, 101)
    # The endpoint is an owned record: netweft shows it on the network.
    view = json.loads(daemon.cli("network", "inspect", "n").stdout)[0]
    assert [c["IPv4Address"] for c in view["Containers"].values()] == ["198.18.60.7/24"]
    assert plugin.run("DEL", plugin.conf(version), netns=ns) == (0, None)
    assert in_ns(ns, "ip", "link", "show", "eth0").returncode != 0
    assert json.loads(daemon.cli("network", "inspect", "n").stdout)[0]["Containers"] == {}
    # DEL again, and CHECK of what is gone.
    assert plugin.run("DEL", plugin.conf(version), netns=ns) == (0, None)
    code, out = plugin.run("CHECK", plugin.conf(version, prevResult=res), netns=ns)
    assert "has no interface eth0" in error_of(code, out, 100)
    log = [json.loads(l) for l in plugin.log.read_text().splitlines()]
    assert {l["command"] for l in log} == {"ADD", "CHECK", "DEL"} and all(l["ms"] > 0 for l in log)


def test_version_status_and_gc(daemon, plugin, root):
    daemon.cli("network", "create", "--subnet", "198.18.61.0/24", "n")
    for v in VERSIONS:
        code, out = plugin.run("VERSION", {"cniVersion": v})
        assert code == 0 and out == {"cniVersion": v, "supportedVersions": VERSIONS}
    assert plugin.run("STATUS", plugin.conf("1.1.0")) == (0, None)
    code, out = plugin.run("STATUS", plugin.conf("1.1.0", network="nope"))
    assert "not found" in error_of(code, out, 50)
    code, out = plugin.run("STATUS", plugin.conf("1.1.0", socket=f"unix://{root}/no.sock"))
    assert "cannot reach netweftd" in error_of(code, out, 50)
    code, out = plugin.run("STATUS", plugin.conf("1.0.0"))
    assert "needs cniVersion 1.1.0" in error_of(code, out, 1)
    spaces = {c: netns(root, c) for c in ("a", "b", "c")}
    for cid, ns in spaces.items():
        code, res = plugin.run("ADD", plugin.conf("1.1.0"), cid=cid, netns=ns,
                               env={} if cid != "c" else None)
        assert code == 0, res
    # The runtime still knows a and c: b goes, with its interface.
    valid = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "c", "ifname": "eth0"}]
    assert plugin.run("GC", plugin.conf("1.1.0", **{"cni.dev/valid-attachments": valid})) == (0, None)
    assert in_ns(spaces["b"], "ip", "link", "show", "eth0").returncode != 0
    assert in_ns(spaces["a"], "ip", "link", "show", "eth0").returncode == 0
    owners = {c["Name"] for c in json.loads(daemon.cli("network", "inspect", "n").stdout)[0]["Containers"].values()}
    assert owners == {"a", "c"}
    assert plugin.run("GC", plugin.conf("1.1.0")) == (0, None)
    assert json.loads(daemon.cli("network", "inspect", "n").stdout)[0]["Containers"] == {}


def test_bad_configurations_and_environments_are_cni_errors(daemon, plugin, root):
    ns = netns(root, "ns1")
    cases = [
        (b"", {}, 6, "no network configuration"),
        (b"{not json", {}, 6, "not JSON"),
        (b"[1]", {}, 6, "not a JSON object"),
        (json.dumps(plugin.conf("0.3.1")), {}, 1, "not supported"),
        (json.dumps(plugin.conf("2.0.0")), {}, 1, "not supported"),
        (json.dumps({**plugin.conf(), "type": "bridge"}), {}, 7, "type 'bridge'"),
        (json.dumps({k: v for k, v in plugin.conf().items() if k != "name"}), {}, 7, "name is missing"),
        (json.dumps({**plugin.conf(), "socket": "tcp://1.2.3.4:1"}), {}, 7, "not unix:///PATH"),
        (json.dumps({**plugin.conf(), "runtimeConfig": {"ips": "198.18.0.1"}}), {}, 7, "ips must be a list"),
        (json.dumps({**plugin.conf(), "runtimeConfig": {"mac": "zz"}}), {}, 7, "not a MAC"),
        (json.dumps(plugin.conf()), {"CNI_COMMAND": "FROB"}, 4, "CNI_COMMAND 'FROB'"),
        (json.dumps(plugin.conf()), {"CNI_COMMAND": None}, 4, "CNI_COMMAND is not set"),
        (json.dumps(plugin.conf()), {"CNI_CONTAINERID": "bad/id"}, 4, "CNI_CONTAINERID"),
        (json.dumps(plugin.conf()), {"CNI_IFNAME": "x" * 16}, 4, "CNI_IFNAME"),
        (json.dumps(plugin.conf()), {"CNI_NETNS": None}, 4, "CNI_NETNS is not set"),
        (json.dumps(plugin.conf()), {"CNI_NETNS": "/proc/nonexistent/ns/net"}, 3, "does not exist"),
        (json.dumps(plugin.conf()), {"CNI_ARGS": "IP"}, 4, "CNI_ARGS"),
    ]
    for stdin, env, want, words in cases:
        code, out = plugin.run("ADD", stdin, netns=ns, env=env)
        assert words in error_of(code, out, want), (stdin, env, out)
    # The daemon's refusals: no such network, an address outside the subnet, a taken address.
    daemon.cli("network", "create", "--subnet", "198.18.62.0/24", "n")
    code, out = plugin.run("ADD", plugin.conf(network="nope"), netns=ns)
    assert "network 'nope' not found" in error_of(code, out, 100)
    code, out = plugin.run("ADD", plugin.conf(), netns=ns, args="IP=203.0.113.5")
    assert "203.0.113.5" in error_of(code, out, 100)
    assert plugin.run("ADD", plugin.conf(), netns=ns, args="IP=198.18.62.5")[0] == 0
    code, out = plugin.run("ADD", plugin.conf(), cid="other", netns=netns(root, "ns2"), args="IP=198.18.62.5")
    assert "198.18.62.5" in error_of(code, out, 100)
    # No daemon: ADD says try again later.
    code, out = plugin.run("ADD", plugin.conf(socket=f"unix://{root}/no.sock"), netns=ns)
    assert "cannot reach netweftd" in error_of(code, out, 11)


def test_del_of_what_is_gone_succeeds(daemon, plugin, root):
    daemon.cli("network", "create", "--subnet", "198.18.63.0/24", "n")
    # Never added; unknown network; no netns given; no daemon at all.
    assert plugin.run("DEL", plugin.conf(), cid="never") == (0, None)
    assert plugin.run("DEL", plugin.conf(network="gone"), cid="never") == (0, None)
    assert plugin.run("DEL", plugin.conf(socket=f"unix://{root}/no.sock")) == (0, None)
    # The namespace went first (the runtime removed it), then DEL: the endpoint record goes too.
    ns = netns(root, "ns1")
    assert plugin.run("ADD", plugin.conf(), netns=ns)[0] == 0
    sh("umount", ns)
    os.unlink(ns)
    assert plugin.run("DEL", plugin.conf(), netns=ns) == (0, None)
    assert json.loads(daemon.cli("network", "inspect", "n").stdout)[0]["Containers"] == {}
    assert daemon.cli("network", "rm", "n").returncode == 0


def test_attachment_survives_a_daemon_restart(daemon, plugin, root):
    daemon.cli("network", "create", "--subnet", "198.18.64.0/24", "n")
    ns = netns(root, "ns1")
    rc = {"ips": ["198.18.64.9/24"], "mac": "02:00:c6:12:40:09", "aliases": {"n": ["web", "bad_name"]}}
    code, res = plugin.run("ADD", plugin.conf(runtimeConfig=rc), netns=ns)
    assert code == 0 and res["ips"][0]["address"] == "198.18.64.9/24", res
    assert addr_of(ns, "eth0") == ("198.18.64.9/24", "02:00:c6:12:40:09")
    daemon.stop()
    daemon.start()
    assert in_ns(ns, "ping", "-c1", "-W2", "198.18.64.1").returncode == 0
    assert plugin.run("CHECK", plugin.conf(prevResult=res), netns=ns) == (0, None)
    records = [e for e in json.loads(daemon.cli("network", "inspect", "n").stdout)[0]["Containers"].values()]
    assert [r["IPv4Address"] for r in records] == ["198.18.64.9/24"]
    assert plugin.run("DEL", plugin.conf(), netns=ns) == (0, None)
