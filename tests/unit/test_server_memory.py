"""FrameProtocol memory: a closed connection is freed by reference counting alone (issue 13, finding 4).

Aux nodes ``gc.freeze()`` every 5 s and masters raise the young-generation
threshold to 50,000, so a connection that only the cyclic GC can free waits
a long time (master) or forever (aux: frozen while open). Each test runs
with the collector disabled and checks, through a weak reference, that the
protocol object is gone once its connection is lost and the test drops it.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from dcache.config import NodeConfig
from dcache.protocol import HEADER, PROTOCOL_VERSION, Op
from dcache.server import FrameProtocol, Service
from tests.fakes import FakeTransport

pytestmark = pytest.mark.slow  # issue 13's memory tests run together (bin/bench_churn.py measures the processes)


class _WeakFrameProtocol(FrameProtocol):
    """The FrameProtocol, plus the slot a weak reference needs."""

    __slots__ = ("__weakref__",)


def _frame(msg: Any) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


HELLO = _frame([int(Op.HELLO), 1, PROTOCOL_VERSION, None, "t"])
PING = _frame([int(Op.PING), 2])


def _service(token: str | None = None) -> Service:
    service = Service("t", NodeConfig(max_value_bytes=1024 * 1024, auth_token=token))
    service.handlers[Op.PING] = lambda conn, rid, args: "PONG"
    return service


@pytest.fixture(autouse=True)
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _serve_and_close(service: Service, *chunks: bytes) -> weakref.ref[FrameProtocol]:
    """Open a connection on a fake transport, feed ``chunks``, lose the connection; return a weak reference.

    One loop iteration runs before the connection is lost and one after, as
    on a server: answers queued for the end of the iteration are flushed.
    """
    proto = _WeakFrameProtocol(service)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        proto.data_received(chunk)
    await asyncio.sleep(0)
    proto.connection_lost(None)
    ref: weakref.ref[FrameProtocol] = weakref.ref(proto)
    del proto
    await asyncio.sleep(0)
    return ref


async def test_a_closed_connection_is_freed_by_reference_counting() -> None:
    ref = await _serve_and_close(_service(), HELLO + PING)
    assert ref() is None, "a closed FrameProtocol outlives its connection without the cyclic GC: " + _holders(ref)


async def test_a_connection_that_authenticated_is_freed_by_reference_counting() -> None:
    token_hello = _frame([int(Op.HELLO), 1, PROTOCOL_VERSION, "secret", "t"])
    ref = await _serve_and_close(_service("secret"), token_hello + PING)
    assert ref() is None, _holders(ref)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(HEADER.pack(1) + b"\xc1", id="undecodable"),
        pytest.param(HEADER.pack(33 * 1024 * 1024), id="too-large"),
    ],
)
async def test_a_connection_closed_for_a_protocol_error_is_freed_by_reference_counting(bad: bytes) -> None:
    ref = await _serve_and_close(_service(), HELLO + bad)
    assert ref() is None, "the protocol error's traceback keeps the connection: " + _holders(ref)
    ref = await _serve_and_close(_service(), HELLO, bad)  # the error raised out of feed(), not kept for later
    assert ref() is None, _holders(ref)


async def test_a_connection_with_a_parked_partial_frame_is_freed_by_reference_counting() -> None:
    partial = HEADER.pack(4 * 1024 * 1024) + b"\xc6" + (4 * 1024 * 1024 - 5).to_bytes(4, "big") + bytes(1024 * 1024)
    ref = await _serve_and_close(_service(), HELLO, partial)
    assert ref() is None, _holders(ref)


def _holders(ref: weakref.ref[FrameProtocol]) -> str:
    """Who still refers to the connection (for the failure message)."""
    obj = ref()
    if obj is None:
        return ""
    return ", ".join(type(r).__name__ for r in gc.get_referrers(obj))
