"""Near-cache tracking on a real (never started) aux node, through its own protocol on fake transports.

A "master" is a connection that subscribed keys with ``GETV [key, true]``;
a "client" is another connection that writes them. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import msgpack

from dcache.auxnode.node import AuxNode
from dcache.auxnode.tracking import GONE
from dcache.config import AuxConfig
from dcache.master.nearcache import NearCache
from dcache.protocol import HEADER, PUSH_ID, Op, Push
from dcache.protocol.limits import PUSH_VALUE_MAX_BYTES
from dcache.ring import RING_SIZE
from tests.fakes import FakeTransport

WAIT_S = 5.0


class Wire:
    """One connection to ``node``: requests in, answers and pushes out."""

    def __init__(self, node: AuxNode) -> None:
        self.proto = node.protocol_factory()
        self.transport = FakeTransport()
        self.transport.protocol = self.proto  # close() reports the loss, as a real transport does
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]
        self._rid = 0

    def send(self, *msgs: list[Any]) -> list[int]:
        """Send requests ``[op, *args]`` in one read; their request ids."""
        rids, out = [], []
        for op, *args in msgs:
            self._rid += 1
            rids.append(self._rid)
            body = msgpack.packb([int(op), self._rid, *args], use_bin_type=True)
            out.append(HEADER.pack(len(body)) + body)
        self.proto.data_received(b"".join(out))
        return rids

    def call(self, op: Op, *args: Any) -> int:
        [rid] = self.send([op, *args])
        return rid

    def answers(self) -> dict[int, list[Any]]:
        return {f[0]: f for f in self.transport.frames() if f[0] != PUSH_ID}

    def answer(self, rid: int) -> Any:
        frame = self.answers()[rid]
        assert frame[1] == 0, frame
        return frame[2]

    def pushes(self) -> list[list[Any]]:
        """The payloads ``[seq, [[key, version], ...]]`` of the INVALIDATE pushes received."""
        out = [f for f in self.transport.frames() if f[0] == PUSH_ID]
        assert all(f[1] == int(Push.INVALIDATE) for f in out)
        return [f[2] for f in out]


async def until(cond: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (got := cond()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)
    return got


async def settle() -> None:
    """A few loop iterations: a round's push is formed at the end of one and flushed in the next."""
    for _ in range(5):
        await asyncio.sleep(0)


def make_node(**kw: Any) -> AuxNode:
    return AuxNode(AuxConfig(node_id="t-aux", **kw))


def subscribe(master: Wire, *keys: bytes) -> None:
    for key in keys:
        rid = master.call(Op.GETV, key, True)
        assert master.answer(rid) is not None, key


async def test_a_write_to_a_tracked_key_is_answered_after_the_subscriber_acknowledged() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    assert client.answer(client.call(Op.SET, b"k", b"v1")) is True
    subscribe(master, b"k")
    assert node.tracker.stats()["tracked_keys"] == 1

    rid = client.call(Op.SET, b"k", b"v2")
    [push] = await until(master.pushes, "the INVALIDATE push")
    seq, items = push
    [[key, version]] = items
    assert seq == 1 and key == b"k"
    assert master.answer(master.call(Op.GETV, b"k"))[2] == version  # the push names the new version
    await settle()
    assert rid not in client.answers()  # held: the master may still serve v1

    master.call(Op.INVACK, seq)
    assert client.answer(rid) is True
    st = node.tracker.stats()
    assert (st["invalidation_pushes"], st["invalidations"], st["answers_held_for_invalidation"]) == (1, 1, 1)
    assert st["tracked_keys"] == 0  # a subscription ends at the change

    rid = client.call(Op.SET, b"k", b"v3")  # no longer tracked: answered at once, nothing pushed
    assert client.answer(rid) is True
    await settle()
    assert len(master.pushes()) == 1


async def test_the_changes_of_one_read_share_one_push_and_one_acknowledgement() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"1"], [Op.SET, b"b", b"1"])
    subscribe(master, b"a", b"b")
    rids = client.send([Op.SET, b"a", b"2"], [Op.DELETE, b"b"], [Op.PING])
    [push] = await until(master.pushes, "the INVALIDATE push")
    assert push[0] == 1 and sorted(k for k, _ in push[1]) == [b"a", b"b"]
    assert dict(push[1])[b"b"] == GONE
    await settle()
    assert set(client.answers()) & set(rids) == {rids[2]}  # the PING changed nothing: not held
    master.call(Op.INVACK, 1)
    assert client.answer(rids[0]) is True and client.answer(rids[1]) is True


async def test_a_subscriber_that_never_acknowledges_is_cut_off_after_the_timeout() -> None:
    node = make_node()
    node.tracker.timeout = 0.2
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v1")
    subscribe(master, b"k")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rid = client.call(Op.SET, b"k", b"v2")
    await until(lambda: rid in client.answers(), "the held answer")
    assert loop.time() - t0 >= 0.2 * 0.95
    assert client.answer(rid) is True
    assert master.transport.closed  # cut off: its lease has run out by now
    st = node.tracker.stats()
    assert st["invalidation_timeouts"] == 1 and st["tracked_keys"] == 0 and st["tracking_subscribers"] == 0


async def test_the_table_bound_invalidates_the_oldest_tracked_key() -> None:
    node = make_node(tracking_keys=2)
    master, client = Wire(node), Wire(node)
    client.send(*([Op.SET, b"k%d" % i, b"v"] for i in range(3)))
    subscribe(master, b"k0", b"k1")
    rid = master.call(Op.GETV, b"k2", True)  # a third key: k0 makes room
    [push] = await until(master.pushes, "the overflow's push")
    assert push == [1, [[b"k0", GONE]]]
    assert set(node.tracker.table) == {b"k1", b"k2"}
    assert node.tracker.stats()["tracking_overflows"] == 1
    master.call(Op.INVACK, 1)  # the GETV that overflowed waited for it too
    assert master.answer(rid)[0] == b"v"


async def test_tracking_keys_zero_refuses_tracking() -> None:
    node = make_node(tracking_keys=0)
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v")
    subscribe(master, b"k")
    assert node.tracker.stats()["tracked_keys"] == 0
    assert client.answer(client.call(Op.SET, b"k", b"v2")) is True


async def test_an_eviction_invalidates() -> None:
    node = make_node(max_items=3)
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k0", b"v")
    subscribe(master, b"k0")
    rids = client.send(*([Op.SET, b"k%d" % i, b"v"] for i in range(1, 4)))  # k0, least recently used, is evicted
    [push] = await until(master.pushes, "the eviction's push")
    assert push == [1, [[b"k0", GONE]]]
    master.call(Op.INVACK, 1)
    assert all(client.answer(rid) is True for rid in rids)


async def test_an_expiry_invalidates() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v", 30)  # 30 ms
    subscribe(master, b"k")
    await until(lambda: node.cache.expire_some(10), "the key to expire")
    [push] = await until(master.pushes, "the expiry's push")
    assert push == [1, [[b"k", GONE]]]


async def test_a_drop_invalidates_and_its_answer_waits() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"v"], [Op.SET, b"b", b"v"])
    subscribe(master, b"a")
    rid = client.call(Op.DROP, [[0, RING_SIZE - 1]], 0)  # every key (the range wraps the whole ring)
    [push] = await until(master.pushes, "the drop's push")
    assert push == [1, [[b"a", GONE]]]
    await settle()
    assert rid not in client.answers()
    master.call(Op.INVACK, 1)
    assert client.answer(rid)[1] == 2


async def test_a_flush_invalidates_every_tracked_key() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send(*([Op.SET, b"k%d" % i, b"v"] for i in range(3)))
    subscribe(master, b"k0", b"k1", b"k2")
    flush = asyncio.ensure_future(node.flush_keys())
    [push] = await until(master.pushes, "the flush's push")
    assert sorted(push[1]) == [[b"k0", GONE], [b"k1", GONE], [b"k2", GONE]]
    assert node.tracker.stats()["tracked_keys"] == 0
    await settle()
    assert not flush.done()  # RESP's FLUSHDB answers only once the copies are gone, as a held answer
    master.call(Op.INVACK, push[0])
    assert await asyncio.wait_for(flush, WAIT_S) == 3
    assert client.answer(client.call(Op.SET, b"k0", b"v")) is True  # the flush's hold does not linger on the next request
    assert await asyncio.wait_for(node.flush_keys(), WAIT_S) == 1  # nothing tracked: at once


async def test_a_closed_subscriber_holds_writes_until_its_timeout_then_is_forgotten() -> None:
    node = make_node()
    node.tracker.timeout = 0.2
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v1")
    subscribe(master, b"k")
    master.transport.close()  # it may not know yet, and serve its copy until its lease runs out
    await until(lambda: master.proto.is_closing, "the subscriber's connection to close")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rid = client.call(Op.SET, b"k", b"v2")
    await until(lambda: rid in client.answers(), "the held answer")
    assert loop.time() - t0 >= 0.2 * 0.95
    assert node.tracker.stats()["invalidation_timeouts"] == 0  # nothing was pushed to it: not a timeout
    assert node.tracker.subscribers == 1  # gone, not yet forgotten

    def swept() -> bool:
        node.tracker.sweep()
        return node.tracker.subscribers == 0

    await until(swept, "the sweep to forget it")
    assert client.answer(client.call(Op.SET, b"k", b"v3")) is True  # nothing holds writes any more


async def test_an_ack_from_a_connection_that_subscribed_nothing_is_harmless() -> None:
    node = make_node()
    stranger = Wire(node)
    assert stranger.answer(stranger.call(Op.INVACK, 5)) is True
    assert node.tracker.stats()["tracking_subscribers"] == 0


async def test_a_request_that_changes_nothing_is_not_held_after_an_expiry_sweep() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v", 30)
    subscribe(master, b"k")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not node.cache.expire_some(10):  # the sweep's step, then a request in the same iteration
        assert loop.time() < deadline
        await asyncio.sleep(0.005)
    rid = client.call(Op.PING)
    assert rid in client.answers()


async def test_an_apply_page_invalidates_the_keys_it_stored() -> None:
    """APPLY (repairs, restores, migration pages: ``apply_many``) changes tracked keys like any write."""
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"v"], [Op.SET, b"b", b"v"])
    subscribe(master, b"a", b"b")
    newer = node.cache.get_entry(b"a").version + 1  # type: ignore[union-attr]
    rid = client.call(Op.APPLY, [[b"a", b"new", 0, newer], [b"b", b"old", 0, 1], [b"c", b"v", 0, newer]])
    [push] = await until(master.pushes, "the APPLY's push")
    assert push == [1, [[b"a", newer]]]  # b's older copy was not stored: b is still tracked
    await settle()
    assert rid not in client.answers()
    master.call(Op.INVACK, 1)
    assert client.answer(rid) == 2
    assert node.tracker.stats()["tracked_keys"] == 1


async def test_an_msetv_invalidates_the_tracked_keys_it_stored_and_only_while_tracked() -> None:
    """MSETV (a master's SETs of one loop turn) stores through ``batch_apply``: a tracked key's change is pushed and held."""
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"v"], [Op.SET, b"b", b"v"])
    subscribe(master, b"a")
    v = node.cache.get_entry(b"b").version + 1  # type: ignore[union-attr]
    rid = client.call(Op.MSETV, [[b"b", b"new", 0, 0, v], [b"a", b"new", 0, 0, v + 1], [b"a", b"old", 0, 0, 1]])
    [push] = await until(master.pushes, "the MSETV's push")
    assert push == [1, [[b"a", v + 1]]]
    await settle()
    assert rid not in client.answers()  # held until the subscriber acknowledged
    master.call(Op.INVACK, 1)
    assert client.answer(rid) == [[0, 1], [0, 1], [0, [2, v + 1]]]
    rid = client.call(Op.MSETV, [[b"a", b"newer", 0, 0, v + 2]])  # no longer tracked: answered at once
    assert client.answer(rid) == [[0, 1]]
    assert node.cache.get_entry(b"a").value == b"newer"  # type: ignore[union-attr]
    await settle()
    assert len(master.pushes()) == 1


async def test_a_held_msetv_whose_entries_were_all_stored_is_answered_whole() -> None:
    """The answer held for a tracked key's change is the one packed ahead when every entry was stored (``reply`` sends it)."""
    node = make_node()
    master, client = Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"v"])
    subscribe(master, b"a")
    v = node.cache.get_entry(b"a").version + 1  # type: ignore[union-attr]
    rid = client.call(Op.MSETV, [[b"a", b"new", 0, 0, v], [b"c", b"new", 0, 0, v + 1]])
    await until(master.pushes, "the MSETV's push")
    await settle()
    assert rid not in client.answers()
    master.call(Op.INVACK, 1)
    assert client.answer(rid) == [[0, 1], [0, 1]]


KEEP = 4  # SetFlag.KEEP_COPY


async def test_a_keep_copy_write_pushes_the_other_subscribers_only_and_keeps_the_writer_subscribed() -> None:
    """SETV with KEEP_COPY from a subscriber: the other master is pushed and acknowledges first; the writer is not, and stays subscribed."""
    node = make_node()
    writer, other = Wire(node), Wire(node)
    writer.call(Op.SET, b"k", b"v1")
    subscribe(writer, b"k")
    subscribe(other, b"k")
    v = node.cache.get_entry(b"k").version + 1  # type: ignore[union-attr]
    rid = writer.call(Op.SETV, b"k", b"v2", 0, KEEP, v)
    [push] = await until(other.pushes, "the other master's push")
    assert push == [1, [[b"k", v]]]
    await settle()
    assert rid not in writer.answers()  # held until the other master dropped its copy
    assert writer.pushes() == []
    other.call(Op.INVACK, 1)
    assert writer.answer(rid) == 1
    assert node.tracker.stats()["tracked_keys"] == 1  # the writer's subscription

    other_rid = other.call(Op.SET, b"k", b"v3")  # the next change reaches the writer's copy
    [push] = await until(writer.pushes, "the writer's push")
    await settle()
    assert other_rid not in other.answers()
    writer.call(Op.INVACK, push[0])
    assert other.answer(other_rid) is True


async def test_a_keep_copy_write_subscribes_a_writer_that_was_not_and_is_answered_at_once() -> None:
    node = make_node()
    writer, other = Wire(node), Wire(node)
    rid = writer.call(Op.MSETV, [[b"k", b"v1", 0, KEEP, 1_000], [b"j", b"v1", 0, 0, 1_001]])
    assert writer.answer(rid) == [[0, 1], [0, 1]]  # nobody else held a copy: nothing to wait for
    assert node.tracker.stats()["tracked_keys"] == 1
    rid = other.call(Op.MSETV, [[b"j", b"v2", 0, 0, 1_002], [b"k", b"v2", 0, 0, 1_003]])
    [push] = await until(writer.pushes, "the writer's push")
    assert push == [1, [[b"k", 1_003]]]  # only the key it kept
    writer.call(Op.INVACK, 1)
    assert other.answer(rid) == [[0, 1], [0, 1]]


async def test_a_superseded_keep_copy_write_subscribes_nothing() -> None:
    node = make_node()
    writer = Wire(node)
    writer.call(Op.SETV, b"k", b"new", 0, 0, 2_000)
    assert writer.answer(writer.call(Op.SETV, b"k", b"old", 0, KEEP, 1_000)) == [2, 2_000]
    assert node.tracker.stats()["tracked_keys"] == 0


async def test_a_keep_copy_write_that_evicts_a_key_the_writer_copied_still_pushes_that_key() -> None:
    """The writer is spared the push of the key it writes only: an eviction the write causes reaches its other copies."""
    node = make_node(max_items=2)
    writer = Wire(node)
    writer.call(Op.SET, b"old", b"x")
    subscribe(writer, b"old")
    assert writer.answer(writer.call(Op.SETV, b"k1", b"y", 0, KEEP, 10**15)) == 1
    rid = writer.call(Op.SETV, b"k2", b"y", 0, KEEP, 10**15 + 1)  # "old", least recently used, is evicted
    [push] = await until(writer.pushes, "the eviction's push")
    assert push == [1, [[b"old", GONE]]]
    await settle()
    assert rid not in writer.answers()
    writer.call(Op.INVACK, 1)
    assert writer.answer(rid) == 1
    assert node.tracker.stats()["tracked_keys"] == 2  # k1 and k2, kept


async def test_hello_lists_keep_copy_only_with_tracking_on() -> None:
    assert "keep-copy" in make_node().hello_result()["features"]
    assert "features" not in make_node(tracking_keys=0).hello_result()


async def test_keep_copy_is_refused_in_a_client_set() -> None:
    node = make_node()
    client = Wire(node)
    rid = client.call(Op.SET, b"k", b"v", 0, KEEP)
    frame = client.answers()[rid]
    assert frame[1] != 0 and node.cache.get_entry(b"k") is None


async def test_keep_copy_writes_of_many_keys_stay_within_the_tracking_bound() -> None:
    """A peer sending KEEP_COPY for more keys than ``--tracking-keys`` subscribes at most that many; the oldest are invalidated."""
    node = make_node(tracking_keys=4)
    writer, other = Wire(node), Wire(node)
    entries = [[b"k%d" % i, b"v", 0, KEEP, 1_000 + i] for i in range(50)]
    rid = writer.call(Op.MSETV, entries)
    pushes = await until(writer.pushes, "the overflow's pushes")
    writer.call(Op.INVACK, pushes[-1][0])
    assert writer.answer(rid) == [[0, 1]] * 50
    st = node.tracker.stats()
    assert st["tracked_keys"] == 4 and st["tracking_overflows"] == 46
    assert sorted(k for _, items in pushes for k, _ in items) == sorted(b"k%d" % i for i in range(46))
    assert other.answer(other.call(Op.GET, b"k49")) == b"v"  # the node serves everyone else as before


# -- subscriptions for values (GETV track 2, "value-push") -------------------------------------------


def pushed_after(master: Wire, n: int) -> list[list[Any]]:
    """``master``'s pushes once there are more than ``n`` (else empty)."""
    pushes = master.pushes()
    return pushes if len(pushes) > n else []


def subscribe_for_values(master: Wire, *keys: bytes) -> None:
    for key in keys:
        rid = master.call(Op.GETV, key, 2)
        assert master.answer(rid) is not None, key


async def test_hello_lists_value_push_only_with_tracking_on() -> None:
    assert "value-push" in make_node().hello_result()["features"]
    assert "features" not in make_node(tracking_keys=0).hello_result()


async def test_a_write_pushes_its_value_to_a_subscriber_for_values_which_stays_subscribed() -> None:
    """The value, version and expiry go out, the write is held until the acknowledgement, and the next write reaches the copy too."""
    node = make_node()
    master, plain, client = Wire(node), Wire(node), Wire(node)
    client.call(Op.SET, b"k", b"v1")
    subscribe_for_values(master, b"k")
    subscribe(plain, b"k")
    rid = client.call(Op.SET, b"k", b"v2", 60_000)
    [push] = await until(master.pushes, "the value push")
    e = node.cache.get_entry(b"k")
    assert e is not None
    assert push == [1, [[b"k", e.version, b"v2", e.expires_at]]] and e.expires_at > 0
    assert await until(plain.pushes, "the invalidation") == [[1, [[b"k", e.version]]]]
    await settle()
    assert rid not in client.answers()
    master.call(Op.INVACK, 1)
    plain.call(Op.INVACK, 1)
    assert client.answer(rid) is True
    assert node.tracker.table[b"k"] == [node.tracker._subs[master.proto]]  # the plain subscription ended, this one stays
    st = node.tracker.stats()
    assert st["tracking_value_pushes"] == 1 and st["tracked_keys"] == 1

    v3 = e.version + 10
    rid = client.call(Op.SETV, b"k", b"v3", 0, 0, v3)  # a master's write (SETV): the same
    [_, push] = await until(lambda: len(master.pushes()) == 2 and master.pushes(), "the second value push")
    assert push == [2, [[b"k", v3, b"v3", 0]]]
    master.call(Op.INVACK, 2)
    assert client.answer(rid) == 1


async def test_a_delete_an_expiry_change_or_a_large_value_ends_a_subscription_for_values_with_an_invalidation() -> None:
    node = make_node()
    master, client = Wire(node), Wire(node)
    big = b"x" * (PUSH_VALUE_MAX_BYTES + 1)
    for change, expect in (
        ([Op.DELETE, b"k"], GONE),
        ([Op.EXPIRE, b"k", 60_000], None),
        ([Op.SET, b"k", big], None),
    ):
        client.call(Op.SET, b"k", b"v")
        subscribe_for_values(master, b"k")
        n = len(master.pushes())
        client.send(change)
        pushes = await until(partial(pushed_after, master, n), f"the push of {change[0]!r}")
        seq, [item] = pushes[-1]
        assert len(item) == 2 and item[0] == b"k", item
        if expect is not None:
            assert item[1] == expect
        master.call(Op.INVACK, seq)
        assert node.tracker.stats()["tracked_keys"] == 0, change[0]


async def test_an_acknowledgement_that_names_a_key_ends_that_subscription_only() -> None:
    node = make_node()
    master, other, client = Wire(node), Wire(node), Wire(node)
    client.send([Op.SET, b"a", b"1"], [Op.SET, b"b", b"1"])
    subscribe_for_values(master, b"a", b"b")
    subscribe_for_values(other, b"a")
    rids = client.send([Op.SET, b"a", b"2"], [Op.SET, b"b", b"2"])
    [push] = await until(master.pushes, "the value push")
    await until(other.pushes, "the other's push")
    master.call(Op.INVACK, push[0], [b"a"])  # it holds no copy of a any more
    other.call(Op.INVACK, 1)
    assert [client.answer(r) for r in rids] == [True, True]
    subs = node.tracker._subs
    assert node.tracker.table == {b"a": [subs[other.proto]], b"b": [subs[master.proto]]}
    assert node.tracker.stats()["tracking_unheld"] == 1
    master.call(Op.INVACK, push[0], [b"b", b"never-tracked"])  # again, late: harmless
    assert node.tracker.table == {b"a": [subs[other.proto]]}


async def test_an_invack_of_too_many_keys_is_refused_and_the_connection_goes_on() -> None:
    node = make_node(max_batch_keys=4)
    master = Wire(node)
    rid = master.call(Op.INVACK, 1, [b"k%d" % i for i in range(5)])
    frame = master.answers()[rid]
    assert frame[1] != 0 and "5 keys" in frame[2], frame
    rid = master.call(Op.PING)
    assert master.answers()[rid][1] == 0  # still served


async def test_getv_refuses_a_track_mode_it_does_not_know() -> None:
    node = make_node()
    master = Wire(node)
    master.call(Op.SET, b"k", b"v")
    for bad in (3, 0, "values", [2]):
        rid = master.call(Op.GETV, b"k", bad)
        frame = master.answers()[rid]
        assert frame[1] != 0 and "track" in frame[2], (bad, frame)
    assert node.tracker.stats()["tracked_keys"] == 0


async def test_a_copy_made_by_a_keep_copy_write_in_flight_when_a_value_came_stays_subscribed() -> None:
    """The INVACK race: a master whose own write of the key is in flight must not name the key as unheld.

    Master 1 holds a copy subscribed for values and sends a KEEP_COPY SETV;
    before its answer, master 2's write of the key is pushed to it. Its
    write's answer then makes the copy, so the node must still have it
    subscribed: the next write through master 2 must reach that copy.
    """
    node = make_node()
    m1, m2 = Wire(node), Wire(node)
    near = NearCache(1 << 20)
    conn = SimpleNamespace(lease_from=0.0, closed=False)  # master 1's tracking connection, as the near cache sees it
    m2.call(Op.SET, b"k", b"v1")
    subscribe_for_values(m1, b"k")
    v1 = node.cache.get_entry(b"k").version  # type: ignore[union-attr]
    f = near.start_fill(b"k")
    assert f is not None
    near.end_fill(b"k", f, [b"v1", 0, v1], conn)
    assert near.lookup(b"k", 0.0) == b"v1"

    own = near.write_through(b"k", 0.0)  # master 1's SET of its copied key: KEEP_COPY, in flight
    assert own is not None
    w2 = m2.call(Op.SETV, b"k", b"v2", 0, 0, v1 + 10)  # master 2's write reaches the owner first
    [push] = await until(m1.pushes, "master 2's write pushed to master 1")
    keep = m1.call(Op.SETV, b"k", b"v3", 0, KEEP, v1 + 20)  # sent before master 1 read the push
    unheld = [item[0] for item in push[1] if len(item) == 4 and not near.update(item[0], item[1], item[2], item[3], conn)]
    m1.call(Op.INVACK, push[0], unheld) if unheld else m1.call(Op.INVACK, push[0])
    assert m2.answer(w2) == 1
    assert m1.answer(keep) == 1
    near.end_fill(b"k", own, [b"v3", 0, v1 + 20], conn)  # the write's answer makes the copy
    assert near.lookup(b"k", 0.0) == b"v3"
    assert node.tracker._subs[m1.proto] in node.tracker.table.get(b"k", []), "a copy with no subscription behind it"

    m2.call(Op.SETV, b"k", b"v4", 0, 0, v1 + 30)  # so the next write reaches it
    pushes = await until(partial(pushed_after, m1, 1), "master 2's next write pushed to master 1")
    assert pushes[-1][1] == [[b"k", v1 + 30, b"v4", 0]]
