"""Connection churn against real processes leaves their memory where it was (issue 13, finding 4).

An aux node and a master that has it as its seed; 20,000 connect-HELLO-PING-
close cycles against each (16 connectors per target, one client process on
uvloop), then each daemon's VmRSS is compared with its value before the
load. Before the fix both kept every connection for the cyclic GC, each with
a 1 MiB decoder buffer: +80-140 MB on the aux node and +500-700 MB on the
master after 20,000 cycles. ``bin/bench_churn.py`` runs the full-size
measurement (200,000 cycles, a table of RSS samples, a diagnostic mode).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import cast

import msgpack
import pytest
import uvloop

from dcache.protocol import HEADER, PROTOCOL_VERSION, Op
from tests.harness import DaemonProcess, start_aux

pytestmark = pytest.mark.slow

CYCLES = 20_000
CONNECTORS = 16
#: Growth allowed per process after the load (the fixed code grows by about 1 MB).
RSS_BOUND_MB = 10.0
SETTLE_S = 1.0


def _frame(msg: object) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


REQUEST = _frame([int(Op.HELLO), 1, PROTOCOL_VERSION, None, "churn"]) + _frame([int(Op.PING), 2])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def cluster() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    aux = start_aux(None, node_id="a1")
    try:
        master = DaemonProcess("master", ["--port", "0", "--aux", f"a1={aux.addr}", "--log-level", "warning"]).start()
    except BaseException:
        aux.kill()
        raise
    yield aux, master
    master.kill()
    aux.kill()


class _Churn(asyncio.Protocol):
    """Send HELLO and PING, read both answers, close."""

    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.buf = b""
        self.frames = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is no asyncio.Transport subclass
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4 and len(self.buf) >= 4 + HEADER.unpack_from(self.buf)[0]:
            self.buf = self.buf[4 + HEADER.unpack_from(self.buf)[0] :]
            self.frames += 1
        if self.frames >= 2 and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.frames >= 2)


async def _churn(targets: list[tuple[str, int]], cycles: int) -> int:
    loop = asyncio.get_running_loop()
    ok = 0

    async def connector(host: str, port: int, n: int) -> None:
        nonlocal ok
        for _ in range(n):
            done: asyncio.Future[bool] = loop.create_future()
            await loop.create_connection(lambda done=done: _Churn(done), host, port)  # type: ignore[misc]
            good = await asyncio.wait_for(done, 10)  # not "ok += await ...": ok would be read before the await
            ok += good

    await asyncio.gather(*(connector(h, p, cycles // CONNECTORS) for h, p in targets for _ in range(CONNECTORS)))
    return ok


def test_connection_churn_leaves_rss_where_it_was(cluster: tuple[DaemonProcess, DaemonProcess]) -> None:
    aux, master = cluster
    daemons = {"aux": aux, "master": master}
    time.sleep(SETTLE_S)
    before = {name: rss_mb(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
    t0 = time.monotonic()
    ok = uvloop.run(_churn([(aux.host, aux.port), (master.host, master.port)], CYCLES))
    elapsed = time.monotonic() - t0
    time.sleep(SETTLE_S)
    after = {name: rss_mb(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
    growth = {name: after[name] - before[name] for name in daemons}
    print(
        f"\n{ok} cycles in {elapsed:.1f} s; VmRSS MiB "
        + ", ".join(f"{n} {before[n]:.1f} -> {after[n]:.1f} ({growth[n]:+.1f})" for n in daemons)
    )
    assert ok == 2 * (CYCLES // CONNECTORS) * CONNECTORS
    for name, g in growth.items():
        assert g < RSS_BOUND_MB, f"{name} kept {g:.1f} MiB after {CYCLES} connection cycles (bound {RSS_BOUND_MB} MiB)"
