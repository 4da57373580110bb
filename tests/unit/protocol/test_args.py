"""Request argument parsing shared by aux nodes and masters."""

from __future__ import annotations

import pytest

from dcache.errors import BadArgumentsError, KeyTooLargeError
from dcache.protocol import Limits, Op
from dcache.protocol.args import MAX_TTL_MS, parse_delta, parse_mset, parse_set, parse_ttl_ms

LIMITS = Limits(max_frame_bytes=10_000, max_key_bytes=8, max_value_bytes=100)


def test_parse_set_forms():
    assert parse_set([Op.SET, 1, b"k", b"v"], LIMITS) == (b"k", b"v", 0, 0)
    assert parse_set([Op.SET, 1, "k", "v", 50], LIMITS) == (b"k", b"v", 50, 0)
    assert parse_set([Op.SET, 1, b"k", b"v", None, 1], LIMITS) == (b"k", b"v", 0, 1)
    assert parse_set([Op.SET, 1, b"k", b"v", 5, None], LIMITS) == (b"k", b"v", 5, 0)


@pytest.mark.parametrize(
    "msg",
    [
        [Op.SET, 1, b"k"],
        [Op.SET, 1, b"k", b"v", 1, 0, 9],
        [Op.SET, 1, b"k", b"v", 0],
        [Op.SET, 1, b"k", b"v", "5"],
        [Op.SET, 1, b"k", b"v", None, 3],
    ],
)
def test_parse_set_rejects(msg):
    with pytest.raises(BadArgumentsError):
        parse_set(msg, LIMITS)


def test_parse_set_key_limit():
    with pytest.raises(KeyTooLargeError):
        parse_set([Op.SET, 1, b"k" * 9, b"v"], LIMITS)


def test_parse_ttl_bounds():
    assert parse_ttl_ms(None) == 0 and parse_ttl_ms(MAX_TTL_MS) == MAX_TTL_MS
    for bad in (0, -1, MAX_TTL_MS + 1, 1.5, True and "x"):
        with pytest.raises(BadArgumentsError):
            parse_ttl_ms(bad)


def test_parse_mset_checks_every_pair_first():
    assert parse_mset([Op.MSET, 1, [[b"a", b"1"], ["b", "2"]], 10], LIMITS) == ([(b"a", b"1"), (b"b", b"2")], 10)
    with pytest.raises(BadArgumentsError):
        parse_mset([Op.MSET, 1, [[b"a", b"1"], [b"b"]]], LIMITS)
    with pytest.raises(BadArgumentsError):
        parse_mset([Op.MSET, 1, {"a": b"1"}], LIMITS)


def test_parse_delta():
    assert parse_delta([Op.INCR, 1, b"n"], LIMITS, "INCR") == (b"n", 1)
    assert parse_delta([Op.DECR, 1, b"n", -7], LIMITS, "DECR") == (b"n", -7)
    for bad in ([Op.INCR, 1, b"n", 2**63], [Op.INCR, 1, b"n", "1"], [Op.INCR, 1, b"n", 1, 2]):
        with pytest.raises(BadArgumentsError):
            parse_delta(bad, LIMITS, "INCR")
