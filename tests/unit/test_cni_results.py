"""The CNI plugin's pure parts: configuration parsing, CNI_ARGS, results per spec version, errors."""
import json

import pytest

from netweft.plugins import cni


def conf(**kw) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "ov", "type": "netweft", **kw}).encode()


def test_conf_defaults_and_fields():
    c = cni.parse_conf(conf(runtimeConfig={"ips": ["198.18.0.5/24"], "mac": "02:00:00:00:00:05", "aliases": ["a"]},
                            socket="unix:///x.sock", extra={"ignored": True}))
    assert (c.name, c.network, c.ips, c.mac, c.aliases) == ("ov", "", ["198.18.0.5/24"], "02:00:00:00:00:05", ["a"])
    assert cni.socket_path(c) == "/x.sock"
    c = cni.parse_conf(conf(runtimeConfig={"aliases": {"ov": ["web", "abc123"], "other": ["x"]},
                                           "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "TCP"}]}))
    assert c.aliases == ["web", "abc123"]
    assert c.ports == [{"protocol": "tcp", "host_port": 8080, "host_ip": "", "container_port": 80}]
    assert cni.socket_path(cni.parse_conf(conf())) == cni.DEFAULT_SOCKET


@pytest.mark.parametrize("doc, code", [
    (b"", cni.E_DECODE), (b"{", cni.E_DECODE), (b"null", cni.E_DECODE), (b"[" * 100000, cni.E_DECODE),
    (conf(cniVersion="0.3.1"), cni.E_VERSION), (conf(cniVersion=1), cni.E_CONFIG),
    (conf(type="bridge"), cni.E_CONFIG), (conf(name=""), cni.E_CONFIG), (conf(name=["x"]), cni.E_CONFIG),
    (conf(socket="http://x"), cni.E_CONFIG), (conf(runtimeConfig=[]), cni.E_CONFIG),
    (conf(runtimeConfig={"ips": [1]}), cni.E_CONFIG), (conf(runtimeConfig={"aliases": ["a"] * 65}), cni.E_CONFIG),
    (conf(runtimeConfig={"mac": "02:00"}), cni.E_CONFIG), (conf(network="x" * 5000), cni.E_CONFIG),
    (conf(**{"cni.dev/valid-attachments": [{"containerID": 1}]}), cni.E_CONFIG),
])
def test_bad_configurations(doc, code):
    with pytest.raises(cni.CniError) as e:
        cni.parse_conf(doc)
    assert e.value.code == code and "\n" not in e.value.msg


def test_cni_args():
    assert cni.cni_args("IgnoreUnknown=1;IP=198.18.0.5;MAC=02:00:00:00:00:05;K8S_POD_NAME=x") == {
        "IgnoreUnknown": "1", "IP": "198.18.0.5", "MAC": "02:00:00:00:00:05", "K8S_POD_NAME": "x"}
    assert cni.cni_args("") == {}
    for bad in ("IP", "=x"):
        with pytest.raises(cni.CniError):
            cni.cni_args(bad)


EP = {"ifname": "eth0", "mac": "02:00:00:00:00:05", "ip": "198.18.0.5", "prefix_len": 24}


def test_result_of_a_bridge_endpoint():
    r = cni.build_result("1.0.0", {**EP, "gateway": "198.18.0.1"}, "/run/netns/x")
    assert r == {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": EP["mac"], "sandbox": "/run/netns/x"}],
                 "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 0}],
                 "routes": [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}], "dns": {}}
    assert cni.build_result("0.4.0", {**EP, "gateway": "198.18.0.1"}, "/x")["ips"][0]["version"] == "4"


def test_result_of_an_overlay_endpoint_names_its_way_out():
    ep = {**EP, "gateway": "198.19.0.1", "gw_ifname": "eth0gw", "gw_ip": "198.19.0.2", "gw_prefix_len": 24,
          "gw_mac": "02:42:c6:13:00:02"}
    r = cni.build_result("1.1.0", ep, "/x")
    assert [i["name"] for i in r["interfaces"]] == ["eth0", "eth0gw"]
    assert r["ips"] == [{"address": "198.18.0.5/24", "interface": 0},
                        {"address": "198.19.0.2/24", "gateway": "198.19.0.1", "interface": 1}]
    assert r["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.0.1"}]
    # An internal overlay: no way out, no route.
    assert cni.build_result("1.0.0", EP, "/x")["routes"] == []


def test_version_and_unknown_commands():
    assert cni.run("VERSION", b"") == {"cniVersion": "1.1.0", "supportedVersions": list(cni.SUPPORTED)}
    assert cni.run("VERSION", b'{"cniVersion": "0.4.0"}')["cniVersion"] == "0.4.0"
    with pytest.raises(cni.CniError) as e:
        cni.run("FROB", conf())
    assert e.value.code == cni.E_ENV
    for cmd in ("GC", "STATUS"):
        with pytest.raises(cni.CniError) as e:
            cni.run(cmd, conf())
        assert e.value.code == cni.E_VERSION


def test_openapi_documents_the_cni_routes_with_the_structs_that_parse():
    from importlib import resources

    import msgspec

    from netweft.model import runtimes as r
    doc = json.loads(resources.files("netweft.daemon").joinpath("openapi.json").read_text())
    _, comps = msgspec.json.schema_components([r.CniAttach, r.CniRef, r.CniGC, r.CniStatus, r.CniEndpoint,
                                               r.CniGCResult], ref_template="#/components/schemas/{name}")
    for name, schema in comps.items():
        assert doc["components"]["schemas"][name] == schema, name
    for path, name in (("/cni/add", "CniAttach"), ("/cni/del", "CniRef"), ("/cni/check", "CniRef"),
                       ("/cni/gc", "CniGC"), ("/cni/status", "CniStatus")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
