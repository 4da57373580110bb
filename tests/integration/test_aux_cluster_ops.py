"""Cluster ops against a real ``dcache aux`` process, over a raw connection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dcache.errors import Status
from dcache.protocol import Op
from dcache.ring import RING_SIZE, hash64, in_range
from tests.harness import DaemonProcess, start_aux
from tests.rawconn import RawConn

pytestmark = pytest.mark.slow

N_KEYS = 20_000


@pytest.fixture(scope="module")
def aux() -> Iterator[DaemonProcess]:
    node = start_aux(None, node_id="t-aux-cluster")
    yield node
    node.kill()


@pytest.fixture
def conn(aux: DaemonProcess) -> Iterator[RawConn]:
    c = RawConn(aux.host, aux.port, timeout=10.0)
    yield c
    c.close()


class Caller:
    def __init__(self, conn: RawConn) -> None:
        self.conn = conn
        self.rid = 0

    def raw(self, op: int, *args: Any) -> list[Any]:
        self.rid += 1
        rid, status, result = self.conn.call(op, self.rid, *args)
        assert rid == self.rid
        return [status, result]

    def ok(self, op: int, *args: Any) -> Any:
        status, result = self.raw(op, *args)
        assert status == Status.OK, result
        return result


def scan(c: Caller, ranges: list[list[int]], count: int, min_version: int = 0) -> tuple[dict[bytes, list[Any]], int]:
    got: dict[bytes, list[Any]] = {}
    cursor, pages = 0, 0
    while True:
        cursor, entries, tombs = c.ok(Op.SCAN, ranges, cursor, count, min_version)
        pages += 1
        assert len(entries) + len(tombs) <= count
        for key, value, expires_at, version in entries:
            assert key not in got
            got[key] = [value, expires_at, version]
        if not cursor:
            return got, pages


def test_versioned_ops_end_to_end(conn: RawConn) -> None:
    c = Caller(conn)
    assert c.ok(Op.SETV, b"e2e:a", b"1", 0, 0, 1000) == 1
    assert c.ok(Op.SETV, b"e2e:a", b"0", 0, 0, 999) == [2, 1000]  # superseded by the version it holds
    assert c.ok(Op.GETV, b"e2e:a") == [b"1", 0, 1000]
    assert c.ok(Op.GET, b"e2e:a") == b"1"
    assert c.ok(Op.DELV, b"e2e:a", 1001) is True
    assert c.ok(Op.APPLY, [[b"e2e:a", b"late", 0, 1000], [b"e2e:b", b"b", 0, 5]]) == 1
    assert c.ok(Op.MGETV, [b"e2e:a", b"e2e:b"]) == [None, [b"b", 0, 5]]
    assert c.ok(Op.INCRV, b"e2e:n", 3, 77) == [3, 0, 77]
    assert c.ok(Op.APPLY_DELETES, [[b"e2e:b", 6], [b"e2e:n", 78]]) == 2


def test_scan_20k_keys_in_pages(conn: RawConn) -> None:
    c = Caller(conn)
    keys = [b"scan:%d" % i for i in range(N_KEYS)]
    for i in range(0, N_KEYS, 5000):
        batch = [[k, b"v%d" % (i + j), 0, 10_000 + i + j] for j, k in enumerate(keys[i : i + 5000])]
        assert c.ok(Op.APPLY, batch) == len(batch)
    # about 45% of the circle in three arcs, one wrapping through 0
    ranges = [[1 << 61, 1 << 62], [1 << 63, (1 << 63) + (1 << 62)], [RING_SIZE - (1 << 61), 1 << 60]]
    expected = {k for k in keys if any(in_range(hash64(k), s, e) for s, e in ranges)}
    assert 0 < len(expected) < N_KEYS
    got, pages = scan(c, ranges, count=500)
    assert set(got) == expected
    assert pages >= len(expected) // 500
    for k in list(expected)[:50]:
        i = keys.index(k)
        assert got[k] == [b"v%d" % i, 0, 10_000 + i]
    everything, pages = scan(c, [[0, 0]], count=1000)
    assert set(everything) >= set(keys) and pages >= N_KEYS // 1000
    newer, _ = scan(c, [[0, 0]], count=1000, min_version=10_000 + N_KEYS - 100)
    assert set(newer) == set(keys[-100:])
    assert c.ok(Op.RANGE_COUNT, ranges) == len(expected)
    # DROP the ranges, in several bounded calls
    cursor, dropped = 0, 0
    while True:
        cursor, n = c.ok(Op.DROP, ranges, cursor)
        dropped += n
        if not cursor:
            break
    assert dropped == len(expected)
    assert c.ok(Op.RANGE_COUNT, ranges) == 0
    assert c.ok(Op.RANGE_COUNT, [[0, 0]]) >= N_KEYS - len(expected)


def test_bad_arguments_keep_the_connection_usable(conn: RawConn) -> None:
    c = Caller(conn)
    bad: list[tuple[Any, ...]] = [
        (Op.SCAN, [[0, 0]], (12345 << 32) | 1, 10, 0),
        (Op.SCAN, [[0]], 0, 10, 0),
        (Op.SCAN, [[0, 0]], 0, 0, 0),
        (Op.GETV, 12),
        (Op.SETV, b"k", b"v", 0, 0),
        (Op.SETV, b"k", b"v", 0, 9, 1),
        (Op.DELV, b"k", 0),
        (Op.APPLY, [[b"k", b"v", 0]]),
        (Op.DROP, "x", 0),
        (Op.RANGE_COUNT, [[1, 2, 3]]),
    ]
    for op, *args in bad:
        status, message = c.raw(op, *args)
        assert status == Status.BAD_ARGUMENTS, (op, message)
        assert isinstance(message, str) and message
    status, message = c.raw(Op.SCAN, [[0, 0]], (12345 << 32) | 1, 10, 0)
    assert "scan cursor expired" in message
    status, message = c.raw(Op.INCRV, b"e2e:s", 1, 1)
    assert status == Status.OK
    c.ok(Op.SETV, b"e2e:s", b"x", 0, 0, 5)
    assert c.raw(Op.INCRV, b"e2e:s", 1, 6)[0] == Status.NOT_AN_INTEGER
    assert c.ok(Op.PING) == "PONG"
