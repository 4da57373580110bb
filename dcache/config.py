"""Configuration: one frozen dataclass per role, and the loaders that fill it.

Each field carries its own help text and parser in ``metadata``, so the
command line (``--help``), the environment (``DCACHE_*``) and the config file
are all generated from one place and cannot drift apart.

Precedence, lowest first: defaults < config file < ``DCACHE_*`` environment
< command-line flags. The config file is TOML with one table per role
(``[aux]``, ``[master]``, ``[http]``: ``ROLE_SECTIONS``), keys spelt like the
fields (``max_memory = "256MiB"``); a key outside those tables, an unknown
table or an unknown key is refused with the file and the key named
(docs/OPERATIONS.md, "Configuration file", has an example per role).

Sizes are bytes, or a number with a unit: KB, MB, GB, TB are powers of 1000,
KiB, MiB, GiB, TiB powers of 1024 (as in Kubernetes). The defaults are
binary (``--max-memory`` is 256MiB) and ``--help`` shows them so.

Validation happens in ``__post_init__`` and raises ``ConfigError`` naming the
field, so a bad value from any source gets the same message.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from .address import format_address, parse_address
from .errors import ConfigError
from .hlc import DEFAULT_MAX_SKEW_MS
from .protocol import MAX_BATCH_KEYS, MAX_FRAME_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_WEIGHT, Limits
from .tls import DEFAULT_HANDSHAKE_TIMEOUT_S, TlsContexts, check_tls_settings

__all__ = [
    "MIN_SECRET_CHARS",
    "read_secret",
    "NodeConfig",
    "AuxConfig",
    "MasterConfig",
    "HttpConfig",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_MASTER_PORT",
    "ENV_PREFIX",
    "load_config",
    "config_fields",
    "parse_size",
    "format_size",
    "parse_bool",
    "ROLE_SECTIONS",
    "DEFAULT_AUX_PORT",
]

ENV_PREFIX = "DCACHE_"
DEFAULT_AUX_PORT = 7101

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``1048576``, ``512KB``, ``256MiB``, ``1GiB`` (KB, MB, GB = powers of 1000; KiB, MiB, GiB = of 1024).

    Raises:
        ValueError: not a size (the message gives examples).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    if isinstance(text, bool) or not m or (m.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 512KB, 256MiB, 1GiB; KB = 1000 bytes, KiB = 1024)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


_FORMAT_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))


def format_size(n: int) -> str:
    """A byte count as ``parse_size`` reads it back, in the largest unit that divides it: ``256MiB``, ``1KiB``, ``1500``."""
    for unit, factor in _FORMAT_UNITS:
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_bool(text: str | bool) -> bool:
    """Parse ``1/0``, ``true/false``, ``yes/no``, ``on/off``."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _opt_str(text: str | None) -> str | None:
    return None if text in (None, "") else str(text)


def _opt(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def inner(text: Any) -> Any:
        if text is None or text == "":
            return None
        return parse(text)

    return inner


def _float(text: Any) -> float:
    """A number of seconds (or a weight): finite, since ``nan`` passes every ``<`` check and ``inf`` overflows later."""
    if isinstance(text, bool):
        raise ValueError(f"not a number: {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _int(text: Any) -> int:
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"not an integer: {text!r}")
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"not an integer: {text!r}") from None


def _str(text: Any) -> str:
    return str(text)


def opt(default: Any, help: str, parse: Callable[[Any], Any], metavar: str | None = None) -> Any:
    """A dataclass field with the help text and parser the loaders use."""
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} is out of range 0..65535")


def _check_distinct_ports(ports: tuple[tuple[str, int | None], ...]) -> None:
    """One port per listener: each port (but 0, a free one each) serves one of them."""
    seen: dict[int, str] = {}
    for name, port in ports:
        if port:
            if port in seen:
                raise ConfigError(f"{name}: port {port} is --{seen[port].replace('_', '-')}'s too; give each listener its own port")
            seen[port] = name


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(obj, name)!r}")


def _aux_seeds(text: str) -> tuple[tuple[str, str, int], ...]:
    """Parse ``a1=127.0.0.1:7101,a2=127.0.0.1:7102`` into ``((id, host, port), ...)``."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        node_id, sep, addr = part.partition("=")
        if not sep or not node_id.strip():
            raise ValueError(f"aux seed {part!r} is not NODE_ID=HOST:PORT")
        host, port = parse_address(addr)
        seeds.append((node_id.strip(), host, port))
    ids = [s[0] for s in seeds]
    if len(set(ids)) != len(ids):
        raise ValueError("aux seed node ids must be unique")
    return tuple(seeds)


def _opt_hosts(text: Any) -> str | None:
    """A ZooKeeper connection string: HOST:PORT[,HOST:PORT...][/chroot]."""
    if text in (None, ""):
        return None
    hosts, slash, chroot = str(text).partition("/")
    parts = [p.strip() for p in hosts.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{text!r} is not HOST:PORT[,HOST:PORT...]")
    canon = []
    for part in parts:
        host, port = parse_address(part)
        canon.append(f"{host}:{port}")
    return ",".join(canon) + (slash + chroot if slash else "")


def _check_cluster_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name in (".", ".."):
        raise ConfigError(f"cluster: {name!r} must be letters, digits, '-', '_' or '.'")


def _opt_address(text: Any) -> str | None:
    if text in (None, ""):
        return None
    host, port = parse_address(str(text))
    return f"{host}:{port}"


#: Shortest cluster secret accepted.
MIN_SECRET_CHARS = 16


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Settings every node that serves the native protocol shares (aux nodes and masters).

    The roles' configs extend it; ``dcache.server.Service`` reads these.
    """

    host: str = opt("127.0.0.1", "address to listen on (loopback unless told otherwise)", _str)
    port: int = opt(0, "TCP port to listen on; 0 picks a free port", _int)
    node_id: str = opt("", "stable node id", _str)
    max_key_bytes: int = opt(MAX_KEY_BYTES, "largest key accepted", parse_size, "SIZE")
    max_value_bytes: int = opt(MAX_VALUE_BYTES, "largest value accepted", parse_size, "SIZE")
    max_frame_bytes: int = opt(MAX_FRAME_BYTES, "largest protocol frame accepted", parse_size, "SIZE")
    max_batch_keys: int = opt(MAX_BATCH_KEYS, "most keys or entries in one request (MGET, MSET, APPLY...); above: TOO_MANY_KEYS", _int, "N")
    max_clock_skew: float = opt(
        DEFAULT_MAX_SKEW_MS / 1000,
        "seconds a version from another node may be ahead of this node's clock; beyond: refused (CLOCK_SKEW)",
        _float,
        "S",
    )
    auth_token: str | None = opt(None, "token clients must present in HELLO (none: no auth)", _opt_str, "TOKEN")
    cluster_secret_file: str | None = opt(
        None,
        "file holding the cluster secret: masters and aux nodes prove they know it (HMAC challenge and response, "
        "never sent) before any cluster op; env DCACHE_CLUSTER_SECRET may hold the secret itself",
        _opt_str,
        "FILE",
    )
    cluster_secret: str | None = opt(
        None, "the cluster secret itself (prefer --cluster-secret-file or DCACHE_CLUSTER_SECRET: flags show in ps)", _opt_str, "SECRET"
    )
    insecure: bool = opt(
        False, "listen beyond loopback without a client token or a cluster secret (protected mode refuses it otherwise)", parse_bool, "BOOL"
    )
    max_connections: int = opt(10_000, "most client connections open at once; one more is refused (OVERLOADED)", _int, "N")
    max_input_buffer: int = opt(
        64 * 1024**2,
        "most bytes of partial frames buffered across all connections (a large frame, decoded as it arrives, also counts "
        "the objects decoded so far); past it the largest are closed",
        parse_size,
        "SIZE",
    )
    max_output_buffer: int = opt(
        256 * 1024**2,
        "most bytes of answers held for clients that do not read them, across all connections; past it the connections "
        "holding the most are closed",
        parse_size,
        "SIZE",
    )
    idle_timeout: float = opt(0.0, "close a connection that sent nothing for this many seconds; 0 = never", _float, "S")
    frame_timeout: float = opt(
        30.0, "close a connection whose frame is not complete this many seconds after it started; 0 = never", _float, "S"
    )
    shutdown_grace: float = opt(5.0, "seconds to let requests in flight finish on SIGTERM/SIGINT", _float, "S")
    log_level: str = opt("info", "debug, info, warning or error", _str)
    metrics_port: int | None = opt(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics on --host (none: off; 0 picks a free port)", _opt(_int), "PORT"
    )
    tls_cert: str | None = opt(
        None,
        "PEM certificate (leaf first, then its chain): the port serves TLS only, and every connection this node opens "
        "to another node is TLS with this certificate as its client certificate; needs --tls-key and --tls-ca; "
        "reloaded on SIGHUP",
        _opt_str,
        "FILE",
    )
    tls_key: str | None = opt(None, "PEM private key of --tls-cert, unencrypted (chmod 600); reloaded on SIGHUP", _opt_str, "FILE")
    tls_ca: str | None = opt(
        None,
        "PEM certificate(s) of the CA that signed the cluster's certificates: the nodes this node connects to, and "
        "clients with --tls-client-auth, are verified against it (host names are not checked between nodes)",
        _opt_str,
        "FILE",
    )
    tls_client_auth: bool = opt(
        False,
        "mutual TLS: refuse every connection (clients and other nodes alike) without a certificate signed by --tls-ca",
        parse_bool,
        "BOOL",
    )
    tls_handshake_timeout: float = opt(
        DEFAULT_HANDSHAKE_TIMEOUT_S, "close a connection whose TLS handshake is not done within this many seconds", _float, "S"
    )
    resp_port: int | None = opt(
        None,
        "also serve Redis's protocol (RESP) on this TCP port of --host, for Redis clients (none: off; 0 picks a free port, "
        "which the READY line shows as resp=HOST:PORT); see docs/RESP.md",
        _opt(_int),
        "PORT",
    )
    resp_allow_flush: bool = opt(
        False,
        "let RESP clients run FLUSHDB and FLUSHALL (admin commands: on a master they empty every aux node)",
        parse_bool,
        "BOOL",
    )

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        if self.resp_port is not None:
            _check_port("resp_port", self.resp_port)
        _check_distinct_ports((("port", self.port), ("metrics_port", self.metrics_port), ("resp_port", self.resp_port)))
        _check_positive(self, "max_key_bytes", "max_value_bytes", "max_frame_bytes", "max_batch_keys", "max_connections")
        _check_positive(self, "max_input_buffer", "max_output_buffer")
        for name in ("max_clock_skew", "idle_timeout", "frame_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not value >= 0 or value != value:
                raise ConfigError(f"{name}: must be >= 0, got {value!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug, info, warning or error")
        try:
            self.limits  # noqa: B018 - validates the combination
        except ValueError as exc:
            raise ConfigError(f"max_frame_bytes: {exc}") from None
        if self.cluster_secret_file and self.cluster_secret:
            raise ConfigError("cluster_secret: give the cluster secret in one place (--cluster-secret-file or DCACHE_CLUSTER_SECRET)")
        check_tls_settings(self.tls_cert, self.tls_key, self.tls_ca, self.tls_client_auth, daemon=True)
        if not self.tls_handshake_timeout > 0:
            raise ConfigError(f"tls_handshake_timeout: must be positive, got {self.tls_handshake_timeout!r}")

    def tls(self) -> TlsContexts | None:
        """This node's TLS contexts (its listener's and its links'), read from the files; ``None`` without ``tls_cert``.

        Raises:
            ConfigError: a file cannot be read, is not PEM, or the key does not match the certificate.
        """
        if self.tls_cert is None:
            return None
        return TlsContexts(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca, client_auth=self.tls_client_auth)

    def secret(self) -> bytes | None:
        """The cluster secret (``read_secret`` of ``cluster_secret_file`` and ``cluster_secret``); ``None`` if neither.

        Raises:
            ConfigError: the file cannot be read, or the secret is shorter than ``MIN_SECRET_CHARS``.
        """
        return read_secret(self.cluster_secret_file, self.cluster_secret)

    @property
    def limits(self) -> Limits:
        """The wire limits these settings imply."""
        return Limits(
            self.max_frame_bytes,
            self.max_key_bytes,
            self.max_value_bytes,
            self.max_batch_keys,
            int(self.max_clock_skew * 1000),
        )


@dataclass(frozen=True, slots=True)
class AuxConfig(NodeConfig):
    """Settings of an aux (data) node: ``dcache aux``."""

    port: int = opt(DEFAULT_AUX_PORT, "TCP port to listen on; 0 picks a free port", _int)
    node_id: str = opt("", "stable node id (default: aux-HOST-PORT of the bound address)", _str)
    data_dir: str | None = opt(None, "directory for snapshots (none: memory only)", _opt_str, "DIR")
    max_memory: int = opt(256 * 1024**2, "byte budget for keys + values + per-entry overhead", parse_size, "SIZE")
    max_items: int = opt(0, "most entries held; 0 = no item cap", _int)
    snapshot_interval: float = opt(10.0, "seconds between snapshots (needs --data-dir); 0 disables", _float, "S")
    expiry_interval: float = opt(0.1, "seconds between active-expiry sweeps", _float, "S")
    expiry_batch: int = opt(200, "most expired keys removed per sweep (bounds loop stalls)", _int)
    join: str | None = opt(None, "HOST:PORT of a master to join (and to hand data to on SIGTERM)", _opt_address, "ADDR")
    weight: float = opt(1.0, f"share of the ring relative to other aux nodes, at most {MAX_WEIGHT:g}", _float, "W")
    advertise: str | None = opt(None, "HOST:PORT masters should use to reach this node (default: the bound address)", _opt_address, "ADDR")
    leave_timeout: float = opt(120.0, "seconds to wait on SIGTERM for the master to move this node's data away", _float, "S")
    zookeeper: str | None = opt(None, "ZooKeeper ensemble HOST:PORT[,HOST:PORT...] to register in (instead of --join)", _opt_hosts, "HOSTS")
    cluster: str = opt("dcache", "cluster name: the ZooKeeper namespace /dcache/NAME (with --zookeeper)", _str, "NAME")
    zk_session_timeout: float = opt(10.0, "ZooKeeper session timeout: a dead node's registration ends after it", _float, "S")
    tracking_keys: int = opt(
        65536,
        "most keys tracked for masters' near caches (subscribing one more invalidates the oldest); 0 refuses tracking",
        _int,
        "N",
    )

    def __post_init__(self) -> None:
        NodeConfig.__post_init__(self)
        _check_positive(self, "leave_timeout", "zk_session_timeout")
        if not 0 < self.weight <= MAX_WEIGHT:  # what JOIN accepts: a master would refuse this node forever
            raise ConfigError(f"weight: must be in (0, {MAX_WEIGHT:g}], got {self.weight!r}")
        if self.tracking_keys < 0:
            raise ConfigError("tracking_keys: must be >= 0")
        if self.zookeeper and self.join:
            raise ConfigError("zookeeper: --zookeeper and --join are exclusive (register in ZooKeeper or join a master)")
        _check_cluster_name(self.cluster)
        _check_positive(self, "max_memory", "expiry_interval", "expiry_batch")
        from .lru.cache import CPYTHON_COST  # here: the lru package needs the server extra, the client does not

        smallest = CPYTHON_COST.entry_bytes(1, 0, False)
        if self.max_memory < smallest:
            raise ConfigError(
                f"max_memory: {self.max_memory} bytes cannot hold a single entry (the smallest is charged {smallest}); "
                "a size without a unit is bytes: give one, e.g. 256MiB"
            )
        if self.max_items < 0:
            raise ConfigError("max_items: must be >= 0")
        if self.snapshot_interval < 0:
            raise ConfigError("snapshot_interval: must be >= 0")


DEFAULT_MASTER_PORT = 7000


@dataclass(frozen=True, slots=True)
class MasterConfig(NodeConfig):
    """Settings of a master (router) node: ``dcache master``."""

    port: int = opt(DEFAULT_MASTER_PORT, "TCP port to listen on; 0 picks a free port", _int)
    node_id: str = opt("", "stable master id (default: master-HOST-PORT of the bound address)", _str)
    auth_token: str | None = opt(None, "token clients must present in HELLO; also sent to aux nodes", _opt_str, "TOKEN")
    aux: tuple[tuple[str, str, int], ...] = opt(
        (), "seed aux nodes as ID=HOST:PORT,ID=HOST:PORT (more can --join later)", _aux_seeds, "LIST"
    )
    coordinator: str | None = opt(
        None, "HOST:PORT of the coordinating master to follow (none: this master coordinates)", _opt_address, "ADDR"
    )
    replicas: int = opt(
        1,
        "copies of each key (on the first N distinct ring owners); taken when the cluster forms: a master that takes over a"
        " running cluster's ring keeps that ring's count and logs a WARNING",
        _int,
        "N",
    )
    write_quorum: int = opt(0, "owners that must apply a write before it is acknowledged; 0 = every live owner", _int, "N")
    aux_timeout: float = opt(
        2.0,
        "seconds to wait for an aux node's answer before trying the next owner "
        "(for a write, 2 s more: the node may hold it while near caches drop their copies)",
        _float,
        "S",
    )
    suspect_after: float = opt(
        0.5,
        "an aux node that has answered nothing for this many seconds while requests wait is suspected: "
        "reads skip it and writes stop waiting for it once another owner applied them",
        _float,
        "S",
    )
    aux_connections: int = opt(
        2,
        "connections kept to each aux node: every request goes on the first, the others stand by to take over at once if it closes",
        _int,
        "N",
    )
    health_interval: float = opt(0.4, "seconds between health pings to each aux node (coordinator)", _float, "S")
    health_timeout: float = opt(0.5, "seconds a health ping may take before it counts as missed", _float, "S")
    health_failures: int = opt(3, "missed pings in a row that mark an aux node down", _int, "K")
    follow_interval: float = opt(0.5, "seconds between ring polls of a follower master", _float, "S")
    zookeeper: str | None = opt(
        None,
        "ZooKeeper ensemble HOST:PORT[,HOST:PORT...]: membership, leader election and the ring live there (instead of --coordinator)",
        _opt_hosts,
        "HOSTS",
    )
    cluster: str = opt("dcache", "cluster name: the ZooKeeper namespace /dcache/NAME (with --zookeeper)", _str, "NAME")
    zk_session_timeout: float = opt(10.0, "ZooKeeper session timeout: a dead master's leadership ends after it", _float, "S")
    near_cache_size: int = opt(
        16 * 1024**2,
        "bytes of hot keys this master answers itself, kept coherent by the aux nodes' invalidations; 0 = off",
        parse_size,
        "SIZE",
    )
    near_cache_min_hits: int = opt(
        8,
        "reads a near-cache copy must answer before the key changes, or the key is not copied again for a second, "
        "twice as long each time in a row up to 16 s (keys written about as often as read cost more to copy "
        "than they save); 0: always copy hot keys",
        _int,
        "N",
    )
    migration_batch: int = opt(
        5000, "keys per page when moving data between aux nodes (at most the aux nodes' --max-batch-keys)", _int, "N"
    )
    migration_rate: int = opt(0, "most keys moved per second per stream (pages are paced); 0 = unthrottled", _int, "N")
    recovery_window: float = opt(
        4.0,
        "a restarted coordinator that no follower hands the last ring waits this long for the aux nodes "
        "an earlier coordinator admitted to re-announce, then builds one ring of all of them",
        _float,
        "S",
    )
    expect_aux: int = opt(
        0,
        "aux nodes a restarted coordinator expects to re-announce: its recovery window ends as soon as this many did "
        "(0: it lasts --recovery-window; dcache cluster sets it to its number of aux nodes)",
        _int,
        "N",
    )

    def __post_init__(self) -> None:
        NodeConfig.__post_init__(self)
        if self.recovery_window < 0:
            raise ConfigError("recovery_window: must be >= 0")
        if self.expect_aux < 0:
            raise ConfigError("expect_aux: must be >= 0")
        _check_positive(self, "aux_timeout", "aux_connections", "suspect_after")
        _check_positive(self, "health_interval", "health_timeout", "health_failures", "follow_interval", "migration_batch", "replicas")
        _check_positive(self, "zk_session_timeout")
        if self.zookeeper and (self.coordinator or self.aux):
            raise ConfigError("zookeeper: --zookeeper excludes --coordinator and --aux (membership lives in ZooKeeper)")
        _check_cluster_name(self.cluster)
        if self.write_quorum < 0 or self.write_quorum > self.replicas:
            raise ConfigError(f"write_quorum: must be between 0 and replicas ({self.replicas})")
        if self.migration_rate < 0:
            raise ConfigError("migration_rate: must be >= 0")
        if self.near_cache_size < 0:
            raise ConfigError("near_cache_size: must be >= 0")
        if self.near_cache_min_hits < 0:
            raise ConfigError("near_cache_min_hits: must be >= 0")


C = TypeVar("C")


def config_fields(cls: type) -> list[Any]:
    """The dataclass fields of a config class, in declaration order."""
    return list(fields(cls))


def load_config(
    cls: type[C],
    section: str,
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> C:
    """Build a ``cls`` config from defaults, a TOML file, the environment and flags.

    ``flags`` holds only the options actually given on the command line,
    keyed by field name, already parsed. ``env`` defaults to ``os.environ``;
    a field ``max_memory`` is read from ``DCACHE_MAX_MEMORY``.

    The file may hold a table for each role (``ROLE_SECTIONS``, so one file
    can serve every daemon); only ``section``'s is used, but every table's
    keys are checked, so a misspelt key never passes silently.

    Raises:
        ConfigError: a bad value (naming the field and its source), or a
            file that cannot be read, is not TOML, or has a key outside the
            role tables, an unknown table or an unknown key (naming the file
            and the key).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        _check_layout(doc, config_file, {**ROLE_SECTIONS, section: cls})
        table = doc.get(section, {})
        for key, raw in table.items():
            name = key.replace("-", "_")
            values[name] = _parse_field(known[name], raw, f"config file {config_file}: [{section}] {key}")
    for name, f in known.items():
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _parse_field(f, env[var], var)
    for name, value in (flags or {}).items():
        if name not in known:
            raise ConfigError(f"unknown option {name!r}")
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _check_layout(doc: Mapping[str, Any], path: str, sections: Mapping[str, type]) -> None:
    """Refuse what a config file may not hold: top-level keys, unknown tables, unknown keys in a table."""
    tables = ", ".join(f"[{name}]" for name in sections)
    for key, value in doc.items():
        cls = sections.get(key)
        if not isinstance(value, dict):
            if cls is not None:
                raise ConfigError(f"config file {path}: {key} must be a table ([{key}]), not a value")
            raise ConfigError(f"config file {path}: {key!r} is outside a table; settings go in a role's table ({tables})")
        if cls is None:
            raise ConfigError(f"config file {path}: unknown table [{key}] (the tables are {tables})")
        names = {f.name for f in fields(cls)}
        for name in value:
            if name.replace("-", "_") not in names:
                raise ConfigError(f"config file {path}: [{key}] has unknown key {name!r} (see dcache {key} --help)")


def _parse_field(f: Any, raw: Any, source: str) -> Any:
    parse = f.metadata.get("parse")
    if parse is None:
        return raw
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def field_default(f: Any) -> Any:
    """A field's default value (for help texts)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


DEFAULT_HTTP_PORT = 8080
#: Default request body cap of the HTTP shim: a 1 MiB value plus room for the key and the JSON around it.
DEFAULT_HTTP_MAX_BODY_BYTES = 1024**2 + 4096


def _masters(text: Any) -> tuple[str, ...]:
    """Parse ``host:port,host:port`` (or a TOML list of them) into normalized ``host:port`` strings."""
    parts = str(text).split(",") if isinstance(text, str) else [str(t) for t in text]
    out = []
    for part in parts:
        if part.strip():
            host, port = parse_address(part)
            out.append(format_address(host, port))
    if not out:
        raise ValueError("at least one master HOST:PORT is required")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Settings of the HTTP shim: ``dcache http`` (JSON and raw bytes over HTTP, through ``dcache.Client``)."""

    host: str = opt("127.0.0.1", "address to listen on (loopback unless told otherwise)", _str)
    port: int = opt(DEFAULT_HTTP_PORT, "TCP port to listen on; 0 picks a free port", _int)
    master: tuple[str, ...] = opt(
        (f"127.0.0.1:{DEFAULT_MASTER_PORT}",), "masters as HOST:PORT[,HOST:PORT] (the client fails over between them)", _masters, "LIST"
    )
    timeout: float = opt(5.0, "seconds one request may spend in the cluster (then 504)", _float, "S")
    health_timeout: float = opt(1.0, "seconds /health waits for each master's PING", _float, "S")
    client_max_size: int = opt(DEFAULT_HTTP_MAX_BODY_BYTES, "largest request body accepted (then 413)", parse_size, "SIZE")
    max_key_bytes: int = opt(MAX_KEY_BYTES, "largest key accepted, in UTF-8 bytes (then 414, or 400 in a JSON body)", parse_size, "SIZE")
    auth_token: str | None = opt(None, "token sent in HELLO to the masters (none: no auth)", _opt_str, "TOKEN")
    http_token: str | None = opt(
        None,
        "token HTTP clients must send as 'Authorization: Bearer TOKEN' on every route but /health and /metrics "
        "(none: no auth; env DCACHE_HTTP_TOKEN)",
        _opt_str,
        "TOKEN",
    )
    insecure: bool = opt(False, "listen beyond loopback without --http-token (protected mode refuses it otherwise)", parse_bool, "BOOL")
    shutdown_grace: float = opt(5.0, "seconds to let in-flight requests finish on SIGTERM/SIGINT", _float, "S")
    log_level: str = opt("info", "debug (also logs every request), info, warning or error", _str)
    workers: int = opt(
        1,
        "processes serving the port together (SO_REUSEPORT), started, supervised and stopped by one parent; "
        '/metrics merges theirs (docs/HTTP.md, "Workers")',
        _int,
        "N",
    )
    read_batch: int = opt(
        64,
        "at most this many GET requests go to the cluster as one MGET (the reads of one loop iteration are batched); 1: a GET each",
        _int,
        "N",
    )
    write_batch: int = opt(
        64,
        "at most this many writes (POST /data, PUT /data/{key}, POST /api/post) with the same TTL go to the cluster as one MSET "
        "(the writes of one loop iteration are batched); 1: a SET each",
        _int,
        "N",
    )
    tls_cert: str | None = opt(
        None,
        "PEM certificate (leaf first, then its chain): the shim serves HTTPS only, and presents it as its client "
        "certificate to masters that ask (mutual TLS); needs --tls-key; reloaded on SIGHUP",
        _opt_str,
        "FILE",
    )
    tls_key: str | None = opt(None, "PEM private key of --tls-cert, unencrypted (chmod 600); reloaded on SIGHUP", _opt_str, "FILE")
    tls_ca: str | None = opt(
        None,
        "PEM certificate(s) of the CA that signed the masters' certificates: the shim speaks TLS to the masters and "
        "verifies them against it (not their host names); with --tls-client-auth, HTTPS clients' certificates too",
        _opt_str,
        "FILE",
    )
    tls_client_auth: bool = opt(
        False, "refuse HTTPS clients without a certificate signed by --tls-ca (needs --tls-cert, --tls-key, --tls-ca)", parse_bool, "BOOL"
    )

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        _check_positive(self, "timeout", "health_timeout", "client_max_size", "max_key_bytes", "read_batch", "write_batch", "workers")
        check_tls_settings(self.tls_cert, self.tls_key, self.tls_ca, self.tls_client_auth, daemon=False)
        if not self.master:
            raise ConfigError("master: at least one HOST:PORT is required")
        if self.shutdown_grace < 0:
            raise ConfigError("shutdown_grace: must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug, info, warning or error")

    def tls(self) -> TlsContexts | None:
        """The shim's TLS contexts: HTTPS (with ``tls_cert``), TLS to the masters (with ``tls_ca``); ``None`` without either.

        Raises:
            ConfigError: a file cannot be read, is not PEM, or the key does not match the certificate.
        """
        if self.tls_cert is None and self.tls_ca is None:
            return None
        return TlsContexts(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca, client_auth=self.tls_client_auth)


def read_secret(path: str | None, value: str | None) -> bytes | None:
    """A cluster secret: the contents of ``path`` (stripped), else ``value``; ``None`` if neither is given.

    Raises:
        ConfigError: ``path`` cannot be read, or the secret is shorter than ``MIN_SECRET_CHARS``.
    """
    if path:
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cluster_secret_file: cannot read {path}: {exc.strerror}") from None
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"cluster_secret_file: {path} holds less than {MIN_SECRET_CHARS} characters")
        return secret
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise ConfigError(f"cluster_secret: DCACHE_CLUSTER_SECRET holds less than {MIN_SECRET_CHARS} characters")
        return value.encode()
    return None


#: The tables a config file may hold, one per role, and the config each one fills.
ROLE_SECTIONS: dict[str, type] = {"aux": AuxConfig, "master": MasterConfig, "http": HttpConfig}
