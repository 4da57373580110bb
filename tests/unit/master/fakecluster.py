"""A master's view of a few aux nodes, in memory: real ``AuxNode`` handlers behind ``FakeAux`` connections.

Each aux node is a real ``AuxNode`` that is never started: requests reach
it through ``AuxLink`` -> ``PeerConnection`` -> ``FakeAux`` and are
answered with ``AuxNode.execute`` (the same parsers and handlers as on the
wire), one loop iteration later. Knobs make nodes misbehave: ``held``
nodes leave every request unanswered, ``overrides[(node, op)]`` answers
one op of one node instead of the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from dcache.auxnode.node import AuxNode
from dcache.config import AuxConfig
from dcache.errors import ServerError
from dcache.hlc import HybridClock, wall_ms
from dcache.master.links import AuxLink
from dcache.master.router import Router
from dcache.master.view import ClusterView, Member
from dcache.protocol import Op
from tests.fakes import FakeAux, Reply


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait, yielding to the loop, until ``predicate()`` holds; fail after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Sink:
    """Records the answers a router gives (a stand-in for a client connection)."""

    def __init__(self) -> None:
        self.answers: dict[int, list[tuple[int, Any]]] = {}
        self.ops: dict[int, int] = {}
        self._futures: dict[int, asyncio.Future[tuple[int, Any]]] = {}
        #: ``hold_input`` and ``release_input`` calls (a large MGET or MSET routed in slices), and whether the client left.
        self.holds = 0
        self.releases = 0
        self.is_closing = False

    def hold_input(self) -> None:
        self.holds += 1

    def release_input(self) -> None:
        self.releases += 1

    def _future(self, rid: int) -> asyncio.Future[tuple[int, Any]]:
        fut = self._futures.get(rid)
        if fut is None:
            fut = self._futures[rid] = asyncio.get_running_loop().create_future()
        return fut

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None:
        self.answers.setdefault(rid, []).append((status, result))
        self.ops[rid] = op
        fut = self._future(rid)
        if not fut.done():
            fut.set_result((status, result))

    async def answer(self, rid: int = 1, timeout: float = 5.0) -> tuple[int, Any]:
        """The answer to ``rid`` (waits for it); every request is answered exactly once."""
        async with asyncio.timeout(timeout):
            answer = await self._future(rid)
        assert len(self.answers[rid]) == 1, f"request {rid} answered {len(self.answers[rid])} times: {self.answers[rid]}"
        return answer


class FakeCluster:
    """Aux nodes ``ids`` (real handlers, fake connections), links to them and a router over a view of them."""

    def __init__(
        self,
        ids: Iterable[str] = ("a1", "a2", "a3"),
        replicas: int = 2,
        *,
        spare: Iterable[str] = (),
        write_quorum: int = 0,
        timeout: float = 5.0,
        suspect_after: float = 5.0,
    ) -> None:
        self.ids = list(ids)
        #: Aux nodes not in the first view (they may join later).
        self.spare = list(spare)
        self.auxes = {n: AuxNode(AuxConfig(node_id=n)) for n in self.ids + self.spare}
        self._timeout = timeout
        self._suspect_after = suspect_after
        self.held: set[str] = set()
        self.overrides: dict[tuple[str, int], Callable[[list[Any]], Any]] = {}
        self.fake = FakeAux(self._answer)
        self.members = [Member(n, "127.0.0.1", 7100 + i) for i, n in enumerate(self.ids)]
        self.view = ClusterView.initial(self.members, replicas, epoch=1)
        self.clock = HybridClock("m1")
        self.links: dict[str, AuxLink] = {m.node_id: self.new_link(m) for m in self.members}
        self.router = Router(self.view, self.links, self.clock, write_quorum)
        self.recovered: list[str] = []
        #: Every view ``adopt`` was given, in order.
        self.views: list[ClusterView] = []

    def new_link(self, m: Member) -> AuxLink:
        """A link to ``m`` over the fake connections (not started)."""
        link = AuxLink(
            m.node_id, m.host, m.port, size=1, timeout=self._timeout, suspect_after=self._suspect_after, factory=self.fake.connect
        )
        link.on_recover = self._on_recover
        return link

    def adopt(self, view: ClusterView) -> None:
        """Route by ``view`` and open links to its new members (a membership's ``on_view``, as a master node's)."""
        self.views.append(view)
        for node_id, m in view.members.items():
            if node_id not in self.links:
                link = self.links[node_id] = self.new_link(m)
                link.start()
        self.router.view = view

    def _on_recover(self, node_id: str) -> None:
        self.recovered.append(node_id)
        self.router.on_recover(node_id)

    def _answer(self, node: str, msg: list[Any]) -> Any:
        override = self.overrides.get((node, msg[0]))
        if override is not None:
            return override(msg)
        if node in self.held:
            return None
        try:
            return Reply(0, self.auxes[node].execute(msg))
        except ServerError as exc:
            return Reply(exc.code, exc.message)

    async def start(self) -> FakeCluster:
        for link in self.links.values():
            link.start()
        await until(lambda: all(link.connected for link in self.links.values() if link.node_id not in self.fake.refused))
        return self

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()

    async def __aenter__(self) -> FakeCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the data on the aux nodes ----------------------------------------------------

    def entry(self, node: str, key: bytes) -> list[Any] | None:
        """``[value, expires_at, version]`` of ``key`` on ``node`` (no hit counted), or None."""
        e = self.auxes[node].cache.get_entry(key)
        return None if e is None else [e.value, e.expires_at, e.version]

    def value(self, node: str, key: bytes) -> bytes | None:
        """The value of ``key`` on ``node``, or None."""
        e = self.auxes[node].cache.get_entry(key)
        return None if e is None else e.value

    def put(self, node: str, key: bytes, value: bytes, version: int | None = None, expires_at: int = 0) -> int:
        """Store ``key`` on ``node`` directly (as if written before); returns its version."""
        v = version if version is not None else self.clock.next()
        assert self.auxes[node].execute([Op.APPLY, 1, [[key, value, expires_at, v]]]) == 1
        return v

    def future_version(self, ahead_ms: int = 1000) -> int:
        """A version from ``ahead_ms`` in the future (within the skew bound): newer than anything the router issues now."""
        return HybridClock("elsewhere", clock=lambda: wall_ms() + ahead_ms).next()

    def key_owned_by(self, *owners: str) -> bytes:
        """A key whose read candidates (in the current view) start with ``owners``, in that order."""
        for i in range(100_000):
            key = b"key:%d" % i
            if self.router.view.read_candidates(key)[: len(owners)] == list(owners):
                return key
        raise AssertionError(f"no key owned by {owners}")

    def sent(self, node: str, *ops: int) -> list[list[Any]]:
        """Requests ``node`` received (of ``ops`` if given), HELLO excluded."""
        return self.fake.ops(node, *ops)

    async def make_suspect(self, node: str) -> None:
        """Stop ``node`` answering and wait until its link suspects it (needs a small ``suspect_after``)."""
        self.held.add(node)
        link = self.links[node]
        link.send(Op.PING, (), _ignore)
        link.flush()
        await until(lambda: link.suspect, what=f"{node} to be suspected")

    async def recover(self, node: str) -> None:
        """Let ``node`` answer again (its pending probes too) and wait until its link trusts it."""
        self.held.discard(node)
        link = self.links[node]
        for msg in self.sent(node, Op.PING):
            self.fake.respond(node, msg, "PONG")  # answered already (a timeout) or not: any answer is a sign of life
        await until(lambda: not link.suspect, what=f"{node} to recover")


def _ignore(status: int, result: Any) -> None:
    pass
