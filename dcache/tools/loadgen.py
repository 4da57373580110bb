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

The key space is populated before the timed run so GETs hit. Keys are
drawn from ``--distribution`` (uniform or Zipf, with ``--hot-share`` of
the requests on key 0: ``keydist.py``) when the pool is built: at least
``_POOL_REQUESTS`` requests per connection, so the pool's keys follow the
law over the key space rather than a few thousand draws. Workers report
counts to the parent every second (progress line on stderr) and their
latency samples at the end; the parent prints ops/s and percentiles.

Open loop (``--rate N``)
------------------------
The closed loop measures how fast the server answers when the generator
waits for it: a server that stalls for 100 ms delays one request per
connection, and the requests the generator would have sent meanwhile are
never sent, so never counted ("coordinated omission"). With ``--rate`` the
requests arrive on a schedule instead, as in wrk2 and memtier's
``--rate-limiting``: request ``k`` of a process is *intended* at
``start + k / rate`` (``RateSchedule``, the process's share of N per
second), whatever happened to the ones before, and its latency runs from
that intended time to its answer. Time the generator or the server fell
behind counts, as a user waiting would have seen it.

Sending: each time the loop wakes (an answer arrives, or the timer fires)
every request due by then is sent, round robin over the
connections; several due together on one connection leave in one write
(pipelined). Each connection keeps up to ``_RATE_WINDOW`` requests in
flight (ids 1 .. 127, one msgpack byte, so a pre-encoded request takes any
free id from the connection's ``RequestTable``); when all are full, due
requests wait and the wait counts in their latency. The loop's own timers
cannot wake it in time (uvloop rounds a delay to whole milliseconds: 0.3 ms
fires at once, 0.6 ms after a millisecond); a signal timer would take
SIGALRM from whoever else uses it (pytest-timeout); a thread sleeping
until the next request and waking the loop cost 60-110 µs of CPU per
wake-up on a loaded 2-core machine (GIL hand-offs), more than a request.
So the loop watches a Linux timerfd (``_TimerFd``) that fires every
``_TICK_S`` from the schedule's start: one ``epoll`` return and one
``read`` per wake-up, armed once. A request thus leaves at most
``_TICK_S`` late when no answer wakes the loop first, and at rates above
1 / ``_TICK_S`` per process the requests due within one tick leave
together. (Arming a one-shot timer for each request's own time was as
precise at the median and cost a ``timerfd_settime`` per request: 16% of
the generator's active samples at 20,000/s.)

The report gives the target and the achieved rate (answers over the time
from the start to the last answer), the send lag (how late each request
left against its intended time: the generator's own share of the
latency) and the workers' CPU: achieved below the target with a high send
lag and a worker near 100% CPU means the generator could not keep the
schedule; with a low send lag, the server fell behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import multiprocessing as mp
import os
import random
import ssl
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import Connection
from time import perf_counter
from typing import Any, TextIO, TypeVar

from ..address import parse_address
from ..errors import RemoteProtocolError
from ..protocol import PROTOCOL_VERSION, FrameDecoder, Op, RequestTable, encode_request
from ..tls import client_context
from .keydist import KeyDistribution, KeySampler

__all__ = ["BenchOptions", "BenchResult", "RateSchedule", "run_bench", "format_result"]

#: Batches pre-encoded per connection, at least.
_POOL_BATCHES = 64
#: Requests pre-encoded per connection, at least (keys drawn from the distribution).
_POOL_REQUESTS = 4096
#: Requests in flight per open-loop connection at most: ids 1..127 encode as one msgpack byte.
_RATE_WINDOW = 127
#: The timer wakes the loop this often (seconds).
_TICK_S = 0.0001
#: Seconds an open-loop run waits for its last answers after the schedule ends.
_DRAIN_S = 10.0
#: Achieved rate below this share of the target: the schedule was not kept.
_KEPT_SHARE = 0.97
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
        rate: open loop: requests per second across all connections, sent
            on a fixed schedule, latency from each one's intended send time
            (``None``: closed loop, ``depth`` in flight per connection;
            ``depth`` is then unused).
        distribution: how keys are drawn: ``uniform`` or ``zipf:S``
            (``keydist.KeyDistribution.parse``).
        hot_share: share of requests on key 0 (the rest follow
            ``distribution`` over the other keys); 0: no key set apart.
        auth_token: token for HELLO.
        tls_ca, tls_cert, tls_key: speak TLS (given any of them), verifying
            the server against ``tls_ca`` (``dcache.tls.client_context``),
            with a client certificate given ``tls_cert`` and ``tls_key``.
            Each process builds its own context from the files.

    Raises:
        ValueError: a count below 1, ``duration <= 0``, ``ratio`` or
            ``hot_share`` outside [0, 1], ``rate <= 0``, an unknown
            ``loop`` or ``distribution``.
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
    rate: float | None = None
    distribution: str = "uniform"
    hot_share: float = 0.0
    auth_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.conns < 1 or self.depth < 1 or not 0 < self.duration < math.inf or not 0 <= self.ratio <= 1 or self.keys < 1:
            raise ValueError("--conns, --depth, --keys must be >= 1, --duration > 0 and --ratio in [0, 1]")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"--loop must be uvloop or asyncio, not {self.loop!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be above 0, not {self.rate}")
        if not 0 <= self.hot_share <= 1:
            raise ValueError(f"--hot-share must be in [0, 1], not {self.hot_share}")
        try:
            KeyDistribution.parse(self.distribution)
        except ValueError as exc:
            raise ValueError(f"--distribution: {exc}") from None


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
        self.requests: RequestTable[float] = RequestTable(max_id=depth)
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
            if pop(msg[0]) is None:
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
        ids = [self.requests.add(0.0) for _ in range(self._depth)]
        self.requests.drain()
        return ids

    async def roundtrip(self, op: int, *args: Any) -> None:
        """Send one request and wait for its answer (counted in ``errors`` if it is an error)."""
        self.waiter = asyncio.get_running_loop().create_future()
        frame = encode_request(op, self.requests.add(0.0), *args)
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
            add(0.0)
        batch = self._pool[self._i]
        self._i = (self._i + 1) % len(self._pool)
        assert self.transport is not None
        self.transport.write(batch)


class _RateProtocol(_BenchProtocol):
    """One open-loop connection: sends what its ``_RateDriver`` hands it, records each answer's latency.

    Its ``RequestTable`` holds each request's intended send time
    (``perf_counter``), with ids 1 .. ``_RATE_WINDOW``. Every answer's
    latency is its arrival time minus that; then the driver sends whatever
    fell due meanwhile (an answer is also a chance to keep the schedule).
    """

    __slots__ = ("driver", "pool", "seq", "out", "last_answer")

    def __init__(self) -> None:
        super().__init__(_RATE_WINDOW)
        self.driver: _RateDriver | None = None
        #: Pre-encoded requests: (bytes before the request id, bytes after it).
        self.pool: list[tuple[bytes, bytes]] = []
        #: Requests sent so far (the next one is ``pool[seq % len(pool)]``).
        self.seq = 0
        #: Pieces of frames to write at the end of this tick.
        self.out: list[bytes] = []
        #: ``perf_counter`` time of the last answer.
        self.last_answer = 0.0

    def data_received(self, data: bytes) -> None:
        driver = self.driver
        if driver is None:  # HELLO, before the run
            super().data_received(data)
            return
        now = perf_counter()
        pop = self.requests.pop
        lat = driver.lat
        n = 0
        for msg in self.decoder.feed(data):
            intended = pop(msg[0])
            if intended is None:
                self._fail(RemoteProtocolError(f"an answer to request id {msg[0]!r}, which is not in flight"))
                return
            lat.append(now - intended)
            if msg[1] != 0:
                self.errors += 1
            n += 1
        self.ops += n
        self.last_answer = now
        driver.tick()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.driver is not None:
            self.driver.lost(self.lost or ConnectionResetError("connection closed by the server"))


@dataclass(frozen=True, slots=True)
class RateSchedule:
    """When each request of an open-loop process is intended: ``start + k / rate`` for ``k`` in ``0 .. count-1``.

    Attributes:
        start: intended time of request 0 (``perf_counter`` seconds).
        rate: requests per second.
        count: requests in the schedule.
    """

    start: float
    rate: float
    count: int

    def intended(self, k: int) -> float:
        """The intended send time of request ``k``."""
        return self.start + k / self.rate

    def due(self, now: float) -> int:
        """How many requests are intended at or before ``now`` (at most ``count``)."""
        if now < self.start:
            return 0
        # the epsilon: a request intended exactly at ``now`` is due despite rounding (4 ms * 1000/s = 3.999...)
        return min(self.count, int((now - self.start) * self.rate + 1e-9) + 1)


class _TimerFd:
    """A Linux timerfd on CLOCK_MONOTONIC (``perf_counter``'s clock), armed at absolute times.

    The loop watches its descriptor (``add_reader``) like a socket, so a
    wake-up costs one ``epoll`` return and one ``read``, with no thread and
    no signal. Python 3.11 has no ``os.timerfd_create``: libc is called
    through ``ctypes``.

    Raises:
        OSError: this system has no timerfd (``--rate`` needs Linux).
    """

    __slots__ = ("fd", "_settime", "_spec")

    def __init__(self) -> None:
        libc = _libc()
        if libc is None or not hasattr(libc, "timerfd_create"):
            raise OSError("dcache bench --rate needs Linux's timerfd")
        fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd: int = fd
        self._settime = libc.timerfd_settime
        #: struct itimerspec: interval (0: one shot) then value (seconds, nanoseconds).
        self._spec = (ctypes.c_long * 4)()

    def arm(self, at: float, every: float) -> None:
        """Fire at ``perf_counter`` time ``at`` (at once if it has passed), then every ``every`` seconds."""
        spec = self._spec
        spec[0] = int(every)
        spec[1] = int((every - int(every)) * 1e9)
        sec = int(at)
        spec[2] = sec
        spec[3] = max(1, int((at - sec) * 1e9))  # 0 would disarm
        if self._settime(self.fd, _TFD_TIMER_ABSTIME, spec, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def clear(self) -> None:
        """Consume the expiry (the descriptor is readable until then)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


_TFD_TIMER_ABSTIME = 1


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


class _RateDriver:
    """Sends one process's requests on its ``RateSchedule`` over its connections (see the module note).

    ``tick`` runs after every read of answers and every ``_TICK_S`` (the
    timer, periodic from the schedule's start); it sends what is due. While
    every connection's window is full, due requests wait for an answer to
    free a slot.
    """

    __slots__ = ("lat", "lag", "finished", "_schedule", "_protos", "_sent", "_rr", "_timer", "_error")

    def __init__(self, protos: list[_RateProtocol], schedule: RateSchedule) -> None:
        #: Latency of each answered request (seconds from its intended time).
        self.lat: array[float] = array("d")
        #: How late each request was sent against its intended time (seconds).
        self.lag: array[float] = array("d")
        self._schedule = schedule
        self._protos = protos
        self._sent = 0
        self._rr = 0
        #: Set when every request is answered (or a connection is lost).
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer: _TimerFd | None = None
        self._error: BaseException | None = None

    @property
    def unsent(self) -> int:
        """Requests of the schedule not sent (yet)."""
        return self._schedule.count - self._sent

    async def run(self, drain_s: float) -> None:
        """Send the whole schedule; wait for the answers, ``drain_s`` at most after the schedule's end.

        Raises:
            OSError: no timerfd on this system.
            BaseException: what a lost connection reported.
        """
        loop = asyncio.get_running_loop()
        self._timer = timer = _TimerFd()
        loop.add_reader(timer.fd, self._on_timer)
        for p in self._protos:
            p.driver = self
        end = self._schedule.intended(self._schedule.count)
        try:
            timer.arm(self._schedule.start, _TICK_S)
            await asyncio.wait_for(asyncio.shield(self.finished), max(0.0, end - perf_counter()) + drain_s)
        except TimeoutError:
            pass  # the report counts what is unanswered
        finally:
            loop.remove_reader(timer.fd)
            timer.close()
            self._timer = None
            for p in self._protos:
                p.driver = None
        if self._error is not None:
            raise self._error

    def lost(self, exc: BaseException) -> None:
        """A connection was lost: the run stops and fails."""
        self._error = self._error or exc
        if not self.finished.done():
            self.finished.set_result(None)

    def _on_timer(self) -> None:
        if self._timer is None:
            return
        self._timer.clear()
        self.tick()

    def tick(self) -> None:
        """Send every request due by now (see the class note)."""
        now = perf_counter()
        schedule = self._schedule
        due = schedule.due(now)
        k = self._sent
        if k < due:
            protos = self._protos
            n = len(protos)
            rr = self._rr
            lag = self.lag
            start, rate = schedule.start, schedule.rate
            touched = []
            full = False
            while k < due:
                for _ in range(n):
                    p = protos[rr]
                    rr = rr + 1 if rr + 1 < n else 0
                    if len(p.requests) < _RATE_WINDOW:
                        break
                else:
                    full = True
                    break
                intended = start + k / rate
                rid = p.requests.add(intended)
                pre, post = p.pool[p.seq % len(p.pool)]
                p.seq += 1
                if not p.out:
                    touched.append(p)
                p.out += (pre, _ID_BYTES[rid], post)
                lag.append(now - intended)
                k += 1
            self._sent = k
            self._rr = rr
            for p in touched:
                assert p.transport is not None
                p.transport.write(b"".join(p.out))
                p.out.clear()
            if full:
                return  # an answer frees a slot and ticks
        if k < schedule.count:
            return
        if not self.finished.done() and not any(p.requests for p in self._protos):
            self.finished.set_result(None)


#: The msgpack encoding of each open-loop request id (a positive fixint: the id's own byte).
_ID_BYTES = [bytes([i]) for i in range(_RATE_WINDOW + 1)]


def _draw_request(rng: random.Random, sampler: KeySampler, opts: BenchOptions, value: bytes, rid: int) -> bytes:
    key = _key(sampler.draw())
    if rng.random() < opts.ratio:
        return encode_request(Op.GET, rid, key)
    return encode_request(Op.SET, rid, key, value, None, 0)


def _build_batches(rng: random.Random, sampler: KeySampler, opts: BenchOptions, ids: list[int]) -> list[bytes]:
    """The closed loop's pool: batches of ``depth`` requests with the ids ``ids``, ``_POOL_REQUESTS`` requests at least."""
    value = b"x" * opts.value_size
    count = max(_POOL_BATCHES, math.ceil(_POOL_REQUESTS / len(ids)))
    return [b"".join(_draw_request(rng, sampler, opts, value, rid) for rid in ids) for _ in range(count)]


def _build_requests(rng: random.Random, sampler: KeySampler, opts: BenchOptions) -> list[tuple[bytes, bytes]]:
    """The open loop's pool: ``_POOL_REQUESTS`` requests, each split around its one-byte request id.

    A frame is the length, the array's header, the op (one byte each, then
    the id): encoded with id 1, the id is byte 6, and any id up to
    ``_RATE_WINDOW`` takes its place without changing the length.
    """
    value = b"x" * opts.value_size
    pool = []
    for _ in range(_POOL_REQUESTS):
        frame = _draw_request(rng, sampler, opts, value, 1)
        pool.append((frame[:6], frame[7:]))
    return pool


@lru_cache(maxsize=4)
def _ssl(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """This process's TLS context for the options' files (one per process: contexts do not cross processes)."""
    if ca is None and cert is None and key is None:
        return None
    return client_context(ca=ca, cert=cert, key=key)


_P = TypeVar("_P", bound=_BenchProtocol)


#: Most seconds a connection and its HELLO may take (a server that accepts and never answers would hang the run).
_CONNECT_TIMEOUT_S = 10.0


async def _open(opts: BenchOptions, proto: _P) -> _P:
    host, port = parse_address(opts.addr)
    loop = asyncio.get_running_loop()
    context = _ssl(opts.tls_ca, opts.tls_cert, opts.tls_key)
    async with asyncio.timeout(_CONNECT_TIMEOUT_S):
        await loop.create_connection(lambda: proto, host, port, ssl=context)
        await proto.roundtrip(Op.HELLO, PROTOCOL_VERSION, opts.auth_token, "dcache-bench")
    if proto.errors:
        raise RuntimeError("HELLO was refused (auth token?)")
    return proto


async def _wait_start(pipe: Connection) -> float:
    """Tell the parent this worker is ready; wait for the common start (wall clock); return it as ``perf_counter`` time."""
    pipe.send(("ready",))
    start_at: float = pipe.recv()
    start = perf_counter() + (start_at - time.time())
    await asyncio.sleep(max(0.0, start - perf_counter()))
    return start


async def _closed_loop(opts: BenchOptions, conns: int, rng: random.Random, sampler: KeySampler, pipe: Connection) -> dict[str, Any]:
    protos = [await _open(opts, _BenchProtocol(opts.depth)) for _ in range(conns)]
    pools = [_build_batches(rng, sampler, opts, p.batch_ids()) for p in protos]
    lat: array[float] = array("d")
    stop_at = await _wait_start(pipe) + opts.duration
    cpu = time.process_time()
    reporter = asyncio.ensure_future(_report(pipe, protos))
    try:
        await asyncio.gather(*(p.drive(pool, stop_at, lat) for p, pool in zip(protos, pools, strict=True)))
    finally:
        reporter.cancel()
    cpu = time.process_time() - cpu
    _close(protos)
    return {**_counts(protos), "lat": lat.tobytes(), "cpu_s": cpu, "elapsed_s": opts.duration}


async def _open_loop(
    opts: BenchOptions, conns: int, rate: float, phase: float, rng: random.Random, sampler: KeySampler, pipe: Connection
) -> dict[str, Any]:
    protos = [await _open(opts, _RateProtocol()) for _ in range(conns)]
    for p in protos:
        p.pool = _build_requests(rng, sampler, opts)
    start = await _wait_start(pipe) + phase
    driver = _RateDriver(protos, RateSchedule(start, rate, round(rate * opts.duration)))
    cpu = time.process_time()
    reporter = asyncio.ensure_future(_report(pipe, protos))
    try:
        await driver.run(_DRAIN_S)
    finally:
        reporter.cancel()
    cpu = time.process_time() - cpu
    _close(protos)
    last = max(p.last_answer for p in protos)
    return {
        **_counts(protos),
        "lat": driver.lat.tobytes(),
        "lag": driver.lag.tobytes(),
        "cpu_s": cpu,
        "elapsed_s": max(0.0, last - start),
        "unanswered": driver.unsent + sum(len(p.requests) for p in protos),
    }


async def _report(pipe: Connection, protos: Sequence[_BenchProtocol]) -> None:
    while True:
        await asyncio.sleep(1.0)
        pipe.send(("progress", sum(p.ops for p in protos), sum(p.errors for p in protos)))


def _counts(protos: Sequence[_BenchProtocol]) -> dict[str, int]:
    return {"ops": sum(p.ops for p in protos), "errors": sum(p.errors for p in protos)}


def _close(protos: Sequence[_BenchProtocol]) -> None:
    for p in protos:
        assert p.transport is not None
        p.transport.close()


async def _worker_main(opts: BenchOptions, conns: int, rate: float | None, phase: float, seed: int, pipe: Connection) -> None:
    rng = random.Random(seed)
    sampler = KeySampler(opts.keys, KeyDistribution.parse(opts.distribution), opts.hot_share, rng)
    if rate is None:
        payload = await _closed_loop(opts, conns, rng, sampler, pipe)
    else:
        payload = await _open_loop(opts, conns, rate, phase, rng, sampler, pipe)
    pipe.send(("done", payload))


def _worker(opts: BenchOptions, conns: int, rate: float | None, phase: float, seed: int, pipe: Connection) -> None:
    try:
        if opts.loop == "uvloop":
            import uvloop

            uvloop.run(_worker_main(opts, conns, rate, phase, seed, pipe))
        else:
            asyncio.run(_worker_main(opts, conns, rate, phase, seed, pipe))
    except Exception as exc:  # reported to the parent, which fails the run
        pipe.send(("error", f"{exc.__class__.__name__}: {exc}"))
    finally:
        pipe.close()


async def _populate(opts: BenchOptions) -> None:
    proto = await _open(opts, _BenchProtocol(1))
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


def _percentiles(samples: list[float], prefix: str = "") -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of sorted ``samples`` (seconds), in milliseconds."""
    names = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
    return {f"{prefix}{name}_ms": round(_percentile(samples, q) * 1000, 3) for name, q in names}


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
    workers = []
    pipes = []
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe()  # duplex: the start time goes back to the worker
        rate = None if opts.rate is None else opts.rate * share / opts.conns
        # the processes' schedules interleave rather than send together
        phase = 0.0 if rate is None else i / (procs * rate)
        p = ctx.Process(target=_worker, args=(opts, share, rate, phase, 1000 + i, child), daemon=True)
        p.start()
        child.close()
        workers.append(p)
        pipes.append(parent)
    ok = False
    try:
        payloads = _collect(opts, pipes, progress)
        ok = True
    finally:
        for p in workers:
            p.join(timeout=5 if ok else 0.1)
            if p.is_alive():
                p.kill()
    return _result(opts, procs, payloads)


#: Seconds the workers have to connect and build their pools.
_SETUP_S = 60.0


def _collect(opts: BenchOptions, pipes: list[Connection], progress: TextIO | None) -> list[dict[str, Any]]:
    """Start the workers together once all are ready; print progress; return their results.

    Raises:
        RuntimeError: a worker failed or did not finish in time.
    """
    n = len(pipes)
    ready: set[int] = set()
    done: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    counts = [0] * n
    start_at: float | None = None
    deadline = time.time() + _SETUP_S
    last_print = 0.0
    while len(done) + len(failures) < n and time.time() < deadline:
        for i, pipe in enumerate(pipes):
            if i in done or not pipe.poll(0.05):
                continue
            try:
                msg = pipe.recv()
            except EOFError:
                failures.append(f"worker {i} exited without a result")
                done[i] = {}
                continue
            if msg[0] == "ready":
                ready.add(i)
            elif msg[0] == "progress":
                counts[i] = msg[1]
            elif msg[0] == "done":
                done[i] = msg[1]
                counts[i] = msg[1]["ops"]
            else:
                failures.append(msg[1])
                done[i] = {}
        if failures and start_at is None:
            break  # the others wait for a start that will not come
        if start_at is None and len(ready) == n:
            start_at = time.time() + 0.2
            for pipe in pipes:
                pipe.send(start_at)
            deadline = start_at + opts.duration + _DRAIN_S + 30.0
        now = time.time()
        if progress is not None and start_at is not None and now - last_print >= 1.0 and now > start_at:
            elapsed = min(now - start_at, opts.duration)
            total = sum(counts)
            print(f"  {elapsed:5.1f}s  {total:>10} ops  {total / max(elapsed, 1e-9):>10.0f} ops/s", file=progress, flush=True)
            last_print = now
    if failures:
        raise RuntimeError("; ".join(failures))
    if len(done) < n:
        raise RuntimeError("the load-generating processes did not finish in time")
    return [done[i] for i in range(n)]


def _samples(payloads: list[dict[str, Any]], name: str) -> list[float]:
    values = array("d")
    for p in payloads:
        values.frombytes(p[name])
    return sorted(values)


def _result(opts: BenchOptions, procs: int, payloads: list[dict[str, Any]]) -> BenchResult:
    ops = sum(p["ops"] for p in payloads)
    result = BenchResult(
        mode="closed" if opts.rate is None else "rate",
        addr=opts.addr,
        conns=opts.conns,
        depth=opts.depth,
        procs=procs,
        loop=opts.loop,
        duration_s=opts.duration,
        ratio=opts.ratio,
        value_size=opts.value_size,
        keys=opts.keys,
        distribution=opts.distribution,
        hot_share=opts.hot_share,
        ops=ops,
        errors=sum(p["errors"] for p in payloads),
        ops_per_s=round(ops / opts.duration, 1),
    )
    # closed loop: each sample is a batch of `depth` requests; every batch has
    # the same size, so percentiles over batches equal those over requests.
    result.update(_percentiles(_samples(payloads, "lat")))
    elapsed = max(p["elapsed_s"] for p in payloads)
    result["generator_cpu"] = round(max(p["cpu_s"] for p in payloads) / max(elapsed, 1e-9), 2)
    if opts.rate is not None:
        achieved = ops / elapsed if elapsed > 0 else 0.0
        unanswered = sum(p["unanswered"] for p in payloads)
        result.update(
            ops_per_s=round(achieved, 1),
            target_rate=opts.rate,
            achieved_rate=round(achieved, 1),
            unanswered=unanswered,
            schedule_kept=achieved >= _KEPT_SHARE * opts.rate and unanswered == 0,
        )
        result.update(_percentiles(_samples(payloads, "lag"), "send_lag_"))
    return result


def format_result(result: BenchResult) -> str:
    """The human summary of a run (two lines; an open-loop run's has three, and a fourth when the schedule was not kept)."""
    lat = "  ".join(f"{name} {result[f'{name}_ms']} ms" for name in ("p50", "p90", "p99", "p999", "max"))
    setup = f"conns={result['conns']} procs={result['procs']} loop={result['loop']} keys={result['distribution']}" + (
        f" hot-share={result['hot_share']}" if result["hot_share"] else ""
    )
    if result["mode"] == "closed":
        return (
            f"{result['ops_per_s']:.0f} ops/s  ({result['ops']} ops, {result['errors']} errors in {result['duration_s']}s; "
            f"depth={result['depth']} {setup})\n"
            f"latency {lat}"
        )
    lines = [
        f"{result['achieved_rate']:.0f} ops/s achieved of {result['target_rate']:g} targeted  ({result['ops']} ops, "
        f"{result['errors']} errors, {result['unanswered']} unanswered in {result['duration_s']}s; {setup})",
        f"latency from the intended send time {lat}",
        f"send lag p50 {result['send_lag_p50_ms']} ms  p99 {result['send_lag_p99_ms']} ms  max {result['send_lag_max_ms']} ms; "
        f"generator CPU {result['generator_cpu']:.0%} of a core per process",
    ]
    if not result["schedule_kept"]:
        lines.append(
            "the schedule was not kept: a high send lag with the generator near 100% CPU means the generator fell behind, "
            "a low one the server"
        )
    return "\n".join(lines)
