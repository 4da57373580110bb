"""A real aux node's memory follows ``--max-memory`` (bin/bench_memory_budget.py in small).

Each test fills a fresh node well past its budget with 16-byte keys over one
pipelined connection, in windows of 64 KB of SETs, until the content has
turned over twice and the RSS is steady, then holds the node to the
budget from both sides: the RSS above the empty process's stays within 15%
of ``--max-memory`` (the charge is not too low) and the node holds at least
70% of what the budget allows under the charging rule, the memory it uses
being at least 70% of the budget (the charge is not absurdly high).
"""

from __future__ import annotations

from typing import Any

import pytest

from dcache.lru import CPYTHON_COST
from dcache.protocol import Op, encode_request
from tests.harness import DaemonProcess, start_aux
from tests.rawconn import RawConn

pytestmark = pytest.mark.slow

MAX_MEMORY = 16_000_000
KEY_BYTES = 16
WINDOW_BYTES = 64 * 1024
TTL_MS = 3_600_000  # nothing expires during a test
MAX_ROUNDS = 8


def rss_bytes(node: DaemonProcess) -> int:
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Filler:
    """Pipelined SETs and STATS over one raw connection."""

    def __init__(self, node: DaemonProcess, value_bytes: int, ttl_ms: int) -> None:
        self.conn = RawConn(node.host, node.port, timeout=30)
        self.value = b"v" * value_bytes
        self.extra = (ttl_ms,) if ttl_ms else ()
        self.per_window = max(1, WINDOW_BYTES // (value_bytes + KEY_BYTES + 16))
        self.written = 0
        self.rid = 0

    def stats(self) -> dict[str, Any]:
        self.rid += 1
        rid, status, result = self.conn.call(Op.STATS, self.rid)
        assert (rid, status) == (self.rid, 0)
        return dict(result)

    def write(self, count: int) -> None:
        end = self.written + count
        while self.written < end:
            n = min(self.per_window, end - self.written)
            frames = []
            for i in range(self.written, self.written + n):
                self.rid += 1
                frames.append(encode_request(Op.SET, self.rid, b"k:%014d" % i, self.value, *self.extra))
            self.conn.send_raw(b"".join(frames))
            for _ in range(n):
                answer = self.conn.recv()
                assert answer[1:] == [0, True], answer
            self.written += n

    def close(self) -> None:
        self.conn.close()


def fill_to_steady_state(node: DaemonProcess, value_bytes: int, ttl_ms: int) -> tuple[int, int, dict[str, Any]]:
    """Fill past the budget (content turned over twice), then until RSS is steady.

    Returns the empty node's RSS (after one STATS), the final RSS and STATS.
    """
    f = Filler(node, value_bytes, ttl_ms)
    try:
        st = f.stats()
        rss_empty = rss_bytes(node)
        step = max(500, MAX_MEMORY // (KEY_BYTES + value_bytes) // 16)
        while st["evictions"] < 2 * max(1, st["items"]):
            f.write(step)
            st = f.stats()
        history = [rss_bytes(node)]
        for _ in range(MAX_ROUNDS):  # steady: two rounds of half the items in a row move RSS by < 1%
            f.write(max(500, st["items"] // 2))
            st = f.stats()
            history.append(rss_bytes(node))
            if len(history) >= 3 and all(abs(history[-k] - history[-k - 1]) <= 0.01 * history[-k] for k in (1, 2)):
                break
        return rss_empty, history[-1], st
    finally:
        f.close()


@pytest.mark.parametrize(
    ("value_bytes", "ttl_ms"),
    [(16, 0), (100, 0), (10_240, 0), (16, TTL_MS)],
    ids=["16B", "100B", "10KB", "16B-ttl"],
)
def test_rss_follows_max_memory(value_bytes: int, ttl_ms: int) -> None:
    node = start_aux(None, "--max-memory", str(MAX_MEMORY))
    try:
        rss_empty, rss, st = fill_to_steady_state(node, value_bytes, ttl_ms)
    finally:
        node.kill()
    used = rss - rss_empty
    charge = CPYTHON_COST.entry_bytes(KEY_BYTES, value_bytes, expires=bool(ttl_ms))
    detail = f"RSS {rss} (empty {rss_empty}), {st['items']} items, bytes {st['bytes']}, evictions {st['evictions']}"
    assert st["evictions"] >= 2 * st["items"] > 0, detail  # evictions are counted
    assert st["bytes"] <= MAX_MEMORY, detail
    assert used <= 1.15 * MAX_MEMORY, detail
    assert used >= 0.70 * MAX_MEMORY, detail
    assert st["items"] >= 0.70 * MAX_MEMORY / charge, detail
