#!/usr/bin/env python3
"""LRUCache get/set at two git revisions, in one process, rounds alternating.

    .venv/bin/python bin/bench_lru_ops.py [OLD_REV [NEW_REV]]     # default: HEAD~1 against the working tree
    .venv/bin/python bin/bench_lru_ops.py --instructions [OLD_REV [NEW_REV]]

Each revision's ``dcache/lru/cache.py`` (and ``cost.py`` where it exists)
is loaded as its own package from ``git show``; "worktree" means the files
on disk. Each round times, for each revision in turn (the order alternates
between rounds), on full caches of 100,000 entries with 16-byte keys and values: ``set`` of
new keys (each evicts), ``set`` replacing existing keys, ``get`` hits, and
``set`` of new keys with a TTL into a cache of entries with TTLs. Prints the median ns per
operation over the rounds, and the new/old ratio.

Times on a shared, busy machine are noisy; ``--instructions`` counts
instructions instead (valgrind's callgrind, load-independent): each
operation is run ``K1`` and ``K2`` times on a cache of 20,000 entries after
the same set-up, and (I2 - I1) / (K2 - K1) is the cost of one.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 100_000
ROUNDS = 15


def load(rev: str, into: str) -> ModuleType:
    """Import ``dcache/lru/cache.py`` at ``rev`` as package ``lru_<n>``."""
    name = f"lru_{len(sys.modules)}"
    pkg = os.path.join(into, name)
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
            fh.write(data)
    sys.path.insert(0, into)
    return importlib.import_module(f"{name}.cache")


def full_cache(mod: ModuleType, now: int, ttl: bool) -> Any:
    """A cache holding N entries (16-byte keys and values, with a TTL or not), at its budget."""
    exp = now + 3_600_000 if ttl else 0
    probe = mod.LRUCache(1 << 40, clock=lambda: now)
    probe.set(b"k:%014d" % 0, b"v" * 16, expires_at=exp)
    cache = mod.LRUCache(probe.bytes_used * N, clock=lambda: now)
    for i in range(N):
        cache.set(b"k:%014d" % i, b"v" * 16, expires_at=exp, version=(1 << 62) + i)
    assert len(cache) == N
    return cache


def per_op(fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    n = fn()
    return (time.perf_counter() - t) / n * 1e9


def round_of(plain: Any, expiring: Any, start: int, now: int) -> dict[str, float]:
    """One timing of each operation; keys from ``start`` on are new to both caches."""
    new_keys = [b"k:%014d" % i for i in range(start, start + N // 2)]
    hot = new_keys[: N // 4]
    value = b"w" * 16
    exp = now + 3_600_000

    def set_new() -> int:
        s = plain.set
        for k in new_keys:
            s(k, value)
        return len(new_keys)

    def set_replace() -> int:
        s = plain.set
        for k in hot:
            s(k, value)
        return len(hot)

    def get_hit() -> int:
        g = plain.get
        for k in hot:
            g(k)
        return len(hot)

    def set_new_ttl() -> int:
        s = expiring.set
        for k in new_keys:
            s(k, value, expires_at=exp)
        return len(new_keys)

    return {
        "set new (evicts one)": per_op(set_new),
        "set replace": per_op(set_replace),
        "get hit": per_op(get_hit),
        "set new, TTL (evicts)": per_op(set_new_ttl),
    }


OPS = ("set new (evicts one)", "set replace", "get hit", "set new, TTL (evicts)")
K1, K2 = 2_000, 12_000
COUNT_N = 20_000


def count_run(rev: str, op: str, k: int) -> None:
    """Set up as for every ``k``, then run ``op`` ``k`` times (under callgrind)."""
    now = 1_800_000_000_000
    with tempfile.TemporaryDirectory() as d:
        mod = load(rev, d)
        ttl = op == OPS[3]
        cache = mod.LRUCache(1 << 40, COUNT_N, clock=lambda: now)
        exp = now + 3_600_000 if ttl else 0
        for i in range(COUNT_N):
            cache.set(b"k:%014d" % i, b"v" * 16, expires_at=exp, version=(1 << 62) + i)
        if op in (OPS[0], OPS[3]):
            keys = [b"k:%014d" % i for i in range(COUNT_N, COUNT_N + K2)]
        else:
            keys = [b"k:%014d" % (i % COUNT_N) for i in range(K2)]
        keys = keys[:k]
        value = b"w" * 16
        if op == OPS[2]:
            g = cache.get
            for key in keys:
                g(key)
        else:
            s = cache.set
            for key in keys:
                s(key, value, expires_at=exp)


def instructions(revs: list[str]) -> None:
    print(f"python {sys.version.split()[0]}; instructions per operation (callgrind, ({K2} - {K1}) runs)")
    for op in OPS:
        per = []
        for rev in revs:
            counts = []
            for k in (K1, K2):
                cmd = [
                    "valgrind",
                    "--tool=callgrind",
                    "--callgrind-out-file=/dev/null",
                    sys.executable,
                    __file__,
                    "--count",
                    rev,
                    op,
                    str(k),
                ]
                env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict probes in every run
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                line = next(x for x in r.stderr.splitlines() if "Collected :" in x)
                counts.append(int(line.split(":")[-1]))
            per.append((counts[1] - counts[0]) / (K2 - K1))
        print(f"  {op:24s} {revs[0]:>10s} {per[0]:7.0f}   {revs[1]:>10s} {per[1]:7.0f}   ratio {per[1] / per[0]:.3f}", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--count"]:
        count_run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if sys.argv[1:2] == ["--instructions"]:
        revs = sys.argv[2:4] or ["HEAD~1"]
        if len(revs) == 1:
            revs.append("worktree")
        instructions(revs)
        return
    revs = sys.argv[1:3] or ["HEAD~1"]
    if len(revs) == 1:
        revs.append("worktree")
    now = time.time_ns() // 1_000_000
    with tempfile.TemporaryDirectory() as d:
        mods = [load(r, d) for r in revs]
        caches = [(full_cache(m, now, False), full_cache(m, now, True)) for m in mods]
        results: list[dict[str, list[float]]] = [{} for _ in revs]
        for rnd in range(ROUNDS):
            order = range(len(revs)) if rnd % 2 == 0 else reversed(range(len(revs)))
            for i in order:
                for k, v in round_of(*caches[i], (rnd + 1) * N, now).items():
                    results[i].setdefault(k, []).append(v)
    print(f"python {sys.version.split()[0]}; {ROUNDS} rounds, median ns per operation")
    for k in results[0]:
        a = statistics.median(results[0][k])
        b = statistics.median(results[1][k])
        print(f"  {k:24s} {revs[0]:>10s} {a:7.0f}   {revs[1]:>10s} {b:7.0f}   ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
