#!/usr/bin/env python3
"""The one request that holds a daemon's loop longest: each candidate against real nodes, with a PING watch.

    .venv/bin/python bin/bench_loop_stall.py [--keys 20000] [--key-bytes 1024] [--parallel N [--for-s S]] [--only NAME ...]

Starts an aux node and a master in front of it (both with ``--resp-port 0``)
on 127.0.0.1, stores ``--keys`` keys of ``--key-bytes`` bytes, then sends
each candidate request once (the largest its bounds allow) while a second
connection PINGs the daemon that does the work every 5 ms. Prints, per
request, its time to answer and the worst gap between two PING answers: a
gap well above 5 ms is time the request held the loop. The known worst case
is a RESP SCAN whose MATCH pattern costs key length x pattern length byte
steps per key (``crafted_pattern``). With ``--parallel N`` each candidate is
sent on N connections at once (one process each): what many clients sending
the largest request cost everyone else; with ``--for-s S`` each sends it
again and again for S seconds (the steady state, arrivals spread).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hiredis

from dcache.protocol import MAX_BATCH_KEYS, Op, encode_request
from dcache.protocol.limits import MAX_CONFIG_PATTERN_BYTES, MAX_CONFIG_PATTERNS
from tests.harness import DaemonProcess
from tests.wire import PingWatch, call, read_frame, split_addr

PING_INTERVAL_S = 0.005


def crafted_pattern(key_bytes: int) -> bytes:
    """A MATCH pattern no key of ``key_bytes`` bytes matches, at the most byte steps per key.

    One middle piece of classes matching any printable byte (no literal
    prefix for a fast search) tried at every place of the key and failing at
    its last byte (``c``; no stored key holds one): up to ``key_bytes x piece``
    steps, most for a piece a little shorter than the key.
    """
    return b"*" + b"[!-~]" * (key_bytes - key_bytes // 40) + b"c*"


def resp_command(*args: bytes) -> bytes:
    """One RESP array command."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def resp_call(port: int, command: bytes, timeout: float = 300.0) -> object:
    """Send one RESP command on a new connection to 127.0.0.1:``port``; return its reply."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command)
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            data = s.recv(1 << 20)
            if not data:
                raise EOFError("server closed the connection")
            reader.feed(data)


def native_call(addr: str, frame: bytes, timeout: float = 300.0) -> object:
    """Send one native frame on a new connection to ``addr``; return its answer's ``[status, result]``."""
    with socket.create_connection(split_addr(addr), timeout=timeout) as s:
        s.sendall(frame)
        _rid, status, result = read_frame(s, timeout=timeout)[1]  # type: ignore[misc]
    return [status, result]


def summary(reply: object) -> str:
    """A short text of an answer: its shape, not its bytes."""
    if isinstance(reply, list):
        if len(reply) == 2 and isinstance(reply[1], list):
            return f"[{reply[0]!r:.20}, {len(reply[1])} items]"
        return f"{len(reply)} items"
    return f"{reply!r:.80}"


def _send_one(send: Callable[[], object], start: Any, out: Any, seconds: float) -> None:
    """One sender process of ``in_parallel``: wait for the others, send (again until ``seconds`` passed), report the last reply's summary (or the error)."""
    try:
        start.wait(timeout=60)
        deadline = time.monotonic() + seconds
        reply = send()
        sent = 1
        while time.monotonic() < deadline:
            reply = send()
            sent += 1
        out.put(f"{sent} {summary(reply)}")
    except BaseException as exc:  # reported by the parent
        out.put(f"error: {exc!r}")


def in_parallel(send: Callable[[], object], n: int, seconds: float = 0.0) -> str:
    """Run ``send`` in ``n`` processes at once (each opens its own connection), each again until ``seconds`` passed; return a reply's ``summary``.

    Processes, not threads: the PING watch's thread then shares the GIL
    with nobody, so its gaps are the daemon's. After the first round the
    requests no longer arrive together: the steady state of many clients
    each sending the request over and over.
    """
    if n <= 1 and not seconds:
        return summary(send())
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(n)
    out = ctx.Queue()
    procs = [ctx.Process(target=_send_one, args=(send, start, out, seconds), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    replies = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r for r in replies if r.startswith("error")]
    if errors:
        raise RuntimeError(errors[0])
    answered = sum(int(r.split(" ", 1)[0]) for r in replies)
    return f"{answered} answered, {replies[0].split(' ', 1)[1]}"


def measure(label: str, addr: str, pid: int, send: Callable[[], object], parallel: int = 1, seconds: float = 0.0) -> None:
    """Run ``send`` once (on ``parallel`` connections at once, each again for ``seconds``) while PINGing ``addr`` every 5 ms; print its time and the worst PING gap."""
    with PingWatch(addr, pid, interval=PING_INTERVAL_S) as watch:
        time.sleep(0.1)
        t0 = time.monotonic()
        shown = in_parallel(send, parallel, seconds)
        elapsed = time.monotonic() - t0
        time.sleep(0.1)
    if parallel > 1:
        label = f"{label} x{parallel}"
    if seconds:
        label = f"{label} for {seconds:g} s"
    gaps = sorted(watch.gaps) or [0.0]
    p50, p99 = gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, len(gaps) * 99 // 100)]
    print(
        f"{label:<48} answer in {elapsed * 1000:7.0f} ms, worst PING gap {watch.worst_gap() * 1000:6.0f} ms"
        f" (p50 {p50 * 1000:.1f}, p99 {p99 * 1000:.0f}; {len(watch.gaps)} PINGs): {shown}",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=20_000, help="keys stored (default 20000)")
    ap.add_argument("--key-bytes", type=int, default=1024, help="bytes per key (default 1024, the largest allowed)")
    ap.add_argument("--parallel", type=int, default=1, help="send each request on this many connections at once (default 1)")
    ap.add_argument("--for-s", type=float, default=0.0, help="each connection sends its request again until this many seconds passed")
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose label contains one of these words")
    args = ap.parse_args()
    kb = args.key_bytes
    aux = DaemonProcess("aux", ["--port", "0", "--resp-port", "0", "--node-id", "a0", "--log-level", "warning"]).start()
    master = DaemonProcess("master", ["--port", "0", "--resp-port", "0", "--aux", f"a0={aux.addr}", "--log-level", "warning"]).start()
    try:
        assert aux.proc is not None and master.proc is not None
        print(
            f"machine: {os.cpu_count()} cores, {os.getloadavg()[0]:.2f} load; {args.keys} keys of {kb} bytes; {args.parallel} connection(s) per request",
            flush=True,
        )
        keys = [(b"%09d" % i).ljust(kb, b"k") for i in range(args.keys)]
        for i in range(0, len(keys), 1000):
            status = call(master.addr, Op.MSET, 1, [[k, b"v" * 16] for k in keys[i : i + 1000]], timeout=60)[1]
            assert status == 0, status
        batch = keys[:MAX_BATCH_KEYS]
        pattern = crafted_pattern(kb)
        big_value = b"v" * ((30 * 2**20) // MAX_BATCH_KEYS - kb - 16)
        config_args = [b"CONFIG", b"GET", *[b"*" + b"[ab]" * ((MAX_CONFIG_PATTERN_BYTES - 2) // 4) + b"*"] * MAX_CONFIG_PATTERNS]
        del_args = [b"DEL", *[(b"d%09d" % i).ljust(kb, b"k") for i in range(30_000)]]
        scan_crafted = resp_command(b"SCAN", b"0", b"MATCH", pattern, b"COUNT", b"10000")
        scan_plain = resp_command(b"SCAN", b"0", b"MATCH", b"*x*", b"COUNT", b"10000")
        cases: list[tuple[str, DaemonProcess, Callable[[], object]]] = [
            ("aux: RESP SCAN COUNT 10000 MATCH crafted", aux, lambda: resp_call(aux.resp_port, scan_crafted)),
            ("aux: RESP SCAN COUNT 10000 MATCH *x*", aux, lambda: resp_call(aux.resp_port, scan_plain)),
            ("master: RESP SCAN COUNT 10000 MATCH crafted", master, lambda: resp_call(master.resp_port, scan_crafted)),
            (
                "aux: native SCAN count 10000 (all ranges)",
                aux,
                lambda: native_call(aux.addr, encode_request(Op.SCAN, 1, [[0, 0]], 0, 10_000, 0)),
            ),
            ("aux: native MGET 10000 keys", aux, lambda: native_call(aux.addr, encode_request(Op.MGET, 1, batch))),
            ("master: native MGET 10000 keys", master, lambda: native_call(master.addr, encode_request(Op.MGET, 1, batch))),
            ("aux: native EXISTS 10000 keys", aux, lambda: native_call(aux.addr, encode_request(Op.EXISTS, 1, batch))),
            (
                "master: native MSET 10000 x 3 KiB",
                master,
                lambda: native_call(master.addr, encode_request(Op.MSET, 1, [[k, big_value] for k in batch])),
            ),
            ("aux: RESP MGET 10000 keys", aux, lambda: resp_call(aux.resp_port, resp_command(b"MGET", *batch))),
            ("aux: native MGETV 10000 keys", aux, lambda: native_call(aux.addr, encode_request(Op.MGETV, 1, batch))),
            (
                "aux: native MSET 10000 x 3 KiB",
                aux,
                lambda: native_call(aux.addr, encode_request(Op.MSET, 1, [[k, big_value] for k in batch])),
            ),
            ("aux: RESP DEL 30000 missing keys", aux, lambda: resp_call(aux.resp_port, resp_command(*del_args))),
            ("master: RESP DEL 30000 missing keys", master, lambda: resp_call(master.resp_port, resp_command(*del_args))),
            ("aux: RESP CONFIG GET 64 crafted patterns", aux, lambda: resp_call(aux.resp_port, resp_command(*config_args))),
            ("master: RESP DBSIZE", master, lambda: resp_call(master.resp_port, resp_command(b"DBSIZE"))),
            ("master: RESP INFO", master, lambda: resp_call(master.resp_port, resp_command(b"INFO"))),
            ("aux: native RANGE_COUNT all ranges", aux, lambda: native_call(aux.addr, encode_request(Op.RANGE_COUNT, 1, [[0, 0]]))),
        ]
        for label, node, send in cases:
            if args.only is not None and not any(word in label for word in args.only):
                continue
            assert node.proc is not None
            measure(label, node.addr, node.proc.pid, send, args.parallel, args.for_s)
    finally:
        for p in (master, aux):
            p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
