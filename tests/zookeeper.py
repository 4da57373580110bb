"""Real ZooKeeper for tests: find (or install) Debian's package, run a standalone server.

``ZooKeeperServer(tmp).start()`` runs ``QuorumPeerMain`` in the foreground on a
free loopback port with its own data directory and a short tick (so session
timeouts down to 1 s are allowed). ``stop()`` kills it; ``start()`` again
restarts it on the same port with the same data (sessions and znodes
survive, as with a real restart). When ZooKeeper cannot be had, the test
fails under CI (``CI`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.harness import apt_install, unavailable

JAR = Path("/usr/share/java/zookeeper.jar")
CONF_DIR = Path("/etc/zookeeper/conf")
START_TIMEOUT_S = 30.0


def _java() -> str | None:
    return shutil.which("java")


def _unavailable(reason: str) -> None:
    unavailable("ZooKeeper", reason)


def find_zookeeper() -> tuple[str, str]:
    """``(java, classpath)`` of Debian's ZooKeeper, installed with apt-get if needed and possible."""
    if not JAR.is_file() or _java() is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            _unavailable("the zookeeper package is not installed (and cannot apt-get install it: not root or no apt-get)")
        err = apt_install("zookeeper")
        if not JAR.is_file() or _java() is None:
            _unavailable(err or "the zookeeper package is still missing after apt-get install")
    java = _java()
    assert java is not None
    return java, f"{CONF_DIR}:{JAR}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    """ZooKeeper's ``ruok`` four-letter word answers ``imok``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"ruok")
            s.shutdown(socket.SHUT_WR)
            return s.recv(16) == b"imok"
    except OSError:
        return False


class ZooKeeperServer:
    """A standalone ZooKeeper on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.java, self.classpath = find_zookeeper()
        self.dir = tmp / "zookeeper"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "server.log"
        cfg = self.dir / "zoo.cfg"
        cfg.write_text(
            "\n".join(
                [
                    "tickTime=500",  # session timeouts from 2 ticks = 1 s
                    f"dataDir={self.dir / 'data'}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "admin.enableServer=false",
                    "minSessionTimeout=1000",
                    "maxSessionTimeout=30000",
                    "4lw.commands.whitelist=ruok,srvr,stat",
                    # A test server: no fsync per transaction and a small
                    # preallocated log (64 MB by default, written before the
                    # first session), so a busy disk does not stall it.
                    "forceSync=no",
                    "preAllocSize=1024",
                    "",
                ]
            )
        )
        self.cfg = cfg

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ZooKeeperServer:
        cmd = [
            self.java,
            "-Xmx256m",
            f"-Dzookeeper.log.dir={self.dir}",
            "-Dzookeeper.root.logger=INFO,CONSOLE",
            "-cp",
            self.classpath,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.cfg),
        ]
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}:\n{self.tail()}")
            if _answers(self.port):
                self._first_session(deadline)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not answer on port {self.port} within {START_TIMEOUT_S} s:\n{self.tail()}")

    def _first_session(self, deadline: float) -> None:
        """Open and close one session before any test does: ``ruok`` answers before the server takes sessions.

        The first session of a fresh server (its first transaction) is the
        slow one; tests then connect with their own, shorter, timeouts.
        """
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.hosts, timeout=10.0)
        try:
            client.start(max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"ZooKeeper on port {self.port} took no session within {START_TIMEOUT_S} s: {exc}\n{self.tail()}") from exc
        finally:
            client.stop()
            client.close()

    def stop(self) -> None:
        """Kill the server (SIGKILL: like a crash; data on disk stays)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
