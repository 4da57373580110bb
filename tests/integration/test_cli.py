"""The ``dcache`` tools against a real aux node: output and exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import start_aux

pytestmark = pytest.mark.slow


def dcache(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dcache", *args], input=stdin, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def node():
    n = start_aux(None, node_id="cli-aux")
    yield n
    n.kill()


def test_set_get_del_exit_codes(node):
    a = ["--addr", node.addr]
    r = dcache("set", *a, "greeting", "hello wörld")
    assert r.returncode == 0 and r.stdout == b"OK\n"
    r = dcache("get", *a, "greeting")
    assert r.returncode == 0 and r.stdout == "hello wörld\n".encode()
    r = dcache("get", *a, "nope")
    assert r.returncode == 1 and r.stdout == b""
    r = dcache("set", *a, "greeting", "again", "--nx")
    assert r.returncode == 1
    r = dcache("del", *a, "greeting", "nope")
    assert r.returncode == 0 and r.stdout == b"1\n"
    r = dcache("del", *a, "greeting")
    assert r.returncode == 1 and r.stdout == b"0\n"


def test_set_from_stdin_binary(node):
    payload = bytes(range(256))
    assert dcache("set", "--addr", node.addr, "bin", "-", stdin=payload).returncode == 0
    r = dcache("get", "--addr", node.addr, "bin")
    assert r.stdout == payload + b"\n"


def test_stats_json(node):
    r = dcache("stats", "--addr", node.addr, "--json")
    assert r.returncode == 0
    stats = json.loads(r.stdout)
    assert stats["node_id"] == "cli-aux" and stats["role"] == "aux"


def test_unreachable_and_server_error_exit_codes(node):
    r = dcache("get", "--addr", "127.0.0.1:1", "--timeout", "2", "k")
    assert r.returncode == 3 and b"cannot reach" in r.stderr
    r = dcache("get", "--addr", node.addr, "k" * 2000)  # the caller's input: a usage error, though the server found it
    assert r.returncode == 2 and b"key of 2000 bytes exceeds the limit of 1024" in r.stderr


def test_bad_config_exit_code_and_check_config():
    r = dcache("aux", "--max-memory", "0")
    assert r.returncode == 2 and b"max_memory" in r.stderr
    r = dcache("aux", "--check-config", "--max-memory", "64MB", "--auth-token", "hush")
    assert r.returncode == 0
    shown = json.loads(r.stdout)
    assert shown["max_memory"] == 64_000_000 and shown["auth_token"] == "<redacted>"


def test_bench_short_run(node):
    r = dcache(
        "bench",
        "--addr",
        node.addr,
        "--conns",
        "4",
        "--depth",
        "8",
        "--duration",
        "1",
        "--procs",
        "1",
        "--keys",
        "500",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["errors"] == 0 and result["ops"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0


def test_bench_open_loop_keeps_its_rate(node):
    r = dcache(
        "bench",
        "--addr",
        node.addr,
        "--rate",
        "2000",
        "--conns",
        "4",
        "--duration",
        "2",
        "--procs",
        "1",
        "--keys",
        "500",
        "--distribution",
        "zipf:1.1",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mode"] == "rate" and result["target_rate"] == 2000
    assert result["errors"] == 0 and result["unanswered"] == 0 and result["ops"] == 4000
    assert abs(result["achieved_rate"] - 2000) <= 100 and result["schedule_kept"]
    lat = [result[f"{p}_ms"] for p in ("p50", "p90", "p99", "p999", "max")]
    assert 0 < lat[0] and lat == sorted(lat)
    lag = [result[f"send_lag_{p}_ms"] for p in ("p50", "p90", "p99", "p999", "max")]
    assert lag == sorted(lag) and lag[-1] <= lat[-1]
    assert 0 < result["generator_cpu"] < 1.5


def test_help_lists_every_flag():
    r = dcache("aux", "--help")
    for flag in ("--host", "--port", "--node-id", "--data-dir", "--max-memory", "--auth-token", "--snapshot-interval"):
        assert flag.encode() in r.stdout
