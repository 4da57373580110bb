"""The TCP shell shared by every dcache daemon that speaks the native protocol.

``FrameProtocol`` is an ``asyncio.Protocol`` that owns a ``FrameDecoder``:
``data_received`` feeds it and dispatches every complete request through the
connection's op table: the op's parser (``dcache.protocol.ops``) turns the
request into valid arguments, then the role's handler is called as
``handler(connection, request_id, args)``. Synchronous handlers (the aux
node's) answer in the same call; all answers produced by one
``data_received`` leave in a single ``transport.write``. Handlers that must
wait (a master forwarding to an aux node) return ``LATER`` and answer through
``FrameProtocol.reply``, or return ``deferred(awaitable)``; such answers are
queued and flushed together at the end of the loop iteration.

Credentials. The service builds one op table per credential level once, at
start; a connection points at the table of the level it has proved, so the
check costs nothing per request. On a node with an auth token a connection
starts at ``Credential.NONE`` (only HELLO, in frames of at most
``MAX_HELLO_FRAME_BYTES``), and a HELLO with the right token moves it up.

Bounds (docs/OPERATIONS.md, "Limits"), counted in ``Service`` counters:

* connections: at most ``max_connections``; one more gets an ``OVERLOADED``
  error frame and is closed, with a rate-limited WARNING;
* input: the partial frames buffered across all connections stay below
  ``max_input_buffer``; past it the connections holding the most are closed
  (``OVERLOADED``);
* time: a frame that has started arriving must be complete within
  ``frame_timeout``; a connection with no request in ``idle_timeout`` (if
  set) is closed. One sweeper task per service checks both, from a coarse
  clock, so the hot path only stores an attribute;
* requests in flight per connection: above ``MAX_IN_FLIGHT`` answers owed,
  the connection stops being read, and its frames stop running, until half
  of them are sent;
* output: every ``PUSH_BYTES`` of answers built go to the transport; when its
  write buffer passes its high-water mark (``pause_writing``: the client does
  not read) the connection stops being read and its frames stop running
  until it drains. Frames read but not run wait in ``_backlog`` (at most one
  read of input) and run in order when the connection goes on (``_go_on``);
* answers held for clients that do not read (connections whose writing is
  paused; a master's answers to requests already forwarded keep arriving)
  stay below ``max_output_buffer`` across all connections; past it the
  connections holding the most are cut off: aborted, their answers dropped,
  logged at WARNING (``output_overflows``).

A connection holds no reference cycle (the handlers live in the service's
tables, not as bound methods on the connection), so its memory, the decoder's
buffer included, is freed as soon as the transport lets go of it.

``Service.shutdown`` is the graceful stop: stop accepting, give requests in
flight up to a grace period, close the connections, cancel the background
tasks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from time import perf_counter
from typing import Any, cast

from .address import format_address
from .config import NodeConfig
from .errors import (
    AuthError,
    BadArgumentsError,
    FrameTooLargeError,
    HandshakeError,
    OverloadedError,
    RemoteProtocolError,
    ServerError,
    StaleRingError,
    Status,
    UnavailableError,
    UnknownOpError,
)
from .net import nodelay, protected_mode
from .protocol import (
    CONNECTION_REQUEST_ID,
    HEADER,
    MAX_ARRAY_ITEMS,
    MAX_HELLO_FRAME_BYTES,
    OPS,
    PROTOCOL_VERSION,
    UINT64_MAX,
    Credential,
    Op,
    Packed,
    pack,
    pack_answer,
)
from .protocol.auth import client_proof, new_nonce, proofs_match, server_proof
from .protocol.framing import ONE_CHUNK_BYTES, FrameDecoder
from .protocol.ops import Parser
from .tls import TlsAcceptor, TlsListener
from .turns import Turns

__all__ = [
    "DATA_OPS",
    "LATER",
    "LATENCY_BUCKETS",
    "MAX_IN_FLIGHT",
    "PUSH_BYTES",
    "UNKNOWN_OP",
    "Handler",
    "Histogram",
    "RespStats",
    "RequestGate",
    "ServerState",
    "FrameProtocol",
    "Service",
    "answer_too_large",
    "check_answer_size",
    "deferred",
    "ready_line",
]

log = logging.getLogger("dcache.server")

#: A request handler: ``(connection, request_id, parsed_args)`` -> the result,
#: ``LATER`` or ``deferred(awaitable)``; raises ``ServerError``.
Handler = Callable[["FrameProtocol", int, Any], Any]

_header = HEADER.pack
_OK = Status.OK.value
_CLOCK_SKEW = Status.CLOCK_SKEW.value
_HELLO = Op.HELLO.value
_EPOCH = Op.EPOCH.value

#: The op slot of ``Service.op_requests``/``op_errors`` for requests no handler
#: took (unknown op, not an array, not authenticated yet).
UNKNOWN_OP = 0

#: The data ops every node serves (its methods ``_ping`` ... ``_persist``).
DATA_OPS = (
    Op.PING, Op.GET, Op.SET, Op.DELETE, Op.MGET, Op.MSET, Op.EXISTS,
    Op.EXPIRE, Op.TTL, Op.INCR, Op.DECR, Op.TOUCH, Op.STATS, Op.PERSIST,
)  # fmt: skip

#: Answers a connection may owe (requests answered ``LATER``) before it stops
#: being read; reading resumes below half of it.
MAX_IN_FLIGHT = 4096

#: Bytes of answers a connection builds in one batch of requests before it
#: hands them to the transport, which then says (``pause_writing``) whether
#: the client reads them; if not, the batch stops (native frames and RESP
#: commands alike).
PUSH_BYTES = 256 * 1024

#: Marks a batch of frames that ran to its end (``FrameProtocol.data_received``).
_DONE: Any = iter(())

#: Upper bounds (seconds) of the latency histograms' buckets.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

#: A service times 1 in this many requests (``Service.op_latency``).
SAMPLE_EVERY = 64

#: Seconds between two WARNINGs about refused connections or failed authentications.
_WARN_EVERY_S = 10.0

#: Failed tokens or proofs after which a connection is closed.
AUTH_FAILURES_PER_CONNECTION = 3
#: Failed tokens or proofs from one address (within ``AUTH_PENALTY_S``) after
#: which its checks are limited to ``AUTH_CHECKS_PER_S``.
AUTH_FAILURES_PER_ADDRESS = 5
AUTH_PENALTY_S = 60.0
AUTH_CHECKS_PER_S = 1
#: Addresses whose failures are remembered (the oldest is forgotten first).
AUTH_ADDRESSES = 10_000

#: After a protocol error, the most seconds a connection waits for the answers
#: it still owes (earlier, valid requests) before it sends the error and closes.
CLOSE_DRAIN_S = 5.0
#: Seconds a connection stays open after its error frame and the end of its
#: output, so the peer reads them before the socket closes.
CLOSE_LINGER_S = 0.5


class Histogram:
    """A latency histogram as plain numbers; the role's metrics collector exports it.

    ``counts[i]`` counts observations in ``(bounds[i-1], bounds[i]]``, the
    last slot those above every bound (not cumulative).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` seconds."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class ServerState:
    """Connections and background tasks of one server, for shutdown."""

    __slots__ = ("connections", "tasks", "total_connections")

    def __init__(self) -> None:
        self.connections: set[FrameProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.total_connections = 0

    def spawn(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task (cancelled at shutdown)."""
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


#: An op table entry: the op's parser and the role's handler.
_Entry = tuple[Parser, Handler]


class RespStats:
    """Plain counters of a node's RESP front door (``dcache.respserver``; exported by the role's metrics collector)."""

    __slots__ = ("commands", "errors", "connections", "connections_total", "protocol_errors")

    def __init__(self, commands: Iterable[str]) -> None:
        #: Commands received, by command name (``commands``: every name counted, ``unknown`` for the rest).
        self.commands: dict[str, int] = dict.fromkeys(commands, 0)
        #: Replies that were errors.
        self.errors = 0
        #: RESP connections open now, and accepted in all.
        self.connections = 0
        self.connections_total = 0
        #: Connections closed for a malformed stream.
        self.protocol_errors = 0


class Service:
    """What a ``FrameProtocol`` serves: identity, limits, credentials, handlers, counters.

    Subclasses fill ``handlers`` (op -> ``Handler``) in their constructor;
    ``listen`` builds the per-credential op tables from them and the op table
    of ``dcache.protocol``, binds the listener and starts the sweeper.
    """

    role = "service"

    def __init__(self, node_id: str, settings: NodeConfig) -> None:
        self.node_id = node_id
        self.settings = settings
        self.limits = settings.limits
        self.auth_token = settings.auth_token
        self.state = ServerState()
        self.server: asyncio.base_events.Server | None = None
        #: The RESP listener (``--resp-port``) and its counters, set by ``dcache.respserver.listen_resp``.
        self.resp_server: asyncio.base_events.Server | None = None
        self.resp_stats: RespStats | None = None
        self.handlers: dict[int, Handler] = {Op.HELLO: self.hello, Op.AUTH: self.auth}
        #: The cluster secret peers prove (``None``: cluster ops need what data ops need).
        self.secret = settings.secret()
        #: TLS contexts of the listener and of the links this node opens (``None``: plain TCP).
        self.tls = settings.tls()
        #: The process's exit code after a graceful stop: 0, or 1 when the stop lost
        #: data (an aux node whose final snapshot could not be written).
        self.exit_code = 0
        #: The listener's handshakes, once it listens with TLS.
        self.tls_listener: TlsListener | None = None
        self.auth_failures = 0
        self.auth_throttled = 0
        #: address -> (failures, monotonic time of the last failure, of the last check let through)
        self._auth_failures: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self._last_auth_warning = 0.0
        self._auth_failures_since_warning = 0
        #: One op table per credential level (``build_tables``).
        self.tables: dict[Credential, dict[int, _Entry]] = {}
        #: The same tables for a connection routed by a ring older than ``ring_floor``: each of
        #: ``ring_fenced_ops`` refuses it (``STALE_RING``), the others are as in ``tables``.
        self.stale_tables: dict[Credential, dict[int, _Entry]] = {}
        #: Masters' requests routed by an older ring epoch are refused (EPOCH, ``route_by``; 0: none yet).
        self.ring_floor = 0
        #: Requests refused for that since start.
        self.stale_refused = 0
        self.requests_total = 0
        self.errors_total = 0
        self.protocol_errors_total = 0
        # Bounds, counted (see the module note).
        self.rejected_connections = 0
        self.idle_timeouts = 0
        self.frame_timeouts = 0
        self.input_overflows = 0
        self.output_overflows = 0
        self.versions_refused = 0
        #: Bytes of partial frames buffered across every connection.
        self.buffered_input = 0
        #: Bytes of answers held for clients that do not read them (connections whose writing is paused).
        self.buffered_output = 0
        #: A coarse monotonic clock (seconds), advanced by the sweeper and on
        #: accepting connections: what the time bounds are measured with.
        self.now = time.monotonic()
        #: Set while the handler just run changed a key some master holds a
        #: copy of (``dcache.auxnode.tracking``): the dispatch then hands it
        #: the handler's answer, ``hold(conn, rid, op, result)``, and sends
        #: what it returns (``LATER``: the answer leaves once the copies are gone).
        self.hold: Callable[[FrameProtocol, int, int, Any], Any] | None = None
        self._last_refusal_warning = 0.0
        self._refused_since_warning = 0
        self._drained: asyncio.Event | None = None
        # Metrics (plain numbers, exported at scrape time by the role's
        # collector): requests and errors by op, one increment per request;
        # the latency of 1 in ``sample_every`` requests by op; the time of
        # every ``data_received`` batch (no clock call per request).
        ops = [UNKNOWN_OP, *map(int, Op)]
        self.op_requests: dict[int, int] = dict.fromkeys(ops, 0)
        self.op_errors: dict[int, int] = dict.fromkeys(ops, 0)
        self.op_latency: dict[int, Histogram] = {op: Histogram() for op in ops}
        self.batch_latency = Histogram()
        self.sample_every = SAMPLE_EVERY
        self.sample_countdown = SAMPLE_EVERY
        # Connections with answers queued (``FrameProtocol.reply``/``send``):
        # one flush for all of them per loop iteration, not a callback each.
        self._unflushed: list[FrameProtocol] = []
        self._flush_all_scheduled = False
        #: The slices of large requests served over several loop iterations: one
        #: budget of keys per iteration for all of them (``dcache.turns``).
        self.turns = Turns()
        #: The loop ``listen`` ran in: asyncio's ``get_running_loop`` makes a
        #: getpid system call each time, once per loop iteration here.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- op tables and credentials ------------------------------------------------

    def register(self, *ops: Op) -> None:
        """Serve ``ops`` with this service's methods named after them (``_get`` for GET, ``_mset`` for MSET)."""
        for op in ops:
            self.handlers[op] = getattr(self, f"_{op.name.lower()}")

    #: Ops refused to a connection routed by a ring older than ``ring_floor`` (an aux node's reads and writes).
    ring_fenced_ops: frozenset[int] = frozenset()

    def build_tables(self) -> None:
        """Build the op table of every credential level from ``handlers`` (once, at start), and its ``stale_tables`` twin."""
        for level in Credential:
            table = {op: (OPS[op].parse, handler) for op, handler in self.handlers.items() if OPS[op].credential <= level}
            self.tables[level] = table
            fenced = self.ring_fenced_ops
            self.stale_tables[level] = {op: (parse, self._refuse_stale if op in fenced else h) for op, (parse, h) in table.items()}

    def table_for(self, conn: FrameProtocol) -> dict[int, _Entry]:
        """The op table ``conn`` dispatches with: its credential's, refusing the fenced ops while it routes by an older ring."""
        if not self.tables:
            self.build_tables()
        tables = self.stale_tables if conn.routed_by < self.ring_floor else self.tables
        return tables[conn.level]

    def route_by(self, conn: FrameProtocol | None, epoch: int, floor: int) -> int:
        """EPOCH: ``conn``'s requests are routed by ring ``epoch``; raise the floor to ``floor``; return the floor.

        The check costs no request anything: a connection behind the floor
        dispatches with ``stale_tables`` (switched here, for ``conn`` and,
        when the floor rises, for every connection it leaves behind).
        """
        if conn is not None:
            conn.routed_by = epoch
            conn.retable()
        if floor > self.ring_floor:
            log.debug("requests routed by a ring older than epoch %d are refused from now on", floor)
            self.ring_floor = floor
            for c in self.state.connections:
                if c.routed_by < floor:
                    c.retable()
        return self.ring_floor

    def _refuse_stale(self, conn: FrameProtocol, rid: int, args: Any) -> Any:
        """The handler of a fenced op for a connection routed by a ring older than the floor.

        Raises:
            StaleRingError: always; nothing was applied or read.
        """
        self.stale_refused += 1
        raise StaleRingError(
            f"this request was routed by ring epoch {conn.routed_by}, and this node serves requests routed by epoch "
            f"{self.ring_floor} or later: the master reads the ring again; send the request again"
        )

    def execute(self, msg: list[Any], conn: FrameProtocol | None = None) -> Any:
        """Parse and run one request in-process, as a fully trusted caller (tools and tests).

        Goes through the same parser and handler as a request on the wire;
        returns the handler's result (``LATER`` and deferred answers go to
        ``conn``; a ``Packed`` one as the objects a peer decodes), raises its
        ``ServerError``.
        """
        if not self.tables:
            self.build_tables()
        op = msg[0]
        stale = conn is not None and conn.routed_by < self.ring_floor
        entry = (self.stale_tables if stale else self.tables)[Credential.CLUSTER].get(op)
        if entry is None:
            raise UnknownOpError(f"unknown op {op!r}")
        result = entry[1](cast(FrameProtocol, conn), msg[1], entry[0](msg, self.limits))
        return result.unpacked() if result.__class__ is Packed else result

    def initial_level(self) -> Credential:
        """The credential level a new connection starts at (see the module note)."""
        if self.auth_token is not None:
            return Credential.NONE
        return Credential.CLIENT if self.secret is not None else Credential.CLUSTER

    def check_token(self, token: str | None) -> bool:
        """Constant-time comparison of a HELLO token with the configured one."""
        if self.auth_token is None:
            return True
        if token is None:
            return False
        return hmac.compare_digest(token.encode(), self.auth_token.encode())

    def hello(self, conn: FrameProtocol, rid: int, args: tuple[int, str | None, str | None]) -> Any:
        """HELLO: check the protocol version and the token, raise the connection's credential.

        A HELLO without a token on a connection that already has one (a
        peer's health check) keeps its credential. On a node with a cluster
        secret the answer carries a fresh ``nonce`` for AUTH.
        """
        version, token, name = args
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol version {version!r} is not supported (this server speaks {PROTOCOL_VERSION})")
        if self.auth_token is not None and not (token is None and conn.level > Credential.NONE):
            self.authenticate(conn, token)
            if conn.level < Credential.CLIENT:
                conn.grant(Credential.CLIENT if self.secret is not None else Credential.CLUSTER)
        conn.client_name = name
        result = self.hello_result()
        if self.secret is not None:
            conn.nonce = result["nonce"] = new_nonce()
        return result

    def authenticate(self, conn: FrameProtocol, token: str | None) -> None:
        """Check a client token presented on ``conn`` (HELLO, or RESP's AUTH): throttled per address, failures counted.

        Raises:
            AuthError: the token is wrong, or the address made too many failed attempts lately.
        """
        self._gate(conn)
        if not self.check_token(token):
            self._failed_auth(conn, "wrong auth token")
            raise AuthError("invalid auth token")

    def auth(self, conn: FrameProtocol, rid: int, args: tuple[bytes, bytes]) -> Any:
        """AUTH: the peer proves the cluster secret over this connection's nonce; answer this node's proof."""
        client_nonce, proof = args
        secret = self.secret
        if secret is None:
            raise AuthError("this node has no cluster secret (start it with --cluster-secret-file)")
        server_nonce = conn.nonce
        if server_nonce is None:
            raise HandshakeError("send HELLO first: its answer carries the nonce to prove the cluster secret over")
        self._gate(conn)
        conn.nonce = None  # one proof per nonce
        if not proofs_match(client_proof(secret, server_nonce, client_nonce), proof):
            self._failed_auth(conn, "wrong cluster secret proof")
            raise AuthError("the proof of the cluster secret is wrong")
        conn.grant(Credential.CLUSTER)
        return server_proof(secret, client_nonce, server_nonce)

    # -- brute force --------------------------------------------------------------

    def _gate(self, conn: FrameProtocol) -> None:
        """Refuse a token or proof check from an address with too many recent failures (one per second)."""
        addr = _host_of(conn.peer)
        entry = self._auth_failures.get(addr)
        if entry is None:
            return
        failures, last_failure, last_check = entry
        now = time.monotonic()
        if now - last_failure > AUTH_PENALTY_S:
            del self._auth_failures[addr]
            return
        if failures >= AUTH_FAILURES_PER_ADDRESS:
            if now - last_check < 1.0 / AUTH_CHECKS_PER_S:
                self.auth_throttled += 1
                raise AuthError(f"too many failed attempts from {addr}: at most {AUTH_CHECKS_PER_S} per second")
            self._auth_failures[addr] = (failures, last_failure, now)

    def _failed_auth(self, conn: FrameProtocol, why: str) -> None:
        """Count a failed token or proof; close the connection after a few; remember the address."""
        self.auth_failures += 1
        conn.auth_failures += 1
        addr = _host_of(conn.peer)
        now = time.monotonic()
        failures, _, last_check = self._auth_failures.pop(addr, (0, now, 0.0))
        self._auth_failures[addr] = (failures + 1, now, last_check)
        while len(self._auth_failures) > AUTH_ADDRESSES:
            self._auth_failures.popitem(last=False)
        self._auth_failures_since_warning += 1
        if now - self._last_auth_warning >= _WARN_EVERY_S:
            log.warning(
                "authentication failed from %s: %s (%d failure(s) in the last %.0f s)",
                addr,
                why,
                self._auth_failures_since_warning,
                now - self._last_auth_warning if self._last_auth_warning else 0.0,
            )
            self._last_auth_warning = now
            self._auth_failures_since_warning = 0
        if conn.auth_failures >= AUTH_FAILURES_PER_CONNECTION:
            asyncio.get_running_loop().call_soon(conn.abort_with, AuthError("too many failed attempts on this connection"))

    def hello_result(self) -> dict[str, Any]:
        """What HELLO answers."""
        return {
            "version": PROTOCOL_VERSION,
            "node_id": self.node_id,
            "role": self.role,
            "max_frame_bytes": self.limits.max_frame_bytes,
            "max_key_bytes": self.limits.max_key_bytes,
            "max_value_bytes": self.limits.max_value_bytes,
            "max_batch_keys": self.limits.max_batch_keys,
        }

    # -- listening ----------------------------------------------------------------

    async def listen(self, host: str, port: int) -> asyncio.base_events.Server:
        """Check protected mode, build the op tables, bind the listener and start the sweeper.

        Raises:
            ConfigError: ``host`` reaches beyond this machine and the node has
                neither a client token nor a cluster secret (protected mode),
                unless ``--insecure``.
        """
        protected_mode(
            host,
            self.auth_token is not None or self.secret is not None,
            self.settings.insecure,
            self.role,
            "--auth-token or --cluster-secret-file",
        )
        if not self.tables:
            self.build_tables()
        loop = self._loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = self.protocol_factory
        if self.tls is not None and self.tls.server is not None:
            self.tls_listener = TlsListener(
                self.tls.server,
                self.protocol_factory,
                handshake_timeout=self.settings.tls_handshake_timeout,
                admit=self._admit_tls,
                spawn=self.state.spawn,
            )
            factory = self.tls_listener.acceptor
            log.info("%s %s: TLS on the listener and the links: %s", self.role, self.node_id, self.tls.describe())
        self.server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        self.state.spawn(self._sweep_loop(), "connection-sweeper")
        return self.server

    @property
    def peer_ssl(self) -> ssl.SSLContext | None:
        """The TLS context of the connections this node opens to other nodes (``None``: plain TCP)."""
        return self.tls.peer if self.tls is not None else None

    def _admit_tls(self, acceptor: TlsAcceptor) -> bool:
        """Admit a TLS connection into its handshake unless the connections and handshakes open reach ``max_connections``."""
        listener = self.tls_listener
        assert listener is not None
        if len(self.state.connections) + listener.in_progress < self.settings.max_connections:
            return True
        self._count_refusal(acceptor.peer)
        return False

    def protocol_factory(self) -> FrameProtocol:
        """A new connection protocol (pass to ``loop.create_server``)."""
        return FrameProtocol(self)

    def refuse(self, conn: FrameProtocol) -> None:
        """Refuse a connection over ``max_connections`` (counted, WARNING at most every 10 s)."""
        self._count_refusal(conn.peer)
        conn.abort_with(OverloadedError(f"too many connections: this node accepts at most {self.settings.max_connections}"))

    def _count_refusal(self, peer: Any) -> None:
        self.rejected_connections += 1
        self._refused_since_warning += 1
        now = time.monotonic()
        if now - self._last_refusal_warning >= _WARN_EVERY_S:
            log.warning(
                "connection limit reached: %d connections open (--max-connections %d); refused %d connection(s), last from %s",
                len(self.state.connections),
                self.settings.max_connections,
                self._refused_since_warning,
                peer,
            )
            self._last_refusal_warning = now
            self._refused_since_warning = 0

    def input_grew(self) -> None:
        """Partial frames exceed ``max_input_buffer``: close the connections holding the most."""
        cap = self.settings.max_input_buffer
        if self.buffered_input <= cap:
            return
        # A closed connection gives its bytes back only in connection_lost (a
        # later loop iteration): count them out here, or every holder is closed.
        total = self.buffered_input
        for conn in sorted(self.state.connections, key=lambda c: c.buffered, reverse=True):
            if total <= cap or not conn.buffered:
                break
            total -= conn.buffered
            self.input_overflows += 1
            log.warning(
                "input buffer cap reached (%d bytes of partial frames, --max-input-buffer %d): closing %s, which holds %d",
                self.buffered_input,
                cap,
                conn.peer,
                conn.buffered,
            )
            conn.abort_with(OverloadedError("this node's input buffer is full: frame refused, try again later"))

    def output_grew(self) -> None:
        """Answers held for clients that do not read exceed ``max_output_buffer``: cut off the connections holding the most.

        The figures are refreshed first (a client may have read some since
        they were counted); a connection cut off drops its answers at once.
        """
        cap = self.settings.max_output_buffer
        held = [conn for conn in self.state.connections if conn.unsent]
        for conn in held:
            conn._count_output_quietly()
        if self.buffered_output <= cap:
            return
        for conn in sorted(held, key=lambda c: c.unsent, reverse=True):
            if self.buffered_output <= cap or not conn.unsent:
                break
            self.output_overflows += 1
            log.warning(
                "output buffer cap reached (%d bytes of answers held for clients that do not read them, "
                "--max-output-buffer %d): closing %s, which holds %d and reads none of it",
                self.buffered_output,
                cap,
                conn.peer,
                conn.unsent,
            )
            conn.cut_off()

    async def _sweep_loop(self) -> None:
        """Close connections past ``frame_timeout`` or ``idle_timeout`` (checked every quarter of the shorter)."""
        settings = self.settings
        timeouts = [t for t in (settings.frame_timeout, settings.idle_timeout) if t > 0]
        if not timeouts:
            return
        interval = min(1.0, min(timeouts) / 4)
        while True:
            await asyncio.sleep(interval)
            self.now = now = time.monotonic()
            try:
                self.sweep(now)
            except Exception:  # pragma: no cover - a bug here must not stop the loop
                log.exception("connection sweep failed")

    def sweep(self, now: float) -> None:
        """Apply the time bounds to every connection at monotonic time ``now``."""
        frame_timeout = self.settings.frame_timeout
        idle_timeout = self.settings.idle_timeout
        for conn in list(self.state.connections):
            if frame_timeout > 0 and conn.partial_since and now - conn.partial_since > frame_timeout:
                self.frame_timeouts += 1
                log.info("closing connection from %s: a frame was not completed within %.1f s", conn.peer, frame_timeout)
                conn.abort_with(RemoteProtocolError(f"frame not completed within {frame_timeout} s (--frame-timeout)"))
            elif idle_timeout > 0 and not conn.in_flight and now - conn.last_active > idle_timeout:
                self.idle_timeouts += 1
                log.debug("closing connection from %s: idle for %.1f s", conn.peer, idle_timeout)
                conn.close()

    # -- answers ------------------------------------------------------------------

    def queue_flush(self, conn: FrameProtocol) -> None:
        """Have ``conn``'s queued answers written by the next ``flush_all``.

        ``flush_all`` runs at the end of this loop iteration at the latest;
        a master also calls it as soon as an aux node's answers are handled.
        """
        self._unflushed.append(conn)
        if not self._flush_all_scheduled:
            self._flush_all_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush_all)

    def flush_all(self) -> None:
        """Write the queued answers of every connection (one write each)."""
        self._flush_all_scheduled = False
        conns = self._unflushed
        if conns:
            self._unflushed = []
            for conn in conns:
                conn._flush()

    @property
    def in_flight(self) -> int:
        """Answers owed across every connection (requests answered later)."""
        return sum(conn.in_flight for conn in self.state.connections)

    def check_drained(self) -> None:
        """During ``shutdown``: wake it once no connection owes an answer (called as answers leave)."""
        if self._drained is not None and not self.in_flight:
            self._drained.set()

    # -- shutdown ------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), close connections, cancel tasks."""
        if self.server is not None:
            self.server.close()
        if self.resp_server is not None:
            self.resp_server.close()
        if self.in_flight:
            self._drained = asyncio.Event()
            for conn in self.state.connections:
                conn.watch = True
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                log.warning("%d request(s) still in flight after %.1f s; closing anyway", self.in_flight, grace)
        for conn in list(self.state.connections):
            conn.close()
        for task in list(self.state.tasks):
            task.cancel()
        if self.state.tasks:
            await asyncio.wait(self.state.tasks, timeout=max(grace, 1.0))
        for server in (self.server, self.resp_server):
            if server is None:
                continue
            try:
                await asyncio.wait_for(server.wait_closed(), max(grace, 1.0))
            except TimeoutError:  # pragma: no cover - a transport that never reports its close
                log.warning("the listener did not report every connection closed")

    # -- operator views ---------------------------------------------------------------

    async def flush_keys(self) -> int:
        """Remove every key this node serves (RESP's FLUSHDB, when ``--resp-allow-flush`` allows it); return how many.

        Roles override it; the shell itself holds no keys.
        """
        raise UnknownOpError(f"a {self.role} holds no keys to flush")

    async def scan_keys(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """One page of RESP's SCAN: ``(next_cursor, keys)``, ``next_cursor`` 0 when the scan is complete.

        Roles override it; the shell itself holds no keys.
        """
        raise UnknownOpError(f"a {self.role} holds no keys to scan")

    async def count_keys(self) -> int:
        """The number of keys this node serves (RESP's DBSIZE).

        Roles override it; the shell itself holds no keys.
        """
        raise UnknownOpError(f"a {self.role} holds no keys to count")

    def connection_stats(self) -> dict[str, Any]:
        """The shell's counters, as STATS shows them."""
        return {
            "connections": len(self.state.connections),
            "total_connections": self.state.total_connections,
            "requests": self.requests_total,
            "errors": self.errors_total,
            "protocol_errors": self.protocol_errors_total,
            "rejected_connections": self.rejected_connections,
            "idle_timeouts": self.idle_timeouts,
            "frame_timeouts": self.frame_timeouts,
            "input_overflows": self.input_overflows,
            "output_overflows": self.output_overflows,
            "versions_refused": self.versions_refused,
            "large_requests_waiting": self.turns.waiting,
            "turn_slices": self.turns.slices,
            "turn_most_keys": self.turns.most_keys,
            "auth_failures": self.auth_failures,
            "auth_throttled": self.auth_throttled,
            "buffered_input_bytes": self.buffered_input,
            "buffered_output_bytes": self.buffered_output,
            **self.tls_stats(),
        }

    def tls_stats(self) -> dict[str, Any]:
        """TLS's part of STATS: ``tls`` (whether the listener serves TLS); when it does, its handshakes and the reloads."""
        listener = self.tls_listener
        if listener is None or self.tls is None:
            return {"tls": False}
        return {
            "tls": True,
            "tls_handshakes": listener.handshakes,
            "tls_handshakes_in_progress": listener.in_progress,
            **{f"tls_handshakes_{reason}": n for reason, n in listener.failures.items()},
            "tls_reloads": self.tls.reloads,
            "tls_reload_failures": self.tls.reload_failures,
        }


#: ``FrameProtocol.routed_by`` of a connection that never sent EPOCH (a client, a master from before it):
#: newer than any epoch, so no floor refuses its writes.
NOT_ROUTED = 1 << 64


class FrameProtocol(asyncio.Protocol):
    """One client connection: frames in, handler answers out."""

    __slots__ = (
        "_service",
        "_gate_runs",
        "_decoder",
        "_limits",
        "_max_answer",
        "_table",
        "_transport",
        "_pending_out",
        "_flush_scheduled",
        "_closed",
        "_paused",
        "_throttled",
        "_routing",
        "_backlog",
        "unsent",
        "_samples",
        "level",
        "buffered",
        "partial_since",
        "last_active",
        "in_flight",
        "peer",
        "client_name",
        "_closing_error",
        "watch",
        "nonce",
        "auth_failures",
        "routed_by",
    )

    def __init__(self, service: Service) -> None:
        self._service = service
        self._limits = service.limits
        limits = service.limits
        self._decoder: FrameDecoder | None = FrameDecoder(limits.max_frame_bytes, max(limits.max_batch_keys, MAX_ARRAY_ITEMS))
        #: Answers longer than this become FRAME_TOO_LARGE errors: the peer would refuse the frame.
        self._max_answer = service.limits.max_frame_bytes
        self.level = Credential.NONE
        self._table: dict[int, _Entry] = {}
        self._transport: asyncio.Transport | None = None
        self._pending_out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self._paused = False  # by the transport's write buffer
        self._throttled = False  # by answers owed
        self._routing = False  # by one request routed over several loop iterations (``hold_input``)
        #: Frames read but not run yet: they wait while the connection is stopped (paused or throttled).
        self._backlog: list[Any] = []
        #: Requests the ring gate held (``RequestGate.open``) that wait behind one of this connection's
        #: that is routed over several loop iterations: they run, in order, when it is routed.
        self._gate_runs: list[tuple[int, int, Handler, Any]] = []
        #: Bytes of answers the transport holds while writing is paused (counted in the service's ``buffered_output``).
        self.unsent = 0
        #: Sampled requests answered later: request id -> (op, start time).
        self._samples: dict[int, tuple[int, float]] = {}
        #: Bytes of a partial frame this connection holds (counted in the service's ``buffered_input``).
        self.buffered = 0
        #: ``Service.now`` when the current partial frame started arriving (0: none).
        self.partial_since = 0.0
        #: ``Service.now`` of the last bytes received.
        self.last_active = service.now
        #: Answers this connection is owed (requests answered later).
        self.in_flight = 0
        self.peer: Any = None
        self.client_name: str | None = None
        #: A protocol error met while answers were still owed: sent once they are.
        self._closing_error: RemoteProtocolError | None = None
        #: Whether an answer leaving must be looked at (throttled, closing, or the node shutting down).
        self.watch = False
        #: The nonce of the last HELLO answer, until an AUTH uses it.
        self.nonce: bytes | None = None
        self.auth_failures = 0
        #: The ring epoch a master said this connection's requests are routed by (EPOCH); ``NOT_ROUTED``: never said.
        self.routed_by = NOT_ROUTED
        self.grant(service.initial_level())

    def grant(self, level: Credential) -> None:
        """Let this connection send the ops of credential ``level`` (and below)."""
        service = self._service
        if not service.tables:
            service.build_tables()
        self.level = level
        self._table = service.table_for(self)
        if self._decoder is not None:
            self._decoder.max_frame_bytes = self._limits.max_frame_bytes if level else MAX_HELLO_FRAME_BYTES
            self._decoder.one_frame = not level  # before auth: one frame at a time (the HELLO sets the next one's limit)

    # -- asyncio callbacks -------------------------------------------------

    def retable(self) -> None:
        """Dispatch with the table the service gives this connection now (its ring epoch or the floor changed)."""
        self._table = self._service.table_for(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        service = self._service
        state = service.state
        state.total_connections += 1
        if len(state.connections) >= service.settings.max_connections:
            service.refuse(self)
            return
        nodelay(transport)
        state.connections.add(self)
        self.last_active = service.now

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._service.state.connections.discard(self)
        self._release_input()
        self._release_output()
        self._transport = None
        self._pending_out.clear()

    def _release_input(self) -> None:
        """Drop the decoder and its buffer now (the connection reads no more requests)."""
        if self.buffered:
            self._service.buffered_input -= self.buffered
            self.buffered = 0
        self._decoder = None  # its buffer goes now, even if requests in flight still name this connection
        self._backlog = []

    def pause_writing(self) -> None:
        """The client does not read as fast as it is answered: stop reading and running its requests; count what it holds."""
        self._paused = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()
            self._count_output()

    def resume_writing(self) -> None:
        """The client read its answers: run the requests held meanwhile (in the next loop iteration), then read again."""
        self._paused = False
        self._release_output()
        if self._transport is not None and not self._closed:
            (self._service._loop or asyncio.get_running_loop()).call_soon(self._go_on)

    def _count_output(self) -> None:
        """While writing is paused: count the bytes the transport holds in the service's total (``--max-output-buffer``)."""
        transport = self._transport
        if transport is None or self._closed:
            return
        size = transport.get_write_buffer_size()
        service = self._service
        service.buffered_output += size - self.unsent
        grew = size > self.unsent
        self.unsent = size
        if grew and service.buffered_output > service.settings.max_output_buffer:
            service.output_grew()

    def _count_output_quietly(self) -> None:
        """Refresh this connection's count of bytes held (no check against the cap)."""
        if self._transport is not None and not self._closed:
            size = self._transport.get_write_buffer_size()
            self._service.buffered_output += size - self.unsent
            self.unsent = size

    def _release_output(self) -> None:
        if self.unsent:
            self._service.buffered_output -= self.unsent
            self.unsent = 0

    def cut_off(self) -> None:
        """Close a connection whose client does not read its answers, dropping them (``--max-output-buffer``).

        An error frame would wait behind the answers the client does not
        read, so none is sent: the transport is aborted, which frees its
        buffer now; the reason is logged and counted (``output_overflows``).
        """
        if self._closed:
            return
        self._release_output()
        self._closed = True
        self._release_input()
        self._pending_out.clear()
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._closing_error is not None:
            return
        t0 = perf_counter()
        decoder = self._decoder
        assert decoder is not None
        service = self._service
        one_frame = decoder.one_frame
        if self._backlog:  # frames held while the connection was stopped go first (``_go_on``)
            msgs = self._backlog
            self._backlog = []
            if data:
                msgs += self._feed_more(decoder, data)
        else:
            try:
                msgs = decoder.feed(data)
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
        self.last_active = now = service.now
        buffered = decoder.buffered
        if buffered or self.buffered:
            self._account(buffered, now, bool(msgs))
            if self._closed:
                return
        if msgs and (self._paused or self._throttled or self._routing):
            self._backlog = msgs  # the client does not read, owes too many answers, or a request is still routed: wait
            msgs = []
        if msgs:
            # The one dispatch path (see the class note): parse with the op's
            # parser, call the handler, answer now or owe the answer. One
            # request in ``sample_every`` (the first of a batch, when the
            # countdown runs out) is timed: answered now, when its answer is
            # built; answered later, when ``reply`` sends it. Every
            # ``PUSH_BYTES`` of answers go to the transport, and the batch
            # stops once it pauses writing or too many answers are owed: the
            # frames not run yet wait in ``_backlog``.
            n = len(msgs)
            service.requests_total += n
            service.sample_countdown -= n
            t1 = 0.0
            if service.sample_countdown <= 0:
                service.sample_countdown += service.sample_every
                t1 = perf_counter()
            table = self._table
            limits = self._limits
            op_requests = service.op_requests
            out: list[bytes] = []
            append = out.append
            size = 0
            push_bytes = PUSH_BYTES
            frames = iter(msgs)
            for msg in frames:
                try:
                    try:
                        op = msg[0]
                        if op.__class__ is not int or msg.__class__ is not list:  # True == 1.0 == 1 would find op 1
                            raise KeyError(op)
                        parse, handler = table[op]
                    except (KeyError, TypeError, IndexError):
                        raise _refusal(self, msg) from None
                    op_requests[op] += 1
                    rid = msg[1]
                    if rid.__class__ is not int or not 0 < rid <= UINT64_MAX:
                        raise BadArgumentsError("request_id must be an integer in 1 .. 2**64-1")
                    result = handler(self, rid, parse(msg, limits))
                except ServerError as exc:
                    body = self._failed(msg, exc.code, exc.message)
                except Exception as exc:
                    body = self._failed_internally(msg, exc)
                else:
                    if op == _HELLO or op == _EPOCH:
                        table = self._table  # it may have raised the credential or changed the ring: pipelined requests use the new table
                    if service.hold is not None and result is not LATER and result.__class__ is not _Deferred:
                        result = service.hold(self, rid, op, result)  # it changed a key another node holds a copy of
                    if result is LATER or result.__class__ is _Deferred:
                        self.in_flight += 1  # an answer owed (see _owe_sampled and the throttle)
                        if t1:
                            self._owe_sampled(rid, op, t1)
                        if result is not LATER:
                            self._defer(rid, result, op)
                        t1 = 0.0
                        if self.in_flight >= MAX_IN_FLIGHT and not self._throttled:
                            self._throttle()
                            break
                        if self._routing:  # routed over the next loop iterations: the frames after it wait
                            break
                        continue
                    try:
                        body = pack([rid, _OK, result]) if result.__class__ is not Packed else pack_answer(rid, _OK, result)
                    except Exception as exc:  # an unencodable result is our bug: answer, keep serving
                        log.error("cannot encode the answer to op %r: %s", op, exc)
                        body = pack([rid, int(Status.INTERNAL), "internal error: unencodable result"])
                    if len(body) > self._max_answer:
                        body = self._too_large(rid, len(body), op)
                    elif t1:
                        service.op_latency[op].observe(perf_counter() - t1)
                t1 = 0.0
                length = len(body)
                append(_header(length))
                append(body)
                size += length
                if size >= push_bytes:
                    self._write_batch(out)
                    size = 0
                    if self._paused or self._closed:
                        break
            else:
                frames = _DONE
            if frames is not _DONE:  # stopped: the rest waits, counted when it runs
                rest = list(frames)
                service.requests_total -= len(rest)
                if not self._closed:  # (cut off by the output cap: dropped)
                    self._backlog = rest
            if out and not self._closed:
                if self._pending_out:
                    self._pending_out.extend(out)
                elif self._transport is not None:
                    self._transport.write(b"".join(out))
        if decoder.error is not None:
            if not self._backlog:  # after the frames that came before it
                self._protocol_error(decoder.error)
        elif one_frame and msgs and decoder.buffered and not self._backlog:
            asyncio.get_running_loop().call_soon(self.data_received, b"")  # the next frame, in the next iteration
        service.batch_latency.observe(perf_counter() - t0)

    def _feed_more(self, decoder: FrameDecoder, data: bytes) -> list[Any]:
        """The frames ``data`` completes behind a backlog (a protocol error waits in the decoder until the backlog ran)."""
        try:
            return decoder.feed(data)
        except RemoteProtocolError:
            return []

    def _write_batch(self, out: list[bytes]) -> None:
        """Hand the answers built so far to the transport now: it calls ``pause_writing`` if the client does not read them."""
        if self._pending_out:
            self._pending_out.extend(out)
            self._flush()
        elif self._transport is not None and not self._closed:
            self._transport.writelines(out)  # no copy of a large answer
        out.clear()

    def _go_on(self) -> None:
        """Run the frames held while the connection was stopped (the client did not read, or owed too many answers), then read again."""
        if self._closed or self._paused or self._throttled or self._routing:
            return
        if self._gate_runs and not self._run_gate_held():
            return  # one of them is routed over several iterations: the rest, and the backlog, wait for it
        if self._backlog:
            self.data_received(b"")
        elif self._decoder is not None and self._decoder.one_frame and self._decoder.buffered:
            self.data_received(b"")  # a frame left in the decoder before authentication
        if (
            not (self._closed or self._paused or self._throttled or self._routing)
            and self._closing_error is None
            and self._transport is not None
        ):
            self._transport.resume_reading()

    # -- helpers of the dispatch ------------------------------------------------------

    def _owe_sampled(self, rid: int, op: int, t0: float) -> None:
        """A sampled request will be answered later: its latency is recorded when ``reply`` sends it."""
        if len(self._samples) >= 1024:  # answers that never came (connection lost upstream...)
            self._samples.clear()
        self._samples[rid] = (op, t0)

    def _failed(self, msg: Any, code: int, message: str) -> bytes:
        """Count a request answered with an error (under its op, or ``UNKNOWN_OP``) and build the answer."""
        service = self._service
        service.errors_total += 1
        if code == _CLOCK_SKEW:
            service.versions_refused += 1
        rid = CONNECTION_REQUEST_ID
        op = UNKNOWN_OP
        if msg.__class__ is list and len(msg) >= 2:
            if msg[0].__class__ is int and msg[0] in self._table:
                op = msg[0]
            if msg[1].__class__ is int and 0 < msg[1] <= UINT64_MAX:
                rid = msg[1]
        if op == UNKNOWN_OP:
            service.op_requests[UNKNOWN_OP] += 1
        service.op_errors[op] += 1
        return pack([rid, int(code), message])

    def _failed_internally(self, msg: Any, exc: Exception) -> bytes:
        if msg.__class__ is not list or len(msg) < 2:
            return self._failed(msg, Status.BAD_ARGUMENTS, "a request is an array [op, request_id, *args]")
        log.exception("internal error handling op %r from %s", msg[0], self.peer)
        return self._failed(msg, Status.INTERNAL, f"internal error: {exc.__class__.__name__}")

    def _too_large(self, rid: int, size: int, op: int) -> bytes:
        """The error that replaces an answer the peer would refuse (the connection stays open); counted under ``op``."""
        service = self._service
        service.errors_total += 1
        service.op_errors[op] += 1
        return pack(
            [
                rid,
                int(Status.FRAME_TOO_LARGE),
                f"answer of {size} bytes exceeds the {self._max_answer}-byte frame limit: ask for fewer keys at once",
            ]
        )

    # -- bounds -------------------------------------------------------------------

    def _account(self, buffered: int, now: float, completed: bool) -> None:
        """Track this connection's partial frame in the service's input total and frame clock."""
        service = self._service
        service.buffered_input += buffered - self.buffered
        grew = buffered > self.buffered
        self.buffered = buffered
        if not buffered:
            self.partial_since = 0.0
        elif completed or not self.partial_since:
            self.partial_since = now  # a new frame started arriving
        if grew and service.buffered_input > service.settings.max_input_buffer:
            service.input_grew()

    def _throttle(self) -> None:
        self._throttled = True
        self.watch = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def hold_input(self) -> None:
        """The request being run is routed over several loop iterations (a large MGET or MSET on a master): run no later request until ``release_input``.

        Its keys are routed a slice per iteration so that other clients are
        served between slices; the requests this client sent after it wait
        (reading stops), so none of them reaches an aux node before the
        request's last key: a GET pipelined after an MSET still reads the
        MSET's value.
        """
        self._routing = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def may_take_turns(self, rid: int) -> bool:
        """Whether request ``rid``, being run, may be served over several loop iterations (``hold_input``).

        Every native request may; RESP says which of its commands may not
        (``RespProtocol.may_take_turns``: the steps of an aux node's EXEC run
        within one iteration).
        """
        return True

    def release_input(self) -> None:
        """Every key of the request that called ``hold_input`` is routed: run the requests held meanwhile (next iteration), then read again."""
        if not self._routing:
            return
        self._routing = False
        if self._transport is not None and not self._closed:
            (self._service._loop or asyncio.get_running_loop()).call_soon(self._go_on)
        elif self._gate_runs:
            self._run_gate_held()  # the connection is gone: each is answered UNAVAILABLE, so no answer stays owed

    def _run_gate_held(self) -> bool:
        """Run the requests the ring gate held for this connection, in order, until one is routed over several iterations; whether all ran."""
        runs = self._gate_runs
        while runs:
            if self._routing:
                return False
            rid, op, handler, args = runs.pop(0)
            _run_held(self, rid, op, handler, args)
        return not self._routing

    def _after_answer(self) -> None:
        """An owed answer left while someone watches the count (throttle, a pending close, shutdown)."""
        if self._closing_error is not None and not self.in_flight:
            self._finish_close()
        if self._throttled and self.in_flight <= MAX_IN_FLIGHT // 2:
            self._throttled = False
            if self._transport is not None and not self._closed and not self._paused:
                asyncio.get_running_loop().call_soon(self._go_on)  # the frames held by the throttle, then read again
        service = self._service
        if service._drained is not None:
            service.check_drained()
        self.watch = self._throttled or self._closing_error is not None or service._drained is not None

    # -- answers later ---------------------------------------------------------------

    def send(self, chunks: list[bytes]) -> None:
        """Queue frames; they leave with the service's next ``flush_all``."""
        if self._closed or self._transport is None:
            return
        self._pending_out.extend(chunks)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._service.queue_flush(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._pending_out
        if out and not self._closed and self._transport is not None:
            if len(out) == 1:
                self._transport.write(out[0])
            else:
                self._transport.writelines(out)  # uvloop: one writev, no join copy
            if self._paused:  # the client does not keep up: what it holds grew
                self._count_output()
        out.clear()

    def reply(self, rid: int, status: int, result: Any, op: int = UNKNOWN_OP) -> None:
        """Answer request ``rid`` that a handler answered ``LATER``; ``op`` is its op, for the error counts."""
        self.in_flight -= 1
        if self.watch:
            self._after_answer()
        if self._samples:
            self._sampled_done(rid)
        if status:
            service = self._service
            service.errors_total += 1
            service.op_errors[op] += 1
            if status == _CLOCK_SKEW:
                service.versions_refused += 1
            body = pack([rid, status, result])
        else:
            try:
                body = pack([rid, status, result]) if result.__class__ is not Packed else pack_answer(rid, status, result)
            except Exception as exc:  # an unencodable result is our bug: answer, keep serving
                log.error("cannot encode the answer to request %s: %s", rid, exc)
                body = pack([rid, int(Status.INTERNAL), "internal error: unencodable result"])
            else:
                if len(body) > self._max_answer:
                    body = self._too_large(rid, len(body), op)
        if self._closed or self._transport is None:
            return
        n = len(body)
        if n <= ONE_CHUNK_BYTES:  # queue_frame, inlined: this runs once per answer a master sends
            self._pending_out.append(_header(n) + body)
        else:
            self._pending_out += (_header(n), body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._service.queue_flush(self)

    def _sampled_done(self, rid: int) -> None:
        sample = self._samples.pop(rid, None)
        if sample is not None:
            self._service.op_latency[sample[0]].observe(perf_counter() - sample[1])

    def _defer(self, rid: int, deferred: _Deferred, op: int) -> None:
        task = asyncio.ensure_future(deferred.awaitable)
        task.add_done_callback(lambda t: self._deferred_done(rid, t, op))

    def _deferred_done(self, rid: int, task: asyncio.Future[Any], op: int) -> None:
        if task.cancelled():  # the node is shutting down
            self.reply(rid, int(Status.UNAVAILABLE), "request cancelled: the node is shutting down", op)
            return
        exc = task.exception()
        if exc is None:
            self.reply(rid, _OK, task.result(), op)
        elif isinstance(exc, ServerError):
            self.reply(rid, exc.code, exc.message, op)
        else:
            log.error("internal error for request %s from %s", rid, self.peer, exc_info=exc)
            self.reply(rid, int(Status.INTERNAL), f"internal error: {exc.__class__.__name__}", op)

    # -- closing -------------------------------------------------------------------

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        """Stop reading; once the answers owed for earlier requests are sent (bounded), send the error frame and close."""
        self._service.protocol_errors_total += 1
        log.info("closing connection from %s: %s", self.peer, exc)
        if self.in_flight and self._transport is not None and not self._closed:
            self._closing_error = exc
            self.watch = True
            self._transport.pause_reading()
            asyncio.get_running_loop().call_later(CLOSE_DRAIN_S, self._finish_close)
            return
        self.abort_with(exc)

    def _finish_close(self) -> None:
        exc = self._closing_error
        if exc is not None and not self._closed:
            self._flush()
            self.abort_with(exc)

    def abort_with(self, exc: RemoteProtocolError | ServerError) -> None:
        """Send a connection-level error frame ``[0, status, message]`` after what is queued, then close.

        The write side is shut first (when the transport can) and the socket
        closed a moment later, so the peer reads the frame before the close:
        closing with unread input would reset the connection and lose it.
        """
        if self._closed:
            return
        self._pending_out.append(self.connection_error(exc))
        self._release_input()
        transport = self._transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        self._closed = True
        transport.write(b"".join(self._pending_out))
        self._pending_out.clear()
        transport.write_eof()
        asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.close)

    def connection_error(self, exc: RemoteProtocolError | ServerError) -> bytes:
        """The bytes of a connection-level error: the frame ``[0, status, message]`` (RESP connections send an error line)."""
        status = exc.status if isinstance(exc, RemoteProtocolError) else exc.code
        message = str(exc) if isinstance(exc, RemoteProtocolError) else exc.message
        body = pack([CONNECTION_REQUEST_ID, int(status), message])
        return _header(len(body)) + body

    @property
    def is_closing(self) -> bool:
        """Whether the connection is closed or closing."""
        return self._closed or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Flush what is queued and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is not None:
            if self._pending_out:
                transport.write(b"".join(self._pending_out))
                self._pending_out.clear()
            transport.close()


def _host_of(peer: Any) -> str:
    """The address part of a peer name (``(host, port, ...)`` for TCP)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _refusal(conn: FrameProtocol, msg: Any) -> ServerError:
    """Why a request found no entry in its connection's op table."""
    if msg.__class__ is not list or len(msg) < 2:
        return BadArgumentsError("a request is an array [op, request_id, *args]")
    op = msg[0]
    if op.__class__ is not int:
        return BadArgumentsError("a request is an array [op: int, request_id: int, *args]")
    if op in conn._service.handlers:
        if conn.level >= Credential.CLIENT:
            return AuthError(f"{OPS[op].name} is a cluster op: prove the cluster secret with AUTH first (a client token never grants it)")
        return AuthError("authentication required: send HELLO with the auth token first")
    return UnknownOpError(f"unknown op {op!r}")


def check_answer_size(values: list[Any], limit: int) -> None:
    """Refuse (``FRAME_TOO_LARGE``) a list of values whose answer would exceed ``limit`` bytes, before it is packed.

    Packing first would allocate the whole answer (an MGET of many large
    values) only to refuse it.
    """
    size = 0
    for v in values:
        if v is not None:
            size += len(v)
    if size > limit:
        raise answer_too_large(len(values), limit)


def answer_too_large(keys: int, limit: int) -> FrameTooLargeError:
    """The error of a multi-key read whose values exceed ``limit`` bytes (``check_answer_size``)."""
    return FrameTooLargeError(f"the values of these {keys} keys exceed the {limit}-byte frame limit: ask for fewer keys at once")


class _Later:
    """The type of ``LATER``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


#: A handler returns this when it will answer through ``FrameProtocol.reply``.
LATER: Any = _Later()


class _Deferred:
    """Marks a handler result that completes later (see ``deferred``)."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


def deferred(awaitable: Awaitable[Any]) -> Any:
    """Wrap an awaitable a handler returns so the answer is sent when it completes."""
    return _Deferred(awaitable)


def ready_line(server: asyncio.base_events.Server) -> str:
    """The ``READY host:port`` line printed once a server listens."""
    host, port = server.sockets[0].getsockname()[:2]
    return f"READY {format_address(host, port)}"


class RequestGate:
    """Data requests held until a node can serve them: a master before its first ring.

    ``close`` puts a stand-in in front of the handlers of ``ops`` in every op
    table of the service (both front doors read those tables), so the
    dispatch's hot path is unchanged and costs nothing once the gate opens.
    The stand-in answers ``LATER`` and keeps the request (connection, id,
    parsed arguments, handler) in arrival order. ``open`` puts the handlers
    back and runs the held requests through them in that order, as if they
    had just arrived; other ops (HELLO, PING, STATS, RING, JOIN, SYNC...)
    never wait.

    Bounds (``dcache.protocol.limits``): a request waits at most ``wait_s``
    (``RING_WAIT_S``), then is answered ``UNAVAILABLE`` with ``why``; at most
    ``MAX_RING_WAITERS`` requests, and ``--max-input-buffer`` bytes of their
    keys and values, wait at once: one more is answered ``UNAVAILABLE`` at
    once. A held request is an answer its connection owes, so the
    per-connection bound on answers owed (``MAX_IN_FLIGHT``) stops reading a
    client that sends more. ``wait_until`` moves that bound later, once,
    for a node that knows when it can serve (a restarted coordinator
    gathering its aux nodes' re-announcements).
    """

    __slots__ = (
        "_service",
        "_ops",
        "_wait_s",
        "_max_waiters",
        "_why",
        "_held",
        "_bytes",
        "_timer",
        "_saved",
        "_stopping",
        "_opened",
        "_awaiting",
        "_until",
        "held_total",
        "expired_total",
    )

    def __init__(self, service: Service, ops: Iterable[int], wait_s: float, max_waiters: int, why: Callable[[], str]) -> None:
        """``why()`` is the message of the ``UNAVAILABLE`` answers (called when one is sent)."""
        self._service = service
        self._ops = tuple(ops)
        self._wait_s = wait_s
        self._max_waiters = max_waiters
        self._why = why
        #: (deadline, connection, request id, op, handler, parsed args, bytes), oldest first.
        self._held: list[tuple[float, FrameProtocol, int, int, Handler, Any, int]] = []
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        #: The entries the stand-ins replaced, by (table, op); empty while the gate is open.
        self._saved: dict[tuple[Credential, int], _Entry] = {}
        #: Set by ``fail_all``: why every request of the gate's ops is refused from then on.
        self._stopping: str | None = None
        #: Resolved when the gate opens or fails (``ready``'s waiters), made by the first of them.
        self._opened: asyncio.Future[None] | None = None
        #: Coroutines in ``ready`` now (they count against ``max_waiters`` with the held requests).
        self._awaiting = 0
        #: Loop time before which no request's wait ends (``wait_until``; 0: each waits ``wait_s``).
        self._until = 0.0
        #: Requests held since start; of them, answered ``UNAVAILABLE`` after ``wait_s`` or over a bound.
        self.held_total = 0
        self.expired_total = 0

    @property
    def closed(self) -> bool:
        """Whether requests of the gate's ops wait now."""
        return bool(self._saved)

    @property
    def waiting(self) -> int:
        """Requests held now."""
        return len(self._held)

    def close(self) -> None:
        """Hold the gate's ops from now on (the service's op tables must be built)."""
        service = self._service
        if not service.tables:
            service.build_tables()
        for level, table in service.tables.items():
            for op in self._ops:
                entry = table.get(op)
                if entry is not None and (level, op) not in self._saved:
                    self._saved[level, op] = entry
                    table[op] = (entry[0], self._stand_in(op, entry[1]))

    def wait_until(self, until: float) -> None:
        """Let every request held now or from now on wait until loop time ``until``, if that is past its own bound.

        The node knows when it can serve: its requests wait for that rather
        than being refused sooner. The number of requests and bytes held
        keeps its bound; so does each wait (``until``).
        """
        if until <= self._until:
            return
        self._until = until
        held = self._held
        if held:  # the deadlines stay in order: each becomes the later of itself and ``until``
            self._held = [(d if d > until else until, *rest) for d, *rest in held]
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(self._held[0][0], self._expire)

    async def ready(self) -> None:
        """Wait until the gate opens, under the same bounds as a held request.

        For work that does not go through the op tables (RESP's SCAN and
        FLUSHDB on a master: a ringless master would scan nothing and flush
        nothing, and say so as a success).

        Raises:
            UnavailableError: the gate stayed closed ``wait_s``, too many wait
                already, or the node is stopping.
        """
        if self._stopping is not None:
            raise UnavailableError(self._stopping)
        if not self._saved:
            return
        if len(self._held) + self._awaiting >= self._max_waiters:
            self.expired_total += 1
            raise UnavailableError(f"{self._why()}; {len(self._held) + self._awaiting} requests already wait for it")
        if self._opened is None:
            self._opened = asyncio.get_running_loop().create_future()
        self.held_total += 1
        self._awaiting += 1
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(asyncio.shield(self._opened), max(self._wait_s, self._until - loop.time()))
        except TimeoutError:
            self.expired_total += 1
            raise UnavailableError(self._why()) from None
        finally:
            self._awaiting -= 1
        if self._stopping is not None:
            raise UnavailableError(self._stopping)

    def _wake(self) -> None:
        """Let ``ready``'s waiters go on (the gate opened or failed)."""
        opened, self._opened = self._opened, None
        if opened is not None and not opened.done():
            opened.set_result(None)

    def _stand_in(self, op: int, handler: Handler) -> Handler:
        def hold(conn: FrameProtocol, rid: int, args: Any) -> Any:
            return self._hold(conn, rid, op, handler, args)

        return hold

    def _hold(self, conn: FrameProtocol, rid: int, op: int, handler: Handler, args: Any) -> Any:
        if self._stopping is not None:
            raise UnavailableError(self._stopping)
        size = _payload_bytes(args)
        if len(self._held) >= self._max_waiters or self._bytes + size > self._service.settings.max_input_buffer:
            self.expired_total += 1
            raise UnavailableError(f"{self._why()}; {len(self._held)} requests ({self._bytes} bytes) already wait for it")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        if deadline < self._until:
            deadline = self._until
        self._held.append((deadline, conn, rid, op, handler, args, size))
        self._bytes += size
        self.held_total += 1
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return LATER

    def _expire(self) -> None:
        """Answer ``UNAVAILABLE`` to the requests that waited ``wait_s``; wake again for the next one."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        held = self._held
        n = 0
        while n < len(held) and held[n][0] <= now:
            n += 1
        expired, self._held = held[:n], held[n:]
        if expired:
            why = self._why()
            for _, conn, rid, op, _, _, size in expired:
                self._bytes -= size
                conn.reply(rid, int(Status.UNAVAILABLE), why, op)
            self.expired_total += len(expired)
            log.warning("%d request(s) waited their bound and were answered UNAVAILABLE: %s", len(expired), why)
        if self._held:
            self._timer = asyncio.get_running_loop().call_at(self._held[0][0], self._expire)

    def open(self) -> None:
        """Serve the gate's ops again, and run the requests held meanwhile, oldest first."""
        if not self._saved:
            return
        for (level, op), entry in self._saved.items():
            self._service.tables[level][op] = entry
        self._saved.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        self._bytes = 0
        self._wake()
        if held:
            log.info("serving %d request(s) held until now", len(held))
        for _, conn, rid, op, handler, args, _ in held:
            if conn._routing or conn._gate_runs:  # an earlier one of its requests is routed over several iterations
                conn._gate_runs.append((rid, op, handler, args))  # a GET behind an MSET reads what the MSET wrote
            else:
                _run_held(conn, rid, op, handler, args)

    def fail_all(self, why: str) -> None:
        """Answer every held request ``UNAVAILABLE`` with ``why``, and refuse the gate's ops so from now on (the node stops)."""
        self._stopping = why
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        self._bytes = 0
        self._wake()
        for _, conn, rid, op, _, _, _ in held:
            conn.reply(rid, int(Status.UNAVAILABLE), why, op)


def _run_held(conn: FrameProtocol, rid: int, op: int, handler: Handler, args: Any) -> None:
    """Run a held request through its handler, and answer it as the dispatch would."""
    if conn.is_closing:
        conn.reply(rid, int(Status.UNAVAILABLE), "connection closed", op)  # balances the count of answers owed
        return
    try:
        result = handler(conn, rid, args)
    except ServerError as exc:
        conn.reply(rid, exc.code, exc.message, op)
        return
    except Exception as exc:
        log.exception("internal error handling a held op %r from %s", op, conn.peer)
        conn.reply(rid, int(Status.INTERNAL), f"internal error: {exc.__class__.__name__}", op)
        return
    hold = conn._service.hold
    if hold is not None and result is not LATER and result.__class__ is not _Deferred:
        result = hold(conn, rid, op, result)
    if result is LATER:
        return
    if result.__class__ is _Deferred:
        conn._defer(rid, result, op)
    else:
        conn.reply(rid, _OK, result, op)


def _payload_bytes(args: Any) -> int:
    """The bytes of keys and values in a request's parsed arguments (what holding it keeps in memory, about)."""
    if args.__class__ is bytes:
        return len(args)
    if isinstance(args, (tuple, list)):
        return sum(_payload_bytes(a) for a in args)
    return 0
