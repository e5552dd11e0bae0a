"""Service VIPs: the element-by-element nftables diff (dataplane/vip.py), what a host balances (agent/vip.py)."""
from __future__ import annotations

import asyncio

import pytest

from netweft.agent.vip import namespace_vips, network_vips
from netweft.dataplane import vip
from netweft.dataplane.fake import FakeDataPlane
from netweft.errors import InvalidRequest
from netweft.model.objects import Endpoint, Owner


def test_slots_keep_survivors_in_place_and_fill_holes_from_the_end():
    assert vip.slots((), ("a", "b")) == ("a", "b")
    assert vip.slots(("a", "b", "c"), ("a", "c")) == ("a", "c")          # b's slot taken by c
    assert vip.slots(("a", "b", "c"), ("b", "c")) == ("c", "b")          # b stays in slot 1
    assert vip.slots(("a", "b"), ("a", "b", "d")) == ("a", "b", "d")


def ops(cmds):
    return [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in cmds]


def test_a_new_vip_then_one_backend_less_changes_only_elements_and_one_rule():
    text, cmds, res = vip.plan_sync({}, {"198.18.0.2": ("198.18.0.5", "198.18.0.6", "198.18.0.7")}, False)
    assert any("typeof numgen" in t for t in text) and res == {"198.18.0.2": ("198.18.0.5", "198.18.0.6",
                                                                              "198.18.0.7")}
    assert ("add", "map") in ops(cmds) and ("add", "element") in ops(cmds)
    # 198.18.0.6 goes: slot 1 gets the last one, slot 2 is deleted, the rule says mod 2. No table, map or
    # chain is made or removed.
    text, cmds, res = vip.plan_sync(res, {"198.18.0.2": ("198.18.0.5", "198.18.0.7")}, True)
    assert text == [] and res == {"198.18.0.2": ("198.18.0.5", "198.18.0.7")}
    assert ops(cmds) == [("delete", "element"), ("flush", "chain"), ("add", "element"), ("add", "rule")]
    assert cmds[0]["delete"]["element"]["elem"] == [1, 2]
    assert cmds[2]["add"]["element"]["elem"] == [[1, "198.18.0.7"]]
    assert cmds[3]["add"]["rule"]["expr"][0]["dnat"]["addr"]["map"]["key"]["numgen"]["mod"] == 2
    # Unchanged: nothing to do. All gone: the rule rejects.
    assert vip.plan_sync(res, res, True)[:2] == ([], [])
    _, cmds, _ = vip.plan_sync(res, {"198.18.0.2": ()}, True)
    assert cmds[-1]["add"]["rule"]["expr"] == [{"reject": None}]
    # The VIP goes: its element, chain and map only.
    _, cmds, res = vip.plan_sync(res, {}, True)
    assert ops(cmds) == [("delete", "element"), ("flush", "chain"), ("delete", "chain"), ("delete", "map")]


def test_listing_is_read_back_in_slot_order():
    doc = {"nftables": [{"map": {"name": "vips", "elem": [["198.18.0.2", {"goto": {"target": "svc-c6120002"}}]]}},
                        {"map": {"name": "be-c6120002", "elem": [[1, "198.18.0.7"], [0, "198.18.0.5"]]}}]}
    assert vip.parse_listing(doc) == (True, {"198.18.0.2": ("198.18.0.5", "198.18.0.7")})
    assert vip.parse_listing({"nftables": []}) == (False, {})


@pytest.mark.parametrize("bad", [{"x": ("198.18.0.5",)}, {"198.18.0.2": ("nope",)},
                                 {"198.18.0.2": ("198.18.0.5", "198.18.0.5")}])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(InvalidRequest):
        vip.check(bad)


def ep(ip, kind="netweft", name="", aliases=(), netns="", net="n1"):
    return Endpoint(id=ip.replace(".", ""), network_id=net, ip=ip, prefix_len=24, mac="02:42:c6:12:00:01",
                    owner=Owner(kind=kind, id="x" + ip, name=name), aliases=list(aliases), sandbox_key=netns)


def test_a_networks_vips_and_backends():
    eps = [ep("198.18.0.2", "service", "web"), ep("198.18.0.9", "service", "db"),
           ep("198.18.0.5", aliases=["tasks.web"]), ep("198.18.0.4", aliases=["tasks.web"]),
           ep("198.18.0.6", aliases=["other"])]
    per = network_vips(eps)
    assert per == {"198.18.0.2": ("198.18.0.4", "198.18.0.5"), "198.18.0.9": ()}
    local = [ep("198.18.0.6", netns="/run/x/a"), ep("198.18.1.6", netns="/run/x/a", net="n2"),
             ep("198.18.0.7", netns="/run/x/b", net="n3")]
    assert namespace_vips(local, {"n1": per, "n2": {"198.18.1.2": ("198.18.1.5",)}}) == {
        "/run/x/a": {**per, "198.18.1.2": ("198.18.1.5",)}, "/run/x/b": {}}


def test_fake_dataplane_sync_vips():
    async def main():
        dp = FakeDataPlane()
        await dp.create_netns("/run/x/a")
        assert await dp.sync_vips("/run/x/a", {"198.18.0.2": ("198.18.0.5",)}) > 0
        assert await dp.sync_vips("/run/x/a", {"198.18.0.2": ("198.18.0.5",)}) == 0
        assert dp.vips["/run/x/a"] == {"198.18.0.2": ("198.18.0.5",)}
        await dp.delete_netns("/run/x/a")
        assert "/run/x/a" not in dp.vips
        from netweft.errors import KernelError
        with pytest.raises(KernelError):
            await dp.sync_vips("/run/x/a", {})
    asyncio.run(main())


def test_the_balancer_does_nothing_without_vips_and_programs_them_once_there_are():
    """No service endpoint anywhere and nothing programmed: a sync touches no namespace (a run or rm on a network
    of thousands of plain containers costs no more than a look per endpoint); a VIP appearing is programmed, and
    its going is cleared."""
    from types import SimpleNamespace

    from netweft.agent.vip import ServiceBalancer

    class Dp:
        def __init__(self):
            self.calls = []

        async def sync_vips(self, path, vips):
            self.calls.append((path, vips))
            return 1

    local = {e.id: e for e in (ep("198.18.0.5", netns="/run/x/a"), ep("198.18.0.6", netns="/run/x/b"))}
    net = SimpleNamespace(endpoints=dict(local))
    agent = SimpleNamespace(local=local, nets={"n1": net})
    dp = Dp()
    b = ServiceBalancer(dp)
    assert asyncio.run(b.sync(agent)) == 0 and dp.calls == []
    vip_ep = ep("198.18.0.2", "service", "web")
    net.endpoints[vip_ep.id] = vip_ep
    assert asyncio.run(b.sync(agent)) == 2
    assert sorted(dp.calls) == [("/run/x/a", {"198.18.0.2": ()}), ("/run/x/b", {"198.18.0.2": ()})]
    del net.endpoints[vip_ep.id]
    dp.calls.clear()
    assert asyncio.run(b.sync(agent)) == 2 and sorted(dp.calls) == [("/run/x/a", {}), ("/run/x/b", {})]
    dp.calls.clear()
    assert asyncio.run(b.sync(agent)) == 0 and dp.calls == []
