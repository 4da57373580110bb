"""The fault proxy against a tiny echo server: each mode does what it says, and heals."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.faults.proxy import CHUNK_BYTES, QUEUE_CHUNKS, FaultProxy
from tests.harness import wait_for

#: Bound on any single wait in these tests (the machine is shared and busy).
WAIT_S = 10.0


class Echo:
    """An echo server on the test's loop; counts connections."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            await _close(writer)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            await _close(w)
        await self.server.wait_closed()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    await e.start()
    yield e
    await e.close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(name="test") as p:
        yield p


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(proxy.host, proxy.port), WAIT_S)


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), WAIT_S)


async def _closed_by_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True if the connection is reset or closed by the other side (bounded)."""
    try:
        writer.write(b"x")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(100), WAIT_S)
    except (ConnectionError, OSError):
        return True
    return data == b""


async def _refused(proxy: FaultProxy) -> bool:
    """True if a new connection is refused: reset while connecting, or reset or closed right after."""
    try:
        reader, writer = await _connect(proxy)
    except (ConnectionError, OSError):
        return True
    try:
        return await _closed_by_peer(reader, writer)
    finally:
        await _close(writer)


async def test_pass_through_and_counters(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    reader, writer = await _connect(proxy)
    payload = os.urandom(200_000)
    assert await _roundtrip(reader, writer, payload) == payload
    c = proxy.counters()
    assert c["accepted"] == 1 and c["active"] == 1 and c["mode"] == "pass"
    # A piece is counted after its write returns, which may be after the echo reached us.
    await asyncio.to_thread(wait_for, lambda: proxy.counters()["bytes_down"] == len(payload), WAIT_S, 0.02, "the last piece to be counted")
    assert proxy.counters()["bytes_up"] == len(payload)
    await _close(writer)
    await asyncio.to_thread(wait_for, lambda: proxy.counters()["active"] == 0, WAIT_S, 0.02, "the link to close")


def _addr(echo: Echo) -> str:
    assert echo.server is not None
    return f"127.0.0.1:{echo.server.sockets[0].getsockname()[1]}"


async def test_upstream_given_after_the_connection_arrives(echo: Echo, proxy: FaultProxy):
    reader, writer = await _connect(proxy)
    writer.write(b"early")
    await writer.drain()
    await asyncio.sleep(0)  # the proxy holds it: there is no upstream yet
    proxy.set_upstream(_addr(echo))
    assert await asyncio.wait_for(reader.readexactly(5), WAIT_S) == b"early"
    await _close(writer)


async def test_delay_adds_latency_each_way_then_heals(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    reader, writer = await _connect(proxy)
    assert await _roundtrip(reader, writer, b"warm") == b"warm"
    proxy.delay(0.3)
    t0 = time.monotonic()
    assert await _roundtrip(reader, writer, b"slow") == b"slow"
    took = time.monotonic() - t0
    print(f"round trip with delay(0.3): {took:.3f} s")
    assert took >= 0.6  # 0.3 s up and 0.3 s down; a busy machine only adds to it
    # a latency, not a throughput cap: many chunks in flight share the same delay
    t0 = time.monotonic()
    for i in range(20):
        writer.write(b"%03d" % i)
        await writer.drain()
        await asyncio.sleep(0.01)
    got = await asyncio.wait_for(reader.readexactly(60), WAIT_S)
    print(f"20 chunks 10 ms apart with delay(0.3): {time.monotonic() - t0:.3f} s")
    assert got == b"".join(b"%03d" % i for i in range(20))
    proxy.heal()
    assert await _roundtrip(reader, writer, b"fast") == b"fast"
    await _close(writer)


async def test_blackhole_holds_connections_open_buffers_boundedly_and_loses_nothing(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    reader, writer = await _connect(proxy)
    assert await _roundtrip(reader, writer, b"before") == b"before"
    proxy.blackhole()
    writer.write(b"during")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), 0.5)  # nothing comes back while blackholed
    # A sender that keeps writing is pushed back by TCP: the proxy holds a few chunks only.
    sent = 0
    block = b"b" * 65536
    while True:
        writer.write(block)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            sent += len(block)
            break
        sent += len(block)
        assert sent < 256 * 1024**2, "the blackholed proxy never pushed back"
    held = proxy.counters()["held_bytes_max"]
    print(f"blackhole: the sender got {sent} bytes out before TCP pushed back; the proxy held at most {held} bytes")
    assert held <= 2 * (QUEUE_CHUNKS + 1) * CHUNK_BYTES  # per direction: the queue and the chunk in hand
    # a new connection during the blackhole is accepted but goes nowhere
    r2, w2 = await _connect(proxy)
    w2.write(b"new")
    await w2.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.read(100), 0.3)
    connections_before_heal = echo.connections
    proxy.heal()
    want = len(b"during") + sent
    got = 0
    while got < want:  # everything comes back, in order
        chunk = await asyncio.wait_for(reader.read(1 << 20), WAIT_S)
        assert chunk, "connection closed before every byte came back"
        if got == 0:
            assert chunk.startswith(b"during")
        got += len(chunk)
    assert got == want
    assert await asyncio.wait_for(r2.readexactly(3), WAIT_S) == b"new"
    assert echo.connections == connections_before_heal + 1
    await _close(writer)
    await _close(w2)


async def test_cut_resets_connections_and_refuses_new_ones_until_healed(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    reader, writer = await _connect(proxy)
    assert await _roundtrip(reader, writer, b"hi") == b"hi"
    proxy.cut()
    assert await _closed_by_peer(reader, writer)
    assert await _refused(proxy)
    c = proxy.counters()
    assert c["resets"] == 1 and c["refused"] == 1 and c["active"] == 0, c
    # the echo server's side was reset too
    await asyncio.wait_for(_until(lambda: all(w.is_closing() for w in echo.writers)), WAIT_S)
    proxy.heal()
    r3, w3 = await _connect(proxy)
    assert await _roundtrip(r3, w3, b"again") == b"again"
    for w in (writer, w3):
        await _close(w)


async def test_cut_spares_the_connections_marked_before(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    kept_r, kept_w = await _connect(proxy)
    assert await _roundtrip(kept_r, kept_w, b"kept") == b"kept"
    assert proxy.spare() == 1
    reader, writer = await _connect(proxy)
    assert await _roundtrip(reader, writer, b"hi") == b"hi"
    proxy.cut()
    assert await _closed_by_peer(reader, writer)
    assert await _refused(proxy)
    assert await _roundtrip(kept_r, kept_w, b"still") == b"still"
    c = proxy.counters()
    assert c["resets"] == 1 and c["refused"] == 1 and c["active"] == 1, c
    proxy.heal()
    for w in (kept_w, writer):
        await _close(w)


async def test_trickle_caps_the_rate_then_heals(echo: Echo, proxy: FaultProxy):
    proxy.set_upstream(_addr(echo))
    reader, writer = await _connect(proxy)
    proxy.trickle(4000)
    payload = os.urandom(2000)
    t0 = time.monotonic()
    assert await _roundtrip(reader, writer, payload) == payload
    took = time.monotonic() - t0
    print(f"2000 bytes each way at 4000 B/s: {took:.3f} s")
    assert took >= 0.4  # 0.5 s each way at the cap, minus one step of slack
    proxy.heal()
    t0 = time.monotonic()
    big = os.urandom(1_000_000)
    assert await _roundtrip(reader, writer, big) == big
    print(f"1 MB each way after heal: {time.monotonic() - t0:.3f} s")
    await _close(writer)


async def test_upstream_refusing_resets_the_client(proxy: FaultProxy):
    # a port nobody listens on: bind one, note it, close it
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    proxy.set_upstream(("127.0.0.1", port))
    assert await _refused(proxy)
    assert proxy.counters()["upstream_failures"] == 1


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
