"""The cluster store of several managers: etcd, as a member beside each manager or run by the operator.

What a manager keeps in its swarm directory for it (all 0600 but the certificates):
  store-ca.crt   the CA etcd trusts: the *store CA*, a CA of its own so that worker certificates
                 (signed by the cluster CA) never open etcd; or the operator's CA for an external etcd
  store.crt/.key this manager's certificate for etcd, as client and (embedded) as server and peer
  manager.key    the key the CA keys are sealed with in the store (netweft/pki/sealed.py)
  etcd/          the embedded member's data and log
The swarm state (the host's database) says which: {"Store": "etcd", "StoreEndpoints": [...],
"EtcdMember": true|false}.
"""
from __future__ import annotations

import os
from ipaddress import IPv4Address
from datetime import timedelta

from netweft import pki
from netweft.errors import InvalidRequest
from netweft.pki import sealed

CLIENT_PORT, PEER_PORT = 2379, 2380
STORE_CERT_EXPIRY = timedelta(days=3650)   # the store CA's lifetime; not renewed (see the README's HA section)
STORE_FILES = {"ca": "store-ca.crt", "cert": "store.crt", "key": "store.key"}


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


def sign_store_cert(store_ca: pki.RootCA, csr_pem: bytes, node_id: str, cluster_id: str, addr: str) -> bytes:
    """A manager's etcd certificate: client, server and peer, valid for its address and loopback."""
    return pki.sign_node_cert(store_ca, csr_pem, node_id, "manager", cluster_id + "-store", STORE_CERT_EXPIRY,
                              ip_sans=[addr, "127.0.0.1"])


def save_store_pair(swarm_dir: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    f = store_files(swarm_dir)
    pki.save_pem(f["ca"], ca_pem)
    pki.save_pem(f["cert"], cert_pem)
    pki.save_pem(f["key"], key_pem, private=True)


def open_store(swarm_dir: str, endpoints: list[str]) -> EtcdStore:
    """With several endpoints the servers' certificates are checked for the manager DNS name, which our
    own members' certificates carry whatever address was dialled (an etcd you run with several
    endpoints needs certificates with that name too; with one endpoint, its host is checked)."""
    from netweft.store.etcd import EtcdStore  # aetcd + grpc cost a daemon ~10 MiB: only on an etcd cluster
    f = store_files(swarm_dir)
    return EtcdStore(endpoints, cacert=pki.load_pem(f["ca"]), cert=pki.load_pem(f["cert"]),
                     key=pki.load_pem(f["key"]), server_name=pki.MANAGER_HOSTNAME if len(endpoints) > 1 else None)


def remove_store_files(swarm_dir: str) -> None:
    for p in [*store_files(swarm_dir).values(), os.path.join(swarm_dir, sealed.KEY_FILE)]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def __getattr__(name: str):
    if name == "EtcdStore":  # hastore.EtcdStore, imported only when asked for (see open_store)
        from netweft.store.etcd import EtcdStore
        return EtcdStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
