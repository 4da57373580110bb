"""A newcomer's first hour (issue 15): the real ``dcache`` console script, its messages and its exit codes.

Every test runs the installed ``dcache`` script in a subprocess and checks
that what it prints is a message, never a traceback, with the exit code the
docs promise (``dcache.cli``: 0 ok, 1 missing, 2 usage/configuration,
3 unreachable, 4 server error).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dcache.config import AuxConfig, parse_size

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
        (("cluster", "--port", "{port}", "--data-dir", "{tmp}"), "--port"),
        (("cluster", "--port", "{free}", "--aux-port", "{port}", "--data-dir", "{tmp}"), "--aux-port"),
    ],
)
def test_port_in_use_is_one_line_naming_port_and_flag(taken_port, tmp_path, args, flag):
    free = _free_port_block(8) if "{free}" in args else 0
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


def _free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 free right now (for a cluster whose --aux-port is the taken one)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base: int = sock.getsockname()[1]
        if base + n < 65536 and all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
