"""The daemon-to-daemon connection (``dcache.peer``): PeerConnection over a fake transport, open_peer over loopback."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcache.auxnode.node import AuxNode
from dcache.config import AuxConfig
from dcache.errors import AuthError, HandshakeError, NotAnIntegerError, Status, UnavailableError
from dcache.peer import PeerConnection, open_peer
from dcache.protocol import HEADER, FrameDecoder, Op, encode_response, pack
from tests.fakes import FakeTransport

from .master.fakecluster import until

UNAVAILABLE = int(Status.UNAVAILABLE)
TIMEOUT = int(Status.UPSTREAM_TIMEOUT)


class Answers:
    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []

    def __call__(self, status: int, result: Any) -> None:
        self.got.append((status, result))


def connected(on_answers: Any = None) -> tuple[PeerConnection, FakeTransport]:
    conn = PeerConnection("aux node a1", on_answers)
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


class Echo(FakeTransport):
    """Answers every request ``[op, rid, ...]`` with ``[rid, 0, op]`` in the next iteration, and keeps nothing."""

    def __init__(self, conn: PeerConnection) -> None:
        super().__init__()
        self.conn = conn
        self.decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        answers = b"".join(encode_response(m[1], 0, m[0]) for m in self.decoder.feed(bytes(data)))
        asyncio.get_running_loop().call_soon(self.conn.data_received, answers)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))


def far() -> float:
    return asyncio.get_running_loop().time() + 60


async def test_requests_of_one_iteration_leave_in_one_write() -> None:
    conn, transport = connected()
    ids = [conn.send(Op.GET, (b"k%d" % i,), Answers(), far()) for i in range(3)]
    assert ids == [1, 2, 3] and transport.written == [] and conn.pending_flush
    await until(lambda: transport.written)
    assert len(transport.written) == 1
    assert transport.frames() == [[Op.GET, 1, b"k0"], [Op.GET, 2, b"k1"], [Op.GET, 3, b"k2"]]
    assert not conn.pending_flush and len(conn.requests) == 3


async def test_flush_now_writes_at_once_and_the_scheduled_flush_finds_nothing() -> None:
    conn, transport = connected()
    conn.send(Op.PING, (), Answers(), far())
    conn.flush_now()
    assert transport.frames() == [[Op.PING, 1]]
    await asyncio.sleep(0)  # the flush scheduled for the end of the iteration runs: nothing more to write
    assert len(transport.written) == 1


async def test_a_request_sent_now_leaves_at_once_with_those_queued_before_it() -> None:
    conn, transport = connected()
    conn.send(Op.PING, (), Answers(), far())
    conn.send(Op.GET, (b"k",), Answers(), far(), now=True)
    assert transport.frames() == [[Op.PING, 1], [Op.GET, 2, b"k"]] and len(transport.written) == 1
    conn.send(Op.GET, (b"j",), Answers(), far(), now=True)
    assert len(transport.written) == 2 and not conn.pending_flush  # written: no flush scheduled for it
    await asyncio.sleep(0)
    assert len(transport.written) == 2


async def test_answers_reach_their_callbacks_in_any_order() -> None:
    batches: list[int] = []
    conn, _ = connected(on_answers=lambda: batches.append(1))
    a, b = Answers(), Answers()
    conn.send(Op.GET, (b"a",), a, far())
    conn.send(Op.GET, (b"b",), b, far())
    before = conn.last_answer
    conn.data_received(encode_response(2, 0, b"B") + encode_response(1, 0, b"A"))
    assert (a.got, b.got) == ([(0, b"A")], [(0, b"B")])
    assert batches == [1], "on_answers runs once per read, after the callbacks"
    assert conn.last_answer >= before and len(conn.requests) == 0


async def test_a_callback_knows_which_connection_carried_its_answer() -> None:
    """``PeerConnection.answering`` is the connection being read while answers are handed out, None otherwise."""
    first, _ = connected()
    second, _ = connected()
    seen: list[Any] = []
    first.send(Op.GET, (b"a",), lambda status, result: seen.append(PeerConnection.answering), far())
    second.send(Op.GET, (b"b",), lambda status, result: seen.append(PeerConnection.answering), far())
    second.data_received(encode_response(1, 0, b"B"))
    first.data_received(encode_response(1, 0, b"A"))
    assert seen == [second, first]
    assert PeerConnection.answering is None
    timed_out: list[Any] = []
    first.send(Op.GET, (b"c",), lambda status, result: timed_out.append(PeerConnection.answering), 0.0)
    assert first.fail_overdue(1.0, "timed out") == 1
    assert timed_out == [None]  # not an answer the connection read


async def test_a_frame_split_anywhere_is_reassembled() -> None:
    conn, _ = connected()
    got = Answers()
    conn.send(Op.GET, (b"k",), got, far())
    frame = encode_response(1, 0, b"value")
    for i in range(len(frame)):
        conn.data_received(frame[i : i + 1])
    assert got.got == [(0, b"value")]


async def test_unknown_ids_are_ignored_and_a_connection_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    conn, _ = connected()
    got = Answers()
    conn.send(Op.GET, (b"k",), got, far())
    with caplog.at_level(logging.WARNING, logger="dcache.peer"):
        conn.data_received(encode_response(99, 0, b"nobody asked"))
        conn.data_received(encode_response(0, int(Status.OVERLOADED), "too many connections"))
    assert got.got == [] and not conn.closed
    assert "closed the connection: too many connections" in caplog.text


@pytest.mark.parametrize(
    "bad",
    [
        HEADER.pack(len(pack([1, 0]))) + pack([1, 0]),  # not [rid, status, result]
        HEADER.pack(3) + b"\xc1\xc1\xc1",  # not msgpack
        HEADER.pack(2**31) + b"x",  # longer than any frame
    ],
)
async def test_bad_bytes_close_the_connection_and_answer_what_waits(bad: bytes) -> None:
    conn, transport = connected()
    earlier, waiting = Answers(), Answers()
    conn.send(Op.GET, (b"a",), earlier, far())
    conn.send(Op.GET, (b"b",), waiting, far())
    conn.data_received(encode_response(1, 0, b"A") + bad)  # the good answer before the bad bytes still counts
    assert earlier.got == [(0, b"A")]
    assert conn.closed and transport.closed and conn.is_closing
    await until(lambda: waiting.got, what="the loss to be reported")
    assert waiting.got == [(UNAVAILABLE, "connection to aux node a1 lost")]


async def test_connection_lost_answers_everything_waiting_with_the_reason() -> None:
    conn, _ = connected()
    waiting = [Answers() for _ in range(3)]
    for w in waiting:
        conn.send(Op.PING, (), w, far())
    conn.connection_lost(ConnectionResetError("reset by peer"))
    assert [w.got for w in waiting] == [[(UNAVAILABLE, "connection to aux node a1 lost: reset by peer")]] * 3
    assert conn.closed and len(conn.requests) == 0


async def test_fail_overdue_and_fail_all() -> None:
    conn, _ = connected()
    now = asyncio.get_running_loop().time()
    soon, later = Answers(), Answers()
    conn.send(Op.PING, (), soon, now + 1)
    conn.send(Op.PING, (), later, now + 5)
    assert conn.fail_overdue(now + 0.5, "late") == 0
    assert conn.fail_overdue(now + 1, "late") == 1
    assert soon.got == [(TIMEOUT, "late")] and later.got == []
    assert conn.fail_all(UNAVAILABLE, "gone") == 1
    assert later.got == [(UNAVAILABLE, "gone")]


async def test_call_returns_the_result_or_raises_the_typed_error() -> None:
    conn, transport = connected()

    async def answer(rid: int, status: int, result: Any) -> None:
        await until(lambda: any(f[1] == rid for f in transport.frames()))
        conn.data_received(encode_response(rid, status, result))

    task = asyncio.ensure_future(answer(1, 0, "PONG"))
    assert await conn.call(Op.PING, timeout=5) == "PONG"
    await task
    task = asyncio.ensure_future(answer(2, int(Status.NOT_AN_INTEGER), "not an integer"))
    with pytest.raises(NotAnIntegerError, match="not an integer"):
        await conn.call(Op.INCR, b"k", 1, timeout=5)
    await task


async def test_a_call_that_times_out_forgets_its_request_and_drops_the_late_answer() -> None:
    conn, _ = connected()
    with pytest.raises(TimeoutError):
        await conn.call(Op.PING, timeout=0.01)
    assert len(conn.requests) == 0
    conn.data_received(encode_response(1, 0, "PONG"))  # too late: nobody waits, nothing breaks
    assert not conn.closed


async def test_answered_calls_leave_nothing_behind() -> None:
    """A connection that lives long (a follower's to its coordinator) makes calls forever: each must cost nothing once answered."""
    conn = PeerConnection("coordinator")
    conn.connection_made(Echo(conn))  # type: ignore[arg-type]

    async def calls(n: int) -> None:
        for _ in range(n):
            assert await conn.call(Op.PING, timeout=5) == Op.PING

    await calls(200)  # warm up: free lists, caches
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await calls(2000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(conn.requests) == 0
    assert grown < 100_000, f"{grown} bytes kept after 2000 answered calls"  # 116 bytes a call before the fix


async def test_a_cancelled_call_forgets_its_request() -> None:
    conn, _ = connected()
    task = asyncio.ensure_future(conn.call(Op.PING, timeout=60))
    await until(lambda: len(conn.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(conn.requests) == 0


async def test_a_call_on_a_closed_connection_fails_at_once() -> None:
    conn, transport = connected()
    conn.close()
    conn.close()  # idempotent
    with pytest.raises(UnavailableError, match="is closed"):
        await conn.call(Op.PING, timeout=5)
    conn.send(Op.PING, (), Answers(), far())
    await asyncio.sleep(0)
    assert transport.written == [], "nothing is written on a closed connection"


# -- open_peer over loopback -------------------------------------------------------------


@pytest.fixture
async def aux_server() -> AsyncIterator[tuple[AuxNode, int]]:
    node = AuxNode(AuxConfig(node_id="a1", auth_token="s3cret"))
    server = await asyncio.get_running_loop().create_server(node.protocol_factory, "127.0.0.1", 0)
    yield node, server.sockets[0].getsockname()[1]
    server.close()
    for conn in list(node.state.connections):
        conn.close()
    await server.wait_closed()


async def test_open_peer_performs_hello_and_keeps_the_answer(aux_server: tuple[AuxNode, int]) -> None:
    node, port = aux_server
    conn = await open_peer("127.0.0.1", port, name="aux node a1", auth_token="s3cret", client_name="test", timeout=5, expect_role="aux")
    try:
        assert conn.server_info["role"] == "aux" and conn.server_info["incarnation"] == node.incarnation
        assert await conn.call(Op.PING, timeout=5) == "PONG"
    finally:
        conn.close()


@pytest.mark.parametrize(("token", "role", "error"), [("wrong", None, AuthError), ("s3cret", "master", HandshakeError)])
async def test_open_peer_refusals_raise_typed_errors_and_close(aux_server: tuple[AuxNode, int], token: str, role: str, error: type) -> None:
    node, port = aux_server
    with pytest.raises(error):
        await open_peer("127.0.0.1", port, name="peer", auth_token=token, client_name="test", timeout=5, expect_role=role)
    await until(lambda: not node.state.connections, what="the refused connection to close")


async def test_open_peer_times_out_on_a_peer_that_never_answers() -> None:
    accepted: list[asyncio.Transport] = []

    class Mute(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)  # type: ignore[arg-type]

    server = await asyncio.get_running_loop().create_server(Mute, "127.0.0.1", 0)
    try:
        with pytest.raises(TimeoutError):
            await open_peer("127.0.0.1", server.sockets[0].getsockname()[1], name="mute", auth_token=None, client_name="t", timeout=0.05)
    finally:
        for t in accepted:
            t.close()
        server.close()
        await server.wait_closed()


async def test_open_peer_to_a_closed_port_raises_oserror() -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await open_peer("127.0.0.1", port, name="nobody", auth_token=None, client_name="t", timeout=5)
