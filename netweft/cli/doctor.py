"""`netweft doctor`: the daemon checks this host's part of the cluster (netweft/daemon/doctor.py); one line per
finding, with what to do. Exit status 0 only when every finding is ok."""
from __future__ import annotations

import json
import sys

import click

from netweft.cli.main import api, cli

MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def doctor(ctx, fmt):
    """Check kernel features, cluster ports, path MTU, clocks, certificates and leftovers of this host."""
    findings = api(ctx).call("GET", "/doctor")["Findings"]
    for f in findings:
        if fmt == "json":
            click.echo(json.dumps(f))
        else:
            click.echo(f"{MARK.get(f['Level'], f['Level'])}  {f['Check']}: {f['Message']}")
    bad = [f for f in findings if f["Level"] != "ok"]
    if fmt == "text":
        click.echo(f"{len(bad)} problem(s) found" if bad else "all is well")
    sys.exit(1 if bad else 0)
