"""A newcomer's first hour (issue 15): the real ``dcache`` console script, its messages and its exit codes.

Every test runs the installed ``dcache`` script in a subprocess and checks
that what it prints is a message, never a traceback, with the exit code the
docs promise (``dcache.cli``: 0 ok, 1 missing, 2 usage/configuration,
3 unreachable, 4 server error).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dcache import Client
from dcache.config import AuxConfig, parse_size
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, free_port_block, read_until_ready, reap, start_http, unavailable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: The console script pip installed next to this interpreter (not ``python -m dcache``).
DCACHE = str(Path(sys.executable).with_name("dcache"))


def dcache(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DCACHE, *args], capture_output=True, text=True, timeout=timeout, **kw)


def assert_fails(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """``r`` exited ``code`` with one line on stderr, no traceback, and every needle in that line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- 3, 4, 5, 6: configuration, flags and help --------------------------------------------------


@pytest.mark.parametrize(
    "text,needle",
    [
        ('max_memory = "lots"\n', "'max_memory' is outside a table"),
        ("bogus_key = 1\n", "'bogus_key' is outside a table"),
        ("[aux]\nbogus_key = 1\n", "[aux] has unknown key 'bogus_key'"),
        ("[auxx]\nport = 1\n", "unknown table [auxx]"),
        ("[master]\nmax_memory = 1\n", "[master] has unknown key 'max_memory'"),
        ('[aux]\nmax_memory = "lots"\n', "not a size: 'lots'"),
    ],
)
def test_config_file_mistakes_are_refused_naming_file_and_key(tmp_path, text, needle):
    f = tmp_path / "dcache.toml"
    f.write_text(text)
    assert_fails(dcache("aux", "--config", str(f), "--check-config"), 2, needle, str(f))


@pytest.mark.parametrize(
    "args,needle",
    [
        (("aux", "--max-memory", "12XB"), "argument --max-memory: not a size: '12XB'"),
        (("http", "--master", "garbage"), "argument --master: not a host:port address: 'garbage'"),
        (("master", "--port", "x"), "argument --port: not an integer: 'x'"),
        (("master", "--replicas", "2.5"), "argument --replicas: not an integer: '2.5'"),
        (("aux", "--snapshot-interval", "soon"), "argument --snapshot-interval: not a number: 'soon'"),
        (("aux", "--insecure", "maybe"), "argument --insecure: not a boolean: 'maybe'"),
        (("cluster", "--max-memory", "lots"), "max_memory: not a size: 'lots'"),
    ],
)
def test_bad_flag_values_say_what_is_wrong(args, needle):
    line = assert_fails(dcache(*args), 2, needle)
    assert not re.search(r"invalid \w+ value", line), line  # argparse naming a Python function


def test_sizes_have_one_convention():
    """MB is 1000**2, MiB 1024**2; the default, --help, dcache cluster and the deployment files all say 256MiB."""
    r = dcache("aux", "--check-config")
    assert r.returncode == 0, r.stderr
    assert '"max_memory": 268435456' in r.stdout
    r = dcache("aux", "--check-config", "--max-memory", "256MiB")
    assert '"max_memory": 268435456' in r.stdout
    r = dcache("aux", "--check-config", "--max-memory", "256MB")
    assert '"max_memory": 256000000' in r.stdout
    help_text = " ".join(dcache("aux", "--help").stdout.split())
    assert "(default: 256MiB; env DCACHE_MAX_MEMORY)" in help_text
    assert "KiB, MiB, GiB (powers of 1024)" in help_text
    assert "(default: 256MiB)" in " ".join(dcache("cluster", "--help").stdout.split())
    default = AuxConfig().max_memory
    deployed = []
    for path in [*sorted((REPO / "docker").glob("docker-compose*.yml")), REPO / "k8s" / "configmap.yaml"]:
        deployed += re.findall(r"(?:--max-memory |DCACHE_MAX_MEMORY: )(\S+)", path.read_text())
    assert deployed and all(parse_size(v) == default for v in deployed), deployed


@pytest.mark.parametrize("role", ["aux", "master", "http", "cluster", "get", "dump", "bench"])
def test_help_shows_each_default_once_and_readably(role):
    r = dcache(role, "--help")
    assert r.returncode == 0
    for option in re.split(r"\n  (?=-)", r.stdout):  # one entry per option
        assert option.count("(default:") <= 1, option
    text = " ".join(r.stdout.split())
    for garbled in ("(default: ''", "(default: ()", "(default: ('", "(default: None", "(default: False", "(default: True"):
        assert garbled not in text, garbled


# -- 1, 2: a port in use, a data folder that cannot be one ----------------------------------------


@pytest.fixture
def taken_port():
    """A port some other process (here: this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "args,flag",
    [
        (("master", "--port", "{port}"), "--port"),
        (("aux", "--port", "{port}"), "--port"),
        (("http", "--port", "{port}"), "--port"),
        (("master", "--port", "0", "--metrics-port", "{port}"), "--metrics-port"),
        (("master", "--port", "0", "--resp-port", "{port}"), "--resp-port"),
        (("aux", "--port", "0", "--resp-port", "{port}"), "--resp-port"),
        (("cluster", "--port", "{port}", "--data-dir", "{tmp}"), "--port"),
        (("cluster", "--port", "{free}", "--aux-port", "{port}", "--data-dir", "{tmp}"), "--aux-port"),
    ],
)
def test_port_in_use_is_one_line_naming_port_and_flag(taken_port, tmp_path, args, flag):
    free = free_port_block(8) if "{free}" in args else 0
    argv = [a.format(port=taken_port, tmp=tmp_path / "data", free=free) for a in args]
    line = assert_fails(dcache(*argv, timeout=30), 2, f"127.0.0.1:{taken_port}", "already in use", flag)
    assert "(exit code None)" not in line


@pytest.mark.parametrize("role", ["aux", "cluster"])
@pytest.mark.parametrize("make", ["file", "under_file", "uncreatable"])
def test_unusable_data_dir_is_one_line(tmp_path, role, make):
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    data_dir = {"file": f, "under_file": f / "sub", "uncreatable": Path("/proc/dcache-no/such")}[make]
    r = dcache(role, "--port", "0", "--data-dir", str(data_dir), timeout=30)
    assert_fails(r, 2, "data_dir", str(data_dir))


@pytest.mark.parametrize(
    "ports,flags",
    [
        (("--resp-port", "{p1}"), ("--port", "--resp-port")),  # m2 listens on p+1, m1's RESP too
        (("--aux-port", "{p1}"), ("--port", "--aux-port")),
        (("--aux-port", "{p2}", "--http-port", "{p3}"), ("--aux-port", "--http-port")),  # a2 on p+3
    ],
)
def test_a_cluster_whose_ports_overlap_is_one_line(tmp_path, ports, flags):
    """Each port was checked free on its own; the second process on a shared one failed later, half started."""
    p = free_port_block(8)
    argv = [a.format(p1=p + 1, p2=p + 2, p3=p + 3) for a in ports]
    r = dcache("cluster", "--port", str(p), *argv, "--data-dir", str(tmp_path / "data"), timeout=30)
    line = assert_fails(r, 2, "dcache cluster: configuration error: ", *flags)
    assert "READY" not in r.stdout and "did not start" not in line, line


# -- 7, 8, 9: tools pointed at the wrong thing, bad input, one style of error ----------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One master, two aux nodes keeping two copies of each key, and the HTTP shim."""
    c = Cluster(tmp_path_factory.mktemp("newcomer"), replicas=2)
    c.start_master("m1")
    c.start_aux("a1")
    c.start_aux("a2")
    asyncio.run(wait_ring(c.coordinator.addr, settled({"a1", "a2"})))
    http = start_http(c.coordinator.addr)
    yield c, http
    http.kill()
    c.stop()


@pytest.fixture(scope="module")
def resp_port():
    """A server that answers whatever it gets with a RESP error, as Redis does."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"-ERR unknown command\r\n")
                conn.recv(1024)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join(5)
    sock.close()


def test_tool_at_the_http_port_says_so(cluster):
    _, http = cluster
    line = assert_fails(dcache("get", "foo", "--addr", http.addr, "--timeout", "5"), 3, "answered in HTTP", "HTTP shim", "7000")
    assert "1213486160" not in line


def test_tool_at_a_resp_port_says_so(resp_port):
    assert_fails(dcache("get", "foo", "--addr", f"127.0.0.1:{resp_port}", "--timeout", "5"), 3, "answered in RESP", "Redis")


@pytest.mark.parametrize("command", [("ring",), ("dump", "--out", "{tmp}/x.dump")])
def test_master_only_tools_at_an_aux_node_say_so(cluster, tmp_path, command):
    c, _ = cluster
    argv = [a.format(tmp=tmp_path) for a in command]
    line = assert_fails(dcache(*argv, "--addr", c.aux["a1"].addr), 2, "is an aux node (a1)", "needs a master", "--addr")
    assert "UnknownOp" not in line and "unknown op" not in line


@pytest.mark.parametrize(
    "args,needle",
    [
        (("set", "k", "v", "--ttl", "-5"), "ttl must be > 0"),
        (("set", "k", "v", "--ttl", "nan"), "ttl must be > 0"),
        (("get", "k" * 2000), "key of 2000 bytes exceeds the limit of 1024"),
        (("set", "big", "-"), "value of 9000000 bytes exceeds the limit"),  # the value from stdin
    ],
)
def test_bad_input_is_a_usage_error_not_a_server_error(cluster, args, needle):
    c, _ = cluster
    line = assert_fails(dcache(*args, "--addr", c.coordinator.addr, input="v" * 9_000_000), 2, needle)
    assert "server error" not in line and "BadArguments" not in line


@pytest.mark.parametrize(
    "addr,needle",
    [("127.0.0.1:1", "connection refused (nothing listens there)"), ("no-such-host.invalid:7000", "unknown host name")],
)
def test_unreachable_is_one_line_with_what_to_do(addr, needle):
    line = assert_fails(
        dcache("get", "k", "--addr", addr, "--timeout", "3"), 3, f"dcache get: cannot reach a dcache server at {addr}", needle
    )
    assert "--addr" in line and "Error(" not in line


@pytest.mark.parametrize("command", [("get", "k"), ("stats",), ("dump", "--out", "x.dump"), ("restore", "--in", "x.dump")])
@pytest.mark.parametrize(("addr", "needle"), [("bad", "'bad'"), ("127.0.0.1:99999", "out of range"), ("", "at least one")])
def test_a_malformed_addr_names_the_flag(command, addr, needle):
    assert_fails(dcache(*command, "--addr", addr), 2, f"dcache {command[0]}: --addr: ", needle)


def test_a_server_that_never_answers_is_a_timeout_with_what_to_do():
    """A hung process, or a port that accepts and says nothing: the reason was empty ('... at HOST:PORT: ')."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts; nobody ever answers
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        line = assert_fails(dcache("get", "k", "--addr", addr, "--timeout", "0.5"), 3, f"cannot reach a dcache server at {addr}: ")
    assert "no answer within 0.5 s (--timeout)" in line and "--addr" in line, line


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (("--addr", "bad"), 2, "dcache bench: --addr: not a host:port address: 'bad'"),
        (("--duration", "nan"), 2, "--duration > 0"),
        (("--ratio", "2"), 2, "--ratio in [0, 1]"),
        (("--addr", "127.0.0.1:1"), 3, "dcache bench: cannot reach a dcache server at 127.0.0.1:1: connection refused"),
    ],
)
def test_bench_mistakes_are_usage_errors_or_unreachable_in_the_tools_words(args, code, needle):
    """bench said '[Errno 111] Connect call failed' and exited 3 (unreachable) for a bad flag too."""
    assert_fails(dcache("bench", "--duration", "1", "--quiet", *args), code, needle)


def test_errors_share_one_style(cluster, tmp_path):
    """'dcache COMMAND: what failed: why; what to do' - no 'error:' prefix, no temp file names, no exception reprs."""
    c, _ = cluster
    lines = [
        assert_fails(dcache("dump", "--addr", c.coordinator.addr, "--out", str(tmp_path / "missing" / "x.dump")), 2, "does not exist"),
        assert_fails(dcache("restore", "--addr", c.coordinator.addr, "--in", str(tmp_path / "none.dump")), 2, "none.dump"),
        assert_fails(dcache("aux", "--max-memory", "0"), 2, "max_memory"),
        assert_fails(dcache("stats", "--addr", "127.0.0.1:1", "--timeout", "2"), 3),
    ]
    for line in lines:
        assert re.match(r"dcache (dump|restore|aux|stats): ", line), line
        assert not line.startswith("error:") and ".tmp." not in line and "Error(" not in line, line


# -- 10: the HTTP shim with no master; 13: curl's prompt ------------------------------------------


def test_http_shim_warns_when_no_master_answers_and_keeps_trying():
    port = free_port_block(1)
    shim = start_http(f"127.0.0.1:{port}", "no-such-host.invalid:7000")
    master = None
    try:
        deadline = time.monotonic() + 10
        while not any("no master answers" in line for line in shim.stderr_lines):
            assert time.monotonic() < deadline, shim.stderr()
            time.sleep(0.05)
        warnings = [line for line in shim.stderr_lines if "WARNING" in line]
        assert any(f"master 127.0.0.1:{port} does not answer" in w and "ConnectionRefused" in w for w in warnings), warnings
        assert any("master no-such-host.invalid:7000 does not answer" in w for w in warnings), warnings
        assert "Traceback" not in shim.stderr()
        assert _http_get(shim.addr, "/health")[0] == 503
        master = DaemonProcess("master", ["--port", str(port), "--log-level", "warning"]).start()
        deadline = time.monotonic() + 15  # the shim's clients reconnect with backoff (at most 2 s apart)
        while _http_get(shim.addr, "/health")[0] != 200:
            assert time.monotonic() < deadline, shim.stderr()
            time.sleep(0.2)
    finally:
        shim.kill()
        if master is not None:
            master.kill()


def test_http_shim_pointed_at_an_aux_node_refuses_to_start(cluster):
    """Through an aux node the shim would write around the ring: 201 Created, and a miss through every master."""
    c, _ = cluster
    aux = c.aux["a1"].addr
    r = dcache("http", "--port", "0", "--master", f"{c.coordinator.addr},{aux}", timeout=30)
    line = assert_fails(r, 2, "dcache http: configuration error: master: ", aux, "aux node", "--master")
    assert "READY" not in r.stdout, line


def test_json_answers_end_with_a_newline(cluster):
    _, http = cluster
    req = urllib.request.Request(f"http://{http.addr}/data", data=b'{"key": "nl", "value": "v"}', method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201 and resp.read() == b'{"key": "nl", "value": "v"}\n'
    for path, status in (("/data/nl", 200), ("/data/absent", 404), ("/health", 200), ("/no/route", 404)):
        got, body = _http_get(http.addr, path)
        assert got == status and body.endswith(b"}\n") and body.count(b"\n") == 1, (path, body)
    req = urllib.request.Request(f"http://{http.addr}/data/nl", headers={"Accept": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.read() == b"v"  # raw bytes: nothing added


def _http_get(addr: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- 11: a second `make run` (dcache cluster on the same data) is quick and quiet -----------------


def _run_cluster_until_ready(data: Path) -> tuple[list[str], float]:
    """Start ``dcache cluster`` on free ports over ``data``, stop it with Ctrl-C; its stderr lines and seconds to READY."""
    argv = [DCACHE, "cluster", "--port", "0", "--masters", "1", "--aux", "3", "--replicas", "2", "--data-dir", str(data)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until_ready(proc)
        took = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        reap(proc)
    return err.decode(errors="replace").splitlines(), took


def test_second_cluster_run_on_the_same_data_is_quick_and_quiet(tmp_path):
    first, _ = _run_cluster_until_ready(tmp_path / "data")
    assert not [line for line in first if " WARNING " in line], first
    second, _ = _run_cluster_until_ready(tmp_path / "data")
    assert not [line for line in second if " WARNING " in line or "Traceback" in line], second
    gathering = [line for line in second if "gathering their re-announcements" in line]
    rebuilt = [line for line in second if "ring rebuilt from the re-announcements of a1, a2, a3" in line]
    assert gathering and rebuilt, second
    # The coordinator's recovery window is 4 s; the expected nodes end it as soon as all three are back.
    took = _log_time(rebuilt[0]) - _log_time(gathering[0])
    assert took < 3.0, (took, second)


def _log_time(line: str) -> float:
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


# -- 12: dcache stats, documented, client-visible counts apart from internal ones -----------------


def _stats(addr: str) -> dict[str, Any]:
    r = dcache("stats", "--addr", addr, "--json")
    assert r.returncode == 0, r.stderr
    stats: dict[str, Any] = json.loads(r.stdout)
    return stats


def test_master_stats_separate_what_clients_saw_from_aux_totals(cluster):
    c, _ = cluster
    master = c.coordinator.addr
    before = _stats(master)
    assert dcache("set", "stats:one", "1", "--addr", master).returncode == 0
    assert dcache("get", "stats:one", "--addr", master).returncode == 0
    assert dcache("get", "stats:absent", "--addr", master).returncode == 1
    after = _stats(master)
    delta = {k: after[k] - before[k] for k in ("hits", "misses", "aux_items", "aux_hits", "aux_misses")}
    # One key, two copies; one client miss is two aux misses (first owner, then the replica).
    assert delta == {"hits": 1, "misses": 1, "aux_items": 2, "aux_hits": 1, "aux_misses": 2}, delta
    text = dcache("stats", "--addr", master).stdout
    own, _, totals = text.partition("# totals over the aux nodes")
    assert re.search(r"^hits +\d+$", own, re.M) and re.search(r"^aux_misses +\d+$", totals, re.M), text


def test_every_stats_field_is_documented(cluster):
    c, _ = cluster
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    section = doc[doc.index("### `dcache stats`") :]
    section = section[: section.index("\n## ")]
    for addr in (c.coordinator.addr, c.aux["a1"].addr):
        for field in _stats(addr):
            assert f"`{field}`" in section, field


# -- 17: dump/restore progress on a terminal only; get --json -------------------------------------


def _with_tty_stderr(argv: list[str], timeout: float = 60) -> tuple[int, str, str]:
    """Run ``argv`` with stderr on a pseudo-terminal (as in a shell); its exit code, stdout and what the terminal showed."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
        reader.join(5)
        os.close(master)
    return proc.returncode, out.decode(), b"".join(shown).decode(errors="replace")


def test_dump_never_replaces_a_pipe_or_device_and_writes_through_a_symlink(cluster, tmp_path):
    """dump replaces its --out atomically: --out /dev/null replaced the device node with a file (as root)."""
    c, _ = cluster
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # stands for /dev/null, /dev/stdout on a terminal or a pipe: not a regular file
    assert_fails(dcache("dump", "--addr", c.coordinator.addr, "--out", str(pipe)), 2, f"cannot write {pipe}: it is a FIFO")
    assert pipe.is_fifo()
    target, link = tmp_path / "real.dump", tmp_path / "link.dump"
    target.write_bytes(b"old")
    link.symlink_to(target)
    r = dcache("dump", "--addr", c.coordinator.addr, "--out", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and target.read_bytes().startswith(b"DCSNAP")


def test_dump_and_restore_draw_progress_on_a_terminal_only(cluster, tmp_path):
    c, _ = cluster
    master = c.coordinator.addr

    async def fill() -> None:
        async with Client(master) as client:
            await client.mset({f"progress:{i}": b"v" * 50 for i in range(3000)})

    asyncio.run(fill())
    dump = str(tmp_path / "cluster.dump")
    code, out, shown = _with_tty_stderr([DCACHE, "dump", "--addr", master, "--out", dump])
    assert code == 0 and "keys: " in out, (out, shown)
    assert "\r" in shown and re.search(r"dump \[#{30}\] 100\.0%  (\d+)/\1 keys", shown), shown
    r = dcache("dump", "--addr", master, "--out", dump)  # not a terminal: no bar, nothing on stderr
    assert r.returncode == 0 and r.stderr == "", r.stderr
    code, out, shown = _with_tty_stderr([DCACHE, "restore", "--addr", master, "--in", dump])
    assert code == 0 and "applied: " in out
    assert re.search(r"restore \[#{30}\] 100\.0%  (\d+)/\1 keys", shown), shown
    r = dcache("restore", "--addr", master, "--in", dump)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_get_json(cluster):
    c, _ = cluster
    addr = c.coordinator.addr
    assert dcache("set", "json:text", "hé", "--addr", addr).returncode == 0
    r = dcache("get", "json:text", "--json", "--addr", addr)
    assert r.returncode == 0 and json.loads(r.stdout) == {"key": "json:text", "value": "hé"}
    assert subprocess.run([DCACHE, "set", "json:bin", "-", "--addr", addr], input=b"\xff\x00", capture_output=True).returncode == 0
    r = dcache("get", "json:bin", "--json", "--addr", addr)
    assert r.returncode == 0 and json.loads(r.stdout) == {"key": "json:bin", "value_base64": base64.b64encode(b"\xff\x00").decode()}
    r = dcache("get", "json:absent", "--json", "--addr", addr)
    assert r.returncode == 1 and json.loads(r.stdout) == {"key": "json:absent", "value": None} and "Traceback" not in r.stderr


# -- 14, 15, 16: the wheel a user installs: its name, its dependencies, LICENSE, --version ---------

CLIENT_SCRIPT = """
import asyncio, importlib.util, sys
import dcache

async def main(addr):
    async with dcache.Client(addr, timeout=10) as cache:
        assert await cache.set("wheel:k", b"from a client-only install", ttl=60)
        assert await cache.get("wheel:k") == b"from a client-only install"
        assert await cache.mget(["wheel:k", "wheel:absent"]) == [b"from a client-only install", None]
    with dcache.SyncClient(addr) as cache:
        assert cache.get("wheel:k") == b"from a client-only install"

asyncio.run(main(sys.argv[1]))
server = ("uvloop", "xxhash", "aiohttp", "prometheus_client", "kazoo", "hiredis")
assert not [m for m in server if importlib.util.find_spec(m) is not None], "a server dependency is installed"
print("client ok")
"""


def test_wheel_installs_the_client_alone_into_a_clean_venv(cluster, tmp_path):
    """pip install the built wheel with no extras: msgpack only, dcache.Client works, the daemons say what is missing."""
    c, _ = cluster
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dcache", src / "dcache", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], 300)  # as a user would
    if build.returncode != 0 and "setuptools" in build.stderr and "No matching distribution" in build.stderr:
        unavailable("setuptools from the package index (the build backend)", build.stderr.strip().splitlines()[-1])
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("*.whl")
    assert wheel.name.startswith("dcache_cluster-"), wheel.name  # the distribution name (dcache on PyPI is another project)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(".dist-info/" in n and n.endswith("/LICENSE") for n in names), names
    assert "Name: dcache-cluster" in meta and "License: MIT" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: msgpack>=1.0.7"], requires
    assert any("uvloop" in r and 'extra == "server"' in r for r in requires), requires

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], 120).returncode == 0
    py, script = str(venv / "bin" / "python"), str(venv / "bin" / "dcache")
    install = _run([py, "-m", "pip", "install", "-q", str(wheel)], 300)
    if install.returncode != 0:
        unavailable("msgpack from the package index", install.stderr.strip().splitlines()[-1] if install.stderr.strip() else "pip failed")
    listed = _run([py, "-m", "pip", "list", "--format=freeze"], 60).stdout.lower()
    installed = {line.split("==")[0] for line in listed.split()}
    assert installed - {"pip", "setuptools", "wheel"} == {"dcache-cluster", "msgpack"}, installed

    r = _run([py, "-c", CLIENT_SCRIPT, c.coordinator.addr], 60, cwd=tmp_path)  # not REPO: import the installed copy
    assert r.returncode == 0 and "client ok" in r.stdout, r.stderr
    r = _run([script, "get", "wheel:k", "--addr", c.coordinator.addr], 60)
    assert r.returncode == 0 and r.stdout == "from a client-only install\n", r.stderr
    version = _run([script, "--version"], 60)
    assert version.returncode == 0 and version.stdout.strip() == f"dcache {_metadata_version(meta)}"
    for role in ("aux", "master", "http", "cluster", "dump"):
        r = _run([script, role, *(["--out", "x"] if role == "dump" else [])], 60)
        assert_fails(r, 2, f"dcache {role}: needs the server extra", "pip install 'dcache-cluster[server]'")


def _run(argv: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _metadata_version(meta: str) -> str:
    return next(line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Version: "))
