"""Item 9 of issue 13: netweftd --config FILE (TOML), versions, shell completion, the systemd unit."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netweft import __version__
from netweft.daemon import config
from netweft.daemon.main import parse_args

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> str:
    p = tmp_path / "netweftd.toml"
    p.write_text(text)
    return str(p)


def test_the_file_gives_the_flags_and_the_command_line_wins(tmp_path):
    f = write(tmp_path, 'data-root = "/tmp/nwt-x/data"\nlog-level = "debug"\nhostname = "fromfile"\n'
                        'default-address-pool = ["base=198.19.0.0/16,size=24"]\nmetrics-addr = "127.0.0.1:9323"\n')
    a = parse_args(["--config", f])
    assert (a.data_root, a.log_level, a.hostname, a.metrics_addr) == \
        ("/tmp/nwt-x/data", "debug", "fromfile", "127.0.0.1:9323")
    assert a.default_address_pool == ["base=198.19.0.0/16,size=24"]
    b = parse_args(["--config", f, "--log-level", "error", "--hostname", "cli",
                    "--default-address-pool", "base=198.18.0.0/16,size=24"])
    assert (b.log_level, b.hostname, b.data_root) == ("error", "cli", "/tmp/nwt-x/data")
    # A repeatable flag on the command line replaces the file's list, it does not add to it.
    assert b.default_address_pool == ["base=198.18.0.0/16,size=24"]
    assert parse_args([]).data_root == "/var/lib/netweft"   # no file: the built-in defaults


def test_the_example_configuration_is_valid():
    a = parse_args(["--config", str(REPO / "packaging" / "netweftd.toml")])
    assert a.host == "unix:///run/netweft/netweft.sock" and a.default_address_pool == ["base=172.17.0.0/16,size=24"]


@pytest.mark.parametrize("text,words", [
    ('data-rot = "/x"\n', "unknown key 'data-rot'"),
    ('config = "/other.toml"\n', "unknown key 'config'"),
    ('log-level = "loud"\n', "log-level = 'loud' is not one of debug, info, warning, error"),
    ('data-root = 5\n', "data-root must be a string"),
    ('default-address-pool = [1]\n', "default-address-pool must be a string or a list of strings"),
    ('data-root = \n', "not valid TOML (Invalid value (at line 1, column 13))"),
])
def test_a_bad_file_is_refused_in_one_line_before_anything_starts(tmp_path, text, words):
    f = write(tmp_path, text)
    with pytest.raises(config.InvalidRequest) as e:
        config.load(f, _parser())
    assert words in str(e.value) and "\n" not in str(e.value)
    r = subprocess.run([str(BIN / "netweftd"), "--config", f, "--data-root", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"netweftd: {f}") and words in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_missing_file_is_one_line(tmp_path):
    r = subprocess.run([str(BIN / "netweftd"), "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr == f"netweftd: config file {tmp_path / 'none.toml'} does not exist; " \
                                              "create it or leave --config out\n"


def _parser():
    import argparse
    captured = {}

    def fake_apply(p, argv):
        captured["p"] = p
        return argparse.Namespace()
    orig = config.apply
    config.apply = fake_apply
    try:
        parse_args([])
    finally:
        config.apply = orig
    return captured["p"]


@pytest.mark.parametrize("text", ["127.0.0.1", "localhost:9323", "127.0.0.1:0", "127.0.0.1:70000", "1.2.3:80"])
def test_listen_addresses_are_ipv4_and_a_port(text):
    with pytest.raises(config.InvalidRequest, match="expected IPv4:PORT"):
        config.listen_addr(text, "--metrics-addr")


def test_versions():
    r = subprocess.run([str(BIN / "netweftd"), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == f"netweftd {__version__}"
    r = subprocess.run([str(BIN / "netweft"), "-H", "unix:///tmp/nwt-nodaemon.sock", "version"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith(f"Client:\n Version:  {__version__}\n")
    assert r.returncode == 1 and r.stderr.startswith("Error: cannot reach netweftd")


@pytest.mark.parametrize("shell,path", [("bash", "netweft.bash"), ("zsh", "_netweft")])
def test_the_shipped_completion_scripts_are_what_click_generates(shell, path):
    r = subprocess.run([str(BIN / "netweft"), "completion", shell], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout == (REPO / "packaging" / "completion" / path).read_text(), \
        f"regenerate: netweft completion {shell} > packaging/completion/{path}"
    assert "_NETWEFT_COMPLETE" in r.stdout


def test_completion_completes_commands_and_subcommands():
    def complete(words: str, cword: int) -> str:
        env = {**os.environ, "_NETWEFT_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return subprocess.run([str(BIN / "netweft")], env=env, capture_output=True, text=True, timeout=30).stdout
    assert "plain,network" in complete("netweft netw", 1).splitlines()
    got = complete("netweft network ", 2).splitlines()
    assert {"plain,create", "plain,ls", "plain,rm"} <= set(got)


def test_bash_sources_the_completion_script():
    script = REPO / "packaging" / "completion" / "netweft.bash"
    r = subprocess.run(["bash", "-c", f"source {script} && complete -p netweft"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "netweft" in r.stdout


def test_the_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "netweftd.service"
    unit.write_text((REPO / "packaging" / "netweftd.service").read_text().replace("@NETWEFTD@", str(BIN / "netweftd")))
    text = unit.read_text()
    assert "KillMode=process" in text and "--config /etc/netweft/netweftd.toml" in text
    assert "[Install]" in text and "WantedBy=multi-user.target" in text
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_metrics_cost_nothing_unless_asked_for():
    """The CLI and a daemon without --metrics-addr never import prometheus_client; the hooks are no-ops."""
    code = ("import sys, netweft.cli.main, netweft.daemon.main as d\n"
            "from netweft import metrics\n"
            "assert d.observers(None, d.parse_args([])) == []\n"
            "metrics.allocated('network'); metrics.reconciled('resync', 0.1); metrics.watch_message({'type': 'ping'})\n"
            "assert metrics.middlewares('local') == []\n"
            "print('prometheus_client' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
