"""`netweft doctor`: what is wrong with this host's part of the cluster, one finding per line, with what to do.

The daemon runs the checks (it holds the cluster's node list, this node's certificate, the probe device
and the kernel): kernel features, the cluster ports between this host and each other host (2377/tcp to
the managers, the data path's UDP port through the data path itself), the path MTU to each other host
(DF probes of decreasing size), this host's clock against each manager's, certificate expiry, and state
an earlier daemon left behind. GET /doctor answers {"Findings": [{"Level", "Check", "Message"}]}; Level
is ok, warn or fail. The CLI exits 0 only when every finding is ok.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from netweft.http import web

from netweft import pki
from netweft.agent.health import SMALL
from netweft.agent.node import unreachable_reason
from netweft.agent.overlay import GW_VETH, VXLAN_TMP
from netweft.daemon.engine import BRIDGE_PREFIX, VETH_PREFIX
from netweft.dataplane.api import GWBRIDGE, VXLAN_OVERHEAD
from netweft.dataplane.probe import ETH_HEADER, PROBE_DEVICE
from netweft.errors import NetweftError
from netweft.model.objects import Node
from netweft.pki.nodepair import files
from netweft.store.local import ENDPOINTS

log = logging.getLogger("netweft.doctor")

CONNECT_TIMEOUT = 3.0
SKEW_WARN = 2.0              # seconds of clock difference with a manager worth a line
RENEW_OVERDUE = 0.2          # share of a certificate's life left when a missing renewal is worth a line
UDP_OUTER = VXLAN_OVERHEAD - ETH_HEADER   # outer IP + UDP + VXLAN: inner frame + this = the IP packet on the wire


@dataclass(frozen=True)
class Finding:
    level: str     # ok | warn | fail
    check: str
    message: str

    def view(self) -> dict:
        return {"Level": self.level, "Check": self.check, "Message": self.message}


def ok(check: str, message: str) -> Finding:
    return Finding("ok", check, message)


def warn(check: str, message: str) -> Finding:
    return Finding("warn", check, message)


def fail(check: str, message: str) -> Finding:
    return Finding("fail", check, message)


# ------------------------------------------------------------------ kernel

def kernel_findings(f: dict[str, str | None]) -> list[Finding]:
    out = []
    for key, name, need in (("vxlan", "VXLAN", "overlay networks need it: load the vxlan module"),
                            ("bridge", "bridges", "every network needs them: load the bridge module"),
                            ("nftables", "nftables", "NAT, isolation and published ports need it: load nf_tables "
                                                     "and install libnftables1"),
                            ("nftables_bridge", "nftables bridge family", "anti-spoofing on the bridges needs it: "
                                                                          "load nft_meta_bridge / nf_tables")):
        why = f.get(key)
        out.append(ok("kernel", f"{name}: available") if why is None else
                   fail("kernel", f"{name}: not available ({why}); {need}"))
    out.append(ok("kernel", f"bridge netfilter (br_netfilter): {f.get('br_netfilter', 'unknown')}; netweft's "
                            "sandboxes opt out of it, local bridges filter with nftables"))
    if f.get("wireguard") is None:
        out.append(ok("kernel", "WireGuard: kernel module"))
    elif f.get("wireguard_go"):
        out.append(ok("kernel", f"WireGuard: userspace ({f['wireguard_go']}); no kernel module "
                                f"({f.get('wireguard')})"))
    else:
        out.append(warn("kernel", "WireGuard: neither the kernel module nor wireguard-go: encrypted overlays would "
                                  "have no transport; install wireguard-go (Debian: wireguard-go)"))
    return out


# ------------------------------------------------------------------ path MTU

async def path_mtu(prober, node: Node, full: int) -> int | None:
    """The largest inner frame (bytes) that reaches `node` and comes back, by two rounds of DF probes
    (coarse, then fine): None if not even the smallest does."""
    coarse = sorted({full, *range(SMALL, full, 64)})
    got = await prober.check(node.id, node.addr, coarse)
    passed = [s for s in coarse if got.get(s) is not None]
    if not passed:
        return None
    best = max(passed)
    if best == full:
        return full
    fine = list(range(best + 2, min(full, best + 64), 2))
    if fine:
        got = await prober.check(node.id, node.addr, fine)
        best = max([best] + [s for s in fine if got.get(s) is not None])
    return best


def name_of(node: Node) -> str:
    return f"{node.hostname} ({node.addr})"


async def data_path_findings(prober, node: Node, port: int, underlay_mtu: int,
                             daemon_stopped: bool = False) -> list[Finding]:
    got = await prober.check(node.id, node.addr, [SMALL, SMALL + 2])
    rtts = [r for r in got.values() if r is not None]
    if not rtts:
        if daemon_stopped:
            what = ("no probe came back, and its manager port refuses connections: its daemon (which answers "
                    "probes) is probably stopped; start netweftd there")
        elif node.state == "down":
            what = (f"no probe came back and the managers see it down: start its daemon (netweftd), or check the "
                    "host")
        else:
            what = (f"no probe came back while the managers see it up: open UDP {port} between this host and it "
                    "(a firewall drops the data path?)")
        return [fail("data path", f"UDP {port} (data path) to {name_of(node)}: {what}")]
    out = [ok("data path", f"UDP {port} (data path) to {name_of(node)}: probes pass ({min(rtts):.2f} ms)")]
    full = underlay_mtu - VXLAN_OVERHEAD + ETH_HEADER
    best = await path_mtu(prober, node, full)
    if best is None:
        out.append(warn("path MTU", f"to {name_of(node)}: unknown (probes stopped passing); run doctor again"))
    elif best >= full:
        out.append(ok("path MTU", f"to {name_of(node)}: {underlay_mtu} (full-size DF probes pass)"))
    else:
        pmtu = best + UDP_OUTER
        out.append(fail("path MTU", f"to {name_of(node)} is {pmtu}, below this host's underlay MTU {underlay_mtu}: "
                                    "full-size overlay packets are lost on the way (an MTU black hole); give every "
                                    "underlay link the same MTU, or create overlays with "
                                    f"-o com.docker.network.driver.mtu={pmtu - VXLAN_OVERHEAD}"))
    return out


# ------------------------------------------------------------------ managers

async def manager_findings(client, addr: str, name: str) -> list[Finding]:
    host, _, port = addr.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT)
        writer.close()
    except (OSError, asyncio.TimeoutError) as e:
        return [fail("manager", f"TCP {port} to manager {name} ({addr}) is unreachable ({unreachable_reason(e)}): "
                                f"start its daemon, or open TCP {port} between this host and it; containers keep "
                                "their networking meanwhile")]
    out = [ok("manager", f"TCP {port} to manager {name} ({addr}): reachable")]
    try:
        t0 = time.time()
        answer = await client.call_at(addr, "GET", "/time")
        t1 = time.time()
        theirs = float(answer["Time"])
    except (NetweftError, KeyError, TypeError, ValueError) as e:
        out.append(warn("clock", f"cannot read the clock of manager {name} ({addr}): {str(e)[:200]}"))
        return out
    skew = (t0 + t1) / 2 - theirs
    where = "ahead of" if skew > 0 else "behind"
    if abs(skew) > SKEW_WARN:
        out.append(fail("clock", f"this host's clock is {abs(skew):.1f} s {where} manager {name}'s: certificates "
                                 "and logs disagree across hosts; run time synchronisation (chrony or "
                                 "systemd-timesyncd) on both"))
    else:
        out.append(ok("clock", f"within {abs(skew):.2f} s of manager {name}"))
    return out


# ------------------------------------------------------------------ certificates

def certificate_findings(swarm_dir: str, now: datetime | None = None) -> list[Finding]:
    now = now or datetime.now(timezone.utc)
    f = files(swarm_dir)
    out = []
    try:
        ident = pki.cert_identity(pki.load_pem(f["cert"]))
        ca = pki.load_pem(f["ca"])
    except (NetweftError, OSError, ValueError) as e:
        return [fail("certificate", f"cannot read this node's certificate in {swarm_dir} ({e}); leave and join "
                                    "the swarm again")]
    issued = ident.not_before + pki.CLOCK_SKEW
    life = (ident.not_after - issued).total_seconds() or 1
    left = (ident.not_after - now).total_seconds()
    until = ident.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        out.append(fail("certificate", f"this node's certificate expired on {until}: rejoin (`netweft swarm leave "
                                       "--force`, then `netweft swarm join` with a token from a manager)"))
    elif left / life < RENEW_OVERDUE:
        out.append(warn("certificate", f"this node's certificate expires {until} and was not renewed at 50-80 % of "
                                       "its life: check that a manager is reachable"))
    else:
        out.append(ok("certificate", f"this node's certificate is valid until {until} (renewed automatically)"))
    try:
        _, ca_after = pki.validity(pki.load_cert(ca))
    except (NetweftError, ValueError):
        ca_after = None
    if ca_after is not None and (ca_after - now).days < 90:
        out.append(warn("certificate", f"the cluster CA expires {ca_after:%Y-%m-%d}: rotate it before then"))
    return out


# ------------------------------------------------------------------ leftovers

async def leftover_findings(daemon) -> list[Finding]:
    engine, dp = daemon.engine, daemon.engine.dp
    swarm = daemon.swarm
    agent = swarm.overlay
    out = []
    in_swarm = swarm.state() is not None
    if not in_swarm:
        for link in (PROBE_DEVICE, GWBRIDGE):
            if await dp.link_exists(link):
                out.append(warn("leftovers", f"interface {link} is left from an earlier swarm membership: remove it "
                                             f"with `ip link del {link}`"))
    for link in await dp.list_links(VXLAN_TMP):
        out.append(warn("leftovers", f"VXLAN device {link} was left half-made by a crash: `ip link del {link}` "
                                     "(restarting netweftd removes it too)"))
    local = agent.local.values() if agent is not None else ()
    gw_ports = {e.gw_host_ifname for e in local if e.gw_host_ifname}
    for link in await dp.list_links(GW_VETH):
        if link not in gw_ports:
            out.append(warn("leftovers", f"gateway port {link} belongs to no endpoint of this daemon: an earlier "
                                         f"daemon's; `ip link del {link}`"))
    wanted = {e.network_id[:12] for e in local}
    sandbox_dir = engine.overlay_host.sandbox_dir
    if os.path.isdir(sandbox_dir):
        for name in await dp.list_netns(sandbox_dir):
            if name not in wanted:
                out.append(warn("leftovers", f"overlay sandbox {os.path.join(sandbox_dir, name)} belongs to no "
                                             "network with endpoints here; the overlay agent removes it within "
                                             "seconds if it runs, else `netweft swarm leave --force` clears them"))
    bridges = {n.bridge for n in engine._local_networks() if n.bridge}
    for link in await dp.list_links(BRIDGE_PREFIX):
        if link not in bridges:
            out.append(warn("leftovers", f"bridge {link} belongs to no network of this daemon: an earlier daemon's "
                                         f"(another --data-root?); `ip link del {link}`"))
    ports = {doc.get("host_ifname") for doc in engine.store.list(ENDPOINTS)}
    for link in await dp.list_links(VETH_PREFIX):
        if link not in ports:
            out.append(warn("leftovers", f"container port {link} belongs to no endpoint of this daemon: an earlier "
                                         f"daemon's; `ip link del {link}`"))
    if not out:
        out.append(ok("leftovers", "no state left by an earlier daemon"))
    return out


# ------------------------------------------------------------------ all of it

async def run(daemon) -> list[Finding]:
    dp = daemon.engine.dp
    out = kernel_findings(await dp.kernel_features())
    swarm = daemon.swarm
    st = swarm.state()
    agent = swarm.overlay
    if st is None or agent is None:
        out.append(ok("swarm", "this host is in no swarm: the cluster checks are skipped"))
        return out + await leftover_findings(daemon)
    me = st["NodeID"]
    port = st.get("DataPathPort", 4789)
    others = sorted((n for n in agent.nodes.values() if n.id != me), key=lambda n: n.hostname)
    managers: dict[str, str] = {}
    for addr in st.get("Managers", []):
        managers[addr] = next((n.hostname for n in others if n.manager_addr == addr or f"{n.addr}:2377" == addr),
                              addr.rpartition(":")[0])
    for n in others:
        if n.role == "manager":
            managers.setdefault(n.manager_addr or f"{n.addr}:2377", n.hostname)
    own = {f"{st.get('AdvertiseAddr')}:{tuple(st.get('ListenAddr') or ('', 2377))[1]}"} if st.get("Leader") else set()
    try:
        underlay = await agent.underlay_mtu()
    except NetweftError as e:
        return out + [fail("data path", f"cannot read the underlay MTU: {e}")] + await leftover_findings(daemon)
    checked = [addr for addr in managers if addr not in own]
    found = await asyncio.gather(*(manager_findings(agent.client, a, managers[a]) for a in checked),
                                 return_exceptions=True)
    # A manager whose port refuses connections has no daemon running: it answers no probe either.
    stopped = {a.rpartition(":")[0] for a, f in zip(checked, found)
               if not isinstance(f, BaseException) and "connection refused" in f[0].message}
    found += await asyncio.gather(*(data_path_findings(agent.prober, n, port, underlay, n.addr in stopped)
                                    for n in others), return_exceptions=True)
    for f in found:
        if isinstance(f, BaseException):
            out.append(fail("doctor", f"a check failed: {str(f)[:200] or type(f).__name__}"))
        else:
            out.extend(f)
    if not others:
        out.append(ok("data path", "no other host in the cluster to probe"))
    out.append(ok("ports", "7946/tcp+udp: not used by netweft (membership and health go over the managers' 2377/tcp "
                           f"and the data path's {port}/udp): nothing to open"))
    out += certificate_findings(swarm.dir)
    return out + await leftover_findings(daemon)


def routes(daemon) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/doctor")
    async def doctor(request):
        found = await run(daemon)
        return web.json_response({"Findings": [f.view() for f in found]})

    return r
