"""GetBatcher and SetBatcher over real Clients against the in-process fake server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dcache.client import BatchStats, Client, GetBatcher, SetBatcher
from dcache.errors import ConfigError, InvalidArgumentError, RemoteProtocolError, ValueTooLargeError
from dcache.protocol import Limits, Op

from .fakeserver import FakeServer

STORE = {b"k%d" % i: b"v%d" % i for i in range(20)}


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    srv = await FakeServer().start()
    srv.data.update((k, (v, None)) for k, v in STORE.items())
    yield srv
    await srv.stop()


def mgets(server: FakeServer) -> list[list[bytes]]:
    """The keys of every MGET the server received, in arrival order."""
    return [list(r[2]) for r in server.requests(Op.MGET)]


def gets(server: FakeServer) -> list[bytes]:
    return [r[2] for r in server.requests(Op.GET)]


async def test_one_mget_per_loop_iteration_capped_and_a_lone_key_as_get(server: FakeServer) -> None:
    async with Client(server.address) as client:
        stats = BatchStats()
        batcher = GetBatcher(client, max_keys=4, stats=stats)
        keys = [b"k%d" % i for i in range(10)] + [b"nope"]
        assert await asyncio.gather(*(batcher.get(k) for k in keys)) == [STORE.get(k) for k in keys]
        assert sorted(mgets(server)) == sorted([keys[0:4], keys[4:8], keys[8:11]])
        assert await batcher.get("k1") == b"v1"  # alone: a GET
        assert gets(server) == [b"k1"]
        assert (stats.batches, stats.keys, stats.fallbacks) == (4, 12, 0)
        await batcher.close()


async def test_smaller_batches_after_large_values(server: FakeServer) -> None:
    big = {b"b%d" % i: b"x" * 16384 for i in range(12)}
    server.data.update((k, (v, None)) for k, v in big.items())
    async with Client(server.address) as client:
        batcher = GetBatcher(client, answer_bytes=65536)  # room for 16 values of the smallest planned size
        await asyncio.gather(*(batcher.get(b"b%d" % i) for i in range(3)))
        assert [len(keys) for keys in mgets(server)] == [3]
        await asyncio.gather(*(batcher.get(b"b%d" % i) for i in range(12)))
        assert [len(keys) for keys in mgets(server)[1:]] == [4, 4, 4]


async def test_an_answer_too_large_is_read_again_key_by_key(server: FakeServer) -> None:
    value = b"y" * 2000
    server.data.update((b"big%d" % i, (value, None)) for i in range(3))
    limits = Limits(max_frame_bytes=4096, max_key_bytes=64, max_value_bytes=3000)  # one value fits, three do not
    async with Client(server.address, limits=limits) as client, Client(server.address, limits=limits) as fallback:
        batcher = GetBatcher(client, fallback=fallback)
        keys = [b"big0", b"big1", b"big2", b"nope"]
        assert await asyncio.gather(*(batcher.get(k) for k in keys)) == [value, value, value, None]
        assert mgets(server) == [keys] and sorted(gets(server)) == sorted(keys)
        assert batcher.stats.fallbacks == 1
        await asyncio.gather(*(batcher.get(k) for k in keys))  # one GET at a time while the size hint decays
        assert len(mgets(server)) == 1 and gets(server)[4:] == keys


async def test_a_key_error_goes_to_that_key_only(server: FakeServer) -> None:
    limits = Limits(max_key_bytes=8)
    async with Client(server.address, limits=limits) as client:
        batcher = GetBatcher(client)
        answers = await asyncio.gather(*(batcher.get(k) for k in [b"k1", b"L" * 9, b"k3"]), return_exceptions=True)
        assert answers[0] == b"v1" and answers[2] == b"v3" and isinstance(answers[1], InvalidArgumentError)
        assert batcher.stats.fallbacks == 1
        await asyncio.gather(*(batcher.get(k) for k in [b"k1", b"k3"]))  # still batching
        assert mgets(server) == [[b"k1", b"k3"]]


async def test_a_timeout_goes_to_every_key_without_a_second_try(server: FakeServer) -> None:
    server.silent_ops.add(Op.MGET)
    async with Client(server.address, timeout=0.2) as client, Client(server.address) as fallback:
        batcher = GetBatcher(client, fallback=fallback)
        answers = await asyncio.gather(*(batcher.get(k) for k in [b"k1", b"k2"]), return_exceptions=True)
        assert all(isinstance(a, TimeoutError) for a in answers), answers
        assert gets(server) == [] and batcher.stats.fallbacks == 0


async def test_garbage_answer_to_a_lone_get_is_read_again(server: FakeServer) -> None:
    server.garbage_ops.add(Op.GET)
    async with Client(server.address) as client:
        batcher = GetBatcher(client)
        with pytest.raises(RemoteProtocolError):
            await batcher.get(b"k1")  # the fallback (the same client) gets garbage too
        assert batcher.stats.fallbacks == 1
        server.garbage_ops.clear()
        assert await batcher.get(b"k1") == b"v1"


class _Sink:
    """A ``ReadSink`` that records what it was given (the shim's GET passes one like it)."""

    def __init__(self, all_done: asyncio.Future[None], waiting: list[int]) -> None:
        self.calls: list[tuple[str, object]] = []
        self.all_done = all_done
        self.waiting = waiting

    def done(self) -> bool:
        return bool(self.calls)

    def set_result(self, value: bytes | None) -> None:
        self._got("value", value)

    def set_exception(self, exc: BaseException) -> None:
        self._got("error", exc)

    def _got(self, kind: str, what: object) -> None:
        self.calls.append((kind, what))
        self.waiting[0] -= 1
        if self.waiting[0] == 0:
            self.all_done.set_result(None)


async def test_get_into_delivers_what_get_would_once_each(server: FakeServer) -> None:
    limits = Limits(max_key_bytes=8)
    async with Client(server.address, limits=limits) as client:
        batcher = GetBatcher(client)
        keys = [b"k1", b"nope", b"L" * 9, b"k3"]
        all_done = asyncio.get_running_loop().create_future()
        waiting = [len(keys)]
        sinks = [_Sink(all_done, waiting) for _ in keys]
        for key, sink in zip(keys, sinks, strict=True):
            batcher.get_into(key, sink)
        await asyncio.wait_for(all_done, 5)
        assert [len(s.calls) for s in sinks] == [1, 1, 1, 1]
        assert sinks[0].calls == [("value", b"v1")] and sinks[1].calls == [("value", None)] and sinks[3].calls == [("value", b"v3")]
        assert sinks[2].calls[0][0] == "error" and isinstance(sinks[2].calls[0][1], InvalidArgumentError)
        # The client refused the long key before sending: the batch went key by key.
        assert mgets(server) == [] and sorted(gets(server)) == [b"k1", b"k3", b"nope"] and batcher.stats.fallbacks == 1
        all_done = asyncio.get_running_loop().create_future()
        waiting = [2]
        sinks = [_Sink(all_done, waiting) for _ in range(2)]
        batcher.get_into(b"k2", sinks[0])
        batcher.get_into(b"k9", sinks[1])
        await asyncio.wait_for(all_done, 5)
        assert [s.calls for s in sinks] == [[("value", b"v2")], [("value", b"v9")]] and mgets(server) == [[b"k2", b"k9"]]
        await batcher.close()


def test_bad_options() -> None:
    client = Client("h:1")
    with pytest.raises(ConfigError, match=r"^max_keys: "):
        GetBatcher(client, max_keys=0)
    with pytest.raises(ConfigError, match=r"^answer_bytes: "):
        GetBatcher(client, answer_bytes=0)


# -- SetBatcher ---------------------------------------------------------------------------


def msets(server: FakeServer) -> list[tuple[list[bytes], int | None]]:
    """The keys and TTL (ms) of every MSET the server received, in arrival order."""
    return [([bytes(k) for k, _ in r[2]], r[3] if len(r) > 3 else None) for r in server.requests(Op.MSET)]


def sets(server: FakeServer) -> list[bytes]:
    return [r[2] for r in server.requests(Op.SET)]


async def test_one_mset_per_loop_iteration_and_ttl_capped_and_a_lone_write_as_set(server: FakeServer) -> None:
    async with Client(server.address) as client:
        stats = BatchStats()
        batcher = SetBatcher(client, max_keys=4, stats=stats)
        keys = [b"w%d" % i for i in range(10)]
        writes = [batcher.set(k, b"v-" + k) for k in keys] + [batcher.set(b"t%d" % i, b"tv", ttl=1.5) for i in range(2)]
        assert await asyncio.gather(*writes) == [None] * 12
        assert sorted(msets(server)) == sorted([(keys[0:4], None), (keys[4:8], None), (keys[8:10], None), ([b"t0", b"t1"], 1500)])
        assert all(server.data[k][0] == b"v-" + k for k in keys)
        assert server.data[b"t0"][1] is not None and server.data[b"w0"][1] is None
        await batcher.set("alone", b"1")  # alone: a SET
        assert sets(server) == [b"alone"]
        assert (stats.batches, stats.keys, stats.fallbacks) == (5, 13, 0)
        await batcher.close()


async def test_set_into_delivers_what_set_would_once_each(server: FakeServer) -> None:
    async with Client(server.address, limits=Limits(max_key_bytes=8)) as client:
        batcher = SetBatcher(client)
        pairs = [(b"w1", b"a"), (b"L" * 9, b"b"), (b"w3", b"c")]
        all_done = asyncio.get_running_loop().create_future()
        waiting = [len(pairs)]
        sinks = [_Sink(all_done, waiting) for _ in pairs]
        for (key, value), sink in zip(pairs, sinks, strict=True):
            batcher.set_into(key, value, None, sink)
        await asyncio.wait_for(all_done, 5)
        assert sinks[0].calls == [("value", None)] and sinks[2].calls == [("value", None)]
        assert len(sinks[1].calls) == 1 and isinstance(sinks[1].calls[0][1], InvalidArgumentError)
        assert server.data[b"w1"][0] == b"a" and server.data[b"w3"][0] == b"c" and batcher.stats.fallbacks == 1
        all_done = asyncio.get_running_loop().create_future()
        waiting = [2]
        sinks = [_Sink(all_done, waiting) for _ in range(2)]
        for i, sink in enumerate(sinks):
            batcher.set_into(b"m%d" % i, b"v", 5.0, sink)
        await asyncio.wait_for(all_done, 5)
        assert msets(server) == [([b"m0", b"m1"], 5000)] and [s.calls for s in sinks] == [[("value", None)]] * 2
        await batcher.close()


async def test_a_write_larger_than_the_batch_bytes_leaves_alone(server: FakeServer) -> None:
    async with Client(server.address) as client:
        batcher = SetBatcher(client, max_bytes=1000)
        small = [batcher.set(b"s%d" % i, b"x" * 300) for i in range(4)]  # 302 bytes each: three fit, the fourth starts a new batch
        big = batcher.set(b"big", b"y" * 2000)
        await asyncio.gather(*small, big)
        assert sorted(msets(server)) == sorted([([b"s0", b"s1", b"s2"], None)])
        assert sorted(sets(server)) == [b"big", b"s3"]
        assert server.data[b"big"][0] == b"y" * 2000


async def test_a_refused_batch_is_written_again_pair_by_pair(server: FakeServer) -> None:
    server.error_ops[Op.MSET] = (int(ValueTooLargeError.status), "a value is too large")
    async with Client(server.address) as client, Client(server.address) as fallback:
        batcher = SetBatcher(client, fallback=fallback)
        assert await asyncio.gather(*(batcher.set(b"r%d" % i, b"v%d" % i) for i in range(3))) == [None] * 3
        assert len(msets(server)) == 1 and sorted(sets(server)) == [b"r0", b"r1", b"r2"]
        assert [server.data[b"r%d" % i][0] for i in range(3)] == [b"v0", b"v1", b"v2"]
        assert batcher.stats.fallbacks == 1
        server.error_ops[Op.SET] = (int(ValueTooLargeError.status), "a value is too large")
        with pytest.raises(ValueTooLargeError):  # a lone write is not tried twice
            await batcher.set(b"lone", b"v")
        assert sets(server)[3:] == [b"lone"] and batcher.stats.fallbacks == 1


async def test_a_pair_the_client_refuses_fails_alone(server: FakeServer) -> None:
    limits = Limits(max_key_bytes=8)
    async with Client(server.address, limits=limits) as client:
        batcher = SetBatcher(client)
        answers = await asyncio.gather(*(batcher.set(k, b"v") for k in [b"k1", b"L" * 9, b"k3"]), return_exceptions=True)
        assert answers[0] is None and answers[2] is None and isinstance(answers[1], InvalidArgumentError)
        assert server.data[b"k1"][0] == b"v" and server.data[b"k3"][0] == b"v" and b"L" * 9 not in server.data
        assert batcher.stats.fallbacks == 1


async def test_a_key_or_value_of_the_wrong_type_fails_its_own_write(server: FakeServer) -> None:
    async with Client(server.address) as client:
        batcher = SetBatcher(client)
        pairs: list[tuple[object, object]] = [(b"k1", b"v"), (b"k2", 42), (7, b"v"), (b"k3", None), (b"k4", "välue")]
        futures = [batcher.set(k, v) for k, v in pairs]  # type: ignore[arg-type]
        answers = await asyncio.gather(*futures, return_exceptions=True)
        assert answers[0] is None and answers[4] is None
        assert all(isinstance(a, InvalidArgumentError) for a in answers[1:4]), answers
        assert server.data[b"k1"][0] == b"v" and server.data[b"k4"][0] == "välue".encode()


async def test_a_write_timeout_goes_to_every_pair_without_a_second_try(server: FakeServer) -> None:
    server.silent_ops.add(Op.MSET)
    async with Client(server.address, timeout=0.2) as client, Client(server.address) as fallback:
        batcher = SetBatcher(client, fallback=fallback)
        answers = await asyncio.gather(*(batcher.set(k, b"v") for k in [b"k1", b"k2"]), return_exceptions=True)
        assert all(isinstance(a, TimeoutError) for a in answers), answers
        assert sets(server) == [] and batcher.stats.fallbacks == 0


def test_set_batcher_bad_options() -> None:
    client = Client("h:1")
    with pytest.raises(ConfigError, match=r"^max_keys: "):
        SetBatcher(client, max_keys=0)
    with pytest.raises(ConfigError, match=r"^max_bytes: "):
        SetBatcher(client, max_bytes=0)
