"""An aux node's side of membership: joining a master and leaving gracefully.

With ``--join HOST:PORT`` the node announces itself (JOIN with its id,
advertised address and weight) until a master accepts, then re-announces
every few seconds, which is idempotent and lets a restarted coordinator
learn about it again. On SIGTERM the node sends LEAVE and keeps serving
while the coordinator moves its data to the new owners; it exits when the
master confirms (or ``leave_timeout`` passes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

from ..address import format_address, parse_address
from ..config import AuxConfig
from ..errors import AuthError
from ..peer import PeerConnection, open_peer
from ..protocol import Op

__all__ = ["JoinAgent"]

log = logging.getLogger("dcache.aux.membership")

_ANNOUNCE_EVERY_S = 3.0
_RETRY_S = 0.5
#: Between two re-announcements, how often the node looks whether its connection to the master was lost.
_LOST_POLL_S = 0.1
#: While announcing keeps failing, a reminder is logged at most this often (a new kind of failure is logged at once).
_REMIND_EVERY_S = 30.0
#: A joined node that loses its master says so at INFO; a WARNING comes once re-announcing has failed this long
#: (a master restarting, or `dcache cluster` stopping, is back or has stopped this node by then).
_LOST_QUIET_S = _ANNOUNCE_EVERY_S


class JoinAgent:
    """Keeps an aux node registered with a master."""

    def __init__(
        self,
        config: AuxConfig,
        node_id: str,
        advertise: tuple[str, int],
        *,
        epoch: int = 0,
        on_epoch: Callable[[int], None] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """``epoch``: the epoch this node was last admitted at (from its snapshot); ``on_epoch`` hears each new one;
        ``ssl``: the node's peer context, for TLS to the master (``None``: plain TCP)."""
        assert config.join is not None
        self.config = config
        self.node_id = node_id
        self.advertise = advertise
        self._master = parse_address(config.join)
        self._conn: PeerConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.joined = asyncio.Event()
        self.leaving = False
        #: The epoch the last accepted JOIN answered (0: never admitted).
        self.epoch = epoch
        self._on_epoch = on_epoch
        self._secret = config.secret()
        self._ssl = ssl
        #: When the current run of failed announcements began (``None``: the last one worked).
        self._failing_since: float | None = None
        #: When a failure was last logged, and the kinds logged in this run (``_log_failure``).
        self._failure_logged_at = 0.0
        self._failure_kinds: set[str] = set()
        #: Whether this run's loss of the master was logged at INFO (``_log_failure``).
        self._lost_said = False

    def start(self) -> None:
        """Start announcing in the background."""
        self._task = asyncio.ensure_future(self._announce_loop())

    async def _call(self, op: int, *args: Any, timeout: float) -> Any:
        if self._conn is None or self._conn.is_closing:
            host, port = self._master
            self._conn = await open_peer(
                host,
                port,
                name=f"master {host}:{port}",
                auth_token=self.config.auth_token,
                client_name=f"aux:{self.node_id}",
                timeout=2.0,
                expect_role="master",
                secret=self._secret,
                ssl=self._ssl,
            )
        return await self._conn.call(op, *args, timeout=timeout)

    async def _announce_loop(self) -> None:
        host, port = self.advertise
        while not self.leaving:
            try:
                # known_epoch: a restarted coordinator sees that this node was
                # admitted before it started (docs/OPERATIONS.md).
                epoch = await self._call(Op.JOIN, self.node_id, host, port, self.config.weight, self.epoch, timeout=15.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log_failure(exc)
                await asyncio.sleep(_RETRY_S)
                continue
            if self._failing_since is not None and self.joined.is_set():
                log.info("re-announced to master %s:%s after %.0f s of failures", *self._master, time.monotonic() - self._failing_since)
            self._failing_since = None
            if isinstance(epoch, int) and epoch > 0:
                self.epoch = epoch
                if self._on_epoch is not None:
                    self._on_epoch(epoch)
            if not self.joined.is_set():
                log.info("joined the cluster through master %s:%s (epoch %s)", *self._master, epoch)
                self.joined.set()
            await self._until_next_announcement()

    async def _until_next_announcement(self) -> None:
        """Wait ``_ANNOUNCE_EVERY_S``, or less: until the connection to the master is lost.

        A lost connection is most often a master that stopped: announcing
        again at once (every ``_RETRY_S`` until it answers) reaches it as soon
        as it is back, and a restarted coordinator, which holds its clients'
        requests until the re-announcements rebuilt its ring, gets them
        within ``_RETRY_S`` of its start rather than up to 3 s later.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ANNOUNCE_EVERY_S
        while loop.time() < deadline:
            conn = self._conn
            if conn is None or conn.is_closing:
                return
            await asyncio.sleep(_LOST_POLL_S)

    def _log_failure(self, exc: Exception) -> None:
        """Log a failed announcement: the first of a run and each new kind at WARNING, then a reminder every ``_REMIND_EVERY_S``.

        A retry every ``_RETRY_S`` logged each time would be two lines a
        second for as long as the master is away. A joined node re-announces
        as soon as its connection to the master drops, so a master that
        restarts or a cluster that stops (`dcache cluster`, Ctrl-C) fails the
        first retries as a matter of course: for ``_LOST_QUIET_S`` that is
        one INFO line, and a WARNING only if it lasts.
        """
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since, self._failure_kinds, self._lost_said = now, set(), False
        auth = isinstance(exc, AuthError)  # not HandshakeError: --join names an aux node, or another protocol version
        if self.joined.is_set() and not auth and now - self._failing_since < _LOST_QUIET_S:
            if not self._lost_said:
                self._lost_said = True
                log.info("lost master %s:%s (%s); re-announcing every %.1f s", *self._master, exc, _RETRY_S)
            return
        # A refused proof and the throttling that follows it are one condition.
        kind = "credentials" if auth else type(exc).__name__
        if kind in self._failure_kinds and now - self._failure_logged_at < _REMIND_EVERY_S:
            return
        self._failure_kinds.add(kind)
        self._failure_logged_at = now
        host, port = self._master
        since = f" (failing for {now - self._failing_since:.0f} s)" if now - self._failing_since >= _RETRY_S else ""
        if auth:
            log.warning("master %s:%s refused this node's credentials: %s; retrying%s", host, port, exc, since)
        elif self.joined.is_set():
            log.warning("re-announcing to master %s:%s failed: %s; retrying every %.1f s%s", host, port, exc, _RETRY_S, since)
        else:
            log.warning("joining master %s:%s failed (%s); retrying every %.1f s%s", host, port, exc, _RETRY_S, since)

    async def leave(self) -> bool:
        """Ask the master to move this node's data away; True once it confirms."""
        self.leaving = True
        if self._task is not None:
            self._task.cancel()
        if not self.joined.is_set():
            return True
        log.info("leaving the cluster: waiting for the master to move this node's data")
        try:
            await self._call(Op.LEAVE, self.node_id, timeout=self.config.leave_timeout)
        except Exception as exc:
            log.warning("graceful leave did not complete (%s); shutting down anyway", exc)
            return False
        log.info("data handed over; leaving")
        return True

    def status(self) -> dict[str, Any]:
        """Membership fields of STATS: the master joined and whether it accepted this node."""
        return {"joined": self.joined.is_set(), "join_master": format_address(*self._master), "ring_epoch": self.epoch}

    async def close(self) -> None:
        """Stop announcing and close the connection."""
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            self._conn.close()
