"""RESP, sans-IO (``dcache.protocol.resp``): the bounded reader, the slow scanner, replies, errors and arguments."""

from __future__ import annotations

import functools

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcache.errors import Status
from dcache.protocol.limits import MAX_MATCH_STEPS
from dcache.protocol.resp import (
    BULK_HEADERS,
    NIL,
    RespError,
    array,
    bulk,
    bulk_chunks,
    create_reader,
    error_for_status,
    error_line,
    glob_matcher,
    glob_steps,
    integer,
    map_reply,
    parse_expire_flags,
    parse_int,
    parse_scan_options,
    parse_set_options,
    reader_cursor,
    reader_is_bounded,
    scan_commands,
    scan_page_count,
    split_inline,
)


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def test_this_hiredis_can_be_bounded() -> None:
    assert reader_is_bounded()


@pytest.mark.parametrize("header", [b"*1001\r\n", b"*2000000000\r\n", b"~1001\r\n", b">1001\r\n", b"*1\r\n*1001\r\n"])
def test_the_reader_refuses_a_large_aggregate_as_its_header_is_read(header: bytes) -> None:
    reader = create_reader(1000)
    reader.feed(header)
    with pytest.raises(hiredis.ProtocolError, match="out of range"):
        reader.gets()


def test_the_reader_takes_the_largest_allowed_command_and_its_cursor_follows() -> None:
    reader = create_reader(3)
    pos, length = reader_cursor(reader)
    reader.feed(command(b"SET", b"k", b"v") + b"*1\r\n$4\r\nPI")
    assert reader.gets() == [b"SET", b"k", b"v"]
    assert length.value - pos.value == 10  # the start of the next command is 10 bytes before the end
    assert reader.gets() is False


@given(st.lists(st.lists(st.binary(max_size=20), min_size=1, max_size=5), max_size=10), st.integers(1, 40))
def test_the_slow_scanner_reads_what_hiredis_reads_split_anywhere(commands: list[list[bytes]], cut: int) -> None:
    data = b"".join(command(*c) for c in commands)
    got, rest = scan_commands(data, 100, 1000)
    assert got == commands and rest == b""
    head, rest = scan_commands(data[:cut], 100, 1000)
    assert head == commands[: len(head)] and data[:cut].endswith(rest)


def test_the_slow_scanner_reads_inline_lines_among_arrays() -> None:
    got, rest = scan_commands(b"\r\n" + command(b"ECHO", b"x") + b"PING\r\nSET a  b\r\n\n" + command(b"GET", b"a") + b"PIN", 10, 100)
    assert got == [[b"ECHO", b"x"], [b"PING"], [b"SET", b"a", b"b"], [b"GET", b"a"]] and rest == b"PIN"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*1\r\n:1\r\n", "expected '\\$'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*11\r\n", "invalid multibulk length"),
        (b"*1\r\n$101\r\n", "invalid bulk length"),
        (b"*1\r\n$1\r\nab\r\n", "CRLF"),
        (b"A" * (65 * 1024), "too big inline request"),
    ],
)
def test_the_slow_scanner_refuses_malformed_streams(data: bytes, message: str) -> None:
    with pytest.raises(RespError, match=message):
        scan_commands(data, 10, 100)


def test_inline_commands_stop_at_the_first_array() -> None:
    assert split_inline(b"PING\r\nSET a b\n\r\n*1\r\n$4\r\nPING\r\n") == ([[b"PING"], [b"SET", b"a", b"b"]], b"*1\r\n$4\r\nPING\r\n")
    assert split_inline(b"PING\r\nGE") == ([[b"PING"]], b"GE")
    with pytest.raises(RespError, match="too big inline request"):
        split_inline(b"x" * (65 * 1024))


@pytest.mark.parametrize("n", [0, 1, 100, len(BULK_HEADERS) - 1, len(BULK_HEADERS), 5000])
def test_a_bulk_reply_is_the_same_with_or_without_a_made_header(n: int) -> None:
    value = bytes(range(256)) * (n // 256) + b"v" * (n % 256)
    assert bulk(value) == b"$%d\r\n%b\r\n" % (n, value) == b"".join(bulk_chunks(value))


def test_replies() -> None:
    assert integer(0) == b":0\r\n" and integer(-2) == b":-2\r\n" and integer(10**12) == b":1000000000000\r\n"
    assert bulk(b"ab") == b"$2\r\nab\r\n" and b"".join(bulk_chunks(b"x" * 5)) == bulk(b"x" * 5)
    assert array([bulk(b"a"), NIL]) == b"*2\r\n$1\r\na\r\n$-1\r\n"
    assert map_reply({"a": 1, "b": None}, resp3=True) == b"%2\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n_\r\n"
    assert map_reply({"a": 1}, resp3=False) == b"*2\r\n$1\r\na\r\n:1\r\n"
    assert error_line("ERR", "two\r\nlines") == b"-ERR two  lines\r\n"


def test_errors_carry_the_prefixes_clients_parse() -> None:
    assert error_for_status(int(Status.NOT_AN_INTEGER), "x") == b"-ERR value is not an integer or out of range\r\n"
    assert error_for_status(int(Status.AUTH_FAILED), "Authentication required.") == b"-NOAUTH Authentication required.\r\n"
    assert error_for_status(int(Status.OUT_OF_MEMORY), "full").startswith(b"-OOM ")
    assert error_for_status(int(Status.BAD_ARGUMENTS), "bad").startswith(b"-ERR bad")
    assert error_for_status(int(Status.OVERLOADED), "input buffer is full") == b"-ERR input buffer is full\r\n"  # not "max clients"


@pytest.mark.parametrize("text", [b"01", b"-0", b"1_0", b" 1", b"+1", b"", b"-", b"1.5", b"99999999999999999999", b"9223372036854775808"])
def test_integers_are_strict(text: bytes) -> None:
    with pytest.raises(RespError, match="not an integer or out of range"):
        parse_int(text)


def test_integers() -> None:
    assert parse_int(b"0") == 0 and parse_int(b"-12") == -12 and parse_int(b"9223372036854775807") == 2**63 - 1


def test_set_options() -> None:
    assert parse_set_options([], 0) == (0, 0, False, False)
    assert parse_set_options([b"ex", b"10", b"NX", b"get"], 0) == (10_000, 1, False, True)
    assert parse_set_options([b"PXAT", b"5000"], 1000) == (4000, 0, False, False)
    assert parse_set_options([b"EXAT", b"1"], 5000) == (-1, 0, False, False)  # already past: the key is deleted
    assert parse_set_options([b"PXAT", b"5000", b"NX"], 5000) == (-1, 1, False, False)
    assert parse_set_options([b"XX", b"KEEPTTL"], 0) == (0, 2, True, False)
    for bad in ([b"NX", b"XX"], [b"EX", b"1", b"PX", b"1"], [b"EX"], [b"KEEPTTL", b"EX", b"1"], [b"BOGUS"]):
        with pytest.raises(RespError, match="syntax error"):
            parse_set_options(bad, 0)
    with pytest.raises(RespError, match="invalid expire time"):
        parse_set_options([b"EX", b"0"], 0)


def test_expire_conditions() -> None:
    assert parse_expire_flags([]) == frozenset()
    assert parse_expire_flags([b"xx", b"GT"]) == {"XX", "GT"}
    with pytest.raises(RespError, match="not compatible"):
        parse_expire_flags([b"NX", b"XX"])
    with pytest.raises(RespError, match="not compatible"):
        parse_expire_flags([b"GT", b"LT"])
    with pytest.raises(RespError, match="Unsupported option"):
        parse_expire_flags([b"SOON"])


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        (b"h?llo", [b"hello", b"hallo"], [b"hllo", b"heello"]),
        (b"h*llo", [b"hllo", b"heeeello"], [b"hellx"]),
        (b"h[ae]llo", [b"hello", b"hallo"], [b"hillo"]),
        (b"h[^e]llo", [b"hallo", b"hbllo"], [b"hello"]),
        (b"h[a-b]llo", [b"hallo", b"hbllo"], [b"hcllo"]),
        (b"a\\*b", [b"a*b"], [b"axb"]),  # an escaped star is a star
        (b"a.b", [b"a.b"], [b"axb"]),  # regex characters are literal
        (b"user:*", [b"user:", b"user:1\nx"], [b"users"]),  # * spans newlines
        (b"[", [b"["], [b"x"]),  # an unterminated class is literal, as in Redis
    ],
)
def test_scan_match_is_a_redis_glob(pattern: bytes, matches: list[bytes], misses: list[bytes]) -> None:
    match = glob_matcher(pattern)
    assert all(match(k) for k in matches) and not any(match(k) for k in misses)


def _reference_glob(pattern: bytes, key: bytes) -> bool:
    """Redis's ``stringmatchlen`` for ``*``, ``?``, ``[...]`` over plain bytes, by memoised recursion (slow, obviously right)."""

    @functools.cache
    def at(p: int, k: int) -> bool:
        if p == len(pattern):
            return k == len(key)
        c = pattern[p : p + 1]
        if c == b"*":
            return at(p + 1, k) or (k < len(key) and at(p, k + 1))
        if k == len(key):
            return False
        if c == b"?":
            return at(p + 1, k + 1)
        if c == b"[" and b"]" in pattern[p + 1 :]:
            end = pattern.index(b"]", p + 1)
            return key[k : k + 1] in pattern[p + 1 : end] and at(end + 1, k + 1)
        return key[k : k + 1] == c and at(p + 1, k + 1)

    return at(0, 0)


@given(
    st.binary(max_size=12).map(lambda b: bytes(b"ab*?["[x % 5] for x in b)),
    st.binary(max_size=12).map(lambda b: bytes(b"ab"[x % 2] for x in b)),
)
def test_scan_match_agrees_with_redis_glob_semantics(raw: bytes, key: bytes) -> None:
    pattern = raw.replace(b"[", b"[ab]")  # classes always closed here
    assert glob_matcher(pattern)(key) == _reference_glob(pattern, key), (pattern, key)


@pytest.mark.timeout(10)
def test_scan_match_does_not_backtrack_exponentially() -> None:
    match = glob_matcher(b"*a" * 12 + b"*b")  # one regex with .* per star never finished on this key
    assert not match(b"a" * 1000) and match(b"a" * 1000 + b"b")
    assert not glob_matcher(b"*" + b"?" * 500 + b"b*")(b"a" * 1024)


def test_scan_options() -> None:
    assert parse_scan_options([], 1024) == (None, 10, None)
    assert parse_scan_options([b"match", b"k:*", b"COUNT", b"500", b"TYPE", b"String"], 1024) == (b"k:*", 500, b"string")
    assert parse_scan_options([b"MATCH", b"*"], 1024) == (None, 10, None)  # everything: no filter
    assert parse_scan_options([b"COUNT", b"99999999"], 1024)[1] == 10_000  # a hint, capped at the native SCAN's most
    for bad in ([b"COUNT", b"0"], [b"COUNT"], [b"NOPE", b"1"], [b"COUNT", b"x"], [b"MATCH", b"*" * 16385]):
        with pytest.raises(RespError):
            parse_scan_options(bad, 1024)


#: The most byte steps a pattern costs on a key: ``*``, ``n`` classes that match any printable byte, then ``c*``.
def _costly(n: int) -> bytes:
    return b"*" + b"[!-~]" * n + b"c*"


def test_glob_steps_bound_what_a_key_costs() -> None:
    assert glob_steps(b"user:*", 1024) == 5  # anchored: its length
    assert glob_steps(b"abc", 1024) == 3
    assert glob_steps(b"*x*", 1024) == 1024  # a literal middle piece: one linear search
    assert glob_steps(b"*foo?*", 1024) == 4 * 1024  # any other: tried at each place of the key
    assert glob_steps(_costly(1000), 1024) == 1024 * 1001
    assert glob_steps(b"*" + b"?" * 2000 + b"*", 1024) == 1  # longer than any key: the length test rejects it
    assert glob_steps(b"?" * 3000, 1024) == 1024  # no stars: anchored, at most the key


def test_a_costly_match_shrinks_the_page_asked_of_a_node() -> None:
    assert parse_scan_options([b"MATCH", b"user:*", b"COUNT", b"10000"], 1024)[1] == 10_000  # cheap: as asked
    _, count, _ = parse_scan_options([b"MATCH", _costly(1000), b"COUNT", b"10000"], 1024)
    assert count == MAX_MATCH_STEPS // (1024 * 1001) and 1 <= count < 10
    assert parse_scan_options([b"MATCH", _costly(1000), b"COUNT", b"3"], 1024)[1] == 3  # never more than asked
    # the worst pattern on the default 1 KiB keys still lists one key a call
    assert min(scan_page_count(_costly(n), 1024) for n in range(0, 1024, 8)) >= 1
    with pytest.raises(RespError, match="too costly"):  # one key of a node with 64 KiB keys would cost more
        parse_scan_options([b"MATCH", _costly(3000), b"COUNT", b"10"], 64 * 1024)
