#!/usr/bin/env python3
"""Does an aux node's memory follow ``--max-memory``? Real processes, real RSS.

    PYTHONPATH=. .venv/bin/python bin/bench_memory_budget.py             # 32MB and 64MB; 16 B, 100 B, 10 KB values; TTL or not
    PYTHONPATH=. .venv/bin/python bin/bench_memory_budget.py --max-memory 32MB --values 16 --ttl no
    PYTHONPATH=. .venv/bin/python bin/bench_memory_budget.py --attribute  # in-process: bytes per entry, part by part

Run it from the checkout's root (``PYTHONPATH=.``) so that both this
process and the aux nodes it starts use the checkout's code.

For each budget, value size and TTL choice it starts a real ``python -m
dcache aux`` (memory only: no data dir, so no snapshot copies), reads the
empty process's VmRSS after one STATS, then writes 16-byte keys over one
pipelined connection (windows of SETs of ``--window`` bytes) until the node
has turned its content over ``--turnover`` times (evictions >= turnover x
items). It then keeps writing rounds of half the items held, reading VmRSS
after each, until two rounds in a row change it by less than 1% (steady
state, at most ``--max-rounds`` rounds). Printed per run: VmRSS, the empty
VmRSS, VmHWM (the peak), items held, ``bytes`` from STATS, evictions,
``ratio`` = (RSS - empty) / max_memory (the budget is honest when it is
close to 1; the target is <= 1.15), and real against charged bytes per item
(MB here are 10**6 bytes, as ``--max-memory 32MB`` means)
((RSS - empty) / items against bytes / items).

With TTLs every SET carries ``--ttl-ms`` (1 hour: nothing expires during a
run), so each entry has its own expiry int and an expiry heap item.

``--attribute`` fills an ``LRUCache`` in this process instead, the way the
node does (fresh key, value and version objects per SET, evictions under a
budget), and prints the bytes per entry of each part: the sizes
``sys.getsizeof`` reports rounded to the allocator's granularity, the shard
dicts' tables (from their ``__sizeof__``), the expiry heap, and the total
``tracemalloc`` traced (requested sizes, so without the allocator's
rounding), next to what the cache charges.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from dcache.config import parse_size
from dcache.hlc import HybridClock
from dcache.lru import LRUCache
from dcache.protocol import FrameDecoder, Op, encode_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_BYTES = 16
READY_TIMEOUT_S = 30.0


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` field in kB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class Node:
    """A ``python -m dcache aux`` child on a free loopback port."""

    def __init__(self, max_memory: int, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "dcache", "aux", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
        cmd += ["--max-memory", str(max_memory), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("READY ") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"aux did not start: {line!r}")
        host, _, port = line.split()[1].rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Writer:
    """One blocking, pipelined connection: send a window of requests, read every answer."""

    def __init__(self, host: str, port: int, window_bytes: int) -> None:
        self.window_bytes = window_bytes
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.rid = 0

    def call_many(self, frames: list[bytes]) -> list[Any]:
        self.sock.sendall(b"".join(frames))
        out: list[Any] = []
        while len(out) < len(frames):
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("aux closed the connection")
            out.extend(self.decoder.feed(data))
        for answer in out:
            if answer[1] != 0:
                raise RuntimeError(f"request failed: {answer!r}")
        return [a[2] for a in out]

    def stats(self) -> dict[str, Any]:
        self.rid += 1
        result: dict[str, Any] = self.call_many([encode_request(Op.STATS, self.rid)])[0]
        return result

    def set_many(self, first: int, count: int, value_bytes: int, ttl_ms: int) -> None:
        """SET keys ``first .. first+count-1`` in windows of about ``window_bytes``."""
        per_window = max(1, self.window_bytes // (value_bytes + KEY_BYTES + 16))
        value = b"v" * value_bytes
        extra = (ttl_ms,) if ttl_ms else ()
        i = first
        end = first + count
        while i < end:
            n = min(per_window, end - i)
            frames = []
            for j in range(i, i + n):
                self.rid += 1
                frames.append(encode_request(Op.SET, self.rid, b"k:%014d" % j, value, *extra))
            self.call_many(frames)
            i += n

    def close(self) -> None:
        self.sock.close()


def measure(max_memory: int, value_bytes: int, ttl_ms: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run: fill a fresh node past its budget and report its steady-state memory."""
    node = Node(max_memory, args.aux_arg)
    try:
        w = Writer(node.host, node.port, parse_size(args.window))
        w.stats()
        time.sleep(0.5)  # let start-up settle (imports, first gc.freeze)
        empty = rss_kb(node.pid)
        written = 0
        step = max(1000, max_memory // (KEY_BYTES + value_bytes) // 8)
        while True:  # fill until the content turned over `turnover` times
            w.set_many(written, step, value_bytes, ttl_ms)
            written += step
            st = w.stats()
            if st["evictions"] >= args.turnover * max(1, st["items"]):
                break
        rounds = 0
        history = [rss_kb(node.pid)]
        while rounds < args.max_rounds:  # steady state: two rounds in a row change RSS by < 1%
            n = max(1000, st["items"] // 2)
            w.set_many(written, n, value_bytes, ttl_ms)
            written += n
            rounds += 1
            st = w.stats()
            history.append(rss_kb(node.pid))
            if len(history) >= 3 and all(abs(history[-k] - history[-k - 1]) <= 0.01 * history[-k] for k in (1, 2)):
                break
        rss = history[-1]
        hwm = rss_kb(node.pid, "VmHWM")
        w.close()
    finally:
        node.stop()
    used = (rss - empty) * 1024
    items = max(1, st["items"])
    return {
        "max_memory": max_memory,
        "value": value_bytes,
        "ttl": bool(ttl_ms),
        "rss_mb": rss * 1024 / 1e6,
        "empty_mb": empty * 1024 / 1e6,
        "hwm_mb": hwm * 1024 / 1e6,
        "items": st["items"],
        "bytes": st["bytes"],
        "evictions": st["evictions"],
        "written": written,
        "rounds": rounds,
        "ratio": used / max_memory,
        "real_per_item": used / items,
        "charged_per_item": st["bytes"] / items,
    }


def print_row(r: dict[str, Any]) -> None:
    print(
        f"max {r['max_memory'] / 1e6:5.0f} MB  value {r['value']:6d} B  ttl {'yes' if r['ttl'] else 'no ':3}  "
        f"RSS {r['rss_mb']:7.1f} MB  empty {r['empty_mb']:5.1f}  peak {r['hwm_mb']:7.1f}  "
        f"items {r['items']:8d}  bytes {r['bytes']:10d}  evictions {r['evictions']:8d}  "
        f"ratio {r['ratio']:.2f}  real/charged per item {r['real_per_item']:7.0f} / {r['charged_per_item']:7.0f}",
        flush=True,
    )


# ---------------------------------------------------------------- in-process attribution


def _pymalloc(n: int) -> int:
    """Bytes an object of ``n`` requested bytes really takes (pymalloc classes, else glibc chunks)."""
    if n <= 512:
        return (n + 15) & ~15
    return max(32, (n + 8 + 15) & ~15)


def attribute(value_bytes: int, ttl: bool, entries: int = 100_000) -> None:
    """Fill an in-process cache with eviction churn and print bytes per entry by part."""
    key0 = b"k:%014d" % 0
    value0 = bytes(value_bytes)
    clock = HybridClock("bench")
    probe = LRUCache(1 << 40)
    probe.set(key0, value0, version=clock.next(), expires_at=int(time.time() * 1000) + 3_600_000 if ttl else 0)
    charge = probe.bytes_used
    cache = LRUCache(charge * entries)
    now = int(time.time() * 1000)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(entries * 3):  # three turnovers: dicts and heap reach their churn state
        cache.set(b"k:%014d" % i, bytes(value_bytes), expires_at=now + 3_600_000 + i if ttl else 0, version=clock.next())
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    n = len(cache)
    e = cache.get_entry(b"k:%014d" % (entries * 3 - 1))
    assert e is not None
    heap: list[Any] = cache._heap
    stale = max(0, len(heap) - cache._n_expiring)
    # a sum (now + ttl) is allocated with one digit more than getsizeof reports
    expiry_int = _pymalloc(sys.getsizeof(e.expires_at) + sys.int_info.sizeof_digit) if ttl else 0
    parts = {
        "Entry": _pymalloc(sys.getsizeof(e)),
        "key": _pymalloc(sys.getsizeof(e.key)),
        "value": _pymalloc(sys.getsizeof(e.value)),
        "version": _pymalloc(sys.getsizeof(e.version)),
        "expires_at": expiry_int,
        "dicts": sum(d.__sizeof__() for d in cache._shards) / n,
        "heap": (sys.getsizeof(heap) + len(heap) * _pymalloc(sys.getsizeof(heap[0]))) / n if heap else 0,
        "stale heap keys, ints": stale * (_pymalloc(sys.getsizeof(e.key)) + expiry_int) / n,
    }
    total = sum(parts.values())
    detail = "  ".join(f"{k} {v:.0f}" for k, v in parts.items())
    print(
        f"value {value_bytes:6d} B ttl {'yes' if ttl else 'no ':3}: {n} entries, heap {len(heap)}; per entry: {detail}; "
        f"sum {total:.0f}; tracemalloc {traced / n:.0f}; charged {cache.bytes_used / n:.0f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-memory", default="32MB,64MB", help="comma-separated budgets (default 32MB,64MB)")
    p.add_argument("--values", default="16,100,10240", help="comma-separated value sizes in bytes")
    p.add_argument("--ttl", default="no,yes", help="no, yes or no,yes")
    p.add_argument("--ttl-ms", type=int, default=3_600_000)
    p.add_argument("--window", default="64KB", help="bytes of SETs sent before reading their answers (default 64KB)")
    p.add_argument("--turnover", type=float, default=2.0, help="fill until evictions >= this x items held")
    p.add_argument("--max-rounds", type=int, default=12)
    p.add_argument("--aux-arg", action="append", default=[], help="extra argument for the aux node (repeat)")
    p.add_argument("--attribute", action="store_true", help="in-process bytes per entry by part, no aux node")
    args = p.parse_args()
    values = [int(v) for v in args.values.split(",")]
    ttls = [t.strip() == "yes" for t in args.ttl.split(",")]
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}", flush=True)
    if args.attribute:
        for v in values:
            for t in ttls:
                attribute(v, t)
        return
    for mm in (parse_size(s) for s in args.max_memory.split(",")):
        for v in values:
            for t in ttls:
                print_row(measure(mm, v, args.ttl_ms if t else 0, args))


if __name__ == "__main__":
    main()
