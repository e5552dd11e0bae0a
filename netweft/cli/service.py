"""`netweft service ...`: services of the swarm (run on a manager), with Docker's verbs and flags."""
from __future__ import annotations

import sys
import time

import click

from netweft.cli import render
from netweft.apiclient.client import ApiError, ref
from netweft.cli.main import api, cli, inspect_each, validate

CONVERGE_TIMEOUT = 120.0


@cli.group()
def service():
    """Manage services (on a swarm manager)."""


def parse_publish(text: str) -> dict:
    """published=P,target=T[,protocol=tcp|udp][,mode=ingress|host], or P:T[/proto]."""
    if "=" not in text:
        proto = "tcp"
        if "/" in text:
            text, proto = text.split("/", 1)
        if ":" in text:
            pub, _, tgt = text.partition(":")
        else:
            pub, tgt = "", text
        fields = {"target": tgt, "protocol": proto, **({"published": pub} if pub else {})}
    else:
        fields = {}
        for part in text.split(","):
            k, sep, v = part.partition("=")
            if not sep or k not in ("published", "target", "protocol", "mode"):
                raise click.BadParameter(f"invalid --publish {text!r}: expected published=P,target=T"
                                         "[,protocol=tcp|udp][,mode=ingress|host]")
            fields[k] = v
    if "target" not in fields:
        raise click.BadParameter(f"invalid --publish {text!r}: target=PORT is missing")
    out = {}
    for k in ("published", "target"):
        if k in fields:
            try:
                out[k] = int(fields[k])
            except ValueError:
                raise click.BadParameter(f"invalid --publish {text!r}: {k} must be a port number") from None
    out["protocol"] = fields.get("protocol", "tcp")
    out["mode"] = fields.get("mode", "ingress")
    return out


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration as Docker's flags take it (10s, 1m30s, 500ms, 0), in seconds."""
    import re
    t = text.strip()
    if t in ("0", ""):
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise click.BadParameter(f"invalid duration {text[:40]!r}: expected e.g. 10s, 1m30s or 500ms")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def update_config(parallelism, delay, order, failure_action, old: dict | None = None) -> dict | None:
    """The update_config of a request from the --update-* flags given (None: none given, keep it)."""
    if parallelism is None and delay is None and order is None and failure_action is None:
        return old
    base = dict(old or {"parallelism": 1, "delay": 0.0, "order": "stop-first", "failure_action": "pause"})
    if parallelism is not None:
        base["parallelism"] = parallelism
    if delay is not None:
        base["delay"] = parse_duration(delay)
    if order is not None:
        base["order"] = order
    if failure_action is not None:
        base["failure_action"] = failure_action
    return base


def update_options(f):
    """Docker's --update-* flags (service create and update)."""
    for opt in reversed([
            click.option("--update-parallelism", type=click.IntRange(0, 10000), default=None,
                         help="tasks updated at once (0: all; default 1)"),
            click.option("--update-delay", default=None, metavar="DURATION", help="delay between batches (e.g. 10s)"),
            click.option("--update-order", type=click.Choice(["stop-first", "start-first"]), default=None,
                         help="stop the old task first (default) or start the new one first"),
            click.option("--update-failure-action", type=click.Choice(["pause", "continue"]), default=None,
                         help="when a new task fails: pause the update (default) or continue")]):
        f = opt(f)
    return f


def spec_from_view(v: dict) -> dict:
    """The create request a service's inspect view stands for (to change it with update/scale)."""
    s = v["Spec"]
    ctr = s["TaskTemplate"]["ContainerSpec"]
    return {"name": s["Name"], "command": ctr["Command"],
            "env": dict(e.split("=", 1) for e in ctr.get("Env", [])),
            "mode": "replicated" if "Replicated" in s["Mode"] else "global",
            "replicas": s["Mode"]["Replicated"]["Replicas"] if "Replicated" in s["Mode"] else None,
            "networks": [n["Target"] for n in s["TaskTemplate"].get("Networks", [])],
            "ports": [{"target": p["TargetPort"], "published": p["PublishedPort"], "protocol": p["Protocol"],
                       "mode": p["PublishMode"]} for p in s["EndpointSpec"].get("Ports", [])],
            "endpoint_mode": s["EndpointSpec"]["Mode"], "constraints": s["TaskTemplate"]["Placement"]["Constraints"],
            "labels": s.get("Labels", {}),
            **({"update_config": {"parallelism": u["Parallelism"], "delay": u["Delay"] / 1e9, "order": u["Order"],
                                  "failure_action": u["FailureAction"]}} if (u := s.get("UpdateConfig")) else {})}


def wait_converged(client, sid: str, quiet: bool) -> None:
    """Docker's progress: `overall progress: N out of M tasks` until they all run, then `verify`."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    last = None
    while True:
        v = client.call("GET", f"/services/{sid}")
        st = v["ServiceStatus"]
        now = (st["RunningTasks"], st["DesiredTasks"])
        if now != last and not quiet:
            click.echo(f"overall progress: {now[0]} out of {now[1]} tasks")
            last = now
        state = (v.get("UpdateStatus") or {}).get("State", "")
        if state in ("paused", "rollback_paused"):
            click.echo(f"Error: {v['UpdateStatus']['Message']}; see `netweft service ps {v['Spec']['Name']}`, "
                       "then update again or `netweft service rollback`", err=True)
            sys.exit(1)
        if now[0] == now[1] and state not in ("updating", "rollback_started"):
            if not quiet:
                click.echo("rollback: rollback completed" if state == "rollback_completed" else
                           "verify: Service converged")
            return
        if time.monotonic() > deadline:
            click.echo(f"Error: the service did not converge within {CONVERGE_TIMEOUT:g} s; "
                       f"see `netweft service ps {v['Spec']['Name']}`", err=True)
            sys.exit(1)
        time.sleep(0.2)


@service.command("create", context_settings={"ignore_unknown_options": False})
@click.option("--name", required=True, help="service name")
@click.option("--replicas", type=int, help="number of tasks (replicated mode; default 1)")
@click.option("--mode", type=click.Choice(["replicated", "global"]), default="replicated", show_default=True)
@click.option("--network", multiple=True, help="overlay network to attach tasks to; repeatable")
@click.option("-p", "--publish", multiple=True, metavar="published=P,target=T[,protocol=,mode=]",
              help="publish a port; repeatable")
@click.option("--endpoint-mode", type=click.Choice(["vip", "dnsrr"]), default="vip", show_default=True)
@click.option("-e", "--env", multiple=True, metavar="K=V", help="environment variable; repeatable")
@click.option("--constraint", multiple=True, metavar="node.hostname==H", help="placement constraint; repeatable")
@click.option("--label", multiple=True, metavar="K=V", help="service label; repeatable")
@click.option("-d", "--detach", is_flag=True, help="do not wait for the tasks to run")
@click.option("-q", "--quiet", is_flag=True, help="print only the ID")
@update_options
@click.argument("cmd", nargs=-1, required=True)
@click.pass_context
def service_create(ctx, name, replicas, mode, network, publish, endpoint_mode, env, constraint, label, detach,
                   quiet, update_parallelism, update_delay, update_order, update_failure_action, cmd):
    """Create a service: netweft service create --name S [OPTIONS] -- CMD [ARGS...]"""
    body = {"name": name, "command": list(cmd), "env": validate.parse_key_values(list(env), "env"),
            "mode": mode, "replicas": replicas, "networks": list(network),
            "ports": [parse_publish(p) for p in publish], "endpoint_mode": endpoint_mode,
            "constraints": list(constraint), "labels": validate.parse_key_values(list(label), "label"),
            "update_config": update_config(update_parallelism, update_delay, update_order, update_failure_action)}
    client = api(ctx)
    sid = client.call("POST", "/services/create", body)["ID"]
    click.echo(sid)
    if not detach:
        wait_converged(client, sid, quiet)


@service.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="only IDs")
@click.pass_context
def service_ls(ctx, quiet):
    """List services."""
    views = api(ctx).call("GET", "/services")
    if quiet:
        for v in views:
            click.echo(v["ID"][:12])
        return
    rows = []
    for v in views:
        st = v["ServiceStatus"]
        mode = "replicated" if "Replicated" in v["Spec"]["Mode"] else "global"
        ports = ", ".join(f"*:{p['PublishedPort']}->{p['TargetPort']}/{p['Protocol']}" for p in v["Endpoint"]["Ports"])
        rows.append([v["ID"][:12], v["Spec"]["Name"], mode, f"{st['RunningTasks']}/{st['DesiredTasks']}", ports])
    click.echo(render.table(["ID", "NAME", "MODE", "REPLICAS", "PORTS"], rows))


@service.command("ps")
@click.option("-q", "--quiet", is_flag=True, help="only IDs")
@click.option("--no-trunc", is_flag=True, help="full IDs")
@click.argument("services", nargs=-1, required=True)
@click.pass_context
def service_ps(ctx, quiet, no_trunc, services):
    """List the tasks of services (newest first per slot, as Docker: history shown with \\_)."""
    rows = []
    for s in services:
        for v in api(ctx).call("GET", "/tasks", service=s):
            tid = v["ID"] if no_trunc else v["ID"][:12]
            if quiet:
                click.echo(tid)
                continue
            rows.append([tid, v["Name"], v["Node"], v["DesiredState"].capitalize(),
                         v["Status"]["State"].capitalize(), v["Status"]["Err"]])
    if not quiet:
        click.echo(render.table(["ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"], rows))


@service.command("inspect")
@click.argument("services", nargs=-1, required=True)
@click.pass_context
def service_inspect(ctx, services):
    """Show services as JSON (Docker's shape)."""
    inspect_each(lambda s: api(ctx).call("GET", f"/services/{ref(s)}"), services)


def _update(ctx, name: str, change, detach: bool, quiet: bool = False) -> None:
    client = api(ctx)
    v = client.call("GET", f"/services/{ref(name)}")
    body = spec_from_view(v)
    change(body)
    client.call("POST", f"/services/{ref(v['ID'])}/update", body)
    click.echo(v["Spec"]["Name"])
    if not detach:
        wait_converged(client, v["ID"], quiet)


@service.command("scale")
@click.option("-d", "--detach", is_flag=True, help="do not wait for the tasks to run")
@click.argument("pairs", nargs=-1, required=True, metavar="SERVICE=REPLICAS...")
@click.pass_context
def service_scale(ctx, detach, pairs):
    """Change the number of tasks of replicated services."""
    for pair in pairs:
        name, sep, n = pair.partition("=")
        if not sep or not n.isdigit():
            raise click.BadParameter(f"invalid {pair!r}: expected SERVICE=REPLICAS")
        _update(ctx, name, lambda b: b.update(replicas=int(n)), detach)


@service.command("update")
@click.option("--replicas", type=int)
@click.option("--env-add", multiple=True, metavar="K=V")
@click.option("--env-rm", multiple=True, metavar="K")
@click.option("--constraint-add", multiple=True)
@click.option("--constraint-rm", multiple=True)
@click.option("--publish-add", multiple=True)
@click.option("--publish-rm", multiple=True, metavar="TARGET", type=int)
@click.option("-d", "--detach", is_flag=True, help="do not wait for the tasks to run")
@update_options
@click.argument("name")
@click.pass_context
def service_update(ctx, replicas, env_add, env_rm, constraint_add, constraint_rm, publish_add, publish_rm, detach,
                   update_parallelism, update_delay, update_order, update_failure_action, name):
    """Change a service; when more than the replica count changes its tasks are replaced, a batch at a time
    (--update-parallelism, --update-delay, --update-order, --update-failure-action)."""
    def change(b):
        b["update_config"] = update_config(update_parallelism, update_delay, update_order, update_failure_action,
                                           b.get("update_config"))
        if replicas is not None:
            b["replicas"] = replicas
        b["env"].update(validate.parse_key_values(list(env_add), "env"))
        for k in env_rm:
            b["env"].pop(k, None)
        b["constraints"] = [c for c in b["constraints"] if c not in constraint_rm] + list(constraint_add)
        b["ports"] = [p for p in b["ports"] if p["target"] not in publish_rm] + [parse_publish(p) for p in publish_add]
    _update(ctx, name, change, detach)


@service.command("rollback")
@click.option("-d", "--detach", is_flag=True, help="do not wait for the tasks to run")
@click.option("-q", "--quiet", is_flag=True, help="no progress")
@click.argument("name")
@click.pass_context
def service_rollback(ctx, detach, quiet, name):
    """Return a service to its spec before the last update (rolled out like an update)."""
    client = api(ctx)
    v = client.call("GET", f"/services/{ref(name)}")
    client.call("POST", f"/services/{ref(v['ID'])}/rollback")
    click.echo(v["Spec"]["Name"])
    if not detach:
        wait_converged(client, v["ID"], quiet)


@service.command("rm")
@click.argument("services", nargs=-1, required=True)
@click.pass_context
def service_rm(ctx, services):
    """Remove services (their tasks stop)."""
    failed = False
    for s in services:
        try:
            api(ctx).call("DELETE", f"/services/{ref(s)}")
            click.echo(s)
        except ApiError as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@service.command("logs")
@click.option("-f", "--follow", is_flag=True, help="follow the output")
@click.option("-n", "--tail", default="all", show_default=True, help="lines from the end of each task's log")
@click.option("-t", "--timestamps", is_flag=True, help="show when each line was read by its task's host")
@click.option("--no-trunc", is_flag=True, help="full task IDs")
@click.argument("name")
@click.pass_context
def service_logs(ctx, follow, tail, timestamps, no_trunc, name):
    """Output of every task of a service, on whichever host it runs (each line prefixed TASK@NODE)."""
    import json
    if tail != "all" and not tail.isdigit():
        raise click.BadParameter(f"invalid --tail {tail!r}: a number of lines or all")
    q = {"tail": tail, "follow": int(follow), "timestamps": int(timestamps), "no_trunc": int(no_trunc)}
    buf, failed = b"", False
    try:
        for chunk in api(ctx).stream(f"/services/{ref(name)}/logs", **q):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line:
                    continue
                msg = json.loads(line)
                if "out" in msg:
                    click.echo(msg["out"])
                else:
                    click.echo(f"error: {msg.get('err', '')}", err=True)
                    failed = True
    except KeyboardInterrupt:
        return
    if failed:
        sys.exit(1)
