"""The ingress network: made at `swarm init` and seen by every host; removed only after a warning and a
question (or -f); made again by the operator with their subnet, gateway and MTU, and seen by every host."""
from __future__ import annotations

import json
import subprocess

from lab_fixture import run_cli, wait_for
from netweft.lab.lab import Lab


def ingress_on(lab: Lab, host: str) -> dict | None:
    r = run_cli(lab, host, "network", "inspect", "ingress", check=False)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None


def rm_ingress(lab: Lab, host: str, *flags: str, answer: str = "") -> subprocess.CompletedProcess:
    argv, env = lab.exec_argv(host, ["netweft", "network", "rm", *flags, "ingress"])
    return subprocess.run(argv, input=answer, capture_output=True, text=True, env=env, timeout=60)


def test_ingress_made_at_init_removed_after_asking_and_made_again_as_asked(lab3):
    lab = lab3
    # Every host sees the ingress network `swarm init` made (from the top of the lab's pool).
    for h in ("h1", "h2", "h3"):
        net = wait_for(lambda: ingress_on(lab, h), 10, f"ingress on {h}")
        assert net["Ingress"] is True and net["Driver"] == "overlay" and net["Scope"] == "swarm"
        assert net["IPAM"]["Config"][0]["Subnet"] == "198.18.255.0/24"
    line = next(json.loads(l) for l in run_cli(lab, "h2", "network", "ls", "--format", "json").stdout.splitlines()
                if json.loads(l)["Name"] == "ingress")
    assert line["Ingress"] == "true"
    # A plain overlay still gets the start of the pool; a second ingress is refused.
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--attachable", "ov")
    assert json.loads(run_cli(lab, "h1", "network", "inspect", "ov").stdout)[0]["IPAM"]["Config"][0]["Subnet"] \
        == "198.18.0.0/24"
    r = run_cli(lab, "h1", "network", "create", "-d", "overlay", "--ingress", "ingress2", check=False)
    assert r.returncode != 0 and "an ingress network already exists ('ingress')" in r.stderr
    r = run_cli(lab, "h1", "network", "create", "--ingress", "br", check=False)
    assert r.returncode != 0 and "--ingress needs -d overlay" in r.stderr

    # rm asks, says what stops working; "no" (or no answer) keeps it.
    for answer in ("n\n", ""):
        r = rm_ingress(lab, "h1", answer=answer)
        assert r.returncode != 0 and "published by services" in r.stderr and "[y/N]" in r.stderr
        assert ingress_on(lab, "h1") is not None
    r = rm_ingress(lab, "h1", answer="y\n")
    assert r.returncode == 0, r.stderr
    for h in ("h1", "h2", "h3"):
        wait_for(lambda: ingress_on(lab, h) is None, 10, f"ingress gone from {h}")

    # Made again as the operator asks: subnet, gateway and MTU exactly, on every host.
    r = run_cli(lab, "h1", "network", "create", "-d", "overlay", "--ingress", "--attachable", "ing", check=False)
    assert r.returncode != 0 and "cannot be attachable" in r.stderr
    run_cli(lab, "h1", "network", "create", "-d", "overlay", "--ingress", "--subnet", "198.18.77.0/24",
            "--gateway", "198.18.77.254", "-o", "com.docker.network.driver.mtu=1200", "ingress")
    for h in ("h1", "h2", "h3"):
        net = wait_for(lambda: ingress_on(lab, h), 10, f"the new ingress on {h}")
        assert net["Ingress"] is True
        assert net["IPAM"]["Config"][0] == {"Subnet": "198.18.77.0/24", "Gateway": "198.18.77.254", "IPRange": "",
                                            "AuxiliaryAddresses": {}}
        assert net["Options"]["com.docker.network.driver.mtu"] == "1200"
    # -f removes it without asking.
    r = rm_ingress(lab, "h1", "-f")
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
