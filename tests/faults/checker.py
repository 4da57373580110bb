"""A concurrent load checker over ``dcache.Client``: stale reads, resurrected deletes, lost acknowledged writes.

The model. Each writer task owns a set of keys and works on one key at a
time, so the history of a key is a sequence of ops ``0, 1, 2, ...``, each
started after the previous one ended. Op ``i`` is a SET of the value
``b"KEY|i"`` (so values grow with ``i``) or a DELETE. Per key the checker
keeps the index of the last op acknowledged (``acked``) and of the last op
started (``started``), on one event loop, so both are exact.

A read that starts when the key's last acknowledged op is ``lo`` and ends
when its last started op is ``hi`` may return the result of any op ``j``
with ``lo <= j <= hi`` (``j = -1``: the key's absence before any op). A
failed op may or may not have taken effect, so it is allowed while it is
the newest; once a later op is acknowledged it is superseded (versions are
ordered, last writer wins). Anything else is counted:

* **stale**: a value older than the last acknowledged op, or a miss, when
  that op was a SET;
* **resurrected**: a value older than the last acknowledged op, when that
  op was a DELETE (a delete brought back);
* **wrong**: a value no op wrote (another key's, unparsable, or from an op
  not started yet).

``verify()``, called after the load stopped (and the fault healed and the
cluster settled), reads every key once more: its value must be that of an
op ``>= acked`` (a **lost** acknowledged write or delete otherwise).
``owner_problems()`` reads each key from every owner in a ring directly
(GETV), for tests that require the replicas to converge.

Each writer's client talks to one master (``write_endpoints`` round-robin):
versions come from that master's clock, so a key's ops are ordered even if
two masters' clocks tie. Readers spread over ``read_endpoints``.

Deterministic and bounded: a seeded RNG per task, a paced loop, a stop
event, and every call bounded by the client's timeout.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dcache import Client
from dcache.protocol import Op
from dcache.ring import HashRing

__all__ = ["CheckerStats", "LoadChecker"]

SET = "SET"
DELETE = "DEL"
READ = "GET"
MGET = "MGET"

#: Problems kept verbatim for the report (counts are kept for all).
MAX_EXAMPLES = 20


@dataclass
class CheckerStats:
    """Counts so far; ``snapshot()`` copies them so a test can take differences."""

    sets_ok: int = 0
    deletes_ok: int = 0
    reads_ok: int = 0
    #: failed calls by ``"OP:ExceptionType"``
    failures: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    resurrected: int = 0
    wrong: int = 0
    lost: int = 0
    #: slowest call seen, by op, in seconds
    max_latency_s: dict[str, float] = field(default_factory=dict)

    @property
    def writes_ok(self) -> int:
        return self.sets_ok + self.deletes_ok

    @property
    def failed_writes(self) -> int:
        return sum(n for k, n in self.failures.items() if k.startswith((SET + ":", DELETE + ":")))

    @property
    def failed_reads(self) -> int:
        return sum(n for k, n in self.failures.items() if k.startswith((READ + ":", MGET + ":")))

    def copy(self) -> CheckerStats:
        return CheckerStats(
            self.sets_ok,
            self.deletes_ok,
            self.reads_ok,
            Counter(self.failures),
            self.stale,
            self.resurrected,
            self.wrong,
            self.lost,
            dict(self.max_latency_s),
        )

    def __sub__(self, other: CheckerStats) -> CheckerStats:
        """Counts between two snapshots (latencies: the later snapshot's)."""
        failures = Counter(self.failures)
        failures.subtract(other.failures)
        return CheckerStats(
            self.sets_ok - other.sets_ok,
            self.deletes_ok - other.deletes_ok,
            self.reads_ok - other.reads_ok,
            +failures,
            self.stale - other.stale,
            self.resurrected - other.resurrected,
            self.wrong - other.wrong,
            self.lost - other.lost,
            dict(self.max_latency_s),
        )

    def summary(self) -> str:
        lat = ", ".join(f"{op} {s:.2f}s" for op, s in sorted(self.max_latency_s.items()))
        return (
            f"sets {self.sets_ok}, deletes {self.deletes_ok}, reads {self.reads_ok}; "
            f"failed writes {self.failed_writes}, failed reads {self.failed_reads} {dict(self.failures)}; "
            f"stale {self.stale}, resurrected {self.resurrected}, wrong {self.wrong}, lost {self.lost}; "
            f"slowest: {lat}"
        )


def _clock(t: float) -> str:
    """Wall-clock time of day with milliseconds, to line problems up with the daemons' logs."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _now() -> str:
    return _clock(time.time())


class _Key:
    """The history of one key: which ops were deletes, and the acked/started marks."""

    __slots__ = ("name", "raw", "deletes", "acked", "started", "failed", "times")

    def __init__(self, name: str) -> None:
        self.name = name
        self.raw = name.encode()
        #: ``deletes[i]``: whether op ``i`` is a DELETE
        self.deletes: list[bool] = []
        self.acked = -1
        self.started = -1
        #: indexes of the ops that failed (their effect is unknown)
        self.failed: set[int] = set()
        #: ``times[i]``: wall-clock start and end of op ``i``
        self.times: list[tuple[float, float]] = []

    def value(self, i: int) -> bytes:
        return b"%s|%d" % (self.raw, i)


class LoadChecker:
    """Writers, readers and the checks of the module note; run with ``start()``/``stop()``.

    Args:
        write_endpoints: masters (``host:port``); writer ``w`` uses ``write_endpoints[w % n]`` only.
        read_endpoints: masters readers use (reader ``r`` uses ``read_endpoints[r % n]``); default: the writers'.
        writers, keys_per_writer, readers: the size of the load.
        delete_ratio: share of ops that delete a key that holds a value.
        mget_ratio: share of reads that are MGETs of several keys.
        pause_s: pause after each op of each task (paces the load on a shared machine).
        timeout: the clients' per-call timeout.
        seed: seeds every task's RNG.
        late_failures: a failed op may take effect after later ops (its
            request may still be on its way when the client gives up, and
            the master stamps the version when it arrives): with a slow
            client link, reading a failed op's result is never a problem.
        inspect: node id -> address of aux nodes to read directly (GETV)
            when a problem is found, so the report shows which copy was
            wrong (the first ``MAX_EXAMPLES`` problems only).
    """

    def __init__(
        self,
        write_endpoints: Sequence[str],
        read_endpoints: Sequence[str] | None = None,
        *,
        writers: int = 4,
        keys_per_writer: int = 25,
        readers: int = 4,
        delete_ratio: float = 0.1,
        mget_ratio: float = 0.2,
        pause_s: float = 0.005,
        timeout: float = 5.0,
        seed: int = 0,
        late_failures: bool = False,
        inspect: Mapping[str, str] | None = None,
    ) -> None:
        self.write_endpoints = list(write_endpoints)
        self.read_endpoints = list(read_endpoints or write_endpoints)
        self.readers = readers
        self.delete_ratio = delete_ratio
        self.mget_ratio = mget_ratio
        self.pause_s = pause_s
        self.timeout = timeout
        self.seed = seed
        self.late_failures = late_failures
        self.inspect = dict(inspect or {})
        self._inspections: set[asyncio.Task[None]] = set()
        prefix = f"chk-{uuid.uuid4().hex[:8]}"
        self.owned: list[list[_Key]] = [[_Key(f"{prefix}:w{w}:k{k}") for k in range(keys_per_writer)] for w in range(writers)]
        self.keys: list[_Key] = [k for ks in self.owned for k in ks]
        self.by_raw = {k.raw: k for k in self.keys}
        self.stats = CheckerStats()
        self.examples: list[str] = []
        self._stop_writers = asyncio.Event()
        self._stop_readers = asyncio.Event()
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._reader_tasks: list[asyncio.Task[None]] = []

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and reader tasks on the running loop."""
        self._writer_tasks = [asyncio.ensure_future(self._writer(w)) for w in range(len(self.owned))]
        self._reader_tasks = [asyncio.ensure_future(self._reader(r)) for r in range(self.readers)]

    async def stop_writers(self) -> None:
        """Stop the writers (readers go on); bounded by the client timeout."""
        self._stop_writers.set()
        await self._join(self._writer_tasks)

    async def stop(self) -> None:
        """Stop every task; bounded by the client timeout."""
        self._stop_writers.set()
        self._stop_readers.set()
        await self._join(self._writer_tasks + self._reader_tasks)
        if self._inspections:
            await asyncio.wait(self._inspections, timeout=10)

    async def _join(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self.timeout * 3 + 10)
        for t in pending:
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise RuntimeError("a checker task failed") from t.exception()
        assert not pending, f"{len(pending)} checker task(s) did not stop in time"

    def check_running(self) -> None:
        """Raise if a task died (a bug in the checker, not in the cluster)."""
        for t in self._writer_tasks + self._reader_tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise RuntimeError("a checker task failed") from t.exception()

    def snapshot(self) -> CheckerStats:
        """A copy of the counts now."""
        return self.stats.copy()

    async def progress(self, sets: int = 1, reads: int = 1, timeout: float = 30.0) -> None:
        """Wait (bounded) until ``sets`` more SETs and ``reads`` more reads succeeded."""
        start = self.snapshot()
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            d = self.stats - start
            if d.sets_ok >= sets and d.reads_ok >= reads:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made no progress in {timeout}s: {d.summary()}")
            await asyncio.sleep(0.05)

    # -- the tasks -------------------------------------------------------------------------

    def _failed(self, op: str, exc: BaseException) -> None:
        self.stats.failures[f"{op}:{exc.__class__.__name__}"] += 1

    def _latency(self, op: str, t0: float) -> None:
        took = time.monotonic() - t0
        if took > self.stats.max_latency_s.get(op, 0.0):
            self.stats.max_latency_s[op] = took

    async def _writer(self, w: int) -> None:
        rng = random.Random(f"{self.seed}:writer:{w}")
        keys = self.owned[w]
        endpoint = self.write_endpoints[w % len(self.write_endpoints)]
        stop = self._stop_writers
        async with Client(endpoint, timeout=self.timeout) as client:
            while not stop.is_set():
                key = rng.choice(keys)
                i = len(key.deletes)
                holds_value = bool(key.deletes) and not key.deletes[-1]
                delete = holds_value and rng.random() < self.delete_ratio
                key.deletes.append(delete)
                key.started = i
                op = DELETE if delete else SET
                t0 = time.monotonic()
                wall0 = time.time()
                try:
                    if delete:
                        await client.delete(key.raw)
                    else:
                        await client.set(key.raw, key.value(i))
                except Exception as exc:  # counted by type: the test decides what may fail
                    self._failed(op, exc)
                    key.failed.add(i)
                    key.times.append((wall0, time.time()))
                else:
                    key.times.append((wall0, time.time()))
                    key.acked = i
                    if delete:
                        self.stats.deletes_ok += 1
                    else:
                        self.stats.sets_ok += 1
                self._latency(op, t0)
                await asyncio.sleep(self.pause_s)

    async def _reader(self, r: int) -> None:
        rng = random.Random(f"{self.seed}:reader:{r}")
        endpoint = self.read_endpoints[r % len(self.read_endpoints)]
        stop = self._stop_readers
        async with Client(endpoint, timeout=self.timeout) as client:
            while not stop.is_set():
                if rng.random() < self.mget_ratio:
                    keys = rng.sample(self.keys, min(8, len(self.keys)))
                    op = MGET
                else:
                    keys = [rng.choice(self.keys)]
                    op = READ
                lows = [k.acked for k in keys]
                t0 = time.monotonic()
                try:
                    if op == MGET:
                        values = await client.mget([k.raw for k in keys])
                    else:
                        values = [await client.get(keys[0].raw)]
                except Exception as exc:
                    self._failed(op, exc)
                else:
                    self.stats.reads_ok += 1
                    for key, lo, value in zip(keys, lows, values, strict=True):
                        self._check(f"{op} via {endpoint}", key, lo, key.started, value)
                self._latency(op, t0)
                await asyncio.sleep(self.pause_s)

    # -- the checks -------------------------------------------------------------------------

    def _classify(self, key: _Key, lo: int, hi: int, value: bytes | None) -> str | None:
        """``None`` if ``value`` may be read between marks ``lo`` and ``hi``, else the kind of problem."""
        if value is None:
            if lo == -1 or any(key.deletes[lo : hi + 1]):
                return None
            if self.late_failures and any(key.deletes[j] for j in key.failed if j < lo):
                return None
            return "stale"
        name, sep, index = value.rpartition(b"|")
        if not sep or name != key.raw or not index.isdigit():
            return "wrong"
        j = int(index)
        if j > hi or j >= len(key.deletes) or key.deletes[j]:
            return "wrong"
        if j >= lo or (self.late_failures and j in key.failed):
            return None
        return "resurrected" if key.deletes[lo] else "stale"

    def _check(self, where: str, key: _Key, lo: int, hi: int, value: bytes | None) -> str | None:
        problem = self._classify(key, lo, hi, value)
        if problem is not None:
            setattr(self.stats, problem, getattr(self.stats, problem) + 1)
            if len(self.examples) < MAX_EXAMPLES:
                last = "none" if lo < 0 else ("DELETE" if key.deletes[lo] else f"SET {key.value(lo)!r}")
                self.examples.append(
                    f"{_now()} {problem}: {where} {key.name} returned {value!r}; last acknowledged op #{lo} {last}, "
                    f"last started #{hi}; history: {self._history(key, hi)}"
                )
                if self.inspect:
                    task = asyncio.ensure_future(self._inspect(key, len(self.examples) - 1))
                    self._inspections.add(task)
                    task.add_done_callback(self._inspections.discard)
        return problem

    def _history(self, key: _Key, hi: int, last: int = 4) -> str:
        """The key's last ops up to ``hi``: index, kind, outcome and wall-clock times."""
        parts = []
        for i in range(max(0, hi - last + 1), hi + 1):
            kind = "DEL" if key.deletes[i] else "SET"
            outcome = "failed" if i in key.failed else ("acked" if i <= key.acked else "in flight")
            span = "" if i >= len(key.times) else f" {_clock(key.times[i][0])}-{_clock(key.times[i][1])}"
            parts.append(f"#{i} {kind} {outcome}{span}")
        return ", ".join(parts)

    async def _inspect(self, key: _Key, example: int) -> None:
        """Append what each inspected node holds for ``key`` (value index or nil, and version) to an example."""
        held = []
        for node, addr in sorted(self.inspect.items()):
            try:
                async with Client(addr, timeout=1.0, retries=0) as c:
                    entry = await c.execute(Op.GETV, key.raw)
            except Exception as exc:
                held.append(f"{node}: {exc.__class__.__name__}")
                continue
            if entry is None:
                held.append(f"{node}: nil")
            else:
                held.append(f"{node}: {entry[0].rpartition(b'|')[2].decode(errors='replace')} v{entry[2]}")
        self.examples[example] += f"; copies {_now()}: " + ", ".join(held)

    async def verify(self, endpoint: str, timeout: float = 30.0) -> int:
        """Read every key once through ``endpoint``: count lost acknowledged ops (and stale/wrong values).

        Call after ``stop()``. Errors are retried until ``timeout``; keys
        still unreadable then are counted as lost. Returns the new problems.
        """
        before = self.stats.stale + self.stats.resurrected + self.stats.wrong + self.stats.lost
        deadline = time.monotonic() + timeout
        async with Client(endpoint, timeout=self.timeout) as client:
            for key in self.keys:
                while True:
                    try:
                        value = await client.get(key.raw)
                    except Exception as exc:
                        self._failed("VERIFY", exc)
                        if time.monotonic() < deadline:
                            await asyncio.sleep(0.1)
                            continue
                        self.stats.lost += 1
                        self.examples.append(f"{_now()} lost: {key.name} unreadable at the end ({exc!r})")
                        break
                    problem = self._classify(key, key.acked, key.started, value)
                    if problem == "stale":  # at the end, an older value or a miss: the acknowledged write is gone
                        self.stats.lost += 1
                        if len(self.examples) < MAX_EXAMPLES:
                            self.examples.append(f"{_now()} lost: {key.name} reads {value!r} at the end; last acknowledged op #{key.acked}")
                    elif problem is not None:
                        self._check("final GET", key, key.acked, key.started, value)
                    break
        return self.stats.stale + self.stats.resurrected + self.stats.wrong + self.stats.lost - before

    async def owner_problems(self, ring_info: Mapping[str, Any], addrs: Mapping[str, str]) -> list[str]:
        """Read every key from each of its owners in ``ring_info`` (a master's RING) directly.

        ``addrs`` maps node ids to the address to read them at (not through
        a fault proxy). Returns one line per copy that does not hold the
        key's latest acknowledged result; call after ``stop()``.
        """
        ring = HashRing.from_dict(ring_info["ring"])
        replicas = int(ring_info["replicas"])
        per_node: dict[str, list[_Key]] = {}
        for key in self.keys:
            for node in ring.owners(key.raw, replicas):
                per_node.setdefault(node, []).append(key)
        problems: list[str] = []
        for node, keys in sorted(per_node.items()):
            async with Client(addrs[node], timeout=self.timeout) as client:
                entries = await client.execute(Op.MGETV, [k.raw for k in keys])
            for key, entry in zip(keys, entries, strict=True):
                value = None if entry is None else entry[0]
                if self._classify(key, key.acked, key.started, value) is not None:
                    problems.append(f"{node} holds {value!r} for {key.name}; last acknowledged op #{key.acked}")
        return problems

    def report(self) -> str:
        """The counts and the first problems, for a test's output."""
        lines = [self.stats.summary(), *self.examples[:MAX_EXAMPLES]]
        return "\n".join(lines)
