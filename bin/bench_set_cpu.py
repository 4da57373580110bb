#!/usr/bin/env python3
"""CPU per RESP SET of a master and of the aux node behind it, for source trees side by side (docs/BENCHMARKS.md).

    .venv/bin/python bin/bench_set_cpu.py --tree A=/path/to/old --tree B=. [--rounds 5] [--pipeline 1] [--requests 400000]

For each round and each tree in turn, starts one aux node (core 1) and one
master in front of it (core 0, ``--resp-port 0``) from that tree (working
directory and ``PYTHONPATH``: ``python -m dcache`` imports the working
directory's package first), then drives the master's RESP port with
``redis-benchmark -c 50 -d 100 -r 100000 -t set -P N -n REQUESTS`` (core 1).
Prints each process's CPU time (user + system, /proc/PID/stat) over the
run divided by the requests, and the median per tree. The runs alternate,
so a shared machine's drift touches every tree alike; CPU per request moves
far less with the machine's load than throughput does. The master's user
time is printed apart (the system time is mostly its socket calls, which
moves with how many requests share a loop turn). ``--get`` drives GETs
instead, after a pipelined SET of every key (hits, as after a load).

``--instructions`` counts instructions instead (valgrind's callgrind,
load-independent): a child process per tree builds a master with one
RESP (or, with ``--native``, native) client connection per ``--clients``
and a scripted aux node on in-memory transports (it answers every SETV and
MSETV "stored"), then runs loop iterations in which each client sends
``--pipeline`` SETs and gets its replies. Each child runs ``K1`` and ``K2``
iterations; the difference over the SETs between them is the master's
instructions per SET (the scripted aux node's decoding and answers are in
it too, the same for every tree). ``--get`` sends GETs instead, which the scripted aux node answers
(a GET or an MGET of a batch) with a 100-byte value for every key: the
master's instructions per GET. With ``--aux`` the child is an aux node
instead, its 100,000 keys stored first, fed MSETVs of ``--clients``
entries as a master sends them: its instructions per SET (an overwrite);
``--aux --harness`` counts the same child without feeding the MSETVs (the
harness's own share of that figure, to subtract); without ``--aux``,
``--harness`` builds the clients' commands in the same loop turns but does
not feed them (the master's figures' harness share: the scripted aux
node's work is not in it). ``--aux --get`` feeds MGETVs of ``--clients``
keys instead (a master's GETs of one loop turn, every key held): the aux
node's instructions per GET; ``--aux --get --mget`` feeds a client's MGETs
of ``--clients`` keys instead of MGETVs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

_TICKS_S = os.sysconf("SC_CLK_TCK")
_FRONT, _BACK = 0, 1
# The ops the scripted aux node answers (numbers of dcache.protocol.Op, fixed on the wire).
_HELLO, _PING, _BIND, _MSETV = 1, 2, 44, 42
_GET, _MGET = 3, 6
#: The value every key holds in the scripted aux node (``--get``): redis-benchmark ``-d 100``.
_VALUE = b"x" * 100


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid``."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS_S, int(fields[12]) / _TICKS_S


def _pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if (os.cpu_count() or 1) > 1 else []


def start(tree: Path, role: str, core: int, *args: str) -> tuple[subprocess.Popen[bytes], str, int]:
    """A daemon of ``tree`` with a RESP port: the process, its native address and its RESP port."""
    proc = subprocess.Popen(
        [*_pinned(core), sys.executable, "-m", "dcache", role, "--host", "127.0.0.1", "--port", "0", "--resp-port", "0",
         "--log-level", "warning", *args],
        stdout=subprocess.PIPE, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
    )  # fmt: skip
    assert proc.stdout is not None
    words = proc.stdout.readline().decode().split()
    resp = [w for w in words if w.startswith("resp=")]
    if not words or words[0] != "READY" or not resp:
        proc.kill()
        raise SystemExit(f"{role} of {tree} did not start with RESP: {words!r}")
    return proc, words[1], int(resp[0].rpartition(":")[2])


def one_run(tree: Path, pipeline: int, requests: int, get: bool = False) -> tuple[float, float, float, float]:
    """One aux node and one master of ``tree`` under redis-benchmark SET (or GET, every key set first):
    (ops/s, master µs/request, aux node µs/request, master's user-time share of its µs)."""
    aux, aux_addr, _ = start(tree, "aux", _BACK, "--node-id", "bench-aux", "--max-memory", "1GB", "--snapshot-interval", "0")
    try:
        master, _, port = start(tree, "master", _FRONT, "--node-id", "bench-master", "--aux", f"bench-aux={aux_addr}")
        try:
            cmd = [*_pinned(_BACK), "redis-benchmark", "-p", str(port), "-c", "50", "-d", "100", "-r", "100000", "-t",
                   "get" if get else "set", "-P", str(pipeline), "-n", str(requests), "-q"]  # fmt: skip
            if get:  # every key of -r 100000 held: GETs hit, as after a load
                fill = [*_pinned(_BACK), "redis-benchmark", "-p", str(port), "-c", "50", "-d", "100", "-P", "16"]
                subprocess.run([*fill, "-r", "100000", "-t", "set", "-n", "1000000", "-q"], capture_output=True, check=True, timeout=300)
            subprocess.run([*cmd[:-3], "-n", "20000", "-q"], capture_output=True, check=True, timeout=120)  # warm up
            (mu0, ms0), a0 = cpu_split(master.pid), cpu_s(aux.pid)
            out = subprocess.run(cmd, capture_output=True, check=True, timeout=600, text=True).stdout
            (mu1, ms1), a1 = cpu_split(master.pid), cpu_s(aux.pid)
        finally:
            master.terminate()
            master.wait(10)
    finally:
        aux.terminate()
        aux.wait(10)
    line = [x for x in out.replace("\r", "\n").splitlines() if "requests per second" in x]
    if not line:
        raise SystemExit(f"redis-benchmark printed no result: {out[-500:]!r}")
    ops = float(line[-1].split(":")[1].split()[0])
    return ops, (mu1 + ms1 - mu0 - ms0) / requests * 1e6, (a1 - a0) / requests * 1e6, (mu1 - mu0) / requests * 1e6


class _Sink:
    """A transport that counts the bytes written to it (a client connection's replies)."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.written += sum(len(c) for c in chunks)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: object) -> None:
        pass

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _ScriptedAux(_Sink):
    """An aux node's end of one master connection: answers HELLO, BIND, PING, SETV and MSETV (stored), GET and MGET (a
    100-byte value for every key) on the next loop turn."""

    def __init__(self, proto: Any) -> None:
        super().__init__()
        self._proto = proto
        self._buf = b""

    def write(self, data: bytes) -> None:
        import msgpack

        buf = self._buf + data
        answers = []
        while len(buf) >= 4:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < 4 + n:
                break
            op, rid, *args = msgpack.unpackb(buf[4 : 4 + n], raw=False)
            buf = buf[4 + n :]
            if op == _HELLO:
                result: Any = {"role": "aux", "node_id": "a1", "incarnation": 1}
            elif op == _BIND:
                result = args[0]
            elif op == _MSETV:
                result = [[0, True]] * len(args[0])
            elif op == _MGET:
                result = [_VALUE] * len(args[0])
            elif op == _GET:
                result = _VALUE
            elif op == _PING:
                result = "PONG"
            else:
                result = True
            body = msgpack.packb([rid, 0, result], use_bin_type=True)
            answers.append(struct.pack(">I", len(body)) + body)
        self._buf = buf
        if answers:
            asyncio.get_running_loop().call_soon(self._proto.data_received, b"".join(answers))

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))


def in_process_worker(iterations: int, clients: int, pipeline: int, native: bool, get: bool = False, feed: bool = True) -> None:
    """Child process: a master on scripted connections runs ``iterations`` loop turns of ``clients`` x ``pipeline`` SETs (GETs).

    With ``feed`` false the commands are built in the same loop turns but
    not fed: the harness's own share, to subtract.
    """
    from dcache.config import MasterConfig
    from dcache.master.node import GC_GEN0_THRESHOLD, MasterNode
    from dcache.peer import PeerConnection
    from dcache.protocol import Op, encode_request, encode_response
    from dcache.respserver import RespProtocol

    async def connect(host: str, port: int, name: str, on_answers: Any) -> PeerConnection:
        proto = PeerConnection(f"aux node {name}", on_answers)
        proto.connection_made(_ScriptedAux(proto))  # type: ignore[arg-type]
        return proto

    async def run() -> None:
        node = MasterNode(MasterConfig(port=0, shutdown_grace=0, aux=(("a1", "127.0.0.1", 1),)), connect=connect)
        node.build_tables()
        node._on_view(node.membership.view)
        for link in node.links.values():
            link.start()
        while not all(link.connected for link in node.links.values()):
            await asyncio.sleep(0.01)
        # The collector as a started master sets it (MasterNode.start): what start-up made frozen, young collections rare.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        conns = []
        for _ in range(clients):
            conn = RespProtocol(node) if not native else node.protocol_factory()
            conn.connection_made(_Sink())  # type: ignore[arg-type]
            conns.append(conn)
        value = b"x" * 100
        rng = random.Random(1)
        if get:  # every GET answers the 100-byte value
            reply = len(b"$100\r\n" + value + b"\r\n") if not native else len(encode_response(1, 0, value))
        else:
            reply = len(b"+OK\r\n") if not native else len(encode_response(1, 0, True))  # request ids stay below 128: one byte each
        for i in range(iterations):
            for conn in conns:
                keys = [b"key:%012d" % rng.randrange(100_000) for _ in range(pipeline)]
                if get and native:
                    data = b"".join(encode_request(Op.GET, j + 1, k) for j, k in enumerate(keys))
                elif get:
                    data = b"".join(b"*2\r\n$3\r\nGET\r\n$16\r\n%s\r\n" % k for k in keys)
                elif native:
                    data = b"".join(encode_request(Op.SET, j + 1, k, value) for j, k in enumerate(keys))
                else:
                    data = b"".join(b"*3\r\n$3\r\nSET\r\n$16\r\n%s\r\n$100\r\n%s\r\n" % (k, value) for k in keys)
                if feed:
                    conn.data_received(data)
            want = (i + 1) * pipeline * reply * feed
            while not all(c._transport.written >= want for c in conns):
                await asyncio.sleep(0)
            if not feed:
                await asyncio.sleep(0)
        await node.close()

    import uvloop

    uvloop.run(run())  # the daemons' loop


#: Loop iterations of an ``--instructions`` child: the difference between the two counts is measured.
K1, K2 = 200, 700


def count_instructions(tree: Path, iterations: int, args: argparse.Namespace) -> int:
    """Instructions callgrind counts for one in-process child of ``tree`` running ``iterations`` loop turns."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, str(Path(__file__).resolve()),
           "--worker", str(iterations), "--tree", f"x={tree}", "--clients", str(args.clients), "--pipeline", str(args.pipeline),
           *(["--native"] if args.native else []), *(["--get"] if args.get else []), *(["--aux"] if args.aux else []),
           *(["--harness"] if args.harness else []), *(["--mget"] if args.mget else [])]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    )
    if f"dcache from {tree}" not in out.stderr:
        raise SystemExit(f"the worker did not run {tree}'s code: {out.stderr[-2000:]}")
    refs = [line for line in out.stderr.splitlines() if "Collected :" in line]
    if out.returncode or not refs:
        raise SystemExit(f"callgrind failed: {out.stderr[-2000:]}")
    return int(refs[-1].split(":")[-1].strip())


def aux_worker(iterations: int, clients: int, feed: bool = True, get: bool = False, mget: bool = False) -> None:
    """Child process: an aux node's native connection takes ``iterations`` MSETVs of ``clients`` entries (a master's loop turns).

    With ``feed`` false the MSETVs are built and encoded in the same loop
    turns but not fed: the harness's own share, to subtract. With ``get``
    the frames are MGETVs of ``clients`` keys instead (``mget``: MGETs).
    """
    import tempfile

    from dcache.auxnode.node import AuxNode
    from dcache.config import AuxConfig
    from dcache.hlc import HybridClock
    from dcache.protocol import Op, encode_request

    async def run() -> None:
        node = AuxNode(AuxConfig(data_dir=tempfile.mkdtemp(), snapshot_interval=0))
        node.build_tables()
        conn = node.protocol_factory()
        sink = _Sink()
        conn.connection_made(sink)  # type: ignore[arg-type]
        clock = HybridClock("bench-master")
        value = b"x" * 100
        for start in range(0, 100_000, 1000):  # every key stored first: a SET then overwrites, as under redis-benchmark -r 100000
            conn.data_received(
                encode_request(Op.MSETV, 1, [[b"key:%012d" % k, value, 0, 0, clock.next()] for k in range(start, start + 1000)])
            )
            await asyncio.sleep(0)
        rng = random.Random(1)
        for i in range(iterations):
            if get:
                op = Op.MGET if mget else Op.MGETV
                frame = encode_request(op, i % 100 + 1, [b"key:%012d" % rng.randrange(100_000) for _ in range(clients)])
            else:
                entries = [[b"key:%012d" % rng.randrange(100_000), value, 0, 0, clock.next()] for _ in range(clients)]
                frame = encode_request(Op.MSETV, i % 100 + 1, entries)
            if feed:
                conn.data_received(frame)
            await asyncio.sleep(0)
        assert sink.written > (100 + iterations * feed) * clients * 2  # answered: [status, result] or a value per entry

    import uvloop

    uvloop.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=DIR, a source tree to run the daemons from (repeat)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per tree, alternating")
    ap.add_argument("--pipeline", type=int, default=1, help="redis-benchmark -P; with --instructions, SETs per client per loop turn")
    ap.add_argument("--requests", type=int, default=400_000, help="redis-benchmark -n")
    ap.add_argument("--instructions", action="store_true", help="count the master's instructions per SET in-process (callgrind)")
    ap.add_argument("--clients", type=int, default=8, help="with --instructions: client connections, each sending in every loop turn")
    ap.add_argument("--native", action="store_true", help="with --instructions: native SET frames instead of RESP commands")
    ap.add_argument(
        "--get",
        action="store_true",
        help="GETs instead of SETs (real processes: every key set first; with --instructions the scripted aux node holds "
        "every key; with --aux, MGETVs of --clients keys instead of MSETVs)",
    )
    ap.add_argument(
        "--aux", action="store_true", help="with --instructions: the aux node's instructions per SET, fed MSETVs of --clients entries"
    )
    ap.add_argument(
        "--harness",
        action="store_true",
        help="count the harness alone (the commands, or with --aux the MSETVs, built and encoded, not fed), to subtract",
    )
    ap.add_argument("--mget", action="store_true", help="with --aux --get: a client's MGETs instead of a master's MGETVs")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.tree)]
    if args.worker is not None:
        import dcache

        print(f"dcache from {Path(dcache.__file__).resolve().parent.parent}", file=sys.stderr)
        if args.aux:
            aux_worker(args.worker, args.clients, feed=not args.harness, get=args.get, mget=args.mget)
        else:
            in_process_worker(args.worker, args.clients, args.pipeline, args.native, args.get, feed=not args.harness)
        return 0
    if args.instructions:
        door = (
            (("aux node, MGET" if args.mget else "aux node, MGETV") if args.get else "aux node, MSETV")
            if args.aux
            else "native"
            if args.native
            else "RESP"
        )
        if args.harness:
            door += " (the harness alone, the frames not fed)" if args.aux else " (the harness alone, the commands not fed)"
        what = "GET" if args.get else "SET"
        print(f"python {sys.version.split()[0]}; {door} {what}, {args.clients} clients x {args.pipeline} {what}s per loop turn; "
              f"instructions per {what}, callgrind, ({K2} - {K1}) turns")  # fmt: skip
        sets = (K2 - K1) * args.clients * (1 if args.aux else args.pipeline)
        for r in range(args.rounds):
            for label, tree in trees:
                per = (count_instructions(tree, K2, args) - count_instructions(tree, K1, args)) / sets
                print(f"round {r + 1} {label}: {per:,.0f} instructions per {what}", flush=True)
        return 0
    master: dict[str, list[float]] = {label: [] for label, _ in trees}
    user: dict[str, list[float]] = {label: [] for label, _ in trees}
    aux: dict[str, list[float]] = {label: [] for label, _ in trees}
    what = "GET" if args.get else "SET"
    print(f"load average {os.getloadavg()}; {what} -P {args.pipeline}, {args.requests} requests per run", flush=True)
    for r in range(args.rounds):
        for label, tree in trees:
            ops, m, a, u = one_run(tree, args.pipeline, args.requests, args.get)
            master[label].append(m)
            user[label].append(u)
            aux[label].append(a)
            print(
                f"round {r + 1} {label}: {ops:,.0f} {what}/s, master {m:.2f} µs/{what} (user {u:.2f}), aux node {a:.2f} µs/{what}",
                flush=True,
            )
    for label, _ in trees:
        print(
            f"{label}: master median {statistics.median(master[label]):.2f} µs/{what} (min {min(master[label]):.2f}; "
            f"user median {statistics.median(user[label]):.2f}), "
            f"aux node median {statistics.median(aux[label]):.2f} µs/{what} (min {min(aux[label]):.2f})"
        )
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
