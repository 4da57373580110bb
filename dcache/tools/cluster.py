"""``dcache cluster``: a whole local cluster on 127.0.0.1 in one command.

Starts the coordinating master, then N aux nodes that join it (``--join``),
waits until all of them are in the ring, then starts M - 1 follower masters and
one HTTP shim over all masters, each as its own ``python -m dcache``
process, waits for every READY line, prints the endpoints, and supervises
them. Ctrl-C (SIGINT) or SIGTERM stops the shim first, then the masters, then
the aux nodes (each writes its final snapshot), within a bounded time. So
does anything else that ends it: an error, its output closed (``dcache
cluster | head``), and on Linux even SIGKILL (each daemon asks the kernel for
SIGINT when its parent dies), so no daemon is left holding the ports.

With ``--zookeeper HOSTS`` every master and aux node uses ZooKeeper instead:
the masters start first and elect a leader, the aux nodes register there.

``--port 0`` puts every process on a free port (for tests); the last line
printed is then ``READY host:port`` of the first master (followed by
``resp=host:port`` with ``--resp-port``).

``--resp-port PORT`` also serves Redis's protocol on every master: the first
on PORT, the others on the ports that follow (free ports with ``--port 0``).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import parse_size
from ..errors import ConfigError

__all__ = ["ClusterOptions", "LocalCluster", "run_cluster"]

_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
#: How long a process that closed its stdout without READY gets to exit (for its exit code).
_EXIT_WAIT_S = 5.0

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """The shape of one local cluster (``dcache cluster`` builds it from its flags).

    Attributes:
        masters: number of masters.
        aux: number of aux nodes.
        replicas: copies of each key.
        data_dir: folder for the aux nodes' snapshots, one subfolder each.
        port: first master's port; the others follow (0: free ports for every process).
        http_port: the HTTP shim's port (``None``: 8080, or a free port with
            ``port`` 0; -1: no shim).
        aux_port: first aux node's port; the others follow.
        max_memory: byte budget of each aux node (``256MiB``...; ``dcache.config.parse_size``).
        snapshot_interval: seconds between aux snapshots.
        log_level: log level of every process.
        zookeeper: ZooKeeper ``HOST:PORT[,...]``: membership, leader election
            and the ring live there (``None``: the first master coordinates).
        cluster: cluster name in ZooKeeper.
        resp_port: the first master's RESP port (Redis clients); the others
            follow (``None``: no RESP; with ``port`` 0, free ports).
        http_workers: processes of the HTTP shim, sharing its port
            (``dcache http --workers``).

    Raises:
        ConfigError: fewer than one master, aux node or replica, more
            replicas than aux nodes, or ``max_memory`` is not a size.
    """

    masters: int = 2
    aux: int = 3
    replicas: int = 1
    data_dir: str = "./data"
    port: int = 7000
    http_port: int | None = None
    aux_port: int = 7101
    max_memory: str = "256MiB"
    snapshot_interval: float = 10.0
    log_level: str = "info"
    zookeeper: str | None = None
    cluster: str = "dcache"
    resp_port: int | None = None
    http_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("masters", "aux", "replicas", "http_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.replicas > self.aux:
            raise ConfigError(f"replicas: {self.replicas} exceeds the number of aux nodes ({self.aux})")
        try:
            parse_size(self.max_memory)
        except ValueError as exc:
            raise ConfigError(f"max_memory: {exc}") from None


class LocalCluster:
    """The processes of one local cluster."""

    def __init__(self, opts: ClusterOptions) -> None:
        self.opts = opts
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.masters: list[tuple[str, str]] = []  # (name, addr)
        self.resp: dict[str, str] = {}  # master name -> its RESP host:port
        self.aux: list[tuple[str, str]] = []
        self.http: str | None = None  # host:port of the HTTP shim

    def _spawn(self, name: str, role: str, *argv: str) -> str:
        cmd = [sys.executable, "-m", "dcache", role, "--host", "127.0.0.1", "--log-level", self.opts.log_level, *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_stop_with_parent())
        self.procs.append((name, proc))
        line = _read_ready(proc, _READY_TIMEOUT_S)
        if not line.startswith("READY "):
            try:
                code: int | None = proc.wait(_EXIT_WAIT_S)  # it closed stdout: it is exiting
            except subprocess.TimeoutExpired:
                code = None
            why = f"exit code {code}" if code is not None else f"no READY line within {_READY_TIMEOUT_S:.0f} s"
            raise RuntimeError(f"{name} ({role}) did not start ({why}); its message is above")
        words = line.split()
        for word in words[2:]:
            if word.startswith("resp="):
                self.resp[name] = word[5:]
        return words[1]

    def _resp_args(self, i: int) -> list[str]:
        """``--resp-port`` of the ``i``-th master (none without ``resp_port``)."""
        a = self.opts
        if a.resp_port is None:
            return []
        return ["--resp-port", str(0 if a.port == 0 or a.resp_port == 0 else a.resp_port + i)]

    def check(self) -> None:
        """Fail early, in one line, on what would stop a process from starting: a port in use, an unusable data folder.

        Raises:
            ConfigError: which port (and which flag moves it) or which folder, and why.
        """
        a = self.opts
        if a.port != 0:
            http_port = 8080 if a.http_port is None else a.http_port
            wanted = [(a.port + i, "--port", f"master m{i + 1}") for i in range(a.masters)]
            wanted += [(a.aux_port + i, "--aux-port", f"aux node a{i + 1}") for i in range(a.aux)]
            if http_port > 0:
                wanted.append((http_port, "--http-port", "the HTTP shim"))
            if a.resp_port:
                wanted += [(a.resp_port + i, "--resp-port", f"master m{i + 1}'s RESP") for i in range(a.masters)]
            taken: dict[int, tuple[str, str]] = {}
            for port, flag, who in wanted:
                if port in taken:  # each would bind, the second process would not start
                    other_flag, other = taken[port]
                    raise ConfigError(
                        f"port {port} is wanted by {other} ({other_flag}) and by {who} ({flag}): the ports that follow "
                        f"{other_flag} and {flag} overlap; move one of them (--port 0: all free)"
                    )
                taken[port] = (flag, who)
            for port, flag, who in wanted:
                if not 0 < port <= 65535:
                    raise ConfigError(f"{flag.lstrip('-').replace('-', '_')}: port {port} for {who} is out of range 1..65535")
                why = _bind_error("127.0.0.1", port)
                if why is not None:
                    raise ConfigError(
                        f"cannot listen on 127.0.0.1:{port} for {who}: {why}; choose other ports with {flag} (--port 0: all free)"
                    )
        data = Path(a.data_dir)
        try:
            for i in range(a.aux):
                (data / f"a{i + 1}").mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"data_dir: cannot use {data}: it, or a folder in it, is a file; give --data-dir a folder") from None
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot use {data}: {exc.strerror or exc}; give --data-dir a folder this user can write") from None

    def start(self) -> None:
        a = self.opts
        data = Path(a.data_dir)
        zk = ["--zookeeper", a.zookeeper, "--cluster", a.cluster] if a.zookeeper else []
        # --expect-aux: restarted on the data of an earlier run, the coordinator rebuilds its ring as soon
        # as every aux node is back, instead of waiting out its recovery window.
        expect = [] if a.zookeeper else ["--expect-aux", str(a.aux)]
        coordinator = self._spawn(
            "m1", "master", "--port", str(a.port), "--node-id", "m1", "--replicas", str(a.replicas), *self._resp_args(0), *zk, *expect
        )
        self.masters.append(("m1", coordinator))
        if a.zookeeper:  # every master is alike: all of them run for leader
            self._start_followers(coordinator, zk)
        for i in range(a.aux):
            node_id = f"a{i + 1}"
            port = 0 if a.port == 0 else a.aux_port + i
            node_dir = data / node_id
            node_dir.mkdir(parents=True, exist_ok=True)
            addr = self._spawn(
                node_id,
                "aux",
                "--port",
                str(port),
                "--node-id",
                node_id,
                "--data-dir",
                str(node_dir),
                "--max-memory",
                a.max_memory,
                "--snapshot-interval",
                str(a.snapshot_interval),
                *(zk or ["--join", coordinator]),
            )
            self.aux.append((node_id, addr))
        _wait_members(coordinator, {n for n, _ in self.aux}, _READY_TIMEOUT_S)
        if not a.zookeeper:
            self._start_followers(coordinator, ["--coordinator", coordinator])
        http_port = a.http_port if a.http_port is not None else (0 if a.port == 0 else 8080)
        if http_port >= 0:
            masters = ",".join(addr for _, addr in self.masters)
            self.http = self._spawn("http", "http", "--port", str(http_port), "--master", masters, "--workers", str(a.http_workers))

    def _start_followers(self, first: str, membership: list[str]) -> None:
        a = self.opts
        for i in range(1, a.masters):
            name = f"m{i + 1}"
            port = 0 if a.port == 0 else a.port + i
            addr = self._spawn(
                name, "master", "--port", str(port), "--node-id", name, "--replicas", str(a.replicas), *self._resp_args(i), *membership
            )
            self.masters.append((name, addr))

    def describe(self) -> str:
        lines = []
        for i, (name, addr) in enumerate(self.masters):
            if self.opts.zookeeper:
                role = f"(ZooKeeper {self.opts.zookeeper}, cluster {self.opts.cluster})"
            else:
                role = "(coordinator)" if i == 0 else "(follower)"
            resp = f"  resp={self.resp[name]}" if name in self.resp else ""
            lines.append(f"master {name}  {addr}  {role}{resp}")
        for name, addr in self.aux:
            lines.append(f"aux    {name}  {addr}")
        if self.http is not None:
            lines.append(f"http   http://{self.http}")
        first = self.masters[0][1] if self.masters else ""
        lines.append(f"clients: dcache.Client({[addr for _, addr in self.masters]!r})   tools: dcache get --addr {first} KEY")
        if self.resp:
            first_resp = next(iter(self.resp.values()))
            host, _, port = first_resp.rpartition(":")
            lines.append(
                f"redis clients: redis-cli -h {host} -p {port}   redis.Redis(host={host!r}, port={port})  (RESP: {', '.join(self.resp.values())})"
            )
        return "\n".join(lines)

    def stop(self) -> None:
        """SIGTERM the HTTP shim, then the masters, then SIGINT the aux nodes (stop
        with a final snapshot, no hand-over); SIGKILL whatever outlives the grace period."""
        http = [p for n, p in self.procs if n == "http"]
        masters = [p for n, p in self.procs if n.startswith("m")]
        aux = [p for n, p in self.procs if n.startswith("a")]
        for group, sig in ((http, signal.SIGTERM), (masters, signal.SIGTERM), (aux, signal.SIGINT)):
            for p in group:
                if p.poll() is None:
                    p.send_signal(sig)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for _, p in self.procs:
            if p.stdout is not None:
                p.stdout.close()

    def dead(self) -> list[str]:
        return [f"{n} (exit code {p.returncode})" for n, p in self.procs if p.poll() is not None]


def _wait_members(addr: str, expected: set[str], timeout: float) -> None:
    """Wait (bounded) until the coordinator has every aux node up and no migration runs."""
    import asyncio

    from ..client import Client
    from ..protocol import Op

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        async with Client(addr, timeout=5.0) as client:
            while True:
                info = await client.execute(Op.RING)
                up = {n["node_id"] for n in info["nodes"] if n["state"] == "up"}
                if expected <= up and not info["migrating"]:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"aux nodes did not all join within {timeout} s (up: {sorted(up)})")
                await asyncio.sleep(0.1)

    asyncio.run(poll())


def _bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (``None``: it can), binding as the daemons do (SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is already in use (another process listens there, perhaps an earlier cluster)"
            return exc.strerror or str(exc)
    return None


def _stop_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get SIGINT when ``dcache cluster`` dies (Linux ``PR_SET_PDEATHSIG``; ``None`` elsewhere).

    Whatever ends this process, even SIGKILL, its daemons then stop as on
    Ctrl-C instead of holding the ports the next ``make run`` wants.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGINT)

    return preexec


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> str:
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.readline().decode(errors="replace").strip())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def run_cluster(opts: ClusterOptions) -> int:
    """Start the cluster, supervise it until SIGINT or SIGTERM, stop it; return the exit code.

    Raises:
        ConfigError: a port is taken or the data folder is unusable (``LocalCluster.check``).
    """
    cluster = LocalCluster(opts)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    cluster.check()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError) as exc:
            print(f"dcache cluster: {exc}", file=sys.stderr)
            return 1
        print(cluster.describe(), flush=True)
        first = cluster.masters[0][0]
        resp = f" resp={cluster.resp[first]}" if first in cluster.resp else ""
        print(f"READY {cluster.masters[0][1]}{resp}", flush=True)
        print("Ctrl-C stops the cluster.", file=sys.stderr, flush=True)
        reported: set[str] = set()
        while not stop.wait(0.5):
            for d in cluster.dead():
                if d not in reported:
                    reported.add(d)
                    print(f"dcache cluster: process {d} exited", file=sys.stderr, flush=True)
        print("stopping the cluster...", file=sys.stderr, flush=True)
    except BrokenPipeError:  # its output was closed (`dcache cluster | head`): nobody sees the cluster's endpoints
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush stays quiet
        print("dcache cluster: its output was closed; stopping the cluster", file=sys.stderr, flush=True)
        code = 1
    finally:  # whatever ends the supervisor (an error included) stops the daemons it started
        cluster.stop()
    print("stopped.", file=sys.stderr, flush=True)
    return code
