#!/usr/bin/env python3
"""Snapshot cost on an aux node: time to take one, worst event-loop stall while it runs, load time, size.

    .venv/bin/python bin/bench_snapshot.py [N]        # N keys of 100 bytes, default 1000000
    .venv/bin/python bin/bench_snapshot.py --load-rss [N] [--rounds R] [--budget SIZE ...] [--tree LABEL=DIR ...]

Fills an in-process AuxNode (a quarter of the keys with TTLs), runs a task
that ticks every 1 ms and records how late each tick is (a sleep of 1 ms
that takes longer is a stall of the loop by the difference), takes one
snapshot, then loads it into a fresh node (with the same ticker).

``--load-rss`` measures what loading costs a real ``dcache aux`` process
instead: it writes one snapshot file of N keys (100-byte values, a quarter
with TTLs, as above) and, for each round, tree and ``--max-memory`` budget
(default 16MiB and 1GiB: one that evicts most of it, one that holds it
all), starts ``python -m dcache aux`` from that tree on a fresh copy of the
file, waits for its READY line and reads the process's peak RSS (VmHWM)
and RSS (VmRSS) from /proc, the load time from its "loaded ... in X s" log
line, and the time from spawn to READY; then kills it (SIGKILL: no final
snapshot). Trees run in turn within a round, so a shared machine's drift
touches each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from dcache.auxnode import AuxNode
from dcache.config import AuxConfig, parse_size
from dcache.lru import dump

N = 1_000_000
READY_TIMEOUT_S = 600.0


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
        stop = asyncio.Event()
        lags.clear()
        tick = asyncio.create_task(ticker(stop, lags))
        t0 = time.perf_counter()
        n = await node2.snapshots.load()
        took = time.perf_counter() - t0
        stop.set()
        await tick
        lags.sort()
        print(f"load: {n} keys in {took:.2f} s; loop stall worst {lags[-1] * 1000:.1f} ms, p99 {lags[int(len(lags) * 0.99)] * 1000:.1f} ms")
        await node.snapshots.close()
        await node2.snapshots.close()
    finally:
        shutil.rmtree(d)


def write_file(path: Path, n: int) -> int:
    """Write a snapshot of ``n`` keys like the in-process bench's (a quarter with a 1 h TTL); return its size."""
    v = b"v" * 100
    now_ms = time.time_ns() // 10**6
    entries = [(b"key:%08d" % i, v, 0 if i % 4 else now_ms + 3_600_000, i + 1) for i in range(n)]
    with open(path, "wb") as f:
        return dump(entries, f, node_id="bench", ring_epoch=0, created_ms=now_ms)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


_LOADED = re.compile(r"loaded (\d+) keys from .* in ([0-9.]+)s")


def load_once(tree: Path, snapshot: Path, budget: str) -> dict[str, float]:
    """Start ``dcache aux`` from ``tree`` on a copy of ``snapshot`` with ``--max-memory budget``; its figures once READY."""
    d = Path(tempfile.mkdtemp(prefix="dcache-loadrss-"))
    try:
        shutil.copyfile(snapshot, d / "snapshot.msgpack")
        cmd = [sys.executable, "-m", "dcache", "aux", "--port", "0", "--data-dir", str(d), "--node-id", "bench"]
        cmd += ["--max-memory", budget, "--snapshot-interval", "0", "--log-level", "info"]
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
        err = open(d / "stderr", "w+b")
        t0 = time.perf_counter()
        # cwd: python -m imports the working directory's code first
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(tree))
        try:
            assert proc.stdout is not None
            line = b""
            if select.select([proc.stdout], [], [], READY_TIMEOUT_S)[0]:
                line = proc.stdout.readline()
            ready_s = time.perf_counter() - t0
            if not line.startswith(b"READY "):
                err.seek(0)
                raise RuntimeError(f"{tree}: no READY line ({line!r}); stderr:\n{err.read().decode(errors='replace')}")
            hwm = _status_kib(proc.pid, "VmHWM")
            rss = _status_kib(proc.pid, "VmRSS")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        err.seek(0)
        log = err.read().decode(errors="replace")
        err.close()
        m = _LOADED.search(log)
        if m is None:
            raise RuntimeError(f"{tree}: no 'loaded ... keys' line in its log:\n{log}")
        return {"keys": int(m[1]), "load_s": float(m[2]), "ready_s": ready_s, "peak_mb": hwm * 1024 / 1e6, "rss_mb": rss * 1024 / 1e6}
    finally:
        shutil.rmtree(d)


def load_rss(n: int, rounds: int, budgets: list[str], trees: list[tuple[str, Path]]) -> None:
    d = Path(tempfile.mkdtemp(prefix="dcache-loadrss-file-"))
    try:
        snapshot = d / "snapshot.msgpack"
        size = write_file(snapshot, n)
        print(f"snapshot: {n} keys, {size / 1e6:.0f} MB; {os.getloadavg()[0]:.2f} load average at start")
        results: dict[tuple[str, str], list[dict[str, float]]] = {(t, b): [] for t, _ in trees for b in budgets}
        for r in range(rounds):
            for label, tree in trees:
                for budget in budgets:
                    fig = load_once(tree, snapshot, budget)
                    results[label, budget].append(fig)
                    print(
                        f"round {r + 1} {label} --max-memory {budget}: {fig['keys']:.0f} keys loaded in {fig['load_s']:.2f} s "
                        f"(READY after {fig['ready_s']:.2f} s); peak RSS {fig['peak_mb']:.0f} MB, RSS at READY {fig['rss_mb']:.0f} MB",
                        flush=True,
                    )
        print("\nmedians:")
        for (label, budget), figs in results.items():
            med = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
            print(
                f"{label} --max-memory {budget}: peak RSS {med['peak_mb']:.0f} MB ({med['peak_mb'] * 1e6 / size:.2f} x the file), "
                f"RSS at READY {med['rss_mb']:.0f} MB, load {med['load_s']:.2f} s, READY after {med['ready_s']:.2f} s"
            )
    finally:
        shutil.rmtree(d)


def cli() -> None:
    global N
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", nargs="?", type=int, default=N, help="keys in the snapshot (default 1000000)")
    ap.add_argument("--load-rss", action="store_true", help="measure a real aux node's peak RSS and time while it loads a snapshot")
    ap.add_argument("--rounds", type=int, default=3, help="--load-rss: rounds (default 3)")
    ap.add_argument("--budget", action="append", help="--load-rss: a --max-memory to load into (repeat; default 16MiB and 1GiB)")
    ap.add_argument("--tree", action="append", help="--load-rss: LABEL=DIR, a source tree to run the node from (repeat; default this one)")
    args = ap.parse_args()
    N = args.n
    if not args.load_rss:
        uvloop.run(main())
        return
    budgets = args.budget or ["16MiB", "1GiB"]
    for b in budgets:
        parse_size(b)  # refuse a typo before writing the file
    here = Path(__file__).resolve().parent.parent
    trees = [(lab, Path(t).resolve()) for lab, _, t in (x.partition("=") for x in args.tree)] if args.tree else [("this tree", here)]
    load_rss(N, args.rounds, budgets, trees)


if __name__ == "__main__":
    cli()
