"""The HTTP shim as a daemon: ``HttpDaemon``, run by ``dcache.daemon.serve`` like every role.

``serve`` gives it the same lifecycle as the aux nodes and masters: the
``READY host:port`` line, SIGTERM/SIGINT handled at the edge, and a graceful
stop (``close``: stop accepting, let requests in flight finish within
``shutdown_grace``, then close the dcache clients). The shim serves its own
``/metrics``, so it needs no separate metrics port.

As a worker of ``dcache http --workers N`` (``dcache.http.workers``) the
daemon binds its port with ``SO_REUSEPORT`` beside its siblings, tells the
parent when it listens, stops when the parent goes away, and merges its
siblings' metrics into its ``/metrics`` (``WorkerMetrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from ..address import format_address
from ..client import Client
from ..config import HttpConfig
from ..daemon import run, serve
from ..errors import ConfigError
from ..net import protected_mode
from ._metrics import HttpMetrics, WorkerMetrics
from ._wire import HttpServer
from .app import Shim

__all__ = ["HttpDaemon", "WorkerLink", "serve_http", "run_one", "METRICS_SNAPSHOT_S"]

log = logging.getLogger("dcache.http")

#: Seconds between two snapshots of a worker's metrics for its siblings.
METRICS_SNAPSHOT_S = 1.0


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker of ``dcache http --workers N`` gets from its parent.

    Attributes:
        index: the worker's number (0..N-1), for logs.
        metrics_dir: where the workers' metrics snapshots go.
        ready: the parent's end receives ``host:port`` once the worker listens.
        parent_alive: readable (EOF) when the parent has exited: the worker then stops.
    """

    index: int
    metrics_dir: str
    ready: Connection
    parent_alive: int


class HttpDaemon:
    """The shim's routes and its listener, for ``dcache.daemon.serve``.

    Args:
        config: the shim's settings.
        worker: set when this process is one of ``--workers N`` (``dcache.http.workers``).
    """

    __slots__ = ("config", "tls", "node_id", "metrics", "collector_", "shim", "http", "worker", "_server", "_snapshots")

    role = "http"
    #: The shim holds no data: its stop never loses any, and it exits 0.
    exit_code = 0

    def __init__(self, config: HttpConfig, worker: WorkerLink | None = None) -> None:
        """Raises ``ConfigError`` if a TLS file of ``config`` cannot be read or is not what it should be."""
        self.config = config
        self.worker = worker
        #: ``shim``, or ``shim worker N`` as a worker (for logs).
        self.node_id = "shim" if worker is None else f"shim worker {worker.index}"
        #: HTTPS on the listener (``tls.server``), TLS to the masters (``tls.peer``); SIGHUP reloads them.
        self.tls = config.tls()
        self.metrics = HttpMetrics()
        self.collector_: Collector = self.metrics if worker is None else WorkerMetrics(self.metrics, Path(worker.metrics_dir))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector_)
        self.shim = Shim(config, self.metrics, lambda: generate_latest(registry), self.tls.peer if self.tls is not None else None)
        # Access lines only at debug level: `dcache cluster` shares its terminal with the shim.
        self.http = HttpServer(self.shim, access_log=config.log_level.lower() == "debug")
        self._server: asyncio.Server | None = None
        self._snapshots: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Open the dcache clients and listen; return ``host:port``.

        Raises:
            ConfigError: ``--host`` reaches beyond this machine without
                ``--http-token`` (protected mode), unless ``--insecure``; or a
                ``--master`` is an aux node (``_check_masters``).
            OSError: the port cannot be bound.
        """
        config = self.config
        protected_mode(config.host, config.http_token is not None, config.insecure, "HTTP shim", "--http-token")
        await self.shim.start()
        https = self.tls.server if self.tls is not None else None
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                self.http.protocol, config.host, config.port, ssl=https, reuse_port=True if self.worker is not None else None, backlog=1024
            )
        except BaseException:
            await self.shim.close()
            raise
        try:
            await self._check_masters()
        except BaseException:
            server.close()
            await self.shim.close()
            raise
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        where = format_address(host, port)
        log.info("http shim in front of masters %s", ",".join(config.master))
        if self.tls is not None:
            log.info(
                "TLS: %s%s; %s",
                "HTTPS on the listener" if https is not None else "plain HTTP on the listener",
                ", TLS to the masters" if self.tls.peer is not None else ", plain TCP to the masters",
                self.tls.describe(),
            )
        if self.worker is not None:
            self._follow_parent(self.worker)
            self.worker.ready.send(where)
        return where

    def _follow_parent(self, worker: WorkerLink) -> None:
        """Snapshot the metrics for the siblings every second; stop (as on SIGTERM) when the parent is gone."""
        assert isinstance(self.collector_, WorkerMetrics)
        collector = self.collector_
        collector.write()

        async def snapshots() -> None:
            while True:
                await asyncio.sleep(METRICS_SNAPSHOT_S)
                try:
                    collector.write()
                except OSError as exc:
                    log.warning("cannot write the metrics snapshot %s: %s", collector.path, exc)

        self._snapshots = asyncio.get_running_loop().create_task(snapshots())

        def parent_gone() -> None:
            asyncio.get_running_loop().remove_reader(worker.parent_alive)
            log.warning("%s: the parent process is gone; stopping", self.node_id)
            os.kill(os.getpid(), signal.SIGTERM)

        asyncio.get_running_loop().add_reader(worker.parent_alive, parent_gone)

    async def _check_masters(self) -> None:
        """Warn about each master that does not answer now (``--health-timeout`` each, in parallel); refuse an aux node.

        The shim starts all the same when a master is down: its client keeps
        trying, and requests are answered 503 until a master answers
        (``/health`` says which do).

        Raises:
            ConfigError: a ``--master`` endpoint answers as an aux node: the
                shim would store every key there, around the ring, where no
                master finds it.
        """
        clients = self.shim.health_clients

        async def hello(client: Client) -> str | None:
            try:
                info = await client.server_info()
            except Exception as exc:
                root: BaseException = exc
                while root.__cause__ is not None and not isinstance(root.__cause__, asyncio.CancelledError):  # a timeout's cause
                    root = root.__cause__
                return f"{root.__class__.__name__}: {root}" if str(root) else root.__class__.__name__
            if info.get("role") != "master":
                raise ConfigError(
                    f"master: {client.current_endpoint} is an aux node ({info.get('node_id')}), not a master: the shim would "
                    "store keys around the ring, where no master finds them; give --master the masters' addresses (7000 by default)"
                )
            return None

        failures = await asyncio.gather(*(hello(c) for c in clients.values()))
        down = {m: why for m, why in zip(clients, failures, strict=True) if why is not None}
        for master, why in down.items():
            log.warning("master %s does not answer (%s)", master, why)
        if len(down) == len(clients):
            log.warning("no master answers: the shim answers 503 until one does, and keeps trying (check --master %s)", ",".join(clients))

    def collector(self) -> Collector:
        """The shim's metrics (served at its own ``/metrics``; merged with the siblings' as a worker)."""
        return self.collector_

    async def before_close(self, sig: int, again: asyncio.Event) -> None:
        """Nothing to do before stopping: requests in flight finish in ``close``."""

    async def close(self) -> None:
        """Stop accepting, let requests finish (up to ``shutdown_grace`` seconds), close the dcache clients (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self.http.close(self.config.shutdown_grace)
        await self.shim.close()
        if self._snapshots is not None:
            self._snapshots.cancel()
            assert isinstance(self.collector_, WorkerMetrics)
            try:
                self.collector_.write()  # the last figures stay for the siblings' merged counters
            except OSError as exc:
                log.warning("cannot write the metrics snapshot %s: %s", self.collector_.path, exc)


async def serve_http(config: HttpConfig, *, ready: bool = True) -> None:
    """Serve the shim until SIGTERM or SIGINT, then stop gracefully (``dcache.daemon.serve``)."""
    await serve(HttpDaemon(config), host=config.host, metrics_port=None, ready=ready)


def run_one(config: HttpConfig) -> int:
    """Blocking entry point of one shim process (``dcache.http.run_http`` starts workers instead when asked)."""
    return run(lambda: HttpDaemon(config), host=config.host, metrics_port=None)
