"""Docker's driver protocol on netweftd's plugin socket, spoken as dockerd speaks it, and hostile bodies:
each refusal is a 4xx with {"Err": one line}, and changes nothing."""
from __future__ import annotations

import http.client
import json
import socket

class Conn(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=20)
        self.path_ = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path_)


def post(daemon, path: str, body) -> tuple[int, dict]:
    c = Conn(str(daemon.root / "docker-plugin.sock"))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, body=data, headers={"Content-Type": "application/vnd.docker.plugins.v1.2+json"})
    r = c.getresponse()
    out = json.loads(r.read())
    c.close()
    return r.status, out


def test_handshake_and_capabilities(daemon):
    assert post(daemon, "/Plugin.Activate", {}) == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    assert post(daemon, "/NetworkDriver.GetCapabilities", {}) == (200, {"Scope": "global", "ConnectivityScope": "global"})
    assert post(daemon, "/IpamDriver.GetCapabilities", b"") == (200, {"RequiresMACAddress": False,
                                                                      "RequiresRequestReplay": False})
    assert post(daemon, "/IpamDriver.GetDefaultAddressSpaces", {})[1]["GlobalDefaultAddressSpace"] == "netweft"
    status, pool = post(daemon, "/IpamDriver.RequestPool", {"AddressSpace": "netweft", "Pool": "198.18.90.0/24",
                                                             "SubPool": "198.18.90.128/25", "V6": False})
    assert status == 200 and pool == {"PoolID": "netweft:198.18.90.0/24:198.18.90.128/25", "Pool": "198.18.90.0/24",
                                      "Data": {}}
    gw = post(daemon, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                     "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert gw == (200, {"Address": "198.18.90.1/24", "Data": {}})
    for path in ("/NetworkDriver.DiscoverNew", "/NetworkDriver.DiscoverDelete"):
        assert post(daemon, path, {"DiscoveryType": 1, "DiscoveryData": {"Address": "192.0.2.1"}}) == (200, {})
    assert post(daemon, "/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == (200, {})
    assert post(daemon, "/NetworkDriver.EndpointOperInfo", {"NetworkID": "n", "EndpointID": "e"}) == (200, {"Value": {}})
    # Idempotent removals of what it never had.
    assert post(daemon, "/NetworkDriver.Leave", {"NetworkID": "n", "EndpointID": "e"}) == (200, {})
    assert post(daemon, "/NetworkDriver.DeleteEndpoint", {"NetworkID": "n", "EndpointID": "e"}) == (200, {})
    assert post(daemon, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "198.18.90.7/24"}) == (200, {})


HOSTILE = [
    ("/NetworkDriver.CreateNetwork", b"{", "bad NetworkDriver.CreateNetwork request"),
    ("/NetworkDriver.CreateNetwork", [1, 2], "Expected `object`"),
    ("/NetworkDriver.CreateNetwork", {"Options": {}}, "NetworkID"),
    ("/NetworkDriver.CreateNetwork", {"NetworkID": 5}, "Expected `str`"),
    ("/NetworkDriver.CreateNetwork", {"NetworkID": "x" * 500}, "length"),
    ("/NetworkDriver.CreateNetwork", {"NetworkID": "n", "IPv4Data": [{"Pool": 7}]}, "Expected `str`"),
    ("/NetworkDriver.CreateNetwork", {"NetworkID": "n", "IPv4Data": [{"Pool": "198.18.0.0/24"}] * 17}, "length"),
    ("/NetworkDriver.CreateNetwork", b"[" * 50000, "request"),
    ("/NetworkDriver.Join", {"NetworkID": "n", "EndpointID": "e", "SandboxKey": "relative"}, "SandboxKey"),
    ("/NetworkDriver.Join", {"NetworkID": "n", "EndpointID": "e", "SandboxKey": "/a\u0000b"}, "SandboxKey"),
    ("/NetworkDriver.CreateEndpoint", {"NetworkID": "n", "EndpointID": "e", "Interface": "x"}, "Interface"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.0.0/24", "V6": "yes"}, "V6"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.0.0/33"}, "198.18.0.0/33"),
    ("/IpamDriver.RequestPool", {"Pool": ""}, "--subnet"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.0.0/24", "SubPool": "198.18.1.0/25"}, "not inside"),
    ("/IpamDriver.RequestPool", {"Pool": "198.18.0.0/24", "V6": True}, "IPv6"),
    ("/IpamDriver.RequestAddress", {"PoolID": "default/198.18.0.0/24"}, "not one of netweft's"),
    ("/IpamDriver.RequestAddress", {"PoolID": "netweft:nonsense"}, "not one of netweft's"),
    ("/IpamDriver.RequestAddress", {"PoolID": "netweft:198.18.0.0/24", "Address": "x",
                                    "Options": {"RequestAddressType": "com.docker.network.gateway"}}, "not an IPv4"),
    ("/IpamDriver.RequestAddress", {"PoolID": "netweft:198.18.0.0/24", "Address": "203.0.113.1",
                                    "Options": {"RequestAddressType": "com.docker.network.gateway"}}, "not inside"),
    ("/IpamDriver.ReleaseAddress", {"PoolID": "netweft:198.18.0.0/24"}, "Address"),
    ("/NetworkDriver.Frobnicate", {}, "not part of Docker's driver protocol"),
]


def test_hostile_bodies_are_one_line_refusals(daemon):
    for path, body, words in HOSTILE:
        status, out = post(daemon, path, body)
        assert 400 <= status < 500, (path, body, status, out)
        assert set(out) == {"Err"} and "\n" not in out["Err"] and words in out["Err"], (path, body, out)


def test_without_a_swarm_network_calls_say_what_to_do(daemon):
    status, out = post(daemon, "/NetworkDriver.CreateNetwork",
                       {"NetworkID": "abc", "IPv4Data": [{"Pool": "198.18.91.0/24", "Gateway": "198.18.91.1/24"}]})
    assert status == 503 and "netweft swarm init" in out["Err"], out
    status, out = post(daemon, "/IpamDriver.RequestAddress", {"PoolID": "netweft:198.18.91.0/24"})
    assert status == 503 and "swarm" in out["Err"], out
    # Nothing was made.
    assert [n for n in json.loads(daemon.cli("network", "ls", "--format", "json").stdout.join("[]")
                                  .replace("}\n{", "},{")) if n["Name"] not in ("host", "none")] == []
