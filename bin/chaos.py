#!/usr/bin/env python3
"""A Jepsen-style fault campaign: seeded random faults under a checked load, on 127.0.0.1.

For each seed the campaign starts a fresh cluster: two masters (``m1``
coordinates, ``m2`` follows it; both with ``--replicas 2`` and a near
cache that copies every hot key), three aux nodes ``a1``-``a3`` and a
spare ``a4``, each aux node behind its own ``tests.faults.proxy.FaultProxy``
(it advertises the proxy's address, so every master reaches it through the
proxy). Then it runs ``--schedules`` schedules. Each schedule:

1. starts a ``tests.faults.checker.LoadChecker`` that writes through ``m1``
   and reads through ``m2`` and ``m1`` (so ``m1``'s own writes update its
   near-cache copies, KEEP_COPY, and invalidate ``m2``'s), and waits for it
   to make progress (the near caches fill);
2. runs one or two faults at once, drawn from the seed:

   * ``aux-kill-fast`` / ``aux-kill-slow``: SIGKILL an aux node, restart it
     with its data dir (snapshots every second) after 0.1-0.6 s (before
     the masters mark it down) or 3-8 s (after);
   * ``aux-stop``: SIGSTOP an aux node, SIGCONT it 0.3-6 s later;
   * ``aux-flap``: for 2-8 s, SIGSTOP an aux node for a period of
     0.2-1.2 s (around the masters' detection times), SIGCONT it for half
     of one, again and again;
   * ``aux-join`` / ``aux-leave``: start a non-member aux node (with
     whatever its data dir holds) / SIGTERM a member (graceful leave);
     between three and four members;
   * ``master-kill``: SIGKILL ``m1`` (the embedded coordinator: it restarts
     with no ring) or ``m2``, restart it on its port 0.2-4 s later;
   * ``master-stop``: SIGSTOP ``m1`` or ``m2`` for 2.5-6 s, SIGCONT it
     then. Stopped, the coordinator ``m1`` answers no SYNC and checks no
     node's health; a stopped follower ``m2`` falls behind the views the
     coordinator publishes, which waits for it a bounded time (1.5 s for a
     fence, 3 s before a copy) and then raises the aux nodes' ring floor:
     ``m2`` resumes with its old ring and is refused (``STALE_RING``) until
     it reads the new one. Its clients' calls time out meanwhile, and the
     master reads their requests when it resumes, after later ones on new
     connections: the checker allows a failed op's value to show up late
     (``late_failures``) in such a schedule;
   * ``link-cut``, ``link-blackhole``, ``link-delay``: the proxy in front
     of an aux node resets, holds, or delays (0.05-1 s) every master's
     link to it for 0.3-6 s (1-6 s for a delay);

   A combination never holds two faults on one target, nor two that take
   aux nodes out of service (kills, stops, link faults): two of three
   nodes out is beyond ``--replicas 2``;

3. heals everything, waits (bounded) until both masters see every member
   up, in the ring and no migration running, lets the load run on, stops
   it and verifies every key through both masters (``verify()``);
4. prints the schedule (in the form ``--schedule`` takes) and the counts.

With ``--zookeeper`` the same cluster runs in ZooKeeper mode instead: a
fresh standalone ZooKeeper per seed (``tests.zookeeper.ZooKeeperServer``,
on a free loopback port), the masters elect a leader there and keep the
ring there (no ``--coordinator``), the aux nodes register there (no
``--join``); every session times out after ``ZK_SESSION_TIMEOUT_S``. The
faults are those above (``master-kill`` may also target ``leader``: the
master that leads when the fault starts) and:

   * ``zk-kill``: SIGKILL ZooKeeper, restart it on its port with its data
     0.5-6 s later (shorter and longer than a session);
   * ``zk-stop``: SIGSTOP ZooKeeper, SIGCONT it 0.5-6 s later;
   * ``master-stop`` (above) may also target ``leader``, and holds longer
     than a session: ZooKeeper expires it, a leader loses its leadership.

A schedule holds at most one ZooKeeper fault; settling also waits until
both masters are connected to ZooKeeper and one leads.

A nonzero stale, resurrected, wrong or lost count, or a cluster that did
not settle, is a problem: the daemons' logs of that schedule go to
``--log-dir``, and the exit status is 1. ``--schedule`` replays one
schedule (``kind,target,start_s,hold_s[,param];...``) ``--repeat`` times,
each on a fresh cluster, to reduce a failure to the smallest schedule
that shows it.

The whole run is bounded by ``--max-seconds``: no new schedule starts
after it, and every process and proxy the campaign started is stopped on
the way out. Examples::

    bin/chaos.py --seeds 1-6 --schedules 4
    bin/chaos.py --seeds 3 --schedule 'aux-kill-fast,a2,0,0.3;aux-join,a4,0.5,0' --repeat 5
    bin/chaos.py --zookeeper --seeds 1-6 --schedules 4
    bin/chaos.py --zookeeper --seeds 2 --schedule 'zk-stop,zk,0,4.5;aux-kill-fast,a1,1,0.3' --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcache import Client  # noqa: E402
from dcache.protocol import Op  # noqa: E402
from tests.cluster import up_nodes  # noqa: E402
from tests.faults.checker import LoadChecker  # noqa: E402
from tests.faults.proxy import FaultProxy  # noqa: E402
from tests.harness import DaemonProcess, free_port_block  # noqa: E402
from tests.zookeeper import ZooKeeperServer  # noqa: E402

AUX_NODES = ("a1", "a2", "a3", "a4")
MASTERS = ("m1", "m2")
#: ``--zookeeper``: a master fault's target that names whichever master leads when it starts.
LEADER = "leader"
#: ``--zookeeper``: the target of the ZooKeeper faults.
ZK = "zk"
#: ``--zookeeper``: every process's session timeout (``master-stop`` holds longer).
ZK_SESSION_TIMEOUT_S = 2.0
#: Members at the start (the rest are spares that ``aux-join`` starts).
FIRST_MEMBERS = ("a1", "a2", "a3")
MIN_MEMBERS = 3
#: Seconds an aux node snapshots after: a fast restart loads data up to this old.
SNAPSHOT_INTERVAL_S = 1.0
#: Bound on the cluster settling after a schedule healed.
SETTLE_S = 90.0
#: Bound on a graceful leave (SIGTERM to exit).
LEAVE_S = 120.0
#: The load's client timeout (every checker call is bounded by it).
CLIENT_TIMEOUT_S = 5.0
#: Problems kinds the checker counts.
PROBLEMS = ("stale", "resurrected", "wrong", "lost")

#: Fault kinds and the range of seconds each holds its fault.
HOLD_S: dict[str, tuple[float, float]] = {
    "aux-kill-fast": (0.1, 0.6),
    "aux-kill-slow": (3.0, 8.0),
    "aux-stop": (0.3, 6.0),
    "aux-flap": (2.0, 8.0),
    "aux-join": (0.0, 0.0),
    "aux-leave": (0.0, 0.0),
    "master-kill": (0.2, 4.0),
    "link-cut": (0.3, 6.0),
    "link-blackhole": (0.3, 6.0),
    "link-delay": (1.0, 6.0),
    "zk-kill": (0.5, 6.0),
    "zk-stop": (0.5, 6.0),
    "master-stop": (ZK_SESSION_TIMEOUT_S + 0.5, 6.0),
}
#: Kinds only ``--zookeeper`` draws (and takes in ``--schedule``).
ZK_KINDS = ("zk-kill", "zk-stop")
#: Kinds that act on the ZooKeeper server (target ``zk``).
ZK_SERVER_KINDS = ("zk-kill", "zk-stop")
#: Kinds that take a master out (at most one per schedule).
MASTER_KINDS = ("master-kill", "master-stop")
AUX_KILLS = ("aux-kill-fast", "aux-kill-slow")
#: Faults that can take an aux node out of service (the masters may mark it down).
OUT_KINDS = (*AUX_KILLS, "aux-stop", "aux-flap", "link-cut", "link-blackhole", "link-delay")


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` on ``target`` from ``start_s`` after the schedule began, for ``hold_s``.

    ``param`` is the delay in seconds of a ``link-delay``, the period of an
    ``aux-flap`` (0 for the others).
    """

    kind: str
    target: str
    start_s: float
    hold_s: float
    param: float = 0.0

    def __str__(self) -> str:
        text = f"{self.kind},{self.target},{self.start_s:.2f},{self.hold_s:.2f}"
        return text + (f",{self.param:.2f}" if self.param else "")

    @classmethod
    def parse(cls, text: str, zookeeper: bool = False) -> Fault:
        """A fault from its ``str()`` form (``zookeeper``: a ``--zookeeper`` one); raises ``ValueError`` on a bad one."""
        parts = text.strip().split(",")
        kinds = sorted(k for k in HOLD_S if zookeeper or k not in ZK_KINDS)
        if len(parts) not in (4, 5) or parts[0] not in kinds:
            raise ValueError(f"not a fault (kind,target,start_s,hold_s[,param]; kinds {kinds}): {text!r}")
        kind, target = parts[0], parts[1]
        if target not in targets_of(kind, zookeeper):
            raise ValueError(f"{kind} cannot target {target!r}")
        return cls(kind, target, float(parts[2]), float(parts[3]), float(parts[4]) if len(parts) == 5 else 0.0)


def targets_of(kind: str, zookeeper: bool) -> tuple[str, ...]:
    """What a fault of ``kind`` may target."""
    if kind in MASTER_KINDS:
        return (*MASTERS, LEADER) if zookeeper else MASTERS
    if kind in ZK_SERVER_KINDS:
        return (ZK,)
    return AUX_NODES


def parse_schedule(text: str, zookeeper: bool = False) -> list[Fault]:
    """A schedule from ``fault;fault`` (each as ``Fault.parse`` takes it)."""
    return [Fault.parse(part, zookeeper) for part in text.split(";") if part.strip()]


def plan(rng: random.Random, members: frozenset[str], zookeeper: bool = False) -> list[Fault]:
    """One or two faults drawn from ``rng`` for a cluster whose aux members are ``members``.

    Two faults never share a target, and membership stays within 3-4 aux
    nodes. A schedule takes at most one aux node out of service (``OUT_KINDS``):
    with ``--replicas 2`` two nodes out at once are beyond the replica count
    (any two of three nodes own keys together; docs/PROTOCOL.md says what a
    client sees then), and at most one master fault (``MASTER_KINDS``).
    ``--schedule`` may still combine them. ``zookeeper`` adds ``ZK_KINDS``
    and the ``leader`` target (which may be either master).
    """
    faults: list[Fault] = []
    used: set[str] = set()
    size = len(members)
    for i in range(1 if rng.random() < 0.35 else 2):
        kinds = [k for k in HOLD_S if not (k in OUT_KINDS and any(f.kind in OUT_KINDS for f in faults))]
        kinds = [k for k in kinds if not (k in MASTER_KINDS and any(f.kind in MASTER_KINDS for f in faults))]
        if zookeeper:
            kinds = [k for k in kinds if not (k in ZK_SERVER_KINDS and ZK in used)]
        else:
            kinds = [k for k in kinds if k not in ZK_KINDS]
        free = sorted(members - used)
        spares = sorted(set(AUX_NODES) - members - used)
        if not spares or size >= len(AUX_NODES):
            kinds.remove("aux-join")
        if size <= MIN_MEMBERS:
            kinds.remove("aux-leave")
        kind = rng.choice(kinds)
        if kind in MASTER_KINDS:
            targets = sorted(set(targets_of(kind, zookeeper)) - used)
        elif kind in ZK_SERVER_KINDS:
            targets = [ZK]
        elif kind == "aux-join":
            targets = spares
        else:
            targets = free
        if not targets:
            continue
        target = rng.choice(targets)
        used.add(target)
        if kind == "aux-join":
            size += 1
        elif kind == "aux-leave":
            size -= 1
        lo, hi = HOLD_S[kind]
        start = 0.0 if i == 0 else round(rng.uniform(0.0, 3.0), 2)
        param = round(rng.uniform(0.05, 1.0), 2) if kind == "link-delay" else 0.0
        if kind == "aux-flap":
            param = round(rng.uniform(0.2, 1.2), 2)
        faults.append(Fault(kind, target, start, round(rng.uniform(lo, hi), 2), param))
    return faults


class ChaosCluster:
    """Two masters on fixed ports and aux nodes behind fault proxies; every process kept for its log.

    With ``zookeeper`` (a started server) every process runs in ZooKeeper
    mode, as cluster ``name``.
    """

    def __init__(
        self,
        tmp: Path,
        aux_args: Sequence[str] = (),
        master_args: Sequence[str] = (),
        zookeeper: ZooKeeperServer | None = None,
        name: str = "chaos",
    ) -> None:
        self.tmp = tmp
        self.zookeeper = zookeeper
        self.zk_args = (
            ["--zookeeper", zookeeper.hosts, "--cluster", name, "--zk-session-timeout", str(ZK_SESSION_TIMEOUT_S)] if zookeeper else []
        )
        self.aux_args = list(aux_args)
        self.master_args = list(master_args)
        self.ports = {m: free_port_block() for m in MASTERS}  # below the ephemeral range: kept across restarts
        self.masters: dict[str, DaemonProcess] = {}
        self.aux: dict[str, DaemonProcess] = {}
        self.proxies = {n: FaultProxy(name=n).start() for n in AUX_NODES}
        self.members: set[str] = set()
        #: SIGSTOPped processes, by name (aux nodes, masters, ``zk``): resumed on the way out
        self.stopped: set[str] = set()
        #: every process started, in order, with its name (logs of restarted ones too)
        self.history: list[tuple[str, DaemonProcess]] = []

    def addr(self, master: str) -> str:
        return f"127.0.0.1:{self.ports[master]}"

    @property
    def direct(self) -> dict[str, str]:
        """Member id -> its own address (not through its proxy)."""
        return {n: p.addr for n, p in self.aux.items() if n in self.members and p.alive}

    def start_master(self, name: str) -> None:
        args = ["--host", "127.0.0.1", "--port", str(self.ports[name]), "--node-id", name, "--replicas", "2", "--log-level", "info"]
        args += ["--near-cache-size", "4MiB", "--near-cache-min-hits", "0", *self.zk_args, *self.master_args]
        if name != MASTERS[0] and not self.zookeeper:
            args += ["--coordinator", self.addr(MASTERS[0])]
        proc = DaemonProcess("master", args).start()
        self.masters[name] = proc
        self.history.append((name, proc))

    def start_aux(self, name: str) -> None:
        data = self.tmp / name
        data.mkdir(parents=True, exist_ok=True)
        args = ["--host", "127.0.0.1", "--port", "0", "--node-id", name, "--log-level", "info", "--data-dir", str(data)]
        args += ["--snapshot-interval", str(SNAPSHOT_INTERVAL_S), *(self.zk_args or ["--join", self.addr(MASTERS[0])])]
        args += ["--advertise", self.proxies[name].addr, *self.aux_args]
        proc = DaemonProcess("aux", args).start()
        self.aux[name] = proc
        self.history.append((name, proc))
        self.proxies[name].set_upstream(proc.addr)
        self.members.add(name)

    def start(self) -> None:
        for name in MASTERS:
            self.start_master(name)
        for name in FIRST_MEMBERS:
            self.start_aux(name)

    def leave(self, name: str) -> None:
        """SIGTERM a member and wait for its graceful leave (bounded)."""
        self.aux[name].terminate(LEAVE_S)
        self.members.discard(name)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        if name == ZK:
            assert self.zookeeper is not None and self.zookeeper.proc is not None
            os.killpg(self.zookeeper.proc.pid, sig)
        else:
            (self.masters[name] if name in MASTERS else self.aux[name]).signal(sig)

    def stop_node(self, name: str) -> None:
        """SIGSTOP an aux node, a master or (``zk``) ZooKeeper."""
        self.stopped.add(name)
        self._signal(name, signal.SIGSTOP)

    def cont_node(self, name: str) -> None:
        """SIGCONT what ``stop_node`` stopped."""
        self._signal(name, signal.SIGCONT)
        self.stopped.discard(name)

    async def leader(self, timeout: float = 10.0) -> str:
        """The master that leads in ZooKeeper (bounded wait; ``m1`` if none leads by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in MASTERS:
                try:
                    async with Client(self.addr(name), timeout=2.0, retries=0) as c:
                        info = await c.execute(Op.RING)
                except Exception:
                    continue
                if info["membership"].get("role") == "zk-leader":
                    return name
            await asyncio.sleep(0.2)
        return MASTERS[0]

    async def settle(self, timeout: float = SETTLE_S) -> tuple[float, str]:
        """Wait until both masters see exactly the members up and in the ring, and no migration.

        In ZooKeeper mode, also until both are connected to ZooKeeper and exactly one leads.

        Returns the seconds it took and "" or, past ``timeout``, what was last seen.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = ""
        members = set(self.members)
        while time.monotonic() < deadline:
            seen = []
            roles: list[str] = []
            for name in MASTERS:
                try:
                    async with Client(self.addr(name), timeout=2.0, retries=0) as c:
                        info = await c.execute(Op.RING)
                except Exception as exc:
                    seen.append(f"{name}: {exc.__class__.__name__}")
                    continue
                up, ring = up_nodes(info), set(info["ring"]["nodes"])
                zk = info["membership"] if self.zookeeper else {"zookeeper_connected": True}
                roles.append(zk.get("role", ""))
                if up == members and ring == members and not info["migrating"] and zk["zookeeper_connected"]:
                    continue
                states = {n["node_id"]: n["state"] for n in info["nodes"]}
                seen.append(
                    f"{name}: epoch {info['epoch']} states {states} ring {sorted(ring)} migrating {info['migrating']}"
                    + (f" role {zk['role']} zookeeper {zk['zookeeper_state']}" if self.zookeeper else "")
                )
            if self.zookeeper and not seen and roles.count("zk-leader") != 1:
                seen.append(f"roles {roles}: not one leader")
            if not seen:
                return time.monotonic() - t0, ""
            last = "; ".join(seen)
            await asyncio.sleep(0.2)
        return time.monotonic() - t0, f"not settled after {timeout:.0f} s (members {sorted(members)}): {last}"

    def close(self) -> None:
        for name in list(self.stopped):
            self.cont_node(name)
        for _, proc in self.history:
            proc.kill()
        for proxy in self.proxies.values():
            proxy.close()
        if self.zookeeper is not None:
            self.zookeeper.stop()

    def write_logs(self, folder: Path) -> None:
        """Every process's stderr (restarted ones too) into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        counts: dict[str, int] = {}
        for name, proc in self.history:
            counts[name] = counts.get(name, 0) + 1
            (folder / f"{name}.{counts[name]}.log").write_text("\n".join(proc.stderr_lines) + "\n")
        if self.zookeeper is not None:
            shutil.copy(self.zookeeper.log, folder / "zookeeper.log")


async def apply(cluster: ChaosCluster, fault: Fault, notes: list[str]) -> None:
    """Run one fault: wait for its start, inject it, hold it, heal it (``notes``: which master ``leader`` was)."""
    await asyncio.sleep(fault.start_s)
    kind, target = fault.kind, fault.target
    if target == LEADER:
        target = await cluster.leader()
        notes.append(f"{kind}: the leader was {target}")
    if target in AUX_NODES and kind != "aux-join":
        # A --schedule may aim a fault at the node its own aux-join starts: wait (bounded) for its process.
        deadline = time.monotonic() + 30.0
        while target not in cluster.aux:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: aux node {target} was never started")
            await asyncio.sleep(0.05)
    if kind in AUX_KILLS:
        await asyncio.to_thread(cluster.aux[target].kill)
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(cluster.start_aux, target)
    elif kind in ("aux-stop", "zk-stop", "master-stop"):
        cluster.stop_node(target)
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            cluster.cont_node(target)
    elif kind == "aux-flap":
        until = time.monotonic() + fault.hold_s
        while time.monotonic() < until:
            cluster.stop_node(target)
            try:
                await asyncio.sleep(fault.param)
            finally:
                cluster.cont_node(target)
            await asyncio.sleep(fault.param / 2)
    elif kind == "aux-join":
        await asyncio.to_thread(cluster.start_aux, target)
    elif kind == "aux-leave":
        await asyncio.to_thread(cluster.leave, target)
    elif kind == "master-kill":
        await asyncio.to_thread(cluster.masters[target].kill)
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(cluster.start_master, target)
    elif kind == "zk-kill":
        zookeeper = cluster.zookeeper
        assert zookeeper is not None
        await asyncio.to_thread(zookeeper.stop)
        await asyncio.sleep(fault.hold_s)
        await asyncio.to_thread(zookeeper.start)
    else:
        proxy = cluster.proxies[target]
        if kind == "link-cut":
            await asyncio.to_thread(proxy.cut)
        elif kind == "link-blackhole":
            await asyncio.to_thread(proxy.blackhole)
        else:
            await asyncio.to_thread(proxy.delay, fault.param)
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            await asyncio.to_thread(proxy.heal)


@dataclass
class Outcome:
    """What one schedule showed."""

    schedule: str
    settle_s: float
    unsettled: str
    counts: dict[str, int]
    summary: str
    examples: list[str]
    near_hits: int
    #: ``m1``'s SETs that updated its own copies (KEEP_COPY), since it started.
    write_throughs: int
    notes: list[str]

    @property
    def bad(self) -> bool:
        return bool(self.unsettled) or any(self.counts.values())


async def near_cache_count(addr: str, name: str = "near_cache_hits") -> int:
    """A near-cache counter of a master's STATS (``near_cache_hits`` by default; -1 if it did not answer)."""
    try:
        async with Client(addr, timeout=2.0, retries=0) as c:
            stats = await c.stats()
    except Exception:
        return -1
    return int(stats.get(name, 0))


async def run_schedule(cluster: ChaosCluster, faults: list[Fault], seed: int) -> Outcome:
    """One schedule under load, then heal, settle, verify (see the module note)."""
    m1, m2 = (cluster.addr(m) for m in MASTERS)
    late = any(f.kind == "master-stop" for f in faults)  # see the module note
    chk = LoadChecker([m1], [m2, m1], seed=seed, timeout=CLIENT_TIMEOUT_S, inspect=cluster.direct, late_failures=late)
    notes: list[str] = []
    chk.start()
    try:
        await chk.progress(sets=100, reads=200, timeout=60)
        results = await asyncio.gather(*(apply(cluster, f, notes) for f in faults), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        settle_s, unsettled = await cluster.settle()
        if not unsettled:
            await chk.progress(sets=50, reads=100, timeout=60)  # reads after the heal: fresh?
    finally:
        await chk.stop()
    for endpoint in (m2, m1):
        await chk.verify(endpoint, timeout=30.0)
    counts = {p: getattr(chk.stats, p) for p in PROBLEMS}
    return Outcome(
        ";".join(map(str, faults)),
        settle_s,
        unsettled,
        counts,
        chk.stats.summary(),
        list(chk.examples),
        await near_cache_count(m2),
        await near_cache_count(m1, "near_cache_write_throughs"),
        notes,
    )


async def run_seed(seed: int, args: argparse.Namespace, deadline: float, log_dir: Path, first: int = 0) -> list[Outcome]:
    """A fresh cluster for ``seed`` and its schedules (or ``--schedule`` once, numbered ``first``); stops it."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    tmp = Path(tempfile.mkdtemp(prefix=f"dcache-chaos-{seed}-"))
    zookeeper = await asyncio.to_thread(ZooKeeperServer(tmp).start) if args.zookeeper else None
    cluster = ChaosCluster(tmp, zookeeper=zookeeper, name=f"chaos-{seed}-{first}")
    try:
        await asyncio.to_thread(cluster.start)
        _, unsettled = await cluster.settle()
        if unsettled:
            raise RuntimeError(f"seed {seed}: the first cluster did not settle: {unsettled}")
        runs = 1 if args.schedule else args.schedules
        for index in range(first, first + runs):
            if time.monotonic() > deadline:
                print(f"seed {seed}: --max-seconds reached, {first + runs - index} schedule(s) not run", flush=True)
                break
            faults = (
                parse_schedule(args.schedule, args.zookeeper) if args.schedule else plan(rng, frozenset(cluster.members), args.zookeeper)
            )
            t0 = time.monotonic()
            out = await run_schedule(cluster, faults, seed * 1000 + index)
            took = time.monotonic() - t0
            outcomes.append(out)
            verdict = "PROBLEM" if out.bad else "ok"
            counts = " ".join(f"{k} {v}" for k, v in out.counts.items())
            print(
                f"seed {seed} schedule {index} [{out.schedule}] {verdict}: {counts}; settled in {out.settle_s:.1f} s; "
                f"{took:.0f} s; m2 near-cache hits {out.near_hits}, m1 write-throughs {out.write_throughs}{''.join('; ' + n for n in out.notes)}\n    {out.summary}",
                flush=True,
            )
            if out.bad:
                for line in [out.unsettled, *out.examples] if out.unsettled else out.examples:
                    print("    " + line, flush=True)
                folder = log_dir / f"seed{seed}-schedule{index}"
                cluster.write_logs(folder)
                print(f"    logs: {folder}", flush=True)
                if out.unsettled:
                    break  # the next schedule would start from an unknown state
    finally:
        await asyncio.to_thread(cluster.close)
        shutil.rmtree(tmp, ignore_errors=True)
    return outcomes


def parse_seeds(text: str) -> list[int]:
    """``1,3,5-8`` -> [1, 3, 5, 6, 7, 8]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


async def campaign(args: argparse.Namespace) -> int:
    """Run every seed within ``--max-seconds``; 1 if any schedule showed a problem."""
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds
    log_dir = Path(args.log_dir)
    outcomes: list[Outcome] = []
    # An explicit schedule runs on a fresh cluster each time (a join or a leave changes the members).
    runs = [(seed, r) for seed in parse_seeds(args.seeds) for r in range(args.repeat if args.schedule else 1)]
    for seed, r in runs:
        if time.monotonic() > deadline:
            print(f"--max-seconds reached before seed {seed} ({r})", flush=True)
            break
        outcomes += await run_seed(seed, args, deadline, log_dir, r)
    bad = [o for o in outcomes if o.bad]
    totals = {p: sum(o.counts[p] for o in outcomes) for p in PROBLEMS}
    print(
        f"campaign: {len(outcomes)} schedules in {time.monotonic() - t0:.0f} s, {len(bad)} with problems; "
        + ", ".join(f"{k} {v}" for k, v in totals.items())
        + f", unsettled {sum(1 for o in outcomes if o.unsettled)}",
        flush=True,
    )
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and run the campaign (bounded by ``--max-seconds`` plus the last schedule's own bounds)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seeds", default="1-4", help="seeds to run, e.g. 1,3,5-8: each gets a fresh cluster (default: 1-4)")
    p.add_argument("--schedules", type=int, default=4, help="random schedules per seed (default: 4)")
    p.add_argument(
        "--schedule",
        default="",
        help="run this schedule instead of random ones: kind,target,start_s,hold_s[,param];... "
        "(a fault on the node an aux-join of the schedule starts waits for its process)",
    )
    p.add_argument("--repeat", type=int, default=1, help="times to run --schedule per seed, each on a fresh cluster (default: 1)")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="start no schedule after this many seconds (default: 1800)")
    p.add_argument("--log-dir", default="chaos-logs", help="where the logs of schedules with problems go (default: ./chaos-logs)")
    p.add_argument(
        "--zookeeper",
        action="store_true",
        help="run the cluster in ZooKeeper mode, with a fresh ZooKeeper per seed, and add its faults (see above)",
    )
    args = p.parse_args(argv)
    if args.schedule:
        parse_schedule(args.schedule, args.zookeeper)  # a bad one stops here, before any process starts
    logging.getLogger("dcache.client").setLevel(logging.ERROR)  # the load's clients warn of every master restart
    logging.getLogger("kazoo").setLevel(logging.ERROR)  # ZooKeeperServer's first session warns when the server goes
    return asyncio.run(campaign(args))


if __name__ == "__main__":
    sys.exit(main())
