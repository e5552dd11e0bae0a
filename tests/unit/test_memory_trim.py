"""After many endpoint removals the daemon trims its heap once, when removals pause; a few removals don't."""
import asyncio

from netweft.daemon import memory


def make(monkeypatch):
    calls = []
    t = memory.Trimmer()
    t._trim = lambda pad: calls.append(pad)
    monkeypatch.setattr(memory, "QUIET", 0.05)
    return t, calls


def test_one_trim_after_a_burst_of_removals(monkeypatch):
    t, calls = make(monkeypatch)

    async def burst():
        for _ in range(200):
            t.released()
            await asyncio.sleep(0)
        assert calls == []          # still removing: not yet
        await asyncio.sleep(0.2)
    asyncio.run(burst())
    assert calls == [0] and t.trims == 1 and t.removed == 0


def test_few_removals_trim_nothing(monkeypatch):
    t, calls = make(monkeypatch)

    async def few():
        for _ in range(memory.MIN_REMOVED - 1):
            t.released()
        await asyncio.sleep(0.2)
    asyncio.run(few())
    assert calls == []


def test_outside_a_loop_nothing_is_scheduled(monkeypatch):
    t, calls = make(monkeypatch)
    t.released(1000)
    assert calls == []


def test_real_trim_runs_here():
    t = memory.Trimmer()
    t.trim()  # glibc here: must not raise
    assert t.trims == (1 if t._trim is not None else 0)


def test_a_burst_of_creations_is_trimmed_too(monkeypatch):
    t, calls = make(monkeypatch)

    async def burst():
        for _ in range(100):
            t.attached()
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
    asyncio.run(burst())
    assert calls == [0] and t.trims == 1
