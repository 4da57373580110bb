"""Encoding frames; the limits' own validation; key and value checks."""

from __future__ import annotations

import pytest

from dcache.errors import BadArgumentsError, KeyTooLargeError, LocalProtocolError, ValueTooLargeError
from dcache.protocol import FrameDecoder, Limits, Op, check_key, check_value, encode_request, encode_response


def test_requests_and_answers_round_trip_through_the_decoder():
    wire = b"".join(encode_request(Op.GET, i, b"k%d" % i) for i in range(1, 6))
    assert FrameDecoder().feed(wire) == [[int(Op.GET), i, b"k%d" % i] for i in range(1, 6)]
    assert FrameDecoder().feed(encode_response(5, 0, b"v")) == [[5, 0, b"v"]]


def test_unencodable_request_is_a_local_protocol_error():
    with pytest.raises(LocalProtocolError):
        encode_request(Op.GET, 1, object())


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(max_frame_bytes=100, max_key_bytes=50, max_value_bytes=50)
    with pytest.raises(ValueError):
        Limits(max_key_bytes=0)
    with pytest.raises(ValueError):
        Limits(max_batch_keys=0)


def test_check_key():
    limits = Limits(max_frame_bytes=10_000, max_key_bytes=4, max_value_bytes=100)
    assert check_key(b"abcd", limits) == b"abcd"
    assert check_key("ab", limits) == b"ab"
    with pytest.raises(KeyTooLargeError):
        check_key(b"abcde", limits)
    with pytest.raises(KeyTooLargeError):
        check_key("ééé", limits)  # 6 bytes in UTF-8
    with pytest.raises(BadArgumentsError):
        check_key(5, limits)
    with pytest.raises(BadArgumentsError):
        check_key(b"", limits)


def test_check_value():
    limits = Limits(max_frame_bytes=10_000, max_key_bytes=4, max_value_bytes=3)
    assert check_value(b"", limits) == b""
    assert check_value("é", limits) == "é".encode()
    with pytest.raises(ValueTooLargeError):
        check_value(b"abcd", limits)
    with pytest.raises(BadArgumentsError):
        check_value(None, limits)


@pytest.mark.parametrize("rid", [1, 127, 300, 70_000, 2**64 - 1])
def test_packed_results_answer_as_their_objects_would(rid: int) -> None:
    from dcache.protocol import Packed, pack, pack_answer

    result = [[0, 1], [0, [2, 2**63]], [4, "out of memory"]]
    packed = Packed(pack(result))
    assert pack_answer(rid, 0, packed) == pack([rid, 0, result])
    assert pack_answer(rid, 4, packed) == pack([rid, 4, result])
    assert packed.unpacked() == result
