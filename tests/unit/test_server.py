"""The server shell (``dcache.server``): dispatch, credentials, errors, answers later, and every bound, over fake transports."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from typing import Any

import pytest

from dcache.config import NodeConfig
from dcache.errors import NotAnIntegerError, UnavailableError, UnknownOpError
from dcache.protocol import HEADER, MAX_HELLO_FRAME_BYTES, PROTOCOL_VERSION, Credential, FrameDecoder, Op, Status, encode_request, pack
from dcache.server import LATER, MAX_IN_FLIGHT, UNKNOWN_OP, FrameProtocol, RequestGate, Service, deferred
from tests.fakes import FakeTransport, SlowReaderTransport

from .master.fakecluster import until

OK = 0


class Toy(Service):
    """A service with a few handlers that answer now, later, wrongly or not at all."""

    role = "toy"

    def __init__(self, **settings: Any) -> None:
        super().__init__("toy-1", NodeConfig(**settings))
        #: Requests answered LATER: (connection, request id).
        self.later: list[tuple[FrameProtocol, int]] = []
        #: Requests routed over several loop iterations (``hold_input``), answered LATER.
        self.routed: list[tuple[FrameProtocol, int]] = []
        self.handlers[Op.PING] = lambda conn, rid, args: "PONG"
        self.handlers[Op.GET] = self.get
        self.handlers[Op.STATS] = lambda conn, rid, args: self.connection_stats()
        self.handlers[Op.SCAN] = lambda conn, rid, args: "scanned"  # a cluster op

    def get(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        if key == b"later":
            self.later.append((conn, rid))
            return LATER
        if key == b"routed":  # as a master's MSET of many keys: its connection's later requests wait
            conn.hold_input()
            self.routed.append((conn, rid))
            return LATER
        if key == b"boom":
            raise RuntimeError("handler bug")
        if key == b"unencodable":
            return object()
        if key == b"big":
            return b"x" * (self.limits.max_frame_bytes + 1)
        if key.startswith(b"deferred:"):
            return deferred(_deferred(key[9:]))
        return b"value of " + key


async def _deferred(how: bytes) -> Any:
    await asyncio.sleep(0)
    if how == b"ok":
        return "done later"
    if how == b"typed":
        raise NotAnIntegerError("not a number")
    if how == b"bug":
        raise KeyError("oops")
    if how == b"cancel":
        raise asyncio.CancelledError
    return None


def connect(service: Service, peer: Any = ("10.0.0.1", 5000)) -> tuple[FrameProtocol, FakeTransport]:
    conn = service.protocol_factory()
    transport = FakeTransport(peername=peer)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def req(op: int, rid: Any, *args: Any) -> bytes:
    return encode_request(op, rid, *args)


def raw(obj: Any) -> bytes:
    body = pack(obj)
    return HEADER.pack(len(body)) + body


HELLO = req(Op.HELLO, 1, PROTOCOL_VERSION, "tok", "test")


# -- dispatch ---------------------------------------------------------------------------


async def test_synchronous_answers_of_one_read_leave_in_one_write() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.PING, 1) + req(Op.GET, 2, b"k") + req(Op.PING, 3))
    assert len(t.written) == 1
    assert t.frames() == [[1, OK, "PONG"], [2, OK, b"value of k"], [3, OK, "PONG"]]
    assert svc.requests_total == 3 and svc.op_requests[Op.PING] == 2 and svc.op_requests[Op.GET] == 1
    assert svc.errors_total == 0


async def test_without_a_token_every_op_is_open_and_hello_says_who_answers() -> None:
    svc = Toy()
    conn, t = connect(svc)
    assert conn.level == Credential.CLUSTER
    conn.data_received(req(Op.HELLO, 1, PROTOCOL_VERSION, None, "client-x") + req(Op.SCAN, 2, [[0, 1]], 0, 10, 0))
    hello, scan = t.frames()
    assert hello[2]["role"] == "toy" and hello[2]["node_id"] == "toy-1" and hello[2]["version"] == PROTOCOL_VERSION
    assert scan == [2, OK, "scanned"]
    assert conn.client_name == "client-x"


async def test_a_token_gates_every_op_but_hello() -> None:
    svc = Toy(auth_token="tok")
    conn, t = connect(svc)
    assert conn.level == Credential.NONE
    conn.data_received(req(Op.PING, 1) + req(Op.SCAN, 2, [[0, 1]], 0, 10, 0) + req(99, 3))
    for _ in range(4):  # before auth, one frame per loop iteration
        await asyncio.sleep(0)
    ping, scan, unknown = t.frames()
    assert ping[:2] == [1, int(Status.AUTH_FAILED)] and "authentication required" in ping[2]
    assert scan[:2] == [2, int(Status.AUTH_FAILED)]
    assert unknown[:2] == [3, int(Status.UNKNOWN_OP)]
    t.written.clear()
    conn.data_received(req(Op.HELLO, 4, PROTOCOL_VERSION, "wrong", "x"))
    assert t.frames() == [[4, int(Status.AUTH_FAILED), "invalid auth token"]]
    assert conn.level == Credential.NONE
    t.written.clear()
    conn.data_received(req(Op.HELLO, 5, PROTOCOL_VERSION, "tok", "x") + req(Op.PING, 6) + req(Op.SCAN, 7, [[0, 1]], 0, 10, 0))
    await asyncio.sleep(0)  # the frames after the HELLO are read once it has raised the limit
    assert [f[:2] for f in t.frames()] == [[5, OK], [6, OK], [7, OK]]
    assert int(conn.level) == Credential.CLUSTER and not t.closed
    # refusals before auth are counted in the unknown-op slot (no handler took them), a bad HELLO under HELLO
    assert svc.op_errors[UNKNOWN_OP] == 3 and svc.op_errors[Op.HELLO] == 1 and svc.op_errors[Op.PING] == 0


async def test_before_auth_only_small_frames_are_read() -> None:
    svc = Toy(auth_token="tok", max_key_bytes=8192)
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"k" * (MAX_HELLO_FRAME_BYTES + 10)))
    (error,) = t.frames()
    assert error[:2] == [0, int(Status.FRAME_TOO_LARGE)]
    assert t.closed and svc.protocol_errors_total == 1
    conn2, t2 = connect(svc)
    conn2.data_received(HELLO)
    conn2.data_received(req(Op.GET, 2, b"k" * (MAX_HELLO_FRAME_BYTES + 10)))
    assert [f[:2] for f in t2.frames()] == [[1, OK], [2, OK]] and not t2.closed


async def test_a_request_over_the_pre_auth_limit_pipelined_after_hello_is_served() -> None:
    """Before auth, frames are read one at a time: the HELLO decides the limit of the frames after it."""
    svc = Toy(auth_token="tok", max_key_bytes=8192)
    conn, t = connect(svc)
    conn.data_received(HELLO + req(Op.GET, 2, b"k" * (MAX_HELLO_FRAME_BYTES + 10)) + req(Op.PING, 3))
    for _ in range(3):
        await asyncio.sleep(0)
    assert [f[:2] for f in t.frames()] == [[1, OK], [2, OK], [3, OK]] and not t.closed


async def test_hello_with_another_protocol_version_is_refused() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.HELLO, 1, PROTOCOL_VERSION + 1))
    assert t.frames()[0][:2] == [1, int(Status.HANDSHAKE)]
    assert not t.closed


@pytest.mark.parametrize(
    "frame",
    [
        raw([Op.PING, 0]),
        raw([Op.PING, -1]),
        raw([Op.PING, "1"]),
        raw([Op.PING, 1.5]),
        raw([Op.PING]),
        raw("not an array"),
    ],
)
async def test_a_bad_request_id_or_shape_is_answered_with_id_0_and_the_connection_stays(frame: bytes) -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(frame + req(Op.PING, 9) + raw(["PING", 10]))
    bad, ping, op_not_int = t.frames()
    assert bad[:2] == [0, int(Status.BAD_ARGUMENTS)]
    assert op_not_int[:2] == [10, int(Status.BAD_ARGUMENTS)], "a good id is used even when the op is bad"
    assert ping == [9, OK, "PONG"] and not t.closed
    assert svc.errors_total == 2


async def test_unknown_ops_and_bad_arguments_are_answered_and_counted_per_op() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(200, 1) + req(Op.GET, 2) + req(Op.GET, 3, 42) + req(Op.TOUCH, 4, b"k"))
    unknown, arity, key_type, not_served = t.frames()
    assert unknown == [1, int(Status.UNKNOWN_OP), "unknown op 200"]
    assert arity[:2] == [2, int(Status.BAD_ARGUMENTS)] and key_type[:2] == [3, int(Status.BAD_ARGUMENTS)]
    assert not_served[:2] == [4, int(Status.UNKNOWN_OP)], "an op this role has no handler for is unknown here"
    assert svc.op_errors[Op.GET] == 2 and svc.op_errors[UNKNOWN_OP] == 2
    assert svc.op_requests[UNKNOWN_OP] == 2


async def test_a_handler_bug_is_answered_internal_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    svc = Toy()
    conn, t = connect(svc)
    with caplog.at_level(logging.ERROR, logger="dcache.server"):
        conn.data_received(req(Op.GET, 1, b"boom") + req(Op.GET, 2, b"unencodable") + req(Op.GET, 3, b"ok"))
    boom, unencodable, ok = t.frames()
    assert boom == [1, int(Status.INTERNAL), "internal error: RuntimeError"]
    assert unencodable == [2, int(Status.INTERNAL), "internal error: unencodable result"]
    assert ok == [3, OK, b"value of ok"]
    assert svc.op_errors[Op.GET] == 1 and svc.errors_total == 1
    assert "handler bug" in caplog.text and "cannot encode" in caplog.text


async def test_an_answer_too_large_for_a_frame_becomes_an_error_and_the_connection_stays() -> None:
    svc = Toy(max_frame_bytes=8192, max_value_bytes=4096, max_key_bytes=250)
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"big") + req(Op.PING, 2))
    big, ping = t.frames()
    assert big[:2] == [1, int(Status.FRAME_TOO_LARGE)] and "8192-byte frame limit" in big[2]
    assert ping == [2, OK, "PONG"] and not t.closed
    assert svc.op_errors[Op.GET] == 1


async def test_undecodable_bytes_get_an_error_frame_then_close() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.PING, 1) + HEADER.pack(3) + b"\xc1\xc1\xc1")
    ping, error = t.frames()
    assert ping == [1, OK, "PONG"]  # what came before the bad frame is answered first
    assert error[:2] == [0, int(Status.PROTOCOL_ERROR)]
    assert t.closed and svc.protocol_errors_total == 1
    conn.data_received(req(Op.PING, 2))  # a closed connection reads nothing more
    assert len(t.frames()) == 2


# -- answers later ------------------------------------------------------------------------


async def test_later_answers_are_flushed_together_at_the_end_of_the_iteration() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"later") + req(Op.GET, 2, b"later") + req(Op.PING, 3))
    assert t.frames() == [[3, OK, "PONG"]]
    assert conn.in_flight == svc.in_flight == 2
    (c1, r1), (c2, r2) = svc.later
    c2.reply(r2, OK, "second", Op.GET)
    c1.reply(r1, int(Status.NOT_AN_INTEGER), "not a number", Op.GET)
    assert len(t.written) == 1, "nothing is written before the end of the iteration"
    await until(lambda: len(t.written) == 2)
    assert t.frames()[1:] == [[2, OK, "second"], [1, int(Status.NOT_AN_INTEGER), "not a number"]]
    assert conn.in_flight == svc.in_flight == 0
    assert svc.op_errors[Op.GET] == 1


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (b"ok", [OK, "done later"]),
        (b"typed", [int(Status.NOT_AN_INTEGER), "not a number"]),
        (b"bug", [int(Status.INTERNAL), "internal error: KeyError"]),
        (b"cancel", [int(Status.UNAVAILABLE), "request cancelled: the node is shutting down"]),
    ],
)
async def test_deferred_answers(how: bytes, expected: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    svc = Toy()
    conn, t = connect(svc)
    with caplog.at_level(logging.CRITICAL, logger="dcache.server"):
        conn.data_received(req(Op.GET, 7, b"deferred:" + how))
        assert conn.in_flight == 1
        await until(lambda: t.written)
    assert t.frames() == [[7, *expected]]
    assert conn.in_flight == 0


async def test_answers_owed_above_the_limit_pause_reading_until_half_are_sent() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(b"".join(req(Op.GET, rid, b"later") for rid in range(1, MAX_IN_FLIGHT + 1)))
    assert conn.in_flight == MAX_IN_FLIGHT and not t.reading
    for c, rid in svc.later[: MAX_IN_FLIGHT // 2 - 1]:
        c.reply(rid, OK, None)
    assert not t.reading
    c, rid = svc.later[MAX_IN_FLIGHT // 2 - 1]
    c.reply(rid, OK, None)
    await asyncio.sleep(0)  # reading resumes in the next loop iteration (after the frames the throttle held)
    assert t.reading and conn.in_flight == MAX_IN_FLIGHT // 2


async def test_a_full_write_buffer_pauses_reading_until_it_drains() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.pause_writing()
    assert not t.reading
    conn.resume_writing()
    await asyncio.sleep(0)
    assert t.reading


class Large(Toy):
    """GET answers a 100 kB value now; GET ``later`` is owed (answered through ``reply``)."""

    value = b"x" * 100_000

    def get(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.ran.append(rid)
        if key == b"later":
            self.later.append((conn, rid))
            return LATER
        return self.value

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.ran: list[int] = []


def slow_reader(service: Service, high: int = 64 * 1024) -> tuple[FrameProtocol, SlowReaderTransport]:
    conn = service.protocol_factory()
    t = SlowReaderTransport(high=high)
    t.protocol = conn
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


async def test_frames_wait_while_the_client_does_not_read_its_answers() -> None:
    """200 pipelined GETs of 100 kB from a client that does not read: the batch stops at the first push past the
    high-water mark, and each time the client reads the next push goes out, until every answer left once, in order."""
    svc = Large()
    conn, t = slow_reader(svc)
    n = 200
    conn.data_received(b"".join(req(Op.GET, rid, b"k") for rid in range(1, n + 1)))
    assert t.paused and not t.reading
    assert len(svc.ran) < 10 and t.size < 1_000_000  # 20 MB of answers not built
    assert svc.requests_total == len(svc.ran)  # held frames are counted when they run
    frames: list[Any] = []
    for _ in range(n):  # the client reads what it got, a loop iteration at a time
        frames += FrameDecoder().feed(b"".join(t.written))
        t.written.clear()
        if len(frames) == n:
            break
        t.drain()
        await asyncio.sleep(0)
    assert [f[0] for f in frames] == list(range(1, n + 1)) and all(f[1:] == [OK, Large.value] for f in frames)
    assert svc.ran == list(range(1, n + 1)) and svc.requests_total == n
    t.drain()  # the client read the last ones
    await asyncio.sleep(0)
    assert t.reading and not t.closed and svc.buffered_output == 0


async def test_frames_held_by_the_throttle_run_once_half_the_answers_owed_are_sent() -> None:
    svc = Large()
    conn, t = connect(svc)
    extra = 100
    conn.data_received(b"".join(req(Op.GET, rid, b"later") for rid in range(1, MAX_IN_FLIGHT + extra + 1)))
    assert conn.in_flight == MAX_IN_FLIGHT and len(svc.ran) == MAX_IN_FLIGHT and not t.reading  # the rest is not run
    conn.data_received(b"")  # a stray call while throttled runs nothing
    assert len(svc.ran) == MAX_IN_FLIGHT
    for c, rid in svc.later[: MAX_IN_FLIGHT // 2]:
        c.reply(rid, OK, None)
    await asyncio.sleep(0)
    assert svc.ran == list(range(1, MAX_IN_FLIGHT + extra + 1))  # in order, each once
    assert conn.in_flight == MAX_IN_FLIGHT // 2 + extra and t.reading


async def test_a_bad_frame_behind_held_frames_closes_the_connection_only_after_they_ran() -> None:
    svc = Large()
    conn, t = slow_reader(svc)
    n = 20
    conn.data_received(b"".join(req(Op.GET, rid, b"k") for rid in range(1, n + 1)) + b"\x00\x00\x00\x02\xc1\xc1")
    assert not t.eof and len(svc.ran) < n
    for _ in range(n):
        t.drain()
        await asyncio.sleep(0)
        if t.eof:
            break
    frames = t.frames()
    assert [f[0] for f in frames[:-1]] == list(range(1, n + 1))
    assert frames[-1][0] == 0 and frames[-1][1] == int(Status.PROTOCOL_ERROR) and t.eof


async def test_answers_held_past_the_output_cap_cut_off_the_connection_holding_the_most(caplog: pytest.LogCaptureFixture) -> None:
    """A master's case: answers owed keep arriving for a client that does not read them. Past --max-output-buffer the
    connection is aborted (its answers dropped), counted and logged; another client is not touched."""
    svc = Large(max_output_buffer=1_000_000)
    conn, t = slow_reader(svc)
    other, t2 = slow_reader(svc)
    conn.data_received(b"".join(req(Op.GET, rid, b"later") for rid in range(1, 101)))
    other.data_received(req(Op.GET, 1000, b"k"))  # 100 kB held for a client that reads later: under the cap
    assert other.unsent == t2.size > 0
    with caplog.at_level(logging.WARNING, logger="dcache.server"):
        for c, rid in svc.later:
            c.reply(rid, OK, Large.value)
            svc.flush_all()
    assert t.closed and svc.output_overflows == 1 and "--max-output-buffer" in caplog.text
    assert t.size < 1_200_000  # cut off as soon as it passed the cap, not after 10 MB
    await asyncio.sleep(0)
    assert conn not in svc.state.connections and svc.buffered_output == t2.size
    assert svc.connection_stats()["output_overflows"] == 1
    t2.drain()
    await asyncio.sleep(0)
    assert not t2.closed and svc.buffered_output == 0 and t2.reading


async def test_a_connection_cut_off_by_its_own_push_runs_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    svc = Large(max_output_buffer=200_000)
    conn, t = slow_reader(svc)
    with caplog.at_level(logging.CRITICAL, logger="dcache.server"):
        conn.data_received(b"".join(req(Op.GET, rid, b"k") for rid in range(1, 101)))
    assert t.closed and svc.output_overflows == 1 and svc.buffered_output == 0
    ran = len(svc.ran)
    assert ran < 10 and svc.requests_total == ran
    conn.resume_writing()  # a late callback from the transport
    await asyncio.sleep(0)
    assert len(svc.ran) == ran and conn not in svc.state.connections


# -- bounds -----------------------------------------------------------------------------


async def test_connections_over_the_limit_are_refused_with_overloaded(caplog: pytest.LogCaptureFixture) -> None:
    svc = Toy(max_connections=2)
    kept = [connect(svc) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="dcache.server"):
        refused = [connect(svc, ("10.0.0.9", 6000 + i)) for i in range(3)]
    for _, t in refused:
        assert t.closed
        assert t.frames() == [[0, int(Status.OVERLOADED), "too many connections: this node accepts at most 2"]]
    assert all(not t.closed for _, t in kept)
    assert svc.rejected_connections == 3 and len(svc.state.connections) == 2 and svc.state.total_connections == 5
    assert caplog.text.count("connection limit reached") == 1, "one warning, not one per refusal"


async def test_the_input_buffer_cap_closes_the_connections_holding_the_most_and_no_more() -> None:
    svc = Toy(max_input_buffer=10_000, max_key_bytes=10_000)
    large, t_large = connect(svc)
    small, t_small = connect(svc)
    growing, t_growing = connect(svc)
    frame = req(Op.GET, 1, b"k" * 9000)
    large.data_received(frame[:6000])
    small.data_received(frame[:3000])
    growing.data_received(frame[:500])
    assert svc.buffered_input == 9500 and svc.input_overflows == 0
    growing.data_received(frame[500:1500])  # the total passes the cap: the largest holder goes, and only it
    assert t_large.closed
    assert t_large.frames() == [[0, int(Status.OVERLOADED), "this node's input buffer is full: frame refused, try again later"]]
    assert not t_small.closed and not t_growing.closed, "closing the largest holder brought the total under the cap"
    assert svc.input_overflows == 1
    await until(lambda: large not in svc.state.connections)
    assert svc.buffered_input == 4500
    small.data_received(frame[3000:])
    assert t_small.frames()[0][:2] == [1, OK]
    growing.data_received(frame[1500:])
    assert t_growing.frames()[0][:2] == [1, OK]
    assert svc.buffered_input == 0


async def test_the_input_buffer_cap_counts_the_objects_a_large_frame_decoded_so_far() -> None:
    """A large frame is decoded as it arrives: a client trickling one of tiny items is charged what its objects hold.

    Half of a frame of 60,000 two-byte strings is 120 KB on the wire and
    about 1.4 MB once decoded; the cap (500 KB) closes it, where counting
    its bytes alone would not.
    """
    svc = Toy(max_input_buffer=500_000)
    dense, t_dense = connect(svc)
    steady, t_steady = connect(svc)
    frame = req(Op.MGET, 1, [b"xy"] * 60_000)
    dense.data_received(frame[: len(frame) // 2])
    assert t_dense.closed and svc.input_overflows == 1
    assert t_dense.frames() == [[0, int(Status.OVERLOADED), "this node's input buffer is full: frame refused, try again later"]]
    await until(lambda: dense not in svc.state.connections)
    assert svc.buffered_input == 0
    steady.data_received(req(Op.PING, 2))
    assert t_steady.frames()[0][:2] == [2, OK], "the others are served"


async def test_sweep_closes_connections_past_the_frame_and_idle_timeouts() -> None:
    svc = Toy(frame_timeout=5.0, idle_timeout=60.0)
    now = svc.now
    partial, t_partial = connect(svc)
    _, t_idle = connect(svc)
    busy, t_busy = connect(svc)
    partial.data_received(req(Op.PING, 1)[:3])
    busy.data_received(req(Op.GET, 1, b"later"))  # an answer is owed: not idle
    svc.sweep(now + 4.0)
    assert not any(t.closed for t in (t_partial, t_idle, t_busy))
    svc.sweep(now + 5.5)
    assert t_partial.closed and t_partial.frames()[0][:2] == [0, int(Status.PROTOCOL_ERROR)]
    assert "frame not completed within 5.0 s" in t_partial.frames()[0][2]
    assert not t_idle.closed and svc.frame_timeouts == 1
    svc.sweep(now + 61)
    assert t_idle.closed and t_idle.written == [] and svc.idle_timeouts == 1
    assert not t_busy.closed


async def test_execute_runs_a_request_in_process_as_a_trusted_caller() -> None:
    svc = Toy(auth_token="tok")
    assert svc.execute([Op.SCAN, 1, [[0, 1]], 0, 10, 0]) == "scanned"
    assert svc.execute([Op.GET, 2, b"k"]) == b"value of k"
    with pytest.raises(UnknownOpError):
        svc.execute([Op.INCR, 3, b"k", 1])  # no handler here


# -- shutdown and memory -------------------------------------------------------------------------


async def test_shutdown_lets_requests_in_flight_finish_then_closes() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"later"))
    background = svc.state.spawn(asyncio.sleep(60), "background")

    async def answer_soon() -> None:
        await asyncio.sleep(0)
        c, rid = svc.later[0]
        c.reply(rid, OK, "finished")

    answering = asyncio.ensure_future(answer_soon())
    await asyncio.wait_for(svc.shutdown(grace=5.0), 5.0)
    await answering
    assert t.frames() == [[1, OK, "finished"]]
    assert t.closed and background.cancelled()


async def test_shutdown_gives_up_after_the_grace_period(caplog: pytest.LogCaptureFixture) -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"later"))
    with caplog.at_level(logging.WARNING, logger="dcache.server"):
        await asyncio.wait_for(svc.shutdown(grace=0.05), 5.0)
    assert t.closed and "1 request(s) still in flight" in caplog.text


class Watched(FrameProtocol):
    __slots__ = ("__weakref__",)


async def test_a_closed_connection_is_freed_by_reference_counting_alone() -> None:
    svc = Toy()
    svc.build_tables()
    gc.disable()
    try:
        conn = Watched(svc)
        transport = FakeTransport()
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(req(Op.PING, 1) + req(Op.GET, 2, b"k" * 5000)[:3000])  # an answer and a partial frame
        conn.close()
        await until(lambda: not svc.state.connections)  # connection_lost ran
        ref = weakref.ref(conn)
        transport.protocol = None
        del conn, transport
        assert ref() is None, "a reference cycle keeps the connection (and its buffers) until the collector runs"
        assert svc.buffered_input == 0
    finally:
        gc.enable()


# -- the request gate (a master before its first ring) ------------------------------------------

UNAVAILABLE = int(Status.UNAVAILABLE)


def gated(svc: Toy, wait_s: float = 60.0, max_waiters: int = 100) -> RequestGate:
    gate = RequestGate(svc, [Op.GET], wait_s, max_waiters, lambda: "no ring yet")
    gate.close()
    return gate


async def test_a_closed_gate_holds_its_ops_and_runs_them_in_order_once_open_while_other_ops_pass() -> None:
    svc = Toy()
    gate = gated(svc)
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"a") + req(Op.PING, 2) + req(Op.GET, 3, b"later") + req(Op.GET, 4, b"deferred:typed"))
    conn.data_received(req(Op.GET, 5, b"b"))
    assert t.frames() == [[2, OK, "PONG"]]  # PING is not held
    assert (gate.closed, gate.waiting, gate.held_total, conn.in_flight) == (True, 4, 4, 4)
    gate.open()
    assert not gate.closed
    await until(lambda: len(t.frames()) == 4)
    assert t.frames()[1:] == [[1, OK, b"value of a"], [5, OK, b"value of b"], [4, int(Status.NOT_AN_INTEGER), "not a number"]]
    ((c, rid),) = svc.later  # the held request a handler answers later goes on as it would have
    c.reply(rid, OK, "later", Op.GET)
    await until(lambda: len(t.frames()) == 5)
    assert conn.in_flight == svc.in_flight == 0
    conn.data_received(req(Op.GET, 6, b"c"))  # an open gate costs nothing: the handler runs at once
    assert t.frames()[-1] == [6, OK, b"value of c"]
    assert gate.expired_total == 0


async def test_held_requests_behind_one_routed_over_several_iterations_wait_for_it_once_the_gate_opens() -> None:
    """A GET held behind a held MSET of many keys reads what the MSET wrote: it runs once the MSET is routed, not right after its first slice.

    Found by a pipelined MSET + GET + MGET sent to a master still without a
    ring (a test under load): the gate ran the three back to back and the
    GET read the key before the MSET's last slice wrote it.
    """
    svc = Toy()
    gate = gated(svc)
    conn, t = connect(svc)
    other, t_other = connect(svc)
    conn.data_received(req(Op.GET, 1, b"routed") + req(Op.GET, 2, b"a") + req(Op.GET, 3, b"b"))
    other.data_received(req(Op.GET, 1, b"c"))
    gate.open()
    for _ in range(5):
        await asyncio.sleep(0)
    assert t.frames() == [], "the requests behind the routed one ran before it was routed"
    assert t_other.frames() == [[1, OK, b"value of c"]]  # the other connections go on
    ((c, rid),) = svc.routed
    c.release_input()  # its last key routed
    await until(lambda: len(t.frames()) == 2)
    assert t.frames() == [[2, OK, b"value of a"], [3, OK, b"value of b"]]
    c.reply(rid, OK, 3000, Op.GET)
    await until(lambda: len(t.frames()) == 3)
    assert conn.in_flight == 0 and gate.waiting == 0


async def test_a_held_request_is_answered_unavailable_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    svc = Toy()
    gate = gated(svc, wait_s=0.05)
    conn, t = connect(svc)
    with caplog.at_level(logging.WARNING, logger="dcache.server"):
        conn.data_received(req(Op.GET, 1, b"a"))
        await asyncio.sleep(0.02)
        conn.data_received(req(Op.GET, 2, b"b"))
        await until(lambda: len(t.frames()) == 1)
        assert t.frames() == [[1, UNAVAILABLE, "no ring yet"]]  # the second waits its own bound
        await until(lambda: len(t.frames()) == 2)
    assert t.frames()[1] == [2, UNAVAILABLE, "no ring yet"]
    assert (gate.waiting, gate.expired_total, conn.in_flight) == (0, 2, 0)
    assert "were answered UNAVAILABLE: no ring yet" in caplog.text
    assert svc.op_errors[Op.GET] == 2


async def test_wait_until_moves_the_bound_of_held_and_later_requests_to_a_later_time() -> None:
    svc = Toy()
    gate = gated(svc, wait_s=0.05)
    conn, t = connect(svc)
    loop = asyncio.get_running_loop()
    start = loop.time()
    conn.data_received(req(Op.GET, 1, b"a"))
    gate.wait_until(start + 0.3)  # a restarted coordinator: its ring is due by then
    gate.wait_until(start + 0.1)  # an earlier time changes nothing
    conn.data_received(req(Op.GET, 2, b"b"))
    ready = asyncio.ensure_future(gate.ready())
    await until(lambda: len(t.frames()) == 2 and ready.done())
    assert loop.time() - start >= 0.3  # not after their own 0.05 s
    assert t.frames() == [[1, UNAVAILABLE, "no ring yet"], [2, UNAVAILABLE, "no ring yet"]]
    with pytest.raises(UnavailableError):
        ready.result()
    gate.wait_until(loop.time() + 60)
    conn.data_received(req(Op.GET, 3, b"c"))
    gate.open()  # the gate opening ends the wait, as before
    await until(lambda: len(t.frames()) == 3)
    assert t.frames()[-1] == [3, OK, b"value of c"]


async def test_past_the_count_or_byte_bound_a_request_is_refused_at_once() -> None:
    svc = Toy(max_input_buffer=1000)
    gate = gated(svc, max_waiters=2)
    conn, t = connect(svc)
    conn.data_received(req(Op.GET, 1, b"a") + req(Op.GET, 2, b"b") + req(Op.GET, 3, b"c"))
    assert t.frames() == [[3, UNAVAILABLE, "no ring yet; 2 requests (2 bytes) already wait for it"]]
    gate.open()
    await until(lambda: len(t.frames()) == 3)
    gate = gated(svc)
    conn.data_received(req(Op.GET, 4, b"k" * 999) + req(Op.GET, 5, b"kk"))  # 999 + 2 bytes > 1000
    assert t.frames()[-1] == [5, UNAVAILABLE, "no ring yet; 1 requests (999 bytes) already wait for it"]
    assert gate.expired_total == 1


async def test_fail_all_answers_every_held_request_and_refuses_the_next_ones() -> None:
    svc = Toy()
    gate = gated(svc)
    conn, t = connect(svc)
    gone, t2 = connect(svc)
    conn.data_received(req(Op.GET, 1, b"a"))
    gone.data_received(req(Op.GET, 2, b"b"))
    t2.close()
    gate.fail_all("shutting down")
    await until(lambda: t.written)
    assert t.frames() == [[1, UNAVAILABLE, "shutting down"]]
    assert gate.waiting == 0 and svc.in_flight == 0
    conn.data_received(req(Op.GET, 3, b"c"))  # refused at once from then on: the node stops
    await until(lambda: len(t.frames()) == 2)
    assert t.frames()[1] == [3, UNAVAILABLE, "shutting down"] and gate.waiting == 0


async def test_ready_waits_for_the_gate_to_open_under_the_same_bounds() -> None:
    """RESP's SCAN and FLUSHDB on a master wait in ``ready``: they go on once the gate opens, or fail typed."""
    svc = Toy()
    gate = gated(svc, max_waiters=2)
    conn, _ = connect(svc)
    conn.data_received(req(Op.GET, 1, b"a"))  # one held request and one ``ready`` fill the bound
    first = asyncio.ensure_future(gate.ready())
    await asyncio.sleep(0)
    with pytest.raises(UnavailableError, match="no ring yet; 2 requests already wait for it"):
        await gate.ready()
    assert not first.done()
    gate.open()
    await asyncio.wait_for(first, 1)  # went on once the gate opened
    await gate.ready()  # an open gate: at once
    assert (gate.held_total, gate.expired_total) == (2, 1)

    gate = gated(svc, wait_s=0.05)
    with pytest.raises(UnavailableError, match=r"^no ring yet$"):
        await gate.ready()  # the bound of a held request
    waiting = asyncio.ensure_future(gate.ready())
    await asyncio.sleep(0)
    gate.fail_all("shutting down")
    with pytest.raises(UnavailableError, match="shutting down"):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(UnavailableError, match="shutting down"):
        await gate.ready()
