"""The dcache client: ``Client`` (asyncio) and ``create_client``.

Keys are ``str`` (sent as UTF-8) or ``bytes``; values are ``bytes``, or
``str`` (stored as UTF-8). Reads always return ``bytes``. TTLs are seconds
(``float``), sent as whole milliseconds rounded up.

Endpoints and failover
----------------------
A client has one or more ``host:port`` endpoints (masters, or a single aux
node) and one ``NodePool`` per endpoint, created on first use. Calls go to
the *current* endpoint. When it cannot be reached (``NoAvailableNodeError``:
refused, timed out, or at its connection limit) the client moves to the next
endpoint, round-robin, and tries the call there;
each endpoint is tried at most once per call for this reason. When a
connection is lost after the request was sent (``ConnectionResetError``) the
client also moves on, but repeats the call only if doing it twice is
harmless, as the protocol's op table says (``OpSpec.retry_safe``): reads
(GET, MGET, EXISTS, TTL, PING, STATS...), last-writer-wins writes (SET
without NX/XX, MSET, DELETE, EXPIRE, TOUCH...); never INCR, DECR or SET with
NX/XX. Such retries happen at most ``retries`` times per call.

The options (timeouts, pool sizes, auth, limits, retries) are one
``ClientConfig`` (``dcache.client.config``).

Every call has one deadline (``timeout`` seconds) covering acquiring a
connection, retries and the answer; when it passes the call raises the
builtin ``TimeoutError`` and the connection it was waiting on is retired
(it takes no new requests and closes once its other requests are answered).
A call cancelled from outside (``asyncio.wait_for``, ``asyncio.timeout``, a
cancelled task) forgets its request, and its late answer is dropped; the
connection is retired by the next call that finds a request on it
unanswered for longer than ``timeout`` (``ClientConnection.stalled``), so
callers with shorter deadlines of their own are moved off a server that
stopped answering too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, cast

from ..address import format_address
from ..errors import (
    InvalidArgumentError,
    NoAvailableNodeError,
    PoolClosedError,
    RemoteProtocolError,
)
from ..protocol import INT64_MAX, INT64_MIN, MAX_TTL_MS, OPS, Op, SetFlag
from .config import ClientConfig
from .connection import ClientConnection, open_connection
from .pool import NodePool

__all__ = ["Client", "create_client", "Key", "Value", "Pairs", "MAX_TTL_S"]

log = logging.getLogger("dcache.client")

#: A key: ``str`` (UTF-8 encoded) or ``bytes``.
Key = str | bytes
#: A value: ``bytes`` (or another bytes-like buffer), or ``str`` (UTF-8 encoded).
Value = bytes | bytearray | memoryview | str
#: What ``mset`` takes: a mapping of keys to values, or ``(key, value)`` pairs.
Pairs = Mapping[str, Value] | Mapping[bytes, Value] | Mapping[Key, Value] | Iterable[tuple[Key, Value]]

#: Largest TTL the protocol carries (``dcache.protocol.MAX_TTL_MS``), in seconds.
MAX_TTL_S = MAX_TTL_MS // 1000

#: Ops the protocol table (``OpSpec.retry_safe``) says may be sent again after a lost connection.
_RETRY_SAFE_OPS = frozenset(op for op, spec in OPS.items() if spec.retry_safe)


def _retry_safe(op: int, args: Sequence[Any]) -> bool:
    """Whether request ``[op, *args]`` may be sent again after the connection was lost mid-request.

    The protocol's op table decides (``OpSpec.retry_safe``: reads and
    last-writer-wins writes), except that a SET is decided by its flags: it
    is repeatable without NX/XX (``args[3]``), never with them.
    """
    if op == Op.SET:
        return len(args) < 4 or not args[3]
    return op in _RETRY_SAFE_OPS


def _key(key: Any) -> bytes:
    if key.__class__ is bytes:
        if key:
            return key
    elif isinstance(key, str):
        if key:
            return _utf8(key, "key")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        if len(key):
            return bytes(key)
    else:
        raise InvalidArgumentError(f"key must be str or bytes, not {type(key).__name__}")
    raise InvalidArgumentError("key must not be empty")


def _value(value: Any) -> bytes:
    if value.__class__ is bytes:
        return value
    if isinstance(value, str):
        return _utf8(value, "value")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgumentError(f"value must be bytes or str, not {type(value).__name__}")


#: What is one key or value, never a collection of them (iterating one would give characters or ints).
_TEXT_TYPES = (str, bytes, bytearray, memoryview)


def _pair(item: Any) -> tuple[Any, Any]:
    """One ``(key, value)`` item of ``mset``'s pairs, unpacked."""
    if not isinstance(item, _TEXT_TYPES):
        try:
            key, value = item
        except (TypeError, ValueError):
            pass
        else:
            return key, value
    raise InvalidArgumentError(f"mset takes (key, value) pairs, got a {type(item).__name__} of another shape")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"): no UTF-8 form
        raise InvalidArgumentError(f"{what} is not valid Unicode text: {exc.reason} at index {exc.start}") from None


def _delta(delta: Any, least: int = INT64_MIN) -> int:
    """``delta`` checked: an ``int`` from ``least`` to ``INT64_MAX`` (DECR negates it, so there ``least`` is ``-INT64_MAX``)."""
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise InvalidArgumentError(f"delta must be an integer, not {type(delta).__name__}")
    if not least <= delta <= INT64_MAX:
        raise InvalidArgumentError(f"delta must be a signed 64-bit integer from {least} to {INT64_MAX}, got {delta}")
    return delta


def _ttl_ms(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidArgumentError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl <= MAX_TTL_S:  # also refuses NaN
        raise InvalidArgumentError(f"ttl must be > 0 and at most {MAX_TTL_S} seconds, got {ttl!r}")
    return math.ceil(ttl * 1000)


class Client:
    """Asyncio client for a dcache cluster (masters) or a single node.

    Connections are opened lazily on first use (``create_client`` connects
    eagerly). The client belongs to the event loop it is first used on and
    may be shared by any number of coroutines on that loop.

    Args:
        endpoints: ``"host:port"``, several separated by commas, or a sequence
            of them; several endpoints fail over round-robin.
        config: every option at once (then neither ``endpoints`` nor
            ``options`` may be given).
        **options: the other fields of ``ClientConfig`` (``timeout``,
            ``connect_timeout``, ``acquire_timeout``, ``min_connections``,
            ``max_connections``, ``max_in_flight``, ``auth_token``,
            ``cluster_secret``, ``client_name``, ``limits``, ``retries``, ``backoff_max``,
            ``ssl``), each documented there. ``ssl=context`` speaks TLS to every endpoint.

    Raises:
        ConfigError: an endpoint or option is invalid.
        TypeError: an unknown option, no endpoints, or ``config`` together
            with endpoints or options.
    """

    def __init__(self, endpoints: str | Sequence[str] | None = None, *, config: ClientConfig | None = None, **options: Any) -> None:
        if config is None:
            if endpoints is None:
                raise TypeError("Client() needs endpoints (or config=)")
            config = ClientConfig(endpoints, **options)
        elif endpoints is not None or options:
            raise TypeError("Client() takes endpoints and options, or config=, not both")
        self._config = config
        self._addresses = config.addresses
        self._names = tuple(format_address(h, p) for h, p in config.addresses)
        self._pools: list[NodePool[ClientConnection] | None] = [None] * len(config.addresses)
        self._current = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Client {','.join(self._names)} current={self.current_endpoint}{' closed' if self._closed else ''}>"

    # -- properties ----------------------------------------------------------

    @property
    def config(self) -> ClientConfig:
        """The options this client was built with."""
        return self._config

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints, as ``host:port`` strings, in failover order."""
        return self._names

    @property
    def current_endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self._names[self._current]

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def pool(self, endpoint: str | None = None) -> NodePool[ClientConnection] | None:
        """The pool of ``endpoint`` (default: the current one), if it was created yet."""
        index = self._current if endpoint is None else self._names.index(endpoint)
        return self._pools[index]

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect now to the first endpoint that answers, starting at the current one.

        Raises:
            NoAvailableNodeError: no endpoint could be reached.
            AuthError: the server rejected the auth token.
            HandshakeError: the server speaks another protocol version.
            PoolClosedError: the client is closed.
        """
        self._bind_loop()
        start = self._current
        failures: list[str] = []
        for i in range(len(self._addresses)):
            index = (start + i) % len(self._addresses)
            try:
                await self._get_pool(index).connect(timeout=self._config.timeout)
            except (NoAvailableNodeError, TimeoutError) as exc:
                failures.append(f"{self._names[index]}: {str(exc) or 'timed out'}")
                continue
            self._current = index
            return
        raise NoAvailableNodeError("no dcache endpoint is reachable (" + "; ".join(failures) + ")")

    async def server_info(self) -> dict[str, Any]:
        """The HELLO answer of the endpoint calls go to now (connecting first if needed).

        Returns:
            A copy of the map: ``version``, ``node_id``, ``role`` (``"master"``
            or ``"aux"``), ``max_frame_bytes``, ``max_key_bytes``,
            ``max_value_bytes``, ``max_batch_keys`` (docs/PROTOCOL.md, HELLO).

        Raises:
            NoAvailableNodeError: no endpoint could be reached.
            TimeoutError: no connection within ``timeout``.
            PoolClosedError: the client is closed.
        """
        await self.connect()
        async with self._get_pool(self._current).acquire(self._config.timeout) as conn:
            return dict(conn.server_info)

    async def close(self) -> None:
        """Close every connection (idempotent); later calls raise ``PoolClosedError``.

        Cancelling it (a shutdown deadline) stops the wait, not the closing:
        every endpoint's connections are closed all the same.
        """
        if self._closed:
            return
        self._closed = True
        pools = [p for p in self._pools if p is not None]
        if pools:
            await asyncio.shield(asyncio.gather(*(pool.close() for pool in pools)))

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and any(p is not None for p in self._pools):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    # -- machinery -----------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this dcache Client is bound to another event loop")
        if self._closed:
            raise PoolClosedError("the client is closed")
        return loop

    def _get_pool(self, index: int) -> NodePool[ClientConnection]:
        pool = self._pools[index]
        if pool is None:
            host, port = self._addresses[index]
            config = self._config

            async def factory() -> ClientConnection:
                return await open_connection(
                    host,
                    port,
                    limits=config.limits,
                    connect_timeout=config.connect_timeout,
                    auth_token=config.auth_token,
                    cluster_secret=cast("bytes | None", config.cluster_secret),
                    client_name=config.client_name,
                    ssl=config.ssl,
                )

            pool = self._pools[index] = NodePool(
                factory,
                name=self._names[index],
                min_connections=config.min_connections,
                max_connections=config.max_connections,
                max_in_flight=config.max_in_flight,
                acquire_timeout=None,
                backoff_max_s=config.backoff_max,
            )
        return pool

    def _failover(self, index: int) -> None:
        n = len(self._addresses)
        if n > 1 and self._current == index:
            self._current = (index + 1) % n
            log.info("dcache endpoint %s failed; switching to %s", self._names[index], self._names[self._current])

    async def _execute(self, op: int, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._closed:
            self._bind_loop()
        config = self._config
        deadline = loop.time() + config.timeout
        unreachable = 0
        retried = 0
        while True:
            index = self._current
            pool = self._pools[index] or self._get_pool(index)
            acquire_timeout = deadline - loop.time()
            if acquire_timeout <= 0:
                raise TimeoutError(f"dcache call timed out after {config.timeout} s")
            if config.acquire_timeout is not None and config.acquire_timeout < acquire_timeout:
                acquire_timeout = config.acquire_timeout
            lost: ConnectionResetError
            try:
                async with pool.acquire(acquire_timeout) as conn:
                    if conn.stalled(loop.time(), config.timeout):  # its callers were cancelled before their timeout
                        conn.retire()
                        continue
                    try:
                        async with asyncio.timeout_at(deadline):
                            return await conn.call(op, *args)
                    except TimeoutError:
                        conn.retire()
                        raise
                    except ConnectionResetError as exc:
                        lost = exc
            except NoAvailableNodeError as exc:
                self._failover(index)
                unreachable += 1
                if unreachable >= len(self._addresses) or self._closed:
                    if len(self._addresses) == 1:
                        raise
                    raise NoAvailableNodeError(f"no dcache endpoint is reachable ({', '.join(self._names)})") from exc
                continue
            self._failover(index)
            if retried >= config.retries or self._closed or not _retry_safe(op, args):
                raise lost
            retried += 1
            log.debug("connection to %s lost during op %d; retrying", self._names[index], op)

    def _check_key(self, key: Key) -> bytes:
        k = _key(key)
        limits = self._config.limits
        if limits is not None and len(k) > limits.max_key_bytes:
            raise InvalidArgumentError(f"key of {len(k)} bytes exceeds the limit of {limits.max_key_bytes}")
        return k

    def _check_value(self, value: Value) -> bytes:
        v = _value(value)
        limits = self._config.limits
        if limits is not None and len(v) > limits.max_value_bytes:
            raise InvalidArgumentError(f"value of {len(v)} bytes exceeds the limit of {limits.max_value_bytes}")
        return v

    # -- operations ----------------------------------------------------------

    async def execute(self, op: int, *args: Any) -> Any:
        """Send one raw request and return its result (for tools).

        Arguments go on the wire as given (after the request id). The call
        is repeated after a lost connection only if the op is retry-safe
        (the op table's ``OpSpec.retry_safe``; a SET only without NX/XX).

        Args:
            op: the op code (``dcache.protocol.Op``).
            *args: the op's arguments.

        Returns:
            The server's result, undecoded.

        Raises:
            ServerError: the server answered with an error (its registered subclass).
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
            ConnectionResetError: the connection was lost and the op is not retry-safe.
            InvalidArgumentError: the request is larger than the server's
                frame limit (nothing was sent).
            LocalProtocolError: an argument cannot be encoded in msgpack
                (nothing was sent).
            PoolClosedError: the client is closed.
        """
        return await self._execute(op, args)

    async def get(self, key: Key) -> bytes | None:
        """Return the value of ``key``, or ``None`` if it does not exist.

        Args:
            key: ``str`` (UTF-8) or ``bytes``.

        Returns:
            The value as ``bytes`` (even if it was stored as ``str``), or ``None``.

        Raises:
            InvalidArgumentError: the key is empty, not str/bytes, or over
                the client's ``limits`` (nothing was sent).
            KeyTooLargeError: the server refused the key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
            ServerError: any other error the server answered.
        """
        result: bytes | None = await self._execute(Op.GET, (self._check_key(key),))
        return result

    async def set(self, key: Key, value: Value, ttl: float | None = None, *, nx: bool = False, xx: bool = False) -> bool:
        """Store ``value`` under ``key``.

        Args:
            key: ``str`` (UTF-8) or ``bytes``.
            value: ``bytes``, or ``str`` (stored as UTF-8).
            ttl: seconds until the key expires (> 0; rounded up to whole
                milliseconds); ``None``: never.
            nx: store only if the key does not exist.
            xx: store only if the key exists.

        Returns:
            ``True`` if stored, ``False`` if the ``nx``/``xx`` condition failed.

        Raises:
            InvalidArgumentError: bad key, value or ttl, both ``nx`` and
                ``xx``, or over the client's ``limits`` or the server's
                frame limit (nothing was sent).
            KeyTooLargeError, ValueTooLargeError: the server refused the
                key or value as too large.
            OutOfMemoryError: the entry alone exceeds the node's memory budget.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
            ConnectionResetError: the connection was lost after sending a
                SET with ``nx``/``xx`` (never repeated automatically).
        """
        if nx and xx:
            raise InvalidArgumentError("nx and xx are mutually exclusive")
        flags = SetFlag.NX if nx else SetFlag.XX if xx else SetFlag.NONE
        args = (self._check_key(key), self._check_value(value), _ttl_ms(ttl), int(flags))
        return bool(await self._execute(Op.SET, args))

    async def delete(self, key: Key) -> bool:
        """Delete ``key``.

        A call repeated after a lost connection may report ``False`` although
        this call deleted the key.

        Args:
            key: ``str`` (UTF-8) or ``bytes``.

        Returns:
            ``True`` if the key existed.

        Raises:
            InvalidArgumentError: a bad key (nothing was sent).
            KeyTooLargeError: the server refused the key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return bool(await self._execute(Op.DELETE, (self._check_key(key),)))

    async def mget(self, keys: Iterable[Key]) -> list[bytes | None]:
        """Return the values of several keys, in order, ``None`` for missing ones.

        Args:
            keys: ``str``/``bytes`` keys (no round trip if empty).

        Returns:
            One ``bytes`` or ``None`` per key, in the order given.

        Raises:
            InvalidArgumentError: a bad key, or one ``str``/``bytes`` key
                instead of a sequence of keys (nothing was sent).
            KeyTooLargeError: the server refused a key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
            RemoteProtocolError: the answer does not have one item per key.
        """
        if isinstance(keys, _TEXT_TYPES):
            raise InvalidArgumentError(f"mget takes a sequence of keys, not one {type(keys).__name__}: mget([key])")
        limits = self._config.limits
        # A non-empty bytes key within the limit is taken as is (``_check_key``'s answer, two calls less: the shim's batched reads).
        wire = [
            k if k.__class__ is bytes and k and (limits is None or len(k) <= limits.max_key_bytes) else self._check_key(k) for k in keys
        ]
        if not wire:
            return []
        result = await self._execute(Op.MGET, (wire,))
        if not isinstance(result, list) or len(result) != len(wire):
            raise RemoteProtocolError("MGET answer does not have one item per key")
        return result

    async def mset(self, mapping: Pairs, ttl: float | None = None) -> int:
        """Store several keys at once, with one optional TTL for all.

        Args:
            mapping: a mapping, or an iterable of ``(key, value)`` pairs (no
                round trip if empty).
            ttl: seconds until the keys expire (> 0); ``None``: never.

        Returns:
            The number of pairs stored.

        Raises:
            InvalidArgumentError: a bad pair or ttl, something that is not a
                mapping or ``(key, value)`` pairs, or the pairs together over
                the server's frame limit (nothing was sent).
            KeyTooLargeError, ValueTooLargeError: the server refused a key
                or value as too large (then nothing is stored).
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        if isinstance(mapping, _TEXT_TYPES):
            raise InvalidArgumentError(f"mset takes a mapping or (key, value) pairs, not one {type(mapping).__name__}")
        items: Iterable[tuple[Key, Value]] = mapping.items() if isinstance(mapping, Mapping) else mapping
        limits = self._config.limits
        pairs: list[list[bytes]] = []
        for item in items:
            # The usual pair (``SetBatcher``'s): a tuple of a non-empty bytes key and a bytes value within the
            # limits, taken as is; any other goes through ``_pair`` and the checks (the same answers, in order).
            if item.__class__ is tuple and len(item) == 2:
                k, v = item
                if (
                    k.__class__ is bytes
                    and v.__class__ is bytes
                    and k
                    and (limits is None or (len(k) <= limits.max_key_bytes and len(v) <= limits.max_value_bytes))
                ):
                    pairs.append([k, v])
                    continue
            k, v = _pair(item)
            pairs.append([self._check_key(k), self._check_value(v)])
        ttl_ms = _ttl_ms(ttl)
        if not pairs:
            return 0
        return int(await self._execute(Op.MSET, (pairs, ttl_ms)))

    async def exists(self, key: Key) -> bool:
        """Whether ``key`` exists (and has not expired).

        Raises:
            InvalidArgumentError: a bad key (nothing was sent).
            KeyTooLargeError: the server refused the key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return bool(await self._execute(Op.EXISTS, (self._check_key(key),)))

    async def expire(self, key: Key, ttl: float) -> bool:
        """Set ``key`` to expire ``ttl`` seconds from now.

        Args:
            key: ``str`` (UTF-8) or ``bytes``.
            ttl: seconds (rounded up to whole milliseconds); ``ttl <= 0``
                deletes the key.

        Returns:
            ``True`` if the key existed.

        Raises:
            InvalidArgumentError: a bad key or ttl (nothing was sent).
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or math.isnan(ttl):
            raise InvalidArgumentError(f"ttl must be a number of seconds, not {ttl!r}")
        ttl_ms = 0 if ttl <= 0 else _ttl_ms(ttl)
        return bool(await self._execute(Op.EXPIRE, (self._check_key(key), ttl_ms)))

    async def ttl(self, key: Key) -> float | None:
        """Seconds until ``key`` expires.

        Returns:
            ``None`` if the key does not exist, ``-1.0`` if it never expires,
            else the remaining seconds (millisecond resolution).

        Raises:
            InvalidArgumentError: a bad key (nothing was sent).
            KeyTooLargeError: the server refused the key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        ms = int(await self._execute(Op.TTL, (self._check_key(key),)))
        if ms == -2:
            return None
        if ms == -1:
            return -1.0
        return ms / 1000

    async def incr(self, key: Key, delta: int = 1) -> int:
        """Add ``delta`` to the integer stored at ``key`` (missing counts as 0).

        Never repeated automatically: if the connection is lost after the
        request was sent, ``ConnectionResetError`` is raised and the
        increment may or may not have happened.

        Returns:
            The new value.

        Raises:
            NotAnIntegerError: the value is not a signed 64-bit decimal, or
                the result would overflow.
            InvalidArgumentError: a bad key, or a delta that is not a
                signed 64-bit integer (nothing was sent).
            ConnectionResetError: the connection was lost after sending.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return int(await self._execute(Op.INCR, (self._check_key(key), _delta(delta))))

    async def decr(self, key: Key, delta: int = 1) -> int:
        """Subtract ``delta`` from the integer stored at ``key`` (see ``incr``).

        Returns:
            The new value.

        Raises:
            NotAnIntegerError: the value is not a signed 64-bit decimal, or
                the result would overflow.
            InvalidArgumentError: a bad key, or a delta that is not a
                signed 64-bit integer (nothing was sent).
            ConnectionResetError: the connection was lost after sending.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return int(await self._execute(Op.DECR, (self._check_key(key), _delta(delta, -INT64_MAX))))

    async def touch(self, key: Key) -> bool:
        """Mark ``key`` as recently used (protects it from LRU eviction).

        Returns:
            ``True`` if the key exists.

        Raises:
            InvalidArgumentError: a bad key (nothing was sent).
            KeyTooLargeError: the server refused the key as too large.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return bool(await self._execute(Op.TOUCH, (self._check_key(key),)))

    async def persist(self, key: Key) -> bool:
        """Remove ``key``'s expiry, so it lives until deleted or evicted.

        Returns:
            ``True`` if the key had an expiry (``False``: missing, or no expiry).

        Raises:
            BadArgumentsError, KeyTooLargeError: bad key.
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        return bool(await self._execute(Op.PERSIST, (self._check_key(key),)))

    async def ping(self) -> float:
        """Round-trip a PING.

        Returns:
            The round-trip time in seconds (including acquiring a connection).

        Raises:
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
            RemoteProtocolError: the server did not answer ``"PONG"``.
        """
        start = time.perf_counter()
        result = await self._execute(Op.PING, ())
        elapsed = time.perf_counter() - start
        if result != "PONG":
            raise RemoteProtocolError(f"PING answered {result!r}")
        return elapsed

    async def stats(self) -> dict[str, Any]:
        """The server's statistics (``items``, ``bytes``, ``hits``, ...).

        Returns:
            A dict of ``str`` to ``int``, ``float`` or ``str``.

        Raises:
            TimeoutError: no answer within ``timeout``.
            NoAvailableNodeError: no endpoint could be reached.
        """
        result = await self._execute(Op.STATS, ())
        if not isinstance(result, dict):
            raise RemoteProtocolError(f"STATS answered {type(result).__name__}, not a map")
        return result


async def create_client(endpoints: str | Sequence[str] | None = None, **options: Any) -> Client:
    """Create a ``Client`` and connect it now.

    Args:
        endpoints: as for ``Client``.
        **options: keyword arguments of ``Client`` (its options, or ``config=``).

    Returns:
        A connected client (close it, or use ``async with``).

    Raises:
        NoAvailableNodeError: no endpoint answered.
        AuthError: the server rejected the auth token.
        HandshakeError: the server speaks another protocol version.
        ConfigError: bad endpoints or options.
    """
    client = Client(endpoints, **options)
    try:
        await client.connect()
    except BaseException:
        await client.close()
        raise
    return client
