"""Socket settings every dcache connection shares."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket

from .errors import ConfigError

__all__ = ["nodelay", "protected_mode", "is_loopback", "listen_error"]

log = logging.getLogger("dcache.net")


def nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a TCP transport: small frames leave at once (no-op for other sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - platform dependent
            pass


def protected_mode(host: str, has_credential: bool, insecure: bool, role: str, flags: str) -> None:
    """Refuse to listen beyond loopback without a credential (as Redis's protected mode), unless ``insecure``.

    ``flags`` names the options that give this ``role`` a credential, for the message.

    Raises:
        ConfigError: the one-line explanation.
    """
    if is_loopback(host) or has_credential:
        return
    if insecure:
        log.warning(
            "protected mode is off (--insecure): this %s listens on %s without %s; "
            "anyone who can reach the port can read, write and change the cluster",
            role,
            host,
            flags,
        )
        return
    raise ConfigError(f"refusing to listen on {host} without {flags} (protected mode); set one, listen on 127.0.0.1, or pass --insecure")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_error(exc: OSError, host: str, port: int, flag: str) -> ConfigError:
    """The one-line error for a listener that could not bind ``host:port``: why, and the ``flag`` that moves it.

    Args:
        exc: what binding raised.
        host: the address listened on (``--host``).
        port: the port listened on.
        flag: the option that sets ``port`` (``--port``, ``--metrics-port``).
    """
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = f"the port is already in use (another process listens there); choose another with {flag}, or {flag} 0 for a free one"
    elif exc.errno == errno.EACCES:
        why = f"permission denied (ports below 1024 need privileges); choose another with {flag}"
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        why = f"{host!r} is not an address of this machine; fix --host"
    else:
        why = f"{exc.strerror or exc}"
    return ConfigError(f"cannot listen on {where}: {why}")
