"""`netweft install-cni`: put the CNI plugin where runtimes look for it, and (with --network) a network
configuration naming a netweft network, so podman, containerd or Kubernetes can use it."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import click

from netweft.cli.main import cli
from netweft.errors import NetweftError
from netweft.model.objects import NAME_PATTERN

DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
PLUGIN = "netweft"


def plugin_script(python: str, source: str) -> str:
    """The plugin executable: this installation's Python running netweft.plugins.cni, without the site
    machinery (-S: a third of the start-up time) and with netweft's own directory on the path."""
    return (f"#!{python} -IS\n# The netweft CNI plugin (written by `netweft install-cni`).\n"
            f"import sys\nsys.path.insert(0, {source!r})\nfrom netweft.plugins.cni import main\nsys.exit(main())\n")


def conflist(network: str, socket: str | None, version: str) -> dict:
    plugin = {"type": PLUGIN, "network": network,
              "capabilities": {"ips": True, "mac": True, "aliases": True, "portMappings": True}}
    if socket:
        plugin["socket"] = socket
    return {"cniVersion": version, "name": network, "plugins": [plugin]}


def write_atomic(path: str, text: str, mode: int) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".netweft-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@cli.command("install-cni")
@click.option("--bin-dir", default=DEFAULT_BIN_DIR, show_default=True, help="the CNI plugin directory")
@click.option("--conf-dir", default=DEFAULT_CONF_DIR, show_default=True,
              help="the CNI network configuration directory (written only with --network)")
@click.option("--network", "networks", multiple=True, metavar="NAME",
              help="also write NAME.conflist for netweft network NAME; repeatable")
@click.option("--socket", default=None, metavar="unix:///PATH",
              help="the netweftd the plugin talks to (default: the standard socket)")
@click.option("--cni-version", default="1.0.0", show_default=True, type=click.Choice(["0.4.0", "1.0.0", "1.1.0"]),
              help="cniVersion of the written configurations (podman 4 reads up to 1.0.0)")
def install_cni(bin_dir, conf_dir, networks, socket, cni_version):
    """Install the netweft CNI plugin (and network configurations).

    \b
    Examples:
      netweft install-cni                                   # /opt/cni/bin/netweft
      netweft install-cni --conf-dir /etc/cni/net.d --network ov
    """
    import re
    if socket and not socket.startswith("unix:///"):
        raise NetweftError(f"--socket {socket!r} is not unix:///PATH")
    for n in networks:
        if not re.match(NAME_PATTERN, n):
            raise NetweftError(f"invalid network name {n!r}: letters, digits, '_', '.', '-'")
    path = os.path.join(os.path.abspath(bin_dir), PLUGIN)
    import netweft
    source = os.path.dirname(os.path.dirname(os.path.abspath(netweft.__file__)))
    write_atomic(path, plugin_script(sys.executable, source), 0o755)
    click.echo(f"installed {path}")
    for n in networks:
        conf = os.path.join(os.path.abspath(conf_dir), f"{n}.conflist")
        write_atomic(conf, json.dumps(conflist(n, socket, cni_version), indent=2) + "\n", 0o644)
        click.echo(f"wrote {conf}")
