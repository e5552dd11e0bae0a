"""The `netweft` command: a thin client of the local netweftd, with Docker's verbs and flags."""
from __future__ import annotations

import json
import os
import sys

import click

from netweft.cli import render
from netweft.apiclient.client import ApiError, Client, DaemonUnreachable, ref
from netweft.errors import NetweftError
from netweft import validate


def table(headers: list[str], rows: list[list[str]]) -> None:
    click.echo(render.table(headers, rows))


def dump(obj) -> None:
    click.echo(json.dumps(obj, indent=4))


class Group(click.Group):
    """Turns every error into one clear line and a non-zero exit (never a traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ApiError, DaemonUnreachable, NetweftError) as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:  # `netweft ... | head`: the reader is gone, nothing left to say
            sys.stderr.close()
            sys.exit(1)


def once(ctx, param, values):
    """A flag that takes one value: given twice, it is refused rather than silently reduced to the last."""
    if len(values) > 1:
        raise NetweftError(f"{param.opts[0]} given {len(values)} times ({', '.join(values)}): a network has one "
                           f"IPv4 subnet here, give {param.opts[0]} once")
    return values[0] if values else None


def inspect_each(path_of, names) -> None:
    """Docker's inspect: print what was found (`[]` if nothing), then one error line per missing name, exit 1."""
    found, missing = [], []
    for n in names:
        try:
            found.append(path_of(n))
        except ApiError as e:
            if e.status != 404:
                raise
            missing.append(str(e))
    dump(found)
    if missing:
        for msg in missing:
            click.echo(f"Error: {msg}", err=True)
        sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-H", "--host", envvar="NETWEFT_HOST", metavar="unix:///PATH",
              help="daemon socket (default unix:///run/netweft/netweft.sock; env NETWEFT_HOST)")
@click.pass_context
def cli(ctx, host):
    """netweft: container networks that span hosts.

    \b
    Quick start (as root):
      netweftd &                                   # the daemon, one per host
      netweft network create --subnet 198.18.0.0/24 mgmt
      netweft run -d --name web --network mgmt --ip 198.18.0.10 -- sleep infinity
      netweft exec web -- ip addr
    """
    ctx.obj = Client(host)


def api(ctx) -> Client:
    return ctx.find_root().obj


# ---------------------------------------------------------------- networks
@cli.group()
def network():
    """Manage networks."""


@network.command("create")
@click.option("-d", "--driver", default="bridge", show_default=True, help="bridge (local) or overlay (swarm)")
@click.option("--subnet", multiple=True, callback=once,
              help="CIDR, e.g. 198.18.0.0/24 (default: from the daemon's address pool)")
@click.option("--gateway", multiple=True, callback=once, help="gateway IP inside the subnet (default: its first address)")
@click.option("--ip-range", multiple=True, callback=once,
              help="hand out container IPs from this sub-range only (--ip may still pin any address of the subnet)")
@click.option("--aux-address", multiple=True, metavar="NAME=IP", help="reserve an address; repeatable")
@click.option("--internal", is_flag=True, help="no traffic in or out of the network")
@click.option("--attachable", is_flag=True, help="(overlay) allow plain containers to attach")
@click.option("--label", multiple=True, metavar="K=V", help="metadata; repeatable")
@click.option("--ingress", is_flag=True, help="(overlay) the routing-mesh network; one per swarm")
@click.option("-o", "--opt", multiple=True, metavar="K=V",
              help="driver options; repeatable; others are refused. Any driver: com.docker.network.driver.mtu=N. "
                   "bridge: com.docker.network.bridge.name=NAME, parent=IFACE (bridge a host interface: "
                   "containers sit on that LAN, no NAT). overlay: com.docker.network.driver.overlay.vxlanid_list=VNI")
@click.argument("name")
@click.pass_context
def network_create(ctx, driver, subnet, gateway, ip_range, aux_address, internal, attachable, label, ingress, opt,
                   name):
    """Create a network.

    \b
    Examples:
      netweft network create --subnet 198.18.0.0/24 --ip-range 198.18.0.128/25 mgmt
      netweft network create --subnet 192.0.2.0/24 --gateway 192.0.2.1 -o parent=eth1 lan
      netweft network create -d overlay --attachable ov      # on a swarm manager
    """
    labels = validate.parse_key_values(list(label), "label")
    options = validate.parse_key_values(list(opt), "option", allow_bare=True)
    aux = validate.parse_key_values(list(aux_address), "aux-address")
    body = render.network_create_body(name, driver, subnet, gateway, ip_range, aux, internal, attachable,
                                      labels, options)
    if ingress:
        body["Ingress"] = True
    click.echo(api(ctx).call("POST", "/networks/create", body)["Id"])


def parse_filters(items) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in render.FILTER_KEYS:
            raise click.UsageError(f"invalid filter {item!r}: use name=, driver=, label=, id=, scope= or type=")
        out.setdefault(key, []).append(value)
    return out


@network.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="only IDs")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="name=PART, driver=, label=K[=V], id=PREFIX, scope=local|swarm, type=custom|builtin; repeatable "
                   "(values of one key: any; different keys: all)")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: one object per line with Docker's keys (ID, Name, Driver, Scope, ...)")
@click.option("--no-trunc", is_flag=True, help="full IDs")
@click.pass_context
def network_ls(ctx, quiet, filters, fmt, no_trunc):
    """List networks (with the predefined host and none, as Docker does), sorted by name."""
    f = parse_filters(filters)
    nets = api(ctx).call("GET", "/networks", filters=json.dumps(f) if f else None)
    for line in render.network_ls(nets, quiet, fmt, no_trunc):
        click.echo(line)


@network.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_inspect(ctx, names):
    """Show networks as JSON; a missing one is reported and the exit code is 1, the others still shown."""
    inspect_each(lambda n: api(ctx).call("GET", f"/networks/{ref(n)}"), names)


@network.command("rm")
@click.option("-f", "--force", is_flag=True, help="do not ask before removing the ingress network")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_rm(ctx, force, names):
    """Remove networks (refused while containers are attached)."""
    failed = False
    for n in names:
        try:
            if not force and not confirm_ingress_removal(api(ctx), n):
                failed = True
                continue
            api(ctx).call("DELETE", f"/networks/{ref(n)}")
            click.echo(n)
        except ApiError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


def confirm_ingress_removal(client, name: str) -> bool:
    """For the ingress network: say what stops working and ask; True to go on (other networks: True)."""
    try:
        net = client.call("GET", f"/networks/{ref(name)}")
    except ApiError:
        return True   # the DELETE reports what is wrong
    if not net.get("Ingress"):
        return True
    click.echo(f"WARNING! {net['Name']!r} is the ingress network: without it, ports published by services "
               "(mode=ingress) stop answering on every host, until an ingress network is created again.",
               err=True)
    return click.confirm("Are you sure you want to continue?", default=False, err=True)


@network.command("prune")
@click.option("-f", "--force", is_flag=True, help="do not ask")
@click.pass_context
def network_prune(ctx, force):
    """Remove all networks without containers."""
    if not force and not click.confirm("WARNING! This removes all networks not used by a container. Continue?"):
        return
    removed = api(ctx).call("POST", "/networks/prune")["NetworksDeleted"]
    if removed:
        click.echo("Deleted Networks:\n" + "\n".join(removed))


@network.command("connect")
@click.option("--ip", help="IPv4 address for the container on this network")
@click.option("--alias", multiple=True, help="extra name on this network; repeatable")
@click.argument("net")
@click.argument("container")
@click.pass_context
def network_connect(ctx, ip, alias, net, container):
    """Connect a container to a network."""
    api(ctx).call("POST", f"/networks/{ref(net)}/connect",
                  {"Container": container, "EndpointConfig": {"IPAMConfig": {"IPv4Address": ip or ""},
                                                              "Aliases": list(alias)}})


@network.command("disconnect")
@click.argument("net")
@click.argument("container")
@click.pass_context
def network_disconnect(ctx, net, container):
    """Disconnect a container from a network."""
    api(ctx).call("POST", f"/networks/{ref(net)}/disconnect", {"Container": container})


# -------------------------------------------------------------- containers
@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("-d", "--detach", is_flag=True, help="run in the background and print the container ID")
@click.option("--name", help="container name (default: generated)")
@click.option("--hostname", help="hostname inside the container (default: its short ID; the host's with "
                                 "--network host); a dotted name's first label resolves too")
@click.option("--network", "--net", "network_", default=None, metavar="NET|host|none",
              help="network to join first (gives the default route); default none")
@click.option("--ip", help="IPv4 address on that network (default: allocated)")
@click.option("--mac-address", help="MAC address on that network (default: derived from the IP)")
@click.option("--network-alias", multiple=True, help="extra name on that network; repeatable")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="environment variable; repeatable")
@click.argument("cmd", nargs=-1, required=True)
@click.pass_context
def run(ctx, detach, name, hostname, network_, ip, mac_address, network_alias, env, cmd):
    """Run a command in a new lightweight container: netweft run [OPTIONS] -- CMD [ARGS...]"""
    body = render.run_body(name, hostname, network_, ip, mac_address, network_alias, cmd,
                           validate.parse_key_values(list(env), "environment variable"))
    c = api(ctx)
    ctr = c.call("POST", "/containers/create", body)
    if detach:
        click.echo(ctr["Id"])
        return
    for chunk in c.stream(f"/containers/{ctr['Id']}/logs", follow=1):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    sys.exit(c.call("GET", f"/containers/{ctr['Id']}/json")["State"]["ExitCode"])


@cli.command()
@click.option("-a", "--all", "all_", is_flag=True, help="also stopped containers")
@click.option("-q", "--quiet", is_flag=True, help="only IDs")
@click.pass_context
def ps(ctx, all_, quiet):
    """List containers."""
    for line in render.ps(api(ctx).call("GET", "/containers/json", all=1 if all_ else None), quiet):
        click.echo(line)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def inspect(ctx, names):
    """Show containers as JSON; a missing one is reported and the exit code is 1, the others still shown."""
    inspect_each(lambda n: api(ctx).call("GET", f"/containers/{ref(n)}/json"), names)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing until the container exits")
@click.argument("name")
@click.pass_context
def logs(ctx, follow, name):
    """Print a container's output."""
    for chunk in api(ctx).stream(f"/containers/{ref(name)}/logs", follow=1 if follow else None):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


@cli.command("exec")
@click.argument("name")
@click.argument("cmd", nargs=-1, required=True)
@click.pass_context
def exec_(ctx, name, cmd):
    """Run a command inside a running container: netweft exec CTR -- CMD [ARGS...]"""
    from netweft.runtime.container import exec_argv
    ctr = api(ctx).call("GET", f"/containers/{ref(name)}/json")
    if not ctr["State"]["Running"]:
        raise click.ClickException(f"container {ctr['Name']!r} is not running; start it with `netweft start`")
    argv = exec_argv(ctr["State"]["Pid"], list(cmd))
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise NetweftError(f"cannot run {argv[0]} to enter the container: {e.strerror}") from None


@cli.command()
@click.option("-t", "--time", "timeout", default=10, show_default=True, help="seconds before SIGKILL")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def stop(ctx, timeout, names):
    """Stop running containers (their networking stays until rm)."""
    for n in names:
        api(ctx).call("POST", f"/containers/{ref(n)}/stop", t=timeout)
        click.echo(n)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def start(ctx, names):
    """Start stopped containers again."""
    for n in names:
        api(ctx).call("POST", f"/containers/{ref(n)}/start")
        click.echo(n)


@cli.command()
@click.option("-f", "--force", is_flag=True, help="stop it first if it runs")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx, force, names):
    """Remove containers and their network endpoints (several at once; a failure does not stop the others)."""
    from netweft.cli.remove import remove
    if remove(api(ctx), list(names), force):
        sys.exit(1)


@cli.command()
@click.pass_context
def info(ctx):
    """Show facts about the daemon."""
    dump(api(ctx).call("GET", "/info"))


def main() -> None:
    cli(prog_name="netweft")


if __name__ == "__main__":
    main()


# Subcommand groups live in their own modules; importing them registers them on `cli`.
from netweft.cli import cluster as _cluster, lab as _lab  # noqa: E402,F401
from netweft.cli import cni as _cni  # noqa: E402,F401
from netweft.cli import events as _events, version as _version  # noqa: E402,F401
from netweft.cli import doctor as _doctor  # noqa: E402,F401
from netweft.cli import service as _service  # noqa: E402,F401
