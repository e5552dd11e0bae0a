"""`make demo`: the multi-host story, then teardown.

A 3-host lab (one manager, two workers), an attachable overlay network, a container on each
host, every pair pinged and a TCP request across hosts, the network as `inspect` shows it, and
the management-network scenario (fixed hostnames and IPs) on top. Everything is removed at the end.
"""
from __future__ import annotations

import subprocess
import sys
import time

from netweft.lab.lab import Lab
from netweft.runtime.container import exec_argv

PLAN = [("h1", "controller01", "198.18.0.11"), ("h2", "compute01", "198.18.0.21"), ("h3", "storage01", "198.18.0.31")]
HTTP_SERVER = ("import http.server,socket\n"
               "class H(http.server.BaseHTTPRequestHandler):\n"
               " def do_GET(self):\n"
               "  b=('hello from '+socket.gethostname()+'\\n').encode();self.send_response(200)\n"
               "  self.send_header('Content-Length',str(len(b)));self.end_headers();self.wfile.write(b)\n"
               " def log_message(self,*a): pass\n"
               "http.server.HTTPServer(('0.0.0.0',8080),H).serve_forever()")
HTTP_GET = ("import urllib.request,sys,time\n"
            "for i in range(50):\n"
            " try: print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode().strip());break\n"
            " except OSError: time.sleep(0.1)\n"
            "else: sys.exit(1)")


def say(text: str = "") -> None:
    print(text, flush=True)


def ms(t0: float) -> str:
    return f"{(time.monotonic() - t0) * 1000:.0f} ms"


def main() -> int:
    lab = Lab("demo")
    if lab.exists():
        lab.down(quiet=True)
    say("netweft demo: containers on three hosts, one private overlay network")
    say("=" * 70)
    ok = True
    try:
        say("1. a cluster of three simulated hosts (network namespaces on one underlay)")
        lab.up(3, progress=lambda m: say("   " + m))
        c1 = lab.client("h1")
        t0 = time.monotonic()
        c1.call("POST", "/networks/create", {"Name": "mgmt", "Driver": "overlay", "Attachable": True,
                                             "Labels": {"plan": "openstack"},
                                             "IPAM": {"Config": [{"Subnet": "198.18.0.0/24"}]}})
        say(f"\n2. overlay network mgmt (198.18.0.0/24, VXLAN across hosts) created on the manager in {ms(t0)}")
        pids = {}
        say("\n3. one container per host, with the hostname and IP of the network plan")
        for host, name, ip in PLAN:
            t0 = time.monotonic()
            ctr = lab.client(host).call("POST", "/containers/create", {
                "Name": name, "Hostname": name, "NetworkMode": "mgmt", "IPAddress": ip,
                "Cmd": [sys.executable, "-c", HTTP_SERVER]})
            pids[name] = ctr["State"]["Pid"]
            say(f"   {host}: {name:<13} {ip:<12} running in {ms(t0)}")
        say("\n4. who am I (hostname inside each container)")
        for host, name, _ in PLAN:
            got = subprocess.run(exec_argv(pids[name], ["hostname"]), capture_output=True, text=True).stdout.strip()
            ok &= got == name
            say(f"   {name:<13} -> {got:<13} {'ok' if got == name else 'WRONG'}")
        say("\n5. reachability across hosts (ping by address)")
        for shost, src, _ in PLAN:
            for dhost, dst, ip in PLAN:
                if src == dst:
                    continue
                r = subprocess.run(exec_argv(pids[src], ["ping", "-c1", "-w3", ip]), capture_output=True, text=True)
                rtt = next((l.split("time=")[1] for l in r.stdout.splitlines() if "time=" in l), "")
                ok &= r.returncode == 0
                say(f"   {src}@{shost} -> {dst}@{dhost} {ip:<12} {'ok ' + rtt if r.returncode == 0 else 'FAILED'}")
        say("\n6. a TCP request across hosts (HTTP, controller01 on h1 -> compute01 on h2)")
        r = subprocess.run(exec_argv(pids["controller01"], [sys.executable, "-c", HTTP_GET,
                                                            "http://198.18.0.21:8080/"]),
                           capture_output=True, text=True, timeout=30)
        ok &= r.returncode == 0 and "compute01" in r.stdout
        say(f"   GET http://198.18.0.21:8080/ -> {r.stdout.strip() or 'FAILED: ' + r.stderr.strip()[-200:]}")
        say("\n7. `netweft network inspect mgmt` on h2")
        view = lab.client("h2").call("GET", "/networks/mgmt")
        say(f"   Driver={view['Driver']} Scope={view['Scope']} Subnet={view['IPAM']['Config'][0]['Subnet']} "
            f"VNI={view['Options']['com.docker.network.driver.overlay.vxlanid_list']}")
        for c in view["Containers"].values():
            say(f"   local container: {c['Name']} {c['IPv4Address']} {c['MacAddress']}")
        say("   peers (hosts with endpoints): " + ", ".join(f"{p['Name']}={p['IP']}" for p in view["Peers"]))
        say("\n8. `netweft node ls` on the manager")
        nodes = lab.client("h1").call("GET", "/nodes")
        for n in sorted(nodes, key=lambda n: n["Description"]["Hostname"]):
            role = "Leader" if n.get("ManagerStatus", {}).get("Leader") else "worker"
            say(f"   {n['Description']['Hostname']}  {n['Status']['State']:<6} {role:<7} {n['Status']['Addr']}")
    except Exception as e:
        ok = False
        say(f"\nFAILED: {e}")
    finally:
        say("\n9. teardown")
        result = lab.down(quiet=True)
        say(f"   removed {result['processes']} processes, {result['namespaces']} namespaces, "
            f"{result['mounts']} namespace mounts")
    say("\nresult: " + ("containers on three hosts reach each other by their planned addresses" if ok else "FAILED"))
    say("\nThis demo has one manager. For several managers on etcd (no single point of failure) see README.md,\n"
        "section \"Several managers (HA)\", or try: netweft lab up --hosts 5 --managers 3 --store etcd")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
