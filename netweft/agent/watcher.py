"""The agent's end of the watch (netweft/model/watch.py): one stream at a time from the managers.

A stream that ends (a manager restarting, a network cut, this node leaving) is one log line and a
reconnect after a backoff that doubles up to a cap, with jitter, so a thousand agents cut off at once
do not come back at once. The stream resumes from the revision the agent holds (`since()`).
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from netweft.errors import Forbidden, NetweftError

log = logging.getLogger("netweft.agent.watch")

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 3.0


def backoff(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect number `failures` (0 for the first): doubling, capped, jittered
    between half and all of it."""
    base = min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** min(failures, 16)))
    return base * (0.5 + 0.5 * rand())


class Watcher:
    """Runs the stream: `handle(message)` for each line (a dict), `on_connect()` at each first message."""

    def __init__(self, client, since: Callable[[], int], handle: Callable[[dict], None],
                 on_connect: Callable[[], None], networks: Callable[[], list[str]] = lambda: []):
        self.client, self.since, self.handle, self.on_connect, self.networks = \
            client, since, handle, on_connect, networks
        self.connected = asyncio.Event()
        self._restart = False

    def restart(self) -> None:
        """End the current stream at its next line (pings come every few seconds) and resume from since()."""
        self._restart = True

    def path(self) -> str:
        nets = self.networks()
        return f"/watch?since={self.since()}" + (f"&networks={','.join(nets)}" if nets else "")

    async def run(self) -> None:
        failures, last_reason = 0, None
        while True:
            self._restart = False
            got = False
            try:
                async for message in self.client.stream(self.path()):
                    if not got:
                        got, failures = True, 0
                        self.connected.set()
                        self.on_connect()
                    self.handle(message)
                    if self._restart:
                        break
                reason = "restarted to retry what could not be applied" if self._restart else \
                    "the manager ended it"
            except asyncio.CancelledError:
                raise
            except Forbidden as e:
                self.connected.clear()
                log.error("the manager refuses this node's watch; overlays stay as they are until it rejoins",
                          extra={"reason": str(e)})
                return
            except NetweftError as e:
                reason = str(e)
            except ValueError as e:  # a line that is not JSON: the stream is broken, take a new one
                reason = f"malformed watch line ({e})"
            except Exception:  # a bug in handling a message: say so in full, then start a new stream
                log.exception("watch message handling failed; reconnecting")
                reason = "a message could not be handled"
            self.connected.clear()
            delay = 0.0 if self._restart else backoff(failures)
            if not got:
                failures += 1
            if got or reason != last_reason:  # one line per outage, not one per retry
                log.warning("watch stream closed; the data plane keeps its last state, reconnecting",
                            extra={"reason": reason, "retry_in_s": round(delay, 2)})
            last_reason = reason
            await asyncio.sleep(delay)
