#!/usr/bin/env python3
"""LRUCache get/set at two git revisions: wall-clock time, alternating, or instructions.

    .venv/bin/python bin/bench_lru_ops.py [OLD_REV [NEW_REV]]                 # default: HEAD~1 against the working tree
    .venv/bin/python bin/bench_lru_ops.py --instructions [OLD_REV [NEW_REV]]

Each revision's ``dcache/lru/cache.py`` (and ``cost.py`` where it exists)
is loaded as its own package from ``git show``; "worktree" means the files
on disk. A revision loaded so has no C extension: both run on the
pure-Python ``Entry`` (``bin/bench_lru_entry.py`` compares it with the C
one). Four operations on a full cache of 16-byte keys and values: ``set``
of a new key (which evicts one), ``set`` replacing a key, ``get`` of a
present key, and ``set`` of a new key with a TTL into a cache of entries
with TTLs.

Timing: each measurement is a fresh process (the same memory layout for
both revisions, nothing left over from the other) that fills a cache of
100,000 entries, freezes and turns off the garbage collector (as the aux
node keeps it off its entries), and times 100,000 operations. Rounds
alternate the revisions' order; prints the median ns per operation and
new/old. On a shared, busy machine identical runs differ by tens of
percent: ``--instructions`` counts instructions instead (valgrind's
callgrind, load-independent): each operation is run ``K1`` and ``K2`` times
after the same set-up, and (I2 - I1) / (K2 - K1) is the cost of one.
"""

from __future__ import annotations

import gc
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("set new (evicts one)", "set replace", "get hit", "set new, TTL (evicts)")
TIME_N = 100_000
TIME_ROUNDS = 7
K1, K2 = 2_000, 12_000
COUNT_N = 20_000
NOW_MS = 1_800_000_000_000


def load(rev: str, into: str) -> ModuleType:
    """Import ``dcache/lru/cache.py`` at ``rev`` as a package of its own."""
    pkg = os.path.join(into, "lru_under_test")
    os.mkdir(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for f in ("cache.py", "cost.py"):
        path = f"dcache/lru/{f}"
        if rev == "worktree":
            src = os.path.join(ROOT, path)
            if not os.path.exists(src):
                continue
            with open(src, "rb") as fh:
                data = fh.read()
        else:
            r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True)
            if r.returncode:
                continue
            data = r.stdout
        with open(os.path.join(pkg, f), "wb") as fh:
            fh.write(data.replace(b"from ..", b"from dcache."))  # the package's other modules (hlc, widths): this checkout's
    sys.path[:0] = [into, ROOT]
    return importlib.import_module("lru_under_test.cache")


def run(rev: str, op: str, n: int, k: int) -> float:
    """Fill a cache of ``n`` entries, run ``op`` ``k`` times; seconds the ``k`` operations took."""
    ttl = op == OPS[3]
    exp = NOW_MS + 3_600_000 if ttl else 0
    with tempfile.TemporaryDirectory() as d:
        mod = load(rev, d)
        cache = mod.LRUCache(1 << 40, n, clock=lambda: NOW_MS)
        for i in range(n):
            cache.set(b"k:%014d" % i, b"v" * 16, expires_at=exp, version=(1 << 62) + i)
        if op in (OPS[0], OPS[3]):
            keys = [b"k:%014d" % i for i in range(n, n + k)]
        else:
            keys = [b"k:%014d" % (i % n) for i in range(k)]
        value = b"w" * 16
        gc.freeze()
        gc.disable()
        t = time.perf_counter()
        if op == OPS[2]:
            g = cache.get
            for key in keys:
                g(key)
        else:
            s = cache.set
            for key in keys:
                s(key, value, expires_at=exp)
        return time.perf_counter() - t


def child(rev: str, op: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--run", rev, op, *args]


def timings(revs: list[str]) -> None:
    times: dict[tuple[str, str], list[float]] = {}
    for rnd in range(TIME_ROUNDS):
        for op in OPS:
            for rev in revs if rnd % 2 == 0 else revs[::-1]:
                out = subprocess.run(child(rev, op, str(TIME_N), str(TIME_N)), capture_output=True, text=True, cwd=ROOT, check=True)
                times.setdefault((op, rev), []).append(float(out.stdout) / TIME_N * 1e9)
    print(f"python {sys.version.split()[0]}; median ns per operation over {TIME_ROUNDS} alternating fresh processes")
    for op in OPS:
        a, b = (statistics.median(times[(op, r)]) for r in revs)
        spread = " ".join(f"{min(times[(op, r)]):.0f}-{max(times[(op, r)]):.0f}" for r in revs)
        print(f"  {op:24s} {revs[0]:>10s} {a:7.0f}   {revs[1]:>10s} {b:7.0f}   ratio {b / a:.3f}   (ranges {spread})")


def instructions(revs: list[str]) -> None:
    print(f"python {sys.version.split()[0]}; instructions per operation (callgrind, ({K2} - {K1}) runs)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict probes in every run
    for op in OPS:
        per = []
        for rev in revs:
            counts = []
            for k in (K1, K2):
                cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *child(rev, op, str(COUNT_N), str(k))]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                line = next(x for x in r.stderr.splitlines() if "Collected :" in x)
                counts.append(int(line.split(":")[-1]))
            per.append((counts[1] - counts[0]) / (K2 - K1))
        print(f"  {op:24s} {revs[0]:>10s} {per[0]:7.0f}   {revs[1]:>10s} {per[1]:7.0f}   ratio {per[1] / per[0]:.3f}", flush=True)


def main() -> None:
    args: list[Any] = sys.argv[1:]
    if args[:1] == ["--run"]:
        print(run(args[1], args[2], int(args[3]), int(args[4])))
        return
    measure = timings
    if args[:1] == ["--instructions"]:
        measure = instructions
        args = args[1:]
    revs = args[:2] or ["HEAD~1"]
    if len(revs) == 1:
        revs.append("worktree")
    measure(revs)


if __name__ == "__main__":
    main()
