"""Bad input on the local API (unix socket), sent raw as any client could: each body and query string is
parsed by typed structs. Every refusal is a 4xx with a one-line JSON message naming the field; nothing is
stored; the daemon logs no traceback."""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import quote

import pytest

from conftest import Daemon

DEEP = 100_000  # nesting far beyond any recursion limit


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(d: Daemon, method: str, path: str, data: bytes | str | None = None) -> tuple[int, object]:
    conn = UnixHTTP(str(d.sock))
    try:
        if isinstance(data, str):
            data = data.encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


def state(d: Daemon) -> tuple:
    """What a refused request must not change: networks, containers, swarm membership."""
    nets = sorted((n["Name"], n["Id"], json.dumps(n["Labels"], sort_keys=True), n["Internal"])
                  for n in call(d, "GET", "/networks")[1])
    ctrs = sorted(c["Id"] for c in call(d, "GET", "/containers/json?all=1")[1])
    return nets, ctrs, call(d, "GET", "/info")[1]["Swarm"]


def log_text(d: Daemon) -> str:
    d.log.flush()
    return (d.root / "netweftd.log").read_text()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (method, path, body, status, words the message must contain)
CASES = [
    # networks/create: types, sizes, values
    ("POST", "/networks/create", '{"Name": 5}', 400, "$.Name"),
    ("POST", "/networks/create", '{"Name": null}', 400, "$.Name"),
    ("POST", "/networks/create", '{}', 400, "`Name`"),
    ("POST", "/networks/create", '{"Name": "n", "IPAM": "x"}', 400, "$.IPAM"),
    ("POST", "/networks/create", '{"Name": "n", "IPAM": {"Config": [{"Subnet": 5}]}}', 400, "$.IPAM.Config[0].Subnet"),
    ("POST", "/networks/create", '{"Name": "n", "IPAM": {"Config": "x"}}', 400, "$.IPAM.Config"),
    ("POST", "/networks/create", '{"Name": "n", "Internal": "yes"}', 400, "$.Internal"),
    ("POST", "/networks/create", '{"Name": "n", "Attachable": 1}', 400, "$.Attachable"),
    ("POST", "/networks/create", '{"Name": "n", "Labels": {"a": 1}}', 400, "$.Labels"),
    ("POST", "/networks/create", '{"Name": "n", "Labels": ["a"]}', 400, "$.Labels"),
    ("POST", "/networks/create", '{"Name": "n", "Options": {"foo": "bar"}}', 400, "unknown bridge driver option 'foo'"),
    ("POST", "/networks/create", '{"Name": "n", "Options": {"foo": ""}}', 400, "com.docker.network.driver.mtu"),
    ("POST", "/networks/create", '{"Name": "n", "Driver": "overlay", "Options": {"parent": "eth0"}}', 400,
     "unknown overlay driver option 'parent'"),
    ("POST", "/networks/create", '{"Name": "n", "Options": {"parent": "lo"}}', 400, "loopback"),
    ("POST", "/networks/create", '{"Name": "n", "Driver": 7}', 400, "$.Driver"),
    ("POST", "/networks/create", '{"Name": "n", "Driver": "macvlan"}', 400, "unknown driver 'macvlan'"),
    ("POST", "/networks/create", '{"Name": "n\\n"}', 400, "invalid network name"),
    ("POST", "/networks/create", '{"Name": "n\\n", "IPAM": {"Config": [{"Subnet": "198.18.40.0/24"}]}}', 400,
     "invalid network name"),
    ("POST", "/networks/create", json.dumps({"Name": "x" * 300}), 400, "$.Name"),
    ("POST", "/networks/create", json.dumps({"Name": "n", "Labels": {f"k{i}": "v" for i in range(300)}}), 400,
     "$.Labels"),
    ("POST", "/networks/create", json.dumps({"Name": "n", "Labels": {"k": "v" * 5000}}), 400, "$.Labels"),
    ("POST", "/networks/create", '{"Name": "n", "EnableIPv6": true}', 400, "IPv6"),
    ("POST", "/networks/create", '{"Name": "n", "IPAM": {"Driver": "dhcp"}}', 400, "IPAM driver"),
    ("POST", "/networks/create", '{"Name": "host"}', 409, "predefined"),
    ("POST", "/networks/create", '{"Name": "none"}', 409, "predefined"),
    ("POST", "/networks/create", '{"Name": "n", "X": ' + nested(DEEP) + '}', 400, "nested too deeply"),
    ("POST", "/networks/create", '{"Name": "n", "Labels": {"a": ' + nested(DEEP) + '}}', 400, "$.Labels"),
    ("POST", "/networks/create", nested(DEEP), 400, "request body"),
    ("POST", "/networks/create", '{"Name": ', 400, "not valid JSON"),
    ("POST", "/networks/create", '[]', 400, "Expected `object`"),
    ("POST", "/networks/create", '"n"', 400, "Expected `object`"),
    # connect / disconnect
    ("POST", "/networks/base/connect", '{"Container": null}', 400, "$.Container"),
    ("POST", "/networks/base/connect", '{}', 400, "`Container`"),
    ("POST", "/networks/base/connect", '{"Container": ""}', 400, "Container is empty"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": "x"}', 400, "$.EndpointConfig"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": {"Aliases": "x"}}', 400,
     "$.EndpointConfig.Aliases"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": {"Aliases": ["a\\n"]}}', 400,
     "invalid hostname"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": {"IPAMConfig": {"IPv4Address": 5}}}',
     400, "$.EndpointConfig.IPAMConfig.IPv4Address"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": {"IPAMConfig": {"IPv4Address": "x"}}}',
     400, "invalid IP address 'x'"),
    ("POST", "/networks/base/connect", '{"Container": "c1", "EndpointConfig": {"MacAddress": "zz"}}', 400,
     "invalid MAC address"),
    ("POST", "/networks/host/connect", '{"Container": "c1"}', 400, "predefined"),
    ("POST", "/networks/base/disconnect", '{"Container": 5}', 400, "$.Container"),
    ("POST", "/networks/base/disconnect", '{"Container": "c1", "Force": "yes"}', 400, "$.Force"),
    ("POST", "/networks/none/disconnect", '{"Container": "c1"}', 400, "predefined"),
    # containers/create
    ("POST", "/containers/create", '{"Cmd": "sleep"}', 400, "$.Cmd"),
    ("POST", "/containers/create", '{"Cmd": [1]}', 400, "$.Cmd[0]"),
    ("POST", "/containers/create", '{"Cmd": ["a\\u0000b"]}', 400, "$.Cmd[0]"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "Name": "c\\n"}', 400, "invalid container name"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "Name": 5}', 400, "$.Name"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "Hostname": "h\\n"}', 400, "invalid hostname"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "Env": {"A": 1}}', 400, "$.Env"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "Env": {"A=B": "1"}}', 400, "$.Env"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "NetworkMode": 5}', 400, "$.NetworkMode"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "NetworkMode": "base", "Aliases": [5]}', 400, "$.Aliases"),
    ("POST", "/containers/create", '{"Cmd": ["true"], "NetworkMode": "base", "IPAddress": "198.18.40.300"}', 400,
     "invalid IP address"),
    ("POST", "/containers/create", json.dumps({"Cmd": ["x"] * 5000}), 400, "$.Cmd"),
    # query strings
    ("GET", "/networks?filters=" + quote("[1]"), None, 400, "filters"),
    ("GET", "/networks?filters=" + quote('{"foo": ["x"]}'), None, 400, "unknown field `foo`"),
    ("GET", "/networks?filters=" + quote('{"name": "x"}'), None, 400, "$.name"),
    ("GET", "/networks?filters=" + quote('{"type": ["odd"]}'), None, 400, "$.type"),
    ("GET", "/networks?filters=nope", None, 400, "filters is not valid JSON"),
    ("GET", "/networks?filters=" + quote('{"name": ' + nested(1200) + '}'), None, 400, "$.name[0]"),
    ("GET", "/containers/json?all=yes", None, 400, "query parameter all='yes'"),
    ("POST", "/containers/create?start=perhaps", '{"Cmd": ["true"]}', 400, "query parameter start"),
    ("DELETE", "/containers/c1?force=maybe", None, 400, "query parameter force"),
    ("POST", "/containers/c1/stop?t=abc", None, 400, "query parameter t='abc'"),
    ("POST", "/containers/c1/stop?t=-1", None, 400, "query parameter t"),
    ("POST", "/containers/c1/stop?t=nan", None, 400, "query parameter t"),
    ("GET", "/containers/c1/logs?follow=2", None, 400, "query parameter follow"),
    ("POST", "/swarm/leave?force=sure", None, 400, "query parameter force"),
    ("POST", "/swarm/join-token/rotate?role=admin", None, 400, "query parameter role"),
    ("POST", "/swarm/join-token/rotate", None, 400, "missing query parameter role"),
    ("DELETE", "/nodes/x?force=sure", None, 400, "query parameter force"),
    # swarm and nodes
    ("POST", "/swarm/init", '{"AdvertiseAddr": 5}', 400, "$.AdvertiseAddr"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "5"}', 400, "--advertise-addr"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "0.0.0.0"}', 400, "other hosts cannot reach"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "127.0.0.1"}', 400, "other hosts cannot reach"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "192.0.2.10", "DataPathPort": "x"}', 400, "$.DataPathPort"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "192.0.2.10", "CertExpiry": 5}', 400, "$.CertExpiry"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "192.0.2.10", "DefaultAddrPool": "10.0.0.0/8"}', 400,
     "$.DefaultAddrPool"),
    ("POST", "/swarm/init", '{"AdvertiseAddr": "192.0.2.10", "SubnetSize": 24.5}', 400, "$.SubnetSize"),
    ("POST", "/swarm/join", '{"JoinToken": 5}', 400, "$.JoinToken"),
    ("POST", "/swarm/join", '{"JoinToken": "t", "RemoteAddrs": "192.0.2.10"}', 400, "$.RemoteAddrs"),
    ("POST", "/swarm/join", '{"JoinToken": "t", "RemoteAddrs": ["192.0.2.10"], "AdvertiseAddr": []}', 400,
     "$.AdvertiseAddr"),
    ("POST", "/nodes/x/update", '{"Role": "king"}', 400, "$.Role"),
    ("POST", "/nodes/x/update", '{"Availability": 1}', 400, "$.Availability"),
    ("POST", "/nodes/x/update", '{"LabelsAdd": {"a": 1}}', 400, "$.LabelsAdd"),
    ("POST", "/nodes/x/update", '{"LabelsRemove": "a"}', 400, "$.LabelsRemove"),
    # routes and methods that do not exist answer JSON too
    ("GET", "/no/such/route", None, 404, "page not found"),
    ("PUT", "/networks/create", '{}', 405, "not allowed"),
]


@pytest.fixture
def seeded(daemon):
    d = daemon
    assert call(d, "POST", "/networks/create", '{"Name": "base", "IPAM": {"Config": [{"Subnet": "198.18.40.0/24"}]}}'
                )[0] == 201
    assert call(d, "POST", "/containers/create", '{"Name": "c1", "NetworkMode": "base", "Cmd": ["sleep", "1000"]}'
                )[0] == 201
    return d


def test_bad_bodies_and_queries_are_400_naming_the_field_and_change_nothing(seeded):
    d = seeded
    before = state(d)
    for method, path, data, status, words in CASES:
        got, answer = call(d, method, path, data)
        shown = f"{method} {path[:60]} {(data or '')[:80]!r}"
        assert got == status, f"{shown}: {got} {answer}"
        assert isinstance(answer, dict) and set(answer) == {"message"}, f"{shown}: {answer!r}"
        msg = answer["message"]
        assert "\n" not in msg and len(msg) < 400, f"{shown}: {msg!r}"
        assert words in msg, f"{shown}: {msg!r} does not say {words!r}"
        assert state(d) == before, f"{shown} changed state"
    log = log_text(d)
    assert "Traceback" not in log and "request failed" not in log


def test_a_body_too_large_gets_a_json_error(daemon):
    d = daemon
    before = state(d)
    big = json.dumps({"Name": "n", "Labels": {"k": "v" * (2 * 1024 * 1024)}})
    status, answer = call(d, "POST", "/networks/create", big)
    assert status == 413 and "too large" in answer["message"] and "KiB" in answer["message"]
    assert state(d) == before
    assert "Traceback" not in log_text(d)


def test_advertise_addr_of_the_wrong_type_leaves_no_swarm(daemon):
    d = daemon
    assert call(d, "POST", "/swarm/init", '{"AdvertiseAddr": 5}')[0] == 400
    assert call(d, "GET", "/info")[1]["Swarm"] == {"LocalNodeState": "inactive"}
    assert call(d, "GET", "/swarm")[0] == 503


def test_docker_shaped_bodies_with_nulls_and_unknown_fields_are_accepted(daemon):
    d = daemon
    # As Docker's clients send them: fields we do not use, nulls for what is not set.
    status, answer = call(d, "POST", "/networks/create", json.dumps({
        "Name": "dk", "CheckDuplicate": True, "Driver": "bridge", "Scope": "", "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Config": [{"Subnet": "198.18.41.0/24", "Gateway": "198.18.41.254"}],
                 "Options": {}},
        "Internal": False, "Attachable": False, "Ingress": False, "ConfigOnly": False, "ConfigFrom": None,
        "Options": {"com.docker.network.driver.mtu": "1400"}, "Labels": {"team": "a"}}))
    assert status == 201, answer
    status, answer = call(d, "POST", "/containers/create", json.dumps({
        "Name": None, "Hostname": None, "NetworkMode": "dk", "IPAddress": None, "MacAddress": None,
        "Aliases": None, "Cmd": ["sleep", "1000"], "Env": None, "Tty": False}))
    assert status == 201, answer
    ctr = answer["Id"]
    status, answer = call(d, "POST", "/networks/dk/disconnect", json.dumps({"Container": ctr, "Force": False}))
    assert status == 200, answer
    status, answer = call(d, "POST", "/networks/dk/connect", json.dumps({
        "Container": ctr, "EndpointConfig": {"IPAMConfig": {"IPv4Address": "198.18.41.7", "IPv6Address": ""},
                                             "Links": None, "Aliases": None, "MacAddress": "", "DriverOpts": None}}))
    assert status == 200, answer
    view = call(d, "GET", f"/containers/{ctr}/json")[1]
    assert view["NetworkSettings"]["Networks"]["dk"]["IPAddress"] == "198.18.41.7"
    assert call(d, "DELETE", f"/containers/{ctr}?force=true")[0] == 204
    assert "Traceback" not in log_text(d)


def test_network_filters_in_both_of_dockers_forms(daemon):
    d = daemon
    for name, label in (("front", "tier=web"), ("back", "tier=db")):
        k, v = label.split("=")
        assert call(d, "POST", "/networks/create", json.dumps({"Name": name, "Labels": {k: v}}))[0] == 201

    def names(filters: dict) -> list[str]:
        status, nets = call(d, "GET", "/networks?filters=" + quote(json.dumps(filters)))
        assert status == 200, nets
        return sorted(n["Name"] for n in nets)

    assert names({}) == ["back", "front", "host", "none"]
    assert names({"name": ["ron"]}) == ["front"]
    assert names({"name": {"ack": True}}) == ["back"]             # the older map form
    assert names({"label": ["tier=db"]}) == ["back"]
    assert names({"label": ["tier"]}) == ["back", "front"]
    assert names({"label": ["tier", "tier=web"]}) == ["front"]    # every label filter applies
    assert names({"driver": ["bridge"]}) == ["back", "front"]
    assert names({"driver": ["host", "null"]}) == ["host", "none"]
    assert names({"type": ["builtin"]}) == ["host", "none"]
    assert names({"type": ["custom"], "scope": ["local"]}) == ["back", "front"]
    assert names({"scope": ["swarm"]}) == []
    front = call(d, "GET", "/networks/front")[1]["Id"]
    assert names({"id": [front[:6]]}) == ["front"]


def test_the_published_schemas_are_the_ones_that_parse(daemon):
    """GET /openapi.json documents exactly the structs the daemon parses bodies with."""
    import msgspec

    from netweft.model import api as m
    status, doc = call(daemon, "GET", "/openapi.json")
    assert status == 200
    bodies = [m.NetworkCreate, m.NetworkConnect, m.NetworkDisconnect, m.ContainerCreate, m.SwarmInit, m.SwarmJoin,
              m.NodeUpdate, m.NetworkFilters]
    _, comps = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    for name, schema in comps.items():
        assert doc["components"]["schemas"][name] == schema, name
    for path, method, name in (("/networks/create", "post", "NetworkCreate"),
                               ("/networks/{ref}/connect", "post", "NetworkConnect"),
                               ("/containers/create", "post", "ContainerCreate"),
                               ("/swarm/init", "post", "SwarmInit"), ("/nodes/{ref}/update", "post", "NodeUpdate")):
        op = doc["paths"][path][method]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert "413" in op["responses"]
