#!/usr/bin/env python3
"""CPU per request of an aux node under pipelined GETs, for two source trees side by side (docs/BENCHMARKS.md).

    .venv/bin/python bin/bench_pipeline_cpu.py --tree A=/path/to/old --tree B=. [--rounds 5] [--duration 5] [--depth 64]

For each round and each tree in turn, starts an aux node from that tree
(``PYTHONPATH``) on core 0, stores one 16-byte value, then sends pipelined
GETs of it from this process on core 1 (``--depth`` frames per write, then
reads their answers) for ``--duration`` seconds. Prints the node's CPU time
(user + system, from /proc/PID/stat) per request for every run, and the
median per tree: the figure the native dispatch's per-frame work shows in.
The runs alternate, so a shared machine's drift touches both trees alike.

``--in-process`` measures the dispatch alone instead: a child process per
run, on that tree, builds the aux role's service and one connection on a
transport that drops what it is given, and feeds it the same batch of
``--depth`` GETs for ``--duration`` seconds; it prints the CPU time per
frame of ``data_received`` (decoding, the handler, the answer), without the
sockets' cost and noise.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# The tree under test first (a worker of --in-process is told which by DCACHE_BENCH_TREE), else this one.
sys.path.insert(0, os.environ.get("DCACHE_BENCH_TREE") or str(Path(__file__).resolve().parent.parent))

from dcache.protocol import Op, encode_request
from tests.harness import DaemonProcess
from tests.wire import call, split_addr

_TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_S


def load(addr: str, duration: float, depth: int, pid: int) -> tuple[int, float]:
    """Pipelined GETs for ``duration`` s: ``(requests, node CPU seconds)``."""
    host, port = split_addr(addr)
    batch = encode_request(Op.GET, 7, b"k") * depth
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(batch)  # one answer's size, to read by byte count
        first = s.recv(65536)
        while len(first) % depth:
            first += s.recv(65536)
        need_each = len(first)
        n = depth
        c0 = cpu_s(pid)
        t_end = time.monotonic() + duration
        while time.monotonic() < t_end:
            s.sendall(batch)
            got = 0
            while got < need_each:
                got += len(s.recv(1 << 20))
            n += depth
        return n - depth, cpu_s(pid) - c0


class _NullTransport:
    """A transport that takes every write and never pushes back."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, chunks: list[bytes]) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: object) -> None:
        pass


def dispatch_worker(duration: float, depth: int) -> None:
    """Child process: CPU seconds per frame of ``data_received`` on the aux role's service, printed."""
    import asyncio
    import tempfile

    from dcache.auxnode.node import AuxNode
    from dcache.config import AuxConfig

    async def run() -> float:
        node = AuxNode(AuxConfig(data_dir=tempfile.mkdtemp(), snapshot_interval=0))
        node.build_tables()
        node.execute([int(Op.SET), 1, b"k", b"v" * 16])
        conn = node.protocol_factory()
        conn.connection_made(_NullTransport())  # type: ignore[arg-type]
        batch = encode_request(Op.GET, 7, b"k") * depth
        feed = conn.data_received
        n = 0
        t_end = time.monotonic() + duration
        c0 = time.process_time()
        while time.monotonic() < t_end:
            for _ in range(1000):
                feed(batch)
            n += 1000 * depth
        return (time.process_time() - c0) / n

    print(asyncio.run(run()))


def in_process(tree: str, duration: float, depth: int) -> float:
    """Run ``dispatch_worker`` on ``tree`` in a child process pinned to core 0; its µs per frame."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "DCACHE_BENCH_TREE": str(Path(tree).resolve())}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--duration", str(duration), "--depth", str(depth), "--tree", "x=."]
    if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=duration + 60)
    imported = f"dcache from {Path(tree).resolve()}"
    if imported not in out.stderr:
        raise SystemExit(f"the worker did not run {tree}'s code: {out.stderr.strip()}")
    return float(out.stdout.strip().splitlines()[-1]) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=DIR, a source tree to run the aux node from (repeat)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--in-process", action="store_true", help="time data_received in-process (no sockets) instead")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import dcache

        print(f"dcache from {Path(dcache.__file__).resolve().parent.parent}", file=sys.stderr)
        dispatch_worker(args.duration, args.depth)
        return 0
    trees = [t.split("=", 1) for t in args.tree]
    if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    results: dict[str, list[float]] = {label: [] for label, _ in trees}
    print(f"uptime: {os.getloadavg()}; depth {args.depth}, {args.duration} s per run")
    for r in range(args.rounds):
        for label, tree in trees:
            if args.in_process:
                us = in_process(tree, args.duration, args.depth)
                results[label].append(us)
                print(f"round {r + 1} {label}: {us:.3f} µs CPU per frame in data_received")
                continue
            aux = DaemonProcess(
                "aux",
                ["--port", "0", "--node-id", "bench", "--log-level", "warning"],
                env={"PYTHONPATH": str(Path(tree).resolve())},
                cwd=str(Path(tree).resolve()),  # python -m imports the working directory's code first
            ).start()
            try:
                assert aux.proc is not None
                if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
                    os.sched_setaffinity(aux.proc.pid, {0})
                assert call(aux.addr, Op.SET, 1, b"k", b"v" * 16)[1] == 0
                n, cpu = load(aux.addr, args.duration, args.depth, aux.proc.pid)
            finally:
                aux.kill()
            us = cpu / n * 1e6
            results[label].append(us)
            print(f"round {r + 1} {label}: {n} requests, {n / args.duration:,.0f}/s, {us:.2f} µs CPU per request")
    for label, values in results.items():
        print(f"{label}: median {statistics.median(values):.2f} µs/request, min {min(values):.2f}, max {max(values):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
