"""ZooKeeper seen from asyncio: a kazoo session, the cluster's znodes, ephemeral registrations.

Layout of a cluster named NAME (``--cluster``)::

    /dcache/NAME/aux/<node_id>       ephemeral: an aux node's registration (JSON)
    /dcache/NAME/leaving/<node_id>   ephemeral: the aux node asks to leave gracefully
    /dcache/NAME/masters/<node_id>   ephemeral: a master, with the view it routes by and the aux
                                     nodes it fenced in that view on its own (JSON)
    /dcache/NAME/election/           kazoo's Election recipe: the leader master
    /dcache/NAME/forget/<node_id>    persistent: a master asks the leader to forget a dead aux node (JSON)
    /dcache/NAME/ring                persistent: the current ClusterView (msgpack),
                                     written by the leader with a compare-and-set

kazoo runs its own threads. Here every blocking call goes through
``ZkSession.run`` (a worker thread) and every kazoo callback is handed to the
event loop with ``call_soon_threadsafe``, so the rest of dcache only sees
coroutines and loop callbacks.

Ephemeral registrations are kept by ``ZkSession.register``: they are created
when the session connects, re-created after a session expired (a new session
starts when ZooKeeper is reachable again), and their data is updated in the
background. If another live session holds the same path (a previous process
of this node that was killed and whose session has not expired yet, or a
second node configured with the same id), the registration waits until that
session's node is gone instead of stealing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry

__all__ = ["ZkPaths", "ZkSession", "dumps", "loads", "machine_id"]

log = logging.getLogger("dcache.zookeeper")

_REGISTER_RETRY_S = 0.5


class ZkPaths:
    """The znode paths of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.root = f"/dcache/{cluster}"
        self.aux = f"{self.root}/aux"
        self.leaving = f"{self.root}/leaving"
        self.masters = f"{self.root}/masters"
        self.election = f"{self.root}/election"
        self.forget = f"{self.root}/forget"
        self.ring = f"{self.root}/ring"

    def dirs(self) -> tuple[str, ...]:
        """The persistent parents every participant makes sure exist."""
        return (self.aux, self.leaving, self.masters, self.election, self.forget)


def dumps(obj: Any) -> bytes:
    """Registration data: compact JSON (readable with zkCli)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _read_children(client: KazooClient, path: str) -> dict[str, dict[str, Any]]:
    """The registration data (``loads``) of every child of ``path``, by name (blocking: run it in a worker).

    Children that vanish while they are read, or hold no map, are left out.
    """
    out = {}
    for child in client.get_children(path):
        try:
            data, _ = client.get(f"{path}/{child}")
        except NoNodeError:
            continue
        d = loads(data)
        if isinstance(d, dict):
            out[child] = d
    return out


def loads(data: bytes | None) -> Any:
    """Inverse of ``dumps``; ``None`` for an empty or unreadable node."""
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


class ZkSession:
    """One kazoo client, driven from an asyncio loop."""

    def __init__(self, hosts: str, session_timeout: float, name: str) -> None:
        self.hosts = hosts
        self.name = name
        self.client = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0),
            command_retry=KazooRetry(max_tries=3, delay=0.1, backoff=2, max_delay=1.0),
            logger=logging.getLogger("dcache.zookeeper.kazoo"),
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        #: ``connected``, ``suspended`` (connection lost, session may live on),
        #: ``lost`` (session expired) or ``not started``.
        self.state = "not started"
        self.connected = asyncio.Event()
        self.sessions = 0  # sessions established so far
        self.disconnected_since: float | None = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []
        self._ephemeral: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: The children ``wait_masters_at`` last read under each path (named when ZooKeeper stops answering).
        self._last_read: dict[str, tuple[str, ...]] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting (in the background: ZooKeeper may be down)."""
        self.loop = asyncio.get_running_loop()
        self.client.add_listener(self._on_state_thread)
        self.client.start_async()
        self._task = asyncio.ensure_future(self._keep_registrations())

    async def close(self) -> None:
        """End the session: this participant's ephemeral nodes vanish at once."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._stop_client), 5.0)
        except (TimeoutError, KazooException, OSError) as exc:
            log.warning("closing the ZooKeeper session: %s", exc)

    def _stop_client(self) -> None:
        self.client.stop()
        self.client.close()

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking kazoo call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def wait_masters_at(
        self,
        masters: str,
        pos: tuple[int, int],
        timeout: float,
        *,
        skip: str = "",
        absent: Callable[[], Iterable[str]] = tuple,
    ) -> list[str]:
        """Wait (bounded) until every master registered under ``masters`` routes by the view ``pos`` or a later one.

        ``pos`` is ``(epoch, seq)``; a master's registration holds the view it
        routes by. ``skip`` names a master not to wait for (the caller).
        ``absent()`` names masters that count as behind while they are not
        registered (one whose session just expired may still route by an
        older view: it learns of the expiry only when it reaches ZooKeeper).

        While ZooKeeper does not answer, the read is retried until
        ``timeout``; a read that hangs (ZooKeeper stopped, the connection
        not yet found dead: up to 2/3 of the session) is not waited for
        past it. The wait never ends early because nothing could be read.

        Returns:
            The masters still behind when ``timeout`` ran out (empty: all
            caught up). With no registration read in time, the masters the
            last read of ``masters`` found, and ``absent()``: none of them
            confirmed ``pos``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lagging: list[str] | None = None  # as the last read of this wait found them
        while True:
            try:
                async with asyncio.timeout_at(deadline):  # not wait_for: on 3.11 it can swallow the caller's cancellation
                    regs = await self.read_registrations(masters)
            except (KazooException, TimeoutError):
                if loop.time() < deadline:
                    await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                    continue
                if lagging is not None:
                    return lagging
                known = self._last_read.get(masters, ())
                return sorted({m for m in (*known, *absent()) if m != skip})
            self._last_read[masters] = tuple(regs)
            lagging = [m for m, d in regs.items() if m != skip and (int(d.get("epoch", 0)), int(d.get("seq", 0))) < pos]
            lagging += sorted(m for m in absent() if m not in regs and m != skip)
            if not lagging or loop.time() >= deadline:
                return lagging
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    async def read_registrations(self, path: str) -> dict[str, dict[str, Any]]:
        """The registration data of every child of ``path``, by name (see ``_read_children``)."""
        out: dict[str, dict[str, Any]] = await self.run(_read_children, self.client, path)
        return out

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the session is connected; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(state)`` on the loop at every connection state change."""
        self._listeners.append(callback)

    # -- connection state (kazoo thread -> loop) -------------------------------------

    def _on_state_thread(self, state: str) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_state, state)

    def _on_state(self, state: str) -> None:
        if self._closed:
            return
        if state == KazooState.CONNECTED:
            if self.state in ("lost", "not started"):
                self.sessions += 1
            # A new session must register again; after a reconnection within the
            # same session the nodes still exist and checking them is cheap.
            self._dirty.update(self._ephemeral)
            self.state = "connected"
            self.disconnected_since = None
            self.connected.set()
            self._wake.set()
            log.info("%s: connected to ZooKeeper %s", self.name, self.hosts)
        else:
            new = "lost" if state == KazooState.LOST else "suspended"
            if self.state == "connected":
                self.disconnected_since = time.monotonic()
            if new != self.state:
                log.warning(
                    "%s: ZooKeeper connection %s%s",
                    self.name,
                    new,
                    " (session expired: ephemeral nodes are gone)" if new == "lost" else " (reconnecting)",
                )
            self.state = new
            self.connected.clear()
        for cb in list(self._listeners):
            try:
                cb(self.state)
            except Exception:
                log.exception("ZooKeeper state listener failed")

    def watch_data(self, path: str, callback: Callable[[bytes | None, Any], None]) -> None:
        """Call ``callback(data, stat)`` on the loop now and whenever ``path`` changes.

        Must run in a worker thread (``run``) once connected: kazoo reads the node
        right away. The watch is re-armed by kazoo across reconnects.
        """
        loop = self.loop
        assert loop is not None

        def func(data: bytes | None, stat: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, data, stat)

        self.client.DataWatch(path, func)

    def watch_children(self, path: str, callback: Callable[[list[str]], None]) -> None:
        """Call ``callback(children)`` on the loop now and whenever ``path``'s children change.

        Same rules as ``watch_data``; ``path`` must exist.
        """
        loop = self.loop
        assert loop is not None

        def func(children: list[str]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, list(children))

        self.client.ChildrenWatch(path, func)

    # -- ephemeral registrations ---------------------------------------------------

    def register(self, path: str, data: bytes) -> None:
        """Keep an ephemeral node at ``path`` holding ``data`` while this process lives."""
        if self._ephemeral.get(path) == data and path not in self._dirty:
            return
        self._ephemeral[path] = data
        self._dirty.add(path)
        self._wake.set()

    async def _keep_registrations(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.state != "connected":
                continue
            retry = False
            for path in sorted(self._dirty):
                data = self._ephemeral.get(path)
                if data is None:
                    self._dirty.discard(path)
                    continue
                try:
                    done = await self.run(self._ensure_ephemeral, path, data)
                except KazooException as exc:
                    log.info("%s: registering %s failed (%s); retrying", self.name, path, exc)
                    done = False
                if done and self._ephemeral.get(path) == data:
                    self._dirty.discard(path)
                elif not done:
                    retry = True
            if retry:
                await asyncio.sleep(_REGISTER_RETRY_S)
                self._wake.set()

    def _ensure_ephemeral(self, path: str, data: bytes) -> bool:
        """Create or update our ephemeral node; False while another session holds it."""
        if self.claim(path, data) is None:
            return True
        log.warning(
            "%s: %s is held by another ZooKeeper session (a previous process of this node whose session "
            "has not expired yet, or a duplicate node id); waiting for it to go",
            self.name,
            path,
        )
        return False

    def claim(self, path: str, data: bytes, stale: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Make ``path`` this session's ephemeral node holding ``data`` (blocking: use through ``run``).

        ``stale``: fields only this process can be registering now (the
        address it is bound to and this machine's ``machine_id``). Another
        session's node holding all of them was left by a previous process of
        this node whose session has not expired yet: it is deleted (that
        very version of it) and the claim made at once, rather than waiting
        up to the session timeout.

        Returns:
            ``None`` once this session holds it; while another session does,
            the holder's data (a map, empty if unreadable or if the node
            vanished in between: try again).
        """
        try:
            self.client.create(path, data, ephemeral=True, makepath=True)
            log.info("%s: registered %s in ZooKeeper", self.name, path)
            return None
        except NodeExistsError:
            pass
        try:
            current, stat = self.client.get(path)
        except NoNodeError:
            return {}
        if stat.ephemeralOwner != self.client.client_id[0]:
            holder = loads(current)
            holder = holder if isinstance(holder, dict) else {}
            if stale and all(holder.get(k) == v for k, v in stale.items()):
                try:
                    self.client.delete(path, version=stat.version)
                except (NoNodeError, BadVersionError):
                    return {}  # gone or changed meanwhile: look again
                log.info("%s: %s was left by a previous process at %s; taken over", self.name, path, stale.get("addr"))
                return self.claim(path, data)
            return holder
        if current != data:
            self.client.set(path, data, version=stat.version)
        return None

    # -- helpers ---------------------------------------------------------------------

    def ensure_dirs(self, paths: ZkPaths) -> None:
        """Create the cluster's persistent parents (blocking; use through ``run``)."""
        for path in paths.dirs():
            self.client.ensure_path(path)

    def status(self) -> dict[str, Any]:
        """What health and ``dcache ring`` show about the ZooKeeper connection."""
        since = self.disconnected_since
        return {
            "zookeeper": self.hosts,
            "zookeeper_state": self.state,
            "zookeeper_connected": self.state == "connected",
            "zookeeper_disconnected_s": round(time.monotonic() - since, 3) if since is not None else 0.0,
            "zookeeper_sessions": self.sessions,
        }


@lru_cache(maxsize=1)
def machine_id() -> str:
    """This machine and boot: ``hostname/boot id`` (Linux's ``/proc/sys/kernel/random/boot_id``; the hostname alone elsewhere).

    Two processes with one ``machine_id`` that registered one address ran on
    one host (one network namespace, in a container) since its last boot:
    a port bound now cannot be held by another live process there.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
