"""json.loads / json.dumps for the CLI's hot path, straight on the C accelerator `_json`.

The `json` package imports `re` (and with it `enum`), which costs more at each `netweft` start than the
daemon takes to answer `ps`. `_json` is what `json` itself calls for the work; this module only wires it the
way `json.decoder.JSONDecoder` and `json.encoder.JSONEncoder` do, with their defaults. Where `_json` is
missing (not CPython), it is plain `json`.
"""
from __future__ import annotations

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes `_json.make_scanner` reads from a JSONDecoder."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


def _ws_end(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n\r":
        i += 1
    return i


def loads(data: bytes | str):
    if _json is None:
        import json
        return json.loads(data)
    s = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if s.startswith("\ufeff"):
        raise ValueError("unexpected UTF-8 BOM")
    scan = _json.make_scanner(_Context())
    try:
        obj, end = scan(s, _ws_end(s, 0))
        if _ws_end(s, end) == len(s):
            return obj
    except (StopIteration, ValueError, SystemError):
        # Bad JSON. `_json` builds its error from json.decoder only if that is already imported (else a
        # SystemError): let `json` itself parse it again and say what is wrong.
        pass
    import json
    return json.loads(s)


def _no_default(o):
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def dumps(obj, sort_keys: bool = False) -> str:
    """json.dumps(obj, sort_keys=sort_keys) with the other arguments at their defaults."""
    if _json is None:
        import json
        return json.dumps(obj, sort_keys=sort_keys)
    enc = _json.make_encoder({}, _no_default, _json.encode_basestring_ascii, None, ": ", ", ",
                             sort_keys, False, True)
    return "".join(enc(obj, 0))
