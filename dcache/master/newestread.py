"""Reads that ask every owner of a key and answer the newest version (``NewestRead``).

A master reads this way only while the owners of a key may disagree in a
way its normal read (first trusted owner, then the others on a miss) cannot
see: after a lone embedded coordinator restarted, the ring is rebuilt from
the aux nodes' re-announcements and a node that was down or fenced comes
back up with the writes it missed kept only in the dead coordinator's
hints. The reconciliation pass (``Migrator.recover``) sends each owner's
copies to the others; until it reaches a key, such a node would answer its
older value. ``Router.read_every_owner`` is set for the length of that pass
on every master (from the view it routes by, ``ClusterView.reconciling``;
docs/DECISIONS.md, "Reads ask every owner while that pass runs" and the
entries after it); the hot path pays one attribute test otherwise (80 instructions of
about 10,800 per routed GET, ``bin/bench_get_cpu.py``).

One read, at most three round trips, each to the key's live owners only:

1. ``GETV`` to every read candidate at once. No entry anywhere: a miss.
2. The newest entry ``E`` (highest version) is written back to the owners
   that answered nothing or an older version (``APPLY``, last writer wins,
   the read repair of ``Router.repair``). Every one of them stored it:
   ``E`` is the newest and is answered; they now hold it too.
3. An owner that stored nothing holds something at least as new as ``E``:
   a tombstone (a delete it got and the others missed; GETV does not show
   tombstones, APPLY's count does) or a write that arrived meanwhile. It is
   read again (``GETV``): a newer entry is answered, none is a miss.

An owner that does not answer (down, timed out) is left out of the
comparison, as the normal read falls back past it; no owner answering is
``UNAVAILABLE``. A newer tombstone is not written back to the owners that
hold the older value (its version is not known here): the pass brings it.

The ops one owner decides (SET NX/XX, INCR/DECR, TOUCH: ``Router.set_if``,
``incr``, ``touch``) run the same read first while reads ask every owner,
with ``then`` instead of a client to answer (``Router.reconcile``): once it
is done, every owner that answered holds the newest entry, except those
that hold something newer still (a tombstone, a write that overtook the
repair). ``then`` gets the owner to decide on: one that holds the newest
state the read saw (None: the owners agree, or none holds the key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Status
from ..protocol import Op

if TYPE_CHECKING:
    from .links import AuxLink

__all__ = ["NewestRead"]

_OK = 0
_UNAVAILABLE = int(Status.UNAVAILABLE)
_GET = int(Op.GET)
_GETV = int(Op.GETV)
_APPLY = int(Op.APPLY)


class Sink(Protocol):
    """Where the read's answer goes (``router.Sink``: a client connection, or a collector of several answers)."""

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None: ...


class _Stats(Protocol):
    """The counters of ``router.RouterStats`` a read moves."""

    hits: int
    misses: int
    unavailable: int
    fallbacks: int
    repairs: int


class Router(Protocol):
    """What a ``NewestRead`` uses of the master's ``router.Router`` (named here, so that this module needs no import of it)."""

    @property
    def links(self) -> Mapping[str, AuxLink]: ...

    @property
    def stats(self) -> _Stats: ...


class NewestRead:
    """One read in flight over every owner of a key (module note); it answers ``sink`` once.

    ``entry``: answer ``[value, expires_at, version]`` instead of the value.
    ``then``: instead of answering ``sink``, call ``then(holder)`` once the owners are
    brought up to the newest entry (module note; ``sink`` is not used).
    """

    __slots__ = ("router", "sink", "rid", "key", "entry", "then", "holder", "pending", "entries", "error", "newest", "recheck")

    def __init__(
        self, router: Router, sink: Sink | None, rid: int, key: bytes, entry: bool, then: Callable[[str | None], None] | None = None
    ) -> None:
        self.router = router
        self.sink = sink
        self.rid = rid
        self.key = key
        self.entry = entry
        self.then = then
        #: An owner that holds the newest state seen (set where the owners disagreed).
        self.holder: str | None = None
        self.pending = 0
        #: What each owner answered to the current step's reads (None: no entry).
        self.entries: dict[str, list[Any] | None] = {}
        self.error: Any = None
        self.newest: list[Any] | None = None
        #: Owners that stored nothing of the newest entry: they hold something at least as new.
        self.recheck: list[str] = []

    def start(self, candidates: list[str]) -> None:
        """Ask every node of ``candidates`` for the key's entry."""
        self._read(candidates, self._first)

    def _read(self, nodes: list[str], then: Any) -> None:
        links = self.router.links
        self.entries = {}
        self.pending = len(nodes)
        for node in nodes:
            link = links.get(node)
            if link is None:
                self._answer(then, node, _UNAVAILABLE, f"no link to aux node {node}")
            else:
                link.send(_GETV, (self.key,), partial(self._answer, then, node))

    def _answer(self, then: Any, node: str, status: int, result: Any) -> None:
        if status == _OK and (result is None or (result.__class__ is list and len(result) == 3)):
            self.entries[node] = result
        elif status == _OK:
            self.error = f"malformed GETV answer from aux node {node}"
        else:
            self.error = result
            self.router.stats.fallbacks += 1
        self.pending -= 1
        if self.pending == 0:
            then()

    def _first(self) -> None:
        """Step 1 done: answer, or write the newest entry back to the owners behind it."""
        entries = self.entries
        hits = [e for e in entries.values() if e is not None]
        if not hits:
            self._finish(None, answered=bool(entries))
            return
        newest = max(hits, key=_version)
        behind = [n for n, e in entries.items() if e is None or e[2] < newest[2]]
        if not behind:
            self._finish(newest, answered=True)
            return
        self.holder = next(n for n, e in entries.items() if e is newest)
        self.newest = newest
        self.pending = len(behind)
        links = self.router.links
        stats = self.router.stats
        value, expires_at, version = newest
        for node in behind:
            link = links.get(node)
            if link is None:
                self._applied(node, _UNAVAILABLE, None)
                continue
            stats.repairs += 1
            link.send(_APPLY, ([[self.key, value, expires_at, version]],), partial(self._applied, node))

    def _applied(self, node: str, status: int, result: Any) -> None:
        if status == _OK and result == 0:
            self.recheck.append(node)  # it holds a tombstone or a write at least as new
        # An owner that did not answer the repair answered the read a moment ago: it is left out.
        self.pending -= 1
        if self.pending:
            return
        if not self.recheck:
            self._finish(self.newest, answered=True)
            return
        self._read(self.recheck, self._second)

    def _second(self) -> None:
        """Step 3 done: a newer entry on an owner that refused the repair, else its tombstone wins."""
        newest = self.newest
        assert newest is not None
        entries = self.entries
        newer = [e for e in entries.values() if e is not None and e[2] >= newest[2]]
        if newer:
            top = max(newer, key=_version)
            self.holder = next(n for n, e in entries.items() if e is top)
            self._finish(top, answered=True)
        elif entries:
            self.holder = next(iter(entries))  # it holds the newer tombstone
            self._finish(None, answered=True)  # a newer tombstone (or the entry expired meanwhile)
        else:
            self._finish(newest, answered=True)  # the owners that refused it no longer answer

    def _finish(self, entry: list[Any] | None, answered: bool) -> None:
        if self.then is not None:
            self.then(self.holder)
            return
        stats = self.router.stats
        assert self.sink is not None
        if entry is not None:
            stats.hits += 1
            self.sink.reply(self.rid, _OK, entry if self.entry else entry[0])
        elif not answered and self.error is not None:
            stats.unavailable += 1
            self.sink.reply(self.rid, _UNAVAILABLE, f"no owner of the key answered: {self.error}", _GET)
        else:
            stats.misses += 1
            self.sink.reply(self.rid, _OK, None)


def _version(entry: list[Any]) -> int:
    version: int = entry[2]
    return version
