"""A real aux node serves a large MGET, or a RESP DEL of many keys, a slice of keys per loop iteration: one answer, in order, before the requests after it.

The slicing itself (loop iterations counted) is tested in
``tests/unit/auxnode/test_turns.py``; here the order and the answers
cross the wire, over native frames and over RESP.
"""

from __future__ import annotations

import socket

import pytest

from dcache.protocol import Op, encode_request
from dcache.protocol.limits import KEYS_PER_TURN
from tests.harness import DaemonProcess, start_aux
from tests.rawconn import RawConn
from tests.wire import call

pytestmark = pytest.mark.slow

OK = 0
N = 4 * KEYS_PER_TURN + 7


@pytest.fixture(scope="module")
def aux():
    node = start_aux(None, "--resp-port", "0", node_id="t-turns")
    yield node
    node.kill()


def store(node: DaemonProcess, prefix: bytes) -> tuple[list[bytes], list[bytes]]:
    keys = [b"%s:%05d" % (prefix, i) for i in range(N)]
    values = [b"old:%d" % i for i in range(N)]
    assert call(node.addr, Op.MSET, 1, [list(p) for p in zip(keys, values, strict=True)])[1] == OK
    return keys, values


def test_native_requests_pipelined_after_a_large_mget_see_the_node_after_it(aux: DaemonProcess) -> None:
    keys, values = store(aux, b"native")
    last = keys[-1]
    conn = RawConn(aux.host, aux.port, timeout=20)
    try:
        conn.send_raw(
            encode_request(Op.MGET, 1, keys)
            + encode_request(Op.SET, 2, last, b"new")
            + encode_request(Op.GET, 3, last)
            + encode_request(Op.MGET, 4, keys[-3:])
        )
        answers = [conn.recv() for _ in range(4)]
    finally:
        conn.close()
    assert [a[0] for a in answers] == [1, 2, 3, 4]  # answered in order: each one after the MGET's last slice
    assert answers[0][1:] == [OK, values]  # every value, in key order, across the slices, before the SET
    assert answers[1][1:] == [OK, True] and answers[2][1:] == [OK, b"new"]
    assert answers[3][1:] == [OK, [*values[-3:-1], b"new"]]


def test_resp_commands_pipelined_after_a_large_mget_see_the_node_after_it(aux: DaemonProcess) -> None:
    import redis

    keys, values = store(aux, b"resp")
    last = keys[-1]
    r = redis.Redis(host=aux.host, port=aux.resp_port, socket_timeout=20)
    try:
        pipe = r.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.set(last, b"new")
        pipe.get(last)
        pipe.mget(keys)
        got = pipe.execute()
        assert got == [values, True, b"new", [*values[:-1], b"new"]]
        tx = r.pipeline(transaction=True)  # EXEC on an aux node runs in one step: its MGET is not sliced, and is answered whole
        tx.mget(keys)
        tx.set(last, b"newer")
        assert tx.execute() == [[*values[:-1], b"new"], True]
    finally:
        r.close()


def test_a_client_that_leaves_during_a_large_mget_costs_the_others_nothing(aux: DaemonProcess) -> None:
    keys, values = store(aux, b"gone")
    for _ in range(5):
        with socket.create_connection((aux.host, aux.port), timeout=5) as s:
            s.sendall(encode_request(Op.MGET, 1, keys) + encode_request(Op.GET, 2, keys[0]))
        # closed before reading any answer: the remaining slices stop, the held GET never runs
    assert call(aux.addr, Op.MGET, 1, keys[-2:])[1:] == (OK, values[-2:])
    assert call(aux.addr, Op.PING, 2)[1:] == (OK, "PONG")


def test_resp_commands_pipelined_after_a_del_of_many_keys_see_them_deleted(aux: DaemonProcess) -> None:
    import redis

    keys, _ = store(aux, b"del")
    r = redis.Redis(host=aux.host, port=aux.resp_port, socket_timeout=20)
    try:
        pipe = r.pipeline(transaction=False)
        pipe.delete(*keys, b"del:missing")
        pipe.get(keys[-1])
        pipe.set(keys[-1], b"back")
        pipe.exists(*keys)
        assert pipe.execute() == [N, None, True, 1]
    finally:
        r.close()


def test_large_mgets_on_several_connections_at_once_each_answered_whole_and_in_order(aux: DaemonProcess) -> None:
    """Their slices share the node's one budget per loop iteration (``dcache.turns``); each request keeps its order."""
    stored = [store(aux, b"many%d" % j) for j in range(4)]
    conns = [RawConn(aux.host, aux.port, timeout=20) for _ in stored]
    try:
        for conn, (keys, _) in zip(conns, stored, strict=True):
            conn.send_raw(
                encode_request(Op.MGET, 1, keys) + encode_request(Op.SET, 2, keys[-1], b"new") + encode_request(Op.GET, 3, keys[-1])
            )
        answers = [[conn.recv() for _ in range(3)] for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    for got, (_, values) in zip(answers, stored, strict=True):
        assert [a[0] for a in got] == [1, 2, 3]
        assert got[0][1:] == [OK, values] and got[1][1:] == [OK, True] and got[2][1:] == [OK, b"new"]
