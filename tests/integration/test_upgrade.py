"""Rolling upgrades from the released v0.1.0: real v0.1.0 daemons (tests/releases/dcache-v0.1.0.tar.xz) beside this code's.

Each v0.1.0 process runs with the unpacked release as its working directory
and ``PYTHONPATH``, so ``python -m dcache`` imports that code, not this
tree's; ``runs_v0_1_0`` checks it over the wire (an op the release does not
know). docs/OPERATIONS.md, "Upgrading", has the procedure these tests hold.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from dcache import Client
from dcache.protocol import Op
from tests.cluster import FAST_HEALTH, key_owned_by, outlive, settled, wait_ring
from tests.harness import DaemonProcess, wait_for
from tests.rawconn import RawConn

pytestmark = pytest.mark.slow

RELEASE = "v0.1.0"
#: The commit the tag names: clones that fetch no tags still hold it.
RELEASE_COMMIT = "45b44e0e80994a4fcfcd68dca37f64e1d118c6e7"
REPO = Path(__file__).resolve().parents[2]
ARCHIVE = REPO / "tests" / "releases" / "dcache-v0.1.0.tar.xz"
#: What the archive holds of the release.
ARCHIVED = ("dcache", "docs/openapi.yaml")
#: Reads of one key that make it hot for a master's near cache (8 sampled reads, one in 4 sampled), with a margin.
HOT_READS = 200


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The v0.1.0 package, unpacked from ``tests/releases/dcache-v0.1.0.tar.xz``.

    The archive is ``git archive v0.1.0 dcache docs/openapi.yaml | xz -9e``
    (the package links its OpenAPI document from docs/), kept in the tree so
    that a clone without tags (or a shallow one) runs these tests too;
    ``test_the_vendored_release_is_the_release_commit`` checks it against
    the tag's commit wherever the clone holds that commit.
    """
    dest = tmp_path_factory.mktemp("release")
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_the_vendored_release_is_the_release_commit(release: Path) -> None:
    """The vendored archive holds exactly the release commit's ``dcache/`` files (skipped only in a shallow clone)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", RELEASE_COMMIT, *ARCHIVED], capture_output=True, text=True, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip(f"this clone lacks {RELEASE}'s commit {RELEASE_COMMIT[:12]} (shallow): the archive is all there is")
    names = listed.stdout.split()
    unpacked = [p for p in release.rglob("*") if (p.is_file() or p.is_symlink()) and "__pycache__" not in p.parts]
    assert sorted(str(p.relative_to(release)) for p in unpacked) == sorted(names)
    for name in names:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{RELEASE_COMMIT}:{name}"], capture_output=True, timeout=60, check=True)
        path = release / name
        held = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        assert held == shown.stdout, name


def daemon(role: str, args: list[str], code: Path | None) -> DaemonProcess:
    """``dcache ROLE ARGS`` running ``code`` (a release tree) or, with None, this tree."""
    if code is None:
        return DaemonProcess(role, args).start()
    return DaemonProcess(role, args, cwd=str(code), env={"PYTHONPATH": str(code)}).start()


def runs_v0_1_0(p: DaemonProcess) -> bool:
    """Whether ``p`` runs the release's code: it answers an op this tree added (GETV's ``track``, HOTKEYS) with an error."""
    conn = RawConn(p.host, p.port)
    try:
        conn.call(Op.HELLO, 1, 1)
        answer = conn.call(Op.GETV, 2, b"no-such-key", False) if p.role == "aux" else conn.call(Op.HOTKEYS, 2)
    finally:
        conn.close()
    return bool(answer[1] != 0)


def start_master(code: Path | None, *extra: str) -> DaemonProcess:
    return daemon("master", ["--host", "127.0.0.1", "--port", "0", "--node-id", "m1", "--log-level", "info", *FAST_HEALTH, *extra], code)


def start_aux(code: Path | None, data: Path, master: DaemonProcess, port: int = 0, node_id: str = "a1") -> DaemonProcess:
    args = ["--host", "127.0.0.1", "--port", str(port), "--node-id", node_id, "--log-level", "info", "--data-dir", str(data)]
    return daemon("aux", [*args, "--join", master.addr], code)


def serving(info: dict[str, Any]) -> bool:
    """Ring predicate: a1 alone is up and in the ring, and this master is connected to it."""
    return settled({"a1"})(info) and all(n["connected"] for n in info["nodes"])


async def read_hot(addr: str, key: str, value: bytes) -> None:
    """Read ``key`` until it is hot; every read must answer ``value``."""
    async with Client(addr, timeout=5.0) as c:
        for _ in range(HOT_READS):
            assert await c.get(key) == value


async def near_cache_fills(addr: str, counter: str = "near_cache_fills") -> int:
    async with Client(addr, timeout=5.0) as c:
        stats = await c.stats()
    return int(stats[counter])


async def read_until_copied(addr: str, key: str, value: bytes, timeout: float = 20.0) -> None:
    """Read ``key`` (every read must answer ``value``) until the master filled a near-cache copy, bounded.

    The first reads after a node came back may find its link not yet
    renewed (no lease): they are read from the node, as they should be.
    """
    deadline = time.monotonic() + timeout
    while True:
        await read_hot(addr, key, value)
        if await near_cache_fills(addr) >= 1:
            return
        assert time.monotonic() < deadline, f"no near-cache copy of {key!r} filled within {timeout} s"


async def test_hot_keys_of_a_v0_1_0_aux_node_are_read_without_tracking_until_it_is_upgraded(release: Path, tmp_path: Path) -> None:
    """Masters first: a hot key on an aux node that predates near-cache tracking is read (it answered BAD_ARGUMENTS to every hot read)."""
    master = start_master(None)
    old = new = None
    try:
        old = start_aux(release, tmp_path, master)
        assert runs_v0_1_0(old) and not runs_v0_1_0(master)
        await wait_ring(master.addr, serving, 20, "the v0.1.0 aux node up")
        async with Client(master.addr, timeout=5.0) as c:
            await c.set("hot", b"v1")
            await read_hot(master.addr, "hot", b"v1")
            await c.set("hot", b"v2")
            assert await c.get("hot") == b"v2"
        assert await near_cache_fills(master.addr) == 0
        wait_for(lambda: any("predates near-cache tracking" in line for line in master.stderr_lines), 5, message="the log line")
        port = old.port
        old.signal(signal.SIGINT)  # a final snapshot, no hand-over
        assert old.wait() == 0
        new = start_aux(None, tmp_path, master, port)
        assert not runs_v0_1_0(new)
        await wait_ring(master.addr, serving, 20, "the upgraded aux node up")
        await read_until_copied(master.addr, "hot", b"v2")  # its v0.1.0 snapshot, then a copy in the near cache
        assert await near_cache_fills(master.addr, "near_cache_write_throughs") == 0  # the v0.1.0 node never got KEEP_COPY
        async with Client(master.addr, timeout=5.0) as c:
            await c.set("hot", b"v3")  # the upgraded node keeps the writer's copy
            assert await c.get("hot") == b"v3"
        assert await near_cache_fills(master.addr, "near_cache_write_throughs") == 1
    finally:
        for p in (master, old, new):
            if p is not None:
                p.kill()


async def test_a_v0_1_0_aux_node_that_left_rejoins_empty(release: Path, tmp_path: Path) -> None:
    """Masters first: a 0.1.0 aux node that left and comes back with its data dir is emptied too (DROP is a 0.1.0 op; it predates BIND)."""
    master = start_master(None)
    procs = [master]
    try:
        procs.append(start_aux(None, tmp_path / "b1", master, node_id="b1"))
        old = start_aux(release, tmp_path / "a1", master)
        procs.append(old)
        assert runs_v0_1_0(old)
        await wait_ring(master.addr, settled({"a1", "b1"}), 20, "a1 (0.1.0) and b1 up")
        k = key_owned_by("a1", ["a1", "b1"], "k")
        async with Client(master.addr, timeout=5.0) as c:
            assert await c.set(k, b"v1") is True
            old.signal(signal.SIGTERM)  # a graceful leave, as 0.1.0 does it
            assert await asyncio.to_thread(old.wait, 30) == 0
            await wait_ring(master.addr, settled({"b1"}), 20, "a1 left")
            await outlive(c, k)
            back = start_aux(release, tmp_path / "a1", master)
            procs.append(back)
            await wait_ring(master.addr, settled({"a1", "b1"}), 20, "a1 (0.1.0) back")
            assert await c.get(k) is None
        assert any("left the membership before and joins again" in line for line in master.stderr_lines)
    finally:
        for p in procs:
            p.kill()


async def dcache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this tree's ``dcache`` command (bounded) off the loop."""
    cmd = [sys.executable, "-m", "dcache", *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


async def test_the_cli_names_a_v0_1_0_master_as_older_for_forget_and_hotkeys(release: Path) -> None:
    master = start_master(release)
    try:
        assert runs_v0_1_0(master)
        for args, op in ((["forget", "a9"], "FORGET"), (["hotkeys"], "HOTKEYS")):
            res = await dcache_cli(*args, "--addr", master.addr)
            assert res.returncode == 2, res
            assert f"does not know {op} (an older version): upgrade it" in res.stderr, res.stderr
    finally:
        master.kill()


def start_lone_aux(code: Path | None, data: Path) -> DaemonProcess:
    """An aux node on its own (no master), whose keys a client reads and writes directly."""
    return daemon("aux", ["--host", "127.0.0.1", "--port", "0", "--node-id", "a1", "--log-level", "info", "--data-dir", str(data)], code)


async def stop_with_snapshot(p: DaemonProcess) -> None:
    p.signal(signal.SIGINT)
    assert await asyncio.to_thread(p.wait) == 0


async def test_snapshots_load_across_v0_1_0_and_this_version_both_ways(release: Path, tmp_path: Path) -> None:
    """An upgraded aux node keeps its v0.1.0 snapshot's keys, expiries and deletes, and a downgraded one this version's."""
    keys = [f"k{i}" for i in range(100)]
    node = start_lone_aux(release, tmp_path)
    try:
        assert runs_v0_1_0(node)
        async with Client(node.addr, timeout=5.0) as c:
            await c.mset({k: k.encode() for k in keys})
            await c.set("ttl", b"t", ttl=600)
            await c.delete("k7")
        await stop_with_snapshot(node)
        expected = {k: None if k == "k7" else k.encode() for k in keys}
        for code, written in ((None, b"new"), (release, b"old")):  # upgrade, then back
            node = start_lone_aux(code, tmp_path)
            assert runs_v0_1_0(node) == (code is not None)
            async with Client(node.addr, timeout=5.0) as c:
                assert dict(zip(keys, await c.mget(keys), strict=True)) == expected
                ttl = await c.ttl("ttl")
                assert ttl is not None and 500 < ttl <= 600
                await c.set("k0", written)  # what the next process must load
                expected["k0"] = written
            await stop_with_snapshot(node)
    finally:
        node.kill()


def test_a_v0_1_0_master_reads_a_view_that_says_its_ring_is_being_reconciled(release: Path) -> None:
    """Views carry ``reconciling`` (docs/PROTOCOL.md, SYNC): a v0.1.0 follower gets such a view in a mixed cluster
    and reads the fields it knows, ignoring this one (it then reads as before the field)."""
    from dcache.master.view import ClusterView, Member

    view = ClusterView.initial([Member("a1", "127.0.0.1", 7101), Member("a2", "127.0.0.1", 7102)], 2, epoch=5).bumped(reconciling=True)
    wire = msgpack.packb(view.to_dict(), use_bin_type=True)
    parse = (
        "import sys, msgpack\n"
        "from dcache.master.view import ClusterView\n"
        "v = ClusterView.from_dict(msgpack.unpackb(sys.stdin.buffer.read(), raw=False, strict_map_key=False))\n"
        "import dcache\n"
        "print(dcache.__file__)\n"
        "print(v.epoch, v.seq, ','.join(sorted(v.members)), ','.join(sorted(v.ring.nodes)))\n"
    )
    old = subprocess.run(
        [sys.executable, "-c", parse],
        input=wire,
        capture_output=True,
        cwd=str(release),
        env={**os.environ, "PYTHONPATH": str(release)},
        timeout=60,
    )
    assert old.returncode == 0, old.stderr.decode()
    where, *parsed = old.stdout.decode().split()
    assert Path(where).is_relative_to(release)  # the release's code, not this tree's
    assert parsed == ["5", "1", "a1,a2", "a1,a2"]
