"""Differential test of the RESP front door: the same command sequences against a real ``redis-server`` and dcache.

Hypothesis draws short programs over a small key space (six keys, so commands
interact): single commands, pipelines, MULTI/EXEC/DISCARD transactions, and
bursts of reads of the same keys (so a master's near cache copies them and
answers later reads). Each program runs on a fresh connection to Redis and to
one dcache target, each with its own fresh key prefix, and the replies must
match after normalization:

* replies are compared as redis-py parses them (``decode_responses=False``),
  with its per-command response callbacks removed, so bytes, ints, None,
  lists and errors are compared as they came off the wire;
* an error is its exception class and its Redis prefix (``ERR``, ``EXECABORT``...),
  not dcache's wording (docs/RESP.md "Errors");
* TTL and PTTL replies are compared by bucket (-2, -1, or "positive"): every
  expiry in a program is either long (>= 100 s) or already past, and each
  time argument gets its own offset (3 s apart), so GT/LT comparisons never
  depend on how many milliseconds went by.

Targets: a master (``--replicas 2`` over two aux nodes, near cache on with
``--near-cache-min-hits 0``) and a lone aux node's own RESP port.

CI runs a fixed, derandomized set of examples; ``DCACHE_DIFF_EXAMPLES=N``
runs N per target for a local bug hunt (``DCACHE_DIFF_SEED`` picks another
set of programs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from dcache import Client
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, apt_install, start_aux, unavailable, wait_for

EXAMPLES = int(os.environ.get("DCACHE_DIFF_EXAMPLES", "0")) or None
#: A campaign of N programs per target runs longer than the suite's per-test timeout (about 10 ms a program).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(120, (EXAMPLES or 0) // 20))]
SEED = int(os.environ.get("DCACHE_DIFF_SEED", "0"))
#: A file to append each differing program to, instead of failing (a campaign that goes on after the first).
REPORT = os.environ.get("DCACHE_DIFF_REPORT", "")
SOCKET_TIMEOUT_S = 10.0
#: Each time argument of a program is this many seconds from the one before (see the module note).
TIME_STEP_S = 3


# -- servers ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    path = shutil.which("redis-server")
    if path is None:
        error = apt_install("redis-server")
        path = shutil.which("redis-server")
        if path is None:
            unavailable("redis-server", error or "redis-server installed no redis-server")
    assert path is not None
    work = tmp_path_factory.mktemp("redis")
    for _ in range(3):  # the port may be taken between probing it and binding it
        port = _free_port()
        proc = subprocess.Popen(
            [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda p=proc, n=port: p.poll() is not None or _pings(n), timeout=10, message="redis-server to answer PING")  # type: ignore[misc]
            if proc.poll() is None:
                yield port
                return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    pytest.fail("redis-server did not start")


def _pings(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    c = Cluster(tmp_path_factory.mktemp("diff"), replicas=2)
    try:
        near = ["--near-cache-size", "4MB", "--near-cache-min-hits", "0"]
        c.start_master("m1", "--resp-port", "0", "--resp-allow-flush", "true", *near)
        c.start_aux("a1")
        c.start_aux("a2")
        asyncio.run(wait_ring(c.masters[0].addr, settled({"a1", "a2"}), what="two aux nodes in the ring"))
        yield c.masters[0]
    finally:
        c.stop()


@pytest.fixture(scope="module")
def lone_aux() -> Iterator[DaemonProcess]:
    a = start_aux(None, "--resp-port", "0", "--resp-allow-flush", "true")
    try:
        yield a
    finally:
        a.kill()


# -- programs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """The ``i``-th key of the program's key space (the prefix is added when the program runs)."""

    i: int

    def __repr__(self) -> str:
        return f"k{self.i}"


@dataclass(frozen=True)
class Ttl:
    """A relative expiry of about ``seconds`` (in ``unit_ms`` units), made unique per program when it runs."""

    seconds: int
    unit_ms: int

    def __repr__(self) -> str:
        return f"ttl({self.seconds}s/{self.unit_ms}ms)"


@dataclass(frozen=True)
class At:
    """An absolute time ``offset`` seconds from now (negative: already past), in ``unit_ms`` units."""

    offset: int
    unit_ms: int

    def __repr__(self) -> str:
        return f"at({self.offset:+d}s/{self.unit_ms}ms)"


@dataclass(frozen=True)
class Big:
    """A large value (made when the program runs: hypothesis would print it whole)."""

    size: int
    fill: bytes

    def __repr__(self) -> str:
        return f"<{self.size} x {self.fill!r}>"


Arg = bytes | Key | Ttl | At | Big
Command = tuple[Arg, ...]


@dataclass(frozen=True)
class Block:
    """One step of a program: ``single`` (one command), ``pipeline``, ``multi`` (MULTI ... EXEC/DISCARD, ``pipelined`` or not)."""

    kind: str
    commands: tuple[Command, ...]
    pipelined: bool = True


KEY_COUNT = 6
keys = st.builds(Key, st.integers(0, KEY_COUNT - 1))
VALUES = [
    b"",
    b"v",
    b"hello",
    b"0",
    b"1",
    b"-1",
    b"42",
    b"-0",
    b"01",
    b" 1",
    b"1 ",
    b"+1",
    b"1.5",
    b"9223372036854775806",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"\x00\xff\r\n\x80binary",
]


#: 10 KB, and past LARGE_BULK_BYTES (a reply written in chunks).
BIG = [Big(10_240, b"x"), Big(70_000, b"y")]
values: st.SearchStrategy[Arg] = st.sampled_from(VALUES) | st.sampled_from(BIG) | st.binary(max_size=16)
INTS = [b"0", b"1", b"-1", b"5", b"-7", b"1000", b"9223372036854775807", b"-9223372036854775808"]
BAD_INTS = [b"9223372036854775808", b"abc", b"1.5", b"", b"+1", b"01", b"-0", b" 1"]
amounts = st.sampled_from(INTS) | st.sampled_from(BAD_INTS)


def _case(word: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([word, word.lower()])


#: Relative expiries (seconds), long enough that none ends during a program.
TTL_SECONDS = [100, 200, 1000, 100_000]
#: Absolute expiries (seconds from now): past ones delete the key.
AT_OFFSETS = [-100_000, -100, 100, 1000, 100_000]
#: Refused by both. 2^63-1 overflows a relative time in Redis; as an absolute time (EXAT, PXAT) Redis takes it, and
#: dcache refuses any expiry more than 100 years ahead (docs/RESP.md), so absolute times never get it.
BAD_TIMES = [b"0", b"-5", b"abc", b"1.5"]
HUGE_TIME = b"9223372036854775807"
ttl_s: st.SearchStrategy[Arg] = st.builds(Ttl, st.sampled_from(TTL_SECONDS), st.just(1000))
ttl_ms: st.SearchStrategy[Arg] = st.builds(Ttl, st.sampled_from(TTL_SECONDS), st.just(1))
at_s: st.SearchStrategy[Arg] = st.builds(At, st.sampled_from(AT_OFFSETS), st.just(1000))
at_ms: st.SearchStrategy[Arg] = st.builds(At, st.sampled_from(AT_OFFSETS), st.just(1))
bad_time: st.SearchStrategy[Arg] = st.sampled_from([*BAD_TIMES, HUGE_TIME])
bad_at: st.SearchStrategy[Arg] = st.sampled_from(BAD_TIMES)


@st.composite
def set_cmd(draw: st.DrawFn) -> Command:
    opts: list[list[Arg]] = []
    expiry = draw(st.sampled_from(["", "EX", "PX", "EXAT", "PXAT", "KEEPTTL"]))
    if expiry == "KEEPTTL":
        opts.append([draw(_case(b"KEEPTTL"))])
    elif expiry:
        strat = {"EX": ttl_s, "PX": ttl_ms, "EXAT": at_s, "PXAT": at_ms}[expiry]
        bad = bad_at if "AT" in expiry else bad_time
        arg = draw(strat | bad) if draw(st.integers(0, 9)) == 0 else draw(strat)
        opts.append([draw(_case(expiry.encode())), arg])
    cond = draw(st.sampled_from(["", "", "NX", "XX"]))
    if cond:
        opts.append([draw(_case(cond.encode()))])
    if draw(st.integers(0, 3)) == 0:
        opts.append([draw(_case(b"GET"))])
    if draw(st.integers(0, 15)) == 0:  # a conflicting or unknown option: a syntax error
        opts.append([draw(st.sampled_from([b"NX", b"XX", b"KEEPTTL", b"BOGUS", b"EX"]))])
    opts = draw(st.permutations(opts))
    return (b"SET", draw(keys), draw(values), *[a for o in opts for a in o])


@st.composite
def getex_cmd(draw: st.DrawFn) -> Command:
    opt = draw(st.sampled_from(["", "EX", "PX", "EXAT", "PXAT", "PERSIST", "BAD"]))
    key = draw(keys)
    if not opt:
        return (b"GETEX", key)
    if opt == "PERSIST":
        return (b"GETEX", key, draw(_case(b"PERSIST")))
    if opt == "BAD":
        return (b"GETEX", key, *draw(st.sampled_from([(b"EX",), (b"PERSIST", b"1"), (b"BOGUS",), (b"EX", b"1", b"PX", b"1")])))
    strat = {"EX": ttl_s, "PX": ttl_ms, "EXAT": at_s, "PXAT": at_ms}[opt]
    bad = bad_at if "AT" in opt else bad_time
    arg = draw(strat | bad) if draw(st.integers(0, 9)) == 0 else draw(strat)
    return (b"GETEX", key, draw(_case(opt.encode())), arg)


@st.composite
def expire_cmd(draw: st.DrawFn) -> Command:
    name = draw(st.sampled_from([b"EXPIRE", b"PEXPIRE", b"EXPIREAT", b"PEXPIREAT"]))
    strat = {b"EXPIRE": ttl_s, b"PEXPIRE": ttl_ms, b"EXPIREAT": at_s, b"PEXPIREAT": at_ms}[name]
    when: Arg = draw(strat | st.sampled_from([b"0", b"-5", b"abc"])) if draw(st.integers(0, 7)) == 0 else draw(strat)
    flags = draw(st.lists(st.sampled_from([b"NX", b"XX", b"GT", b"LT", b"nx", b"gt"]), max_size=2))
    if draw(st.integers(0, 30)) == 0:
        flags.append(b"BOGUS")
    return (name, draw(keys), when, *flags)


def _key_list(draw: st.DrawFn, most: int) -> list[Key]:
    return draw(st.lists(keys, min_size=1, max_size=most))


@st.composite
def multi_key_cmd(draw: st.DrawFn) -> Command:
    name = draw(st.sampled_from([b"DEL", b"UNLINK", b"EXISTS", b"TOUCH", b"MGET"]))
    if name == b"MGET" and draw(st.integers(0, 9)) == 0:  # a long reply (built in parts past 64 keys)
        return (name, *draw(st.lists(keys, min_size=60, max_size=80)))
    return (name, *_key_list(draw, 5))


@st.composite
def mset_cmd(draw: st.DrawFn) -> Command:
    pairs = draw(st.lists(st.tuples(keys, values), min_size=1, max_size=3))
    return (b"MSET", *[a for p in pairs for a in p])


@st.composite
def counter_cmd(draw: st.DrawFn) -> Command:
    name = draw(st.sampled_from([b"INCR", b"DECR", b"INCRBY", b"DECRBY"]))
    if name in (b"INCR", b"DECR"):
        return (name, draw(keys))
    return (name, draw(keys), draw(amounts))


def _one_key(name: bytes) -> st.SearchStrategy[Command]:
    return st.tuples(st.just(name), keys)


def _key_value(name: bytes) -> st.SearchStrategy[Command]:
    return st.tuples(st.just(name), keys, values)


#: Wrong arities and other refusals Redis decides before running a command.
MISSHAPEN: list[Command] = [
    (b"GET",),
    (b"GET", Key(0), Key(1)),
    (b"SET", Key(0)),
    (b"MSET", Key(0)),
    (b"MSET", Key(0), b"v", Key(1)),
    (b"INCRBY", Key(0)),
    (b"EXPIRE", Key(0)),
    (b"TTL",),
    (b"DEL",),
    (b"MGET",),
    (b"GETSET", Key(0)),
    (b"SETEX", Key(0), b"v"),
    (b"ECHO",),
]

commands: st.SearchStrategy[Command] = st.one_of(
    _one_key(b"GET"),
    set_cmd(),
    _key_value(b"SETNX"),
    st.tuples(st.just(b"SETEX"), keys, ttl_s | bad_time, values),
    st.tuples(st.just(b"PSETEX"), keys, ttl_ms | bad_time, values),
    _key_value(b"GETSET"),
    _one_key(b"GETDEL"),
    getex_cmd(),
    mset_cmd(),
    _one_key(b"STRLEN"),
    _key_value(b"APPEND"),
    counter_cmd(),
    multi_key_cmd(),
    _one_key(b"TYPE"),
    expire_cmd(),
    _one_key(b"TTL"),
    _one_key(b"PTTL"),
    _one_key(b"PERSIST"),
    st.tuples(st.just(b"ECHO"), values),
    st.just((b"PING",)),
    st.tuples(st.just(b"PING"), values),
    st.sampled_from(MISSHAPEN),
    st.sampled_from([(b"NOSUCHCOMMAND", Key(0)), (b"EXEC",), (b"DISCARD",)]),
)


def _cased(cmd: Command, lower: bool) -> Command:
    name = cmd[0]
    assert isinstance(name, bytes)
    return (name.lower(), *cmd[1:]) if lower else cmd


#: Commands with their names in either case (Redis takes any).
any_case_commands = st.builds(_cased, commands, st.booleans())


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    kind = draw(st.sampled_from(["single", "single", "pipeline", "pipeline", "multi", "burst"]))
    if kind == "single":
        return Block("single", (draw(any_case_commands),))
    if kind == "pipeline":
        return Block("pipeline", tuple(draw(st.lists(any_case_commands, min_size=2, max_size=draw(st.sampled_from([8, 8, 30]))))))
    if kind == "burst":  # the same keys read again and again: a master copies them into its near cache
        hot = draw(st.lists(keys, min_size=1, max_size=2, unique=True))
        reads: list[Command] = []
        if draw(st.integers(0, 3)):  # only a key that exists is copied
            reads.append((b"MSET", *[a for k in hot for a in (k, draw(values))]))
        for _ in range(draw(st.integers(12, 24))):
            k = draw(st.sampled_from(hot))
            reads.append(draw(st.sampled_from([(b"GET", k), (b"MGET", *hot), (b"STRLEN", k), (b"EXISTS", k)])))
        return Block("pipeline", tuple(reads), draw(st.booleans()))
    queued = draw(st.lists(any_case_commands.filter(lambda c: c[0] not in (b"EXEC", b"DISCARD", b"exec", b"discard")), max_size=5))
    if draw(st.integers(0, 15)) == 0:
        queued.insert(draw(st.integers(0, len(queued))), (b"MULTI",))  # nested: an error
    end: Command = (b"DISCARD",) if draw(st.integers(0, 4)) == 0 else (b"EXEC",)
    return Block("multi", ((b"MULTI",), *queued, end), draw(st.booleans()))


@dataclass(frozen=True)
class Program:
    """Blocks run on one connection that speaks RESP2 or, after ``HELLO 3``, RESP3."""

    protocol: int
    blocks: tuple[Block, ...]


programs = st.builds(Program, st.sampled_from([2, 2, 3]), st.lists(blocks(), min_size=1, max_size=8).map(tuple))


# -- running and comparing ----------------------------------------------------------------------------

_prefixes = count()


def _render(program: Sequence[Block], prefix: bytes, now_s: float) -> list[list[list[bytes]]]:
    """The program's blocks as lists of commands of bytes: keys prefixed, times resolved (each 3 s from the last)."""
    n = 0
    out: list[list[list[bytes]]] = []
    for block in program:
        rendered: list[list[bytes]] = []
        for cmd in block.commands:
            args: list[bytes] = []
            for a in cmd:
                if isinstance(a, Key):
                    args.append(prefix + b"k%d" % a.i)
                elif isinstance(a, Ttl):
                    n += 1
                    args.append(b"%d" % ((a.seconds + TIME_STEP_S * n) * 1000 // a.unit_ms))
                elif isinstance(a, Big):
                    args.append(a.fill * a.size)
                elif isinstance(a, At):
                    n += 1
                    step = TIME_STEP_S * n if a.offset > 0 else -TIME_STEP_S * n
                    args.append(b"%d" % (int((now_s + a.offset + step) * 1000) // a.unit_ms))
                else:
                    args.append(a)
            rendered.append(args)
        out.append(rendered)
    return out


def _client(port: int, protocol: int = 2) -> Any:
    r = redis.Redis(port=port, socket_timeout=SOCKET_TIMEOUT_S, single_connection_client=True, decode_responses=False, protocol=protocol)
    r.response_callbacks.clear()  # compare what came off the wire, not redis-py's per-command conversions
    return r


def _run(r: Any, program: list[list[list[bytes]]], kinds: Sequence[Block]) -> list[Any]:
    """Every reply of the program, in order: exceptions (error replies) included, never raised."""
    out: list[Any] = []
    for block, cmds in zip(kinds, program, strict=True):
        if block.kind == "single" or not block.pipelined:
            for c in cmds:
                try:
                    out.append(r.execute_command(*c))
                except redis.ResponseError as exc:
                    out.append(exc)
        else:
            pipe = r.pipeline(transaction=False)
            for c in cmds:
                pipe.execute_command(*c)
            out.extend(pipe.execute(raise_on_error=False))
    return out


#: Redis error prefixes that redis-py leaves in the message (it drops ``ERR`` and the ones it has a class for).
KEPT_PREFIXES = frozenset({"WRONGTYPE", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK", "CROSSSLOT", "BUSYKEY", "NOPERM", "LOADING"})


def _error(exc: Exception) -> tuple[str, str]:
    """An error reply as (exception class, Redis prefix): the message's first word if it is a prefix, else ``ERR``.

    (``ERR GT and LT options ...`` reaches us as ``GT and LT options ...``: a first word in capitals is not a prefix.)
    """
    word = str(exc).split(" ", 1)[0]
    return (type(exc).__name__, word if word in KEPT_PREFIXES else "ERR")


def _norm(cmd: list[bytes], reply: Any) -> Any:
    if isinstance(reply, Exception):
        return _error(reply)
    name = cmd[0].upper() if cmd else b""
    if name in (b"TTL", b"PTTL") and isinstance(reply, int):
        return reply if reply < 0 else "positive"
    return reply


def _normalize(program: list[list[list[bytes]]], replies: list[Any]) -> list[Any]:
    """Normalized replies (see the module note); EXEC's elements by the commands queued before it."""
    flat = [c for cmds in program for c in cmds]
    assert len(flat) == len(replies), (len(flat), len(replies))
    out: list[Any] = []
    queued: list[list[bytes]] = []
    in_multi = False
    for cmd, reply in zip(flat, replies, strict=True):
        name = cmd[0].upper()
        if name == b"MULTI":
            if not in_multi:  # a nested MULTI is an error, not queued
                in_multi, queued = True, []
        elif name == b"EXEC" and in_multi:
            in_multi = False
            if isinstance(reply, list) and len(reply) == len(queued):
                out.append([_norm(c, r) for c, r in zip(queued, reply, strict=True)])
                continue
        elif name == b"DISCARD":
            in_multi = False
        elif in_multi:
            queued.append(cmd)
        out.append(_norm(cmd, reply))
    return out


def _show(program: list[list[list[bytes]]], want: list[Any], got: list[Any]) -> str:
    lines = []
    i = 0
    for b, cmds in enumerate(program):
        lines.append(f"-- block {b}")
        for c in cmds:
            shown = " ".join(repr(a[:40]) if len(a) <= 40 else f"<{len(a)} bytes {a[:8]!r}...>" for a in c)
            mark = "   " if want[i] == got[i] else ">>>"
            lines.append(f"{mark} {shown}\n      redis : {_short(want[i])}\n      dcache: {_short(got[i])}")
            i += 1
    return "\n".join(lines)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) < 300 else text[:300] + "..."


def _check(port: int, redis_port: int, program: Program) -> None:
    n = next(_prefixes)
    now = time.time()
    blocks = program.blocks
    ours = _render(blocks, b"d%d:" % n, now)
    theirs = _render(blocks, b"r%d:" % n, now)
    with _client(redis_port, program.protocol) as r:
        want = _normalize(theirs, _run(r, theirs, blocks))
    with _client(port, program.protocol) as d:
        got = _normalize(ours, _run(d, ours, blocks))
    if want != got and REPORT:
        first = next(i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g)
        cmd = [c for cmds in ours for c in cmds][first]
        with open(REPORT, "a") as f:
            f.write(
                f"=== {port} RESP{program.protocol} first difference: {cmd[0]!r} {_short(want[first])} / {_short(got[first])}\n{_show(ours, want, got)}\n"
            )
        return
    if want != got:
        pytest.fail(f"dcache and Redis differ (RESP{program.protocol}):\n" + _show(ours, want, got), pytrace=False)


def _settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        derandomize=not SEED,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def _seeded(f: Any) -> Any:
    return seed(SEED)(f) if SEED else f


def test_a_master_answers_as_redis(master: DaemonProcess, redis_port: int) -> None:
    @_settings(1000)
    @_seeded
    @given(programs)
    def check(program: Program) -> None:
        _check(master.resp_port, redis_port, program)

    before = _near_hits(master.addr)
    check()
    assert _near_hits(master.addr) > before, "the master never answered from its near cache: the bursts did not make keys hot"


def test_a_lone_aux_node_answers_as_redis(lone_aux: DaemonProcess, redis_port: int) -> None:
    @_settings(1000)
    @_seeded
    @given(programs)
    def check(program: Program) -> None:
        _check(lone_aux.resp_port, redis_port, program)

    check()


def _near_hits(addr: str) -> int:
    async def stats() -> int:
        async with Client(addr, timeout=5.0) as c:
            return int((await c.stats()).get("near_cache_hits", 0))

    return asyncio.run(stats())


def test_normalization() -> None:
    """The comparison's own rules: errors by class and prefix, TTLs by bucket, EXEC's elements by their commands."""
    prog = [[[b"MULTI"], [b"TTL", b"k"], [b"GET", b"k"], [b"EXEC"]], [[b"PTTL", b"k"]]]
    replies = [b"OK", b"QUEUED", b"QUEUED", [99, redis.ResponseError("value is not an integer")], 5000]
    assert _normalize(prog, replies) == [b"OK", b"QUEUED", b"QUEUED", ["positive", ("ResponseError", "ERR")], "positive"]
    assert _error(redis.ResponseError("WRONGTYPE Operation against a key")) == ("ResponseError", "WRONGTYPE")
    assert _error(redis.ResponseError("GT and LT options at the same time are not compatible")) == ("ResponseError", "ERR")
    assert _error(redis.exceptions.ExecAbortError("Transaction discarded")) == ("ExecAbortError", "ERR")
    assert _render([Block("single", ((b"EXPIRE", Key(2), Ttl(100, 1)),))], b"p:", 0.0) == [[[b"EXPIRE", b"p:k2", b"103000"]]]
