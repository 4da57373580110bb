"""A real ``dcache aux`` process: every op, 50 pipelined clients, bad input, auth, SIGTERM."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time

import pytest

from dcache import Client
from dcache.errors import BadArgumentsError, KeyTooLargeError, NotAnIntegerError, Status, ValueTooLargeError
from dcache.protocol import Op, encode_request
from tests.harness import DaemonProcess, start_aux, wait_for
from tests.rawconn import RawConn

pytestmark = pytest.mark.slow


@pytest.fixture
def raw(aux):
    """RawConn factory for the shared node; every connection is closed at teardown."""
    conns = []

    def make(node=None):
        node = node or aux
        c = RawConn(node.host, node.port)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


@pytest.fixture(scope="module")
def aux():
    node = start_aux(None, "--max-value-bytes", "64KB", "--max-key-bytes", "200", "--max-frame-bytes", "1MB", node_id="t-aux")
    yield node
    node.kill()


async def test_every_op_through_the_client(aux: DaemonProcess):
    async with Client(aux.addr) as c:
        assert await c.get("ops:missing") is None
        assert await c.set("ops:a", b"1") is True
        assert await c.get("ops:a") == b"1"
        assert await c.set("ops:a", "2", nx=True) is False
        assert await c.set("ops:b", "2", xx=True) is False
        assert await c.set("ops:a", "3", xx=True) is True
        assert await c.get(b"ops:a") == b"3"
        assert await c.exists("ops:a") is True
        assert await c.incr("ops:n") == 1
        assert await c.incr("ops:n", 10) == 11
        assert await c.decr("ops:n", 4) == 7
        await c.set("ops:zz", b"abc")
        with pytest.raises(NotAnIntegerError):
            await c.incr("ops:zz")
        assert await c.mset({"ops:m1": b"x", "ops:m2": b"y"}) == 2
        assert await c.mget(["ops:m1", "ops:nope", "ops:m2"]) == [b"x", None, b"y"]
        assert await c.ttl("ops:a") == -1
        assert await c.expire("ops:a", 100) is True
        remaining = await c.ttl("ops:a")
        assert remaining is not None and 99 < remaining <= 100
        assert await c.touch("ops:a") is True
        assert await c.delete("ops:a") is True
        assert await c.delete("ops:a") is False
        assert await c.ttl("ops:a") is None
        stats = await c.stats()
        assert stats["role"] == "aux" and stats["node_id"] == "t-aux" and stats["items"] >= 3
        assert await c.ping() >= 0


async def test_ttl_expires(aux: DaemonProcess):
    async with Client(aux.addr) as c:
        await c.set("ttl:short", b"v", ttl=0.05)
        deadline = time.monotonic() + 5
        while await c.get("ttl:short") is not None:
            assert time.monotonic() < deadline, "key never expired"
            await asyncio.sleep(0.02)
        assert await c.exists("ttl:short") is False


async def test_limits_are_typed_errors(aux: DaemonProcess):
    async with Client(aux.addr) as c:
        with pytest.raises(KeyTooLargeError):
            await c.set(b"k" * 201, b"v")
        with pytest.raises(ValueTooLargeError):
            await c.set("big", b"v" * (64 * 1000 + 1))
        assert await c.set("ok-after-errors", b"v") is True


async def test_fifty_concurrent_pipelined_clients(aux: DaemonProcess):
    """50 clients, each with its own keys, pipelining writes then reads: every answer right."""
    rng = random.Random(7)

    async def one(n: int) -> None:
        async with Client(aux.addr, max_connections=1) as c:
            values = {f"p{n}:{i}": rng.randbytes(rng.randrange(1, 300)) for i in range(200)}
            assert all(await asyncio.gather(*(c.set(k, v) for k, v in values.items())))
            keys = list(values)
            got = await asyncio.gather(*(c.get(k) for k in keys))
            assert got == [values[k] for k in keys]
            assert await c.mget(keys) == [values[k] for k in keys]

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(50))), 60)


# -- bad input ------------------------------------------------------------------


def _seed(raw) -> RawConn:
    """A well-behaved bystander whose data must survive everyone else's bad input."""
    good: RawConn = raw()
    assert good.call(Op.SET, 1, b"bystander", b"precious", None, 0) == [1, 0, True]
    return good


def _bystander_ok(good: RawConn) -> None:
    assert good.call(Op.GET, 99, b"bystander") == [99, 0, b"precious"]


def test_garbage_gets_error_frame_then_close(raw):
    good = _seed(raw)
    bad = raw()
    bad.send_raw(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # 0xc1 never appears in msgpack
    rid, status, message = bad.recv()
    assert (rid, status) == (0, Status.PROTOCOL_ERROR) and isinstance(message, str)
    assert bad.closed_by_server()
    _bystander_ok(good)


def test_oversized_length_prefix_refused_before_buffering(raw):
    good = _seed(raw)
    bad = raw()
    bad.send_raw((2**31).to_bytes(4, "big") + b"\x00" * 100)
    assert bad.recv()[:2] == [0, Status.FRAME_TOO_LARGE]
    assert bad.closed_by_server()
    _bystander_ok(good)


def test_truncated_frame_then_close(raw):
    good = _seed(raw)
    bad = raw()
    frame = encode_request(Op.SET, 5, b"bystander", b"clobbered", None, 0)
    bad.send_raw(frame[: len(frame) // 2])
    bad.close()
    _bystander_ok(good)


def test_unknown_op_and_bad_types_keep_connection(raw):
    good = _seed(raw)
    c = raw()
    assert c.call(250, 3)[:2] == [3, Status.UNKNOWN_OP]
    assert c.call(Op.GET, 4, 12345)[:2] == [4, Status.BAD_ARGUMENTS]
    assert c.call(Op.GET, 5)[:2] == [5, Status.BAD_ARGUMENTS]
    assert c.call(Op.SET, 6, b"k", b"v", "soon", 0)[:2] == [6, Status.BAD_ARGUMENTS]
    assert c.call(Op.SET, 7, b"k", b"v", -5, 0)[:2] == [7, Status.BAD_ARGUMENTS]
    assert c.call(Op.SET, 8, b"k", b"v", None, 3)[:2] == [8, Status.BAD_ARGUMENTS]
    assert c.call(Op.INCR, 9, b"k", 2**63)[:2] == [9, Status.BAD_ARGUMENTS]
    assert c.call(Op.MSET, 10, [[b"k"]])[:2] == [10, Status.BAD_ARGUMENTS]
    assert c.call(Op.MGET, 11, b"notalist")[:2] == [11, Status.BAD_ARGUMENTS]
    # frames that decode but are not requests
    for payload, expected_rid in ((b"\x92\xa1x\x01", 1), (b"\x05", 0), (b"\x81\xa1a\x01", 0), (b"\x91\x03", 0)):
        c.send_raw(len(payload).to_bytes(4, "big") + payload)
        assert c.recv()[:2] == [expected_rid, Status.BAD_ARGUMENTS]
    # the same connection still works
    assert c.call(Op.SET, 12, b"after", b"fine", None, 0) == [12, 0, True]
    assert c.call(Op.GET, 13, b"after") == [13, 0, b"fine"]
    _bystander_ok(good)


def test_bad_input_counted_in_stats(raw):
    bad = raw()
    bad.send_raw(b"\x00\x00\x00\x01\xc1")
    assert bad.closed_by_server()
    c = raw()
    assert c.call(250, 1)[1] == Status.UNKNOWN_OP
    stats = c.call(Op.STATS, 2)[2]
    assert stats["errors"] > 0 and stats["protocol_errors"] > 0


async def test_client_maps_bad_arguments(aux: DaemonProcess):
    async with Client(aux.addr) as c:
        with pytest.raises(BadArgumentsError):
            await c.execute(Op.GET, 42)


# -- auth and lifecycle ---------------------------------------------------------


def test_auth_token():
    node = start_aux(None, "--auth-token", "s3cret")
    try:
        c = RawConn(node.host, node.port)
        try:
            _auth_steps(c)
        finally:
            c.close()
    finally:
        node.kill()


def _auth_steps(c: RawConn) -> None:
    assert c.call(Op.GET, 1, b"k")[:2] == [1, Status.AUTH_FAILED]
    assert c.call(Op.HELLO, 2, 1, "wrong", "t")[:2] == [2, Status.AUTH_FAILED]
    assert c.call(Op.GET, 3, b"k")[:2] == [3, Status.AUTH_FAILED]
    assert c.call(Op.HELLO, 4, 1, "s3cret", "t")[:2] == [4, 0]
    assert c.call(Op.GET, 5, b"k") == [5, 0, None]
    assert c.call(Op.HELLO, 6, 99)[:2] == [6, Status.HANDSHAKE]


async def test_sigterm_is_graceful():
    node = start_aux(None)
    async with Client(node.addr) as c:
        await c.set("k", b"v")
    node.signal(signal.SIGTERM)
    assert node.wait(10) == 0


async def test_sigint_is_graceful():
    node = start_aux(None)
    node.signal(signal.SIGINT)
    assert node.wait(10) == 0


def test_a_master_that_refuses_joins_is_logged_once_not_twice_a_second():
    """An aux node retries JOIN every 0.5 s; an unreachable master used to log each retry at INFO, forever."""
    accepted = 0
    with socket.socket() as listener:  # a "master" that accepts and hangs up at once
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)
        node = start_aux(None, "--join", f"127.0.0.1:{listener.getsockname()[1]}", "--log-level", "info")
        try:
            deadline = time.monotonic() + 30
            while accepted < 6:
                assert time.monotonic() < deadline, f"only {accepted} join attempts"
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.close()
                accepted += 1
            assert node.alive
        finally:
            node.signal(signal.SIGINT)
            node.wait()
    lines = [line for line in node.stderr_lines if "dcache.aux.membership" in line]
    assert 1 <= len(lines) <= 2, "\n".join(lines)
    assert "retrying" in lines[0] and "WARNING" in lines[0], lines[0]


def test_joining_an_aux_node_says_so_not_credentials():
    """--join given an aux node's address: the retries blamed 'this node's credentials'."""
    target = start_aux(None)
    node = start_aux(None, "--join", target.addr, "--log-level", "info")
    try:
        wait_for(lambda: "is not a master" in node.stderr(), 10, message="the join failure")
        [line] = [line for line in node.stderr_lines if "is not a master" in line]
        assert f"joining master {target.addr} failed" in line and "credentials" not in line, line
    finally:
        node.kill()
        target.kill()
