"""Argument parsing for the requests every server accepts, sans-IO.

Aux nodes and masters take the same arguments for the same ops (and must
answer bad ones with the same errors), so the parsing lives here once. Each
function takes the decoded request array and the limits and returns plain
values, or raises ``BadArgumentsError`` (or ``KeyTooLargeError`` /
``ValueTooLargeError`` through ``check_key``/``check_value``).
"""

from __future__ import annotations

from typing import Any

from ..errors import BadArgumentsError
from .codec import Limits, check_key, check_value
from .messages import SetFlag

__all__ = [
    "MAX_TTL_MS",
    "INT64_MIN",
    "INT64_MAX",
    "UINT64_MAX",
    "parse_ttl_ms",
    "parse_set",
    "parse_mset",
    "parse_delta",
    "parse_version",
    "parse_expires_at",
    "parse_entries",
]

#: Longest TTL a request may carry: a hundred years, in milliseconds.
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
_FLAGS = (SetFlag.NONE.value, SetFlag.NX.value, SetFlag.XX.value)


def parse_ttl_ms(ttl_ms: Any) -> int:
    """A TTL argument in milliseconds: ``nil`` -> 0 (no expiry), else 1..``MAX_TTL_MS``."""
    if ttl_ms is None:
        return 0
    if ttl_ms.__class__ is not int:
        raise BadArgumentsError(f"ttl_ms must be an integer or nil, not {type(ttl_ms).__name__}")
    if ttl_ms <= 0 or ttl_ms > MAX_TTL_MS:
        raise BadArgumentsError(f"ttl_ms must be between 1 and {MAX_TTL_MS}, got {ttl_ms}")
    return int(ttl_ms)


def parse_set(msg: list[Any], limits: Limits) -> tuple[bytes, bytes, int, int]:
    """SET ``[op, id, key, value, ttl_ms?, flags?]`` -> ``(key, value, ttl_ms or 0, flags)``."""
    n = len(msg)
    if n == 4:
        _, _, key, value = msg
        ttl_ms, flags = None, 0
    elif n == 5:
        _, _, key, value, ttl_ms = msg
        flags = 0
    elif n == 6:
        _, _, key, value, ttl_ms, flags = msg
        if flags is None:
            flags = 0
    else:
        raise BadArgumentsError("SET takes [key, value, ttl_ms?, flags?]")
    key = check_key(key, limits)
    value = check_value(value, limits)
    ttl = parse_ttl_ms(ttl_ms)
    if flags.__class__ is not int or flags not in _FLAGS:
        raise BadArgumentsError("flags must be 0, 1 (NX) or 2 (XX)")
    return key, value, ttl, flags


def parse_mset(msg: list[Any], limits: Limits) -> tuple[list[tuple[bytes, bytes]], int]:
    """MSET ``[op, id, pairs, ttl_ms?]`` -> ``(pairs, ttl_ms or 0)``; every pair is checked first."""
    n = len(msg)
    if n == 3:
        _, _, pairs = msg
        ttl_ms = None
    elif n == 4:
        _, _, pairs, ttl_ms = msg
    else:
        raise BadArgumentsError("MSET takes [pairs, ttl_ms?]")
    if pairs.__class__ is not list:
        raise BadArgumentsError("MSET takes a list of [key, value] pairs")
    ttl = parse_ttl_ms(ttl_ms)
    items = []
    for pair in pairs:
        if pair.__class__ is not list or len(pair) != 2:
            raise BadArgumentsError("MSET takes a list of [key, value] pairs")
        items.append((check_key(pair[0], limits), check_value(pair[1], limits)))
    return items, ttl


def parse_delta(msg: list[Any], limits: Limits, name: str) -> tuple[bytes, int]:
    """INCR/DECR ``[op, id, key, delta?]`` -> ``(key, delta)`` (delta defaults to 1)."""
    n = len(msg)
    if n == 3:
        delta = 1
    elif n == 4:
        delta = msg[3]
    else:
        raise BadArgumentsError(f"{name} takes [key, delta?]")
    if delta.__class__ is not int or not INT64_MIN <= delta <= INT64_MAX:
        raise BadArgumentsError("delta must be a signed 64-bit integer")
    return check_key(msg[2], limits), delta


def parse_version(version: Any) -> int:
    """A write's version: an integer in 1 .. 2**64-1."""
    if version.__class__ is not int or not 0 < version <= UINT64_MAX:
        raise BadArgumentsError("version must be an integer in 1 .. 2**64-1")
    return int(version)


def parse_expires_at(expires_at: Any) -> int:
    """An absolute expiry in wall-clock ms: 0 (none) .. 2**63-1."""
    if expires_at.__class__ is not int or not 0 <= expires_at <= INT64_MAX:
        raise BadArgumentsError("expires_at must be an integer in 0 .. 2**63-1 (absolute ms, 0 = no expiry)")
    return int(expires_at)


def parse_entries(msg: list[Any], limits: Limits) -> list[tuple[bytes, bytes, int, int]]:
    """APPLY ``[op, id, entries]`` -> ``[(key, value, expires_at, version), ...]``, every entry checked."""
    try:
        _, _, entries = msg
    except ValueError:
        raise BadArgumentsError("APPLY takes [entries]") from None
    if entries.__class__ is not list:
        raise BadArgumentsError("APPLY takes a list of [key, value, expires_at, version] entries")
    items = []
    for item in entries:
        if item.__class__ is not list or len(item) != 4:
            raise BadArgumentsError("APPLY takes a list of [key, value, expires_at, version] entries")
        items.append((check_key(item[0], limits), check_value(item[1], limits), parse_expires_at(item[2]), parse_version(item[3])))
    return items
