"""Fuzz targets for every listener (aux node, master, HTTP shim): the engine.

Short runs are part of the suite (``tests/faults/test_fuzz.py``); long runs::

    make fuzz                                   # FUZZ_SECONDS per listener (default 60)
    python -m tests.faults.fuzz --seconds 300 --seed 7 master

A run starts the daemons its target needs on 127.0.0.1 (port 0), then for
``seconds``:

* fuzz workers send generated input to the listener: every op of
  ``dcache.protocol.Op`` (cluster ops too) with random and edge arguments,
  random msgpack objects, bad lengths, truncated and oversized frames,
  undecodable bytes, deeply nested objects, large frames, bursts of
  pipelined requests, and many connections opened and dropped (some with a
  reset); for HTTP, random methods, paths, headers and bodies (JSON and
  raw), malformed request heads, wrong lengths and dropped connections;
* a steady client writes and reads keys of its own and pings, checking
  every answer.

Counted and reported: crashes (a daemon exited), hangs (a steady PING or
health check slower than ``HANG_S``), INTERNAL answers (status 11, HTTP 500)
with the request that caused them, protocol violations (an answer that is
not ``[request_id, status, result]``, a request left unanswered, a 5xx other
than 503/504 for HTTP), wrong answers to the steady client, and the RSS of
each daemon before and after.

Inputs come from ``random.Random`` seeded per worker: a seed and a target
give the same sequence of cases per worker (timing differs). Operations a
daemon performs on purpose are kept away from the steady client's data:
fuzzed keys never start with ``steady:``, DROP never covers a range holding
a steady key, and the master's membership ops that would change the ring
when valid (JOIN, and LEAVE of a real node) are sent malformed or for
unknown node ids only; with a cluster credential (DESIGN.md §9) they will
need no such care.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import socket
import string
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgpack

from dcache import Client
from dcache.errors import RemoteProtocolError, Status
from dcache.protocol import OPS, FrameDecoder, Op
from dcache.ring import RING_SIZE, hash64, in_range
from tests.cluster import settled, wait_ring
from tests.harness import DaemonProcess

__all__ = ["FuzzReport", "TARGETS", "run_target", "main"]

TARGETS = ("aux", "master", "http")

#: A steady PING (or /health) slower than this is a hang.
HANG_S = 2.0
#: How long a fuzz request may wait for its answer before it counts as unanswered.
ANSWER_TIMEOUT_S = 5.0
#: Concurrent fuzz workers per run.
WORKERS = 3
#: Keys of the steady client (fuzzed keys never start with this).
STEADY_PREFIX = b"steady:"
STEADY_KEYS = 40
#: A frame larger than this may be cut short by a reset when the server closes
#: after an error without reading it all (Linux then drops the error frame).
UNREAD_RESET_BYTES = 64 * 1024
#: Connection-level statuses after which the server closes: protocol error,
#: frame too large, and OVERLOADED (17, being added).
_CLOSING = (1, 6, 17)
#: Connections opened and closed after the fuzzing, in batches held open briefly:
#: the first ``CHURN_WARMUP`` set the high-water mark, the RSS growth over
#: the rest is charged to them (a server that frees a closed connection's
#: memory stays flat; ``CHURN_BOUND_KIB_PER_CONN`` is generous).
CHURN_WARMUP = 1000
CHURN_CONNECTIONS = 2000
CHURN_BATCH = 250
CHURN_BOUND_KIB_PER_CONN = 8
#: Findings kept verbatim per kind (all are counted).
MAX_FINDINGS = 20
#: Fuzzed keys come from a bounded pool, so what the fuzzer stores stays bounded.
KEY_POOL = 1500
#: The aux node's memory budget in fuzz runs: far above what the bounded pools can store.
AUX_MAX_MEMORY = "96MB"

_INT_EDGES = [
    0, 1, -1, 2, 7, 255, 256, 1023, 1024, 1025, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63), -(2**63) + 1,
    3153600000000, 3153600000001, 10_000, 10_001,
]  # fmt: skip
_FLOAT_EDGES = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, 1e308, math.inf, -math.inf, math.nan]


# -- findings and the report ---------------------------------------------------------------


@dataclass
class Finding:
    """One problem, with the input that caused it."""

    kind: str
    detail: str
    request: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}" + (f"\n      request: {self.request}" if self.request else "")


@dataclass
class FuzzReport:
    """What a run did and found."""

    target: str
    seed: int
    seconds: float = 0.0
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: dict[str, list[Finding]] = field(default_factory=lambda: collections.defaultdict(list))
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    steady_ops: int = 0
    steady_max_ping_s: float = 0.0
    rss_kib: dict[str, tuple[int, int]] = field(default_factory=dict)
    recent: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    first_steady_failure: list[str] = field(default_factory=list)
    #: the listener's own counters at the end (STATS), native targets
    server: dict[str, Any] = field(default_factory=dict)
    #: RSS of the listener's process before and after ``CHURN_CONNECTIONS`` connections (KiB)
    churn_kib: tuple[int, int] = (0, 0)

    def add(self, kind: str, detail: str, request: str = "") -> None:
        self.counts[kind] += 1
        signature = detail[:160]
        kept = self.findings[kind]
        if len(kept) < MAX_FINDINGS and all(f.detail[:160] != signature for f in kept):
            kept.append(Finding(kind, detail, request))

    def note(self, case: str) -> None:
        """Remember a case that was just sent (the last few are shown next to a steady failure)."""
        self.recent.append(f"{time.monotonic():.3f} {case[:300]}")

    def rss_growth_kib(self) -> dict[str, int]:
        return {name: after - before for name, (before, after) in self.rss_kib.items()}

    def failures(self, rss_growth_bound_kib: int) -> list[str]:
        """Why the run fails (empty: it passed)."""
        out = [f"{self.counts[k]} {k}" for k in ("crash", "hang", "internal", "wrong", "violation") if self.counts[k]]
        out += [
            f"RSS of {n} grew {g} KiB (bound {rss_growth_bound_kib})" for n, g in self.rss_growth_kib().items() if g > rss_growth_bound_kib
        ]
        if self.churn_per_conn_kib() > CHURN_BOUND_KIB_PER_CONN:
            out.append(f"RSS grew {self.churn_per_conn_kib():.1f} KiB per connection opened and closed (bound {CHURN_BOUND_KIB_PER_CONN})")
        return out

    def churn_per_conn_kib(self) -> float:
        before, after = self.churn_kib
        return (after - before) / CHURN_CONNECTIONS if before and after else 0.0

    def summary(self) -> str:
        total = sum(self.cases.values())
        lines = [
            f"fuzz {self.target} (seed {self.seed}): {total} cases in {self.seconds:.1f} s ({total / max(self.seconds, 1e-9):.0f}/s)",
            f"  cases: {dict(sorted(self.cases.items()))}",
            f"  answers: {dict(sorted(self.answers.items()))}",
            f"  steady client: {self.steady_ops} ops, slowest ping {self.steady_max_ping_s:.3f} s",
            "  RSS KiB (before -> after): " + ", ".join(f"{n} {b} -> {a} ({a - b:+d})" for n, (b, a) in self.rss_kib.items()),
            f"  connection churn: RSS {self.churn_kib[0]} -> {self.churn_kib[1]} KiB over {CHURN_CONNECTIONS} connections "
            f"({self.churn_per_conn_kib():.1f} KiB per connection)",
            f"  listener STATS at the end: {self.server}",
            "  problems: " + (", ".join(f"{k} {n}" for k, n in sorted(self.counts.items())) or "none"),
        ]
        for kind in ("crash", "hang", "internal", "wrong", "violation", "note"):
            for f in self.findings.get(kind, []):
                lines.append("    " + str(f))
        if self.first_steady_failure:
            lines.append("  cases sent just before the steady client's first failure:")
            lines += ["    " + c for c in self.first_steady_failure]
        return "\n".join(lines)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- the daemons ---------------------------------------------------------------------------


class Target:
    """The daemons of one fuzz target; ``listener`` is the address fuzzed."""

    def __init__(self, kind: str, tmp: Path) -> None:
        if kind not in TARGETS:
            raise ValueError(f"unknown fuzz target {kind!r} (one of {', '.join(TARGETS)})")
        self.kind = kind
        self.tmp = tmp
        self.procs: dict[str, DaemonProcess] = {}
        self.listener = ""

    async def start(self) -> None:
        common = ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
        if self.kind == "aux":
            aux = self._aux("aux", common, [])
            self.listener = aux.addr
            return
        master = self.procs["master"] = DaemonProcess("master", [*common, "--node-id", "fz-m1", "--replicas", "2"]).start()
        for n in ("a1", "a2"):
            self._aux(n, common, ["--join", master.addr])
        await wait_ring(master.addr, settled({"fz-a1", "fz-a2"}), timeout=30, what="fuzz cluster up")
        self.listener = master.addr
        if self.kind == "http":
            http = self.procs["http"] = DaemonProcess("http", [*common, "--master", master.addr]).start()
            self.listener = http.addr

    def _aux(self, name: str, common: list[str], extra: list[str]) -> DaemonProcess:
        data = self.tmp / name
        data.mkdir(parents=True, exist_ok=True)
        args = [*common, "--node-id", f"fz-{name}", "--data-dir", str(data), "--snapshot-interval", "0", "--max-memory", AUX_MAX_MEMORY]
        proc = self.procs[name] = DaemonProcess("aux", [*args, *extra]).start()
        return proc

    @property
    def main(self) -> DaemonProcess:
        """The process that serves the listener."""
        return self.procs["aux" if self.kind == "aux" else self.kind]

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if not p.alive]

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()

    def logs(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.procs[name].stderr_lines[-lines:])


# -- generators ----------------------------------------------------------------------------


class Gen:
    """Random and edge values, from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random, keys: list[bytes], steady_hashes: list[int]) -> None:
        self.r = rng
        self.keys = keys
        self.steady_hashes = steady_hashes

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def int_(self) -> int:
        r = self.r
        roll = r.random()
        if roll < 0.5:
            return r.choice(_INT_EDGES)
        if roll < 0.8:
            return r.randint(-1000, 100_000)
        return r.randint(-(2**63), 2**64 - 1)

    def uint(self) -> int:
        return abs(self.int_()) % 2**64

    def float_(self) -> float:
        return self.r.choice(_FLOAT_EDGES) if self.chance(0.6) else self.r.uniform(-1e6, 1e6)

    def text(self, n: int | None = None) -> str:
        r = self.r
        n = r.choice([0, 1, 2, 8, 64, 1024, 1025]) if n is None else n
        alphabet = string.printable + "éß漢字🙂\u0000\u200b"
        return "".join(r.choice(alphabet) for _ in range(min(n, 4096)))

    def blob(self, n: int | None = None) -> bytes:
        r = self.r
        if n is None:
            n = r.choice([0, 1, 3, 16, 100, 1023, 1024, 1025, 4096, r.randint(0, 2048)])
        return r.randbytes(n)

    def key(self) -> Any:
        """Mostly a pooled key (valid or edge); never a steady key."""
        r = self.r
        roll = r.random()
        if roll < 0.85:
            return r.choice(self.keys)
        if roll < 0.9:
            return self.text(r.choice([1, 10, 1024, 1025]))
        return self.any(2)

    def value(self) -> Any:
        r = self.r
        roll = r.random()
        if roll < 0.7:
            return self.blob(r.choice([0, 1, 10, 100, 1000, 4000]))
        if roll < 0.85:
            return self.text(r.choice([0, 5, 100]))
        return self.any(2)

    def version(self) -> Any:
        r = self.r
        roll = r.random()
        if roll < 0.4:
            return (time.time_ns() // 1_000_000 << 22) + r.randint(-(10**9), 10**9)
        if roll < 0.8:
            return r.choice([0, 1, 2**63, 2**64 - 1, 2**64 - 2, 2**62, -1])
        return self.any(1)

    def expires_at(self) -> Any:
        r = self.r
        now = time.time_ns() // 1_000_000
        return r.choice([0, 0, 1, now - 1000, now + 60_000, now + 10**9, 2**63 - 1, 2**63, -1, self.any(1)])

    def ttl(self) -> Any:
        return self.r.choice([None, 1, 1000, 60_000, 0, -1, 3153600000000, 3153600000001, 2**63, self.float_(), self.any(1)])

    def point(self) -> int:
        return self.r.choice([0, 1, RING_SIZE - 1, RING_SIZE // 2, self.r.randrange(RING_SIZE)])

    def ranges(self, safe: bool) -> Any:
        """Hash ranges; with ``safe`` none covers a steady key (for DROP)."""
        r = self.r
        out: list[Any] = []
        for _ in range(r.choice([0, 1, 1, 2, 5])):
            rng: Any = [self.point(), self.point()]
            if r.random() < 0.1:
                rng = r.choice([[0, 0], [1, 0], [RING_SIZE - 1, 0], [0], [1, 2, 3], [-1, 5], [0, 2**64], "x", None])
            out.append(rng)
        if safe:
            out = [x for x in out if not self._covers_steady(x)]
        if r.random() < 0.05:
            return self.any(2)
        return out

    def _covers_steady(self, rng: Any) -> bool:
        if not (isinstance(rng, list) and len(rng) == 2 and all(type(b) is int and 0 <= b < RING_SIZE for b in rng)):
            return False  # malformed: the node refuses it
        return any(in_range(h, rng[0], rng[1]) for h in self.steady_hashes)

    def _maybe_packed(self, entries: list[Any]) -> Any:
        """APPLY's entries as they are, packed (a ``bin`` of their msgpack array), or a corrupt or non-array ``bin``."""
        r = self.r
        k = r.choice(["list", "list", "packed", "cut", "other"])
        if k == "list":
            return entries
        packed = msgpack.packb(entries, use_bin_type=True)
        if k == "packed":
            return packed
        if k == "cut":
            return packed[: r.randrange(len(packed))] + self.blob(3)
        return msgpack.packb(self.any(2), use_bin_type=True)

    def any(self, depth: int = 3) -> Any:
        """A random msgpack-encodable object."""
        r = self.r
        kinds = ["int", "float", "bool", "nil", "str", "bin", "ext", "ts"]
        if depth > 0:
            kinds += ["list", "list", "map"]
        k = r.choice(kinds)
        if k == "int":
            return self.int_()
        if k == "float":
            return self.float_()
        if k == "bool":
            return r.random() < 0.5
        if k == "nil":
            return None
        if k == "str":
            return self.text()
        if k == "bin":
            return self.blob()
        if k == "ext":
            return msgpack.ExtType(r.randint(0, 127), self.blob(r.choice([0, 1, 4, 8, 16, 30])))
        if k == "ts":
            return msgpack.Timestamp(r.randint(0, 2**34), r.randint(0, 999_999_999))
        if k == "list":
            return [self.any(depth - 1) for _ in range(r.choice([0, 1, 2, 3, 8]))]
        keys: list[Any] = [self.text(r.choice([1, 3, 8])) for _ in range(r.choice([0, 1, 3]))]
        if r.random() < 0.2:
            keys.append(r.choice([1, None, 1.5, b"bin-key"]))  # int/nil/float keys: refused by strict_map_key
        return {k2: self.any(depth - 1) for k2 in keys}

    # -- per-op arguments --------------------------------------------------------------

    def args_for(self, op: int, *, master: bool) -> list[Any]:
        """Arguments for ``op``: mostly the right shape with random or edge values."""
        r = self.r
        k, v = self.key, self.value
        table: dict[int, Callable[[], list[Any]]] = {
            Op.HELLO: lambda: [
                r.choice([1, 1, 0, 2, -1, "1", None]),
                r.choice([None, "", "token", self.any(1)]),
                r.choice([None, "fuzz", self.any(1)]),
            ],
            Op.PING: lambda: [],
            Op.GET: lambda: [k()],
            Op.SET: lambda: [k(), v(), self.ttl(), r.choice([0, 1, 2, 3, -1, None, self.any(1)])],
            Op.DELETE: lambda: [k()],
            Op.MGET: lambda: [self._keys()],
            Op.MSET: lambda: [[[k(), v()] for _ in range(r.choice([0, 1, 2, 10, 100]))] if r.random() < 0.9 else self.any(2), self.ttl()],
            Op.EXISTS: lambda: [k()],
            Op.EXPIRE: lambda: [k(), self.ttl()],
            Op.TTL: lambda: [k()],
            Op.INCR: lambda: [k(), self.int_()],
            Op.DECR: lambda: [k(), self.int_()],
            Op.TOUCH: lambda: [k()],
            Op.STATS: lambda: [],
            Op.PERSIST: lambda: [k()],
            Op.HOTKEYS: lambda: r.choice([[], [r.choice([1, 10, 100, 101, 0, -1, None])], [1, 2]]),
            Op.GETV: lambda: r.choice([[k()], [k(), r.choice([True, False, 1, None])]]),
            Op.INVACK: lambda: [r.choice([0, 1, 2**64 - 1, 2**64, -1, None, self.uint()])],
            Op.MGETV: lambda: [self._keys()],
            Op.SETV: lambda: [k(), v(), self.expires_at(), r.choice([0, 1, 2, 3, self.any(1)]), self.version()],
            Op.DELV: lambda: [k(), self.version()],
            Op.INCRV: lambda: [k(), self.int_(), self.version()],
            Op.APPLY: lambda: [self._maybe_packed([[k(), v(), self.expires_at(), self.version()] for _ in range(r.choice([0, 1, 3, 20]))])],
            Op.MSETV: lambda: [
                [[k(), v(), self.expires_at(), r.choice([0, 1, 2]), self.version()] for _ in range(r.choice([0, 1, 3, 20]))]
            ],
            Op.APPLY_DELETES: lambda: [[[k(), self.version()] for _ in range(r.choice([0, 1, 3, 20]))]],
            Op.SCAN: lambda: [
                self.ranges(False),
                r.choice([0, 0, 1, 2**32, 2**63, self.uint()]),
                r.choice([1, 10, 10_000, 10_001, 0, -1]),
                self.version(),
                *r.choice([[], [], [True], [False], [self.any(1)]]),
            ],
            Op.DROP: lambda: [self.ranges(True), r.choice([0, 0, 1, 2**32 + 5, self.uint()])],
            Op.RANGE_COUNT: lambda: [self.ranges(False)],
            Op.RING: lambda: [],
            Op.JOIN: self._bad_join if master else self._join,
            Op.LEAVE: lambda: [r.choice([f"fuzz-{r.randint(0, 9)}", "", self.any(1)])],
            # unknown node ids only: forgetting a real node is a real cluster op
            Op.FORGET: lambda: [r.choice([f"fuzz-{r.randint(0, 9)}", "", self.any(1)]), *r.choice(([], [None], [True], [self.any(1)]))],
            # unknown node ids only: fencing a real node is a real cluster op
            Op.FENCE: lambda: [r.choice([f"fuzz-{r.randint(0, 9)}", "", self.any(1)]), self.int_(), r.choice([None, "fuzz", self.any(1)])],
            Op.AUTH: lambda: [r.choice([b"n" * 16, b"", b"n" * 65, self.any(1)]), r.choice([b"p" * 32, b"p" * 31, self.any(1)])],
            # the first valid id binds a fuzzed aux node to a cluster of none (it has no masters); others are refused
            Op.BIND: lambda: [r.choice(["fuzz/c1", "fuzz/c2", "", "x" * 300, self.any(1)])],
            # the floor only rises, and refuses the writes of connections that sent an older epoch: a fuzzer's own
            Op.EPOCH: lambda: [r.choice([0, 1, 2**62, 2**64 - 1, 2**64, -1, self.any(1)]), *r.choice(([], [None], [0], [1], [2**64 - 1]))],
            Op.SYNC: lambda: [
                r.choice(["fuzz-f1", "fuzz-f2", "", self.any(1)]),
                r.choice([2**62, 2**63 - 1, self.any(1)]),
                self.int_(),
                r.choice([None, {}, {"epoch": 1, "seq": 0, "replicas": 1, "members": [], "ring": {}}, self.any(2)]),
            ],
        }
        args = table[op]()
        if master and op == Op.JOIN:
            return args  # built to be refused; a mutation could make it a real join
        lo, hi = OPS[op].arity
        if r.random() < 0.1:
            args = args[: r.randint(0, len(args))] if args and r.random() < 0.5 else args + [self.any(1)]
        elif len(args) > lo and r.random() < 0.3:
            args = args[: r.randint(lo, min(hi, len(args)))]  # optional arguments left out
        if args and r.random() < 0.1:
            args[r.randrange(len(args))] = self.any(2)  # one argument of any type
        return args

    def _keys(self) -> Any:
        r = self.r
        roll = r.random()
        if roll < 0.8:
            return [self.key() for _ in range(r.choice([0, 1, 2, 10, 100]))]
        if roll < 0.9:
            return [self.r.choice(self.keys)] * r.choice([1000, 10_000, 10_001, 20_000])
        return self.any(2)

    def _join(self) -> list[Any]:
        r = self.r
        return [self.text(r.choice([0, 5])), self.text(5), r.choice([0, 1, 65535, 65536, -1]), self.float_(), self.int_()]

    def _bad_join(self) -> list[Any]:
        """JOIN with one argument surely invalid (a valid one would change the ring)."""
        r = self.r
        args: list[Any] = [f"fuzz-{r.randint(0, 9)}", "127.0.0.1", r.choice([1, 9, 65535]), 1.0, 0]
        bad: list[list[Any]] = [
            ["", 7, None, b"id", [1]],
            [5, None, b"host", [1]],
            [0, -1, 65536, 2**64 - 1, "80", None, 1.5],
            [0, -1.0, math.nan, -math.inf, "1"],  # nil is valid: an optional argument left at its default
            [-1, "0", 1.5],
        ]
        i = r.randrange(5)
        args[i] = r.choice(bad[i])
        return args[: r.randint(max(3, i + 1), 5)]


def _pack(obj: Any) -> bytes | None:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True))
    except (OverflowError, ValueError, TypeError, UnicodeEncodeError):
        return None


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _show(data: bytes, obj: Any = None) -> str:
    """A request for a report: the decoded object (shortened) and the first bytes in hex."""
    head = data[:160].hex()
    more = f"... ({len(data)} bytes)" if len(data) > 160 else ""
    shown = repr(obj) if obj is not None else ""
    if len(shown) > 300:
        shown = shown[:300] + "..."
    return f"{shown} hex {head}{more}".strip()


# -- native protocol workers -------------------------------------------------------------


class _Unreachable(Exception):
    """A connection to the listener could not be opened."""


class _Conn:
    """A raw connection to a native listener: frames out, decoded answers in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.inbox: collections.deque[Any] = collections.deque()
        self.eof = False

    @classmethod
    async def open(cls, addr: str) -> _Conn:
        host, _, port = addr.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise _Unreachable(repr(exc)) from None
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), ANSWER_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError):
            return False
        return True

    async def recv(self, timeout: float) -> Any:
        """The next answer; ``EOFError`` once closed, ``TimeoutError`` if none in time, ``RemoteProtocolError`` if malformed."""
        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.eof:
                raise EOFError
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), left)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.eof = True
                continue
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    async def close(self, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.writer.transport.abort()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class NativeFuzzer:
    """Fuzz cases for a native-protocol listener (aux node or master)."""

    KINDS: ClassVar[dict[str, int]] = {
        "op": 60,
        "msgpack": 8,
        "pipeline": 5,
        "frame": 8,
        "garbage": 4,
        "deep": 2,
        "big": 1,
        "conns": 2,
    }

    def __init__(self, addr: str, report: FuzzReport, *, master: bool) -> None:
        self.kinds = dict(self.KINDS)
        self.addr = addr
        self.report = report
        self.master = master
        self.ops = [int(op) for op in Op] + [0, 16, 31, 47, 55, 99, 255, -1, 2**16]

    async def worker(self, gen: Gen, deadline: float) -> None:
        conn: _Conn | None = None
        kinds = list(self.kinds)
        weights = list(self.kinds.values())
        try:
            while time.monotonic() < deadline:
                kind = gen.r.choices(kinds, weights)[0]
                self.report.cases[kind] += 1
                try:
                    if kind in ("op", "msgpack", "pipeline", "big"):
                        if conn is None or conn.eof:
                            if conn is not None:
                                await conn.close()
                                conn = None
                            conn = await _Conn.open(self.addr)
                        keep = await getattr(self, f"_case_{kind}")(conn, gen)
                        if not keep:
                            await conn.close()
                            conn = None
                    else:
                        await getattr(self, f"_case_{kind}")(gen)
                except _Unreachable as exc:
                    self.report.add("violation", f"cannot connect to the listener: {exc}")
                    await asyncio.sleep(0.1)
                except (ConnectionError, OSError):
                    self.report.answers["connection reset"] += 1
                    if conn is not None:
                        await conn.close()
                        conn = None
                await asyncio.sleep(0)
        finally:
            if conn is not None:
                await conn.close()

    # -- checking answers ------------------------------------------------------------------

    def _check_answer(self, answer: Any, rid: Any, shown: str) -> None:
        rep = self.report
        if not (isinstance(answer, list) and len(answer) == 3 and type(answer[0]) is int and type(answer[1]) is int):
            if isinstance(answer, list) and len(answer) == 3 and type(answer[1]) is int and answer[1] == 0:
                rep.add("violation", f"a request with a non-integer id was executed, its answer carries that id: {answer!r:.120}", shown)
            else:
                rep.add("violation", f"answer is not [request_id, status, result]: {answer!r:.200}", shown)
            return
        got_rid, status, result = answer
        rep.answers[_status_name(status)] += 1
        if status == Status.INTERNAL:
            rep.add("internal", f"INTERNAL: {result!r:.200}", shown)
        elif status and not isinstance(result, str):
            rep.add("violation", f"error answer without a message: {answer!r:.200}", shown)
        if type(rid) is int and 0 < rid < 2**64 and got_rid not in (rid, 0):
            rep.add("violation", f"answer carries request id {got_rid}, the request had {rid}", shown)

    async def _exchange(self, conn: _Conn, obj: Any, rid: Any) -> bool:
        """Send one request object, check its one answer; False if the connection should be dropped."""
        body = _pack(obj)
        if body is None:
            self.report.cases["unencodable"] += 1
            return True
        data = _frame(body)
        shown = _show(data, obj)
        self.report.note(shown)
        if not await conn.send(data):
            return False
        try:
            answer = await conn.recv(ANSWER_TIMEOUT_S)
        except EOFError:
            self.report.add("violation", "connection closed without an answer to a well-formed frame", shown)
            return False
        except TimeoutError:
            self.report.add("violation", f"no answer within {ANSWER_TIMEOUT_S} s to a well-formed frame", shown)
            return False
        except RemoteProtocolError as exc:
            self.report.add("violation", f"undecodable answer: {exc}", shown)
            return False
        self._check_answer(answer, rid, shown)
        if _closes(answer):
            return False  # a connection-level error: the server closes
        return True

    # -- the cases -------------------------------------------------------------------------

    def _rid(self, gen: Gen) -> Any:
        if gen.chance(0.95):
            return gen.r.randint(1, 2**32 - 1)
        return gen.r.choice([0, -1, 2**64 - 1, 2**64, "id", None, 1.5, [1]])

    def _request(self, gen: Gen) -> tuple[list[Any], Any]:
        op = gen.r.choice(self.ops) if gen.chance(0.97) else gen.any(1)
        rid = self._rid(gen)
        known = isinstance(op, int) and op in OPS
        args = gen.args_for(op, master=self.master) if known else [gen.any(2) for _ in range(gen.r.randint(0, 3))]
        return [op, rid, *args], rid

    async def _case_op(self, conn: _Conn, gen: Gen) -> bool:
        obj, rid = self._request(gen)
        return await self._exchange(conn, obj, rid)

    async def _case_msgpack(self, conn: _Conn, gen: Gen) -> bool:
        obj = gen.any(4)
        if gen.chance(0.5):
            obj = [gen.any(1), gen.any(1), *(gen.any(2) for _ in range(gen.r.randint(0, 4)))]
        return await self._exchange(conn, obj, None)

    async def _case_big(self, conn: _Conn, gen: Gen) -> bool:
        r = gen.r
        size = r.choice([64 * 1024, 1024**2, 4 * 1024**2])
        key = b"fuzz-big-%d" % r.randint(0, 3)  # a few keys only: what is stored stays bounded
        obj: list[Any] = r.choice(
            [
                [Op.SET, r.randint(1, 2**31), key, r.randbytes(size)],
                [Op.MSET, r.randint(1, 2**31), [[key, r.randbytes(size // 4)] for _ in range(4)]],
                [Op.MGET, r.randint(1, 2**31), [key] * r.choice([1, 8, 16])],
                [Op.GET, r.randint(1, 2**31), key],
            ]
        )
        return await self._exchange(conn, obj, obj[1])

    async def _case_pipeline(self, conn: _Conn, gen: Gen) -> bool:
        """A burst of requests in one write; every one must be answered (in any order)."""
        n = gen.r.choice([2, 10, 50, 200])
        frames, rids = [], {}
        for i in range(n):
            obj, _ = self._request(gen)
            obj[1] = 10_000 + i  # distinct ids, so answers can be matched
            body = _pack(obj)
            if body is None:
                continue
            frames.append(_frame(body))
            rids[10_000 + i] = _show(frames[-1], obj)
        data = b"".join(frames)
        self.report.note(f"pipeline of {len(frames)} requests")
        if not await conn.send(data):
            return False
        pending = dict(rids)
        deadline = time.monotonic() + ANSWER_TIMEOUT_S * 2
        while pending:
            try:
                answer = await conn.recv(max(0.01, deadline - time.monotonic()))
            except EOFError:
                if len(data) > UNREAD_RESET_BYTES:
                    # the server closed (a frame it cannot decode) with our input unread: the reset drops its answers
                    self.report.add("note", "a large pipeline was cut short by a reset after a protocol error")
                else:
                    self.report.add(
                        "violation", f"connection closed with {len(pending)} pipelined request(s) unanswered", next(iter(pending.values()))
                    )
                return False
            except TimeoutError:
                self.report.add("violation", f"{len(pending)} pipelined request(s) unanswered", next(iter(pending.values())))
                return False
            except RemoteProtocolError as exc:
                self.report.add("violation", f"undecodable answer: {exc}", "")
                return False
            rid = answer[0] if isinstance(answer, list) and answer else None
            if rid == 0 and _closes(answer):
                # a frame the server cannot decode (a map key msgpack refuses): the
                # requests before it were answered, the rest never will be
                self._check_answer(answer, None, "")
                return False
            shown = pending.pop(rid, None) if type(rid) is int else None
            if shown is None:
                self.report.add("violation", f"answer to no pipelined request: {answer!r:.200}")
                return False
            self._check_answer(answer, rid, shown)
        return True

    async def _case_frame(self, gen: Gen) -> None:
        """Bad lengths: empty, oversized, truncated, mismatched, undecodable; the server must answer or close."""
        r = gen.r
        ping = bytes(msgpack.packb([Op.PING, 1]))
        variant = r.choice(["zero", "huge", "truncated", "longer", "shorter", "c1", "bigcontainer", "split", "two-in-one"])
        if variant == "zero":
            data, expect_close = b"\0\0\0\0", True
        elif variant == "huge":
            n = r.choice([32 * 1024**2 + 1, 2**31, 2**32 - 1])
            data, expect_close = struct.pack(">I", n) + b"\x92\x02", True
        elif variant == "truncated":
            data, expect_close = struct.pack(">I", r.choice([10, 1000, 100_000])) + r.randbytes(r.randint(0, 9)), False
        elif variant == "longer":
            data, expect_close = struct.pack(">I", len(ping) + 2) + ping + b"\xc0\xc0", True
        elif variant == "shorter":
            data, expect_close = struct.pack(">I", len(ping) - 1) + ping, True
        elif variant == "c1":
            data, expect_close = _frame(b"\xc1"), True
        elif variant == "bigcontainer":
            data, expect_close = (
                _frame(r.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff"])),
                True,
            )
        elif variant == "two-in-one":
            data, expect_close = _frame(ping + ping), True
        else:  # a valid PING sent one byte at a time
            data, expect_close = _frame(ping), False
        shown = f"{variant}: " + _show(data)
        self.report.note(shown)
        conn = await _Conn.open(self.addr)
        try:
            if variant == "split":
                for b in data:
                    if not await conn.send(bytes([b])):
                        break
                try:
                    self._check_answer(await conn.recv(ANSWER_TIMEOUT_S), 1, shown)
                except (EOFError, TimeoutError, RemoteProtocolError) as exc:
                    self.report.add("violation", f"PING sent byte by byte got no answer ({exc.__class__.__name__})", shown)
                return
            await conn.send(data)
            if not expect_close:
                return  # truncated: the server waits for the rest; we drop the connection
            try:
                while True:
                    answer = await conn.recv(ANSWER_TIMEOUT_S)
                    self._check_answer(answer, None, shown)
            except EOFError:
                pass
            except TimeoutError:
                self.report.add("violation", f"bad frame ({variant}) neither answered with an error and a close, nor closed", shown)
            except RemoteProtocolError as exc:
                self.report.add("violation", f"undecodable answer: {exc}", shown)
        finally:
            await conn.close(reset=gen.chance(0.3))

    async def _case_garbage(self, gen: Gen) -> None:
        data = gen.blob(gen.r.choice([1, 3, 4, 7, 64, 1000]))
        shown = "garbage: " + _show(data)
        self.report.note(shown)
        conn = await _Conn.open(self.addr)
        try:
            await conn.send(data)
            try:
                while True:
                    self._check_answer(await conn.recv(0.3), None, shown)
            except (EOFError, TimeoutError):
                pass
            except RemoteProtocolError as exc:
                self.report.add("violation", f"undecodable answer: {exc}", shown)
        finally:
            await conn.close(reset=gen.chance(0.5))

    async def _case_deep(self, gen: Gen) -> None:
        """Deeply nested arrays and maps inside one frame."""
        depth = gen.r.choice([100, 1000, 5000, 100_000])
        body = (b"\x91" if gen.chance(0.7) else b"\x81\xa1k") * depth + b"\xc0"
        if gen.chance(0.5):
            body = b"\x93\x03\x01" + body  # as GET's key: [3, 1, [[[...]]]]
        data = _frame(body)
        shown = f"nested {depth} deep: " + _show(data)
        self.report.note(shown)
        conn = await _Conn.open(self.addr)
        try:
            await conn.send(data)
            try:
                self._check_answer(await conn.recv(ANSWER_TIMEOUT_S), None, shown)
            except EOFError:
                if len(data) > UNREAD_RESET_BYTES:
                    self.report.add("note", "closed without an answer to a large nested object (its unread rest reset the connection)")
                else:
                    self.report.add("violation", "closed without an answer to a nested object", shown)
            except TimeoutError:
                self.report.add("violation", "no answer to a nested object", shown)
            except RemoteProtocolError as exc:
                self.report.add("violation", f"undecodable answer: {exc}", shown)
        finally:
            await conn.close()

    async def _case_conns(self, gen: Gen) -> None:
        """Many connections opened and dropped: idle, half a header, half a frame, a request unread."""
        r = gen.r
        n = r.choice([5, 20, 50])
        self.report.note(f"{n} connections opened and dropped")
        conns: list[_Conn] = []
        try:
            for _ in range(n):
                try:
                    conns.append(await _Conn.open(self.addr))
                except _Unreachable as exc:
                    self.report.add("violation", f"connection {len(conns) + 1} of {n} refused: {exc}")
                    break
            ping = _frame(bytes(msgpack.packb([Op.PING, 1])))
            for c in conns:
                what = r.choice(["idle", "header", "half", "unread"])
                if what == "header":
                    await c.send(b"\0\0")
                elif what == "half":
                    await c.send(ping[:-1])
                elif what == "unread":
                    await c.send(ping * r.choice([1, 100]))
            while conns:
                await conns.pop().close(reset=r.random() < 0.5)
        finally:
            for c in conns:  # the worker was cancelled at the deadline: no connection left for the collector
                c.writer.close()


def _closes(answer: Any) -> bool:
    """Whether ``answer`` is a connection-level error frame after which the server closes."""
    return isinstance(answer, list) and len(answer) == 3 and answer[0] == 0 and answer[1] in _CLOSING


def _status_name(status: Any) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


# -- the steady client (native) -------------------------------------------------------------


async def steady_native(addr: str, report: FuzzReport, stop: asyncio.Event, seed: int) -> None:
    """Write and read keys of its own through the listener; check every answer; time PINGs."""
    rng = random.Random(f"{seed}:steady")
    expected: dict[bytes, bytes | None] = {}
    keys = [STEADY_PREFIX + b"%d" % i for i in range(STEADY_KEYS)]

    def failed(what: str) -> None:
        report.add("wrong", what)
        if not report.first_steady_failure:
            report.first_steady_failure = [f"(failure at {time.monotonic():.3f}) {what}", *list(report.recent)[-12:]]

    async with Client(addr, timeout=5.0) as c:
        while not stop.is_set():
            key = rng.choice(keys)
            try:
                roll = rng.random()
                if roll < 0.45:
                    value = rng.randbytes(rng.choice([0, 10, 200, 3000]))
                    if await c.set(key, value) is not True:
                        failed(f"SET {key!r} did not answer True")
                    expected[key] = value
                elif roll < 0.5:
                    await c.delete(key)
                    expected[key] = None
                elif roll < 0.85:
                    got = await c.get(key)
                    if key in expected and got != expected[key]:
                        failed(f"GET {key!r}: {got!r:.80} instead of {expected[key]!r:.80}")
                else:
                    some = rng.sample(keys, 5)
                    got_many = await c.mget(some)
                    for k, g in zip(some, got_many, strict=True):
                        if k in expected and g != expected[k]:
                            failed(f"MGET {k!r}: {g!r:.80} instead of {expected[k]!r:.80}")
                t0 = time.monotonic()
                await c.ping()
                took = time.monotonic() - t0
                report.steady_max_ping_s = max(report.steady_max_ping_s, took)
                if took > HANG_S:
                    report.add("hang", f"PING took {took:.2f} s")
                report.steady_ops += 1
            except TimeoutError:
                report.add("hang", "a steady call timed out (5 s)")
                expected.pop(key, None)  # unknown outcome
            except Exception as exc:
                failed(f"steady call failed: {exc!r}")
                expected.pop(key, None)
            await asyncio.sleep(0.01)


# -- HTTP ----------------------------------------------------------------------------------


_HTTP_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "FOO", "G E T", ""]
_HTTP_PATHS = [
    "/data", "/data/", "/data/{k}", "/api/get/{k}", "/api/post?key={k}&value={v}", "/api/post?key={k}", "/api/post",
    "/health", "/metrics", "/openapi.yaml", "/", "*", "/data/{k}?ttl={t}", "/data//{k}", "/data/%2e%2e/%2e%2e/etc/passwd",
    "/data/%ff%fe", "/data/%00", "/data/%", "/data/a%2Fb", "/api/get/", "/nope", "//data/x", "/data/{k}/{k}",
]  # fmt: skip
_CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", "application/octet-stream", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1", "", "*/*",
]  # fmt: skip


class HttpFuzzer:
    """Fuzz cases for the HTTP shim: raw HTTP/1.1 over TCP, so anything can be sent."""

    KINDS: ClassVar[dict[str, int]] = {"route": 60, "random": 15, "malformed": 15, "conns": 3, "big": 2}

    def __init__(self, addr: str, report: FuzzReport) -> None:
        self.kinds = dict(self.KINDS)
        self.host, _, port = addr.rpartition(":")
        self.port = int(port)
        self.report = report

    def _path_key(self, gen: Gen) -> str:
        r = gen.r
        roll = r.random()
        if roll < 0.6:
            return "fz" + "".join(r.choice(string.ascii_letters + string.digits + "-_.~") for _ in range(r.randint(1, 20)))
        if roll < 0.8:
            return "".join(r.choice("%2F%20%C3%A9%ff%00ab/.:;@&=+$,") for _ in range(r.choice([1, 5, 50, 1100])))
        return "fz" + "".join(r.choice(string.printable) for _ in range(r.randint(1, 30))).replace(" ", "%20")

    def _json_body(self, gen: Gen) -> bytes:
        r = gen.r
        obj: Any
        roll = r.random()
        if roll < 0.6:
            obj = {
                "key": r.choice(["fz" + gen.text(r.choice([1, 8])), "", "fz" + gen.text(1025), 5, None, ["k"]]),
                "value": r.choice([gen.text(), 5, None, {"a": 1}, True, ""]),
            }
            if r.random() < 0.5:
                obj["ttl"] = r.choice([1, 60, 0, -1, 1.5, "10", None, True, 1e300, 3153600001])
            if r.random() < 0.2:
                obj[gen.text(3)] = gen.text(3)
        elif roll < 0.8:
            obj = _json_any(gen, 3)
        else:
            return gen.r.choice(
                [
                    b"{",
                    b'{"key": "a", "value": "\\ud800"}',
                    b"\xff\xfe{}",
                    b"null",
                    b'{"key": "a", "value": "b"}' * 2,
                    b"[1,2",
                    b'{"key":"a","value":"b",}',
                    b"NaN",
                ]
            )
        try:
            return json.dumps(obj, allow_nan=True).encode()
        except (TypeError, ValueError):
            return b"{}"

    def _request(self, gen: Gen) -> tuple[bytes, bool]:
        """A well-formed HTTP/1.1 request on a route (random method, path, headers, body); (bytes, has a full head)."""
        r = gen.r
        method = r.choice(["GET", "GET", "POST", "PUT", "DELETE"] + _HTTP_METHODS)
        path = r.choice(_HTTP_PATHS).format(
            k=self._path_key(gen),
            v=gen.text(r.choice([1, 10, 5000])).replace(" ", "+")[:6000],
            t=r.choice(["1", "0", "-1", "abc", "1.5", "99999999999999999999"]),
        )
        headers = {"Host": "127.0.0.1", "Connection": "close"}
        if r.random() < 0.6:
            headers["Content-Type"] = r.choice(_CONTENT_TYPES)
        if r.random() < 0.4:
            headers["Accept"] = r.choice(
                [
                    "application/json",
                    "application/octet-stream",
                    "*/*",
                    "text/html",
                    "application/json;q=0.5, application/octet-stream",
                    "",
                    "garbage/;;;",
                ]
            )
        if r.random() < 0.1:
            headers[gen.text(5).replace("\r", "").replace("\n", "").replace(":", "") or "X"] = (
                gen.text(10).replace("\r", "").replace("\n", "")
            )
        body = b""
        if method in ("POST", "PUT", "PATCH") or r.random() < 0.1:
            body = self._json_body(gen) if r.random() < 0.6 else gen.blob(r.choice([0, 10, 1000, 65536]))
        headers["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        return head.encode("utf-8", "surrogateescape") + body, True

    def _malformed(self, gen: Gen) -> tuple[bytes, bool]:
        r = gen.r
        ok_head = "GET /health HTTP/1.1\r\nHost: x\r\n"
        noise = r.randbytes(r.choice([1, 10, 200]))
        variants: list[tuple[bytes, bool]] = [
            (b"GET /health\r\n\r\n", True),
            (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", True),
            (b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", True),
            (b"GET /health HTTP/1.1\r\n" + b"X-A: " + b"a" * 20000 + b"\r\n\r\n", True),
            ((ok_head + "X: y\r\n" * 200 + "\r\n").encode(), True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}", True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{}", True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", True),
            (b"POST /data HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n", True),
            (
                b'POST /data HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\n{"key\r\n0\r\n\r\n',
                True,
            ),
            (b"PUT /data/fz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort", False),
            (b"GET /he", False),
            (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + r.randbytes(40), True),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", True),
            # only CR and LF bytes are empty lines before a request, which a server ignores (RFC 9112, 2.2): no answer due
            (noise + b"\r\n\r\n", bool(noise.strip(b"\r\n"))),
            (b"GET /data/" + r.randbytes(20).replace(b" ", b"") + b" HTTP/1.1\r\nHost: x\r\n\r\n", True),
            (b"GET /health HTTP/1.1\nHost: x\n\n", True),
            (b"DELETE /data/fz%zz HTTP/1.1\r\nHost: x\r\n\r\n", True),
        ]
        return r.choice(variants)

    async def _send(self, data: bytes, full: bool, shown: str, reset: bool) -> None:
        """Send one request; read the answer (bounded); check its status."""
        self.report.note(shown)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            self.report.add("violation", f"connection refused: {exc!r}", shown)
            return
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT_S)
            if not full:
                return
            try:
                status, body = await asyncio.wait_for(_read_http(reader), ANSWER_TIMEOUT_S * 2)
            except TimeoutError:
                self.report.add("violation", f"no HTTP answer within {ANSWER_TIMEOUT_S * 2} s", shown)
                return
            self.report.answers[str(status)] += 1
            if status == 500:
                self.report.add("internal", f"HTTP 500: {body[:200]!r}", shown)
            elif status >= 500 and status not in (503, 504):
                self.report.add("violation", f"HTTP {status} for bad input: {body[:200]!r}", shown)
            elif status == 0 and body:
                self.report.add("note", f"not an HTTP answer: {body[:100]!r}", shown)
        except (ConnectionError, OSError, TimeoutError):
            self.report.answers["reset"] += 1
        finally:
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                writer.transport.abort()
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def worker(self, gen: Gen, deadline: float) -> None:
        kinds, weights = list(self.kinds), list(self.kinds.values())
        while time.monotonic() < deadline:
            kind = gen.r.choices(kinds, weights)[0]
            self.report.cases[kind] += 1
            if kind == "route":
                data, full = self._request(gen)
            elif kind == "random":
                r = gen.r
                method = (
                    r.choice(_HTTP_METHODS)
                    if r.random() < 0.5
                    else gen.text(r.choice([1, 5, 20])).replace(" ", "").replace("\r\n", "") or "X"
                )
                path = "/" + gen.text(r.choice([0, 5, 100, 9000])).replace(" ", "%20").replace("\r", "").replace("\n", "")
                data, full = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("utf-8", "surrogateescape"), True
            elif kind == "malformed":
                data, full = self._malformed(gen)
            elif kind == "big":
                size = gen.r.choice([1024**2, 1024**2 + 4097, 3 * 1024**2])
                body = b'{"key": "fz-big", "value": "' + b"v" * size + b'"}' if gen.chance(0.5) else b"v" * size
                method_path = "POST /data" if body.startswith(b"{") else "PUT /data/fz-big"
                data = (
                    f"{method_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                full = True
            else:
                await self._conns(gen)
                continue
            await self._send(data, full, f"{kind}: {data[:300]!r}", reset=gen.chance(0.1))

    async def _conns(self, gen: Gen) -> None:
        n = gen.r.choice([5, 20, 50])
        self.report.note(f"{n} HTTP connections opened and dropped")
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(n):
                try:
                    _, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), ANSWER_TIMEOUT_S)
                except (OSError, TimeoutError) as exc:
                    self.report.add("violation", f"HTTP connection refused: {exc!r}")
                    break
                writers.append(w)
                w.write(
                    gen.r.choice(
                        [
                            b"",
                            b"GET /hea",
                            b"POST /data HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",
                            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                        ]
                    )
                )
            for w in writers:
                if gen.chance(0.5):
                    w.transport.abort()
                w.close()
                try:
                    await w.wait_closed()
                except (ConnectionError, OSError):
                    pass
        finally:
            for w in writers:  # the worker was cancelled at the deadline: no connection left for the collector
                w.close()


def _json_any(gen: Gen, depth: int) -> Any:
    r = gen.r
    k = r.choice(["int", "float", "str", "bool", "null", "list", "obj"] if depth else ["int", "str", "null"])
    if k == "int":
        return gen.int_() if r.random() < 0.8 else 10**400
    if k == "float":
        return gen.float_()
    if k == "str":
        return gen.text()
    if k == "bool":
        return r.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [_json_any(gen, depth - 1) for _ in range(r.choice([0, 1, 3]))]
    return {gen.text(r.choice([1, 3, 10])): _json_any(gen, depth - 1) for _ in range(r.choice([0, 1, 3]))}


async def _read_http(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP answer (body: by Content-Length, or up to EOF); status 0 if not HTTP."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await reader.read(65536)
        if not chunk:
            break
        head += chunk
        if len(head) > 1 << 20:
            break
    if not head.startswith(b"HTTP/"):
        return 0, head[:200]
    line, _, rest = head.partition(b"\r\n")
    parts = line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers, _, body = rest.partition(b"\r\n\r\n")
    length = None
    for h in headers.split(b"\r\n"):
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    while length is not None and len(body) < length:
        chunk = await reader.read(65536)
        if not chunk:
            break
        body += chunk
    return status, body


async def steady_http(addr: str, report: FuzzReport, stop: asyncio.Event, seed: int) -> None:
    """Through the shim: PUT and GET keys of its own, check the answers; time /health."""
    import aiohttp

    rng = random.Random(f"{seed}:steady-http")
    base = f"http://{addr}"
    expected: dict[str, bytes | None] = {}
    keys = [(STEADY_PREFIX + b"%d" % i).decode() for i in range(STEADY_KEYS)]

    def failed(what: str) -> None:
        report.add("wrong", what)
        if not report.first_steady_failure:
            report.first_steady_failure = [f"(failure at {time.monotonic():.3f}) {what}", *list(report.recent)[-12:]]

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while not stop.is_set():
            key = rng.choice(keys)
            try:
                roll = rng.random()
                if roll < 0.4:
                    value = rng.randbytes(rng.choice([0, 10, 300]))
                    async with s.put(f"{base}/data/{key}", data=value) as resp:
                        if resp.status != 201:
                            failed(f"PUT {key}: HTTP {resp.status} {await resp.text()!r:.100}")
                        expected[key] = value
                elif roll < 0.5:
                    async with s.delete(f"{base}/data/{key}") as resp:
                        if resp.status != 200:
                            failed(f"DELETE {key}: HTTP {resp.status}")
                        expected[key] = None
                else:
                    async with s.get(f"{base}/data/{key}", headers={"Accept": "application/octet-stream"}) as resp:
                        body = await resp.read()
                        if key in expected:
                            want = expected[key]
                            if want is None and resp.status != 404:
                                failed(f"GET {key}: HTTP {resp.status} instead of 404")
                            elif want is not None and (resp.status != 200 or body != want):
                                failed(f"GET {key}: HTTP {resp.status} {body!r:.80} instead of {want!r:.80}")
                t0 = time.monotonic()
                async with s.get(f"{base}/health") as resp:
                    await resp.read()
                    if resp.status != 200:
                        failed(f"/health: HTTP {resp.status}")
                took = time.monotonic() - t0
                report.steady_max_ping_s = max(report.steady_max_ping_s, took)
                if took > HANG_S:
                    report.add("hang", f"/health took {took:.2f} s")
                report.steady_ops += 1
            except TimeoutError:
                report.add("hang", "a steady HTTP call timed out (10 s)")
                expected.pop(key, None)
            except Exception as exc:
                failed(f"steady HTTP call failed: {exc!r}")
                expected.pop(key, None)
            await asyncio.sleep(0.01)


# -- running -------------------------------------------------------------------------------


def _key_pool(rng: random.Random) -> list[bytes]:
    pool = [b"k", b"fz", b"x" * 1024, b"x" * 1025, "é".encode(), b"\x00", b"\xff" * 10, b"fz-int", b"fz-neg"]
    while len(pool) < KEY_POOL:
        k = b"fz:" + rng.randbytes(rng.choice([1, 4, 8, 20]))
        pool.append(k)
    return pool


async def run_target(kind: str, seconds: float, seed: int = 1, *, cases: Sequence[str] = ()) -> FuzzReport:
    """Start ``kind``'s daemons, fuzz its listener for ``seconds``, stop them; the report.

    ``cases`` limits the fuzzer to those case kinds (default: all, weighted).
    """
    report = FuzzReport(kind, seed)
    with tempfile.TemporaryDirectory(prefix=f"dcache-fuzz-{kind}-") as scratch:
        target = Target(kind, Path(scratch))
        try:
            await target.start()
            await _fuzz(target, report, seconds, seed, cases)
        finally:
            target.close()
    return report


async def _fuzz(target: Target, report: FuzzReport, seconds: float, seed: int, cases: Sequence[str]) -> None:
    rng = random.Random(seed)
    keys = _key_pool(rng)
    steady_hashes = [hash64(STEADY_PREFIX + b"%d" % i) for i in range(STEADY_KEYS)]
    stop = asyncio.Event()
    steady_fn = steady_http if target.kind == "http" else steady_native
    steady = asyncio.ensure_future(steady_fn(target.listener, report, stop, seed))
    await asyncio.sleep(0.5)  # the steady client's first keys exist before the fuzzing starts
    report.rss_kib = {name: (rss_kib(p.proc.pid), 0) for name, p in target.procs.items() if p.proc is not None}
    fuzzer: NativeFuzzer | HttpFuzzer
    if target.kind == "http":
        fuzzer = HttpFuzzer(target.listener, report)
    else:
        fuzzer = NativeFuzzer(target.listener, report, master=target.kind == "master")
    if cases:
        unknown = set(cases) - set(fuzzer.kinds)
        if unknown:
            raise ValueError(f"unknown case kinds {sorted(unknown)} (known: {', '.join(fuzzer.kinds)})")
        fuzzer.kinds = {k: w for k, w in fuzzer.kinds.items() if k in cases}
    t0 = time.monotonic()
    deadline = t0 + seconds
    workers = [
        asyncio.ensure_future(fuzzer.worker(Gen(random.Random(f"{seed}:{w}"), keys, steady_hashes), deadline)) for w in range(WORKERS)
    ]
    try:
        while time.monotonic() < deadline and not all(w.done() for w in workers):
            dead = target.dead()
            if dead:
                for name in dead:
                    proc = target.procs[name].proc
                    code = proc.returncode if proc is not None else "?"
                    report.add("crash", f"{name} exited with {code}: {target.logs(name, 30)}")
                    if not report.first_steady_failure:
                        report.first_steady_failure = [f"(crash at {time.monotonic():.3f})", *list(report.recent)[-12:]]
                break
            await asyncio.sleep(0.2)
    finally:
        for w in workers:
            if not w.done():
                w.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        report.seconds = time.monotonic() - t0
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                if isinstance(res, (ConnectionError, OSError, TimeoutError)):
                    report.add("violation", f"a fuzz worker could not reach the listener: {res!r}")
                else:
                    raise res
        stop.set()
        try:
            await asyncio.wait_for(steady, 15)
        except TimeoutError:
            report.add("hang", "the steady client did not finish its last call in 15 s")
    if not target.dead():
        report.churn_kib = await churn(target.listener, target.main)
    if target.kind != "http" and not target.dead():
        try:
            async with Client(target.listener, timeout=5.0) as c:
                st = await c.stats()
            report.server = {k: st.get(k) for k in ("total_connections", "connections", "items", "bytes", "requests", "errors")}
        except Exception as exc:
            report.server = {"stats": repr(exc)}
    after = {name: rss_kib(p.proc.pid) for name, p in target.procs.items() if p.proc is not None}
    report.rss_kib = {name: (before, after[name]) for name, (before, _) in report.rss_kib.items()}
    for name in target.dead():
        if not report.counts["crash"]:
            report.add("crash", f"{name} exited: {target.logs(name, 30)}")
    if report.counts["internal"]:
        report.add(
            "note", f"{target.main.role} log (tail):\n" + target.logs(next(n for n, p in target.procs.items() if p is target.main), 30)
        )


async def churn(addr: str, proc: DaemonProcess) -> tuple[int, int]:
    """Open and close connections in batches (after a warm-up); the listener's RSS before and after (KiB)."""
    host, _, port = addr.rpartition(":")
    assert proc.proc is not None
    pid = proc.proc.pid
    before = 0
    for done in range(0, CHURN_WARMUP + CHURN_CONNECTIONS, CHURN_BATCH):
        if done == CHURN_WARMUP:
            before = rss_kib(pid)
        writers = []
        for _ in range(CHURN_BATCH):
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), ANSWER_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue
            writers.append(w)
        await asyncio.sleep(0.02)
        for w in writers:
            w.close()
        for w in writers:
            try:
                await w.wait_closed()
            except (ConnectionError, OSError):
                pass
    return before, rss_kib(pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.fuzz", description="Fuzz dcache's listeners (see the module docstring).")
    parser.add_argument("targets", nargs="*", default=list(TARGETS), help=f"which listeners (default: all of {', '.join(TARGETS)})")
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("FUZZ_SECONDS", "60")),
        help="seconds per listener (env FUZZ_SECONDS, default 60)",
    )
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")), help="seed (env FUZZ_SEED, default 1)")
    parser.add_argument("--cases", default="", help="comma-separated case kinds to run (default: all)")
    parser.add_argument("--rss-bound-mib", type=int, default=128, help="fail if a daemon's RSS grows more than this (default 128)")
    args = parser.parse_args(argv)
    failed = False
    for kind in args.targets:
        cases = [c for c in args.cases.split(",") if c]
        report = asyncio.run(run_target(kind, args.seconds, args.seed, cases=cases))
        print(report.summary(), flush=True)
        problems = report.failures(args.rss_bound_mib * 1024)
        if problems:
            failed = True
            print(f"FUZZ {kind}: FAILED ({'; '.join(problems)})", flush=True)
        else:
            print(f"FUZZ {kind}: ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
