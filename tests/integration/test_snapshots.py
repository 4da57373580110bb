"""Snapshots of a real ``dcache aux`` process: SIGKILL, SIGTERM, corrupt files, a kill mid-write."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcache import Client
from dcache.auxnode import AuxNode
from dcache.auxnode.snapshots import CURRENT_NAME, PREV_NAME, TMP_PREFIX
from dcache.config import AuxConfig
from dcache.lru import dump, load
from tests.harness import DaemonProcess, start_aux

pytestmark = pytest.mark.slow


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll an async ``predicate`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_snapshots_after_now(c: Client, n: int = 2, timeout: float = 20.0) -> dict[str, Any]:
    """Wait for ``n`` more snapshots than have been taken so far (the last one then began after now)."""
    base = (await c.stats())["snapshots_taken"]

    async def done() -> dict[str, Any] | None:
        s = await c.stats()
        return s if s["snapshots_taken"] >= base + n else None

    stats: dict[str, Any] = await wait_until(done, timeout, f"{n} more snapshots")
    return stats


def files(d: Path) -> set[str]:
    return set(os.listdir(d))


def stop(node: DaemonProcess) -> None:
    if node.alive:
        node.kill()


async def test_sigkill_then_restart_restores_keys_values_and_ttls(tmp_path: Path):
    node = start_aux(tmp_path, "--snapshot-interval", "0.5", node_id="snap-kill")
    try:
        async with Client(node.addr) as c:
            plain = {f"plain:{i}": f"value-{i}".encode() * 3 for i in range(1500)}
            ttl = {f"ttl:{i}": b"t" * i for i in range(500)}
            await c.mset(plain)
            await c.mset(ttl, ttl=60)
            await c.mset({f"short:{i}": b"s" for i in range(200)}, ttl=0.8)
            short_set_by = time.time()
            assert await c.incr("counter", 41) == 41
            await wait_snapshots_after_now(c)
        node.kill()  # SIGKILL: no final snapshot, only the periodic ones
    finally:
        stop(node)
    assert CURRENT_NAME in files(tmp_path) and PREV_NAME in files(tmp_path)
    while time.time() < short_set_by + 0.85:  # the short TTLs must have passed before the restart loads them
        await asyncio.sleep(0.05)

    node = start_aux(tmp_path, "--snapshot-interval", "0.5", node_id="snap-kill")
    try:
        async with Client(node.addr) as c:
            stats = await c.stats()
            assert stats["snapshot_loaded_keys"] == len(plain) + len(ttl) + 1
            assert stats["snapshots_rejected"] == 0
            assert 0 <= stats["snapshot_age_s"] < 30
            assert await c.mget(list(plain)) == list(plain.values())
            assert await c.mget(list(ttl)) == list(ttl.values())
            assert await c.get("counter") == b"41"
            assert await c.incr("counter") == 42
            assert await c.mget([f"short:{i}" for i in range(200)]) == [None] * 200
            assert await c.ttl("plain:7") == -1.0
            remaining = await c.ttl("ttl:7")
            assert remaining is not None and 40 < remaining <= 60
    finally:
        stop(node)


async def test_sigterm_writes_a_final_snapshot(tmp_path: Path):
    # Interval 0: no periodic snapshots, so whatever is on disk after SIGTERM is the final one.
    node = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-term")
    try:
        async with Client(node.addr) as c:
            await c.mset({f"k:{i}": b"v%d" % i for i in range(1000)})
            await c.set("last-write", b"right before SIGTERM")
            assert (await c.stats())["snapshots_taken"] == 0
        assert CURRENT_NAME not in files(tmp_path)
        assert node.terminate() == 0
    finally:
        stop(node)
    assert CURRENT_NAME in files(tmp_path)
    assert not any(n.startswith(TMP_PREFIX) for n in files(tmp_path))

    node = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-term")
    try:
        async with Client(node.addr) as c:
            assert await c.get("last-write") == b"right before SIGTERM"
            assert await c.get("k:999") == b"v999"
            assert (await c.stats())["snapshot_loaded_keys"] == 1001
    finally:
        stop(node)


async def test_corrupt_current_falls_back_to_the_previous_generation(tmp_path: Path):
    args = ("--snapshot-interval", "0")
    node = start_aux(tmp_path, *args, node_id="snap-corrupt")  # run 1: A, final snapshot = A
    try:
        async with Client(node.addr) as c:
            await c.mset({f"a:{i}": b"A" for i in range(300)})
        assert node.terminate() == 0
        node = start_aux(tmp_path, *args, node_id="snap-corrupt")  # run 2: + B, final = A+B, prev = A
        async with Client(node.addr) as c:
            assert (await c.stats())["snapshot_loaded_keys"] == 300
            await c.mset({f"b:{i}": b"B" for i in range(200)})
        assert node.terminate() == 0
    finally:
        stop(node)
    current = tmp_path / CURRENT_NAME
    data = bytearray(current.read_bytes())
    data[len(data) // 2] ^= 0x40
    current.write_bytes(bytes(data))

    node = start_aux(tmp_path, *args, node_id="snap-corrupt")  # run 3: current rejected, prev (A) loaded
    try:
        async with Client(node.addr) as c:
            stats = await c.stats()
            assert stats["snapshots_rejected"] == 1
            assert stats["snapshot_loaded_keys"] == 300
            assert await c.get("a:0") == b"A" and await c.get("b:0") is None
        names = files(tmp_path)
        assert CURRENT_NAME not in names and PREV_NAME in names
        aside = [n for n in names if n.startswith("snapshot.corrupt.") and n.endswith(".msgpack")]
        assert len(aside) == 1, names
        assert (tmp_path / aside[0]).read_bytes() == bytes(data)
        assert node.terminate() == 0  # and the node keeps snapshotting normally
        assert "rejected" in node.stderr() and aside[0] in node.stderr()
    finally:
        stop(node)
    with open(current, "rb") as f:
        assert len(load(f, now_ms=0).entries) == 300


async def test_both_generations_bad_starts_empty(tmp_path: Path):
    (tmp_path / CURRENT_NAME).write_bytes(b"DCSNAP\x00\x01garbage")
    (tmp_path / PREV_NAME).write_bytes(b"not a snapshot at all")
    (tmp_path / f"{TMP_PREFIX}12345").write_bytes(b"half-written")
    node = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-empty")
    try:
        async with Client(node.addr) as c:
            stats = await c.stats()
            assert stats["snapshots_rejected"] == 2 and stats["snapshot_loaded_keys"] == 0 and stats["items"] == 0
            assert stats["snapshot_age_s"] == -1
            await c.set("k", b"v")
        names = files(tmp_path)
        assert any(n.startswith("snapshot.corrupt.") for n in names)
        assert any(n.startswith("snapshot.prev.corrupt.") for n in names)
        assert not any(n.startswith(TMP_PREFIX) for n in names)
        assert node.terminate() == 0
    finally:
        stop(node)
    assert CURRENT_NAME in files(tmp_path)


async def test_sigkill_during_a_large_snapshot_keeps_the_last_complete_one(tmp_path: Path):
    n_keys, value = 300_000, b"x" * 1024
    args = ("--snapshot-interval", "0.3", "--max-memory", "1GB")
    node = start_aux(tmp_path, *args, node_id="snap-big")
    try:
        async with Client(node.addr, timeout=30) as c:
            batch = 2000
            for start in range(0, n_keys, batch):
                await c.mset({f"big:{i}": value for i in range(start, start + batch)})
            stats = await wait_snapshots_after_now(c, 2, timeout=40)
            assert stats["items"] == n_keys

        deadline = time.monotonic() + 20
        while not any(n.startswith(TMP_PREFIX) for n in os.listdir(tmp_path)):
            assert time.monotonic() < deadline, "never saw a snapshot being written"
            time.sleep(0.002)  # tight poll of the file system, bounded by the deadline above
        node.kill()
    finally:
        stop(node)
    assert any(n.startswith(TMP_PREFIX) for n in files(tmp_path))

    node = start_aux(tmp_path, *args, node_id="snap-big")
    try:
        async with Client(node.addr) as c:
            stats = await c.stats()
            assert stats["snapshot_loaded_keys"] == n_keys
            assert stats["snapshots_rejected"] == 0
            assert await c.mget([f"big:{i}" for i in (0, 1, n_keys // 2, n_keys - 1)]) == [value] * 4
        assert not any(n.startswith(TMP_PREFIX) for n in files(tmp_path) if n != f"{TMP_PREFIX}{node.proc.pid}")  # type: ignore[union-attr]
    finally:
        stop(node)


#: ``-c`` code for ``DaemonProcess``: run the CLI, SIGKILLed at the ``KILL_AT_STEP``-th rename or hard link of a
#: file in the folder ``IN_DIR`` (the audit hook runs in the thread that renames, just before the call), or
#: with ``NO_HARD_LINKS`` set, every hard link there failing with EPERM as on a file system without them.
_FS_HOOK = """
import errno, os, signal, sys
nth, folder, no_links, seen = int(os.environ.get("KILL_AT_STEP", 0)), os.environ["IN_DIR"], "NO_HARD_LINKS" in os.environ, [0]
def hook(event, args):
    if event in ("os.rename", "os.link") and str(args[0]).startswith(folder):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        if no_links and event == "os.link":
            raise OSError(errno.EPERM, "Operation not permitted", args[1])
sys.addaudithook(hook)
from dcache.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("step", [1, 2, 3])
async def test_a_kill_at_any_step_of_the_rotation_leaves_the_newest_snapshot_current(tmp_path: Path, step: int):
    """Rotating current to prev, then the new file to current, left no current between the two renames:
    a kill there restarted from prev, one generation back, and deleted the complete new one as a leftover."""
    args = ["--snapshot-interval", "0", "--node-id", "snap-steps", "--data-dir", str(tmp_path)]
    node = start_aux(None, *args)
    try:
        async with Client(node.addr) as c:
            await c.set("gen", b"1")
        assert node.terminate() == 0
        env = {"KILL_AT_STEP": str(step), "IN_DIR": str(tmp_path)}
        node = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", *args], env=env, python=("-c", _FS_HOOK)).start()
        async with Client(node.addr) as c:
            await c.set("gen", b"2")
        code = node.terminate()  # the final snapshot: killed at one of its renames or links, or done
    finally:
        stop(node)
    assert code in (0, -signal.SIGKILL), node.stderr()
    assert CURRENT_NAME in files(tmp_path), files(tmp_path)
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        [(_, on_disk, _, _)] = load(f, now_ms=0).entries
    assert on_disk in (b"1", b"2") and (code != 0 or on_disk == b"2")

    node = start_aux(None, *args, "--log-level", "info")
    try:
        async with Client(node.addr) as c:
            assert await c.get("gen") == on_disk
            assert (await c.stats())["snapshots_rejected"] == 0
    finally:
        stop(node)
    assert any(f"from {tmp_path / CURRENT_NAME} " in line for line in node.stderr_lines), node.stderr()


async def test_without_hard_links_the_rotation_still_keeps_two_generations(tmp_path: Path):
    args = ["--host", "127.0.0.1", "--port", "0", "--snapshot-interval", "0", "--node-id", "snap-nolinks", "--data-dir", str(tmp_path)]
    env = {"IN_DIR": str(tmp_path), "NO_HARD_LINKS": "1"}
    for gen in (b"1", b"2"):
        node = DaemonProcess("aux", args, env=env, python=("-c", _FS_HOOK)).start()
        try:
            async with Client(node.addr) as c:
                await c.set("gen", gen)
            assert node.terminate() == 0, node.stderr()
        finally:
            stop(node)
    for name, gen in ((CURRENT_NAME, b"2"), (PREV_NAME, b"1")):
        with open(tmp_path / name, "rb") as f:
            assert [e[1] for e in load(f, now_ms=0).entries] == [gen]
    assert files(tmp_path) == {CURRENT_NAME, PREV_NAME, "lock"}


# -- in-process: the parts a client cannot see ---------------------------------------


async def test_loaded_versions_move_the_clock_forward(tmp_path: Path):
    """A version a little ahead (within --max-clock-skew) moves the clock; one far ahead is skipped and counted."""
    now_ms = int(time.time() * 1000)
    ahead = (now_ms + 3_000) << 22
    far_future_version = (now_ms + 3_600_000) << 22
    with open(tmp_path / CURRENT_NAME, "wb") as f:
        dump([(b"k", b"v", 0, ahead), (b"far", b"v", 0, far_future_version)], f, node_id="other", ring_epoch=3, created_ms=1)
    node = AuxNode(AuxConfig(port=0, data_dir=str(tmp_path), snapshot_interval=0, max_clock_skew=5), node_id="clock")
    assert await node.snapshots.load() == 1
    assert ahead < node.clock.next() < far_future_version
    assert node.cache.get_entry(b"k").version == ahead  # type: ignore[union-attr]
    assert node.cache.get_entry(b"far") is None
    assert node.snapshots.stats()["snapshot_versions_refused"] == 1
    await node.snapshots.close()


async def test_without_a_data_dir_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    node = AuxNode(AuxConfig(port=0, snapshot_interval=0.01), node_id="mem")
    await node.start()
    node.cache.set(b"k", b"v")
    assert await node.snapshots.snapshot() is False
    await node.close()
    assert os.listdir(tmp_path) == []
    assert node.stats()["snapshots_taken"] == 0 and node.stats()["snapshot_age_s"] == -1


async def test_snapshots_while_the_cache_changes_stay_consistent(tmp_path: Path):
    node = AuxNode(AuxConfig(port=0, data_dir=str(tmp_path), snapshot_interval=0), node_id="busy")
    cache = node.cache
    for i in range(30_000):
        cache.set(b"k%d" % i, b"v%d" % i, version=i + 1)
    stop_writes = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop_writes.is_set():
            cache.delete(b"k%d" % (i % 30_000))
            cache.set(b"new%d" % i, b"n")
            cache.set(b"k%d" % ((i + 7) % 30_000), b"w%d" % i, version=10**6 + i)
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    try:
        assert await node.snapshots.snapshot() is True
    finally:
        stop_writes.set()
        await task
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        entries = load(f, now_ms=0).entries
    keys = [e[0] for e in entries]
    assert len(keys) == len(set(keys))
    for key, val, _, version in entries:  # each entry is one consistent state of its key
        if key.startswith(b"new"):
            assert val == b"n"
        else:
            assert (val == b"v" + key[1:] and version == int(key[1:]) + 1) or (version >= 10**6 and val == b"w%d" % (version - 10**6))
    await node.snapshots.close()


async def test_sighup_without_tls_keeps_serving_and_loses_nothing(tmp_path: Path):
    """SIGHUP (a reload habit, a closed terminal) once killed a node without TLS on the spot: no final snapshot."""
    node = start_aux(tmp_path, "--snapshot-interval", "0", "--log-level", "info", node_id="snap-hup")
    try:
        async with Client(node.addr) as c:
            await c.set("before-hup", b"kept")
            node.signal(signal.SIGHUP)
            await wait_until(lambda: asyncio.sleep(0, any("SIGHUP" in line for line in node.stderr_lines)), 10.0, "the SIGHUP log line")
            assert node.alive, node.stderr()
            assert await c.get("before-hup") == b"kept"
        assert node.terminate() == 0
    finally:
        stop(node)
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        assert [e[0] for e in load(f, now_ms=time.time_ns() // 1_000_000).entries] == [b"before-hup"]


async def test_a_snapshot_that_cannot_be_written_is_one_line_and_the_last_one_stays(tmp_path: Path):
    """A full or failing disk is an operating condition, not a bug: one ERROR line a try, no traceback."""
    node = start_aux(tmp_path, "--snapshot-interval", "0.2", node_id="snap-fail")
    try:
        async with Client(node.addr) as c:
            await c.set("k", b"on disk")
            await wait_snapshots_after_now(c, 1)
            assert node.proc is not None
            (tmp_path / f"{TMP_PREFIX}{node.proc.pid}").mkdir()  # the temp file cannot be created: an OSError
            base = (await c.stats())["snapshot_failures"]

            async def failed_twice() -> bool:
                return bool((await c.stats())["snapshot_failures"] >= base + 2)

            await wait_until(failed_twice, 20.0, "two failed snapshots")
            assert await c.get("k") == b"on disk"
    finally:
        stop(node)
    failures = [line for line in node.stderr_lines if "snapshot to" in line and "failed" in line]
    assert failures and all("Is a directory" in line for line in failures), node.stderr()
    assert "Traceback" not in node.stderr()
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        assert [e[0] for e in load(f, now_ms=time.time_ns() // 1_000_000).entries] == [b"k"]


def _file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps the files the child writes at ``limit`` bytes: a write past it fails with EFBIG,
    as a full disk fails with ENOSPC, with no disk to fill (CPython ignores SIGXFSZ, so the call fails)."""

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


async def test_a_full_disk_keeps_the_last_snapshot_and_a_failed_final_one_exits_1(tmp_path: Path):
    """Writes that outgrow the disk cost no snapshot on disk and no service; the next snapshot that fits is taken;
    a stop whose final snapshot fails says what it lost and exits 1 (it exited 0, as if everything were kept)."""
    args = ["--host", "127.0.0.1", "--port", "0", "--snapshot-interval", "0.2", "--node-id", "snap-full", "--data-dir", str(tmp_path)]
    node = DaemonProcess("aux", args, preexec_fn=_file_size_limit(64 * 1024)).start()
    big = {f"big:{i}": b"b" * 1000 for i in range(100)}  # 100 KB: a snapshot of them does not fit
    try:
        async with Client(node.addr) as c:
            await c.set("small", b"kept")
            await wait_snapshots_after_now(c, 1)
            await c.mset(big)
            base = (await c.stats())["snapshot_failures"]

            async def failed(n: int) -> bool:
                return bool((await c.stats())["snapshot_failures"] >= base + n)

            await wait_until(lambda: failed(2), 20.0, "two failed snapshots")
            assert await c.mget(list(big)) == list(big.values())  # still serving
            for key in big:
                await c.delete(key)
            await wait_snapshots_after_now(c, 1)  # room again: snapshots resume
            await c.mset(big)
            await wait_until(lambda: failed(3), 20.0, "a third failed snapshot")
        assert node.terminate() == 1, node.stderr()
    finally:
        stop(node)
    failures = [line for line in node.stderr_lines if "failed" in line]
    assert failures and all("ERROR" in line and "File too large" in line for line in failures), node.stderr()
    assert "Traceback" not in node.stderr()
    assert all("the last snapshot on disk" in line and "stays" in line for line in failures[:-1]), failures
    assert "final snapshot" in failures[-1] and "the writes since" in failures[-1] and "are lost" in failures[-1], failures[-1]
    with open(tmp_path / CURRENT_NAME, "rb") as f:
        assert [e[0] for e in load(f, now_ms=time.time_ns() // 1_000_000).entries] == [b"small"]


async def test_a_final_snapshot_with_none_on_disk_says_every_key_is_lost(tmp_path: Path):
    data_dir = tmp_path / "data"
    node = start_aux(data_dir, "--snapshot-interval", "0.2", node_id="snap-gone")
    try:
        async with Client(node.addr) as c:
            await c.set("k", b"v")
            await wait_snapshots_after_now(c, 1)
            shutil.rmtree(data_dir)  # the folder went away: nothing is on disk any more
            base = (await c.stats())["snapshot_failures"]
            await wait_until(lambda: asyncio.sleep(0, len(node.stderr_lines) and "failed" in node.stderr_lines[-1]), 20.0, "a failure")
            assert (await c.stats())["snapshot_failures"] > base
        assert node.terminate() == 1, node.stderr()
    finally:
        stop(node)
    failures = [line for line in node.stderr_lines if "failed" in line]
    assert all("no snapshot is on disk" in line for line in failures), failures
    assert "final snapshot" in failures[-1] and "every key" in failures[-1], failures[-1]


def test_a_snapshot_that_cannot_be_read_stops_the_start_and_stays(tmp_path: Path):
    """Starting without it would rotate it to prev at the next snapshot and delete it at the one after.

    A directory in its place stands for every file that exists but cannot be
    read (permissions, an I/O error); the tests run as root, which reads any file.
    """
    unreadable = tmp_path / CURRENT_NAME
    unreadable.mkdir()
    with open(tmp_path / PREV_NAME, "wb") as f:
        dump([(b"older", b"v", 0, 1)], f, node_id="snap-unreadable", ring_epoch=0, created_ms=0)
    r = subprocess.run(
        [sys.executable, "-m", "dcache", "aux", "--port", "0", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "READY" not in r.stdout, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert str(unreadable) in line and "cannot read" in line, line
    assert unreadable.is_dir() and (tmp_path / PREV_NAME).is_file()


async def test_a_snapshot_larger_than_max_memory_says_what_it_evicted(tmp_path: Path):
    """Loaded into a smaller --max-memory, the oldest entries are evicted: counted and logged, never 'loaded'."""
    n = 2000
    with open(tmp_path / CURRENT_NAME, "wb") as f:
        dump([(b"k:%05d" % i, b"v" * 100, 0, i + 1) for i in range(n)], f, node_id="snap-small", ring_epoch=0, created_ms=0)
    node = start_aux(tmp_path, "--snapshot-interval", "0", "--max-memory", "100KiB", "--log-level", "info", node_id="snap-small")
    try:
        async with Client(node.addr) as c:
            stats = await c.stats()
            assert 0 < stats["items"] < n
            assert stats["snapshot_loaded_keys"] == stats["items"]
            assert stats["evictions"] == n - stats["items"]
            assert await c.get(f"k:{n - 1:05d}") == b"v" * 100  # the last entries are the most recent
    finally:
        stop(node)
    [warning] = [line for line in node.stderr_lines if "evicted" in line]
    assert "WARNING" in warning and f"{n - stats['items']} " in warning and "--max-memory" in warning, warning


async def test_a_snapshot_written_by_another_node_is_loaded_with_a_warning(tmp_path: Path):
    """A file copied from another node's folder (or a dump) was loaded with an INFO line: its keys and epoch taken as ours."""
    with open(tmp_path / CURRENT_NAME, "wb") as f:
        dump([(b"theirs", b"v", 0, 1)], f, node_id="snap-other", ring_epoch=7, created_ms=0)
    node = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-mine")
    try:
        async with Client(node.addr) as c:
            assert await c.get("theirs") == b"v"
    finally:
        stop(node)
    [warning] = [line for line in node.stderr_lines if "WARNING" in line]
    assert "snap-other" in warning and "snap-mine" in warning and str(tmp_path / CURRENT_NAME) in warning, warning


def _ignores_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP now (the SigIgn mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    [mask] = [line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")]
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def test_sighup_while_a_large_snapshot_loads_does_not_stop_the_node(tmp_path: Path):
    with open(tmp_path / CURRENT_NAME, "wb") as f:
        dump([(b"k:%07d" % i, b"v", 0, i + 1) for i in range(300_000)], f, node_id="snap-hup-start", ring_epoch=0, created_ms=0)
    args = ["--port", "0", "--data-dir", str(tmp_path), "--node-id", "snap-hup-start", "--max-memory", "1GiB"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dcache", "aux", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 20
        while not _ignores_sighup(proc.pid):  # from the moment the CLI has its settings
            assert proc.poll() is None, "exited while starting"
            assert time.monotonic() < deadline, "SIGHUP is not ignored while the node starts"
            time.sleep(0.005)
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"READY "), "stopped by SIGHUP while starting"
        proc.send_signal(signal.SIGHUP)  # and once serving
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_data_dir_in_use_by_another_node_is_refused(tmp_path: Path):
    """Two nodes on one folder overwrote each other's snapshots: after a restart one loaded the other's keys."""
    first = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-owner")
    try:
        assert first.proc is not None
        cmd = [sys.executable, "-m", "dcache", "aux", "--port", "0", "--data-dir", str(tmp_path), "--node-id", "snap-intruder"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "READY" not in r.stdout, r.stderr
        [line] = r.stderr.strip().splitlines()
        assert str(tmp_path) in line and "in use by another aux node" in line and f"pid {first.proc.pid}" in line, line
        assert first.terminate() == 0
    finally:
        stop(first)
    again = start_aux(tmp_path, "--snapshot-interval", "0", node_id="snap-owner")  # the lock went with its process
    stop(again)
