"""The RESP front door: Redis's protocol onto a node's op table (``--resp-port``).

``RespProtocol`` is a ``FrameProtocol`` whose bytes are RESP instead of
msgpack frames. It shares everything else with the native connection: the
service's op tables (a RESP connection holds at most the client
credential), its handlers, its bounds (``--max-connections`` counts both
front doors, the input-buffer cap and the frame and idle timeouts apply to
RESP commands as to frames) and its graceful shutdown.

**One path per command.** A command becomes the native op's request,
``[op, rid, *args]``, and runs through the connection's op table exactly as
``FrameProtocol.data_received`` runs a frame: the op's parser
(``dcache.protocol.ops``) checks it, the role's handler answers now, later
(``LATER``, through ``reply``) or when a coroutine completes. On a master
the routing (ring, replicas, fallback, versions, hints, SUPERSEDED) is the
native one. Commands without a native op of their own are compositions of
native ops (GETSET is GET then SET, in order), written as generators that
yield the native requests they need (``_Seq``); docs/RESP.md says which are
not atomic. A few commands answer from the connection itself (PING with a
message, ECHO, CLIENT, COMMAND, CONFIG GET, SELECT 0).

**Order.** Redis clients match replies to commands by position, so replies
leave in command order: each command gets the next slot number, and a
reply for a later slot waits in ``_ready`` until the earlier ones left.
Commands also *run* in order where it matters: a master batches reads to
the end of the loop iteration, runs INCR and conditional SETs in
coroutines, and sends plain writes at once, so a read then a write of one
key in one pipeline could reach the aux node in the other order. Each
command has a kind (``READ``, ``WRITE``, ``DEFER``, ``SEQ``, or ``LOCAL``,
answered by the connection); a command runs at once while the commands in
flight are of its own kind (their wire order is then dispatch order, or
they commute), and otherwise waits, with reading paused, until nothing is
in flight. Pipelines of one kind (every benchmark, most application
pipelines) never wait.

**Bounds.** The hiredis reader refuses an aggregate header of more than
``max_command_args`` items as it reads it (``dcache.protocol.resp``); the
bytes of a command still incomplete count against ``--max-input-buffer``
and, over ``--max-frame-bytes``, close the connection; an incomplete
command must finish within ``--frame-timeout``. Commands read stop running
while the client does not read its replies or too many answers are owed
(``_drain``). A malformed stream gets an ``-ERR Protocol error`` line and a
closed connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from . import __version__
from .errors import (
    AuthError,
    OverloadedError,
    RemoteProtocolError,
    ServerError,
    Status,
    UnknownOpError,
)
from .net import listen_error, protected_mode
from .protocol import MAX_TTL_MS, Credential, Op
from .protocol.limits import INT64_MIN, MAX_CONFIG_PATTERN_BYTES, MAX_CONFIG_PATTERNS
from .protocol.resp import (
    BULK_HEADERS,
    CRLF,
    LARGE_BULK_BYTES,
    NIL,
    NIL3,
    OK,
    ONE,
    PONG,
    QUEUED,
    ZERO,
    RespError,
    array,
    bulk,
    bulk_chunks,
    create_reader,
    error_for_status,
    error_line,
    glob_matcher,
    integer,
    map_reply,
    max_command_args,
    parse_expire_flags,
    parse_int,
    parse_scan_options,
    parse_set_options,
    reader_cursor,
    scan_commands,
    split_inline,
    verbatim,
)
from .server import LATER, MAX_IN_FLIGHT, PUSH_BYTES, UNKNOWN_OP, FrameProtocol, RespStats, Service, _Deferred

__all__ = ["COMMAND_NAMES", "REDIS_VERSION", "RespProtocol", "RespStats", "listen_resp"]

log = logging.getLogger("dcache.resp")

#: The Redis version whose commands and replies this front door follows (INFO and HELLO report it).
REDIS_VERSION = "7.0.0"

#: Command kinds (see the module note): answered by the connection; a read;
#: a write sent at once; work done in a coroutine; a sequence of steps.
LOCAL, READ, WRITE, DEFER, SEQ = range(5)

#: Most bytes kept (no copy) to re-read a stream that mixes inline lines with arrays (``RespProtocol._recover``).
RECOVERY_BYTES = 64 * 1024
#: Request ids of the native calls a composed command makes (above every slot number).
_SUB_RID = 1 << 62

_OK = int(Status.OK)
_NONE = Credential.NONE
_SUPERSEDED = int(Status.SUPERSEDED)
_GET = int(Op.GET)
_SET = int(Op.SET)
_SMALL_BULK = len(BULK_HEADERS)
_join = b"".join

#: What a reply is: one ``bytes``, or chunks written as they are (a large value, uncopied).
Reply = bytes | list[bytes]
#: Turns a native answer into the command's reply: ``(connection, status, result) -> reply``.
Shaper = Callable[["RespProtocol", int, Any], Reply]


def _new_stats() -> RespStats:
    """A node's RESP counters: one per command name, ``unknown`` for the rest."""
    return RespStats([*COMMAND_NAMES, "unknown"])


async def listen_resp(service: Service, host: str, port: int) -> asyncio.base_events.Server:
    """Serve RESP for ``service`` on ``host:port`` (0: a free port); return the listener.

    Raises:
        ConfigError: protected mode refuses ``host`` (as for the native port), or ``port`` cannot be bound
            (``dcache.net.listen_error``, naming ``--resp-port``).
        RuntimeError: this hiredis build cannot be bounded (``dcache.protocol.resp``).
    """
    protected_mode(
        host,
        service.auth_token is not None or service.secret is not None,
        service.settings.insecure,
        service.role,
        "--auth-token or --cluster-secret-file",
    )
    create_reader(1)  # refuse to start now, not at the first connection, if hiredis cannot be bounded
    if not service.tables:
        service.build_tables()
    service.resp_stats = _new_stats()
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.Protocol] = lambda: RespProtocol(service)  # noqa: E731
    if service.tls_listener is not None:  # a node with a certificate serves TLS on every port: RESP's too
        factory = service.tls_listener.acceptor_for(factory)
    try:
        server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
    except OSError as exc:  # the CLI would blame --port, the native listener's flag
        raise listen_error(exc, host, port, "--resp-port") from None
    service.resp_server = server
    return server


class RespProtocol(FrameProtocol):
    """One RESP client connection (see the module note)."""

    __slots__ = (
        "_reader",
        "_gets",
        "_has_data",
        "_stats",
        "_owed",
        "_next_slot",
        "_next_out",
        "_ready",
        "_sub_rid",
        "_queue",
        "_blocked",
        "_kind",
        "_boundary",
        "_inline",
        "_resp3",
        "_nil",
        "_multi",
        "_multi_error",
        "_multi_bytes",
        "_id",
        "_max_command",
        "_quitting",
        "_pos",
        "_len",
        "_fed",
        "_next_at",
        "_tail",
        "_last",
        "_running",
        "_early",
    )

    def __init__(self, service: Service) -> None:
        super().__init__(service)
        self._decoder = None  # the native decoder: RESP is read by hiredis
        limits = self._limits
        self._reader: hiredis.Reader | None = None
        self._new_reader()
        stats = service.resp_stats
        if stats is None:
            stats = service.resp_stats = _new_stats()
        self._stats = stats
        #: Native calls in flight: request id -> shaper (ids below ``_SUB_RID`` are slots) or callback.
        self._owed: dict[int, Any] = {}
        self._next_slot = 1
        #: The slot whose reply leaves next, and replies that wait for earlier ones.
        self._next_out = 1
        self._ready: dict[int, Reply] = {}
        self._sub_rid = _SUB_RID
        #: Commands read but not run yet (the first one waits for the commands in flight).
        self._queue: deque[list[Any]] = deque()
        self._blocked = False
        self._kind = LOCAL
        #: Whether the reader stopped between two commands (the next byte starts one).
        self._boundary = True
        #: An unfinished inline command line.
        self._inline = b""
        self._resp3 = False
        self._nil = NIL
        #: MULTI's queued commands (``None``: not in a transaction), and whether one was refused.
        self._multi: list[list[bytes]] | None = None
        self._multi_error = False
        #: Bytes of the arguments queued in the transaction (at most ``--max-frame-bytes``).
        self._multi_bytes = 0
        self._id = 0
        self._max_command = limits.max_frame_bytes
        self._quitting = False
        #: Bytes fed to the reader in all; the stream offset where the next command starts; the
        #: chunks fed from that offset on, as ``(offset, chunk)`` (``None``: more than
        #: ``RECOVERY_BYTES``, not kept), but for the last one, ``_last``, which joins them only
        #: if a drain leaves bytes unread (most inputs are read whole: no tuple, no append).
        #: ``_recover`` re-reads them after a hiredis error.
        self._fed = 0
        self._next_at = 0
        self._tail: deque[tuple[int, bytes]] | None = deque()
        self._last = b""
        #: The request id whose handler runs now (0: none), and an answer that handler sent through ``reply``
        #: before it returned, as ``(rid, status, result)``: a handler may answer at once through its sink (an
        #: MGET whose keys the near cache holds, a write refused before it left) and still return ``LATER``.
        self._running = 0
        self._early: tuple[int, int, Any] | None = None

    def _new_reader(self) -> None:
        limits = self._limits
        reader = self._reader = create_reader(max_command_args(limits.max_batch_keys))
        self._gets = reader.gets
        self._has_data = reader.has_data
        self._pos, self._len = reader_cursor(reader)

    def grant(self, level: Credential) -> None:
        """A RESP connection holds the client credential at most: no cluster op is reachable from RESP."""
        super().grant(min(level, Credential.CLIENT))

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stats = self._stats
        stats.connections_total += 1
        self._id = stats.connections_total
        if not self._closed:
            stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None and self in self._service.state.connections:
            self._stats.connections -= 1
        super().connection_lost(exc)

    def _release_input(self) -> None:
        super()._release_input()
        self._reader = None
        self._queue.clear()
        self._inline = b""
        self._last = b""

    def data_received(self, data: bytes) -> None:
        if self._closed or self._closing_error is not None or self._reader is None:
            return
        service = self._service
        self.last_active = now = service.now
        completed = self._next_slot
        if self._inline or (data and data[0] != 42 and self._boundary and not self._has_data()):
            data = self._inline_commands(self._inline + data)
            if self._closed or self._reader is None:
                return
        if data:
            self._feed(data)
        if not self._run_commands(now, completed, len(data)):
            return
        out = self._pending_out
        if out and not self._flush_scheduled and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _run_commands(self, now: float, completed: int, fed: int) -> bool:
        """Run the complete commands the reader holds (unless blocked), then account what is left; ``False`` if the connection closed.

        ``completed`` is ``_next_slot`` before this input; ``fed`` the bytes just given to the reader.
        """
        read_all = False
        if not (self._blocked or self._paused or self._throttled):  # _stopped(), inlined: once per input
            try:
                read_all = self._drain()
            except hiredis.ProtocolError as exc:
                if not self._recover(exc):
                    return False
        if self._closed or self._reader is None:
            return False
        if not read_all or self._inline or self.buffered:  # else no byte is left unread: nothing to account
            self._end_of_input(now, completed != self._next_slot, fed)
        return True

    def _end_of_input(self, now: float, completed: bool, fed: int) -> None:
        """Account the bytes of an unfinished command (input cap, frame timeout, one command's size)."""
        reader = self._reader
        assert reader is not None
        if self._boundary and not self._has_data():
            partial = len(self._inline)
        elif completed or self._stopped():
            partial = reader.len() + len(self._inline)
        else:
            partial = self.buffered + fed
        if partial > self._max_command:
            self._stats.protocol_errors += 1
            self._protocol_error(
                RemoteProtocolError(f"Protocol error: a command larger than {self._max_command} bytes (--max-frame-bytes)")
            )
            return
        if partial or self.buffered:
            self._account(partial, now, completed)

    def _inline_commands(self, data: bytes) -> bytes:
        """Run the inline commands at the front of ``data``; return what follows (RESP arrays, for hiredis)."""
        try:
            commands, rest = split_inline(data)
        except RespError as exc:
            self._stats.protocol_errors += 1
            self._protocol_error(RemoteProtocolError(str(exc).removeprefix("ERR ")))
            return b""
        if rest and rest[0] != 42:  # an unfinished line: wait for its end
            self._inline = rest
            rest = b""
        else:
            self._inline = b""
        if commands:
            self._queue.extend(commands)
            self._drain()
        return rest

    def _stopped(self) -> bool:
        """Whether commands read must wait: for the commands in flight (blocked, throttled) or for the client to read its replies."""
        return self._blocked or self._paused or self._throttled

    def _drain(self) -> bool:
        """Run queued commands, then every complete command the reader holds, until one must wait.

        Each ``PUSH_BYTES`` of replies built go to the transport at once, and
        the batch stops when the transport pauses writing (the client does
        not read) or too many answers are owed: a client that pipelines
        large reads and never reads costs the bytes of about one push, not
        the replies of every command it sent. The rest waits in the reader
        (reading is paused) until ``_go_on``. Returns whether every byte fed
        was read, up to the end of a command (``_end_of_input`` has then
        nothing to account).
        """
        queue = self._queue
        out = self._pending_out
        seen = len(out)
        size = 0
        has_data = self._has_data
        gets = self._gets
        read_all = False
        moved = False  # a command was read since ``_next_at`` was last set
        while not (self._blocked or self._paused or self._throttled or self._closed):  # _stopped(), inlined: once per command
            if queue:
                self._command(queue.popleft())
            elif has_data():
                if moved:  # where the next command starts (``_recover``), from the reader's cursor: only when bytes are left
                    self._next_at = self._fed - (self._len.value - self._pos.value)
                    moved = False
                cmd = gets()
                if cmd is False:
                    self._boundary = False
                    break
                self._boundary = True
                moved = True
                self._command(cmd)
            else:
                if self._boundary:  # every byte fed was read: the next command starts where the stream ends
                    self._next_at = self._fed
                    read_all = True
                break
            n = len(out)
            if n != seen:
                if n < seen:  # written by a close
                    seen = 0
                while seen < n:
                    size += len(out[seen])
                    seen += 1
                if size >= PUSH_BYTES:
                    self._push()
                    seen = size = 0
        if read_all:  # nothing to keep for a re-read (the queue is empty too)
            self._last = b""
            tail = self._tail
            if tail:
                tail.clear()
            elif tail is None and self._reader is not None:
                self._tail = deque()  # between two commands again: keep what follows
            return True
        if moved and self._reader is not None:  # stopped after a command, maybe with more held in the reader
            self._next_at = self._fed - (self._len.value - self._pos.value)
        if queue:
            return False
        tail = self._tail
        if tail is None:
            if self._boundary and not self._closed and self._reader is not None and not has_data():
                self._tail = deque()  # between two commands again: keep what follows
            return False
        last = self._last
        if last:  # bytes are left unread: the last chunk joins the others kept
            tail.append((self._fed - len(last), last))
            self._last = b""
        next_at = self._next_at
        while tail and tail[0][0] + len(tail[0][1]) <= next_at:
            tail.popleft()
        if self._fed - next_at > RECOVERY_BYTES:
            self._tail = None  # a large command in progress: not kept
        return False

    def _feed(self, data: bytes) -> None:
        assert self._reader is not None
        if self._tail is not None:  # no copy; trimmed (or dropped) once the reader has read it
            last = self._last
            if last:  # fed before and not drained since
                self._tail.append((self._fed - len(last), last))
            self._last = data
        self._fed += len(data)
        self._reader.feed(data)

    def _recover(self, exc: hiredis.ProtocolError) -> bool:
        """hiredis refused the stream: re-read it with the slow scanner if a command merely started with a byte other than ``*``.

        That is an inline line among arrays (Redis accepts both, and
        redis-cli ``--pipe`` sends an empty line before its last command).
        hiredis drops its buffer on an error, so the bytes from the start of
        the next command on are kept (at most ``RECOVERY_BYTES``: a larger
        command in progress is not) and scanned again from there. Anything
        else, or a stream not kept, closes the connection. Returns whether
        to go on.
        """
        text = str(exc)
        tail = self._tail
        if tail is None or "reply type byte" not in text:
            self._stats.protocol_errors += 1
            self._protocol_error(RemoteProtocolError(text if text.startswith("Protocol error") else f"Protocol error: {text}"))
            return False
        last = self._last
        if last:
            tail.append((self._fed - len(last), last))
            self._last = b""
        data = b"".join(chunk for _, chunk in tail)[self._next_at - tail[0][0] :] if tail else b""
        limits = self._limits
        try:
            commands, rest = scan_commands(data, max_command_args(limits.max_batch_keys), limits.max_value_bytes + limits.max_key_bytes)
        except RespError as err:
            self._stats.protocol_errors += 1
            self._protocol_error(RemoteProtocolError(str(err).removeprefix("ERR ")))
            return False
        self._queue.extend(commands)
        self._new_reader()
        self._fed = self._next_at = 0
        self._tail = deque()
        self._boundary = True
        if rest[:1] == b"*":
            self._feed(rest)
        else:
            self._inline = rest
        self._drain()
        return True

    # -- one command --------------------------------------------------------------------

    def _command(self, cmd: Any) -> None:
        """Admit one command from the stream: check its shape, queue it in a transaction, or run it in its slot."""
        if cmd.__class__ is not list or not cmd:
            self._malformed(cmd)
            return
        name = cmd[0]
        if name.__class__ is not bytes:
            self._malformed(cmd)
            return
        spec = _COMMANDS.get(name)
        if spec is None:
            spec = _COMMANDS.get(name.upper())
        if self._multi is not None and (spec is None or spec.queued):
            self._queue_in_multi(spec, cmd)
            return
        if spec is None:
            self._stats.commands["unknown"] += 1
            self._answer_now(self._unknown(cmd))
            return
        n = len(cmd)
        kind = spec.kind if spec.kind_of is None or n == spec.least else spec.kind_of(cmd)
        if kind:
            if self.in_flight:
                if kind != self._kind or kind == SEQ:
                    self._hold(cmd)
                    return
            else:
                self._kind = kind
        slot = self._next_slot
        self._next_slot = slot + 1
        self._stats.commands[spec.name] += 1
        if not spec.least <= n <= spec.most or (spec.needs_auth and self.level == _NONE):
            self._run(spec, cmd, slot)  # answers the error
            return
        try:  # _run, inlined: once per command
            spec.run(self, slot, cmd)
        except Exception as exc:
            self._deliver(slot, self._error_reply(cmd, exc))

    def _run(self, spec: _Command, cmd: list[Any], target: Any) -> None:
        """Run one command whose reply goes to ``target``: a slot, or a callable (EXEC's commands)."""
        try:
            if self.level == _NONE and spec.needs_auth:
                raise RespError("Authentication required.", "NOAUTH")
            n = len(cmd)
            if n < spec.least or n > spec.most:
                raise RespError(f"wrong number of arguments for '{spec.name.lower()}' command")
            spec.run(self, target, cmd)
        except Exception as exc:
            self._deliver(target, self._error_reply(cmd, exc))

    def _error_reply(self, cmd: list[Any], exc: Exception) -> bytes:
        """The reply to a command that raised ``exc``."""
        if isinstance(exc, RespError):
            return exc.line
        if isinstance(exc, ServerError):
            return error_for_status(exc.code, exc.message)
        if isinstance(exc, (AttributeError, TypeError, ValueError, UnicodeDecodeError)):  # an argument of the wrong RESP type
            log.debug("command %r from %s: %s", cmd[0], self.peer, exc)
            return b"-ERR Protocol error: every argument must be a bulk string\r\n"
        log.error("internal error running %r from %s", cmd[0], self.peer, exc_info=exc)
        return error_line("ERR", f"internal error: {exc.__class__.__name__}")

    def _answer_now(self, reply: bytes) -> None:
        slot = self._next_slot
        self._next_slot = slot + 1
        self._deliver(slot, reply)

    def _malformed(self, cmd: Any) -> None:
        """A request that is not an array of bulk strings: an error, then the connection closes."""
        self._stats.protocol_errors += 1
        got = type(cmd).__name__ if cmd.__class__ is not list or not cmd else type(cmd[0]).__name__
        self._protocol_error(RemoteProtocolError(f"Protocol error: a command is an array of bulk strings (got {got})"))

    def _unknown(self, cmd: list[Any]) -> bytes:
        name = cmd[0].decode(errors="replace")[:128]
        rest = " ".join(f"'{a.decode(errors='replace')[:64]}'" if isinstance(a, bytes) else "?" for a in cmd[1:8])
        return error_line("ERR", f"unknown command '{name}', with args beginning with: {rest}")

    def _hold(self, cmd: list[Any]) -> None:
        """``cmd`` must wait for the commands in flight: stop reading until they are answered."""
        self._queue.appendleft(cmd)
        self._blocked = True
        self.watch = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def _push(self) -> None:
        """Hand the replies built so far to the transport now (it calls ``pause_writing`` if the client does not read them)."""
        out = self._pending_out
        if out and self._transport is not None and not self._closed:
            self._transport.writelines(out)  # no copy of a large value
            out.clear()

    def _after_answer(self) -> None:
        super()._after_answer()  # the throttle lifted: ``_go_on`` runs the commands it held
        if self._blocked:
            self.watch = True
            if not self.in_flight:
                asyncio.get_running_loop().call_soon(self._unblock)

    def hold_input(self) -> None:
        """Run no later command until this one's keys are routed and it is answered (``FrameProtocol.hold_input``; the command loop's own stop)."""
        self._blocked = True
        self.watch = True
        super().hold_input()

    def may_take_turns(self, rid: int) -> bool:
        """A command in its own slot may take several loop iterations; a step of EXEC or of a composed command may not.

        On an aux node an EXEC runs within one iteration (atomic there,
        docs/RESP.md), so its steps are served whole.
        """
        return rid < _SUB_RID

    def release_input(self) -> None:
        """Every key is routed: the commands after it run once it is answered (at once if it already is)."""
        if not self._routing:
            return
        self._routing = False
        if self._blocked and not self.in_flight and not self._closed:
            asyncio.get_running_loop().call_soon(self._unblock)

    def _unblock(self) -> None:
        if not self._blocked or self.in_flight or self._routing or self._closed or self._reader is None:
            return
        self._blocked = False
        self._go_on()

    def _go_on(self) -> None:
        """Run the commands held while the connection was stopped (``_stopped``), then read again if it may."""
        if self._stopped() or self._closed or self._reader is None:
            return
        if self._gate_runs and not self._run_gate_held():
            return
        self._run_commands(self._service.now, self._next_slot, 0)
        self._queue_flush()
        if not self._stopped() and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # -- native calls --------------------------------------------------------------------

    def _native(self, target: Any, msg: list[Any], shape: Shaper) -> None:
        """Run the native request ``msg`` (``[op, 0, *args]``; its id is set here) through this connection's op table.

        The same parser and handler as a native frame; ``shape`` turns the
        answer into the reply to ``target``. Errors the parser or handler
        raise go to the caller.
        """
        op = msg[0]
        entry = self._table.get(op)
        if entry is None:
            raise self._refused(op)
        if target.__class__ is int:
            msg[1] = target
            parse, handler = entry
            self._running = target
            try:
                result = handler(self, target, parse(msg, self._limits))
            finally:
                self._running = 0
            if self._early is not None and self._answered_early(target, shape):
                return
            if self._service.hold is not None:
                result = self._held(target, op, result)
            if result is LATER:
                self._owed[target] = shape
                n = self.in_flight = self.in_flight + 1
                if n >= MAX_IN_FLIGHT and not self._throttled:
                    self._throttle()
            elif result.__class__ is _Deferred:
                self._owe(target, shape)
                self._defer(target, result, op)
            else:
                reply = shape(self, _OK, result)
                if target == self._next_out and not self._ready and reply.__class__ is bytes:  # _deliver, inlined
                    self._pending_out.append(reply)
                    self._next_out = target + 1
                    if reply[0] == 45:  # b"-"
                        self._stats.errors += 1
                else:
                    self._deliver(target, reply)
            return
        rid = self._sub_rid = self._sub_rid + 1
        answer = _Into(self, shape, target)
        msg[1] = rid
        self._running = rid
        try:
            result = entry[1](self, rid, entry[0](msg, self._limits))
        finally:
            self._running = 0
        if self._early is not None and self._answered_early(rid, answer):
            return
        if self._service.hold is not None:
            result = self._held(rid, op, result)
        if not self._owe_later(rid, result, op, answer):
            answer(_OK, result)

    def _answered_early(self, rid: int, answer: Any) -> bool:
        """Deliver the answer the handler of ``rid`` sent before it returned (see ``_early``); whether there was one.

        ``answer`` is the shaper of a slot's reply, or the callback of a sub-request.
        An early answer left by a handler that then raised is dropped here.
        """
        early = self._early
        self._early = None
        if early is None or early[0] != rid:
            return False
        if rid < _SUB_RID:
            self._deliver(rid, answer(self, early[1], early[2]))
            self._queue_flush()
        else:
            answer(early[1], early[2])
        return True

    def _held(self, rid: int, op: int, result: Any) -> Any:
        """The handler just run changed a key a master holds a copy of: ``LATER`` (its answer waits, as in the native dispatch), or ``result``."""
        hold = self._service.hold
        if hold is None or result is LATER or result.__class__ is _Deferred:
            return result
        return hold(self, rid, op, result)

    def _owe_later(self, rid: int, result: Any, op: int, answer: Any) -> bool:
        """If a handler's ``result`` comes later (``LATER`` or deferred), owe it to ``answer`` under ``rid``; whether it did."""
        if result is LATER:
            self._owe(rid, answer)
            return True
        if result.__class__ is _Deferred:
            self._owe(rid, answer)
            self._defer(rid, result, op)
            return True
        return False

    def _later(self, target: Any, awaitable: Any, shape: Shaper) -> None:
        """Answer ``target`` with ``shape`` of what ``awaitable`` returns (or raises), as a deferred handler result is."""
        if target.__class__ is int:
            rid = target
            answer: Any = shape
        else:
            rid = self._sub_rid = self._sub_rid + 1
            answer = _Into(self, shape, target)
        self._owe(rid, answer)
        self._defer(rid, _Deferred(awaitable), UNKNOWN_OP)

    def _call(self, op: int, args: list[Any], callback: Callable[[int, Any], None]) -> tuple[bool, int, Any]:
        """A native call of a composed command: ``(True, status, result)`` if answered now, else ``callback`` gets it later."""
        entry = self._table.get(op)
        try:
            if entry is None:
                raise self._refused(op)
            rid = self._sub_rid = self._sub_rid + 1
            parse, handler = entry
            self._running = rid
            try:
                result = handler(self, rid, parse([op, rid, *args], self._limits))
            finally:
                self._running = 0
            early = self._early
            if early is not None:
                self._early = None
                if early[0] == rid:  # answered before its handler returned (see ``_early``)
                    return True, early[1], early[2]
            if self._service.hold is not None:
                result = self._held(rid, op, result)
        except ServerError as exc:
            return True, exc.code, exc.message
        if self._owe_later(rid, result, op, callback):
            return False, 0, None
        return True, _OK, result

    def _refused(self, op: int) -> ServerError:
        """Why ``op`` is not in this connection's table: not authenticated yet (``NOAUTH``), or not served here."""
        if self.level == Credential.NONE:
            return AuthError("Authentication required.")
        return UnknownOpError(f"this {self._service.role} does not serve {Op(op).name}")

    def _owe(self, rid: int, answer: Any) -> None:
        self._owed[rid] = answer
        self.in_flight += 1
        if self.in_flight >= MAX_IN_FLIGHT and not self._throttled:
            self._throttle()

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None:
        """A native answer owed to this connection (a handler answered ``LATER`` or a coroutine finished)."""
        self.in_flight -= 1
        answer = self._owed.pop(rid, None)
        if answer is None and rid == self._running:  # its handler has not returned yet: ``_answered_early`` delivers it
            self.in_flight += 1
            self._early = (rid, status, result)
            return
        if answer is not None and not self._closed:
            if rid < _SUB_RID:
                out = answer(self, status, result)
                if rid == self._next_out and not self._ready and out.__class__ is bytes:  # _deliver, inlined
                    self._pending_out.append(out)
                    self._next_out = rid + 1
                    if out[0] == 45:  # b"-"
                        self._stats.errors += 1
                else:
                    self._deliver(rid, out)
            else:
                answer(status, result)
            if not self._flush_scheduled and self._pending_out:  # _queue_flush, inlined
                self._flush_scheduled = True
                self._service.queue_flush(self)
        if self.watch:
            self._after_answer()

    def _queue_flush(self) -> None:
        if self._pending_out and not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._service.queue_flush(self)

    def _deliver(self, target: Any, reply: Reply) -> None:
        """Put ``reply`` in its slot: it leaves once every earlier slot's reply has (``target`` may also be a callable)."""
        if target.__class__ is not int:
            target(reply)
            return
        if type(reply) is bytes and reply[0] == 45:  # b"-": an error
            self._stats.errors += 1
        if target != self._next_out:
            self._ready[target] = reply
            return
        out = self._pending_out
        if type(reply) is bytes:
            out.append(reply)
        else:
            out.extend(cast(list[bytes], reply))
        target += 1
        ready = self._ready
        while ready:
            nxt = ready.pop(target, None)
            if nxt is None:
                break
            if type(nxt) is bytes:
                out.append(nxt)
            else:
                out.extend(cast(list[bytes], nxt))
            target += 1
        self._next_out = target

    # -- connection-level errors -----------------------------------------------------------

    def connection_error(self, exc: RemoteProtocolError | ServerError) -> bytes:
        """A RESP error line for an error that closes the connection."""
        if isinstance(exc, OverloadedError) and "connections" in exc.message:
            return b"-ERR max number of clients reached\r\n"
        if isinstance(exc, RemoteProtocolError):
            text = str(exc)
            return error_line("ERR", text if text.startswith("Protocol error") else f"Protocol error: {text}")
        return error_for_status(exc.code, exc.message)

    # -- transactions ---------------------------------------------------------------------

    def _queue_in_multi(self, spec: _Command | None, cmd: list[Any]) -> None:
        """Queue ``cmd`` in the open transaction (``QUEUED``), or answer its error, which fails the transaction.

        The queue holds at most ``--max-batch-keys`` commands whose arguments
        weigh at most ``--max-frame-bytes`` in all, as one native request.
        Once the transaction failed nothing more is kept: EXEC only aborts.
        """
        multi = self._multi
        assert multi is not None
        if spec is None:
            self._stats.commands["unknown"] += 1
            self._fail_multi(self._unknown(cmd))
            return
        self._stats.commands[spec.name] += 1
        n = len(cmd)
        limits = self._limits
        if self.level == Credential.NONE and spec.needs_auth:
            self._fail_multi(b"-NOAUTH Authentication required.\r\n")
        elif n < spec.least or n > spec.most:
            self._fail_multi(error_line("ERR", f"wrong number of arguments for '{spec.name.lower()}' command"))
        elif self._multi_error:
            self._answer_now(QUEUED)
        elif len(multi) >= limits.max_batch_keys:
            self._fail_multi(error_line("ERR", f"more than {limits.max_batch_keys} commands in one transaction"))
        else:
            size = self._multi_bytes + sum(len(a) if a.__class__ is bytes else 8 for a in cmd)
            if size > limits.max_frame_bytes:
                self._fail_multi(
                    error_line("ERR", f"a transaction's commands hold more than {limits.max_frame_bytes} bytes (--max-frame-bytes)")
                )
                return
            self._multi_bytes = size
            multi.append(cmd)
            self._answer_now(QUEUED)

    def _fail_multi(self, reply: bytes) -> None:
        """A command of the open transaction is refused with ``reply``: EXEC will abort, so the queue is dropped now."""
        assert self._multi is not None
        self._multi_error = True
        self._multi.clear()
        self._multi_bytes = 0
        self._answer_now(reply)

    def _run_step(self, cmd: list[Any], box: _Box) -> None:
        """Run one command of EXEC (or of any sequence) with its reply going to ``box``."""
        spec = _COMMANDS.get(cmd[0]) or _COMMANDS.get(cmd[0].upper())
        if spec is None:
            box(self._unknown(cmd))
            return
        self._run(spec, cmd, box)

    def set_protocol(self, version: int) -> None:
        """Answer in RESP2 or RESP3 from now on (``HELLO``)."""
        self._resp3 = version == 3
        self._nil = NIL3 if self._resp3 else NIL


# -- composed commands ---------------------------------------------------------------

#: What a composed command yields: one native call ``(op, args)``, several in
#: parallel ``[(op, args), ...]`` (answered as a list), or a RESP command to
#: run ``("resp", cmd)`` (answered with its reply's bytes).
Step = Any
Sequence = Generator[Step, Any, Reply]
#: A step a composed command yields between two chunks of keys (``_Seq``): the rest may run in a later loop
#: iteration, in its turn (``dcache.turns``); the step's answer is the keys the next chunk may hold (``None``: any).
TURN: Step = ("turn",)


class _Into:
    """The answer callback of a native call whose reply goes to a callable target (a command run by EXEC)."""

    __slots__ = ("conn", "shape", "target")

    def __init__(self, conn: RespProtocol, shape: Shaper, target: Callable[[Reply], None]) -> None:
        self.conn = conn
        self.shape = shape
        self.target = target

    def __call__(self, status: int, result: Any) -> None:
        self.target(self.shape(self.conn, status, result))


class _Box:
    """Where the reply of one step of a sequence lands; wakes the sequence if it waits."""

    __slots__ = ("reply", "waiter")

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.waiter: _Seq | None = None

    def __call__(self, reply: Reply) -> None:
        self.reply = reply
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.resume(reply)


class _Seq:
    """Drives a composed command: sends each step's native request, resumes the generator with its answer.

    A step answered at once continues in a loop (no recursion, so a long
    EXEC on an aux node runs flat); one answered later resumes from the
    answer's callback. The first error status ends the command with that
    error. A ``TURN`` after a chunk of keys answered at once (an aux node's
    own) resumes in a later loop iteration, in its turn with the other large
    requests (``Service.turns``), the connection's later commands held until
    the command ends (``hold_input``), so other clients run between chunks;
    a ``TURN`` before the first chunk waits only if other large requests
    wait already (``Turns.busy``); in EXEC, or after a chunk answered later,
    it is no step.
    """

    __slots__ = ("conn", "target", "gen", "results", "pending", "error", "written", "held", "sent")

    def __init__(self, conn: RespProtocol, target: Any, gen: Sequence) -> None:
        self.conn = conn
        self.target = target
        self.gen = gen
        self.results: list[Any] = []
        self.pending = 0
        self.error: tuple[int, Any] | None = None
        #: Whether the step in flight is an unconditional SET (SUPERSEDED counts as written: see ``_shape_written``).
        self.written = False
        #: Whether a ``TURN`` holds the connection's later commands until this one ends.
        self.held = False
        #: Native calls sent in parallel steps so far (what a turn is charged: ``_turn``).
        self.sent = 0

    def start(self) -> None:
        self.resume(None)

    def resume(self, value: Any) -> None:
        conn = self.conn
        at_once = False  # the last step was a chunk answered in this call
        while True:
            try:
                step = self.gen.send(value)
            except StopIteration as stop:
                self._end(stop.value)
                return
            except RespError as exc:
                self._end(exc.line)
                return
            except ServerError as exc:
                self._end(error_for_status(exc.code, exc.message))
                return
            if step.__class__ is list:
                done = self._parallel(step)
                if not done:
                    return
                if self.error is not None:
                    self._end(error_for_status(*self.error))
                    return
                value = self.results
                at_once = True
                continue
            if step is TURN:
                target = self.target
                turns = conn._service.turns
                if (at_once or (not self.sent and turns.busy)) and target.__class__ is int and conn.may_take_turns(target):
                    if not self.held:
                        self.held = True
                        conn.hold_input()
                    turns.add(self._turn)
                    return
                value = None
                continue
            if step[0] == "resp":
                box = _Box()
                conn._run_step(step[1], box)
                if box.reply is None:
                    box.waiter = self
                    return
                value = box.reply
                continue
            self.written = step[0] == _SET and len(step[1]) < 4
            now, status, result = conn._call(step[0], step[1], self._answer)
            if not now:
                return
            if status == _SUPERSEDED and self.written:
                status, result = _OK, True
            if status:
                self._end(error_for_status(status, result))
                return
            value = result

    def _turn(self, allowed: int) -> int:
        """The rest of the command, after a ``TURN`` (``Turns``): stopped if the client left; an unexpected error answers it.

        The ``TURN`` step is answered with ``allowed``, the keys its next chunk
        may hold; returns the native calls it sent: the keys of that chunk.
        """
        conn = self.conn
        if conn.is_closing:
            self.held = False
            conn.release_input()
            return 0
        sent = self.sent
        try:
            self.resume(allowed)
        except Exception as exc:
            log.error("internal error running a command from %s", conn.peer, exc_info=exc)
            self._end(error_line("ERR", f"internal error: {exc.__class__.__name__}"))
        conn._queue_flush()
        return self.sent - sent

    def _end(self, reply: Reply) -> None:
        """Answer the command; the commands held behind it (``TURN``) run next."""
        conn = self.conn
        conn._deliver(self.target, reply)
        if self.held:
            self.held = False
            conn.release_input()

    def _answer(self, status: int, result: Any) -> None:
        if status == _SUPERSEDED and self.written:
            status, result = _OK, True
        if status:
            self._end(error_for_status(status, result))
            return
        self.resume(result)

    def _parallel(self, steps: list[tuple[int, list[Any]]]) -> bool:
        """Send every step; True if all were answered at once."""
        self.results = [None] * len(steps)
        self.error = None
        self.pending = 0
        self.sent += len(steps)
        for i, (op, args) in enumerate(steps):
            now, status, result = self.conn._call(op, args, _Part(self, i))
            if now:
                self._record(i, status, result)
            else:
                self.pending += 1
        return not self.pending

    def _record(self, i: int, status: int, result: Any) -> None:
        if status:
            if self.error is None:
                self.error = (status, result)
        else:
            self.results[i] = result

    def part_answered(self, i: int, status: int, result: Any) -> None:
        self._record(i, status, result)
        self.pending -= 1
        if self.pending:
            return
        if self.error is not None:
            self._end(error_for_status(*self.error))
            return
        self.resume(self.results)


class _Part:
    """The callback of one of a sequence's parallel native calls."""

    __slots__ = ("seq", "i")

    def __init__(self, seq: _Seq, i: int) -> None:
        self.seq = seq
        self.i = i

    def __call__(self, status: int, result: Any) -> None:
        self.seq.part_answered(self.i, status, result)


def _sequence(conn: RespProtocol, target: Any, gen: Sequence) -> None:
    _Seq(conn, target, gen).start()


# -- shapers: a native answer -> the command's reply --------------------------------------


def _bulk_or_nil(conn: RespProtocol, value: bytes | None) -> Reply:
    if value is None:
        return conn._nil
    if len(value) >= LARGE_BULK_BYTES:
        return bulk_chunks(value)
    return bulk(value)


def _shape_bulk(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    if result is None:
        return conn._nil
    n = len(result)
    if n < _SMALL_BULK:  # bulk(), inlined
        return _join((BULK_HEADERS[n], result, CRLF))
    if n >= LARGE_BULK_BYTES:
        return bulk_chunks(result)
    return b"$%d\r\n%b\r\n" % (n, result)


def _shape_ok_or_nil(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    return OK if result else conn._nil


def _shape_ok(conn: RespProtocol, status: int, result: Any) -> Reply:
    return error_for_status(status, result) if status else OK


def _shape_written(conn: RespProtocol, status: int, result: Any) -> Reply:
    """An unconditional write (SET, SETEX, MSET): ``OK``, also when a concurrent newer write of the key won.

    The master answers ``SUPERSEDED`` when an owner holds a version newer
    than the write's even after one retry with a fresh version: a write
    stamped after this one started, so concurrent with it. Redis answers OK
    to both of two concurrent SETs and keeps one; here the newer one is
    kept, which is this write followed by it (docs/DECISIONS.md).
    """
    if status and status != _SUPERSEDED:
        return error_for_status(status, result)
    return OK


def _shape_bool(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    return ONE if result else ZERO


def _shape_int(conn: RespProtocol, status: int, result: Any) -> Reply:
    return error_for_status(status, result) if status else integer(int(result))


def _shape_mget(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    nil = conn._nil
    parts = [b"*%d\r\n" % len(result)]
    for v in result:
        parts.append(nil if v is None else b"$%d\r\n%b\r\n" % (len(v), v))
    if len(parts) > 64:
        return parts  # written as they are: no join of a large answer
    return b"".join(parts)


def _shape_ttl_s(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    return integer(result if result < 0 else (result + 500) // 1000)


def _shape_strlen(conn: RespProtocol, status: int, result: Any) -> Reply:
    return error_for_status(status, result) if status else integer(0 if result is None else len(result))


def _shape_type(conn: RespProtocol, status: int, result: Any) -> Reply:
    if status:
        return error_for_status(status, result)
    return b"+string\r\n" if result else b"+none\r\n"


def _keys_in(stats: dict[str, Any]) -> int:
    """The number of keys a STATS map says the node serves: an aux node's ``items``; a master's ``aux_items`` over its copies per key."""
    if "aux_items" in stats:  # a master: the sum over the aux nodes counts every copy
        return int(stats["aux_items"]) // max(1, int(stats.get("replicas", 1)))
    return int(stats.get("items", 0))


# -- the commands ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Command:
    """One RESP command: its name, arity (``least``..``most`` words with the name), kind and runner.

    ``kind_of`` gives the kind of a command with options (more than ``least``
    words); with ``least`` words it is ``kind``, and ``kind_of`` is not called.
    ``least``..``most`` is Redis's arity (``COMMAND INFO``): where Redis says
    "at least", ``most`` is ``_MANY`` and the runner refuses extra options, so
    in MULTI such a command is queued and fails in EXEC, as in Redis.
    """

    name: str
    least: int
    most: int
    kind: int
    run: Callable[[RespProtocol, Any, list[Any]], None]
    kind_of: Callable[[list[Any]], int] | None = None
    needs_auth: bool = True
    queued: bool = True  # inside MULTI: queued (False: runs at once, as EXEC and DISCARD)
    flags: tuple[str, ...] = ()


_MANY = 1 << 30


def _get(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [_GET, 0, cmd[1]], _shape_bulk)


def _set_kind(cmd: list[Any]) -> int:
    if len(cmd) == 3:
        return WRITE
    opts = {a.upper() for a in cmd[3:] if a.__class__ is bytes}
    if b"GET" in opts or b"KEEPTTL" in opts:
        return SEQ
    if (b"EXAT" in opts or b"PXAT" in opts) and (b"NX" in opts or b"XX" in opts):
        return SEQ  # a time already past is a conditional SET, then a DELETE (``_set_past``)
    return DEFER if b"NX" in opts or b"XX" in opts else WRITE


def _set(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if len(cmd) == 3:
        conn._native(target, [_SET, 0, cmd[1], cmd[2]], _shape_written)
        return
    ttl, flags, keepttl, get = parse_set_options(cmd[3:], time.time_ns() // 1_000_000)
    if ttl < 0:  # EXAT/PXAT already past: Redis deletes the key (where NX/XX allow the write)
        if flags or get:
            _sequence(conn, target, _set_past(conn, cmd[1], cmd[2], flags, get))
        else:
            conn._native(target, [Op.DELETE, 0, cmd[1]], _shape_written)
        return
    if keepttl or get:
        _sequence(conn, target, _set_get(conn, cmd[1], cmd[2], ttl, flags, keepttl, get))
        return
    conn._native(target, [_SET, 0, cmd[1], cmd[2], ttl or None, flags], _shape_written if not flags else _shape_ok_or_nil)


def _set_get(conn: RespProtocol, key: bytes, value: bytes, ttl: int, flags: int, keepttl: bool, get: bool) -> Sequence:
    old = (yield (_GET, [key])) if get else None
    if keepttl:
        left = yield (Op.TTL, [key])
        ttl = left if left > 0 else 0
    stored = yield (_SET, [key, value, ttl or None, flags] if flags else [key, value, ttl or None])
    if get:
        return _bulk_or_nil(conn, old)
    return OK if stored else conn._nil


def _set_past(conn: RespProtocol, key: bytes, value: bytes, flags: int, get: bool) -> Sequence:
    """SET with EXAT/PXAT already past, with NX, XX or GET: the write's outcome, then no key (a 1 ms SET, then DELETE)."""
    old = (yield (_GET, [key])) if get else None
    if flags:
        stored = yield (_SET, [key, value, 1, flags])
        if not stored:
            return _bulk_or_nil(conn, old) if get else conn._nil
    yield (Op.DELETE, [key])
    return _bulk_or_nil(conn, old) if get else OK


def _setnx(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [_SET, 0, cmd[1], cmd[2], None, 1], _shape_bool)


def _ttl_arg(arg: bytes, unit_ms: int, command: str) -> int:
    n = parse_int(arg)
    if n <= 0 or n * unit_ms > MAX_TTL_MS:
        raise RespError(f"invalid expire time in '{command}' command")
    return n * unit_ms


def _setex(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [_SET, 0, cmd[1], cmd[3], _ttl_arg(cmd[2], 1000, "setex")], _shape_written)


def _psetex(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [_SET, 0, cmd[1], cmd[3], _ttl_arg(cmd[2], 1, "psetex")], _shape_written)


def _getset(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    _sequence(conn, target, _set_get(conn, cmd[1], cmd[2], 0, 0, False, True))


def _getdel(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    def steps() -> Sequence:
        old = yield (_GET, [cmd[1]])
        if old is not None:
            yield (Op.DELETE, [cmd[1]])
        return _bulk_or_nil(conn, old)

    _sequence(conn, target, steps())


def _getex(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    key = cmd[1]
    opts = cmd[2:]
    unit = b""
    persist = False
    if opts:
        opt = opts[0].upper()
        if opt == b"PERSIST" and len(opts) == 1:
            persist = True
        elif opt in (b"EX", b"PX", b"EXAT", b"PXAT") and len(opts) == 2:
            unit = opt
        else:
            raise RespError("syntax error")

    def steps() -> Sequence:
        value = yield (_GET, [key])
        if value is not None:
            if persist:
                yield (Op.PERSIST, [key])
            elif unit:  # the time is checked once the key is found: a missing key answers nil, as in Redis
                yield (Op.EXPIRE, [key, _getex_ttl(unit, opts[1])])
        return _bulk_or_nil(conn, value)

    _sequence(conn, target, steps())


def _getex_ttl(unit: bytes, arg: bytes) -> int:
    """GETEX's EX/PX/EXAT/PXAT time as milliseconds left (<= 0: already past, the key is deleted)."""
    n = parse_int(arg)
    if n <= 0:
        raise RespError("invalid expire time in 'getex' command")
    now = time.time_ns() // 1_000_000
    ttl_ms = {b"EX": n * 1000, b"PX": n, b"EXAT": n * 1000 - now, b"PXAT": n - now}[unit]
    if ttl_ms > MAX_TTL_MS:
        raise RespError("invalid expire time in 'getex' command")
    return ttl_ms


def _append(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    key, tail = cmd[1], cmd[2]

    def steps() -> Sequence:
        old = yield (_GET, [key])
        if old is None:
            value = tail
            ttl = 0
        else:
            value = old + tail
            left = yield (Op.TTL, [key])
            ttl = left if left > 0 else 0
        yield (_SET, [key, value, ttl or None])
        return integer(len(value))

    _sequence(conn, target, steps())


def _strlen(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [_GET, 0, cmd[1]], _shape_strlen)


def _mget(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [Op.MGET, 0, cmd[1:]], _shape_mget)


def _mset(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if len(cmd) % 2 == 0:
        raise RespError("wrong number of arguments for 'mset' command")
    conn._native(target, [Op.MSET, 0, [[cmd[i], cmd[i + 1]] for i in range(1, len(cmd), 2)]], _shape_written)


def _counter(op: Op, by: bool) -> Callable[[RespProtocol, Any, list[Any]], None]:
    def run(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
        delta = parse_int(cmd[2]) if by else 1
        if delta == INT64_MIN and op == Op.DECR:  # its negation does not fit: Redis refuses it whatever the value
            raise RespError("decrement would overflow")
        conn._native(target, [op, 0, cmd[1], delta], _shape_int)

    return run


#: Keys a multi-key DEL, UNLINK, EXISTS or TOUCH sends at a time: the next chunk goes once the
#: previous one is answered, so a master's loop spends a few ms per chunk, not one long stretch
#: (a DEL of 30,000 keys held it about 180 ms; a command may carry 100,000). An aux node answers
#: a chunk at once: its next chunk runs in a later loop iteration, in its turn with the other
#: large requests (``TURN``, ``dcache.turns``; a DEL of 30,000 missing keys held an aux node's
#: loop about 100 ms).
KEYS_PER_STEP = 1000


def _keys_count(op: Op) -> Callable[[RespProtocol, Any, list[Any]], None]:
    """DEL, UNLINK, EXISTS, TOUCH: the native op once per key, ``KEYS_PER_STEP`` keys at a time; the reply counts the true answers."""

    def run(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
        if len(cmd) == 2:
            conn._native(target, [op, 0, cmd[1]], _shape_bool)
            return

        def steps() -> Sequence:
            found = 0
            i = 1
            while i < len(cmd):
                n = KEYS_PER_STEP
                if i > 1 or len(cmd) > KEYS_PER_STEP + 1:  # the first chunk of more than one waits only behind other large requests
                    n = (yield TURN) or KEYS_PER_STEP  # in its turn, the keys it may serve (``_Seq._turn``)
                answers = yield [(op, [key]) for key in cmd[i : i + n]]
                found += sum(1 for a in answers if a)
                i += n
            return integer(found)

        _sequence(conn, target, steps())

    return run


def _type(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [Op.EXISTS, 0, cmd[1]], _shape_type)


def _expire_kind(cmd: list[Any]) -> int:
    return SEQ if len(cmd) > 3 else WRITE


def _expire(unit_ms: int, absolute: bool, name: str) -> Callable[[RespProtocol, Any, list[Any]], None]:
    def run(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
        key = cmd[1]
        n = parse_int(cmd[2])
        if absolute:
            ttl_ms = n * unit_ms - time.time_ns() // 1_000_000
        else:
            ttl_ms = n * unit_ms
        if ttl_ms > MAX_TTL_MS:
            raise RespError(f"invalid expire time in '{name}' command")
        flags = parse_expire_flags(cmd[3:])
        if not flags:
            conn._native(target, [Op.EXPIRE, 0, key, ttl_ms], _shape_bool)
            return

        def steps() -> Sequence:
            left = yield (Op.TTL, [key])
            if left == -2:
                return ZERO
            if "NX" in flags and left != -1:
                return ZERO
            if "XX" in flags and left == -1:
                return ZERO
            if "GT" in flags and (left == -1 or ttl_ms <= left):
                return ZERO
            if "LT" in flags and left != -1 and ttl_ms >= left:
                return ZERO
            applied = yield (Op.EXPIRE, [key, ttl_ms])
            return ONE if applied else ZERO

        _sequence(conn, target, steps())

    return run


def _ttl(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [Op.TTL, 0, cmd[1]], _shape_ttl_s)


def _pttl(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [Op.TTL, 0, cmd[1]], _shape_int)


def _persist(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._native(target, [Op.PERSIST, 0, cmd[1]], _shape_bool)


def _dbsize(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if conn._table.get(Op.STATS) is None:  # the credential STATS needs
        raise conn._refused(Op.STATS)
    conn._later(target, conn._service.count_keys(), _shape_int)


def _flush(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if len(cmd) > 2 or (len(cmd) == 2 and cmd[1].upper() not in (b"ASYNC", b"SYNC")):
        raise RespError("syntax error")
    service = conn._service
    if not service.settings.resp_allow_flush:
        raise RespError(
            f"{cmd[0].decode(errors='replace').upper()} is an admin command and is disabled on this node "
            "(start it with --resp-allow-flush true to allow it)"
        )
    conn._later(target, service.flush_keys(), _shape_ok)


def _scan(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    """SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]: a page of the node's keys (the cluster's, on a master)."""
    try:
        cursor = parse_int(cmd[1], 0)
    except RespError:
        raise RespError("invalid cursor") from None
    pattern, count, kind = parse_scan_options(cmd[2:], conn._service.limits.max_key_bytes)
    match = glob_matcher(pattern) if pattern is not None else None
    listed = kind is None or kind == b"string"  # every dcache value is a string

    def shape(c: RespProtocol, status: int, result: Any) -> Reply:
        if status:
            return error_for_status(status, result)
        next_cursor, keys = result
        if not listed:
            keys = []
        elif match is not None:
            keys = [k for k in keys if match(k)]
        return b"*2\r\n" + bulk(b"%d" % next_cursor) + array([bulk(k) for k in keys])

    conn._later(target, conn._service.scan_keys(cursor, count), shape)


def _ping(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if len(cmd) > 2:  # checked here, not by the arity (``most``): Redis queues such a PING in MULTI, then fails it in EXEC
        raise RespError("wrong number of arguments for 'ping' command")
    if len(cmd) == 1:
        conn._native(target, [Op.PING, 0], lambda c, s, r: error_for_status(s, r) if s else PONG)
    else:
        if conn._table.get(Op.PING) is None:
            raise RespError("Authentication required.", "NOAUTH")
        conn._deliver(target, bulk(cmd[1]))


def _echo(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._deliver(target, bulk(cmd[1]))


def _quit(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._deliver(target, OK)
    conn._blocked = True  # read nothing more
    conn._quitting = True
    conn.close()


def _select(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if parse_int(cmd[1]) != 0:
        raise RespError("DB index is out of range")
    conn._deliver(target, OK)


def _auth_token(conn: RespProtocol, args: list[bytes]) -> None:
    """AUTH's arguments (``password`` or ``username password``): check the client token, grant the client credential."""
    service = conn._service
    if service.auth_token is None:
        raise RespError(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"
        )
    if len(args) == 2 and args[0] != b"default":
        raise RespError("invalid username-password pair or user is disabled.", "WRONGPASS")
    try:
        service.authenticate(conn, args[-1].decode(errors="replace"))
    except AuthError as exc:
        if "too many" in exc.message:
            raise RespError(exc.message) from None
        raise RespError("invalid username-password pair or user is disabled.", "WRONGPASS") from None
    conn.grant(Credential.CLIENT)


def _auth(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    _auth_token(conn, cmd[1:])
    conn._deliver(target, OK)


def _hello(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    version = 2 if not conn._resp3 else 3
    i = 1
    if len(cmd) > 1:
        try:
            version = parse_int(cmd[1])
        except RespError:
            raise RespError("Protocol version is not an integer or out of range") from None
        if version not in (2, 3):
            raise RespError("unsupported protocol version", "NOPROTO")
        i = 2
    name: str | None = None
    authed = False
    while i < len(cmd):
        opt = cmd[i].upper()
        if opt == b"AUTH" and i + 2 < len(cmd):
            _auth_token(conn, [cmd[i + 1], cmd[i + 2]])
            authed = True
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(cmd):
            name = _client_name(cmd[i + 1])
            i += 2
        else:
            raise RespError(f"Syntax error in HELLO option '{cmd[i].decode(errors='replace')}'")
    if conn.level == Credential.NONE and not authed:
        raise RespError(
            "HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> "
            "option can be used to authenticate the client and select the RESP protocol version at the same time",
            "NOAUTH",
        )
    if name is not None:
        conn.client_name = name
    conn.set_protocol(version)
    service = conn._service
    conn._deliver(
        target,
        map_reply(
            {
                "server": "dcache",
                "version": REDIS_VERSION,
                "proto": version,
                "id": conn._id,
                "mode": "standalone",
                "role": "master",
                "modules": [],
                "dcache_version": __version__,
                "dcache_role": service.role,
                "node_id": service.node_id,
            },
            conn._resp3,
        ),
    )


def _client_name(arg: bytes) -> str:
    name = arg.decode(errors="replace")
    if any(c <= " " or c > "~" for c in name) or len(name) > 255:
        raise RespError("Client names cannot contain spaces, newlines or special characters.")
    return name


def _client(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    sub = cmd[1].upper()
    n = len(cmd)
    if sub == b"SETNAME" and n == 3:
        conn.client_name = _client_name(cmd[2]) or None
        reply = OK
    elif sub == b"GETNAME" and n == 2:
        reply = conn._nil if not conn.client_name else bulk(conn.client_name.encode())
    elif sub == b"ID" and n == 2:
        reply = integer(conn._id)
    elif sub == b"SETINFO" and n == 4:
        reply = OK
    elif sub in (b"INFO", b"LIST") and n == 2:
        peer = conn.peer
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        line = f"id={conn._id} addr={addr} name={conn.client_name or ''} db=0 resp={3 if conn._resp3 else 2}\n"
        reply = bulk(line.encode())
    elif sub in (b"NO-EVICT", b"NO-TOUCH") and n == 3:
        reply = OK
    else:
        raise RespError(f"unknown subcommand or wrong number of arguments for '{cmd[1].decode(errors='replace')}'")
    conn._deliver(target, reply)


def _config(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    sub = cmd[1].upper()
    if sub == b"GET" and len(cmd) >= 3:
        patterns = cmd[2:]
        if len(patterns) > MAX_CONFIG_PATTERNS:
            raise RespError(f"CONFIG GET takes at most {MAX_CONFIG_PATTERNS} patterns")
        if any(len(p) > MAX_CONFIG_PATTERN_BYTES for p in patterns):
            raise RespError(f"CONFIG GET pattern longer than {MAX_CONFIG_PATTERN_BYTES} bytes")
        values = _config_values(conn._service)
        found: dict[str, Any] = {}
        for pattern in patterns:
            match = glob_matcher(pattern.lower())
            for k, v in values.items():
                if match(k.encode()):
                    found[k] = v
        conn._deliver(target, map_reply(found, conn._resp3))
    elif sub == b"RESETSTAT" and len(cmd) == 2:
        conn._deliver(target, OK)
    else:
        raise RespError(f"CONFIG {cmd[1].decode(errors='replace').upper()} is not supported by dcache (configure the node with its flags)")


def _config_values(service: Service) -> dict[str, str]:
    settings = service.settings
    return {
        "maxmemory": str(getattr(settings, "max_memory", 0)),
        "maxmemory-policy": "allkeys-lru",
        "maxclients": str(settings.max_connections),
        "timeout": str(int(settings.idle_timeout)),
        "proto-max-bulk-len": str(service.limits.max_value_bytes),
        "databases": "1",
        "save": "",
        "appendonly": "no",
        "cluster-enabled": "no",
    }


def _command_cmd(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    resp3 = conn._resp3
    if len(cmd) == 1:
        conn._deliver(target, array([_command_info(s) for s in _SPECS]))
        return
    sub = cmd[1].upper()
    if sub == b"COUNT":
        conn._deliver(target, integer(len(_SPECS)))
    elif sub == b"LIST":
        conn._deliver(target, array([bulk(s.name.lower().encode()) for s in _SPECS]))
    elif sub == b"INFO":
        infos = []
        for name in cmd[2:]:
            spec = _COMMANDS.get(name.upper())
            infos.append(_command_info(spec) if spec is not None else conn._nil)
        conn._deliver(target, array(infos))
    elif sub == b"DOCS":
        conn._deliver(target, map_reply({}, resp3))
    elif sub == b"GETKEYS":
        raise RespError("COMMAND GETKEYS is not supported by dcache")
    else:
        raise RespError(f"unknown subcommand '{cmd[1].decode(errors='replace')}'. Try COMMAND HELP.")


#: (first key, last key, step) of COMMAND INFO for commands whose keys are not just the first argument.
_KEY_POSITIONS = {
    "MGET": (1, -1, 1),
    "MSET": (1, -1, 2),
    "DEL": (1, -1, 1),
    "UNLINK": (1, -1, 1),
    "EXISTS": (1, -1, 1),
    "TOUCH": (1, -1, 1),
}


def _command_info(spec: _Command) -> bytes:
    """COMMAND INFO's entry: name, arity (negative: at least), flags, first key, last key, step."""
    arity = spec.least if spec.most == spec.least else -spec.least
    keyed = "readonly" in spec.flags or "write" in spec.flags
    first, last, step = _KEY_POSITIONS.get(
        spec.name, (1, 1, 1) if keyed and spec.name not in ("DBSIZE", "SCAN", "FLUSHDB", "FLUSHALL") else (0, 0, 0)
    )
    flags = array([b"+%s\r\n" % f.encode() for f in spec.flags])
    return array([bulk(spec.name.lower().encode()), integer(arity), flags, integer(first), integer(last), integer(step)])


def _info(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    sections = {a.decode(errors="replace").lower() for a in cmd[1:]}

    def shape(c: RespProtocol, status: int, result: Any) -> Reply:
        if status:
            return error_for_status(status, result)
        return verbatim(_info_text(c, result, sections), c._resp3)

    conn._native(target, [Op.STATS, 0], shape)


def _info_text(conn: RespProtocol, stats: dict[str, Any], sections: set[str]) -> str:
    service = conn._service
    rs = conn._stats
    every = not sections or sections & {"all", "everything", "default"}
    out: list[str] = []

    def section(name: str, fields: dict[str, Any]) -> None:
        if every or name.lower() in sections:
            out.append(f"# {name}")
            out.extend(f"{k}:{v}" for k, v in fields.items())
            out.append("")

    port = 0
    if service.resp_server is not None and service.resp_server.sockets:
        port = service.resp_server.sockets[0].getsockname()[1]
    section(
        "Server",
        {
            "redis_version": REDIS_VERSION,
            "dcache_version": __version__,
            "dcache_role": service.role,
            "dcache_node_id": service.node_id,
            "redis_mode": "standalone",
            "process_id": os.getpid(),
            "tcp_port": port,
            "uptime_in_seconds": int(stats.get("uptime_s", 0)),
        },
    )
    section("Clients", {"connected_clients": rs.connections, "maxclients": service.settings.max_connections})
    section(
        "Memory",
        {
            "used_memory": stats.get("aux_bytes", stats.get("bytes", 0)),
            "maxmemory": stats.get("aux_max_bytes", stats.get("max_bytes", 0)),
            "maxmemory_policy": "allkeys-lru",
        },
    )
    section(
        "Stats",
        {
            "total_connections_received": rs.connections_total,
            "total_commands_processed": sum(rs.commands.values()),
            "rejected_connections": stats.get("rejected_connections", 0),
            "keyspace_hits": stats.get("hits", 0),
            "keyspace_misses": stats.get("misses", 0),
            "evicted_keys": stats.get("aux_evictions", stats.get("evictions", 0)),
            "expired_keys": stats.get("aux_expirations", stats.get("expirations", 0)),
        },
    )
    section("Persistence", {"loading": 0})
    items = _keys_in(stats)
    section("Keyspace", {"db0": f"keys={items},expires=0,avg_ttl=0"} if items else {})
    return "\r\n".join(out)


def _multi(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if conn._multi is not None:
        raise RespError("MULTI calls can not be nested")
    conn._multi = []
    conn._multi_error = False
    conn._multi_bytes = 0
    conn._deliver(target, OK)


def _exec(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    queued = conn._multi
    if queued is None:
        raise RespError("EXEC without MULTI")
    failed = conn._multi_error
    conn._multi = None
    conn._multi_error = False
    if failed:
        raise RespError("Transaction discarded because of previous errors.", "EXECABORT")

    limit = conn._limits.max_frame_bytes

    def steps() -> Sequence:
        parts = [b"*%d\r\n" % len(queued)]
        size = 0
        for c in queued:
            r = yield ("resp", c)
            chunks = [r] if r.__class__ is bytes else r
            n = sum(map(len, chunks))
            if size + n > limit:  # the command ran; its reply is not kept (the answer stays bounded)
                chunks = [error_line("ERR", f"this reply would take the transaction's answer past {limit} bytes (--max-frame-bytes)")]
                n = len(chunks[0])
            size += n
            parts += chunks
        return parts

    _sequence(conn, target, steps())


def _discard(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if conn._multi is None:
        raise RespError("DISCARD without MULTI")
    conn._multi = None
    conn._multi_error = False
    conn._deliver(target, OK)


def _watch(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    if conn._multi is not None:
        raise RespError("WATCH inside MULTI is not allowed")
    raise RespError("WATCH is not supported by dcache: a transaction is not isolated across aux nodes (see docs/RESP.md)")


def _unwatch(conn: RespProtocol, target: Any, cmd: list[Any]) -> None:
    conn._deliver(target, OK)


_SPECS = (
    # connection
    _Command("PING", 1, _MANY, LOCAL, _ping, flags=("fast",)),
    _Command("ECHO", 2, 2, LOCAL, _echo, flags=("fast",)),
    _Command("QUIT", 1, _MANY, SEQ, _quit, needs_auth=False, queued=False),
    _Command("HELLO", 1, _MANY, LOCAL, _hello, needs_auth=False, queued=False),
    _Command("AUTH", 2, 3, LOCAL, _auth, needs_auth=False, queued=False),
    _Command("SELECT", 2, 2, LOCAL, _select),
    _Command("CLIENT", 2, _MANY, LOCAL, _client),
    # introspection
    _Command("COMMAND", 1, _MANY, LOCAL, _command_cmd),
    _Command("INFO", 1, _MANY, DEFER, _info),
    _Command("CONFIG", 2, _MANY, LOCAL, _config),
    _Command("DBSIZE", 1, 1, DEFER, _dbsize, flags=("readonly",)),
    # strings
    _Command("GET", 2, 2, READ, _get, flags=("readonly", "fast")),
    _Command("SET", 3, _MANY, WRITE, _set, kind_of=_set_kind, flags=("write",)),
    _Command("SETNX", 3, 3, DEFER, _setnx, flags=("write", "fast")),
    _Command("SETEX", 4, 4, WRITE, _setex, flags=("write",)),
    _Command("PSETEX", 4, 4, WRITE, _psetex, flags=("write",)),
    _Command("GETSET", 3, 3, SEQ, _getset, flags=("write",)),
    _Command("GETDEL", 2, 2, SEQ, _getdel, flags=("write",)),
    _Command("GETEX", 2, _MANY, SEQ, _getex, flags=("write",)),
    _Command("MGET", 2, _MANY, READ, _mget, flags=("readonly",)),
    _Command("MSET", 3, _MANY, WRITE, _mset, flags=("write",)),
    _Command("STRLEN", 2, 2, READ, _strlen, flags=("readonly",)),
    _Command("APPEND", 3, 3, SEQ, _append, flags=("write",)),
    # counters
    _Command("INCR", 2, 2, DEFER, _counter(Op.INCR, False), flags=("write", "fast")),
    _Command("DECR", 2, 2, DEFER, _counter(Op.DECR, False), flags=("write", "fast")),
    _Command("INCRBY", 3, 3, DEFER, _counter(Op.INCR, True), flags=("write", "fast")),
    _Command("DECRBY", 3, 3, DEFER, _counter(Op.DECR, True), flags=("write", "fast")),
    # keys
    _Command("DEL", 2, _MANY, WRITE, _keys_count(Op.DELETE), flags=("write",)),
    _Command("UNLINK", 2, _MANY, WRITE, _keys_count(Op.DELETE), flags=("write",)),
    _Command("EXISTS", 2, _MANY, READ, _keys_count(Op.EXISTS), flags=("readonly",)),
    _Command("TOUCH", 2, _MANY, DEFER, _keys_count(Op.TOUCH), flags=("readonly",)),
    _Command("TYPE", 2, 2, READ, _type, flags=("readonly",)),
    _Command("EXPIRE", 3, _MANY, WRITE, _expire(1000, False, "expire"), kind_of=_expire_kind, flags=("write",)),
    _Command("PEXPIRE", 3, _MANY, WRITE, _expire(1, False, "pexpire"), kind_of=_expire_kind, flags=("write",)),
    _Command("EXPIREAT", 3, _MANY, WRITE, _expire(1000, True, "expireat"), kind_of=_expire_kind, flags=("write",)),
    _Command("PEXPIREAT", 3, _MANY, WRITE, _expire(1, True, "pexpireat"), kind_of=_expire_kind, flags=("write",)),
    _Command("TTL", 2, 2, READ, _ttl, flags=("readonly", "fast")),
    _Command("PTTL", 2, 2, READ, _pttl, flags=("readonly", "fast")),
    _Command("PERSIST", 2, 2, WRITE, _persist, flags=("write", "fast")),
    # whole keyspace
    _Command("SCAN", 2, _MANY, DEFER, _scan, flags=("readonly",)),
    _Command("FLUSHDB", 1, _MANY, SEQ, _flush, flags=("write",)),
    _Command("FLUSHALL", 1, _MANY, SEQ, _flush, flags=("write",)),
    # transactions
    _Command("MULTI", 1, 1, LOCAL, _multi, queued=False),
    _Command("EXEC", 1, 1, SEQ, _exec, queued=False),
    _Command("DISCARD", 1, 1, LOCAL, _discard, queued=False),
    _Command("WATCH", 2, _MANY, LOCAL, _watch, queued=False),
    _Command("UNWATCH", 1, 1, LOCAL, _unwatch),
)

#: Every command dcache answers on its RESP port, by name (docs/RESP.md).
COMMAND_NAMES = tuple(s.name for s in _SPECS)
#: Command name -> spec, in upper and lower case (clients send either; other spellings go through ``upper()``).
_COMMANDS: dict[bytes, _Command] = {}
for _spec in _SPECS:
    _COMMANDS[_spec.name.encode()] = _spec
    _COMMANDS[_spec.name.lower().encode()] = _spec
