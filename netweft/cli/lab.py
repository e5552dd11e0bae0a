"""`netweft lab ...`: a cluster of simulated hosts on this machine (needs no daemon: it starts them)."""
from __future__ import annotations

import os
import sys

import click

from netweft.cli.main import cli, table


@cli.group()
def lab():
    """Simulated hosts on this machine: namespaces on one underlay, a netweftd in each."""


@lab.command("up")
@click.option("--hosts", "n", type=int, default=3, show_default=True, help="number of hosts (h1..hN)")
@click.option("--name", default="lab", show_default=True, help="lab name (lowercase letters and digits)")
@click.option("--underlay", default="192.0.2.0/24", show_default=True, help="underlay subnet (a TEST-NET range)")
@click.option("--mtu", type=int, default=1500, show_default=True, help="underlay MTU")
@click.option("--no-swarm", is_flag=True, help="only start the daemons; no swarm init/join")
@click.option("--managers", type=int, default=1, show_default=True,
              help="managers (h1..hM); with sqlite the others forward to h1")
@click.option("--store", type=click.Choice(["sqlite", "etcd"]), default="sqlite", show_default=True,
              help="cluster store: sqlite (one manager) or etcd (a member beside each manager)")
def lab_up(n, name, underlay, mtu, no_swarm, managers, store):
    """Build a lab: h1 inits the swarm, h2..hM join as managers, the others as workers."""
    from netweft.lab.lab import Lab
    Lab(name).up(n, underlay=underlay, mtu=mtu, swarm=not no_swarm, progress=click.echo, managers=managers,
                 init_opts={"Store": store} if store == "etcd" else None)
    click.echo(f"\nlab {name} is up. Try:  netweft lab exec {name} h1 -- netweft node ls")


@lab.command("down")
@click.argument("name")
def lab_down(name):
    """Remove a lab completely (also after a crash)."""
    from netweft.lab.lab import Lab
    Lab(name).down()


@lab.command("ls")
def lab_ls():
    """List labs."""
    from netweft.lab.lab import Lab
    table(["NAME", "HOSTS", "UNDERLAY"], [[l.name, " ".join(l.hosts()), l.state()["underlay"]] for l in Lab.all()])


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("host")
@click.argument("cmd", nargs=-1, required=True)
def lab_exec(name, host, cmd):
    """Run CMD in a lab host's namespace with NETWEFT_HOST set to its daemon:
    netweft lab exec NAME HOST -- CMD [ARGS...]"""
    from netweft.lab.lab import Lab
    argv, env = Lab(name).exec_argv(host, list(cmd))
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
