"""Service logs across hosts without a kernel: reading a task's log (tail, long lines, follow), the managers'
relay between a caller and an agent, and its refusals (each one line, changing nothing)."""
from __future__ import annotations

import asyncio
import json

import pytest

from netweft.daemon.tasklogs import prefix, read_log, tail_start
from netweft.errors import Forbidden, InvalidRequest, NotFound, Unavailable
from netweft.manager.auth import TooManyRequests
from netweft.manager.tasklogs import PER_NODE, Channel, LogRelay, parse_query
from netweft.model.services import Task
from netweft.model.tasklogs import LINE_MAX, LogRequest


def run(coro):
    return asyncio.run(coro)


async def collect(gen) -> list[str]:
    return [ln.text for batch in [b async for b in gen] for ln in batch]


@pytest.mark.parametrize("content,tail,want", [
    (b"a\nb\nc\n", 2, ["b", "c"]), (b"a\nb\nc", 2, ["b", "c"]), (b"a\nb\nc\n", 0, []),
    (b"a\nb\nc\n", 10, ["a", "b", "c"]), (b"a\nb\nc\n", -1, ["a", "b", "c"]), (b"", 3, []),
    (b"\n\nx\n", 2, ["", "x"]),
])
def test_tail(tmp_path, content, tail, want):
    p = tmp_path / "log"
    p.write_bytes(content)
    assert run(collect(read_log(str(p), tail, False, lambda: False))) == want


def test_tail_of_a_big_log_and_a_missing_one(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"".join(b"line %d\n" % i for i in range(200_000)))
    assert run(collect(read_log(str(p), 3, False, lambda: False))) == ["line 199997", "line 199998", "line 199999"]
    assert tail_start(str(tmp_path / "nope"), 5) == (0, 0)


def test_long_lines_are_split_and_bad_bytes_replaced(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"x" * (LINE_MAX * 2 + 5) + b"\n\xff\xfe ok\n")
    got = run(collect(read_log(str(p), -1, False, lambda: False)))
    assert [len(x) for x in got[:3]] == [LINE_MAX, LINE_MAX, 5] and got[3] == "\ufffd\ufffd ok"


def test_follow_sends_new_lines_until_the_container_stops(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"old\n")

    async def main():
        alive = [True]
        got = []

        async def writer():
            for i in range(3):
                await asyncio.sleep(0.05)
                with open(p, "ab") as f:
                    f.write(b"new %d\n" % i)
            with open(p, "ab") as f:
                f.write(b"last words")     # written just before it stopped, no newline
            alive[0] = False

        w = asyncio.ensure_future(writer())
        async for batch in read_log(str(p), 1, True, lambda: alive[0], poll=0.01):
            got += [ln.text for ln in batch]
        await w
        return got
    assert run(main()) == ["old", "new 0", "new 1", "new 2", "last words"]


def test_prefix_is_dockers():
    v = {"Name": "web.2.abcdefghijklmnopqrstuvwxy", "Node": "h3"}
    assert prefix(v, False) == "web.2.abcdefghijkl@h3"
    assert prefix(v, True) == "web.2.abcdefghijklmnopqrstuvwxy@h3"


def test_query_refusals():
    assert parse_query({}) == (-1, False)
    assert parse_query({"tail": "5", "follow": "1"}) == (5, True)
    for q, msg in (({"tail": "-3"}, "invalid tail"), ({"tail": "9" * 20}, "invalid tail"),
                   ({"tail": "1e3"}, "invalid tail"), ({"follow": "yes"}, "invalid follow")):
        with pytest.raises(InvalidRequest, match=msg):
            parse_query(q)


class State:
    def __init__(self, tasks):
        self.tasks = {t.id: t for t in tasks}

    def get(self, kind, key):
        return self.tasks.get(key) if kind == "tasks" else None


def relay_with(*tasks) -> LogRelay:
    st = State(list(tasks))
    return LogRelay(lambda: st)


def task(tid="t1", node="n2") -> Task:
    return Task(id=tid, service_id="s", service_name="web", slot=1, node_id=node)


def test_relay_refusals_change_nothing():
    async def main():
        r = relay_with(task(), task("t9", node=""))
        with pytest.raises(NotFound, match="task 'nope' not found"):
            r.open("nope", -1, False)
        with pytest.raises(NotFound, match="not on a node yet"):
            r.open("t9", -1, False)
        with pytest.raises(Unavailable, match="has no log channel to this manager; ask another manager"):
            r.open("t1", -1, False)
        assert r.pending == {}
        r.channels["n2"] = Channel("n2")
        ps = [r.open("t1", 10, False) for _ in range(PER_NODE)]
        with pytest.raises(TooManyRequests, match="too many log requests open for node"):
            r.open("t1", 10, False)
        assert len(r.pending) == PER_NODE
        sent = LogRequest(**{k: v for k, v in json.loads(r.channels["n2"].outbox.get_nowait()).items()
                             if k != "type"})
        assert sent.id == ps[0].id and sent.task == "t1" and sent.tail == 10
        p = ps[0]
        with pytest.raises(NotFound, match="is not open"):
            await r.answer("n2", "0" * 32, b'{"lines": []}')
        with pytest.raises(Forbidden, match="was sent to another node"):
            await r.answer("n3", p.id, b'{"lines": [{"text": "x"}]}')
        for bad in (b'{"lines": [{"text": "%s"}]}' % (b"x" * (LINE_MAX + 1)),
                    b'{"lines": [%s]}' % b",".join([b'{"text": "x"}'] * 10_001),
                    b'{"lines": [], "extra": 1}', b'{"lines": "no"}', b"not json"):
            with pytest.raises(InvalidRequest):
                await r.answer("n2", p.id, bad)
        assert p.batches.empty() and p.size == 0        # nothing was relayed
        assert (await r.answer("n2", p.id, b'{"lines": [{"text": "hello", "ts": "T"}]}')).more
        assert (await p.batches.get()).lines[0].text == "hello"
        assert not (await r.answer("n2", p.id, b'{"end": true}')).more
        r._end(p)                                         # the caller left: the agent is told to stop
        with pytest.raises(NotFound):
            await r.answer("n2", p.id, b'{"lines": []}')
    run(main())
