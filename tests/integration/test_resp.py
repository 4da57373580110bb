"""The RESP front door with real processes and real Redis clients: redis-cli, redis-py (sync, asyncio,
pipelines, transactions, RESP3), Django's RedisCache, ioredis, redis-benchmark; hostile input.

One cluster per module: a master with ``--resp-port 0`` in front of two aux nodes holding every key
twice (``--replicas 2``), and one lone aux node with its own RESP port (single-node use).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis

from dcache import Client
from dcache.protocol.resp import scan_page_count
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, apt_install, start_aux, unavailable, wait_for
from tests.wire import PingWatch

pytestmark = pytest.mark.slow

CMD_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("resp"), replicas=2)
    try:
        c.start_master("m1", "--resp-port", "0", "--resp-allow-flush", "true")
        c.start_aux("a1")
        c.start_aux("a2")
        asyncio.run(wait_ring(c.masters[0].addr, settled({"a1", "a2"}), what="two aux nodes in the ring"))
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def lone_aux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    a = start_aux(None, "--resp-port", "0", "--max-value-bytes", "512KB", "--max-frame-bytes", "1MB", "--frame-timeout", "1")
    try:
        yield a
    finally:
        a.kill()


@pytest.fixture
def r(cluster: Cluster) -> Iterator[Any]:
    client = redis.Redis(port=cluster.masters[0].resp_port, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        error = apt_install(package)
        path = shutil.which(name)
        if path is None:
            unavailable(name, error or f"{package} installed no {name}")
    assert path is not None
    return path


# -- redis-py ----------------------------------------------------------------------------


def test_strings_counters_and_keys_through_a_master(r: Any, cluster: Cluster) -> None:
    assert r.ping() is True
    assert r.set("s:a", "1") is True and r.get("s:a") == b"1"
    assert r.get("s:missing") is None
    assert r.set("s:a", "2", nx=True) is None and r.set("s:new", "x", xx=True) is None
    assert r.set("s:a", "3", xx=True, px=60_000) is True and 0 < r.pttl("s:a") <= 60_000
    assert r.setnx("s:nx", "v") is True and r.setnx("s:nx", "w") is False
    assert r.setex("s:ex", 100, "v") is True and 95 <= r.ttl("s:ex") <= 100
    assert r.psetex("s:pex", 100_000, "v") is True and 95 <= r.ttl("s:pex") <= 100
    assert r.mset({"s:m1": "a", "s:m2": "b"}) is True
    assert r.mget(["s:m1", "s:missing", "s:m2"]) == [b"a", None, b"b"]
    assert r.getset("s:m1", "c") == b"a" and r.get("s:m1") == b"c"
    assert r.set("s:m1", "d", get=True) == b"c"
    assert r.append("s:m1", "ef") == 3 and r.get("s:m1") == b"def" and r.strlen("s:m1") == 3
    assert r.getdel("s:m1") == b"def" and r.exists("s:m1") == 0
    assert r.getex("s:m2", ex=50) == b"b" and 45 <= r.ttl("s:m2") <= 50
    assert r.getex("s:m2", persist=True) == b"b" and r.ttl("s:m2") == -1
    assert r.incr("s:n") == 1 and r.incrby("s:n", 41) == 42 and r.decr("s:n") == 41 and r.decrby("s:n", 40) == 1
    assert r.exists("s:n", "s:n", "s:missing") == 2
    assert r.type("s:n") == b"string" and r.type("s:missing") == b"none"
    assert r.expire("s:n", 100) is True and r.expire("s:n", 200, nx=True) is False and r.expire("s:n", 200, gt=True) is True
    assert 195 <= r.ttl("s:n") <= 200 and r.expire("s:n", 300, lt=True) is False
    assert r.persist("s:n") is True and r.persist("s:n") is False and r.ttl("s:n") == -1
    assert r.pexpireat("s:n", int(time.time() * 1000) + 50_000) is True and 45_000 <= r.pttl("s:n") <= 50_000
    assert r.expire("s:missing", 10) is False and r.ttl("s:missing") == -2
    assert r.touch("s:n", "s:nx", "s:missing") == 2
    assert r.delete("s:n", "s:nx", "s:missing") == 2 and r.unlink("s:ex") == 1
    assert r.set("s:keep", "v", ex=100) and r.set("s:keep", "w", keepttl=True) and 95 <= r.ttl("s:keep") <= 100
    # DBSIZE counts keys, not copies (the cluster keeps two of each)
    before = r.dbsize()
    assert r.mset({f"s:db{i}": "x" for i in range(10)}) is True
    wait_for(lambda: r.dbsize() - before == 10, message="DBSIZE to count 10 new keys once each")
    info = r.info()
    assert info["redis_version"] and info["dcache_role"] == "master" and "keyspace_hits" in info
    # a key written through RESP is the same key for the native protocol (same routing, both replicas)
    r.set("s:native", b"\x00\xffbinary")

    async def native() -> Any:
        async with Client(cluster.masters[0].addr, timeout=5.0) as c:
            return await c.get("s:native")

    assert asyncio.run(native()) == b"\x00\xffbinary"


def test_errors_carry_redis_prefixes(r: Any) -> None:
    r.set("e:text", "abc")
    with pytest.raises(redis.ResponseError, match=r"^value is not an integer or out of range$"):
        r.incr("e:text")
    with pytest.raises(redis.ResponseError, match="unknown command 'LPUSH'"):
        r.execute_command("LPUSH", "e:list", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
        r.execute_command("GET")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "k", "v", "BOGUS")
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        r.execute_command("SELECT", "3")
    with pytest.raises(redis.ResponseError, match="exceeds the limit"):
        r.set("k" * 2000, "v")  # the native key limit (1024 bytes)
    with pytest.raises(redis.ResponseError, match="WATCH is not supported"):
        r.execute_command("WATCH", "e:text")
    assert r.get("e:text") == b"abc"  # the connection is still fine


def test_pipelines_keep_command_order(r: Any) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(200):
        pipe.set(f"p:{i}", i)
    pipe.get("p:7")
    pipe.set("p:7", "seven")  # a read then a write of one key: the read sees the old value
    pipe.get("p:7")
    pipe.incr("p:c")
    pipe.incr("p:c")
    pipe.set("p:c", 100)
    pipe.incr("p:c")
    pipe.mget([f"p:{i}" for i in range(0, 200, 50)])
    pipe.incr("p:7")  # an error in a pipeline answers that command only
    pipe.delete(*[f"p:{i}" for i in range(10)])
    out = pipe.execute(raise_on_error=False)
    assert out[:200] == [True] * 200
    assert out[200:206] == [b"7", True, b"seven", 1, 2, True]
    assert out[206] == 101
    assert out[207] == [b"0", b"50", b"100", b"150"]
    assert isinstance(out[208], redis.ResponseError)
    assert out[209] == 10


def test_transactions(r: Any) -> None:
    with r.pipeline(transaction=True) as pipe:
        pipe.set("t:a", 1).incr("t:a").get("t:a").getset("t:a", "x").get("t:a")
        assert pipe.execute() == [True, 2, b"2", b"2", b"x"]
    s = _raw(r.connection_pool.connection_kwargs["port"])
    s.sendall(_cmd(b"MULTI") + _cmd(b"NOPE") + _cmd(b"SET", b"t:b", b"1") + _cmd(b"EXEC") + _cmd(b"GET", b"t:b"))
    assert _read(s, 5) == [
        b"+OK",
        b"-ERR unknown command 'NOPE', with args beginning with: ",
        b"+QUEUED",
        b"-EXECABORT Transaction discarded because of previous errors.",
        b"$-1",
    ]
    s.sendall(_cmd(b"MULTI") + _cmd(b"SET", b"t:b", b"1") + _cmd(b"DISCARD") + _cmd(b"GET", b"t:b") + _cmd(b"EXEC"))
    assert _read(s, 5) == [b"+OK", b"+QUEUED", b"+OK", b"$-1", b"-ERR EXEC without MULTI"]
    s.close()


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _read(s: socket.socket, lines: int) -> list[bytes]:
    """``lines`` reply lines (simple replies, errors, integers and null bulks only)."""
    data = b""
    while data.count(b"\r\n") < lines:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    return data.split(b"\r\n")[:lines]


def test_resp3(cluster: Cluster) -> None:
    with redis.Redis(port=cluster.masters[0].resp_port, protocol=3, socket_timeout=10) as r3:
        assert r3.set("r3:a", "1") is True
        assert r3.get("r3:a") == b"1" and r3.get("r3:missing") is None
        assert r3.mget(["r3:a", "r3:missing"]) == [b"1", None]
        assert r3.config_get("maxmemory-policy") == {b"maxmemory-policy": b"allkeys-lru"} or r3.config_get("maxmemory-policy") == {
            "maxmemory-policy": "allkeys-lru"
        }
        assert r3.client_id() > 0


async def test_asyncio_client_and_pipelines(cluster: Cluster) -> None:
    import redis.asyncio as aredis

    r = aredis.Redis(port=cluster.masters[0].resp_port, socket_timeout=10)
    try:
        assert await r.set("a:1", "x") is True and await r.get("a:1") == b"x"
        results = await asyncio.gather(*(r.incr("a:n") for _ in range(50)))
        assert sorted(results) == list(range(1, 51))
        async with r.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.set(f"a:{i}", i)
                pipe.get(f"a:{i}")
            out = await pipe.execute()
        assert out == [x for i in range(100) for x in (True, str(i).encode())]
        async with r.pipeline(transaction=True) as pipe:
            pipe.incr("a:t")
            pipe.incr("a:t")
            pipe.get("a:t")
            assert await pipe.execute() == [1, 2, b"2"]
    finally:
        await r.aclose()


def test_auth_on_a_node_with_a_token(tmp_path: Path) -> None:
    a = start_aux(None, "--resp-port", "0", "--auth-token", "s3cret")
    try:
        with redis.Redis(port=a.resp_port, socket_timeout=10) as anon:
            with pytest.raises(redis.AuthenticationError):
                anon.get("k")
        with redis.Redis(port=a.resp_port, password="s3cret", socket_timeout=10) as good:
            assert good.set("k", "v") and good.get("k") == b"v"
        with redis.Redis(port=a.resp_port, username="default", password="s3cret", protocol=3, socket_timeout=10) as hello:
            assert hello.get("k") == b"v"
        s = _raw(a.resp_port)
        s.sendall(_cmd(b"AUTH", b"wrong") + _cmd(b"GET", b"k") + _cmd(b"AUTH", b"default", b"s3cret") + _cmd(b"GET", b"k"))
        assert _read(s, 5) == [
            b"-WRONGPASS invalid username-password pair or user is disabled.",
            b"-NOAUTH Authentication required.",
            b"+OK",
            b"$1",
            b"v",
        ]
        s.close()
    finally:
        a.kill()


def test_scan_flushdb_and_dbsize_on_a_master_without_a_ring_fail_instead_of_answering_nothing() -> None:
    """A master with no ring yet (no aux node has joined) cannot scan, count or flush the cluster: SCAN must
    not say "no keys", DBSIZE must not say 0 and FLUSHDB must not say OK. Each waits for the ring like a data
    command, then fails."""
    m = DaemonProcess("master", ["--host", "127.0.0.1", "--port", "0", "--resp-port", "0", "--resp-allow-flush", "true"]).start()
    try:

        def refused(command: tuple[Any, ...]) -> str:
            with redis.Redis(port=m.resp_port, socket_timeout=CMD_TIMEOUT_S) as alone:
                with pytest.raises(redis.ResponseError, match="has no ring yet") as err:
                    alone.execute_command(*command)
                return str(err.value)

        commands = [("SCAN", 0), ("DBSIZE",), ("FLUSHDB",), ("GET", "k")]
        with ThreadPoolExecutor(len(commands)) as pool:  # each waits for the ring (3 s): side by side
            assert len(list(pool.map(refused, commands))) == len(commands)
    finally:
        m.kill()


# -- SCAN -----------------------------------------------------------------------------------


def test_scan_through_a_master_lists_every_key_once(r: Any, cluster: Cluster) -> None:
    want = {b"scan:%d" % i for i in range(600)}
    pipe = r.pipeline(transaction=False)
    for k in want:
        pipe.set(k, "v")
    pipe.execute()
    # two aux nodes, two copies of every key: each key is read from one owner only
    got = list(r.scan_iter(match="scan:*", count=50))
    assert len(got) == len(want) and set(got) == want
    assert set(r.scan_iter(match="scan:1?", count=1000)) == {b"scan:%d" % i for i in range(10, 20)}
    assert list(r.scan_iter(match="scan:*", _type="hash")) == []  # every dcache value is a string
    cursor, page = r.scan(0, match="scan:*", count=10)
    assert cursor > 0 and len(page) <= 10
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        r.execute_command("SCAN", "999999999")
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        r.execute_command("SCAN", "abc")
    cli = _tool("redis-cli", "redis-tools")
    out = subprocess.run(
        [cli, "-p", str(cluster.masters[0].resp_port), "--scan", "--pattern", "scan:*"],
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == sorted(k.decode() for k in want)


def test_scan_on_an_aux_node_lists_its_own_keys(lone_aux: DaemonProcess) -> None:
    with redis.Redis(port=lone_aux.resp_port, socket_timeout=10) as r:
        r.mset({f"own:{i}": i for i in range(300)})
        assert sorted(r.scan_iter(match="own:*", count=25)) == sorted(b"own:%d" % i for i in range(300))


#: Keys of the largest default size (1 KiB) that a costly MATCH examines; none holds a ``c``.
SLOW_KEYS = [(b"slow:%05d" % i).ljust(1024, b"k") for i in range(2000)]
#: ``*``, 1000 classes that match any printable byte, then ``c*``: about 4 ms a 1 KiB key (1000 x 1024 byte
#: steps), so 10 s for a page of 2000 keys if a call matched every key a COUNT asks for.
COSTLY_MATCH = b"*" + b"[!-~]" * 1000 + b"c*"
#: Matches the keys of 500 bytes or more after ``full:``, at the cost of 500 classes a key (pages of 16 keys).
COSTLY_FULL_MATCH = b"full:*" + b"[!-~]" * 500 + b"*"
FULL_LONG = {(b"full:%04d" % i).ljust(800, b"x") for i in range(200)}
FULL_SHORT = {b"full:s%04d" % i for i in range(100)}


@pytest.fixture(scope="module")
def scan_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master and one aux node, both with a RESP port, holding ``SLOW_KEYS`` and the ``full:`` keys."""
    c = Cluster(tmp_path_factory.mktemp("scanbound"))
    try:
        c.start_master("m1", "--resp-port", "0")
        c.start_aux("s1", "--resp-port", "0")
        asyncio.run(wait_ring(c.masters[0].addr, settled({"s1"}), what="the aux node in the ring"))
        with redis.Redis(port=c.masters[0].resp_port, socket_timeout=CMD_TIMEOUT_S) as r:
            keys = [*SLOW_KEYS, *FULL_LONG, *FULL_SHORT]
            for i in range(0, len(keys), 500):
                r.mset({k: b"v" for k in keys[i : i + 500]})
        yield c
    finally:
        c.stop()


def _node(c: Cluster, role: str) -> DaemonProcess:
    return c.masters[0] if role == "master" else c.aux["s1"]


@pytest.mark.parametrize("role", ["aux", "master"])
def test_a_costly_scan_match_never_holds_the_loop(scan_pair: Cluster, role: str) -> None:
    """A MATCH that costs about 4 ms a key, with COUNT 10000: the call lists a few keys only, and PINGs keep being answered."""
    node = _node(scan_pair, role)
    assert node.proc is not None
    with redis.Redis(port=node.resp_port, socket_timeout=CMD_TIMEOUT_S) as r, PingWatch(node.addr, node.proc.pid, interval=0.005) as watch:
        cursor, page = r.scan(0, match=COSTLY_MATCH, count=10_000)
        worst = watch.worst_gap()
    assert not watch.errors, watch.errors
    assert worst < 1.0, f"a PING waited {worst:.2f} s behind one SCAN"  # about 10 s before the bound
    assert page == [] and cursor != 0  # the page was cut short; the scan goes on from the cursor


@pytest.mark.parametrize("role", ["aux", "master"])
def test_a_full_scan_with_a_costly_match_lists_every_key_once(scan_pair: Cluster, role: str) -> None:
    node = _node(scan_pair, role)
    with redis.Redis(port=node.resp_port, socket_timeout=CMD_TIMEOUT_S) as r:
        cursor, page = r.scan(0, match=COSTLY_FULL_MATCH, count=10_000)
        assert cursor != 0 and len(page) <= scan_page_count(COSTLY_FULL_MATCH, 1024) < 10_000  # a short page
        got = list(r.scan_iter(match=COSTLY_FULL_MATCH, count=10_000))
        assert len(got) == len(FULL_LONG) and set(got) == FULL_LONG
        # a cheap pattern pages as before: one call of COUNT 10000 lists every one of the 2300 keys' matches
        cursor, page = r.scan(0, match=b"full:*", count=10_000)
        assert cursor == 0 and sorted(page) == sorted(FULL_LONG | FULL_SHORT)


@pytest.mark.parametrize("role", ["aux", "master"])
def test_multi_key_commands_over_many_chunks_count_every_key(scan_pair: Cluster, role: str) -> None:
    """DEL, EXISTS, TOUCH and UNLINK of more keys than one step sends (``KEYS_PER_STEP``): every key counted once."""
    from dcache.respserver import KEYS_PER_STEP

    node = _node(scan_pair, role)
    n = 2 * KEYS_PER_STEP + 7
    names = [b"chunk:%s:%d" % (role.encode(), i) for i in range(n)]
    missing = [b"chunk:missing:%d" % i for i in range(5)]
    with redis.Redis(port=node.resp_port, socket_timeout=CMD_TIMEOUT_S) as r:
        r.mset({k: b"v" for k in names})
        assert r.exists(*names, *missing, names[0]) == n + 1  # a key named twice counts twice, as in Redis
        assert r.touch(*missing, *names) == n
        assert r.delete(*names[: KEYS_PER_STEP + 1], *missing) == KEYS_PER_STEP + 1
        assert r.unlink(*names) == n - KEYS_PER_STEP - 1
        assert r.exists(*names) == 0


# -- Django -------------------------------------------------------------------------------


def test_django_redis_cache_whole_api(cluster: Cluster) -> None:
    from django.conf import settings

    if not settings.configured:
        settings.configure(USE_TZ=True)
    from django.core.cache.backends.redis import RedisCache

    cache = RedisCache(f"redis://127.0.0.1:{cluster.masters[0].resp_port}/0", {"TIMEOUT": 300, "KEY_PREFIX": "dj"})
    try:
        cache.clear()
        assert cache.get("k") is None and cache.get("k", "dflt") == "dflt"
        cache.set("k", {"a": [1, 2]})
        assert cache.get("k") == {"a": [1, 2]} and cache.has_key("k")
        assert cache.add("k", "other") is False and cache.add("k2", "v2") is True and cache.get("k2") == "v2"
        assert cache.delete("k2") is True and cache.delete("k2") is False and not cache.has_key("k2")
        cache.set_many({"m1": 1, "m2": "two", "m3": b"three"}, timeout=100)
        assert cache.get_many(["m1", "m2", "m3", "nope"]) == {"m1": 1, "m2": "two", "m3": b"three"}
        cache.delete_many(["m1", "m2"])
        assert cache.get_many(["m1", "m2", "m3"]) == {"m3": b"three"}
        cache.set("n", 10)
        assert cache.incr("n") == 11 and cache.incr("n", 5) == 16 and cache.decr("n") == 15 and cache.decr("n", 5) == 10
        with pytest.raises(ValueError):
            cache.incr("missing")
        cache.set("t", "v", timeout=100)
        assert cache.touch("t", 10) is True and cache.touch("missing", 10) is False
        assert cache.touch("t", None) is True  # PERSIST: the expiry is gone
        assert cache._cache.get_client().ttl(cache.make_and_validate_key("t")) == -1
        cache.set("forever", "v", timeout=None)
        assert cache._cache.get_client().ttl(cache.make_and_validate_key("forever")) == -1
        cache.set("zero", "v", timeout=0)  # timeout 0: expires at once
        assert cache.get("zero") is None
        assert cache.add("zero", "v", timeout=0) is True and cache.get("zero") is None
        assert cache.get_or_set("gos", "made") == "made" and cache.get_or_set("gos", "other") == "made"
        cache.clear()
        assert cache.get("k") is None and cache.get("forever") is None and cache.get("m3") is None
    finally:
        cache.close()


# -- nginx ----------------------------------------------------------------------------------


def test_nginx_balances_resp_over_the_masters(cluster: Cluster, tmp_path: Path) -> None:
    from tests.nginx import start_nginx

    m = cluster.masters[0]
    ngx = start_nginx(tmp_path / "nginx", [m.addr], resp_masters=[f"127.0.0.1:{m.resp_port}"])
    try:
        host, _, port = ngx.resp_listen.rpartition(":")
        with redis.Redis(host=host, port=int(port), socket_timeout=10) as via:
            assert via.set("ngx:a", "1") and via.incr("ngx:a") == 2
            assert via.info("server")["dcache_role"] == "master"
        with redis.Redis(port=m.resp_port, socket_timeout=10) as direct:
            assert direct.get("ngx:a") == b"2"
    finally:
        ngx.stop()


# -- redis-cli ----------------------------------------------------------------------------


def test_redis_cli_commands_and_pipe(cluster: Cluster, tmp_path: Path) -> None:
    cli = _tool("redis-cli", "redis-tools")
    port = str(cluster.masters[0].resp_port)
    script = "SET cli:a hello\nGET cli:a\nINCR cli:n\nINCR cli:n\nMGET cli:a cli:n cli:none\nDEL cli:a\nGET cli:a\nPING\nDBSIZE\n"
    out = subprocess.run([cli, "-p", port], input=script, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:11] == ["OK", "hello", "1", "2", "hello", "2", "", "1", "", "PONG", lines[10]] and int(lines[10]) >= 1
    # mass insertion: the RESP stream redis-cli --pipe sends, 5000 SETs
    data = b"".join(
        b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(k), k, len(v), v)
        for k, v in ((b"pipe:%d" % i, b"v%d" % i) for i in range(5000))
    )
    (tmp_path / "data.resp").write_bytes(data)
    with open(tmp_path / "data.resp", "rb") as f:
        out = subprocess.run([cli, "-p", port, "--pipe"], stdin=f, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "errors: 0, replies: 5000" in out.stdout
    assert subprocess.run([cli, "-p", port, "GET", "pipe:4999"], capture_output=True, text=True, timeout=CMD_TIMEOUT_S).stdout == "v4999\n"


def test_redis_benchmark_completes_without_errors(cluster: Cluster, lone_aux: DaemonProcess) -> None:
    bench = _tool("redis-benchmark", "redis-tools")
    for port in (cluster.masters[0].resp_port, lone_aux.resp_port):
        out = subprocess.run(
            [bench, "-p", str(port), "-t", "ping,set,get,incr,mset", "-n", "3000", "-c", "20", "-P", "4", "--csv"],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S * 2,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "rror" not in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
        tests = [line.split(",")[0].strip('"') for line in out.stdout.splitlines()[1:]]
        assert tests == ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET (10 keys)"], out.stdout


# -- ioredis (Node) ----------------------------------------------------------------------

IOREDIS_SCRIPT = """
const Redis = require("ioredis");
const r = new Redis({ port: Number(process.argv[2]), lazyConnect: false, maxRetriesPerRequest: 2 });
(async () => {
  const out = {};
  out.set = await r.set("io:a", "1");
  out.get = await r.get("io:a");
  out.mset = await r.mset("io:b", "2", "io:c", "3");
  out.mget = await r.mget("io:a", "io:b", "io:missing", "io:c");
  const p = r.pipeline();
  for (let i = 0; i < 100; i++) p.incr("io:n");
  p.get("io:n");
  out.pipeline = (await p.exec()).map(([err, v]) => (err ? String(err) : v));
  out.multi = await r.multi().set("io:t", "x").get("io:t").exec();
  console.log(JSON.stringify(out));
  r.disconnect();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_ioredis(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        error = apt_install("nodejs", "npm")
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            unavailable("node and npm", error or "apt-get install nodejs npm installed no node or npm")
    assert node is not None and npm is not None
    work = tmp_path_factory.mktemp("ioredis")
    res = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "ioredis"], cwd=work, capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        unavailable("ioredis (npm install)", res.stderr[-500:])
    (work / "t.js").write_text(IOREDIS_SCRIPT)
    out = subprocess.run([node, "t.js", str(cluster.masters[0].resp_port)], cwd=work, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["set"] == "OK" and got["get"] == "1" and got["mset"] == "OK"
    assert got["mget"] == ["1", "2", None, "3"]
    assert got["pipeline"] == list(range(1, 101)) + ["100"]
    assert got["multi"] == [[None, "OK"], [None, "x"]]


# -- the lone aux node, and hostile input ---------------------------------------------------


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _read_until_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection was not closed within {timeout} s; got {data[:200]!r}")


def test_aux_node_serves_its_own_cache(lone_aux: DaemonProcess) -> None:
    with redis.Redis(port=lone_aux.resp_port, socket_timeout=10) as r:
        assert r.set("x", "1") and r.incr("x") == 2 and r.get("x") == b"2"
        assert r.info("server")["dcache_role"] == "aux"
        with pytest.raises(redis.ResponseError, match="admin command"):
            r.flushdb()  # not enabled on this node
        with pytest.raises(redis.ResponseError, match="exceeds the limit"):
            r.set("big", b"x" * (600 * 1024))  # over --max-value-bytes


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (b"*2000000000\r\n", b"-ERR Protocol error"),  # refused as the header is read
        (b"*1\r\n$2000000000\r\n" + b"x" * (2 << 20), b"-ERR Protocol error: a command larger than"),  # past --max-frame-bytes
        (b"*1\r\n*1\r\n$4\r\nPING\r\n", b"-ERR Protocol error"),  # nested array
        (b"*1\r\n:1\r\n", b"-ERR Protocol error"),  # an integer where a bulk string goes
        (b"*1\r\n$x\r\n", b"-ERR Protocol error"),  # garbage length
        (b"PING " + b"A" * (70 * 1024), b"-ERR Protocol error: too big inline request"),
    ],
)
def test_hostile_input_gets_an_error_and_a_close(lone_aux: DaemonProcess, payload: bytes, expect: bytes) -> None:
    with redis.Redis(port=lone_aux.resp_port, socket_timeout=10) as other:
        other.set("still", "here")
        s = _raw(lone_aux.resp_port)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert s.recv(7) == b"+PONG\r\n"
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b"+PONG\r\n" + _read_until_closed(s)
        s.close()
        assert got.startswith(b"+PONG\r\n") and expect in got, got[:300]
        assert other.get("still") == b"here" and lone_aux.alive


def test_slow_partial_commands_are_closed_and_others_keep_serving(lone_aux: DaemonProcess) -> None:
    slow = [_raw(lone_aux.resp_port) for _ in range(5)]
    for s in slow:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc")  # never finished
    with redis.Redis(port=lone_aux.resp_port, socket_timeout=10) as other:
        t0 = time.monotonic()
        for s in slow:
            got = _read_until_closed(s, timeout=10)
            assert b"Protocol error" in got
            s.close()
        assert time.monotonic() - t0 < 8  # --frame-timeout 1
        assert other.ping() and other.set("after", "1") and lone_aux.alive


def test_a_huge_pipeline_is_answered_in_order(lone_aux: DaemonProcess) -> None:
    s = _raw(lone_aux.resp_port)
    n = 20_000
    s.sendall(b"".join(b"*2\r\n$4\r\nINCR\r\n$4\r\nhuge\r\n" for _ in range(n)) + b"*1\r\n$4\r\nQUIT\r\n")
    got = _read_until_closed(s, timeout=30)
    s.close()
    assert got == b"".join(b":%d\r\n" % i for i in range(1, n + 1)) + b"+OK\r\n"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_client_that_does_not_read_costs_bounded_memory(lone_aux: DaemonProcess) -> None:
    """Pipelined GETs of a large value from a client that never reads: the node stops running them once its
    replies back up, keeps serving others, and answers the rest in order once the client reads.

    Before the fix the node ran every command it had read (2,000 here, in one batch) and queued every reply:
    +1 GB of RSS for 2,000 GETs of 500 KB, and the loop stalled for seconds.
    """
    assert lone_aux.proc is not None
    pid = lone_aux.proc.pid
    value = b"v" * (500 * 1000)
    n = 2000
    with redis.Redis(port=lone_aux.resp_port, socket_timeout=10) as other:
        other.set("large", value)
        before = _rss_mb(pid)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        s.settimeout(10)
        s.connect(("127.0.0.1", lone_aux.resp_port))
        s.sendall(_cmd(b"GET", b"large") * n)  # 44 KB of commands in one write; nothing read
        assert select.select([s], [], [], 10)[0], "no reply within 10 s"  # the node ran the first GETs
        t0 = time.monotonic()
        assert other.ping()
        assert time.monotonic() - t0 < 2.0  # the node's loop is not stalled by the flood
        grown = _rss_mb(pid) - before
        assert grown < 100, f"RSS grew by {grown:.0f} MB for a client that does not read"
        reader = hiredis.Reader()
        got = 0
        deadline = time.monotonic() + CMD_TIMEOUT_S
        while got < n and time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {got} replies"
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                assert reply == value, reply[:100]
                got += 1
        s.close()
        assert got == n and lone_aux.alive


# -- as Redis answers (differences found by tests/integration/test_resp_differential.py) --------------


@pytest.fixture(params=["master", "aux"])
def either(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A redis-py client of the master, then of the lone aux node."""
    node = request.getfixturevalue("cluster").masters[0] if request.param == "master" else request.getfixturevalue("lone_aux")
    client = redis.Redis(port=node.resp_port, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


def test_set_with_a_time_already_past_deletes_the_key(either: Any) -> None:
    """Redis deletes the key; dcache kept the value 1 ms, and a later EXPIREAT kept it for good."""
    r = either
    past_s, past_ms = int(time.time()) - 100, int(time.time() * 1000) - 100_000
    assert r.set("past:a", "old") and r.set("past:a", "new", exat=past_s) is True
    assert r.expireat("past:a", past_s + 10_000) is False and r.get("past:a") is None and r.exists("past:a") == 0
    assert r.set("past:b", "x", pxat=past_ms) is True and r.get("past:b") is None
    assert r.set("past:c", "old") and r.set("past:c", "new", pxat=past_ms, get=True) == b"old" and r.get("past:c") is None
    assert r.set("past:d", "old") and r.set("past:d", "new", exat=past_s, nx=True) is None and r.get("past:d") == b"old"
    assert r.set("past:d", "new", exat=past_s, xx=True) is True and r.get("past:d") is None
    assert r.set("past:d", "new", exat=past_s, xx=True) is None and r.set("past:d", "new", exat=past_s, nx=True) is True
    assert r.exists("past:d") == 0
    pipe = r.pipeline(transaction=False)  # a pipeline of conditional writes: each sees the one before
    pipe.set("past:e", "1").set("past:e", "2", pxat=past_ms, xx=True).incr("past:e").get("past:e")
    assert pipe.execute() == [True, True, 1, b"1"]


def test_getex_checks_its_time_only_for_a_key_it_found(either: Any) -> None:
    """As Redis 7: a missing key answers nil whatever the time; a found one gets the time's error and keeps its TTL."""
    r = either
    for bad in ("0", "-5", "abc"):
        assert r.execute_command("GETEX", "getex:missing", "PX", bad) is None
        assert r.execute_command("GETEX", "getex:missing", "EXAT", bad) is None
    assert r.set("getex:k", "v", ex=100)
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'getex' command"):
        r.execute_command("GETEX", "getex:k", "PX", "0")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.execute_command("GETEX", "getex:k", "EX", "abc")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("GETEX", "getex:missing", "EX")  # the options' shape is checked first
    assert 95 <= r.ttl("getex:k") <= 100
    assert r.getex("getex:k", exat=int(time.time()) - 100) == b"v" and r.exists("getex:k") == 0  # past: deleted


def test_decrby_of_the_smallest_64_bit_integer_is_refused_as_in_redis(either: Any) -> None:
    """Its negation does not fit in 64 bits: Redis refuses it whatever the value (dcache answered 0 for that value)."""
    r = either
    assert r.set("decr:min", "-9223372036854775808")
    with pytest.raises(redis.ResponseError, match=r"^decrement would overflow$"):
        r.decrby("decr:min", -9223372036854775808)
    with pytest.raises(redis.ResponseError, match=r"^decrement would overflow$"):
        r.decrby("decr:missing", -9223372036854775808)
    assert r.get("decr:min") == b"-9223372036854775808" and r.exists("decr:missing") == 0
    assert r.incrby("decr:min", 1) == -9223372036854775807 and r.decrby("decr:min", 1) == -9223372036854775808


def test_a_pipelined_del_then_set_through_a_master_keeps_the_set(r: Any) -> None:
    """The master sent the DEL's DELV and the SET's SETV on two connections of a link; an owner got the SET first,
    refused the DEL as older, and the master retried the DEL with a fresh version, deleting the SET (about half
    of these pipelines lost the SET)."""
    for i in range(60):
        key = f"order:{i}"
        pipe = r.pipeline(transaction=False)
        pipe.set(key, "old", keepttl=True, get=True).delete("order:other", key).psetex(key, 100_000, "new").getdel("order:other")
        assert pipe.execute() == [None, 1, True, None]
        pipe.set(key, "a").set(key, "b", keepttl=True).delete("order:other", key).set(key, "c").incr("order:n")
        pipe.execute()
        assert r.get(key) == b"c", i


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    os.environ.setdefault("NO_COLOR", "1")
