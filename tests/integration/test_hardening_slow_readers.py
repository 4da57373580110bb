"""Hardening: a client that pipelines requests with large answers and never reads its socket.

Before the fix an aux node ran every frame of its input at once and joined
their answers into one write (1 MB values: 5.5 GB of RSS, the master in front
marked it down), and a master buffered every answer it had forwarded (up to
4096 per connection, whatever their size). Now frames stop running while the
client does not read, and answers held for clients that do not read are
capped across connections (``--max-output-buffer``): past it the connection
holding the most is cut off, logged and counted.

Against real daemons, over a raw socket with a small receive buffer. Bounds
are behavioural and generous (the machine is shared); figures are printed.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from dcache.protocol import FrameDecoder, Op, encode_request
from tests.cluster import Cluster
from tests.harness import start_aux
from tests.wire import PingWatch, call, rss_bytes, split_addr, wait_connected

pytestmark = pytest.mark.slow

OK = 0
MB = 2**20
VALUE = b"v" * MB
#: Behavioural bounds: RSS growth for a client that does not read; the worst gap between two PINGs on another connection.
GROWTH_BOUND = 150 * MB
GAP_BOUND_S = 2.0
READ_TIMEOUT_S = 60.0


def slow_socket(addr: str) -> socket.socket:
    """A client socket with a small receive window (set before connecting), so the server's writes back up at once."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(split_addr(addr))
    return s


def pipeline_gets(s: socket.socket, n: int, key: bytes) -> None:
    """Send ``n`` GETs of ``key`` (request ids 1..n) in one write; read nothing."""
    s.sendall(b"".join(encode_request(Op.GET, rid, key) for rid in range(1, n + 1)))
    assert select.select([s], [], [], 10)[0], "no answer within 10 s"  # the server ran the first ones


def read_answers(s: socket.socket, n: int) -> tuple[list[Any], bool]:
    """Read until ``n`` answers came or the server closed (bounded): ``(answers, closed)``."""
    decoder = FrameDecoder(max_frame_bytes=64 * MB)
    got: list[Any] = []
    deadline = time.monotonic() + READ_TIMEOUT_S
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} answers within {READ_TIMEOUT_S} s"
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return got, True
        if not chunk:
            return got, True
        got += decoder.feed(chunk)
    return got, False


def stats(addr: str) -> dict[str, Any]:
    _, status, result = call(addr, Op.STATS, 1)
    assert status == OK
    return dict(result)


def test_an_aux_node_builds_no_answers_for_a_client_that_does_not_read(tmp_path: Path) -> None:
    """400 pipelined GETs of 1 MB: the node stops once its answers back up, serves others at once, and answers
    every GET in order, once, when the client reads. Before the fix: +800 MB of RSS within a second."""
    aux = start_aux(tmp_path)
    s: socket.socket | None = None
    try:
        assert aux.proc is not None
        assert call(aux.addr, Op.SET, 1, b"large", VALUE)[1] == OK
        n = 400
        with PingWatch(aux.addr, aux.proc.pid) as watch:
            before = rss_bytes(aux.proc.pid)
            s = slow_socket(aux.addr)
            pipeline_gets(s, n, b"large")
            t0 = time.monotonic()
            assert call(aux.addr, Op.GET, 2, b"large", timeout=GAP_BOUND_S)[1:] == (OK, VALUE)  # another client, promptly
            served_in = time.monotonic() - t0
            time.sleep(0.5)  # let the node run whatever it would
            held = stats(aux.addr)["buffered_output_bytes"]
            grown = watch.max_rss - before
            answers, closed = read_answers(s, n)
        print(
            f"aux node: RSS +{grown / MB:.0f} MB, another GET of 1 MB in {served_in * 1000:.0f} ms, {held} bytes held, worst PING gap {watch.worst_gap() * 1000:.0f} ms"
        )
        assert grown < GROWTH_BOUND, f"RSS grew by {grown / MB:.0f} MB for a client that does not read"
        assert 0 < held < 8 * MB
        assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S
        assert not closed and [a[0] for a in answers] == list(range(1, n + 1))  # every answer, in order, once
        assert all(a[1:] == [OK, VALUE] for a in answers)
        assert stats(aux.addr)["output_overflows"] == 0 and aux.alive
    finally:
        if s is not None:
            s.close()
        aux.kill()


def test_a_master_cuts_off_a_client_whose_unread_answers_pass_the_output_cap(tmp_path: Path) -> None:
    """A master owes the answers it forwarded: a client that pipelines 300 GETs of 1 MB and does not read is cut
    off at --max-output-buffer (logged, counted); the master keeps serving and its aux node stays up. A client
    that holds less than the cap gets every answer once it reads. Before the fix: +300 MB of RSS, no close."""
    cl = Cluster(tmp_path)
    slow: socket.socket | None = None
    late: socket.socket | None = None
    try:
        # The answers forwarded before the cut still cross the aux link (no request can be called back): a GET
        # from another client waits behind them, longer than the tests' usual --aux-timeout on a busy machine.
        m = cl.start_master("m1", "--max-output-buffer", "16MB", "--aux-timeout", "5")
        cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        assert m.proc is not None
        assert call(m.addr, Op.SET, 1, b"large", VALUE)[1] == OK
        # Under the cap: 10 MB held until the client reads, then every answer.
        late = slow_socket(m.addr)
        pipeline_gets(late, 10, b"large")
        time.sleep(0.5)
        answers, closed = read_answers(late, 10)
        assert not closed and sorted(a[0] for a in answers) == list(range(1, 11)) and all(a[1:] == [OK, VALUE] for a in answers)
        # Over it.
        n = 300
        with PingWatch(m.addr, m.proc.pid) as watch:
            before = rss_bytes(m.proc.pid)
            slow = slow_socket(m.addr)
            pipeline_gets(slow, n, b"large")
            deadline = time.monotonic() + READ_TIMEOUT_S
            while stats(m.addr)["output_overflows"] < 1:
                assert time.monotonic() < deadline, "the slow client was not cut off"
                time.sleep(0.1)
            t0 = time.monotonic()
            assert call(m.addr, Op.GET, 2, b"large", timeout=GAP_BOUND_S)[1:] == (OK, VALUE)
            served_in = time.monotonic() - t0
            time.sleep(0.5)  # answers still arriving for the closed connection are dropped
            grown = watch.max_rss - before
            answers, closed = read_answers(slow, n)
        after = stats(m.addr)
        print(f"master: RSS +{grown / MB:.0f} MB, cut off after {len(answers)} answers read, GET in {served_in * 1000:.0f} ms")
        assert closed and len(answers) < n and len({a[0] for a in answers}) == len(answers)
        assert all(a[1:] == [OK, VALUE] for a in answers)
        assert grown < GROWTH_BOUND, f"RSS grew by {grown / MB:.0f} MB for a client that does not read"
        assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S
        assert after["output_overflows"] == 1 and after["buffered_output_bytes"] < 8 * MB
        assert "output buffer cap reached" in m.stderr()
        wait_connected(m.addr, {"a1"}, timeout=5)  # the aux node was never marked down
    except AssertionError:
        print(cl.logs())
        raise
    finally:
        for sock in (slow, late):
            if sock is not None:
                sock.close()
        cl.stop()
