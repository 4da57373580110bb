"""An aux node's side of ZooKeeper membership (``dcache aux --zookeeper``).

The node keeps an ephemeral ``/dcache/NAME/aux/<node_id>`` holding its
advertised address, weight and incarnation; the leader master admits it into
the ring. If the node dies, its session ends after ``--zk-session-timeout``
and the node leaves the ring (the masters' health checks usually notice
sooner). On SIGTERM it creates ``leaving/<node_id>`` and keeps serving while
the leader moves its data away; it exits once the ring in ZooKeeper no longer
lists it (or ``--leave-timeout`` passes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from ..config import AuxConfig
from ..zookeeper import ZkPaths, ZkSession, dumps

__all__ = ["ZkAgent"]

log = logging.getLogger("dcache.aux.zookeeper")

#: After leaving the ring, how long a node waits at most for every master to route by that ring.
_MASTERS_CATCH_UP_S = 5.0


class ZkAgent:
    """Registers an aux node in ZooKeeper and leaves through it."""

    def __init__(self, config: AuxConfig, node_id: str, advertise: tuple[str, int], incarnation: int) -> None:
        assert config.zookeeper is not None
        self.config = config
        self.node_id = node_id
        self.paths = ZkPaths(config.cluster)
        self.zk = ZkSession(config.zookeeper, config.zk_session_timeout, f"aux {node_id}")
        self._registration = dumps({"host": advertise[0], "port": advertise[1], "weight": config.weight, "incarnation": incarnation})
        self._in_ring: bool | None = None  # as the ring in ZooKeeper says; None: not read yet
        self._ring_changed = asyncio.Event()
        self._ring_pos = (0, 0)  # (epoch, seq) of the last ring read
        self._task: asyncio.Task[None] | None = None
        self.joined = asyncio.Event()

    def start(self) -> None:
        """Connect and register in the background."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        await self.zk.start()
        await self.zk.wait_connected()
        while True:
            try:
                await self.zk.run(self.zk.ensure_dirs, self.paths)
                await self.zk.run(self.zk.watch_data, self.paths.ring, self._on_ring)
                break
            except Exception as exc:
                log.warning("setting up ZooKeeper membership failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                await self.zk.wait_connected()
        self.zk.register(f"{self.paths.aux}/{self.node_id}", self._registration)

    def _on_ring(self, data: bytes | None, stat: Any) -> None:
        if not data:
            return
        try:
            view = msgpack.unpackb(data, raw=False, strict_map_key=False)
            members = {m["node_id"] for m in view["members"]}
            pos = (int(view.get("epoch", 0)), int(view.get("seq", 0)))
        except Exception as exc:
            log.warning("unreadable ring in ZooKeeper: %s", exc)
            return
        self._in_ring = self.node_id in members
        self._ring_pos = pos
        if self._in_ring and not self.joined.is_set():
            log.info("in the ring (ZooKeeper cluster %r)", self.config.cluster)
            self.joined.set()
        self._ring_changed.set()

    async def leave(self) -> bool:
        """Ask the leader to move this node's data away; True once the ring no longer lists it."""
        if not self.joined.is_set():
            return True
        log.info("leaving the cluster: waiting for the leader master to move this node's data")
        self.zk.register(f"{self.paths.leaving}/{self.node_id}", dumps({"node_id": self.node_id}))
        try:
            async with asyncio.timeout(self.config.leave_timeout):
                while self._in_ring:
                    self._ring_changed.clear()
                    await self._ring_changed.wait()
        except TimeoutError:
            log.warning("graceful leave did not complete within %.0f s; shutting down anyway", self.config.leave_timeout)
            return False
        # Out of the ring: stay up until every master routes by that ring, so
        # none sends a request here after the node has gone (bounded).
        lagging = await self.zk.wait_masters_at(self.paths.masters, self._ring_pos, _MASTERS_CATCH_UP_S)
        if lagging:
            log.warning("masters %s still route by an older ring after %.0f s; leaving anyway", ", ".join(lagging), _MASTERS_CATCH_UP_S)
        log.info("data handed over; leaving")
        return True

    async def close(self) -> None:
        """End the session (the registration vanishes at once)."""
        if self._task is not None:
            self._task.cancel()
        await self.zk.close()

    def status(self) -> dict[str, Any]:
        """ZooKeeper connection and ring membership, for STATS."""
        return {**self.zk.status(), "cluster": self.config.cluster, "in_ring": bool(self._in_ring)}
