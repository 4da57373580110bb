"""Gray failures under load: a stopped, killed, cut off or blackholed aux node; a slow client link.

Each test runs 1-2 masters and 3 aux nodes with ``--replicas 2`` on
loopback, with the masters' DEFAULT health flags (not tests/cluster.py's
FAST_HEALTH: detection time is one of the requirements). Every aux node
advertises a ``FaultProxy`` address, so masters reach it through the proxy
and a test can cut or blackhole that link alone. A ``LoadChecker`` runs
alongside (writers and readers through the masters) and the requirements
(DESIGN.md §9, "gray failure") are checked together at the end, so one run
reports every requirement that is not met, with the real figures:

* never a failed write while another owner is live;
* never a stale read, a resurrected delete or a lost acknowledged write;
* a stopped node is marked down within about 2 s;
* RING and STATS answer within about a second while a node is stopped;
* the node that missed writes is brought up to date once it answers again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dcache import Client
from dcache.protocol import Op
from dcache.ring import HashRing
from tests.cluster import settled, wait_ring
from tests.faults.checker import CheckerStats, LoadChecker
from tests.faults.proxy import FaultProxy
from tests.harness import DaemonProcess

pytestmark = pytest.mark.slow

NODES = ("a1", "a2", "a3")
#: Detection bound asserted: the 2 s requirement plus slack for a busy 2-core machine.
DETECT_BOUND_S = 3.0
#: RING/STATS latency bound asserted while a node is stopped ("about a second").
ANSWER_BOUND_S = 1.5
#: How long a fault lasts.
FAULT_S = 5.0
#: Bound on the cluster settling (node back up, migration done) after a fault heals.
SETTLE_S = 40.0
#: Bound on the replicas converging after the cluster settled.
CONVERGE_S = 20.0


class FaultCluster:
    """Masters with default health flags; aux nodes each behind its own ``FaultProxy``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.masters: list[DaemonProcess] = []
        self.aux: dict[str, DaemonProcess] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.stopped: set[str] = set()

    def start(self, masters: int = 2) -> FaultCluster:
        base = ["--host", "127.0.0.1", "--port", "0", "--replicas", "2", "--log-level", "info"]
        m1 = DaemonProcess("master", [*base, "--node-id", "m1"]).start()
        self.masters.append(m1)
        for i in range(2, masters + 1):
            self.masters.append(DaemonProcess("master", [*base, "--node-id", f"m{i}", "--coordinator", m1.addr]).start())
        for node in NODES:
            proxy = self.proxies[node] = FaultProxy(name=node).start()
            data = self.tmp / node
            data.mkdir(parents=True, exist_ok=True)
            args = ["--host", "127.0.0.1", "--port", "0", "--node-id", node, "--log-level", "info", "--data-dir", str(data)]
            args += ["--snapshot-interval", "0", "--join", m1.addr, "--advertise", proxy.addr]
            aux = self.aux[node] = DaemonProcess("aux", args).start()
            proxy.set_upstream(aux.addr)
        return self

    @property
    def addrs(self) -> list[str]:
        return [m.addr for m in self.masters]

    @property
    def direct(self) -> dict[str, str]:
        """Aux node id -> its own address (not through its proxy)."""
        return {n: a.addr for n, a in self.aux.items()}

    async def settled(self, nodes: frozenset[str] = frozenset(NODES), timeout: float = SETTLE_S) -> dict[str, Any]:
        """Wait until every master sees exactly ``nodes`` up and no migration; the coordinator's RING."""
        infos = [
            await wait_ring(m.addr, settled(set(nodes)), timeout=timeout, what=f"{m.addr}: {sorted(nodes)} up, settled")
            for m in self.masters
        ]
        return infos[0]

    def stop_node(self, node: str) -> None:
        self.stopped.add(node)
        self.aux[node].signal(signal.SIGSTOP)

    def cont_node(self, node: str) -> None:
        self.aux[node].signal(signal.SIGCONT)
        self.stopped.discard(node)

    def close(self) -> None:
        for node in list(self.stopped):
            self.cont_node(node)
        for p in [*self.masters, *self.aux.values()]:
            p.kill()
        for proxy in self.proxies.values():
            proxy.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.role} {p.args[-8:]}\n{p.stderr()}" for p in [*self.masters, *self.aux.values()])


@pytest.fixture
def fc(tmp_path) -> Iterator[FaultCluster]:
    cluster = FaultCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs()[-30000:])  # shown by pytest only when the test fails


class Requirements:
    """Collects every unmet requirement, so one run reports them all."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        print(("ok     " if ok else "FAILED ") + what)
        if not ok:
            self.failed.append(what)

    def assert_all(self, chk: LoadChecker) -> None:
        assert not self.failed, "unmet requirements:\n  " + "\n  ".join(self.failed) + "\nchecker: " + chk.report()


async def print_master_counters(fc: FaultCluster) -> None:
    """The masters' routing counters, for the report."""
    for m in fc.masters:
        async with Client(m.addr, timeout=5.0) as c:
            st = await c.stats()
        keys = (
            "requests",
            "errors",
            "fallbacks",
            "repairs",
            "unavailable",
            "partial_writes",
            "near_cache_hits",
            "near_cache_invalidations",
        )
        print(f"master {m.addr}: " + ", ".join(f"{k} {st.get(k)}" for k in keys))


def victim_for(info: dict[str, Any], chk: LoadChecker) -> str:
    """The aux node owning the most checked keys (every node owns some with 3 nodes and 2 replicas)."""
    ring = HashRing.from_dict(info["ring"])
    counts = {n: 0 for n in NODES}
    for key in chk.keys:
        for node in ring.owners(key.raw, 2):
            counts[node] += 1
    node = max(counts, key=lambda n: counts[n])
    assert counts[node] > 0
    print(f"victim {node}: owner of {counts[node]} of {len(chk.keys)} checked keys ({counts})")
    return node


def node_entry(info: dict[str, Any], node: str) -> dict[str, Any]:
    return next(n for n in info["nodes"] if n["node_id"] == node)


def not_answering(entry: dict[str, Any]) -> bool:
    """Whether a RING node entry shows the node as not answering."""
    return entry["state"] != "up" or entry.get("connected") is False


async def check_end(req: Requirements, fc: FaultCluster, chk: LoadChecker, window: CheckerStats, *, failed_writes_allowed: bool) -> None:
    """After the fault healed: load goes on, then settle, verify and convergence; into ``req``."""
    info = await fc.settled()
    await chk.progress(sets=50, reads=50)
    await chk.stop()
    await chk.verify(fc.addrs[0])
    await print_master_counters(fc)
    s = chk.stats
    print(f"during the fault: {window.summary()}")
    print(f"whole run: {s.summary()}")
    for line in chk.examples:
        print("  " + line)
    if not failed_writes_allowed:
        req.check(s.failed_writes == 0, f"no failed write while another owner is live (failed: {s.failed_writes}, {dict(s.failures)})")
    req.check(window.writes_ok > 0, f"writes kept succeeding during the fault ({window.writes_ok} acknowledged)")
    req.check(s.stale == 0, f"no stale read ({s.stale})")
    req.check(s.resurrected == 0, f"no resurrected delete ({s.resurrected})")
    req.check(s.wrong == 0, f"no wrong value ({s.wrong})")
    req.check(s.lost == 0, f"no lost acknowledged write ({s.lost})")
    problems = await chk.owner_problems(info, fc.direct)
    deadline = time.monotonic() + CONVERGE_S
    while problems and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        problems = await chk.owner_problems(await fc.settled(), fc.direct)
    req.check(not problems, f"every owner holds the latest acknowledged value ({len(problems)} stale copies: {problems[:3]})")


async def measure_answers(fc: FaultCluster, until: float, victim: str) -> dict[str, Any]:
    """Poll RING and STATS on every master until ``until`` (monotonic): slowest answers, errors, what RING showed."""
    slowest: dict[str, float] = {}
    shown_not_answering = False
    errors: list[str] = []
    clients = [Client(a, timeout=5.0) for a in fc.addrs]
    try:
        while time.monotonic() < until:
            for i, c in enumerate(clients):
                for op in (Op.RING, Op.STATS):
                    name = f"{Op(op).name} m{i + 1}"
                    t0 = time.monotonic()
                    try:
                        result = await c.execute(op)
                    except Exception as exc:
                        errors.append(f"{name}: {exc!r}")
                        result = None
                    slowest[name] = max(slowest.get(name, 0.0), time.monotonic() - t0)
                    if op == Op.RING and result is not None and not_answering(node_entry(result, victim)):
                        shown_not_answering = True
            await asyncio.sleep(0.1)
    finally:
        for c in clients:
            await c.close()
    return {"slowest": slowest, "shown_not_answering": shown_not_answering, "errors": errors}


async def marked_down_after(coordinator: str, victim: str, since_ms: int) -> float | None:
    """Seconds from ``since_ms`` (wall) to the coordinator's health event marking ``victim`` down; None if none."""
    async with Client(coordinator, timeout=5.0) as c:
        info = await c.execute(Op.RING)
    for event in info["membership"].get("health_events", []):
        if event["node_id"] == victim and event["state"] == "down" and event["at_ms"] >= since_ms:
            return float((event["at_ms"] - since_ms) / 1000)
    return None


async def _stall_test(fc: FaultCluster, stall: str) -> None:
    """A stalled owner (SIGSTOP or a blackholed link) for FAULT_S under load, then back."""
    fc.start(masters=2)
    info = await fc.settled()
    chk = LoadChecker(fc.addrs, seed=11, inspect=fc.direct)
    victim = victim_for(info, chk)
    chk.start()
    req = Requirements()
    try:
        await chk.progress(sets=100, reads=100)
        before = chk.snapshot()
        stop_wall_ms = time.time_ns() // 1_000_000
        t_stop = time.monotonic()
        if stall == "sigstop":
            fc.stop_node(victim)
        else:
            fc.proxies[victim].blackhole()
        try:
            seen = await measure_answers(fc, t_stop + FAULT_S, victim)
        finally:
            if stall == "sigstop":
                fc.cont_node(victim)
            else:
                fc.proxies[victim].heal()
        window = chk.snapshot() - before
        detect = await marked_down_after(fc.addrs[0], victim, stop_wall_ms)
        print(
            f"{stall} {victim} for {FAULT_S} s from {time.strftime('%H:%M:%S', time.localtime(stop_wall_ms / 1000))}: "
            f"marked down after {detect} s; slowest answers {seen['slowest']}; errors {seen['errors'][:3]}"
        )
        req.check(
            detect is not None and detect <= DETECT_BOUND_S,
            f"stalled node marked down within {DETECT_BOUND_S} s (took {detect} s; None: not during the {FAULT_S} s stall)",
        )
        slowest = max(seen["slowest"].values())
        req.check(
            slowest <= ANSWER_BOUND_S and not seen["errors"],
            f"RING and STATS answer within {ANSWER_BOUND_S} s during the stall (slowest {slowest:.2f} s, errors {seen['errors'][:2]})",
        )
        req.check(seen["shown_not_answering"], "RING shows the stalled node as not answering")
        await check_end(req, fc, chk, window, failed_writes_allowed=False)
    finally:
        await chk.stop()
    req.assert_all(chk)


async def test_sigstop_one_owner_under_load(fc: FaultCluster):
    await _stall_test(fc, "sigstop")


async def test_blackholed_master_aux_link_under_load(fc: FaultCluster):
    await _stall_test(fc, "blackhole")


async def test_kill_one_owner_under_load(fc: FaultCluster):
    fc.start(masters=1)
    info = await fc.settled()
    chk = LoadChecker(fc.addrs, seed=12, inspect=fc.direct)
    victim = victim_for(info, chk)
    chk.start()
    req = Requirements()
    try:
        await chk.progress(sets=100, reads=100)
        before = chk.snapshot()
        fc.aux[victim].kill()
        await chk.progress(sets=100, reads=100)  # writes keep succeeding while it is dead
        window = chk.snapshot() - before
        survivors = frozenset(NODES) - {victim}
        info = await fc.settled(survivors)
        await chk.progress(sets=50, reads=50)
        await chk.stop()
        await chk.verify(fc.addrs[0])
        s = chk.stats
        print(f"after kill -9 of {victim}: {window.summary()}\nwhole run: {s.summary()}")
        req.check(s.failed_writes == 0, f"no failed write while another owner is live (failed: {s.failed_writes}, {dict(s.failures)})")
        req.check(
            s.stale == 0 and s.resurrected == 0 and s.wrong == 0, f"no stale read ({s.stale}, resurrected {s.resurrected}, wrong {s.wrong})"
        )
        req.check(s.lost == 0, f"no lost acknowledged write ({s.lost})")
        problems = await chk.owner_problems(info, fc.direct)
        deadline = time.monotonic() + CONVERGE_S
        while problems and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            problems = await chk.owner_problems(await fc.settled(survivors), fc.direct)
        req.check(not problems, f"two copies again on the survivors ({len(problems)} missing or stale: {problems[:3]})")
    finally:
        await chk.stop()
    req.assert_all(chk)


async def test_cut_master_aux_link_under_load(fc: FaultCluster):
    """A short cut (healed before detection) and then a long one, on the same owner."""
    fc.start(masters=2)
    info = await fc.settled()
    chk = LoadChecker(fc.addrs, seed=13, inspect=fc.direct)
    victim = victim_for(info, chk)
    chk.start()
    req = Requirements()
    proxy = fc.proxies[victim]
    try:
        await chk.progress(sets=100, reads=100)
        before = chk.snapshot()
        for cut_s in (0.6, FAULT_S):
            proxy.cut()
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < cut_s:
                    chk.check_running()
                    await asyncio.sleep(0.05)
            finally:
                proxy.heal()
            print(f"cut {victim} for {cut_s} s: proxy {proxy.counters()}")
            await chk.progress(sets=50, reads=200)  # the healed node serves again: are its reads fresh?
        window = chk.snapshot() - before
        await check_end(req, fc, chk, window, failed_writes_allowed=False)
    finally:
        await chk.stop()
    req.assert_all(chk)


async def test_slow_client_link_delay_and_trickle(fc: FaultCluster):
    """A client behind a delayed, then trickled link gets answers or typed timeouts; a direct client sees nothing."""
    fc.start(masters=1)
    await fc.settled()
    master = fc.addrs[0]
    with FaultProxy(master, name="client") as proxy:
        direct = LoadChecker([master], seed=14, writers=2, readers=2)
        slow = LoadChecker([proxy.addr], seed=15, writers=2, readers=2, timeout=2.0, late_failures=True)
        direct.start()
        slow.start()
        req = Requirements()
        try:
            await direct.progress(sets=50, reads=50)
            await slow.progress(sets=50, reads=50)
            phases: dict[str, CheckerStats] = {}
            for name, fault in (
                ("delay 0.3 s", partial(proxy.delay, 0.3)),
                ("delay 3 s (over the 2 s client timeout)", partial(proxy.delay, 3.0)),
                ("trickle 300 B/s", partial(proxy.trickle, 300)),
            ):
                before = slow.snapshot()
                fault()
                t0 = time.monotonic()
                while time.monotonic() - t0 < 3.0:
                    slow.check_running()
                    direct.check_running()
                    await asyncio.sleep(0.05)
                proxy.heal()
                phases[name] = slow.snapshot() - before
                print(f"slow client, {name}: {phases[name].summary()}")
            await slow.progress(sets=20, reads=20, timeout=30)  # healed: the slow client works again
            await asyncio.gather(direct.stop(), slow.stop())
            await direct.verify(master)
            await slow.verify(master)
            print(f"direct client: {direct.stats.summary()}")
            print(f"slow client: {slow.stats.summary()}")
            d = direct.stats
            req.check(not d.failures and d.stale + d.resurrected + d.wrong + d.lost == 0, f"the direct client saw no error ({d.summary()})")
            s = slow.stats
            kinds = {k.split(":", 1)[1] for k in s.failures}
            req.check(kinds <= {"TimeoutError"}, f"the slow client's calls fail only with TimeoutError ({dict(s.failures)})")
            req.check(
                phases["delay 0.3 s"].failed_writes + phases["delay 0.3 s"].failed_reads == 0, "a 0.3 s delay costs latency, not errors"
            )
            req.check(s.stale + s.resurrected + s.wrong + s.lost == 0, f"the slow client read nothing stale ({s.summary()})")
        finally:
            await asyncio.gather(direct.stop(), slow.stop())
        req.assert_all(slow)
