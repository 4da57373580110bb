"""The load checker itself, against one real aux node: silent when all is well, loud when it is not."""

from __future__ import annotations

import asyncio
import time

import pytest

from dcache import Client
from tests.faults.checker import LoadChecker
from tests.harness import start_aux

pytestmark = pytest.mark.slow


@pytest.fixture
def aux(tmp_path):
    node = start_aux(tmp_path)
    yield node
    node.kill()


async def test_no_problem_on_a_healthy_node(aux):
    chk = LoadChecker([aux.addr], writers=2, keys_per_writer=10, readers=2, delete_ratio=0.2, seed=1)
    chk.start()
    await chk.progress(sets=300, reads=300)
    await chk.stop()
    assert await chk.verify(aux.addr) == 0
    print(chk.report())
    s = chk.stats
    assert s.stale == s.resurrected == s.wrong == s.lost == 0 and not s.failures, chk.report()
    assert s.deletes_ok > 0 and s.reads_ok >= 300


async def test_catches_stale_resurrected_wrong_and_lost(aux):
    """A saboteur writes behind the checker's back; every kind of problem must be counted."""
    chk = LoadChecker([aux.addr], writers=2, keys_per_writer=10, readers=2, delete_ratio=0.3, seed=2)
    chk.start()
    await chk.progress(sets=300, reads=50)
    await chk.stop_writers()
    # op 0 of every key is a SET (nothing to delete before it)
    holding = [k for k in chk.keys if k.acked >= 1 and not k.deletes[k.acked]]
    deleted = [k for k in chk.keys if k.acked >= 1 and k.deletes[k.acked]]
    assert len(holding) >= 3 and deleted, "the load did not produce the histories this test needs"
    async with Client(aux.addr) as c:
        await c.set(holding[0].raw, holding[0].value(0))  # an older value than acknowledged: stale
        await c.set(deleted[0].raw, deleted[0].value(0))  # a value after an acknowledged delete: resurrected
        await c.set(holding[1].raw, b"garbage")  # nobody wrote it: wrong
        await c.delete(holding[2].raw)  # an acknowledged write gone: stale now, lost at the end
    deadline = time.monotonic() + 30
    s = chk.stats
    while not (s.stale >= 2 and s.resurrected >= 1 and s.wrong >= 1):
        assert time.monotonic() < deadline, chk.report()
        chk.check_running()
        await asyncio.sleep(0.05)
    await chk.stop()
    assert await chk.verify(aux.addr) >= 4
    print(chk.report())
    assert s.lost == 2, chk.report()  # holding[0] still reads an old value, holding[2] nothing
    assert not s.failures
