"""pyroute2's IPRoute and NetlinkError without running its package __init__, which imports every pyroute2 module
(≈160: NDB, IPDB, wireless, ipset, ...; ≈6 MiB of a daemon that uses two classes).

The package is registered bare (its __path__ only), so importing the submodules we use runs just those. Whoever
later asks the package itself for a name (`from pyroute2 import NDB`) gets the real __init__ run once, then the name.
"""
from __future__ import annotations

import importlib.util
import sys


def _register_bare_package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed: pip install pyroute2")
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:  # `from pyroute2 import config`
            return importlib.import_module(f"pyroute2.{name}")
        del pkg.__getattr__  # the real __init__ runs once and fills the module
        spec.loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__getattr__ = __getattr__
    sys.modules["pyroute2"] = pkg


_register_bare_package()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
