"""An aux node serves a large MGET ``KEYS_PER_TURN`` keys per loop iteration, and a RESP DEL of many keys
``KEYS_PER_STEP`` keys per iteration, on a real (never started) node and fake transports.

Loop iterations are counted, not timed: the node's cache counts a hit per
key looked up, and a callback scheduled behind the request's first slice
sees how many keys the MGET had looked up when the loop came to it.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import hiredis

from dcache.auxnode.node import AuxNode
from dcache.auxnode.tracking import GONE
from dcache.config import AuxConfig
from dcache.errors import Status
from dcache.hlc import wall_ms
from dcache.lru import LRUCache
from dcache.protocol import Op
from dcache.protocol.limits import KEYS_PER_TURN
from dcache.respserver import KEYS_PER_STEP, RespProtocol
from tests.fakes import FakeTransport
from tests.unit.auxnode.test_tracking import Wire, settle, until
from tests.unit.test_respserver import cmd as resp
from tests.unit.test_respserver import connect

OK = int(Status.OK)
N = 2 * KEYS_PER_TURN + 10


def node_with_keys(n: int = N) -> tuple[AuxNode, list[bytes]]:
    node = AuxNode(AuxConfig(node_id="t-aux"))
    keys = [b"key:%05d" % i for i in range(n)]
    for i, k in enumerate(keys):
        node.cache.set(k, b"v%d" % i, version=i + 1)
    return node, keys


def answers_in_order(wire: Wire) -> list[list[Any]]:
    """Every answer frame ``[rid, status, result]`` in the order it was written."""
    return list(wire.transport.frames())


async def test_a_large_mget_is_looked_up_a_slice_per_loop_iteration_and_other_connections_run_between() -> None:
    node, keys = node_with_keys()
    client, other = Wire(node), Wire(node)
    seen: list[int] = []

    def ping_between() -> None:
        rid = other.call(Op.PING)
        assert other.answer(rid) == "PONG"
        seen.append(node.cache.hits)

    rid = client.call(Op.MGET, keys)
    assert node.cache.hits == KEYS_PER_TURN  # one slice in the call that read the request
    assert client.transport.frames() == [] and not client.transport.reading
    asyncio.get_running_loop().call_soon(ping_between)  # queued behind the second slice
    await until(lambda: client.answers().get(rid), "the MGET's answer")
    assert seen == [2 * KEYS_PER_TURN]  # the other connection ran before the MGET's last slice
    assert client.answer(rid) == [b"v%d" % i for i in range(N)]  # one answer, every value in order
    await settle()
    assert client.transport.reading


async def test_the_requests_pipelined_after_a_large_mget_run_after_its_last_slice() -> None:
    node, keys = node_with_keys()
    client = Wire(node)
    last = keys[-1]
    rids = client.send([Op.MGET, keys], [Op.SET, last, b"new"], [Op.GET, last])
    assert client.transport.frames() == []  # the SET waits behind the MGET
    await until(lambda: len(client.transport.frames()) == 3, "three answers")
    frames = answers_in_order(client)
    assert [f[0] for f in frames] == rids
    assert frames[0][1:] == [OK, [b"v%d" % i for i in range(N)]]  # the MGET read the value before the SET
    assert frames[1][1:] == [OK, True] and frames[2][1:] == [OK, b"new"]


async def test_an_mget_of_at_most_one_slice_is_answered_in_the_call() -> None:
    node, keys = node_with_keys(KEYS_PER_TURN)
    client = Wire(node)
    rid = client.call(Op.MGET, keys)
    assert client.answer(rid) == [b"v%d" % i for i in range(KEYS_PER_TURN)] and client.transport.reading


async def test_a_large_mget_run_in_process_without_a_connection_is_answered_whole() -> None:
    """``Service.execute`` (tools, tests) has no connection to hold: the MGET runs in one go."""
    node, keys = node_with_keys()
    assert node.execute([Op.MGET, 1, keys]) == [b"v%d" % i for i in range(N)]


async def test_a_large_mget_whose_client_left_looks_up_no_more_keys() -> None:
    node, keys = node_with_keys(3 * KEYS_PER_TURN)
    client, other = Wire(node), Wire(node)
    client.call(Op.MGET, keys)
    client.transport.close()
    await settle()
    assert node.cache.hits == KEYS_PER_TURN
    assert other.answer(other.call(Op.GET, keys[0])) == b"v0"  # the node serves on


class _FailingCache(LRUCache):
    """A cache whose read of one key raises (a bug in a later slice)."""

    def __init__(self, bad: bytes) -> None:
        super().__init__(1 << 30, 1 << 20)
        self.bad = bad

    def get(self, key: bytes) -> bytes | None:
        if key == self.bad:
            raise RuntimeError("boom")
        return super().get(key)


async def test_a_slice_that_raises_answers_an_error_and_the_connection_goes_on() -> None:
    node, keys = node_with_keys(0)
    keys = [b"key:%05d" % i for i in range(N)]
    node.cache = _FailingCache(keys[KEYS_PER_TURN + 1])
    node.cache.set(keys[0], b"v0", version=1)
    client = Wire(node)
    rids = client.send([Op.MGET, keys], [Op.GET, keys[0]])
    await until(lambda: len(client.transport.frames()) == 2, "two answers")
    frames = answers_in_order(client)
    assert [f[0] for f in frames] == rids
    assert frames[0][1] == int(Status.INTERNAL) and "RuntimeError" in frames[0][2]
    assert frames[1][1:] == [OK, b"v0"]
    await settle()
    assert client.transport.reading


async def test_a_large_mget_whose_values_pass_the_frame_limit_is_refused_by_the_slice_that_passes_it() -> None:
    node = AuxNode(AuxConfig(node_id="t-aux", max_value_bytes=1 << 16, max_frame_bytes=1 << 20))
    keys = [b"key:%05d" % i for i in range(N)]
    for i, k in enumerate(keys):
        node.cache.set(k, b"x" * 1100, version=i + 1)
    client = Wire(node)
    rid = client.call(Op.MGET, keys)
    await until(lambda: client.answers().get(rid), "the MGET's answer")
    status, message = client.answers()[rid][1:]
    assert status == int(Status.FRAME_TOO_LARGE) and f"these {N} keys" in message
    assert node.cache.hits == 2 * KEYS_PER_TURN  # the second slice passed 1 MiB: no third one


async def test_a_large_mget_that_expires_a_tracked_key_in_a_later_slice_is_answered_after_the_invalidation_is_acknowledged() -> None:
    """As the dispatch holds a handler's answer when it changed a key a master holds a copy of (``Service.hold``)."""
    node, keys = node_with_keys()
    master, client = Wire(node), Wire(node)
    late = keys[KEYS_PER_TURN + 3]  # looked up by the second slice
    expires_at = wall_ms() + 30
    node.cache.set(late, b"soon gone", expires_at=expires_at, version=N + 1)
    assert master.answer(master.call(Op.GETV, late, True))[0] == b"soon gone"  # a master's near cache holds it
    await until(lambda: wall_ms() > expires_at, "the key's expiry")
    rid = client.call(Op.MGET, keys)
    [push] = await until(master.pushes, "the INVALIDATE push")
    assert push[1] == [[late, GONE]]
    await settle()
    assert rid not in client.answers()  # every key looked up, the answer held for the master's acknowledgement
    master.call(Op.INVACK, push[0])
    values = client.answer(rid)
    assert values[KEYS_PER_TURN + 3] is None and values[0] == b"v0" and len(values) == N


def resp_wire(node: AuxNode) -> tuple[RespProtocol, FakeTransport]:
    return connect(node)


def resp_replies(transport: FakeTransport) -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(b"".join(transport.written))
    out = []
    while (reply := reader.gets()) is not False:
        out.append(reply)
    return out


async def test_a_large_resp_mget_is_looked_up_a_slice_per_loop_iteration() -> None:
    node, keys = node_with_keys()
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MGET", *keys) + resp(b"SET", keys[-1], b"new") + resp(b"GET", keys[-1]))
    assert node.cache.hits == KEYS_PER_TURN and transport.written == []
    await until(lambda: len(resp_replies(transport)) == 3, "three replies")
    assert resp_replies(transport) == [[b"v%d" % i for i in range(N)], b"OK", b"new"]


async def test_a_large_mget_in_a_transaction_on_an_aux_node_runs_whole_in_one_step() -> None:
    """EXEC on an aux node's port is atomic (docs/RESP.md): its steps are never sliced."""
    node, keys = node_with_keys()
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MULTI") + resp(b"MGET", *keys) + resp(b"SET", keys[-1], b"new") + resp(b"EXEC"))
    assert node.cache.hits == N  # in the call that read EXEC
    assert resp_replies(transport) == [b"OK", b"QUEUED", b"QUEUED", [[b"v%d" % i for i in range(N)], b"OK"]]


async def test_a_resp_del_of_many_keys_on_an_aux_node_deletes_a_chunk_per_loop_iteration() -> None:
    n = 2 * KEYS_PER_STEP + 10
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    seen: list[int] = []
    conn.data_received(resp(b"DEL", *keys) + resp(b"GET", keys[-1]) + resp(b"EXISTS", *keys[:3]))
    assert len(node.cache) == n - KEYS_PER_STEP and transport.written == []  # one chunk in the call that read it
    asyncio.get_running_loop().call_soon(lambda: seen.append(len(node.cache)))  # queued behind the second chunk
    await until(lambda: len(resp_replies(transport)) == 3, "three replies")
    assert seen == [n - KEYS_PER_STEP - KEYS_PER_TURN]  # the chunks after the first hold a turn's budget of keys (``dcache.turns``)
    assert resp_replies(transport) == [n, None, 0]
    await settle()
    assert transport.reading


async def test_a_resp_del_of_many_keys_in_a_transaction_on_an_aux_node_runs_whole_in_one_step() -> None:
    n = 2 * KEYS_PER_STEP + 10
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MULTI") + resp(b"DEL", *keys) + resp(b"EXEC"))
    assert len(node.cache) == 0
    assert resp_replies(transport) == [b"OK", b"QUEUED", [n]]


async def test_a_resp_del_whose_client_left_deletes_no_more_chunks() -> None:
    n = 3 * KEYS_PER_STEP
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"DEL", *keys))
    transport.close()
    await settle()
    assert len(node.cache) == n - KEYS_PER_STEP


# -- one budget for every connection (``dcache.turns``) --------------------------------------


class HitsPerIteration:
    """Counts the keys the node looks up in each loop iteration (a callback that reschedules itself)."""

    def __init__(self, node: AuxNode) -> None:
        self.node = node
        self.last = node.cache.hits
        self.per_iteration: list[int] = []
        self.stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        hits = self.node.cache.hits
        self.per_iteration.append(hits - self.last)
        self.last = hits
        if not self.stopped:
            asyncio.get_running_loop().call_soon(self._tick)


class _RecordingCache(LRUCache):
    """A cache that records which keys are looked up, in order (to see which request a slice served)."""

    def __init__(self) -> None:
        super().__init__(1 << 30, 1 << 20)
        self.looked_up: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        self.looked_up.append(key)
        return super().get(key)


def node_with_prefixes(prefixes: list[bytes], n: int = N, cache: LRUCache | None = None) -> tuple[AuxNode, dict[bytes, list[bytes]]]:
    node = AuxNode(AuxConfig(node_id="t-aux"))
    if cache is not None:
        node.cache = cache
    keys = {p: [b"%s:%05d" % (p, i) for i in range(n)] for p in prefixes}
    for p, ks in keys.items():
        for i, k in enumerate(ks):
            node.cache.set(k, b"%s%d" % (p, i), version=i + 1)
    return node, keys


async def test_large_mgets_on_many_connections_share_one_budget_of_keys_per_loop_iteration() -> None:
    """Before: each MGET scheduled its own slice, and every iteration looked up connections x KEYS_PER_TURN keys."""
    prefixes = [b"c%d" % j for j in range(6)]
    node, keys = node_with_prefixes(prefixes)
    wires = [Wire(node) for _ in prefixes]
    rids = [w.call(Op.MGET, keys[p]) for w, p in zip(wires, prefixes, strict=True)]
    assert node.cache.hits == KEYS_PER_TURN  # the first in its handler; the others queued theirs behind it
    assert all(not w.transport.reading for w in wires)  # every connection's later requests wait
    probe = HitsPerIteration(node)
    for w, rid in zip(wires, rids, strict=True):
        await until(lambda w=w, rid=rid: w.answers().get(rid), "every MGET's answer")  # type: ignore[misc]
    probe.stopped = True
    assert max(probe.per_iteration) <= KEYS_PER_TURN
    assert node.cache.hits == len(prefixes) * N
    for w, rid, p in zip(wires, rids, prefixes, strict=True):
        assert w.answer(rid) == [b"%s%d" % (p, i) for i in range(N)]
    await settle()
    assert all(w.transport.reading for w in wires)
    assert not node.turns.busy


async def test_large_mgets_on_many_connections_take_turns() -> None:
    prefixes = [b"c%d" % j for j in range(4)]
    cache = _RecordingCache()
    node, keys = node_with_prefixes(prefixes, 3 * KEYS_PER_TURN, cache=cache)
    wires = [Wire(node) for _ in prefixes]
    rids = [w.call(Op.MGET, keys[p]) for w, p in zip(wires, prefixes, strict=True)]
    for w, rid in zip(wires, rids, strict=True):
        await until(lambda w=w, rid=rid: w.answers().get(rid), "every MGET's answer")  # type: ignore[misc]
    # the slices, by the connection whose keys they looked up: the first in its handler, then one slice each per round
    slices = [cache.looked_up[i][:2] for i in range(0, len(cache.looked_up), KEYS_PER_TURN)]
    c0, c1, c2, c3 = prefixes
    assert slices == [c0, c0, c1, c2, c3, c0, c1, c2, c3, c1, c2, c3]


async def test_a_large_mget_arriving_while_others_wait_queues_its_first_slice() -> None:
    node, keys = node_with_prefixes([b"a", b"b"])
    first, second = Wire(node), Wire(node)
    first.call(Op.MGET, keys[b"a"])
    assert node.cache.hits == KEYS_PER_TURN
    rid = second.call(Op.MGET, keys[b"b"])
    assert node.cache.hits == KEYS_PER_TURN and node.turns.waiting == 2  # no slice in the second handler
    assert not second.transport.reading
    small = second.send([Op.GET, keys[b"b"][0]])  # held behind its MGET, in order
    assert second.transport.frames() == []
    await until(lambda: len(second.transport.frames()) == 2, "two answers")
    assert [f[0] for f in second.transport.frames()] == [rid, *small]


async def test_a_small_mget_runs_in_its_handler_while_large_ones_wait() -> None:
    node, keys = node_with_prefixes([b"a", b"b"])
    big, other = Wire(node), Wire(node)
    big.call(Op.MGET, keys[b"a"])
    assert node.turns.busy
    rid = other.call(Op.MGET, keys[b"b"][:KEYS_PER_TURN])
    assert other.answer(rid) == [b"b%d" % i for i in range(KEYS_PER_TURN)]  # answered in the call: no turn to wait for


async def test_the_requests_pipelined_after_large_mgets_on_many_connections_run_after_each_ones_last_slice() -> None:
    prefixes = [b"c%d" % j for j in range(3)]
    node, keys = node_with_prefixes(prefixes)
    wires = [Wire(node) for _ in prefixes]
    sent = [w.send([Op.MGET, keys[p]], [Op.SET, keys[p][-1], b"new"], [Op.GET, keys[p][-1]]) for w, p in zip(wires, prefixes, strict=True)]
    for w in wires:
        await until(lambda w=w: len(w.transport.frames()) == 3, "three answers")  # type: ignore[misc]
    for w, rids, p in zip(wires, sent, prefixes, strict=True):
        frames = answers_in_order(w)
        assert [f[0] for f in frames] == rids
        assert frames[0][1:] == [OK, [b"%s%d" % (p, i) for i in range(N)]]  # read before its own SET
        assert frames[1][1:] == [OK, True] and frames[2][1:] == [OK, b"new"]


async def test_a_client_that_leaves_during_its_turn_costs_the_others_no_budget() -> None:
    prefixes = [b"a", b"b", b"c"]
    node, keys = node_with_prefixes(prefixes, 3 * KEYS_PER_TURN)
    wires = [Wire(node) for _ in prefixes]
    rids = [w.call(Op.MGET, keys[p]) for w, p in zip(wires, prefixes, strict=True)]
    wires[1].transport.close()  # b leaves before its first turn
    probe = HitsPerIteration(node)
    for i in (0, 2):
        await until(lambda i=i: wires[i].answers().get(rids[i]), "the others' answers")  # type: ignore[misc]
    probe.stopped = True
    assert node.cache.hits == 2 * 3 * KEYS_PER_TURN  # none of b's keys looked up
    assert max(probe.per_iteration) <= KEYS_PER_TURN
    assert [wires[i].answer(rids[i])[-1] for i in (0, 2)] == [b"a%d" % (3 * KEYS_PER_TURN - 1), b"c%d" % (3 * KEYS_PER_TURN - 1)]
    assert not node.turns.busy


async def test_a_slice_that_raises_answers_its_own_request_and_the_others_go_on() -> None:
    keys = {p: [b"%s:%05d" % (p, i) for i in range(N)] for p in (b"a", b"b", b"c")}
    node = AuxNode(AuxConfig(node_id="t-aux"))
    node.cache = _FailingCache(keys[b"b"][KEYS_PER_TURN + 1])  # b's second slice raises
    for ks in keys.values():
        for i, k in enumerate(ks):
            node.cache.set(k, b"v%d" % i, version=i + 1)
    wires = [Wire(node) for _ in keys]
    sent = [w.send([Op.MGET, ks], [Op.GET, ks[0]]) for w, ks in zip(wires, keys.values(), strict=True)]
    for w in wires:
        await until(lambda w=w: len(w.transport.frames()) == 2, "two answers")  # type: ignore[misc]
    a, b, c = (answers_in_order(w) for w in wires)
    assert a[0][1:] == [OK, [b"v%d" % i for i in range(N)]] and c[0][1:] == [OK, [b"v%d" % i for i in range(N)]]
    assert b[0][1] == int(Status.INTERNAL) and "RuntimeError" in b[0][2]
    assert [f[0] for f in b] == sent[1] and b[1][1:] == [OK, b"v0"]  # its connection goes on, in order
    await settle()
    assert all(w.transport.reading for w in wires)


async def test_resp_dels_of_many_keys_on_many_connections_share_one_budget_per_loop_iteration() -> None:
    n = 2 * KEYS_PER_STEP + 10
    prefixes = [b"c%d" % j for j in range(4)]
    node, keys = node_with_prefixes(prefixes, n)
    conns = [resp_wire(node) for _ in prefixes]
    sizes: list[int] = []

    def tick() -> None:
        sizes.append(len(node.cache))
        if len(node.cache):
            asyncio.get_running_loop().call_soon(tick)

    for (conn, _), p in zip(conns, prefixes, strict=True):
        conn.data_received(resp(b"DEL", *keys[p]) + resp(b"EXISTS", keys[p][-1]))
    assert len(node.cache) == len(prefixes) * n - KEYS_PER_STEP  # the first chunk in its command; the others wait their turn
    asyncio.get_running_loop().call_soon(tick)
    for _, transport in conns:
        await until(lambda t=transport: len(resp_replies(t)) == 2, "two replies")  # type: ignore[misc]
    deleted = [a - b for a, b in itertools.pairwise(sizes)]
    assert max(deleted) <= KEYS_PER_TURN
    assert [resp_replies(t) for _, t in conns] == [[n, 0]] * len(prefixes)


async def test_stats_show_the_turns() -> None:
    node, keys = node_with_prefixes([b"a", b"b"])
    wires = [Wire(node), Wire(node)]
    for w, p in zip(wires, (b"a", b"b"), strict=True):
        w.call(Op.MGET, keys[p])
    stats = node.connection_stats()
    assert stats["large_requests_waiting"] == 2 and stats["turn_slices"] == 0
    await until(lambda: node.connection_stats()["large_requests_waiting"] == 0, "every turn run")
    stats = node.connection_stats()
    assert stats["turn_slices"] == 5 and stats["turn_most_keys"] == KEYS_PER_TURN  # (N keys: 3 slices each, one in a handler)
