"""Real nginx for tests: find (or install) it, render nginx-stream.conf, run it in the foreground.

``find_nginx()`` returns the nginx binary, installing ``nginx`` and
``libnginx-mod-stream`` with apt-get when it is missing and we are root. When
it still cannot be had the test fails under CI (``CI`` set) and is skipped
elsewhere.

``render_config()`` turns the repo's ``nginx-stream.conf`` into a runnable
config for a test: its ``# @...`` marker lines (see the file's header) get the
test's masters, shims and listen ports; the file's relative paths (pid, logs,
temp directories) land in the prefix directory that ``NginxProcess`` passes
with ``-p``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness import apt_install, stop_process, unavailable

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "nginx-stream.conf"

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_APT_PACKAGES = ("nginx", "libnginx-mod-stream")
_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/etc/nginx/modules", "/usr/local/nginx/modules")
_MODULE = "ngx_stream_module.so"


# -- finding / installing ------------------------------------------------------


def _which_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _build_flags(nginx: str) -> str:
    """``nginx -V`` output (it prints to stderr)."""
    res = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
    return res.stderr + res.stdout


def stream_module_path(nginx: str) -> str | None:
    """Path of the dynamic stream module to ``load_module``; ``None`` if stream is built in.

    Raises ``LookupError`` if this nginx has no stream module at all.
    """
    flags = _build_flags(nginx)
    if re.search(r"--with-stream(\s|$)", flags):
        return None
    for d in _MODULE_DIRS:
        path = Path(d) / _MODULE
        if path.is_file():
            return str(path)
    raise LookupError(f"{nginx} has no stream module (install libnginx-mod-stream); looked in {', '.join(_MODULE_DIRS)}")


def _apt_install() -> str:
    return apt_install(*_APT_PACKAGES)


def _unavailable(reason: str) -> None:
    unavailable("nginx with the stream module", reason)


def find_nginx() -> str:
    """The nginx binary (with a stream module), installed with apt-get if needed and possible."""
    nginx = _which_nginx()
    problem = ""
    if nginx is not None:
        try:
            stream_module_path(nginx)
            return nginx
        except (LookupError, OSError, subprocess.SubprocessError) as exc:
            problem = str(exc)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(problem or "nginx is not installed (and cannot apt-get install it: not root or no apt-get)")
    try:
        err = _apt_install()
    except (OSError, subprocess.SubprocessError) as exc:
        err = f"apt-get install failed: {exc!r}"
    nginx = _which_nginx()
    if nginx is None:
        _unavailable(err or "nginx is still missing after apt-get install")
    assert nginx is not None
    try:
        stream_module_path(nginx)
    except (LookupError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"{exc} {err}".strip())
    return nginx


# -- rendering -----------------------------------------------------------------


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket stays bound until all are chosen (one at a time, the kernel
    may hand the same port out twice, and nginx refuses a config that listens on it twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _replace_servers(text: str, name: str, addrs: Sequence[str]) -> str:
    pattern = re.compile(rf"(?P<indent>[ \t]*)# @{name}-begin\n(?P<body>.*?)[ \t]*# @{name}-end\n", re.S)
    m = pattern.search(text)
    if m is None:
        raise ValueError(f"marker block @{name}-begin/@{name}-end not found in the template")
    first = re.search(r"^\s*server\s+\S+(?P<params>[^;]*);", m["body"], re.M)
    params = first["params"] if first else ""
    lines = "".join(f"{m['indent']}server {addr}{params};\n" for addr in addrs)
    return text[: m.start()] + lines + text[m.end() :]


def _replace_listen(text: str, marker: str, addr: str) -> str:
    pattern = re.compile(rf"^(?P<head>\s*listen\s+)\S+(?P<rest>[^;\n]*;)[^\n]*# @{marker}(?![\w-])[^\n]*$", re.M)
    text, n = pattern.subn(lambda m: f"{m['head']}{addr}{m['rest']}", text)
    if n != 1:
        raise ValueError(f"expected one listen line marked @{marker}, found {n}")
    return text


def render_config(
    masters: Sequence[str],
    *,
    listen: str,
    http_listen: str,
    tls_listen: str,
    tls_masters: Sequence[str] | None = None,
    shims: Sequence[str] = ("127.0.0.1:8080", "127.0.0.1:8081"),
    stream_module: str | None = None,
    template: Path = TEMPLATE,
    resp_masters: Sequence[str] = (),
    resp_listen: str | None = None,
) -> str:
    """The template with these upstreams and listen addresses.

    ``tls_masters`` (default: ``masters``) go behind the TLS passthrough
    server on ``tls_listen``. ``stream_module``: absolute path for
    ``load_module``, or ``None`` to drop that line (stream built in).
    ``resp_masters``: the masters' RESP addresses (default: ``masters``,
    which only a test of the config itself wants); ``resp_listen``: default
    a free port.
    """
    if not masters:
        raise ValueError("at least one master is required")
    text = template.read_text()
    text = _replace_servers(text, "masters", masters)
    text = _replace_servers(text, "masters-tls", tls_masters or masters)
    text = _replace_servers(text, "shims", shims)
    text = _replace_servers(text, "resp-masters", resp_masters or masters)
    text = _replace_listen(text, "listen-resp", resp_listen or f"127.0.0.1:{free_port()}")
    text = _replace_listen(text, "listen-stream", listen)
    text = _replace_listen(text, "listen-stream-tls", tls_listen)
    text = _replace_listen(text, "listen-http", http_listen)
    load = re.compile(r"^\s*load_module\s+[^;]+;[^\n]*# @load-stream[^\n]*$", re.M)
    replacement = f"load_module {stream_module};  # @load-stream" if stream_module else "# (stream module built in)"
    text, n = load.subn(replacement, text)
    if n != 1:
        raise ValueError(f"expected one load_module line marked @load-stream, found {n}")
    return text


# -- running -------------------------------------------------------------------


class NginxProcess:
    """``nginx -c CONF -p PREFIX -g 'daemon off;'`` with everything under ``prefix``.

    ``listen`` is the plain stream address; ``tls_listen`` the TLS passthrough one;
    ``resp_listen`` where nginx takes RESP clients (``start_nginx`` with ``resp_masters``).
    """

    def __init__(self, nginx: str, config_text: str, prefix: Path, listen: str, tls_listen: str = "", resp_listen: str = "") -> None:
        self.nginx = nginx
        self.prefix = prefix
        self.listen = listen
        self.tls_listen = tls_listen
        self.resp_listen = resp_listen
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(config_text)
        self.error_log = prefix / "logs" / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _base(self) -> list[str]:
        return [self.nginx, "-c", str(self.conf), "-p", f"{self.prefix}/", "-e", str(self.error_log)]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the config."""
        return subprocess.run([*self._base(), "-t"], capture_output=True, text=True, timeout=30)

    def log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT_S) -> NginxProcess:
        self.proc = subprocess.Popen(
            [*self._base(), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        host, _, port = self.listen.rpartition(":")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err}\n{self.log()}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on {self.listen} within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGQUIT (graceful), then SIGTERM, then SIGKILL of the whole group; bounded."""
        proc = self.proc
        if proc is None:
            return
        # SIGKILL to the group: the workers too, or they would keep the port
        stop_process(proc, ((signal.SIGQUIT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5.0)), kill_group=True)
        if proc.stderr is not None:
            proc.stderr.close()
        self.proc = None

    def __enter__(self) -> NginxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nginx(
    tmp: Path,
    masters: Sequence[str],
    *,
    shims: Sequence[str] = ("127.0.0.1:8080", "127.0.0.1:8081"),
    resp_masters: Sequence[str] = (),
) -> NginxProcess:
    """Find nginx, render the config for ``masters`` (and their RESP addresses) on free ports under ``tmp``, check it, start it.

    The masters go behind both native stream servers; ``tls_listen`` passes TLS through to them.
    """
    nginx = find_nginx()
    listen, http_listen, tls_listen, resp_listen = (f"127.0.0.1:{p}" for p in free_ports(4))
    text = render_config(
        masters,
        listen=listen,
        http_listen=http_listen,
        tls_listen=tls_listen,
        shims=shims,
        stream_module=stream_module_path(nginx),
        resp_masters=resp_masters,
        resp_listen=resp_listen,
    )
    proc = NginxProcess(nginx, text, tmp, listen, tls_listen, resp_listen)
    res = proc.check()
    if res.returncode != 0:
        raise AssertionError(f"nginx -t failed:\n{res.stderr}")
    return proc.start()
