"""Taking a snapshot while the cache keeps changing (the copy is sliced over loop iterations)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from dcache.auxnode import AuxNode
from dcache.auxnode.snapshots import COPY_CHUNK_ENTRIES, CURRENT_NAME
from dcache.config import AuxConfig
from dcache.lru import load

N_KEYS = 30 * COPY_CHUNK_ENTRIES


def _node(data_dir: Path) -> AuxNode:
    return AuxNode(AuxConfig(port=0, data_dir=str(data_dir), snapshot_interval=0), node_id="copy-test")


async def test_snapshot_taken_during_writes_holds_every_untouched_key_once(tmp_path: Path) -> None:
    node = _node(tmp_path)
    cache = node.cache
    for i in range(N_KEYS):
        cache.set(b"key:%06d" % i, b"old:%06d" % i, version=node.clock.next())
    touched: set[bytes] = set()
    done = asyncio.Event()
    iterations = 0

    async def writer() -> None:
        # Between the copy's slices: overwrite, delete and add keys, and
        # reorder the LRU list with reads (a bounded number of times: the
        # copy takes about N_KEYS / COPY_CHUNK_ENTRIES iterations).
        nonlocal iterations
        i = 0
        while not done.is_set() and iterations < 2 * N_KEYS // COPY_CHUNK_ENTRIES:
            for _ in range(50):
                old, new = b"key:%06d" % ((i * 7919) % N_KEYS), b"new:%06d" % i
                touched.update((old, new))
                if i % 3 == 0:
                    cache.delete(old, version=node.clock.next())
                else:
                    cache.set(old, b"changed", version=node.clock.next())
                cache.set(new, b"added", version=node.clock.next())
                cache.get(b"key:%06d" % ((i * 31) % N_KEYS))
                i += 1
            iterations += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    try:
        assert await node.snapshots.snapshot()
    finally:
        done.set()
        await task
        await node.snapshots.close()
    assert iterations > 5, "the copy did not yield to the loop between slices"

    with open(tmp_path / CURRENT_NAME, "rb") as f:
        data = load(f, now_ms=time.time_ns() // 1_000_000)
    keys = [e[0] for e in data.entries]
    assert len(keys) == len(set(keys)), "a key is in the snapshot twice"
    by_key = {e[0]: e[1] for e in data.entries}
    untouched = {b"key:%06d" % i for i in range(N_KEYS)} - touched
    assert len(untouched) > N_KEYS // 2
    for key in untouched:
        assert by_key.get(key) == b"old:" + key[4:], key
    for key, value in by_key.items():  # whatever a touched key holds is a value it had
        if key in touched:
            assert value in (b"changed", b"added", b"old:" + key[4:]), (key, value)


async def test_a_snapshot_of_an_empty_node_loads_empty(tmp_path: Path) -> None:
    node = _node(tmp_path)
    assert await node.snapshots.snapshot()
    await node.snapshots.close()
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        data = load(f, now_ms=time.time_ns() // 1_000_000)
    assert data.count == 0 and data.entries == []
    assert os.path.getsize(tmp_path / CURRENT_NAME) == data.size_bytes
