"""``dcache bench``: a closed-loop load generator for the native protocol.

Design note
-----------
Several worker processes each drive a share of ``conns`` connections. A
connection keeps ``depth`` requests in flight: it writes a batch of
``depth`` requests in one write, waits for all ``depth`` answers, records the
batch round trip as the latency of each request in it, and repeats (the way
``redis-benchmark -P`` pipelines). The loop runs in the connection's own
``data_received`` (the next batch is written as the last answer arrives), as
redis-benchmark's event loop does: a future and a coroutine resume per batch
cost the generator a third of its CPU at depth 1, CPU the server under test
shares on a small machine. Requests are pre-encoded at start (a pool
of batches with random keys over ``keys``, GET or SET by ``ratio``) so
the generator spends its time on the socket, not on building frames; every
answer is still decoded, matched to its request by the connection's
``RequestTable`` (as on every dcache connection) and its status checked,
and errors are counted.

The key space is populated before the timed run so GETs hit. Workers report
counts to the parent every second (progress line on stderr) and their
latency samples at the end; the parent prints ops/s and p50/p99/p999.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import random
import ssl
import time
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any, TextIO

from ..address import parse_address
from ..errors import RemoteProtocolError
from ..protocol import PROTOCOL_VERSION, FrameDecoder, Op, RequestTable, encode_request
from ..tls import client_context

__all__ = ["BenchOptions", "BenchResult", "run_bench", "format_result"]

_POOL_BATCHES = 64
#: Keys per MSET while populating the key space.
_POPULATE_CHUNK = 500


def default_procs() -> int:
    """Half the CPUs, at least 1: on a small machine more processes only add scheduling delay."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What one benchmark run does (``dcache bench`` builds it from its flags).

    Attributes:
        addr: the server, ``host:port``.
        conns: connections in total.
        depth: requests in flight per connection (pipelining depth).
        duration: seconds of timed load.
        ratio: fraction of GETs; the rest are SETs.
        value_size: bytes per value.
        keys: size of the key space.
        procs: load-generating processes (at most ``conns`` are used).
        loop: event loop of the workers, ``"uvloop"`` or ``"asyncio"``.
        populate: write the key space before the run, so GETs hit.
        auth_token: token for HELLO.
        tls_ca, tls_cert, tls_key: speak TLS (given any of them), verifying
            the server against ``tls_ca`` (``dcache.tls.client_context``),
            with a client certificate given ``tls_cert`` and ``tls_key``.
            Each process builds its own context from the files.

    Raises:
        ValueError: a count below 1, ``duration <= 0``, ``ratio`` outside
            [0, 1] or an unknown ``loop``.
    """

    addr: str
    conns: int = 50
    depth: int = 1
    duration: float = 10.0
    ratio: float = 0.9
    value_size: int = 100
    keys: int = 100_000
    procs: int = field(default_factory=default_procs)
    loop: str = "uvloop"
    populate: bool = True
    auth_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.conns < 1 or self.depth < 1 or self.duration <= 0 or not 0 <= self.ratio <= 1 or self.keys < 1:
            raise ValueError("--conns, --depth, --keys must be >= 1, --duration > 0 and --ratio in [0, 1]")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"--loop must be uvloop or asyncio, not {self.loop!r}")


class BenchResult(dict[str, Any]):
    """The figures of one run (a dict, so it prints as JSON)."""


def _key(i: int) -> bytes:
    return b"bench:%010d" % i


class _BenchProtocol(asyncio.Protocol):
    """One load connection, driven from its own callbacks.

    ``roundtrip`` (HELLO, populating) awaits one request. ``drive`` starts
    the closed loop: each time the last answer of a batch arrives,
    ``data_received`` records the batch's round trip and writes the next
    batch at once, with no future, task or coroutine in between, so the
    generator's own cost per request stays close to its two system calls.

    Its ``RequestTable`` allocates the request ids and matches the answers,
    as on every connection: a batch is complete when the table is empty,
    and an answer to an id not in flight fails the run. The table's ids run
    from 1 to ``depth`` (``max_id``), so on an empty table one batch of
    ``depth`` requests always gets the ids 1 .. ``depth``: the batches are
    encoded once, at start, with the ids the table hands out
    (``batch_ids``), and registered in it again as each one is written.
    """

    __slots__ = (
        "decoder",
        "requests",
        "errors",
        "waiter",
        "transport",
        "lost",
        "ops",
        "_depth",
        "_pool",
        "_i",
        "_t0",
        "_stop_at",
        "_lat",
        "_driving",
    )

    def __init__(self, depth: int = 1) -> None:
        self.decoder = FrameDecoder()
        self.requests: RequestTable[bool] = RequestTable(max_id=depth)
        self.errors = 0
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        #: Requests answered while driving.
        self.ops = 0
        self._depth = depth
        self._pool: list[bytes] = []
        self._i = 0
        self._t0 = 0.0
        self._stop_at = 0.0
        self._lat: array[float] = array("d")
        self._driving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        pop = self.requests.pop
        for msg in self.decoder.feed(data):
            if not pop(msg[0]):
                self._fail(RemoteProtocolError(f"an answer to request id {msg[0]!r}, which is not in flight"))
                return
            if msg[1] != 0:
                self.errors += 1
        if self.requests:
            return
        if self._driving:
            now = perf_counter()
            self._lat.append(now - self._t0)
            self.ops += self._depth
            if now < self._stop_at:
                self._next(now)
                return
            self._driving = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        if self.transport is not None:
            self.transport.abort()

    def batch_ids(self) -> list[int]:
        """The ids the table gives one batch (the same for every batch: see the class note)."""
        ids = [self.requests.add(True) for _ in range(self._depth)]
        self.requests.drain()
        return ids

    async def roundtrip(self, op: int, *args: Any) -> None:
        """Send one request and wait for its answer (counted in ``errors`` if it is an error)."""
        self.waiter = asyncio.get_running_loop().create_future()
        frame = encode_request(op, self.requests.add(True), *args)
        assert self.transport is not None
        self.transport.write(frame)
        await self.waiter

    async def drive(self, pool: list[bytes], stop_at: float, lat: array[float]) -> None:
        """Keep a batch of ``depth`` requests in flight until ``stop_at`` (``perf_counter`` time)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self._pool = pool
        self._i = 0
        self._stop_at = stop_at
        self._lat = lat
        self._driving = True
        self._next(perf_counter())
        await self.waiter

    def _next(self, now: float) -> None:
        self._t0 = now
        add = self.requests.add
        for _ in range(self._depth):
            add(True)
        batch = self._pool[self._i]
        self._i = (self._i + 1) % _POOL_BATCHES
        assert self.transport is not None
        self.transport.write(batch)


def _build_batches(rng: random.Random, opts: BenchOptions, ids: list[int]) -> list[bytes]:
    value = b"x" * opts.value_size
    batches = []
    for _ in range(_POOL_BATCHES):
        frames = []
        for rid in ids:
            key = _key(rng.randrange(opts.keys))
            if rng.random() < opts.ratio:
                frames.append(encode_request(Op.GET, rid, key))
            else:
                frames.append(encode_request(Op.SET, rid, key, value, None, 0))
        batches.append(b"".join(frames))
    return batches


@lru_cache(maxsize=4)
def _ssl(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """This process's TLS context for the options' files (one per process: contexts do not cross processes)."""
    if ca is None and cert is None and key is None:
        return None
    return client_context(ca=ca, cert=cert, key=key)


async def _open(opts: BenchOptions, depth: int) -> _BenchProtocol:
    host, port = parse_address(opts.addr)
    loop = asyncio.get_running_loop()
    context = _ssl(opts.tls_ca, opts.tls_cert, opts.tls_key)
    _, proto = await loop.create_connection(lambda: _BenchProtocol(depth), host, port, ssl=context)
    await proto.roundtrip(Op.HELLO, PROTOCOL_VERSION, opts.auth_token, "dcache-bench")
    if proto.errors:
        raise RuntimeError("HELLO was refused (auth token?)")
    return proto


async def _worker_main(opts: BenchOptions, conns: int, seed: int, pipe: Connection, start_at: float) -> None:
    rng = random.Random(seed)
    protos = [await _open(opts, opts.depth) for _ in range(conns)]
    pools = [_build_batches(rng, opts, p.batch_ids()) for p in protos]
    lat: array[float] = array("d")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop_at = perf_counter() + opts.duration

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            pipe.send(("progress", sum(p.ops for p in protos), sum(p.errors for p in protos)))

    reporter = asyncio.ensure_future(report())
    try:
        await asyncio.gather(*(p.drive(pool, stop_at, lat) for p, pool in zip(protos, pools, strict=True)))
    finally:
        reporter.cancel()
    for p in protos:
        assert p.transport is not None
        p.transport.close()
    pipe.send(("done", sum(p.ops for p in protos), sum(p.errors for p in protos), lat.tobytes()))


def _worker(opts: BenchOptions, conns: int, seed: int, pipe: Connection, start_at: float) -> None:
    try:
        if opts.loop == "uvloop":
            import uvloop

            uvloop.run(_worker_main(opts, conns, seed, pipe, start_at))
        else:
            asyncio.run(_worker_main(opts, conns, seed, pipe, start_at))
    except Exception as exc:  # reported to the parent, which fails the run
        pipe.send(("error", f"{exc.__class__.__name__}: {exc}"))
    finally:
        pipe.close()


async def _populate(opts: BenchOptions) -> None:
    proto = await _open(opts, 1)
    value = b"x" * opts.value_size
    for start in range(0, opts.keys, _POPULATE_CHUNK):
        pairs = [[_key(i), value] for i in range(start, min(opts.keys, start + _POPULATE_CHUNK))]
        await proto.roundtrip(Op.MSET, pairs)
    assert proto.transport is not None
    proto.transport.close()
    if proto.errors:
        raise RuntimeError("populating the key space failed")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def run_bench(opts: BenchOptions, progress: TextIO | None = None) -> BenchResult:
    """Run one benchmark; return its figures.

    Args:
        opts: what to run.
        progress: where to print a progress line every second (``None``: nowhere).

    Raises:
        OSError: the server cannot be reached (``ssl.SSLError``: the TLS handshake failed).
        RuntimeError: a worker failed, or the server refused HELLO or the populating writes.
        ConfigError: a TLS file cannot be read or is not what it should be.
    """
    _ssl(opts.tls_ca, opts.tls_cert, opts.tls_key)  # a bad TLS file fails here, not in every worker
    if opts.populate:
        asyncio.run(_populate(opts))
    procs = max(1, min(opts.procs, opts.conns))
    shares = [opts.conns // procs + (1 if i < opts.conns % procs else 0) for i in range(procs)]
    ctx = mp.get_context("spawn")
    start_at = time.time() + 1.0 + 0.3 * procs
    workers = []
    pipes = []
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(opts, share, 1000 + i, child, start_at), daemon=True)
        p.start()
        child.close()
        workers.append(p)
        pipes.append(parent)
    counts = [0] * procs
    done: dict[int, tuple[int, int, bytes]] = {}
    failures: list[str] = []
    last_print = 0.0
    deadline = start_at + opts.duration + 30.0
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
                counts[i] = msg[1]
            elif msg[0] == "done":
                done[i] = (msg[1], msg[2], msg[3])
                counts[i] = msg[1]
            else:
                failures.append(msg[1])
                done[i] = (0, 0, b"")
        now = time.time()
        if progress is not None and now - last_print >= 1.0 and now > start_at:
            elapsed = min(now - start_at, opts.duration)
            total = sum(counts)
            print(f"  {elapsed:5.1f}s  {total:>10} ops  {total / max(elapsed, 1e-9):>10.0f} ops/s", file=progress, flush=True)
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
        addr=opts.addr,
        conns=opts.conns,
        depth=opts.depth,
        procs=procs,
        loop=opts.loop,
        duration_s=opts.duration,
        ratio=opts.ratio,
        value_size=opts.value_size,
        ops=ops,
        errors=errors,
        ops_per_s=round(ops / opts.duration, 1),
        p50_ms=round(_percentile(samples, 0.50) * 1000, 3),
        p99_ms=round(_percentile(samples, 0.99) * 1000, 3),
        p999_ms=round(_percentile(samples, 0.999) * 1000, 3),
    )


def format_result(result: BenchResult) -> str:
    """The two-line human summary of a run."""
    return (
        f"{result['ops_per_s']:.0f} ops/s  ({result['ops']} ops, {result['errors']} errors in {result['duration_s']}s; "
        f"conns={result['conns']} depth={result['depth']} procs={result['procs']} loop={result['loop']})\n"
        f"latency p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  p999 {result['p999_ms']} ms"
    )
