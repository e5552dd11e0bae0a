"""The store's transactions: atomic, re-entrant, with after-commit callbacks."""
import pytest

from netweft.errors import Conflict
from netweft.store.local import Store


def test_nested_transactions_commit_once_and_callbacks_follow(tmp_path):
    s = Store(str(tmp_path / "db"))
    seen = []
    with s.tx():
        s.put("networks", "a", "a", {"x": 1})
        with s.tx():
            s.put("networks", "b", "b", {"x": 2})
            s.on_commit(lambda: seen.append("b"))
        assert seen == []  # not before the outer commit
    assert seen == ["b"]
    assert [d["x"] for d in s.list("networks")] == [1, 2]


def test_rollback_discards_writes_and_callbacks(tmp_path):
    s = Store(str(tmp_path / "db"))
    seen = []
    with pytest.raises(RuntimeError):
        with s.tx():
            s.put("networks", "a", "a", {})
            with s.tx():
                s.on_commit(lambda: seen.append("never"))
            raise RuntimeError("refused")
    assert s.list("networks") == [] and seen == []
    with s.tx():
        s.put("networks", "c", "c", {})  # the store is usable after a rollback
    assert len(s.list("networks")) == 1


def test_documents_are_found_by_name_prefix_taken_literally(tmp_path):
    s = Store(str(tmp_path / "db"))
    with s.tx():
        for name in ("netweft/abc/n1", "netweft/abc/n2", "netweft/abcd/n1", "netweft/ab%/n1", "cni/abc/n1"):
            s.put("endpoints", name.replace("/", "-"), name, {"name": name})
    assert [d["name"] for d in s.with_name_prefix("endpoints", "netweft/abc/")] == ["netweft/abc/n1", "netweft/abc/n2"]
    assert [d["name"] for d in s.with_name_prefix("endpoints", "netweft/ab%/")] == ["netweft/ab%/n1"]
    assert s.with_name_prefix("endpoints", "docker/") == []


def test_an_id_prefix_is_taken_literally_and_case_sensitively(tmp_path):
    s = Store(str(tmp_path / "db"))
    with s.tx():
        s.put("containers", "abcdef01", "only", {"Id": "abcdef01"})
    assert s.find("containers", "abcd") == {"Id": "abcdef01"}
    for ref in ("%%%", "a%c", "___", "ab_d", "ABCD"):   # `netweft rm -f %%%` must not remove it
        assert s.find("containers", ref) is None, ref


def test_insert_never_replaces_a_document_of_that_id_or_name(tmp_path):
    s = Store(str(tmp_path / "db"))
    with s.tx():
        s.insert("endpoints", "e1", "netweft/c1/n1", {"id": "e1"})
    for id_, name in (("e2", "netweft/c1/n1"), ("e1", "netweft/c1/n2")):
        with pytest.raises(Conflict, match="already exists"):
            with s.tx():
                s.insert("endpoints", id_, name, {"id": id_})
    assert s.list("endpoints") == [{"id": "e1"}]


def test_containing_prefilters_inside_sqlite_in_insertion_order(tmp_path):
    s = Store(str(tmp_path / "db"))
    with s.tx():
        s.put("containers", "a", "a", {"Labels": {"com.docker.swarm.task.id": "t1"}})
        s.put("containers", "b", "b", {"Labels": {}})
        s.put("containers", "c", "c", {"Cmd": ["echo", "com.docker.swarm.task.id"]})
    got = s.containing("containers", '"com.docker.swarm.task.id"')
    assert [d.get("Labels") for d in got] == [{"com.docker.swarm.task.id": "t1"}, None]   # the caller checks
    assert s.containing("containers", "%") == []   # taken literally: not a LIKE pattern
