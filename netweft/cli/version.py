"""`netweft version` (the client's and the daemon's versions, as `docker version`) and `netweft completion`."""
from __future__ import annotations

import json
import platform
import sys

import click

from netweft import __version__
from netweft.apiclient.client import ApiError, DaemonUnreachable
from netweft.cli.main import api, cli

SHELLS = ("bash", "zsh")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def version(ctx, fmt):
    """Show the netweft client's version and the daemon's."""
    client = {"Version": __version__, "PythonVersion": platform.python_version(), "Os": sys.platform}
    try:
        info = api(ctx).call("GET", "/info")
        server, problem = {"Version": info.get("Version", ""), "Pid": info.get("Pid")}, None
    except (ApiError, DaemonUnreachable) as e:
        server, problem = None, str(e)
    if fmt == "json":
        click.echo(json.dumps({"Client": client, "Server": server}))
    else:
        click.echo(f"Client:\n Version:  {client['Version']}\n Python:   {client['PythonVersion']}")
        if server is not None:
            click.echo(f"\nServer: netweftd\n Version:  {server['Version']}")
    if problem:
        click.echo(f"Error: {problem}", err=True)
        sys.exit(1)


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class
    return get_completion_class(shell)(cli, {}, "netweft", "_NETWEFT_COMPLETE").source()


@cli.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell):
    """Print the shell completion script: `source <(netweft completion bash)`, or install the files
    under packaging/completion (make install-service does)."""
    click.echo(completion_script(shell), nl=False)
