"""An aux node's announcements to its master (``dcache.auxnode.membership.JoinAgent``) against a master in-process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dcache.auxnode import membership
from dcache.auxnode.membership import JoinAgent
from dcache.config import AuxConfig, MasterConfig
from dcache.protocol import Op
from dcache.server import Service


class JoinCounter(Service):
    """A master that answers JOIN with epoch 7 and records each one."""

    role = "master"

    def __init__(self) -> None:
        super().__init__("m1", MasterConfig(port=0))
        self.joins: list[Any] = []
        self.handlers[Op.JOIN] = self._join

    def _join(self, conn: Any, rid: int, args: Any) -> int:
        self.joins.append(args)
        return 7


async def listen(service: Service, port: int = 0) -> asyncio.base_events.Server:
    return await asyncio.get_running_loop().create_server(service.protocol_factory, "127.0.0.1", port)


async def stop(service: Service, server: asyncio.base_events.Server) -> None:
    server.close()
    for conn in list(service.state.connections):
        conn.close()
    await server.wait_closed()


async def until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_a_node_that_loses_its_master_announces_again_as_soon_as_the_master_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted coordinator gets the re-announcements it gathers at once, not after the node's pause."""
    monkeypatch.setattr(membership, "_ANNOUNCE_EVERY_S", 3600.0)  # a pause no test outlasts
    first = JoinCounter()
    server = await listen(first)
    port = server.sockets[0].getsockname()[1]
    agent = JoinAgent(AuxConfig(node_id="a1", join=f"127.0.0.1:{port}"), "a1", ("127.0.0.1", 7001))
    agent.start()
    try:
        await until(lambda: agent.epoch == 7, 10, "the first announcement")
        assert len(first.joins) == 1
        await stop(first, server)  # the master stops ...
        restarted = JoinCounter()
        server = await listen(restarted, port)  # ... and comes back at the same address
        try:
            await until(lambda: restarted.joins, 10, "the re-announcement to the restarted master")
            assert restarted.joins[0][0] == "a1"
            assert restarted.joins[0][-1] == 7  # the epoch that admitted it: the master learns it restarted
        finally:
            await stop(restarted, server)
    finally:
        await agent.close()


async def test_a_node_that_loses_its_master_says_so_at_info_and_warns_only_if_it_lasts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A master restarting, or ``dcache cluster`` stopping (the master first), is not an operator's problem for its first
    seconds: one INFO line; the WARNING comes once re-announcing has failed for ``_LOST_QUIET_S``."""
    monkeypatch.setattr(membership, "_ANNOUNCE_EVERY_S", 3600.0)
    monkeypatch.setattr(membership, "_RETRY_S", 0.05)
    monkeypatch.setattr(membership, "_LOST_QUIET_S", 1.5)
    master = JoinCounter()
    server = await listen(master)
    port = server.sockets[0].getsockname()[1]
    agent = JoinAgent(AuxConfig(node_id="a1", join=f"127.0.0.1:{port}"), "a1", ("127.0.0.1", 7001))
    caplog.set_level("INFO", logger="dcache.aux.membership")
    agent.start()
    try:
        await until(lambda: agent.epoch == 7, 10, "the first announcement")
        await stop(master, server)  # the master goes away for good
        await until(lambda: any("lost master" in r.getMessage() for r in caplog.records), 10, "the INFO line")
        lost = next(r for r in caplog.records if "lost master" in r.getMessage())
        assert lost.levelname == "INFO"
        assert not [r for r in caplog.records if r.levelname == "WARNING"]  # not within the quiet period
        await until(lambda: any(r.levelname == "WARNING" for r in caplog.records), 10, "the WARNING once it lasts")
        warning = next(r for r in caplog.records if r.levelname == "WARNING")
        assert "re-announcing to master" in warning.getMessage() and warning.created - lost.created >= 1.4
        assert sum("lost master" in r.getMessage() for r in caplog.records) == 1
    finally:
        await agent.close()
