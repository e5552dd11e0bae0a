"""What this kernel can do, found by trying it where it harms nothing: in a throwaway network namespace.

A fresh thread unshares its network namespace (CLONE_NEWNET applies to the calling thread only), makes a
bridge, a VXLAN device and a WireGuard device there, and an nftables table of the inet and the bridge
family; the namespace goes when the thread ends. Module lists and /sys say what is loaded, not what
works (a built-in feature has no module; a module may refuse to load), so doctor asks the kernel itself.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import threading

CLONE_NEWNET = 0x40000000


def _try(fn) -> str | None:
    """None when fn worked, else a few words why not."""
    try:
        fn()
        return None
    except Exception as e:   # the kernel's refusal, whatever shape it takes
        text = str(getattr(e, "args", [None, ""])[-1] if getattr(e, "code", None) else e) or type(e).__name__
        return " ".join(text.split())[:120]


def _probe() -> dict[str, str | None]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    from netweft.dataplane.pyroute2_parts import IPRoute

    out: dict[str, str | None] = {}
    ipr = IPRoute()
    try:
        out["bridge"] = _try(lambda: ipr.link("add", ifname="nwtbr", kind="bridge"))
        out["vxlan"] = _try(lambda: ipr.link("add", ifname="nwtvx", kind="vxlan", vxlan_id=42, vxlan_port=4789,
                                             vxlan_learning=0))
        out["wireguard"] = _try(lambda: ipr.link("add", ifname="nwtwg", kind="wireguard"))
    finally:
        ipr.close()
    try:
        import nftables
        nft = nftables.Nftables()

        def table(family: str):
            rc, _, err = nft.json_cmd({"nftables": [{"add": {"table": {"family": family, "name": "nwtprobe"}}}]})
            if rc != 0:
                raise RuntimeError((err or "refused").strip().splitlines()[-1])
        out["nftables"] = _try(lambda: table("inet"))
        out["nftables_bridge"] = _try(lambda: table("bridge"))
    except (ImportError, OSError) as e:
        out["nftables"] = out["nftables_bridge"] = f"libnftables cannot be loaded ({e})"
    return out


def kernel_features() -> dict[str, str | None]:
    """feature -> None if it works, else why not. Keys: bridge, vxlan, wireguard, nftables, nftables_bridge
    (tried in a throwaway namespace), br_netfilter ("loaded" or "not loaded": informational) and
    wireguard_go (its path, or None)."""
    result: dict = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.update(_probe())
        except BaseException as e:
            failure.append(e)
    t = threading.Thread(target=run, name="kernel-features")
    t.start()
    t.join(20)
    if failure or not result:
        why = str(failure[0]) if failure else "timed out"
        result = {k: f"cannot test ({why})" for k in ("bridge", "vxlan", "wireguard", "nftables", "nftables_bridge")}
    result["br_netfilter"] = "loaded" if os.path.isdir("/proc/sys/net/bridge") else "not loaded"
    result["wireguard_go"] = shutil.which("wireguard-go")
    return result
