"""Requests in flight on one connection: id allocation, answer matching, deadlines (sans-IO).

Every connection that sends requests (the client's, a master's links to its
aux nodes, the load generator's) keeps one ``RequestTable``: ``add`` gives a
new request an id and remembers who waits for its answer, ``pop`` finds that
waiter when the answer ``[request_id, status, result]`` arrives, ``drain``
hands every waiter back when the connection is lost, and ``expired`` yields
the requests whose deadline passed, for a sweeper that answers them with a
timeout.

Design note
-----------
Ids run from 1 to ``max_id`` and wrap, skipping ids still in flight; 0 is
reserved for connection-level error frames. Deadlines are appended in
increasing order (one timeout per lane), so each lane is a deque and the
sweep looks only at their heads: no timer handle per request. A deadline
whose request was already answered is dropped when the sweep reaches it.
There are two lanes: requests whose answer the peer may hold back on
purpose (``late``: a write an aux node holds until near caches dropped
their copies) wait longer than the others, and keeping them apart keeps
each lane in order.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

__all__ = ["RequestTable", "MAX_REQUEST_ID"]

#: Request ids run from 1 to this value, then wrap.
MAX_REQUEST_ID = 2**32 - 1

W = TypeVar("W")


class RequestTable(Generic[W]):
    """The requests in flight on one connection and who waits for each answer.

    ``W`` is whatever the owner needs to deliver an answer: a future, a
    callback.
    """

    __slots__ = ("waiters", "_next_id", "_max_id", "_deadlines", "_late")

    def __init__(self, max_id: int = MAX_REQUEST_ID) -> None:
        if max_id < 1:
            raise ValueError("max_id must be at least 1")
        #: request id -> waiter, for every request not yet answered.
        self.waiters: dict[int, W] = {}
        self._next_id = 1
        self._max_id = max_id
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._late: collections.deque[tuple[float, int]] = collections.deque()

    def __len__(self) -> int:
        return len(self.waiters)

    def add(self, waiter: W, deadline: float | None = None, *, late: bool = False) -> int:
        """Register a new request; return its id.

        ``deadline`` (any monotonic clock, the same for every call) makes the
        request show up in ``expired`` once it passes. Deadlines must not
        decrease from one call to the next within a lane: ``late`` requests
        (a longer timeout) have their own.

        Raises:
            RuntimeError: every id is in flight.
        """
        waiters = self.waiters
        if len(waiters) >= self._max_id:
            raise RuntimeError("every request id is in flight")
        rid = self._next_id
        max_id = self._max_id
        while rid in waiters:
            rid = rid + 1 if rid < max_id else 1
        self._next_id = rid + 1 if rid < max_id else 1
        waiters[rid] = waiter
        if deadline is not None:
            (self._late if late else self._deadlines).append((deadline, rid))
        return rid

    def pop(self, rid: object) -> W | None:
        """The waiter of request ``rid``, removed; ``None`` if unknown (answered, expired or forgotten)."""
        try:
            waiter: W = self.waiters.pop(rid)  # type: ignore[call-overload]
        except (KeyError, TypeError):  # unknown, or an unhashable id from a broken peer
            return None
        return waiter

    def forget(self, rid: int, waiter: W) -> bool:
        """Drop request ``rid`` if ``waiter`` still waits for it (a caller that stopped waiting)."""
        if self.waiters.get(rid) is waiter:
            del self.waiters[rid]
            return True
        return False

    def drain(self) -> list[W]:
        """Every waiter, removed (the connection is lost)."""
        waiters = list(self.waiters.values())
        self.waiters.clear()
        self._deadlines.clear()
        self._late.clear()
        return waiters

    def expired(self, now: float) -> list[tuple[int, W]]:
        """The requests whose deadline is ``<= now``, removed, oldest first within each lane."""
        out: list[tuple[int, W]] = []
        waiters = self.waiters
        for deadlines in (self._deadlines, self._late):
            while deadlines:
                deadline, rid = deadlines[0]
                if rid not in waiters:
                    deadlines.popleft()
                    continue
                if deadline > now:
                    break
                deadlines.popleft()
                out.append((rid, waiters.pop(rid)))
        return out

    def oldest_deadline(self, *, late: bool = False) -> float | None:
        """The earliest deadline of a request still in flight in one lane (``late``: the longer one), if any."""
        deadlines = self._late if late else self._deadlines
        waiters = self.waiters
        while deadlines and deadlines[0][1] not in waiters:
            deadlines.popleft()
        return deadlines[0][0] if deadlines else None
