"""ClientConnection over real sockets against the in-process fake server."""

from __future__ import annotations

import asyncio

import pytest

from dcache.client import ClientConnection, open_connection
from dcache.errors import (
    AuthError,
    BadArgumentsError,
    FrameTooLargeError,
    HandshakeError,
    RemoteProtocolError,
    RemoteProtocolErrorResponse,
    ServerError,
)
from dcache.protocol import Op

from .fakeserver import FakeServer, wait_until


@pytest.fixture
async def server():
    srv = await FakeServer().start()
    yield srv
    await srv.stop()


async def connect(srv: FakeServer, **kwargs) -> ClientConnection:
    return await open_connection("127.0.0.1", srv.port, connect_timeout=2.0, **kwargs)


async def test_hello_then_calls(server):
    conn = await connect(server, client_name="t")
    try:
        assert server.requests(Op.HELLO) == [[Op.HELLO, 1, 1, None, "t"]]
        assert conn.server_info["role"] == "aux"
        assert conn.node_id == f"fake-{server.port}"
        assert await conn.call(Op.SET, b"k", b"v", None, 0) is True
        assert await conn.call(Op.GET, b"k") == b"v"
        assert await conn.call(Op.GET, b"missing") is None
        assert conn.pending == 0
        assert not conn.is_closing
    finally:
        conn.close()
        await conn.wait_closed()
    assert conn.is_closing


async def test_pipelined_answers_in_reverse_order(server):
    for i in range(100):
        server.data[f"k{i}".encode()] = (f"v{i}".encode(), None)
    conn = await connect(server)
    server.reverse_batch = 100
    try:
        results = await asyncio.gather(*(conn.call(Op.GET, f"k{i}".encode()) for i in range(100)))
        assert results == [f"v{i}".encode() for i in range(100)]
        ids = [r[1] for r in server.requests(Op.GET)]
        assert len(set(ids)) == 100 and 0 not in ids
        assert server.connections_total == 1
        assert conn.pending == 0
    finally:
        conn.close()


async def test_request_returns_future(server):
    conn = await connect(server)
    try:
        futs = [conn.request(Op.PING) for _ in range(3)]
        assert conn.pending == 3
        assert await asyncio.gather(*futs) == ["PONG"] * 3
    finally:
        conn.close()


async def test_error_status_maps_to_typed_exception_and_connection_stays_usable(server):
    server.error_ops[Op.GET] = (3, "bad arguments for op 3")
    server.error_ops[Op.TTL] = (99, "from the future")
    conn = await connect(server)
    try:
        with pytest.raises(BadArgumentsError, match="bad arguments") as info:
            await conn.call(Op.GET, b"k")
        assert info.value.code == 3
        with pytest.raises(ServerError) as unknown:
            await conn.call(Op.TTL, b"k")
        assert type(unknown.value) is ServerError and unknown.value.code == 99
        assert await conn.call(Op.PING) == "PONG"
    finally:
        conn.close()


async def test_connection_level_error_fails_every_pending_request(server):
    server.silent_ops.add(Op.GET)
    server.conn_error_ops[Op.STATS] = (1, "undecodable bytes")
    conn = await connect(server)
    g1 = conn.request(Op.GET, b"a")
    g2 = conn.request(Op.GET, b"b")
    await wait_until(lambda: len(server.requests(Op.GET)) == 2)
    with pytest.raises(RemoteProtocolErrorResponse, match="undecodable"):
        await conn.call(Op.STATS)
    for fut in (g1, g2):
        with pytest.raises(RemoteProtocolErrorResponse):
            await fut
    assert conn.is_closing
    with pytest.raises(RemoteProtocolErrorResponse):
        conn.request(Op.PING)
    await conn.wait_closed()


async def test_frame_too_large_error_frame(server):
    server.conn_error_ops[Op.GET] = (6, "frame too large")
    conn = await connect(server)
    with pytest.raises(FrameTooLargeError):
        await conn.call(Op.GET, b"k")
    await conn.wait_closed()


async def test_connection_loss_fails_pending_with_connection_reset(server):
    server.silent_ops.add(Op.GET)
    server.drop_ops.add(Op.INCR)
    conn = await connect(server)
    waiting = conn.request(Op.GET, b"a")
    with pytest.raises(ConnectionResetError):
        await conn.call(Op.INCR, b"n")
    with pytest.raises(ConnectionResetError):
        await waiting
    assert conn.is_closing and conn.pending == 0
    with pytest.raises(ConnectionResetError):
        await conn.call(Op.PING)


async def test_garbage_from_server_is_a_protocol_error(server):
    server.garbage_ops.add(Op.GET)
    conn = await connect(server)
    with pytest.raises(RemoteProtocolError):
        await conn.call(Op.GET, b"k")
    assert conn.is_closing
    await conn.wait_closed()


async def test_timed_out_request_is_forgotten_and_late_answer_dropped(server):
    server.data[b"old"] = (b"stale", None)
    server.data[b"new"] = (b"fresh", None)
    conn = await connect(server)
    try:
        server.hold = True
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await conn.call(Op.GET, b"old")
        assert conn.pending == 0
        server.release()  # the late answer arrives and must be ignored
        assert await conn.call(Op.GET, b"new") == b"fresh"
        assert await conn.call(Op.PING) == "PONG"
    finally:
        conn.close()


async def test_retire_finishes_in_flight_then_closes(server):
    server.data[b"k"] = (b"v", None)
    conn = await connect(server)
    server.hold = True
    survivor = asyncio.ensure_future(conn.call(Op.GET, b"k"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await conn.call(Op.GET, b"k")
    conn.retire()
    assert conn.is_closing and conn.pending == 1
    with pytest.raises(ConnectionResetError):
        conn.request(Op.PING)
    server.release()
    assert await survivor == b"v"
    await asyncio.wait_for(conn.wait_closed(), 5)


async def test_pause_writing_holds_new_requests_until_resumed(server):
    conn = await connect(server)
    try:
        conn.pause_writing()
        task = asyncio.ensure_future(conn.call(Op.PING))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and conn.pending == 0
        conn.resume_writing()
        assert await task == "PONG"
    finally:
        conn.close()


async def test_auth_token():
    srv = await FakeServer(auth_token="secret").start()
    try:
        with pytest.raises(AuthError):
            await connect(srv, auth_token="wrong")
        conn = await connect(srv, auth_token="secret")
        conn.close()
    finally:
        await srv.stop()


async def test_protocol_version_mismatch_is_a_handshake_error():
    srv = await FakeServer(version=2).start()
    try:
        with pytest.raises(HandshakeError, match="version 2"):
            await connect(srv)
    finally:
        await srv.stop()


async def test_connect_timeout_when_hello_is_never_answered(server):
    server.silent_ops.add(Op.HELLO)
    with pytest.raises(TimeoutError):
        await open_connection("127.0.0.1", server.port, connect_timeout=0.1)
    await wait_until(lambda: not server.writers, what="server side of the connection closed")


async def test_connection_refused():
    srv = await FakeServer().start()
    port = srv.port
    await srv.stop()
    with pytest.raises(OSError):
        await open_connection("127.0.0.1", port, connect_timeout=2.0)
