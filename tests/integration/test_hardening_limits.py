"""Hardening, issue 13: every input is bounded, and a limit never costs other clients their service.

Reproductions over raw sockets against real daemons. Findings:

3. One large MGET took a master down (2M keys: 4.7 GB RSS, 44 s, PING
   unanswered for minutes): too many keys in one request answer status 16
   (TOO_MANY_KEYS) at once; a stopped owner costs a bounded wait.
5. Partial frames were buffered without a global cap, even before HELLO on a
   node with an auth token: past ``--max-input-buffer`` connections are closed
   with a status-17 (OVERLOADED) frame; before HELLO only small frames are read.
6. Slow and idle clients were kept forever and nothing was logged at the
   limit: ``--frame-timeout``, ``--idle-timeout``, ``--max-connections``.

Bounds on time and memory here are behavioural ("answered within seconds",
"below 500 MB"), generous on purpose; the measured figures are printed.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dcache.protocol import Op, encode_request
from tests.cluster import Cluster
from tests.harness import DaemonProcess, start_aux, wait_for
from tests.rawconn import RawConn
from tests.wire import PingWatch, call, read_frame, rss_bytes, set_frame, split_addr, wait_connected

pytestmark = pytest.mark.slow

OK = 0
PROTOCOL_ERROR = 1
BAD_ARGUMENTS = 3
FRAME_TOO_LARGE = 6
AUTH_FAILED = 7
UNAVAILABLE = 12
UPSTREAM_TIMEOUT = 13
TOO_MANY_KEYS = 16  # new status (target): more keys in one request than --max-batch-keys
OVERLOADED = 17  # new status (target): connection limit or input-buffer cap reached, then close

MB = 2**20
#: Behavioural bound: a master answering a refused request stays far below this.
RSS_BOUND = 500 * MB
#: Behavioural bound: a PING on another connection is answered at least this often.
GAP_BOUND_S = 1.0


def connect(addr: str, timeout: float = 0.1) -> RawConn:
    return RawConn(*split_addr(addr), timeout=timeout)


def send_big(conn: RawConn, op: int, rid: int, *args: Any) -> None:
    """Send one (large) request; the short receive timeout of ``conn`` must not cut the send."""
    conn.sock.settimeout(30)
    try:
        conn.send(op, rid, *args)
    finally:
        conn.sock.settimeout(conn.timeout)


def await_answer(conn: RawConn, watch: PingWatch, timeout: float, what: str) -> Any:
    """The next frame on ``conn``; fails early once the watched daemon breaks a bound."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return conn.recv()
        except TimeoutError:
            pass
        assert watch.max_rss < RSS_BOUND, f"{what}: RSS reached {watch.max_rss / MB:.0f} MB before an answer"
        gap = watch.worst_gap()
        assert gap < GAP_BOUND_S, f"{what}: PING on another connection unanswered for {gap:.1f} s"
        assert time.monotonic() < deadline, f"{what}: no answer within {timeout} s"


def ask(conn: RawConn, watch: PingWatch, what: str, op: int, rid: int, *args: Any) -> Any:
    """Send one request on ``conn`` and wait for its answer while ``watch`` checks the bounds."""
    send_big(conn, op, rid, *args)
    return await_answer(conn, watch, 20, what)


def closed_within(sock: socket.socket, timeout: float) -> tuple[bool, list[Any]]:
    """Whether the peer closed ``sock`` within ``timeout`` s, and the frames it sent before."""
    frames: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                frames.append(read_frame(sock, timeout=max(0.01, deadline - time.monotonic()))[1])
            except TimeoutError:
                return False, frames
            except (EOFError, OSError):
                return True, frames
    finally:
        sock.settimeout(5)


def report(what: str, watch: PingWatch, took: float) -> None:
    print(f"{what}: answered in {took:.2f} s, worst PING gap {watch.worst_gap():.3f} s, max RSS {watch.max_rss / MB:.0f} MB")


# -- finding 3: one request must not take a master down ------------------------------------


def test_a_huge_mget_is_refused_at_once_and_the_master_stays_responsive(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    conn: RawConn | None = None
    try:
        # The default --max-batch-keys (10000), so today's flags reproduce the bug; an aux
        # timeout too short for the aux node to answer 2M keys takes today's worst path.
        m = cl.start_master("m1", "--aux-timeout", "0.3")
        cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        conn = connect(m.addr)
        keys = [b"k%d" % i for i in range(2_000_000)]  # distinct keys: each one costs the master work today
        with PingWatch(m.addr, m.proc.pid) as watch:  # type: ignore[union-attr]
            t0 = time.monotonic()
            # Today it is served: the loop is held about a second, and once the aux node's
            # answer times out one GETV per key follows (60 s and 4.7 GB measured).
            mget = ask(conn, watch, "MGET of 2,000,000 keys", Op.MGET, 1, keys)
            took = time.monotonic() - t0
            # An array that large is refused as its header is read, before its
            # items are built: a connection-level TOO_MANY_KEYS, then the close.
            assert mget[:2] == [0, TOO_MANY_KEYS], f"{mget!r:.200}"
            closed, _ = closed_within(conn.sock, 5)
            assert closed
            conn.close()
            conn = connect(m.addr)
            over = ask(conn, watch, "MGET of 10,001 keys", Op.MGET, 4, keys[:10_001])  # over the limit, under the decoder's
            assert over[:2] == [4, TOO_MANY_KEYS], f"{over!r:.200}"
            pairs = [[b"mset:%d" % i, b"v"] for i in range(10_001)]  # one pair over the default limit
            mset = ask(conn, watch, "MSET of 10,001 pairs", Op.MSET, 2, pairs)
            assert mset[:2] == [2, TOO_MANY_KEYS], f"{mset!r:.200}"
            assert ask(conn, watch, "GET", Op.GET, 3, b"mset:0") == [3, OK, None]  # nothing of the MSET stored
        report("MGET of 2M keys", watch, took)
        assert watch.errors == []
        assert watch.worst_gap() < GAP_BOUND_S and watch.max_rss < RSS_BOUND
    finally:
        if conn is not None:
            conn.close()
        cl.stop()


def test_an_mget_of_exactly_the_key_limit_all_missing_with_two_replicas(tmp_path: Path) -> None:
    limit = 2000
    cl = Cluster(tmp_path, replicas=2)
    try:
        m = cl.start_master("m1", "--max-batch-keys", str(limit))
        cl.start_aux("a1")
        cl.start_aux("a2")
        wait_connected(m.addr, {"a1", "a2"})
        keys = [b"missing:%d" % i for i in range(limit)]
        conn = connect(m.addr)
        with PingWatch(m.addr, m.proc.pid) as watch:  # type: ignore[union-attr]
            t0 = time.monotonic()
            # Every key misses on both owners: the fallback path (quadratic today).
            mget = ask(conn, watch, f"MGET of {limit} missing keys", Op.MGET, 1, keys)
            took = time.monotonic() - t0
            over = ask(conn, watch, f"MGET of {limit + 1} keys", Op.MGET, 2, [*keys, b"one-more"])
        report(f"MGET of {limit} missing keys, 2 replicas", watch, took)
        assert mget == [1, OK, [None] * limit], f"{mget!r:.200}"
        assert over[:2] == [2, TOO_MANY_KEYS], f"{over!r:.200}"
        assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S
        conn.close()
    finally:
        cl.stop()


def test_a_stopped_only_owner_during_a_large_mget_costs_a_bounded_wait(tmp_path: Path) -> None:
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1", "--aux-timeout", "0.5")
        a = cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        n = 10_000  # the largest MGET the default limit allows
        assert call(m.addr, Op.MSET, 1, [[b"key:%d" % i, b"value:%d" % i] for i in range(0, n, 10)])[1] == OK
        keys = [b"key:%d" % i for i in range(n)]
        expected = [b"value:%d" % i if i % 10 == 0 else None for i in range(n)]
        conn = connect(m.addr)
        a.signal(signal.SIGSTOP)
        try:
            with PingWatch(m.addr, m.proc.pid) as watch:  # type: ignore[union-attr]
                t0 = time.monotonic()
                answer = ask(conn, watch, f"MGET of {n} keys while the only owner is stopped", Op.MGET, 2, keys)
                took = time.monotonic() - t0
                stats = ask(conn, watch, "STATS while the only owner is stopped", Op.STATS, 3)  # same connection
        finally:
            a.signal(signal.SIGCONT)
        report(f"MGET of {n} keys, owner stopped", watch, took)
        rid, status, result = answer
        assert rid == 2 and status in (OK, UNAVAILABLE, UPSTREAM_TIMEOUT), f"{answer!r:.200}"
        if status == OK:
            assert result == expected, "values answered while the only owner was stopped must be right"
        assert stats[:2] == [3, OK]
        assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S and watch.max_rss < RSS_BOUND
        conn.close()
    finally:
        cl.stop()


def test_a_large_mset_and_mget_are_routed_in_slices_and_the_requests_after_them_keep_their_order(tmp_path: Path) -> None:
    """A master routes a large MSET or MGET a slice of keys per loop iteration; its client's later requests wait for the last slice.

    Pipelined in one write, on one connection, over native frames and over
    RESP: an MSET of 5,000 keys, a GET of its last key, an MGET of every
    key, a SET of the last key, a GET of it. Each read sees exactly the
    writes sent before it (a GET that overtook the MSET's later slices
    would read the old value). Another connection's PINGs are answered
    meanwhile (the gap is printed: docs/BENCHMARKS.md, "One request at its
    largest").
    """
    import redis

    n = 5000
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1", "--resp-port", "0")
        cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        for proto in ("native", "resp"):
            keys = [b"%s:%d" % (proto.encode(), i) for i in range(n)]
            assert call(m.addr, Op.MSET, 1, [[k, b"old"] for k in keys])[1] == OK
            new = [b"new:%d" % i for i in range(n)]
            last = keys[-1]
            with PingWatch(m.addr, m.proc.pid) as watch:  # type: ignore[union-attr]
                if proto == "native":
                    conn = connect(m.addr, timeout=20)
                    try:
                        conn.send_raw(
                            encode_request(Op.MSET, 1, [list(p) for p in zip(keys, new, strict=True)])
                            + encode_request(Op.GET, 2, last)
                            + encode_request(Op.MGET, 3, keys)
                            + encode_request(Op.SET, 4, last, b"newest")
                            + encode_request(Op.GET, 5, last)
                        )
                        answers = {a[0]: a[1:] for a in (conn.recv() for _ in range(5))}
                    finally:
                        conn.close()
                    results = [answers[i] for i in range(1, 6)]
                    assert results == [[OK, n], [OK, new[-1]], [OK, new], [OK, True], [OK, b"newest"]], f"{results!r:.300}"
                else:
                    r = redis.Redis(host=m.host, port=m.resp_port, socket_timeout=20)
                    try:
                        pipe = r.pipeline(transaction=False)
                        pipe.mset(dict(zip(keys, new, strict=True)))
                        pipe.get(last)
                        pipe.mget(keys)
                        pipe.set(last, b"newest")
                        pipe.get(last)
                        assert pipe.execute() == [True, new[-1], new, True, b"newest"]
                    finally:
                        r.close()
            print(f"{proto}: worst PING gap {watch.worst_gap() * 1000:.0f} ms")
            assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S
    finally:
        cl.stop()


def test_large_msets_and_mgets_on_several_connections_at_once_keep_each_ones_order(tmp_path: Path) -> None:
    """Their slices share the master's one budget of keys per loop iteration (``dcache.turns``), taking turns.

    Each connection pipelines an MSET of its own 3,000 keys, a GET of the
    last, an MGET of every key: each read sees its own connection's MSET (the
    reads run after the MSET's last key is routed; their answers may come
    before its own, which waits for every write's acknowledgement).
    """
    n = 3000
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1")
        cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        conns = [connect(m.addr, timeout=20) for _ in range(4)]
        try:
            keys = [[b"c%d:%d" % (j, i) for i in range(n)] for j in range(len(conns))]
            for conn, ks in zip(conns, keys, strict=True):
                conn.send_raw(
                    encode_request(Op.MSET, 1, [[k, b"v:" + k] for k in ks])
                    + encode_request(Op.GET, 2, ks[-1])
                    + encode_request(Op.MGET, 3, ks)
                )
            answers = [{a[0]: a[1:] for a in (conn.recv() for _ in range(3))} for conn in conns]  # a master may answer out of order
        finally:
            for conn in conns:
                conn.close()
        for got, ks in zip(answers, keys, strict=True):
            assert got[1] == [OK, n] and got[2] == [OK, b"v:" + ks[-1]] and got[3] == [OK, [b"v:" + k for k in ks]]
    finally:
        cl.stop()
        print(cl.logs()[-20000:])  # shown only when the test fails


def test_a_get_pipelined_behind_an_mset_of_large_values_reads_them(tmp_path: Path) -> None:
    """Every request a master sends an aux node goes on one connection, so the node runs them in the order they were made.

    The master kept two connections to each aux node and moved to the other
    one every loop iteration; the node reads its connections in no set
    order, so the GET below, sent behind the MSET's last batch but on the
    other connection, was answered first, with the old value, in 7 of 20
    rounds.
    """
    cl = Cluster(tmp_path)
    try:
        m = cl.start_master("m1", "--aux-connections", "2")
        cl.start_aux("a1")
        wait_connected(m.addr, {"a1"})
        new = b"n" * 3000
        for rnd in range(10):
            keys = [b"r%d:%d" % (rnd, i) for i in range(2000)]
            assert call(m.addr, Op.MSET, 1, [[k, b"old"] for k in keys])[1] == OK
            conn = connect(m.addr, timeout=20)
            try:
                conn.send_raw(
                    encode_request(Op.MSET, 1, [[k, new] for k in keys])
                    + encode_request(Op.GET, 2, keys[-1])
                    + encode_request(Op.GET, 3, keys[-300])
                )
                answers = {a[0]: a[1:] for a in (conn.recv() for _ in range(3))}
            finally:
                conn.close()
            assert answers == {1: [OK, 2000], 2: [OK, new], 3: [OK, new]}, f"round {rnd}: {answers!r:.200}"
    finally:
        cl.stop()


# -- finding 5: buffered input is capped per node, and tiny before HELLO ----------------------


def test_partial_frames_past_the_input_buffer_cap_close_their_connections() -> None:
    aux = start_aux(None, "--max-memory", "32MB", "--max-input-buffer", "16MB", node_id="buffers")
    socks: list[socket.socket] = []
    try:
        pid = aux.proc.pid  # type: ignore[union-attr]
        base = rss_bytes(pid)
        # 20 x 7 MB: today's node holds all of it (about 170 MB RSS measured, kept after the
        # close); under the 16 MB cap at most two of them may stay parked.
        outcomes: list[str] = [""] * 20
        lock = threading.Lock()
        partial = set_frame(8 * MB)[: 4 + 7 * MB]  # announces 8 MB, sends 7 MB of a well-formed SET

        def park(i: int) -> None:
            """Announce an 8 MB frame and send 7 MB of it, then see what the node did."""
            s = socket.create_connection(split_addr(aux.addr), timeout=5)
            with lock:
                socks.append(s)
            try:
                for start in range(0, len(partial), MB // 4):
                    s.sendall(partial[start : start + MB // 4])
            except OSError:
                pass  # closed by the node while sending (reset, broken pipe) or no longer read (timeout)
            try:
                _, frame = read_frame(s, timeout=2)
            except TimeoutError:
                outcomes[i] = "open"
            except (EOFError, OSError) as exc:
                outcomes[i] = f"closed without a frame ({exc.__class__.__name__})"
            else:
                outcomes[i] = f"frame {frame[:2]}"

        with PingWatch(aux.addr, pid) as watch:
            threads = [threading.Thread(target=park, args=(i,)) for i in range(len(outcomes))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            # Still served while partial frames are parked.
            assert call(aux.addr, Op.SET, 1, b"k", b"v") == (1, OK, True)
            assert call(aux.addr, Op.GET, 2, b"k") == (2, OK, b"v")
        print(
            f"outcomes {outcomes}; RSS {base / MB:.0f} MB at start, {watch.max_rss / MB:.0f} MB at most; worst PING gap {watch.worst_gap():.3f} s"
        )
        assert watch.max_rss < base + 16 * MB + 64 * MB, f"RSS {watch.max_rss / MB:.0f} MB from {base / MB:.0f} MB; {outcomes}"
        overloaded = outcomes.count(f"frame {[0, OVERLOADED]}")
        closed = [o for o in outcomes if o != "open"]
        assert all(o.startswith("closed") or o == f"frame {[0, OVERLOADED]}" for o in closed), outcomes
        assert len(closed) >= len(outcomes) - 2 and overloaded >= 1, outcomes  # 16 MB holds two 7 MB partial frames
        assert watch.errors == [] and watch.worst_gap() < GAP_BOUND_S
        _, status, stats = call(aux.addr, Op.STATS, 3)
        assert status == OK and stats.get("input_overflows", 0) >= len(closed), stats
    finally:
        for s in socks:
            s.close()
        aux.kill()


@pytest.mark.parametrize("role", ["aux", "master"])
def test_before_hello_a_large_frame_is_refused_without_being_read(role: str) -> None:
    node = DaemonProcess(role, ["--host", "127.0.0.1", "--port", "0", "--auth-token", "s3cret", "--log-level", "warning"]).start()
    try:
        for size in (1_000_000, 5000):  # more than the 4096 bytes allowed before HELLO
            s = socket.create_connection(split_addr(node.addr), timeout=5)
            try:
                s.sendall(set_frame(size)[:1004])  # the header and 1000 bytes of the body
                try:
                    _, frame = read_frame(s, timeout=3)
                except TimeoutError:
                    pytest.fail(f"no answer: the node waits to buffer a {size}-byte frame from a peer that never said HELLO")
                assert frame[:2] == [0, FRAME_TOO_LARGE], frame
                assert closed_within(s, 3) == (True, []), "the connection stays open after the refusal"
            finally:
                s.close()
        conn = connect(node.addr, timeout=5)
        try:
            assert conn.call(Op.PING, 1)[:2] == [1, AUTH_FAILED]  # small frames are still answered
            conn.send_raw(set_frame(4000))
            assert conn.recv()[:2] == [1, AUTH_FAILED]
            assert conn.call(Op.HELLO, 2, 1, "s3cret")[:2] == [2, OK]
            # After HELLO the usual frame limit applies: a 100 KB frame is read and answered.
            assert conn.call(Op.PING, 3, b"x" * 100_000)[:2] == [3, BAD_ARGUMENTS]
            assert conn.call(Op.PING, 4) == [4, OK, "PONG"]
        finally:
            conn.close()
    finally:
        node.kill()


# -- finding 6: slow, idle and too many clients ------------------------------------------------


def stats(addr: str) -> dict[str, Any]:
    _, status, result = call(addr, Op.STATS, 1)
    assert status == OK, result
    return dict(result)


def test_a_frame_trickled_slower_than_the_frame_timeout_is_closed() -> None:
    aux = start_aux(None, "--frame-timeout", "1", node_id="slowloris")
    try:
        s = socket.create_connection(split_addr(aux.addr), timeout=5)
        frame = set_frame(100)
        try:
            s.sendall(frame[:4])
            t0 = time.monotonic()
            closed_after = None
            for i in range(4, 4 + 30):  # a byte every 0.2 s: the 100-byte body would take 20 s
                try:
                    s.sendall(frame[i : i + 1])
                except OSError:
                    closed_after = time.monotonic() - t0
                    break
                closed, frames = closed_within(s, 0.2)
                if closed:
                    closed_after = time.monotonic() - t0
                    assert all(f[:2] == [0, PROTOCOL_ERROR] for f in frames), frames
                    break
        finally:
            s.close()
        print(f"trickling connection closed after {closed_after} s")
        assert closed_after is not None and closed_after < 5, "a frame trickled for 6 s was still being read"
        assert call(aux.addr, Op.PING, 1) == (1, OK, "PONG")
        assert stats(aux.addr).get("frame_timeouts", 0) >= 1
    finally:
        aux.kill()


def test_an_idle_connection_is_closed_and_a_busy_one_kept() -> None:
    aux = start_aux(None, "--idle-timeout", "1", node_id="idle")
    try:
        idle = connect(aux.addr, timeout=5)
        busy = connect(aux.addr, timeout=5)
        try:
            assert idle.call(Op.PING, 1) == [1, OK, "PONG"]  # a client that then goes silent
            t0 = time.monotonic()
            rid = 0
            while time.monotonic() - t0 < 3:  # three idle timeouts
                rid += 1
                assert busy.call(Op.PING, rid) == [rid, OK, "PONG"]
                time.sleep(0.3)
            closed, _ = closed_within(idle.sock, 2)
            assert closed, "a connection idle for 3 s with --idle-timeout 1 is still open"
            assert busy.call(Op.STATS, rid + 1)[2].get("idle_timeouts", 0) >= 1
        finally:
            idle.close()
            busy.close()
    finally:
        aux.kill()


def test_connections_past_the_limit_are_refused_with_a_rate_limited_warning() -> None:
    aux = start_aux(None, "--max-connections", "5", node_id="crowded")
    held: list[RawConn] = []
    try:
        for i in range(5):
            held.append(connect(aux.addr, timeout=5))
            assert held[-1].call(Op.PING, i + 1) == [i + 1, OK, "PONG"]
        sixth = socket.create_connection(split_addr(aux.addr), timeout=5)
        try:
            closed, frames = closed_within(sixth, 3)
        finally:
            sixth.close()
        assert closed and [f[:2] for f in frames] == [[0, OVERLOADED]], (closed, frames)
        for _ in range(50):
            s = socket.create_connection(split_addr(aux.addr), timeout=5)
            try:
                closed, frames = closed_within(s, 3)
                assert closed and all(f[:2] == [0, OVERLOADED] for f in frames), (closed, frames)
            finally:
                s.close()
        counters = held[0].call(Op.STATS, 10)[2]
        assert counters.get("rejected_connections", 0) >= 51, counters

        def warnings() -> list[str]:
            return [line for line in aux.stderr_lines if "WARNING" in line and "connection" in line.lower()]

        wait_for(warnings, timeout=5, message="a WARNING about the connection limit")
        assert len(warnings()) <= 5, "51 refusals must not log a line each:\n" + "\n".join(warnings())
        for conn in held[:2]:
            conn.close()
        del held[:2]

        def accepted() -> bool:
            conn = connect(aux.addr, timeout=2)
            try:
                return bool(conn.call(Op.PING, 99) == [99, OK, "PONG"])
            except (EOFError, OSError):
                return False
            finally:
                conn.close()

        wait_for(accepted, timeout=5, message="a new connection accepted once others closed")
    finally:
        for conn in held:
            conn.close()
        aux.kill()
