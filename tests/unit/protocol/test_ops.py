"""The op table: one parser per op, one credential per op, every bound enforced."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.errors import (
    BadArgumentsError,
    ClockSkewError,
    HandshakeError,
    KeyTooLargeError,
    ServerError,
    TooManyKeysError,
    ValueTooLargeError,
)
from dcache.hlc import version_ceiling
from dcache.protocol import MAX_TTL_MS, OPS, UINT64_MAX, Credential, Limits, Op, parse_request_id

NOW_MS = 1_800_000_000_000
LIMITS = Limits(
    max_frame_bytes=10_000, max_key_bytes=8, max_value_bytes=100, max_batch_keys=5, max_clock_skew_ms=5000, clock=lambda: NOW_MS
)
#: A version issued "now" and one just past the skew bound.
V_NOW = NOW_MS << 22
V_FAR = (NOW_MS + 5001) << 22

CLUSTER_OPS = {
    Op.GETV,
    Op.MGETV,
    Op.SETV,
    Op.DELV,
    Op.INCRV,
    Op.APPLY,
    Op.APPLY_DELETES,
    Op.SCAN,
    Op.DROP,
    Op.RANGE_COUNT,
    Op.MSETV,
    Op.INVACK,
    Op.BIND,
    Op.EPOCH,
}
MEMBERSHIP_OPS = {Op.JOIN, Op.LEAVE, Op.SYNC, Op.FENCE, Op.FORGET}


def parse(op: Op, *args: Any) -> Any:
    return OPS[op].parse([int(op), 1, *args], LIMITS)


# -- the table ---------------------------------------------------------------------


def test_every_op_has_exactly_one_spec_and_credential():
    assert set(OPS) == {int(op) for op in Op}
    for op, spec in OPS.items():
        assert spec.op == op and spec.name == Op(op).name
        assert isinstance(spec.credential, Credential)
        expected = (
            Credential.NONE
            if op in (Op.HELLO, Op.AUTH)
            else Credential.CLUSTER
            if op in CLUSTER_OPS | MEMBERSHIP_OPS
            else Credential.CLIENT
        )
        assert spec.credential == expected, Op(op).name


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_every_parser_enforces_its_arity(op: Op):
    least, most = OPS[op].arity
    error = HandshakeError if op in (Op.HELLO, Op.AUTH) else BadArgumentsError
    with pytest.raises(error):
        OPS[op].parse([int(op), 1, *([0] * (most + 1))], LIMITS)
    if least:
        with pytest.raises(error):
            OPS[op].parse([int(op), 1, *([0] * (least - 1))], LIMITS)


# Arbitrary decoded msgpack values: what a hostile client can put in a request.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.binary(max_size=12),
    st.text(max_size=12),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=20
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Op)), st.lists(values, max_size=7))
def test_any_arguments_parse_or_raise_a_typed_error(op: Op, args: list[Any]):
    """A parser never lets anything but a ``ServerError`` out: the node answers, it never crashes."""
    try:
        OPS[op].parse([int(op), 1, *args], LIMITS)
    except ServerError:
        pass


# -- request ids -------------------------------------------------------------------


def test_request_ids_are_unsigned_integers():
    assert parse_request_id(1) == 1 and parse_request_id(UINT64_MAX) == UINT64_MAX
    for bad in (0, -1, UINT64_MAX + 1, 1.0, "1", b"\x01", None, True, [1]):
        with pytest.raises(BadArgumentsError):
            parse_request_id(bad)


# -- data ops ----------------------------------------------------------------------


def test_set_forms():
    assert parse(Op.SET, b"k", b"v") == (b"k", b"v", 0, 0)
    assert parse(Op.SET, "k", "v", 50) == (b"k", b"v", 50, 0)
    assert parse(Op.SET, b"k", b"v", None, 1) == (b"k", b"v", 0, 1)
    assert parse(Op.SET, b"k", b"v", 5, None) == (b"k", b"v", 5, 0)


@pytest.mark.parametrize("args", [(b"k", b"v", 0), (b"k", b"v", "5"), (b"k", b"v", None, 3), (b"k", b"v", MAX_TTL_MS + 1), (b"", b"v")])
def test_set_rejects(args):
    with pytest.raises(BadArgumentsError):
        parse(Op.SET, *args)


def test_sizes():
    with pytest.raises(KeyTooLargeError):
        parse(Op.GET, b"k" * 9)
    with pytest.raises(KeyTooLargeError):
        parse(Op.GET, "ééééé")  # 10 bytes in UTF-8
    with pytest.raises(ValueTooLargeError):
        parse(Op.SET, b"k", b"v" * 101)


def test_batches_are_bounded():
    assert parse(Op.MGET, [b"a", "b", b"c", b"d", b"e"]) == [b"a", b"b", b"c", b"d", b"e"]
    for op, arg in (
        (Op.MGET, [b"k"] * 6),
        (Op.MGETV, [b"k"] * 6),
        (Op.MSET, [[b"k", b"v"]] * 6),
        (Op.APPLY, [[b"k", b"v", 0, 1]] * 6),
        (Op.APPLY_DELETES, [[b"k", 1]] * 6),
        (Op.MSETV, [[b"k", b"v", 0, 0, 1]] * 6),
    ):
        with pytest.raises(TooManyKeysError):
            parse(op, arg)


def test_mset_checks_every_pair_first():
    assert parse(Op.MSET, [[b"a", b"1"], ["b", "2"]], 10) == ([(b"a", b"1"), (b"b", b"2")], 10)
    with pytest.raises(BadArgumentsError):
        parse(Op.MSET, [[b"a", b"1"], [b"b"]])
    with pytest.raises(BadArgumentsError):
        parse(Op.MSET, {"a": b"1"})


def test_counters_and_expire():
    assert parse(Op.INCR, b"n") == (b"n", 1)
    assert parse(Op.DECR, b"n", -7) == (b"n", -7)
    for bad in ((b"n", 2**63), (b"n", "1"), (b"n", 1.0)):
        with pytest.raises(BadArgumentsError):
            parse(Op.INCR, *bad)
    assert parse(Op.EXPIRE, b"k", -5) == (b"k", -5)
    with pytest.raises(BadArgumentsError):
        parse(Op.EXPIRE, b"k", MAX_TTL_MS + 1)


def test_hello():
    assert parse(Op.HELLO, 1) == (1, None, None)
    assert parse(Op.HELLO, 1, "t", "me") == (1, "t", "me")
    for bad in (("1",), (1, 5), (1, "t", 7)):
        with pytest.raises(ServerError):
            parse(Op.HELLO, *bad)


# -- versions from outside ------------------------------------------------------------


def test_versions_beyond_the_skew_bound_are_refused():
    assert LIMITS.version_ceiling() == version_ceiling(NOW_MS, 5000)
    assert parse(Op.SETV, b"k", b"v", 0, 0, V_NOW)[-1] == V_NOW
    for op, args in (
        (Op.SETV, (b"k", b"v", 0, 0, V_FAR)),
        (Op.DELV, (b"k", V_FAR)),
        (Op.INCRV, (b"k", 1, V_FAR)),
        (Op.APPLY, ([[b"a", b"v", 0, V_NOW], [b"b", b"v", 0, 2**64 - 1]],)),
        (Op.APPLY_DELETES, ([[b"a", V_FAR]],)),
        (Op.MSETV, ([[b"a", b"v", 0, 0, V_NOW], [b"b", b"v", 0, 0, V_FAR]],)),
    ):
        with pytest.raises(ClockSkewError):
            parse(op, *args)
    for bad in (0, -1, 2**64, 1.5):
        with pytest.raises(BadArgumentsError):
            parse(Op.DELV, b"k", bad)


# -- cluster ops ----------------------------------------------------------------------


def test_scan_drop_and_ranges():
    match, cursor, count, min_version, packed = parse(Op.SCAN, [[1, 5]], 0, 10, 0)
    assert match is not None and match(3) and not match(6) and (cursor, count, min_version, packed) == (0, 10, 0, False)
    assert parse(Op.SCAN, [[1, 5]], 0, 10, 0, True)[4] is True
    for bad in (1, None, "yes"):
        with pytest.raises(BadArgumentsError, match="packed must be true or false"):
            parse(Op.SCAN, [[1, 5]], 0, 10, 0, bad)
    assert parse(Op.SCAN, [[5, 5]], 0, 1, 0)[0] is None  # the whole circle
    with pytest.raises(BadArgumentsError):
        parse(Op.SCAN, [[1, 5]], 0, 0, 0)
    with pytest.raises(BadArgumentsError):
        parse(Op.DROP, [[1, 2**64]], 0)


def test_membership_ops():
    assert parse(Op.JOIN, "a1", "127.0.0.1", 7101) == ("a1", "127.0.0.1", 7101, 1.0, 0)
    assert parse(Op.JOIN, "a1", "h", 1, 2, 5) == ("a1", "h", 1, 2.0, 5)
    for bad in (("", "h", 1), ("a", "h", 0), ("a", "h", 1, 0.0), ("a", "h", 1, float("nan")), ("a" * 300, "h", 1), ("a", "h", 1, 1.0, -1)):
        with pytest.raises(BadArgumentsError):
            parse(Op.JOIN, *bad)
    assert parse(Op.LEAVE, "a1") == "a1"
    assert parse(Op.FORGET, "a1") == ("a1", False)
    assert parse(Op.FORGET, "a1", None) == ("a1", False)
    assert parse(Op.FORGET, "a1", True) == ("a1", True)
    for bad_forget in (("",), ("a" * 300,), ("a1", 1), ("a1", "yes")):
        with pytest.raises(BadArgumentsError):
            parse(Op.FORGET, *bad_forget)
    assert parse(Op.SYNC, "m2", 3, 4) == ("m2", 3, 4, None, [])
    assert parse(Op.SYNC, "m2", 3, 4, None, ["a1"]) == ("m2", 3, 4, None, ["a1"])
    with pytest.raises(BadArgumentsError):
        parse(Op.SYNC, "m2", 3, 4, [1])


def test_msetv_checks_every_entry_first():
    assert parse(Op.MSETV, [[b"a", "v", 0, 0, V_NOW], [b"b", b"w", 5, 1, V_NOW + 1]]) == [
        [b"a", b"v", 0, 0, V_NOW],
        [b"b", b"w", 5, 1, V_NOW + 1],
    ]
    assert parse(Op.MSETV, [["a", b"v", 0, None, V_NOW]]) == [[b"a", b"v", 0, 0, V_NOW]]  # the field checks convert
    for bad in (
        [[b"a", b"v", 0, 0]],
        [[b"a", b"v", 0, 0, V_NOW], "entry"],
        [[b"", b"v", 0, 0, V_NOW]],
        [[b"a", b"v", -1, 0, V_NOW]],
        [[b"a", b"v", True, 0, V_NOW]],
        [[b"a", b"v", 0, 3, V_NOW]],
        [[b"a", b"v", 0, True, V_NOW]],
        [[b"a", b"v", 0, 0, 0]],
        [[b"a", b"v", 0, 0, True]],
        [[b"a", None, 0, 0, V_NOW]],
        "entries",
    ):
        with pytest.raises(BadArgumentsError):
            parse(Op.MSETV, bad)


def test_apply_takes_its_entries_packed_too():
    entries = [[b"a", b"v", 0, V_NOW], [b"b", "text", 5, V_NOW]]
    assert parse(Op.APPLY, msgpack.packb(entries, use_bin_type=True)) == parse(Op.APPLY, entries)
    assert parse(Op.APPLY, msgpack.packb([], use_bin_type=True)) == []
    with pytest.raises(TooManyKeysError):
        parse(Op.APPLY, msgpack.packb([[b"k", b"v", 0, 1]] * 6, use_bin_type=True))
    with pytest.raises(ClockSkewError):
        parse(Op.APPLY, msgpack.packb([[b"a", b"v", 0, V_FAR]], use_bin_type=True))
    with pytest.raises(KeyTooLargeError):
        parse(Op.APPLY, msgpack.packb([[b"k" * 9, b"v", 0, 1]], use_bin_type=True))
    packed = msgpack.packb(entries, use_bin_type=True)
    for bad in (b"", packed[:-1], packed + b"\x00", msgpack.packb({"a": 1}), b"\xc1", msgpack.packb([[1, 2, 3]])):
        with pytest.raises(BadArgumentsError):
            parse(Op.APPLY, bad)
    with pytest.raises(BadArgumentsError, match="not one msgpack array"):
        parse(Op.APPLY, b"\xdd\xff\xff\xff\xff")  # an array header announcing 2**32-1 items, refused before any is built
