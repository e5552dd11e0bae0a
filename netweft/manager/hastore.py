"""The cluster store of several managers: etcd, as a member beside each manager or run by the operator.

What a manager keeps in its swarm directory for it (all 0600 but the certificates):
  store-ca.crt   the CA etcd trusts: the *store CA*, a CA of its own so that worker certificates
                 (signed by the cluster CA) never open etcd; or the operator's CA for an external etcd
  store.pem      this manager's certificate for etcd and its key in one file (0600), as client and
                 (embedded) as server and peer: one rename swaps both at a renewal, so etcd, which reads
                 them per handshake, never sees a certificate with another one's key
  store-crl.pem  the store certificates of demoted and removed managers (embedded etcd: every member
                 reads it per connection, --client-crl-file and --peer-crl-file)
  manager.key    the key the CA keys are sealed with in the store (netweft/pki/sealed.py)
  store-ca.key.sealed  the store CA key as sealed in the store (0600): a manager whose etcd certificate
                 expired while it was stopped renews it from this before it can reach etcd again
  etcd/          the embedded member's data and log
The swarm state (the host's database) says which: {"Store": "etcd", "StoreEndpoints": [...],
"EtcdMember": true|false}.
"""
from __future__ import annotations

import os
import re
from ipaddress import IPv4Address
from datetime import timedelta

from netweft import pki
from netweft.errors import InvalidRequest
from netweft.pki import sealed

CLIENT_PORT, PEER_PORT = 2379, 2380
STORE_CERT_EXPIRY = timedelta(days=90)   # a manager's etcd certificate (renewed: see storecerts.py)
STORE_FILES = {"ca": "store-ca.crt", "pair": "store.pem", "crl": "store-crl.pem", "sealed_ca": "store-ca.key.sealed"}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----\r?\n?")


def store_files(swarm_dir: str) -> dict[str, str]:
    return {k: os.path.join(swarm_dir, f) for k, f in STORE_FILES.items()}


def peer_url(addr: str) -> str:
    return f"https://{addr}:{PEER_PORT}"


def client_endpoint(addr: str) -> str:
    return f"{addr}:{CLIENT_PORT}"


def parse_endpoints(text: str) -> list[str]:
    """etcd://HOST:2379[,HOST:2379...] (HOST an IPv4 address) -> ["HOST:2379", ...]."""
    if not text.startswith("etcd://"):
        raise InvalidRequest(f"invalid --store {text[:80]!r}: use etcd (a member beside each manager) or "
                             "etcd://HOST:2379[,HOST:2379...] (an etcd cluster you run)")
    out = []
    for part in text[len("etcd://"):].split(","):
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = part, str(CLIENT_PORT)
        try:
            IPv4Address(host)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise InvalidRequest(f"invalid etcd endpoint {part[:80]!r} in --store: expected IPv4:PORT") from None
        out.append(f"{host}:{int(port)}")
    if not out or len(out) > 16:
        raise InvalidRequest("--store etcd://... needs 1 to 16 endpoints")
    return out


def make_store_ca(cluster_id: str) -> pki.RootCA:
    return pki.create_root_ca(cluster_id + "-store")


def sign_store_cert(store_ca: pki.RootCA, csr_pem: bytes, node_id: str, cluster_id: str, addr: str,
                    expiry: timedelta = STORE_CERT_EXPIRY) -> bytes:
    """A manager's etcd certificate: client, server and peer, valid for its address and loopback."""
    return pki.sign_node_cert(store_ca, csr_pem, node_id, "manager", cluster_id + "-store", expiry,
                              ip_sans=[addr, "127.0.0.1"])


def split_pair(pem: bytes) -> tuple[bytes, bytes]:
    """store.pem -> (certificate chain, key): the blocks by their type, whatever their order."""
    certs, keys = b"", b""
    for m in _PEM_BLOCK.finditer(pem):
        block = m.group(0) if m.group(0).endswith(b"\n") else m.group(0) + b"\n"
        if m.group(1) == b"CERTIFICATE":
            certs += block
        elif m.group(1).endswith(b"PRIVATE KEY"):
            keys += block
    if not certs or keys.count(b"-----BEGIN") != 1:
        raise InvalidRequest("the etcd certificate file holds no certificate and key pair: "
                             "leave the swarm (`netweft swarm leave --force`) and join again")
    return certs, keys


def save_store_pair(swarm_dir: str, ca_pem: bytes | None, cert_pem: bytes, key_pem: bytes) -> None:
    """Certificate and key in one file, swapped in one rename (a crash leaves the old pair or the new)."""
    f = store_files(swarm_dir)
    if ca_pem is not None:
        pki.save_pem(f["ca"], ca_pem)
    pki.save_pem(f["pair"], cert_pem.rstrip(b"\n") + b"\n" + key_pem, private=True)


def load_store_pair(swarm_dir: str) -> tuple[bytes, bytes, bytes]:
    """(store CA, certificate, key) as this manager holds them now."""
    f = store_files(swarm_dir)
    cert, key = split_pair(pki.load_pem(f["pair"]))
    return pki.load_pem(f["ca"]), cert, key


def store_cert_stale(swarm_dir: str, now=None) -> bool:
    """Whether this manager's etcd certificate is past 80 % of its lifetime (or unreadable): a manager that was
    stopped through its renewal window asks another manager for a new one before it starts."""
    from datetime import datetime, timezone
    try:
        _, cert, _ = load_store_pair(swarm_dir)
        ident = pki.cert_identity(cert)
    except (OSError, InvalidRequest):
        return True
    start = ident.not_before + pki.CLOCK_SKEW
    return (now or datetime.now(timezone.utc)) >= start + (ident.not_after - start) * 0.8


def save_sealed_store_ca(swarm_dir: str, sealed_key: str) -> None:
    """The store CA key as the store keeps it (sealed with the managers' key), for renew_offline."""
    path = store_files(swarm_dir)["sealed_ca"]
    try:
        if pki.load_pem(path) == sealed_key.encode():
            return
    except FileNotFoundError:
        pass
    pki.save_pem(path, sealed_key.encode(), private=True)


def renew_offline(swarm_dir: str, node_id: str, cluster_id: str, addr: str) -> bool:
    """A new etcd certificate (same lifetime as the last) signed with the store CA key kept sealed on this disk,
    when etcd cannot be reached with the expired one. False when this manager keeps no such key."""
    f = store_files(swarm_dir)
    try:
        key = sealed.load_key(swarm_dir)
        ca_pem, old, _ = load_store_pair(swarm_dir)
        store_ca = pki.RootCA.from_pem(ca_pem, sealed.unseal(key, "store-ca-key", pki.load_pem(f["sealed_ca"]).decode()))
    except (OSError, InvalidRequest):
        return False
    ident = pki.cert_identity(old)
    new_key = pki.new_node_key()
    cert = sign_store_cert(store_ca, pki.make_csr(new_key), node_id, cluster_id, addr,
                           ident.not_after - ident.not_before - pki.CLOCK_SKEW)
    save_store_pair(swarm_dir, None, cert, pki.key_to_pem(new_key))
    return True


def save_crl(swarm_dir: str, crl_pem: bytes) -> bool:
    """Write the store CRL if it changed (one rename: etcd reads it whole per connection). True if written."""
    path = store_files(swarm_dir)["crl"]
    try:
        if pki.load_pem(path) == crl_pem:
            return False
    except FileNotFoundError:
        pass
    pki.save_pem(path, crl_pem)
    return True


def open_store(swarm_dir: str, endpoints: list[str]) -> EtcdStore:
    """With several endpoints the servers' certificates are checked for the manager DNS name, which our
    own members' certificates carry whatever address was dialled (an etcd you run with several
    endpoints needs certificates with that name too; with one endpoint, its host is checked)."""
    from netweft.store.etcd import EtcdStore  # aetcd + grpc cost a daemon ~10 MiB: only on an etcd cluster
    ca, cert, key = load_store_pair(swarm_dir)
    return EtcdStore(endpoints, cacert=ca, cert=cert, key=key,
                     server_name=pki.MANAGER_HOSTNAME if len(endpoints) > 1 else None)


def remove_store_files(swarm_dir: str) -> None:
    for p in [*store_files(swarm_dir).values(), os.path.join(swarm_dir, sealed.KEY_FILE),
              os.path.join(swarm_dir, sealed.NEXT_KEY_FILE)]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def __getattr__(name: str):
    if name == "EtcdStore":  # hastore.EtcdStore, imported only when asked for (see open_store)
        from netweft.store.etcd import EtcdStore
        return EtcdStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
