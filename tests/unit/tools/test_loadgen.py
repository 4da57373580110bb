"""``dcache bench``'s open loop: the schedule, the pre-encoded requests, and latency charged from each intended send time."""

from __future__ import annotations

import asyncio
import random
from time import perf_counter

import pytest

from dcache.protocol import Op
from dcache.protocol.framing import FrameDecoder
from dcache.tools.keydist import KeyDistribution, KeySampler
from dcache.tools.loadgen import (
    _RATE_WINDOW,
    BenchOptions,
    RateSchedule,
    _build_requests,
    _close,
    _open,
    _RateDriver,
    _RateProtocol,
)
from tests.unit.client.fakeserver import FakeServer


def test_schedule_due_and_intended():
    s = RateSchedule(start=10.0, rate=1000.0, count=5)
    assert s.due(9.9999) == 0
    assert s.due(10.0) == 1
    assert s.due(10.0015) == 2
    assert s.due(10.004) == 5
    assert s.due(99.0) == 5
    assert s.intended(0) == 10.0 and s.intended(3) == pytest.approx(10.003)


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="--rate"):
        BenchOptions(addr="127.0.0.1:1", rate=0)
    with pytest.raises(ValueError, match="distribution"):
        BenchOptions(addr="127.0.0.1:1", distribution="zipf:0")


@pytest.mark.parametrize("rid", [1, 64, _RATE_WINDOW])
def test_pre_encoded_requests_take_any_id_in_the_window(rid):
    opts = BenchOptions(addr="127.0.0.1:1", ratio=0.5, keys=1000, value_size=10)
    rng = random.Random(5)
    pool = _build_requests(rng, KeySampler(opts.keys, KeyDistribution(), 0.0, rng), opts)
    decoder = FrameDecoder()
    msgs = decoder.feed(b"".join(pre + bytes([rid]) + post for pre, post in pool[:200]))
    assert len(msgs) == 200
    assert {m[0] for m in msgs} == {Op.GET, Op.SET} and {m[1] for m in msgs} == {rid}
    assert all(m[2].startswith(b"bench:") for m in msgs)
    assert all(m[3] == b"x" * 10 for m in msgs if m[0] == Op.SET)


async def test_a_stall_is_charged_to_every_request_it_delayed():
    """The server holds every answer for the schedule's first 200 ms or so, at 1000 requests/s.

    Request k is intended at k ms, and no answer leaves before the release at
    R ms: its latency is at least R - k ms. So the i-th largest latency is at
    least R - i ms, for every i below R: each request the stall delayed is
    charged for it, not only the one per connection in flight when it began
    (which is all a closed loop would count), and those the full window kept
    from leaving on time are charged from when they were due. Bounds from below hold on a busy
    machine too: lateness only adds.
    """
    server = await FakeServer().start()
    # one connection: its window (127 ids) fills during the stall, so the generator itself holds requests back
    opts = BenchOptions(addr=server.address, conns=1, rate=1000.0, duration=0.6, keys=100, populate=False)
    try:
        protos = [await _open(opts, _RateProtocol()) for _ in range(opts.conns)]
        rng = random.Random(1)
        sampler = KeySampler(opts.keys, KeyDistribution(), 0.0, rng)
        for p in protos:
            p.pool = _build_requests(rng, sampler, opts)
        server.hold = True
        start = perf_counter() + 0.05
        released: list[float] = []

        def release() -> None:
            released.append(perf_counter())
            server.release()

        asyncio.get_running_loop().call_later(start + 0.2 - perf_counter(), release)
        driver = _RateDriver(protos, RateSchedule(start, 1000.0, 600))
        await driver.run(drain_s=10.0)
        _close(protos)
    finally:
        await server.stop()
    lat = sorted(driver.lat)
    assert len(lat) == 600 and len(driver.lag) == 600 and driver.unsent == 0
    assert sum(p.errors for p in protos) == 0
    assert len(server.requests(Op.GET)) + len(server.requests(Op.SET)) == 600
    stall = released[0] - start
    assert stall >= 0.19
    worst_first = lat[::-1]
    for i in range(int(stall * 1000)):
        assert worst_first[i] >= stall - (i + 1) / 1000, f"the {i + 1}th worst latency is {worst_first[i] * 1000:.1f} ms"
    assert worst_first[0] <= stall + 0.1
