"""`rm -f` of many containers in one request: what one `rm` does for each, done for all at once.

Removing containers one by one costs, for each, two veth deletions (an RCU grace period each, ≈20 ms here),
an nftables transaction, a store transaction, a DNS table rebuild and a wait for its process to exit. Here
the whole batch pays each of these once: every process is signalled before any is waited for, the overlay
endpoints of a network go in one record transaction and one kernel group delete (agent.detach_many), the
DNS tables of the networks concerned are rebuilt once, and the container documents go in one transaction.

The answer is one result per name asked, in order: None (removed) or the error for that name. A name that
is not found, or a running container without force, fails alone. If a batched step fails, the containers
left are removed one by one, as `rm` of each would, so that one broken container costs only itself.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from netweft.daemon.memory import trimmer
from netweft.errors import Conflict, NetweftError
from netweft.runtime import container as runtime
from netweft.store.local import ENDPOINTS

log = logging.getLogger("netweft.engine")


async def remove_containers(engine, refs: list[str], force: bool) -> list[NetweftError | None]:
    results: list[NetweftError | None] = [None] * len(refs)
    ctrs: dict[str, dict] = {}
    asked: dict[str, list[int]] = {}   # container id -> the positions of the names that named it
    for i, ref in enumerate(refs):
        try:
            ctr = engine.container(ref)
        except NetweftError as e:
            results[i] = e
            continue
        ctrs.setdefault(ctr["Id"], ctr)
        asked.setdefault(ctr["Id"], []).append(i)
    running = [cid for cid in ctrs if runtime.status(engine.ctr_state_dir(cid))[0] == "running"]
    if not force:
        for cid in running:
            error = Conflict(f"container {ctrs[cid]['Name']!r} is running; stop it first or use rm -f")
            for i in asked[cid]:
                results[i] = error
            del ctrs[cid]
        running = []
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.stop_all, [engine.ctr_state_dir(cid) for cid in running], 0)
    try:
        await _teardown_all(engine, list(ctrs.values()))
    except Exception as e:   # noqa: BLE001 (any failure: each container is then tried alone)
        log.warning("removing containers together failed; removing them one by one",
                    extra={"containers": len(ctrs), "reason": str(e)})
        for cid, ctr in ctrs.items():
            if engine.store.get("containers", cid) is None:
                continue   # removed before the failure
            try:
                await engine._teardown_container(ctr)
            except NetweftError as e:
                for i in asked[cid]:
                    results[i] = e
    for cid, ctr in ctrs.items():
        if results[asked[cid][0]] is None:
            log.info("container removed", extra={"container": ctr["Name"], "id": cid})
    return results


async def _teardown_all(engine, ctrs: list[dict]) -> None:
    """engine._teardown_container for each, each step once for all: endpoints, names, namespaces, files,
    then the documents (so that what a crash half way leaves is still removable)."""
    eps_of = {c["Id"]: engine.endpoints_of(c["Id"]) for c in ctrs}
    overlay = [ep for eps in eps_of.values() for ep in eps if ep.node_id]
    if overlay:
        trimmer.released(len(overlay))
        if engine.overlay_agent is None:   # their data plane left with the swarm
            with engine.store.tx():
                for ep in overlay:
                    engine.store.delete(ENDPOINTS, ep.id)
        else:
            await engine.overlay_agent.detach_many(overlay)
    for eps in eps_of.values():
        for ep in eps:
            if not ep.node_id:
                await engine._delete_endpoint(ep)   # local networks: a few per host, one by one
    if engine.names is not None:
        gone = [ep for eps in eps_of.values() for ep in eps]
        engine.names.containers_removed(eps_of, [ep.network_id for ep in gone], gone)
    for c in ctrs:
        if c["HostConfig"]["NetworkMode"] != "host":
            await engine.dp.delete_netns(engine.netns_path(c["Id"]))
    dirs = [engine.ctr_state_dir(c["Id"]) for c in ctrs]
    await asyncio.get_running_loop().run_in_executor(None, _remove_dirs, dirs)
    with engine.store.tx():
        for c in ctrs:
            engine.store.delete("containers", c["Id"])
    for c in ctrs:
        engine._ctr_locks.pop(c["Id"], None)


def _remove_dirs(dirs: list[str]) -> None:
    """The containers' files, several at a time: unlinking a file a dying container still has mounted
    (hosts, resolv.conf) waits for the kernel to detach those mounts, and such waits overlap."""
    def rm(d: str) -> None:
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(dirs))), thread_name_prefix="rm") as ex:
        list(ex.map(rm, dirs))
