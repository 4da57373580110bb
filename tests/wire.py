"""Raw protocol helpers for multi-process tests: one-shot calls, raw frames, a PING watchdog.

Nothing here uses the dcache client: each helper speaks the wire protocol
over plain blocking sockets, so a test sees exactly what the daemon sends.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import msgpack

from dcache.protocol import Op
from tests.rawconn import RawConn

__all__ = ["PingWatch", "call", "read_frame", "rss_bytes", "set_frame", "split_addr", "wait_connected"]

_HEADER = struct.Struct(">I")


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)``."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def call(addr: str, op: int, rid: Any, *args: Any, timeout: float = 10.0) -> tuple[Any, int, Any]:
    """Send ``[op, rid, *args]`` on a new connection to ``addr``; return the answer ``(rid, status, result)``.

    Raises ``TimeoutError`` if no answer arrives within ``timeout`` seconds and
    ``EOFError`` if the server closes the connection first.
    """
    conn = RawConn(*split_addr(addr), timeout=timeout)
    try:
        got_rid, status, result = conn.call(op, rid, *args)
    finally:
        conn.close()
    return got_rid, status, result


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(buf)} of {n} bytes")
        sock.settimeout(remaining)
        data = sock.recv(min(n - len(buf), 1 << 20))
        if not data:
            raise EOFError("server closed the connection")
        buf += data
    return bytes(buf)


def read_frame(sock: socket.socket, timeout: float = 5.0) -> tuple[int, Any]:
    """Read one frame from ``sock``: ``(declared body length, decoded object)``."""
    deadline = time.monotonic() + timeout
    (n,) = _HEADER.unpack(_recv_exact(sock, 4, deadline))
    body = _recv_exact(sock, n, deadline)
    return n, msgpack.unpackb(body, raw=False, strict_map_key=False)


def set_frame(body_bytes: int) -> bytes:
    """A complete SET frame (header included) whose msgpack body is exactly ``body_bytes`` long.

    Any prefix of it is a well-formed frame still arriving, which a server
    has to buffer (or refuse), never a protocol error.
    """
    value_len = body_bytes
    for _ in range(4):
        body: bytes = msgpack.packb([int(Op.SET), 1, b"k", bytes(max(0, value_len))], use_bin_type=True)
        if len(body) == body_bytes:
            return _HEADER.pack(body_bytes) + body
        value_len -= len(body) - body_bytes
    raise ValueError(f"no SET frame has a body of exactly {body_bytes} bytes")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` in ``/proc/PID/status``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_connected(master: str, nodes: set[str], timeout: float = 20.0) -> dict[str, Any]:
    """Poll a master's RING until exactly ``nodes`` are up and connected and no migration runs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            _, status, last = call(master, Op.RING, 1, timeout=5.0)
        except (OSError, EOFError) as exc:
            last = repr(exc)
        else:
            if status == 0:
                up = {n["node_id"] for n in last["nodes"] if n["state"] == "up" and n["connected"]}
                if up == nodes and {n["node_id"] for n in last["nodes"]} == nodes and not last["migrating"]:
                    return dict(last)
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {sorted(nodes)} up and connected; last RING: {last}")


class PingWatch:
    """A thread that PINGs a daemon every ``interval`` seconds on its own connection.

    It records the worst gap between two answers (including the wait for an
    answer still outstanding), every unexpected answer or error, and the
    highest RSS of process ``pid`` sampled at the same pace. Use as a context
    manager; read ``worst_gap()``, ``gaps`` (every gap between two answers),
    ``max_rss`` and ``errors``.
    """

    def __init__(self, addr: str, pid: int, interval: float = 0.05) -> None:
        self.addr = addr
        self.pid = pid
        self.interval = interval
        self.answers = 0
        self.max_rss = 0
        self.errors: list[str] = []
        self.gaps: list[float] = []
        self._worst = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PingWatch:
        self._last = time.monotonic()
        self.max_rss = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5)

    def worst_gap(self) -> float:
        """The longest time seen between two answers, counting the one awaited now."""
        if self._stop.is_set():
            return self._worst
        return max(self._worst, time.monotonic() - self._last)

    def _sample(self) -> None:
        try:
            self.max_rss = max(self.max_rss, rss_bytes(self.pid))
        except (OSError, RuntimeError):
            pass

    def _run(self) -> None:
        try:
            conn = RawConn(*split_addr(self.addr), timeout=self.interval)
        except OSError as exc:
            self.errors.append(f"cannot connect: {exc!r}")
            return
        try:
            rid = 0
            while not self._stop.is_set():
                rid += 1
                conn.send(Op.PING, rid)
                while not self._stop.is_set():
                    self._sample()
                    try:
                        answer = conn.recv()  # keeps partial bytes across timeouts
                    except TimeoutError:
                        continue
                    now = time.monotonic()
                    self.gaps.append(now - self._last)
                    self._worst = max(self._worst, now - self._last)
                    self._last = now
                    self.answers += 1
                    if answer != [rid, 0, "PONG"]:
                        self.errors.append(f"unexpected answer to PING {rid}: {answer!r:.200}")
                    break
                self._stop.wait(self.interval)
                self._sample()
        except (OSError, EOFError) as exc:
            self.errors.append(f"ping connection failed: {exc!r}")
        finally:
            conn.close()
