"""One lifecycle for every daemon: start, metrics, the READY line, signals, a graceful stop.

``serve(daemon)`` runs any role the same way (after uvicorn's ``Server``):

1. ``daemon.start()`` binds the listener and starts the background work;
2. a ``/metrics`` endpoint starts if ``metrics_port`` is set;
3. SIGTERM, SIGINT and SIGHUP are caught; the process prints ``READY host:port``,
   followed by ``resp=host:port`` when the node also serves RESP;
4. on the first signal, ``daemon.before_close(signal, again)`` runs: what a
   role does before it stops serving (an aux node that is a cluster member
   hands its data over on SIGTERM); ``again`` is set by a second signal,
   which cuts that short;
5. ``daemon.close()`` stops accepting, gives requests in flight their grace
   period, then cancels what is left; the metrics endpoint stops last; the
   process exits with ``daemon.exit_code`` (1 when the stop lost data: an
   aux node's final snapshot failed).

SIGHUP reloads the daemon's TLS certificate, key and CA (``daemon.tls``,
``dcache.tls.TlsContexts.reload``) without a restart; a daemon without TLS
logs that it has nothing to reload and keeps serving. SIGHUP's default
action would kill the process on the spot: an aux node would lose the
writes since its last snapshot, for a signal operators send to "reload"
and terminals send when they close.

Signals are handled only here, at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .tls import TlsContexts

__all__ = ["Daemon", "MMAP_THRESHOLD_BYTES", "pin_mmap_threshold", "serve", "run"]

log = logging.getLogger("dcache.daemon")


class Daemon(Protocol):
    """What ``serve`` runs: a role's node."""

    role: str
    node_id: str
    #: The TLS contexts SIGHUP reloads (``None``: no TLS).
    tls: TlsContexts | None
    #: What the process exits with once stopped: 0, or 1 when the stop lost data.
    exit_code: int

    async def start(self) -> str:
        """Bind the listener(s) and start background work; return ``host:port`` listened on (then ``resp=host:port`` if RESP is served)."""
        ...

    def collector(self) -> Collector:
        """The role's metrics collector."""
        ...

    async def before_close(self, sig: int, again: asyncio.Event) -> None:
        """Work between the first stop signal and ``close`` (``again`` is set by a second signal)."""
        ...

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), stop background work."""
        ...


async def serve(daemon: Daemon, *, host: str, metrics_port: int | None, ready: bool = True) -> None:
    """Run ``daemon`` until SIGTERM or SIGINT, then stop it gracefully (see the module note).

    Raises:
        ConfigError: the metrics port cannot be bound (``dcache.net.listen_error``), or
            ``daemon.start()`` refused its settings.
        OSError: ``daemon.start()`` could not bind its listener (the CLI says which port and flag).
    """
    where = await daemon.start()
    metrics = None
    try:
        if metrics_port is not None:
            from .metrics import registry_for, start_metrics_server
            from .net import listen_error

            try:
                metrics = await start_metrics_server(registry_for(daemon.collector()), host, metrics_port)
            except OSError as exc:
                raise listen_error(exc, host, metrics_port, "--metrics-port") from None
            log.info("%s %s serves metrics at %s", daemon.role, daemon.node_id, metrics.url)
        stop = asyncio.Event()
        received: list[int] = []
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            received.append(sig)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, _on_sighup, daemon)
        log.info("%s %s listening on %s", daemon.role, daemon.node_id, where)
        if ready:
            print(f"READY {where}", flush=True)
        await stop.wait()
        stop.clear()
        await daemon.before_close(received[0], stop)
        log.info("%s %s shutting down", daemon.role, daemon.node_id)
    finally:
        await daemon.close()
        if metrics is not None:
            await metrics.close()


def _on_sighup(daemon: Daemon) -> None:
    """SIGHUP: reload the TLS files, or say there is nothing to reload; never stop."""
    if daemon.tls is not None:
        daemon.tls.reload()
    else:
        log.info("SIGHUP: %s %s has no TLS files to reload; still serving (SIGTERM or SIGINT stops it)", daemon.role, daemon.node_id)


#: Allocations at least this large are mapped (and unmapped when freed) by glibc.
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def pin_mmap_threshold(size: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (Linux): memory of large buffers goes back to the system when freed.

    glibc raises the threshold each time it frees a mapped chunk (up to
    32 MiB), so after a few large frames their buffers come from the heap
    and stay in the process once freed. A fixed threshold keeps every
    buffer of ``size`` or more mapped: parked partial frames, large values
    and read chunks return to the system when their connection goes
    (docs/DECISIONS.md). Returns whether it was set (no glibc: nothing done).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def run(make: Callable[[], Daemon], *, host: str, metrics_port: int | None) -> int:
    """Blocking entry point used by the CLI: build the daemon with ``make`` on a uvloop loop and ``serve`` it.

    Returns:
        The daemon's ``exit_code`` once it stopped (0, or 1 when the stop lost data).
    """
    import uvloop

    pin_mmap_threshold()

    async def main() -> int:
        daemon = make()
        await serve(daemon, host=host, metrics_port=metrics_port)
        return daemon.exit_code

    return uvloop.run(main())
