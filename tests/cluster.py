"""A small real cluster for multi-process tests: masters and aux nodes on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from ssl import SSLContext
from typing import Any

from dcache import Client
from dcache.protocol import Op
from dcache.ring import HashRing
from tests.harness import DaemonProcess

# Fast failure detection so tests stay short; still realistic (real pings).
FAST_HEALTH = ["--health-interval", "0.2", "--health-failures", "3", "--aux-timeout", "1.0", "--follow-interval", "0.2"]


#: Short ZooKeeper sessions in tests: a SIGKILLed node's registration ends fast.
ZK_SESSION_TIMEOUT_S = 2.0


class Cluster:
    def __init__(
        self,
        tmp: Path,
        *,
        replicas: int = 1,
        snapshot_interval: float = 0,
        zookeeper: str | None = None,
        name: str = "test",
        args: Sequence[str] = (),
        ssl: SSLContext | None = None,
    ) -> None:
        """With ``zookeeper`` every process uses it (cluster ``name``) instead of a coordinator.

        ``args`` go to every process (TLS flags, credentials); ``ssl`` is the
        context of the test's clients (``client``, and what ``ring``,
        ``wait_ring`` and ``Reader`` are given).
        """
        self.tmp = tmp
        self.replicas = replicas
        self.snapshot_interval = snapshot_interval
        self.zk = ["--zookeeper", zookeeper, "--cluster", name, "--zk-session-timeout", str(ZK_SESSION_TIMEOUT_S)] if zookeeper else []
        self.args = list(args)
        self.ssl = ssl
        self.masters: list[DaemonProcess] = []
        self.aux: dict[str, DaemonProcess] = {}

    def client(self, addr: str | Sequence[str], **options: Any) -> Client:
        """A client of this cluster (with its ``ssl``)."""
        return Client(addr, ssl=self.ssl, **options)

    @property
    def coordinator(self) -> DaemonProcess:
        return self.masters[0]

    def start_master(self, node_id: str, *extra: str, follow: DaemonProcess | None = None, port: int = 0) -> DaemonProcess:
        args = [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-id",
            node_id,
            "--replicas",
            str(self.replicas),
            "--log-level",
            "info",
            *FAST_HEALTH,
        ]
        if follow is not None:
            args += ["--coordinator", follow.addr]
        args += self.zk + self.args + list(extra)
        m = DaemonProcess("master", args).start()
        self.masters.append(m)
        return m

    def start_aux(self, node_id: str, *extra: str, join: bool = True, port: int = 0) -> DaemonProcess:
        data = self.tmp / node_id
        data.mkdir(parents=True, exist_ok=True)
        args = ["--host", "127.0.0.1", "--port", str(port), "--node-id", node_id, "--log-level", "info", "--data-dir", str(data)]
        args += ["--snapshot-interval", str(self.snapshot_interval)]
        if join and self.zk:
            args += self.zk
        elif join:
            args += ["--join", self.coordinator.addr]
        args += self.args + list(extra)
        a = DaemonProcess("aux", args).start()
        self.aux[node_id] = a
        return a

    def stop(self) -> None:
        for p in [*self.masters, *self.aux.values()]:
            p.kill()

    def logs(self) -> str:
        parts = []
        for p in [*self.masters, *self.aux.values()]:
            parts.append(f"--- {p.role} {p.args}\n{p.stderr()}")
        return "\n".join(parts)


async def ring(addr: str, ssl: SSLContext | None = None) -> dict[str, Any]:
    async with Client(addr, timeout=5.0, ssl=ssl) as c:
        info: dict[str, Any] = await c.execute(Op.RING)
        return info


def up_nodes(info: dict[str, Any]) -> set[str]:
    return {n["node_id"] for n in info["nodes"] if n["state"] == "up"}


async def wait_ring(
    addr: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
    what: str = "ring condition",
    auth_token: str | None = None,
    ssl: SSLContext | None = None,
) -> dict[str, Any]:
    """Poll a master's RING until ``predicate`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    async with Client(addr, timeout=5.0, auth_token=auth_token, ssl=ssl) as c:
        while time.monotonic() < deadline:
            try:
                last = await c.execute(Op.RING)
            except Exception:  # master restarting or busy: poll again
                last = {}
            if last and predicate(last):
                return last
            await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last ring: {last}")


def settled(nodes: set[str]) -> Callable[[dict[str, Any]], bool]:
    """Predicate: exactly ``nodes`` are up, in the ring (none fenced) and connected to, and no migration runs.

    "Connected": the master's link to each is open (HELLO, then BIND done).
    A request routed to a link still opening waits for it (bounded), so a
    test may write before; tests that count a node's connections rely on it.
    """
    return lambda info: (
        up_nodes(info) == nodes
        and set(info["ring"]["nodes"]) == nodes
        and not info["migrating"]
        and all(n.get("connected", True) for n in info["nodes"] if n["node_id"] in nodes)
    )


def copying_to(node: str) -> Callable[[dict[str, Any]], bool]:
    """Predicate: a migration to a ring with ``node`` is copying and has moved some keys, not all."""

    def check(info: dict[str, Any]) -> bool:
        mig = info["membership"].get("migration") or {}
        return node in info["ring"]["nodes"] and info["migrating"] and mig.get("state") == "copying" and mig.get("keys_moved", 0) > 0

    return check


def key_owned_by(node: str, members: list[str], prefix: str) -> str:
    """A key (``prefix`` and a number) that ``node`` owns first in the ring of ``members``."""
    r = HashRing(dict.fromkeys(members, 1.0))
    for i in range(10_000):
        key = f"{prefix}{i}"
        if r.owner(key.encode()) == node:
            return key
    raise AssertionError(f"no key owned by {node}")


async def outlive(c: Client, key: str) -> None:
    """Overwrite ``key`` with a value that expires in 0.3 s and wait (bounded) until it did: no copy of it, and no tombstone, is left."""
    assert await c.set(key, b"short-lived", ttl=0.3) is True
    deadline = time.monotonic() + 10
    while await c.get(key) is not None:
        assert time.monotonic() < deadline, f"{key} did not expire"
        await asyncio.sleep(0.05)


def key_of(i: int) -> str:
    """The test key number ``i``."""
    return f"key:{i}"


def value_of(i: int) -> bytes:
    return b"value-%d" % i


async def populate(c: Client, n: int) -> None:
    for start in range(0, n, 1000):
        stored = await c.mset({key_of(i): value_of(i) for i in range(start, min(n, start + 1000))})
        assert stored == min(n, start + 1000) - start


class Reader:
    """Reads every key over and over, counting misses, wrong values and errors."""

    def __init__(self, addr: str, n: int, ssl: SSLContext | None = None) -> None:
        self.addr = addr
        self.n = n
        self.ssl = ssl
        self.misses = 0
        self.wrong = 0
        self.errors: list[str] = []
        self.passes = 0
        self.reads = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async with Client(self.addr, timeout=10.0, ssl=self.ssl) as c:
            while not self._stop.is_set():
                for start in range(0, self.n, 500):
                    idx = range(start, min(self.n, start + 500))
                    try:
                        values = await c.mget([key_of(i) for i in idx])
                    except Exception as exc:
                        self.errors.append(f"{exc.__class__.__name__}: {exc}")
                        continue
                    self.reads += len(values)
                    for i, v in zip(idx, values, strict=True):
                        if v is None:
                            self.misses += 1
                        elif v != value_of(i):
                            self.wrong += 1
                self.passes += 1

    async def full_passes(self, k: int, timeout: float = 60.0) -> None:
        """Wait until ``k`` more complete passes have been made."""
        target = self.passes + k
        deadline = time.monotonic() + timeout
        while self.passes < target:
            assert time.monotonic() < deadline, "reader made no progress"
            assert self._task is not None and not self._task.done(), "reader stopped"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 60)


class Tally:
    """What the load of one test saw: calls answered, failed calls, wrong reads, acknowledged writes."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self.written: dict[str, bytes] = {}

    async def reach(self, n: int, timeout: float = 30.0) -> None:
        """Wait (bounded) until ``n`` calls were answered in all."""
        deadline = time.monotonic() + timeout
        while self.ok < n:
            assert time.monotonic() < deadline, f"{self.ok} of {n} calls answered; failures {self.failures[:5]}"
            await asyncio.sleep(0.02)


async def _paced_load(
    name: str, stop: asyncio.Event, tally: Tally, set_: Callable[[str, bytes], Awaitable[Any]], get: Callable[[str], Awaitable[Any]]
) -> None:
    """Write a key, then read it back, until ``stop``, counting into ``tally``; paced (two cores serve five processes)."""
    i = 0
    while not stop.is_set():
        key, value = f"{name}:{i}", b"v%d" % i
        try:
            await set_(key, value)
            tally.written[key] = value
            got = await get(key)
        except Exception as exc:
            tally.failures.append(f"{name} {key}: {exc!r}")
        else:
            if got != value:
                tally.wrong.append(key)
            tally.ok += 1
        i += 1
        await asyncio.sleep(0.001)


async def native_load(name: str, addrs: str | list[str], stop: asyncio.Event, tally: Tally) -> None:
    """Write a key, then read it back, until ``stop``: through ``dcache.Client`` on ``addrs``."""
    async with Client(addrs) as c:
        await _paced_load(name, stop, tally, c.set, c.get)


async def resp_load(name: str, host: str, port: int, stop: asyncio.Event, tally: Tally) -> None:
    """As ``native_load``, over RESP (redis-py) to one master."""
    import redis.asyncio

    r = redis.asyncio.Redis(host=host, port=port, socket_timeout=5)
    try:
        await _paced_load(name, stop, tally, r.set, r.get)
    finally:
        await r.aclose()


async def check_written(addrs: Sequence[str], tally: Tally) -> None:
    """Every write ``tally`` saw acknowledged reads back, through each of ``addrs``."""
    keys = sorted(tally.written)
    for addr in addrs:
        async with Client(addr) as c:
            for at in range(0, len(keys), 5000):
                chunk = keys[at : at + 5000]
                got = await c.mget(chunk)
                bad = [(k, g, tally.written[k]) for k, g in zip(chunk, got, strict=True) if g != tally.written[k]]
                assert not bad, (addr, len(bad), bad[:10], len(keys))


async def stop_loads(stop: asyncio.Event, loads: Sequence[asyncio.Task[None]]) -> None:
    """Stop load tasks started with ``native_load``/``resp_load`` (cancelled if they do not end by themselves)."""
    stop.set()
    for task in loads:
        task.cancel()
    await asyncio.gather(*loads, return_exceptions=True)


async def assert_served_while_ringless(tally: Tally, read_from: list[str], restarted: str, nodes: set[str]) -> None:
    """No call failed or read wrong, every acknowledged write reads back, and the restarted master held calls.

    The loads read each key back right after writing it (``tally.wrong``).
    Every key is read again at once, then once ``nodes`` settle on each
    master: a restarted coordinator may resume a migration from the ring a
    follower handed it, and reads are right during it as after it.
    """
    assert (tally.failures[:10], len(tally.failures), tally.wrong) == ([], 0, [])
    await check_written(read_from, tally)  # no acknowledged write lost, settled or not
    for addr in read_from:
        await wait_ring(addr, settled(nodes), timeout=30, what=f"{addr}: {sorted(nodes)} settled")
    await check_written(read_from, tally)
    async with Client(restarted) as c:
        stats = await c.stats()
    assert stats["ring_waits"] > 0  # clients did reach it before its ring: the test covers that window
    assert stats["ring_wait_refusals"] == 0
