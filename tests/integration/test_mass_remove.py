"""`netweft rm -f` of many containers at once (daemon/removal.py), on real hosts: every container goes with
its veths, anti-spoofing elements, records, namespace and DNS names, here and at the managers; a name that
fails is reported alone, in order, and the others are removed all the same."""
from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

from lab_fixture import run_cli, wait_for
from netweft.lab.lab import Lab

N = 60
SUBNET = "198.18.4.0/22"


def in_ns(path: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={path}", *argv], capture_output=True, text=True, check=True).stdout


def links(path: str, prefix: str) -> set[str]:
    return {link["ifname"] for link in json.loads(in_ns(path, "ip", "-j", "link", "show") or "[]")
            if link["ifname"].startswith(prefix)}


def guarded(path: str) -> set[str]:
    """The ports in the anti-spoofing map and sets of the namespace (dataplane/antispoof.py)."""
    out = json.loads(in_ns(path, "nft", "-j", "list", "table", "bridge", "netweft_as"))
    ports = set()
    for item in out["nftables"]:
        for kind in ("map", "set"):
            for elem in (item.get(kind) or {}).get("elem", []) or []:
                key = elem[0] if isinstance(elem, list) else elem
                if isinstance(key, dict) and "concat" in key:
                    key = key["concat"][0]
                if isinstance(key, str):
                    ports.add(key)
    return ports


def neighbours(sandbox: str) -> set[str]:
    out = in_ns(sandbox, "ip", "-j", "neigh", "show", "dev", "vxlan0", "nud", "permanent")
    return {n["dst"] for n in json.loads(out or "[]")}


def getent(lab: Lab, host: str, ctr: str, name: str) -> str:
    return run_cli(lab, host, "exec", ctr, "--", "getent", "ahostsv4", name, check=False).stdout


def sandbox_path(lab: Lab, host: str, net_id: str) -> str:
    return str(lab.host_dir(host) / "run" / "sandboxes" / net_id[:12])


def test_rm_f_of_many_removes_everything_and_reports_each_failure_alone(make_lab):
    lab = make_lab(2)
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "--subnet", SUBNET, "ov")
    run_cli(lab, "h1", "network", "create", "--subnet", "198.19.210.0/24", "lan")
    c = lab.client("h1", timeout=120)

    def make(name: str, net: str = "ov") -> dict:
        return c.call("POST", "/containers/create", {"Name": name, "NetworkMode": net, "Cmd": ["sleep", "1000"]})

    with ThreadPoolExecutor(4) as ex:
        made = list(ex.map(make, [f"m{i}" for i in range(N)]))
    make("keep")                          # holds the sandbox: its own port must stay
    lans = [make("lan0", "lan"), make("lan1", "lan")]
    run_cli(lab, "h2", "run", "-d", "--name", "probe", "--network", "ov", "--", "sleep", "1000")
    net_id = json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["Id"]
    sb = sandbox_path(lab, "h1", net_id)
    eps = [ep for ctr in made for ep in ctr["NetworkSettings"]["Networks"].values()]
    ports, gw_ports = {ep["HostInterface"] for ep in eps}, {ep["GwHostInterface"] for ep in eps}
    ips = {ep["IPAddress"] for ep in eps}
    assert len(ports) == len(gw_ports) == N
    assert ports <= links(sb, "nwv") and ports <= guarded(sb)
    assert gw_ports <= links(lab.ns_path("h1"), "nwg") and gw_ports <= guarded(lab.ns_path("h1"))
    assert "198.18." in getent(lab, "h2", "probe", "m7")

    # Without -f: a running container is refused, a stopped one goes; the refusal names the first alone.
    run_cli(lab, "h1", "stop", "-t", "0", "lan1")
    r = run_cli(lab, "h1", "rm", "lan0", "lan1", check=False)
    assert r.returncode == 1 and r.stdout.split() == ["lan1"]
    assert r.stderr.count("Error:") == 1 and "'lan0' is running" in r.stderr

    names = [f"m{i}" for i in range(N)]
    asked = names[:N // 2] + ["ghost"] + names[N // 2:] + ["lan0", "m3"]   # a missing one, one named twice
    r = run_cli(lab, "h1", "rm", "-f", *asked, check=False, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stdout.split() == [n for n in asked if n != "ghost"]
    assert r.stderr.count("Error:") == 1 and "'ghost' not found" in r.stderr

    assert [x["Name"] for x in c.call("GET", "/containers/json", all=1)] == ["keep"]
    assert not links(sb, "nwv") & ports and not guarded(sb) & ports        # veths and elements, in the sandbox
    assert not links(lab.ns_path("h1"), "nwg") & gw_ports                  # and on the gateway bridge
    lan_ports = {ep["HostInterface"] for ctr in lans for ep in ctr["NetworkSettings"]["Networks"].values()}
    assert not links(lab.ns_path("h1"), "nwv") & lan_ports and not guarded(lab.ns_path("h1")) & (gw_ports | lan_ports)
    keep = c.call("GET", "/containers/keep/json")
    assert links(sb, "nwv") == {ep["HostInterface"] for ep in keep["NetworkSettings"]["Networks"].values()}
    netns_left = os.listdir(lab.host_dir("h1") / "run" / "netns")
    assert len(netns_left) == 1 and keep["Id"].startswith(netns_left[0])
    assert sorted(os.listdir(lab.host_dir("h1") / "data" / "containers")) == [keep["Id"]]
    ov = json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]
    assert [e["Name"] for e in ov["Containers"].values() if not e["Name"].startswith("probe")] == ["keep"]
    assert not json.loads(run_cli(lab, "h1", "network", "inspect", "lan").stdout)[0]["Containers"]
    # Released at the managers: the other host's peer table and its DNS forget them.
    h2_sb = sandbox_path(lab, "h2", net_id)
    wait_for(lambda: not neighbours(h2_sb) & ips, 20, "the removed endpoints gone from h2's peer table")
    wait_for(lambda: getent(lab, "h2", "probe", "m7") == "", 20, "m7's name gone on h2")
    assert "198.18." in getent(lab, "h2", "probe", "keep")
    run_cli(lab, "h1", "rm", "-f", "keep")
    run_cli(lab, "h2", "rm", "-f", "probe")
