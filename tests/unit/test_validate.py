"""validate: what operators type, judged without I/O. Every refusal is one line naming the thing."""
import pytest

from netweft import validate
from netweft.errors import InvalidRequest


@pytest.mark.parametrize("name", ["web\n", "web\r\n", "\nweb", "we\nb", "web ", "web\x00"])
def test_names_are_matched_whole(name):
    with pytest.raises(InvalidRequest, match="invalid network name"):
        validate.check_name(name, "network")


@pytest.mark.parametrize("name", ["foo.example.com\n", "host\n", "a..b", "a.-b", "x" * 65])
def test_hostnames_are_matched_whole(name):
    with pytest.raises(InvalidRequest, match="invalid hostname"):
        validate.check_hostname(name)


@pytest.mark.parametrize("name", ["eth0\n", "", "x" * 16, "a/b"])
def test_interface_names_are_matched_whole(name):
    with pytest.raises(InvalidRequest, match="interface name"):
        validate.check_ifname(name, "bridge name")


def test_known_driver_options_pass():
    assert validate.check_driver_options("bridge", {validate.MTU_OPT: "1400", validate.BRIDGE_NAME_OPT: "br-x",
                                                    validate.PARENT_OPT: "eth1"})
    assert validate.check_driver_options("overlay", {validate.MTU_OPT: "1400", validate.VXLANID_OPT: "4097",
                                                     validate.ENCRYPTED_OPT: ""})
    assert validate.check_driver_options("bridge", {}) == {}


@pytest.mark.parametrize("driver,options", [
    ("bridge", {"foo": "bar"}),
    ("bridge", {"foo": ""}),                       # `-o foo`
    ("bridge", {validate.VXLANID_OPT: "5000"}),    # an overlay option on a bridge
    ("overlay", {validate.PARENT_OPT: "eth1"}),    # a bridge option on an overlay
    ("overlay", {"com.docker.network.driver.mtu ": "1400"}),
])
def test_unknown_driver_options_are_refused_with_the_known_ones(driver, options):
    with pytest.raises(InvalidRequest) as e:
        validate.check_driver_options(driver, options)
    msg = str(e.value)
    assert "\n" not in msg and f"unknown {driver} driver option" in msg
    assert repr(next(iter(options))) in msg
    for known in validate.DRIVER_OPTIONS[driver]:
        assert known in msg


def test_several_unknown_options_are_all_named():
    with pytest.raises(InvalidRequest, match="options 'a', 'b':"):
        validate.check_driver_options("bridge", {"b": "1", "a": "2"})


def test_unknown_driver_is_refused():
    with pytest.raises(InvalidRequest, match="unknown driver 'macvlan'"):
        validate.check_driver_options("macvlan", {})


@pytest.mark.parametrize("driver,options,words", [
    ("bridge", {validate.MTU_OPT: "67"}, "MTU"),
    ("overlay", {validate.MTU_OPT: "x"}, "MTU"),
    ("bridge", {validate.BRIDGE_NAME_OPT: "a-very-long-bridge-name"}, "bridge name"),
    ("bridge", {validate.BRIDGE_NAME_OPT: ""}, "bridge name"),
    ("bridge", {validate.PARENT_OPT: ""}, "parent needs an interface name"),
    ("bridge", {validate.PARENT_OPT: "eth1\n"}, "parent interface"),
    ("overlay", {validate.VXLANID_OPT: "0"}, "VXLAN ID"),
    ("overlay", {validate.VXLANID_OPT: "16777216"}, "VXLAN ID"),
    ("overlay", {validate.VXLANID_OPT: "abc"}, "VXLAN ID"),
])
def test_bad_option_values_are_refused(driver, options, words):
    with pytest.raises(InvalidRequest, match=words):
        validate.check_driver_options(driver, options)


def test_loopback_parent_says_what_is_wrong_with_it():
    with pytest.raises(InvalidRequest) as e:
        validate.check_driver_options("bridge", {validate.PARENT_OPT: "lo"})
    assert "loopback" in str(e.value) and "cannot be a bridge port" in str(e.value)


def test_parent_link_facts():
    validate.check_parent_link("eth1", None, None)
    validate.check_parent_link("eth1.10", "vlan", None)
    with pytest.raises(InvalidRequest, match="loopback"):
        validate.check_parent_link("lo2", "dummy", None, loopback=True)
    with pytest.raises(InvalidRequest, match="itself a bridge"):
        validate.check_parent_link("br0", "bridge", None)
    with pytest.raises(InvalidRequest, match="already a port of 'br0'.*nomaster"):
        validate.check_parent_link("eth1", None, "br0")


@pytest.mark.parametrize("text", ["192.0.2.10", "198.51.100.1", "10.0.0.1"])
def test_node_address_accepts_unicast_ipv4(text):
    assert validate.parse_node_address(text, "advertise address") == text


@pytest.mark.parametrize("text,words", [
    ("5", "expected an IPv4 address"), ("", "expected an IPv4 address"), ("eth0", "expected an IPv4 address"),
    ("192.0.2.10\n", "expected an IPv4 address"), ("01.2.3.4", "expected an IPv4 address"),
    ("fe80::1", "expected an IPv4 address"), (5, "expected an IPv4 address"),
    ("0.0.0.0", "cannot reach"), ("127.0.0.1", "cannot reach"), ("224.0.0.1", "cannot reach"),
    ("255.255.255.255", "cannot reach"),
])
def test_node_address_refuses_what_other_hosts_cannot_reach(text, words):
    with pytest.raises(InvalidRequest, match=words):
        validate.parse_node_address(text, "advertise address")


@pytest.mark.parametrize("mac, words", [("00:00:00:00:00:00", "all zeros"), ("ff:ff:ff:ff:ff:ff", "broadcast"),
                                        ("01:00:5e:00:00:01", "multicast")])
def test_the_data_plane_refuses_macs_that_are_no_hosts(mac, words):
    from netweft.dataplane import checks
    with pytest.raises(InvalidRequest, match=words) as e:
        checks.parse_mac(mac)
    assert "\n" not in str(e.value)


def test_peers_whose_mac_is_no_hosts_are_left_out_of_the_peer_tables():
    # A zero MAC in the FDB is the VXLAN default destination: one such record would take the network's
    # flooding. Left out (not refused), so the network's other peers are still programmed.
    from netweft.dataplane import checks
    from netweft.model.objects import Peer
    good = Peer("198.18.0.2", "02:42:c6:12:00:02", "192.0.2.1")
    bad = [Peer("198.18.0.3", m, "192.0.2.66") for m in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff",
                                                         "01:00:5e:00:00:01")]
    assert checks.check_peers([good, *bad]) == [good]
    assert checks.peer_tables(checks.check_peers([good, *bad])) == ({good.ip: good.mac}, {good.mac: good.vtep})
    with pytest.raises(InvalidRequest):  # malformed is still refused
        checks.check_peers([Peer("198.18.0.4", "02:42", "192.0.2.1")])


@pytest.mark.parametrize("text", ["+12", " 12", "1_2", "12 ", "", "9" * 5000, "٣"])
def test_vxlan_ids_are_digits_only(text):
    with pytest.raises(InvalidRequest, match="invalid VXLAN ID") as e:
        validate.parse_vni(text)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_unknown_option_lists_are_bounded():
    with pytest.raises(InvalidRequest) as e:
        validate.check_driver_options("overlay", {f"{i}" + "x" * 1000: "" for i in range(50)})
    assert len(str(e.value)) < 600 and str(e.value).count("'") == 10
