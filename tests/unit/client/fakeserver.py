"""A tiny in-process dcache server for client tests.

It listens on a real socket (127.0.0.1, port 0) and speaks the wire protocol
with a dict-backed handler, so the client is tested over real TCP. Knobs make
it misbehave on purpose: answer nothing, answer in reverse order, hold every
answer until told, drop the connection, send a connection-level error frame
or garbage bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from dcache.protocol import PROTOCOL_VERSION, Op, encode_response
from dcache.protocol.framing import FrameDecoder


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class FakeServer:
    """Dict-backed protocol server with failure knobs (all public, set them freely)."""

    def __init__(self, *, auth_token: str | None = None, version: int = PROTOCOL_VERSION) -> None:
        self.auth_token = auth_token
        self.version = version
        self.data: dict[bytes, tuple[bytes, float | None]] = {}
        #: Every decoded request, in arrival order (HELLO included).
        self.received: list[list[Any]] = []
        #: Ops never answered.
        self.silent_ops: set[int] = set()
        #: Ops on which the server closes the connection without answering.
        self.drop_ops: set[int] = set()
        #: Ops answered with this (status, message).
        self.error_ops: dict[int, tuple[int, str]] = {}
        #: Ops answered by a connection-level error frame [0, status, msg], then close.
        self.conn_error_ops: dict[int, tuple[int, str]] = {}
        #: Ops answered by bytes that are not a valid frame.
        self.garbage_ops: set[int] = set()
        #: When > 0, non-HELLO answers are held per connection until this many
        #: are ready, then written in reverse order.
        self.reverse_batch = 0
        #: When True, non-HELLO answers are held until ``release()``.
        self.hold = False
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections_total = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self, op: int) -> list[list[Any]]:
        """The received requests with this op."""
        return [r for r in self.received if r[0] == op]

    async def start(self, port: int | None = None) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port if port is None else port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self.writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.held.clear()

    def release(self) -> None:
        """Write every held answer (in arrival order) and stop holding."""
        self.hold = False
        held, self.held = self.held, []
        for writer, frame in held:
            if not writer.is_closing():
                writer.write(frame)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.writers.add(writer)
        self.connections_total += 1
        decoder = FrameDecoder()
        batch: list[bytes] = []
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for msg in decoder.feed(data):
                    self.received.append(msg)
                    op, rid = msg[0], msg[1]
                    if op in self.drop_ops:
                        writer.close()
                        return
                    if op in self.silent_ops:
                        continue
                    if op in self.conn_error_ops:
                        status, text = self.conn_error_ops[op]
                        writer.write(encode_response(0, status, text))
                        writer.close()
                        return
                    if op in self.garbage_ops:
                        writer.write(b"\x00\x00\x00\x01\xc1")
                        continue
                    if op in self.error_ops:
                        status, text = self.error_ops[op]
                        frame = encode_response(rid, status, text)
                    else:
                        status, result = self._handle(msg)
                        frame = encode_response(rid, status, result)
                    if op == Op.HELLO:
                        writer.write(frame)
                    elif self.hold:
                        self.held.append((writer, frame))
                    elif self.reverse_batch:
                        batch.append(frame)
                        if len(batch) >= self.reverse_batch:
                            writer.write(b"".join(reversed(batch)))
                            batch.clear()
                    else:
                        writer.write(frame)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    # -- the dict-backed handler ---------------------------------------------

    def _live(self, key: bytes) -> bytes | None:
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self.data[key]
            return None
        return value

    def _handle(self, msg: list[Any]) -> tuple[int, Any]:
        op, _rid, *args = msg
        now = time.monotonic()
        if op == Op.HELLO:
            token = args[1] if len(args) > 1 else None
            if args[0] != PROTOCOL_VERSION:
                return 8, "unsupported version"
            if self.auth_token is not None and token != self.auth_token:
                return 7, "invalid auth token"
            info = {
                "version": self.version,
                "node_id": f"fake-{self.port}",
                "role": "aux",
                "max_frame_bytes": 1 << 25,
                "max_key_bytes": 1024,
                "max_value_bytes": 1 << 23,
            }
            return 0, info
        if op == Op.PING:
            return 0, "PONG"
        if op == Op.GET:
            return 0, self._live(_b(args[0]))
        if op == Op.SET:
            key, value = _b(args[0]), _b(args[1])
            ttl = args[2] if len(args) > 2 else None
            flags = args[3] if len(args) > 3 else 0
            exists = self._live(key) is not None
            if (flags == 1 and exists) or (flags == 2 and not exists):
                return 0, False
            self.data[key] = (value, None if ttl is None else now + ttl / 1000)
            return 0, True
        if op == Op.DELETE:
            existed = self._live(_b(args[0])) is not None
            self.data.pop(_b(args[0]), None)
            return 0, existed
        if op == Op.MGET:
            return 0, [self._live(_b(k)) for k in args[0]]
        if op == Op.MSET:
            ttl = args[1] if len(args) > 1 else None
            for k, v in args[0]:
                self.data[_b(k)] = (_b(v), None if ttl is None else now + ttl / 1000)
            return 0, len(args[0])
        if op == Op.EXISTS:
            return 0, self._live(_b(args[0])) is not None
        if op == Op.EXPIRE:
            key, ttl = _b(args[0]), args[1]
            live = self._live(key)
            if live is None:
                return 0, False
            if ttl <= 0:
                del self.data[key]
            else:
                self.data[key] = (live, now + ttl / 1000)
            return 0, True
        if op == Op.TTL:
            key = _b(args[0])
            if self._live(key) is None:
                return 0, -2
            expires = self.data[key][1]
            return 0, -1 if expires is None else max(0, round((expires - now) * 1000))
        if op in (Op.INCR, Op.DECR):
            key = _b(args[0])
            delta = args[1] if len(args) > 1 else 1
            current: bytes = self._live(key) or b"0"
            try:
                n = int(current) + (delta if op == Op.INCR else -delta)
            except ValueError:
                return 9, "value is not an integer"
            self.data[key] = (str(n).encode(), self.data.get(key, (b"", None))[1])
            return 0, n
        if op == Op.TOUCH:
            return 0, self._live(_b(args[0])) is not None
        if op == Op.STATS:
            return 0, {"role": "aux", "items": len(self.data), "uptime_s": 1.5}
        return 2, f"unknown op {op!r}"


def _b(x: Any) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)
