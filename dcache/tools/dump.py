"""``dcache dump`` and ``dcache restore``: a whole cluster to one file and back.

dump
    Asks a master for the ring (``RING``), then reads every aux node's
    *primary* ranges straight from the node with paged ``SCAN``s: each key is
    read once, from its first live owner, whatever the replication factor.
    The file is a snapshot in the aux nodes' own format (``dcache.lru.snapshot``,
    checksummed, entries with their expiry and version). If the cluster is
    moving data, dump waits (bounded) for the move to finish so no range is
    read from a node that does not hold it yet.

restore
    Reads and validates the file, then sends the entries in batches to a
    master (``APPLY``), which routes each one to its owners in the cluster as
    it is now (any size). Versions are kept and the owners apply an entry
    only if it is newer than what they hold, so a restore never overwrites
    newer data, and restoring twice changes nothing. Expired entries are
    skipped.

Both draw a progress bar on stderr when it is a terminal (nothing otherwise)
and print a summary at the end.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from collections import defaultdict
from ssl import SSLContext
from typing import Any, TextIO

from ..address import parse_address
from ..client import Client, open_connection
from ..errors import ConfigError
from ..files import open_private
from ..lru.snapshot import load, pack_entries, write_packed
from ..protocol import Op
from ..ring import HashRing

__all__ = ["dump_cluster", "restore_cluster"]

_PAGE = 1000
_MIGRATION_WAIT_S = 60.0
#: Seconds between two redraws of the progress bar, and its width in characters.
_REDRAW_S = 0.2
_BAR_CHARS = 30


class _Progress:
    """A progress bar on stderr when stderr is a terminal, nothing otherwise (a log or a pipe gets no carriage returns).

    ``[####      ]  42.0%  4200/10000 keys  3500 keys/s``, drawn at once, then
    at most every ``_REDRAW_S`` seconds, and a last time, complete, by ``finish``.
    """

    def __init__(self, what: str, total: int, quiet: bool, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.what = what
        self.total = max(1, total)
        self.done = 0
        self.quiet = quiet or not self.stream.isatty()
        self._start = time.monotonic()
        self._last = 0.0
        if not self.quiet:
            self._draw()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.quiet and now - self._last >= _REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        self._last = now = time.monotonic()
        total = max(self.total, self.done)  # a dump's total is an estimate (items over replicas)
        frac = self.done / total
        rate = self.done / max(now - self._start, 1e-6)
        bar = "#" * int(frac * _BAR_CHARS)
        line = f"\r{self.what} [{bar:<{_BAR_CHARS}}] {frac * 100:5.1f}%  {self.done}/{total} keys  {rate:.0f} keys/s"
        print(line, end="", file=self.stream, flush=True)

    def finish(self) -> None:
        """Draw the bar complete and end its line."""
        if not self.quiet:
            self.total = self.done if self.done else self.total
            self.done = self.total
            self._draw()
            self.abandon()

    def abandon(self) -> None:
        """End the bar's line as it is (an error message follows on a line of its own); idempotent."""
        if not self.quiet:
            self.quiet = True
            print(file=self.stream, flush=True)


async def _check_master(client: Client, command: str) -> None:
    """Refuse an ``addr`` that is an aux node: dump and restore go through a master.

    Raises:
        ConfigError: it is not a master.
    """
    hello = await client.server_info()
    if hello.get("role") != "master":
        raise ConfigError(
            f"{client.current_endpoint} is an aux node ({hello.get('node_id')}), and {command} needs a master: "
            "point --addr at a master (7000 by default)"
        )


def _check_out(out: str) -> str:
    """Refuse, before reading anything, an output file that cannot be written; return the path to replace.

    The dump is written beside that path and renamed over it, so it must be
    a regular file or nothing yet: renamed over ``/dev/null`` or a pipe it
    would replace the device node or the pipe with a file. A symlink is
    followed (the file it points to is replaced; the link stays).

    Raises:
        ConfigError: the folder is missing, not a folder, or not writable; or
            ``out`` is a folder, a device, a pipe or a socket.
    """
    path = os.path.realpath(out) if os.path.islink(out) else out
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = "FIFO (a pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise ConfigError(
            f"cannot write {out}: it is a {kind}, not a regular file; dump writes a file and renames it into place: "
            "give --out a file name (then read the file)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {out}: the folder {folder} does not exist; create it, or give --out another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {out}: permission denied in {folder}; give --out another path")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {out}: it is a folder; give --out a file name")
    return path


async def _ring(client: Client) -> dict[str, Any]:
    await _check_master(client, "dump")
    deadline = time.monotonic() + _MIGRATION_WAIT_S
    while True:
        info: dict[str, Any] = await client.execute(Op.RING)
        if not info["migrating"]:
            return info
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster has been moving data for a minute; dump again when `dcache ring` says stable")
        await asyncio.sleep(0.2)


async def dump_cluster(
    addr: str,
    out: str,
    *,
    timeout: float = 30.0,
    auth_token: str | None = None,
    cluster_secret: bytes | None = None,
    quiet: bool = False,
    ssl: SSLContext | None = None,
) -> dict[str, Any]:
    """Dump every key of the cluster behind master ``addr`` into ``out``; return a summary.

    SCAN on the aux nodes is a cluster op: with a cluster secret set, pass it as ``cluster_secret``.
    With ``ssl`` (a client-side context) the master and the aux nodes are read over TLS; the aux
    nodes' certificates must name the addresses the ring gives for them.

    Raises:
        ConfigError: ``addr`` is not a master, or ``out`` cannot be written (checked first).
        RuntimeError: the cluster kept moving data for a minute, or a range has no live owner.
        OSError: writing ``out`` failed (``filename`` is ``out``).
    """
    path = _check_out(out)
    async with Client(addr, timeout=timeout, auth_token=auth_token, client_name="dcache-dump", ssl=ssl) as client:
        info = await _ring(client)
    ring = HashRing.from_dict(info["ring"])
    nodes = {n["node_id"]: n for n in info["nodes"]}
    replicas = int(info["replicas"])
    plan: dict[str, list[list[int]]] = defaultdict(list)
    for start, end, _primary in ring.ranges():
        owners = ring.owners_for_hash(end, replicas)
        live = [o for o in owners if nodes.get(o, {}).get("state") == "up"] or [
            o for o in owners if nodes.get(o, {}).get("state") != "down"
        ]
        if not live:
            raise RuntimeError(f"no live owner for hash range ({start}, {end}]: owners {owners} are down")
        plan[live[0]].append([start, end])
    total = sum(int(n["items"] or 0) for n in info["nodes"]) // max(1, replicas)
    progress = _Progress("dump", total, quiet)
    chunks: list[tuple[bytes, int]] = []
    count = 0
    try:
        for node_id, ranges in plan.items():
            host, port = parse_address(nodes[node_id]["addr"])
            conn = await open_connection(
                host,
                port,
                connect_timeout=timeout,
                auth_token=auth_token,
                client_name="dcache-dump",
                cluster_secret=cluster_secret,
                ssl=ssl,
            )
            try:
                cursor = 0
                while True:
                    cursor, entries, _tombstones = await asyncio.wait_for(conn.call(Op.SCAN, ranges, cursor, _PAGE, 0), timeout)
                    if entries:
                        chunk = pack_entries(tuple(e) for e in entries)
                        chunks.append(chunk)
                        count += chunk[1]
                        progress.add(chunk[1])
                    if not cursor:
                        break
            finally:
                conn.close()
    except BaseException:
        progress.abandon()
        raise
    progress.finish()
    tmp = f"{path}.tmp.{os.getpid()}"
    created_ms = time.time_ns() // 1_000_000
    try:
        with open_private(tmp) as f:
            size = write_packed(chunks, f, count=count, node_id=f"cluster@{addr}", ring_epoch=int(info["epoch"]), created_ms=created_ms)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):  # name the file asked for, not the temporary one
            raise OSError(exc.errno, exc.strerror, out) from exc
        raise
    return {"keys": count, "bytes": size, "nodes": len(plan), "epoch": info["epoch"], "file": out}


async def restore_cluster(
    addr: str,
    infile: str,
    *,
    batch: int = 500,
    timeout: float = 30.0,
    auth_token: str | None = None,
    cluster_secret: bytes | None = None,
    quiet: bool = False,
    ssl: SSLContext | None = None,
) -> dict[str, Any]:
    """Restore ``infile`` into the cluster behind master ``addr``; return a summary.

    APPLY is a cluster op: with a cluster secret set, pass it as ``cluster_secret``.
    With ``ssl`` (a client-side context) the master is reached over TLS.

    Raises:
        OSError: ``infile`` cannot be read.
        SnapshotError: it is not a valid dump.
        ConfigError: ``addr`` is not a master.
    """
    with open(infile, "rb") as f:
        data = load(f, now_ms=time.time_ns() // 1_000_000)
    entries = data.entries
    applied = 0
    async with Client(
        addr, timeout=timeout, auth_token=auth_token, cluster_secret=cluster_secret, client_name="dcache-restore", ssl=ssl
    ) as client:
        await _check_master(client, "restore")
        progress = _Progress("restore", len(entries), quiet)
        try:
            for start in range(0, len(entries), batch):
                chunk = [list(e) for e in entries[start : start + batch]]
                applied += int(await client.execute(Op.APPLY, chunk))
                progress.add(len(chunk))
        except BaseException:
            progress.abandon()
            raise
    progress.finish()
    return {
        "keys_in_file": data.count,
        "expired_skipped": data.expired,
        "applied": applied,
        "not_applied_newer_present": len(entries) - applied,
        "file_created_ms": data.created_ms,
    }
