"""`netweft rm [-f] NAME...`: one container is Docker's DELETE; several go to the daemon together.

Several names are sent in chunks to POST /containers/remove, which removes each chunk at once (veths, firewall
elements and records deleted together: daemon/removal.py). Each name still gets its line, in order, as its
chunk is answered: the name when it is gone, `Error: ...` when it is not; the exit code is 1 if any failed.
A daemon without that route (an older one) gets a DELETE per name.
"""
from __future__ import annotations

import sys

from netweft.apiclient.client import ApiError, Client, DaemonUnreachable, call_each, ref

CHUNK = 500   # names per request: lines keep coming while thousands are removed


def remove(client: Client, names: list[str], force: bool) -> int:
    failed = False
    if len(names) > 1:
        done = 0
        try:
            while done < len(names):
                chunk = names[done:done + CHUNK]
                answer = client.call("POST", "/containers/remove", {"Names": chunk, "Force": force})
                if not isinstance(answer, list) or len(answer) != len(chunk):
                    raise DaemonUnreachable("netweftd answered POST /containers/remove with something else than "
                                            "one result per name; is it the same version as this command?")
                for name, result in zip(chunk, answer):
                    error = result.get("Error") if isinstance(result, dict) else "no result"
                    failed |= _line(name, error)
                done += len(chunk)
            return 1 if failed else 0
        except ApiError as e:
            if e.status != 404 or done:
                raise
            names = names[done:]   # an older daemon: one DELETE each
    calls = [("DELETE", f"/containers/{ref(n)}", {"force": 1 if force else None}) for n in names]
    for n, result in zip(names, call_each(client, calls)):
        failed |= _line(n, str(result) if isinstance(result, Exception) else None)
    return 1 if failed else 0


def _line(name: str, error: str | None) -> bool:
    if error is None:
        sys.stdout.write(f"{name}\n")
        sys.stdout.flush()
        return False
    sys.stderr.write(f"Error: {error}\n")
    return True
