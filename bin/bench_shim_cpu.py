#!/usr/bin/env python3
"""The HTTP shim's own cost per GET and per POST, for source trees side by side (docs/BENCHMARKS.md, "HTTP shim (wrk)").

    .venv/bin/python bin/bench_shim_cpu.py --tree A=/path/to/old --tree B=. [--rounds 3] [--conns 20] [--instructions]

Starts one ``dcache cluster --masters 2 --aux 3 --replicas 2`` (no shim) from
the first tree and writes keys ``k0``..``k99999`` (100-byte values). Then,
for each round and each tree in turn, a child process of that tree builds
the shim as ``dcache http`` does (``HttpDaemon``: its routes, metrics and
clients to both masters) and serves ``--conns`` HTTP connections on
in-memory transports: each loop turn every connection gets one request,
the bytes ``wrk`` sends for ``bench/wrk_get.lua`` (or
``bench/wrk_post.lua``), and the turn ends when every answer is written.
The reads of a turn leave as one MGET to a real master (the writes as one
MSET), as under ``wrk -c50`` where about 20 requests arrive per loop
iteration. The child runs ``K1`` and ``K2`` turns; the difference between
them over the requests is the shim's cost per request: CPU time
(``time.process_time``), or with ``--instructions`` the instructions
valgrind's callgrind counts (load-independent: the machine's other work
does not move it). The kernel's side of the sockets to wrk is not in it;
the sockets to the masters are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MASTER_PORT = 7700
AUX_PORT = 7750
K1, K2 = 200, 700
_GET = b"GET /data/k%d HTTP/1.1\r\nHost: 127.0.0.1:8090\r\n\r\n"
_POST_BODY = b'{"key":"k%d","value":"' + b"x" * 100 + b'"}'
_POST = b"POST /data HTTP/1.1\r\nHost: 127.0.0.1:8090\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


class _Transport:
    """What the shim's protocol writes to: counts answers, and wakes the turn when each connection has one."""

    def __init__(self, turn: list[Any]) -> None:
        self.turn = turn

    def write(self, data: bytes) -> None:
        turn = self.turn
        turn[1] -= 1
        if turn[1] == 0:
            turn[0].set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        raise AssertionError("the shim closed a keep-alive connection")

    abort = close


def worker(turns: int, conns: int, op: str, masters: str) -> None:
    """Child process: the shim serves ``turns`` loop turns of one request per connection; prints its CPU seconds."""
    import uvloop

    import dcache
    from dcache.config import HttpConfig
    from dcache.http.server import HttpDaemon

    print(f"dcache from {Path(dcache.__file__).resolve().parents[1]}", file=sys.stderr)

    def request(i: int) -> bytes:
        if op == "GET":
            return _GET % i
        body = _POST_BODY % i
        return _POST % (len(body), body)

    async def run() -> None:
        daemon = HttpDaemon(HttpConfig(master=tuple(masters.split(",")), port=0, log_level="warning"))
        await daemon.shim.start()
        assert await daemon.shim.client.get(b"k0") is not None, "the keys were not written"
        loop = asyncio.get_running_loop()
        turn: list[Any] = [None, 0]
        protocols = []
        for _ in range(conns):
            proto = daemon.http.protocol()
            proto.connection_made(_Transport(turn))  # type: ignore[arg-type]
            protocols.append(proto)
        requests = [request(i) for i in range(100_000)]
        start = time.process_time()
        for t in range(turns):
            turn[0] = loop.create_future()
            turn[1] = conns
            base = t * conns * 7919
            for i, proto in enumerate(protocols):
                proto.data_received(requests[(base + i * 7) % 100_000])
            await turn[0]
        print(f"cpu_s {time.process_time() - start:.6f}")
        await daemon.shim.close()

    uvloop.run(run())


def _child(tree: Path, turns: int, args: argparse.Namespace, op: str) -> tuple[float, int | None]:
    """CPU seconds (and instructions with ``--instructions``) of one child of ``tree`` running ``turns`` turns."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(turns), "--op", op, "--conns", str(args.conns),
           "--masters", args.masters]  # fmt: skip
    if args.instructions:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    # The tree as working directory: ``python`` puts the script's folder first on sys.path, then PYTHONPATH.
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    if out.returncode or f"dcache from {tree.resolve()}" not in out.stderr:
        raise SystemExit(f"the child for {tree} failed or ran other code: {out.stderr[-2000:]}")
    cpu = float(next(line for line in out.stdout.splitlines() if line.startswith("cpu_s")).split()[1])
    refs = [line for line in out.stderr.splitlines() if "Collected :" in line]
    return cpu, int(refs[-1].split(":")[-1].strip()) if refs else None


def _populate(masters: str) -> None:
    sys.path.insert(0, str(ROOT))
    import dcache

    async def run() -> None:
        async with dcache.Client(masters) as c:
            for s in range(0, 100_000, 500):
                await c.mset({f"k{i}": b"x" * 100 for i in range(s, s + 500)})

    asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (repeat; default: this tree)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per tree (default: 3)")
    ap.add_argument("--conns", type=int, default=20, help="connections, each sending one request per loop turn (default: 20)")
    ap.add_argument("--ops", default="GET,POST", help="GET, POST or both (default: GET,POST)")
    ap.add_argument("--instructions", action="store_true", help="count instructions with callgrind instead of CPU time")
    ap.add_argument("--masters", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--op", default="GET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.conns, args.op, args.masters)
        return 0
    trees = {name: Path(path).resolve() for name, _, path in (t.partition("=") for t in args.tree)} or {"this tree": ROOT}
    first = next(iter(trees.values()))
    with tempfile.TemporaryDirectory(prefix="bench-shim-cpu-") as tmp:
        cluster = subprocess.Popen(
            [sys.executable, "-m", "dcache", "cluster", "--masters", "2", "--aux", "3", "--replicas", "2", "--http-port", "-1",
             "--port", str(MASTER_PORT), "--aux-port", str(AUX_PORT), "--data-dir", str(Path(tmp) / "data")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=first, env={**os.environ, "PYTHONPATH": str(first)},
        )  # fmt: skip
        try:
            assert cluster.stdout is not None
            while not (line := cluster.stdout.readline().decode()).startswith("READY"):
                if not line:
                    raise SystemExit("the cluster did not start")
            args.masters = f"127.0.0.1:{MASTER_PORT},127.0.0.1:{MASTER_PORT + 1}"
            _populate(args.masters)
            unit = "instructions" if args.instructions else "CPU µs"
            for op in args.ops.split(","):
                results: dict[str, list[float]] = {name: [] for name in trees}
                for r in range(args.rounds):
                    for name, tree in trees.items():
                        (c1, i1), (c2, i2) = _child(tree, K1, args, op), _child(tree, K2, args, op)
                        n = (K2 - K1) * args.conns
                        per = (i2 - i1) / n if i1 is not None and i2 is not None else (c2 - c1) / n * 1e6
                        results[name].append(per)
                        print(f"round {r + 1} {op} {name}: {per:,.1f} {unit} per request", file=sys.stderr)
                for name, values in results.items():
                    print(f"{op} {name}: median {statistics.median(values):,.1f} {unit} per request (rounds: "
                          f"{', '.join(f'{v:,.1f}' for v in values)}; ({K2} - {K1}) turns of {args.conns} requests)")  # fmt: skip
        finally:
            cluster.terminate()
            cluster.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
