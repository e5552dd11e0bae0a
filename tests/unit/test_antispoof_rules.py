"""The anti-spoofing rules as libnftables JSON (dataplane/antispoof.py): what a port may send, that a port is a few
set elements (never a chain), refusals of malformed arguments before anything is sent, what one namespace's context
remembers (read from the kernel once), and the list of guarded ports read back."""
import pytest

from netweft.dataplane import antispoof
from netweft.errors import InvalidRequest, KernelError

MAC, IP = "02:42:c6:12:00:03", "198.18.0.3"


def verbs(cmds):
    return [next(iter(c)) + ":" + next(iter(next(iter(c.values())))) for c in cmds]


def test_the_rules_accept_only_a_ports_own_mac_and_address_and_drop_the_rest():
    cmds = antispoof.render_base()["nftables"]
    rules = [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})
             and c["add"]["rule"]["chain"] == "guard"]
    assert len(rules) == 3 and rules[-1] == [{"drop": None}]
    ip_rule, arp_rule = rules[0], rules[1]
    assert ip_rule[0]["match"]["right"] == "ip" and arp_rule[0]["match"]["right"] == "arp"
    assert ip_rule[1]["match"]["left"]["concat"][1:] == [{"payload": {"protocol": "ether", "field": "saddr"}},
                                                         {"payload": {"protocol": "ip", "field": "saddr"}}]
    assert ip_rule[1]["match"]["right"] == "@ip_ok" and ip_rule[-1] == {"accept": None}
    assert [p.get("payload", p.get("meta")) for p in arp_rule[1]["match"]["left"]["concat"]] == [
        {"key": "iifname"}, {"protocol": "ether", "field": "saddr"}, {"protocol": "arp", "field": "saddr ether"},
        {"protocol": "arp", "field": "saddr ip"}]
    hook = [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})
            and c["add"]["rule"]["chain"] == "prerouting"]
    assert hook == [[{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]]
    # Both chains are flushed before their rules: writing the base twice leaves one set of rules.
    names = verbs(cmds)
    assert names.count("flush:chain") == 2 and names.index("flush:chain") < names.index("add:rule")


def test_a_port_is_elements_of_sets_never_a_chain():
    cmds = antispoof.render_add_port("nwv0123", MAC.upper(), IP)["nftables"]
    assert verbs(cmds) == ["add:element"] * 3
    elems = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in cmds}
    assert elems == {"ip_ok": [{"concat": ["nwv0123", MAC, IP]}],
                     "arp_ok": [{"concat": ["nwv0123", MAC, MAC, IP]}, {"concat": ["nwv0123", MAC, MAC, "0.0.0.0"]}],
                     "ports": [["nwv0123", {"jump": {"target": "guard"}}]]}
    # Removing it is the same elements (and the map's), in one transaction.
    out = antispoof.render_delete_port("nwv0123", (MAC, IP))["nftables"]
    assert verbs(out) == ["delete:element"] * 3
    assert out[0]["delete"]["element"] == {"family": "bridge", "table": "netweft_as", "name": "ports",
                                           "elem": ["nwv0123"]}


def test_a_port_given_new_addresses_loses_its_old_ones_in_the_same_transaction():
    old = ("02:42:c6:12:00:09", "198.18.0.9")
    cmds = antispoof.render_add_port("nwv1", MAC, IP, old=old, was_guarded=True)["nftables"]
    assert verbs(cmds) == ["delete:element"] * 3 + ["add:element"] * 3
    assert cmds[1]["delete"]["element"]["elem"] == [{"concat": ["nwv1", *old]}]
    # The same addresses again: nothing is removed.
    assert verbs(antispoof.render_add_port("nwv1", MAC, IP, old=(MAC, IP), was_guarded=True)["nftables"]) == \
        ["add:element"] * 3


def test_a_port_of_the_former_layout_loses_its_chain_after_its_map_element():
    cmds = antispoof.render_add_port("nwv1", MAC, IP, old=None, was_guarded=True)["nftables"]
    assert verbs(cmds)[:2] == ["delete:element", "delete:chain"]
    assert cmds[1]["delete"]["chain"]["name"] == "p_nwv1"
    assert verbs(antispoof.render_delete_port("nwv1", None)["nftables"]) == ["delete:element", "delete:chain"]


@pytest.mark.parametrize("port, mac, ip", [("a/b", MAC, IP), ("nwv1", "ff:ff:ff:ff:ff:ff", IP),
                                           ("nwv1", MAC, "198.18.0.300"), ("x" * 16, MAC, IP)])
def test_malformed_arguments_are_refused_before_anything_runs(port, mac, ip):
    ran = []
    with pytest.raises(InvalidRequest):
        antispoof.add_port(lambda cmd, what: ran.append(cmd), antispoof.Guarded(), port, mac, ip)
    assert ran == []


class FakeNft:
    """A namespace's table as far as the renderers touch it: the map's ports and the address set."""

    def __init__(self):
        self.table = False
        self.ports: dict[str, str] = {}            # port -> jump target
        self.addresses: dict[str, tuple] = {}      # port -> (mac, ip)
        self.ran: list[str] = []

    def __call__(self, cmd, what):
        cmds = cmd["nftables"]
        kinds = verbs(cmds)
        self.ran.append(",".join(sorted(set(kinds))))
        if kinds[0] == "list:map" or kinds[0] == "list:set":
            if not self.table:
                raise KernelError(f"{what}: No such file or directory")
            if kinds[0] == "list:map":
                return {"nftables": [{"map": {"name": "ports", "elem": [[p, {"jump": {"target": t}}]
                                                                        for p, t in self.ports.items()]}}]}
            return {"nftables": [{"set": {"name": "ip_ok", "elem": [{"concat": [p, *e]}
                                                                    for p, e in self.addresses.items()]}}]}
        if "add:table" in kinds:
            self.table = True
        if not self.table:
            raise KernelError(f"{what}: No such file or directory")
        for c in cmds:
            verb, body = next(iter(c.items()))
            if "element" not in body:
                continue
            el = body["element"]
            key = el["elem"][0]
            key = key[0] if isinstance(key, list) else key      # a map element: [port, verdict]
            port = key if isinstance(key, str) else key["concat"][0]
            if el["name"] == "ports":
                if verb == "delete" and port not in self.ports:
                    raise KernelError(f"{what}: Could not process rule: No such file or directory")
                if verb == "delete":
                    del self.ports[port]
                else:
                    self.ports[port] = "guard"
            elif el["name"] == "ip_ok":
                if verb == "delete":
                    self.addresses.pop(port)
                else:
                    self.addresses[port] = tuple(key["concat"][1:])


def test_a_context_reads_the_kernel_once_then_changes_only_the_port():
    nft, g = FakeNft(), antispoof.Guarded()
    antispoof.add_port(nft, g, "nwv1", MAC, IP)
    assert nft.ran == ["list:map", "add:chain,add:element,add:map,add:rule,add:set,add:table,flush:chain"]
    nft.ran.clear()
    antispoof.add_port(nft, g, "nwv2", "02:42:c6:12:00:04", "198.18.0.4")
    antispoof.delete_port(nft, g, "nwv1")
    antispoof.delete_port(nft, g, "nwv1")      # not guarded any more: nothing to do, nothing read
    antispoof.delete_port(nft, g, "nwv9")
    assert nft.ran == ["add:element", "delete:element"]
    assert nft.ports == {"nwv2": "guard"} and g.known == {"nwv2": ("02:42:c6:12:00:04", "198.18.0.4")}


def test_after_a_restart_the_addresses_to_remove_are_read_from_the_kernel():
    nft = FakeNft()
    antispoof.add_port(nft, antispoof.Guarded(), "nwv1", MAC, IP)
    nft.ran.clear()
    antispoof.delete_port(nft, antispoof.Guarded(), "nwv1")
    assert nft.ran == ["list:map", "list:set", "delete:element"]
    assert nft.ports == {} and nft.addresses == {}


def test_a_table_removed_behind_the_contexts_back_is_written_again():
    nft, g = FakeNft(), antispoof.Guarded()
    antispoof.add_port(nft, g, "nwv1", MAC, IP)
    nft.table, nft.ports, nft.addresses = False, {}, {}     # `nft flush ruleset` by someone
    antispoof.add_port(nft, g, "nwv1", MAC, IP)
    assert nft.table and nft.ports == {"nwv1": "guard"} and nft.addresses == {"nwv1": (MAC, IP)}
    nft.ports, nft.addresses = {}, {}
    antispoof.delete_port(nft, g, "nwv1")      # gone already: fine
    assert g.known == {}


def test_deleting_what_is_not_there_is_fine_and_other_refusals_are_not():
    def missing(cmd, what):
        raise KernelError(f"{what}: Could not process rule: No such file or directory")
    antispoof.delete_port(missing, antispoof.Guarded(), "nwv1")
    assert antispoof.list_ports(missing) == []

    def broken(cmd, what):
        raise KernelError(f"{what}: Operation not permitted")
    with pytest.raises(KernelError):
        antispoof.delete_port(broken, antispoof.Guarded(), "nwv1")
    g = antispoof.Guarded()
    g.loaded, g.known = True, {"nwv1": (MAC, IP)}
    with pytest.raises(KernelError):
        antispoof.delete_port(broken, g, "nwv1")
    assert g.known == {"nwv1": (MAC, IP)}     # still guarded as far as anyone can tell


def test_the_guarded_ports_are_read_from_the_map():
    out = {"nftables": [{"metainfo": {}}, {"map": {"name": "ports", "elem": [
        ["nwv2", {"jump": {"target": "guard"}}], ["nwv1", {"jump": {"target": "p_nwv1"}}]]}}]}
    assert antispoof.parse_list(out) == ["nwv1", "nwv2"]
    assert antispoof.parse_list({"nftables": [{"map": {"name": "ports"}}]}) == []
    addresses = {"nftables": [{"set": {"name": "ip_ok", "elem": [{"concat": ["nwv2", MAC, IP]},
                                                                 {"concat": ["nwv7", MAC, IP]}, "junk"]}}]}
    # nwv1 is of the former layout (its own chain); nwv7 has addresses but no map element: not guarded.
    assert antispoof.parse_known(out, addresses) == {"nwv1": None, "nwv2": (MAC, IP)}
    assert antispoof.parse_known(out, None) == {"nwv1": None}


def test_many_ports_are_unguarded_in_one_transaction():
    nft, g = FakeNft(), antispoof.Guarded()
    for i in range(5):
        antispoof.add_port(nft, g, f"nwv{i}", f"02:42:c6:12:00:0{i}", f"198.18.0.{10 + i}")
    nft.ran.clear()
    antispoof.delete_ports(nft, g, ["nwv1", "nwv3", "nwv1", "nwv9"])   # twice, and one never guarded
    assert nft.ran == ["delete:element"]
    assert sorted(nft.ports) == ["nwv0", "nwv2", "nwv4"] and sorted(g.known) == ["nwv0", "nwv2", "nwv4"]
    antispoof.delete_ports(nft, g, ["nwv1"])   # nothing left to do: nothing runs
    assert nft.ran == ["delete:element"]


def test_ports_removed_behind_the_contexts_back_are_unguarded_one_by_one_after_a_fresh_read():
    nft, g = FakeNft(), antispoof.Guarded()
    for i in range(3):
        antispoof.add_port(nft, g, f"nwv{i}", f"02:42:c6:12:00:0{i}", f"198.18.0.{10 + i}")
    del nft.ports["nwv1"], nft.addresses["nwv1"]   # by someone else: the transaction would be refused whole
    antispoof.delete_ports(nft, g, ["nwv0", "nwv1", "nwv2"])
    assert nft.ports == {} and nft.addresses == {} and g.known == {}


def test_unguarding_many_refuses_a_malformed_port_before_anything_runs():
    nft, g = FakeNft(), antispoof.Guarded()
    antispoof.add_port(nft, g, "nwv1", MAC, IP)
    nft.ran.clear()
    with pytest.raises(InvalidRequest):
        antispoof.delete_ports(nft, g, ["nwv1", "a/b"])
    assert nft.ran == [] and "nwv1" in nft.ports
