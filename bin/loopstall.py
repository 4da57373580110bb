#!/usr/bin/env python3
"""Event-loop stalls of a master and of an aux node under steady load.

Starts one aux node (``--keys`` entries, snapshots every
``--snapshot-interval`` s into a temporary folder) and one master in front
of it on 127.0.0.1, writes the key space through the master, then drives
``dcache bench --rate RATE`` (open loop, 90% GET, 100-byte values) through
the master for ``--duration`` seconds. Meanwhile one probe per daemon sends
a PING every ``--period-ms`` on its own connection (the master answers it
itself, so each probe sees one loop) and records, for each PING:

* its round trip (wall time, what a client sees);
* the CPU time the daemon's event-loop thread ran during it
  (``/proc/PID/task/PID/schedstat``, nanoseconds), and the time that
  thread waited on a run queue.

A PING answered later than ``--threshold-ms`` while the loop thread did
not wait for a CPU (from the PING before the previous one to the answer)
waited behind the loop's own work: a *loop stall*. One whose loop thread
waited on a run queue is a *scheduling delay* (the machine, not the code).
For each daemon the report lists the stalls with their time and the
intervals between them, which name their period, and counts the delays.
The loop CPU is informative only: the kernel updates a running thread's
CPU time at its tick (4 ms here) or when it sleeps, so a loop that never
sleeps shows CPU in steps of the tick. On a shared machine the probes and
the generator share a core with the aux node; read the stall sizes of a
code path from a profile or a measurement of its work per event, and the
periods from here.

``--scrape S`` also fetches both daemons' ``/metrics`` every S seconds, as
Prometheus would.

``--work`` instead measures, in this process and in CPU time (so whatever
the machine's load), the work of single events that the loops run in one
go: the worst ``HotKeys.note`` over a million reads (a sketch window ends
every 65,536 counted ones), the worst TTL write among two million
overwrites of a million expiring keys (the expiry heap's compaction), one
SET of 1 MiB and of 8 MiB into a full cache of 100-byte entries (its
evictions), a master's full collection with its near cache full (16 MiB),
and the collections of an aux node's gc loop under a stream of new keys
(simulated time), with its policy before and now.

    PYTHONPATH=. python bin/loopstall.py                              # 16,000/s, 1M keys, 60 s
    PYTHONPATH=. python bin/loopstall.py --rate 30000 --duration 40 --keys 100000
    PYTHONPATH=. python bin/loopstall.py --json                       # the stalls as JSON on stdout
    PYTHONPATH=. python bin/loopstall.py --work                       # work per event, in-process (about 1 min)

Placement as in ``bin/bench``'s latency group: the master alone on core 0;
the aux node, the generator and the probes on core 1 (``--no-pin``: left
to the scheduler).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
_LEN = struct.Struct(">I")


@dataclass(slots=True)
class Probe:
    """One daemon's PINGs: (seconds since the probes started, round trip, loop CPU, loop run-queue wait), all in seconds.

    The wait is counted from the start of the PING before the previous one, so
    that a loop catching up after it was descheduled is not taken for a stall.
    """

    name: str
    pid: int
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(role: str, args: list[str], core: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``dcache ROLE`` on 127.0.0.1 (pinned to ``core`` if given); the process and its ``host:port``."""
    proc = subprocess.Popen(
        [PY, "-m", "dcache", role, "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, core)) if core else None,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"{role} did not start: {line!r}")
    return proc, line.split()[1]


def loop_thread_times(pid: int) -> tuple[float, float]:
    """Seconds the main (event-loop) thread of ``pid`` ran on a CPU and waited on a run queue."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", "rb") as f:
        run, wait, _ = f.read().split()
    return int(run) / 1e9, int(wait) / 1e9


def connect(addr: str) -> socket.socket:
    """A connection to ``addr`` that said HELLO."""
    host, _, port = addr.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    call(sock, [1, 1, 1, None, "loopstall"])
    return sock


def call(sock: socket.socket, request: list[Any]) -> Any:
    """Send one request frame and read its answer frame (decoded)."""
    body = msgpack.packb(request, use_bin_type=True)
    sock.sendall(_LEN.pack(len(body)) + body)
    head = _recv(sock, 4)
    return msgpack.unpackb(_recv(sock, _LEN.unpack(head)[0]), raw=False)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def run_probe(probe: Probe, addr: str, start: float, end: float, period_s: float) -> None:
    """PING ``addr`` every ``period_s`` from ``start`` to ``end`` (``time.monotonic``), recording into ``probe``."""
    sock = connect(addr)
    body = msgpack.packb([2, 7], use_bin_type=True)
    ping = _LEN.pack(len(body)) + body
    pid = probe.pid
    record = probe.samples.append
    due = start
    waits = [loop_thread_times(pid)[1]] * 2
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if due > now:
                time.sleep(due - now)
            run0, wait0 = loop_thread_times(pid)
            t0 = time.monotonic()
            sock.sendall(ping)
            _recv(sock, _LEN.unpack(_recv(sock, 4))[0])
            t1 = time.monotonic()
            run1, wait1 = loop_thread_times(pid)
            record((t0 - start, t1 - t0, run1 - run0, wait1 - waits[-2]))
            waits.append(wait0)
            due = max(due + period_s, t1)
    finally:
        sock.close()


def scrape(urls: list[str], every_s: float, end: float) -> None:
    """Fetch every URL every ``every_s`` seconds until ``end`` (as Prometheus would)."""
    while time.monotonic() < end:
        for url in urls:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
        time.sleep(every_s)


#: Run-queue wait of the loop thread around a PING above which its round trip is the machine's, not the loop's.
WAITED_S = 0.0002


def stalls_of(probe: Probe, threshold_s: float) -> list[tuple[float, float, float]]:
    """PINGs answered later than ``threshold_s`` while the loop thread did not wait for a CPU: (time, round trip, loop CPU)."""
    return [(t, rtt, run) for t, rtt, run, wait in probe.samples if rtt > threshold_s and wait < WAITED_S]


def summary(probe: Probe, threshold_s: float) -> dict[str, Any]:
    """Round-trip percentiles, loop stalls with their intervals, and scheduling delays of one probe."""
    rtts = sorted(s[1] for s in probe.samples)

    def pct(p: float) -> float:
        return round(rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3, 3) if rtts else 0.0

    stalls = stalls_of(probe, threshold_s)
    late = [s for s in probe.samples if s[1] > threshold_s and s[3] >= WAITED_S]
    return {
        "daemon": probe.name,
        "pings": len(rtts),
        "rtt_ms": {"p50": pct(0.5), "p99": pct(0.99), "p99.9": pct(0.999), "max": pct(1.0)},
        "loop_stalls": [{"at_s": round(t, 3), "loop_cpu_ms": round(run * 1e3, 2), "rtt_ms": round(rtt * 1e3, 2)} for t, rtt, run in stalls],
        "stall_intervals_s": [round(b[0] - a[0], 2) for a, b in itertools.pairwise(stalls)],
        "late_waited": len(late),
        "late_waited_ms": round(sum(s[3] for s in late) * 1e3, 1),
    }


def print_summary(s: dict[str, Any], threshold_ms: float) -> None:
    """The human-readable report of one probe."""
    r = s["rtt_ms"]
    print(f"\n{s['daemon']}: {s['pings']} PINGs, round trip p50 {r['p50']} p99 {r['p99']} p99.9 {r['p99.9']} max {r['max']} ms")
    stalls = s["loop_stalls"]
    print(f"  loop stalls (PING answered after > {threshold_ms:g} ms, loop thread never waited for a CPU around it): {len(stalls)}")
    for st in stalls:
        print(f"    at {st['at_s']:8.3f} s: loop CPU {st['loop_cpu_ms']:6.2f} ms, round trip {st['rtt_ms']:6.2f} ms")
    if s["stall_intervals_s"]:
        print(f"  intervals between stalls (s): {s['stall_intervals_s']}")
    print(
        f"  PINGs later than {threshold_ms:g} ms whose loop thread waited for a CPU: {s['late_waited']}"
        f" (their loop thread waited for a CPU {s['late_waited_ms']} ms in all)"
    )


def _worst(calls: Any) -> float:
    """The most CPU time (ms) one call took among ``calls`` (an iterable of zero-argument callables)."""
    clock = time.thread_time
    worst = 0.0
    for f in calls:
        t0 = clock()
        f()
        worst = max(worst, clock() - t0)
    return worst * 1e3


def work_per_event() -> None:
    """``--work``: the CPU time of single events a loop runs in one go (see the module note); garbage collection off but where measured."""
    import gc

    from dcache.hlc import wall_ms
    from dcache.lru import LRUCache
    from dcache.master.nearcache import HotKeys

    gc.disable()
    hot = HotKeys()
    keys = [b"key:%d" % (i * 7919 % 100_000) for i in range(1 << 20)]
    print(f"HotKeys.note, worst of {len(keys)} reads: {_worst(lambda k=k: hot.note(k) for k in keys):.3f} ms")
    now = wall_ms()
    cache = LRUCache(4 << 30)
    n = 1_000_000
    for i in range(n):
        cache.set(b"key:%d" % i, b"v" * 100, expires_at=now + 3_600_000)
    worst = _worst(
        lambda k=b"key:%d" % i, e=now + 3_600_001 + r: cache.set(k, b"w" * 100, expires_at=e) for r in range(2) for i in range(n)
    )
    print(f"SET with a TTL, worst of {2 * n} overwrites of {n} expiring keys: {worst:.1f} ms")
    cache.clear()
    full = LRUCache(200 << 20)
    i = 0
    while not full.evictions:
        full.set(b"key:%d" % i, b"v" * 100)
        i += 1
    for size in (1, 8):
        before = full.evictions
        ms = _worst([lambda size=size: full.set(b"big:%d" % size, b"x" * (size << 20))])
        print(f"SET of {size} MiB into a full cache of {len(full)} 100-byte entries: {ms:.2f} ms ({full.evictions - before} evicted)")
    full.clear()
    gc.enable()
    print(f"master's full collection with a full near cache: {_near_cache_collection():.2f} ms")
    from dcache.auxnode.node import GC_CHECK_S, GC_FREEZE_INTERVAL_S, freeze_due

    for label, due in (("every 5 s (before)", lambda age: age >= GC_FREEZE_INTERVAL_S), ("freeze_due (now)", freeze_due)):
        worst, total, count = _gc_under_inserts(due)
        print(
            f"aux node's gc, 1,000,000 new keys at 40,000/s, looked at every {GC_CHECK_S} s, policy {label}: "
            f"worst collection {worst:.1f} ms, {count} collections, {total:.0f} ms in all"
        )


def _near_cache_collection(rounds: int = 5) -> float:
    """A master's ``gc.collect()`` with its near cache full at the default size (16 MiB of 100-byte values): worst ms.

    The master freezes what start-up allocated, not what it copies later:
    each copy (a list) is tracked, and a full collection walks them all.
    """
    import gc

    from dcache.master.nearcache import NearCache

    class _Conn:  # a tracking connection with a live lease
        lease_from = float("inf")
        closed = False

    near = NearCache(16 << 20)
    conn = _Conn()
    i = 0
    while not near.evictions:
        key = b"key:%d" % i
        near.end_fill(key, near.start_fill(key), [b"v" * 100, 0, i + 1], conn)  # type: ignore[arg-type]
        i += 1
    worst = 0.0
    for _ in range(rounds):
        started = time.thread_time()
        gc.collect()
        worst = max(worst, (time.thread_time() - started) * 1e3)
    print(f"  ({len(near.entries)} copies)")
    return worst


def _gc_under_inserts(due: Callable[[float], bool], keys: int = 1_000_000, rate: int = 40_000) -> tuple[float, float, int]:
    """The aux node's gc loop under a stream of new keys, time simulated: (worst collection ms, total ms, collections).

    Every collection counts, the collector's own young collections as well
    as the loop's (``gc.callbacks``); the loop looks every ``GC_CHECK_S`` of
    simulated time (``rate * GC_CHECK_S`` keys).
    """
    import gc

    from dcache.auxnode.node import GC_CHECK_S, GC_GEN0_THRESHOLD
    from dcache.lru import LRUCache

    cache = LRUCache(4 << 30)
    gc.collect()
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    times: list[float] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            times.append((time.perf_counter() - started[0]) * 1e3)

    gc.callbacks.append(timed)
    step = int(rate * GC_CHECK_S)
    frozen_at = 0.0
    try:
        for i in range(keys):
            cache.set(b"key:%d" % i, b"v" * 100)
            if (i + 1) % step == 0:
                now = (i + 1) / rate
                if due(now - frozen_at):
                    gc.collect(1)
                    gc.freeze()
                    frozen_at = now
    finally:
        gc.callbacks.remove(timed)
        gc.set_threshold(*old)
        gc.unfreeze()
        cache.clear()
        gc.collect()
    return max(times, default=0.0), sum(times), len(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=16000, help="requests per second through the master (default: 16000)")
    ap.add_argument("--duration", type=float, default=60, help="seconds of steady load probed (default: 60)")
    ap.add_argument("--keys", type=int, default=1_000_000, help="key space, written first (default: 1,000,000)")
    ap.add_argument("--snapshot-interval", type=float, default=10, help="aux node's --snapshot-interval; 0: none (default: 10)")
    ap.add_argument("--near-cache-size", default="16MiB", help="master's --near-cache-size (default: 16MiB, its default)")
    ap.add_argument("--period-ms", type=float, default=1.0, help="milliseconds between PINGs of each probe (default: 1)")
    ap.add_argument("--threshold-ms", type=float, default=1.0, help="round trip of a PING that counts as late (default: 1)")
    ap.add_argument("--scrape", type=float, default=0, help="fetch both daemons' /metrics every S seconds (default: 0, never)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="leave placement to the scheduler")
    ap.add_argument("--json", action="store_true", help="print the summaries as JSON on stdout")
    ap.add_argument("--work", action="store_true", help="measure the work of single events in this process instead (module note)")
    args = ap.parse_args()
    if args.work:
        work_per_event()
        return 0
    front, back = ({0}, {1}) if args.pin and (os.cpu_count() or 1) >= 2 else (None, None)
    procs: list[subprocess.Popen[bytes]] = []
    print(f"uptime before: {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="loopstall-") as tmp:
        try:
            aux_metrics, master_metrics = free_port(), free_port()
            aux, aux_addr = start_daemon(
                "aux",
                ["--node-id", "stall-aux", "--max-memory", "2GB", "--data-dir", tmp, "--metrics-port", str(aux_metrics),
                 "--snapshot-interval", str(args.snapshot_interval)],
                back,
            )  # fmt: skip
            procs.append(aux)
            master, master_addr = start_daemon(
                "master",
                ["--node-id", "stall-master", "--aux", f"stall-aux={aux_addr}", "--metrics-port", str(master_metrics),
                 "--near-cache-size", args.near_cache_size],
                front,
            )  # fmt: skip
            procs.append(master)
            bench = [PY, "-m", "dcache", "bench", "--addr", master_addr, "--keys", str(args.keys), "--conns", "50",
                     "--ratio", "0.9", "--value-size", "100", "--procs", "1", "--quiet"]  # fmt: skip
            pin = (lambda: os.sched_setaffinity(0, back)) if back else None
            print(f"writing {args.keys} keys through the master ...", file=sys.stderr, flush=True)
            subprocess.run([*bench, "--depth", "16", "--duration", "1"], check=True, cwd=ROOT, preexec_fn=pin, stdout=subprocess.DEVNULL)
            print(f"{args.rate:.0f}/s through the master for {args.duration:g} s, probing both loops ...", file=sys.stderr, flush=True)
            load = subprocess.Popen(
                [*bench, "--rate", f"{args.rate:.0f}", "--duration", str(args.duration + 4), "--no-populate", "--json"],
                cwd=ROOT, preexec_fn=pin, stdout=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(2)  # the generator's connections are up and its schedule running
            start = time.monotonic()
            end = start + args.duration
            probes = [Probe("master", master.pid), Probe("aux node", aux.pid)]
            threads = [
                threading.Thread(target=run_probe, args=(p, a, start, end, args.period_ms / 1e3))
                for p, a in zip(probes, (master_addr, aux_addr), strict=True)
            ]
            if args.scrape > 0:
                urls = [f"http://127.0.0.1:{p}/metrics" for p in (master_metrics, aux_metrics)]
                threads.append(threading.Thread(target=scrape, args=(urls, args.scrape, end)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out, _ = load.communicate(timeout=120)
            result = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    summaries = [summary(p, args.threshold_ms / 1e3) for p in probes]
    print(f"uptime after: {os.getloadavg()}", file=sys.stderr)
    print(
        f"load: target {args.rate:.0f}/s, achieved {result['achieved_rate']:.0f}/s, p50 {result['p50_ms']} p99 {result['p99_ms']}"
        f" p99.9 {result['p999_ms']} max {result['max_ms']} ms, {result['errors']} errors",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({"load": result, "probes": summaries}))
    else:
        for s in summaries:
            print_summary(s, args.threshold_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
