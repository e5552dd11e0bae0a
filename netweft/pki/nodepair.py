"""Where a node keeps its key, certificate and the CA on disk, and how they are replaced crash-safely."""
from __future__ import annotations

import logging
import os

from netweft import pki

log = logging.getLogger("netweft.pki")


def files(swarm_dir: str) -> dict[str, str]:
    return {k: os.path.join(swarm_dir, f) for k, f in
            {"ca": "ca.crt", "ca_key": "ca.key", "cert": "node.crt", "key": "node.key"}.items()}


def save_node_pair(swarm_dir: str, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace the node's key and certificate so that a crash at any point leaves a usable pair:
    the new key waits beside the old one until the new certificate is in place."""
    f = files(swarm_dir)
    pki.save_pem(f["key"] + ".new", key_pem, private=True)
    pki.save_pem(f["cert"], cert_pem)
    os.replace(f["key"] + ".new", f["key"])


def repair_node_pair(swarm_dir: str) -> None:
    """After a crash inside save_node_pair: finish the swap if the waiting key is the certificate's."""
    f = files(swarm_dir)
    pending = f["key"] + ".new"
    if not os.path.exists(pending):
        return
    cert = pki.load_cert(pki.load_pem(f["cert"]))
    new_key = pki.load_private_key(pki.load_pem(pending))
    if new_key.public_key().public_numbers() == cert.public_key().public_numbers():
        os.replace(pending, f["key"])
        log.info("finished a certificate renewal interrupted by a crash")
    else:
        os.unlink(pending)
