"""The op table: one validated parser per op, and the credential each op requires (sans-IO).

Every front door (the native protocol on aux nodes and masters, and any
later one) turns a decoded request ``[op, request_id, *args]`` into plain,
valid values with the op's parser, so role code only ever sees parsed
requests. A parser checks arity, types and ranges (keys, values, TTLs,
versions, counts) against the node's ``Limits`` and raises a typed
``ServerError``; it never changes state. ``OPS`` maps each op to its
``OpSpec``: the parser, the one credential the op requires, and whether a
client may repeat it after a lost connection.

What each parser returns is listed in ``OpSpec.parse``'s docstring and in
docs/PROTOCOL.md; a test enumerates the table.

Hot path: a parser is one function call per request. The common cases
(a ``bytes`` key of legal length) are tested first with a class check and a
length comparison; the slower normalising paths run only for other types.
Versions from outside are compared against ``Limits.version_ceiling()``
once per request, not once per entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

import msgpack

from ..errors import (
    BadArgumentsError,
    ClockSkewError,
    HandshakeError,
    KeyTooLargeError,
    TooManyKeysError,
    ValueTooLargeError,
)
from .limits import (
    INT64_MAX,
    INT64_MIN,
    MAX_ARRAY_ITEMS,
    MAX_HOT_KEYS,
    MAX_NAME_CHARS,
    MAX_RANGES,
    MAX_TTL_MS,
    MAX_WEIGHT,
    UINT64_MAX,
    Limits,
)
from .messages import Op, SetFlag

if TYPE_CHECKING:
    from ..ring import RangeMatcher

__all__ = [
    "Credential",
    "OpSpec",
    "OPS",
    "Parser",
    "check_key",
    "check_value",
    "parse_request_id",
    "unpack_entries",
]

#: A parser: the whole decoded request and the node's limits in, the parsed arguments out.
Parser = Callable[[list[Any], Limits], Any]

_NX = SetFlag.NX.value
_XX = SetFlag.XX.value
_FLAGS = (SetFlag.NONE.value, _NX, _XX)
#: A master's SETV and MSETV entries may also say KEEP_COPY.
_SETV_FLAGS = (*_FLAGS, SetFlag.KEEP_COPY.value)


class Credential(IntEnum):
    """What a connection must have proved before it may send an op (ordered: each level includes the ones below).

    * ``NONE``: anyone (HELLO, which is how a connection proves anything).
    * ``CLIENT``: the client token, when the node has one (data ops).
    * ``CLUSTER``: a cluster peer (membership, versioned writes, imports, scans, drops).
    """

    NONE = 0
    CLIENT = 1
    CLUSTER = 2


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op of the protocol.

    Attributes:
        op: the op code.
        name: its name, as in docs/PROTOCOL.md and the metrics' ``op`` label.
        credential: the one credential it requires.
        arity: (least, most) arguments after the request id; the parser enforces it.
        parse: its parser (see each ``_parse_*`` function for what it returns).
        retry_safe: whether a client may send it again after a lost connection
            (reads and last-writer-wins writes; SET is decided per request by its flags).
    """

    op: Op
    name: str
    credential: Credential
    arity: tuple[int, int]
    parse: Parser
    retry_safe: bool


# -- building blocks -----------------------------------------------------------


def _as_bytes(value: Any, what: str) -> bytes:
    """``value`` as bytes: a ``str`` UTF-8 encoded, another buffer copied; else ``BadArgumentsError``."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise BadArgumentsError(f"{what} must be bytes or str, not {type(value).__name__}")


def check_key(key: Any, limits: Limits) -> bytes:
    """Return ``key`` as bytes or raise a typed argument error.

    A msgpack ``str`` key is accepted and UTF-8 encoded, so clients in other
    languages may send either type.

    Raises:
        BadArgumentsError: not bytes or str, or empty.
        KeyTooLargeError: longer than ``limits.max_key_bytes``.
    """
    k = key if key.__class__ is bytes else _as_bytes(key, "key")
    if len(k) > limits.max_key_bytes:
        raise KeyTooLargeError(f"key of {len(k)} bytes exceeds the limit of {limits.max_key_bytes}")
    if not k:
        raise BadArgumentsError("key must not be empty")
    return k


def check_value(value: Any, limits: Limits) -> bytes:
    """Return ``value`` as bytes or raise a typed argument error.

    Raises:
        BadArgumentsError: not bytes or str.
        ValueTooLargeError: longer than ``limits.max_value_bytes``.
    """
    v = value if value.__class__ is bytes else _as_bytes(value, "value")
    if len(v) > limits.max_value_bytes:
        raise ValueTooLargeError(f"value of {len(v)} bytes exceeds the limit of {limits.max_value_bytes}")
    return v


def parse_request_id(rid: Any) -> int:
    """A request id: an integer in ``1 .. 2**64-1`` (0 is reserved for connection-level errors).

    Raises:
        BadArgumentsError: anything else.
    """
    if rid.__class__ is not int or not 0 < rid <= UINT64_MAX:
        raise BadArgumentsError("request_id must be an integer in 1 .. 2**64-1")
    return int(rid)


def _key(key: Any, limits: Limits) -> bytes:
    if key.__class__ is bytes and 0 < len(key) <= limits.max_key_bytes:
        return key
    return check_key(key, limits)


def _keys(keys: Any, limits: Limits, what: str) -> list[bytes]:
    if keys.__class__ is not list:
        raise BadArgumentsError(f"{what} takes a list of keys")
    if len(keys) > limits.max_batch_keys:
        raise TooManyKeysError(f"{len(keys)} keys in one {what} exceed the limit of {limits.max_batch_keys}: split the request")
    max_key = limits.max_key_bytes
    out = cast(list[bytes], keys)
    for i, k in enumerate(keys):
        if k.__class__ is not bytes or not 0 < len(k) <= max_key:
            if out is keys:
                out = list(keys)
            out[i] = check_key(k, limits)
    return out


def _batch(items: Any, limits: Limits, what: str, shape: str) -> list[Any]:
    if items.__class__ is not list:
        raise BadArgumentsError(f"{what} takes a list of {shape}")
    if len(items) > limits.max_batch_keys:
        raise TooManyKeysError(f"{len(items)} entries in one {what} exceed the limit of {limits.max_batch_keys}: split the request")
    return items


def _ttl_ms(ttl_ms: Any) -> int:
    """``nil`` -> 0 (no expiry), else 1..``MAX_TTL_MS``."""
    if ttl_ms is None:
        return 0
    if ttl_ms.__class__ is not int:
        raise BadArgumentsError(f"ttl_ms must be an integer or nil, not {type(ttl_ms).__name__}")
    if ttl_ms <= 0 or ttl_ms > MAX_TTL_MS:
        raise BadArgumentsError(f"ttl_ms must be between 1 and {MAX_TTL_MS}, got {ttl_ms}")
    return int(ttl_ms)


def _delta(delta: Any) -> int:
    if delta.__class__ is not int or not INT64_MIN <= delta <= INT64_MAX:
        raise BadArgumentsError("delta must be a signed 64-bit integer")
    return int(delta)


def _version(version: Any, ceiling: int) -> int:
    """A version from outside: an integer in 1 .. 2**64-1, not beyond ``ceiling``."""
    if version.__class__ is not int or not 0 < version <= UINT64_MAX:
        raise BadArgumentsError("version must be an integer in 1 .. 2**64-1")
    if version > ceiling:
        raise ClockSkewError(f"version {version} is further ahead of this node's clock than --max-clock-skew allows (limit {ceiling})")
    return int(version)


def _expires_at(expires_at: Any) -> int:
    """An absolute expiry in wall-clock ms: 0 (none) .. 2**63-1."""
    if expires_at.__class__ is not int or not 0 <= expires_at <= INT64_MAX:
        raise BadArgumentsError("expires_at must be an integer in 0 .. 2**63-1 (absolute ms, 0 = no expiry)")
    return int(expires_at)


def _flags(flags: Any, allowed: tuple[int, ...] = _FLAGS) -> int:
    """SET's flags (``allowed``: SETV's, with KEEP_COPY, for a master's writes)."""
    if flags is None:
        return 0
    if flags.__class__ is not int or flags not in allowed:
        raise BadArgumentsError(
            "flags must be 0, 1 (NX) or 2 (XX)" if allowed is _FLAGS else "flags must be 0, 1 (NX), 2 (XX) or 4 (KEEP_COPY)"
        )
    return int(flags)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise BadArgumentsError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    return value


def _u64(value: Any, what: str) -> int:
    if value.__class__ is not int or not 0 <= value <= UINT64_MAX:
        raise BadArgumentsError(f"{what} must be an integer in 0 .. 2**64-1")
    return int(value)


def _ranges(ranges: Any) -> RangeMatcher:
    if ranges.__class__ is not list:
        raise BadArgumentsError("ranges must be a list of [start, end] pairs")
    if len(ranges) > MAX_RANGES:
        raise BadArgumentsError(f"at most {MAX_RANGES} ranges per request")
    spans: list[tuple[int, int]] = []
    for r in ranges:
        if r.__class__ is not list or len(r) != 2:
            raise BadArgumentsError("ranges must be a list of [start, end] pairs")
        start, end = r
        if start.__class__ is not int or end.__class__ is not int or not (0 <= start <= UINT64_MAX and 0 <= end <= UINT64_MAX):
            raise BadArgumentsError("range bounds must be integers in 0 .. 2**64-1")
        spans.append((start, end))
    # Imported here: the ring needs xxhash, which the client (it imports this module) does without.
    from ..ring import compile_ranges

    return compile_ranges(spans)


def _arity(msg: list[Any], least: int, most: int, usage: str) -> None:
    n = len(msg) - 2
    if n < least or n > most:
        raise BadArgumentsError(usage)


# -- one parser per op -----------------------------------------------------------


def _parse_hello(msg: list[Any], limits: Limits) -> tuple[int, str | None, str | None]:
    """HELLO ``[protocol_version, auth_token?, client_name?]`` -> ``(version, token, name)``."""
    if not 1 <= len(msg) - 2 <= 3:
        raise HandshakeError("HELLO takes [protocol_version, auth_token?, client_name?]")
    version = msg[2]
    token = msg[3] if len(msg) > 3 else None
    name = msg[4] if len(msg) > 4 else None
    if version.__class__ is not int:
        raise HandshakeError(f"protocol version must be an integer, not {type(version).__name__}")
    if token is not None and not isinstance(token, str):
        raise HandshakeError("auth_token must be a string or nil")
    if token is not None and len(token) > 4096:
        raise HandshakeError("auth_token is too long")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise BadArgumentsError(f"client_name must be a string of at most {MAX_NAME_CHARS} characters")
    return int(version), token, name


def _no_args(name: str) -> Parser:
    usage = f"{name} takes no arguments"

    def parse(msg: list[Any], limits: Limits) -> None:
        if len(msg) != 2:
            raise BadArgumentsError(usage)

    parse.__name__ = parse.__qualname__ = f"_parse_{name.lower()}"
    parse.__doc__ = f"{name} ``[]`` -> ``None``."
    return parse


def _key_only(name: str) -> Parser:
    usage = f"{name} takes [key]"

    def parse(msg: list[Any], limits: Limits) -> bytes:
        try:
            _, _, key = msg  # one unpack: cheaper than len() and an index on this hot path
        except ValueError:
            raise BadArgumentsError(usage) from None
        if key.__class__ is bytes and 0 < len(key) <= limits.max_key_bytes:
            return key
        return check_key(key, limits)

    parse.__name__ = parse.__qualname__ = f"_parse_{name.lower()}"
    parse.__doc__ = f"{name} ``[key]`` -> ``key``."
    return parse


def _keys_only(name: str) -> Parser:
    usage = f"{name} takes [keys]"

    def parse(msg: list[Any], limits: Limits) -> list[bytes]:
        if len(msg) != 3:
            raise BadArgumentsError(usage)
        return _keys(msg[2], limits, name)

    parse.__name__ = parse.__qualname__ = f"_parse_{name.lower()}"
    parse.__doc__ = f"{name} ``[keys]`` -> ``[key, ...]`` (at most ``max_batch_keys``)."
    return parse


def _parse_set(msg: list[Any], limits: Limits) -> tuple[bytes, bytes, int, int]:
    """SET ``[key, value, ttl_ms?, flags?]`` -> ``(key, value, ttl_ms or 0, flags)``."""
    n = len(msg)
    if n == 4:  # SET key value, the common case: one unpack
        _, _, key, value = msg
    elif 4 < n <= 6:
        key = msg[2]
        value = msg[3]
    else:
        raise BadArgumentsError("SET takes [key, value, ttl_ms?, flags?]")
    if key.__class__ is not bytes or not key or len(key) > limits.max_key_bytes:  # _key, inlined: SET is the hottest write
        key = check_key(key, limits)
    if value.__class__ is not bytes or len(value) > limits.max_value_bytes:
        value = check_value(value, limits)
    if n == 4:
        return key, value, 0, 0
    return key, value, _ttl_ms(msg[4]), _flags(msg[5]) if n > 5 else 0


def _parse_mset(msg: list[Any], limits: Limits) -> tuple[list[tuple[bytes, bytes]], int]:
    """MSET ``[pairs, ttl_ms?]`` -> ``([(key, value), ...], ttl_ms or 0)``; every pair is checked first."""
    _arity(msg, 1, 2, "MSET takes [pairs, ttl_ms?]")
    pairs = _batch(msg[2], limits, "MSET", "[key, value] pairs")
    ttl = _ttl_ms(msg[3]) if len(msg) > 3 else 0
    items = []
    for pair in pairs:
        if pair.__class__ is not list or len(pair) != 2:
            raise BadArgumentsError("MSET takes a list of [key, value] pairs")
        items.append((_key(pair[0], limits), check_value(pair[1], limits)))
    return items, ttl


def _parse_expire(msg: list[Any], limits: Limits) -> tuple[bytes, int]:
    """EXPIRE ``[key, ttl_ms]`` -> ``(key, ttl_ms)``; ``ttl_ms <= 0`` deletes the key."""
    if len(msg) != 4:
        raise BadArgumentsError("EXPIRE takes [key, ttl_ms]")
    ttl_ms = msg[3]
    if ttl_ms.__class__ is not int or not INT64_MIN <= ttl_ms <= MAX_TTL_MS:
        raise BadArgumentsError(f"ttl_ms must be an integer of at most {MAX_TTL_MS} (<= 0 deletes the key)")
    return _key(msg[2], limits), int(ttl_ms)


def _counter(name: str) -> Parser:
    usage = f"{name} takes [key, delta?]"

    def parse(msg: list[Any], limits: Limits) -> tuple[bytes, int]:
        _arity(msg, 1, 2, usage)
        return _key(msg[2], limits), _delta(msg[3]) if len(msg) > 3 else 1

    parse.__name__ = parse.__qualname__ = f"_parse_{name.lower()}"
    parse.__doc__ = f"{name} ``[key, delta?]`` -> ``(key, delta)`` (delta defaults to 1)."
    return parse


def _parse_setv(msg: list[Any], limits: Limits) -> tuple[bytes, bytes, int, int, int]:
    """SETV ``[key, value, expires_at, flags, version]`` -> ``(key, value, expires_at, flags, version)``."""
    if len(msg) != 7:
        raise BadArgumentsError("SETV takes [key, value, expires_at, flags, version]")
    _, _, key, value, expires_at, flags, version = msg
    return (
        _key(key, limits),
        check_value(value, limits),
        _expires_at(expires_at),
        _flags(flags, _SETV_FLAGS),
        _version(version, limits.version_ceiling()),
    )


def _parse_msetv(msg: list[Any], limits: Limits) -> list[list[Any]]:
    """MSETV ``[entries]`` -> ``[[key, value, expires_at, flags, version], ...]``: SETVs in one request, every entry checked first.

    When every entry is a list of well-typed fields within bounds (every
    MSETV a master sends), the checks run inline and the decoded entries
    are the result, as they are; otherwise every entry goes through the
    shape and field checks, which convert or raise with their messages.
    """
    if len(msg) != 3:
        return _msetv_checked(msg, limits)
    items = msg[2]
    if items.__class__ is not list or len(items) > limits.max_batch_keys:
        return _msetv_checked(msg, limits)
    ceiling = limits.version_ceiling()
    max_key = limits.max_key_bytes
    max_value = limits.max_value_bytes
    for item in items:
        if item.__class__ is list and len(item) == 5:
            key, value, expires_at, flags, version = item
            if (
                key.__class__ is bytes
                and 0 < len(key) <= max_key
                and value.__class__ is bytes
                and len(value) <= max_value
                and expires_at.__class__ is int
                and 0 <= expires_at <= INT64_MAX
                and flags.__class__ is int
                and flags in _SETV_FLAGS
                and version.__class__ is int
                and 0 < version <= ceiling
            ):
                continue
        return _msetv_checked(msg, limits)
    return items


def _msetv_checked(msg: list[Any], limits: Limits) -> list[list[Any]]:
    """``_parse_msetv``'s general path: each entry's shape and fields through their checks, converted or refused."""
    ceiling = limits.version_ceiling()
    return [
        [_key(key, limits), check_value(value, limits), _expires_at(expires_at), _flags(flags, _SETV_FLAGS), _version(version, ceiling)]
        for key, value, expires_at, flags, version in _entries(msg, limits, "MSETV", "[key, value, expires_at, flags, version]")
    ]


def _parse_getv(msg: list[Any], limits: Limits) -> tuple[bytes, int]:
    """GETV ``[key]`` or ``[key, track]`` -> ``(key, track)`` with ``track`` 0, 1 or 2.

    ``true`` (1) subscribes the connection to the key's next change (an
    invalidation); ``2`` subscribes it for values: a write pushes it the new
    value and the subscription stays (``FEATURE_VALUE_PUSH``).
    """
    n = len(msg)
    if n == 3:
        return _key(msg[2], limits), 0
    if n != 4:
        raise BadArgumentsError("GETV takes [key] or [key, track]")
    track = msg[3]
    if track.__class__ is bool:
        return _key(msg[2], limits), int(track)
    if track.__class__ is int and track == 2:
        return _key(msg[2], limits), 2
    raise BadArgumentsError("track must be true, false or 2 (values)")


def _parse_invack(msg: list[Any], limits: Limits) -> tuple[int, list[bytes]]:
    """INVACK ``[seq]`` or ``[seq, keys]`` -> ``(seq, keys)``: the pushes acknowledged, and the pushed values' keys no longer copied."""
    n = len(msg)
    if n == 3:
        return _u64(msg[2], "seq"), []
    if n != 4:
        raise BadArgumentsError("INVACK takes [seq] or [seq, keys]")
    return _u64(msg[2], "seq"), _keys(msg[3], limits, "INVACK")


def _parse_hotkeys(msg: list[Any], limits: Limits) -> int:
    """HOTKEYS ``[]`` or ``[count]`` -> ``count`` (default 10, at most ``MAX_HOT_KEYS``)."""
    n = len(msg)
    if n == 2:
        return 10
    count = msg[2] if n == 3 else None
    if count.__class__ is not int or not 1 <= count <= MAX_HOT_KEYS:
        raise BadArgumentsError(f"HOTKEYS takes [] or [count], count in 1 .. {MAX_HOT_KEYS}")
    return int(count)


def _parse_delv(msg: list[Any], limits: Limits) -> tuple[bytes, int]:
    """DELV ``[key, version]`` -> ``(key, version)``."""
    if len(msg) != 4:
        raise BadArgumentsError("DELV takes [key, version]")
    return _key(msg[2], limits), _version(msg[3], limits.version_ceiling())


def _parse_incrv(msg: list[Any], limits: Limits) -> tuple[bytes, int, int]:
    """INCRV ``[key, delta, version]`` -> ``(key, delta, version)``."""
    if len(msg) != 5:
        raise BadArgumentsError("INCRV takes [key, delta, version]")
    return _key(msg[2], limits), _delta(msg[3]), _version(msg[4], limits.version_ceiling())


def unpack_entries(packed: bytes, name: str) -> Any:
    """The array a packed ``entries`` argument holds (``bin``: one msgpack array, as a packed SCAN answers it).

    Decoded with the frame decoder's rules (``str`` as text, ``bin`` as
    bytes, no map with non-text keys) and bounds scaled to the ``bin``
    itself, which the frame bound already bounds; the caller checks the
    entries as if they had come unpacked.

    Raises:
        BadArgumentsError: not exactly one msgpack object, or one that is
            not an array, or one with more than ``MAX_ARRAY_ITEMS`` items.
    """
    size = len(packed)
    try:
        items = msgpack.unpackb(
            packed,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=min(size, MAX_ARRAY_ITEMS),
            max_map_len=min(size // 2, MAX_ARRAY_ITEMS),
            max_ext_len=size,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError and limits are ValueErrors
        raise BadArgumentsError(f"{name}: packed entries are not one msgpack array ({exc.__class__.__name__}: {exc})") from None
    if items.__class__ is not list:
        raise BadArgumentsError(f"{name}: packed entries must hold a msgpack array")
    return items


def _entries(msg: list[Any], limits: Limits, name: str, shape: str) -> Iterator[list[Any]]:
    """The entries of ``name [entries]``, each a list shaped as ``shape`` (``[a, b, ...]``), yielded as they are checked."""
    if len(msg) != 3:
        raise BadArgumentsError(f"{name} takes [entries]")
    width = shape.count(",") + 1
    for item in _batch(msg[2], limits, name, f"{shape} entries"):
        if item.__class__ is not list or len(item) != width:
            raise BadArgumentsError(f"{name} takes a list of {shape} entries")
        yield item


def _parse_apply(msg: list[Any], limits: Limits) -> list[tuple[bytes, bytes, int, int]]:
    """APPLY ``[entries]`` -> ``[(key, value, expires_at, version), ...]``, every entry checked first.

    ``entries`` may also come packed (a ``bin`` holding their msgpack
    array, as a packed SCAN answers them: ``unpack_entries``). An entry of well-typed fields within bounds (every entry a migration
    page carries) is checked inline; any other goes through the field
    checks, which convert or raise with their messages.
    """
    if len(msg) == 3 and msg[2].__class__ is bytes:
        msg = [msg[0], msg[1], unpack_entries(msg[2], "APPLY")]
    ceiling = limits.version_ceiling()
    max_key = limits.max_key_bytes
    max_value = limits.max_value_bytes
    out: list[tuple[bytes, bytes, int, int]] = []
    append = out.append
    for key, value, expires_at, version in _entries(msg, limits, "APPLY", "[key, value, expires_at, version]"):
        if (
            key.__class__ is bytes
            and 0 < len(key) <= max_key
            and value.__class__ is bytes
            and len(value) <= max_value
            and expires_at.__class__ is int
            and 0 <= expires_at <= INT64_MAX
            and version.__class__ is int
            and 0 < version <= ceiling
        ):
            append((key, value, expires_at, version))
        else:
            append((_key(key, limits), check_value(value, limits), _expires_at(expires_at), _version(version, ceiling)))
    return out


def _parse_apply_deletes(msg: list[Any], limits: Limits) -> list[tuple[bytes, int]]:
    """APPLY_DELETES ``[deletes]`` -> ``[(key, version), ...]``, every pair checked first."""
    if len(msg) != 3:
        raise BadArgumentsError("APPLY_DELETES takes [deletes]")
    deletes = _batch(msg[2], limits, "APPLY_DELETES", "[key, version] pairs")
    ceiling = limits.version_ceiling()
    items = []
    for item in deletes:
        if item.__class__ is not list or len(item) != 2:
            raise BadArgumentsError("APPLY_DELETES takes a list of [key, version] pairs")
        items.append((_key(item[0], limits), _version(item[1], ceiling)))
    return items


def _parse_scan(msg: list[Any], limits: Limits) -> tuple[RangeMatcher, int, int, int, bool]:
    """SCAN ``[ranges, cursor, count, min_version, packed?]`` -> ``(matcher, cursor, count, min_version, packed)``."""
    _arity(msg, 4, 5, "SCAN takes [ranges, cursor, count, min_version, packed?]")
    ranges, cursor, count, min_version = msg[2:6]
    packed = msg[6] if len(msg) > 6 else False
    match = _ranges(ranges)
    if count.__class__ is not int or not 1 <= count <= UINT64_MAX:
        raise BadArgumentsError("count must be a positive integer")
    if packed.__class__ is not bool:
        raise BadArgumentsError("packed must be true or false")
    return match, _u64(cursor, "cursor"), int(count), _u64(min_version, "min_version"), bool(packed)


def _parse_drop(msg: list[Any], limits: Limits) -> tuple[RangeMatcher, int]:
    """DROP ``[ranges, cursor]`` -> ``(matcher, cursor)``."""
    if len(msg) != 4:
        raise BadArgumentsError("DROP takes [ranges, cursor]")
    return _ranges(msg[2]), _u64(msg[3], "cursor")


def _parse_range_count(msg: list[Any], limits: Limits) -> RangeMatcher:
    """RANGE_COUNT ``[ranges]`` -> ``matcher``."""
    if len(msg) != 3:
        raise BadArgumentsError("RANGE_COUNT takes [ranges]")
    return _ranges(msg[2])


def _parse_join(msg: list[Any], limits: Limits) -> tuple[str, str, int, float, int]:
    """JOIN ``[node_id, host, port, weight?, known_epoch?]`` -> ``(node_id, host, port, weight, known_epoch)``."""
    usage = "JOIN takes [node_id: str, host: str, port: int, weight?: float, known_epoch?: int]"
    _arity(msg, 3, 5, usage)
    node_id = _name(msg[2], "node_id")
    host = _name(msg[3], "host")
    port = msg[4]
    if port.__class__ is not int or not 0 < port < 65536:
        raise BadArgumentsError("port must be an integer in 1 .. 65535")
    weight = msg[5] if len(msg) > 5 else 1.0
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight <= MAX_WEIGHT) or math.isnan(weight):
        raise BadArgumentsError(f"weight must be a number in (0, {MAX_WEIGHT:g}]")
    known_epoch = msg[6] if len(msg) > 6 else 0
    if known_epoch is None:
        known_epoch = 0
    return node_id, host, int(port), float(weight), _u64(known_epoch, "known_epoch")


def _parse_leave(msg: list[Any], limits: Limits) -> str:
    """LEAVE ``[node_id]`` -> ``node_id``."""
    if len(msg) != 3:
        raise BadArgumentsError("LEAVE takes [node_id]")
    return _name(msg[2], "node_id")


def _parse_forget(msg: list[Any], limits: Limits) -> tuple[str, bool]:
    """FORGET ``[node_id, force?]`` -> ``(node_id, force)`` (``force`` nil or absent: false)."""
    _arity(msg, 1, 2, "FORGET takes [node_id, force?]")
    force = msg[3] if len(msg) > 3 else None
    if force is None:
        force = False
    if force.__class__ is not bool:
        raise BadArgumentsError("FORGET's force must be a boolean or nil")
    return _name(msg[2], "node_id"), force


def _parse_sync(msg: list[Any], limits: Limits) -> tuple[str, int, int, dict[str, Any] | None, list[str]]:
    """SYNC ``[follower_id, epoch, seq, view?, reconcile?]`` -> ``(follower_id, epoch, seq, view or None, [node_id, ...])``."""
    _arity(msg, 3, 5, "SYNC takes [follower_id, epoch, seq, view?, reconcile?]")
    view = msg[5] if len(msg) > 5 else None
    if view is not None and not isinstance(view, dict):
        raise BadArgumentsError("SYNC's view must be a map (a ring view) or nil")
    reconcile = msg[6] if len(msg) > 6 else None
    if reconcile is None:
        reconcile = []
    if reconcile.__class__ is not list or len(reconcile) > 1000:
        raise BadArgumentsError("SYNC's reconcile must be a list of at most 1000 node ids")
    return (
        _name(msg[2], "follower_id"),
        _u64(msg[3], "epoch"),
        _u64(msg[4], "seq"),
        view,
        [_name(n, "node_id") for n in reconcile],
    )


def _parse_fence(msg: list[Any], limits: Limits) -> tuple[str, int, str]:
    """FENCE ``[node_id, since_ms, reason?]`` -> ``(node_id, since_ms, reason)``."""
    _arity(msg, 2, 3, "FENCE takes [node_id, since_ms, reason?]")
    reason = msg[4] if len(msg) > 4 else None
    if reason is None:
        reason = "it missed writes"
    if not isinstance(reason, str) or len(reason) > 1000:
        raise BadArgumentsError("reason must be a string of at most 1000 characters")
    return _name(msg[2], "node_id"), _u64(msg[3], "since_ms"), reason


def _parse_bind(msg: list[Any], limits: Limits) -> str:
    """BIND ``[cluster_id]`` -> ``cluster_id`` (the cluster the master drives the node for)."""
    if len(msg) != 3:
        raise BadArgumentsError("BIND takes [cluster_id]")
    return _name(msg[2], "cluster_id")


def _parse_epoch(msg: list[Any], limits: Limits) -> tuple[int, int]:
    """EPOCH ``[epoch, floor?]`` -> ``(epoch, floor)``: the connection routes by ``epoch``; ``floor`` (0: unchanged) at most ``epoch``."""
    _arity(msg, 1, 2, "EPOCH takes [epoch, floor?]")
    epoch = _u64(msg[2], "epoch")
    floor = _u64(msg[3], "floor") if len(msg) > 3 and msg[3] is not None else 0
    if floor > epoch:
        raise BadArgumentsError(f"floor {floor} is newer than the epoch {epoch} the connection routes by")
    return epoch, floor


def _parse_auth(msg: list[Any], limits: Limits) -> tuple[bytes, bytes]:
    """AUTH ``[client_nonce, proof]`` -> ``(client_nonce, proof)`` (see ``dcache.protocol.auth``)."""
    if len(msg) != 4:
        raise HandshakeError("AUTH takes [client_nonce, proof]")
    nonce, proof = msg[2], msg[3]
    if nonce.__class__ is not bytes or not 8 <= len(nonce) <= 64:
        raise HandshakeError("client_nonce must be 8 to 64 bytes")
    if proof.__class__ is not bytes or len(proof) != 32:
        raise HandshakeError("proof must be 32 bytes (HMAC-SHA256)")
    return nonce, proof


_C, _K, _N = Credential.CLUSTER, Credential.CLIENT, Credential.NONE

#: Every op of the protocol: ``op -> OpSpec``. Go through it op by op: each
#: has exactly one required credential.
OPS: dict[int, OpSpec] = {
    s.op: s
    for s in (
        OpSpec(Op.HELLO, "HELLO", _N, (1, 3), _parse_hello, True),
        OpSpec(Op.PING, "PING", _K, (0, 0), _no_args("PING"), True),
        OpSpec(Op.GET, "GET", _K, (1, 1), _key_only("GET"), True),
        OpSpec(Op.SET, "SET", _K, (2, 4), _parse_set, False),
        OpSpec(Op.DELETE, "DELETE", _K, (1, 1), _key_only("DELETE"), True),
        OpSpec(Op.MGET, "MGET", _K, (1, 1), _keys_only("MGET"), True),
        OpSpec(Op.MSET, "MSET", _K, (1, 2), _parse_mset, True),
        OpSpec(Op.EXISTS, "EXISTS", _K, (1, 1), _key_only("EXISTS"), True),
        OpSpec(Op.EXPIRE, "EXPIRE", _K, (2, 2), _parse_expire, True),
        OpSpec(Op.TTL, "TTL", _K, (1, 1), _key_only("TTL"), True),
        OpSpec(Op.INCR, "INCR", _K, (1, 2), _counter("INCR"), False),
        OpSpec(Op.DECR, "DECR", _K, (1, 2), _counter("DECR"), False),
        OpSpec(Op.TOUCH, "TOUCH", _K, (1, 1), _key_only("TOUCH"), True),
        OpSpec(Op.STATS, "STATS", _K, (0, 0), _no_args("STATS"), True),
        OpSpec(Op.PERSIST, "PERSIST", _K, (1, 1), _key_only("PERSIST"), True),
        OpSpec(Op.HOTKEYS, "HOTKEYS", _K, (0, 1), _parse_hotkeys, True),
        OpSpec(Op.GETV, "GETV", _C, (1, 2), _parse_getv, True),
        OpSpec(Op.MGETV, "MGETV", _C, (1, 1), _keys_only("MGETV"), True),
        OpSpec(Op.SETV, "SETV", _C, (5, 5), _parse_setv, True),
        OpSpec(Op.DELV, "DELV", _C, (2, 2), _parse_delv, True),
        OpSpec(Op.INCRV, "INCRV", _C, (3, 3), _parse_incrv, False),
        OpSpec(Op.APPLY, "APPLY", _C, (1, 1), _parse_apply, True),
        OpSpec(Op.APPLY_DELETES, "APPLY_DELETES", _C, (1, 1), _parse_apply_deletes, True),
        OpSpec(Op.SCAN, "SCAN", _C, (4, 5), _parse_scan, True),
        OpSpec(Op.DROP, "DROP", _C, (2, 2), _parse_drop, True),
        OpSpec(Op.RANGE_COUNT, "RANGE_COUNT", _C, (1, 1), _parse_range_count, True),
        OpSpec(Op.MSETV, "MSETV", _C, (1, 1), _parse_msetv, True),
        OpSpec(Op.INVACK, "INVACK", _C, (1, 2), _parse_invack, True),
        OpSpec(Op.BIND, "BIND", _C, (1, 1), _parse_bind, True),
        OpSpec(Op.EPOCH, "EPOCH", _C, (1, 2), _parse_epoch, True),
        OpSpec(Op.RING, "RING", _K, (0, 0), _no_args("RING"), True),
        OpSpec(Op.JOIN, "JOIN", _C, (3, 5), _parse_join, True),
        OpSpec(Op.LEAVE, "LEAVE", _C, (1, 1), _parse_leave, True),
        OpSpec(Op.SYNC, "SYNC", _C, (3, 5), _parse_sync, True),
        OpSpec(Op.FENCE, "FENCE", _C, (2, 3), _parse_fence, True),
        OpSpec(Op.AUTH, "AUTH", _N, (2, 2), _parse_auth, False),
        OpSpec(Op.FORGET, "FORGET", _C, (1, 2), _parse_forget, False),
    )
}
