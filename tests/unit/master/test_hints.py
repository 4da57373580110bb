"""Hinted handoff (``dcache.master.hints``): newest hint per key, bounds, replay that keeps what changed meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dcache.master import hints as hints_module
from dcache.master.hints import Hints, replay_forever
from dcache.protocol import Op


def test_only_the_newest_hint_per_key_is_kept() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v10", 0, 10)
    h.add_set("a1", b"k", b"v5", 0, 5)  # older: ignored
    assert h.status() == {"a1": {"hints": 1, "overflowed": False}}
    h.add_delete("a1", b"k", 20)  # a newer delete replaces the set
    h.add_set("a1", b"other", b"x", 7, 3)
    h.add_set("a2", b"k", b"v", 0, 1)
    assert (h.count("a1"), h.count("a2"), h.count("a3"), h.total()) == (2, 1, 0, 3)
    assert "a1" in h and "a3" not in h and sorted(h.nodes) == ["a1", "a2"]
    assert h.hinted_total == 4


def test_drop_forgets_a_node() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v", 0, 1)
    h.drop("a1")
    h.drop("a1")  # idempotent
    assert "a1" not in h and h.total() == 0


@pytest.mark.parametrize("bound", ["count", "bytes"])
def test_past_the_bound_a_nodes_hints_are_dropped_and_it_needs_a_reconciliation(monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    if bound == "count":
        monkeypatch.setattr(hints_module, "MAX_HINTS_PER_NODE", 3)
    else:
        monkeypatch.setattr(hints_module, "MAX_HINT_BYTES", 100)
    overflowed: list[str] = []
    h = Hints(on_overflow=overflowed.append)
    for i in range(4):
        h.add_set("a1", b"key:%d" % i, b"v" * 30, 0, i + 1)
    h.add_set("a2", b"k", b"v", 0, 1)
    assert overflowed == ["a1"] and h.overflows_total == 1
    assert "a1" in h, "a node that lost hints must still not be read from"
    assert h.count("a1") == 0 and h.status()["a1"] == {"hints": 0, "overflowed": True}
    h.add_set("a1", b"later", b"v", 0, 9)  # nothing more is kept for it, and no second callback
    assert h.count("a1") == 0 and overflowed == ["a1"]
    assert h.count("a2") == 1


def test_replacing_a_hint_keeps_the_byte_count_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hints_module, "MAX_HINT_BYTES", 100)
    h = Hints()
    for version in range(1, 50):  # the same key, rewritten: never more than one hint's bytes
        h.add_set("a1", b"k", b"v" * 60, 0, version)
    assert h.count("a1") == 1 and h.overflows_total == 0


class Recorder:
    """A ``call(op, *args)`` that records what a replay sends; ``during`` runs inside the first call; the first ``failures`` calls raise ``fail``."""

    def __init__(self, during: Any = None, fail: BaseException | None = None, failures: int = 1_000_000) -> None:
        self.calls: list[tuple[int, list[Any]]] = []
        self.during = during
        self.fail = fail
        self.failures = failures

    async def __call__(self, op: int, items: list[Any]) -> int:
        self.calls.append((op, items))
        await asyncio.sleep(0)
        if self.during is not None:
            during, self.during = self.during, None
            during()
        if self.fail is not None and len(self.calls) <= self.failures:
            raise self.fail
        return len(items)


async def test_replay_sends_sets_and_deletes_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hints_module, "REPLAY_BATCH", 2)
    h = Hints()
    h.add_set("a1", b"k1", b"v1", 0, 1)
    h.add_delete("a1", b"k2", 2)
    h.add_set("a1", b"k3", b"v3", 5, 3)
    call = Recorder()
    assert await h.replay("a1", call) is True
    assert call.calls == [
        (Op.APPLY, [[b"k1", b"v1", 0, 1]]),
        (Op.APPLY_DELETES, [[b"k2", 2]]),
        (Op.APPLY, [[b"k3", b"v3", 5, 3]]),
    ]
    assert "a1" not in h and h.replayed_total == 3
    assert await h.replay("a1", call) is True  # nothing left: nothing sent
    assert len(call.calls) == 3


async def test_a_hint_replaced_or_added_during_a_replay_is_sent_too() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"old", 0, 1)

    def newer_write() -> None:
        h.add_set("a1", b"k", b"new", 0, 2)  # the key was written again while its batch was in flight
        h.add_set("a1", b"k2", b"v", 0, 3)

    call = Recorder(during=newer_write)
    assert await h.replay("a1", call) is True
    assert call.calls[0] == (Op.APPLY, [[b"k", b"old", 0, 1]])
    assert call.calls[1] == (Op.APPLY, [[b"k", b"new", 0, 2], [b"k2", b"v", 0, 3]])
    assert "a1" not in h


async def test_a_failed_replay_keeps_the_hints() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v", 0, 1)
    with pytest.raises(ConnectionError):
        await h.replay("a1", Recorder(fail=ConnectionError("lost")))
    assert h.count("a1") == 1
    assert await h.replay("a1", Recorder()) is True  # and a later one may run


async def test_only_one_replay_runs_per_node() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v", 0, 1)
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow_call(op: int, items: list[Any]) -> int:
        entered.set()
        await gate.wait()
        return len(items)

    async with asyncio.timeout(5):
        first = asyncio.ensure_future(h.replay("a1", slow_call))
        await entered.wait()
        second = Recorder()
        assert await h.replay("a1", second) is False  # one is running: this one leaves it alone
        assert second.calls == []
        gate.set()
        assert await first is True


async def test_a_node_dropped_during_its_replay_is_left_alone() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v", 0, 1)
    h.add_set("a1", b"k2", b"v", 0, 2)
    assert await h.replay("a1", Recorder(during=lambda: h.drop("a1"))) is False
    assert "a1" not in h


async def test_an_overflowed_node_is_not_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hints_module, "MAX_HINTS_PER_NODE", 1)
    h = Hints()
    h.add_set("a1", b"k1", b"v", 0, 1)
    h.add_set("a1", b"k2", b"v", 0, 2)
    call = Recorder()
    assert await h.replay("a1", call) is False
    assert call.calls == [] and "a1" in h


async def test_replay_forever_waits_until_the_node_is_usable_and_retries_failures() -> None:
    h = Hints()
    h.add_set("a1", b"k", b"v", 0, 1)
    checks = []

    def usable() -> bool:
        checks.append(1)
        return len(checks) >= 3  # unusable twice, then usable

    call = Recorder(fail=ConnectionError("the first attempt fails"), failures=1)
    async with asyncio.timeout(5):
        await replay_forever(h, "a1", call, usable, 0.001)
    assert "a1" not in h and len(checks) >= 3 and len(call.calls) == 2
