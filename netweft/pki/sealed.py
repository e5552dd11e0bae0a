"""Secrets the managers keep in the shared cluster store (the CA keys), sealed with a key only managers hold.

The manager key is 32 random bytes in the swarm directory (0600), made at `swarm init --store etcd` and
handed to each new manager over mutual TLS when it enrolls. A sealed value is AES-256-GCM: a 12-byte
nonce then the ciphertext, base64; the purpose (e.g. "ca-key") is the associated data, so a sealed
value cannot be passed off as another.
"""
from __future__ import annotations

import base64
import binascii
import os
import secrets

from netweft.errors import InvalidRequest

KEY_FILE = "manager.key"
NEXT_KEY_FILE = "manager.key.next"   # a rotation's new key, until the store holds what it sealed
KEY_SIZE = 32


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the manager key is not base64") from None
    if len(key) != KEY_SIZE:
        raise InvalidRequest(f"the manager key must be {KEY_SIZE} bytes, not {len(key)}")
    return key


def seal(key: bytes, purpose: str, secret: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only managers seal: keep it off workers
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, secret, purpose.encode())).decode()


def unseal(key: bytes, purpose: str, sealed: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    try:
        raw = base64.b64decode(sealed, validate=True)
        return AESGCM(key).decrypt(raw[:12], raw[12:], purpose.encode())
    except (binascii.Error, ValueError, InvalidTag):
        raise InvalidRequest(f"the sealed {purpose} in the cluster store does not open with this manager's key "
                             "(another cluster's, or damaged): leave and join again as a manager") from None


def save_key(swarm_dir: str, key: bytes, name: str = KEY_FILE) -> None:
    path = os.path.join(swarm_dir, name)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)   # also when an older .tmp was left with other bits
        os.write(fd, encode_key(key).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(swarm_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def save_next_key(swarm_dir: str, key: bytes) -> None:
    save_key(swarm_dir, key, NEXT_KEY_FILE)


def load_next_key(swarm_dir: str) -> bytes:
    try:
        with open(os.path.join(swarm_dir, NEXT_KEY_FILE)) as f:
            return decode_key(f.read().strip())
    except FileNotFoundError:
        raise InvalidRequest("no rotation under way") from None


def drop_next_key(swarm_dir: str) -> None:
    try:
        os.unlink(os.path.join(swarm_dir, NEXT_KEY_FILE))
    except FileNotFoundError:
        pass


def load_key(swarm_dir: str) -> bytes:
    path = os.path.join(swarm_dir, KEY_FILE)
    try:
        with open(path) as f:
            return decode_key(f.read().strip())
    except FileNotFoundError:
        raise InvalidRequest(f"this manager has no manager key ({path}): leave and join again as a manager") from None
