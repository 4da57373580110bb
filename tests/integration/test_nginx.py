"""dcache behind real nginx (nginx-stream.conf): load spread over masters, a master killed, no data lost.

3 aux nodes and 2 masters run as real processes; nginx runs the repo's
config rendered with their ports. A client that knows only nginx writes and
reads through it while one master is SIGKILLed: it reconnects (nginx sends
new connections to the survivor), repeats interrupted reads and writes, and
every acknowledged write reads back afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext

import pytest

import dcache
from dcache.errors import DCacheError
from tests.harness import DaemonProcess
from tests.nginx import NginxProcess, find_nginx, free_ports, render_config, start_nginx, stream_module_path
from tests.tlscerts import TLS_ALERT, cert_fingerprint, make_certs, plaintext_hello, served_fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

N_KEYS = 2000
WORKERS = 8
CHAOS_BEFORE_KILL_S = 1.0
CHAOS_AFTER_KILL_S = 3.0
# What a call may raise while a master dies (anything else fails the test).
TRANSIENT = (ConnectionError, TimeoutError, DCacheError)


@dataclass
class Cluster:
    aux: list[DaemonProcess]
    m1: DaemonProcess  # coordinator
    m2: DaemonProcess  # follower

    def all(self) -> list[DaemonProcess]:
        return [self.m2, self.m1, *self.aux]


def _start_cluster() -> Cluster:
    common = ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
    aux = [DaemonProcess("aux", [*common, "--node-id", f"a{i}"]) for i in (1, 2, 3)]
    errors: list[BaseException] = []

    def start(p: DaemonProcess) -> None:
        try:
            p.start()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in aux]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    started: list[DaemonProcess] = list(aux)
    try:
        if errors:
            raise errors[0]
        seeds = ",".join(f"a{i}={p.addr}" for i, p in enumerate(aux, 1))
        m1 = DaemonProcess("master", [*common, "--node-id", "m1", "--aux", seeds])
        started.append(m1)
        m1.start()
        m2 = DaemonProcess("master", [*common, "--node-id", "m2", "--coordinator", m1.addr])
        started.append(m2)
        m2.start()
    except BaseException:
        for p in started:
            if p.proc is not None:
                p.kill()
        raise
    return Cluster(aux, m1, m2)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = _start_cluster()
    try:
        yield c
    finally:
        for p in c.all():
            p.kill()


@pytest.fixture
def lb(tmp_path: Path, cluster: Cluster) -> Iterator[tuple[Cluster, NginxProcess]]:
    ngx = start_nginx(tmp_path / "nginx", [cluster.m1.addr, cluster.m2.addr])
    try:
        yield cluster, ngx
    finally:
        ngx.stop()


def test_render_config_substitutes_markers(tmp_path: Path) -> None:
    text = render_config(
        ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        listen="127.0.0.1:9",
        http_listen="127.0.0.1:10",
        tls_listen="127.0.0.1:11",
        tls_masters=["127.0.0.1:4"],
        resp_masters=["127.0.0.1:5"],
        resp_listen="127.0.0.1:12",
    )
    assert text.count("server 127.0.0.1:") == 7  # 3 masters + 1 TLS master + 2 shims + 1 RESP master
    assert "server 127.0.0.1:3 max_fails=2 fail_timeout=5s;" in text and "server 127.0.0.1:4 max_fails=2 fail_timeout=5s;" in text
    assert "server 127.0.0.1:5 max_fails=2 fail_timeout=5s;" in text
    assert "listen 127.0.0.1:9 so_keepalive=on;" in text and "listen 127.0.0.1:10;" in text
    assert "listen 127.0.0.1:11 so_keepalive=on;" in text and "listen 127.0.0.1:12 so_keepalive=on;" in text
    assert "127.0.0.1:7000 " not in text and "listen 127.0.0.1:6380" not in text
    assert "127.0.0.1:7443 " not in text and "listen 127.0.0.1:6443" not in text
    assert "127.0.0.1:7379" not in text and "listen 127.0.0.1:6379" not in text
    assert not re.search(r"^\s*load_module", text, re.M)


# -- the scenario ----------------------------------------------------------------


@dataclass
class Ledger:
    """What each key may hold: the last acknowledged value plus any later write whose outcome is unknown."""

    allowed: dict[str, set[bytes]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: {"read": 0, "write": 0})
    error_kinds: dict[str, int] = field(default_factory=dict)
    ok_after_kill: int = 0
    wrong_reads: list[str] = field(default_factory=list)

    def acked(self, key: str, value: bytes) -> None:
        self.allowed[key] = {value}

    def unknown(self, key: str, value: bytes, exc: BaseException) -> None:
        self.allowed[key].add(value)
        self.failed("write", exc)

    def failed(self, what: str, exc: BaseException) -> None:
        self.errors[what] += 1
        kind = type(exc).__name__
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def _key(i: int) -> str:
    return f"nginx:{i:05d}"


async def _master_requests(addr: str, ssl: SSLContext | None = None) -> int:
    async with dcache.Client(addr, timeout=3, ssl=ssl) as c:
        return int((await c.stats())["requests"])


async def _load(client: dcache.Client, ledger: Ledger) -> None:
    for start in range(0, N_KEYS, 200):
        keys = [_key(i) for i in range(start, min(N_KEYS, start + 200))]
        values = [f"{k}|0".encode() for k in keys]
        assert all(await asyncio.gather(*(client.set(k, v) for k, v in zip(keys, values, strict=True))))
        for k, v in zip(keys, values, strict=True):
            ledger.acked(k, v)
    for start in range(0, N_KEYS, 200):
        keys = [_key(i) for i in range(start, min(N_KEYS, start + 200))]
        got = await asyncio.gather(*(client.get(k) for k in keys))
        assert got == [f"{k}|0".encode() for k in keys]


async def _worker(client: dcache.Client, ledger: Ledger, wid: int, stop: asyncio.Event, killed: asyncio.Event) -> None:
    rng = random.Random(wid)
    mine = [_key(i) for i in range(wid, N_KEYS, WORKERS)]  # disjoint keys: one writer per key
    seq = 0
    while not stop.is_set():
        key = rng.choice(mine)
        if rng.random() < 0.5:
            seq += 1
            value = f"{key}|w{wid}.{seq}".encode()
            try:
                await client.set(key, value)
            except TRANSIENT as exc:
                ledger.unknown(key, value, exc)
                continue
            ledger.acked(key, value)
        else:
            try:
                got = await client.get(key)
            except TRANSIENT as exc:
                ledger.failed("read", exc)
                continue
            if got not in ledger.allowed[key]:
                ledger.wrong_reads.append(f"{key}: got {got!r}, allowed {sorted(ledger.allowed[key])!r}")
        if killed.is_set():
            ledger.ok_after_kill += 1


async def _verify(client: dcache.Client, ledger: Ledger) -> list[str]:
    lost: list[str] = []
    keys = sorted(ledger.allowed)
    for start in range(0, len(keys), 200):
        batch = keys[start : start + 200]
        got = await asyncio.gather(*(client.get(k) for k in batch))
        lost += [
            f"{k}: got {v!r}, allowed {sorted(ledger.allowed[k])!r}" for k, v in zip(batch, got, strict=True) if v not in ledger.allowed[k]
        ]
    return lost


class _RetryCounter(logging.Handler):
    """Counts the client's "connection lost during op; retrying" debug records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "lost during op" in record.getMessage():
            self.retries += 1


async def _scenario(cluster: Cluster, ngx: NginxProcess, victim: DaemonProcess, survivor: DaemonProcess) -> None:
    ledger = Ledger()
    counter = _RetryCounter()
    client_log = logging.getLogger("dcache.client")
    old_level = client_log.level
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(counter)
    before = {m.addr: await _master_requests(m.addr) for m in (cluster.m1, cluster.m2)}
    client = dcache.Client(ngx.listen, timeout=3, retries=3, min_connections=4, max_connections=4)
    try:
        await client.connect()
        await _load(client, ledger)
        served = {addr: await _master_requests(addr) - n for addr, n in before.items()}
        # least_conn spread the client's connections, so both masters carried traffic
        # (and killing either one interrupts requests in flight).
        assert all(n > 100 for n in served.values()), f"requests served per master through nginx: {served}"

        stop, killed = asyncio.Event(), asyncio.Event()
        workers = [asyncio.create_task(_worker(client, ledger, w, stop, killed)) for w in range(WORKERS)]
        await asyncio.sleep(CHAOS_BEFORE_KILL_S)
        t0 = time.monotonic()
        await asyncio.to_thread(victim.kill)  # SIGKILL
        killed.set()
        await asyncio.sleep(CHAOS_AFTER_KILL_S)
        stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*workers)
        chaos_s = time.monotonic() - t0

        print(
            f"\nkilled {victim.args[victim.args.index('--node-id') + 1]}: transient errors {ledger.errors} "
            f"{ledger.error_kinds}; {counter.retries} requests repeated by the client; {ledger.ok_after_kill} ops succeeded in the {chaos_s:.1f}s after the kill"
        )
        assert not ledger.wrong_reads, f"{len(ledger.wrong_reads)} reads returned a value never written last: {ledger.wrong_reads[:5]}"
        assert counter.retries > 0, "no request was in flight to the killed master: the test proved nothing"
        assert ledger.ok_after_kill > 200, "the client did not carry on through nginx after the kill"
        # Only requests in flight on connections to the dying master may fail.
        assert sum(ledger.errors.values()) <= 4 * 64, ledger.errors

        lost = await _verify(client, ledger)
        assert not lost, f"{len(lost)} keys lost or stale through nginx: {lost[:5]}"
    finally:
        client_log.removeHandler(counter)
        client_log.setLevel(old_level)
        await client.close()

    # A fresh client (new connections, which nginx must send to the survivor) and the survivor itself agree.
    for addr in (ngx.listen, survivor.addr):
        async with dcache.Client(addr, timeout=3, retries=3) as fresh:
            lost = await _verify(fresh, ledger)
        assert not lost, f"{len(lost)} keys lost or stale via {addr}: {lost[:5]}"
    assert victim.proc is not None and victim.proc.returncode is not None
    assert survivor.alive, survivor.stderr()


def test_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = find_nginx()
    listen, http_listen, tls_listen, resp_listen = (f"127.0.0.1:{p}" for p in free_ports(4))
    text = render_config(
        ["127.0.0.1:1", "127.0.0.1:2"],
        listen=listen,
        http_listen=http_listen,
        tls_listen=tls_listen,
        stream_module=stream_module_path(nginx),
        resp_listen=resp_listen,
    )
    res = NginxProcess(nginx, text, tmp_path, "").check()
    assert res.returncode == 0, res.stderr
    assert "test is successful" in res.stderr


async def test_kill_follower_master_behind_nginx(lb: tuple[Cluster, NginxProcess]) -> None:
    cluster, ngx = lb
    await _scenario(cluster, ngx, victim=cluster.m2, survivor=cluster.m1)


async def test_kill_coordinator_master_behind_nginx(lb: tuple[Cluster, NginxProcess]) -> None:
    """The follower keeps serving with the last ring it had."""
    cluster, ngx = lb
    await _scenario(cluster, ngx, victim=cluster.m1, survivor=cluster.m2)


async def test_tls_passes_through_nginx_to_the_masters(tmp_path: Path) -> None:
    """The TLS stream server of nginx-stream.conf relays the masters' own TLS: nginx holds no certificate.

    Masters and aux node run with mutual TLS; a client that knows only nginx's
    TLS port verifies the masters' certificate (its IP SAN is nginx's address
    here), presents its own, and its connections are spread over both masters.
    """
    certs = make_certs(tmp_path / "certs")
    common = ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *certs.daemon_args()]
    procs = [DaemonProcess("aux", [*common, "--node-id", "a1"]).start()]
    try:
        procs.append(DaemonProcess("master", [*common, "--node-id", "m1", "--aux", f"a1={procs[0].addr}"]).start())
        procs.append(DaemonProcess("master", [*common, "--node-id", "m2", "--coordinator", procs[1].addr]).start())
        masters = procs[1:]
        ctx = certs.client_context()
        before = {m.addr: await _master_requests(m.addr, ssl=ctx) for m in masters}
        with start_nginx(tmp_path / "nginx", [m.addr for m in masters]) as ngx:
            async with dcache.Client(ngx.tls_listen, ssl=ctx, timeout=5, min_connections=4, max_connections=4) as c:
                await c.connect()
                keys = [f"tls:{i}" for i in range(400)]
                assert all(await asyncio.gather(*(c.set(k, k.encode()) for k in keys)))
                assert await asyncio.gather(*(c.get(k) for k in keys)) == [k.encode() for k in keys]
            # No termination in nginx: the certificate seen through it is the masters' own, and a
            # plaintext client gets what a master's TLS port gives it (nothing, or an alert), no answer.
            assert await asyncio.to_thread(served_fingerprint, ngx.tls_listen, certs) == cert_fingerprint(certs.node.cert)
            got = await asyncio.to_thread(plaintext_hello, ngx.tls_listen)
            assert not got or got[0] == TLS_ALERT, got[:40]
        served = {m.addr: await _master_requests(m.addr, ssl=ctx) - n for m, n in zip(masters, before.values(), strict=True)}
        assert all(n > 100 for n in served.values()), f"requests served per master through nginx: {served}"
    finally:
        for p in procs:
            p.kill()
