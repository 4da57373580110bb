#!/usr/bin/env python3
"""Snapshot cost on an aux node: time to take one, worst event-loop stall while it runs, load time, size.

    .venv/bin/python bin/bench_snapshot.py [N]        # N keys of 100 bytes, default 1000000

Fills an in-process AuxNode (a quarter of the keys with TTLs), runs a task
that ticks every 1 ms and records how late each tick is (a sleep of 1 ms
that takes longer is a stall of the loop by the difference), takes one
snapshot, then loads it into a fresh node.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time

import uvloop

from dcache.auxnode import AuxNode
from dcache.config import AuxConfig

N = int(next((a for a in sys.argv[1:] if a.isdigit()), 1_000_000))


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    # perf_counter, not loop.time(): uvloop's clock has a 1 ms resolution
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def main() -> None:
    d = tempfile.mkdtemp(prefix="dcache-snapbench-")
    try:
        cfg = AuxConfig(port=0, data_dir=d, max_memory=4 * 1024**3, snapshot_interval=0)
        node = AuxNode(cfg, node_id="bench")
        v = b"v" * 100
        now_ms = time.time_ns() // 10**6
        for i in range(N):
            node.cache.set(b"key:%08d" % i, v, expires_at=0 if i % 4 else now_ms + 3_600_000, version=node.clock.next())
        gc.freeze()  # as the running node does (AuxNode._gc_loop)
        stop = asyncio.Event()
        lags: list[float] = []
        tick = asyncio.create_task(ticker(stop, lags))
        await asyncio.sleep(0.2)
        idle_worst = max(lags)
        lags.clear()
        t0 = time.perf_counter()
        ok = await node.snapshots.snapshot()
        took = time.perf_counter() - t0
        stop.set()
        await tick
        lags.sort()
        size = os.path.getsize(os.path.join(d, "snapshot.msgpack"))
        print(
            f"{N} keys: snapshot ok={ok} in {took:.2f} s; loop stall worst {lags[-1] * 1000:.1f} ms, "
            f"p99 {lags[int(len(lags) * 0.99)] * 1000:.1f} ms (idle worst {idle_worst * 1000:.1f} ms); file {size / 1e6:.0f} MB"
        )
        node2 = AuxNode(cfg, node_id="bench")
        t0 = time.perf_counter()
        n = await node2.snapshots.load()
        print(f"load: {n} keys in {time.perf_counter() - t0:.2f} s")
        await node.snapshots.close()
        await node2.snapshots.close()
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    uvloop.run(main())
