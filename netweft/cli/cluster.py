"""`netweft swarm ...` and `netweft node ...`: cluster membership and node administration."""
from __future__ import annotations

import json

import click

from netweft.apiclient.client import ref
from netweft.cli.main import api, cli, dump, inspect_each, table, validate


@cli.group()
def swarm():
    """Manage the swarm (cluster membership of this host)."""


@swarm.command("init")
@click.option("--advertise-addr", metavar="ADDR|IFACE", help="address other nodes use to reach this manager")
@click.option("--listen-addr", metavar="ADDR[:PORT]", help="cluster API listen address (default 0.0.0.0:2377)")
@click.option("--data-path-port", type=int, help="UDP port of VXLAN traffic (default 4789)")
@click.option("--wireguard-port", type=int,
              help="UDP port of WireGuard, which carries encrypted overlays between hosts (default 51820)")
@click.option("--default-addr-pool", multiple=True, metavar="CIDR", help="pool of overlay subnets; repeatable")
@click.option("--default-addr-pool-mask-length", type=int, help="prefix length of overlay subnets (default 24)")
@click.option("--cert-expiry", metavar="DURATION", help="node certificate lifetime (default 90d)")
@click.option("--dispatcher-heartbeat", metavar="DURATION",
              help="heartbeat period; a node is Down after 3 missed (default 5s)")
@click.option("--store", metavar="sqlite|etcd|etcd://HOST:2379,...",
              help="cluster store: sqlite (default: one manager), etcd (a member beside each manager: several "
                   "managers, no single point of failure) or an etcd cluster you run")
@click.option("--store-cacert", type=click.File("r"), help="CA certificate of the etcd you run (PEM)")
@click.option("--store-cert", type=click.File("r"), help="client certificate for the etcd you run (PEM)")
@click.option("--store-key", type=click.File("r"), help="client key for the etcd you run (PEM)")
@click.option("--store-cert-expiry", metavar="DURATION", hidden=True,
              help="lifetime of the managers' etcd certificates (default: --cert-expiry)")
@click.pass_context
def swarm_init(ctx, advertise_addr, listen_addr, data_path_port, default_addr_pool, default_addr_pool_mask_length,
               cert_expiry, dispatcher_heartbeat, wireguard_port, store, store_cacert, store_cert, store_key,
               store_cert_expiry):
    """Make this host the first manager of a new cluster."""
    body = {"AdvertiseAddr": advertise_addr, "ListenAddr": listen_addr, "DataPathPort": data_path_port,
            "DefaultAddrPool": list(default_addr_pool), "SubnetSize": default_addr_pool_mask_length,
            "CertExpiry": cert_expiry, "HeartbeatPeriod": dispatcher_heartbeat, "WireguardPort": wireguard_port,
            "Store": store,
            "StoreCACert": store_cacert.read() if store_cacert else None,
            "StoreCert": store_cert.read() if store_cert else None,
            "StoreKey": store_key.read() if store_key else None, "StoreCertExpiry": store_cert_expiry}
    r = api(ctx).call("POST", "/swarm/init", body)
    click.echo(f"Swarm initialized: current node ({r['NodeID']}) is now a manager.\n")
    click.echo("To add a worker to this swarm, run the following command:\n")
    click.echo(f"    netweft swarm join --token {r['JoinTokens']['Worker']} {r['ManagerAddr']}\n")
    click.echo("To add a manager to this swarm, run 'netweft swarm join-token manager' and follow the instructions.")


@swarm.command("join")
@click.option("--token", required=True, help="join token from `netweft swarm join-token worker|manager`")
@click.option("--advertise-addr", metavar="ADDR|IFACE", help="address other nodes use to reach this node")
@click.argument("manager", metavar="MANAGER[:2377]")
@click.pass_context
def swarm_join(ctx, token, advertise_addr, manager):
    """Join a cluster as a worker or a manager (the token decides)."""
    r = api(ctx).call("POST", "/swarm/join", {"JoinToken": token, "RemoteAddrs": [manager],
                                              "AdvertiseAddr": advertise_addr})
    click.echo(f"This node joined a swarm as a {r['Role']}.")


@swarm.command("leave")
@click.option("-f", "--force", is_flag=True, help="leave even as the last manager, or without a reachable manager")
@click.pass_context
def swarm_leave(ctx, force):
    """Leave the cluster."""
    api(ctx).call("POST", "/swarm/leave", force=1 if force else None)
    click.echo("Node left the swarm.")


@swarm.command("join-token")
@click.option("--rotate", is_flag=True, help="replace the token; the old one is refused from now on")
@click.option("-q", "--quiet", is_flag=True, help="only the token")
@click.argument("role", type=click.Choice(["worker", "manager"]))
@click.pass_context
def swarm_join_token(ctx, rotate, quiet, role):
    """Show (or rotate) the join token of a role."""
    c = api(ctx)
    if rotate:
        c.call("POST", "/swarm/join-token/rotate", role=role)
        if not quiet:
            click.echo(f"Successfully rotated {role} join token.\n")
    s = c.call("GET", "/swarm")
    token = s["JoinTokens"][role.capitalize()]
    if quiet:
        click.echo(token)
        return
    click.echo(f"To add a {role} to this swarm, run the following command:\n")
    click.echo(f"    netweft swarm join --token {token} {s['Leader']['Addr']}")


@swarm.command("unlock-key")
@click.option("--rotate", is_flag=True, help="replace the key; the managers fetch the new one from each other")
@click.pass_context
def swarm_unlock_key(ctx, rotate):
    """Rotate the managers' key, which seals the CA keys in the shared store (a cluster on etcd).

    Docker's name: its unlock key guards a manager's secrets. Here every manager keeps the key on its disk
    (0600, no autolock), so there is nothing to print or to unlock with: only --rotate."""
    if not rotate:
        raise click.ClickException("the managers keep their key themselves (there is no autolock to unlock): "
                               "use `netweft swarm unlock-key --rotate` to replace it")
    r = api(ctx).call("POST", "/swarm/unlock-key/rotate")
    click.echo(f"Successfully rotated the managers' key; {r['Managers']} managers hold it.")


@swarm.command("inspect")
@click.pass_context
def swarm_inspect(ctx):
    """Show the cluster: ID, CA expiry, settings (tokens are in `join-token`)."""
    s = api(ctx).call("GET", "/swarm")
    s.pop("JoinTokens", None)
    s["RootCA"].pop("CertPEM", None)
    dump(s)


@cli.group()
def node():
    """Manage the cluster's nodes (on a manager)."""


def _self_id(ctx) -> str:
    return api(ctx).call("GET", "/info")["Swarm"].get("NodeID", "")


@node.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="only IDs")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def node_ls(ctx, quiet, fmt):
    """List the nodes."""
    nodes = api(ctx).call("GET", "/nodes")
    if fmt == "json":
        for n in nodes:
            click.echo(json.dumps(n))
        return
    if quiet:
        for n in nodes:
            click.echo(n["ID"])
        return
    me = _self_id(ctx)
    rows = []
    for n in sorted(nodes, key=lambda n: n["Description"]["Hostname"]):
        ms = n.get("ManagerStatus")
        mstatus = ("Leader" if ms["Leader"] else ms["Reachability"].capitalize()) if ms else ""
        rows.append([n["ID"] + (" *" if n["ID"] == me else ""), n["Description"]["Hostname"],
                     n["Status"]["State"].capitalize(), n["Spec"]["Availability"].capitalize(), mstatus,
                     n["Status"]["Addr"], _health(n.get("DataPath"))])
    table(["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ADDRESS", "HEALTH"], rows)


def _health(dp: dict | None) -> str:
    """The data path to the node as the other hosts' probes see it (`node inspect` has each one's view)."""
    if not dp or dp.get("State", "unknown") == "unknown":
        return "-"
    text = dp["State"].capitalize()
    bad = sorted(f"{h}: {v.get('State')}" for h, v in dp.get("SeenBy", {}).items()
                 if v.get("State") not in ("healthy", "unknown"))
    if bad and dp["State"] != "unreachable":
        text += f" ({', '.join(bad)})"
    return text + (", withdrawn" if dp.get("Withdrawn") else "")


@node.command("inspect")
@click.argument("nodes", nargs=-1, required=True)
@click.pass_context
def node_inspect(ctx, nodes):
    """Show nodes as JSON ('self' is this node); a missing one is reported and the exit code is 1."""
    c = api(ctx)
    inspect_each(lambda n: c.call("GET", f"/nodes/{ref(_self_id(ctx) if n == 'self' else n)}"), nodes)


@node.command("rm")
@click.option("-f", "--force", is_flag=True, help="remove even if the node is up (its certificate is refused at once)")
@click.argument("nodes", nargs=-1, required=True)
@click.pass_context
def node_rm(ctx, force, nodes):
    """Remove nodes from the cluster; their certificates are refused from that moment."""
    for n in nodes:
        api(ctx).call("DELETE", f"/nodes/{ref(n)}", force=1 if force else None)
        click.echo(n)


def _update(ctx, n: str, body: dict) -> None:
    api(ctx).call("POST", f"/nodes/{ref(n)}/update", body)


@node.command("promote")
@click.argument("nodes", nargs=-1, required=True)
@click.pass_context
def node_promote(ctx, nodes):
    """Make workers managers."""
    for n in nodes:
        _update(ctx, n, {"Role": "manager"})
        click.echo(f"Node {n} promoted to a manager in the swarm.")


@node.command("demote")
@click.argument("nodes", nargs=-1, required=True)
@click.pass_context
def node_demote(ctx, nodes):
    """Make managers workers."""
    for n in nodes:
        _update(ctx, n, {"Role": "worker"})
        click.echo(f"Manager {n} demoted in the swarm.")


@node.command("update")
@click.option("--availability", type=click.Choice(["active", "pause", "drain"]))
@click.option("--label-add", multiple=True, metavar="K=V", help="add or change a label; repeatable")
@click.option("--label-rm", multiple=True, metavar="K", help="remove a label; repeatable")
@click.option("--role", type=click.Choice(["worker", "manager"]))
@click.argument("node_ref", metavar="NODE")
@click.pass_context
def node_update(ctx, availability, label_add, label_rm, role, node_ref):
    """Change a node's availability, labels or role."""
    _update(ctx, node_ref, {"Availability": availability, "Role": role,
                            "LabelsAdd": validate.parse_key_values(list(label_add), "label"),
                            "LabelsRemove": list(label_rm)})
    click.echo(node_ref)
