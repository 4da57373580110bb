"""TLS on every hop (issue 14, item 5), with real processes.

Certificates come from a CA made at run time with the openssl CLI
(``tests.tlscerts``): every daemon gets ``--tls-cert/--tls-key/--tls-ca`` and
``--tls-client-auth true`` (mutual TLS everywhere), so each listener serves
TLS only and every hop (client to master, master to aux, aux JOIN, follower
SYNC, shim to master, HTTPS to the shim) either is TLS or fails.

* A plaintext connection, a certificate from a wrong CA, no certificate:
  refused, counted, logged; the daemon goes on serving.
* Slow and silent handshakes are cut at ``--tls-handshake-timeout`` and count
  against ``--max-connections``; a client already connected is served
  throughout.
* A whole cluster (2 masters, 3 aux nodes, the shim) runs the kill -9 and the
  join scenarios of ``test_cluster.py`` over TLS, with HTTPS traffic through
  the shim at the same time.
* SIGHUP reloads the certificate without dropping a request; a bad one is
  refused and the old one stays.
* The CLI tools speak TLS (flags and ``DCACHE_TLS_*``); bad TLS settings are
  one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dcache import Client, SyncClient
from dcache.client import open_connection
from dcache.errors import DCacheError
from dcache.protocol import Op
from dcache.tls import client_context
from tests.cluster import FAST_HEALTH, Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http, wait_for
from tests.integration.test_cluster import join_live_rebalance, replicas_survive_kill9
from tests.tlscerts import TLS_ALERT, CertKey, TlsCerts, cert_fingerprint, make_certs, plaintext_hello, served_fingerprint
from tests.wire import split_addr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


def start_aux(certs: TlsCerts, *extra: str, node_id: str = "a1") -> DaemonProcess:
    args = ["--host", "127.0.0.1", "--port", "0", "--node-id", node_id, "--log-level", "info", *certs.daemon_args(), *extra]
    return DaemonProcess("aux", args).start()


async def stats(addr: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    async with Client(addr, ssl=ctx, timeout=5) as c:
        return await c.stats()


def logged(daemon: DaemonProcess, *parts: str) -> bool:
    """Whether a line of ``daemon``'s log holds every one of ``parts``."""
    return any(all(p in line for p in parts) for line in daemon.stderr_lines)


# -- refusals ---------------------------------------------------------------------------


async def test_plaintext_and_a_wrong_ca_are_refused_and_the_daemons_go_on_serving(certs: TlsCerts) -> None:
    aux = start_aux(certs)
    master = DaemonProcess(
        "master",
        ["--host", "127.0.0.1", "--port", "0", "--node-id", "m1", "--aux", f"a1={aux.addr}", "--log-level", "info", *certs.daemon_args()],
    ).start()
    good = certs.client_context()
    stranger = client_context(ca=certs.ca.cert, cert=certs.wrong.cert, key=certs.wrong.key)
    try:
        await wait_ring(master.addr, settled({"a1"}), ssl=good)  # master -> aux over mutual TLS
        for daemon in (aux, master):
            before = await stats(daemon.addr, good)
            got = await asyncio.to_thread(plaintext_hello, daemon.addr)
            assert not got or got[0] == TLS_ALERT, f"{daemon.role} answered a plaintext HELLO: {got[:40]!r}"
            host, port = split_addr(daemon.addr)
            for ctx in (stranger, client_context(ca=certs.ca.cert)):  # a wrong CA's certificate; none at all
                with pytest.raises((DCacheError, OSError)):
                    conn = await open_connection(host, port, connect_timeout=3, ssl=ctx)
                    try:
                        await conn.call(Op.PING)
                    finally:
                        conn.close()
            with pytest.raises(ssl.SSLCertVerificationError):  # the client refuses a node its CA did not sign
                await open_connection(host, port, connect_timeout=3, ssl=client_context(ca=certs.wrong_ca.cert))
            after = await stats(daemon.addr, good)
            assert after["tls"] is True
            assert after["tls_handshakes_refused"] - before["tls_handshakes_refused"] == 3, (before, after)
            assert after["connections"] >= 1 and daemon.alive
            wait_for(partial(logged, daemon, "TLS handshake from 127.0.0.1:", "refused"), message="the refusals logged")
        async with Client(master.addr, ssl=good, timeout=5) as c:  # and the cluster goes on serving
            assert await c.set("after", b"refusals") is True
            assert await c.get("after") == b"refusals"
    finally:
        master.kill()
        aux.kill()


async def test_slow_and_silent_handshakes_cost_other_clients_nothing(certs: TlsCerts) -> None:
    aux = start_aux(certs, "--tls-handshake-timeout", "1", "--max-connections", "8")
    host, port = split_addr(aux.addr)
    good = certs.client_context()
    slow: list[socket.socket] = []
    try:
        async with Client(aux.addr, ssl=good, timeout=5, max_connections=1) as c:
            assert await c.ping() >= 0
            # Seven connections that never finish a handshake: five silent, two stuck in a partial ClientHello.
            for i in range(7):
                s = socket.create_connection((host, port), timeout=5)
                if i >= 5:
                    s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                slow.append(s)
            st = await c.stats()
            deadline = time.monotonic() + 5
            while st["tls_handshakes_in_progress"] < 7 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                st = await c.stats()
            assert st["tls_handshakes_in_progress"] == 7, st
            # The connected client is served while they hang...
            for i in range(300):
                assert await c.set(f"k{i}", b"v%d" % i) is True
            assert await c.mget([f"k{i}" for i in range(300)]) == [b"v%d" % i for i in range(300)]
            # ... one more connection would pass --max-connections (1 open + 7 in handshakes): refused at once.
            with socket.create_connection((host, port), timeout=5) as extra:
                try:
                    assert extra.recv(1) == b""
                except ConnectionResetError:
                    pass
            # The node cuts every stuck handshake at the timeout (a socket still open after 5 s fails the test).
            for s in slow:
                try:
                    data = await asyncio.to_thread(s.recv, 4096)
                except ConnectionResetError:
                    data = b""
                assert not data or data[0] == TLS_ALERT, data[:40]
            st = await c.stats()
            deadline = time.monotonic() + 5  # a handshake's socket closes before its counters move (same timeout, next step)
            while (st["tls_handshakes_timeout"] < 7 or st["tls_handshakes_in_progress"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                st = await c.stats()
            assert st["rejected_connections"] == 1, st
            assert st["tls_handshakes_timeout"] == 7 and st["tls_handshakes_in_progress"] == 0, st
            assert await c.get("k1") == b"v1"
        async with Client(aux.addr, ssl=good, timeout=5) as fresh:  # slots are free again
            assert await fresh.get("k2") == b"v2"
    finally:
        for s in slow:
            s.close()
        aux.kill()


# -- a whole cluster over TLS ----------------------------------------------------------


def tls_cluster(tmp: Path, certs: TlsCerts, replicas: int) -> tuple[Cluster, DaemonProcess]:
    """2 masters (m2 follows m1), aux nodes a1-a3, the shim in front of both masters: mutual TLS everywhere."""
    cluster = Cluster(tmp, replicas=replicas, args=certs.daemon_args(), ssl=certs.client_context())
    m1 = cluster.start_master("m1")
    m2 = cluster.start_master("m2", follow=m1)
    for n in ("a1", "a2", "a3"):
        cluster.start_aux(n)
    shim = start_http(m1.addr, m2.addr, extra=certs.daemon_args())
    return cluster, shim


class HttpsLoad:
    """Writes and reads keys through the shim over HTTPS until stopped; every failure is kept."""

    def __init__(self, url: str, ctx: ssl.SSLContext) -> None:
        self.url = url
        self.ctx = ctx
        self.ok = 0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            i = 0
            while not self._stop.is_set():
                key, value = f"https:{i % 200}", b"v%d" % i
                i += 1
                try:
                    async with session.put(f"{self.url}/data/{key}", data=value, ssl=self.ctx) as r:
                        if r.status != 201:
                            self.errors.append(f"PUT {key}: {r.status} {await r.text()}")
                            continue
                    async with session.get(f"{self.url}/data/{key}", headers={"Accept": "application/octet-stream"}, ssl=self.ctx) as r:
                        body = await r.read()
                        if r.status != 200 or body != value:
                            self.errors.append(f"GET {key}: {r.status} {body[:80]!r}")
                            continue
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self.errors.append(f"{key}: {exc.__class__.__name__}: {exc}")
                    continue
                self.ok += 1

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)


async def test_whole_cluster_over_tls_survives_kill9_under_load(tmp_path: Path, certs: TlsCerts) -> None:
    cluster, shim = tls_cluster(tmp_path, certs, replicas=2)
    try:
        url = f"https://{shim.addr}"
        with pytest.raises(aiohttp.ClientError):  # the shim serves HTTPS only
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(f"http://{shim.addr}/health") as r:
                    await r.read()
        load = HttpsLoad(url, certs.client_context())
        load.start()
        # the follower routes (its SYNC to the coordinator, its links to the aux nodes: TLS)
        await replicas_survive_kill9(cluster, cluster.masters[1].addr)
        await load.stop()
        assert load.errors == [] and load.ok > 20, (load.ok, load.errors[:5])
        for m in cluster.masters:
            assert (await stats(m.addr, certs.client_context()))["tls_handshakes"] > 0
    finally:
        shim.kill()
        cluster.stop()
        print(cluster.logs()[-20000:], shim.stderr())


async def test_whole_cluster_over_tls_rebalances_on_join(tmp_path: Path, certs: TlsCerts) -> None:
    cluster, shim = tls_cluster(tmp_path, certs, replicas=1)
    try:
        # (no HTTPS writes meanwhile: the scenario counts the keys that move and the keys held)
        await join_live_rebalance(cluster, cluster.coordinator.addr)  # a4 joins over TLS too
        ctx = certs.client_context()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def read(i: int) -> tuple[int, Any]:
                async with session.get(f"https://{shim.addr}/data/key:{i}", ssl=ctx) as r:
                    return r.status, await r.json()

            sample = range(0, 50_000, 97)
            got = await asyncio.gather(*(read(i) for i in sample))
        assert got == [(200, {"key": f"key:{i}", "value": f"value-{i}"}) for i in sample]
    finally:
        shim.kill()
        cluster.stop()
        print(cluster.logs()[-20000:], shim.stderr())


# -- reload on SIGHUP -------------------------------------------------------------------


def install(src: CertKey, cert: Path, key: Path) -> None:
    """Put ``src`` in place at ``cert`` and ``key`` the way an operator would: write aside, rename over."""
    for frm, to in ((src.cert, cert), (src.key, key)):
        tmp = to.with_suffix(".new")
        shutil.copy(frm, tmp)
        os.replace(tmp, to)


async def test_sighup_reloads_the_certificate_without_dropping_requests(tmp_path: Path, certs: TlsCerts) -> None:
    live: dict[str, tuple[Path, Path]] = {}
    for name in ("m1", "a1"):
        live[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        install(certs.node, *live[name])

    def tls_args(name: str) -> list[str]:
        cert, key = live[name]
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", certs.ca.cert, "--tls-client-auth", "true"]

    cluster = Cluster(tmp_path, ssl=certs.client_context())
    m1 = cluster.start_master("m1", *tls_args("m1"))
    a1 = cluster.start_aux("a1", *tls_args("a1"))
    ctx = certs.client_context()
    ops = 0
    errors: list[str] = []
    stop = asyncio.Event()

    async def worker(c: Client, w: int) -> None:
        nonlocal ops
        i = 0
        while not stop.is_set():
            key = f"reload:{w}:{i % 50}"
            i += 1
            try:
                assert await c.set(key, b"%d" % i) is True
                assert await c.get(key) == b"%d" % i
            except Exception as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
                continue
            ops += 2

    async def more_ops(n: int, what: str) -> None:
        target = ops + n
        deadline = time.monotonic() + 20
        while ops < target:
            assert time.monotonic() < deadline, f"no progress: {what} ({errors[:3]})"
            await asyncio.sleep(0.01)

    probes = {m1.addr: 0, a1.addr: 0}

    def serves(addr: str, fp: str) -> bool:
        probes[addr] += 1
        return served_fingerprint(addr, certs) == fp

    try:
        await wait_ring(m1.addr, settled({"a1"}), ssl=ctx)
        old = cert_fingerprint(certs.node.cert)
        assert serves(m1.addr, old) and serves(a1.addr, old)
        async with Client(m1.addr, ssl=ctx, timeout=5) as c:
            workers = [asyncio.ensure_future(worker(c, w)) for w in range(8)]
            await more_ops(500, "before the reload")
            handshakes_before = (await stats(a1.addr, ctx))["tls_handshakes"]
            probes_before = probes[a1.addr]
            renewed = certs.ca.issue("renewed")
            new = cert_fingerprint(renewed.cert)
            for name, daemon in (("m1", m1), ("a1", a1)):
                install(renewed, *live[name])
                daemon.signal(signal.SIGHUP)
            for daemon in (m1, a1):
                wait_for(partial(serves, daemon.addr, new), timeout=10, message=f"{daemon.role} serves the new certificate")
            await more_ops(500, "after the reload")
            # A bad certificate is refused; the one in use stays.
            live["m1"][1].write_text("not a key\n")
            m1.signal(signal.SIGHUP)
            wait_for(partial(logged, m1, "TLS reload failed"), message="the failed reload logged")
            assert serves(m1.addr, new)
            await more_ops(500, "after the failed reload")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
            assert errors == [], errors[:5]
            a1_stats, m1_stats = await stats(a1.addr, ctx), await stats(m1.addr, ctx)
        assert a1_stats["tls_reloads"] == 1 and a1_stats["tls_reload_failures"] == 0
        assert m1_stats["tls_reloads"] == 1 and m1_stats["tls_reload_failures"] == 1
        # The master's links to a1 stayed up: a1's new handshakes are this test's own connections
        # (its fingerprint probes, and the STATS just above).
        assert a1_stats["tls_handshakes"] - handshakes_before == probes[a1.addr] - probes_before + 1, (handshakes_before, a1_stats)
        assert logged(a1, "TLS reloaded: certificate")
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])


# -- the command line -------------------------------------------------------------------


def dcache(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dcache", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=stdin.decode() if stdin else None,
    )


async def test_cli_tools_and_the_sync_client_speak_tls(tmp_path: Path, certs: TlsCerts) -> None:
    cluster = Cluster(tmp_path, args=certs.daemon_args(), ssl=certs.client_context())
    m1 = cluster.start_master("m1", *FAST_HEALTH)
    a1 = cluster.start_aux("a1")
    tls = certs.cli_args()
    try:
        await wait_ring(m1.addr, settled({"a1"}), ssl=certs.client_context())
        res = dcache("set", "--addr", m1.addr, *tls, "cli", "over tls")
        assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr
        env = {"DCACHE_TLS_CA": certs.ca.cert, "DCACHE_TLS_CERT": certs.client.cert, "DCACHE_TLS_KEY": certs.client.key}
        res = dcache("get", "--addr", m1.addr, "cli", env=env)
        assert res.returncode == 0 and res.stdout == "over tls\n", res.stderr
        with SyncClient(m1.addr, ssl=certs.client_context(), timeout=5) as sync:  # the blocking client, on its own loop
            assert sync.get("cli") == b"over tls"
            assert sync.set("sync", b"over tls too") is True
        res = dcache("stats", "--addr", a1.addr, "--json", *tls)
        assert res.returncode == 0 and json.loads(res.stdout)["tls"] is True, res.stderr
        res = dcache("ring", "--addr", m1.addr, *tls)
        assert res.returncode == 0 and "a1" in res.stdout, res.stderr
        dump = tmp_path / "dump.bin"
        res = dcache("dump", "--addr", m1.addr, "--out", str(dump), *tls)  # reads a1 directly, over TLS
        assert res.returncode == 0, res.stderr
        res = dcache("restore", "--addr", m1.addr, "--in", str(dump), *tls)
        assert res.returncode == 0 and "keys_in_file: 2" in res.stdout, res.stdout + res.stderr  # "cli" and "sync"
        res = dcache(
            "bench", "--addr", a1.addr, *tls, "--duration", "0.5", "--conns", "2", "--procs", "1", "--keys", "200", "--json", "--quiet"
        )
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout.strip().splitlines()[-1])
        assert result["errors"] == 0 and result["ops_per_s"] > 0
        # Refusals and bad settings: one line each, no traceback.
        res = dcache("get", "--addr", m1.addr, "cli", "--timeout", "2")  # plaintext to a TLS port
        assert res.returncode == 3 and "--tls-ca" in res.stderr and "Traceback" not in res.stderr, res.stderr
        res = dcache("get", "--addr", m1.addr, "cli", "--timeout", "2", "--tls-ca", certs.wrong_ca.cert)
        assert res.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in res.stderr, res.stderr
        for args, message in (
            (["get", "k", "--tls-ca", str(tmp_path / "missing.pem")], "tls_ca: cannot read"),
            (["get", "k", "--tls-ca", certs.ca.cert, "--tls-cert", certs.client.cert], "tls_cert: a client certificate needs both"),
            (
                ["aux", "--port", "0", "--tls-cert", certs.node.cert, "--tls-key", certs.node.key],
                "tls_ca: a node with --tls-cert needs --tls-ca",
            ),
            (["master", "--port", "0", "--tls-client-auth", "true"], "tls_client_auth: needs --tls-cert, --tls-key and --tls-ca"),
            (
                ["aux", "--port", "0", "--tls-cert", certs.node.cert, "--tls-key", certs.client.key, "--tls-ca", certs.ca.cert],
                "is not the key",
            ),
            (["http", "--port", "0", "--tls-cert", certs.node.cert], "tls_key: --tls-cert and --tls-key go together"),
        ):
            res = dcache(*args)
            assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    finally:
        cluster.stop()


# -- RESP over TLS ------------------------------------------------------------------------


async def test_resp_port_serves_tls_like_the_native_port(certs: TlsCerts) -> None:
    """A node with a certificate serves TLS on its RESP port too: Redis clients with the CA (and a client certificate) get in, a plaintext one does not."""
    import redis

    aux = start_aux(certs, "--resp-port", "0")
    try:
        assert aux.resp_port
        secure = redis.Redis(
            host="127.0.0.1",
            port=aux.resp_port,
            ssl=True,
            ssl_ca_certs=certs.ca.cert,
            ssl_certfile=certs.client.cert,
            ssl_keyfile=certs.client.key,
            socket_timeout=5,
        )
        try:
            assert secure.set("resp:tls", b"over tls") is True
            assert secure.get("resp:tls") == b"over tls"
        finally:
            secure.close()
        before = await stats(aux.addr, certs.client_context())
        plain = redis.Redis(host="127.0.0.1", port=aux.resp_port, socket_timeout=3)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                plain.ping()
        finally:
            plain.close()
        no_cert = redis.Redis(host="127.0.0.1", port=aux.resp_port, ssl=True, ssl_ca_certs=certs.ca.cert, socket_timeout=3)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):  # --tls-client-auth: a certificate is required
                no_cert.ping()
        finally:
            no_cert.close()
        after = await stats(aux.addr, certs.client_context())
        assert after["tls_handshakes_refused"] - before["tls_handshakes_refused"] >= 2, (before, after)
        assert aux.alive
        async with Client(aux.addr, ssl=certs.client_context(), timeout=5) as c:  # the native port is unaffected
            assert await c.get("resp:tls") == b"over tls"
    finally:
        aux.terminate()
