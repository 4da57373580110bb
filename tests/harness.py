"""Start real dcache processes for tests: port 0, READY line, bounded waits, real signals."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class DaemonProcess:
    """A ``python -m dcache ROLE ...`` child process.

    ``start()`` waits (bounded) for its ``READY host:port`` line; stderr is
    collected in the background so it can be shown when a test fails.
    """

    def __init__(
        self,
        role: str,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        python: Sequence[str] = ("-m", "dcache"),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.role = role
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        #: What follows the interpreter before ``ROLE ARGS``: ``-m dcache``, or ``-c CODE`` that ends by calling ``dcache.cli.main(sys.argv[1:])``.
        self.python = list(python)
        #: Run in the child before it starts (``subprocess.Popen``'s): a resource limit, say.
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0
        #: The RESP port from ``resp=HOST:PORT`` in the READY line (0: none).
        self.resp_port = 0
        self.stderr_lines: list[str] = []
        self._stderr_thread: threading.Thread | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = READY_TIMEOUT_S) -> DaemonProcess:
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, *self.python, self.role, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=self.cwd, preexec_fn=self.preexec_fn)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        line = _readline_with_deadline(self.proc, timeout)
        if not line.startswith("READY "):
            self.kill()
            raise RuntimeError(f"{self.role} did not become ready (got {line!r}); stderr:\n{self.stderr()}")
        words = line.split()
        host, _, port = words[1].rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        for word in words[2:]:
            if word.startswith("resp="):
                self.resp_port = int(word.rpartition(":")[2])
        return self

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode(errors="replace").rstrip())

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines[-200:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        assert self.proc is not None
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=2)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait for a graceful exit (bounded)."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(STOP_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _readline_with_deadline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Read the first stdout line, giving up after ``timeout`` seconds."""
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline().decode(errors="replace").strip())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else ""


def free_port_block(n: int = 1) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 right now, below the kernel's ephemeral range.

    For a daemon that must keep its port (a restart, a cluster whose ports
    follow from one). A port the kernel hands out (bind to 0) lies in the
    ephemeral range, where client sockets (thousands of connections, in
    tests running beside and in the fault campaign) take ports at random:
    eight free in a row were not found there in 50 tries, and one took a
    master's port between the pick and the master's bind.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, max(10_001, low - n))
        if all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports between 10000 and {low}")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, message: str = "condition") -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def start_aux(tmp: Path | None = None, *extra: str, node_id: str | None = None) -> DaemonProcess:
    args = ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *extra]
    if node_id:
        args += ["--node-id", node_id]
    if tmp is not None:
        args += ["--data-dir", str(tmp)]
    return DaemonProcess("aux", args).start()


def start_http(*masters: str, extra: Sequence[str] = ()) -> DaemonProcess:
    """Start ``dcache http`` on a free port in front of ``masters`` (``host:port``)."""
    args = ["--host", "127.0.0.1", "--port", "0", "--log-level", "info", "--master", ",".join(masters), *extra]
    return DaemonProcess("http", args).start()


APT_TIMEOUT_S = 600.0


def apt_install(*packages: str) -> str:
    """``apt-get install`` Debian packages (after an update if the first try fails); "" or the error.

    Waits for dpkg's lock (up to ``APT_TIMEOUT_S``) rather than failing on it:
    the suite's workers (``make test``, pytest-xdist) may both need a package.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", f"DPkg::Lock::Timeout={int(APT_TIMEOUT_S)}"]
    cmd = ["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", *packages]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
        if res.returncode != 0:
            subprocess.run(["apt-get", *wait, "update", "-qq"], capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"apt-get install {' '.join(packages)} failed: {exc!r}"
    return "" if res.returncode == 0 else f"apt-get install {' '.join(packages)} failed ({res.returncode}): {res.stderr.strip()[-500:]}"


def read_until_ready(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> list[str]:
    """Stdout lines of ``proc`` up to and including its ``READY host:port`` line (bounded)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = _readline_with_deadline(proc, max(0.1, deadline - time.monotonic()))
        if not line:
            break
        lines.append(line)
        if line.startswith("READY "):
            break
    assert lines and lines[-1].startswith("READY "), (lines, proc.poll())
    return lines


def unavailable(what: str, reason: str) -> None:
    """A real component a test needs is missing: fail under CI (``CI`` set), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI: {reason}")
    pytest.skip(f"{what} is not available: {reason}")


def stop_process(proc: subprocess.Popen[Any], steps: Sequence[tuple[int, float]], *, kill_group: bool = False) -> None:
    """Send each ``(signal, wait)`` in turn until ``proc`` exits; SIGKILL goes to its group with ``kill_group``."""
    for sig, wait in steps:
        if proc.poll() is not None:
            return
        try:
            if kill_group and sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def start_cluster_cmd(*args: str) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Run ``dcache cluster ARGS`` and read its output up to the READY line."""
    proc = subprocess.Popen([sys.executable, "-m", "dcache", "cluster", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        return proc, read_until_ready(proc)
    except BaseException:
        reap(proc)
        raise


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
