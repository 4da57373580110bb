"""The ``dcache`` command: one subcommand per role and per tool.

This is the edge of the program: the only module that reads argv. Daemon
flags are generated from the config dataclasses (``dcache.config``), so
``--help``, ``DCACHE_*`` variables and config-file keys always agree.

Exit codes of the tools (get, set, del, stats, ...), for scripts:

* 0 - success
* 1 - the key does not exist, or a SET condition (--nx/--xx) was not met
* 2 - usage or configuration error: a bad flag or setting, an argument the
  client refuses before sending (``InvalidArgumentError``: an empty key, a
  TTL <= 0...) or a key or value the server refuses as too large, a file
  that cannot be read or written, a tool pointed at the wrong kind of node
* 3 - could not reach a dcache server at --addr: refused, unknown host, no
  answer in time, or a server of another protocol (HTTP, RESP) answered
* 4 - the server answered with an error

The daemons exit 2 when they cannot start with their settings (a bad value,
a port in use, an unusable --data-dir), with one line saying why.

Every error is one line on stderr: ``dcache COMMAND: what failed: why;
what to do``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import fields
from functools import partial
from typing import Any, NoReturn

from .config import AuxConfig, HttpConfig, MasterConfig, field_default, format_size, load_config, parse_size, read_secret
from .errors import ConfigError, DCacheError, ServerError
from .net import listen_error, protected_mode

__all__ = ["main", "EXIT_OK", "EXIT_MISSING", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_SERVER_ERROR"]

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_SERVER_ERROR = 4

DEFAULT_ADDR = "127.0.0.1:7000"

#: The distribution name on PyPI (``pip install dcache-cluster``); the import name is ``dcache``.
DISTRIBUTION = "dcache-cluster"

#: Modules the ``server`` extra brings (``pip install 'dcache-cluster[server]'``), which the
#: daemons, ``dump``/``restore`` and ``bench`` import; the client and the other tools need none.
SERVER_MODULES = ("uvloop", "xxhash", "aiohttp", "httptools", "prometheus_client", "kazoo", "hiredis")

_EXIT_CODES_HELP = """\
exit codes: 0 success; 1 key missing or SET condition not met; 2 usage or
configuration error (also a bad argument, a key or value too large);
3 no dcache server reached (refused, unknown host, timed out, another
protocol answered); 4 server error.
"""

_DAEMON_EPILOG = """\
SIZE values are bytes, or a number with a unit: KB, MB, GB (powers of 1000)
or KiB, MiB, GiB (powers of 1024); e.g. 256MiB = 268435456 bytes.
Every flag is also a DCACHE_* environment variable and a key of the role's
table in the --config file (docs/OPERATIONS.md, "Configuration file").
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: what is wrong and where the help is (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def version() -> str:
    """The installed version, as the packaging metadata holds it (``dcache.__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def missing_server_modules() -> list[str]:
    """The modules of the ``server`` extra that are not installed (empty: the extra is there)."""
    from importlib.util import find_spec

    return [name for name in SERVER_MODULES if find_spec(name) is None]


def _needs_server(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a subcommand that needs the ``server`` extra: without it, one line and exit 2 instead of an ImportError."""

    def run(args: argparse.Namespace) -> int:
        missing = missing_server_modules()
        if missing:
            print(
                f"dcache {args.command}: needs the server extra, which is not installed (missing: {', '.join(missing)}); "
                f"install it with: pip install '{DISTRIBUTION}[server]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return func(args)

    return run


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per config field; only flags actually given override."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("DCACHE_CONFIG"),
        help="TOML config file (env DCACHE_CONFIG); precedence: defaults < file < DCACHE_* env < flags",
    )
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        env = "DCACHE_" + f.name.upper()
        shown = _shown_default(f)
        help_text = f"{f.metadata['help']} ({'' if shown is None else f'default: {shown}; '}env {env})"
        parser.add_argument(
            flag,
            dest=f.name,
            type=_arg_type(f.metadata["parse"]),
            metavar=f.metadata.get("metavar") or f.name.upper().split("_")[-1],
            default=argparse.SUPPRESS,
            help=help_text,
        )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (protected mode included), print it as JSON and exit without starting",
    )


def _shown_default(f: Any) -> str | None:
    """A config field's default as ``--help`` shows it, or ``None`` if the help text already says it or there is none."""
    default = field_default(f)
    if "(default" in f.metadata["help"] or default is None or default == "" or default == ():
        return None
    if f.metadata["parse"] is parse_size:
        return format_size(default)
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(str(item) for item in default)
    return str(default)


def _arg_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """A field's parser as an argparse ``type``: its own message on a bad value (argparse would name the function)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _config_from_args(cls: type, section: str, args: argparse.Namespace) -> Any:
    names = {f.name for f in fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, section, flags, config_file=args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _print_config(config: Any) -> int:
    shown = {f.name: getattr(config, f.name) for f in fields(config)}
    for secret in ("auth_token", "cluster_secret", "http_token"):
        if shown.get(secret):
            shown[secret] = "<redacted>"
    print(json.dumps(shown, indent=2))
    return EXIT_OK


def _check_protected_mode(config: Any, section: str) -> None:
    """The protected-mode check the daemon makes before it listens, for ``--check-config``.

    It looks at whether a credential is configured, not at the secret file
    itself (``--check-config`` may run where that file is not mounted).

    Raises:
        ConfigError: the daemon would refuse to start (the same one-line message).
    """
    if isinstance(config, HttpConfig):
        protected_mode(config.host, config.http_token is not None, config.insecure, "HTTP shim", "--http-token")
        return
    credential = config.auth_token is not None or config.cluster_secret_file is not None or config.cluster_secret is not None
    protected_mode(config.host, credential, config.insecure, section, "--auth-token or --cluster-secret-file")


def _run_role(cls: type, section: str, args: argparse.Namespace, run: Callable[[Any], int]) -> int:
    """Build a role's config from defaults, file, env and flags; check it or run the role."""
    config = _config_from_args(cls, section, args)
    if args.check_config:
        _check_protected_mode(config, section)
        return _print_config(config)
    _setup_logging(config.log_level)
    # SIGHUP never stops a daemon (dcache.daemon): ignored while it starts (loading a
    # large snapshot takes seconds), then its own handler takes over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return run(config)
    except OSError as exc:  # the listener could not bind (the data dir and the metrics port raise ConfigError)
        raise listen_error(exc, config.host, config.port, "--port") from None


def _cmd_aux(args: argparse.Namespace) -> int:
    from .auxnode import run_aux

    return _run_role(AuxConfig, "aux", args, run_aux)


def _cmd_master(args: argparse.Namespace) -> int:
    from .master import run_master

    return _run_role(MasterConfig, "master", args, run_master)


def _cmd_http(args: argparse.Namespace) -> int:
    from .http import run_http

    return _run_role(HttpConfig, "http", args, lambda config: run_http(config, partial(_setup_logging, config.log_level)))


def _cmd_cluster(args: argparse.Namespace) -> int:
    from .tools.cluster import ClusterOptions, run_cluster

    return run_cluster(_options(ClusterOptions, args))


# -- tools ---------------------------------------------------------------------


def _flag(parser: argparse.ArgumentParser, cls: type, name: str, help: str, *, show_default: bool = True, **kw: Any) -> None:
    """``--name`` for field ``name`` of a tool's options dataclass ``cls``.

    Given, the flag sets the field; not given, the field's own default stands
    (so defaults have one home, the dataclass; ``--help`` shows them from it).
    """
    [f] = [f for f in fields(cls) if f.name == name]
    parser.add_argument(
        "--" + name.replace("_", "-"),
        dest=name,
        default=argparse.SUPPRESS,
        help=f"{help} (default: {field_default(f)})" if show_default else help,
        **kw,
    )


def _options(cls: type, args: argparse.Namespace) -> Any:
    """A tool's options dataclass ``cls`` from the flags that were given (see ``_flag``)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _add_addr(parser: argparse.ArgumentParser, timeout: float = 5.0) -> None:
    parser.add_argument(
        "--addr",
        default=os.environ.get("DCACHE_ADDR", DEFAULT_ADDR),
        help=f"server (master or aux) as host:port; several comma-separated for failover (default: {DEFAULT_ADDR}; env DCACHE_ADDR)",
    )
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for an answer (default: {timeout:g})")
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("DCACHE_AUTH_TOKEN"),
        help="auth token for HELLO (env DCACHE_AUTH_TOKEN)",
    )
    _add_tls(parser)


def _add_tls(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``: TLS to the server, given any of them."""
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("DCACHE_TLS_CA"),
        metavar="FILE",
        help="speak TLS and verify the server's certificate (chain, and the host or IP of --addr) against this PEM CA "
        "(env DCACHE_TLS_CA; without it, --tls-cert alone uses the system's trusted CAs)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("DCACHE_TLS_CERT"),
        metavar="FILE",
        help="PEM client certificate for servers that require one (--tls-client-auth); needs --tls-key (env DCACHE_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("DCACHE_TLS_KEY"), metavar="FILE", help="PEM key of --tls-cert (env DCACHE_TLS_KEY)"
    )


def _endpoints(args: argparse.Namespace) -> list[str]:
    """The ``host:port`` endpoints of ``--addr`` (comma-separated), checked before anything connects.

    Raises:
        ConfigError: an endpoint is not ``host:port`` or there is none (naming ``--addr``, not the client's field).
    """
    from .address import format_address, parse_address

    endpoints = [a.strip() for a in args.addr.split(",") if a.strip()]
    if not endpoints:
        raise ConfigError("--addr: at least one HOST:PORT is required")
    try:
        return [format_address(*parse_address(a)) for a in endpoints]
    except ValueError as exc:
        raise ConfigError(f"--addr: {exc}") from None


def _client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of a tool's connections, from ``--tls-*``; ``None`` (plain TCP) without them.

    Raises:
        ConfigError: a file cannot be read or is not what it should be.
    """
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    from .tls import client_context

    return client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _add_secret(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-secret-file",
        default=os.environ.get("DCACHE_CLUSTER_SECRET_FILE"),
        metavar="FILE",
        help="file holding the cluster secret, which this command proves to read or write aux nodes directly "
        "(env DCACHE_CLUSTER_SECRET_FILE, or DCACHE_CLUSTER_SECRET for the secret itself)",
    )


def _secret(args: argparse.Namespace) -> bytes | None:
    return read_secret(args.cluster_secret_file, os.environ.get("DCACHE_CLUSTER_SECRET"))


def _run_tool(args: argparse.Namespace, body: Callable[[Any], Coroutine[Any, Any, int]], cluster_secret: bytes | None = None) -> int:
    """Connect a client (proving ``cluster_secret`` if given), run ``body(client)``, map errors onto exit codes (``_report``)."""
    from .client import Client

    context = _client_ssl(args)
    try:
        endpoints = _endpoints(args)
    except ConfigError as exc:
        return _report(args, exc)

    async def go() -> int:
        async with Client(
            endpoints,
            timeout=args.timeout,
            connect_timeout=args.timeout,
            auth_token=args.auth_token,
            cluster_secret=cluster_secret,
            client_name="dcache-cli",
            ssl=context,
        ) as client:
            return await body(client)

    try:
        return asyncio.run(go())
    except BrokenPipeError:
        # Socket failures reach us as ConnectionError subclasses from the
        # client; a broken pipe is stdout's reader going away (`... | head`).
        _silence_stdout()
        return EXIT_OK
    except (DCacheError, OSError, TimeoutError, RuntimeError) as exc:
        return _report(args, exc)


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    """Print one line for a tool's failure (what failed, why, what to do) and return its exit code.

    ``InvalidArgumentError`` and a server's refusal of a too-large key or
    value are the caller's input: exit 2 like any usage error; other server
    answers exit 4; not reaching a dcache server (refused, unknown host, no
    answer, another protocol) exits 3.
    """
    from .errors import AuthError, InvalidArgumentError, KeyTooLargeError, MembershipError, ValueTooLargeError
    from .lru.snapshot import SnapshotError

    addr = getattr(args, "addr", "")
    prefix = f"dcache {args.command}:"
    code = EXIT_UNREACHABLE
    if isinstance(exc, SnapshotError):
        line, code = f"{prefix} {getattr(args, 'infile', '')} is not a valid dcache dump: {exc}", EXIT_USAGE
    elif isinstance(exc, (InvalidArgumentError, ConfigError)):
        line, code = f"{prefix} {exc}", EXIT_USAGE
    elif isinstance(exc, (KeyTooLargeError, ValueTooLargeError)):
        line, code = f"{prefix} the server at {addr} refused the request: {exc.message}", EXIT_USAGE
    elif isinstance(exc, AuthError):
        line = (
            f"{prefix} the server at {addr} refused the credentials: {exc.message}; give the token with --auth-token (or DCACHE_AUTH_TOKEN)"
        )
        code = EXIT_SERVER_ERROR
    elif isinstance(exc, MembershipError):
        line, code = f"{prefix} the master at {addr} refused: {exc.message}", EXIT_SERVER_ERROR
    elif isinstance(exc, ServerError):
        line, code = f"{prefix} the server at {addr} answered an error: {exc.message} ({exc.__class__.__name__})", EXIT_SERVER_ERROR
    elif isinstance(exc, RuntimeError):  # dump: the cluster kept moving data, or a range has no live owner
        line = f"{prefix} {exc}"
    elif isinstance(exc, OSError) and exc.filename is not None:  # a file the command reads or writes
        line, code = f"{prefix} {exc.filename}: {exc.strerror or exc}", EXIT_USAGE
    else:
        line = f"{prefix} cannot reach a dcache server at {addr}: {_why_unreachable(exc, args)}"
    print(line, file=sys.stderr)
    return code


def _why_unreachable(exc: BaseException, args: argparse.Namespace) -> str:
    """Why a connection failed, from the root cause under the client's wrapping, and what to try."""
    import socket
    import ssl

    from .errors import ForeignProtocolError

    root = exc
    # Not down to a CancelledError: asyncio.timeout raises TimeoutError from the cancellation it made.
    while root.__cause__ is not None and not isinstance(root.__cause__, asyncio.CancelledError):
        root = root.__cause__
    start = "is the cluster running (make run, or dcache cluster)? is --addr right?"
    if isinstance(root, ForeignProtocolError):
        return str(root)
    if isinstance(root, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({root.verify_message}, CERTIFICATE_VERIFY_FAILED); is --tls-ca the CA that signed it?"
    if isinstance(root, ssl.SSLError):
        return f"TLS handshake failed ({root.reason or root}); is it a TLS port, and is --tls-cert/--tls-key a certificate the server's CA signed?"
    if not getattr(args, "tls_ca", None) and isinstance(root, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
        start += " does the server use TLS (then give --tls-ca)?"
    if isinstance(root, ConnectionRefusedError):
        return f"connection refused (nothing listens there); {start}"
    if isinstance(root, socket.gaierror):
        return f"unknown host name; {start}"
    if isinstance(root, TimeoutError):
        if getattr(args, "timeout", None) is None:  # bench has no --timeout
            return f"no answer in time; {start}"
        return f"no answer within {args.timeout} s (--timeout); {start}"
    if isinstance(root, OSError) and root.strerror:
        return f"{root.strerror.lower()}; {start}"
    if isinstance(root, ConnectionResetError):
        return f"{root}; {start}"
    return f"{root or root.__class__.__name__}"


def _silence_stdout() -> None:
    """Point stdout at /dev/null (its reader is gone), so the exit flush is quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _value_json(key: str, value: bytes | None) -> dict[str, Any]:
    """``get --json``'s object: the value as text if it is UTF-8, else base64 under its own name; ``null`` if missing."""
    if value is None:
        return {"key": key, "value": None}
    try:
        return {"key": key, "value": value.decode()}
    except UnicodeDecodeError:
        import base64

        return {"key": key, "value_base64": base64.b64encode(value).decode()}


def _write_value(value: bytes) -> None:
    sys.stdout.buffer.write(value + b"\n")
    sys.stdout.flush()


def _cmd_get(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        value = await client.get(args.key)
        if args.json:
            print(json.dumps(_value_json(args.key, value)))
            return EXIT_MISSING if value is None else EXIT_OK
        if value is None:
            print(f"(missing) {args.key}", file=sys.stderr)
            return EXIT_MISSING
        _write_value(value)
        return EXIT_OK

    return _run_tool(args, body)


def _cmd_set(args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()

    async def body(client: Any) -> int:
        stored = await client.set(args.key, value, ttl=args.ttl, nx=args.nx, xx=args.xx)
        if not stored:
            print("not stored (condition not met)", file=sys.stderr)
            return EXIT_MISSING
        print("OK")
        return EXIT_OK

    return _run_tool(args, body)


def _cmd_del(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        deleted = 0
        for key in args.keys:
            deleted += bool(await client.delete(key))
        print(deleted)
        return EXIT_OK if deleted else EXIT_MISSING

    return _run_tool(args, body)


def _cmd_stats(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        stats = await client.stats()
        if args.json:
            print(json.dumps(stats, indent=2, sort_keys=True, default=str))
        else:
            print(_format_stats(stats))
        return EXIT_OK

    return _run_tool(args, body)


#: The fields of a master's STATS that sum the aux nodes' (``MasterNode.cluster_stats``).
_AUX_TOTALS = frozenset(
    ("aux_items", "aux_bytes", "aux_max_bytes", "aux_hits", "aux_misses", "aux_evictions", "aux_expirations", "aux_nodes_answering")
)

#: An aux node's near-cache tracking fields (``Tracker.stats``).
_TRACKING = frozenset(
    (
        "tracked_keys",
        "tracking_max_keys",
        "tracking_subscribers",
        "invalidation_pushes",
        "invalidations",
        "tracking_overflows",
        "invalidation_timeouts",
        "answers_held_for_invalidation",
    )
)

#: The sections ``dcache stats`` prints after a node's own fields: a heading, and which fields go under it.
_STATS_SECTIONS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("# near cache (--near-cache-size): reads this master answered from its copies of hot keys", lambda k: k.startswith("near_cache_")),
    ("# near-cache tracking: the masters' copies of this node's keys, and telling them first of a change", _TRACKING.__contains__),
    (
        "# totals over the aux nodes that answered: every replica's copy, and the masters' replica, fallback and repair reads",
        _AUX_TOTALS.__contains__,
    ),
)


def _format_stats(stats: dict[str, Any]) -> str:
    """STATS as ``name  value`` lines: the node's own fields, then each section of ``_STATS_SECTIONS`` it has under its heading.

    On a master, the near cache's fields, then the ``aux_*`` totals (its
    ``hits`` and ``misses`` are what its clients saw; the aux totals count
    every copy and every read the masters made on the way); on an aux node,
    its near-cache tracking (docs/OPERATIONS.md, "dcache stats").
    """
    width = max((len(k) for k in stats), default=0)
    keys = sorted(stats)
    own = [k for k in keys if not any(within(k) for _, within in _STATS_SECTIONS)]
    lines = [f"{key:<{width}}  {stats[key]}" for key in own]
    for heading, within in _STATS_SECTIONS:
        section = [k for k in keys if within(k)]
        if section:
            lines += ["", heading, *(f"{key:<{width}}  {stats[key]}" for key in section)]
    return "\n".join(lines)


def _format_ring(info: dict[str, Any]) -> str:
    lines = [
        f"epoch {info['epoch']} (seq {info['seq']})  replicas {info['replicas']}  "
        f"{'MIGRATING' if info['migrating'] else 'stable'}  via master {info['master']} ({info['membership'].get('role')})"
    ]
    header = f"{'node':<16} {'address':<22} {'state':<8} {'share':>7} {'items':>10} {'bytes':>12}  connected"
    lines.append(header)
    for n in info["nodes"]:
        share = f"{n['share'] * 100:.1f}%"
        items = "-" if n["items"] is None else str(n["items"])
        nbytes = "-" if n["bytes"] is None else str(n["bytes"])
        lines.append(f"{n['node_id']:<16} {n['addr']:<22} {n['state']:<8} {share:>7} {items:>10} {nbytes:>12}  {n['connected']}")
    for n in info["nodes"]:
        if n.get("auth_error"):
            lines.append(f"NOT ROUTED: {n['node_id']} refused this master's credentials: {n['auth_error']}")
        if n.get("cluster_error"):
            lines.append(f"NOT ROUTED: {n['node_id']} belongs to another cluster: {n['cluster_error']}")
    membership = info["membership"]
    mig = membership.get("migration")
    if mig:
        lines.append(
            f"migration: {mig['state']} epoch {mig['epoch']}  streams {mig['streams_done']}/{mig['streams_total']}  "
            f"keys moved {mig['keys_moved']} (total {mig['keys_moved_total']})  tombstones {mig['tombstones_moved']}"
        )
        for st in mig.get("streams", []):
            lines.append(
                f"  {st['source']} -> {st['destination']}: {st['keys']} keys over {st['ranges']} ranges{'  done' if st['done'] else ''}"
            )
    if membership.get("role") == "follower":
        reach = "reachable" if membership.get("coordinator_reachable") else f"UNREACHABLE ({membership.get('coordinator_error')})"
        lines.append(f"coordinator {membership.get('coordinator')}: {reach}")
    if "zookeeper" in membership:
        state = membership.get("zookeeper_state")
        if not membership.get("zookeeper_connected"):
            state = f"{state}, disconnected for {membership.get('zookeeper_disconnected_s')} s: routing by the last ring"
        lines.append(
            f"zookeeper {membership['zookeeper']} ({state}), cluster {membership.get('cluster')}, leader {membership.get('leader')}"
        )
    recovery = membership.get("recovery")
    if recovery:
        line = f"restarted: ring recovered from {recovery['from']} at epoch {recovery['epoch']}"
        if "reconciled" in recovery:  # rebuilt from re-announcements: the owners are reconciled first
            done = recovery["reconciled"]
            line += "; nodes' copies outside their ranges " + ("moved to their owners" if done else "being moved to their owners")
            if info["replicas"] > 1:
                line += ", and each owner's copies " + ("sent to the other owners" if done else "being sent to the other owners")
            if not done and info["replicas"] > 1:
                line += " (keys may miss until then; reads ask every owner of a key meanwhile)"
            elif not done:
                line += " (keys may miss until then)"
        lines.append(line)
    elif info.get("reads_every_owner") and membership.get("zookeeper_state") in ("suspended", "lost"):
        lines.append("reads ask every owner of a key while this master is out of touch with ZooKeeper")
    elif info.get("reads_every_owner"):  # a follower of a coordinator whose rebuilt ring is being reconciled
        lines.append("reads ask every owner of a key until the coordinator's rebuilt ring is reconciled")
    for ev in membership.get("health_events", []):
        lines.append(f"health: {ev['node_id']} {ev['state']} at {ev['at_ms']}: {ev['why']}")
    return "\n".join(lines)


async def _is_master(client: Any, tool: str) -> bool:
    """Whether ``client``'s node is a master; if not, say on stderr that ``dcache TOOL`` needs one."""
    hello = await client.server_info()
    if hello.get("role") == "master":
        return True
    print(
        f"dcache {tool}: {client.current_endpoint} is an aux node ({hello.get('node_id')}), and {tool} needs a master: "
        "point --addr at a master (7000 by default)",
        file=sys.stderr,
    )
    return False


def _cmd_ring(args: argparse.Namespace) -> int:
    from .protocol import Op

    async def body(client: Any) -> int:
        if not await _is_master(client, "ring"):
            return EXIT_USAGE
        info = await client.execute(Op.RING)
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True, default=str))
        else:
            print(_format_ring(info))
        return EXIT_OK

    return _run_tool(args, body)


def _cmd_forget(args: argparse.Namespace) -> int:
    from .errors import UnknownOpError
    from .protocol import Op

    async def body(client: Any) -> int:
        if not await _is_master(client, "forget"):
            return EXIT_USAGE
        try:
            epoch = await client.execute(Op.FORGET, args.node_id, args.force)
        except UnknownOpError:
            print(
                f"dcache forget: the master at {client.current_endpoint} (or the coordinator a follower forwards FORGET to) "
                "does not know FORGET (an older version): upgrade it",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(f"forgot aux node {args.node_id}: ring epoch {epoch}")
        return EXIT_OK

    try:
        secret = _secret(args)
    except ConfigError as exc:
        return _report(args, exc)
    return _run_tool(args, body, cluster_secret=secret)


def _hot_keys_json(node_id: str, hot: list[list[Any]]) -> dict[str, Any]:
    """``hotkeys --json``'s object: each key as text if it is UTF-8, else base64 under ``key_base64`` (as ``get --json``)."""
    import base64

    keys: list[dict[str, Any]] = []
    for key, rate in hot:
        try:
            keys.append({"key": key.decode(), "reads_per_s": rate})
        except UnicodeDecodeError:
            keys.append({"key_base64": base64.b64encode(key).decode(), "reads_per_s": rate})
    return {"node_id": node_id, "keys": keys}


def _format_hot_keys(node_id: str, hot: list[list[Any]]) -> str:
    """HOTKEYS as a table: rank, estimated reads/s, the key (``printable_key``: escaped, never raw bytes on a terminal)."""
    from .keytext import printable_key

    if not hot:
        return f"# master {node_id}: no hot key (none read often enough lately)"
    lines = [f"# master {node_id}: its hottest keys, by estimated reads/s (a decaying count of its own recent reads)", "rank  reads/s  key"]
    lines += [f"{i:>4}  {rate:>7.1f}  {printable_key(key)}" for i, (key, rate) in enumerate(hot, 1)]
    return "\n".join(lines)


def _cmd_hotkeys(args: argparse.Namespace) -> int:
    from .errors import UnknownOpError
    from .protocol import Op
    from .protocol.limits import MAX_HOT_KEYS

    if not 1 <= args.count <= MAX_HOT_KEYS:
        print(f"dcache hotkeys: --count must be between 1 and {MAX_HOT_KEYS}", file=sys.stderr)
        return EXIT_USAGE

    async def body(client: Any) -> int:
        hello = await client.server_info()
        node_id = str(hello.get("node_id"))
        if hello.get("role") != "master":
            print(
                f"dcache hotkeys: {client.current_endpoint} is an aux node ({node_id}), and only masters count reads by key: "
                "point --addr at a master (7000 by default)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        try:
            hot = await client.execute(Op.HOTKEYS, args.count)
        except UnknownOpError:
            print(
                f"dcache hotkeys: the master at {client.current_endpoint} does not know HOTKEYS (an older version): upgrade it",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if args.json:
            print(json.dumps(_hot_keys_json(node_id, hot), indent=2))
        else:
            print(_format_hot_keys(node_id, hot))
        return EXIT_OK

    return _run_tool(args, body)


def _cmd_dump(args: argparse.Namespace) -> int:
    from .tools.dump import dump_cluster

    try:
        endpoint = _endpoints(args)[0]
    except ConfigError as exc:
        return _report(args, exc)
    return _run_coro(
        args,
        lambda: dump_cluster(
            endpoint,
            args.out,
            timeout=args.timeout,
            auth_token=args.auth_token,
            cluster_secret=_secret(args),
            ssl=_client_ssl(args),
        ),
    )


def _cmd_restore(args: argparse.Namespace) -> int:
    from .tools.dump import restore_cluster

    if args.batch < 1:
        print("dcache restore: --batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        endpoints = ",".join(_endpoints(args))
    except ConfigError as exc:
        return _report(args, exc)
    return _run_coro(
        args,
        lambda: restore_cluster(
            endpoints,
            args.infile,
            batch=args.batch,
            timeout=args.timeout,
            auth_token=args.auth_token,
            cluster_secret=_secret(args),
            ssl=_client_ssl(args),
        ),
    )


def _run_coro(args: argparse.Namespace, make: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> int:
    """Run the dump/restore coroutine ``make()``, print its summary, map errors onto exit codes (``_report``)."""
    try:
        summary = asyncio.run(make())
    except (DCacheError, OSError, TimeoutError, RuntimeError) as exc:
        return _report(args, exc)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from .tools.loadgen import BenchOptions, format_result, run_bench

    try:
        _endpoints(args)
        opts = _options(BenchOptions, args)
    except ValueError as exc:  # ConfigError too: a bad flag is a usage error, not an unreachable server
        print(f"dcache bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_bench(opts, progress=None if args.quiet else sys.stderr)
    except (ConfigError, OSError) as exc:  # a TLS file; the server not reached (as the other tools say it)
        return _report(args, exc)
    except RuntimeError as exc:
        print(f"dcache bench: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(result) if args.json else format_result(result))
    return EXIT_OK if result["errors"] == 0 else EXIT_SERVER_ERROR


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    from .tools.cluster import ClusterOptions as C

    _flag(p, C, "masters", "number of masters", type=int, metavar="N")
    _flag(p, C, "aux", "number of aux nodes", type=int, metavar="N")
    _flag(p, C, "replicas", "copies of each key", type=int, metavar="N")
    _flag(p, C, "data_dir", "folder for the aux nodes' snapshots, one subfolder each", metavar="DIR")
    _flag(p, C, "port", "first master's port; the others follow (0: free ports)", type=int, metavar="PORT")
    _flag(
        p,
        C,
        "http_port",
        "HTTP shim's port (default: 8080, or a free port with --port 0; -1: no shim)",
        show_default=False,
        type=int,
        metavar="PORT",
    )
    _flag(p, C, "http_workers", "processes of the HTTP shim, sharing its port (dcache http --workers)", type=int, metavar="N")
    _flag(p, C, "aux_port", "first aux node's port; the others follow", type=int, metavar="PORT")
    _flag(p, C, "max_memory", "byte budget of each aux node (KB, MB = powers of 1000; KiB, MiB = of 1024)", metavar="SIZE")
    _flag(p, C, "snapshot_interval", "seconds between aux snapshots", type=float, metavar="S")
    _flag(p, C, "log_level", "log level of every process", metavar="LEVEL")
    _flag(
        p,
        C,
        "zookeeper",
        "ZooKeeper HOST:PORT[,...]: membership, leader election and the ring live there (default: the first master coordinates)",
        show_default=False,
        metavar="HOSTS",
    )
    _flag(p, C, "cluster", "cluster name in ZooKeeper, with --zookeeper", metavar="NAME")
    _flag(
        p,
        C,
        "resp_port",
        "serve Redis's protocol (RESP) on every master: the first on this port, the others on the ports that follow "
        "(with --port 0: free ports; default: no RESP)",
        show_default=False,
        type=int,
        metavar="PORT",
    )


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    from .tools.loadgen import BenchOptions as B

    p.add_argument(
        "--addr",
        default=os.environ.get("DCACHE_ADDR", DEFAULT_ADDR),
        help=f"server as host:port (default: {DEFAULT_ADDR}; env DCACHE_ADDR)",
    )
    _flag(p, B, "conns", "connections in total", type=int)
    _flag(p, B, "depth", "closed loop: requests in flight per connection (pipelining depth)", type=int)
    _flag(p, B, "duration", "seconds of timed load", type=float)
    _flag(p, B, "ratio", "fraction of GETs; the rest are SETs", type=float)
    _flag(p, B, "value_size", "bytes per value", type=int)
    _flag(p, B, "keys", "size of the key space", type=int)
    _flag(
        p,
        B,
        "procs",
        "load-generating processes (default: half the CPUs, at least 1; on a small machine more processes only add scheduling delay)",
        show_default=False,
        type=int,
    )
    _flag(p, B, "loop", "event loop of the workers", choices=("uvloop", "asyncio"))
    _flag(
        p,
        B,
        "rate",
        "open loop: send N requests per second in all, on a fixed schedule, and measure each latency from the request's "
        "intended send time, so a server (or generator) that falls behind is charged for the wait; reports the achieved "
        "rate, p50/p90/p99/p99.9/max, and how late the generator sent (--depth is then unused) (default: closed loop)",
        show_default=False,
        type=float,
        metavar="N",
    )
    _flag(
        p,
        B,
        "distribution",
        "how keys are drawn over --keys: uniform, or zipf:S (key k with probability proportional to 1/(k+1)^S, "
        "key 0 the most popular; e.g. zipf:1.1, or zipf:0.99 as YCSB)",
        metavar="DIST",
    )
    _flag(
        p,
        B,
        "hot_share",
        "share of requests on key 0 (e.g. 0.5: half of them); the others follow --distribution over the other keys",
        type=float,
        metavar="SHARE",
    )
    p.add_argument(
        "--no-populate", dest="populate", action="store_false", default=argparse.SUPPRESS, help="skip writing the key space before the run"
    )
    p.add_argument("--auth-token", default=os.environ.get("DCACHE_AUTH_TOKEN"), help="auth token for HELLO (env DCACHE_AUTH_TOKEN)")
    _add_tls(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    """The full ``dcache`` argument parser."""
    parser = _Parser(
        prog="dcache",
        description="dcache: a distributed in-memory cache. Run a role (master, aux, http, cluster) or a tool against a running cluster.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dcache {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "aux",
        help="run an aux (data) node",
        description="Run an aux node: holds data in an LRU cache (byte budget, TTL) and serves the native protocol. "
        "With --join it registers with a master, with --zookeeper in ZooKeeper; then SIGTERM hands its data over "
        "before it exits, SIGINT stops it with a final snapshot and no hand-over. "
        "Prints one 'READY host:port' line once listening.",
    )
    p.epilog = _DAEMON_EPILOG
    _add_config_flags(p, AuxConfig)
    p.set_defaults(func=_needs_server(_cmd_aux))

    p = sub.add_parser(
        "master",
        help="run a master (router) node",
        description="Run a master: routes every op to the aux nodes that own the key (consistent hashing), "
        "checks their health, rebalances data when nodes join or leave, and replicates. "
        "Without --coordinator this master decides membership; with it, it follows that master's ring; "
        "with --zookeeper the masters elect a leader in ZooKeeper and keep the ring there (docs/OPERATIONS.md). "
        "Prints one 'READY host:port' line once listening.",
    )
    p.epilog = _DAEMON_EPILOG
    _add_config_flags(p, MasterConfig)
    p.set_defaults(func=_needs_server(_cmd_master))

    p = sub.add_parser(
        "http",
        help="run the HTTP shim (JSON and raw bytes over HTTP)",
        description="Run the HTTP shim: POST /data, GET|PUT|DELETE /data/{key}, the legacy /api/get and /api/post, "
        "/health, /metrics and /openapi.yaml, through a dcache client that fails over between the --master endpoints. "
        "Prints one 'READY host:port' line once listening; SIGTERM/SIGINT shut it down gracefully. See docs/HTTP.md.",
    )
    p.epilog = _DAEMON_EPILOG
    _add_config_flags(p, HttpConfig)
    p.set_defaults(func=_needs_server(_cmd_http))

    p = sub.add_parser(
        "cluster",
        help="run a local cluster (masters + aux nodes) on 127.0.0.1",
        description="Start M masters and N aux nodes on 127.0.0.1 in one command, print every endpoint, "
        "and stop them all cleanly on Ctrl-C (SIGINT) or SIGTERM.",
    )
    _add_cluster_flags(p)
    p.set_defaults(func=_needs_server(_cmd_cluster))

    p = sub.add_parser(
        "get", help="print a key's value", description="Print the value of KEY (raw bytes and a newline).", epilog=_EXIT_CODES_HELP
    )
    _add_addr(p)
    p.add_argument("key", help="the key (UTF-8)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"key": KEY, "value": TEXT} (null if missing, exit 1); a value that is not UTF-8 as {"key": KEY, "value_base64": ...}',
    )
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser(
        "set", help="store a value", description="Store VALUE under KEY ('-' reads the value from stdin).", epilog=_EXIT_CODES_HELP
    )
    _add_addr(p)
    p.add_argument("key", help="the key (UTF-8)")
    p.add_argument("value", help="the value (UTF-8), or - to read raw bytes from stdin")
    p.add_argument("--ttl", type=float, default=None, help="time to live in seconds (default: no expiry)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--nx", action="store_true", help="only set if the key does not exist")
    cond.add_argument("--xx", action="store_true", help="only set if the key exists")
    p.set_defaults(func=_cmd_set)

    p = sub.add_parser("del", help="delete keys", description="Delete KEYs; prints how many existed.", epilog=_EXIT_CODES_HELP)
    _add_addr(p)
    p.add_argument("keys", nargs="+", metavar="key", help="keys to delete")
    p.set_defaults(func=_cmd_del)

    p = sub.add_parser(
        "stats", help="show a node's counters", description="Show the counters of the node at --addr.", epilog=_EXIT_CODES_HELP
    )
    _add_addr(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "ring",
        help="show the ring: members, health, shares, keys, migration",
        description="Show the cluster as the master at --addr sees it: epoch, members and their health, "
        "share of the ring, items and bytes per aux node, and migration progress.",
        epilog=_EXIT_CODES_HELP,
    )
    _add_addr(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_ring)

    p = sub.add_parser(
        "forget",
        help="remove a dead aux node from the membership",
        description="Remove the aux node NODE_ID, which is down for good (its machine is gone), from the membership "
        "of the cluster behind the master at --addr: the ring no longer lists it and no master pings it. A cluster op: "
        "with a cluster secret set, give it (--cluster-secret-file). Refused (exit 4, nothing changed) for an unknown "
        "id, a node that is up, fenced or leaving (remove a live node with SIGTERM), while a migration runs (the "
        "copies from the remaining replicas may not be in place: wait until 'dcache ring' shows stable), in ZooKeeper "
        "mode while the node's registration is still there, and without --force when keys had their only copies on "
        "down nodes (--replicas 1, or as many nodes down as copies).",
        epilog=_EXIT_CODES_HELP,
    )
    _add_addr(p, timeout=30.0)
    p.add_argument("node_id", metavar="NODE_ID", help="the aux node's --node-id, as 'dcache ring' lists it")
    p.add_argument(
        "--force",
        action="store_true",
        help="accept that the keys whose only copies were on down nodes are lost for good "
        "(needed with --replicas 1, or with as many nodes down as copies)",
    )
    _add_secret(p)
    p.set_defaults(func=_cmd_forget)

    p = sub.add_parser(
        "hotkeys",
        help="show a master's hottest keys",
        description="List the keys the master at --addr reads most, with their estimated reads per second, hottest first "
        "(as redis-cli --hotkeys). Every master counts its own reads in a small decaying sketch; a key shows once it takes "
        "about 1 read in 16,000 of that master's. Keys that are not printable UTF-8 are escaped (\\xNN, \\n, ...).",
        epilog=_EXIT_CODES_HELP,
    )
    _add_addr(p)
    p.add_argument("--count", type=int, default=10, metavar="N", help="most keys to list, 1 to 100 (default: 10)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"node_id": ..., "keys": [{"key": TEXT, "reads_per_s": R}, ...]}; a key that is not UTF-8 as "key_base64"',
    )
    p.set_defaults(func=_cmd_hotkeys)

    p = sub.add_parser(
        "dump",
        help="copy a whole cluster to one file",
        description="Copy every key of the cluster behind the master at --addr (values, expiries, versions) into one "
        "checksummed file. Waits for a running migration to finish first. Draws a progress bar on stderr when it is a terminal.",
        epilog=_EXIT_CODES_HELP,
    )
    _add_addr(p)
    p.add_argument("--out", required=True, help="file to write (replaced atomically when complete)")
    _add_secret(p)
    p.set_defaults(func=_needs_server(_cmd_dump))

    p = sub.add_parser(
        "restore",
        help="load a dump into a cluster",
        description="Load a file written by 'dcache dump' into the cluster behind the master at --addr (any size). "
        "Entries keep their versions: a restore never overwrites newer data; expired entries are skipped. "
        "Draws a progress bar on stderr when it is a terminal.",
        epilog=_EXIT_CODES_HELP,
    )
    _add_addr(p)
    p.add_argument("--in", dest="infile", required=True, help="file written by dcache dump")
    p.add_argument("--batch", type=int, default=500, help="entries per APPLY request (default: 500)")
    _add_secret(p)
    p.set_defaults(func=_needs_server(_cmd_restore))

    p = sub.add_parser(
        "bench",
        help="load-test a node",
        description="Drive GET/SET load from several processes against --addr and report ops/s and latency percentiles: "
        "closed loop (--depth requests in flight per connection, as fast as the server answers) or open loop "
        "(--rate N requests per second on a schedule, latency from each request's intended send time).",
    )
    _add_bench_flags(p)
    p.set_defaults(func=_needs_server(_cmd_bench))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dcache`` command with ``argv``; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"dcache {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code
