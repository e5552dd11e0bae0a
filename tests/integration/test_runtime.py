"""Real containers (no mocks): namespaces, logs, exit codes, surviving the starter.

Needs root, `ip` and `nsenter`. Every name made here starts with nwt-.
"""

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from netweft.errors import NetweftError
from netweft.runtime import container


TMP_PREFIX = os.path.join(tempfile.gettempdir(), "nwt-rt-")


def _supervisors_of_this_suite():
    out = subprocess.run(["pgrep", "-f", f"netweft.runtime.supervisor {TMP_PREFIX}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module", autouse=True)
def no_leftover_supervisors():
    yield
    leftovers = _supervisors_of_this_suite()
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == [], "supervisor processes left behind"


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def read(path):
    with open(path) as f:
        return f.read()


class Workspace:
    """A tmp dir for container files; tears down every container started in it."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="nwt-rt-")
        self.state_dirs = []

    def spec(self, name, cmd, **overrides):
        spec = {
            "netns": None, "hostname": f"nwt-{name}", "hosts_file": None, "resolv_file": None,
            "cmd": cmd, "log": os.path.join(self.dir, f"{name}.log"),
            "state_dir": os.path.join(self.dir, f"{name}.state"),
        }
        spec.update(overrides)
        self.state_dirs.append(spec["state_dir"])
        return spec

    def cleanup(self):
        for state_dir in self.state_dirs:
            try:
                container.stop(state_dir, timeout=2)
            except Exception:
                pass
            # Belt and braces if stop() itself is broken: kill the container's group.
            try:
                os.killpg(int(read(os.path.join(state_dir, "pid"))), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for pid in _supervisors_of_this_suite():  # one per workspace: its socket is in self.dir
            if self.dir in read(f"/proc/{pid}/cmdline").replace("\0", " "):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def ws():
    w = Workspace()
    yield w
    w.cleanup()


@pytest.fixture
def netns():
    """A network namespace with lo up and a marker address on it; yields (path, address)."""
    name = f"nwt-rt-{secrets.token_hex(3)}"
    address = f"10.251.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        yield f"/run/netns/{name}", address
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns_inode(pid, kind):
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def group_exists(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_container_has_its_own_namespaces_and_files(ws, netns):
    netns_path, address = netns
    host_name = socket.gethostname()
    host_hosts = read("/etc/hosts")
    host_resolv = read("/etc/resolv.conf")
    hosts_file = os.path.join(ws.dir, "hosts")
    resolv_file = os.path.join(ws.dir, "resolv.conf")
    container.write_hosts(hosts_file, "nwt-box", [(address, ["nwt-box-alias"])])
    container.write_resolv(resolv_file, ["10.251.0.53"], ["nwt.test"])

    spec = ws.spec("box", ["sh", "-c", "hostname; cat /etc/hosts; ip -o addr show lo; sleep 1000"],
                   netns=netns_path, hostname="nwt-box",
                   hosts_file=hosts_file, resolv_file=resolv_file)
    pid = container.start(spec)
    assert container.status(spec["state_dir"]) == ("running", pid)
    wait_for(lambda: address + "/32" in read(spec["log"]), what="ip output in the log")
    log = read(spec["log"])

    # Hostname: the container's, not the host's, and the host's is untouched.
    assert log.splitlines()[0] == "nwt-box" != host_name
    assert socket.gethostname() == host_name
    # /etc/hosts: the per-container file inside, the host's file unchanged outside.
    assert read(hosts_file) in log
    assert f"{address}\tnwt-box nwt-box-alias" in log
    assert read("/etc/hosts") == host_hosts and "nwt-box" not in host_hosts
    assert read("/etc/resolv.conf") == host_resolv
    assert hosts_file not in read("/proc/self/mountinfo")  # no mount leaked to the host
    # Network namespace: the one given (same inode); UTS and mount namespaces of its own.
    assert ns_inode(pid, "net") == os.stat(netns_path).st_ino
    assert ns_inode(pid, "uts") != ns_inode("self", "uts")
    assert ns_inode(pid, "mnt") != ns_inode("self", "mnt")
    # Other namespaces' bind mounts (nsfs) are dropped from the container's mount table.
    assert " - nsfs " not in read(f"/proc/{pid}/mountinfo")

    def run_inside(*cmd):
        return subprocess.run(container.exec_argv(pid, list(cmd)), capture_output=True,
                              text=True, check=True, timeout=10).stdout

    assert run_inside("hostname") == "nwt-box\n"
    assert run_inside("cat", "/etc/resolv.conf") == "nameserver 10.251.0.53\nsearch nwt.test\n"
    # Rewriting the hosts file updates the bind-mounted file inside (same inode).
    container.write_hosts(hosts_file, "nwt-box", [(address, ["nwt-box-renamed"])])
    assert "nwt-box-renamed" in run_inside("cat", "/etc/hosts")

    state = container.stop(spec["state_dir"], timeout=5)
    assert state in (("exited", 143), ("exited", 137))
    assert read(os.path.join(spec["state_dir"], "exit_code")).strip() == str(state[1])
    assert not os.path.exists(f"/proc/{pid}")
    wait_for(lambda: not group_exists(pid), what="`sleep 1000` gone too")
    assert container.stop(spec["state_dir"]) == state  # idempotent


def test_missing_command_records_127_and_a_clear_log_line(ws):
    spec = ws.spec("missing", ["nwt-no-such-command", "--flag"])
    with pytest.raises(NetweftError, match="nwt-no-such-command"):
        container.start(spec)
    assert container.status(spec["state_dir"]) == ("exited", 127)
    last = read(spec["log"]).strip().splitlines()[-1]
    assert "cannot run 'nwt-no-such-command'" in last and "not found" in last


def test_bad_netns_is_a_clear_setup_failure(ws):
    spec = ws.spec("badns", ["true"], netns=os.path.join(ws.dir, "nwt-missing-netns"))
    with pytest.raises(NetweftError, match="cannot open network namespace"):
        container.start(spec)
    assert container.status(spec["state_dir"]) == ("exited", 125)


def test_exit_code_and_leftover_children_are_handled(ws):
    # Host networking; the main process exits 3 leaving a background child behind.
    spec = ws.spec("quick", ["sh", "-c", "sleep 1000 & echo started; exit 3"])
    pid = container.start(spec)
    assert wait_for(lambda: container.status(spec["state_dir"])[0] == "exited")
    assert container.status(spec["state_dir"]) == ("exited", 3)
    assert "started" in read(spec["log"])
    # The shim killed the orphaned sleep (init reaps it a moment later).
    wait_for(lambda: not group_exists(pid), what="orphaned sleep killed")


def test_container_survives_its_starter_and_records_exit_code(ws, netns):
    spec = ws.spec("detached", ["sleep", "1000"], netns=netns[0])
    starter = subprocess.run(
        [sys.executable, "-c",
         "import json, sys; from netweft.runtime import container; "
         "print(container.start(json.loads(sys.argv[1])))", json.dumps(spec)],
        capture_output=True, text=True, timeout=30)
    assert starter.returncode == 0, starter.stderr
    pid = int(starter.stdout)
    # The starter is gone (and never waited on the supervisor); the container runs on, a child of the supervisor.
    time.sleep(0.2)
    assert container.status(spec["state_dir"]) == ("running", pid)
    supervisor = int(read(f"/proc/{pid}/status").split("PPid:")[1].split()[0])
    assert "netweft.runtime.supervisor" in read(f"/proc/{supervisor}/cmdline")

    assert container.stop(spec["state_dir"], timeout=5) == ("exited", 143)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="container reaped")


def test_stop_escalates_to_sigkill(ws):
    spec = ws.spec("stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
    container.start(spec)
    wait_for(lambda: "ready" in read(spec["log"]), what="trap installed")
    t0 = time.monotonic()
    assert container.stop(spec["state_dir"], timeout=0.5) == ("exited", 137)
    assert time.monotonic() - t0 < 5


def test_status_handles_stale_and_missing_state(ws):
    missing = os.path.join(ws.dir, "nwt-never-started")
    assert container.status(missing) == ("unknown", None)
    assert container.stop(missing) == ("unknown", None)

    # A pid now used by another process (different start time): not ours, never signalled.
    bystander = subprocess.Popen(["sleep", "1000"])
    try:
        stale = os.path.join(ws.dir, "nwt-stale")
        os.makedirs(stale)
        with open(os.path.join(stale, "pid"), "w") as f:
            f.write(f"{bystander.pid}\n")
        with open(os.path.join(stale, "starttime"), "w") as f:
            f.write("1\n")
        assert container.status(stale) == ("unknown", None)
        assert container.stop(stale, timeout=1) == ("unknown", None)
        assert bystander.poll() is None
        # A pid that no longer exists at all.
        bystander.kill()
        bystander.wait()
        assert container.status(stale) == ("unknown", None)
    finally:
        bystander.kill()
        bystander.wait()


def test_start_refuses_a_running_state_dir(ws):
    spec = ws.spec("twice", ["sleep", "1000"])
    container.start(spec)
    with pytest.raises(NetweftError, match="already running"):
        container.start(spec)
    container.stop(spec["state_dir"], timeout=5)
    # Once stopped, the same state dir can be reused; old results are cleared.
    pid = container.start(spec)
    assert container.status(spec["state_dir"]) == ("running", pid)


def test_write_hosts_and_resolv(ws):
    hosts = pathlib.Path(ws.dir, "hosts")
    container.write_hosts(hosts, "web", [("10.0.0.5", ["web.net1", "web"]), ("10.1.0.5", "alias2")])
    lines = hosts.read_text().splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert lines[1].startswith("::1\tlocalhost ip6-localhost")
    assert "10.0.0.5\tweb web.net1" in lines and "10.1.0.5\tweb alias2" in lines
    container.write_hosts(hosts, "solo", [])
    assert "127.0.1.1\tsolo" in hosts.read_text()

    resolv = pathlib.Path(ws.dir, "resolv.conf")
    container.write_resolv(resolv, ["10.0.0.2", "10.0.0.3"], ["a.test", "b.test"])
    assert resolv.read_text() == "nameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch a.test b.test\n"


def test_sysfs_shows_the_containers_own_interfaces(ws, netns):
    netns_path, _ = netns
    name = netns_path.rsplit("/", 1)[1]
    subprocess.run(["ip", "-n", name, "link", "add", "nwt-d0", "mtu", "1234", "type", "ifb"], check=True)
    spec = ws.spec("sysfs", ["sh", "-c", "ls /sys/class/net; echo mtu=$(cat /sys/class/net/nwt-d0/mtu); "
                                         "echo lo=$(cat /sys/class/net/lo/operstate /sys/class/net/lo/flags)"],
                   netns=netns_path)
    container.start(spec)
    wait_for(lambda: container.status(spec["state_dir"])[0] == "exited", what="container exit")
    assert container.status(spec["state_dir"]) == ("exited", 0), read(spec["log"])
    out = read(spec["log"])
    listed = set(out.split("mtu=")[0].split())
    assert listed == {"lo", "nwt-d0"}, out           # not the host's interfaces
    assert "mtu=1234" in out
    assert int(out.split("lo=")[1].split()[-1], 16) & 0x1  # IFF_UP
    assert not os.path.exists("/sys/class/net/nwt-d0")  # the host's /sys is untouched


def test_lo_is_up_even_in_a_namespace_where_it_was_down(ws):
    name = f"nwt-rt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)  # lo starts down
    try:
        spec = ws.spec("lo", ["sh", "-c", "ping -c1 -W2 127.0.0.1 >/dev/null && echo lo-works"],
                       netns=f"/run/netns/{name}")
        container.start(spec)
        wait_for(lambda: container.status(spec["state_dir"])[0] == "exited", what="container exit")
        assert "lo-works" in read(spec["log"]), read(spec["log"])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_hosts_file_gives_a_dotted_hostname_its_short_name(ws):
    hosts = pathlib.Path(ws.dir, "hosts")
    container.write_hosts(hosts, "foobar.example.com", [("198.18.0.5", ["web"])])
    assert "198.18.0.5\tfoobar.example.com foobar web" in hosts.read_text().splitlines()
    container.write_hosts(hosts, "foobar.example.com", [])
    assert "127.0.1.1\tfoobar.example.com foobar" in hosts.read_text().splitlines()
    container.write_hosts(hosts, "plain", [("198.18.0.5", ["plain"])])
    assert "198.18.0.5\tplain" in hosts.read_text().splitlines()


def supervisor_pid(ws):
    return container.supervisor_call(os.path.join(ws.dir, container.SUPERVISOR_SOCKET), {"op": "ping"})["pid"]


def test_one_supervisor_is_the_parent_of_every_container(ws):
    specs = [ws.spec(f"many{i}", ["sleep", "1000"]) for i in range(4)]
    # Started from several threads at once, as the daemon's executor does.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(container.start, specs))
    sup = supervisor_pid(ws)
    assert len(set(pids)) == 4
    for pid in pids:
        assert int(read(f"/proc/{pid}/status").split("PPid:")[1].split()[0]) == sup
    assert [p for p in _supervisors_of_this_suite() if ws.dir in read(f"/proc/{p}/cmdline")] == [sup]
    # A stray TERM does not take the supervisor (and every exit code) away.
    os.kill(sup, signal.SIGTERM)
    time.sleep(0.2)
    assert os.path.exists(f"/proc/{sup}")
    for spec in specs:
        assert container.stop(spec["state_dir"], timeout=5) == ("exited", 143)
    # A second supervisor for the same socket steps aside.
    r = subprocess.run([sys.executable, "-m", "netweft.runtime.supervisor",
                        os.path.join(ws.dir, container.SUPERVISOR_SOCKET)], timeout=30)
    assert r.returncode == 0 and supervisor_pid(ws) == sup


def test_a_command_that_exits_at_once_still_gets_a_pid_and_its_exit_code(ws):
    for i in range(5):
        spec = ws.spec(f"instant{i}", ["sh", "-c", f"exit {i}"])
        pid = container.start(spec)
        assert pid > 0
        wait_for(lambda: container.status(spec["state_dir"])[0] == "exited", what="exit code")
        assert container.status(spec["state_dir"]) == ("exited", i)


def test_supervisor_answers_a_bad_request_with_one_line_and_keeps_serving(ws):
    container.start(ws.spec("first", ["true"]))  # starts the supervisor
    path = os.path.join(ws.dir, container.SUPERVISOR_SOCKET)
    for raw in (b"nonsense\n", b'{"op": "launch"}\n', b'{"op": "start", "spec": 3}\n',
                b'{"op": "start", "spec": {}}\n', b"\n"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(raw)
        reply = json.loads(s.makefile().readline())
        s.close()
        assert set(reply) == {"error"} and "\n" not in reply["error"], (raw, reply)
    assert supervisor_pid(ws) > 0


def test_containers_and_exit_codes_outlive_a_restarted_starter(ws):
    """What a netweftd restart looks like to the runtime: the starter process goes, a new one reads the files."""
    spec = ws.spec("outlive", ["sh", "-c", "read x < /dev/null; sleep 0.5; exit 7"])
    starter = subprocess.run(
        [sys.executable, "-c", "import json, sys; from netweft.runtime import container; "
         "print(container.start(json.loads(sys.argv[1])))", json.dumps(spec)],
        capture_output=True, text=True, timeout=30)
    assert starter.returncode == 0, starter.stderr
    wait_for(lambda: container.status(spec["state_dir"])[0] == "exited", what="exit code")
    assert container.status(spec["state_dir"]) == ("exited", 7)


def test_a_container_ending_while_the_daemon_is_down_keeps_its_exit_code_and_logs(daemon):
    d = daemon
    d.cli("run", "-d", "--name", "brief", "--", "sh", "-c", "echo before; sleep 1; echo after; exit 5")
    sup = int(read(str(d.root / "run" / "supervisor.sock.pid")))
    pid = json.loads(d.cli("inspect", "brief").stdout)[0]["State"]["Pid"]
    assert int(read(f"/proc/{pid}/status").split("PPid:")[1].split()[0]) == sup
    d.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the container's exit")
    d.start()
    state = json.loads(d.cli("inspect", "brief").stdout)[0]["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 5)
    assert d.cli("logs", "brief").stdout.split() == ["before", "after"]
    d.cli("run", "-d", "--name", "next", "--", "sleep", "1000")   # the same supervisor serves the new daemon
    assert int(read(str(d.root / "run" / "supervisor.sock.pid"))) == sup
    d.cli("rm", "-f", "brief", "next")


def _mounts(pid) -> list[str]:
    return read(f"/proc/{pid}/mountinfo").splitlines()


def test_a_container_copies_no_netns_pins_however_many_the_host_has(ws):
    """Containers' mount namespaces come from the supervisor's own (a slave of the host's, without nsfs mounts):
    netns files made on the host after the supervisor started neither appear in a new container's mounts nor need
    dropping there, and a container still enters such a namespace (opened through the host's root)."""
    from netweft.dataplane import netns as nsmod

    pins = [os.path.join(ws.dir, f"nwt-pin{i}") for i in range(21)]
    try:
        nsmod.create_netns(pins[0])     # made before the supervisor starts
        pid0 = container.start(ws.spec("first", ["sleep", "1000"], netns=pins[0]))
        sup = supervisor_pid(ws)
        assert ns_inode(sup, "mnt") != ns_inode("self", "mnt")
        assert " - nsfs " not in read(f"/proc/{sup}/mountinfo")
        baseline = len(_mounts(pid0))
        for p in pins[1:]:
            nsmod.create_netns(p)
        spec = ws.spec("late", ["sleep", "1000"], netns=pins[-1])
        pid = container.start(spec)
        assert ns_inode(pid, "net") == os.stat(pins[-1]).st_ino    # made after the supervisor: entered all the same
        assert " - nsfs " not in read(f"/proc/{pid}/mountinfo")
        assert len(_mounts(pid)) == baseline                          # the 20 new pins were never copied
    finally:
        for p in pins:
            nsmod.delete_netns(p)


def test_stop_all_signals_every_container_then_waits_for_each_exit_code(ws):
    plain = ws.spec("plain", ["sleep", "1000"])
    stubborn = ws.spec("stubborn2", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
    done = ws.spec("done", ["sh", "-c", "exit 3"])
    for spec in (plain, stubborn, done):
        container.start(spec)
    wait_for(lambda: "ready" in read(stubborn["log"]), what="trap installed")
    wait_for(lambda: container.status(done["state_dir"]) == ("exited", 3), what="the short one exited")
    container.stop_all([plain["state_dir"], stubborn["state_dir"], done["state_dir"]], timeout=0.5)
    assert container.status(plain["state_dir"]) == ("exited", 143)      # SIGTERM
    assert container.status(stubborn["state_dir"]) == ("exited", 137)   # SIGKILL after the timeout
    assert container.status(done["state_dir"]) == ("exited", 3)         # left as it was
    container.stop_all([plain["state_dir"]], timeout=0)                 # idempotent
    assert container.status(plain["state_dir"]) == ("exited", 143)
