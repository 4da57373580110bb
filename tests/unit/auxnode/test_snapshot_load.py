"""Loading a snapshot at start: entries go in as they are read; a file damaged at its end leaves nothing behind."""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from dcache.auxnode import AuxNode
from dcache.auxnode.snapshots import APPLY_CHUNK_ENTRIES, CURRENT_NAME, PREV_NAME
from dcache.config import AuxConfig
from dcache.lru import dump
from dcache.lru.snapshot import LOAD_READ_BYTES, MAGIC

MiB = 1024 * 1024


def _write(path: Path, entries: list[tuple[bytes, bytes, int, int]], node_id: str = "load-test", ring_epoch: int = 0) -> bytes:
    with open(path, "wb") as f:
        dump(entries, f, node_id=node_id, ring_epoch=ring_epoch, created_ms=int(time.time() * 1000))
    return path.read_bytes()


def _node(data_dir: Path, max_memory: int = 256 * MiB) -> AuxNode:
    return AuxNode(AuxConfig(port=0, data_dir=str(data_dir), snapshot_interval=0, max_memory=max_memory), node_id="load-test")


async def test_a_snapshot_far_larger_than_the_budget_loads_in_about_the_budget(tmp_path: Path) -> None:
    """The load held every entry of the file before applying any: 3x the file at its peak, whatever the budget."""
    n, value = 3_000, b"v" * 8192
    size = len(_write(tmp_path / CURRENT_NAME, [(b"k:%05d" % i, value, 0, i + 1) for i in range(n)]))
    assert size > 23 * MiB
    budget = 1 * MiB
    node = _node(tmp_path, max_memory=budget)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loaded = await node.snapshots.load()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    try:
        assert 0 < loaded < n and len(node.cache) == loaded
        assert node.cache.get_entry(b"k:%05d" % (n - 1)) is not None  # the newest stayed
        # The budget, plus one piece of the file: as read (and kept until hashed), in the unpacker's buffer
        # (which grows by doubling: up to two pieces) and decoded into a batch of entries. 5.1 MiB measured
        # (the load that held every entry first: 27.4 MiB).
        bound = budget + 5 * LOAD_READ_BYTES
        assert peak < bound, f"the load peaked at {peak / MiB:.1f} MiB for a {size / MiB:.0f} MiB file"
    finally:
        await node.snapshots.close()


def _bad_checksum(data: bytes) -> bytes:
    """``data`` with its trailer's checksum off by one bit."""
    unpacker = msgpack.Unpacker(strict_map_key=False)
    unpacker.feed(data[len(MAGIC) :])
    start = end = 0
    trailer = None
    for obj in unpacker:
        start, end, trailer = end, unpacker.tell(), obj
    assert end == len(data) - len(MAGIC) and trailer is not None
    bad: bytes = msgpack.packb({"count": trailer["count"], "xxh3_64": trailer["xxh3_64"] ^ 1})
    return data[: len(MAGIC) + start] + bad


def _flip_near_the_end(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) - 200] ^= 0x01  # inside the last entries' values: only the checksum sees it
    return bytes(b)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "checksum": _bad_checksum,
    "value-flip": _flip_near_the_end,
    "no-trailer": lambda d: d[:-12],
    "cut-in-last-entry": lambda d: d[:-30],
    "trailing-bytes": lambda d: d + b"\x00",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_file_found_damaged_at_its_end_is_undone_and_prev_loaded(tmp_path: Path, damage: str) -> None:
    """Its entries went in before the end showed the damage: they are removed, counters too, then prev loads."""
    prev = [(b"p:%03d" % i, b"prev", 0, 10 + i) for i in range(100)]
    _write(tmp_path / PREV_NAME, prev, ring_epoch=3)
    # Newer versions of prev's keys, and many more keys: several batches are applied before the end.
    current = [(b"p:%03d" % i, b"current", 0, 1_000 + i) for i in range(100)]
    current += [(b"c:%06d" % i, b"current", 0, 2_000 + i) for i in range(3 * APPLY_CHUNK_ENTRIES)]
    path = tmp_path / CURRENT_NAME
    path.write_bytes(DAMAGE[damage](_write(path, current, ring_epoch=9)))
    node = _node(tmp_path)
    try:
        assert await node.snapshots.load() == len(prev)
        cache = node.cache
        cache.check_valid()
        assert sorted(cache.keys_snapshot()) == [e[0] for e in prev]
        assert all(cache.get_entry(k).value == b"prev" for k, *_ in prev)  # type: ignore[union-attr]
        assert (cache.sets, cache.evictions, cache.deletes) == (len(prev), 0, 0)
        stats = node.snapshots.stats()
        assert stats["snapshots_rejected"] == 1 and stats["snapshot_loaded_keys"] == len(prev)
        assert node.snapshots.max_version == 10 + len(prev) - 1 and node.ring_epoch == 3
        assert not path.exists() and any(n.startswith("snapshot.corrupt.") for n in os.listdir(tmp_path))
    finally:
        await node.snapshots.close()


async def test_a_file_found_damaged_at_its_end_with_no_prev_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / CURRENT_NAME
    path.write_bytes(_bad_checksum(_write(path, [(b"c:%06d" % i, b"v" * 50, 0, i + 1) for i in range(3 * APPLY_CHUNK_ENTRIES)])))
    node = _node(tmp_path)
    try:
        assert await node.snapshots.load() == 0
        node.cache.check_valid()
        assert len(node.cache) == 0 and node.cache.bytes_used == 0 and node.snapshots.max_version == 0
    finally:
        await node.snapshots.close()


async def test_duplicates_and_expired_entries_across_batches(tmp_path: Path) -> None:
    """Applied batch by batch as applied whole: a key written twice keeps its newer version, expired entries stay out."""
    now_ms = int(time.time() * 1000)
    filler = [(b"f:%06d" % i, b"v", 0, 1_000 + i) for i in range(2 * APPLY_CHUNK_ENTRIES)]  # the copies land in other batches
    early = [(b"newer-first", b"newer", 0, 500), (b"older-first", b"older", 0, 100), (b"gone", b"v", now_ms - 1, 7)]
    late = [(b"newer-first", b"older", 0, 100), (b"older-first", b"newer", 0, 500)]
    _write(tmp_path / CURRENT_NAME, early + filler + late)
    node = _node(tmp_path)
    try:
        assert await node.snapshots.load() == len(filler) + 3  # the late copy of older-first replaced the early one
        cache = node.cache
        assert len(cache) == len(filler) + 2 and cache.get_entry(b"gone") is None
        assert cache.get_entry(b"newer-first").value == b"newer"  # type: ignore[union-attr]
        assert cache.get_entry(b"older-first").value == b"newer"  # type: ignore[union-attr]
    finally:
        await node.snapshots.close()
