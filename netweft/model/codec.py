"""Parsing untrusted bytes into typed objects, and back. Every refusal is one InvalidRequest line naming the field."""
from __future__ import annotations

from typing import TypeVar

import msgspec

from netweft.errors import InvalidRequest
from netweft.model import objects as o

T = TypeVar("T")

# What each pattern means, in words: a person reads "expected an IPv4 address", not a regex.
_PATTERN_WORDS = {
    o.NAME_PATTERN: "a name of letters, digits, '_', '.', '-' (starting with a letter or digit, at most 64)",
    o.HOSTNAME_PATTERN: "a hostname (dot-separated labels of letters, digits and '-', at most 64 characters)",
    o.IFNAME_PATTERN: "an interface name (1-15 letters, digits, '_', '.', '-')",
    o.ID_PATTERN: "an ID (lowercase letters and digits)",
    o.IPV4_PATTERN: "an IPv4 address",
    o.CIDR_PATTERN: "an IPv4 subnet in CIDR form, e.g. 198.18.0.0/24",
    o.MAC_PATTERN: "a MAC address, e.g. 02:42:c6:12:00:02",
}


def _words(message: str) -> str:
    for pattern, words in _PATTERN_WORDS.items():
        message = message.replace(f"`str` matching regex {pattern!r}", words)
    return message

_decoders: dict[object, msgspec.json.Decoder] = {}
_encoder = msgspec.json.Encoder()


def decode(data: bytes | str, type_: type[T], what: str = "request body") -> T:
    """Decode JSON into type_; wrong JSON, types or values raise InvalidRequest (status 400) in one line."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid {what}: {_words(str(e))}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"{what} is not valid JSON: {e}") from None
    except RecursionError:  # msgspec descends even into fields it ignores
        raise InvalidRequest(f"{what} is nested too deeply") from None


def convert(obj: object, type_: type[T], what: str = "request") -> T:
    """Like decode, for data already parsed (a query string turned into a dict, a stored document)."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid {what}: {_words(str(e))}") from None
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def to_builtins(obj: object):
    return msgspec.to_builtins(obj)
