"""Answers larger than the frame limit: a typed error, never a frame the peer must refuse."""

from __future__ import annotations

import asyncio

import pytest

from dcache import Client
from dcache.errors import FrameTooLargeError
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess

pytestmark = pytest.mark.slow

LIMITS = ["--max-frame-bytes", "2MB", "--max-value-bytes", "1MB"]
VALUE = b"v" * 900_000  # one fits in a frame, three do not


async def test_aux_answers_frame_too_large_and_keeps_the_connection(tmp_path):
    aux = DaemonProcess("aux", ["--port", "0", *LIMITS]).start()
    try:
        async with Client(aux.addr, timeout=10) as c:
            for i in range(3):
                assert await c.set(f"big{i}", VALUE)
            with pytest.raises(FrameTooLargeError, match="frame limit"):
                await c.mget([f"big{i}" for i in range(3)])
            assert await c.get("big0") == VALUE  # same connection, still served
            assert await c.mget(["big1", "big2"]) == [VALUE, VALUE]  # two fit
            stats = await c.stats()
            assert stats["protocol_errors"] == 0
    finally:
        aux.terminate()


async def test_master_reads_many_large_values_at_once(tmp_path):
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1", *LIMITS)
        cl.start_aux("a1", *LIMITS)
        await wait_ring(m.addr, settled({"a1"}))
        async with Client(m.addr, timeout=10) as c:
            for i in range(6):
                assert await c.set(f"big{i}", VALUE)
                assert await c.set(f"small{i}", b"s%d" % i)
            # GETs of one loop iteration are batched into one MGET towards the aux
            # node; its answer would exceed the frame limit, so they are read one by one.
            values = await asyncio.gather(*(c.get(f"big{i}") for i in range(6)))
            assert values == [VALUE] * 6
            # Small answers leave as one chunk, large ones as header and body:
            # mixed in one write, each still reaches its own request.
            keys = [k for i in range(6) for k in (f"small{i}", f"big{i}")]
            values = await asyncio.gather(*(c.get(k) for k in keys))
            assert values == [v for i in range(6) for v in (b"s%d" % i, VALUE)]
    finally:
        cl.stop()
