"""A small HTTP/1.1 server and client on asyncio streams: what netweftd's worker serves and calls, and no more.

A leaf: it knows nothing of netweft's objects. `wire` parses the protocol (strictly: every input is hostile),
`web` serves applications (routes, middlewares, JSON and streamed answers), `client` calls a server (keep-alive,
TLS, timeouts, streamed bodies). A worker's daemon imports these instead of aiohttp, which costs ≈14 MiB.
"""
