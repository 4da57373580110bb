"""AuxLink (``dcache.master.links``) over fake connections: handshake, restarts, deadlines, suspicion, losses.

``AuxLink.check(now)`` is the sweeper's step; tests call it with a chosen
``now`` and assert in the same synchronous stretch (the link's own sweeper
only runs when the test awaits). Where a test must await between two
steps, it uses real time with a short ``suspect_after`` and waits (bounded)
for the sweeper to act.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dcache.errors import AuthError, NotAnIntegerError, Status, UnavailableError
from dcache.master.links import AuxLink
from dcache.protocol import PROTOCOL_VERSION, PUSH_ID, Op, Push
from dcache.protocol.limits import INVALIDATION_TIMEOUT_S, NEAR_LEASE_S
from tests.fakes import FakeAux, Reply

from .fakecluster import until

OK = 0
UNAVAILABLE = int(Status.UNAVAILABLE)
TIMEOUT = int(Status.UPSTREAM_TIMEOUT)


class Answers:
    """A callback that records ``(status, result)`` answers."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []

    def __call__(self, status: int, result: Any) -> None:
        self.got.append((status, result))


def pong(node: str, msg: list[Any]) -> Any:
    """Answer PING and hold everything else."""
    return "PONG" if msg[0] == Op.PING else None


def make_link(aux: FakeAux, node: str = "a1", **kw: Any) -> AuxLink:
    kw.setdefault("size", 1)
    return AuxLink(node, "10.0.0.1", 7101, factory=aux.connect, **kw)


@pytest.fixture
async def aux() -> AsyncIterator[FakeAux]:
    yield FakeAux(pong)


async def started(link: AuxLink) -> AuxLink:
    link.start()
    await until(lambda: link.open_connections == link.pool_size, what="the link's connections")
    return link


# -- handshake -----------------------------------------------------------------------


async def test_start_opens_the_pool_with_a_hello_each(aux: FakeAux) -> None:
    link = await started(make_link(aux, size=2, auth_token="s3cret"))
    try:
        assert link.connected and link.open_connections == 2 and link.incarnation == 1
        hellos = [t.frames()[0] for t in aux.transports["a1"]]
        assert [h[0] for h in hellos] == [Op.HELLO, Op.HELLO]
        assert hellos[0][2:] == [PROTOCOL_VERSION, "s3cret", "dcache-master"]
        link.start()  # idempotent
        assert aux.connects["a1"] == 2
    finally:
        await link.close()


@pytest.mark.parametrize(
    "hello",
    [Reply(int(Status.AUTH_FAILED), "invalid auth token"), Reply(OK, {"role": "master", "node_id": "m"}), Reply(OK, "not a map")],
)
async def test_a_refused_or_wrong_handshake_leaves_the_link_unconnected(aux: FakeAux, hello: Reply) -> None:
    aux.hello_replies["a1"] = hello
    link = make_link(aux)
    link.start()
    try:
        await until(lambda: aux.connects.get("a1", 0) >= 2, what="a retry")  # it keeps trying, with backoff
        assert not link.connected
        assert aux.transports["a1"][0].closed  # the connection whose handshake failed is not kept
        got = Answers()
        link.send(Op.GET, (b"k",), got)
        assert got.got == [(UNAVAILABLE, "aux node a1 at 10.0.0.1:7101 is not connected")]
        assert link.failures_total == 1
    finally:
        await link.close()


@pytest.mark.parametrize(
    ("features", "keeps"),
    [(None, False), (["keep-copy"], True), (["later-thing", "keep-copy"], True), ("keep-copy", False), ([1, None], False)],
)
async def test_keep_copy_is_used_only_with_a_node_that_lists_it(aux: FakeAux, features: Any, keeps: bool) -> None:
    """A master sends SETV's KEEP_COPY flag only to an aux node whose HELLO lists ``keep-copy`` (an older one refuses the flag)."""
    hello: dict[str, Any] = {"role": "aux", "node_id": "a1", "incarnation": 1}
    if features is not None:
        hello["features"] = features
    aux.hello_replies["a1"] = Reply(OK, hello)
    link = await started(make_link(aux))
    try:
        assert link.keeps is keeps
    finally:
        await link.close()


async def test_a_refused_connection_answers_unavailable_at_once_and_typed(aux: FakeAux) -> None:
    aux.refused.add("a1")
    link = make_link(aux)
    link.start()
    try:
        with pytest.raises(UnavailableError, match="not connected"):
            await link.call(Op.GET, b"k")
        assert aux.requests == {}
    finally:
        await link.close()


async def test_a_node_from_before_bind_is_routed_to_unbound_and_another_clusters_node_is_not(aux: FakeAux) -> None:
    """A rolling upgrade, masters first: an aux node that does not know BIND keeps serving (unbound, as before)."""
    aux.before_bind.add("a1")
    aux.answer = lambda node, msg: "v" if msg[0] == Op.GET else pong(node, msg)
    old = await started(make_link(aux, "a1", cluster=lambda: "main/m1"))
    aux.clusters["a2"] = "other/m9"
    bound_elsewhere = make_link(aux, "a2", cluster=lambda: "main/m1")
    bound_elsewhere.start()
    try:
        assert await old.call(Op.GET, b"k") == "v"
        assert "a1" not in aux.clusters
        await until(lambda: aux.connects.get("a2", 0) >= 2, what="a retry of the refused node")
        assert not bound_elsewhere.connected and bound_elsewhere.cluster_error
    finally:
        await old.close()
        await bound_elsewhere.close()


async def test_every_connection_tells_the_node_the_ring_epoch_its_writes_are_routed_by(aux: FakeAux) -> None:
    """EPOCH at the handshake and on every connection when the view changes, behind the writes routed by the view before."""
    aux.floors["a1"] = 6  # a coordinator raised it before this master started: the answers tell it
    link = make_link(aux, size=2)
    link.announce(7)  # the view's epoch before the link opens: each handshake tells it
    await started(link)
    try:
        assert aux.epochs["a1"] == [7, 7] and link.floor == 6
        link.held.append(((b"k", b"v", 0, 0, 1), Answers()))  # a write routed by epoch 7, held back to leave batched
        link.announce(8)
        link.announce(8)  # the same epoch again: nothing sent
        await until(lambda: len(aux.epochs["a1"]) == 4, what="EPOCH 8 on both connections")
        assert aux.epochs["a1"][2:] == [8, 8] and link.routed_by == 8
        carried = next(t for t in aux.transports["a1"] if any(m[0] == Op.SETV for m in t.frames()))
        ops = [m[0] for m in carried.frames()]
        assert ops.index(Op.SETV) < len(ops) - 1 - ops[::-1].index(Op.EPOCH), "the write routed by epoch 7 leaves before EPOCH 8"
    finally:
        await link.close()


async def test_a_node_from_before_epoch_is_routed_to_without_it(aux: FakeAux) -> None:
    """A rolling upgrade, masters first: a node that answers EPOCH ``UNKNOWN_OP`` keeps serving; it is told no more epochs."""
    aux.before_epoch.add("a1")
    aux.answer = lambda node, msg: "v" if msg[0] == Op.GET else pong(node, msg)
    link = make_link(aux, "a1")
    link.announce(3)
    await started(link)
    try:
        assert not link.epochs and await link.call(Op.GET, b"k") == "v"
        link.announce(4)
        await link.call(Op.GET, b"k")
        assert [m[0] for t in aux.transports["a1"] for m in t.frames()].count(Op.EPOCH) == 1  # the handshake's only
    finally:
        await link.close()


# -- requests and answers ---------------------------------------------------------------


async def test_call_returns_results_and_raises_typed_errors() -> None:
    def answer(node: str, msg: list[Any]) -> Any:
        if msg[0] == Op.INCR:
            return Reply(int(Status.NOT_AN_INTEGER), "value is not an integer")
        return Reply(OK, [msg[0], *msg[2:]])

    aux = FakeAux(answer)
    link = await started(make_link(aux))
    try:
        assert await link.call(Op.GET, b"k") == [Op.GET, b"k"]
        with pytest.raises(NotAnIntegerError, match="not an integer"):
            await link.call(Op.INCR, b"k", 1)
        assert link.requests == 2 and link.in_flight == 0
    finally:
        await link.close()


async def test_every_request_goes_on_one_connection_and_a_standby_takes_over(aux: FakeAux) -> None:
    """An aux node reads its connections in no set order: requests spread over several could reach it out of order."""
    link = await started(make_link(aux, size=2))
    try:
        t1, t2 = aux.transports["a1"]
        before = (len(t1.written), len(t2.written))
        for _ in range(3):  # three loop iterations
            link.send(Op.PING, (), Answers())
            link.send(Op.PING, (), Answers())
            await until(lambda: link.in_flight == 0)
        grew = (len(t1.written) - before[0], len(t2.written) - before[1])
        assert sorted(grew) == [0, 3], "each iteration's requests leave in one write, always on the same connection"
        active, standby = (t1, t2) if grew[0] else (t2, t1)
        active.close()
        await until(lambda: active.protocol.closed, what="the active connection lost")  # type: ignore[union-attr]
        sent = len(standby.written)
        link.send(Op.PING, (), Answers())
        await until(lambda: link.in_flight == 0)
        assert len(standby.written) == sent + 1, "the standby takes over at once"
        await until(lambda: link.open_connections == 2, what="a new standby")
    finally:
        await link.close()


async def test_requests_held_back_to_the_next_iteration_leave_behind_the_ones_made_before_them(aux: FakeAux) -> None:
    """SETVs the batcher holds (and reads it waits with) leave behind the requests made before them, on the same connection.

    On another connection they could overtake those: the aux node reads its
    connections in no set order (a SET held back overtook a PERSIST sent
    before it, which then removed the SET's TTL).
    """
    link = await started(make_link(aux, size=2))
    try:
        t1, t2 = aux.transports["a1"]
        before = (len(t1.written), len(t2.written))
        link.send(Op.PERSIST, (b"k",), Answers())
        link.held.append(((b"k", b"v", 0, 0, 1), Answers()))  # a SET made in the same iteration, held back
        await asyncio.sleep(0)  # the connection's own flush: the PERSIST leaves alone
        link.release_held()  # the batcher's flush, one callback later
        link.flush()
        grew = (len(t1.written) - before[0], len(t2.written) - before[1])
        assert sorted(grew) == [0, 2], "both on one connection, in the order they were made"
        assert [m[0] for m in aux.ops("a1")][-2:] == [Op.PERSIST, Op.SETV]
        link.send(Op.PING, (), Answers())  # a request of a later iteration: the same connection too
        link.flush()
        assert sorted((len(t1.written) - before[0], len(t2.written) - before[1])) == [0, 3]
    finally:
        await link.close()


async def test_flush_writes_at_once(aux: FakeAux) -> None:
    link = await started(make_link(aux))
    try:
        link.send(Op.GET, (b"k",), Answers())
        assert aux.ops("a1") == []
        link.flush()
        assert aux.ops("a1") == [[Op.GET, 2, b"k"]]  # request id 1 was the HELLO
    finally:
        await link.close()


# -- deadlines and suspicion ------------------------------------------------------------------


async def test_a_request_times_out_at_its_deadline_while_the_node_answers_others(aux: FakeAux) -> None:
    loop = asyncio.get_running_loop()
    link = await started(make_link(aux, timeout=1.0, suspect_after=1.0))
    try:
        held = Answers()
        link.send(Op.GET, (b"k",), held)
        sent_at = loop.time()
        assert await link.call(Op.PING) == "PONG"  # the node is alive: it answers after the held request was sent
        link.check(sent_at + 0.5)
        assert held.got == []
        link.check(sent_at + 1.0)
        assert held.got == [(TIMEOUT, "aux node a1 did not answer within 1.0 s")]
        assert not link.suspect and link.failures_total == 1 and link.in_flight == 0
    finally:
        await link.close()


async def test_the_first_sweep_after_this_master_stalled_judges_no_node(aux: FakeAux) -> None:
    """This process was stopped for 5 s (SIGSTOP): the node's answer may wait, unread, in the socket; the sweep on time after judges.

    Judged at once, every node with a request in flight looked silent for
    the whole pause: suspected, its requests failed (a leader resumed in
    the fault campaign acknowledged a delete without a live node).
    """
    loop = asyncio.get_running_loop()
    link = await started(make_link(aux, timeout=2.0, suspect_after=0.5))
    try:
        waiting = Answers()
        link.send(Op.GET, (b"k",), waiting)  # pong() holds it: never answered
        link.flush()
        now = loop.time()
        link.sweep(now)
        link.sweep(now + 5.0)  # the next sweep, 5 s later: the loop did not run meanwhile
        assert not link.suspect and waiting.got == [] and link.in_flight == 1
        link.sweep(now + 5.05)  # on time: the node has had its chance to answer
        assert link.suspect and waiting.got == [(TIMEOUT, "aux node a1 is suspected: no answer for 0.5 s")]
    finally:
        await link.close()


async def test_a_silent_node_with_requests_waiting_is_suspected_and_probed(aux: FakeAux) -> None:
    loop = asyncio.get_running_loop()
    link = await started(make_link(aux, timeout=5.0, suspect_after=0.5))
    try:
        link.check(loop.time() + 10)
        assert not link.suspect, "a node nobody waits for is not suspected"
        waiting = Answers()
        link.send(Op.GET, (b"k",), waiting)
        link.flush()
        now = loop.time() + 0.6
        link.check(now)
        assert link.suspect and link.suspicions_total == 1 and link.suspected_since > 0
        assert not link.usable
        # every request waiting is answered at once, long before its 5 s deadline
        assert waiting.got == [(TIMEOUT, "aux node a1 is suspected: no answer for 0.5 s")]
        assert [m[0] for m in aux.ops("a1")] == [Op.GET, Op.PING]  # and a probe went out
        late = Answers()
        link.send(Op.GET, (b"k2",), late)
        link.check(now + 0.1)  # within suspect_after / 2 of the last probe: no new probe
        assert late.got == [(TIMEOUT, "aux node a1 is suspected: no answer for 0.5 s")]
        assert len(aux.ops("a1", Op.PING)) == 1
        link.check(now + 0.3)
        assert len(aux.ops("a1", Op.PING)) == 2
    finally:
        await link.close()


async def test_a_change_may_be_held_back_and_a_probe_tells_holding_from_gone(aux: FakeAux) -> None:
    """A write may wait up to INVALIDATION_TIMEOUT_S more (near caches drop their copies): no timeout, and no suspicion while the node answers a PING."""
    loop = asyncio.get_running_loop()
    link = await started(make_link(aux, timeout=1.0, suspect_after=0.5))
    try:
        held = Answers()
        link.send(Op.SETV, (b"k", b"v", 0, 0, 1), held)
        link.flush()
        sent_at = loop.time()
        link.check(sent_at + 0.6)  # silent, and only a change waits: a probe instead of a suspicion
        assert not link.suspect and held.got == []
        await until(lambda: aux.ops("a1", Op.PING) and link.in_flight == 1, what="the probe's answer")
        link.check(sent_at + 1.5)  # past the timeout of a prompt request
        assert not link.suspect and held.got == []
        link.check(sent_at + 1.0 + INVALIDATION_TIMEOUT_S + 0.01)
        assert held.got == [(TIMEOUT, "aux node a1 did not answer within 1.0 s")]
        assert not link.suspect
    finally:
        await link.close()


async def test_a_node_that_holds_a_change_and_answers_no_probe_is_suspected() -> None:
    aux = FakeAux(lambda node, msg: None)  # answers nothing but HELLO
    loop = asyncio.get_running_loop()
    link = await started(make_link(aux, timeout=5.0, suspect_after=0.5))
    try:
        held = Answers()
        link.send(Op.DELV, (b"k", 1), held)
        link.flush()
        t = loop.time()
        link.check(t + 0.6)
        assert not link.suspect and len(aux.ops("a1", Op.PING)) == 1
        link.check(t + 1.2)  # the probe went unanswered for more than suspect_after
        assert link.suspect
        assert held.got == [(TIMEOUT, "aux node a1 is suspected: no answer for 0.5 s")]
    finally:
        await link.close()


async def test_a_suspect_node_that_answers_again_recovers() -> None:
    aux = FakeAux(lambda node, msg: None)  # answers nothing but HELLO
    recovered: list[str] = []
    link = await started(make_link(aux, timeout=5.0, suspect_after=0.1, on_recover=recovered.append))
    try:
        link.send(Op.GET, (b"k",), Answers())
        await until(lambda: link.suspect, what="the suspicion")  # the link's own sweeper
        await until(lambda: aux.ops("a1", Op.PING), what="a probe")
        assert recovered == []
        aux.respond("a1", aux.ops("a1", Op.PING)[-1], "PONG")
        await until(lambda: not link.suspect, what="the recovery")
        assert recovered == ["a1"] and link.suspected_since == 0.0 and link.usable
    finally:
        await link.close()


# -- losses and restarts ---------------------------------------------------------------------


async def test_a_lost_connection_answers_its_requests_and_is_reopened_on_demand(aux: FakeAux) -> None:
    link = await started(make_link(aux))
    try:
        waiting = Answers()
        link.send(Op.GET, (b"k",), waiting)
        link.flush()
        aux.drop("a1")
        await until(lambda: waiting.got, what="the loss to be reported")
        assert waiting.got == [(UNAVAILABLE, "connection to aux node a1 lost")]
        assert not link.connected
        failed = Answers()
        link.send(Op.PING, (), failed)  # nothing open: fails at once, and reconnects
        assert failed.got[0][0] == UNAVAILABLE
        await until(lambda: link.connected, what="the reconnection")
        assert await link.call(Op.PING) == "PONG"
        assert aux.connects["a1"] == 2
    finally:
        await link.close()


async def test_a_new_incarnation_calls_on_restart_before_the_new_connection_carries_requests(aux: FakeAux) -> None:
    seen: list[tuple[str, bool, int | None]] = []
    link: AuxLink

    def on_restart(node: str) -> None:
        seen.append((node, link.connected, link.incarnation))

    link = await started(make_link(aux, on_restart=on_restart))
    try:
        aux.drop("a1")
        await until(lambda: not link.connected)
        aux.incarnations["a1"] = 2
        link.send(Op.PING, (), Answers())  # triggers the reconnection
        await until(lambda: link.connected and link.incarnation == 2, what="the new incarnation")
        assert seen == [("a1", False, 1)]  # no connection open yet, the old incarnation still recorded
        aux.drop("a1")  # the same process again: no restart
        await until(lambda: not link.connected)
        link.send(Op.PING, (), Answers())
        await until(lambda: link.connected)
        assert len(seen) == 1
    finally:
        await link.close()


async def test_close_is_idempotent_and_answers_what_waits(aux: FakeAux) -> None:
    link = await started(make_link(aux, size=2))
    waiting = Answers()
    link.send(Op.GET, (b"k",), waiting)
    link.flush()
    await link.close()
    await link.close()
    assert waiting.got == [(UNAVAILABLE, "connection to aux node a1 lost")]
    assert not link.connected and link.open_connections == 0
    after = Answers()
    link.send(Op.PING, (), after)
    assert after.got[0][0] == UNAVAILABLE
    await asyncio.sleep(0)
    assert aux.connects["a1"] == 2, "a closed link does not reconnect"


async def test_a_retired_link_closes_once_what_is_in_flight_is_answered(aux: FakeAux) -> None:
    """Its node left the view: a request sent before is answered by the node, not failed as a lost connection."""
    link = await started(make_link(aux, timeout=5.0))
    inflight = Answers()
    link.send(Op.GET, (b"k",), inflight)
    link.flush()
    retiring = asyncio.ensure_future(link.retire())
    await asyncio.sleep(0.05)
    assert not retiring.done() and link.connected
    (msg,) = aux.ops("a1", Op.GET)
    aux.respond("a1", msg, b"v")
    await asyncio.wait_for(retiring, 1.0)
    assert inflight.got == [(OK, b"v")]
    assert not link.connected


async def test_a_retired_link_whose_node_is_silent_closes_after_its_timeout(aux: FakeAux) -> None:
    link = await started(make_link(aux, timeout=0.2, suspect_after=10.0))
    inflight = Answers()
    link.send(Op.GET, (b"k",), inflight)
    link.flush()
    await asyncio.wait_for(link.retire(), 2.0)
    assert len(inflight.got) == 1 and inflight.got[0][0] in (TIMEOUT, UNAVAILABLE)
    assert not link.connected


async def test_a_slow_factory_counts_as_a_failed_connect() -> None:
    gate = asyncio.Event()
    attempts: list[int] = []
    aux = FakeAux(pong)

    async def slow(host: str, port: int, name: str, on_answers: Callable[[], None] | None) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            await gate.wait()  # the first connect never finishes
        return await aux.connect(host, port, name, on_answers)

    link = AuxLink("a1", "10.0.0.1", 7101, size=1, timeout=0.05, factory=slow)
    link.start()
    try:
        await until(lambda: link.connected, what="the second attempt")
        assert len(attempts) >= 2  # the first never finished; a later one did
    finally:
        await link.close()


def gated(aux: FakeAux, gate: asyncio.Event, fail: bool = False) -> Callable[..., Any]:
    """A connection factory whose first connect waits for ``gate`` (then fails, with ``fail``): a link's first connection opening."""
    attempts: list[int] = []

    async def connect(host: str, port: int, name: str, on_answers: Callable[[], None] | None) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            await gate.wait()
            if fail:
                raise ConnectionRefusedError("refused")
        return await aux.connect(host, port, name, on_answers)

    return connect


async def test_requests_wait_for_the_first_connection_and_leave_on_it_in_order() -> None:
    """A node just joined is routed to at once: what is sent while its link opens is answered once it is open."""
    aux = FakeAux(lambda node, msg: msg[2] if msg[0] == Op.GET else pong(node, msg))
    gate = asyncio.Event()
    link = AuxLink("a1", "10.0.0.1", 7101, size=1, timeout=5.0, factory=gated(aux, gate))
    link.start()
    try:
        first, second = Answers(), Answers()
        link.send(Op.GET, (b"k1",), first)
        link.send(Op.GET, (b"k2",), second)
        await asyncio.sleep(0.01)
        assert (first.got, second.got, link.in_flight) == ([], [], 2)  # held, not failed
        gate.set()
        await until(lambda: bool(first.got and second.got), what="the held requests' answers")
        assert (first.got, second.got) == ([(OK, b"k1")], [(OK, b"k2")])
        assert [m[2] for m in aux.ops("a1", Op.GET)] == [b"k1", b"k2"]
        assert link.failures_total == 0
    finally:
        await link.close()


async def test_a_request_held_for_the_first_connection_times_out_at_its_deadline() -> None:
    aux = FakeAux(pong)
    gate = asyncio.Event()
    link = AuxLink("a1", "10.0.0.1", 7101, size=1, timeout=1.0, factory=gated(aux, gate))
    link.start()
    try:
        held = Answers()
        link.send(Op.GET, (b"k",), held)
        loop = asyncio.get_running_loop()
        link.check(loop.time() + 0.5)
        assert held.got == []
        link.check(loop.time() + 1.5)
        assert held.got == [(TIMEOUT, "aux node a1 at 10.0.0.1:7101: no connection within 1.0 s")]
        assert link.in_flight == 0
    finally:
        gate.set()
        await link.close()


async def test_a_failed_first_connection_answers_what_it_held_and_later_requests_fail_at_once() -> None:
    aux = FakeAux(pong)
    gate = asyncio.Event()
    link = AuxLink("a1", "10.0.0.1", 7101, size=1, timeout=5.0, factory=gated(aux, gate, fail=True))
    link.start()
    try:
        held = Answers()
        link.send(Op.GET, (b"k",), held)
        gate.set()
        await until(lambda: bool(held.got), what="the held request's answer")
        assert held.got[0][0] == UNAVAILABLE and "not connected: refused" in held.got[0][1]
        assert not link.connected
        later = Answers()
        link.send(Op.GET, (b"k",), later)  # the link reconnects in the background; it no longer holds requests
        assert later.got == [(UNAVAILABLE, "aux node a1 at 10.0.0.1:7101 is not connected")]
    finally:
        await link.close()


async def test_closing_a_link_answers_what_waits_for_its_first_connection() -> None:
    gate = asyncio.Event()
    link = AuxLink("a1", "10.0.0.1", 7101, size=1, timeout=5.0, factory=gated(FakeAux(pong), gate))
    link.start()
    held = Answers()
    link.send(Op.GET, (b"k",), held)
    await link.close()
    assert held.got == [(UNAVAILABLE, "the link to aux node a1 closed")]


async def test_auth_error_from_a_call_is_typed(aux: FakeAux) -> None:
    aux.answer = lambda node, msg: Reply(int(Status.AUTH_FAILED), "authentication required")
    link = await started(make_link(aux))
    try:
        with pytest.raises(AuthError):
            await link.call(Op.SCAN, [], 0, 10, 0)
    finally:
        await link.close()


async def push(transport: Any, kind: int, payload: Any) -> None:
    """The fake aux node sends a frame unasked; it is delivered on the next loop turn."""
    transport.reply(PUSH_ID, kind, payload)
    await asyncio.sleep(0)


async def test_an_invalidation_is_applied_then_acknowledged_and_a_malformed_push_closes_the_connection(aux: FakeAux) -> None:
    """What an aux node pushes: INVALIDATE drops copies then answers INVACK at once; an unknown kind is ignored; garbage cuts the connection."""
    link = await started(make_link(aux))
    seen: list[tuple[bytes, int]] = []
    link.on_invalidate = lambda key, version: seen.append((key, version))
    [transport] = aux.transports["a1"]
    await push(transport, int(Push.INVALIDATE), [3, [[b"k", 7], [b"m", 2**63 - 1]]])
    assert seen == [(b"k", 7), (b"m", 2**63 - 1)]
    assert [m[2:] for m in aux.ops("a1", Op.INVACK)] == [[3]]  # written before the next loop turn: the node holds a write for it
    await push(transport, 99, "a kind this master does not know")
    assert link.open_connections == 1
    for garbage in ([1, [["not bytes", 1]]], [0, []], "no", [2, [[b"k"]]]):
        await push(transport, int(Push.INVALIDATE), garbage)
        assert link.open_connections == 0 and len(seen) == 2, garbage
        link.send(Op.PING, (), Answers())  # a link reconnects on demand
        await until(lambda: link.open_connections == 1, what="the link's connection reopened")
        [*_, transport] = aux.transports["a1"]
    await link.close()


async def test_a_pushed_value_goes_to_the_near_cache_and_the_acknowledgement_names_the_keys_not_held(aux: FakeAux) -> None:
    """``[key, version, value, expires_at]`` entries update copies; the INVACK lists the ones this master no longer holds."""
    link = await started(make_link(aux))
    invalidated: list[tuple[bytes, int]] = []
    updates: list[tuple[bytes, int, bytes, int]] = []
    link.on_invalidate = lambda key, version: invalidated.append((key, version))

    def update(key: bytes, version: int, value: bytes, expires_at: int, conn: Any) -> bool:
        assert conn is link.tracking or conn in link._conns
        updates.append((key, version, value, expires_at))
        return key != b"gone"

    link.on_update = update
    [transport] = aux.transports["a1"]
    await push(transport, int(Push.INVALIDATE), [4, [[b"k", 7, b"v", 0], [b"gone", 8, b"w", 9], [b"m", 9]]])
    assert updates == [(b"k", 7, b"v", 0), (b"gone", 8, b"w", 9)] and invalidated == [(b"m", 9)]
    assert [m[2:] for m in aux.ops("a1", Op.INVACK)] == [[4, [b"gone"]]]
    await push(transport, int(Push.INVALIDATE), [5, [[b"k", 10, b"v2", 0]]])
    assert [m[2:] for m in aux.ops("a1", Op.INVACK)][-1] == [5]  # every key still held: the plain form
    for garbage in ([6, [[b"k", 1, "not bytes", 0]]], [6, [[b"k", 1, b"v"]]], [6, [[b"k", 1, b"v", 0, 0]]]):
        await push(transport, int(Push.INVALIDATE), garbage)
        assert link.open_connections == 0, garbage
        link.send(Op.PING, (), Answers())
        await until(lambda: link.open_connections == 1, what="the link's connection reopened")
        [*_, transport] = aux.transports["a1"]
    assert len(updates) == 3
    await link.close()


async def test_a_link_asks_for_values_only_from_a_node_that_lists_value_push() -> None:
    for features, values in (([], False), (["keep-copy"], False), (["keep-copy", "value-push"], True)):
        aux = FakeAux(lambda node, msg: None)
        aux.hello_replies["a1"] = Reply(OK, {"role": "aux", "node_id": "a1", "incarnation": 1, "features": features})
        link = await started(make_link(aux))
        try:
            assert link.values is values and link.keeps is ("keep-copy" in features)
        finally:
            await link.close()


# -- the near-cache lease ---------------------------------------------------------------------


async def test_the_near_cache_lease_runs_from_a_pings_send_not_from_its_answer() -> None:
    """A fill is preceded by a lease PING; the lease counts from when that PING left, however late its answer is read."""
    aux = FakeAux(lambda node, msg: None)  # answers nothing but HELLO: the test answers
    link = await started(make_link(aux))
    loop = asyncio.get_running_loop()
    try:
        before = loop.time()
        conn = link.send_tracked(Op.GETV, (b"k", True), Answers())
        after = loop.time()
        link.flush()
        assert conn is not None and conn.lease_ping and conn.lease_from < before - NEAR_LEASE_S
        assert [m[0] for m in aux.ops("a1")] == [Op.PING, Op.GETV]  # the PING leaves before the fill
        answered_at = loop.time() + 0.05
        await until(lambda: loop.time() >= answered_at, what="some time to pass")
        aux.respond("a1", aux.ops("a1", Op.PING)[0], "PONG")
        await until(lambda: not conn.lease_ping, what="the PING's answer")
        assert before <= conn.lease_from <= after  # the send, not the answer 50 ms later
        start = conn.lease_from
        link.keep_tracking_alive(start + NEAR_LEASE_S / 8)  # fresh: no new PING
        assert len(aux.ops("a1", Op.PING)) == 1
        link.keep_tracking_alive(start + NEAR_LEASE_S / 2)
        link.keep_tracking_alive(start + NEAR_LEASE_S / 2)  # one in flight at a time
        link.flush()
        assert len(aux.ops("a1", Op.PING)) == 2 and conn.lease_ping
        aux.drop("a1")  # a PING lost (or timed out) renews nothing
        await until(lambda: not conn.lease_ping, what="the loss")
        assert conn.lease_from == start
    finally:
        await link.close()
