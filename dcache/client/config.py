"""``ClientConfig``: every option of a ``Client``, validated once, in one frozen object.

``Client(endpoints, **options)`` builds one; ``Client.from_config(config)``
takes one whole, so a program that makes several clients alike (the HTTP
shim) states their options once and derives the variants with
``dataclasses.replace``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from ssl import PROTOCOL_TLS_SERVER, SSLContext

from ..address import format_address, parse_address
from ..errors import ConfigError
from ..protocol import Limits

__all__ = ["ClientConfig"]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The options of one ``Client``.

    Attributes:
        endpoints: ``"host:port"``, several separated by commas, or a sequence
            of them (masters, or a single node); several endpoints fail over
            round-robin. Stored as a tuple of normalized ``host:port``
            strings.
        timeout: seconds one call may take, acquiring a connection and
            retries included.
        connect_timeout: seconds for TCP connect plus HELLO; with ``ssl``,
            also the longest TLS goodbye when a connection closes.
        acquire_timeout: seconds a call may wait for a free connection slot;
            ``None``: bounded only by ``timeout``.
        min_connections: connections kept per endpoint once it is used.
        max_connections: most connections per endpoint.
        max_in_flight: most concurrent requests per connection.
        auth_token: token sent in HELLO, if the servers require one.
        cluster_secret: the cluster secret (bytes, or text taken as UTF-8),
            proved with AUTH on every connection for the cluster credential
            (tools that read aux nodes directly: dump, restore); ``None`` for
            applications, which need only the client credential.
        client_name: name sent in HELLO (servers may log it).
        limits: when given, key and value sizes are checked before sending
            and ``limits.max_frame_bytes`` bounds one answer; otherwise the
            server enforces its own limits, and the frame limit its HELLO
            announces bounds one answer.
        retries: how many times a call interrupted by a lost connection is
            repeated (retry-safe ops only).
        backoff_max: cap, in seconds, of the delay between reconnect attempts
            to an endpoint that is down (at least 0.05).
        ssl: an ``ssl.SSLContext`` to speak TLS to every endpoint (``None``:
            plain TCP). ``dcache.tls.client_context(ca=..., cert=..., key=...)``
            builds one that verifies the server's chain and host name and
            presents a client certificate for mutual TLS; any client-side
            context works (``ssl.create_default_context(cafile=...)``).
        addresses: ``endpoints`` parsed into ``(host, port)`` pairs (derived).

    Raises:
        ConfigError: an option is invalid; the message starts with the
            field's name.
    """

    endpoints: str | Sequence[str]
    timeout: float = 5.0
    connect_timeout: float = 2.0
    acquire_timeout: float | None = None
    min_connections: int = 1
    max_connections: int = 4
    max_in_flight: int = 64
    auth_token: str | None = None
    cluster_secret: bytes | str | None = field(default=None, repr=False)
    client_name: str | None = "dcache-py"
    limits: Limits | None = None
    retries: int = 2
    backoff_max: float = 2.0
    ssl: SSLContext | None = field(default=None, compare=False)
    addresses: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalizing a frozen instance while it is built
        addresses = _addresses(self.endpoints)
        set_(self, "addresses", addresses)
        set_(self, "endpoints", tuple(format_address(host, port) for host, port in addresses))
        for name in ("timeout", "connect_timeout", "backoff_max"):
            set_(self, name, _seconds(name, getattr(self, name)))
        if self.acquire_timeout is not None:
            set_(self, "acquire_timeout", _seconds("acquire_timeout", self.acquire_timeout))
        if self.backoff_max < 0.05:
            raise ConfigError(f"backoff_max: must be at least 0.05 seconds, got {self.backoff_max!r}")
        _count("max_connections", self.max_connections, 1)
        _count("min_connections", self.min_connections, 0)
        if self.min_connections > self.max_connections:
            raise ConfigError(f"min_connections: {self.min_connections} exceeds max_connections ({self.max_connections})")
        _count("max_in_flight", self.max_in_flight, 1)
        _count("retries", self.retries, 0)
        for name in ("auth_token", "client_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}: must be a string or None, not {type(value).__name__}")
        if isinstance(self.cluster_secret, str):
            set_(self, "cluster_secret", self.cluster_secret.encode())
        elif self.cluster_secret is not None and not isinstance(self.cluster_secret, bytes):
            raise ConfigError(f"cluster_secret: must be bytes, a string or None, not {type(self.cluster_secret).__name__}")
        if self.limits is not None and not isinstance(self.limits, Limits):
            raise ConfigError(f"limits: must be a dcache.protocol.Limits or None, not {type(self.limits).__name__}")
        if self.ssl is not None:
            if not isinstance(self.ssl, SSLContext):
                raise ConfigError(f"ssl: must be an ssl.SSLContext or None, not {type(self.ssl).__name__}")
            if self.ssl.protocol == PROTOCOL_TLS_SERVER:
                raise ConfigError("ssl: this is a server-side context (PROTOCOL_TLS_SERVER); a client needs a client-side one")


def _addresses(endpoints: object) -> tuple[tuple[str, int], ...]:
    if isinstance(endpoints, str):
        parts: Sequence[object] = endpoints.split(",")
    elif isinstance(endpoints, Sequence):
        parts = endpoints
    else:
        raise ConfigError(f"endpoints: expected 'host:port' text or a sequence of them, not {type(endpoints).__name__}")
    addresses = []
    for text in parts:
        if not isinstance(text, str):
            raise ConfigError(f"endpoints: {text!r} is not 'host:port' text")
        if not text.strip():
            continue
        try:
            addresses.append(parse_address(text))
        except ValueError as exc:
            raise ConfigError(f"endpoints: {exc}") from None
    if not addresses:
        raise ConfigError("endpoints: at least one host:port is required")
    return tuple(addresses)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number of seconds, not {type(value).__name__}")
    if not value > 0:  # also refuses NaN
        raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer, not {type(value).__name__}")
    if value < least:
        raise ConfigError(f"{name}: must be at least {least}, got {value}")
