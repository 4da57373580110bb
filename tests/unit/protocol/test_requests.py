"""RequestTable (``dcache.protocol.requests``): ids, answers and the deadlines of its two lanes."""

from __future__ import annotations

import pytest

from dcache.protocol import RequestTable


def test_ids_wrap_and_skip_the_ones_in_flight() -> None:
    t: RequestTable[str] = RequestTable(max_id=3)
    assert [t.add("a"), t.add("b"), t.add("c")] == [1, 2, 3]
    assert t.pop(2) == "b"
    assert t.add("d") == 2  # wrapped past 3, skipped 1 (in flight)
    with pytest.raises(RuntimeError):
        t.add("e")
    assert t.pop(99) is None and t.pop([1]) is None  # unknown, or not even hashable


def test_each_lane_expires_in_its_own_order() -> None:
    """A late request (a change the peer may hold back) does not delay the timeout of a prompt one sent after it."""
    t: RequestTable[str] = RequestTable()
    write = t.add("write", 10.0, late=True)
    read = t.add("read", 2.0)
    assert t.oldest_deadline() == 2.0 and t.oldest_deadline(late=True) == 10.0
    assert t.expired(1.9) == []
    assert t.expired(2.0) == [(read, "read")]
    assert t.oldest_deadline() is None and len(t) == 1
    assert t.expired(9.9) == []
    assert t.expired(10.0) == [(write, "write")]
    assert t.oldest_deadline(late=True) is None and len(t) == 0


def test_answered_requests_leave_both_lanes() -> None:
    t: RequestTable[str] = RequestTable()
    a = t.add("a", 1.0)
    b = t.add("b", 5.0, late=True)
    c = t.add("c", 6.0, late=True)
    t.pop(a)
    t.pop(b)
    assert t.oldest_deadline() is None and t.oldest_deadline(late=True) == 6.0
    assert t.expired(100.0) == [(c, "c")]
    t.add("d", 1.0)
    t.add("e", 2.0, late=True)
    assert sorted(t.drain()) == ["d", "e"]
    assert t.expired(100.0) == [] and t.oldest_deadline() is None and t.oldest_deadline(late=True) is None
