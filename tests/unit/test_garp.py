"""The ARP announcement frame (dataplane/garp.py)."""
import struct

import pytest
from hypothesis import given, strategies as st

from netweft.dataplane.garp import MAX_PER_CALL, Announcer, announcement


BRIDGE_MAC = b"\x02\x42\xc6\x12\x00\x01"


@given(st.ip_addresses(v=4), st.binary(min_size=6, max_size=6))
def test_announcement_is_a_broadcast_gratuitous_arp_reply_from_the_bridge(ip, hw):
    mac = ":".join(f"{b:02x}" for b in hw)
    frame = announcement(str(ip), mac, BRIDGE_MAC)
    assert len(frame) == 42
    dst, src, ethertype = frame[:6], frame[6:12], frame[12:14]
    # From the bridge's MAC: another bridge of the chain must not learn the endpoint behind its link.
    assert dst == b"\xff" * 6 and src == BRIDGE_MAC and ethertype == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    sha, spa, tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
    assert sha == tha == hw and spa == tpa == ip.packed


@pytest.mark.parametrize("ip, mac", [("198.18.0.2", "02:00:00:00:00"), ("198.18.0", "02:00:00:00:00:01"),
                                     ("198.18.0.2", "zz:00:00:00:00:01")])
def test_announcement_refuses_what_is_not_an_address(ip, mac):
    with pytest.raises(ValueError):
        announcement(ip, mac, BRIDGE_MAC)


class _Announcer(Announcer):
    def mac_of(self, ifname):
        return BRIDGE_MAC if ifname == "br0" else None


class _Sock:
    def __init__(self, fail_after=None):
        self.sent, self.fail_after = [], fail_after

    def sendto(self, frame, addr):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise OSError(19, "No such device")
        self.sent.append((frame, addr))


def test_announcer_bounds_each_call_and_stops_at_the_first_failure():
    sock = _Sock()
    assert _Announcer(sock).announce("nosuch0", [("198.18.0.2", "02:00:00:00:00:01")]) == 0
    n = _Announcer(sock).announce("br0", [(f"198.18.{i // 250}.{i % 250 + 1}", "02:00:00:00:00:01")
                                         for i in range(MAX_PER_CALL + 10)])
    assert n == MAX_PER_CALL == len(sock.sent) and sock.sent[0][1] == ("br0", 0)
    assert _Announcer(_Sock(fail_after=2)).announce("br0", [("198.18.0.2", "02:00:00:00:00:01")] * 5) == 2
