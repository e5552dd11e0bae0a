"""The daemon's opt-in TCP listeners (--metrics-addr, --dashboard-addr): one way to start them."""
from __future__ import annotations

from netweft.http import web

from netweft.errors import Conflict


async def serve_tcp(app: web.Application, addr: tuple[str, int], flag: str) -> web.AppRunner:
    """`app` served on addr; a taken or wrong address is one line naming the flag."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, addr[0], addr[1]).start()
    except OSError as e:
        await runner.cleanup()
        raise Conflict(f"cannot listen on {flag} {addr[0]}:{addr[1]}: {e.strerror}; choose another address") from None
    return runner
