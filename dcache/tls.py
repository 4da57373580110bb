"""TLS on every hop: the SSL contexts of the daemons, the shim and the tools; the handshake on a listener; reloads.

Design note
-----------
TLS is opt-in, per process, with the standard ``ssl`` module:

* ``--tls-cert`` and ``--tls-key``: this process's certificate (PEM, the
  chain after the leaf) and its unencrypted key; ``--tls-ca``: the CA that
  signed the cluster's certificates; ``--tls-client-auth``: the listener
  refuses connections that do not present a certificate signed by it.
* A daemon (aux node, master) with a certificate serves TLS only on its
  port, and every connection it opens to another daemon (a master's links
  to its aux nodes, an aux node's JOIN, a follower's SYNC) is TLS too, with
  its own certificate as the client certificate: links are mutual whenever
  the other side asks (``--tls-client-auth``). Links verify the peer's chain
  against ``--tls-ca`` only (never the system store) and do not check host
  names: nodes are addressed by IPs and advertised names that change, and the
  cluster's own CA is what makes a peer a member (docs/DECISIONS.md).
* Applications and tools (``dcache.Client(ssl=...)``, the CLI) verify as any
  TLS client does: the chain, and the host name or IP they connect to
  against the certificate's names (``client_context``).
* TLS 1.2 at least; Python's default cipher list (forward secrecy, AEAD
  only); compression and renegotiation off.

Handshakes on a listener (``TlsListener``). The listener accepts plain TCP
and runs the handshake with ``loop.start_tls`` in a task per connection,
bounded by ``--tls-handshake-timeout``; the role's protocol takes the
connection over only once it completes. So a connection still in its
handshake counts against ``--max-connections``, and a handshake that fails
is seen here, with its peer and its reason: counted by kind (refused: not
TLS, or a certificate not accepted; timeout; dropped: the peer went away)
and logged (refusals at WARNING, at most once per 10 s). The role's protocol
is the same object as without TLS: TLS adds no work per frame in Python.

Reload (``TlsContexts.reload``, on SIGHUP). The certificate, key and CA
files are read again into the *same* ``SSLContext`` objects, so the next
handshake on the listener and on every link uses them, while connections
already open keep the session they have: nothing in flight is dropped.
Everything is first loaded into a scratch context; a file that is missing,
not PEM, or a key that does not match leaves the live contexts untouched and
logs an ERROR. A CA added to ``--tls-ca`` is trusted after a reload; one
removed stays trusted until a restart (OpenSSL cannot forget a CA).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from .errors import ConfigError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "MIN_TLS_VERSION",
    "TlsContexts",
    "TlsListener",
    "check_tls_settings",
    "client_context",
    "fingerprint",
    "peer_context",
    "server_context",
]

log = logging.getLogger("dcache.tls")

#: Oldest protocol version any dcache context accepts.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
#: Seconds a handshake on a listener may take (``--tls-handshake-timeout``).
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
#: Seconds between two WARNINGs about refused handshakes.
_WARN_EVERY_S = 10.0


def _encrypted_key() -> bytes:
    # load_cert_chain asks for a password on the terminal when none is given: a daemon must never wait on one.
    raise ConfigError("is encrypted: give an unencrypted key, readable by this process only (chmod 600)")


def _readable(field: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load ``cert`` and ``key`` into ``ctx``; ``ConfigError`` naming the field and the file otherwise."""
    _readable("tls_cert", cert)
    _readable("tls_key", key)
    try:
        ctx.load_cert_chain(cert, key, password=_encrypted_key)
    except ConfigError as exc:
        raise ConfigError(f"tls_key: {key} {exc}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls_key: {key} is not the key of the certificate in {cert}") from None
        raise ConfigError(f"tls_cert: {cert} and {key} must be a PEM certificate and its PEM key ({exc.reason or exc})") from None
    except OSError as exc:  # pragma: no cover - checked readable just above
        raise ConfigError(f"tls_cert: cannot load {cert} and {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    _readable("tls_ca", ca)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls_ca: {ca} holds no PEM CA certificate ({exc.reason or exc})") from None


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(cert: str, key: str, ca: str | None = None, client_auth: bool = False) -> ssl.SSLContext:
    """The context of a TLS listener: serves ``cert``; with ``client_auth``, requires a client certificate signed by ``ca``.

    Raises:
        ConfigError: a file cannot be read or is not what it should be; ``client_auth`` without ``ca``.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
    if client_auth:
        if ca is None:
            raise ConfigError("tls_client_auth: needs --tls-ca, the CA client certificates are checked against")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The context of the connections a daemon (or the shim) opens to other daemons.

    Verifies the peer's chain against ``ca`` only, without a host name check
    (see the module note); presents ``cert`` as the client certificate when given.

    Raises:
        ConfigError: a file cannot be read or is not what it should be.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A context for applications and tools: ``dcache.Client(addrs, ssl=client_context(ca="ca.pem"))``.

    Verifies the server's chain against ``ca`` (default: the system's trusted
    CAs) and its certificate against the host name or IP connected to;
    presents ``cert`` and ``key`` as the client certificate (mutual TLS) when
    given. TLS 1.2 at least.

    Raises:
        ConfigError: a file cannot be read or is not what it should be; ``cert`` without ``key``.
    """
    if (cert is None) != (key is None):
        raise ConfigError("tls_cert: a client certificate needs both --tls-cert and --tls-key")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # check_hostname and CERT_REQUIRED by default
    if ca is not None:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs()
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def check_tls_settings(cert: str | None, key: str | None, ca: str | None, client_auth: bool, *, daemon: bool) -> None:
    """Refuse combinations of the TLS settings that cannot work (no file is read).

    ``daemon``: the settings of an aux node or a master, whose certificate
    also serves its links, so it needs ``ca`` to verify its peers.

    Raises:
        ConfigError: naming the field.
    """
    if (cert is None) != (key is None):
        raise ConfigError(f"{'tls_key' if cert else 'tls_cert'}: --tls-cert and --tls-key go together (the certificate and its key)")
    if client_auth and (cert is None or ca is None):
        raise ConfigError("tls_client_auth: needs --tls-cert, --tls-key and --tls-ca (the CA client certificates are checked against)")
    if daemon and cert is not None and ca is None:
        raise ConfigError("tls_ca: a node with --tls-cert needs --tls-ca: the nodes it connects to are verified against it")
    if daemon and ca is not None and cert is None:
        raise ConfigError("tls_cert: a node with --tls-ca needs --tls-cert and --tls-key: TLS covers its listener and its links together")


def _peer_text(peer: Any) -> str:
    """``host:port`` of a peer name (``[host]:port`` for IPv6)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def fingerprint(cert_der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as ``AB:CD:...`` (what ``openssl x509 -fingerprint -sha256`` prints)."""
    digest = hashlib.sha256(cert_der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _file_fingerprint(cert: str) -> str:
    """The fingerprint of the first certificate in a PEM file ("?" if it cannot be read)."""
    try:
        with open(cert) as f:
            text = f.read()
        begin = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        return fingerprint(ssl.PEM_cert_to_DER_cert(text[begin:end]))
    except (OSError, ValueError):
        return "?"


class TlsContexts:
    """A process's TLS contexts, built once at start and reloaded in place on SIGHUP.

    Attributes:
        server: the listener's context (``None``: the listener is plain).
        peer: the context of the connections this process opens to daemons
            (``None``: they are plain).
        reloads: successful reloads.
        reload_failures: reloads refused (the old certificate stayed).
    """

    __slots__ = ("server", "peer", "cert", "key", "ca", "client_auth", "reloads", "reload_failures")

    def __init__(
        self,
        *,
        cert: str | None,
        key: str | None,
        ca: str | None,
        client_auth: bool = False,
        serve: bool = True,
        connect: bool = True,
    ) -> None:
        """Build the contexts: ``server`` if ``serve`` and a certificate is given, ``peer`` if ``connect`` and a CA is.

        Raises:
            ConfigError: a file cannot be read or is not what it should be.
        """
        self.cert, self.key, self.ca, self.client_auth = cert, key, ca, client_auth
        self.server: ssl.SSLContext | None = None
        self.peer: ssl.SSLContext | None = None
        if serve and cert is not None and key is not None:
            self.server = server_context(cert, key, ca, client_auth)
        if connect and ca is not None:
            self.peer = peer_context(ca, cert, key)
        self.reloads = 0
        self.reload_failures = 0

    def describe(self) -> str:
        """One line for the log: what is served and trusted."""
        parts = []
        if self.cert is not None:
            parts.append(f"certificate {self.cert} (sha256 {_file_fingerprint(self.cert)})")
        if self.ca is not None:
            parts.append(f"CA {self.ca}")
        if self.client_auth:
            parts.append("client certificates required")
        return ", ".join(parts)

    def reload(self) -> bool:
        """Read the certificate, key and CA files again into the live contexts (SIGHUP); whether it worked.

        New handshakes use the new files; open connections keep theirs. A bad
        file is logged at ERROR and changes nothing.
        """
        try:
            # Everything into a scratch context first: a partial load into a live
            # one could leave it with a new certificate and the old key.
            scratch = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            if self.cert is not None and self.key is not None:
                _load_chain(scratch, self.cert, self.key)
            if self.ca is not None:
                _load_ca(scratch, self.ca)
            for ctx in (self.server, self.peer):
                if ctx is None:
                    continue
                if self.cert is not None and self.key is not None:
                    _load_chain(ctx, self.cert, self.key)
                if self.ca is not None:
                    _load_ca(ctx, self.ca)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("TLS reload failed, keeping the certificate in use: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS reloaded: %s", self.describe())
        return True


class TlsListener:
    """The TLS side of one listener: ``acceptor`` is its protocol factory; the handshake, then ``protocol_factory`` takes over.

    Args:
        context: the server context (``TlsContexts.server``).
        protocol_factory: the role's protocol, given the connection once its handshake completed.
        handshake_timeout: seconds a handshake may take.
        admit: called as a connection is accepted; ``False`` refuses it (the
            service's connection limit, counting handshakes in progress).
        spawn: runs a handshake task the owner can cancel at shutdown.
    """

    __slots__ = (
        "context",
        "protocol_factory",
        "handshake_timeout",
        "admit",
        "spawn",
        "in_progress",
        "handshakes",
        "failures",
        "_last_warning",
        "_refused_since_warning",
    )

    #: The kinds of failed handshakes (``failures`` keys, the metric's ``reason`` label).
    REASONS = ("refused", "timeout", "dropped")

    def __init__(
        self,
        context: ssl.SSLContext,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        handshake_timeout: float,
        admit: Callable[[TlsAcceptor], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.context = context
        self.protocol_factory = protocol_factory
        self.handshake_timeout = handshake_timeout
        self.admit = admit
        self.spawn = spawn
        #: Handshakes started and not finished.
        self.in_progress = 0
        #: Handshakes completed.
        self.handshakes = 0
        #: Handshakes that failed, by kind (``REASONS``).
        self.failures: dict[str, int] = dict.fromkeys(self.REASONS, 0)
        self._last_warning = 0.0
        self._refused_since_warning = 0

    def acceptor(self) -> TlsAcceptor:
        """A protocol for one accepted connection (pass to ``loop.create_server``)."""
        return TlsAcceptor(self, self.protocol_factory)

    def acceptor_for(self, protocol_factory: Callable[[], asyncio.Protocol]) -> Callable[[], TlsAcceptor]:
        """``acceptor`` for another port of the same node (RESP): the same context, bound and counters; ``protocol_factory`` takes over."""
        return lambda: TlsAcceptor(self, protocol_factory)

    def failed(self, acceptor: TlsAcceptor, exc: BaseException) -> None:
        """Count a failed handshake and log it (refusals at WARNING, at most every 10 s; the rest at DEBUG)."""
        if isinstance(exc, ssl.SSLError):
            reason = "refused"
        elif isinstance(exc, (ConnectionAbortedError, TimeoutError)):
            reason = "timeout"  # start_tls aborts the connection with ConnectionAbortedError at the timeout
        else:
            reason = "dropped"
        self.failures[reason] += 1
        if reason != "refused":
            log.debug("TLS handshake from %s %s: %s", _peer_text(acceptor.peer), "timed out" if reason == "timeout" else "dropped", exc)
            return
        self._refused_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            log.warning(
                "TLS handshake from %s refused: %s (%d refused in the last %.0f s)",
                _peer_text(acceptor.peer),
                getattr(exc, "reason", None) or exc,
                self._refused_since_warning,
                now - self._last_warning if self._last_warning else 0.0,
            )
            self._last_warning = now
            self._refused_since_warning = 0


class TlsAcceptor(asyncio.Protocol):
    """One accepted connection while its TLS handshake runs; the role's protocol takes it over after.

    The handshake is ``loop.start_tls`` on the accepted transport. Its first
    step (up to its first ``await``, where it pauses the transport and puts
    its TLS protocol in front) runs inside ``connection_made``, not in a
    task one loop iteration later: uvloop starts reading a connection as
    soon as ``connection_made`` returns (a ``pause_reading`` there is
    undone), and the client's first bytes must reach the TLS layer, not this
    object. A task then waits for the handshake and resumes ``start_tls``
    for its result (the same steps a task would take, started early).

    What the peer sends right after the handshake, before that task runs
    (asyncio's loop reads at once), reaches this object: it is kept and
    handed to the role's protocol with the connection. A connection closed
    in between is counted as dropped.
    """

    __slots__ = ("_listener", "_factory", "_transport", "_early", "_lost", "peer")

    def __init__(self, listener: TlsListener, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self._listener = listener
        self._factory = protocol_factory
        self._transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._lost = False
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = tcp = cast(asyncio.Transport, transport)
        self.peer = tcp.get_extra_info("peername")
        listener = self._listener
        if not listener.admit(self):
            tcp.abort()
            return
        loop = asyncio.get_running_loop()
        handshake = loop.start_tls(tcp, self, listener.context, server_side=True, ssl_handshake_timeout=listener.handshake_timeout)
        try:
            waiter = handshake.send(None)  # start_tls's first step: it owns the transport from here
        except BaseException as exc:  # it gave up before waiting (the transport closed already)
            tcp.abort()
            listener.failed(self, exc)
            return
        listener.in_progress += 1
        listener.spawn(self._finish(handshake, waiter))

    async def _finish(self, handshake: Coroutine[Any, Any, asyncio.Transport | None], waiter: Any) -> None:
        """Wait for the handshake ``start_tls`` is waiting for (``waiter``), resume it, hand the connection over."""
        listener = self._listener
        transport = self._transport
        assert transport is not None
        try:
            try:
                await asyncio.wait((waiter,))
            except asyncio.CancelledError:  # shutdown: start_tls closes the connection as it unwinds
                handshake.throw(asyncio.CancelledError())
                raise
            handshake.send(None)  # start_tls returns (StopIteration) or raises the handshake's error
            raise RuntimeError("start_tls waited twice")  # pragma: no cover - it awaits once
        except StopIteration as done:
            tls: asyncio.Transport | None = done.value
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:  # every way a handshake can fail is counted; none may escape
            transport.abort()
            listener.failed(self, exc)
            return
        finally:
            listener.in_progress -= 1
        if tls is None or self._lost or tls.is_closing():  # the peer went away as the handshake ended
            listener.failed(self, ConnectionResetError("closed as the handshake ended"))
            return
        listener.handshakes += 1
        proto = self._factory()
        tls.set_protocol(proto)
        proto.connection_made(tls)
        if self._early:
            data = b"".join(self._early)
            self._early.clear()
            proto.data_received(data)

    # Between the end of the handshake and the take-over:

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
