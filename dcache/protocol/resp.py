"""RESP, Redis's protocol, for dcache's second front door (sans-IO).

Requests are parsed by hiredis (a C parser); this module bounds it, and
builds replies and Redis-style errors. It has no sockets and no loop: the
connection shell is ``dcache.respserver``, which turns each command into the
native op's request and runs it through the connection's op table, so a
RESP command is checked by the same parser (``dcache.protocol.ops``) as its
native op.

**Bounding hiredis.** hiredis allocates an aggregate's list as soon as its
header (``*N``) is read: ``*2000000000`` costs 16 GB of address space, and
freeing it walks every slot (3.7 s measured). The C reader has a
``maxelements`` bound but hiredis-py does not expose it, so
``create_reader`` sets it through the reader's struct, after checking at
import that the struct is laid out as expected (``setmaxbuf`` and the
default bound are found where hiredis 1.x puts them) and that a reader so
bounded refuses one element more. If the check fails (another hiredis
build), ``create_reader`` raises: the RESP port refuses to start rather than
run unbounded. Nesting is bounded by hiredis itself; a bulk string is not
preallocated (its bytes are counted by the connection as they arrive).

**Replies.** Frequent replies are module constants (``OK``, ``PONG``,
``NIL``, the small integers); a bulk string is one ``bytes`` formatted in
one allocation, or three chunks for a large value (no copy of the value).
RESP3 (``HELLO 3``) changes only nulls and maps here.

**Inline commands** (``PING\\r\\n``, as telnet and redis-benchmark's
PING_INLINE send them) are split here by ``split_inline``; the shell uses it
only where a command starts with a byte other than ``*``.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from typing import Any

import hiredis

from ..errors import DCacheError, Status
from .limits import INT64_MAX, INT64_MIN, MAX_ARRAY_ITEMS, MAX_MATCH_PATTERN_BYTES, MAX_MATCH_STEPS, MAX_TTL_MS

__all__ = [
    "BULK_HEADERS",
    "CRLF",
    "EMPTY_ARRAY",
    "INLINE_MAX_BYTES",
    "LARGE_BULK_BYTES",
    "NIL",
    "NIL3",
    "NIL_ARRAY",
    "OK",
    "ONE",
    "PONG",
    "QUEUED",
    "RespError",
    "ZERO",
    "array",
    "bulk",
    "bulk_chunks",
    "create_reader",
    "glob_matcher",
    "glob_steps",
    "error_line",
    "error_for_status",
    "integer",
    "map_reply",
    "max_command_args",
    "parse_int",
    "parse_expire_flags",
    "parse_scan_options",
    "parse_set_options",
    "reader_cursor",
    "reader_is_bounded",
    "scan_commands",
    "scan_page_count",
    "simple",
    "split_inline",
    "verbatim",
]

CRLF = b"\r\n"
_join = b"".join
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
QUEUED = b"+QUEUED\r\n"
#: A null bulk string (RESP2) and RESP3's null.
NIL = b"$-1\r\n"
NIL3 = b"_\r\n"
#: A null array (RESP2: EXEC after a failed WATCH; unused) and an empty one.
NIL_ARRAY = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"
_SMALL_INTS = [b":%d\r\n" % i for i in range(-2, 1025)]
#: A bulk string at least this long goes out as three chunks, the value itself uncopied.
LARGE_BULK_BYTES = 64 * 1024
#: The header of each bulk string shorter than ``len(BULK_HEADERS)`` bytes, made once: a reply is then one
#: ``join`` (about 1,100 instructions for a 100-byte value) instead of a ``%`` format (about 1,650).
BULK_HEADERS: tuple[bytes, ...] = tuple(b"$%d\r\n" % n for n in range(1024))
#: Longest inline command line (Redis's PROTO_INLINE_MAX_SIZE).
INLINE_MAX_BYTES = 64 * 1024


class RespError(DCacheError):
    """A command refused with a Redis-style error: ``-PREFIX message``.

    Attributes:
        line: the whole reply (``-ERR syntax error\\r\\n``).
    """

    def __init__(self, message: str, prefix: str = "ERR") -> None:
        super().__init__(f"{prefix} {message}")
        self.line = error_line(prefix, message)


# -- hiredis, bounded -------------------------------------------------------------

#: Offsets in hiredis's ``redisReader`` (hiredis 1.x, 64-bit): ``int err; char
#: errstr[128]; char *buf; size_t pos, len, maxbuf; long long maxelements; ...``.
_POS_OFFSET = 144
_LEN_OFFSET = 152
_MAXBUF_OFFSET = 160
_MAXELEMENTS_OFFSET = 168
#: hiredis's default ``maxelements`` (``REDIS_READER_MAX_ARRAY_ELEMENTS``).
_DEFAULT_MAXELEMENTS = (1 << 32) - 1
#: Where hiredis-py's Reader object keeps its ``redisReader *`` (after ``PyObject_HEAD``).
_READER_POINTER_OFFSET = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)


def _struct_of(reader: hiredis.Reader) -> int:
    return int(ctypes.c_void_p.from_address(id(reader) + _READER_POINTER_OFFSET).value or 0)


def _set_max_elements(reader: hiredis.Reader, n: int) -> None:
    ctypes.c_longlong.from_address(_struct_of(reader) + _MAXELEMENTS_OFFSET).value = n


def _check_layout() -> bool:
    """Whether hiredis's reader struct is where ``_set_max_elements`` writes, and the bound works."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    try:
        probe = hiredis.Reader()
        addr = _struct_of(probe)
        if not addr:
            return False
        probe.setmaxbuf(0x5A5A1234)
        if ctypes.c_size_t.from_address(addr + _MAXBUF_OFFSET).value != 0x5A5A1234:
            return False
        if ctypes.c_longlong.from_address(addr + _MAXELEMENTS_OFFSET).value != _DEFAULT_MAXELEMENTS:
            return False
        _set_max_elements(probe, 3)
        probe.feed(b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n+x")
        if probe.gets() != [b"a", b"b", b"c"]:
            return False
        pos = ctypes.c_size_t.from_address(addr + _POS_OFFSET).value
        if pos != 25 or ctypes.c_size_t.from_address(addr + _LEN_OFFSET).value != 27:
            return False
        probe = hiredis.Reader()
        _set_max_elements(probe, 3)
        probe.feed(b"*4\r\n")
        try:
            probe.gets()
        except hiredis.ProtocolError:
            return True
        return False
    except Exception:  # pragma: no cover - a hiredis this check does not know
        return False


_BOUNDED = _check_layout()


def reader_is_bounded() -> bool:
    """Whether this hiredis build lets ``create_reader`` bound aggregate headers (checked once, at import)."""
    return _BOUNDED


def max_command_args(max_batch_keys: int) -> int:
    """Most arguments a command may carry: room for an MSET of ``max_batch_keys`` pairs, at least ``MAX_ARRAY_ITEMS``."""
    return max(MAX_ARRAY_ITEMS, 2 * max_batch_keys + 1)


def reader_cursor(reader: hiredis.Reader) -> tuple[ctypes.c_size_t, ctypes.c_size_t]:
    """Live views of a bounded reader's buffer cursor and length: ``len - pos`` bytes are not parsed yet.

    Read them to know where in the stream the reader stands (the shell does
    so after each command, to find where the next one starts). Valid while
    ``reader`` lives.
    """
    addr = _struct_of(reader)
    return ctypes.c_size_t.from_address(addr + _POS_OFFSET), ctypes.c_size_t.from_address(addr + _LEN_OFFSET)


def create_reader(max_elements: int) -> hiredis.Reader:
    """A hiredis reader that refuses any aggregate header of more than ``max_elements`` items.

    Such a header raises ``hiredis.ProtocolError`` ("Multi-bulk length out of
    range") as it is read, before anything is allocated for it.

    Raises:
        RuntimeError: this hiredis build cannot be bounded (see the module note).
    """
    if not _BOUNDED:
        raise RuntimeError(
            f"hiredis {hiredis.__version__}: cannot bound the RESP reader's aggregate headers "
            "(its reader struct is not laid out as dcache expects); install hiredis 3.x"
        )
    reader = hiredis.Reader()
    _set_max_elements(reader, max_elements)
    return reader


def split_inline(data: bytes) -> tuple[list[list[bytes]], bytes]:
    """Split inline commands (``SET k v\\r\\n``) off the front of ``data``.

    Returns the commands (each a list of whitespace-separated words; empty
    lines are skipped) and the rest: bytes from the first line that starts
    with ``*`` (a RESP array, for hiredis), or an unfinished last line.
    Quotes are not interpreted.

    Raises:
        RespError: a line longer than ``INLINE_MAX_BYTES``.
    """
    commands: list[list[bytes]] = []
    pos = 0
    n = len(data)
    while pos < n and data[pos] != 42:  # b"*"
        end = data.find(b"\n", pos)
        if end < 0:
            if n - pos > INLINE_MAX_BYTES:
                raise RespError("Protocol error: too big inline request")
            break
        if end - pos > INLINE_MAX_BYTES:
            raise RespError("Protocol error: too big inline request")
        words = data[pos:end].split()
        if words:
            commands.append(words)
        pos = end + 1
    return commands, data[pos:]


def _length(field: bytes, what: str) -> int:
    if not field.isdigit() or len(field) > 19:
        raise RespError(f"Protocol error: invalid {what} length")
    return int(field)


def scan_commands(data: bytes, max_args: int, max_bulk: int) -> tuple[list[list[bytes]], bytes]:
    """Split complete commands off the front of ``data``: inline lines and arrays of bulk strings (a slow path).

    Exact where hiredis alone is not: a stream that mixes arrays with inline
    lines (redis-cli ``--pipe`` sends an empty line before its last command).
    The shell uses it only to recover after hiredis refused such a stream.
    Returns the commands and the bytes of the first incomplete one.

    Raises:
        RespError: a malformed array, more than ``max_args`` arguments, a
            bulk string longer than ``max_bulk``, or too long an inline line.
    """
    out: list[list[bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] != 42:  # an inline line
            end = data.find(b"\n", pos)
            if end < 0:
                if n - pos > INLINE_MAX_BYTES:
                    raise RespError("Protocol error: too big inline request")
                break
            words = data[pos:end].split()
            if words:
                out.append(words)
            pos = end + 1
            continue
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        count = _length(data[pos + 1 : end], "multibulk")
        if count > max_args:
            raise RespError("Protocol error: invalid multibulk length")
        p = end + 2
        args: list[bytes] = []
        while len(args) < count:
            if p >= n:
                break
            if data[p] != 36:  # b"$"
                raise RespError(f"Protocol error: expected '$', got '{chr(data[p])}'")
            e = data.find(b"\r\n", p)
            if e < 0:
                break
            size = _length(data[p + 1 : e], "bulk")
            if size > max_bulk:
                raise RespError("Protocol error: invalid bulk length")
            if e + size + 4 > n:
                break
            if data[e + 2 + size : e + 4 + size] != b"\r\n":
                raise RespError("Protocol error: a bulk string does not end with CRLF")
            args.append(data[e + 2 : e + 2 + size])
            p = e + 4 + size
        if len(args) < count:
            break
        if args:
            out.append(args)
        pos = p
    return out, data[pos:]


# -- replies --------------------------------------------------------------------------


def simple(text: str) -> bytes:
    """A simple string (``+text``); ``text`` must not hold CR or LF."""
    return b"+" + text.encode() + CRLF


def integer(n: int) -> bytes:
    """An integer reply."""
    if -2 <= n <= 1024:
        return _SMALL_INTS[n + 2]
    return b":%d\r\n" % n


def bulk(value: bytes) -> bytes:
    """A bulk string, in one allocation (see ``bulk_chunks`` for large values)."""
    n = len(value)
    if n < len(BULK_HEADERS):
        return _join((BULK_HEADERS[n], value, CRLF))
    return b"$%d\r\n%b\r\n" % (n, value)


def bulk_chunks(value: bytes) -> list[bytes]:
    """A bulk string as ``[header, value, CRLF]``: the value is not copied."""
    return [b"$%d\r\n" % len(value), value, CRLF]


def verbatim(text: str, resp3: bool) -> bytes:
    """A long text reply (INFO): RESP3's verbatim string, or a bulk string."""
    body = text.encode()
    if resp3:
        return b"=%d\r\ntxt:%b\r\n" % (len(body) + 4, body)
    return bulk(body)


def array(items: list[bytes]) -> bytes:
    """An array of already-encoded replies."""
    return b"*%d\r\n%b" % (len(items), b"".join(items))


def _encode(value: Any, resp3: bool) -> bytes:
    if value is None:
        return NIL3 if resp3 else NIL
    if value is True or value is False:
        return integer(int(value))
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return bulk(value.encode())
    if isinstance(value, bytes):
        return bulk(value)
    if isinstance(value, dict):
        return map_reply(value, resp3)
    if isinstance(value, (list, tuple)):
        return array([_encode(v, resp3) for v in value])
    return bulk(str(value).encode())


def map_reply(pairs: dict[str, Any], resp3: bool) -> bytes:
    """A map (RESP3 ``%``) or a flat array of keys and values (RESP2); values of str, bytes, int, None, lists or maps."""
    body = b"".join(_encode(k, resp3) + _encode(v, resp3) for k, v in pairs.items())
    if resp3:
        return b"%%%d\r\n%b" % (len(pairs), body)
    return b"*%d\r\n%b" % (2 * len(pairs), body)


def error_line(prefix: str, message: str) -> bytes:
    """``-PREFIX message\\r\\n``, with any CR or LF in the message turned into spaces."""
    text = f"{prefix} {message}" if message else prefix
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode(errors="replace") + CRLF


#: Native status -> the Redis error prefix clients parse (redis-py maps
#: ``NOAUTH``, ``WRONGPASS``, ``OOM``, ``EXECABORT``... to its exception classes).
_PREFIXES = {
    int(Status.AUTH_FAILED): "NOAUTH",
    int(Status.OUT_OF_MEMORY): "OOM",
    int(Status.UNAVAILABLE): "CLUSTERDOWN",
    int(Status.UPSTREAM_TIMEOUT): "TRYAGAIN",
    int(Status.STALE_RING): "TRYAGAIN",
}
_NOT_AN_INTEGER = int(Status.NOT_AN_INTEGER)


def error_for_status(status: int, message: Any) -> bytes:
    """The RESP error for a native error status and message.

    ``NOT_AN_INTEGER`` becomes Redis's exact ``ERR value is not an integer or
    out of range``, which clients recognise; the others keep dcache's message
    behind the closest Redis prefix (``ERR`` by default). ``OVERLOADED`` is
    either bound (connections or input buffer), so its message says which;
    the connection limit's own Redis wording is chosen where the connection
    is refused (``RespProtocol.connection_error``).
    """
    if status == _NOT_AN_INTEGER:
        return b"-ERR value is not an integer or out of range\r\n"
    return error_line(_PREFIXES.get(status, "ERR"), str(message))


# -- arguments -------------------------------------------------------------------------

_NOT_INT = "value is not an integer or out of range"


def parse_int(arg: bytes, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """A signed decimal integer argument within ``low .. high`` (no sign but ``-``, no leading zeros, no spaces).

    Raises:
        RespError: ``ERR value is not an integer or out of range``.
    """
    digits = arg[1:] if arg[:1] == b"-" else arg
    if not digits.isdigit() or len(digits) > 19 or (digits[0] == 48 and (len(digits) > 1 or arg[0] == 45)):
        raise RespError(_NOT_INT)
    n = int(arg)
    if not low <= n <= high:
        raise RespError(_NOT_INT)
    return n


def _expire_time(arg: bytes) -> int:
    n = parse_int(arg)
    if n <= 0:
        raise RespError("invalid expire time in 'set' command")
    return n


def parse_set_options(args: list[bytes], now_ms: int) -> tuple[int, int, bool, bool]:
    """SET's options after the key and value -> ``(ttl_ms or 0, flags, keepttl, get)``.

    ``flags``: 0, 1 (NX) or 2 (XX), as the native SET. EX/PX give a relative
    TTL; EXAT/PXAT an absolute one, turned into what is left of it, or -1 for
    a time already past (the SET then deletes the key, as Redis does).

    Raises:
        RespError: ``ERR syntax error`` for a repeated, conflicting or unknown
            option; ``ERR invalid expire time in 'set' command``.
    """
    ttl = 0
    flags = 0
    keepttl = get = False
    expiry_given = False
    i = 0
    n = len(args)
    while i < n:
        opt = args[i].upper()
        if opt in (b"EX", b"PX", b"EXAT", b"PXAT"):
            if expiry_given or keepttl or i + 1 >= n:
                raise RespError("syntax error")
            value = _expire_time(args[i + 1])
            if opt == b"EX":
                ms = value * 1000
            elif opt == b"PX":
                ms = value
            elif opt == b"EXAT":
                ms = value * 1000 - now_ms
            else:
                ms = value - now_ms
            if ms <= 0:
                ms = -1
            if ms > MAX_TTL_MS:
                raise RespError("invalid expire time in 'set' command")
            ttl = ms
            expiry_given = True
            i += 2
            continue
        if opt == b"NX" and flags != 2:
            flags = 1
        elif opt == b"XX" and flags != 1:
            flags = 2
        elif opt == b"KEEPTTL" and not expiry_given:
            keepttl = True
        elif opt == b"GET":
            get = True
        else:
            raise RespError("syntax error")
        i += 1
    return ttl, flags, keepttl, get


def parse_expire_flags(args: list[bytes]) -> frozenset[str]:
    """EXPIRE's optional conditions: a subset of ``NX``, ``XX``, ``GT``, ``LT`` (``XX`` may go with ``GT`` or ``LT``).

    Raises:
        RespError: an unknown option, or two that exclude each other (Redis's wording).
    """
    found: set[str] = set()
    for a in args:
        opt = a.upper().decode(errors="replace")
        if opt not in ("NX", "XX", "GT", "LT"):
            raise RespError(f"Unsupported option {a.decode(errors='replace')}")
        found.add(opt)
    if "NX" in found and len(found) > 1:
        raise RespError("NX and XX, GT or LT options at the same time are not compatible")
    if {"GT", "LT"} <= found:
        raise RespError("GT and LT options at the same time are not compatible")
    return frozenset(found)


#: SCAN's COUNT when none is given, and the most one call asks of a node (Redis's default; the native SCAN's cap).
SCAN_DEFAULT_COUNT = 10
SCAN_MAX_COUNT = 10_000


def parse_scan_options(args: list[bytes], max_key_bytes: int) -> tuple[bytes | None, int, bytes | None]:
    """SCAN's options after the cursor: ``(MATCH pattern or None, COUNT, TYPE or None)``.

    COUNT is a hint, as in Redis: at least 1, at most ``SCAN_MAX_COUNT`` is
    asked of a node, and with a MATCH pattern at most what
    ``scan_page_count`` allows for keys of up to ``max_key_bytes`` bytes.

    Raises:
        RespError: an unknown option, a missing value, a COUNT below 1 (Redis's wording), a
            pattern longer than ``MAX_MATCH_PATTERN_BYTES`` or costlier than ``scan_page_count`` allows.
    """
    pattern: bytes | None = None
    count = SCAN_DEFAULT_COUNT
    kind: bytes | None = None
    i = 0
    while i < len(args):
        opt = args[i].upper()
        if i + 1 >= len(args) or opt not in (b"MATCH", b"COUNT", b"TYPE"):
            raise RespError("syntax error")
        value = args[i + 1]
        if opt == b"MATCH":
            if len(value) > MAX_MATCH_PATTERN_BYTES:
                raise RespError(f"MATCH pattern longer than {MAX_MATCH_PATTERN_BYTES} bytes")
            pattern = None if value == b"*" else value
        elif opt == b"COUNT":
            count = parse_int(value)
            if count < 1:
                raise RespError("syntax error")
            count = min(count, SCAN_MAX_COUNT)
        else:
            kind = value.lower()
        i += 2
    if pattern is not None:
        count = min(count, scan_page_count(pattern, max_key_bytes))
    return pattern, count, kind


def scan_page_count(pattern: bytes, max_key_bytes: int) -> int:
    """Most keys one SCAN call may match against ``pattern``: its matching costs at most ``MAX_MATCH_STEPS``.

    A key costs at most ``glob_steps(pattern, max_key_bytes)``; the call asks
    a node for that many fewer keys (at least one), and a call that lists
    fewer keys than COUNT keeps its cursor, as Redis allows. For every
    pattern on a node with the default 1 KiB keys one key fits the budget
    (a pattern costs at most key x key steps there).

    Raises:
        RespError: one key alone would cost more than ``MAX_MATCH_STEPS`` (only a node whose
            ``--max-key-bytes`` is above about 2.8 KiB, with a long pattern of ``?`` or classes).
    """
    steps = glob_steps(pattern, max_key_bytes)
    if steps > MAX_MATCH_STEPS:
        raise RespError(f"MATCH pattern too costly for keys of up to {max_key_bytes} bytes (use fewer ? and [...] between stars)")
    return MAX_MATCH_STEPS // steps


def _glob_tokens(pattern: bytes) -> list[bytes | None]:
    """A Redis glob as tokens: ``None`` for ``*``, else a regular expression matching exactly one byte."""
    out: list[bytes | None] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c == b"*":
            out.append(None)
        elif c == b"?":
            out.append(b".")
        elif c == b"\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i : i + 1]))
        elif c == b"[":
            j = i + 1
            negate = pattern[j : j + 1] == b"^"
            if negate:
                j += 1
            items: list[bytes] = []
            while j < n and pattern[j : j + 1] != b"]":
                if pattern[j : j + 1] == b"\\" and j + 1 < n:
                    j += 1
                    items.append(re.escape(pattern[j : j + 1]))
                elif pattern[j + 1 : j + 2] == b"-" and j + 2 < n and pattern[j + 2 : j + 3] != b"]":
                    lo, hi = sorted((pattern[j : j + 1], pattern[j + 2 : j + 3]))
                    items.append(re.escape(lo) + b"-" + re.escape(hi))
                    j += 2
                else:
                    items.append(re.escape(pattern[j : j + 1]))
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(items) + b"]" if items else (b"[^\\s\\S]" if not negate else b"."))
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return out


def _glob_pieces(pattern: bytes) -> list[list[bytes]]:
    """A Redis glob's tokens between its stars: one list per piece (empty where two stars touch)."""
    pieces: list[list[bytes]] = [[]]
    for token in _glob_tokens(pattern):
        if token is None:
            pieces.append([])
        else:
            pieces[-1].append(token)
    return pieces


def glob_steps(pattern: bytes, key_bytes: int) -> int:
    """The most byte steps ``glob_matcher(pattern)`` spends on one key of at most ``key_bytes`` bytes (at least 1).

    An anchored piece (before the first star, after the last, or the whole
    pattern without stars) costs its length at most. A middle piece is
    searched for: literal bytes by a linear search (``key_bytes`` steps),
    any other piece is tried at each place of the key (``key_bytes`` x its
    length: ``*`` then 1000 ``[!-~]`` then ``c*`` took about 4 ms a 1 KiB
    key, 4 ns a step). A pattern with stars that needs more bytes than any
    key has costs one step: the length test rejects each key first.
    """
    pieces = _glob_pieces(pattern)
    if len(pieces) == 1:
        return max(1, min(len(pieces[0]), key_bytes))
    if sum(map(len, pieces)) > key_bytes:
        return 1
    middle = sum(len(p) if any(t == b"." or t[:1] == b"[" for t in p) else 1 for p in pieces[1:-1] if p)
    return max(1, len(pieces[0]) + len(pieces[-1]) + key_bytes * middle)


def glob_matcher(pattern: bytes) -> Callable[[bytes], bool]:
    """A test of whether a key matches a Redis glob: ``*``, ``?``, ``[abc]``, ``[^a-z]`` and ``\\`` escapes.

    The pattern is compiled once (per SCAN call, not per key) into the
    fixed-length pieces between its stars, each a regular expression with
    no repetition. A key matches if the first piece matches at its start,
    the last at its end, and each middle piece at its leftmost place after
    the one before (the earliest place leaves the most room to the rest, so
    this is exact). No step backtracks over an earlier piece: a test costs
    at most about (key length x pattern length) byte comparisons, where a
    single regular expression with ``.*`` for each star backtracks
    exponentially (``*a*a*a*a*a*a*a*a*a*a*a*a*b`` against a key of 200
    ``a`` never finished). An unterminated ``[`` matches itself, as in
    Redis's ``stringmatchlen``.
    """
    pieces = _glob_pieces(pattern)
    if len(pieces) == 1:
        whole = re.compile(b"".join(pieces[0]), re.DOTALL)
        return lambda key: whole.fullmatch(key) is not None
    first = re.compile(b"".join(pieces[0]), re.DOTALL)
    middle = [(re.compile(b"".join(p), re.DOTALL), len(p)) for p in pieces[1:-1] if p]
    last = re.compile(b"".join(pieces[-1]), re.DOTALL)
    head = len(pieces[0])
    tail = len(pieces[-1])
    least = head + tail + sum(size for _, size in middle)

    def match(key: bytes) -> bool:
        end = len(key) - tail
        if len(key) < least or first.match(key) is None or last.match(key, end) is None:
            return False
        pos = head
        for rx, _ in middle:
            found = rx.search(key, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True

    return match
