#!/usr/bin/env python3
"""Requests at and past the bounds: what a master does with one huge MGET (docs/RELIABILITY.md).

    .venv/bin/python bin/bench_limits.py [--keys 2000000] [--replicas 1|2] [--aux-timeout S]

Starts an aux node (two with ``--replicas 2``) and a master on 127.0.0.1 with
default flags, stores a few keys, then sends one MGET of ``--keys`` distinct
keys and, on a second connection, a PING every 50 ms throughout. Prints the
answer's status and time, the master's peak RSS (VmRSS) and the worst gap
between two PING answers. Then the largest MGET allowed (--max-batch-keys,
default 10000), all keys missing, with the same watch.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dcache.protocol import MAX_BATCH_KEYS, Op, encode_request
from tests.harness import DaemonProcess
from tests.wire import PingWatch, call, read_frame, split_addr


def big_mget(addr: str, pid: int, n: int, label: str) -> None:
    keys = [b"k%09d" % i for i in range(n)]
    frame = encode_request(Op.MGET, 7, keys)
    host, port = split_addr(addr)
    with PingWatch(addr, pid) as watch:
        t0 = time.monotonic()
        with socket.create_connection((host, port), timeout=120) as s:
            s.sendall(frame)
            _rid, status, result = read_frame(s, timeout=120)[1]  # type: ignore[misc]
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    shown = result if status else f"{len(result)} values"
    print(
        f"{label}: {n} keys ({len(frame) / 1e6:.1f} MB frame): status {status} ({shown!s:.90}) in {elapsed:.2f} s; "
        f"master peak RSS {watch.max_rss / 2**20:.0f} MiB; worst PING gap {watch.worst_gap() * 1000:.0f} ms; ping errors {len(watch.errors)}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=2_000_000, help="keys in the huge MGET (default 2000000)")
    ap.add_argument("--replicas", type=int, default=1, help="copies of each key (default 1)")
    ap.add_argument("--aux-timeout", default="2.0", help="the master's --aux-timeout (default 2.0)")
    args = ap.parse_args()
    auxes = [DaemonProcess("aux", ["--port", "0", "--node-id", f"a{i}", "--log-level", "warning"]).start() for i in range(args.replicas)]
    seeds = ",".join(f"a{i}={a.addr}" for i, a in enumerate(auxes))
    master = DaemonProcess(
        "master",
        ["--port", "0", "--aux", seeds, "--replicas", str(args.replicas), "--aux-timeout", args.aux_timeout, "--log-level", "warning"],
    ).start()
    try:
        assert master.proc is not None
        print(f"machine: {os.cpu_count()} cores; master {master.addr}, {args.replicas} aux node(s), --aux-timeout {args.aux_timeout}")
        call(master.addr, Op.MSET, 1, [[b"k%09d" % i, b"v" * 100] for i in range(1000)])
        big_mget(master.addr, master.proc.pid, args.keys, "huge MGET")
        big_mget(master.addr, master.proc.pid, MAX_BATCH_KEYS, "largest MGET allowed")
    finally:
        for p in (master, *auxes):
            p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
