"""openapi.json documents every local route of the service commands (daemon/tasks.py, daemon/tasklogs.py) with
its method, and the service request body with the struct the managers parse it with."""
from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import msgspec

from netweft.daemon import tasklogs, tasks
from netweft.manager.services import ServiceRequest


def doc() -> dict:
    return json.loads(resources.files("netweft.daemon").joinpath("openapi.json").read_text())


def test_every_service_route_is_documented():
    stub = SimpleNamespace(swarm=SimpleNamespace(), engine=None)
    routes = [(r.method.lower(), r.path) for table in (tasks.routes(stub), tasklogs.routes(stub)) for r in table]
    assert len(routes) >= 8
    paths = doc()["paths"]
    missing = [f"{m.upper()} {p}" for m, p in routes if m not in paths.get(p, {})]
    assert not missing, f"not in openapi.json: {missing}"
    for m, p in routes:
        op = paths[p][m]
        assert op["summary"] and "200" in op["responses"] and "503" in op["responses"], (m, p)
        if "{ref}" in p:
            assert any(x["name"] == "ref" and x["in"] == "path" for x in op["parameters"]), (m, p)


def test_the_service_body_schema_is_the_struct_that_parses_it():
    d = doc()
    _, comps = msgspec.json.schema_components([ServiceRequest], ref_template="#/components/schemas/{name}")
    for name, schema in comps.items():
        assert d["components"]["schemas"][name] == schema, name
    for path in ("/services/create", "/services/{ref}/update"):
        body = d["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ServiceRequest"}
