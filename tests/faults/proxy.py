"""A TCP fault proxy for tests: listens on 127.0.0.1:0, forwards to an upstream host:port.

The proxy runs its own asyncio loop in a daemon thread, so synchronous and
asynchronous tests drive it alike: every control method is thread-safe and
returns once the new mode is in force. Modes switch at run time and apply to
the connections already open as well as to new ones:

* pass-through (the start, and ``heal()``);
* ``delay(s)``: each chunk reaches the other side ``s`` seconds after the
  proxy read it, in both directions (added latency, not a throughput cap);
* ``blackhole()``: connections stay open and nothing moves either way. The
  proxy stops reading, so it holds at most ``QUEUE_CHUNKS`` chunks of
  ``CHUNK_BYTES`` per direction of a connection (plus its stream buffer) and
  TCP flow control pushes back on the senders; new connections are accepted
  but not connected upstream. Nothing is dropped: after ``heal()`` it flows;
* ``cut()``: every current connection is reset (RST on both sides) and new
  ones are reset as soon as they arrive, until ``heal()``; connections
  ``spare()`` marked before keep flowing (to cut one client's connections
  only, mark another's, open before it connects);
* ``trickle(bytes_per_second)``: each direction of each connection forwards
  at most that many bytes per second.

``counters()`` reports connections accepted, active, reset and refused,
upstream connect failures, bytes forwarded each way and the most bytes held.
The upstream may be given later (``set_upstream``): a connection that arrives
before waits for it (bounded), which lets a test start the proxy, hand its
address to a daemon (``--advertise``) and point it at the daemon afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

_T = TypeVar("_T")

#: Bytes read from a socket at once (one chunk).
CHUNK_BYTES = 16 * 1024
#: Chunks queued per direction of a connection before the proxy stops reading.
QUEUE_CHUNKS = 8
#: Seconds a control call waits for the proxy's loop.
CONTROL_TIMEOUT_S = 10.0
#: Seconds a new connection waits for an upstream address, and for the upstream's accept.
UPSTREAM_TIMEOUT_S = 10.0
#: Pieces per second of a trickled direction (each piece is rate / TRICKLE_STEPS bytes).
TRICKLE_STEPS = 20

PASS = "pass"
DELAY = "delay"
BLACKHOLE = "blackhole"
CUT = "cut"
TRICKLE = "trickle"

_LINGER_RST = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort a connection with a RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close one side and collect how it ended (a reset side's error is expected)."""
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


class _Link:
    """One proxied connection: the client side, the upstream side and the pump tasks."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.up_reader: asyncio.StreamReader | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.reset = False
        #: ``cut()`` leaves it open (``FaultProxy.spare``).
        self.spared = False
        #: Bytes read from one side and not yet written to the other.
        self.held = 0

    def abort(self) -> None:
        """Reset both sides and stop the pumps (idempotent)."""
        if self.reset:
            return
        self.reset = True
        for task in self.tasks:
            task.cancel()
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class FaultProxy:
    """A TCP proxy whose forwarding faults tests switch at run time (see the module note).

    Use as a context manager, or ``start()`` and ``close()``.
    """

    def __init__(self, upstream: str | tuple[str, int] | None = None, *, name: str = "proxy") -> None:
        self.name = name
        self.host = "127.0.0.1"
        self.port = 0
        self._upstream: tuple[str, int] | None = None
        if upstream is not None:
            self._upstream = self._parse(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"fault-proxy-{name}", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        #: Every connection's writers, either side: whatever a handler left open (cancelled mid-way) is reset at close.
        self._writers: set[asyncio.StreamWriter] = set()
        # Mode state: read and written on the proxy's loop only.
        self.mode = PASS
        self._delay_s = 0.0
        self._rate = 0
        self._flowing: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._has_upstream: asyncio.Event | None = None
        # Counters (ints written on the loop; read from anywhere).
        self._accepted = 0
        self._refused = 0
        self._resets = 0
        self._upstream_failures = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._held = 0
        self._held_max = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def _parse(upstream: str | tuple[str, int]) -> tuple[str, int]:
        if isinstance(upstream, tuple):
            return upstream
        host, _, port = upstream.rpartition(":")
        return host.strip("[]"), int(port)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> FaultProxy:
        """Start the loop thread and listen on 127.0.0.1 (a free port)."""
        self._thread.start()
        self._call(self._listen)
        return self

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._changed = asyncio.Event()
        self._has_upstream = asyncio.Event()
        if self._upstream is not None:
            self._has_upstream.set()
        self._server = await asyncio.start_server(self._on_client, self.host, 0, limit=CHUNK_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Reset every connection, stop listening and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                self._call(self._shutdown)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(CONTROL_TIMEOUT_S)
        if not self._loop.is_running():
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=CONTROL_TIMEOUT_S)
        for writer in self._writers:
            if not writer.transport.is_closing():
                _reset(writer)
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def addr(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    # -- control (thread-safe) -------------------------------------------------------------

    def _call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control methods must not be called from the proxy's own thread")

        async def run() -> _T:
            return await fn()

        fut: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return fut.result(CONTROL_TIMEOUT_S)

    def _set_mode(self, mode: str, delay_s: float = 0.0, rate: int = 0) -> None:
        async def apply() -> None:
            assert self._flowing is not None and self._changed is not None
            self.mode = mode
            self._delay_s = delay_s
            self._rate = rate
            if mode == BLACKHOLE:
                self._flowing.clear()
            else:
                self._flowing.set()
            if mode == CUT:
                for link in [link for link in self._links if not link.spared]:
                    if not link.reset:
                        self._resets += 1
                    link.abort()
            # wake every pump waiting out a delay or a trickle step: the new mode applies now
            changed = self._changed
            self._changed = asyncio.Event()
            changed.set()

        self._call(apply)

    def set_upstream(self, upstream: str | tuple[str, int]) -> None:
        """Forward new connections to ``upstream`` (``host:port``); waiting ones go now."""
        target = self._parse(upstream)

        async def apply() -> None:
            assert self._has_upstream is not None
            self._upstream = target
            self._has_upstream.set()

        self._call(apply)

    def heal(self) -> None:
        """Back to pass-through: held data flows, new connections are forwarded."""
        self._set_mode(PASS)

    def delay(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it was read, both ways."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._set_mode(DELAY, delay_s=seconds)

    def blackhole(self) -> None:
        """Forward nothing either way; keep connections open; hold at most a few chunks each."""
        self._set_mode(BLACKHOLE)

    def cut(self) -> None:
        """Reset every current connection and reset new ones on arrival, until ``heal()``."""
        self._set_mode(CUT)

    def spare(self) -> int:
        """Exempt the connections open now from every later ``cut()``; returns how many there are.

        Lets a test cut one client's connections and not another's: mark the
        other's, opened first, then ``cut()`` (new connections are reset as
        usual). Other modes apply to spared connections too.
        """

        async def apply() -> int:
            for link in self._links:
                link.spared = True
            return len(self._links)

        return self._call(apply)

    def trickle(self, bytes_per_second: int) -> None:
        """Forward at most ``bytes_per_second`` per direction of each connection."""
        if bytes_per_second < 1:
            raise ValueError("trickle needs at least 1 byte per second")
        self._set_mode(TRICKLE, rate=int(bytes_per_second))

    def counters(self) -> dict[str, Any]:
        """A snapshot of the counters (a plain dict)."""
        return {
            "mode": self.mode,
            "accepted": self._accepted,
            "active": len(self._links),
            "refused": self._refused,
            "resets": self._resets,
            "upstream_failures": self._upstream_failures,
            "bytes_up": self._bytes_up,
            "bytes_down": self._bytes_down,
            "held_bytes": self._held,
            "held_bytes_max": self._held_max,
        }

    # -- forwarding (on the proxy's loop) ----------------------------------------------

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # start_server would run a coroutine handler as an untracked task; track it, so close() can wait for it
        self._writers.add(writer)
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        task.add_done_callback(partial(self._served, writer))

    def _served(self, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        """A connection's handler ended: reset its client side if the handler left it open, and forget its writers.

        A handler cancelled before it ran, or in its ``finally`` before it
        closed both sides (the proxy closing), left a writer open that,
        collected later, warned "unclosed StreamWriter" into whichever test
        was running (twice in full runs, in ``test_zookeeper``).
        """
        if not writer.transport.is_closing():
            _reset(writer)
        self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self.mode == CUT:
            self._refused += 1
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._connect_upstream(link)
            up, up_reader = link.upstream, link.up_reader
            if link.reset or up is None or up_reader is None:
                return
            queues = (asyncio.Queue[Any](QUEUE_CHUNKS), asyncio.Queue[Any](QUEUE_CHUNKS))
            link.tasks = [
                asyncio.ensure_future(self._read(link, reader, queues[0])),
                asyncio.ensure_future(self._write(link, queues[0], up, True)),
                asyncio.ensure_future(self._read(link, up_reader, queues[1])),
                asyncio.ensure_future(self._write(link, queues[1], writer, False)),
            ]
            done, _ = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                link.abort()  # one side failed: the other sees a reset too
        except asyncio.CancelledError:
            link.abort()
            raise
        finally:
            self._links.discard(link)
            self._held -= link.held  # dropped with the connection
            link.held = 0
            for task in link.tasks:
                task.cancel()
            if link.tasks:
                await asyncio.wait(link.tasks)
                for task in link.tasks:
                    if not task.cancelled():
                        task.exception()  # retrieved: a reset side's error is expected
            for side in (writer, link.upstream):
                if side is not None:
                    await _close(side)
            if link.upstream is not None:
                self._writers.discard(link.upstream)

    async def _connect_upstream(self, link: _Link) -> None:
        """Open the upstream side once an upstream is known and the proxy forwards (bounded waits)."""
        assert self._has_upstream is not None and self._flowing is not None
        try:
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                await self._has_upstream.wait()
            await self._flowing.wait()  # a blackholed proxy does not connect upstream
            if link.reset:
                return
            assert self._upstream is not None
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(*self._upstream, limit=CHUNK_BYTES)
        except (OSError, TimeoutError):
            self._upstream_failures += 1
            link.abort()  # the client sees its connection refused (reset)
            return
        self._writers.add(up_writer)
        if link.reset:  # cut while connecting
            _reset(up_writer)
            await _close(up_writer)
            return
        link.upstream, link.up_reader = up_writer, up_reader

    async def _read(self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue[Any]) -> None:
        flowing = self._flowing
        assert flowing is not None
        while True:
            await flowing.wait()  # blackholed: stop reading, TCP pushes back on the sender
            data = await reader.read(CHUNK_BYTES)
            if not data:
                await queue.put(None)
                return
            link.held += len(data)
            self._held += len(data)
            self._held_max = max(self._held_max, self._held)
            await queue.put((self._loop.time(), data))

    async def _write(self, link: _Link, queue: asyncio.Queue[Any], writer: asyncio.StreamWriter, up: bool) -> None:
        loop = self._loop
        while True:
            item = await queue.get()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still carry answers
                return
            received, data = item
            while True:  # wait out a blackhole and the delay (mode changes apply at once)
                await self._wait_flowing()
                wait = received + self._delay_s - loop.time() if self.mode == DELAY else 0.0
                if wait <= 0:
                    break
                await self._wait_changed(wait)
            while data:
                await self._wait_flowing()
                rate = self._rate if self.mode == TRICKLE else 0
                piece = data[: max(1, rate // TRICKLE_STEPS)] if rate else data
                data = data[len(piece) :]
                writer.write(piece)
                await writer.drain()
                link.held -= len(piece)
                self._held -= len(piece)
                if up:
                    self._bytes_up += len(piece)
                else:
                    self._bytes_down += len(piece)
                if rate:
                    await self._wait_changed(len(piece) / rate)

    async def _wait_flowing(self) -> None:
        assert self._flowing is not None
        await self._flowing.wait()

    async def _wait_changed(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or less if the mode changes meanwhile."""
        assert self._changed is not None
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass
