"""The Python client against real dcache processes that stop, die or are misused, as its users meet them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from dcache import Client, SyncClient
from dcache.client import ClientConnection, NodePool
from dcache.errors import InvalidArgumentError, NoAvailableNodeError, OverloadedError, PoolClosedError
from tests.harness import DaemonProcess, start_aux
from tests.tlscerts import TlsCerts, make_certs

pytestmark = pytest.mark.slow

#: Bound on anything that must not hang (every case below finishes far sooner when right).
HANG_S = 10.0
#: A value the kernel's socket buffers cannot absorb when the server stops reading.
LARGE = b"x" * (8 * 1024 * 1024)


@pytest.fixture
def aux() -> Iterator[DaemonProcess]:
    node = start_aux()
    try:
        yield node
    finally:
        node.signal(signal.SIGCONT)
        node.kill()


async def test_close_does_not_wait_for_a_server_that_stopped_reading(aux: DaemonProcess) -> None:
    c = Client(aux.addr, timeout=0.5, connect_timeout=0.5)
    try:
        assert await c.set("k", b"v")
        aux.signal(signal.SIGSTOP)
        with pytest.raises(TimeoutError):
            await c.set("big", LARGE)  # most of it stays in the client's write buffer
    finally:
        await asyncio.wait_for(c.close(), HANG_S)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("value", [b"v", LARGE], ids=["small", "large"])
async def test_close_over_tls_waits_for_a_stopped_server_no_longer_than_a_connect(certs: TlsCerts, value: bytes) -> None:
    node = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *certs.daemon_args()]).start()
    try:
        c = Client(node.addr, timeout=0.5, connect_timeout=0.5, ssl=certs.client_context())
        try:
            assert await c.set("k", b"v")
            node.signal(signal.SIGSTOP)
            with pytest.raises(TimeoutError):
                await c.set("k", value)
        finally:
            # The TLS goodbye waited 30 s (the loop's default) for a server that never answers it.
            await asyncio.wait_for(c.close(), HANG_S)
    finally:
        node.signal(signal.SIGCONT)
        node.kill()


@pytest.mark.parametrize("op", ["set", "mset"])
async def test_a_request_over_the_frame_limit_is_refused_locally_and_costs_other_callers_nothing(aux: DaemonProcess, op: str) -> None:
    async with Client(aux.addr, max_connections=1, timeout=HANG_S) as c:
        assert await c.mset({f"k{i}": b"v%d" % i for i in range(5)})
        oversized: Coroutine[Any, Any, object]
        if op == "set":  # one value far over the 32 MiB frame limit
            oversized = c.set("big", b"x" * (33 * 1024 * 1024))
        else:  # values each under the value limit, together over the frame limit
            oversized = c.mset({f"big{i}": b"x" * (7 * 1024 * 1024) for i in range(5)})
        results = await asyncio.gather(oversized, *(c.get(f"k{i}") for i in range(5)), return_exceptions=True)
        assert isinstance(results[0], InvalidArgumentError), results[0]
        assert "frame" in str(results[0])
        assert results[1:] == [b"v%d" % i for i in range(5)]  # the requests pipelined with it were served
        stats = await c.stats()
        assert stats["protocol_errors"] == 0  # the server never saw the oversized frame


def test_sync_client_calls_racing_its_close_from_other_threads_all_return(aux: DaemonProcess) -> None:
    unexpected: list[BaseException] = []
    for _ in range(30):
        c = SyncClient(aux.addr, timeout=2)
        assert c.set("k", b"v")
        stop = threading.Event()

        def hammer(c: SyncClient = c, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    assert c.get("k") == b"v"
                except (PoolClosedError, ConnectionResetError):  # what a call racing close() may get
                    return
                except BaseException as exc:
                    unexpected.append(exc)
                    return

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        c.close()
        stop.set()
        for t in threads:
            t.join(HANG_S)
            # A call submitted as the loop stopped waited forever for a loop that would never run it.
            assert not t.is_alive(), "a SyncClient call never returned after close()"
    assert not unexpected, unexpected


def test_sync_client_used_in_a_forked_child_fails_at_once(aux: DaemonProcess) -> None:
    script = f"""
import os, signal, sys
import dcache
c = dcache.SyncClient({aux.addr!r}, timeout=2)
c.set("k", b"v")
pid = os.fork()
if pid == 0:
    signal.alarm(5)  # a hang ends the child with SIGALRM
    try:
        c.get("k")
    except RuntimeError as exc:
        print("child:", exc, flush=True)
    c.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child status:", status, flush=True)
print("parent:", c.get("k"), flush=True)
c.close()
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S * 2)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("child:") and "fork" in lines[0], res.stdout
    assert lines[1:] == ["child status: 0", "parent: b'v'"], res.stdout


async def test_an_endpoint_at_its_connection_limit_is_failed_over_at_once(aux: DaemonProcess) -> None:
    full = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--max-connections", "1", "--log-level", "warning"]).start()
    try:
        async with Client(full.addr) as hog:
            await hog.ping()  # holds the one connection the node accepts
            async with Client([full.addr, aux.addr], timeout=HANG_S) as c:
                assert await c.set("k", b"v")  # was OverloadedError: the client stayed on the full node
                assert c.current_endpoint == aux.addr
            async with Client(full.addr, timeout=HANG_S) as alone:
                with pytest.raises(NoAvailableNodeError, match="too many connections") as info:
                    await alone.ping()
                assert isinstance(info.value.__cause__, OverloadedError)
    finally:
        full.kill()


async def test_a_close_cancelled_midway_still_closes_every_endpoint(aux: DaemonProcess) -> None:
    dead = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]).start()
    dead.kill()  # its port refuses connections from now on
    c = Client([dead.addr, aux.addr], timeout=HANG_S)
    assert await c.set("k", b"v")  # failed over: a pool per endpoint, the first reconnecting in the background
    pools = [c.pool(dead.addr), c.pool(aux.addr)]
    closing = asyncio.ensure_future(c.close())
    await asyncio.sleep(0)  # the close has started...
    closing.cancel()  # ... and its caller gives up (a shutdown with a deadline)
    with pytest.raises(asyncio.CancelledError):
        await closing
    for pool in pools:
        assert pool is not None
        await asyncio.wait_for(_closed(pool), HANG_S)


async def _closed(pool: NodePool[ClientConnection]) -> None:
    """Wait until ``pool`` is closed with no connection left open (bounded by the caller)."""
    while not (pool.closed and pool.size == 0):
        await asyncio.sleep(0.01)


async def test_a_value_a_node_with_raised_limits_stores_can_be_read_back() -> None:
    raised = ["--max-frame-bytes", "64MiB", "--max-value-bytes", "40MiB"]
    node = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *raised]).start()
    try:
        async with Client(node.addr, timeout=HANG_S) as c:
            value = b"x" * (40 * 1024 * 1024)  # over the client's default frame limit (32 MiB), under the node's
            assert await c.set("big", value)
            assert await c.get("big") == value  # was RemoteProtocolError: the answer exceeded the client's 32 MiB
    finally:
        node.kill()


async def test_callers_that_give_up_first_still_move_the_client_off_a_stopped_endpoint(aux: DaemonProcess) -> None:
    other = start_aux()
    try:
        async with Client([aux.addr, other.addr], timeout=1.0, connect_timeout=0.5) as c:
            await c.ping()
            aux.signal(signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + HANG_S
            while True:  # every call is cancelled by its caller's own, shorter deadline...
                try:
                    await asyncio.wait_for(c.ping(), 0.2)
                    break
                except TimeoutError:
                    # ... which used to leave the stopped node's connection in use for good
                    assert loop.time() < deadline, "the client never left the stopped endpoint"
            assert c.current_endpoint == other.addr
    finally:
        other.kill()
