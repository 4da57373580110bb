"""One loop-iteration budget for every request a node serves over several iterations.

A large request (a master's MGET or MSET, an aux node's MGET, a RESP DEL,
UNLINK, EXISTS or TOUCH of many keys on an aux node) is served a slice of
keys per loop iteration, so other clients run between its slices, and its
connection's later requests wait until its last slice (``hold_input``).
Its slices after the first do not schedule themselves: each is queued here,
in the one ``Turns`` of the process (``Service.turns``). Once per loop
iteration ``Turns`` runs queued slices, oldest first, each told how many
keys it may serve (what is left of ``budget``, ``KEYS_PER_TURN``), until
they have served ``budget`` keys, and comes back in the next iteration if
any are left. A slice that leaves keys behind queues the next one at the
back: requests take turns, each keeps its own order.

Invariants (tests/unit/test_turns.py; tests/unit/auxnode/test_turns.py):

* an iteration runs each queued request at most once, and its queued slices
  serve at most ``budget`` keys, however many connections hold large
  requests (with a callback per request it was ``connections x slice``);
* a request alone gets one slice of ``budget`` keys per iteration, as with
  its own callback;
* a request's first slice runs in its handler, as before, unless slices
  are queued already (``busy``): then it queues too, so many large requests
  arriving in one iteration add at most one slice to that iteration;
* a slice that raises is logged; the others run on (each slice answers its
  own request's errors and releases its connection; this is the backstop).

The budget counts keys, not slices: slices differ (the last slice of a
request has a few keys, the slice of a request whose client left none), and
what holds the loop is the keys they look up or route. A slice serves at
most the keys it is allowed, so the last one of an iteration may be short.

Complexity: O(1) per slice queued or run (a deque).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from .protocol.limits import KEYS_PER_TURN

__all__ = ["Slice", "Turns"]

log = logging.getLogger("dcache.turns")

#: One slice of a large request: ``piece(allowed)`` serves at most ``allowed`` keys (at least one)
#: and returns how many it served; it queues its successor itself.
Slice = Callable[[int], int]


class Turns:
    """The slices of large requests waiting for a loop iteration, run round-robin within a budget of keys per iteration."""

    __slots__ = ("budget", "_queue", "_scheduled", "_loop", "slices", "iterations", "most_keys")

    def __init__(self, budget: int = KEYS_PER_TURN) -> None:
        #: Keys the queued slices may serve per loop iteration (the last slice run may pass it).
        self.budget = budget
        self._queue: deque[Slice] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Slices run, iterations that ran some, and the most keys one iteration's slices served.
        self.slices = 0
        self.iterations = 0
        self.most_keys = 0

    @property
    def busy(self) -> bool:
        """Whether slices wait for a turn: a new large request then queues its first slice too."""
        return bool(self._queue)

    @property
    def waiting(self) -> int:
        """Slices queued now (one per request in progress)."""
        return len(self._queue)

    def add(self, piece: Slice) -> None:
        """Run ``piece`` in a later loop iteration, in turn with the slices of the other large requests."""
        self._queue.append(piece)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._run)

    def _run(self) -> None:
        """One iteration's turn: the queued slices, oldest first, until ``budget`` keys are served."""
        self._scheduled = False
        queue = self._queue
        budget = self.budget
        served = 0
        ran = 0
        for _ in range(len(queue)):  # a slice queued by a slice run here waits for the next iteration
            if served >= budget:
                break
            piece = queue.popleft()
            ran += 1
            try:
                served += piece(budget - served)
            except Exception:
                log.exception("a slice of a large request raised")
        self.slices += ran
        self.iterations += 1
        if served > self.most_keys:
            self.most_keys = served
        if queue and not self._scheduled:
            self._scheduled = True
            loop = self._loop
            assert loop is not None
            loop.call_soon(self._run)
