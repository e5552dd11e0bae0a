"""pyroute2's IPRoute and NetlinkError, each loaded only when needed, without pyroute2's package __init__.

pyroute2's __init__ imports every pyroute2 module (≈160: NDB, IPDB, wireless, ipset, ...), and IPRoute alone
still pulls ≈100 (with unittest.mock, multiprocessing): ≈2.6 MiB of a daemon that may not need it (a host
outside a swarm with no container).
So the packages `pyroute2` and `pyroute2.netlink` are registered bare (their __path__ only): NetlinkError
comes from its own small module, and IPRoute is imported on first use (`pyroute2_parts.IPRoute`, or the
`iproute()` factory). Whoever later asks a bare package itself for a name (`from pyroute2 import NDB`) gets its
real __init__ run once, then the name.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING


def _register_bare(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name} is not installed: pip install pyroute2")
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:  # `from pyroute2 import config`
            return importlib.import_module(f"{name}.{attr}")
        del pkg.__getattr__  # the real __init__ runs once and fills the module
        spec.loader.exec_module(pkg)
        return getattr(pkg, attr)

    pkg.__getattr__ = __getattr__
    sys.modules[name] = pkg
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, pkg)


_register_bare("pyroute2")
_register_bare("pyroute2.netlink")

from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402  (a small module: os, time)

if TYPE_CHECKING:
    from pyroute2.iproute.linux import IPRoute


def __getattr__(name: str):
    if name == "IPRoute":  # pyroute2's netlink machinery, loaded on the first use of a handle
        from pyroute2.iproute.linux import IPRoute
        globals()["IPRoute"] = IPRoute
        return IPRoute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def iproute(**kw) -> "IPRoute":
    """A new IPRoute (pyroute2 loaded now if it was not yet)."""
    from pyroute2.iproute.linux import IPRoute
    return IPRoute(**kw)


__all__ = ["IPRoute", "NetlinkError", "iproute"]
