#!/usr/bin/env python3
"""LRUCache operations with the C ``Entry`` against the pure-Python one, in one process.

    .venv/bin/python bin/bench_lru_entry.py [--keys N] [--rounds R] [--value-bytes B]

Fills two caches of ``--keys`` entries (16-byte keys), one per entry type,
freezes and turns off the garbage collector (as the aux node keeps it off
its entries), then times each operation over every key, alternating the two
caches for ``--rounds`` rounds, and prints the fastest round of each in ns
per operation and the C / Python ratio. Lookups use fresh copies of the
keys, as a server's requests do (a dict finds its own key object by
identity, a request's by comparing bytes). Pin it to a core
(``taskset -c 1``) on a busy machine.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from dcache.lru import LRUCache
from dcache.lru.cache import NativeEntry

VERSION = 1 << 62


def one_round(cache: LRUCache, stored: list[bytes], values: list[bytes], r: int) -> dict[str, float]:
    """Each operation once over every key: ns per operation. Leaves ``stored`` holding the cache's keys."""
    n = len(stored)
    keys = [bytes(bytearray(k)) for k in stored]  # a request's key: equal, not the same object
    get, set_, apply, lookup = cache.get, cache.set, cache.apply, cache.lookup
    new = [b"n%d:%013d" % (r, i) for i in range(n)]
    runs: dict[str, Callable[[], object]] = {
        "get (hit)": lambda: [get(k) for k in keys],
        "set (replace)": lambda: [set_(k, v, version=VERSION) for k, v in zip(keys, values, strict=True)],
        "apply (replace)": lambda: [apply(k, v, expires_at=0, version=VERSION + r + 1) for k, v in zip(keys, values, strict=True)],
        "lookup + value, version, expiry": lambda: [(e.value, e.version, e.expires_at) for e in map(lookup, keys) if e],
        "set (new key, evicts one)": lambda: [set_(k, v, version=VERSION) for k, v in zip(new, values, strict=True)],
    }
    out = {}
    for op, run in runs.items():
        start = time.perf_counter_ns()
        run()
        out[op] = (time.perf_counter_ns() - start) / n
    stored[:] = new
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="entries in each cache (default 100,000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, each cache timed once per round (default 7)")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value (default 100)")
    args = parser.parse_args()
    if NativeEntry is None:
        raise SystemExit("the C extension dcache.lru._entry is not built (or DCACHE_PURE_PYTHON is set)")
    n = args.keys
    values = [bytes(args.value_bytes) for _ in range(n)]
    caches: dict[str, tuple[LRUCache, list[bytes]]] = {}
    for name, native in (("python", False), ("C", True)):
        cache = LRUCache(1 << 40, max_items=n, native=native)
        keys = [b"k:%014d" % i for i in range(n)]
        for k, v in zip(keys, values, strict=True):
            cache.set(k, v, version=VERSION)
        caches[name] = (cache, keys)
    gc.collect()
    gc.freeze()
    gc.disable()
    best: dict[str, dict[str, float]] = {name: {} for name in caches}
    for r in range(args.rounds):
        for name, (cache, stored) in caches.items():
            for op, ns in one_round(cache, stored, values, r).items():
                best[name][op] = min(best[name].get(op, ns), ns)
    print(f"{n:,} entries, keys of 16 B, values of {args.value_bytes} B; fastest of {args.rounds} rounds, ns per operation")
    print()
    print("| operation | Python entry | C entry | C / Python |")
    print("|---|---:|---:|---:|")
    for op, py in best["python"].items():
        c = best["C"][op]
        print(f"| {op} | {py:.0f} | {c:.0f} | {c / py:.2f} |")


if __name__ == "__main__":
    main()
