#!/usr/bin/env python3
"""Rebalancing throughput: keys moved per second when a 4th aux node joins 3.

Starts a master (the coordinator) and three aux nodes on 127.0.0.1 with
free ports, fills them with ``--keys`` keys (``--value-size``-byte values)
through the master, starts a reader that reads known keys continuously
(``--reader-depth`` MGETs of ``--reader-batch`` random keys in flight, each
value checked), then starts a fourth aux node with ``--join`` and polls the
master's RING until the migration is over and the moved ranges have been
dropped from their old owners (the second step of its end). It prints the
keys the migration moved, its duration (the master's own ``started_ms`` to
``finished_ms``), keys/s, and the reader's reads, misses and wrong values
from the join to the drop: a miss there breaks the promise that a key
present before a ring change is never missed. The CPU time every daemon
used from the join to the end of the migration (``/proc/PID/stat``; the
new node from its READY line on), per key moved, is less sensitive to a
busy machine than keys/s; it includes serving the reader. It also prints the p99 and
the worst latency of the reader's MGETs from the join to the end of the
migration (what the move costs the reads, larger pages holding the loops
longer).

``--baseline REF`` also measures the code of git ref ``REF`` (exported with
``git archive`` to a temporary folder, its daemons started from there) and
alternates the two in one run, ``--rounds`` times each, so a shared
machine's drift cancels out; the table reports each round and the median
ratio. ``--py-spy DIR`` records the master and every aux node with py-spy
(``--py-spy-bin``) from the join until the migration ends, one file of
collapsed stacks (py-spy's ``raw`` format, which flame graph tools read)
per process and round. ``--migration-rate`` and ``--migration-batch``
are passed to the master.

    bin/bench_rebalance.py                              # 1M keys, this tree
    bin/bench_rebalance.py --baseline HEAD~3 --rounds 3 # against an older commit, alternating
    bin/bench_rebalance.py --keys 200000 --py-spy /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcache import Client  # noqa: E402
from dcache.errors import UnavailableError  # noqa: E402
from dcache.protocol import Op  # noqa: E402
from tests.harness import DaemonProcess  # noqa: E402

#: Keys per MSET while filling, and MSETs in flight.
FILL_BATCH = 1000
FILL_DEPTH = 4
FILL_ATTEMPTS = 10
#: Bound on each wait for the ring (join, migration, drop).
RING_TIMEOUT_S = 600.0
RING_POLL_S = 0.25  # RING computes every node's share: polling it often costs the master
#: How long to wait for the moved ranges to leave their old owners.
DROP_TIMEOUT_S = 60.0


def key_of(i: int) -> bytes:
    """The benchmark's key number ``i``."""
    return b"key:%d" % i


def value_of(i: int, size: int) -> bytes:
    """The value of key ``i``: its number, padded to ``size`` bytes."""
    v = b"value-%d-" % i
    return (v * (size // len(v) + 1))[:size]


class Reader:
    """Reads random known keys through a master, ``depth`` MGETs in flight, checking every value."""

    def __init__(self, addr: str, keys: int, value_size: int, batch: int, depth: int) -> None:
        self.addr = addr
        self.keys = keys
        self.value_size = value_size
        self.batch = batch
        self.depth = depth
        self.reads = 0
        self.misses = 0
        self.wrong = 0
        self.errors: list[str] = []
        #: ``(end, seconds)`` of every MGET, by ``time.perf_counter``.
        self.latencies: list[tuple[float, float]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the reading coroutines."""
        self._tasks = [asyncio.ensure_future(self._run(random.Random(seed))) for seed in range(self.depth)]

    def counts(self) -> tuple[int, int, int, int]:
        """``(reads, misses, wrong, errors)`` so far."""
        return self.reads, self.misses, self.wrong, len(self.errors)

    async def _run(self, rng: random.Random) -> None:
        async with Client(self.addr, timeout=10.0) as c:
            while not self._stop.is_set():
                idx = [rng.randrange(self.keys) for _ in range(self.batch)]
                t0 = time.perf_counter()
                try:
                    values = await c.mget([key_of(i) for i in idx])
                except Exception as exc:
                    self.errors.append(f"{exc.__class__.__name__}: {exc}")
                    continue
                t1 = time.perf_counter()
                self.latencies.append((t1, t1 - t0))
                self.reads += len(values)
                for i, v in zip(idx, values, strict=True):
                    if v is None:
                        self.misses += 1
                    elif v != value_of(i, self.value_size):
                        self.wrong += 1

    def latency_ms(self, since: float, until: float) -> tuple[float, float]:
        """The p99 and the worst MGET latency (ms) of the MGETs that ended between ``since`` and ``until``."""
        window = sorted(dt for t, dt in self.latencies if since <= t <= until)
        if not window:
            return 0.0, 0.0
        return window[int(len(window) * 0.99)] * 1000, window[-1] * 1000

    async def stop(self) -> None:
        """Stop reading and wait for the coroutines to end."""
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def fill(addr: str, keys: int, value_size: int) -> float:
    """MSET every key through the master; return the seconds it took."""
    started = time.monotonic()
    async with Client(addr, timeout=30.0) as c:
        starts = iter(range(0, keys, FILL_BATCH))

        async def worker() -> None:
            for start in starts:
                stop = min(keys, start + FILL_BATCH)
                batch = {key_of(i): value_of(i, value_size) for i in range(start, stop)}
                for attempt in range(FILL_ATTEMPTS):
                    try:
                        stored = await c.mset(batch)
                        break
                    except UnavailableError:  # a node starved of CPU on a busy machine: its link suspects it for a while
                        if attempt == FILL_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(1.0)
                if stored != stop - start:
                    raise RuntimeError(f"MSET stored {stored} of {stop - start} keys")

        await asyncio.gather(*(worker() for _ in range(FILL_DEPTH)))
    return time.monotonic() - started


async def wait_ring(c: Client, predicate: Any, what: str, timeout: float = RING_TIMEOUT_S) -> dict[str, Any]:
    """Poll RING until ``predicate(info)``; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await c.execute(Op.RING)
        if predicate(info):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; last ring: {info}")
        await asyncio.sleep(RING_POLL_S)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(procs: dict[str, DaemonProcess]) -> dict[str, float]:
    """CPU seconds of each daemon so far."""
    out = {}
    for name, p in procs.items():
        assert p.proc is not None
        out[name] = cpu_seconds(p.proc.pid)
    return out


class Side:
    """One code tree under test: where its daemons import dcache from."""

    def __init__(self, name: str, code: Path) -> None:
        self.name = name
        self.code = code

    def env(self) -> dict[str, str]:
        """The daemons' environment: ``PYTHONPATH`` at this tree."""
        return {"PYTHONPATH": str(self.code)}


def start(side: Side, role: str, args: list[str]) -> DaemonProcess:
    """Start one daemon of ``side`` (READY awaited)."""
    return DaemonProcess(role, args, env=side.env(), cwd=str(side.code)).start(timeout=60.0)


def py_spy(opts: argparse.Namespace, procs: dict[str, DaemonProcess], tag: str) -> list[subprocess.Popen[bytes]]:
    """Start py-spy recorders (collapsed stacks under ``--py-spy``) for every process."""
    if not opts.py_spy:
        return []
    out = Path(opts.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for name, p in procs.items():
        assert p.proc is not None
        cmd = [opts.py_spy_bin, "record", "--nonblocking", "-r", "200", "--format", "raw", "-p", str(p.proc.pid)]
        cmd += ["-o", str(out / f"{tag}-{name}.txt")]
        recs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return recs


def stop_py_spy(recs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the recorders (SIGINT makes py-spy write its output) and wait for them."""
    for r in recs:
        r.send_signal(2)
    for r in recs:
        try:
            r.wait(timeout=60)
        except subprocess.TimeoutExpired:
            r.kill()
            r.wait()


async def one_round(side: Side, opts: argparse.Namespace, tmp: Path, tag: str) -> dict[str, Any]:
    """Fill three aux nodes, join a fourth under a reader, and measure the move."""
    procs: dict[str, DaemonProcess] = {}
    try:
        # A node starved of CPU on a busy machine is not marked down (which would start other migrations).
        health = ["--health-interval", "0.5", "--health-failures", "20", "--follow-interval", "0.2"]
        margs = ["--host", "127.0.0.1", "--port", "0", "--node-id", "m1", "--log-level", "warning", *health]
        margs += ["--migration-rate", str(opts.migration_rate)]
        if opts.migration_batch is not None:
            margs += ["--migration-batch", str(opts.migration_batch)]
        procs["master"] = master = start(side, "master", margs)

        def aux_args(node: str) -> list[str]:
            data = tmp / tag / node
            data.mkdir(parents=True, exist_ok=True)
            return ["--host", "127.0.0.1", "--port", "0", "--node-id", node, "--log-level", "warning"] + [
                "--data-dir",
                str(data),
                "--snapshot-interval",
                "0",
                "--max-memory",
                opts.max_memory,
                "--join",
                master.addr,
            ]

        for n in ("a1", "a2", "a3"):
            procs[n] = start(side, "aux", aux_args(n))
        async with Client(master.addr, timeout=10.0) as c:
            await wait_ring(c, lambda i: len(i["ring"]["nodes"]) == 3 and not i["migrating"], "three aux nodes")
            fill_s = await fill(master.addr, opts.keys, opts.value_size)
            await asyncio.sleep(opts.settle)
            reader = Reader(master.addr, opts.keys, opts.value_size, opts.reader_batch, opts.reader_depth)
            reader.start()
            await asyncio.sleep(0.5)  # the reader's connections are up and reading
            before = reader.counts()
            t_join = time.perf_counter()
            cpu_before = cpu_of(procs)
            procs["a4"] = start(side, "aux", aux_args("a4"))
            cpu_before["a4"] = cpu_of({"a4": procs["a4"]})["a4"]  # from READY on: not its start-up
            recs = py_spy(opts, procs, tag)
            try:
                info = await wait_ring(c, lambda i: "a4" in i["ring"]["nodes"], "the join")
                epoch = info["epoch"]

                def done(i: dict[str, Any]) -> bool:
                    m = i["membership"]["migration"]
                    return not i["migrating"] and m["epoch"] >= epoch and m["state"] == "idle" and m["finished_ms"] >= m["started_ms"] > 0

                info = await wait_ring(c, done, "the migration")
                cpu_after = cpu_of(procs)
            finally:
                stop_py_spy(recs)
            p99_ms, worst_ms = reader.latency_ms(t_join, time.perf_counter())
            progress = info["membership"]["migration"]
            # The second step: the moved ranges leave the old owners; reads must still hit.
            total = opts.keys

            def dropped(i: dict[str, Any]) -> bool:
                items = [n["items"] for n in i["nodes"]]
                return None not in items and sum(items) == total

            try:
                await wait_ring(c, dropped, "the drop from the old owners", DROP_TIMEOUT_S)
                drop_seen = True
            except TimeoutError:  # another ring change (a starved node marked down, then fenced) kept the copies
                drop_seen = False
            await asyncio.sleep(0.5)
            after = reader.counts()
            await reader.stop()
        seconds = (progress["finished_ms"] - progress["started_ms"]) / 1000
        moved = progress["keys_moved"]
        return {
            "side": side.name,
            "fill_s": fill_s,
            "moved": moved,
            "seconds": seconds,
            "keys_per_s": moved / seconds if seconds else float("inf"),
            "reads": after[0] - before[0],
            "misses": after[1] - before[1],
            "wrong": after[2] - before[2],
            "errors": after[3] - before[3],
            "p99_ms": p99_ms,
            "cpu_us_per_key": sum(cpu_after[n] - cpu_before[n] for n in cpu_after) / moved * 1e6 if moved else 0.0,
            "cpu": {n: cpu_after[n] - cpu_before[n] for n in cpu_after},
            "drop_seen": drop_seen,
            "worst_ms": worst_ms,
            "error_sample": reader.errors[:3],
        }
    finally:
        for p in procs.values():
            p.kill()


def export(ref: str, dest: Path) -> Path:
    """``git archive`` of ``ref`` unpacked in ``dest``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def row(r: dict[str, Any]) -> str:
    """One Markdown table row."""
    return (
        f"| {r['side']} | {r['moved']} | {r['seconds']:.2f} | {r['keys_per_s']:,.0f} | "
        f"{r['cpu_us_per_key']:.1f} | {' '.join(f'{n} {t:.2f}' for n, t in r['cpu'].items())} | "
        f"{r['reads']}{'' if r['drop_seen'] else ' (no drop seen)'} | {r['misses']} | {r['wrong']} | {r['errors']} | "
        f"{r['p99_ms']:.1f} | {r['worst_ms']:.1f} |"
    )


def main() -> int:
    """Parse the flags, run the rounds, print the table; 1 if any read missed or failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys filled into the three aux nodes")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value")
    p.add_argument("--max-memory", default="1GB", help="each aux node's --max-memory")
    p.add_argument("--migration-batch", type=int, help="the master's --migration-batch (default: each side's own default)")
    p.add_argument("--migration-rate", type=int, default=0, help="the master's --migration-rate (0: unthrottled)")
    p.add_argument("--reader-batch", type=int, default=100, help="keys per MGET of the reader")
    p.add_argument("--reader-depth", type=int, default=2, help="MGETs the reader keeps in flight")
    p.add_argument(
        "--settle",
        type=float,
        default=6.0,
        help="seconds between the fill and the join: over 5 s, the migration's catch-up pass (writes of the last 5 s) "
        "does not copy the whole fill again",
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds per side")
    p.add_argument("--baseline", metavar="REF", help="also measure git ref REF, alternating with this tree")
    p.add_argument("--py-spy", metavar="DIR", help="record every daemon with py-spy during the move, collapsed stacks into DIR")
    p.add_argument("--py-spy-bin", default=str(Path(sys.executable).parent / "py-spy"), help="the py-spy executable")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcache-rebalance-") as t:
        tmp = Path(t)
        sides = [Side("this tree", ROOT)]
        if opts.baseline:
            sides.insert(0, Side(f"baseline {opts.baseline}", export(opts.baseline, tmp / "baseline")))
        results: list[dict[str, Any]] = []
        for rnd in range(opts.rounds):
            for k, side in enumerate(sides):
                r = asyncio.run(one_round(side, opts, tmp, f"r{rnd}s{k}"))
                print(row(r), file=sys.stderr, flush=True)
                results.append(r)
    print(
        f"keys {opts.keys}, values {opts.value_size} B, --migration-batch {opts.migration_batch or 'default'}, "
        f"--migration-rate {opts.migration_rate}, settle {opts.settle} s"
    )
    print(os.popen("uptime").read().strip())
    print()
    print(
        "| code | keys moved | seconds | keys/s | CPU µs per key moved | CPU s by process | reads, join to drop | misses | wrong "
        "| errors | read p99 ms | worst read ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    if opts.baseline:
        ratios = [results[i + 1]["keys_per_s"] / results[i]["keys_per_s"] for i in range(0, len(results), 2)]
        print()
        print(f"this tree / baseline keys/s: median {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}x' for x in ratios)})")
        cpu = [results[i]["cpu_us_per_key"] / results[i + 1]["cpu_us_per_key"] for i in range(0, len(results), 2)]
        print(
            f"baseline / this tree CPU per key moved: median {statistics.median(cpu):.2f}x (rounds: {', '.join(f'{x:.2f}x' for x in cpu)})"
        )
    for r in results:
        for e in r["error_sample"]:
            print(f"reader error ({r['side']}): {e}", file=sys.stderr)
    bad = any(r["misses"] or r["wrong"] or r["errors"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
