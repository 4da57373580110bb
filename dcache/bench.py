"""``dcache bench``: a closed-loop load generator for the native protocol.

Design note
-----------
Several worker processes each drive a share of ``--conns`` connections. A
connection keeps ``--depth`` requests in flight: it writes a batch of
``depth`` requests in one write, waits for all ``depth`` answers, records the
batch round trip as the latency of each request in it, and repeats (the way
``redis-benchmark -P`` pipelines). The loop runs in the connection's own
``data_received`` (the next batch is written as the last answer arrives), as
redis-benchmark's event loop does: a future and a coroutine resume per batch
cost the generator a third of its CPU at depth 1, CPU the server under test
shares on a small machine. Requests are pre-encoded at start (a pool
of batches with random keys over ``--keys``, GET or SET by ``--ratio``) so
the generator spends its time on the socket, not on building frames; every
answer is still decoded and its status checked, and errors are counted.

The key space is populated before the timed run so GETs hit. Workers report
counts to the parent every second (progress line on stderr) and their
latency samples at the end; the parent prints ops/s and p50/p99/p999.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from array import array
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any

from .protocol import PROTOCOL_VERSION, FrameDecoder, Op, encode_request

__all__ = ["add_bench_arguments", "run_bench_cli", "run_bench", "BenchResult"]

_POOL_BATCHES = 64


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dcache bench`` flags."""
    parser.add_argument(
        "--addr",
        default=os.environ.get("DCACHE_ADDR", "127.0.0.1:7000"),
        help="server as host:port (default: 127.0.0.1:7000; env DCACHE_ADDR)",
    )
    parser.add_argument("--conns", type=int, default=50, help="connections in total (default: 50)")
    parser.add_argument("--depth", type=int, default=1, help="requests in flight per connection (pipelining depth, default: 1)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of timed load (default: 10)")
    parser.add_argument("--ratio", type=float, default=0.9, help="fraction of GETs; the rest are SETs (default: 0.9)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value (default: 100)")
    parser.add_argument("--keys", type=int, default=100_000, help="size of the key space (default: 100000)")
    parser.add_argument(
        "--procs",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 2),
        help="load-generating processes (default: half the CPUs, at least 1; on a small machine more processes only add scheduling delay)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of the workers (default: uvloop)")
    parser.add_argument("--no-populate", action="store_true", help="skip writing the key space before the run")
    parser.add_argument("--auth-token", default=os.environ.get("DCACHE_AUTH_TOKEN"), help="auth token for HELLO (env DCACHE_AUTH_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


class BenchResult(dict[str, Any]):
    """The figures of one run (a dict, so it prints as JSON)."""


def _key(i: int) -> bytes:
    return b"bench:%010d" % i


class _BenchProtocol(asyncio.Protocol):
    """One load connection, driven from its own callbacks.

    ``roundtrip`` (HELLO, populating) awaits one batch. ``drive`` starts the
    closed loop: each time the last answer of a batch arrives,
    ``data_received`` records the batch's round trip and writes the next
    batch at once, with no future, task or coroutine in between, so the
    generator's own cost per request stays close to its two system calls.
    """

    __slots__ = (
        "decoder",
        "expected",
        "got",
        "errors",
        "waiter",
        "transport",
        "lost",
        "ops",
        "_pool",
        "_i",
        "_t0",
        "_stop_at",
        "_lat",
        "_driving",
    )

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.expected = 0
        self.got = 0
        self.errors = 0
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        #: Requests answered while driving.
        self.ops = 0
        self._pool: list[bytes] = []
        self._i = 0
        self._t0 = 0.0
        self._stop_at = 0.0
        self._lat: array[float] = array("d")
        self._driving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        got = self.got
        for msg in self.decoder.feed(data):
            if msg[1] != 0:
                self.errors += 1
            got += 1
        self.got = got
        if got < self.expected:
            return
        if self._driving:
            now = perf_counter()
            self._lat.append(now - self._t0)
            self.ops += got
            if now < self._stop_at:
                self._next(now)
                return
            self._driving = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    async def roundtrip(self, batch: bytes, n: int) -> None:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.expected = n
        self.got = 0
        assert self.transport is not None
        self.transport.write(batch)
        await self.waiter

    async def drive(self, pool: list[bytes], depth: int, stop_at: float, lat: array[float]) -> None:
        """Keep ``depth`` requests in flight until ``stop_at`` (``perf_counter`` time)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self._pool = pool
        self._i = 0
        self.expected = depth
        self._stop_at = stop_at
        self._lat = lat
        self._driving = True
        self._next(perf_counter())
        await self.waiter

    def _next(self, now: float) -> None:
        self.got = 0
        self._t0 = now
        batch = self._pool[self._i]
        self._i = (self._i + 1) % _POOL_BATCHES
        assert self.transport is not None
        self.transport.write(batch)


def _build_batches(rng: random.Random, args: argparse.Namespace) -> list[bytes]:
    value = b"x" * args.value_size
    batches = []
    for _ in range(_POOL_BATCHES):
        frames = []
        for rid in range(1, args.depth + 1):
            key = _key(rng.randrange(args.keys))
            if rng.random() < args.ratio:
                frames.append(encode_request(Op.GET, rid, key))
            else:
                frames.append(encode_request(Op.SET, rid, key, value, None, 0))
        batches.append(b"".join(frames))
    return batches


async def _open(host: str, port: int, token: str | None) -> _BenchProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_BenchProtocol, host, port)
    await proto.roundtrip(encode_request(Op.HELLO, 1, PROTOCOL_VERSION, token, "dcache-bench"), 1)
    if proto.errors:
        raise RuntimeError("HELLO was refused (auth token?)")
    return proto


async def _worker_main(args: argparse.Namespace, conns: int, seed: int, pipe: Connection, start_at: float) -> None:
    host, _, port_s = args.addr.rpartition(":")
    port = int(port_s)
    rng = random.Random(seed)
    protos = [await _open(host, port, args.auth_token) for _ in range(conns)]
    pools = [_build_batches(rng, args) for _ in range(conns)]
    lat: array[float] = array("d")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop_at = perf_counter() + args.duration

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            pipe.send(("progress", sum(p.ops for p in protos), sum(p.errors for p in protos)))

    reporter = asyncio.ensure_future(report())
    try:
        await asyncio.gather(*(p.drive(pool, args.depth, stop_at, lat) for p, pool in zip(protos, pools, strict=True)))
    finally:
        reporter.cancel()
    for p in protos:
        assert p.transport is not None
        p.transport.close()
    pipe.send(("done", sum(p.ops for p in protos), sum(p.errors for p in protos), lat.tobytes()))


def _worker(args: argparse.Namespace, conns: int, seed: int, pipe: Connection, start_at: float) -> None:
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(_worker_main(args, conns, seed, pipe, start_at))
        else:
            asyncio.run(_worker_main(args, conns, seed, pipe, start_at))
    except Exception as exc:  # reported to the parent, which fails the run
        pipe.send(("error", f"{exc.__class__.__name__}: {exc}"))
    finally:
        pipe.close()


async def _populate(args: argparse.Namespace) -> None:
    host, _, port_s = args.addr.rpartition(":")
    proto = await _open(host, int(port_s), args.auth_token)
    value = b"x" * args.value_size
    chunk = 500
    for start in range(0, args.keys, chunk):
        pairs = [[_key(i), value] for i in range(start, min(args.keys, start + chunk))]
        await proto.roundtrip(encode_request(Op.MSET, 2, pairs), 1)
    assert proto.transport is not None
    proto.transport.close()
    if proto.errors:
        raise RuntimeError("populating the key space failed")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def run_bench(args: argparse.Namespace, out: Any = sys.stderr) -> BenchResult:
    """Run one benchmark as configured by ``args``; return its figures."""
    if args.conns < 1 or args.depth < 1 or args.duration <= 0 or not 0 <= args.ratio <= 1 or args.keys < 1:
        raise ValueError("--conns, --depth, --keys must be >= 1, --duration > 0 and --ratio in [0, 1]")
    if not args.no_populate:
        asyncio.run(_populate(args))
    procs = max(1, min(args.procs, args.conns))
    shares = [args.conns // procs + (1 if i < args.conns % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    start_at = time.time() + 1.0 + 0.3 * procs
    workers = []
    pipes = []
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(args, share, 1000 + i, child, start_at), daemon=True)
        p.start()
        child.close()
        workers.append(p)
        pipes.append(parent)
    progress = [0] * procs
    done: dict[int, tuple[int, int, bytes]] = {}
    failures: list[str] = []
    last_print = 0.0
    deadline = start_at + args.duration + 30.0
    while len(done) + len(failures) < procs and time.time() < deadline:
        for i, pipe in enumerate(pipes):
            if i in done or not pipe.poll(0.05):
                continue
            try:
                msg = pipe.recv()
            except EOFError:
                failures.append(f"worker {i} exited without a result")
                done[i] = (0, 0, b"")
                continue
            if msg[0] == "progress":
                progress[i] = msg[1]
            elif msg[0] == "done":
                done[i] = (msg[1], msg[2], msg[3])
                progress[i] = msg[1]
            else:
                failures.append(msg[1])
                done[i] = (0, 0, b"")
        now = time.time()
        if not args.quiet and now - last_print >= 1.0 and now > start_at:
            elapsed = min(now - start_at, args.duration)
            total = sum(progress)
            print(f"  {elapsed:5.1f}s  {total:>10} ops  {total / max(elapsed, 1e-9):>10.0f} ops/s", file=out, flush=True)
            last_print = now
    for p in workers:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if failures:
        raise RuntimeError("; ".join(failures))
    ops = sum(d[0] for d in done.values())
    errors = sum(d[1] for d in done.values())
    lat = array("d")
    for d in done.values():
        lat.frombytes(d[2])
    samples = sorted(lat)
    # each batch sample stands for `depth` requests; percentiles over batches
    # equal percentiles over requests since every batch has the same size.
    return BenchResult(
        addr=args.addr,
        conns=args.conns,
        depth=args.depth,
        procs=procs,
        loop=args.loop,
        duration_s=args.duration,
        ratio=args.ratio,
        value_size=args.value_size,
        ops=ops,
        errors=errors,
        ops_per_s=round(ops / args.duration, 1),
        p50_ms=round(_percentile(samples, 0.50) * 1000, 3),
        p99_ms=round(_percentile(samples, 0.99) * 1000, 3),
        p999_ms=round(_percentile(samples, 0.999) * 1000, 3),
    )


def run_bench_cli(args: argparse.Namespace) -> int:
    """Entry point of ``dcache bench``; returns the exit code."""
    try:
        result = run_bench(args, out=sys.stderr if not args.quiet else open(os.devnull, "w"))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"dcache bench: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['ops_per_s']:.0f} ops/s  ({result['ops']} ops, {result['errors']} errors in {result['duration_s']}s; "
            f"conns={result['conns']} depth={result['depth']} procs={result['procs']} loop={result['loop']})\n"
            f"latency p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  p999 {result['p999_ms']} ms"
        )
    return 0 if result["errors"] == 0 else 4
