"""Client and SyncClient against in-process fake servers over real sockets."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
from dataclasses import replace

import pytest

from dcache.client import Client, ClientConfig, SyncClient, create_client
from dcache.errors import (
    BadArgumentsError,
    ClientError,
    ConfigError,
    InvalidArgumentError,
    NoAvailableNodeError,
    NotAnIntegerError,
    PoolClosedError,
    ServerError,
)
from dcache.protocol import Limits, Op

from .fakeserver import FakeServer, wait_until


@pytest.fixture
async def server():
    srv = await FakeServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def server2():
    srv = await FakeServer().start()
    yield srv
    await srv.stop()


async def dead_address() -> str:
    srv = await FakeServer().start()
    await srv.stop()
    return srv.address


async def test_operations_round_trip(server):
    async with Client(server.address) as c:
        assert await c.get("k") is None
        assert await c.set("k", "välue") is True
        assert await c.get(b"k") == "välue".encode()
        assert await c.set("k", b"x", nx=True) is False
        assert await c.set("other", b"x", xx=True) is False
        assert await c.set("k", bytearray(b"y"), xx=True) is True
        assert await c.exists("k") and not await c.exists("nope")
        mixed: dict[str | bytes, bytes | str] = {"a": b"1", b"b": "2"}
        assert await c.mset(mixed) == 2
        assert await c.mset([("c", b"3")], ttl=30) == 1
        assert await c.mget(["a", b"b", "zz", "c"]) == [b"1", b"2", None, b"3"]
        assert await c.mget([]) == [] and await c.mset({}) == 0
        assert await c.incr("n") == 1
        assert await c.incr("n", 10) == 11
        assert await c.decr("n", 2) == 9
        with pytest.raises(NotAnIntegerError):
            await c.incr("k")
        assert await c.touch("a") and not await c.touch("nope")
        assert await c.delete("a") is True and await c.delete("a") is False
        assert await c.ping() > 0
        stats = await c.stats()
        assert stats["role"] == "aux"
        assert await c.execute(Op.GET, b"b") == b"2"
        assert c.current_endpoint == server.address
    assert c.closed


async def test_ttl_semantics(server):
    async with Client(server.address) as c:
        assert await c.ttl("missing") is None
        await c.set("forever", b"v")
        assert await c.ttl("forever") == -1.0
        await c.set("brief", b"v", ttl=30)
        remaining = await c.ttl("brief")
        assert remaining is not None and 29 < remaining <= 30
        assert server.requests(Op.SET)[-1][4] == 30000
        await c.set("tiny", b"v", ttl=0.0001)
        assert server.requests(Op.SET)[-1][4] == 1  # rounded up, never 0
        assert await c.expire("forever", 5.5) is True
        assert server.requests(Op.EXPIRE)[-1][3] == 5500
        assert await c.expire("forever", 0) is True  # <= 0 deletes
        assert await c.get("forever") is None
        assert await c.expire("missing", 1) is False


async def test_bad_arguments_are_refused_before_sending(server):
    async with Client(server.address, limits=Limits(max_frame_bytes=1 << 20, max_key_bytes=8, max_value_bytes=16)) as c:
        with pytest.raises(InvalidArgumentError):
            await c.set("k", b"v", nx=True, xx=True)
        for ttl in (0, -1, math.nan, math.inf, "10"):
            with pytest.raises(InvalidArgumentError):
                await c.set("k", b"v", ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await c.get("")
        # mset's fast path (tuples of bytes) checks what the general one does
        bad_pairs: list[tuple[list[tuple[bytes, object]], str]] = [
            ([(b"", b"v")], "empty"),
            ([(b"k" * 9, b"v")], "key of 9 bytes"),
            ([(b"k", b"v" * 17)], "value of 17 bytes"),
            ([(b"k", b"v"), (b"k2", 5)], "value must be"),
        ]
        for bad, message in bad_pairs:
            with pytest.raises(InvalidArgumentError, match=message):
                await c.mset(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await c.get(42)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await c.set("k", 42)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await c.get("123456789")
        with pytest.raises(InvalidArgumentError):
            await c.set("k", b"x" * 17)
        with pytest.raises(InvalidArgumentError):
            await c.expire("k", math.nan)
        for text in ("\ud800", "a\udfffb"):  # lone surrogates have no UTF-8 form
            with pytest.raises(InvalidArgumentError, match="surrogate"):
                await c.get(text)
            with pytest.raises(InvalidArgumentError, match="surrogate"):
                await c.set("k", text)
            with pytest.raises(InvalidArgumentError, match="surrogate"):
                await c.mset({"k": text})
        for delta in (2**63, -(2**63) - 1, 2**64, 1.5, "1", True, None):
            with pytest.raises(InvalidArgumentError, match="delta"):
                await c.incr("n", delta)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError, match="delta"):
                await c.decr("n", delta)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="delta"):  # its negation, which DECR adds, is not
            await c.decr("n", -(2**63))
        for one_key in ("abc", b"abc"):  # one key, not keys: would read "a", "b", "c" (or fail on ints)
            with pytest.raises(InvalidArgumentError, match="sequence of keys"):
                await c.mget(one_key)  # type: ignore[arg-type]
        for pairs in ("ab", [("k",)], [("k", b"v", 3)], [b"kv"], [7]):
            with pytest.raises(InvalidArgumentError, match="pairs"):
                await c.mset(pairs)  # type: ignore[arg-type]
        with pytest.raises(ValueError):  # a local check is a ValueError, and not a server's answer
            await c.get("")
    assert issubclass(InvalidArgumentError, ClientError) and not issubclass(InvalidArgumentError, ServerError)
    assert server.connections_total == 0


def test_bad_config():
    bad: list[str | list[str]] = ["", "nohost", "h:99999", []]
    for endpoints in bad:
        with pytest.raises(ConfigError):
            Client(endpoints)
    with pytest.raises(ConfigError):
        Client("h:1", timeout=0)
    with pytest.raises(ConfigError):
        Client("h:1", retries=-1)
    c = Client("a:1, b:2,[::1]:3")
    assert c.endpoints == ("a:1", "b:2", "[::1]:3")
    assert c.config == ClientConfig(["a:1", "b:2", "[::1]:3"])


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"endpoints": 7}, "endpoints"),
        ({"endpoints": ["a:1", 2]}, "endpoints"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"acquire_timeout": 0}, "acquire_timeout"),
        ({"min_connections": -1}, "min_connections"),
        ({"min_connections": 5}, "min_connections"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"retries": -1}, "retries"),
        ({"backoff_max": 0.01}, "backoff_max"),
        ({"auth_token": b"x"}, "auth_token"),
        ({"client_name": 3}, "client_name"),
        ({"limits": {"max_key_bytes": 8}}, "limits"),
    ],
)
def test_client_config_names_the_bad_field(options, field):
    options = {"endpoints": "h:1", **options}
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ClientConfig(**options)


def test_client_config_normalizes_and_is_taken_whole():
    config = ClientConfig("b:2, [::1]:3", timeout=1, acquire_timeout=1, limits=Limits(max_key_bytes=8))
    assert config.endpoints == ("b:2", "[::1]:3") and config.addresses == (("b", 2), ("::1", 3))
    assert config.timeout == 1.0 and isinstance(config.timeout, float)
    assert replace(config, endpoints="c:4").addresses == (("c", 4),)
    c = Client(config=config)
    assert c.config is config and c.endpoints == ("b:2", "[::1]:3")
    with pytest.raises(TypeError):
        Client("b:2", config=config)
    with pytest.raises(TypeError):
        Client(config=config, timeout=2)
    with pytest.raises(TypeError):
        Client()
    with pytest.raises(TypeError):
        Client("b:2", timeuot=2)


async def test_client_from_config_round_trip(server):
    config = ClientConfig(server.address, timeout=2.0, client_name="whole")
    async with await create_client(config=config) as c:
        assert await c.set("k", b"v") and await c.get("k") == b"v"
    assert server.requests(Op.HELLO)[0][-1] == "whole"


def test_retry_rule_is_the_op_table():
    from dcache.client.client import _retry_safe
    from dcache.protocol import OPS

    for op, spec in OPS.items():
        if op != Op.SET:
            assert _retry_safe(op, ()) is spec.retry_safe, spec.name
    assert _retry_safe(Op.SET, (b"k", b"v", None, 0)) and _retry_safe(Op.SET, (b"k", b"v"))
    assert not _retry_safe(Op.SET, (b"k", b"v", None, 1)) and not _retry_safe(Op.SET, (b"k", b"v", None, 2))
    assert not _retry_safe(999, ())


async def test_server_error_is_mapped(server):
    server.error_ops[Op.GET] = (3, "bad arguments")
    async with Client(server.address) as c:
        with pytest.raises(BadArgumentsError, match="bad arguments"):
            await c.get("k")
        assert await c.set("k", b"v")  # the connection is still fine
    assert server.connections_total == 1


async def test_timeout_retires_the_connection(server):
    server.data[b"k"] = (b"v", None)
    async with Client(server.address, timeout=0.2) as c:
        assert await c.get("k") == b"v"
        pool = c.pool()
        assert pool is not None
        [first] = pool.connections
        server.hold = True
        with pytest.raises(TimeoutError):
            await c.get("k")
        server.release()  # the late answer must not reach anyone
        assert await c.get("k") == b"v"
        assert first not in pool.connections
        await asyncio.wait_for(first.wait_closed(), 5)
    assert server.connections_total == 2


async def test_callers_cancelled_first_retire_a_connection_only_once_its_answers_are_overdue(server):
    server.data[b"k"] = (b"v", None)
    async with Client(server.address, timeout=0.3) as c:
        for _ in range(5):  # cancelled calls on a connection that answers: it stays
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.get("k"), 0)
            assert await c.get("k") == b"v"
        pool = c.pool()
        assert pool is not None
        [first] = pool.connections
        server.hold = True
        with pytest.raises(TimeoutError):  # the caller gives up long before the client's timeout
            await asyncio.wait_for(c.get("k"), 0.05)
        assert pool.connections == [first] and not first.stalled(asyncio.get_running_loop().time(), 0.3)
        await asyncio.sleep(0.35)  # unanswered for longer than the timeout: the next call leaves it
        assert first.stalled(asyncio.get_running_loop().time(), 0.3)
        server.hold = False
        assert await c.get("k") == b"v"
        assert first not in pool.connections
    assert server.connections_total == 2


async def test_timeout_with_a_silent_server(server):
    server.silent_ops.add(Op.PING)
    async with Client(server.address, timeout=0.1) as c:
        with pytest.raises(TimeoutError):
            await c.ping()


async def test_failover_from_a_dead_endpoint(server):
    dead = await dead_address()
    server.data[b"k"] = (b"live", None)
    async with Client([dead, server.address]) as c:
        assert await c.get("k") == b"live"
        assert c.current_endpoint == server.address
        assert await c.get("k") == b"live"


async def test_all_endpoints_dead():
    dead1, dead2 = await dead_address(), await dead_address()
    async with Client([dead1, dead2]) as c:
        with pytest.raises(NoAvailableNodeError, match="no dcache endpoint"):
            await c.get("k")
    with pytest.raises(NoAvailableNodeError):
        await create_client([dead1, dead2])


async def test_an_endpoint_that_never_answers_says_timed_out():
    """str(TimeoutError()) is empty: the reason read '(127.0.0.1:PORT: )'."""
    writers: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda reader, writer: writers.append(writer), "127.0.0.1", 0)  # accepts, never answers
    try:
        port = silent.sockets[0].getsockname()[1]
        async with Client([f"127.0.0.1:{port}"], timeout=0.2, connect_timeout=0.2) as c:
            with pytest.raises(NoAvailableNodeError, match=rf"\(127\.0\.0\.1:{port}: timed out\)"):
                await c.server_info()
    finally:
        for writer in writers:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_create_client_connects_eagerly(server):
    dead = await dead_address()
    c = await create_client([dead, server.address])
    try:
        assert c.current_endpoint == server.address
        pool = c.pool()
        assert pool is not None and pool.size == 1
        assert server.connections_total == 1
    finally:
        await c.close()


async def test_lost_connection_get_is_retried_on_the_next_endpoint(server, server2):
    server.drop_ops.add(Op.GET)
    server2.data[b"k"] = (b"from-2", None)
    async with Client([server.address, server2.address]) as c:
        await c.connect()
        assert await c.get("k") == b"from-2"
        assert len(server.requests(Op.GET)) == 1
        assert c.current_endpoint == server2.address


async def test_lost_connection_incr_is_not_retried(server, server2):
    server.drop_ops.add(Op.INCR)
    async with Client([server.address, server2.address]) as c:
        await c.connect()
        with pytest.raises(ConnectionResetError):
            await c.incr("n")
        assert len(server.requests(Op.INCR)) == 1
        assert server2.requests(Op.INCR) == []
        assert c.current_endpoint == server2.address
        server2.drop_ops.add(Op.DECR)
        with pytest.raises(ConnectionResetError):
            await c.execute(Op.DECR, b"n", 1)
    assert len(server2.requests(Op.DECR)) == 1
    assert server.requests(Op.DECR) == []


async def test_lost_connection_set_nx_is_not_retried(server, server2):
    server.drop_ops.add(Op.SET)
    async with Client([server.address, server2.address]) as c:
        await c.connect()
        with pytest.raises(ConnectionResetError):
            await c.set("k", b"v", nx=True)
        assert await c.set("k", b"v")  # plain SET goes to server2 now
    assert len(server2.requests(Op.SET)) == 1


async def test_single_endpoint_retry_reconnects(server):
    server.drop_ops.add(Op.GET)
    server.data[b"k"] = (b"v", None)
    async with Client(server.address, retries=1) as c:
        with pytest.raises(ConnectionResetError):
            await c.get("k")  # dropped twice: first try and one retry
        assert len(server.requests(Op.GET)) == 2
        server.drop_ops.clear()
        assert await c.get("k") == b"v"


async def test_pool_waits_for_a_free_slot_instead_of_failing(server):
    server.data[b"k"] = (b"v", None)
    async with Client(server.address, max_connections=1, max_in_flight=2) as c:
        await c.connect()
        server.hold = True
        tasks = [asyncio.ensure_future(c.get("k")) for _ in range(5)]
        pool = c.pool()
        assert pool is not None
        await wait_until(lambda: len(server.requests(Op.GET)) == 2 and pool.waiters == 3)
        server.release()
        assert await asyncio.gather(*tasks) == [b"v"] * 5
        assert server.connections_total == 1


async def test_unhealthy_then_recovers_when_the_server_comes_back(server):
    async with Client(server.address, backoff_max=0.05, timeout=2.0) as c:
        assert await c.set("k", b"v")
        port = server.port
        await server.stop()
        pool = c.pool()
        assert pool is not None
        await wait_until(lambda: pool.size == 0, what="client saw the connection close")
        with pytest.raises(NoAvailableNodeError):
            await c.get("k")
        await wait_until(lambda: not pool.healthy, what="pool unhealthy")
        with pytest.raises(NoAvailableNodeError, match="unavailable"):
            await c.get("k")
        await server.start(port=port)
        await wait_until(lambda: pool.healthy, what="background reconnect")
        assert await c.get("k") == b"v"


async def test_closed_client_refuses_calls(server):
    c = Client(server.address)
    await c.close()
    with pytest.raises(PoolClosedError):
        await c.get("k")


async def test_unclosed_client_warns(server):
    c = Client(server.address)
    await c.ping()
    pool = c.pool()
    assert pool is not None
    conns = pool.connections
    del pool
    with pytest.warns(ResourceWarning, match="unclosed"):
        del c
        gc.collect()
    for conn in conns:  # clean up what the test leaked on purpose
        conn.close()
        await conn.wait_closed()


async def test_sync_client_from_a_thread(server):
    server.data[b"pre"] = (b"1", None)

    def work() -> list[object]:
        with SyncClient(server.address, timeout=2.0) as s:
            out: list[object] = [s.get("pre"), s.set("k", "v", ttl=10), s.get("k"), s.mget(["k", "x"])]
            out += [s.incr("n", 3), s.decr("n"), s.delete("k"), s.exists("k"), s.ping() > 0, s.stats()["role"]]
            out += [s.ttl("pre"), s.expire("pre", 1), s.touch("pre"), s.mset({"a": b"b"})]
        with pytest.raises(PoolClosedError):
            s.get("k")
        return out

    result = await asyncio.to_thread(work)
    assert result == [b"1", True, b"v", [b"v", None], 3, 2, True, False, True, "aux", -1.0, True, True, 1]


async def test_unclosed_sync_client_warns(server):
    def make() -> None:
        s = SyncClient(server.address)
        assert s.ping() > 0
        [thread] = [t for t in threading.enumerate() if t.name == "dcache-sync-client"]
        with pytest.warns(ResourceWarning, match="unclosed"):
            del s
            gc.collect()
        thread.join(5)  # the collected client still closes its connections and loop
        assert not thread.is_alive()

    await asyncio.to_thread(make)
    await wait_until(lambda: not server.writers, what="client connections closed")
