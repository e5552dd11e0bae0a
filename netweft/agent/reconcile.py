"""The overlay reconcile as pure code: what one host's kernel should hold (desired), what it holds
(observed), and the steps from one to the other.

The agent (agent/overlay.py) builds `DesiredNetwork`s from its copy of the cluster state and the local
endpoint records, observes the kernel through the data plane's list calls, and runs the steps with
`execute`. Each step is one DataPlane call and idempotent, so a reconcile that stopped half way (a crash,
a kernel error) is finished by the next one.

Steps carry a group: when a step fails, the later steps of its group and of the groups that need it are
skipped, every other group goes on. One broken endpoint (its container's namespace gone, say) never
keeps another endpoint or another network from being programmed.

Ensure steps are planned for everything desired, observed or not: the data plane's list calls see which
devices and entries exist, not every setting of them (a bridge recreated by hand has lost its ports),
and ensuring what is already right changes nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from netweft.model.objects import Peer, Sandbox

log = logging.getLogger("netweft.agent.reconcile")


@dataclass(frozen=True)
class Port:
    """A local endpoint as its sandbox holds it: a veth from the sandbox's bridge into its owner's namespace."""
    endpoint_id: str
    netns: str
    host_ifname: str
    ifname: str
    address: str        # CIDR
    mac: str
    mtu: int


@dataclass(frozen=True)
class GwPort:
    """A local endpoint's way out: a veth from the gateway bridge into its owner's namespace."""
    endpoint_id: str
    netns: str
    host_ifname: str
    ifname: str
    address: str        # CIDR
    mac: str
    mtu: int
    gateway_ip: str


@dataclass(frozen=True)
class Gateway:
    """The host's gateway bridge (overlay egress) and its firewall."""
    bridge: str
    cidr: str           # the bridge's address, e.g. 198.19.0.1/24
    subnet: str
    mtu: int


@dataclass(frozen=True)
class DesiredNetwork:
    """One overlay on this host: its sandbox, the local endpoints in it, and the remote endpoints (peers)."""
    sandbox: Sandbox
    local_ip: str       # this host's VTEP
    port: int           # VXLAN UDP port
    tmp_name: str       # vxlan0's name in the host namespace before it moves into the sandbox
    ports: tuple[Port, ...]
    peers: frozenset[Peer]


@dataclass(frozen=True)
class ObservedNetwork:
    """What the kernel holds at one sandbox path. None where it could not be read (a missing device)."""
    exists: bool
    ports: frozenset[str] | None = frozenset()    # host ends of the endpoint veths in the sandbox
    peers: frozenset[Peer] | None = None          # remote endpoints programmed on vxlan0


@dataclass(frozen=True)
class Step:
    """One DataPlane call: `op(*args)`. `if_true` runs after it when it returns True (a VXLAN device was
    recreated: its peers are gone and must be programmed again)."""
    op: str
    args: tuple
    group: str
    needs: tuple[str, ...] = ()
    if_true: "Step | None" = None

    def __repr__(self) -> str:
        return f"{self.op}{self.args!r}"


def plan_network(path: str, desired: DesiredNetwork | None, observed: ObservedNetwork,
                 full: bool = True) -> list[Step]:
    """The steps that make the sandbox at `path` what `desired` says (None: no sandbox wanted).

    `full`: ensure every port, down to its owner's namespace. Otherwise (the periodic resync) only ports
    missing from the sandbox are made: looking into every owner's namespace each round costs a netlink
    socket per namespace, which a host with thousands of endpoints cannot pay every few seconds."""
    group = f"net:{path}"
    if desired is None:
        return [Step("delete_sandbox", (path,), group)] if observed.exists else []
    sb = desired.sandbox
    wanted_peers = desired.peers
    sync = Step("sync_peers", (path, wanted_peers), group)
    steps = [Step("ensure_sandbox", (path, sb.vni, sb.gateway_cidr, sb.mtu, desired.local_ip, desired.port,
                                     desired.tmp_name), group, if_true=sync)]
    wanted_ports = {p.host_ifname for p in desired.ports}
    if observed.exists and observed.ports is not None:
        for name in sorted(observed.ports - wanted_ports):
            steps.append(Step("delete_overlay_endpoint", (path, name), f"stale:{path}:{name}", needs=(group,)))
    seen = observed.ports if observed.exists and observed.ports is not None and not full else frozenset()
    for p in desired.ports:
        if p.host_ifname in seen:
            continue
        steps.append(Step("ensure_overlay_endpoint", (path, p.netns, p.host_ifname, p.ifname, p.address, p.mac,
                                                      p.mtu), f"ep:{p.endpoint_id}", needs=(group,)))
    if not observed.exists or observed.peers is None:
        steps.append(sync)  # nothing readable to compare with: program the whole table
    else:
        stale = sorted(observed.peers - wanted_peers)
        missing = sorted(wanted_peers - observed.peers)
        if stale:
            steps.append(Step("remove_peers", (path, tuple(stale)), group))
        if missing:
            steps.append(Step("add_peers", (path, tuple(missing)), group))
    return steps


def plan_gateway(gateway: Gateway | None, gw_ports: list[GwPort], observed_gw_ports: set[str],
                 keep: set[str] = frozenset(), attached: set[str] | None = None) -> list[Step]:
    """The gateway bridge, its firewall and every local endpoint's port on it; stale ports go
    (except those in `keep`: ports of attaches still in progress). `attached`: the ports seen on the
    bridge, which need no ensure (None: ensure every port, as plan_network's `full`)."""
    wanted = {p.host_ifname for p in gw_ports}
    steps = [Step("delete_gw_endpoint", (name,), f"stale-gw:{name}")
             for name in sorted(observed_gw_ports - wanted - set(keep))]
    if gateway is None:
        return steps
    steps.append(Step("ensure_gwbridge", (gateway.bridge, gateway.cidr, gateway.mtu), "gateway"))
    steps.append(Step("apply_overlay_firewall", (gateway.bridge, gateway.subnet), "gateway"))
    for p in gw_ports:
        if attached is not None and p.host_ifname in attached:
            continue
        steps.append(Step("ensure_gw_endpoint", (p.netns, gateway.bridge, p.host_ifname, p.ifname, p.address, p.mac,
                                                 p.mtu, p.gateway_ip), f"gw:{p.endpoint_id}", needs=("gateway",)))
    return steps


@dataclass
class Outcome:
    done: list[tuple[Step, object]] = field(default_factory=list)   # each with what its call returned
    failed: list[tuple[Step, Exception]] = field(default_factory=list)
    skipped: list[Step] = field(default_factory=list)


async def execute(dataplane, steps: list[Step]) -> Outcome:
    """Run the steps in order on the data plane; a failure stops its group (and the groups needing it) only."""
    out = Outcome()
    failed: set[str] = set()
    for step in steps:
        if step.group in failed or any(n in failed for n in step.needs):
            out.skipped.append(step)
            continue
        try:
            result = await getattr(dataplane, step.op)(*step.args)
            if result is True and step.if_true is not None:
                await getattr(dataplane, step.if_true.op)(*step.if_true.args)
        except Exception as e:  # a kernel refusal or a bad record: this group stops, the others go on
            failed.add(step.group)
            out.failed.append((step, e))
            continue
        out.done.append((step, result))
    return out
