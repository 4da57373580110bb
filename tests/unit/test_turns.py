"""``Turns``: the slices of every large request share one budget of keys per loop iteration, round-robin.

Loop iterations are counted, not timed: a probe callback that reschedules
itself runs once per iteration and closes the record of what the slices
served in the iteration before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from dcache.protocol.limits import KEYS_PER_TURN
from dcache.turns import Turns


class Probe:
    """Runs once per loop iteration: ``rounds[i]`` is what was recorded in iteration ``i``."""

    def __init__(self) -> None:
        self.rounds: list[list[tuple[str, int]]] = [[]]
        self.stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def record(self, name: str, keys: int) -> None:
        self.rounds[-1].append((name, keys))

    def _tick(self) -> None:
        if self.stopped:
            return
        self.rounds.append([])
        asyncio.get_running_loop().call_soon(self._tick)

    def served(self) -> list[int]:
        """Keys served per iteration (iterations that served none left out)."""
        return [sum(k for _, k in r) for r in self.rounds if r]


def request(turns: Turns, probe: Probe, name: str, keys: int, done: list[str]) -> Callable[[int], int]:
    """A request of ``keys`` keys, served ``allowed`` at a time; its name lands in ``done`` after its last slice."""
    left = [keys]

    def piece(allowed: int) -> int:
        n = min(allowed, left[0])
        left[0] -= n
        probe.record(name, n)
        if left[0]:
            turns.add(piece)
        else:
            done.append(name)
        return n

    return piece


async def until_done(done: list[str], n: int) -> None:
    async with asyncio.timeout(5):
        while len(done) < n:
            await asyncio.sleep(0)


async def test_a_request_alone_gets_one_slice_of_the_whole_budget_per_iteration() -> None:
    turns, probe, done = Turns(), Probe(), list[str]()
    turns.add(request(turns, probe, "a", 3 * KEYS_PER_TURN + 10, done))
    await until_done(done, 1)
    probe.stopped = True
    assert probe.served() == [KEYS_PER_TURN, KEYS_PER_TURN, KEYS_PER_TURN, 10]
    assert all(len(r) <= 1 for r in probe.rounds)
    assert not turns.busy


async def test_many_requests_share_one_budget_per_iteration_and_take_turns() -> None:
    turns, probe, done = Turns(), Probe(), list[str]()
    for name in "abcd":
        turns.add(request(turns, probe, name, 2 * KEYS_PER_TURN + 10, done))
    assert turns.busy and turns.waiting == 4
    await until_done(done, 4)
    probe.stopped = True
    served = probe.served()
    assert max(served) <= KEYS_PER_TURN and sum(served) == 4 * (2 * KEYS_PER_TURN + 10)
    order = [name for r in probe.rounds for name, _ in r]
    assert order[:4] == ["a", "b", "c", "d"]  # each one's first slice before anyone's second
    assert done == ["a", "b", "c", "d"]
    for r in probe.rounds:  # a request runs at most once per iteration
        names = [name for name, _ in r]
        assert len(names) == len(set(names))
    assert turns.most_keys == KEYS_PER_TURN


async def test_slices_that_serve_nothing_cost_no_turn() -> None:
    """A request whose client left serves no key: the next request's slice runs in the same iteration."""
    turns, probe, done = Turns(), Probe(), list[str]()
    turns.add(lambda allowed: 0)
    turns.add(lambda allowed: 0)
    turns.add(request(turns, probe, "a", KEYS_PER_TURN, done))
    await until_done(done, 1)
    probe.stopped = True
    assert turns.iterations == 1 and turns.slices == 3


async def test_a_slice_that_raises_is_logged_and_the_others_run_on(caplog: pytest.LogCaptureFixture) -> None:
    turns, probe, done = Turns(), Probe(), list[str]()

    def broken(allowed: int) -> int:
        raise RuntimeError("boom")

    turns.add(broken)
    turns.add(request(turns, probe, "a", 2 * KEYS_PER_TURN, done))
    with caplog.at_level(logging.ERROR, "dcache.turns"):
        await until_done(done, 1)
    probe.stopped = True
    assert probe.served() == [KEYS_PER_TURN, KEYS_PER_TURN]
    assert "a slice of a large request raised" in caplog.text and "RuntimeError: boom" in caplog.text
