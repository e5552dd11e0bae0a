"""One process of simulated hosts for bench/bench_sim_hosts.py: it enters lab host h1's network namespace,
runs its share of the simulated hosts (bench/_simhost.py) and answers the coordinator's commands, one JSON
line in, one JSON line out, on stdin/stdout. It exits when stdin closes (the coordinator went away).

Several of these spread the simulated side over the machine's cores and file-descriptor limits, so that
the managers, not one Python process of simulated hosts, are what the benchmark measures.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _simhost import SimHost, SimOverlayAgent, enter_netns  # noqa: E402


def sim_addr(i: int) -> str:
    """Advertise addresses from the documentation ranges (never used on the wire: the data plane is fake)."""
    nets = ("203.0.113", "198.51.100")
    return f"{nets[(i // 240) % 2]}.{10 + i % 240}"


async def gather_limited(coros, limit: int):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


class LoopLag:
    """How late this process's event loop runs a timer: when it is seconds late, every simulated host in it
    hears of everything seconds late, and the figures measure this process, not the managers."""

    def __init__(self, every: float = 0.1):
        self.every, self.worst = every, 0.0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.every)
            self.worst = max(self.worst, time.monotonic() - t - self.every)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class Worker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.root = cfg["root"]
        sources = cfg["sources"]
        self.sims = [SimHost(os.path.join(self.root, f"s{i}"), f"sim{i}", sim_addr(i), sources[i % len(sources)])
                     for i in cfg["indices"]]
        self.by_name = {s.name: s for s in self.sims}
        SimOverlayAgent.share = cfg["hosts"]
        self.lag = LoopLag()

    async def loop_lag(self) -> float:
        """The worst lateness of this process's event loop since the last call (seconds)."""
        return self.lag.take()

    async def join(self, token: str, manager: str, concurrency: int, managers: list[str] | None = None) -> float:
        """managers: every manager's address; host i joins managers[i % len] (as operators spread joins), else
        every host joins `manager`."""
        t = time.monotonic()

        async def one(k: int, s: SimHost) -> None:
            await s.join(token, managers[self.cfg["indices"][k] % len(managers)] if managers else manager)
            await s.start(self.cfg["resync"], self.cfg["prober"])   # heartbeats at once: a silent node goes down
        await gather_limited((one(k, s) for k, s in enumerate(self.sims)), concurrency)
        return time.monotonic() - t

    async def snapshots(self) -> int:
        """Snapshots the simulated hosts of this process have applied so far."""
        return SimOverlayAgent.snapshots

    async def connected(self, timeout: float) -> float:
        t = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(s.overlay.connected.wait() for s in self.sims)), timeout)
        return time.monotonic() - t

    async def cleared(self, timeout: float) -> None:
        async def one(s):
            while s.overlay.connected.is_set():
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*(one(s) for s in self.sims)), timeout)

    async def attach_all(self, nets: list[str], concurrency: int) -> list[str]:
        """One endpoint per host, on the network of its group."""
        async def one(k: int, s: SimHost):
            return (await s.attach(nets[self.cfg["indices"][k] % len(nets)], f"{s.name}c0")).ip
        return await gather_limited((one(k, s) for k, s in enumerate(self.sims)), concurrency)

    async def attach_one(self, name: str, net: str, tag: str) -> dict:
        t0 = time.monotonic()   # CLOCK_MONOTONIC: the same clock in every process of the machine
        ep = await self.by_name[name].attach(net, tag)
        return {"ip": ep.ip, "t0": t0, "attach_s": time.monotonic() - t0}

    async def arrivals(self, ip: str, t0: float, skip: str, names: list[str] | None, timeout: float) -> list[float]:
        """Seconds from t0 until each host (but `skip`) programmed the peer with this IP."""
        hosts = [s for s in self.sims if s.name != skip and (names is None or s.name in names)]
        for s in hosts:
            s.dp.expect(ip)
            s.dp._seen(())   # programmed before the address was known here
        await asyncio.wait_for(asyncio.gather(*(s.dp.arrived.wait() for s in hosts)), timeout)
        return [s.dp.arrived_at - t0 for s in hosts]

    async def stop(self) -> None:
        self.lag.task.cancel()
        await asyncio.gather(*(s.stop() for s in self.sims), return_exceptions=True)
        shutil.rmtree(self.root, ignore_errors=True)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    worker: Worker | None = None
    try:
        while True:
            line = await reader.readline()
            if not line:
                return   # the coordinator is gone
            cmd, kw = json.loads(line)
            try:
                if cmd == "init":
                    enter_netns(kw.pop("netns"))
                    worker = Worker(kw)
                    result = len(worker.sims)
                elif cmd == "stop":
                    await worker.stop()
                    worker = None
                    out.write(json.dumps({"ok": None}) + "\n")
                    out.flush()
                    return
                else:
                    result = await getattr(worker, cmd)(**kw)
                    # Hundreds of agents in one process hold millions of objects (a real host's agent holds
                    # its own few): a full collection of the cyclic GC then stops every one of them for
                    # seconds. What a phase built is moved out of the collector's sight after it.
                    gc.freeze()
                reply = {"ok": result}
            except Exception as e:   # noqa: BLE001 - said to the coordinator, which stops the run
                reply = {"error": f"{cmd}: {type(e).__name__}: {e}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        if worker is not None:
            await worker.stop()


def main() -> None:
    gc.set_threshold(50_000, 20, 100)   # fewer collections while hundreds of agents build their state
    logging.getLogger("netweft").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(serve())


if __name__ == "__main__":
    main()
