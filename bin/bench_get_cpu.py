#!/usr/bin/env python3
"""Instructions per master GET routed to its first owner (``Router.get``, batched), in-process, for callgrind.

    for n in 20000 120000; do
      PYTHONHASHSEED=0 PYTHONPATH=TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bin/bench_get_cpu.py $n 2>&1 | grep Collected
    done

Routes ``n`` GETs of 1,000 distinct keys (3 aux nodes, 2 copies) through a
``Router`` whose links are stubs: ``send`` does nothing and no answer comes,
so the count is the routing alone (candidates, the read, the batcher and
its MGET), not the answers. The difference between the two runs over the
100,000 GETs between them is the instructions per GET; run it for each
source tree (``PYTHONPATH``) to compare them. ``PYTHONHASHSEED=0`` makes
the count repeat exactly.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parent.parent))

from dcache.hlc import HybridClock
from dcache.master.router import Router
from dcache.master.view import ClusterView, Member


class StubLink:
    """What ``Router.get`` and ``LinkBatcher`` use of an ``AuxLink``; requests go nowhere."""

    suspect = False
    held = False
    usable = True
    reads_waiting: Any = None

    def send(self, op: int, args: tuple[Any, ...], cb: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def release_held(self) -> None:
        pass


async def main(n: int) -> None:
    members = [Member(f"a{i}", "127.0.0.1", 7100 + i) for i in range(3)]
    links: dict[str, Any] = {m.node_id: StubLink() for m in members}
    router = Router(ClusterView.initial(members, 2, epoch=1), links, HybridClock("m1"))
    keys = [b"key:%d" % i for i in range(1000)]
    get = router.get
    done = 0
    while done < n:
        step = min(200, n - done)
        for key in keys[:step]:
            get(None, 1, key)  # type: ignore[arg-type]  # no answer comes: no sink is needed
        done += step
        await asyncio.sleep(0)  # the batcher sends its MGETs


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
