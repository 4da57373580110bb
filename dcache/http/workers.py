"""``dcache http --workers N``: N shim processes on one port, started, supervised and stopped as one.

Design note
-----------
One shim process is CPU-bound on one core; ``--workers N`` runs N of them.

* **One port.** The parent binds the port first with ``SO_REUSEPORT`` (so
  ``--port 0`` picks one port for all, and the port stays reserved while a
  worker restarts) but never listens on it; each worker binds its own
  listening socket to the same port with ``SO_REUSEPORT``, and the kernel
  spreads new connections over the workers' sockets.
* **Processes.** Workers are started with ``multiprocessing``'s *spawn*
  method (a fresh interpreter, never a fork of a process with a loop),
  given the parent's ``HttpConfig``. Each reports ``host:port`` on a pipe
  once it listens; the parent prints ``READY host:port`` when all have. A
  worker that cannot start (bad TLS file, port taken by another program)
  stops the whole start: every worker is stopped and the parent exits 2.
* **Signals.** SIGTERM and SIGINT on the parent are forwarded as SIGTERM to
  every worker, which stops gracefully (``shutdown_grace``); the parent waits
  for them (``shutdown_grace`` + ``_STOP_MARGIN_S``, then SIGKILL) and exits.
  SIGHUP is forwarded when the shim has TLS files to reload; without TLS the
  parent logs that there is nothing to reload and every process keeps serving
  (as one process does: ``dcache.daemon``). A worker whose parent is
  gone (even by SIGKILL) sees the parent's sentinel pipe close and stops.
* **A worker that dies** is logged at WARNING with its exit status and
  started again, after a pause that doubles (1 s up to 30 s) while workers
  keep dying within ``_STABLE_S`` of their start. The other workers serve
  meanwhile; connections the dead one held are lost.
* **Metrics.** Each worker merges its siblings' last snapshots into its
  ``/metrics`` (``dcache.http._metrics.WorkerMetrics``); the snapshots live
  in a temporary directory the parent removes when it exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from ..config import HttpConfig
from ..daemon import pin_mmap_threshold, serve
from ..net import protected_mode
from .server import HttpDaemon, WorkerLink

__all__ = ["run_workers", "Supervisor", "WorkerFailedError", "WORKER_START_TIMEOUT_S"]

log = logging.getLogger("dcache.http")

#: Seconds a worker may take to listen (imports, TLS files, the first PING to the masters).
WORKER_START_TIMEOUT_S = 60.0
#: A worker that ran this long before dying is restarted at once (the backoff starts again).
_STABLE_S = 10.0
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 30.0
#: Seconds past ``shutdown_grace`` the parent waits for its workers before SIGKILL.
_STOP_MARGIN_S = 5.0


class WorkerFailedError(Exception):
    """A worker could not start."""


def _worker_main(config: HttpConfig, index: int, metrics_dir: str, ready: Connection, setup_logging: Callable[[], None] | None) -> None:
    """A worker process: serve the shim on the shared port until SIGTERM or the parent's exit."""
    if setup_logging is not None:
        setup_logging()
    parent = multiprocessing.parent_process()
    assert parent is not None and parent.sentinel is not None
    link = WorkerLink(index, metrics_dir, ready, parent.sentinel)
    import uvloop

    pin_mmap_threshold()
    try:
        uvloop.run(serve(HttpDaemon(config, link), host=config.host, metrics_port=None, ready=False))
    except Exception as exc:  # could not start: the parent says why and stops
        try:
            ready.send(("failed", f"{exc.__class__.__name__}: {exc}"))
        except OSError:
            pass
        sys.exit(2)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, never listening: the workers' port, kept while they restart."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Worker:
    index: int
    process: SpawnProcess
    ready: Connection
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts ``config.workers`` workers, restarts those that die, forwards signals, stops them all (see the module note).

    Args:
        config: the shim's settings, with the reserved port.
        metrics_dir: where the workers' metrics snapshots go.
        setup_logging: run first in each worker (the CLI's logging set-up).
    """

    def __init__(self, config: HttpConfig, metrics_dir: str, setup_logging: Callable[[], None] | None) -> None:
        self.config = config
        self.metrics_dir = metrics_dir
        self.setup_logging = setup_logging
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.stopping = asyncio.Event()
        self.backoff_s = 0.0
        self._restarts: set[asyncio.Task[None]] = set()

    def _spawn(self, index: int) -> _Worker:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            args=(self.config, index, self.metrics_dir, send, self.setup_logging),
            name=f"dcache-http-worker-{index}",
        )
        process.start()
        send.close()
        worker = self.workers[index] = _Worker(index, process, receive)
        return worker

    async def _wait_ready(self, worker: _Worker) -> str:
        """``host:port`` once ``worker`` listens.

        Raises:
            WorkerFailedError: it said it could not start, exited, or took over ``WORKER_START_TIMEOUT_S``.
        """
        loop = asyncio.get_running_loop()
        got: asyncio.Future[object] = loop.create_future()

        def readable() -> None:
            if got.done():
                return
            try:
                got.set_result(worker.ready.recv())
            except (EOFError, OSError):
                got.set_result(
                    ("failed", f"exited with status {worker.process.exitcode}" if not worker.process.is_alive() else "closed its pipe")
                )

        loop.add_reader(worker.ready.fileno(), readable)
        try:
            message = await asyncio.wait_for(got, WORKER_START_TIMEOUT_S)
        except TimeoutError:
            raise WorkerFailedError(f"worker {worker.index} did not listen within {WORKER_START_TIMEOUT_S:g} s") from None
        finally:
            loop.remove_reader(worker.ready.fileno())
        if isinstance(message, str):
            return message
        assert isinstance(message, tuple)
        raise WorkerFailedError(f"worker {worker.index} could not start: {message[1]}")

    def _watch(self, worker: _Worker) -> None:
        """Restart ``worker`` when it exits (unless the shim is stopping)."""
        loop = asyncio.get_running_loop()
        sentinel = worker.process.sentinel

        def exited() -> None:
            loop.remove_reader(sentinel)
            worker.process.join()
            worker.ready.close()
            if self.stopping.is_set():
                return
            ran_s = time.monotonic() - worker.started
            self.backoff_s = 0.0 if ran_s >= _STABLE_S else min(_MAX_BACKOFF_S, max(_FIRST_BACKOFF_S, 2 * self.backoff_s))
            log.warning(
                "http worker %d (pid %s) exited with status %s after %.1f s; starting it again in %.1f s",
                worker.index,
                worker.process.pid,
                worker.process.exitcode,
                ran_s,
                self.backoff_s,
            )
            task = loop.create_task(self._restart(worker.index, self.backoff_s))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

        loop.add_reader(sentinel, exited)

    async def _restart(self, index: int, delay_s: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), delay_s)
            return  # stopping
        except TimeoutError:
            pass
        worker = self._spawn(index)
        self._watch(worker)
        try:
            await self._wait_ready(worker)
        except WorkerFailedError as exc:
            log.error("%s", exc)  # its exit is seen by _watch, which tries again
            return
        log.info("http worker %d (pid %s) serves again", index, worker.process.pid)

    def _on_sighup(self) -> None:
        """SIGHUP: the workers reload their TLS files; without TLS, nothing to do but say so."""
        if self.config.tls_cert is not None or self.config.tls_ca is not None:
            self._signal_all(signal.SIGHUP)
        else:
            log.info("SIGHUP: the HTTP shim has no TLS files to reload; still serving (SIGTERM or SIGINT stops it)")

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                try:
                    os.kill(worker.process.pid, sig)
                except ProcessLookupError:
                    pass

    async def _stop_all(self) -> int:
        """SIGTERM every worker, wait for them (then SIGKILL); 0 if every one exited cleanly, else 1."""
        self.stopping.set()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + _STOP_MARGIN_S
        status = 0
        for worker in self.workers.values():
            process = worker.process
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                log.error("http worker %d (pid %s) did not stop in time; killing it", worker.index, process.pid)
                process.kill()
            process.join()
            if process.exitcode not in (0, -signal.SIGTERM):
                status = 1
        return status

    async def run(self) -> int:
        """Start the workers, print ``READY host:port``, serve until SIGTERM/SIGINT, stop them; the exit status."""
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def on_stop(sig: int) -> None:
            if received:  # a second signal: pass it on (it cuts the workers' wait short)
                self._signal_all(signal.SIGTERM)
            received.append(sig)
            self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        workers = [self._spawn(i) for i in range(self.config.workers)]
        starts = [loop.create_task(self._wait_ready(w)) for w in workers]
        gathered: asyncio.Future[list[str]] = asyncio.gather(*starts)
        stopped: asyncio.Future[Any] = loop.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([gathered, stopped], return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            gathered.cancel()
            return await self._stop_all()
        stopped.cancel()
        try:
            addresses = gathered.result()
        except WorkerFailedError as exc:
            for task in starts:
                task.cancel()
            log.error("%s; stopping the other workers", exc)
            await self._stop_all()
            print(f"dcache http: {exc}", file=sys.stderr)
            return 2
        for worker in workers:
            self._watch(worker)
        log.info(
            "http shim: %d workers listening on %s (pids %s)", len(workers), addresses[0], " ".join(str(w.process.pid) for w in workers)
        )
        print(f"READY {addresses[0]}", flush=True)
        await self.stopping.wait()
        log.info("http shim shutting down (%d workers)", len(workers))
        return await self._stop_all()


def run_workers(config: HttpConfig, setup_logging: Callable[[], None] | None = None) -> int:
    """Run ``config.workers`` shim processes on one port until SIGTERM/SIGINT (see the module note); the exit status.

    Raises:
        ConfigError: protected mode refuses ``--host`` without ``--http-token``, or a TLS file is unusable.
        OSError: the port cannot be bound.
    """
    protected_mode(config.host, config.http_token is not None, config.insecure, "HTTP shim", "--http-token")
    config.tls()  # unreadable TLS files: one error here, not one per worker
    reserved = _reserve_port(config.host, config.port)
    try:
        port = reserved.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="dcache-http-metrics-") as metrics_dir:
            supervisor = Supervisor(replace(config, port=port), metrics_dir, setup_logging)
            return asyncio.run(supervisor.run())
    finally:
        reserved.close()
