"""What the CLI prints and the request bodies it sends, as pure functions without click (shared by the click
commands in main.py and the lean path in entry.py, so both print and send exactly the same)."""
from __future__ import annotations

FILTER_KEYS = ("name", "driver", "label", "id", "scope", "type")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def go_time(iso: str) -> str:
    """An ISO time as Go prints one (Docker's CreatedAt): 2024-05-01 10:11:12.123456 +0000 UTC."""
    from datetime import datetime
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return iso or ""
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


def network_line(n: dict, no_trunc: bool) -> dict:
    """One network as `docker network ls --format json` prints it: Docker's keys, every value a string."""
    line = {"CreatedAt": go_time(n.get("Created", "")), "Driver": n["Driver"],
            "ID": n["Id"] if no_trunc else n["Id"][:12], "IPv4": "true",
            "IPv6": str(bool(n.get("EnableIPv6"))).lower(), "Internal": str(bool(n.get("Internal"))).lower(),
            "Labels": ",".join(f"{k}={v}" for k, v in (n.get("Labels") or {}).items()),
            "Name": n["Name"], "Scope": n["Scope"]}
    if n.get("Ingress"):   # Docker's keys for every network; the routing mesh's one is flagged too
        line["Ingress"] = "true"
    return line


def network_ls(nets: list[dict], quiet: bool, fmt: str, no_trunc: bool) -> list[str]:
    """The lines of `network ls` (networks sorted by name, as Docker's CLI)."""
    from netweft.apiclient import leanjson
    nets = sorted(nets, key=lambda n: n["Name"])
    if fmt == "json" and not quiet:
        return [leanjson.dumps(network_line(n, no_trunc), sort_keys=True) for n in nets]
    ids = [n["Id"] if no_trunc else n["Id"][:12] for n in nets]
    if quiet:
        return ids
    return [table(["NETWORK ID", "NAME", "DRIVER", "SCOPE"],
                  [[i, n["Name"], n["Driver"], n["Scope"]] for i, n in zip(ids, nets)])]


def ps(ctrs: list[dict], quiet: bool) -> list[str]:
    if quiet:
        return [c["Id"][:12] for c in ctrs]
    rows = []
    for c in ctrs:
        st = c["State"]
        status = "running" if st["Running"] else (f"exited ({st['ExitCode']})" if st["Status"] == "exited"
                                                  else st["Status"])
        nets = c["NetworkSettings"]["Networks"]
        addrs = ",".join(f"{n}:{e['IPAddress']}" for n, e in nets.items()) or c["HostConfig"]["NetworkMode"]
        rows.append([c["Id"][:12], c["Name"], c["Config"]["Hostname"], status, addrs,
                     " ".join(c["Config"]["Cmd"])[:30]])
    return [table(["CONTAINER ID", "NAME", "HOSTNAME", "STATUS", "NETWORKS", "COMMAND"], rows)]


def network_create_body(name, driver, subnet, gateway, ip_range, aux: dict, internal, attachable,
                        labels: dict, options: dict) -> dict:
    cfg = {k: v for k, v in {"Subnet": subnet, "Gateway": gateway, "IPRange": ip_range,
                             "AuxiliaryAddresses": aux}.items() if v}
    return {"Name": name, "Driver": driver, "Internal": internal, "Attachable": attachable,
            "Labels": labels, "Options": options, "IPAM": {"Driver": "default", "Config": [cfg] if cfg else []}}


def run_body(name, hostname, network, ip, mac_address, aliases, cmd, env: dict) -> dict:
    return {"Name": name, "Hostname": hostname, "NetworkMode": network or "none", "IPAddress": ip,
            "MacAddress": mac_address, "Aliases": list(aliases), "Cmd": list(cmd), "Env": env}
