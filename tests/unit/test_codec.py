"""The codec turns every kind of bad input into one InvalidRequest line: wrong JSON, types, values, depth."""
import pytest

from netweft.errors import InvalidRequest
from netweft.model.api import NetworkCreate
from netweft.model.codec import convert, decode
from netweft.model.objects import Peer


@pytest.mark.parametrize("body, words", [
    (b'{"Name": 5}', "$.Name"),
    (b'{"Name": "a", "IPAM": "x"}', "$.IPAM"),
    (b'{"Name": "a", "Internal": "yes"}', "$.Internal"),
    (b'{"Name": "a", "Labels": {"a": 1}}', "$.Labels"),
    (b'{"Name": "a"', "not valid JSON"),
    (b"[" * 70000, "Expected `object`"),
    (b'{"Name": "a", "Unused": ' + b"[" * 70000 + b"]" * 70000 + b"}", "nested too deeply"),
])
def test_bad_bodies_are_one_line_naming_what_is_wrong(body, words):
    with pytest.raises(InvalidRequest) as e:
        decode(body, NetworkCreate)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_patterns_read_as_words_and_match_whole_strings():
    with pytest.raises(InvalidRequest, match=r"Expected an IPv4 address - at `\$.vtep`"):
        decode(b'{"ip": "198.18.0.2", "mac": "02:00:00:00:00:01", "vtep": "192.0.2.256"}', Peer)
    with pytest.raises(InvalidRequest, match="IPv4 address"):
        convert({"ip": "198.18.0.2\n", "mac": "02:00:00:00:00:01", "vtep": "192.0.2.1"}, Peer)
    assert convert({"ip": "198.18.0.2", "mac": "02:00:00:00:00:01", "vtep": "192.0.2.1"}, Peer).vtep == "192.0.2.1"
