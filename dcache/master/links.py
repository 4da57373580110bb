"""Pipelined links from a master to its aux nodes, and how a master suspects a slow one.

This is the master's hot path, so it avoids futures and tasks where it can:
``AuxLink.send(op, args, callback)`` writes the request (frames written in
one loop iteration leave in one write) and the answer's ``(status, result)``
is handed to ``callback`` straight from ``data_received``. Callers that want
to ``await`` use ``call``, which wraps the same mechanism in a future.

An ``AuxLink`` keeps ``size`` connections to one aux node and spreads
requests over them; answers come back by request id (each connection's
``RequestTable``).

Timeouts cost no timer per request: each connection's table keeps its
deadlines in order and one sweeper per link answers the overdue ones with
``UPSTREAM_TIMEOUT``. A lost connection answers everything pending on it
with ``UNAVAILABLE``. A link that cannot connect answers at once with
``UNAVAILABLE`` and reconnects in the background with jittered, capped
backoff; the router then tries the key's next owner.

A new link holds the requests made while its first connection opens
(HELLO, then BIND: a few milliseconds), each until its own deadline, and
sends them on that connection (``MAX_LINK_WAITERS`` at most; a link is new
when its node joins, or when this master starts or adopts a view with it).
A node is routed to as soon as a view names it: failing those requests
with "not connected" failed calls for every node added under load, and
acknowledged writes without the node, which fenced it. If that first
attempt fails, they are answered ``UNAVAILABLE`` and the link fails fast
from then on, as above.

Suspicion (gray failure). A node that is stopped, overloaded or cut off
rarely refuses connections: it just stops answering. A link whose node has
answered nothing for ``suspect_after`` seconds while requests wait becomes
*suspect*: the sweeper answers every request waiting on it with
``UPSTREAM_TIMEOUT`` at once (instead of after the full ``timeout``), the
router reads from the key's other owners and stops waiting for it on
writes (it keeps hints instead, ``dcache.master.hints``), and the link
probes the node with a PING every ``suspect_after / 2`` seconds. The first
answer of any kind ends the suspicion. This is each master's own, local
view; marking a node down is the coordinator's job (health pings).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from ssl import SSLContext
from typing import Any

from ..errors import AuthError, Status, UnknownOpError, WrongClusterError
from ..peer import Callback, PeerConnection, answer_to, handshake
from ..protocol import CHANGING_OPS, FEATURE_KEEP_COPY, FEATURE_VALUE_PUSH, UINT64_MAX, Op, Push
from ..protocol.limits import INVALIDATION_TIMEOUT_S, MAX_LINK_WAITERS, NEAR_LEASE_S

__all__ = ["AuxLink", "ConnectionFactory"]

log = logging.getLogger("dcache.master.links")

_SWEEP_INTERVAL_S = 0.05
#: A sweep this much later than the one before (this process was stopped, or its loop held): it judges no node.
_STALLED_S = 0.25
#: Seconds between two looks at a retiring link's requests in flight (``retire``).
_RETIRE_POLL_S = 0.01
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 1.0
_UNAVAILABLE = int(Status.UNAVAILABLE)
_TIMEOUT = int(Status.UPSTREAM_TIMEOUT)
_STALE_RING = int(Status.STALE_RING)
_OK = int(Status.OK)
_SETV = int(Op.SETV)
_MSETV = int(Op.MSETV)
_INVACK = int(Op.INVACK)
_INVALIDATE = int(Push.INVALIDATE)
#: Most keys one INVACK names as no longer held: far below any node's ``--max-batch-keys``.
_MAX_UNHELD = 256


#: Opens one connection to ``(host, port)`` and returns its protocol (tests pass their own).
ConnectionFactory = Callable[[str, int, str, "Callable[[], None] | None"], Awaitable[PeerConnection]]


async def _tcp_connection(
    host: str, port: int, name: str, on_answers: Callable[[], None] | None, *, ssl: SSLContext | None = None
) -> PeerConnection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: PeerConnection(f"aux node {name}", on_answers), host, port, ssl=ssl)
    return proto


#: Most SETVs in one MSETV, and most bytes of their values (``AuxLink.held``).
MAX_HELD = 256
MAX_HELD_BYTES = 1 << 20


class AuxLink:
    """Connections from this master to one aux node."""

    __slots__ = (
        "node_id",
        "host",
        "port",
        "_size",
        "_timeout",
        "_suspect_after",
        "_auth_token",
        "_secret",
        "auth_error",
        "cluster_error",
        "_cluster",
        "_factory",
        "_conns",
        "_active",
        "_sweeper",
        "_connector",
        "_failures",
        "_opening",
        "_waiting",
        "_unbound_logged",
        "_closed",
        "_loop",
        "requests",
        "failures_total",
        "incarnation",
        "on_restart",
        "on_recover",
        "_on_answers",
        "suspect",
        "suspected_since",
        "suspicions_total",
        "_last_probe",
        "_last_check",
        "held",
        "held_bytes",
        "reads_waiting",
        "tracking",
        "tracks",
        "keeps",
        "values",
        "on_invalidate",
        "on_update",
        "invalidations_total",
        "routed_by",
        "epochs",
        "floor",
    )

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        *,
        size: int = 2,
        timeout: float = 2.0,
        suspect_after: float = 0.5,
        auth_token: str | None = None,
        secret: bytes | None = None,
        on_restart: Callable[[str], None] | None = None,
        on_recover: Callable[[str], None] | None = None,
        on_answers: Callable[[], None] | None = None,
        factory: ConnectionFactory | None = None,
        ssl: SSLContext | None = None,
        cluster: Callable[[], str | None] | None = None,
    ) -> None:
        """``factory`` opens one connection (default: TCP, with TLS given ``ssl``, the node's peer context);
        ``cluster`` gives the id each new connection BINDs the node to (``None``: no BIND)."""
        self.node_id = node_id
        self.host = host
        self.port = port
        self._size = size
        self._timeout = timeout
        self._suspect_after = min(suspect_after, timeout)
        self._auth_token = auth_token
        #: The cluster secret the aux node must prove (``None``: no proof asked).
        self._secret = secret
        #: Why the last connection attempt was refused on credentials (for RING), if it was.
        self.auth_error: str | None = None
        #: Why the node refused this master's cluster (BIND answered ``WRONG_CLUSTER``), if it did.
        self.cluster_error: str | None = None
        self._cluster = cluster
        self._factory = factory or partial(_tcp_connection, ssl=ssl)
        self._conns: list[PeerConnection] = []
        #: The connection every request goes on (``_pick``): the first live one.
        self._active: PeerConnection | None = None
        #: SETVs held back to leave as one MSETV (``LinkBatcher.add_write``): ``(args, callback)`` in order,
        #: and the bytes of their values. At ``MAX_HELD`` writes or ``MAX_HELD_BYTES`` they leave at once.
        self.held: list[tuple[tuple[Any, ...], Callback]] = []
        self.held_bytes = 0
        #: Sends the reads a batcher holds for this node (``None``: none wait); called before any other request leaves.
        self.reads_waiting: Callable[[], None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connector: asyncio.Task[None] | None = None
        self._failures = 0
        #: Whether the first connection is still opening: requests wait for it (see the module note).
        self._opening = True
        #: Requests held while the first connection opens: ``(op, args, callback, deadline)``.
        self._waiting: list[tuple[int, tuple[Any, ...], Callback, float]] = []
        #: Whether the node's answer to BIND, unknown to it, was logged.
        self._unbound_logged = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.failures_total = 0
        #: The aux process's incarnation (from HELLO); a new one means it restarted.
        self.incarnation: int | None = None
        #: Called (before the new connection carries any request) when the
        #: node answers with a new incarnation: it restarted and may hold
        #: stale data, so the master fences it first.
        self.on_restart = on_restart
        #: Called when a suspect node answers again.
        self.on_recover = on_recover
        #: Called after each read's answers were handed to their callbacks.
        self._on_answers = on_answers
        #: Whether the node is suspected of not answering (see the module note).
        self.suspect = False
        #: ``time.time()`` the current suspicion started (0: not suspect).
        self.suspected_since = 0.0
        self.suspicions_total = 0
        self._last_probe = 0.0
        #: ``loop.time()`` of the last sweep (``check``).
        self._last_check = 0.0
        #: The connection near-cache fills go on (``send_tracked``): the node pushes their invalidations on it.
        self.tracking: PeerConnection | None = None
        #: Whether the node knows near-cache tracking (``GETV [key, true]``); one
        #: from before it answers ``BAD_ARGUMENTS`` and gets ``no_tracking()``.
        self.tracks = True
        #: Whether the node keeps a writer's subscription (``SetFlag.KEEP_COPY``; its HELLO lists
        #: ``"keep-copy"``): this master's own writes of a key it holds a copy of then update the copy.
        self.keeps = False
        #: Whether the node pushes written values to copies subscribed for them (GETV track 2; its
        #: HELLO lists ``"value-push"``): another master's write then updates this master's copy.
        self.values = False
        #: Gets each ``(key, version)`` the node invalidates (None: near cache off, pushes only acknowledged).
        self.on_invalidate: Callable[[bytes, int], None] | None = None
        #: Gets each ``(key, version, value, expires_at, conn)`` the node pushes a written value of;
        #: answers whether this master still holds the key (``NearCache.update``).
        self.on_update: Callable[[bytes, int, bytes, int, Any], bool] | None = None
        self.invalidations_total = 0
        #: The ring epoch this master routes by, as told to the node on every connection (EPOCH; 0: none yet).
        self.routed_by = 0
        #: Whether the node knows EPOCH (one from before it answers ``UNKNOWN_OP`` once: requests to it are not fenced by epoch).
        self.epochs = True
        #: The node's ring floor, as its last EPOCH answer said (0: none known).
        self.floor = 0

    @property
    def connected(self) -> bool:
        """Whether at least one connection is open."""
        return any(not c.closed for c in self._conns)

    @property
    def open_connections(self) -> int:
        """Connections open now (at most ``pool_size``)."""
        return sum(1 for c in self._conns if not c.closed)

    @property
    def pool_size(self) -> int:
        """Connections this link keeps open."""
        return self._size

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (those waiting for the first connection included)."""
        return sum(len(c.requests) for c in self._conns) + len(self._waiting)

    @property
    def keeps_copies(self) -> bool:
        """Whether a SET may go to this node with KEEP_COPY now: it keeps a writer's subscription, tracks, and is not suspect."""
        return self.keeps and self.tracks and not self.suspect

    @property
    def usable(self) -> bool:
        """Whether requests sent now are expected to be answered (connected and not suspect)."""
        return not self.suspect and any(not c.closed for c in self._conns)

    def start(self) -> None:
        """Start connecting and sweeping (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_loop())
        self._ensure_connector()

    def _ensure_connector(self) -> None:
        if self._closed or self._loop is None:
            return
        if self._connector is None or self._connector.done():
            self._connector = asyncio.ensure_future(self._connect_loop())

    async def _open(self) -> PeerConnection:
        proto = await asyncio.wait_for(self._factory(self.host, self.port, self.node_id, self._on_answers), self._timeout)
        try:
            result = await handshake(
                proto,
                name=f"aux node {self.node_id} at {self.host}:{self.port}",
                auth_token=self._auth_token,
                client_name="dcache-master",
                secret=self._secret,
                timeout=self._timeout,
                expect_role="aux",
            )
            cluster = self._cluster() if self._cluster is not None else None
            if cluster is not None:
                # Before any other request: a node of another cluster must never see this one's.
                try:
                    await proto.call(Op.BIND, cluster, timeout=self._timeout)
                except UnknownOpError:
                    # a node from before BIND (a rolling upgrade, masters first): served unbound, as before
                    if not self._unbound_logged:
                        self._unbound_logged = True
                        log.info("aux %s at %s:%s predates BIND: routed to without a cluster binding", self.node_id, self.host, self.port)
            if self.routed_by and self.epochs:
                # Before any request: the ring this connection's requests are routed by (the node refuses
                # requests routed by one older than its floor, see ``announce``).
                try:
                    self.took_floor(_OK, await proto.call(Op.EPOCH, self.routed_by, timeout=self._timeout))
                except UnknownOpError:
                    self.epochs = False
                    log.info(
                        "aux %s at %s:%s predates EPOCH: requests to it are not fenced by ring epoch", self.node_id, self.host, self.port
                    )
        except BaseException:
            proto.close()
            raise
        proto.routed_by = self.routed_by
        incarnation = result.get("incarnation")
        proto.incarnation = incarnation if type(incarnation) is int else None
        features = result.get("features")
        proto.features = frozenset(f for f in features if type(f) is str) if type(features) is list else frozenset()
        proto.on_push = self._pushed
        return proto

    async def _connect_loop(self) -> None:
        while not self._closed:
            self._conns = [c for c in self._conns if not c.closed]
            if len(self._conns) >= self._size:
                return
            try:
                proto = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                if self._opening:
                    self._opened(None, f"aux node {self.node_id} at {self.host}:{self.port} is not connected: {exc}")
                delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** min(self._failures, 10)) * random.uniform(0.5, 1.0)
                if isinstance(exc, AuthError):
                    self.auth_error = exc.message
                if isinstance(exc, WrongClusterError):
                    self.cluster_error = exc.message
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    if isinstance(exc, (AuthError, WrongClusterError)):
                        log.warning("not routing to aux %s at %s:%s: %s", self.node_id, self.host, self.port, exc.message)
                    else:
                        log.info("cannot connect to aux %s at %s:%s (%s); retrying", self.node_id, self.host, self.port, exc)
                await asyncio.sleep(delay)
                continue
            self.auth_error = self.cluster_error = None
            if self._closed:
                proto.close()
                return
            self._failures = 0
            incarnation = proto.incarnation
            if incarnation is not None:
                if self.incarnation is not None and incarnation != self.incarnation:
                    log.warning("aux node %s restarted (new incarnation)", self.node_id)
                    for old in self._conns:
                        old.close()
                    self._conns = []
                    if self.on_restart is not None:
                        self.on_restart(self.node_id)
                    self.tracks = True  # the new process may be of a newer version
                self.incarnation = incarnation
            self.keeps = FEATURE_KEEP_COPY in proto.features
            self.values = FEATURE_VALUE_PUSH in proto.features
            if proto.routed_by != self.routed_by and self.epochs:  # the view changed while it opened
                self._announce_on(proto)
            self._conns.append(proto)
            self._answered()
            if self._opening:
                self._opened(proto, "")

    def _opened(self, conn: PeerConnection | None, failure: str) -> None:
        """The first connection attempt ended: send the held requests on ``conn``, or answer them ``failure`` (``conn`` None)."""
        self._opening = False
        waiting = self._waiting
        self._waiting = []
        for op, args, cb, deadline in waiting:
            if conn is None or conn.closed:
                self.failures_total += 1
                cb(_UNAVAILABLE, failure or f"aux node {self.node_id} at {self.host}:{self.port} is not connected")
            else:
                self.requests += 1
                if op in CHANGING_OPS:
                    conn.send(op, args, cb, deadline + INVALIDATION_TIMEOUT_S, True)
                else:
                    conn.send(op, args, cb, deadline)

    def announce(self, epoch: int) -> None:
        """Tell the node, on every connection, that this master's requests are now routed by ring ``epoch`` (EPOCH).

        Writes routed by the view before leave first (``held``). A node
        whose floor a leader raised past a master's epoch refuses that
        master's requests (``STALE_RING``): it was paused or cut off while
        the ring changed, and by its old ring it would write behind a
        migration's copy and read owners that miss what was written since
        (docs/DECISIONS.md).
        """
        if epoch == self.routed_by:
            return
        self.routed_by = epoch
        if not self.epochs:
            return
        if self.held:
            self.release_held()
        for conn in self._conns:
            if not conn.closed:
                self._announce_on(conn)

    def _announce_on(self, conn: PeerConnection) -> None:
        conn.routed_by = self.routed_by
        loop = self._loop
        if loop is not None:
            conn.send(
                Op.EPOCH, (self.routed_by,), self.took_floor, loop.time() + self._timeout, False, True
            )  # now: ahead of a leader's floor

    def took_floor(self, status: int, result: Any) -> None:
        """An EPOCH answer: the node's ring floor (``floor``), if it is one."""
        if status == _OK and type(result) is int and result > self.floor:
            self.floor = result

    def _pick(self) -> PeerConnection | None:
        # Every request goes on the first live connection; the others stand by
        # and the next one takes over as soon as it closes. An aux node reads
        # its connections in no set order, so requests spread over several
        # reached it in another order than they were made: a GET pipelined
        # behind an MSET of large values read the old value in 7 of 20 rounds
        # (docs/DECISIONS.md, "A master sends every request to an aux node on
        # one connection").
        c = self._active
        if c is not None and not c.closed:
            return c
        self._ensure_connector()
        for c in self._conns:
            if not c.closed:
                self._active = c
                return c
        self._active = None
        return None

    def send(self, op: int, args: tuple[Any, ...], cb: Callback, now: bool = False) -> None:
        """Send one request; ``cb(status, result)`` gets the answer, a timeout or a loss.

        Held SETVs (``held``) and waiting reads (``reads_waiting``) leave
        first: requests reach the node in the order they were made.
        ``now``: written at once with what its connection has queued
        (``PeerConnection.send``), not at the end of the loop iteration.
        """
        if self.held:
            self.release_held()
        elif self.reads_waiting is not None:
            release = self.reads_waiting
            self.reads_waiting = None
            release()
        conn = self._pick()
        if conn is None:
            loop = self._loop
            if self._opening and loop is not None and len(self._waiting) < MAX_LINK_WAITERS:
                self._waiting.append((op, args, cb, loop.time() + self._timeout))
                return
            self.failures_total += 1
            cb(_UNAVAILABLE, f"aux node {self.node_id} at {self.host}:{self.port} is not connected")
            return
        self.requests += 1
        loop = self._loop
        assert loop is not None
        if op in CHANGING_OPS:  # the node may hold its answer while near caches drop their copies
            conn.send(op, args, cb, loop.time() + self._timeout + INVALIDATION_TIMEOUT_S, True, now)
        else:
            conn.send(op, args, cb, loop.time() + self._timeout, False, now)

    def send_tracked(self, op: int, args: tuple[Any, ...], cb: Callback) -> PeerConnection | None:
        """Send one request that subscribes (a near-cache fill, a KEEP_COPY write); return its connection, or None (``cb`` was answered UNAVAILABLE).

        It goes on the connection every request goes on (``_pick``), which
        becomes the tracking connection: this master's subscriptions live on
        it, the node's invalidation pushes come back on it, in order with the
        answers, and its silence ends the lease of every copy made on it.
        """
        if self.held:
            self.release_held()
        elif self.reads_waiting is not None:
            release = self.reads_waiting
            self.reads_waiting = None
            release()
        conn = self.tracking = self._pick()  # the connection every request goes on: fills and writes stay in order
        if conn is None:
            self.failures_total += 1
            cb(_UNAVAILABLE, f"aux node {self.node_id} at {self.host}:{self.port} is not connected")
            return None
        self.requests += 1
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if now - conn.lease_from > NEAR_LEASE_S / 4:
            self._renew_lease(conn, now)  # before the fill: its copy is served under this lease
        if op in CHANGING_OPS:  # a KEEP_COPY write: the node may hold its answer for other masters' copies
            conn.send(op, args, cb, now + self._timeout + INVALIDATION_TIMEOUT_S, True)
        else:
            conn.send(op, args, cb, now + self._timeout)
        return conn

    def no_tracking(self) -> None:
        """The node answered a tracked GETV ``BAD_ARGUMENTS``: it predates tracking, so no copy of its keys is kept.

        Until it restarts (a new incarnation, maybe of a newer version) this
        master reads its keys without the near cache, as before tracking.
        """
        if self.tracks:
            self.tracks = False
            self.tracking = None
            log.info(
                "aux %s at %s:%s predates near-cache tracking: its keys are read without the near cache", self.node_id, self.host, self.port
            )

    def _pushed(self, conn: PeerConnection, kind: int, payload: Any) -> None:
        """A frame the node sent unasked: an INVALIDATE is applied, then acknowledged on the same connection.

        Its entries are ``[key, version]`` (drop the copy) or, for a copy
        subscribed for values, ``[key, version, value, expires_at]`` (update
        it); the acknowledgement names the keys of the latter this master no
        longer holds (at most ``_MAX_UNHELD``: the rest stay subscribed until
        a later push names them), so the node ends those subscriptions.
        """
        if kind != _INVALIDATE:
            return  # a later kind this master does not know: nothing depends on it
        try:
            seq, items = payload
            ok = seq.__class__ is int and 0 < seq <= UINT64_MAX and items.__class__ is list
            if ok:
                for item in items:
                    n = len(item)
                    if not (
                        (n == 2 or (n == 4 and item[2].__class__ is bytes and item[3].__class__ is int))
                        and item[0].__class__ is bytes
                        and item[1].__class__ is int
                    ):
                        ok = False
                        break
        except (TypeError, ValueError):
            ok = False
        if not ok:
            log.warning("malformed invalidation from aux node %s: closing the connection", self.node_id)
            conn.close()
            return
        invalidate = self.on_invalidate
        update = self.on_update
        unheld: list[bytes] = []
        for item in items:
            if len(item) == 2:
                if invalidate is not None:
                    invalidate(item[0], item[1])
            elif update is None or not update(item[0], item[1], item[2], item[3], conn):
                unheld.append(item[0])
        self.invalidations_total += len(items)
        loop = self._loop
        assert loop is not None
        args = (seq, unheld[:_MAX_UNHELD]) if unheld else (seq,)
        conn.send(_INVACK, args, _ignore, loop.time() + self._timeout)
        conn.flush_now()  # the node holds a write's answer until this arrives

    def keep_tracking_alive(self, now: float) -> None:
        """Renew the near-cache lease of the tracking connection every quarter of ``NEAR_LEASE_S`` (the sweeper's step)."""
        conn = self.tracking
        if conn is not None and not conn.closed and now - conn.lease_from > NEAR_LEASE_S / 4:
            self._renew_lease(conn, now)

    def _renew_lease(self, conn: PeerConnection, now: float) -> None:
        """PING ``conn``: its answer makes the lease run from ``now``, the moment the PING left.

        Counted from the send, not from the answer's arrival: the node
        answered after ``now``, so it cannot have given up on this master
        before ``now`` (``INVALIDATION_TIMEOUT_S`` after a push it sent
        earlier), however late this master reads the answer.
        """
        if not conn.lease_ping:
            conn.lease_ping = True
            conn.send(Op.PING, (), partial(_lease_answered, conn, now), now + self._timeout)

    def release_held(self, now: bool = False) -> None:
        """Send the held SETVs: one MSETV answered per entry (a lone one as a SETV); ``now`` as for ``send``."""
        held = self.held
        self.held = []
        self.held_bytes = 0
        if len(held) == 1:
            args, cb = held[0]
            self.send(_SETV, args, cb, now)
        elif held:
            self.send(_MSETV, ([args for args, _ in held],), _SplitSetv(held, self), now)

    def flush(self) -> None:
        """Write what is queued on every connection now, not at the end of the iteration."""
        for c in self._conns:
            if c.pending_flush:
                c.flush_now()

    def request(self, op: int, *args: Any) -> asyncio.Future[Any]:
        """Send one request; the future gets the result or the typed error."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.send(op, args, answer_to(fut))
        return fut

    async def call(self, op: int, *args: Any) -> Any:
        """Send one request and await its result (typed errors raised)."""
        return await self.request(op, *args)

    # -- suspicion ------------------------------------------------------------------

    def _answered(self) -> None:
        if self.suspect:
            log.info("aux node %s answers again after %.2f s", self.node_id, time.time() - self.suspected_since)
            self.suspect = False
            self.suspected_since = 0.0
            if self.on_recover is not None:
                self.on_recover(self.node_id)

    def sweep(self, now: float) -> None:
        """The sweeper's step: ``check`` the node, keep the tracking lease alive, reopen closed connections.

        A sweep that comes ``_STALLED_S`` or more after the one before
        judges nothing: this process did not run meanwhile (stopped, or its
        loop held), and the node's answers may wait, unread, in the socket.
        Judged now, before the loop reads them (uvloop runs due timers
        first), every node with a request in flight looked silent for the
        whole pause: suspected, its requests failed, its writes acknowledged
        with hints only (the fault campaign: a leader resumed after 4.9 s
        suspected a live node, and another master read the delete it had
        missed as not done). The next sweep, on time, judges.
        """
        stalled = now - self._last_check >= _STALLED_S
        self._last_check = now
        if not stalled:
            self.check(now)
            if self.on_invalidate is not None:
                self.keep_tracking_alive(now)
        if len(self._conns) < self._size or any(c.closed for c in self._conns):
            self._ensure_connector()  # a standby that closed is opened again (``_pick`` only replaces the active one)

    def check(self, now: float) -> None:
        """Time out overdue requests, suspect a silent node, probe a suspect one."""
        last = max((c.last_answer for c in self._conns if not c.closed), default=0.0)
        waiting = [c for c in self._conns if not c.closed and len(c.requests)]
        silent = now - last > self._suspect_after if last else True
        if self.suspect and not silent:
            self._answered()
        if not self.suspect and waiting and silent:
            # Requests the node answers at once; a change it may hold back
            # (INVALIDATION_TIMEOUT_S) is in the late lane and not counted.
            prompt = [d for c in waiting if (d := c.requests.oldest_deadline()) is not None]
            if not prompt:
                # Only changes wait: is the node holding them, or gone? A PING
                # tells: its silence is then counted like any other.
                self._probe(now)
            elif now - (min(prompt) - self._timeout) > self._suspect_after:
                self.suspect = True
                self.suspected_since = time.time()
                self.suspicions_total += 1
                log.warning(
                    "aux node %s has not answered for %.2f s: suspected (reads go to other owners, writes keep hints)",
                    self.node_id,
                    now - last if last else self._suspect_after,
                )
        if self.suspect:
            message = f"aux node {self.node_id} is suspected: no answer for {self._suspect_after} s"
            for c in self._conns:
                self.failures_total += c.fail_all(_TIMEOUT, message) if not c.closed else 0
            self._probe(now)
            return
        message = f"aux node {self.node_id} did not answer within {self._timeout} s"
        for c in self._conns:
            self.failures_total += c.fail_overdue(now, message)
        if self._waiting and self._waiting[0][3] <= now:
            self._fail_waiting(now)

    def _fail_waiting(self, now: float) -> None:
        """Answer the requests held for the first connection whose deadline passed (they are in deadline order)."""
        waiting = self._waiting
        n = 0
        while n < len(waiting) and waiting[n][3] <= now:
            n += 1
        overdue = waiting[:n]
        del waiting[:n]
        message = f"aux node {self.node_id} at {self.host}:{self.port}: no connection within {self._timeout} s"
        for _, _, cb, _ in overdue:
            self.failures_total += 1
            cb(_TIMEOUT, message)

    def _probe(self, now: float) -> None:
        """PING the node, at most every ``suspect_after / 2`` seconds: any answer is a sign of life."""
        if now - self._last_probe >= self._suspect_after / 2 and self.connected:
            self._last_probe = now
            self.send(Op.PING, (), _ignore)
            self.flush()

    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            try:
                self.sweep(loop.time())
            except Exception:  # pragma: no cover - a bug here must not stop the sweeps
                log.exception("link sweep of %s failed", self.node_id)

    async def retire(self) -> None:
        """Close once the requests in flight are answered, at most the link's timeout from now: its node left the view.

        Closed at once, the link answered them ``UNAVAILABLE`` (connection
        lost), though the node, leaving gracefully, still answers: calls
        routed by the view before failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            while self.in_flight and self.connected and loop.time() < deadline:
                await asyncio.sleep(_RETIRE_POLL_S)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close every connection and stop the background tasks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in (self._sweeper, self._connector):
            if task is not None:
                task.cancel()
        self._opened(None, f"the link to aux node {self.node_id} closed")
        for c in self._conns:
            c.close()
            c.connection_lost(None)
        self._conns.clear()


def _lease_answered(conn: PeerConnection, sent: float, status: int, result: Any) -> None:
    """A lease PING's answer: the lease runs from ``sent`` if the node answered (not a local timeout or loss)."""
    conn.lease_ping = False
    if status == _OK and sent > conn.lease_from:
        conn.lease_from = sent


def _ignore(status: int, result: Any) -> None:
    """The callback of a probe: its answer matters only as a sign of life."""


class _SplitSetv:
    """Hands each answer of an MSETV (``[status, result]`` per entry) to the SETV it carried.

    If the node refuses the batch as a whole (an entry it cannot take, a node
    that does not know MSETV), each write is sent again on its own as a SETV,
    so each gets its own answer; a lost or late node answers each write that.
    """

    __slots__ = ("held", "link")

    def __init__(self, held: list[tuple[tuple[Any, ...], Callback]], link: AuxLink) -> None:
        self.held = held
        self.link = link

    def __call__(self, status: int, result: Any) -> None:
        held = self.held
        if status == _OK and result.__class__ is list and len(result) == len(held):
            for (_, cb), item in zip(held, result, strict=True):
                if item.__class__ is list and len(item) == 2:
                    code, answer = item
                    if code.__class__ is int:
                        cb(code, answer)
                        continue
                cb(_UNAVAILABLE, "malformed MSETV answer from an aux node")
        elif status == _UNAVAILABLE or status == _TIMEOUT or status == _STALE_RING:
            for _, cb in held:
                cb(status, result)
        elif status == _OK:
            for _, cb in held:
                cb(_UNAVAILABLE, "malformed MSETV answer from an aux node")
        else:
            link = self.link
            for args, cb in held:
                link.send(_SETV, args, cb)
            link.flush()
