"""NodePool logic with a fake connection factory (no sockets)."""

from __future__ import annotations

import asyncio
import functools
import gc

import pytest

from dcache.client import NodePool
from dcache.errors import AuthError, ConfigError, NoAvailableNodeError, PoolClosedError

from .fakeserver import wait_until


class FakeConn:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False

    @property
    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<FakeConn {self.n}>"


class Factory:
    """Connection factory whose failures and pace the test controls."""

    def __init__(self) -> None:
        self.down = False
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.attempts = 0
        self.made: list[FakeConn] = []

    async def __call__(self) -> FakeConn:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        if self.down:
            raise ConnectionRefusedError("refused")
        conn = FakeConn(len(self.made))
        self.made.append(conn)
        return conn


def make_pool(factory: Factory, **kwargs) -> NodePool[FakeConn]:
    kwargs.setdefault("backoff_base_s", 0.001)
    kwargs.setdefault("backoff_max_s", 0.005)
    return NodePool(factory, name="fake:1", **kwargs)


@pytest.fixture
def factory() -> Factory:
    return Factory()


async def test_lazy_connect_then_fast_path_reuses(factory):
    pool = make_pool(factory)
    assert pool.size == 0 and factory.attempts == 0
    async with pool.acquire() as c1:
        assert pool.in_use == 1
    async with pool.acquire() as c2:
        pass
    assert c1 is c2 and factory.attempts == 1 and pool.in_use == 0
    await pool.close()
    assert c1.closed


async def test_connection_is_shared_up_to_max_in_flight(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=3)
    try:
        ctxs = [pool.acquire() for _ in range(3)]
        conns = [await c.__aenter__() for c in ctxs]
        assert len({id(c) for c in conns}) == 1 and pool.in_use == 3
        for c in ctxs:
            await c.__aexit__(None, None, None)
        assert pool.in_use == 0
    finally:
        await pool.close()


async def test_grows_in_background_and_prefers_least_loaded(factory):
    pool = make_pool(factory, max_connections=2)
    try:
        async with pool.acquire() as first:
            async with pool.acquire() as shared:  # everyone busy: shared now, grow in the background
                assert shared is first
                await wait_until(lambda: pool.size == 2, what="second connection")
                async with pool.acquire() as fresh:
                    assert fresh is not first
        assert factory.attempts == 2
    finally:
        await pool.close()


async def test_waits_for_a_free_slot_fifo(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=1)
    order: list[int] = []
    release = [asyncio.Event() for _ in range(3)]

    async def user(i: int) -> None:
        async with pool.acquire():
            order.append(i)
            await release[i].wait()

    try:
        holder = pool.acquire()
        await holder.__aenter__()
        tasks = []
        for i in range(3):
            tasks.append(asyncio.ensure_future(user(i)))
            await wait_until(functools.partial(lambda n: pool.waiters == n, i + 1))
        await holder.__aexit__(None, None, None)
        for i in range(3):
            await wait_until(functools.partial(lambda n: order == list(range(n)), i + 1))
            assert pool.in_use == 1
            release[i].set()
        await asyncio.gather(*tasks)
        assert pool.in_use == 0 and pool.waiters == 0 and factory.attempts == 1
    finally:
        await pool.close()


async def test_acquire_timeout(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=1, acquire_timeout=0.05)
    try:
        async with pool.acquire():
            with pytest.raises(TimeoutError):
                async with pool.acquire():
                    pass
            with pytest.raises(TimeoutError):
                async with pool.acquire(timeout=0.01):
                    pass
            assert pool.waiters == 0 and pool.in_use == 1
        assert pool.in_use == 0
    finally:
        await pool.close()


async def test_cancelled_waiter_does_not_leak_a_slot(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=1)
    try:
        holder = pool.acquire()
        await holder.__aenter__()
        waiter = asyncio.ensure_future(pool.acquire().__aenter__())
        await wait_until(lambda: pool.waiters == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await holder.__aexit__(None, None, None)
        assert pool.in_use == 0 and pool.waiters == 0
        async with pool.acquire():
            assert pool.in_use == 1
    finally:
        await pool.close()


async def test_waiter_woken_then_cancelled_returns_its_slot(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=1)
    try:
        holder = pool.acquire()
        await holder.__aenter__()
        waiter = asyncio.ensure_future(pool.acquire().__aenter__())
        await wait_until(lambda: pool.waiters == 1)
        await holder.__aexit__(None, None, None)  # hands the slot to the waiter...
        assert pool.in_use == 1
        waiter.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.in_use == 0
        async with pool.acquire(timeout=0.5):
            pass
    finally:
        await pool.close()


async def test_never_hands_out_a_closing_connection(factory):
    pool = make_pool(factory)
    try:
        async with pool.acquire() as c1:
            pass
        c1.close()
        async with pool.acquire() as c2:
            assert c2 is not c1 and not c2.is_closing
        assert factory.attempts == 2 and pool.size == 1
    finally:
        await pool.close()


async def test_holder_keeps_a_connection_that_closes_under_it(factory):
    pool = make_pool(factory, max_connections=1, max_in_flight=1)
    try:
        holder = pool.acquire()
        c1 = await holder.__aenter__()
        waiter = asyncio.ensure_future(pool.acquire().__aenter__())
        await wait_until(lambda: pool.waiters == 1)
        c1.close()
        await holder.__aexit__(None, None, None)
        c2 = await asyncio.wait_for(waiter, 5)
        assert c2 is not c1
    finally:
        await pool.close()


async def test_unhealthy_after_failures_then_recovers(factory):
    changes: list[bool] = []
    pool = make_pool(factory, unhealthy_after=3, on_health_change=lambda p, h: changes.append(h))
    factory.down = True
    try:
        with pytest.raises(NoAvailableNodeError, match="refused"):
            async with pool.acquire():
                pass
        assert pool.healthy  # one failure is not enough
        await wait_until(lambda: not pool.healthy, what="pool unhealthy")
        assert changes == [False] and factory.attempts >= 3
        with pytest.raises(NoAvailableNodeError, match="unavailable"):
            async with pool.acquire(timeout=None):  # fails fast, does not wait
                pass
        factory.down = False
        await wait_until(lambda: pool.healthy, what="background reconnect")
        assert changes == [False, True]
        async with pool.acquire() as conn:
            assert not conn.is_closing
    finally:
        await pool.close()


async def test_waiter_fails_after_the_attempt_it_waited_for(factory):
    factory.gate = asyncio.Event()
    factory.down = True
    pool = make_pool(factory)
    try:
        waiter = asyncio.ensure_future(pool.acquire().__aenter__())
        await wait_until(lambda: factory.attempts == 1)
        assert not waiter.done()
        factory.gate.set()
        with pytest.raises(NoAvailableNodeError):
            await waiter
    finally:
        await pool.close()


async def test_handshake_errors_reach_the_caller_as_is(factory):
    factory.error = AuthError("invalid auth token")
    pool = make_pool(factory)
    try:
        with pytest.raises(AuthError, match="invalid auth token"):
            async with pool.acquire():
                pass
    finally:
        await pool.close()


async def test_body_exception_keeps_the_connection(factory):
    pool = make_pool(factory)
    try:
        with pytest.raises(KeyError):
            async with pool.acquire() as c1:
                raise KeyError("x")
        assert not c1.closed and pool.in_use == 0
        async with pool.acquire() as c2:
            assert c2 is c1
    finally:
        await pool.close()


async def test_connect_eagerly(factory):
    pool = make_pool(factory)
    try:
        await pool.connect()
        assert pool.size == 1 and pool.in_use == 0
    finally:
        await pool.close()


async def test_close_fails_waiters_and_is_idempotent(factory):
    factory.gate = asyncio.Event()
    pool = make_pool(factory)
    waiter = asyncio.ensure_future(pool.acquire().__aenter__())
    await wait_until(lambda: pool.waiters == 1)
    await pool.close()
    await pool.close()
    assert pool.closed
    with pytest.raises(PoolClosedError):
        await waiter
    with pytest.raises(PoolClosedError):
        async with pool.acquire():
            pass


async def test_unclosed_pool_warns(factory):
    pool = make_pool(factory)
    async with pool.acquire() as conn:
        pass
    with pytest.warns(ResourceWarning, match="unclosed"):
        del pool
        gc.collect()
    conn.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": 0},
        {"min_connections": 5, "max_connections": 4},
        {"max_in_flight": 0},
        {"acquire_timeout": 0},
        {"backoff_base_s": 0},
        {"unhealthy_after": 0},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        NodePool(Factory(), **kwargs)
