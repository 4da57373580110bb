"""Cluster ops of the aux node, driven in-process through ``AuxNode.handlers``."""

from __future__ import annotations

import random
import time
from typing import Any, cast

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.auxnode import cluster_ops
from dcache.auxnode.cluster_ops import MAX_SCAN_SESSIONS, SCAN_SESSION_TTL_S
from dcache.auxnode.node import AuxNode
from dcache.config import AuxConfig
from dcache.errors import (
    BadArgumentsError,
    ClockSkewError,
    KeyTooLargeError,
    NotAnIntegerError,
    OutOfMemoryError,
    StaleRingError,
    Status,
    ValueTooLargeError,
)
from dcache.lru import LRUCache
from dcache.protocol import OPS, Op
from dcache.ring import RING_SIZE, hash64, in_range
from dcache.server import NOT_ROUTED, FrameProtocol

U64 = RING_SIZE - 1
CLUSTER_OPS = [
    Op.GETV,
    Op.MGETV,
    Op.SETV,
    Op.DELV,
    Op.INCRV,
    Op.APPLY,
    Op.APPLY_DELETES,
    Op.SCAN,
    Op.DROP,
    Op.RANGE_COUNT,
    Op.MSETV,
    Op.INVACK,
]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_node(**kw: Any) -> AuxNode:
    return AuxNode(AuxConfig(node_id="t-aux", **kw))


def call(node: AuxNode, op: Op, *args: Any) -> Any:
    return node.execute([int(op), 7, *args])


@pytest.fixture
def node() -> AuxNode:
    return make_node()


def fill(node: AuxNode, n: int, version: int = 100, prefix: str = "k") -> list[bytes]:
    keys = [f"{prefix}{i}".encode() for i in range(n)]
    assert call(node, Op.APPLY, [[k, b"v" + k, 0, version + i] for i, k in enumerate(keys)]) == n
    return keys


def scan_all(
    node: AuxNode, ranges: list[list[int]], count: int = 50, min_version: int = 0
) -> tuple[dict[bytes, list[Any]], dict[bytes, int], int]:
    """Run a scan to completion: entries by key, tombstones by key, number of calls."""
    entries: dict[bytes, list[Any]] = {}
    tombs: dict[bytes, int] = {}
    cursor = 0
    calls = 0
    while True:
        cursor, page, page_tombs = call(node, Op.SCAN, ranges, cursor, count, min_version)
        calls += 1
        assert len(page) + len(page_tombs) <= count
        for key, value, expires_at, version in page:
            assert key not in entries, "a key came back twice"
            entries[key] = [value, expires_at, version]
        for key, version in page_tombs:
            assert key not in tombs
            tombs[key] = version
        if cursor == 0:
            return entries, tombs, calls
        assert calls < 100_000


def in_any(key: bytes, ranges: list[list[int]]) -> bool:
    h = hash64(key)
    return any(in_range(h, s, e) for s, e in ranges)


def random_ranges(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(RING_SIZE), rng.randrange(RING_SIZE)] for _ in range(n)]


# -- wiring ---------------------------------------------------------------------


def test_ops_are_registered_with_arity(node: AuxNode) -> None:
    assert [int(op) for op in CLUSTER_OPS] == list(range(32, 44))
    for op in CLUSTER_OPS:
        assert op in node.handlers
        assert op in OPS


@pytest.mark.parametrize("op", CLUSTER_OPS)
def test_wrong_arity_is_bad_arguments(node: AuxNode, op: Op) -> None:
    least, most = OPS[op].arity
    with pytest.raises(BadArgumentsError):
        node.execute([int(op), 1, *([0] * (most + 1))])
    if least:
        with pytest.raises(BadArgumentsError):
            node.execute([int(op), 1, *([0] * (least - 1))])


# -- GETV / MGETV ---------------------------------------------------------------------


def test_getv_returns_value_expiry_version_and_counts(node: AuxNode) -> None:
    exp = now_ms() + 60_000
    assert call(node, Op.SETV, b"a", b"1", exp, 0, 500) == 1
    hits, misses = node.cache.hits, node.cache.misses
    assert call(node, Op.GETV, b"a") == [b"1", exp, 500]
    assert call(node, Op.GETV, "a") == [b"1", exp, 500]
    assert call(node, Op.GETV, b"nope") is None
    assert (node.cache.hits, node.cache.misses) == (hits + 2, misses + 1)


def test_getv_refreshes_recency() -> None:
    node = make_node(max_items=2)
    call(node, Op.SETV, b"a", b"1", 0, 0, 1)
    call(node, Op.SETV, b"b", b"2", 0, 0, 2)
    assert call(node, Op.GETV, b"a") is not None
    call(node, Op.SETV, b"c", b"3", 0, 0, 3)
    assert call(node, Op.GETV, b"b") is None
    assert call(node, Op.GETV, b"a") == [b"1", 0, 1]


def test_getv_never_returns_expired() -> None:
    node = make_node()
    t = [1_000_000]
    node.cache = LRUCache(10**6, clock=lambda: t[0])
    call(node, Op.SETV, b"a", b"1", 1_000_500, 0, 1)
    assert call(node, Op.GETV, b"a") == [b"1", 1_000_500, 1]
    t[0] = 1_000_500
    assert call(node, Op.GETV, b"a") is None


def test_getv_errors() -> None:
    node = make_node(max_key_bytes=8)
    with pytest.raises(BadArgumentsError):
        call(node, Op.GETV, 5)
    with pytest.raises(BadArgumentsError):
        call(node, Op.GETV, b"")
    with pytest.raises(KeyTooLargeError):
        call(node, Op.GETV, b"x" * 9)


def test_mgetv(node: AuxNode) -> None:
    call(node, Op.SETV, b"a", b"1", 0, 0, 10)
    call(node, Op.SETV, b"c", b"3", 0, 0, 30)
    assert call(node, Op.MGETV, [b"a", b"b", "c"]) == [[b"1", 0, 10], None, [b"3", 0, 30]]
    assert call(node, Op.MGETV, []) == []
    with pytest.raises(BadArgumentsError):
        call(node, Op.MGETV, b"a")
    with pytest.raises(BadArgumentsError):
        call(node, Op.MGETV, [b"a", 3])


# -- SETV -----------------------------------------------------------------------------


def test_setv_statuses(node: AuxNode) -> None:
    assert call(node, Op.SETV, b"k", b"v1", 0, 0, 100) == 1
    assert call(node, Op.SETV, b"k", b"v1", 0, 0, 100) == 1  # the same write again: applied already
    assert call(node, Op.SETV, b"k", b"v0", 0, 0, 100) == [2, 100]  # another value, same version: superseded
    assert call(node, Op.SETV, b"k", b"v0", 0, 0, 99) == [2, 100]  # older: superseded, with the version held
    assert call(node, Op.GETV, b"k") == [b"v1", 0, 100]
    assert call(node, Op.SETV, b"k", b"v2", 0, 0, 101) == 1
    assert call(node, Op.GETV, b"k") == [b"v2", 0, 101]
    # NX / XX
    assert call(node, Op.SETV, b"k", b"nx", 0, 1, 200) == 0
    assert call(node, Op.SETV, b"k", b"nx", 0, 1, 50) == 0  # the condition is checked first
    assert call(node, Op.SETV, b"new", b"nx", 0, 1, 200) == 1
    assert call(node, Op.SETV, b"absent", b"xx", 0, 2, 200) == 0
    assert call(node, Op.SETV, b"k", b"xx", 0, 2, 200) == 1
    assert call(node, Op.SETV, b"k", b"xx", 0, 2, 150) == [2, 200]
    assert call(node, Op.GETV, b"k") == [b"xx", 0, 200]


def test_msetv_answers_each_entry_as_its_setv_would() -> None:
    node = make_node(max_memory=1000)
    call(node, Op.SETV, b"held", b"v", 0, 0, 100)
    answers = call(
        node,
        Op.MSETV,
        [
            [b"a", b"va", 0, 0, 101],  # stored
            [b"held", b"older", 0, 0, 99],  # a newer version is held: superseded
            [b"big", b"v" * 2000, 0, 0, 102],  # does not fit in this node's memory: its own error
            [b"gone", b"v", now_ms() - 1, 0, 103],  # expired already: nothing to store
            [b"a", b"again", 0, 1, 104],  # NX on a key that exists now: not set
        ],
    )
    assert [a[0] for a in answers] == [0, 0, int(Status.OUT_OF_MEMORY), 0, 0]
    assert answers[0][1] == 1 and answers[1][1] == [2, 100] and answers[3][1] == 2 and answers[4][1] == 0
    assert "exceeds the cache budget" in answers[2][1]
    assert call(node, Op.GETV, b"a") == [b"va", 0, 101]
    assert call(node, Op.GETV, b"held") == [b"v", 0, 100]
    assert call(node, Op.GETV, b"big") is None


def test_msetv_moves_the_clock_past_its_newest_version() -> None:
    node = make_node()
    newest = node.limits.version_ceiling() - (1 << 22)  # within --max-clock-skew, ahead of the node's own clock
    call(node, Op.SETV, b"held", b"v", 0, 0, newest - 1)
    answers = call(
        node,
        Op.MSETV,
        [
            [b"a", b"v", 0, 0, newest - 3],
            [b"held", b"v", 0, 0, newest],  # the newest, neither first nor last, and not stored (superseded below)
            [b"held", b"v", 0, 0, newest - 2],
        ],
    )
    assert [list(a) for a in answers] == [[0, 1], [0, 1], [0, [2, newest]]]
    assert node.clock.next() > newest  # the receive rule, for the batch's newest version


@pytest.mark.parametrize("n", [1, 8, 15, 16, 64, 65])
def test_msetv_answer_on_the_wire_is_one_stored_pair_per_entry(n: int) -> None:
    from dcache.protocol import encode_request, encode_response
    from tests.fakes import FakeTransport

    node = make_node()
    conn = node.protocol_factory()
    transport = FakeTransport(peername=("10.0.0.1", 5000))
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(encode_request(Op.MSETV, 300, [[b"k%d" % i, b"v", 0, 0, 100 + i] for i in range(n)]))
    assert b"".join(transport.written) == encode_response(300, 0, [[0, 1]] * n)  # packed ahead for up to 64 entries
    assert call(node, Op.MSETV, [[b"k0", b"w", 0, 0, 1000]]) == [[0, 1]]  # in-process: the objects a peer decodes
    assert call(node, Op.GETV, b"k0") == [b"w", 0, 1000]


def test_setv_superseded_by_tombstone(node: AuxNode) -> None:
    call(node, Op.SETV, b"k", b"v", 0, 0, 10)
    assert call(node, Op.DELV, b"k", 20) is True
    assert call(node, Op.SETV, b"k", b"late", 0, 0, 15) == [2, 20]
    assert call(node, Op.SETV, b"k", b"late", 0, 1, 15) == [2, 20]  # NX holds (absent) but the tombstone wins
    assert call(node, Op.GETV, b"k") is None
    assert call(node, Op.SETV, b"k", b"newer", 0, 0, 21) == 1
    assert call(node, Op.GETV, b"k") == [b"newer", 0, 21]


def test_setv_expiry(node: AuxNode) -> None:
    exp = now_ms() + 60_000
    assert call(node, Op.SETV, b"k", b"v", exp, 0, 1) == 1
    assert 0 < node.cache.ttl_ms(b"k") <= 60_000
    assert call(node, Op.SETV, b"old", b"v", now_ms() - 1, 0, 5) == 2
    assert call(node, Op.GETV, b"old") is None


def test_setv_errors() -> None:
    node = make_node(max_memory=1000, max_value_bytes=4096, max_key_bytes=16)
    good = [b"k", b"v", 0, 0, 1]
    for i, bad in [(0, 3), (1, 3), (2, -1), (2, None), (2, 1 << 63), (3, 3), (3, True), (4, 0), (4, -5), (4, 1 << 64), (4, "1"), (4, True)]:
        args = list(good)
        args[i] = bad
        with pytest.raises(BadArgumentsError):
            call(node, Op.SETV, *args)
    with pytest.raises(KeyTooLargeError):
        call(node, Op.SETV, b"k" * 17, b"v", 0, 0, 1)
    with pytest.raises(ValueTooLargeError):
        call(node, Op.SETV, b"k", b"v" * 4097, 0, 0, 1)
    with pytest.raises(OutOfMemoryError):
        call(node, Op.SETV, b"k", b"v" * 2000, 0, 0, 1)
    with pytest.raises(ClockSkewError):  # the largest version would poison this node's clock
        call(node, Op.SETV, b"k", b"v", 0, 0, U64)
    ceiling = node.limits.version_ceiling()
    assert call(node, Op.SETV, b"k", b"v", 0, 0, ceiling - (1 << 22)) == 1  # within --max-clock-skew: fine
    assert node.clock.next() > ceiling - (1 << 22)  # and the clock moved past it (the receive rule)


# -- DELV / INCRV ----------------------------------------------------------------------


def test_delv_is_lww_and_leaves_tombstone(node: AuxNode) -> None:
    call(node, Op.SETV, b"k", b"v", 0, 0, 100)
    assert call(node, Op.DELV, b"k", 50) == [2, 100]  # older delete: the entry stays, superseded
    assert call(node, Op.GETV, b"k") == [b"v", 0, 100]
    assert call(node, Op.DELV, b"k", 150) is True
    assert call(node, Op.GETV, b"k") is None
    assert node.cache.tombstone_version(b"k") == 150
    assert call(node, Op.DELV, b"k", 160) is False  # nothing live; tombstone moves forward
    assert node.cache.tombstone_version(b"k") == 160
    assert call(node, Op.DELV, b"never", 5) is False
    assert node.cache.tombstone_version(b"never") == 5
    with pytest.raises(BadArgumentsError):
        call(node, Op.DELV, b"k", 0)
    with pytest.raises(BadArgumentsError):
        call(node, Op.DELV, 1, 5)


def test_incrv(node: AuxNode) -> None:
    assert call(node, Op.INCRV, b"n", 5, 10) == [5, 0, 10]
    assert call(node, Op.GETV, b"n") == [b"5", 0, 10]
    assert call(node, Op.INCRV, b"n", -7, 11) == [-2, 0, 11]
    assert call(node, Op.GETV, b"n") == [b"-2", 0, 11]
    exp = now_ms() + 60_000
    call(node, Op.SETV, b"t", b"1", exp, 0, 20)
    assert call(node, Op.INCRV, b"t", 1, 21) == [2, exp, 21]  # keeps the expiry
    assert call(node, Op.GETV, b"t") == [b"2", exp, 21]
    # a local write: it applies whatever the stored version, with a version
    # newer than the one it replaces (else copies of it would lose)
    value, expires_at, version = call(node, Op.INCRV, b"t", 1, 1)
    assert (value, expires_at) == (3, exp) and version > 21
    assert call(node, Op.GETV, b"t") == [b"3", exp, version]


def test_incrv_errors(node: AuxNode) -> None:
    call(node, Op.SETV, b"s", b"abc", 0, 0, 1)
    with pytest.raises(NotAnIntegerError):
        call(node, Op.INCRV, b"s", 1, 2)
    call(node, Op.SETV, b"big", b"%d" % (2**63 - 1), 0, 0, 1)
    with pytest.raises(NotAnIntegerError):
        call(node, Op.INCRV, b"big", 1, 2)
    assert call(node, Op.GETV, b"big") == [b"%d" % (2**63 - 1), 0, 1]
    for delta in (2**63, "1", 1.5, None, True):
        with pytest.raises(BadArgumentsError):
            call(node, Op.INCRV, b"n", delta, 1)
    with pytest.raises(BadArgumentsError):
        call(node, Op.INCRV, b"n", 1, 0)


# -- APPLY / APPLY_DELETES ----------------------------------------------------------------


def test_apply_lww(node: AuxNode) -> None:
    assert call(node, Op.APPLY, [[b"a", b"a2", 0, 20], [b"b", b"b1", 0, 10]]) == 2
    assert call(node, Op.APPLY, [[b"a", b"a1", 0, 10], [b"b", b"b2", 0, 20], [b"c", b"c1", 0, 5]]) == 2
    assert call(node, Op.MGETV, [b"a", b"b", b"c"]) == [[b"a2", 0, 20], [b"b2", 0, 20], [b"c1", 0, 5]]
    assert call(node, Op.APPLY, [[b"a", b"a2", 0, 20]]) == 0  # idempotent
    assert call(node, Op.APPLY, []) == 0


def test_late_apply_never_resurrects_a_deleted_key(node: AuxNode) -> None:
    call(node, Op.APPLY, [[b"k", b"v1", 0, 10]])
    assert call(node, Op.DELV, b"k", 30) is True
    assert call(node, Op.APPLY, [[b"k", b"v2", 0, 20]]) == 0
    assert call(node, Op.GETV, b"k") is None
    assert call(node, Op.APPLY_DELETES, [[b"k", 25]]) == 0
    assert call(node, Op.APPLY, [[b"k", b"v3", 0, 31]]) == 1
    assert call(node, Op.GETV, b"k") == [b"v3", 0, 31]


def test_apply_skips_expired_entries(node: AuxNode) -> None:
    assert call(node, Op.APPLY, [[b"a", b"1", now_ms() - 10, 5], [b"b", b"2", now_ms() + 60_000, 5]]) == 1
    assert call(node, Op.GETV, b"a") is None


def test_apply_validates_everything_first() -> None:
    node = make_node(max_memory=2000, max_key_bytes=16)
    bad_batches = [
        ([[b"a", b"1", 0, 1], [b"b", b"2", 0, 0]], BadArgumentsError),
        ([[b"a", b"1", 0, 1], [b"b", b"2", -1, 1]], BadArgumentsError),
        ([[b"a", b"1", 0, 1], [b"b", b"2", 0]], BadArgumentsError),
        ([[b"a", b"1", 0, 1], (b"b", b"2", 0, 1)], BadArgumentsError),
        ([[b"a", b"1", 0, 1], [7, b"2", 0, 1]], BadArgumentsError),
        ([[b"a", b"1", 0, 1], [b"k" * 17, b"2", 0, 1]], KeyTooLargeError),
        ([[b"a", b"1", 0, 1], [b"b", b"x" * 3000, 0, 1]], OutOfMemoryError),
    ]
    for batch, exc in bad_batches:
        with pytest.raises(exc):
            call(node, Op.APPLY, batch)
        assert len(node.cache) == 0
    with pytest.raises(BadArgumentsError):
        call(node, Op.APPLY, {b"a": b"1"})


def test_apply_deletes(node: AuxNode) -> None:
    call(node, Op.APPLY, [[b"a", b"1", 0, 10], [b"b", b"2", 0, 10], [b"c", b"3", 0, 50]])
    assert call(node, Op.APPLY_DELETES, [[b"a", 20], [b"c", 20], [b"zz", 20]]) == 1
    assert call(node, Op.MGETV, [b"a", b"b", b"c"]) == [None, [b"2", 0, 10], [b"3", 0, 50]]
    assert node.cache.tombstone_version(b"zz") == 20
    assert call(node, Op.APPLY, [[b"a", b"1", 0, 15], [b"zz", b"1", 0, 15]]) == 0
    with pytest.raises(BadArgumentsError):
        call(node, Op.APPLY_DELETES, [[b"b", 30], [b"c", 0]])
    assert call(node, Op.GETV, b"b") == [b"2", 0, 10]  # validated before anything was applied
    with pytest.raises(BadArgumentsError):
        call(node, Op.APPLY_DELETES, [[b"b"]])
    with pytest.raises(BadArgumentsError):
        call(node, Op.APPLY_DELETES, b"b")


# -- ranges -----------------------------------------------------------------------------


def test_bad_ranges_are_bad_arguments(node: AuxNode) -> None:
    assert call(node, Op.RANGE_COUNT, [[5, 5]]) == 0
    for bad in [b"x", [[1]], [[1, 2, 3]], [[1, -1]], [[1, 1 << 64]], [[1, 2.0]], [[True, 2]], [["1", 2]]]:
        with pytest.raises(BadArgumentsError):
            call(node, Op.RANGE_COUNT, bad)


def test_range_count(node: AuxNode) -> None:
    keys = fill(node, 2000)
    rng = random.Random(1)
    for n in (0, 1, 2, 5, 40):
        ranges = random_ranges(rng, n)
        assert call(node, Op.RANGE_COUNT, ranges) == sum(in_any(k, ranges) for k in keys)
    assert call(node, Op.RANGE_COUNT, [[3, 3]]) == 2000
    with pytest.raises(BadArgumentsError):
        call(node, Op.RANGE_COUNT, [[1]])


# -- SCAN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_scan_matches_brute_force(node: AuxNode, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 300)  # many pages, some of them empty
    keys = fill(node, 3000)
    rng = random.Random(seed)
    ranges = random_ranges(rng, [1, 2, 3, 8, 30, 1][seed])
    count = rng.choice([1, 7, 50, 400])
    entries, tombs, calls = scan_all(node, ranges, count=count)
    expected = {k for k in keys if in_any(k, ranges)}
    assert set(entries) == expected
    assert tombs == {}
    work = max(count * 8, 300)
    assert calls >= max(-(-3000 // work), -(-len(expected) // count))
    for k in expected:
        assert entries[k] == [b"v" + k, 0, 100 + keys.index(k)]
    assert node.cluster_ops.session_count == 0


def test_scan_whole_circle_single_call_opens_no_session(node: AuxNode) -> None:
    keys = fill(node, 500)
    cursor, page, tombs = call(node, Op.SCAN, [[7, 7]], 0, 1000, 0)
    assert cursor == 0 and tombs == []
    assert sorted(e[0] for e in page) == sorted(keys)
    assert node.cluster_ops.session_count == 0
    assert call(node, Op.SCAN, [], 0, 10, 0) == [0, [], []]
    empty = make_node()
    assert call(empty, Op.SCAN, [[0, 0]], 0, 10, 0) == [0, [], []]


def test_a_packed_scan_answers_the_same_page_packed_and_apply_takes_it(node: AuxNode) -> None:
    keys = fill(node, 300)
    node.cache.delete(keys[0], version=10_000)
    half = [[0, 2**63]]
    plain = call(node, Op.SCAN, half, 0, 1000, 0)
    cursor, packed, tombs, n = call(node, Op.SCAN, half, 0, 1000, 0, True)
    assert packed.__class__ is bytes and msgpack.unpackb(packed) == plain[1]
    assert [cursor, tombs, n] == [plain[0], plain[2], len(plain[1])] and 0 < n < 300
    other = make_node()
    assert call(other, Op.APPLY, packed) == n
    assert sorted(other.cache.items()) == sorted(tuple(e) for e in plain[1])
    # a page that stops early is packed the same way: every page of a scan
    pages, cursor = [], 0
    while True:
        cursor, page, _, n = call(node, Op.SCAN, half, cursor, 7, 0, True)
        assert len(msgpack.unpackb(page)) == n <= 7
        pages += msgpack.unpackb(page)
        if not cursor:
            break
    assert sorted(map(tuple, pages)) == sorted(map(tuple, plain[1]))


def test_scan_work_per_call_is_bounded(node: AuxNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 100)
    fill(node, 1000)
    # a range holding no key at all: every call examines 100 keys and returns none
    keys_hashes = sorted(hash64(k) for k in node.cache.keys_snapshot())
    gap = [keys_hashes[0], keys_hashes[0] + 1] if keys_hashes[1] > keys_hashes[0] + 1 else [keys_hashes[-1], U64]
    cursor, calls = 0, 0
    while True:
        cursor, page, tombs = call(node, Op.SCAN, [gap], cursor, 5, 0)
        calls += 1
        assert page == [] and tombs == []
        if not cursor:
            break
    assert calls == 10


def test_scan_min_version_and_tombstones(node: AuxNode) -> None:
    keys = fill(node, 1000, version=1000)  # versions 1000 .. 1999
    deleted = keys[::10]
    assert call(node, Op.APPLY_DELETES, [[k, 5000 + i] for i, k in enumerate(deleted)]) == len(deleted)
    rng = random.Random(7)
    ranges = random_ranges(rng, 3)
    entries, tombs, _ = scan_all(node, ranges, count=30, min_version=1500)
    live = [k for k in keys if k not in set(deleted)]
    assert set(entries) == {k for i, k in enumerate(keys) if k in live and 1000 + i >= 1500 and in_any(k, ranges)}
    assert tombs == {k: 5000 + i for i, k in enumerate(deleted) if in_any(k, ranges)}
    entries, tombs, _ = scan_all(node, [[0, 0]], count=100, min_version=5050)
    assert entries == {}
    assert tombs == {k: 5000 + i for i, k in enumerate(deleted) if 5000 + i >= 5050}


def test_scan_skips_keys_deleted_mid_scan_and_sees_updates(node: AuxNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 100)
    keys = fill(node, 1000)
    cursor, page, _ = call(node, Op.SCAN, [[0, 0]], 0, 10, 0)
    seen = {e[0] for e in page}
    assert cursor and len(seen) == 10
    rest = [k for k in keys if k not in seen]
    gone = set(rest[::3])
    for k in gone:
        assert call(node, Op.DELV, k, 10_000) is True
    changed = rest[1]
    assert call(node, Op.SETV, changed, b"new", 0, 0, 20_000) == 1
    call(node, Op.SETV, b"added-later", b"x", 0, 0, 20_000)  # not in the snapshot
    got: dict[bytes, list[Any]] = {}
    tombs: dict[bytes, int] = {}
    while cursor:
        cursor, page, page_tombs = call(node, Op.SCAN, [[0, 0]], cursor, 10, 0)
        got.update({e[0]: e[1:] for e in page})
        tombs.update(dict(page_tombs))
    assert set(got) == set(rest) - gone
    assert got[changed] == [b"new", 0, 20_000]
    assert tombs == {}  # tombstones recorded after the snapshot are not in it
    assert b"added-later" not in got


def test_scan_skips_entries_that_expired() -> None:
    node = make_node()
    t = [1_000_000]
    node.cache = LRUCache(10**7, clock=lambda: t[0])
    call(node, Op.APPLY, [[b"k%d" % i, b"v", 1_000_100 if i % 2 else 0, 1 + i] for i in range(100)])
    t[0] = 1_000_100
    entries, _, _ = scan_all(node, [[0, 0]], count=7)
    assert set(entries) == {b"k%d" % i for i in range(0, 100, 2)}


def test_scan_pages_respect_the_frame_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(max_frame_bytes=70_000, max_value_bytes=60_000)
    call(node, Op.APPLY, [[b"k%d" % i, bytes(1000), 0, 1 + i] for i in range(300)])
    call(node, Op.APPLY, [[b"big", bytes(60_000), 0, 1]])
    cursor, total, pages = 0, 0, 0
    while True:
        result = call(node, Op.SCAN, [[0, 0]], cursor, 10_000, 0)
        body = msgpack.packb([7, 0, result])
        assert len(body) + 4 <= 70_000
        cursor = result[0]
        total += len(result[1])
        pages += 1
        if not cursor:
            break
    assert total == 301 and pages >= 300 * 1000 // 35_000


def test_scan_argument_errors(node: AuxNode) -> None:
    fill(node, 10)
    good = [[[0, 0]], 0, 10, 0]
    for i, bad in [(0, b"x"), (0, [[1]]), (1, -1), (1, 1 << 64), (1, "0"), (2, 0), (2, -3), (2, None), (3, -1), (3, 1 << 64), (3, None)]:
        args = list(good)
        args[i] = bad
        with pytest.raises(BadArgumentsError):
            call(node, Op.SCAN, *args)


def test_scan_cursor_errors(node: AuxNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 10)
    monkeypatch.setattr(cluster_ops, "DROP_WORK", 10)
    fill(node, 100)
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.SCAN, [[0, 0]], (99 << 32) | 5, 10, 0)
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.SCAN, [[0, 0]], 5, 10, 0)
    cursor = call(node, Op.SCAN, [[0, 0]], 0, 10, 0)[0]
    assert cursor >> 32 == 1
    with pytest.raises(BadArgumentsError):
        call(node, Op.DROP, [[0, 0]], cursor)  # a SCAN cursor given to DROP
    with pytest.raises(BadArgumentsError):
        call(node, Op.SCAN, [[0, 0]], (cursor >> 32 << 32) | 10_000, 10, 0)
    # the same cursor can be used again (a retried page)
    assert call(node, Op.SCAN, [[0, 0]], cursor, 10, 0) == call(node, Op.SCAN, [[0, 0]], cursor, 10, 0)


def test_scan_sessions_expire(node: AuxNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 10)
    fill(node, 100)
    t = [1000.0]
    node.cluster_ops.monotonic = lambda: t[0]
    a = call(node, Op.SCAN, [[0, 0]], 0, 5, 0)[0]
    b = call(node, Op.SCAN, [[0, 0]], 0, 5, 0)[0]
    assert a and b and a >> 32 != b >> 32
    t[0] += SCAN_SESSION_TTL_S - 1
    a = call(node, Op.SCAN, [[0, 0]], a, 5, 0)[0]  # using it keeps it alive
    t[0] += 2
    assert node.cluster_ops.expire_sessions() == 1  # b idled for the TTL
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.SCAN, [[0, 0]], b, 5, 0)
    a = call(node, Op.SCAN, [[0, 0]], a, 5, 0)[0]
    t[0] += SCAN_SESSION_TTL_S
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.SCAN, [[0, 0]], a, 5, 0)
    assert node.cluster_ops.session_count == 0


def test_at_most_16_sessions_oldest_dropped(node: AuxNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "SCAN_MIN_WORK", 10)
    fill(node, 100)
    cursors = [call(node, Op.SCAN, [[0, 0]], 0, 5, 0)[0] for _ in range(MAX_SCAN_SESSIONS)]
    cursors[0] = call(node, Op.SCAN, [[0, 0]], cursors[0], 5, 0)[0]  # the first is now the most recent
    extra = call(node, Op.SCAN, [[0, 0]], 0, 5, 0)[0]
    assert node.cluster_ops.session_count == MAX_SCAN_SESSIONS
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.SCAN, [[0, 0]], cursors[1], 5, 0)
    for c in [cursors[0], *cursors[2:], extra]:
        assert call(node, Op.SCAN, [[0, 0]], c, 5, 0)[0] != 0


# -- DROP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_drop_removes_exactly_the_ranges(node: AuxNode, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_ops, "DROP_WORK", 250)
    keys = fill(node, 2000)
    tombs_before = node.cache.tombstone_count
    rng = random.Random(seed)
    ranges = random_ranges(rng, [1, 3, 20][seed])
    inside = {k for k in keys if in_any(k, ranges)}
    assert call(node, Op.RANGE_COUNT, ranges) == len(inside)
    cursor, total, calls = 0, 0, 0
    while True:
        cursor, dropped = call(node, Op.DROP, ranges, cursor)
        total += dropped
        calls += 1
        if not cursor:
            break
    assert calls == 2000 // 250
    assert total == len(inside)
    assert call(node, Op.RANGE_COUNT, ranges) == 0
    assert set(node.cache.keys_snapshot()) == set(keys) - inside
    assert node.cache.tombstone_count == tombs_before  # no tombstones: a migrated copy may come back
    k = next(iter(inside), None)
    if k is not None:
        assert call(node, Op.APPLY, [[k, b"back", 0, 1]]) == 1
    assert node.cluster_ops.session_count == 0


def test_drop_errors(node: AuxNode) -> None:
    with pytest.raises(BadArgumentsError):
        call(node, Op.DROP, [[1, 2]], -1)
    with pytest.raises(BadArgumentsError):
        call(node, Op.DROP, [1, 2], 0)
    with pytest.raises(BadArgumentsError, match="scan cursor expired"):
        call(node, Op.DROP, [[1, 2]], (3 << 32) | 1)
    assert call(node, Op.DROP, [[1, 2]], 0) == [0, 0]


_EDGE_KEYS = [b"e%d" % i for i in range(300)]
_EDGE_HASHES = [hash64(k) for k in _EDGE_KEYS]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(_EDGE_HASHES), st.sampled_from(_EDGE_HASHES)), max_size=5),
    st.integers(1, 40),
    st.integers(0, 150),
)
def test_scan_range_edges_property(edges: list[tuple[int, int]], count: int, min_offset: int) -> None:
    """Bounds exactly on key hashes: start is exclusive, end inclusive, wrapping."""
    node = make_node()
    call(node, Op.APPLY, [[k, b"v", 0, 1 + i] for i, k in enumerate(_EDGE_KEYS)])
    ranges = [list(r) for r in edges]
    entries, _, _ = scan_all(node, ranges, count=count, min_version=1 + min_offset)
    assert set(entries) == {k for i, k in enumerate(_EDGE_KEYS) if in_any(k, ranges) and 1 + i >= 1 + min_offset}


# -- EPOCH: the ring floor -------------------------------------------------------------


class _Conn:
    """What the handlers read of a master's connection: the ring epoch it said its requests are routed by."""

    def __init__(self, routed_by: int) -> None:
        self.routed_by = routed_by

    def retable(self) -> None:
        """Nothing to switch: ``Service.execute`` picks the table by ``routed_by`` for each call."""


def _conn(routed_by: int = NOT_ROUTED) -> FrameProtocol:
    return cast(FrameProtocol, _Conn(routed_by))


def test_epoch_records_the_connections_epoch_and_only_raises_the_floor(node: AuxNode) -> None:
    leader, follower = _conn(), _conn()
    assert node.execute([int(Op.EPOCH), 1, 40], follower) == 0  # announces only
    assert follower.routed_by == 40 and node.ring_floor == 0
    assert node.execute([int(Op.EPOCH), 1, 50, 45], leader) == 45
    assert leader.routed_by == 50
    assert node.execute([int(Op.EPOCH), 1, 60, 30], _conn()) == 45  # never lowered
    assert node.execute([int(Op.EPOCH), 1, 41], follower) == 45
    assert follower.routed_by == 41
    assert node.stats()["ring_floor"] == 45
    with pytest.raises(BadArgumentsError, match="newer than the epoch"):
        node.execute([int(Op.EPOCH), 1, 10, 11], _conn())  # a master cannot require a ring newer than its own
    with pytest.raises(BadArgumentsError):
        node.execute([int(Op.EPOCH), 1, -1], _conn())
    assert node.ring_floor == 45


REFUSED: list[tuple[Op, tuple[Any, ...]]] = [
    (Op.SETV, (b"k", b"new", 0, 0, 200)),
    (Op.MSETV, ([[b"k", b"new", 0, 0, 200]],)),
    (Op.DELV, (b"k", 200)),
    (Op.INCRV, (b"n", 1, 200)),
    (Op.APPLY, ([[b"k", b"new", 0, 200]],)),
    (Op.APPLY_DELETES, ([[b"k", 200]],)),
    (Op.DROP, ([[0, U64]], 0)),
    (Op.EXPIRE, (b"k", 1)),
    (Op.PERSIST, (b"t",)),
    (Op.GET, (b"k",)),
    (Op.MGET, ([b"k", b"n"],)),
    (Op.GETV, (b"k",)),
    (Op.MGETV, ([b"k", b"n"],)),
    (Op.EXISTS, (b"k",)),
    (Op.TTL, (b"t",)),
]


@pytest.mark.parametrize(("op", "args"), REFUSED, ids=[op.name for op, _ in REFUSED])
def test_a_request_routed_by_a_ring_older_than_the_floor_is_refused_and_changes_nothing(
    node: AuxNode, op: Op, args: tuple[Any, ...]
) -> None:
    """A master paused while the ring changed reads and writes by its old ring: the node refuses (STALE_RING) instead."""
    call(node, Op.SETV, b"k", b"old", 0, 0, 100)
    call(node, Op.SETV, b"n", b"1", 0, 0, 100)
    call(node, Op.SETV, b"t", b"1", now_ms() + 60_000, 0, 100)
    node.execute([int(Op.EPOCH), 1, 50, 50], _conn())
    before = {k: call(node, Op.GETV, k) for k in (b"k", b"n", b"t")}
    hits = node.cache.hits
    stale = _conn(49)
    with pytest.raises(StaleRingError, match="routed by ring epoch 49") as refused:
        node.execute([int(op), 7, *args], stale)
    assert refused.value.status == Status.STALE_RING
    assert {k: call(node, Op.GETV, k) for k in (b"k", b"n", b"t")} == before
    assert node.cache.hits == hits + 3  # the three GETVs just above: the refused read read nothing
    assert node.stats()["stale_ring_refusals"] == 1
    node.execute([int(op), 8, *args], _conn(50))  # routed by the floor's ring: served
    node.execute([int(op), 9, *args], _conn())  # a connection that never sent EPOCH (a client, an older master): served
    assert node.stats()["stale_ring_refusals"] == 1
