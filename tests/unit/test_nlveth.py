"""nlveth's hand-packed messages, read back with pyroute2's decoders (an independent parser)."""
import ipaddress
import socket

from netweft.dataplane import nlveth
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg


def decode(cls, data: bytes):
    msg = cls(data)
    msg.decode()
    return msg


def test_veth_create_says_what_ip_link_add_would():
    data = nlveth.veth_create("nwv0123", "eth0", 7, "02:42:c6:12:00:05", 1450, 12)
    msg = decode(ifinfmsg, data)
    assert msg["header"]["type"] == nlveth.RTM_NEWLINK
    assert msg["header"]["flags"] & nlveth.NLM_F_EXCL and msg["header"]["flags"] & 0x400   # exclusive create
    assert msg["flags"] & nlveth.IFF_UP and msg["change"] & nlveth.IFF_UP
    assert (msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_MTU"), msg.get_attr("IFLA_MASTER")) == ("nwv0123", 1450, 12)
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert (peer.get_attr("IFLA_IFNAME"), peer.get_attr("IFLA_NET_NS_FD"), peer.get_attr("IFLA_ADDRESS"),
            peer.get_attr("IFLA_MTU")) == ("eth0", 7, "02:42:c6:12:00:05", 1450)


def test_port_flags_isolate_and_never_hairpin():
    msg = decode(ifinfmsg, nlveth.port_flags("nwg0123", True))
    info = msg.get_attr("IFLA_LINKINFO")
    assert msg.get_attr("IFLA_IFNAME") == "nwg0123" and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"
    data = info.get_attr("IFLA_INFO_SLAVE_DATA")
    assert data.get_attr("IFLA_BRPORT_ISOLATED") == 1 and data.get_attr("IFLA_BRPORT_MODE") == 0


def test_address_and_route_are_those_of_the_general_path():
    addr = decode(ifaddrmsg, nlveth.address_add(3, ipaddress.IPv4Interface("198.18.0.5/24")))
    assert (addr["family"], addr["prefixlen"], addr["index"]) == (socket.AF_INET, 24, 3)
    assert (addr.get_attr("IFA_LOCAL"), addr.get_attr("IFA_ADDRESS"), addr.get_attr("IFA_BROADCAST")) == \
        ("198.18.0.5", "198.18.0.5", "198.18.0.255")
    route = decode(rtmsg, nlveth.default_route(3, ipaddress.IPv4Address("198.19.0.1")))
    assert (route["dst_len"], route["table"], route["proto"], route["type"]) == (0, 254, 4, 1)
    assert route.get_attr("RTA_GATEWAY") == "198.19.0.1" and route.get_attr("RTA_OIF") == 3
