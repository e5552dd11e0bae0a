"""The CLI's lean path (entry.py) sends exactly what the click commands send and prints what they print, and
hands everything it does not fully understand to click; its JSON is json's; its HTTP client parses replies."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from netweft.apiclient import client as client_mod, leanjson
from netweft.cli import entry
from netweft.cli.main import cli

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(json_values, st.booleans())
def test_leanjson_is_json(value, sort_keys):
    text = leanjson.dumps(value, sort_keys=sort_keys)
    assert text == json.dumps(value, sort_keys=sort_keys)
    assert leanjson.loads(text) == json.loads(text)
    assert leanjson.loads(f" \n{text}\t".encode()) == value or value != value


@pytest.mark.parametrize("bad", ["", "{nope", "[1] 2", "Traceback (most recent call last)", "\ufeff[]", "\xff"])
def test_leanjson_refuses_what_json_refuses(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        leanjson.loads(bad.encode("latin-1") if bad == "\xff" else bad)


def test_the_lean_cli_imports_neither_click_nor_re():
    code = ("import sys; from netweft.cli import entry\n"
            "try:\n    entry.run_lean(['-H', 'unix:///nonexistent/s', 'ps'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('click', 're', 'json', 'http.client', 'socket', 'enum') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# ------------------------------------------------------------------ parsing
def test_parse_reads_options_as_click_does():
    o, pos = entry.parse(["--name", "a", "sleep", "-d", "--env=A=1", "-e", "B=2", "--", "-x", "--name"],
                         entry._RUN)
    assert o == {"name": "a", "detach": True, "env": ["A=1", "B=2"]}
    assert pos == ["sleep", "-x", "--name"]


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["-dq"], ["--detach=1"], ["--name"], ["--name", "a", "--name", "b"], ["--nope"],
])
def test_parse_leaves_what_it_does_not_know_to_click(args):
    with pytest.raises(entry._Unsure):
        entry.parse(args, entry._RUN)


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-H"], ["info"], ["network"], ["network", "inspect", "x"], ["network", "ls", "--format", "xml"],
    ["network", "ls", "-f", "colour=red"], ["network", "ls", "extra"], ["ps", "x"], ["run", "--", "sleep", "1"],
    ["run", "-d"], ["rm"], ["network", "rm"], ["network", "create"], ["network", "create", "a", "b"],
    ["network", "create", "--label", "novalue", "a"], ["network", "create", "--subnet", "1", "--subnet", "2", "a"],
    ["run", "-d", "-e", "=x", "--", "true"], ["ps", "--help"], ["-Hx", "ps"], ["network", "rm", "ingress"],
])
def test_run_lean_leaves_to_click(argv):
    with pytest.raises(entry._Unsure):
        entry.run_lean(argv)


# ------------------------------------------------------------------ same requests, same output as click
class Recorder:
    """Stands in for the daemon: records each call and answers from a table."""

    def __init__(self, monkeypatch):
        self.calls = []
        recorder = self

        def call(client, method, path, body=None, **query):
            recorder.calls.append((client.host, method, path, body, {k: v for k, v in query.items() if v is not None}))
            return recorder.answer(method, path, body)
        monkeypatch.setattr(client_mod.Client, "call", call)

    @staticmethod
    def answer(method, path, body=None):
        if path == "/containers/remove":
            return [{"Name": n, "Error": None, "Status": None} for n in body["Names"]]
        if path == "/networks":
            return [{"Name": "zeta", "Id": "b" * 64, "Driver": "bridge", "Scope": "local", "Created": "2024-05-01T10:11:12.5Z",
                     "Labels": {"a": "b"}, "Internal": True},
                    {"Name": "alpha", "Id": "a" * 64, "Driver": "overlay", "Scope": "swarm", "Created": ""}]
        if path == "/containers/json":
            return [{"Id": "c" * 64, "Name": "web", "State": {"Running": False, "Status": "exited", "ExitCode": 3},
                     "NetworkSettings": {"Networks": {"n": {"IPAddress": "198.18.0.2"}}},
                     "HostConfig": {"NetworkMode": "n"}, "Config": {"Hostname": "web", "Cmd": ["sleep", "1"]}}]
        if method == "POST":
            return {"Id": "d" * 64}
        return None


@pytest.mark.parametrize("argv", [
    ["network", "ls"], ["network", "ls", "-q"], ["network", "ls", "--format", "json", "--no-trunc"],
    ["network", "ls", "-f", "name=a", "--filter=driver=bridge", "-f", "name=z"], ["-H", "unix:///x/y.sock", "ps"],
    ["ps"], ["ps", "-a", "-q"], ["--host=unix:///s", "ps", "--all"],
    ["network", "create", "n"],
    ["network", "create", "-d", "overlay", "--subnet", "198.18.0.0/24", "--gateway=198.18.0.1", "--ip-range",
     "198.18.0.128/25", "--aux-address", "r=198.18.0.5", "--internal", "--attachable", "--label", "k=v",
     "-o", "encrypted", "--opt", "com.docker.network.driver.mtu=1400", "ov"],
    ["run", "-d", "--name", "a", "--hostname", "h", "--net", "n", "--ip", "198.18.0.9", "--mac-address",
     "02:00:00:00:00:01", "--network-alias", "x", "-e", "A=1", "--", "sleep", "infinity"],
    ["run", "--detach", "sleep", "1"],
    ["rm", "-f", "a", "b/c"], ["rm", "a"],
])
def test_lean_path_sends_and_prints_what_click_does(argv, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    assert entry.run_lean(list(argv)) == 0
    lean_calls, lean_out = rec.calls[:], capsys.readouterr().out
    rec.calls.clear()
    r = CliRunner().invoke(cli, argv, prog_name="netweft", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(lean_calls, key=repr) == sorted(rec.calls, key=repr)   # rm sends its calls at once
    assert lean_out == r.output


def test_lean_path_errors_are_one_line_and_exit_1(monkeypatch, capsys):
    def refuse(client, method, path, body=None, **query):
        raise client_mod.ApiError(404, "container 'x' not found; see `netweft ps -a`")
    monkeypatch.setattr(client_mod.Client, "call", refuse)
    assert entry.run_lean(["rm", "x"]) == 1
    assert capsys.readouterr().err == "Error: container 'x' not found; see `netweft ps -a`\n"


# ------------------------------------------------------------------ the HTTP client on a socket pair
def reply_to(raw: bytes, monkeypatch, **call):
    """Client.call against a fake daemon that answers `raw` bytes."""
    import _socket
    import socket
    import threading
    import tempfile
    import os
    d = tempfile.mkdtemp()
    path = os.path.join(d, "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            got["request"] = conn.recv(65536)
            conn.sendall(raw)
    t = threading.Thread(target=serve)
    t.start()
    try:
        return client_mod.Client(f"unix://{path}", timeout=10).call(**call), got
    finally:
        t.join()
        srv.close()
        os.unlink(path)
        os.rmdir(d)


def test_client_reads_content_length_and_chunked_replies(monkeypatch):
    out, got = reply_to(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n[1, 2]\n",
                        monkeypatch, method="POST", path="/a", body={"x": 1}, q="a&b", none=None)
    assert out == [1, 2]
    head, _, body = got["request"].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /a?q=a%26b HTTP/1.1\r\n")
    assert b"Content-Length: 8" in head and body == b'{"x": 1}'
    out, _ = reply_to(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n", monkeypatch, method="GET", path="/x")
    assert out == [1, 2]


def test_client_refuses_a_cut_reply(monkeypatch):
    with pytest.raises(client_mod.DaemonUnreachable, match="middle of a reply"):
        reply_to(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n[1]",
                 monkeypatch, method="GET", path="/x")


def test_ref_quotes_as_urllib_does():
    from urllib.parse import quote
    for s in ("web", "a/b", "ü x?&=#%", "-._~"):
        assert client_mod.ref(s) == quote(s, safe="")


def test_leanjson_refuses_bad_json_with_json_not_imported():
    code = ("import sys\nfrom netweft.apiclient import leanjson\nassert 'json.decoder' not in sys.modules\n"
            "for bad in (b'{nope', b'', b'[1] 2'):\n"
            "    try:\n        leanjson.loads(bad)\n    except ValueError:\n        pass\n"
            "    else:\n        raise SystemExit(f'{bad!r} accepted')\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stdout + r.stderr


def test_rm_of_many_is_one_request_per_chunk_and_each_name_answered_in_order(monkeypatch, capsys):
    from netweft.cli import remove
    monkeypatch.setattr(remove, "CHUNK", 16)
    seen = []

    def batch(client, method, path, body=None, **query):
        seen.append((method, path, list(body["Names"]), body["Force"]))
        return [{"Name": n, "Error": "container 'c3' not found; see `netweft ps -a`" if n == "c3" else None,
                 "Status": 404 if n == "c3" else None} for n in body["Names"]]
    monkeypatch.setattr(client_mod.Client, "call", batch)
    names = [f"c{i}" for i in range(40)]
    assert entry.run_lean(["rm", "-f", *names]) == 1
    out, err = capsys.readouterr()
    assert out.split() == [n for n in names if n != "c3"]
    assert err == "Error: container 'c3' not found; see `netweft ps -a`\n"
    assert seen == [("POST", "/containers/remove", names[i:i + 16], True) for i in (0, 16, 32)]
    r = CliRunner().invoke(cli, ["rm", "-f", *names], prog_name="netweft")
    assert r.exit_code == 1 and r.stdout.split() == out.split()


def test_rm_of_many_on_an_older_daemon_goes_on_past_a_failure_and_answers_in_order(monkeypatch, capsys):
    """A daemon without POST /containers/remove (404 page not found): one DELETE per name, as before."""
    seen = []

    def delete(client, method, path, body=None, **query):
        if path == "/containers/remove":
            raise client_mod.ApiError(404, "page not found")
        seen.append(path)
        if path.endswith("/c3"):
            raise client_mod.ApiError(404, "container 'c3' not found; see `netweft ps -a`")
    monkeypatch.setattr(client_mod.Client, "call", delete)
    names = [f"c{i}" for i in range(40)]
    assert entry.run_lean(["rm", "-f", *names]) == 1
    out, err = capsys.readouterr()
    assert out.split() == [n for n in names if n != "c3"]
    assert err == "Error: container 'c3' not found; see `netweft ps -a`\n"
    assert sorted(seen) == sorted(f"/containers/{n}" for n in names)
    r = CliRunner().invoke(cli, ["rm", "-f", *names], prog_name="netweft")
    assert r.exit_code == 1 and r.stdout.split() == out.split()
