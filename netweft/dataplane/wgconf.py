"""WireGuard for the encrypted overlays, the pure part: keys, the tunnel's desired state, the control protocol.

wireguard-go (and the kernel's `wg` tool) speak a text protocol on /var/run/wireguard/IFNAME.sock:
`set=1` then key=value lines (keys in hex) ended by an empty line, answered `errno=N`; `get=1` answers
the same kind of lines. Everything here renders or parses that text, or compares states; no I/O.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from netweft.errors import InvalidRequest, KernelError

WG_OVERHEAD = 60          # outer IPv4 20 + UDP 8 + WireGuard header 16 + tag 16: tunnel MTU = underlay MTU - 60
DEFAULT_WG_PORT = 51820
KEY_RE = re.compile(r"\A[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z")   # 32 bytes, base64 (as `wg` prints them)
MAX_ANSWER = 1 << 20      # a get answer for a few thousand peers stays far below this


# ---- keys ---------------------------------------------------------------------------------------

def new_private_key() -> str:
    # cryptography is loaded here, not at import: a host without encrypted networks never needs it
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    raw = X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def public_key(private_b64: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    key = X25519PrivateKey.from_private_bytes(key_bytes(private_b64, "private key"))
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


def key_bytes(b64: str, what: str = "WireGuard key") -> bytes:
    if not isinstance(b64, str) or not KEY_RE.match(b64):
        raise InvalidRequest(f"invalid {what}: expected 32 bytes in base64 (44 characters)")
    return base64.b64decode(b64)


def to_hex(b64: str) -> str:
    return key_bytes(b64).hex()


def from_hex(text: str) -> str:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KernelError(f"WireGuard answered a malformed key {text[:16]!r}")
    return base64.b64encode(raw).decode()


# ---- desired state --------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class TunnelPeer:
    """One key of one remote host: where its WireGuard listens and the tunnel address it may send from."""
    public_key: str          # base64
    endpoint: str            # underlay IP:port
    allowed_ip: str          # its tunnel address for this key, x.x.x.x/32


@dataclass(frozen=True)
class TunnelSpec:
    """This host's WireGuard interface as it should be."""
    ifname: str
    private_key: str         # base64; never leaves the host
    port: int
    addresses: tuple[str, ...]   # the interface's tunnel address (/32)
    source: str              # the address encrypted VXLAN leaves from while this interface carries the route
    route: str | None        # the tunnel block, routed into this interface with `source`; None: the route is
                             # another interface's (a rotation's old or next key), left alone
    mtu: int
    peers: tuple[TunnelPeer, ...] = ()


@dataclass(frozen=True)
class PeerStatus:
    public_key: str
    endpoint: str | None
    last_handshake: float    # seconds since the epoch; 0 = never
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceState:
    """A WireGuard device's configuration as its control socket reports it."""
    private_key: str | None
    port: int | None
    peers: dict[str, PeerStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class Implementation:
    """Which WireGuard this host can use: "kernel", "wireguard-go" or "none" (with what to install)."""
    kind: str
    path: str = ""
    version: str = ""
    problem: str = ""

    def view(self) -> dict:
        out = {"Implementation": self.kind}
        if self.path:
            out["Path"] = self.path
        if self.version:
            out["Version"] = self.version
        if self.problem:
            out["Problem"] = self.problem
        return out


NO_WIREGUARD = ("this host has no WireGuard (neither the wireguard kernel module nor wireguard-go), which encrypted "
                "overlay networks need: install it (apt-get install wireguard-go) and restart netweftd")


# ---- the control protocol -----------------------------------------------------------------------

def render_set(spec: TunnelSpec, have: DeviceState | None) -> str | None:
    """The `set=1` request that turns `have` into `spec` (only what differs, so live sessions of unchanged
    peers are kept), or None if nothing differs."""
    lines: list[str] = []
    if have is None or have.private_key != spec.private_key:
        lines.append(f"private_key={to_hex(spec.private_key)}")
    if have is None or have.port != spec.port:
        lines.append(f"listen_port={spec.port}")
    want = {p.public_key: p for p in spec.peers}
    old = have.peers if have is not None else {}
    for key in sorted(set(old) - set(want)):
        lines += [f"public_key={to_hex(key)}", "remove=true"]
    for key, p in sorted(want.items()):
        cur = old.get(key)
        if cur is not None and cur.endpoint == p.endpoint and cur.allowed_ips == (p.allowed_ip,):
            continue
        lines += [f"public_key={to_hex(key)}", f"endpoint={p.endpoint}", "replace_allowed_ips=true",
                  f"allowed_ip={p.allowed_ip}"]
    if not lines:
        return None
    return "set=1\n" + "\n".join(lines) + "\n\n"


def parse_errno(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError:
                break
    raise KernelError(f"WireGuard answered without an errno: {text[:80]!r}")


def parse_get(text: str) -> DeviceState:
    """The answer to `get=1`: device lines, then one block per peer starting at public_key=."""
    private = port = None
    peers: dict[str, PeerStatus] = {}
    cur: dict | None = None

    def close() -> None:
        if cur is not None:
            peers[cur["key"]] = PeerStatus(cur["key"], cur.get("endpoint"), cur.get("hs", 0.0), cur.get("rx", 0),
                                           cur.get("tx", 0), tuple(cur.get("ips", ())))

    for line in text.splitlines():
        if not line:
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise KernelError(f"WireGuard answered a malformed line {line[:80]!r}")
        try:
            if k == "errno":
                if int(v) != 0:
                    raise KernelError(f"WireGuard refused get: errno {int(v)}")
            elif k == "public_key":
                close()
                cur = {"key": from_hex(v)}
            elif cur is None:
                if k == "private_key":
                    private = from_hex(v)
                elif k == "listen_port":
                    port = int(v)
            elif k == "endpoint":
                cur["endpoint"] = v
            elif k == "last_handshake_time_sec":
                cur["hs"] = cur.get("hs", 0.0) + int(v)
            elif k == "last_handshake_time_nsec":
                cur["hs"] = cur.get("hs", 0.0) + int(v) / 1e9
            elif k == "rx_bytes":
                cur["rx"] = int(v)
            elif k == "tx_bytes":
                cur["tx"] = int(v)
            elif k == "allowed_ip":
                cur.setdefault("ips", []).append(v)
        except ValueError:
            raise KernelError(f"WireGuard answered a malformed line {line[:80]!r}") from None
    close()
    return DeviceState(private, port, peers)
