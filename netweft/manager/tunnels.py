"""The nodes' WireGuard facts, as the managers keep them: port, tunnel address pair, public keys.

A node publishes its port and public keys (POST /tunnel; its private keys never leave it). The first time,
the managers give it a pair of tunnel addresses from the reserved block (ipam/tunnel.py) in the same
compare-and-write transaction, guarded so two managers never hand out one pair twice. The Node record
carries the lot to every host through the watch.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import msgspec

from netweft.errors import NotFound
from netweft.ipam import tunnel
from netweft.manager.watch import ALLOCATIONS, NODES, Hub
from netweft.model import codec
from netweft.model.cluster import TunnelUpdate
from netweft.model.objects import TunnelKey
from netweft.store.api import Compare, Put

log = logging.getLogger("netweft.manager.tunnels")

DEFAULT_WG_PORT = 51820
TUNNELS_GUARD = "tunnels"   # moves with every tunnel address pair handed out
GUARD = b"{}"


async def set_tunnel(hub: Hub, node_id: str, update: TunnelUpdate) -> dict:
    """Store the node's port and keys (a pair of addresses the first time); returns {"Addrs": [a0, a1]}."""
    def plan():
        st = hub.state
        node = st.get(NODES, node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not a member of this cluster")
        compares = [Compare(NODES, node.id, st.mod_rev(NODES, node.id))]
        ops = []
        addrs = list(node.tunnel_addrs)
        if len(addrs) != 2:
            taken = {a for n in st.nodes() for a in n.tunnel_addrs}
            addrs = list(tunnel.allocate_pair(taken))
            compares.append(Compare(ALLOCATIONS, TUNNELS_GUARD, st.mod_rev(ALLOCATIONS, TUNNELS_GUARD)))
            ops.append(Put(ALLOCATIONS, TUNNELS_GUARD, GUARD))
        # Each key lives in its own interface: slot 1's listens one port above slot 0's.
        keys = [TunnelKey(public_key=k.public_key, addr=addrs[k.slot], current=k.current, port=update.port + k.slot)
                for k in sorted(update.keys, key=lambda k: not k.current)]
        new = msgspec.structs.replace(node, tunnel_port=update.port, tunnel_addrs=addrs, tunnel_keys=keys,
                                      updated=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        if (node.tunnel_port, node.tunnel_addrs, node.tunnel_keys) == (new.tunnel_port, addrs, keys):
            return [], [], (node, False)
        ops.append(Put(NODES, node.id, codec.encode(new)))
        return compares, ops, (new, True)
    (node, changed), _ = await hub.commit(plan)
    if changed:
        log.info("node tunnel keys updated", extra={"node": node.id, "keys": len(node.tunnel_keys),
                                                    "addrs": node.tunnel_addrs})
    return {"Addrs": list(node.tunnel_addrs)}
