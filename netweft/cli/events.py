"""`netweft events`: the cluster's events as they happen (and, with --since, as they happened), as
`docker events` shows them."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import click

from netweft.apiclient.client import Client
from netweft.cli.main import api, cli

FILTER_KEYS = ("type", "event", "network", "node")
_DURATION = re.compile(r"\A(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+\Z")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_time(text: str, flag: str, now_ns: int | None = None) -> int:
    """Docker's --since/--until: a Unix time (seconds, may have a fraction), an RFC 3339 date or time, or a
    duration before now (10m, 1h30m, 500ms). Returns Unix time in nanoseconds."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        whole, _, frac = t.partition(".")
        return int(whole) * 10**9 + int((frac + "000000000")[:9])
    if _DURATION.match(t):
        return now_ns - round(sum(float(n) * _UNIT_NS[u] for n, u in _PART.findall(t)))
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise click.UsageError(f"invalid {flag} {text!r}: use a Unix time (1700000000), an RFC 3339 time "
                               "(2024-05-01T10:00:00Z) or a duration before now (10m, 1h30m)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def parse_event_filters(items) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise click.UsageError(f"invalid filter {item!r}: use type=, event=, network= or node= with a value")
        out.setdefault(key, []).append(value)
    return out


def line(ev: dict) -> str:
    """Docker's default: 2024-05-01T10:00:00.123456789Z network create ID (name=ov, type=overlay)."""
    ns = ev.get("timeNano", 0)
    stamp = datetime.fromtimestamp(ns // 10**9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(ev["Actor"]["Attributes"].items()) if v != "")
    return f"{stamp} {ev['Type']} {ev['Action']} {ev['Actor']['ID']}" + (f" ({attrs})" if attrs else "")


@cli.command()
@click.option("--since", metavar="TIME", help="show events from this time on (Unix time, RFC 3339, or 10m ago)")
@click.option("--until", metavar="TIME", help="stop at this time (without it, follow new events)")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="type=network|node|health, event=ACTION, network=NAME|ID, node=NAME|ID; repeatable")
@click.option("--format", "fmt", metavar="json", help="json: one JSON object per line")
@click.pass_context
def events(ctx, since, until, filters, fmt):
    """Stream the cluster's events: networks created and removed, containers connected and disconnected,
    nodes joining, going down, coming back, removed, and changes of the data-path health between hosts."""
    if fmt not in (None, "json"):
        raise click.UsageError(f"invalid --format {fmt!r}: use json, or leave it out")
    now = time.time_ns()
    q = {"since": parse_time(since, "--since", now) if since else None,
         "until": parse_time(until, "--until", now) if until else None}
    f = parse_event_filters(filters)
    if f:
        q["filters"] = json.dumps(f)
    client = Client(api(ctx).host, timeout=None)   # a stream may stay quiet for hours
    buf = b""
    for chunk in client.stream("/events", **q):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            if not raw.strip():
                continue
            ev = json.loads(raw)
            if ev.get("type") == "ping":
                continue
            if ev.get("type") == "error":
                raise click.ClickException(ev.get("message", "the event stream ended"))
            click.echo(json.dumps(ev) if fmt == "json" else line(ev))
