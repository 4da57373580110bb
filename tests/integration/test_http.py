"""The HTTP shim (``dcache http``) against a real master and aux nodes, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from dcache.client import Client
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 64 * 1024  # the shim under test refuses bodies above this (--client-max-size)


class Stack:
    def __init__(self, cluster: Cluster, shim: DaemonProcess) -> None:
        self.cluster = cluster
        self.shim = shim
        self.url = f"http://{shim.addr}"
        self.master = cluster.coordinator.addr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cluster = Cluster(tmp_path_factory.mktemp("http"))
    shim = None
    try:
        cluster.start_master("m1")
        cluster.start_aux("a1")
        cluster.start_aux("a2")
        asyncio.run(wait_ring(cluster.coordinator.addr, settled({"a1", "a2"}), what="a1, a2 up"))
        shim = start_http(cluster.coordinator.addr, extra=["--client-max-size", str(MAX_BODY)])
        yield Stack(cluster, shim)
    except BaseException:
        print(cluster.logs() + ("\n--- http\n" + shim.stderr() if shim else ""))
        raise
    finally:
        if shim is not None:
            shim.kill()
        cluster.stop()


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.request(method, url, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def call_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    status, headers, body = await call(method, url, **kwargs)
    assert headers["Content-Type"].startswith("application/json"), (status, headers, body)
    return status, json.loads(body)


async def test_json_set_get_delete(stack: Stack) -> None:
    status, doc = await call_json("POST", f"{stack.url}/data", json={"key": "greeting", "value": "hello"})
    assert (status, doc) == (201, {"key": "greeting", "value": "hello"})
    assert await call_json("GET", f"{stack.url}/data/greeting") == (200, {"key": "greeting", "value": "hello"})
    assert await call_json("DELETE", f"{stack.url}/data/greeting") == (200, {"key": "greeting", "deleted": True})
    assert await call_json("GET", f"{stack.url}/data/greeting") == (404, {"error": "not found", "key": "greeting"})
    assert await call_json("DELETE", f"{stack.url}/data/greeting") == (200, {"key": "greeting", "deleted": False})


async def test_keys_with_slashes_and_unicode_and_text_values(stack: Stack) -> None:
    key, value = "user/1 é ☃?&", "Ada ✓\n"
    assert (await call_json("POST", f"{stack.url}/data", json={"key": key, "value": value}))[0] == 201
    assert await call_json("GET", f"{stack.url}/data/{quote(key, safe='')}") == (200, {"key": key, "value": value})
    assert await call_json("GET", f"{stack.url}/api/get/{quote(key, safe='')}") == (200, {"key": key, "value": value})


async def test_ttl_expires(stack: Stack) -> None:
    assert (await call_json("POST", f"{stack.url}/data", json={"key": "ttl:json", "value": "v", "ttl": 0.3}))[0] == 201
    assert (await call("PUT", f"{stack.url}/data/ttl:raw?ttl=0.3", data=b"v"))[0] == 201
    assert (await call("GET", f"{stack.url}/data/ttl:json"))[0] == 200
    deadline = time.monotonic() + 10
    while True:
        statuses = [(await call("GET", f"{stack.url}/data/{k}"))[0] for k in ("ttl:json", "ttl:raw")]
        if statuses == [404, 404]:
            break
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.05)


async def test_raw_bytes_put_and_octet_stream_get(stack: Stack) -> None:
    blob = bytes(range(256))
    status, doc = await call_json("PUT", f"{stack.url}/data/blob", data=blob, headers={"Content-Type": "application/octet-stream"})
    assert (status, doc) == (201, {"key": "blob", "size": 256})
    status, headers, body = await call("GET", f"{stack.url}/data/blob", headers={"Accept": "application/octet-stream"})
    assert (status, headers["Content-Type"], body) == (200, "application/octet-stream", blob)
    # JSON carries text: a value that is not UTF-8 is refused to a JSON client, with a hint.
    for path in ("/data/blob", "/api/get/blob"):
        status, doc = await call_json("GET", stack.url + path)
        assert status == 406 and "application/octet-stream" in doc["error"] and doc["key"] == "blob"
    # JSON wins ties and explicit preferences.
    status, doc = await call_json("GET", f"{stack.url}/data/blob", headers={"Accept": "application/octet-stream;q=0.5, application/json"})
    assert status == 406
    # A UTF-8 value PUT as bytes reads back as JSON text; an empty body stores an empty value.
    assert (await call("PUT", f"{stack.url}/data/text", data="héllo".encode()))[0] == 201
    assert await call_json("GET", f"{stack.url}/data/text") == (200, {"key": "text", "value": "héllo"})
    assert (await call("PUT", f"{stack.url}/data/empty"))[0] == 201
    assert (await call("GET", f"{stack.url}/data/empty", headers={"Accept": "application/octet-stream"}))[2] == b""
    # A miss is JSON 404 whatever the Accept header.
    status, doc = await call_json("GET", f"{stack.url}/data/nope", headers={"Accept": "application/octet-stream"})
    assert (status, doc) == (404, {"error": "not found", "key": "nope"})


async def test_legacy_routes(stack: Stack) -> None:
    status, doc = await call_json("POST", f"{stack.url}/api/post", params={"key": "legacy", "value": "v 1"})
    assert (status, doc) == (201, {"key": "legacy", "value": "v 1"})
    assert await call_json("GET", f"{stack.url}/api/get/legacy") == (200, {"key": "legacy", "value": "v 1"})
    assert await call_json("GET", f"{stack.url}/data/legacy") == (200, {"key": "legacy", "value": "v 1"})
    assert (await call_json("GET", f"{stack.url}/api/get/legacy-missing"))[0] == 404
    assert (await call_json("POST", f"{stack.url}/api/post", params={"key": "k"}))[0] == 400
    assert (await call_json("POST", f"{stack.url}/api/post", params={"key": "t", "value": "v", "ttl": "-1"}))[0] == 400


LONG_KEY = "k" * 1025
BAD_REQUESTS = [
    ("POST", "/data", {"data": b"{not json"}, 400, "not valid JSON"),
    ("POST", "/data", {"data": b""}, 400, "JSON object"),
    ("POST", "/data", {"data": b"\xff\xfe"}, 400, "not valid JSON"),
    ("POST", "/data", {"json": ["key", "value"]}, 400, "JSON object"),
    ("POST", "/data", {"json": {"value": "v"}}, 400, "'key' is required"),
    ("POST", "/data", {"json": {"key": "k"}}, 400, "'value' is required"),
    ("POST", "/data", {"json": {"key": 1, "value": "v"}}, 400, "'key' must be a string"),
    ("POST", "/data", {"json": {"key": "k", "value": None}}, 400, "'value' is required"),
    ("POST", "/data", {"json": {"key": "k", "value": {"a": 1}}}, 400, "'value' must be a string"),
    ("POST", "/data", {"json": {"key": "", "value": "v"}}, 400, "must not be empty"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "ttl": 0}}, 400, "ttl"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "ttl": "10"}}, 400, "ttl must be a number"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "ttl": True}}, 400, "ttl must be a number"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "ttl": None}}, 400, "ttl must be a number"),
    ("POST", "/data", {"data": b'{"key": "k", "value": "v", "ttl": NaN}'}, 400, "ttl"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "ttl": 1e300}}, 400, "ttl"),
    ("POST", "/data", {"data": b'{"key": "\\ud800", "value": "v"}'}, 400, "surrogates"),
    ("POST", "/data", {"json": {"key": "k", "value": "v", "extra": 1}}, 400, "unknown field"),
    ("POST", "/data", {"json": {"key": LONG_KEY, "value": "v"}}, 400, "limit is 1024"),
    ("POST", "/data", {"json": {"key": "é" * 513, "value": "v"}}, 400, "1026 bytes"),
    ("GET", f"/data/{LONG_KEY}", {}, 414, "limit is 1024"),
    ("PUT", f"/data/{LONG_KEY}", {"data": b"v"}, 414, "limit is 1024"),
    ("DELETE", f"/data/{LONG_KEY}", {}, 414, "limit is 1024"),
    ("GET", f"/api/get/{LONG_KEY}", {}, 414, "limit is 1024"),
    ("POST", f"/api/post?key={LONG_KEY}&value=v", {}, 414, "limit is 1024"),
    ("POST", "/api/post", {"params": {"key": "k", "value": "v" * 4097}}, 400, "limited to 4096"),
    ("PUT", "/data/k?ttl=abc", {"data": b"v"}, 400, "ttl must be a number"),
    ("PUT", "/data/k?ttl=nan", {"data": b"v"}, 400, "ttl"),
    ("PUT", "/data/k?ttl=inf", {"data": b"v"}, 400, "ttl"),
    ("GET", "/nowhere", {}, 404, "no route"),
    ("GET", "/data/", {}, 404, "no route"),
    ("GET", "/data", {}, 405, "not allowed"),
    ("PATCH", "/data/k", {}, 405, "not allowed"),
    ("HEAD", "/data", {}, 405, None),
    ("POST", "/health", {}, 405, "not allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "fragment"), BAD_REQUESTS)
async def test_bad_requests_get_json_errors(
    stack: Stack, method: str, path: str, kwargs: dict[str, Any], status: int, fragment: str | None
) -> None:
    got, headers, body = await call(method, stack.url + path, **kwargs)
    assert got == status, body
    if method == "HEAD":  # no body, but the same headers
        assert headers["Content-Type"].startswith("application/json")
        return
    doc = json.loads(body)
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(doc["error"], str) and fragment is not None and fragment in doc["error"], doc
    if status == 405:
        assert "GET" in headers["Allow"] or "POST" in headers["Allow"]


async def test_every_get_route_answers_head_without_a_body(stack: Stack) -> None:
    """HEAD is GET without the body (RFC 9110): load balancers health-check with either."""
    assert (await call("PUT", f"{stack.url}/data/head:k", data=b"12345"))[0] == 201
    for path in ["/health", "/metrics", "/openapi.yaml", "/data/head:k", "/api/get/head:k", "/data/head:missing"]:
        got, got_headers, body = await call("GET", stack.url + path)
        status, headers, nothing = await call("HEAD", stack.url + path)
        assert (status, nothing) == (got, b""), path
        assert headers["Content-Type"] == got_headers["Content-Type"], path
        if path != "/metrics":  # its figures move between the two requests
            assert headers["Content-Length"] == str(len(body)), path
    for path, allow in [("/health", "GET,HEAD"), ("/data/head:k", "DELETE,GET,HEAD,PUT"), ("/api/get/head:k", "GET,HEAD")]:
        status, headers, _ = await call("PATCH", stack.url + path)
        assert (status, headers["Allow"]) == (405, allow)


async def test_body_size_limit(stack: Stack) -> None:
    big = "x" * (MAX_BODY + 1)
    status, doc = await call_json("POST", f"{stack.url}/data", json={"key": "big", "value": big})
    assert status == 413 and "body" in doc["error"].lower()
    status, doc = await call_json("PUT", f"{stack.url}/data/big", data=big.encode())
    assert status == 413
    # Just under the limit is fine.
    fits = "x" * (MAX_BODY - 100)
    assert (await call_json("POST", f"{stack.url}/data", json={"key": "big", "value": fits}))[0] == 201
    assert (await call_json("GET", f"{stack.url}/data/big"))[1]["value"] == fits
    assert (await call("GET", f"{stack.url}/health"))[0] == 200  # the connection-level limit did not hurt the shim


async def test_health_metrics_openapi(stack: Stack) -> None:
    assert await call_json("GET", f"{stack.url}/health") == (200, {"status": "ok", "masters": {stack.master: True}})
    await call("POST", f"{stack.url}/data", json={"key": "m", "value": "v"})
    await call("GET", f"{stack.url}/data/m-missing")
    status, headers, body = await call("GET", f"{stack.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'dcache_http_requests_total{method="POST",route="/data",status="201"}' in text
    assert 'dcache_http_requests_total{method="GET",route="/data/{key}",status="404"}' in text
    assert 'dcache_http_request_duration_seconds_bucket{le="+Inf",route="/data"}' in text
    assert 'dcache_http_request_duration_seconds_count{route="/data"}' in text
    status, headers, body = await call("GET", f"{stack.url}/openapi.yaml")
    assert status == 200 and headers["Content-Type"].startswith("application/yaml")
    assert body == (ROOT / "docs" / "openapi.yaml").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_failover_unreachable_and_timeout(stack: Stack) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    # The first master is down: the client fails over to the second.
    shim = start_http(dead, stack.master)
    try:
        assert (await call_json("POST", f"http://{shim.addr}/data", json={"key": "fo", "value": "v"}))[0] == 201
        assert await call_json("GET", f"http://{shim.addr}/data/fo") == (200, {"key": "fo", "value": "v"})
        assert await call_json("GET", f"http://{shim.addr}/health") == (200, {"status": "ok", "masters": {dead: False, stack.master: True}})
    finally:
        assert shim.terminate() == 0, shim.stderr()
    # No master at all: 503.
    shim = start_http(dead, extra=["--timeout", "3"])
    try:
        status, doc = await call_json("GET", f"http://{shim.addr}/data/k")
        assert status == 503 and "reachable" in doc["error"]
        status, doc = await call_json("GET", f"http://{shim.addr}/health")
        assert status == 503 and doc["status"] == "unavailable" and doc["masters"] == {dead: False}
    finally:
        assert shim.terminate() == 0, shim.stderr()
    # A master that accepts TCP connections but never answers: 504 after --timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        shim = start_http(f"127.0.0.1:{silent.getsockname()[1]}", extra=["--timeout", "0.5"])
        try:
            status, doc = await call_json("POST", f"http://{shim.addr}/data", json={"key": "k", "value": "v"})
            assert status == 504 and "in time" in doc["error"]
        finally:
            assert shim.terminate() == 0, shim.stderr()


def test_check_config_and_bad_config() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dcache", "http", "--check-config", "--master", "127.0.0.1:7000, [::1]:7001", "--port", "0"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["master"] == ["127.0.0.1:7000", "[::1]:7001"]
    r = subprocess.run([sys.executable, "-m", "dcache", "http", "--check-config", "--timeout", "0"], capture_output=True, timeout=30)
    assert r.returncode == 2 and b"timeout" in r.stderr


def test_schemathesis_against_live_shim(stack: Stack, tmp_path: Path) -> None:
    """Generated requests (schema-valid and not) never get a 5xx, and every answer matches docs/openapi.yaml."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is not installed: `make test` installs it (pip install -e '.[test]')"
    cmd = [
        st,
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "--no-color",
        "run",
        f"{stack.url}/openapi.yaml",
        "--url",
        stack.url,
        "--checks",
        "all",
        # A schema-valid GET may find bytes another generated PUT stored: a documented 406, not a bug.
        # And the schema bounds keys in characters, the shim in UTF-8 bytes (see schemathesis.toml).
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "50",
        "--seed",
        "20261122",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--output-truncate",
        "true",
    ]
    r = subprocess.run(cmd, capture_output=True, timeout=90, cwd=tmp_path)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out[-8000:] + r.stderr.decode(errors="replace")[-2000:] + "\n--- shim\n" + stack.shim.stderr()
    assert "No issues found" in out, out[-4000:]


def test_sigterm_is_graceful(stack: Stack) -> None:
    shim = start_http(stack.master)
    assert shim.terminate() == 0, shim.stderr()
    assert "shutting down" in shim.stderr()


# -- the lean answer path and read batching ---------------------------------------

JSON_CT = "application/json; charset=utf-8"


async def test_json_answers_are_the_bytes_json_dumps_gives(stack: Stack) -> None:
    """Answers are built from escaped strings, not json.dumps: they must be the same bytes (and a newline, for curl)."""
    for key in ["plain", 'q"uote\\back/sl é ☃ \x01 \u2028 😀 end', "é" * 400]:
        value = 'v "é" \\ \x00 😀'
        path = f"{stack.url}/data/{quote(key, safe='')}"
        answers = [
            (await call("POST", f"{stack.url}/data", json={"key": key, "value": value}), 201, {"key": key, "value": value}),
            (await call("GET", path), 200, {"key": key, "value": value}),
            (await call("GET", f"{stack.url}/api/get/{quote(key, safe='')}"), 200, {"key": key, "value": value}),
            (await call("PUT", path, data=b"12345"), 201, {"key": key, "size": 5}),
            (await call("DELETE", path), 200, {"key": key, "deleted": True}),
            (await call("DELETE", path), 200, {"key": key, "deleted": False}),
            (await call("GET", path), 404, {"error": "not found", "key": key}),
            (await call("POST", f"{stack.url}/api/post", params={"key": key, "value": "lv"}), 201, {"key": key, "value": "lv"}),
        ]
        for (status, headers, body), want_status, want in answers:
            assert (status, headers["Content-Type"], body) == (want_status, JSON_CT, json.dumps(want).encode() + b"\n"), body


def test_unmatched_requests_get_json_errors_too(stack: Stack) -> None:
    """Paths no route pattern can match (a decoded newline, the asterisk form) still answer JSON."""
    host, port = stack.shim.host, stack.shim.port
    for target, method, status in [(b"/data/a%0Ab", b"GET", 404), (b"*", b"OPTIONS", 404), (b"/data/k", b"OPTIONS", 405)]:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), raw
        assert b"content-type: application/json" in head.lower(), raw
        assert "error" in json.loads(body), raw
        if status == 405:
            assert b"Allow: DELETE,GET,HEAD,PUT" in head, raw


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_concurrent_gets_are_batched_and_each_gets_its_own_answer(stack: Stack) -> None:
    keys = [f"batch:{i}" for i in range(40)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=200)) as session:
        for i, key in enumerate(keys):
            async with session.post(f"{stack.url}/data", json={"key": key, "value": f"value {i} ✓"}) as resp:
                assert resp.status == 201
        async with session.put(f"{stack.url}/data/batch:bin", data=b"\xff\x00\xfe") as resp:
            assert resp.status == 201

        async def get(path: str, **kwargs: Any) -> tuple[int, bytes]:
            async with session.get(stack.url + path, **kwargs) as resp:
                return resp.status, await resp.read()

        octets = {"Accept": "application/octet-stream"}
        for _ in range(5):  # bounded: until some of them went out together
            before = (await get("/metrics"))[1].decode()
            answers = await asyncio.gather(
                *(get(f"/data/{k}") for k in keys),
                *(get(f"/api/get/{k}") for k in keys[:10]),
                *(get(f"/data/batch:missing:{i}") for i in range(10)),
                get("/data/batch:bin", headers=octets),
                get("/data/batch:bin"),
                get("/data/batch:7", headers=octets),
            )
            for i, (status, body) in enumerate(answers[:50]):
                key = keys[i % 40]
                assert (status, json.loads(body)) == (200, {"key": key, "value": f"value {keys.index(key)} ✓"})
            for i, (status, body) in enumerate(answers[50:60]):
                assert (status, json.loads(body)) == (404, {"error": "not found", "key": f"batch:missing:{i}"})
            assert answers[60] == (200, b"\xff\x00\xfe")
            assert answers[61][0] == 406 and json.loads(answers[61][1])["key"] == "batch:bin"
            assert answers[62] == (200, "value 7 ✓".encode())
            after = (await get("/metrics"))[1].decode()
            batches = _metric(after, "dcache_http_read_batches_total") - _metric(before, "dcache_http_read_batches_total")
            batched = _metric(after, "dcache_http_read_batch_keys_total") - _metric(before, "dcache_http_read_batch_keys_total")
            assert batched == 63, (batches, batched)
            if batches < batched:
                break
        else:
            raise AssertionError("63 concurrent GETs never shared a batch")


async def test_a_batch_the_cluster_refuses_is_read_key_by_key(stack: Stack) -> None:
    """A key only the cluster refuses (the shim allows longer keys here) fails alone, not its whole batch."""
    shim = start_http(stack.master, extra=["--max-key-bytes", "4096"])
    try:
        url = f"http://{shim.addr}"
        long_key = "L" * 2000
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=100)) as session:
            async with session.post(f"{url}/data", json={"key": "refuse:ok", "value": "fine"}) as resp:
                assert resp.status == 201

            async def get(key: str) -> tuple[int, Any]:
                async with session.get(f"{url}/data/{key}") as resp:
                    return resp.status, json.loads(await resp.read())

            for _ in range(40):  # bounded: until the long key shared a batch at least once (under load it may take many rounds)
                answers = await asyncio.gather(*(get("refuse:ok") for _ in range(20)), get(long_key), *(get("refuse:no") for _ in range(5)))
                assert answers[:20] == [(200, {"key": "refuse:ok", "value": "fine"})] * 20
                status, doc = answers[20]
                assert status == 400 and "key" in doc["error"].lower(), doc
                assert answers[21:] == [(404, {"error": "not found", "key": "refuse:no"})] * 5
                async with session.get(f"{url}/metrics") as resp:
                    if _metric((await resp.read()).decode(), "dcache_http_read_batch_fallbacks_total") >= 1:
                        break
            else:
                raise AssertionError("the long key never went out in a batch")
    finally:
        assert shim.terminate() == 0, shim.stderr()


async def test_read_batch_1_sends_one_get_per_request(stack: Stack) -> None:
    shim = start_http(stack.master, extra=["--read-batch", "1"])
    try:
        url = f"http://{shim.addr}"
        assert (await call_json("POST", f"{url}/data", json={"key": "nobatch", "value": "v"}))[0] == 201
        answers = await asyncio.gather(*(call_json("GET", f"{url}/data/nobatch") for _ in range(10)))
        assert answers == [(200, {"key": "nobatch", "value": "v"})] * 10
        text = (await call("GET", f"{url}/metrics"))[2].decode()
        assert _metric(text, "dcache_http_read_batches_total") == 0
    finally:
        assert shim.terminate() == 0, shim.stderr()


async def test_concurrent_writes_are_batched_and_each_gets_its_own_answer(stack: Stack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=200)) as session:

        async def send(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
            async with session.request(method, stack.url + path, **kwargs) as resp:
                return resp.status, json.loads(await resp.read())

        for attempt in range(5):  # bounded: until some of them went out together
            before = (await call("GET", f"{stack.url}/metrics"))[2].decode()
            answers = await asyncio.gather(
                *(send("POST", "/data", json={"key": f"wb:{attempt}:{i}", "value": f"value {i} ✓"}) for i in range(30)),
                *(send("POST", "/data", json={"key": f"wb:ttl:{attempt}:{i}", "value": "t", "ttl": 60}) for i in range(5)),
                *(send("PUT", f"/data/wb:put:{attempt}:{i}", data=b"\xff" * i) for i in range(1, 6)),
                *(send("POST", "/api/post", params={"key": f"wb:legacy:{attempt}:{i}", "value": "lv"}) for i in range(3)),
                send("POST", "/data", json={"key": "", "value": "refused by the shim"}),
            )
            assert answers[:30] == [(201, {"key": f"wb:{attempt}:{i}", "value": f"value {i} ✓"}) for i in range(30)]
            assert answers[30:35] == [(201, {"key": f"wb:ttl:{attempt}:{i}", "value": "t"}) for i in range(5)]
            assert answers[35:40] == [(201, {"key": f"wb:put:{attempt}:{i}", "size": i}) for i in range(1, 6)]
            assert answers[40:43] == [(201, {"key": f"wb:legacy:{attempt}:{i}", "value": "lv"}) for i in range(3)]
            assert answers[43][0] == 400
            # Every write is stored, with its own value and TTL.
            reads = await asyncio.gather(*(send("GET", f"/data/wb:{attempt}:{i}") for i in range(30)))
            assert reads == [(200, {"key": f"wb:{attempt}:{i}", "value": f"value {i} ✓"}) for i in range(30)]
            for i in range(1, 6):
                status, _, body = await call(
                    "GET", f"{stack.url}/data/wb:put:{attempt}:{i}", headers={"Accept": "application/octet-stream"}
                )
                assert (status, body) == (200, b"\xff" * i)
            async with Client(stack.master) as client:
                ttl = await client.ttl(f"wb:ttl:{attempt}:0")
                assert ttl is not None and 0 < ttl <= 60
                assert await client.ttl(f"wb:{attempt}:0") == -1.0
            after = (await call("GET", f"{stack.url}/metrics"))[2].decode()
            batches = _metric(after, "dcache_http_write_batches_total") - _metric(before, "dcache_http_write_batches_total")
            batched = _metric(after, "dcache_http_write_batch_keys_total") - _metric(before, "dcache_http_write_batch_keys_total")
            assert batched == 43, (batches, batched)
            if batches < batched:
                break
        else:
            raise AssertionError("43 concurrent writes never shared a batch")


async def test_a_write_batch_the_cluster_refuses_is_written_key_by_key(stack: Stack) -> None:
    """A key only the cluster refuses (the shim allows longer keys here) fails alone, not its whole batch."""
    shim = start_http(stack.master, extra=["--max-key-bytes", "4096"])
    try:
        url = f"http://{shim.addr}"
        long_key = "L" * 2000
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=100)) as session:

            async def post(key: str, value: str) -> tuple[int, Any]:
                async with session.post(f"{url}/data", json={"key": key, "value": value}) as resp:
                    return resp.status, json.loads(await resp.read())

            for attempt in range(5):  # bounded: until the long key shared a batch at least once
                answers = await asyncio.gather(*(post(f"wr:{i}", f"{attempt}") for i in range(20)), post(long_key, "x"))
                assert answers[:20] == [(201, {"key": f"wr:{i}", "value": f"{attempt}"}) for i in range(20)]
                status, doc = answers[20]
                assert status == 400 and "key" in doc["error"].lower(), doc
                async with Client(stack.master) as client:
                    assert await client.mget([f"wr:{i}" for i in range(20)]) == [f"{attempt}".encode()] * 20
                async with session.get(f"{url}/metrics") as resp:
                    if _metric((await resp.read()).decode(), "dcache_http_write_batch_fallbacks_total") >= 1:
                        break
            else:
                raise AssertionError("the long key never went out in a batch")
    finally:
        assert shim.terminate() == 0, shim.stderr()


async def test_write_batch_1_sends_one_set_per_request(stack: Stack) -> None:
    shim = start_http(stack.master, extra=["--write-batch", "1"])
    try:
        url = f"http://{shim.addr}"
        answers = await asyncio.gather(*(call_json("POST", f"{url}/data", json={"key": f"nwb:{i}", "value": "v"}) for i in range(10)))
        assert answers == [(201, {"key": f"nwb:{i}", "value": "v"}) for i in range(10)]
        assert (await call_json("GET", f"{url}/data/nwb:3")) == (200, {"key": "nwb:3", "value": "v"})
        text = (await call("GET", f"{url}/metrics"))[2].decode()
        assert _metric(text, "dcache_http_write_batches_total") == 0
    finally:
        assert shim.terminate() == 0, shim.stderr()
