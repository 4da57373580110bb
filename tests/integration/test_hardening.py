"""Hardening, issue 13: versions from outside and writes a master acknowledges.

Reproductions over raw connections to real daemons (``tests.wire.call``: one
frame out, one answer in). Findings:

1. One version poisons a node: a version the hybrid clock cannot follow
   (``2**64 - 1``) taken by APPLY, SETV, ... or loaded from a snapshot makes
   every later write of that node fail. Such versions are refused with
   status 14 (CLOCK_SKEW) and nothing of the request is applied; a valid
   version a little ahead moves the receiver's clock (the receive rule).
2. A write through a master was acknowledged while an owner kept a newer
   version: after an OK the new value (or the delete) must be what is read,
   on every owner; status 15 (SUPERSEDED) is an honest answer, a silent OK
   is the bug.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dcache.auxnode.snapshots import CURRENT_NAME, PREV_NAME
from dcache.hlc import version_wall_ms
from dcache.lru.snapshot import dump, load
from dcache.protocol import Op
from tests.cluster import Cluster
from tests.harness import DaemonProcess, start_aux, wait_for
from tests.rawconn import RawConn
from tests.wire import call, read_frame, split_addr, wait_connected

pytestmark = pytest.mark.slow

OK = 0
CLOCK_SKEW = 14  # new status (target): a version too far ahead of the receiver's clock
SUPERSEDED = 15  # new status (target): a write through a master that an owner's newer version beat

#: The version of finding 1: packable, but the clock cannot issue anything after it.
MAX_VERSION = 2**64 - 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def version_at(ms: int, counter: int = 0, tag: int = 1) -> int:
    """A version as ``dcache.hlc`` lays it out: ``(wall_ms << 22) | (counter << 10) | tag``."""
    return (ms << 22) | (counter << 10) | tag


def ahead(seconds: float) -> int:
    """A valid version ``seconds`` ahead of now: within the default skew bound (5 s) when small."""
    return version_at(now_ms() + int(seconds * 1000))


def assert_sane(version: int, what: str) -> None:
    """A version a healthy clock issues now: its wall time within a minute of ours."""
    assert isinstance(version, int) and 0 < version < 2**64, f"{what}: version {version!r}"
    drift_s = (version_wall_ms(version) - now_ms()) / 1000
    assert abs(drift_s) < 60, f"{what}: version {version} is {drift_s:.0f} s away from now"


# -- finding 1: versions the clock cannot follow ------------------------------------------


def test_master_refuses_an_unfollowable_version_and_keeps_working(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1")
        a = cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        assert call(m.addr, Op.SET, 1, b"k", b"before") == (1, OK, True)

        poison = call(m.addr, Op.APPLY, 2, [[b"x", b"y", 0, MAX_VERSION]])
        # Today the master takes it, its clock jumps to the end of time and every
        # write after it fails ("Integer value out of range", INTERNAL OverflowError).
        after = call(m.addr, Op.SET, 3, b"k", b"after")
        assert after == (3, OK, True), f"SET after an APPLY of version 2**64-1 (answered {poison}): {after}"
        assert call(m.addr, Op.GET, 4, b"k") == (4, OK, b"after")
        assert call(m.addr, Op.DELETE, 5, b"k") == (5, OK, True)
        assert call(m.addr, Op.MSET, 6, [[b"m1", b"1"], [b"m2", b"2"]]) == (6, OK, 2)
        assert call(m.addr, Op.INCR, 7, b"n") == (7, OK, 1)
        for key in (b"m1", b"n"):
            _, status, entry = call(a.addr, Op.GETV, 8, key)
            assert status == OK and entry is not None, (key, status, entry)
            assert_sane(entry[2], f"version of {key!r} written after the poison")

        assert poison[1] == CLOCK_SKEW, f"APPLY of version 2**64-1 through a master answered {poison}"
        assert call(m.addr, Op.GET, 9, b"x") == (9, OK, None)  # nothing of it applied
        # A valid entry in the same request is not applied either.
        mixed = call(m.addr, Op.APPLY, 10, [[b"fine", b"1", 0, ahead(0)], [b"x", b"y", 0, MAX_VERSION]])
        assert mixed[1] == CLOCK_SKEW, mixed
        assert call(m.addr, Op.GET, 11, b"fine") == (11, OK, None)

        # Receive rule: a valid version a little ahead moves the master's clock past it.
        v = ahead(2)
        assert call(m.addr, Op.APPLY, 12, [[b"r", b"restored", 0, v]]) == (12, OK, 1)
        assert call(m.addr, Op.SET, 13, b"r", b"newer") == (13, OK, True)
        _, status, entry = call(a.addr, Op.GETV, 14, b"r")
        assert status == OK and entry is not None and entry[0] == b"newer", entry
        assert entry[2] > v, f"the master's next SET carries version {entry[2]}, not above the {v} it applied"
    finally:
        cl.stop()


def test_aux_refuses_unfollowable_versions_and_applies_the_receive_rule(tmp_path: Path) -> None:
    aux = start_aux(None, node_id="skew")
    try:
        addr = aux.addr
        assert call(addr, Op.SET, 1, b"k", b"old") == (1, OK, True)
        assert call(addr, Op.SET, 2, b"n", b"5") == (2, OK, True)
        refused = {
            "SETV": call(addr, Op.SETV, 3, b"k", b"new", 0, 0, MAX_VERSION),
            "DELV": call(addr, Op.DELV, 4, b"k", MAX_VERSION),
            "INCRV": call(addr, Op.INCRV, 5, b"n", 1, MAX_VERSION),
            "APPLY": call(addr, Op.APPLY, 6, [[b"ok", b"1", 0, ahead(0)], [b"x", b"y", 0, MAX_VERSION]]),
            "APPLY_DELETES": call(addr, Op.APPLY_DELETES, 7, [[b"k", MAX_VERSION]]),
        }
        # Today every one of them is applied (status 0); a tombstone at 2**64-1
        # would shadow the key forever.
        assert {op: r[1] for op, r in refused.items()} == dict.fromkeys(refused, CLOCK_SKEW), refused
        # Nothing of a refused request was applied.
        assert call(addr, Op.GET, 8, b"k") == (8, OK, b"old")
        assert call(addr, Op.GET, 9, b"n") == (9, OK, b"5")
        assert call(addr, Op.MGET, 10, [b"ok", b"x"]) == (10, OK, [None, None])
        # The node keeps working with sane versions.
        assert call(addr, Op.SET, 11, b"k", b"later") == (11, OK, True)
        _, status, entry = call(addr, Op.GETV, 12, b"k")
        assert status == OK and entry[0] == b"later", entry
        assert_sane(entry[2], "a direct SET after the refusals")
        _, status, stats = call(addr, Op.STATS, 13)
        assert status == OK and stats.get("versions_refused", 0) >= len(refused), stats

        # Receive rule: after SETV with a version 2 s ahead, a direct SET is newer still.
        v = ahead(2)
        assert call(addr, Op.SETV, 14, b"r", b"replicated", 0, 0, v) == (14, OK, 1)
        assert call(addr, Op.SET, 15, b"r", b"local") == (15, OK, True)
        _, status, entry = call(addr, Op.GETV, 16, b"r")
        assert status == OK and entry[0] == b"local", entry
        assert entry[2] > v, f"a SET after SETV at {v} got version {entry[2]}: the aux clock did not observe it"
    finally:
        aux.kill()


def test_a_snapshot_with_far_future_versions_does_not_poison_the_node(tmp_path: Path) -> None:
    good_version = ahead(-60)
    entries = [
        (b"good", b"kept", 0, good_version),
        (b"poison:max", b"p", 0, MAX_VERSION),
        (b"poison:2100", b"p", 0, version_at(now_ms() + 75 * 365 * 86_400_000)),
    ]
    with open(tmp_path / CURRENT_NAME, "wb") as f:
        dump(entries, f, node_id="snap", ring_epoch=0, created_ms=now_ms() - 60_000)
    aux = start_aux(tmp_path, "--snapshot-interval", "0.2", node_id="snap")
    try:
        addr = aux.addr
        # Today the node loads them, its clock jumps past 2**64 and every new
        # version can no longer be packed (GETV answers INTERNAL, snapshots fail).
        assert call(addr, Op.GET, 1, b"good") == (1, OK, b"kept")
        assert call(addr, Op.SET, 2, b"fresh", b"v") == (2, OK, True)
        rid, status, entry = call(addr, Op.GETV, 3, b"fresh")
        assert status == OK and entry is not None, (rid, status, entry)
        assert_sane(entry[2], "a write after loading the snapshot")
        assert call(addr, Op.MGET, 4, [b"poison:max", b"poison:2100"]) == (4, OK, [None, None])

        _, _, stats = call(addr, Op.STATS, 5)
        base = stats["snapshots_taken"]

        def two_more_snapshots() -> bool:
            s = call(addr, Op.STATS, 6)[2]
            assert s["snapshot_failures"] == 0, s
            return bool(s["snapshots_taken"] >= base + 2)

        wait_for(two_more_snapshots, timeout=15, message="two snapshots after the write")
        with open(tmp_path / CURRENT_NAME, "rb") as snap:
            written = {e[0]: e for e in load(snap, now_ms=now_ms()).entries}
        assert set(written) == {b"good", b"fresh"}, sorted(written)
        assert written[b"good"][3] == good_version
        assert_sane(written[b"fresh"][3], "the new write in the next snapshot")
    finally:
        aux.kill()


# -- finding 2: writes acknowledged but not stored ----------------------------------------


def check_write(
    master: str, owners: dict[str, DaemonProcess], key: bytes, answer: tuple[object, int, object], expected: bytes | None
) -> None:
    """After an OK, every read (through the master, on each owner) sees ``expected``; 15 is an honest answer."""
    _, status, _ = answer
    if status == SUPERSEDED:
        return
    assert status == OK, f"write of {key!r}: {answer}"
    got = call(master, Op.GET, 90, key)
    assert got == (90, OK, expected), f"write of {key!r} answered {answer} but GET through the master gives {got}"
    for name, aux in owners.items():
        _, status, entry = call(aux.addr, Op.GETV, 91, key)
        value = None if entry is None else entry[0]
        assert status == OK and value == expected, f"write of {key!r} answered {answer} but owner {name} holds {entry}"


def test_master_write_beaten_by_a_newer_owner_version_is_not_acknowledged_one_replica(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, replicas=1)
    try:
        m = cl.start_master("m1")
        a = cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        v = ahead(2)  # e.g. a master whose clock runs 2 s ahead wrote these
        for key in (b"set", b"del", b"mset"):
            assert call(a.addr, Op.SETV, 1, key, b"old", 0, 0, v) == (1, OK, 1)
        owners = {"a1": a}
        # Today each answers OK while the aux kept "old" (its SETV/DELV/APPLY said superseded).
        check_write(m.addr, owners, b"set", call(m.addr, Op.SET, 2, b"set", b"new"), b"new")
        check_write(m.addr, owners, b"del", call(m.addr, Op.DELETE, 3, b"del"), None)
        check_write(m.addr, owners, b"mset", call(m.addr, Op.MSET, 4, [[b"mset", b"new"]]), b"new")
    finally:
        cl.stop()


def test_master_write_beaten_by_a_newer_owner_version_is_not_acknowledged_two_replicas(tmp_path: Path) -> None:
    cl = Cluster(tmp_path, replicas=2)
    try:
        m1 = cl.start_master("m1")
        m2 = cl.start_master("m2", follow=m1)
        a1 = cl.start_aux("a1")
        a2 = cl.start_aux("a2")
        wait_connected(m1.addr, {"a1", "a2"})
        wait_connected(m2.addr, {"a1", "a2"})
        owners = {"a1": a1, "a2": a2}  # two aux nodes, two replicas: both own every key
        v = ahead(2)
        # The newer version on a1 only, on a2 only (so on the key's first owner for one
        # of the two keys and on its second owner for the other), on both.
        assert call(a1.addr, Op.SETV, 1, b"on-a1", b"old", 0, 0, v) == (1, OK, 1)
        assert call(a2.addr, Op.SETV, 2, b"on-a2", b"old", 0, 0, v) == (2, OK, 1)
        for key in (b"on-both", b"del-both", b"del-a2"):
            for aux in [a1, a2] if key != b"del-a2" else [a2]:
                assert call(aux.addr, Op.SETV, 3, key, b"old", 0, 0, v) == (3, OK, 1)
        # A restore through the other master: m2 applies a version ahead of m1's clock.
        assert call(m2.addr, Op.APPLY, 4, [[b"restored", b"old", 0, v]]) == (4, OK, 1)

        for key in (b"on-a1", b"on-a2", b"on-both", b"restored"):
            check_write(m1.addr, owners, key, call(m1.addr, Op.SET, 5, key, b"new"), b"new")
        for key in (b"del-both", b"del-a2"):
            check_write(m1.addr, owners, key, call(m1.addr, Op.DELETE, 6, key), None)
    finally:
        cl.stop()


# -- finding 9: request ids, private files -----------------------------------------------

BAD_ARGUMENTS = 3
BAD_REQUEST_IDS: list[Any] = [1.5, "abc", b"x" * 1_000_000, -1, 0, None, True, [1]]


@pytest.mark.parametrize("role", ["aux", "master"])
def test_a_request_id_that_is_not_an_unsigned_integer_is_not_echoed(role: str) -> None:
    node = DaemonProcess(role, ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]).start()
    try:
        conn = RawConn(*split_addr(node.addr), timeout=5)
        try:
            for rid in BAD_REQUEST_IDS:
                conn.send(Op.PING, rid)
                size, answer = read_frame(conn.sock)
                # Today each is echoed back as given: [1.5, 0, "PONG"], the 1 MB blob included.
                assert answer[:2] == [0, BAD_ARGUMENTS] and size < 1024, f"PING with request id {rid!r:.40}: {size} bytes, {answer!r:.80}"
                conn.send(Op.PING, 7)
                assert read_frame(conn.sock)[1] == [7, OK, "PONG"]  # the connection stays usable
            for rid in (1, 2**64 - 1):  # the bounds of the valid range are echoed
                conn.send(Op.PING, rid)
                assert read_frame(conn.sock)[1] == [rid, OK, "PONG"]
        finally:
            conn.close()
    finally:
        node.kill()


def test_snapshot_and_dump_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask: files 0644 and directories 0755 unless dcache asks otherwise
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1")
        data_dir = tmp_path / "new" / "data"  # dcache creates it
        aux = DaemonProcess(
            "aux",
            ["--port", "0", "--node-id", "a1", "--data-dir", str(data_dir), "--snapshot-interval", "0.2", "--join", m.addr],
        ).start()
        cl.aux["a1"] = aux
        wait_connected(m.addr, {"a1"})
        assert call(m.addr, Op.MSET, 1, [[b"k%d" % i, b"v"] for i in range(100)]) == (1, OK, 100)
        out = tmp_path / "cluster.dump"
        r = subprocess.run([sys.executable, "-m", "dcache", "dump", "--addr", m.addr, "--out", str(out)], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        wait_for(lambda: (data_dir / PREV_NAME).exists(), timeout=10, message="two snapshot generations")
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (out, data_dir / CURRENT_NAME, data_dir / PREV_NAME, data_dir)}
        assert modes == {"cluster.dump": "0o600", CURRENT_NAME: "0o600", PREV_NAME: "0o600", "data": "0o700"}
    finally:
        os.umask(old_umask)
        cl.stop()
