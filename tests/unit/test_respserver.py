"""The RESP connection (``dcache.respserver``) over fake transports: order of replies, order of execution, bounds."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import hiredis
import pytest

from dcache.config import NodeConfig
from dcache.protocol import Credential, Op
from dcache.respserver import RespProtocol
from dcache.server import LATER, MAX_IN_FLIGHT, FrameProtocol, Service
from tests.fakes import FakeTransport, SlowReaderTransport


class Toy(Service):
    """GET answers now, or LATER for ``later:*`` keys; SET answers LATER always (as a master's write)."""

    role = "toy"

    def __init__(self, **settings: Any) -> None:
        super().__init__("toy-1", NodeConfig(**settings))
        self.later: list[tuple[FrameProtocol, int, Any]] = []
        self.log: list[tuple[str, bytes]] = []
        self.handlers[Op.PING] = lambda conn, rid, args: "PONG"
        self.handlers[Op.GET] = self.get
        self.handlers[Op.SET] = self.set

    def get(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.log.append(("get", key))
        if key.startswith(b"early:"):  # answered through ``reply`` before the handler returns (as a master's MGET of near-cache copies)
            conn.reply(rid, 0, b"v:" + key)
            return LATER
        if key.startswith(b"refused:"):  # an error answered the same way (a write refused before it left)
            conn.reply(rid, 12, "no aux node is available for this key")  # UNAVAILABLE
            return LATER
        if key.startswith(b"later:"):
            self.later.append((conn, rid, b"v:" + key))
            return LATER
        return b"v:" + key

    def set(self, conn: FrameProtocol, rid: int, args: Any) -> Any:
        self.log.append(("set", args[0]))
        self.later.append((conn, rid, True))
        return LATER

    def answer(self, i: int) -> None:
        conn, rid, value = self.later.pop(i)
        conn.reply(rid, 0, value)


def connect(service: Service) -> tuple[RespProtocol, FakeTransport]:
    conn = RespProtocol(service)
    transport = FakeTransport(peername=("10.0.0.1", 5000), half_close=True)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def out(t: FakeTransport) -> bytes:
    return b"".join(t.written)


async def test_replies_leave_in_command_order_whatever_order_answers_come_in() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"later:1") + cmd(b"GET", b"now") + cmd(b"GET", b"later:2") + cmd(b"PING"))
    assert out(t) == b""  # the first reply is not there yet
    svc.answer(1)  # later:2 first
    await asyncio.sleep(0)
    assert out(t) == b""
    svc.answer(0)
    await asyncio.sleep(0)
    assert out(t) == b"$9\r\nv:later:1\r\n$5\r\nv:now\r\n$9\r\nv:later:2\r\n+PONG\r\n"


async def test_a_write_after_a_read_in_flight_waits_with_reading_paused() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"later:k") + cmd(b"GET", b"later:j") + cmd(b"SET", b"later:k", b"new") + cmd(b"GET", b"later:k"))
    assert svc.log == [("get", b"later:k"), ("get", b"later:j")]  # reads run together; the write waits
    assert not t.reading
    svc.answer(0)
    svc.answer(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert svc.log[2:] == [("set", b"later:k")]  # then the write, alone
    svc.answer(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert svc.log[3:] == [("get", b"later:k")] and t.reading
    svc.answer(0)
    await asyncio.sleep(0)
    assert out(t) == b"$9\r\nv:later:k\r\n$9\r\nv:later:j\r\n+OK\r\n$9\r\nv:later:k\r\n"


async def test_an_answer_sent_before_its_handler_returned_is_delivered() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"early:1") + cmd(b"GET", b"refused:2") + cmd(b"GET", b"now"))
    await asyncio.sleep(0)
    assert out(t) == b"$9\r\nv:early:1\r\n-CLUSTERDOWN no aux node is available for this key\r\n$5\r\nv:now\r\n"
    assert conn.in_flight == 0 and not conn._owed and t.reading
    t.written.clear()
    conn.data_received(cmd(b"MULTI") + cmd(b"GET", b"early:3") + cmd(b"GET", b"refused:4") + cmd(b"EXEC") + cmd(b"PING"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert out(t) == (
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$9\r\nv:early:3\r\n-CLUSTERDOWN no aux node is available for this key\r\n+PONG\r\n"
    )
    assert conn.in_flight == 0 and not conn._owed
    t.written.clear()
    conn.data_received(cmd(b"GETDEL", b"refused:5") + cmd(b"PING"))  # a composed command's native step (``_call``)
    for _ in range(5):
        await asyncio.sleep(0)
    assert out(t) == b"-CLUSTERDOWN no aux node is available for this key\r\n+PONG\r\n"
    assert conn.in_flight == 0 and not conn._owed


async def test_writes_of_one_kind_run_together() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(b"".join(cmd(b"SET", b"k%d" % i, b"v") for i in range(10)))
    assert len(svc.log) == 10 and t.reading


async def test_a_connection_never_holds_more_than_the_client_credential() -> None:
    svc = Toy()
    conn, _ = connect(svc)
    assert svc.initial_level() == Credential.CLUSTER and conn.level == Credential.CLIENT
    assert Op.SCAN not in conn._table


async def test_noauth_until_auth_then_the_client_credential() -> None:
    svc = Toy(auth_token="tok")
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"k") + cmd(b"ECHO", b"x") + cmd(b"AUTH", b"nope") + cmd(b"AUTH", b"tok") + cmd(b"GET", b"k"))
    assert out(t) == (
        b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n"
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n$3\r\nv:k\r\n"
    )
    assert conn.level == Credential.CLIENT and svc.auth_failures == 1


async def test_a_huge_multibulk_header_is_refused_and_the_connection_closed() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"PING") + b"*2000000000\r\n")
    assert out(t).startswith(b"+PONG\r\n-ERR Protocol error") and t.eof
    assert svc.resp_stats is not None and svc.resp_stats.protocol_errors == 1


async def test_a_command_larger_than_the_frame_limit_is_refused_as_it_arrives() -> None:
    svc = Toy(max_frame_bytes=100_000, max_value_bytes=50_000)
    conn, t = connect(svc)
    conn.data_received(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$900000\r\n")
    for _ in range(3):
        conn.data_received(b"x" * 40_000)
    assert b"a command larger than 100000 bytes" in out(t) and t.eof
    assert svc.buffered_input == 0


async def test_partial_commands_count_against_the_input_buffer() -> None:
    svc = Toy()
    conn, _ = connect(svc)
    conn.data_received(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc")
    assert 0 < svc.buffered_input < 100 and conn.partial_since
    conn.data_received(b"defghij\r\n")
    assert svc.buffered_input == 0 and not conn.partial_since


async def test_inline_commands_and_an_empty_line_among_arrays() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(b"PING\r\n")
    conn.data_received(cmd(b"GET", b"a") + b"\r\n" + cmd(b"ECHO", b"e") + b"GET b\r\n" + cmd(b"PING"))
    assert out(t) == b"+PONG\r\n$3\r\nv:a\r\n$1\r\ne\r\n$3\r\nv:b\r\n+PONG\r\n" and not t.closed


async def test_a_stream_of_arrays_and_inline_lines_answers_the_same_however_it_is_split() -> None:
    # The reader's stream offset (where the next command starts, for the
    # re-read after an inline line) is taken only when bytes are left over:
    # every cut of the stream, in two or three chunks, must answer alike.
    stream = cmd(b"GET", b"a") + cmd(b"PING") + b"\r\n" + cmd(b"ECHO", b"e") + b"GET b\r\n" + cmd(b"GET", b"c") + cmd(b"PING")
    want = b"$3\r\nv:a\r\n+PONG\r\n$1\r\ne\r\n$3\r\nv:b\r\n$3\r\nv:c\r\n+PONG\r\n"
    cuts = [(i, j) for i in range(1, len(stream)) for j in (i, min(i + 7, len(stream)))]
    for i, j in cuts:
        conn, t = connect(Toy())
        for chunk in (stream[:i], stream[i:j], stream[j:]):
            if chunk:
                conn.data_received(chunk)
        assert out(t) == want and not t.closed, (i, j)


async def test_an_inline_line_after_commands_held_for_those_in_flight_is_read_again() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"later:a") + cmd(b"SET", b"b", b"1") + b"\r\n")  # the SET waits for the GET
    conn.data_received(b"PING\r\n" + cmd(b"GET", b"c")[:5])
    svc.answer(0)
    await asyncio.sleep(0)
    conn.data_received(cmd(b"GET", b"c")[5:])  # waits for the SET
    svc.answer(0)
    for _ in range(3):
        await asyncio.sleep(0)
    assert out(t) == b"$9\r\nv:later:a\r\n+OK\r\n+PONG\r\n$3\r\nv:c\r\n" and not t.closed


async def test_transactions_queue_then_run_in_order() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"MULTI") + cmd(b"SET", b"later:k", b"1") + cmd(b"GET", b"later:k") + cmd(b"EXEC"))
    assert out(t) == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n" and svc.log == [("set", b"later:k")]
    svc.answer(0)
    assert svc.log[1:] == [("get", b"later:k")]  # the next command runs once the previous one answered
    svc.answer(0)
    await asyncio.sleep(0)
    assert out(t).endswith(b"*2\r\n+OK\r\n$9\r\nv:later:k\r\n")


async def test_too_many_options_are_queued_in_a_transaction_and_fail_when_it_runs_as_in_redis() -> None:
    """Redis's arity for PING, GETEX, EXPIRE... is "at least N": extra options are the command's own error in EXEC, not an EXECABORT."""
    svc = Toy()
    conn, t = connect(svc)
    extra = [
        cmd(b"PING", b"a", b"b"),
        cmd(b"GETEX", b"k", b"EX", b"1", b"PX", b"1"),
        cmd(b"EXPIRE", b"k", b"100", b"NX", b"XX", b"GT"),
        cmd(b"PEXPIREAT", b"k", b"100", b"GT", b"LT", b"XX"),
        cmd(b"FLUSHALL", b"ASYNC", b"SYNC"),
    ]
    conn.data_received(cmd(b"MULTI") + b"".join(extra) + cmd(b"EXEC") + b"".join(extra))
    await asyncio.sleep(0)
    errors = (
        b"-ERR wrong number of arguments for 'ping' command\r\n"
        b"-ERR syntax error\r\n"
        b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
        b"-ERR GT and LT options at the same time are not compatible\r\n"
        b"-ERR syntax error\r\n"
    )
    assert out(t) == b"+OK\r\n" + b"+QUEUED\r\n" * 5 + b"*5\r\n" + errors + errors


async def test_a_transaction_queues_at_most_max_frame_bytes_then_keeps_nothing() -> None:
    svc = Toy(max_frame_bytes=100_000, max_value_bytes=60_000)
    conn, t = connect(svc)
    value = b"x" * 40_000
    conn.data_received(cmd(b"MULTI") + cmd(b"SET", b"k", value) * 2)
    assert out(t) == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
    conn.data_received(cmd(b"SET", b"k", value))  # 120 KB queued in all: past the bound
    assert out(t).endswith(b"-ERR a transaction's commands hold more than 100000 bytes (--max-frame-bytes)\r\n")
    t.written.clear()
    conn.data_received(cmd(b"SET", b"k", value) * 5)  # the transaction failed: answered, not kept
    assert out(t) == b"+QUEUED\r\n" * 5 and conn._multi == []
    conn.data_received(cmd(b"EXEC"))
    assert out(t).endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n") and svc.log == []


async def test_a_transaction_answer_past_max_frame_bytes_gets_errors_for_the_rest() -> None:
    svc = Toy(max_frame_bytes=100_000, max_value_bytes=60_000)
    value = b"x" * 30_000
    svc.handlers[Op.GET] = lambda conn, rid, key: value
    conn, t = connect(svc)
    conn.data_received(cmd(b"MULTI") + cmd(b"GET", b"k") * 5 + cmd(b"PING") + cmd(b"EXEC"))
    await asyncio.sleep(0)
    reader = hiredis.Reader()
    reader.feed(out(t))
    assert [reader.gets() for _ in range(7)] == [b"OK"] + [b"QUEUED"] * 6
    got = reader.gets()
    assert got[:3] == [value] * 3 and got[5] == b"PONG", got[3:]  # every command ran; the first three fit
    assert all(isinstance(e, hiredis.ReplyError) and "past 100000 bytes" in str(e) for e in got[3:5])


async def test_config_get_matches_few_short_patterns_as_redis_globs() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"CONFIG", b"GET", b"MAXMEMORY*", b"datab?ses"))
    reader = hiredis.Reader()
    reader.feed(out(t))
    assert reader.gets() == [b"maxmemory", b"0", b"maxmemory-policy", b"allkeys-lru", b"databases", b"1"]
    t.written.clear()
    # fnmatch took 62 ms to translate each of these: 2,000 of them stalled the node for 48 s
    conn.data_received(cmd(b"CONFIG", b"GET", b"[" * 1000))
    conn.data_received(cmd(b"CONFIG", b"GET", *[b"*a%d" % i for i in range(65)]))
    assert out(t) == (b"-ERR CONFIG GET pattern longer than 128 bytes\r\n-ERR CONFIG GET takes at most 64 patterns\r\n")


async def test_errors_take_their_slot_among_answers_owed() -> None:
    svc = Toy()
    conn, t = connect(svc)
    conn.data_received(cmd(b"GET", b"later:1") + cmd(b"GET") + cmd(b"GET", b"now") + cmd(b"GET", b"k" * 2000) + cmd(b"NOPE"))
    assert out(t) == b""  # everything waits for the first reply
    svc.answer(0)
    await asyncio.sleep(0)
    got = out(t).split(b"\r\n")
    assert got[:3] == [b"$9", b"v:later:1", b"-ERR wrong number of arguments for 'get' command"]
    assert got[3:5] == [b"$5", b"v:now"]
    assert got[5].startswith(b"-ERR ") and b"limit" in got[5]  # the native parser's key bound
    assert got[6].startswith(b"-ERR unknown command 'NOPE'") and not t.closed
    assert svc.resp_stats is not None and svc.resp_stats.errors == 3


async def test_answers_owed_past_the_in_flight_bound_pause_reading_until_half_are_answered() -> None:
    svc = Toy()
    conn, t = connect(svc)
    n = MAX_IN_FLIGHT + 10
    conn.data_received(b"".join(cmd(b"SET", b"k%d" % i, b"v") for i in range(n)))
    assert conn.in_flight == MAX_IN_FLIGHT and not t.reading  # the last 10 wait in the reader, reading paused
    while conn.in_flight > MAX_IN_FLIGHT // 2 + 1:
        svc.answer(0)
    assert not t.reading
    svc.answer(0)
    await asyncio.sleep(0)
    assert conn.in_flight == MAX_IN_FLIGHT // 2 + 10 and t.reading  # the held commands ran, then reading resumed
    while svc.later:
        svc.answer(0)
    await asyncio.sleep(0)
    assert out(t) == b"+OK\r\n" * n


async def test_the_input_buffer_cap_closes_with_its_own_message_not_max_clients() -> None:
    svc = Toy(max_input_buffer=1000)
    conn, t = connect(svc)
    conn.data_received(cmd(b"PING") + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\n" + b"x" * 1500)
    assert out(t).startswith(b"+PONG\r\n-ERR this node's input buffer is full") and t.eof
    assert b"max number of clients" not in out(t)


async def test_commands_wait_while_the_client_does_not_read_its_replies() -> None:
    svc = Toy()
    value = b"x" * 100_000
    svc.handlers[Op.GET] = lambda conn, rid, key: value
    conn = RespProtocol(svc)
    t = SlowReaderTransport(high=64 * 1024)
    t.protocol = conn
    conn.connection_made(t)  # type: ignore[arg-type]
    n = 200
    conn.data_received(cmd(b"GET", b"k") * n)
    ran = len(t.written)
    assert t.paused and not t.reading and sum(map(len, t.written)) < 1_000_000  # 20 MB of replies not built
    answered = 0
    for _ in range(n):  # the client reads what it got, a loop iteration at a time
        answered += out(t).count(value)
        t.written.clear()
        if answered == n:
            break
        t.drain()
        await asyncio.sleep(0)
    t.drain()
    await asyncio.sleep(0)
    assert ran < n and answered == n and t.reading and not t.closed


async def test_replies_held_past_the_output_cap_cut_off_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """A master's RESP client that does not read: replies to commands already forwarded count against --max-output-buffer."""
    svc = Toy(max_output_buffer=500_000)
    conn = RespProtocol(svc)
    t = SlowReaderTransport(high=64 * 1024)
    t.protocol = conn
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(cmd(b"GET", b"later:k") * 20)
    assert len(svc.later) == 20
    with caplog.at_level(logging.CRITICAL, logger="dcache.server"):
        for c, rid, _ in list(svc.later):
            c.reply(rid, 0, b"x" * 100_000)
            svc.flush_all()
    assert t.closed and svc.output_overflows == 1 and t.size == 0 and svc.buffered_output == 0
    assert len(out(t)) < 800_000  # cut off once past the cap, not after 2 MB
