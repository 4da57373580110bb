#!/usr/bin/env python3
"""Instructions per small MGET routed by a master's ``Router.mget``, in-process, for callgrind (docs/BENCHMARKS.md).

    PYTHONPATH=<tree> valgrind --tool=callgrind /work/main/.venv/bin/python bin/bench_router_mget_cpu.py N [--keys 8]

Sends N MGETs of ``--keys`` keys through ``Router.mget`` on the in-memory
``FakeCluster`` of the unit tests (real aux node handlers behind fake
connections: their work is counted too, the same for every tree), waiting
for an answer every 50. Run it with two N (1,000 and 3,000) under callgrind
and divide the difference of the totals by the difference of N: the
instructions per MGET, start-up left out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.unit.master.fakecluster import FakeCluster, Sink


async def run(n: int, nkeys: int) -> None:
    async with FakeCluster() as c:
        keys = [b"key:%d" % i for i in range(nkeys)]
        sink = Sink()
        for i in range(1, n + 1):
            c.router.mget(sink, i, keys)  # type: ignore[arg-type]
            if i % 50 == 0:
                await sink.answer(i)
        await sink.answer(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="MGETs to send")
    ap.add_argument("--keys", type=int, default=8, help="keys per MGET (default 8)")
    args = ap.parse_args()
    asyncio.run(run(args.n, args.keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
