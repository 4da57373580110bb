"""The master's routing rules (``dcache.master.router``) over real aux handlers behind fake connections.

Each test routes ops through a ``Router`` whose links reach ``AuxNode``
handlers in memory (``fakecluster``); nodes are made to miss, fail, stay
silent or hold newer versions, and the tests check what the client is
answered and what every aux node ends up holding.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcache.errors import NotAnIntegerError, Status, SupersededError, UnavailableError
from dcache.hlc import node_tag, wall_ms
from dcache.master.router import LinkBatcher
from dcache.master.view import DOWN, Member
from dcache.protocol import Op, SetFlag
from dcache.protocol.limits import KEYS_PER_TURN
from tests.fakes import Reply

from .fakecluster import FakeCluster, Sink, until

OK = 0
UNAVAILABLE = int(Status.UNAVAILABLE)
TIMEOUT = int(Status.UPSTREAM_TIMEOUT)


@pytest.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    async with FakeCluster() as c:
        yield c


def with_states(c: FakeCluster, **states: str) -> None:
    """Route by a view in which the given nodes have the given states (same ring)."""
    members = {m.node_id: Member(m.node_id, m.host, m.port, m.weight, states.get(m.node_id, m.state)) for m in c.view.members.values()}
    c.router.view = c.router.view.bumped(members=members)


def elsewhere(version: int) -> int:
    """A version one ms after ``version``, issued by another master (its own tag)."""
    return (((version >> 10) + (1 << 12)) << 10) | node_tag("elsewhere")


def answer_with(status: int, result: Any = "injected") -> Any:
    return lambda msg: Reply(status, result)


# -- reads: candidate order, fallback, repair ------------------------------------------------


async def test_a_hit_on_the_first_owner_reads_no_other_node(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"v")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"v")
    assert [m[0] for m in cluster.sent("a1")] == [Op.GET]
    assert cluster.sent("a2") == [] and cluster.sent("a3") == []
    assert cluster.router.stats.fallbacks == cluster.router.stats.repairs == 0


async def test_a_miss_on_the_first_owner_reads_the_next_and_repairs_the_first(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    version = cluster.put("a2", key, b"v")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"v")
    assert [m[0] for m in cluster.sent("a2")] == [Op.GETV]  # a later owner is asked for the version too
    await until(lambda: cluster.entry("a1", key) is not None, what="the repair")
    assert cluster.entry("a1", key) == [b"v", 0, version]  # the same version: a repair is a copy
    assert cluster.router.stats.repairs == 1
    assert cluster.router.stats.fallbacks == 0  # a miss is not a failure


async def test_a_repair_never_overwrites_a_newer_value(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    old = cluster.clock.next()
    cluster.put("a1", key, b"new", cluster.future_version())
    cluster.router.repair(["a1"], key, [b"old", 0, old])
    await until(lambda: cluster.sent("a1", Op.APPLY))
    await until(lambda: not cluster.links["a1"].in_flight)
    assert cluster.value("a1", key) == b"new"


@pytest.mark.parametrize(
    ("first", "second", "expected_status", "expected_value", "repaired"),
    [
        ("miss", "miss", OK, None, False),
        ("miss", "hit", OK, b"v", True),
        ("unavailable", "hit", OK, b"v", False),
        ("timeout", "hit", OK, b"v", False),
        ("unavailable", "unavailable", UNAVAILABLE, None, False),
        ("timeout", "unavailable", UNAVAILABLE, None, False),
        ("miss", "unavailable", OK, None, False),  # an owner said it has no such key: a miss, not an error
        ("unavailable", "miss", OK, None, False),
    ],
)
async def test_fallback_rules(
    cluster: FakeCluster, first: str, second: str, expected_status: int, expected_value: bytes | None, repaired: bool
) -> None:
    key = cluster.key_owned_by("a1", "a2")
    for node, how in (("a1", first), ("a2", second)):
        if how == "hit":
            cluster.put(node, key, b"v")
        elif how == "unavailable":
            cluster.overrides[(node, Op.GET)] = cluster.overrides[(node, Op.GETV)] = answer_with(UNAVAILABLE, f"{node} is gone")
        elif how == "timeout":
            cluster.overrides[(node, Op.GET)] = cluster.overrides[(node, Op.GETV)] = answer_with(TIMEOUT, f"{node} is slow")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    status, value = await sink.answer()
    assert status == expected_status
    if status == OK:
        assert value == expected_value
    else:
        assert "no owner of the key answered" in value
    assert cluster.sent("a3") == []
    assert cluster.router.stats.fallbacks == (first in ("unavailable", "timeout")) + (second in ("unavailable", "timeout"))
    if repaired:
        await until(lambda: cluster.entry("a1", key) is not None, what="the repair")
    else:
        assert cluster.sent("a1", Op.APPLY) == []


async def test_an_error_that_is_not_about_reachability_is_answered_as_is(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.overrides[("a1", Op.GET)] = answer_with(int(Status.INTERNAL), "broken")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (int(Status.INTERNAL), "broken")
    assert sink.ops[1] == Op.GET
    assert cluster.sent("a2") == []


async def test_a_node_with_hints_is_read_last(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"stale")
    cluster.put("a2", key, b"fresh")
    cluster.router.hints.add_set("a1", b"another key", b"x", 0, cluster.clock.next())  # a1 missed a write
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"fresh")
    assert cluster.sent("a1") == []


async def test_a_suspected_node_is_read_last() -> None:
    async with FakeCluster(suspect_after=0.25) as cluster:
        key = cluster.key_owned_by("a1", "a2")
        cluster.put("a1", key, b"v")
        cluster.put("a2", key, b"v")
        await cluster.make_suspect("a1")
        before = len(cluster.sent("a1"))
        sink = Sink()
        cluster.router.get(sink, 1, key)
        assert await sink.answer() == (OK, b"v")
        assert [m[0] for m in cluster.sent("a1")[before:] if m[0] != Op.PING] == []  # only probes reached it
        assert cluster.router.stats.fallbacks == 0


async def test_a_first_owner_that_is_not_connected_is_read_after_the_connected_ones() -> None:
    cluster = FakeCluster()
    cluster.fake.refused.add("a1")
    async with cluster:
        key = cluster.key_owned_by("a1", "a2")
        cluster.put("a2", key, b"v")
        assert not cluster.router.trusted("a1")
        sink = Sink()
        cluster.router.exists(sink, 1, key)  # type: ignore[arg-type]
        assert await sink.answer(1) == (OK, True)
        assert cluster.router.stats.fallbacks == 0 and cluster.links["a1"].failures_total == 0
        # GET's batched first-owner read does not look at the link (hot path): it fails
        # over locally, at once, and still answers the value
        cluster.router.get(sink, 2, key)
        assert await sink.answer(2) == (OK, b"v")


async def test_set_if_and_incr_are_decided_by_a_connected_owner_when_the_first_is_not() -> None:
    cluster = FakeCluster()
    cluster.fake.refused.add("a1")
    async with cluster:
        key = cluster.key_owned_by("a1", "a2")
        assert await cluster.router.incr(key, 2) == 2
        assert await cluster.router.set_if(key, b"7", 0, SetFlag.XX) is True
        assert cluster.value("a2", key) == b"7"
        assert cluster.router.hints.count("a1") == 1  # the copy it could not take waits for it


async def test_no_live_candidate_raises_unavailable(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    with_states(cluster, a1=DOWN, a2=DOWN)
    with pytest.raises(UnavailableError):
        cluster.router.get(Sink(), 1, key)
    with pytest.raises(UnavailableError):
        cluster.router.set(Sink(), 1, key, b"v", 0)
    assert cluster.router.stats.unavailable == 2


async def test_a_read_batched_before_a_view_change_follows_the_new_view(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"a1's")
    cluster.put("a2", key, b"a2's")
    sink = Sink()
    cluster.router.get(sink, 1, key)  # queued for a1's MGET at the end of this iteration
    with_states(cluster, a1=DOWN)  # a1 marked down before the batch leaves
    assert await sink.answer() == (OK, b"a2's")
    assert cluster.sent("a1") == []


async def test_a_read_rerouted_to_a_view_without_owners_answers_unavailable(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    with_states(cluster, a1=DOWN, a2=DOWN)
    status, message = await sink.answer()
    assert status == UNAVAILABLE and "no aux node is available" in message
    assert cluster.sent("a1") == [] and cluster.sent("a2") == []


# -- LinkBatcher --------------------------------------------------------------------------


def keys_owned_by(c: FakeCluster, n: int, *owners: str) -> list[bytes]:
    keys = [k for k in (b"key:%d" % i for i in range(20 * n + 100)) if c.view.read_candidates(k)[: len(owners)] == list(owners)]
    assert len(keys) >= n
    return keys[:n]


async def test_first_owner_reads_of_one_iteration_leave_as_one_mget(cluster: FakeCluster) -> None:
    keys = keys_owned_by(cluster, 4, "a1", "a2")
    cluster.put("a1", keys[0], b"v0")
    cluster.put("a1", keys[2], b"v2")
    version = cluster.put("a2", keys[3], b"v3")  # a miss on a1, a hit on a2
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.get(sink, rid, key)
    assert cluster.sent("a1") == []  # nothing leaves before the end of the iteration
    answers = [await sink.answer(rid) for rid in range(1, 5)]
    assert answers == [(OK, b"v0"), (OK, None), (OK, b"v2"), (OK, b"v3")]
    assert [(m[0], m[2]) for m in cluster.sent("a1", Op.GET, Op.MGET)] == [(Op.MGET, keys)]
    assert [(m[0], m[2]) for m in cluster.sent("a2")] == [(Op.GETV, keys[1]), (Op.GETV, keys[3])]
    await until(lambda: cluster.entry("a1", keys[3]) == [b"v3", 0, version], what="the repair")


async def test_a_large_mget_or_mset_is_routed_a_slice_per_loop_iteration(cluster: FakeCluster) -> None:
    n = 2 * KEYS_PER_TURN + 10
    keys = [b"key:%d" % i for i in range(n)]
    router = cluster.router
    routed: list[bytes] = []
    set_op, get = router.set_op, router.get

    def counted_set_op(sink: Any, rid: int, args: Any, op: int = Op.SET) -> Any:
        routed.append(args[0])
        return set_op(sink, rid, args, op)

    def counted_get(sink: Any, rid: int, key: bytes) -> Any:
        routed.append(key)
        return get(sink, rid, key)

    router.set_op = counted_set_op  # type: ignore[method-assign]
    router.get = counted_get  # type: ignore[method-assign]
    sink = Sink()
    router.mset(sink, 1, [(k, b"v:" + k) for k in keys], 0)  # type: ignore[arg-type]
    assert len(routed) == KEYS_PER_TURN and (sink.holds, sink.releases) == (1, 0)  # the client's next requests wait
    await asyncio.sleep(0)
    assert routed == keys[: 2 * KEYS_PER_TURN]  # one more slice, in order, after other callbacks ran
    assert await sink.answer(1) == (OK, n) and (sink.holds, sink.releases) == (1, 1)
    routed.clear()
    router.mget(sink, 2, keys)  # type: ignore[arg-type]
    assert len(routed) == KEYS_PER_TURN and (sink.holds, sink.releases) == (2, 1)
    assert await sink.answer(2) == (OK, [b"v:" + k for k in keys]) and routed == keys and (sink.holds, sink.releases) == (2, 2)
    routed.clear()
    router.mget(sink, 3, keys[:KEYS_PER_TURN])  # type: ignore[arg-type]
    assert await sink.answer(3) == (OK, [b"v:" + k for k in keys[:KEYS_PER_TURN]]) and (sink.holds, sink.releases) == (2, 2)


async def test_a_large_mget_whose_client_left_routes_no_more_slices(cluster: FakeCluster) -> None:
    keys = [b"key:%d" % i for i in range(3 * KEYS_PER_TURN)]
    router = cluster.router
    routed: list[bytes] = []
    get = router.get

    def counted_get(sink: Any, rid: int, key: bytes) -> Any:
        routed.append(key)
        return get(sink, rid, key)

    router.get = counted_get  # type: ignore[method-assign]
    sink = Sink()
    router.mget(sink, 1, keys)  # type: ignore[arg-type]
    sink.is_closing = True
    await until(lambda: sink.releases == 1, what="the hold released")
    assert len(routed) == KEYS_PER_TURN


class RoutedPerIteration:
    """Counts the keys a router routes in each loop iteration (``get`` and ``set_op`` wrapped; a callback that reschedules itself)."""

    def __init__(self, cluster: FakeCluster, fail_on: bytes | None = None) -> None:
        router = cluster.router
        self.routed: list[bytes] = []
        self.per_iteration: list[int] = []
        self.stopped = False
        self._last = 0
        set_op, get = router.set_op, router.get

        def counted_set_op(sink: Any, rid: int, args: Any, op: int = Op.SET) -> Any:
            self.routed.append(args[0])
            return set_op(sink, rid, args, op)

        def counted_get(sink: Any, rid: int, key: bytes) -> Any:
            self.routed.append(key)
            if key == fail_on:
                raise RuntimeError("boom")
            return get(sink, rid, key)

        router.set_op = counted_set_op  # type: ignore[method-assign]
        router.get = counted_get  # type: ignore[method-assign]
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.per_iteration.append(len(self.routed) - self._last)
        self._last = len(self.routed)
        if not self.stopped:
            asyncio.get_running_loop().call_soon(self._tick)


async def test_large_mgets_and_msets_of_many_clients_share_one_budget_of_keys_per_loop_iteration(cluster: FakeCluster) -> None:
    """Before: each request scheduled its own slices, and every iteration routed clients x KEYS_PER_TURN keys."""
    n = 2 * KEYS_PER_TURN + 10
    keys = [[b"c%d:%d" % (j, i) for i in range(n)] for j in range(4)]
    count = RoutedPerIteration(cluster)
    router = cluster.router
    sinks = [Sink() for _ in keys]
    router.mset(sinks[0], 1, [(k, b"v:" + k) for k in keys[0]], 0)  # type: ignore[arg-type]
    router.mset(sinks[1], 1, [(k, b"v:" + k) for k in keys[1]], 0)  # type: ignore[arg-type]
    router.mget(sinks[2], 1, keys[0])  # type: ignore[arg-type]
    router.mget(sinks[3], 1, keys[3])  # type: ignore[arg-type]
    assert len(count.routed) == KEYS_PER_TURN  # the first in its handler; the others queued theirs behind it
    assert [s.holds for s in sinks] == [1, 1, 1, 1] and cluster.router.turns.waiting == 4
    answers = [await s.answer(1) for s in sinks]
    count.stopped = True
    assert max(count.per_iteration) <= KEYS_PER_TURN and len(count.routed) == 4 * n
    assert answers[:2] == [(OK, n), (OK, n)] and answers[3] == (OK, [None] * n)
    assert answers[2][0] == OK and len(answers[2][1]) == n  # (read while the MSET it follows is still routed: another client's)
    assert [(s.holds, s.releases) for s in sinks] == [(1, 1)] * 4
    routed_by = [k.split(b":")[0] for k in count.routed[::KEYS_PER_TURN]]
    assert routed_by[:5] == [b"c0", b"c0", b"c1", b"c0", b"c3"]  # the handler's slice, then one slice each, in turn


async def test_a_small_mget_is_routed_in_its_handler_while_large_requests_wait(cluster: FakeCluster) -> None:
    keys = [b"key:%d" % i for i in range(2 * KEYS_PER_TURN)]
    count = RoutedPerIteration(cluster)
    big, small = Sink(), Sink()
    cluster.router.mget(big, 1, keys)  # type: ignore[arg-type]
    cluster.router.mget(small, 1, keys[:KEYS_PER_TURN])  # type: ignore[arg-type]
    assert len(count.routed) == 2 * KEYS_PER_TURN and small.holds == 0
    assert (await small.answer(1))[0] == OK and (await big.answer(1))[0] == OK
    count.stopped = True


async def test_a_client_that_leaves_during_its_turn_costs_the_others_no_budget(cluster: FakeCluster) -> None:
    keys = [[b"c%d:%d" % (j, i) for i in range(3 * KEYS_PER_TURN)] for j in range(3)]
    count = RoutedPerIteration(cluster)
    sinks = [Sink() for _ in keys]
    for sink, ks in zip(sinks, keys, strict=True):
        cluster.router.mget(sink, 1, ks)  # type: ignore[arg-type]
    sinks[1].is_closing = True  # it leaves before its first turn
    assert [(await sinks[i].answer(1))[0] for i in (0, 2)] == [OK, OK]
    await until(lambda: sinks[1].releases == 1, what="the leaver's hold released")
    count.stopped = True
    assert len(count.routed) == 2 * 3 * KEYS_PER_TURN and not any(k.startswith(b"c1:") for k in count.routed)
    assert max(count.per_iteration) <= KEYS_PER_TURN
    assert 1 not in sinks[1].answers


async def test_a_slice_that_raises_answers_its_own_request_and_the_others_go_on(cluster: FakeCluster) -> None:
    keys = [[b"c%d:%d" % (j, i) for i in range(2 * KEYS_PER_TURN + 10)] for j in range(3)]
    RoutedPerIteration(cluster, fail_on=keys[1][KEYS_PER_TURN + 1]).stopped = True  # b's second slice raises
    sinks = [Sink() for _ in keys]
    for sink, ks in zip(sinks, keys, strict=True):
        cluster.router.mget(sink, 1, ks)  # type: ignore[arg-type]
    a, b, c = [await s.answer(1) for s in sinks]
    assert a == (OK, [None] * len(keys[0])) and c == (OK, [None] * len(keys[2]))
    assert b[0] == int(Status.INTERNAL)
    assert [(s.holds, s.releases) for s in sinks] == [(1, 1)] * 3


async def test_each_first_owner_gets_its_own_mget(cluster: FakeCluster) -> None:
    by_node = {n: keys_owned_by(cluster, 2, n) for n in ("a1", "a2", "a3")}
    sink = Sink()
    rid = 0
    for keys in by_node.values():
        for key in keys:
            rid += 1
            cluster.router.get(sink, rid, key)
    for r in range(1, rid + 1):
        assert await sink.answer(r) == (OK, None)
    for node, keys in by_node.items():
        assert [(m[0], m[2]) for m in cluster.sent(node, Op.GET, Op.MGET)] == [(Op.MGET, keys)]


async def test_a_lone_read_leaves_as_a_get(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1")
    sink = Sink()
    cluster.router.get(sink, 1, key)
    await sink.answer()
    assert [(m[0], m[2]) for m in cluster.sent("a1")] == [(Op.GET, key)]


async def test_a_full_batch_leaves_at_once(cluster: FakeCluster) -> None:
    n = LinkBatcher.MAX_BATCH
    keys = keys_owned_by(cluster, n + 1, "a1")
    sink = Sink()
    for rid, key in enumerate(keys[:n], 1):
        cluster.router.get(sink, rid, key)
    sent = cluster.sent("a1", Op.MGET)
    assert len(sent) == 1 and sent[0][2] == keys[:n]  # written already, within this iteration
    cluster.router.get(sink, n + 1, keys[n])
    for rid in range(1, n + 2):
        assert await sink.answer(rid) == (OK, None)
    assert [(m[0], m[2]) for m in cluster.sent("a1", Op.GET, Op.MGET)][1:] == [(Op.GET, keys[n])]


async def test_an_mget_answer_too_large_for_a_frame_is_split_into_gets(cluster: FakeCluster) -> None:
    keys = keys_owned_by(cluster, 3, "a1")
    for key in keys:
        cluster.put("a1", key, b"value of " + key)
    cluster.overrides[("a1", Op.MGET)] = answer_with(int(Status.FRAME_TOO_LARGE), "too large")
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.get(sink, rid, key)
    for rid, key in enumerate(keys, 1):
        assert await sink.answer(rid) == (OK, b"value of " + key)
    assert [m[0] for m in cluster.sent("a1")] == [Op.MGET, Op.GET, Op.GET, Op.GET]
    assert cluster.router.stats.fallbacks == 0


@pytest.mark.parametrize("bad", [Reply(OK, [b"only one value"]), Reply(OK, "not a list"), Reply(UNAVAILABLE, "gone")])
async def test_a_failed_or_malformed_mget_sends_every_read_to_the_next_owner(cluster: FakeCluster, bad: Reply) -> None:
    keys = keys_owned_by(cluster, 2, "a1", "a2")
    for key in keys:
        cluster.put("a2", key, b"from a2")
    cluster.overrides[("a1", Op.MGET)] = lambda msg: bad
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.get(sink, rid, key)
    for rid in (1, 2):
        assert await sink.answer(rid) == (OK, b"from a2")
    assert cluster.router.stats.fallbacks == 2
    assert cluster.sent("a1", Op.APPLY) == []  # an error is not a miss: nothing to repair


# -- writes: acknowledgement rules ---------------------------------------------------------


async def test_a_write_reaches_every_owner_with_one_version(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    sink = Sink()
    cluster.router.set(sink, 1, key, b"v", 0)
    assert await sink.answer() == (OK, True)
    e1, e2 = cluster.entry("a1", key), cluster.entry("a2", key)
    assert e1 is not None and e1 == e2 and e1[0] == b"v"
    assert cluster.sent("a3") == []
    assert cluster.router.hints.total() == 0 and cluster.router.stats.partial_writes == 0


async def test_a_delete_answers_whether_any_owner_held_the_key(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")
    sink = Sink()
    cluster.router.delete(sink, 1, key)
    assert await sink.answer(1) == (OK, True)
    assert cluster.entry("a2", key) is None
    cluster.router.delete(sink, 2, key)
    assert await sink.answer(2) == (OK, False)
    assert [m[0] for m in cluster.sent("a1")] == [Op.DELV, Op.DELV]


async def test_an_owner_that_cannot_be_reached_gets_a_hint_replayed_when_it_can() -> None:
    async with FakeCluster() as cluster:
        key = cluster.key_owned_by("a1", "a2")
        cluster.overrides[("a2", Op.SETV)] = answer_with(UNAVAILABLE, "connection lost")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (OK, True)  # a1 applied it: the write is not failed
        assert cluster.router.stats.partial_writes == 1
        # a2 is not suspected: the hint is replayed at once, as an APPLY with the write's version
        await until(lambda: "a2" not in cluster.router.hints, what="the hint replay")
        assert cluster.entry("a2", key) == cluster.entry("a1", key)
        assert cluster.router.hints.replayed_total == 1


@pytest.mark.parametrize(("quorum", "expected"), [(0, OK), (1, OK), (2, UNAVAILABLE)])
async def test_write_quorum(quorum: int, expected: int) -> None:
    async with FakeCluster(write_quorum=quorum) as cluster:
        key = cluster.key_owned_by("a1", "a2")
        cluster.overrides[("a2", Op.SETV)] = answer_with(TIMEOUT, "slow")
        cluster.overrides[("a2", Op.APPLY)] = lambda msg: None  # a2 takes no replay either
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        status, result = await sink.answer()
        assert status == expected
        if expected == OK:
            assert result is True and cluster.router.hints.count("a2") == 1
        else:
            assert result == "the write reached 1 of the 2 owners the quorum needs"


async def test_no_owner_applying_the_write_answers_unavailable(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.overrides[("a1", Op.SETV)] = answer_with(UNAVAILABLE, "gone")
    cluster.overrides[("a2", Op.SETV)] = answer_with(TIMEOUT, "slow")
    sink = Sink()
    cluster.router.set(sink, 1, key, b"v", 0)
    status, message = await sink.answer()
    assert status == UNAVAILABLE and "no owner of the key applied the write" in message
    assert cluster.router.hints.total() == 0  # nothing was applied anywhere: nothing to hand off
    assert cluster.router.stats.unavailable == 1


async def test_an_owner_error_is_answered_as_is(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.overrides[("a2", Op.SETV)] = answer_with(int(Status.OUT_OF_MEMORY), "full")
    sink = Sink()
    cluster.router.set(sink, 1, key, b"v", 0)
    assert await sink.answer() == (int(Status.OUT_OF_MEMORY), "full")
    assert sink.ops[1] == Op.SET


async def test_an_owner_holding_a_newer_version_makes_the_router_retry_once_with_a_newer_one(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    held = cluster.future_version()
    cluster.put("a1", key, b"from the future", held)
    sink = Sink()
    cluster.router.set(sink, 1, key, b"v", 0)
    assert await sink.answer() == (OK, True)
    first, retry = (m[6] for m in cluster.sent("a1", Op.SETV))
    assert first < held < retry  # the receive rule: the router's clock moved past what a1 held
    assert cluster.entry("a1", key) == cluster.entry("a2", key) == [b"v", 0, retry]
    assert len(cluster.sent("a2", Op.SETV)) == 2
    assert cluster.router.stats.superseded_retries == 1 and cluster.router.stats.superseded == 0


async def test_a_write_superseded_twice_is_not_acknowledged(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    newer = [cluster.future_version(1000)]

    def always_newer(msg: list[Any]) -> Reply:
        newer[0] = elsewhere(max(newer[0], msg[6]))  # a concurrent writer on another master stays one ms ahead
        return Reply(OK, [2, newer[0]])

    cluster.overrides[("a1", Op.SETV)] = always_newer
    sink = Sink()
    cluster.router.set(sink, 1, key, b"v", 0)
    status, message = await sink.answer()
    assert status == int(Status.SUPERSEDED) and "did not take effect" in message
    assert len(cluster.sent("a1", Op.SETV)) == 2  # one retry, no more
    assert cluster.router.stats.superseded_retries == 1 and cluster.router.stats.superseded == 1


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_request_refused_as_routed_by_an_older_ring_fails_without_hints_and_reads_the_ring_again(replicas: int) -> None:
    """An owner's floor is newer than this master's ring (it was paused while a migration began): nothing is acknowledged."""
    async with FakeCluster(replicas=replicas) as cluster:
        behind: list[int] = []
        cluster.router.ring_behind = lambda: behind.append(1)
        key = cluster.key_owned_by(*("a1", "a2")[:replicas])
        refused = answer_with(int(Status.STALE_RING), "this write was routed by ring epoch 1, and this node takes writes routed by epoch 2")
        for op in (Op.SETV, Op.MSETV, Op.DELV, Op.GET, Op.MGET):
            cluster.overrides[("a1", op)] = refused
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        cluster.router.delete(sink, 2, key)
        cluster.router.get(sink, 3, key)  # a1 is the first owner: not read past, the refusal is the answer
        for rid in (1, 2, 3):
            status, message = await sink.answer(rid)
            assert status == int(Status.STALE_RING) and "routed by ring epoch 1" in message
        assert cluster.router.hints.total() == 0 and cluster.router.stats.partial_writes == 0
        assert cluster.router.stats.stale_ring == 3 and behind == [1, 1, 1]


# A write with one owner is its own callback (``WriteOp.__call__``): the same rules, without the fan-out.


async def test_one_owner_write_is_acknowledged_and_stored() -> None:
    async with FakeCluster(replicas=1) as cluster:
        key = cluster.key_owned_by("a1")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (OK, True)
        assert cluster.value("a1", key) == b"v"
        cluster.router.delete(sink, 2, key)
        assert await sink.answer(2) == (OK, True)
        cluster.router.delete(sink, 3, key)
        assert await sink.answer(3) == (OK, False)  # DELETE answers whether the owner held the key


async def test_one_owner_write_superseded_once_is_retried_and_twice_is_not_acknowledged() -> None:
    async with FakeCluster(replicas=1) as cluster:
        key = cluster.key_owned_by("a1")
        held = cluster.future_version()
        cluster.put("a1", key, b"from the future", held)
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (OK, True)
        first, retry = (m[6] for m in cluster.sent("a1", Op.SETV))
        assert first < held < retry and cluster.entry("a1", key) == [b"v", 0, retry]
        newer = [cluster.future_version(1000)]

        def always_newer(msg: list[Any]) -> Reply:
            newer[0] = elsewhere(max(newer[0], msg[6]))
            return Reply(OK, [2, newer[0]])

        cluster.overrides[("a1", Op.SETV)] = always_newer
        cluster.router.set(sink, 2, key, b"w", 0)
        status, message = await sink.answer(2)
        assert status == int(Status.SUPERSEDED) and "did not take effect" in message
        assert cluster.router.stats.superseded_retries == 2 and cluster.router.stats.superseded == 1


@pytest.mark.parametrize(("quorum", "expected"), [(1, OK), (2, UNAVAILABLE)])
async def test_one_owner_write_quorum(quorum: int, expected: int) -> None:
    async with FakeCluster(replicas=1, write_quorum=quorum) as cluster:
        key = cluster.key_owned_by("a1")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        status, result = await sink.answer()
        assert status == expected
        assert result is True if expected == OK else result == "the write reached 1 of the 2 owners the quorum needs"


async def test_one_owner_write_errors_are_answered() -> None:
    async with FakeCluster(replicas=1) as cluster:
        key = cluster.key_owned_by("a1")
        cluster.overrides[("a1", Op.SETV)] = answer_with(int(Status.OUT_OF_MEMORY), "full")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (int(Status.OUT_OF_MEMORY), "full")
        cluster.overrides[("a1", Op.SETV)] = answer_with(UNAVAILABLE, "gone")
        cluster.router.set(sink, 2, key, b"v", 0)
        status, message = await sink.answer(2)
        assert status == UNAVAILABLE and "no owner of the key applied the write: gone" in message
        assert cluster.router.hints.total() == 0


async def test_a_suspected_owner_is_not_waited_for_and_gets_its_hints_when_it_answers_again() -> None:
    async with FakeCluster(suspect_after=0.25) as cluster:
        key = cluster.key_owned_by("a1", "a2")
        await cluster.make_suspect("a2")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (OK, True)
        assert cluster.sent("a2", Op.SETV) == []
        assert cluster.router.hints.count("a2") == 1 and cluster.router.stats.partial_writes == 1
        assert not cluster.router.trusted("a2")
        await cluster.recover("a2")
        await until(lambda: "a2" not in cluster.router.hints, what="the hint replay")
        assert cluster.recovered == ["a2"]
        assert cluster.entry("a2", key) == cluster.entry("a1", key) is not None
        assert cluster.router.trusted("a2")


async def test_with_every_owner_suspected_the_write_is_still_tried_on_all() -> None:
    async with FakeCluster(suspect_after=0.1) as cluster:
        key = cluster.key_owned_by("a1", "a2")
        await cluster.make_suspect("a1")
        await cluster.make_suspect("a2")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        status, _ = await sink.answer()  # the suspected links time the requests out at once
        assert status == UNAVAILABLE
        assert len(cluster.sent("a1", Op.SETV)) == len(cluster.sent("a2", Op.SETV)) == 1


async def test_an_owner_that_is_not_connected_gets_a_hint() -> None:
    cluster = FakeCluster()
    cluster.fake.refused.add("a2")
    async with cluster:
        key = cluster.key_owned_by("a1", "a2")
        sink = Sink()
        cluster.router.set(sink, 1, key, b"v", 0)
        assert await sink.answer() == (OK, True)
        assert cluster.router.hints.count("a2") == 1


async def test_expire_answers_true_if_any_owner_held_the_key(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")
    sink = Sink()
    cluster.router.expire(sink, 1, key, 60_000)  # type: ignore[arg-type]
    assert await sink.answer(1) == (OK, True)
    cluster.router.expire(sink, 2, b"missing everywhere", 60_000)  # type: ignore[arg-type]
    assert await sink.answer(2) == (OK, False)


async def test_persist_removes_the_expiry_on_every_owner(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"v", expires_at=wall_ms() + 60_000)
    cluster.put("a2", key, b"v", expires_at=wall_ms() + 60_000)
    sink = Sink()
    cluster.router.persist(sink, 1, key)  # type: ignore[arg-type]
    assert await sink.answer(1) == (OK, True)
    assert cluster.auxes["a1"].cache.ttl_ms(key) == -1 and cluster.auxes["a2"].cache.ttl_ms(key) == -1
    cluster.router.persist(sink, 2, key)  # type: ignore[arg-type]
    assert await sink.answer(2) == (OK, False)  # no expiry left to remove


# -- MGET and MSET: several ops, one answer --------------------------------------------------


async def test_mget_answers_every_key_in_order(cluster: FakeCluster) -> None:
    keys = [cluster.key_owned_by("a1"), cluster.key_owned_by("a2"), cluster.key_owned_by("a3"), b"missing"]
    for key in keys[:3]:
        cluster.put(cluster.view.read_candidates(key)[0], key, b"v:" + key)
    sink = Sink()
    cluster.router.mget(sink, 9, keys)  # type: ignore[arg-type]
    assert await sink.answer(9) == (OK, [b"v:" + k for k in keys[:3]] + [None])
    cluster.router.mget(sink, 10, [])  # type: ignore[arg-type]
    assert sink.answers[10] == [(OK, [])]


async def test_mget_answers_the_first_error_once(cluster: FakeCluster) -> None:
    k1, k2 = keys_owned_by(cluster, 2, "a1")
    cluster.overrides[("a1", Op.MGET)] = answer_with(int(Status.INTERNAL), "broken")
    sink = Sink()
    cluster.router.mget(sink, 3, [k1, k2])  # type: ignore[arg-type]
    assert await sink.answer(3) == (int(Status.INTERNAL), "broken")
    assert sink.ops[3] == Op.MGET


async def test_mset_counts_the_pairs_stored_on_every_owner(cluster: FakeCluster) -> None:
    pairs = [(b"key:%d" % i, b"v%d" % i) for i in range(10)]
    sink = Sink()
    cluster.router.mset(sink, 4, pairs, 0)  # type: ignore[arg-type]
    assert await sink.answer(4) == (OK, 10)
    for key, value in pairs:
        for node in cluster.view.write_targets(key):
            assert cluster.value(node, key) == value
    cluster.router.mset(sink, 5, [], 0)  # type: ignore[arg-type]
    assert sink.answers[5] == [(OK, 0)]


async def test_mset_answers_the_first_failed_pair_once(cluster: FakeCluster) -> None:
    pairs = [(k, b"v") for k in keys_owned_by(cluster, 3, "a1")]
    # a1 refuses the batch as a whole (MSETV), then each write on its own (SETV)
    cluster.overrides[("a1", Op.MSETV)] = cluster.overrides[("a1", Op.SETV)] = answer_with(int(Status.OUT_OF_MEMORY), "full")
    sink = Sink()
    cluster.router.mset(sink, 6, pairs, 0)  # type: ignore[arg-type]
    assert await sink.answer(6) == (int(Status.OUT_OF_MEMORY), "full")
    await until(lambda: not any(link.in_flight for link in cluster.links.values()))
    assert len(sink.answers[6]) == 1


# -- SETs of one loop iteration as one MSETV per node -----------------------------------------


async def test_the_sets_of_one_iteration_leave_as_one_msetv_per_node(cluster: FakeCluster) -> None:
    keys = keys_owned_by(cluster, 5, "a1", "a2")
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.set(sink, rid, key, b"v" + key, 0)
    for rid in range(1, 6):
        assert await sink.answer(rid) == (OK, True)
    for node in ("a1", "a2"):
        sent = cluster.sent(node)
        assert [m[0] for m in sent] == [Op.MSETV], sent
        assert [e[0] for e in sent[0][2]] == keys  # in the order they were made
        assert all(cluster.value(node, k) == b"v" + k for k in keys)


async def test_msetv_answers_each_write_on_its_own(cluster: FakeCluster) -> None:
    """One key of the batch is held with a newer version on a1: that write alone is retried, the others are acknowledged at once."""
    keys = keys_owned_by(cluster, 3, "a1", "a2")
    held = cluster.future_version()
    cluster.put("a1", keys[1], b"from the future", held)
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.set(sink, rid, key, b"new", 0)
    for rid in range(1, 4):
        assert await sink.answer(rid) == (OK, True)
    assert cluster.router.stats.superseded_retries == 1
    for key in keys:
        assert cluster.value("a1", key) == cluster.value("a2", key) == b"new"
    entry = cluster.entry("a1", keys[1])
    assert entry is not None and entry[2] > held  # the retry's version is newer than what a1 held


async def test_a_node_that_refuses_msetv_gets_each_write_as_a_setv(cluster: FakeCluster) -> None:
    keys = keys_owned_by(cluster, 3, "a1")
    cluster.overrides[("a1", Op.MSETV)] = answer_with(int(Status.UNKNOWN_OP), "unknown op 42")  # an older aux node
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.set(sink, rid, key, b"v", 0)
    for rid in range(1, 4):
        assert await sink.answer(rid) == (OK, True)
    assert [m[0] for m in cluster.sent("a1")] == [Op.MSETV, Op.SETV, Op.SETV, Op.SETV]
    assert all(cluster.value("a1", k) == b"v" for k in keys)


@pytest.mark.parametrize("status", [UNAVAILABLE, TIMEOUT])
async def test_a_lost_msetv_is_a_missed_owner_for_each_write(cluster: FakeCluster, status: int) -> None:
    keys = keys_owned_by(cluster, 3, "a1", "a2")
    cluster.overrides[("a2", Op.MSETV)] = answer_with(status, "a2 is gone")
    cluster.overrides[("a2", Op.APPLY)] = lambda msg: None  # no replay either
    sink = Sink()
    for rid, key in enumerate(keys, 1):
        cluster.router.set(sink, rid, key, b"v", 0)
    for rid in range(1, 4):
        assert await sink.answer(rid) == (OK, True)  # a1 applied each: hinted for a2
    assert cluster.router.stats.partial_writes == 3


async def test_requests_to_a_node_leave_in_the_order_they_were_made(cluster: FakeCluster) -> None:
    """SET k, GET k, DELETE k, SET k2 in one iteration: the held SET leaves before the read, the read before the next write."""
    k, k2 = keys_owned_by(cluster, 2, "a1")
    sink = Sink()
    cluster.router.set(sink, 1, k, b"first", 0)
    cluster.router.get(sink, 2, k)
    cluster.router.delete(sink, 3, k)
    cluster.router.set(sink, 4, k2, b"second", 0)
    assert await sink.answer(1) == (OK, True)
    assert await sink.answer(2) == (OK, b"first")  # the read saw the write made before it
    assert await sink.answer(3) == (OK, True)  # and the delete came after both
    assert await sink.answer(4) == (OK, True)
    assert [m[0] for m in cluster.sent("a1")] == [Op.SETV, Op.GET, Op.DELV, Op.SETV]
    assert cluster.value("a1", k) is None and cluster.value("a1", k2) == b"second"


async def test_mset_with_a_key_no_node_can_take_answers_unavailable(cluster: FakeCluster) -> None:
    with_states(cluster, a1=DOWN, a2=DOWN, a3=DOWN)
    sink = Sink()
    cluster.router.mset(sink, 7, [(b"k1", b"v"), (b"k2", b"v")], 0)  # type: ignore[arg-type]
    assert sink.answers[7] == [(UNAVAILABLE, "no aux node is available for this key")]


# -- EXISTS, TTL, TOUCH ---------------------------------------------------------------------


async def test_exists_and_ttl_read_the_entry(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")  # found on the second owner
    sink = Sink()
    cluster.router.exists(sink, 1, key)  # type: ignore[arg-type]
    cluster.router.ttl(sink, 2, key)  # type: ignore[arg-type]
    cluster.router.exists(sink, 3, b"missing")  # type: ignore[arg-type]
    cluster.router.ttl(sink, 4, b"missing")  # type: ignore[arg-type]
    assert [await sink.answer(rid) for rid in (1, 2, 3, 4)] == [(OK, True), (OK, -1), (OK, False), (OK, -2)]
    assert sink.ops[1] == Op.EXISTS


async def test_touch_asks_the_first_owner_that_answers(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")
    cluster.overrides[("a1", Op.TOUCH)] = answer_with(UNAVAILABLE)
    assert await cluster.router.touch(key) is True
    cluster.overrides[("a2", Op.TOUCH)] = answer_with(TIMEOUT)
    with pytest.raises(UnavailableError):
        await cluster.router.touch(key)


# -- SET NX/XX and INCR: decided by the first live owner, copied to the others ---------------------


async def test_set_nx_is_decided_by_the_first_owner_and_copied_with_its_version(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    assert await cluster.router.set_if(key, b"v", 0, SetFlag.NX) is True
    e1 = cluster.entry("a1", key)
    assert e1 is not None and cluster.entry("a2", key) == e1
    assert await cluster.router.set_if(key, b"other", 0, SetFlag.NX) is False
    assert cluster.entry("a1", key) == cluster.entry("a2", key) == e1
    assert len(cluster.sent("a2", Op.APPLY)) == 1  # the failed condition copied nothing
    assert await cluster.router.set_if(b"missing", b"v", 0, SetFlag.XX) is False


async def test_set_if_on_a_key_held_with_a_newer_version_is_superseded(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"newer", cluster.future_version())
    with pytest.raises(SupersededError):
        await cluster.router.set_if(key, b"v", 0, SetFlag.XX)
    assert cluster.router.stats.superseded == 1
    assert cluster.value("a1", key) == b"newer"


async def test_set_if_with_its_first_owner_unreachable_is_unavailable(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.overrides[("a1", Op.SETV)] = answer_with(UNAVAILABLE)
    with pytest.raises(UnavailableError):
        await cluster.router.set_if(key, b"v", 0, SetFlag.NX)
    assert cluster.sent("a2") == []


async def test_a_copy_an_owner_cannot_take_becomes_a_hint(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.overrides[("a2", Op.APPLY)] = answer_with(UNAVAILABLE)
    assert await cluster.router.set_if(key, b"v", 0, SetFlag.NX) is True
    assert cluster.router.hints.count("a2") == 1 and cluster.router.stats.partial_writes == 1


async def test_incr_adds_on_the_first_owner_and_copies_the_result(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    assert await cluster.router.incr(key, 5) == 5
    assert await cluster.router.incr(key, -2) == 3
    e1 = cluster.entry("a1", key)
    assert e1 is not None and e1[0] == b"3" and cluster.entry("a2", key) == e1
    assert [m[0] for m in cluster.sent("a1")] == [Op.INCRV, Op.INCRV]
    cluster.put(cluster.view.read_candidates(b"text")[0], b"text", b"abc")
    with pytest.raises(NotAnIntegerError):
        await cluster.router.incr(b"text", 1)


# -- restore and cluster-wide reads ----------------------------------------------------------


async def test_apply_entries_copies_to_every_owner_and_counts_what_first_owners_took(cluster: FakeCluster) -> None:
    k_new = cluster.key_owned_by("a1", "a2")
    k_old = cluster.key_owned_by("a2", "a3")
    old = cluster.clock.next()
    cluster.put("a2", k_old, b"newer", cluster.future_version())
    new = cluster.clock.next()
    assert await cluster.router.apply_entries([(k_new, b"v1", 0, new), (k_old, b"stale", 0, old)]) == 1
    assert cluster.entry("a1", k_new) == cluster.entry("a2", k_new) == [b"v1", 0, new]
    assert cluster.value("a2", k_old) == b"newer"
    assert cluster.entry("a3", k_old) == [b"stale", 0, old]  # last writer wins per node


async def test_apply_entries_without_owners_is_unavailable(cluster: FakeCluster) -> None:
    with_states(cluster, a1=DOWN, a2=DOWN, a3=DOWN)
    with pytest.raises(UnavailableError):
        await cluster.router.apply_entries([(b"k", b"v", 0, cluster.clock.next())])


async def test_gather_stats_leaves_out_nodes_that_are_down_or_do_not_answer_in_time(cluster: FakeCluster) -> None:
    with_states(cluster, a3=DOWN)
    cluster.held.add("a2")
    stats = await cluster.router.gather_stats(timeout=0.2)
    assert list(stats) == ["a1"]
    assert stats["a1"]["node_id"] == "a1"
    assert cluster.sent("a3") == []


# -- reads that ask every owner (a rebuilt ring being reconciled) --------------------------


async def test_reading_every_owner_answers_the_newest_version_and_repairs_the_owner_behind(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"old")
    new = cluster.put("a2", key, b"new")
    cluster.router.read_every_owner = True
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"new")
    assert cluster.entry("a1", key) == [b"new", 0, new]  # written back before the answer, last writer wins
    assert [m[0] for m in cluster.sent("a1")] == [Op.GETV, Op.APPLY]
    assert [m[0] for m in cluster.sent("a2")] == [Op.GETV]
    assert cluster.sent("a3") == []


async def test_reading_every_owner_lets_a_newer_tombstone_win_over_an_older_value(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"old")
    cluster.put("a2", key, b"old")
    assert cluster.auxes["a2"].cache.delete(key, version=cluster.clock.next())  # a delete a1 missed
    cluster.router.read_every_owner = True
    sink = Sink()
    cluster.router.read_entry(sink, 1, key)  # EXISTS and TTL read this way
    assert await sink.answer() == (OK, None)
    assert cluster.value("a2", key) is None  # the repair did not bring the old value back over the tombstone
    assert [m[0] for m in cluster.sent("a2")] == [Op.GETV, Op.APPLY, Op.GETV]


async def test_reading_every_owner_answers_a_write_that_overtook_the_repair(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"old")
    cluster.put("a2", key, b"older", cluster.clock.next() - (1 << 30))
    newer = cluster.future_version()

    def write_then_apply(msg: list[Any]) -> Reply:  # a newer write reaches a2 between the read and the repair
        cluster.put("a2", key, b"newest", newer)
        return Reply(OK, cluster.auxes["a2"].execute(msg))

    cluster.overrides[("a2", Op.APPLY)] = write_then_apply
    cluster.router.read_every_owner = True
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"newest")


async def test_reading_every_owner_leaves_out_an_owner_that_does_not_answer(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")
    cluster.overrides[("a1", Op.GETV)] = answer_with(UNAVAILABLE, "a1 is gone")
    cluster.router.read_every_owner = True
    sink = Sink()
    cluster.router.get(sink, 1, key)
    assert await sink.answer() == (OK, b"v")
    cluster.overrides[("a2", Op.GETV)] = answer_with(TIMEOUT, "a2 is slow")
    cluster.router.get(sink, 2, key)
    status, why = await sink.answer(2)
    assert status == UNAVAILABLE and "no owner of the key answered" in why


async def test_an_mget_reads_every_owner_of_each_key_while_asked_to(cluster: FakeCluster) -> None:
    keys = [cluster.key_owned_by("a1", "a2"), cluster.key_owned_by("a2", "a3")]
    cluster.put("a1", keys[0], b"old")
    cluster.put("a2", keys[0], b"new")
    cluster.put("a3", keys[1], b"only on a3")
    cluster.router.read_every_owner = True
    sink = Sink()
    cluster.router.mget(sink, 1, keys)  # type: ignore[arg-type]
    assert await sink.answer() == (OK, [b"new", b"only on a3"])
    assert cluster.sent("a1", Op.MGET, Op.GET) == []  # no first-owner batch: every owner is asked with GETV


# -- ops one owner decides, while reads ask every owner: decided on the newest version ---------------


async def test_incr_on_a_stale_first_owner_adds_to_the_newest_value(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"5")  # a1 missed the write of 10
    cluster.put("a2", key, b"10")
    cluster.router.read_every_owner = True
    assert await cluster.router.incr(key, 1) == 11  # not 6, which would overwrite 10 everywhere
    e1 = cluster.entry("a1", key)
    assert e1 is not None and e1[0] == b"11" and cluster.entry("a2", key) == e1
    assert [m[0] for m in cluster.sent("a1")][:2] == [Op.GETV, Op.APPLY]  # brought up to 10 before the add


async def test_set_nx_and_xx_on_a_first_owner_that_missed_the_key_see_the_newest_value(cluster: FakeCluster) -> None:
    nx = cluster.key_owned_by("a1", "a2")
    new = cluster.put("a2", nx, b"kept")  # a1 missed it
    cluster.router.read_every_owner = True
    assert await cluster.router.set_if(nx, b"lost", 0, SetFlag.NX) is False
    assert cluster.entry("a1", nx) == cluster.entry("a2", nx) == [b"kept", 0, new]
    xx = cluster.key_owned_by("a2", "a3")
    cluster.put("a3", xx, b"old")
    assert await cluster.router.set_if(xx, b"replaced", 0, SetFlag.XX) is True
    assert cluster.value("a2", xx) == cluster.value("a3", xx) == b"replaced"


async def test_an_op_one_owner_decides_is_decided_by_the_owner_holding_a_newer_tombstone(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"5")
    cluster.put("a2", key, b"5")
    assert cluster.auxes["a2"].cache.delete(key, version=cluster.clock.next())  # a delete a1 missed
    cluster.router.read_every_owner = True
    assert await cluster.router.incr(key, 1) == 1  # the deleted key counts as 0, not 5
    assert cluster.value("a1", key) == cluster.value("a2", key) == b"1"
    assert [m[0] for m in cluster.sent("a2")][-2:] == [Op.GETV, Op.INCRV]


async def test_touch_on_a_first_owner_that_missed_the_key_finds_it(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a2", key, b"v")
    cluster.router.read_every_owner = True
    assert await cluster.router.touch(key) is True
    assert cluster.value("a1", key) == b"v"


async def test_ops_one_owner_decides_read_nothing_first_when_reads_ask_one_owner(cluster: FakeCluster) -> None:
    key = cluster.key_owned_by("a1", "a2")
    cluster.put("a1", key, b"5")
    cluster.put("a2", key, b"10")
    assert await cluster.router.incr(key, 1) == 6  # the normal path: the first owner decides (no GETV)
    assert await cluster.router.set_if(key, b"v", 0, SetFlag.XX) is True
    assert await cluster.router.touch(key) is True
    assert cluster.sent("a1", Op.GETV) == [] and cluster.sent("a2", Op.GETV) == []
