"""Where users rely on Docker's behaviour, netweft behaves the same (real daemon, real containers).

Each test names the Docker behaviour it checks; they come from running Docker's own network test
expectations against netweft.
"""
from __future__ import annotations

import json
import re
import socket

from conftest import Daemon

LS_KEYS = {"CreatedAt", "Driver", "ID", "IPv4", "IPv6", "Internal", "Labels", "Name", "Scope"}


def inspect(d: Daemon, *args: str) -> dict:
    return json.loads(d.cli(*args).stdout)[0]


def one_line_error(r) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_sys_class_net_is_the_containers_own(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.50.0/24", "-o", "com.docker.network.driver.mtu=1400", "small")
    d.cli("run", "-d", "--name", "c", "--network", "small", "--", "sleep", "1000")
    assert sorted(d.exec("c", "ls", "/sys/class/net").stdout.split()) == ["eth0", "lo"]
    assert d.exec("c", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1400"
    d.cli("run", "-d", "--name", "alone", "--network", "none", "--", "sleep", "1000")
    assert d.exec("alone", "ls", "/sys/class/net").stdout.split() == ["lo"]


def test_lo_is_up_in_every_container_network_none_included(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.51.0/24", "n")
    d.cli("run", "-d", "--name", "on-net", "--network", "n", "--", "sleep", "1000")
    d.cli("run", "-d", "--name", "no-net", "--network", "none", "--", "sleep", "1000")
    for ctr in ("on-net", "no-net"):
        lo = json.loads(d.exec(ctr, "ip", "-j", "link", "show", "lo").stdout)[0]
        assert "UP" in lo["flags"], (ctr, lo)
        assert d.ping(ctr, "127.0.0.1"), ctr


def test_host_network_container_without_hostname_has_the_hosts(daemon):
    d = daemon
    d.cli("run", "-d", "--name", "hn", "--network", "host", "--", "sleep", "1000")
    assert d.exec("hn", "hostname").stdout.strip() == socket.gethostname()
    assert inspect(d, "inspect", "hn")["Config"]["Hostname"] == socket.gethostname()
    # With --hostname, its own name, and the host's stays as it was.
    d.cli("run", "-d", "--name", "hn2", "--network", "host", "--hostname", "chosen", "--", "sleep", "1000")
    assert d.exec("hn2", "hostname").stdout.strip() == "chosen"
    assert socket.gethostname() != "chosen"


def test_dotted_hostname_gets_its_short_name_in_etc_hosts(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.52.0/24", "n")
    d.cli("run", "-d", "--name", "fb", "--network", "n", "--ip", "198.18.52.9", "--hostname", "foobar.example.com",
          "--", "sleep", "1000")
    hosts = d.exec("fb", "cat", "/etc/hosts").stdout.splitlines()
    assert any(re.fullmatch(r"198\.18\.52\.9\s+foobar\.example\.com\s+foobar(\s.*)?", l) for l in hosts), hosts
    assert d.exec("fb", "hostname").stdout.strip() == "foobar.example.com"


def test_network_ls_lists_host_and_none_with_dockers_json_keys(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.53.0/24", "--label", "team=a", "--internal", "mine")
    lines = [json.loads(l) for l in d.cli("network", "ls", "--format", "json").stdout.splitlines()]
    assert [l["Name"] for l in lines] == ["host", "mine", "none"]          # sorted by name, as Docker's CLI
    for l in lines:
        assert set(l) == LS_KEYS and all(isinstance(v, str) for v in l.values()), l
        assert len(l["ID"]) == 12 and l["Scope"] == "local" and l["IPv6"] == "false"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC", l["CreatedAt"]), l
    by_name = {l["Name"]: l for l in lines}
    assert by_name["host"]["Driver"] == "host" and by_name["none"]["Driver"] == "null"
    assert by_name["mine"]["Driver"] == "bridge" and by_name["mine"]["Labels"] == "team=a"
    assert by_name["mine"]["Internal"] == "true" and by_name["host"]["Internal"] == "false"
    full = [json.loads(l)["ID"] for l in d.cli("network", "ls", "--format", "json", "--no-trunc").stdout.splitlines()]
    assert all(len(i) == 64 for i in full)
    table = d.cli("network", "ls").stdout.splitlines()
    assert table[0].split() == ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE"]
    assert [row.split()[1:] for row in table[1:]] == [["host", "host", "local"], ["mine", "bridge", "local"],
                                                      ["none", "null", "local"]]
    assert d.cli("network", "ls", "--filter", "type=builtin", "-q").stdout.split() == [
        by_name["host"]["ID"], by_name["none"]["ID"]]


def test_predefined_networks_inspect_and_refusals(daemon):
    d = daemon
    d.cli("run", "-d", "--name", "hn", "--network", "host", "--", "sleep", "1000")
    host = inspect(d, "network", "inspect", "host")
    assert host["Name"] == "host" and host["Driver"] == "host" and host["Scope"] == "local"
    assert [c["Name"] for c in host["Containers"].values()] == ["hn"]
    assert inspect(d, "network", "inspect", host["Id"][:12])["Name"] == "host"   # by ID prefix too
    assert inspect(d, "network", "inspect", "none")["Driver"] == "null"
    before = d.cli("network", "ls", "--format", "json").stdout
    assert "pre-defined network and cannot be removed" in one_line_error(d.cli("network", "rm", "host", check=False))
    assert "predefined" in one_line_error(d.cli("network", "create", "none", check=False))
    d.cli("network", "create", "--subnet", "198.18.54.0/24", "n")
    d.cli("run", "-d", "--name", "c", "--network", "n", "--", "sleep", "1000")
    assert "predefined" in one_line_error(d.cli("network", "connect", "host", "c", check=False))
    assert "predefined" in one_line_error(d.cli("network", "disconnect", "none", "c", check=False))
    assert list(inspect(d, "inspect", "c")["NetworkSettings"]["Networks"]) == ["n"]
    d.cli("rm", "-f", "c")
    d.cli("network", "rm", "n")
    assert d.cli("network", "ls", "--format", "json").stdout == before


def test_inspect_prints_what_it_found_and_fails_on_what_is_missing(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.55.0/24", "a")
    r = d.cli("network", "inspect", "a", "missing", check=False)
    assert r.returncode == 1
    assert [n["Name"] for n in json.loads(r.stdout)] == ["a"]
    assert "missing" in one_line_error(r)
    r = d.cli("network", "inspect", "missing", check=False)
    assert r.returncode == 1 and json.loads(r.stdout) == [] and "missing" in one_line_error(r)
    r = d.cli("network", "inspect", "ghost1", "a", "ghost2", check=False)
    assert r.returncode == 1 and [n["Name"] for n in json.loads(r.stdout)] == ["a"]
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and "ghost1" in errors[0] and "ghost2" in errors[1]
    # Containers too.
    d.cli("run", "-d", "--name", "box", "--network", "a", "--", "sleep", "1000")
    r = d.cli("inspect", "box", "nobox", check=False)
    assert r.returncode == 1 and [c["Name"] for c in json.loads(r.stdout)] == ["box"] and "nobox" in r.stderr
    r = d.cli("inspect", "nobox", check=False)
    assert r.returncode == 1 and json.loads(r.stdout) == []


def test_a_repeated_subnet_gateway_or_ip_range_is_refused(daemon):
    d = daemon
    before = d.cli("network", "ls", "--format", "json").stdout
    for argv in (["--subnet", "198.18.56.0/24", "--subnet", "198.18.57.0/24"],
                 ["--subnet", "198.18.56.0/24", "--gateway", "198.18.56.1", "--gateway", "198.18.56.2"],
                 ["--subnet", "198.18.56.0/24", "--ip-range", "198.18.56.0/25", "--ip-range", "198.18.56.128/25"]):
        flag = argv[-2]
        msg = one_line_error(d.cli("network", "create", *argv, "twice", check=False))
        assert f"{flag} given 2 times" in msg, msg
        assert d.cli("network", "ls", "--format", "json").stdout == before


def test_ip_outside_the_ip_range_but_inside_the_subnet_is_accepted(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.58.0/24", "--ip-range", "198.18.58.0/25", "ranged")
    d.cli("run", "-d", "--name", "pinned", "--network", "ranged", "--ip", "198.18.58.200", "--", "sleep", "1000")
    d.cli("run", "-d", "--name", "auto", "--network", "ranged", "--", "sleep", "1000")
    pinned = inspect(d, "inspect", "pinned")["NetworkSettings"]["Networks"]["ranged"]["IPAddress"]
    auto = inspect(d, "inspect", "auto")["NetworkSettings"]["Networks"]["ranged"]["IPAddress"]
    assert pinned == "198.18.58.200"
    assert int(auto.rsplit(".", 1)[1]) < 128      # allocation without --ip still uses the range
    assert d.ping("auto", "198.18.58.200")
    # Outside the subnet is still refused.
    msg = one_line_error(d.cli("run", "-d", "--name", "out", "--network", "ranged", "--ip", "198.18.59.5", "--",
                               "true", check=False))
    assert "not inside" in msg


def test_unknown_driver_options_are_refused_with_the_known_ones(daemon):
    d = daemon
    before = d.cli("network", "ls", "--format", "json").stdout
    for opt, words in (("foo=bar", "'foo'"), ("foo", "'foo'"),
                       ("com.docker.network.driver.overlay.vxlanid_list=4097", "vxlanid_list")):
        msg = one_line_error(d.cli("network", "create", "--subnet", "198.18.60.0/24", "-o", opt, "n", check=False))
        assert "unknown bridge driver option" in msg and words in msg, msg
        assert "com.docker.network.driver.mtu" in msg and "com.docker.network.bridge.name" in msg and "parent" in msg
    msg = one_line_error(d.cli("network", "create", "--subnet", "198.18.60.0/24", "-o", "parent=lo", "n", check=False))
    assert "'lo' is the loopback interface" in msg and "cannot be a bridge port" in msg
    assert d.cli("network", "ls", "--format", "json").stdout == before


def test_inspect_shows_ipamconfig_for_a_requested_address(daemon):
    d = daemon
    d.cli("network", "create", "--subnet", "198.18.61.0/24", "a")
    d.cli("network", "create", "--subnet", "198.18.62.0/24", "b")
    d.cli("run", "-d", "--name", "asked", "--network", "a", "--ip", "198.18.61.20", "--", "sleep", "1000")
    d.cli("run", "-d", "--name", "given", "--network", "a", "--", "sleep", "1000")
    d.cli("network", "connect", "--ip", "198.18.62.30", "b", "asked")
    d.cli("network", "connect", "b", "given")
    asked = inspect(d, "inspect", "asked")["NetworkSettings"]["Networks"]
    given = inspect(d, "inspect", "given")["NetworkSettings"]["Networks"]
    assert asked["a"]["IPAMConfig"] == {"IPv4Address": "198.18.61.20"}
    assert asked["b"]["IPAMConfig"] == {"IPv4Address": "198.18.62.30"}
    assert given["a"]["IPAMConfig"] is None and given["b"]["IPAMConfig"] is None
