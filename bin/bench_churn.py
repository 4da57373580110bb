#!/usr/bin/env python3
"""Memory under connection churn and parked partial frames (issue 13, findings 4 and 5).

Starts a real aux node and a master that has it as its seed
(``dcache master --aux a1=HOST:PORT``) on 127.0.0.1, loads them, samples
each process's VmRSS (/proc/PID/status) before, during and after, and
prints a table. Everything it starts stops by itself (SIGTERM, then SIGKILL
after a bounded wait).

Modes:

    bin/bench_churn.py churn [-n 200000]   # N connect-HELLO+PING-close cycles against EACH of aux and master
    bin/bench_churn.py park [-k 60 -b 32MiB --max-memory 32MB]
                                            # K connections each send a header announcing B bytes and B-1
                                            # body bytes, stay until the server holds them, then close
    bin/bench_churn.py park --complete      # the same with whole frames: what an idle connection keeps

``--diag`` starts the daemons through this script's ``_daemon`` launcher
instead of ``python -m dcache``: the same code, plus a SIGUSR1 probe that
reports gc counts, the freeze count, glibc's mallinfo2, how many
``FrameProtocol`` objects are alive and how the dead ones were freed
(reference counting or the cyclic GC), a referrer chain of a closed but
living connection, and (with ``--tracemalloc N``) a tracemalloc diff
against the first snapshot. ``--after-collect`` also runs ``gc.collect()``
in the daemons after the load (and ``gc.unfreeze()`` first with
``--unfreeze``) and samples once more; ``--trim`` calls ``malloc_trim(0)``.

``--mallopt NAME=VALUE`` (repeatable; diag launcher only) sets glibc
malloc parameters through ctypes before the daemon starts, e.g.
``--mallopt M_MMAP_THRESHOLD=131072`` pins the mmap threshold (which also
turns off its dynamic adjustment), to measure allocator options without
changing dcache.

The load runs in ``--procs`` processes of ``--conns`` connector coroutines
each, on uvloop; half of the connectors aim at the aux node, half at the
master (``--target`` picks one). Each cycle: connect, send HELLO and PING in
one write, read both answers, close.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 60.0

# -- RSS -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- daemons ---------------------------------------------------------------------------


class Daemon:
    """One ``dcache ROLE`` child: started on port 0, READY line awaited (bounded)."""

    def __init__(self, role: str, args: list[str], *, diag: bool, env: dict[str, str], workdir: Path) -> None:
        self.role = role
        self.args = args
        self.diag = diag
        self.env = env
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0
        self.stderr_lines: list[str] = []
        self.probe_path = workdir / f"{role}.probe"
        self._probe_seq = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **self.env)
        if self.diag:
            env["BENCH_CHURN_PROBE"] = str(self.probe_path)
            cmd = [sys.executable, str(Path(__file__).resolve()), "_daemon", self.role, *self.args]
        else:
            cmd = [sys.executable, "-m", "dcache", self.role, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = _readline(self.proc, READY_TIMEOUT_S)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"{self.role} not ready ({line!r}):\n" + "\n".join(self.stderr_lines[-30:]))
        host, _, port = line.split()[1].rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        return self

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode(errors="replace").rstrip())
            del self.stderr_lines[:-200]

    def rss(self) -> float:
        return rss_mb(self.pid)

    def probe(self, **cmd: Any) -> dict[str, Any]:
        """Ask the diag launcher inside the daemon (SIGUSR1) and return its JSON answer."""
        if not self.diag:
            return {}
        self._probe_seq += 1
        cmd["seq"] = self._probe_seq
        out = self.probe_path.with_suffix(".out")
        out.unlink(missing_ok=True)
        self.probe_path.write_text(json.dumps(cmd))
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                answer = json.loads(out.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if answer.get("seq") == self._probe_seq:
                return dict(answer)
            time.sleep(0.05)
        raise RuntimeError(f"{self.role}: no probe answer in {PROBE_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    box: list[bytes] = []
    assert proc.stdout is not None
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return box[0].decode().strip() if box else ""


def start_cluster(args: argparse.Namespace, workdir: Path) -> tuple[Daemon, Daemon]:
    env: dict[str, str] = {}
    if args.tracemalloc:
        env["BENCH_CHURN_TRACEMALLOC"] = str(args.tracemalloc)
    if args.mallopt:
        env["BENCH_CHURN_MALLOPT"] = ",".join(args.mallopt)
    for item in args.env:
        k, _, v = item.partition("=")
        env[k] = v
    aux_args = ["--port", "0", "--node-id", "a1", "--log-level", "warning", "--max-memory", args.max_memory]
    aux = Daemon("aux", aux_args, diag=args.diag, env=env, workdir=workdir).start()
    master_args = ["--port", "0", "--aux", f"a1={aux.host}:{aux.port}", "--log-level", "warning"]
    try:
        master = Daemon("master", master_args, diag=args.diag, env=env, workdir=workdir).start()
    except BaseException:
        aux.stop()
        raise
    return aux, master


# -- load: churn -----------------------------------------------------------------------


def _frames(kind: str) -> bytes:
    """HELLO, then PING (``ping``), GET (``get``: a master forwards it), an undecodable frame (``bad``) or a header over the 32 MiB limit (``toolarge``).

    Each draws exactly two answer frames: HELLO's, then PONG or the error frame sent before the server closes.
    """
    import msgpack

    from dcache.protocol import PROTOCOL_VERSION, Op

    def frame(body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + body

    out = frame(msgpack.packb([int(Op.HELLO), 1, PROTOCOL_VERSION, None, "churn"], use_bin_type=True))
    if kind == "ping":
        return out + frame(msgpack.packb([int(Op.PING), 2]))
    if kind == "get":
        return out + frame(msgpack.packb([int(Op.GET), 2, b"churn-key"], use_bin_type=True))
    if kind == "bad":
        return out + frame(b"\xc1")  # 0xc1 is never used in msgpack
    return out + (32 * 1024 * 1024 + 1).to_bytes(4, "big")


class _ChurnProtocol(asyncio.Protocol):
    """Send HELLO+PING, read two answer frames, close; ``done`` gets the outcome."""

    def __init__(self, request: bytes, done: asyncio.Future[bool]) -> None:
        self.request = request
        self.done = done
        self.buf = b""
        self.frames = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                break
            self.buf = self.buf[4 + n :]
            self.frames += 1
        if self.frames >= 2 and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.frames >= 2)


async def _churn_worker(targets: list[tuple[str, int]], cycles: list[int], conns: int, kind: str, progress: Any) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    request = _frames(kind)
    ok = failed = 0

    async def one_connector(host: str, port: int, n: int) -> None:
        nonlocal ok, failed
        for _ in range(n):
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await loop.create_connection(lambda done=done: _ChurnProtocol(request, done), host, port)  # type: ignore[misc]
                good = await asyncio.wait_for(done, 10)
            except (TimeoutError, OSError):
                good = False
                await asyncio.sleep(0.01)
            if good:
                ok += 1
            else:
                failed += 1
            if (ok + failed) % 500 == 0:
                with progress.get_lock():
                    progress.value += 500

    jobs = []
    for (host, port), n in zip(targets, cycles, strict=True):
        per, extra = divmod(n, conns)
        for i in range(conns):
            jobs.append(one_connector(host, port, per + (1 if i < extra else 0)))
    await asyncio.gather(*jobs)
    return ok, failed


def _churn_proc(targets: list[tuple[str, int]], cycles: list[int], conns: int, kind: str, progress: Any, results: Any) -> None:
    import uvloop

    results.put(uvloop.run(_churn_worker(targets, cycles, conns, kind, progress)))


# -- load: parked partial frames --------------------------------------------------------


async def _park(host: str, port: int, k: int, frame_bytes: int, complete: bool, on_parked: Any) -> int:
    """Open ``k`` connections, send each a frame of ``frame_bytes`` (one byte short unless ``complete``), then close them all.

    A partial frame's body is one msgpack bin 32, one byte short: the decoder
    keeps waiting for the rest (an object that ends early is a protocol error
    and closes the connection, which would not park anything). A complete
    frame is ``[PING, 1, bin]``: the server answers BAD_ARGUMENTS, which is
    read, and the connection stays open and idle.
    """
    writers = []
    readers = []
    filler = b"\0" * (1024 * 1024)
    for _ in range(k):
        r, w = await asyncio.open_connection(host, port)
        readers.append(r)
        writers.append(w)
    for w in writers:
        if complete:
            w.write(frame_bytes.to_bytes(4, "big") + b"\x93\x02\x01\xc6" + (frame_bytes - 8).to_bytes(4, "big"))
            left = frame_bytes - 8
        else:
            w.write(frame_bytes.to_bytes(4, "big") + b"\xc6" + (frame_bytes - 5).to_bytes(4, "big"))
            left = frame_bytes - 1 - 5
        while left:
            chunk = filler[: min(left, len(filler))]
            w.write(chunk)
            left -= len(chunk)
            await w.drain()
    if complete:
        for r in readers:
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(4), 30), "big")
            await asyncio.wait_for(r.readexactly(n), 30)
    await on_parked()
    for w in writers:
        w.close()
    for w in writers:
        try:
            await w.wait_closed()
        except OSError:
            pass
    return k


# -- report ----------------------------------------------------------------------------


class Table:
    def __init__(self, daemons: list[Daemon]) -> None:
        self.daemons = daemons
        self.rows: list[tuple[str, list[float]]] = []

    def sample(self, label: str) -> list[float]:
        row = [d.rss() for d in self.daemons]
        self.rows.append((label, row))
        print(f"  {label:<28}" + "".join(f"{v:>10.1f}" for v in row), flush=True)
        return row

    def header(self) -> None:
        print(f"  {'VmRSS MiB':<28}" + "".join(f"{d.role:>10}" for d in self.daemons), flush=True)

    def growth(self, start: str, end: str) -> list[float]:
        rows = dict(self.rows)
        return [b - a for a, b in zip(rows[start], rows[end], strict=True)]


def _print_probe(d: Daemon, answer: dict[str, Any], what: str) -> None:
    if not answer:
        return
    keep = {k: v for k, v in answer.items() if k not in ("seq", "diff", "chain", "gc_stats")}
    print(f"  [{d.role} {what}] {json.dumps(keep)}")
    if answer.get("gc_stats"):
        print(f"  [{d.role} {what}] gc.get_stats(): {answer['gc_stats']}")
    for line in answer.get("chain", []):
        print(f"  [{d.role} {what}] chain: {line}")
    for line in answer.get("diff", []):
        print(f"  [{d.role} {what}] tracemalloc: {line}")


def _after(args: argparse.Namespace, table: Table, daemons: list[Daemon]) -> None:
    time.sleep(args.settle)
    table.sample("after close (+settle)")
    for d in daemons:
        _print_probe(d, d.probe(op="stats", chain=True, diff=bool(args.tracemalloc)), "after")
    if args.after_collect:
        for d in daemons:
            _print_probe(d, d.probe(op="collect", unfreeze=args.unfreeze), "gc.collect()")
        table.sample("after gc.collect()" + (" +unfreeze" if args.unfreeze else ""))
    if args.trim:
        for d in daemons:
            _print_probe(d, d.probe(op="trim"), "malloc_trim(0)")
        table.sample("after malloc_trim(0)")


def run_churn(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_churn.") as tmp:
        aux, master = start_cluster(args, Path(tmp))
        daemons = [aux, master]
        try:
            table = Table(daemons)
            print(
                f"churn: {args.n} connect-HELLO+{args.request.upper()}-close cycles against {args.target}, {args.procs} procs x {args.conns} connectors"
            )
            table.header()
            time.sleep(args.settle)
            for d in daemons:
                _print_probe(d, d.probe(op="stats", snapshot=bool(args.tracemalloc)), "before")
            table.sample("before")
            targets = {
                "aux": [(aux.host, aux.port)],
                "master": [(master.host, master.port)],
                "both": [(aux.host, aux.port), (master.host, master.port)],
            }[args.target]
            per_proc = [[_split(args.n, args.procs, p) for _ in targets] for p in range(args.procs)]
            progress = multiprocessing.Value("q", 0)
            results: Any = multiprocessing.Queue()
            procs = [
                multiprocessing.Process(
                    target=_churn_proc, args=(targets, per_proc[p], args.conns, args.request, progress, results), daemon=True
                )
                for p in range(args.procs)
            ]
            t0 = time.monotonic()
            for p in procs:
                p.start()
            total = args.n * len(targets)
            marks = [total * i // 4 for i in range(1, 4)]
            deadline = t0 + args.timeout
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)
                if marks and progress.value >= marks[0]:
                    table.sample(f"during ({100 * marks.pop(0) // total}%)")
            ok = failed = 0
            for p in procs:
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    p.terminate()
                    p.join()
            while not results.empty():
                a, b = results.get()
                ok += a
                failed += b
            elapsed = time.monotonic() - t0
            print(f"  {ok} cycles ok, {failed} failed in {elapsed:.1f} s ({ok / elapsed:.0f}/s)")
            table.sample("after load")
            _after(args, table, daemons)
            growth = table.growth("before", "after close (+settle)")
            print("  growth after close (MiB): " + ", ".join(f"{d.role} {g:+.1f}" for d, g in zip(daemons, growth, strict=True)))
            print(
                "RESULT "
                + json.dumps(
                    {
                        "mode": "churn",
                        "n": args.n,
                        "ok": ok,
                        "failed": failed,
                        "rows": table.rows,
                        "growth": dict(zip([d.role for d in daemons], growth, strict=True)),
                    }
                )
            )
            return 0 if failed == 0 else 1
        finally:
            for d in reversed(daemons):
                d.stop()


def _split(n: int, parts: int, i: int) -> int:
    per, extra = divmod(n, parts)
    return per + (1 if i < extra else 0)


def run_park(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_churn.") as tmp:
        aux, master = start_cluster(args, Path(tmp))
        daemons = [aux, master]
        try:
            table = Table(daemons)
            target = aux if args.target in ("aux", "both") else master
            sent = "all B sent, answered, then idle" if args.complete else "B-1 sent"
            print(
                f"park: {args.k} connections x {args.frame_bytes} byte frames ({sent}) against {target.role}, aux --max-memory {args.max_memory}"
            )
            table.header()
            time.sleep(args.settle)
            for d in daemons:
                _print_probe(d, d.probe(op="stats", snapshot=bool(args.tracemalloc)), "before")
            table.sample("before")

            async def on_parked() -> None:
                await asyncio.sleep(args.hold)
                table.sample("parked (all open)" if not args.complete else "answered, idle (all open)")
                for d in daemons:
                    _print_probe(d, d.probe(op="stats"), "parked")

            import uvloop

            uvloop.run(_park(target.host, target.port, args.k, args.frame_bytes, args.complete, on_parked))
            table.sample("just closed")
            _after(args, table, daemons)
            growth = table.growth("before", "after close (+settle)")
            print("  growth after close (MiB): " + ", ".join(f"{d.role} {g:+.1f}" for d, g in zip(daemons, growth, strict=True)))
            print(
                "RESULT "
                + json.dumps(
                    {
                        "mode": "park",
                        "k": args.k,
                        "frame_bytes": args.frame_bytes,
                        "rows": table.rows,
                        "growth": dict(zip([d.role for d in daemons], growth, strict=True)),
                    }
                )
            )
            return 0
        finally:
            for d in reversed(daemons):
                d.stop()


# -- the diag launcher (runs inside the daemon) ------------------------------------------------


_M_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3, "M_MMAP_MAX": -4, "M_ARENA_MAX": -8}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _daemon_main(argv: list[str]) -> int:
    """Run ``dcache ROLE ...`` with a SIGUSR1 probe (see the module docstring)."""
    import tracemalloc

    libc = ctypes.CDLL("libc.so.6")
    for item in filter(None, os.environ.get("BENCH_CHURN_MALLOPT", "").split(",")):
        name, _, value = item.partition("=")
        if not libc.mallopt(_M_PARAMS[name], int(value)):
            raise SystemExit(f"mallopt({name}, {value}) failed")
    frames = int(os.environ.get("BENCH_CHURN_TRACEMALLOC", "0"))
    if frames:
        tracemalloc.start(frames)
    probe_path = Path(os.environ["BENCH_CHURN_PROBE"])

    import dcache.server as server
    from dcache.protocol.framing import FrameDecoder

    counts = {"created": 0, "freed_by_refcount": 0, "freed_by_gc": 0}
    services: dict[int, Any] = {}
    in_gc = [False]
    live: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        in_gc[0] = phase == "start"

    gc.callbacks.append(on_gc)

    class TrackedFrameProtocol(server.FrameProtocol):
        """``FrameProtocol`` that counts how its instances die (weakref slot for the WeakSet)."""

        __slots__ = ("__weakref__",)

        def __init__(self, service: Any) -> None:
            super().__init__(service)
            counts["created"] += 1
            live.add(self)
            services[id(service)] = service

        def __del__(self) -> None:
            counts["freed_by_gc" if in_gc[0] else "freed_by_refcount"] += 1

    decoders = {"created": 0, "freed_by_refcount": 0, "freed_by_gc": 0}

    class TrackedFrameDecoder(FrameDecoder):
        """``FrameDecoder`` that counts how its instances die."""

        __slots__ = ()

        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            decoders["created"] += 1

        def __del__(self) -> None:
            decoders["freed_by_gc" if in_gc[0] else "freed_by_refcount"] += 1

    server.FrameProtocol = TrackedFrameProtocol  # type: ignore[misc]
    setattr(server, "FrameDecoder", TrackedFrameDecoder)  # noqa: B010 - the name FrameProtocol.__init__ looks up
    snapshots: dict[str, Any] = {}
    libc.mallinfo2.restype = _MallInfo2

    def stats() -> dict[str, Any]:
        mi = libc.mallinfo2()
        closed = sum(1 for p in live if p._closed)
        return {
            "rss_mb": round(rss_mb(os.getpid()), 1),
            "gc_count": gc.get_count(),
            "gc_threshold": gc.get_threshold(),
            "gc_freeze_count": gc.get_freeze_count(),
            "protocols": dict(counts, alive=len(live), alive_closed=closed),
            "decoders": dict(decoders, alive=decoders["created"] - decoders["freed_by_refcount"] - decoders["freed_by_gc"]),
            "service_current_is_closed": [getattr(svc.current, "_closed", None) for svc in services.values()],
            "malloc_mb": {k: round(getattr(mi, k) / 2**20, 1) for k in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")},
            "malloc_hblks": mi.hblks,
            "tracemalloc_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 1) if tracemalloc.is_tracing() else None,
        }

    def chain_of_closed() -> list[str]:
        """How a closed but living connection is held: its referrers, a few levels up (objgraph-style)."""
        closed = {id(p): p for p in live if p._closed}
        if not closed:
            return ["no closed FrameProtocol is alive"]
        # get_referrers only searches generations 0-2: prefer a victim there;
        # if every one is frozen, unfreeze for the search and freeze again
        # (what an aux node's _gc_loop does every 5 s anyway).
        victim = next((o for o in gc.get_objects() if id(o) in closed), None)
        frozen = victim is None
        if frozen:
            gc.unfreeze()
            victim = next(iter(closed.values()))
        closed.clear()
        try:
            lines = _backrefs(victim, depth=int(os.environ.get("BENCH_CHURN_CHAIN_DEPTH", "3")))
            lines[0] += " (it was in the permanent generation)" if frozen else " (found in generations 0-2)"
            return lines
        finally:
            if frozen:
                gc.freeze()

    def handle(signum: int, frame: Any) -> None:
        try:
            cmd = json.loads(probe_path.read_text())
            answer: dict[str, Any] = {}
            op = cmd.get("op")
            if op == "collect":
                before = stats()
                if cmd.get("unfreeze"):
                    answer["unfrozen"] = gc.get_freeze_count()
                    gc.unfreeze()
                t0 = time.perf_counter()
                answer["unreachable_found"] = gc.collect()
                answer["collect_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                if cmd.get("unfreeze"):
                    gc.freeze()
                answer["before"] = before["protocols"]
            elif op == "trim":
                answer["malloc_trim"] = libc.malloc_trim(0)
            answer.update(stats())
            if cmd.get("chain"):
                answer["chain"] = chain_of_closed()
            if tracemalloc.is_tracing() and (cmd.get("snapshot") or cmd.get("diff")):
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
                )
                if "base" not in snapshots:
                    snapshots["base"] = snap
                elif cmd.get("diff"):
                    answer["diff"] = [str(s) for s in snap.compare_to(snapshots["base"], "lineno")[:12]]
                    top = snap.compare_to(snapshots["base"], "traceback")[:2]
                    for s in top:
                        answer["diff"].append(f"traceback of {s.size_diff / 2**20:+.1f} MiB, {s.count_diff:+d} blocks:")
                        answer["diff"].extend("    " + line for line in s.traceback.format()[-8:])
            answer["seq"] = cmd.get("seq")
            tmp = probe_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(answer))
            os.replace(tmp, probe_path.with_suffix(".out"))
        except Exception as exc:  # a probe must never kill the daemon
            probe_path.with_suffix(".out").write_text(json.dumps({"seq": None, "error": repr(exc)}))

    signal.signal(signal.SIGUSR1, handle)
    from dcache.cli import main

    return main(argv)


def _backrefs(obj: Any, depth: int) -> list[str]:
    """Describe who refers to ``obj`` (and to those, ``depth`` levels), marking cycles back to ``obj``."""
    lines: list[str] = []
    ignore = {id(sys._getframe())}

    def name(o: Any) -> str:
        t = type(o).__name__
        if isinstance(o, dict):
            return f"dict(len={len(o)})"
        if hasattr(o, "__self__") and hasattr(o, "__func__"):
            return f"bound method {o.__func__.__qualname__}"
        if t == "function":
            return f"function {o.__qualname__}"
        if t == "frame":
            return f"frame of {o.f_code.co_qualname} (line {o.f_lineno})"
        if t == "traceback":
            return f"traceback (frame {o.tb_frame.f_code.co_qualname})"
        if isinstance(o, BaseException):
            return f"{t}({str(o)[:40]!r})"
        return t

    def how(holder: Any, target: Any) -> str:
        if isinstance(holder, dict):
            for k, v in holder.items():
                if v is target:
                    return f"[{k!r}]"
            return "[?]"
        if getattr(holder, "__self__", None) is target:
            return ".__self__"
        if type(holder).__name__ == "frame":
            return "".join(f" local {k!r}" for k, v in holder.f_locals.items() if v is target)
        if type(holder).__name__ == "traceback":
            return ".tb_frame" if holder.tb_frame is target else ".tb_next"
        if isinstance(holder, BaseException):
            return "".join(f".{a}" for a in ("__traceback__", "__context__", "__cause__") if getattr(holder, a) is target)
        for cls in type(holder).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if getattr(holder, slot, None) is target:
                    return f".{slot}"
        return ""

    def walk(o: Any, level: int, path: list[int], root: Any) -> None:
        refs = [
            r for r in gc.get_referrers(o) if id(r) not in ignore and not (type(r).__name__ == "frame" and r.f_code.co_filename == __file__)
        ]
        ignore.add(id(refs))
        if not refs:
            lines.append("  " * level + "(no referrers: garbage)")
        shown = refs[:4]
        ignore.add(id(shown))
        for r in shown:
            mark = "  <-- CYCLE back to the connection" if r is root else ""
            lines.append("  " * level + f"<- {name(r)}{how(r, o)}{mark}")
            if r is not root and id(r) not in path and level < depth:
                walk(r, level + 1, [*path, id(r)], root)

    lines.append(f"{type(obj).__name__} (closed={obj._closed})")
    walk(obj, 1, [id(obj)], obj)
    return lines


# -- CLI ---------------------------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_daemon":
        return _daemon_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["churn", "park"])
    p.add_argument("-n", type=int, default=200_000, help="churn: cycles per target (default 200000)")
    p.add_argument(
        "--request",
        choices=["ping", "get", "bad", "toolarge"],
        default="ping",
        help="churn: what follows HELLO (PING, a GET the master forwards, an undecodable frame, an oversized header)",
    )
    p.add_argument("--target", choices=["both", "aux", "master"], default="both", help="which daemon(s) take the load")
    p.add_argument("--procs", type=int, default=2, help="load processes")
    p.add_argument("--conns", type=int, default=16, help="connector coroutines per process and target")
    p.add_argument("-k", type=int, default=60, help="park: connections")
    p.add_argument("-b", "--frame-bytes", type=_size, default=32 * 1024 * 1024, help="park: announced frame length B (B-1 sent)")
    p.add_argument(
        "--complete", action="store_true", help="park: send whole frames (answered with an error, connection kept open and idle)"
    )
    p.add_argument("--hold", type=float, default=1.0, help="park: seconds to keep the parked connections open after sending")
    p.add_argument("--max-memory", default="32MB", help="the aux node's --max-memory")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before the first and after the last sample")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the load phase")
    p.add_argument("--diag", action="store_true", help="start the daemons through the probe launcher")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="diag: tracemalloc.start(FRAMES) and a diff before/after")
    p.add_argument("--after-collect", action="store_true", help="diag: gc.collect() in the daemons after the load, then sample")
    p.add_argument("--unfreeze", action="store_true", help="diag: gc.unfreeze() before that gc.collect()")
    p.add_argument("--trim", action="store_true", help="diag: malloc_trim(0) in the daemons after the load, then sample")
    p.add_argument(
        "--mallopt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="diag: mallopt at daemon start (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_ARENA_MAX, ...)",
    )
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the daemons")
    args = p.parse_args(argv)
    if (args.tracemalloc or args.after_collect or args.trim or args.mallopt) and not args.diag:
        p.error("--tracemalloc/--after-collect/--trim/--mallopt need --diag")
    return run_churn(args) if args.mode == "churn" else run_park(args)


if __name__ == "__main__":
    sys.exit(main())
