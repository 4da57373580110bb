"""Framing: golden vectors fed whole, byte by byte and with trailing bytes; limits; fuzz."""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.errors import RemoteProtocolError, Status
from dcache.protocol import ONE_CHUNK_BYTES, FrameDecoder, encode_frame, encode_request, encode_response, foreign_protocol, queue_frame

# (frame bytes, decoded object) pairs; the bytes are written out by hand so
# that the spec in docs/PROTOCOL.md and the code cannot drift together.
GOLDEN = [
    # PING, request id 1: [2, 1]
    (bytes.fromhex("00000003920201"), [2, 1]),
    # GET b"k", request id 7: [3, 7, bin8 "k"]
    (bytes.fromhex("00000006930307c4016b"), [3, 7, b"k"]),
    # SET b"k" = b"v", ttl 1000 ms, no flags, id 2
    (bytes.fromhex("0000000d960402c4016bc40176cd03e800"), [4, 2, b"k", b"v", 1000, 0]),
    # response to id 7: OK, bin "v"
    (bytes.fromhex("00000006930700c40176"), [7, 0, b"v"]),
    # response: miss (nil)
    (bytes.fromhex("00000004930700c0"), [7, 0, None]),
    # error response: id 9, status 2 (UNKNOWN_OP), message "unknown op 99"
    (bytes.fromhex("00000011930902ad") + b"unknown op 99", [9, 2, "unknown op 99"]),
]


def test_golden_vectors_match_encoders():
    assert encode_request(2, 1) == GOLDEN[0][0]
    assert encode_request(3, 7, b"k") == GOLDEN[1][0]
    assert encode_request(4, 2, b"k", b"v", 1000, 0) == GOLDEN[2][0]
    assert encode_response(7, 0, b"v") == GOLDEN[3][0]
    assert encode_response(7, 0, None) == GOLDEN[4][0]
    assert encode_response(9, 2, "unknown op 99") == GOLDEN[5][0]


@pytest.mark.parametrize("frame,obj", GOLDEN)
def test_golden_whole(frame, obj):
    assert FrameDecoder().feed(frame) == [obj]


@pytest.mark.parametrize("frame,obj", GOLDEN)
def test_golden_byte_by_byte(frame, obj):
    dec = FrameDecoder()
    out = []
    for i in range(len(frame)):
        out.extend(dec.feed(frame[i : i + 1]))
        if i < len(frame) - 1:
            assert out == []
    assert out == [obj]
    assert dec.buffered == 0


def test_many_frames_one_chunk_and_trailing_partial():
    stream = b"".join(f for f, _ in GOLDEN)
    dec = FrameDecoder()
    assert dec.feed(stream + GOLDEN[1][0][:5]) == [o for _, o in GOLDEN]
    assert dec.buffered == 5
    assert dec.feed(GOLDEN[1][0][5:]) == [GOLDEN[1][1]]


def test_oversized_length_refused_from_header_alone():
    dec = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(RemoteProtocolError) as info:
        dec.feed((101).to_bytes(4, "big"))
    assert info.value.status == Status.FRAME_TOO_LARGE


def test_frames_before_a_bad_one_are_returned_then_error():
    dec = FrameDecoder()
    good = encode_request(2, 1)
    bad = (3).to_bytes(4, "big") + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    assert dec.feed(good + bad) == [[2, 1]]
    assert isinstance(dec.error, RemoteProtocolError)
    with pytest.raises(RemoteProtocolError):
        dec.feed(good)


def test_length_shorter_than_object_is_an_error():
    body = msgpack.packb([3, 1, b"abc"])
    dec = FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(len(body[:-2]).to_bytes(4, "big") + body)


def test_length_longer_than_object_is_an_error():
    body = msgpack.packb([2, 1]) + b"\x00"
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_empty_frame_is_an_error():
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_large_frame_split_across_chunks():
    value = bytes(range(256)) * 8192  # 2 MiB
    frame = encode_response(5, 0, value)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(frame), 65536):
        out.extend(dec.feed(frame[i : i + 65536]))
    assert out == [[5, 0, value]]


def test_large_chunk_of_many_frames():
    frames = b"".join(encode_request(3, i, b"key%d" % i) for i in range(100_000))
    assert len(frames) > 1024 * 1024
    out = FrameDecoder().feed(frames)
    assert len(out) == 100_000 and out[-1] == [3, 99_999, b"key99999"]


def test_encode_frame():
    assert encode_frame(b"\x90") == b"\x00\x00\x00\x01\x90"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 17))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data, step):
    dec = FrameDecoder(max_frame_bytes=1024)
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
    except RemoteProtocolError:
        pass


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=50)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_msgpack_values, min_size=1, max_size=10), st.integers(1, 64))
def test_round_trip_any_split(objs, step):
    stream = b"".join(encode_frame(msgpack.packb(o, use_bin_type=True)) for o in objs)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), step):
        out.extend(dec.feed(stream[i : i + step]))
    assert out == objs


def _outcome(dec: FrameDecoder, chunks: list[bytes]) -> tuple[list[Any], str | None]:
    out: list[Any] = []
    try:
        for chunk in chunks:
            out.extend(dec.feed(chunk))
    except RemoteProtocolError as exc:
        return out, str(exc)
    return out, None


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(len(b"\x93\x03\x01").to_bytes(4, "big") + b"\x93\x03\x01", id="object-runs-past-its-frame"),
        pytest.param((4).to_bytes(4, "big") + msgpack.packb([2, 1]) + b"\x00\x00\x00\x00"[:1], id="trailing-byte-in-frame"),
        pytest.param((1).to_bytes(4, "big") + b"\xc1", id="undecodable"),
        pytest.param(GOLDEN[0][0], id="valid"),
    ],
)
def test_one_whole_frame_decodes_as_when_split(frame: bytes) -> None:
    """A chunk that is exactly one frame (the decoder's fast path) ends as the same bytes fed one at a time."""
    whole_dec, split_dec = FrameDecoder(), FrameDecoder()
    whole = _outcome(whole_dec, [frame])
    split = _outcome(split_dec, [frame[i : i + 1] for i in range(len(frame))])
    assert whole == split
    if whole[1] is not None:  # after an error the stream stays unusable
        with pytest.raises(RemoteProtocolError):
            whole_dec.feed(GOLDEN[0][0])
    else:  # and after a good frame the next ones still decode, whole or split
        assert whole_dec.feed(GOLDEN[1][0]) == [GOLDEN[1][1]]
        assert whole_dec.feed(GOLDEN[0][0][:3]) == []
        assert whole_dec.feed(GOLDEN[0][0][3:]) == [GOLDEN[0][1]]


def test_queue_frame_joins_small_frames_and_keeps_large_bodies_apart() -> None:
    out: list[bytes] = []
    small, large = b"s" * 10, b"L" * (ONE_CHUNK_BYTES + 1)
    queue_frame(out, small)
    queue_frame(out, large)
    assert len(out) == 3 and out[2] is large  # the large body is not copied
    assert b"".join(out) == encode_frame(small) + encode_frame(large)


@pytest.mark.parametrize(
    "data,protocol",
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "HTTP"),
        (b"HTTP/1.0 404", "HTTP"),
        (b"-ERR unknown command 'x'\r\n", "RESP"),
        (b"+OK\r\n", "RESP"),
        (b"$5\r\nhello\r\n", "RESP"),
        (b"*2\r\n", "RESP"),
        (b":1\r\n", "RESP"),
        (b"\x00\x00\x00\x05\x93\x01\x00\xc0", None),  # a dcache frame
        (b"", None),
        (b"HTT", None),  # too short to tell
    ],
)
def test_foreign_protocol_recognises_http_and_resp(data, protocol):
    assert foreign_protocol(data) == protocol


@pytest.mark.parametrize("head", [b"HTTP", b"+OK\r", b"-ERR", b"$5\r\n", b"*2\r\n", b":1\r\n"])
def test_foreign_answers_overflow_the_frame_limit(head):
    """Why the client only needs to look on the error path: each reads as a header over the default limit."""
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        FrameDecoder().feed(head + b"\r\n")


_BIG = bytes(range(256)) * 1024  # 256 KiB: a body past STASH_AFTER_BYTES, decoded from its own buffer
_BIG_BODY = msgpack.packb([4, 1, b"k", _BIG])


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        pytest.param(encode_frame(_BIG_BODY), None, id="valid"),
        pytest.param(len(_BIG_BODY[:-10]).to_bytes(4, "big") + _BIG_BODY[:-10], "runs past the end", id="object-runs-past-its-frame"),
        pytest.param(encode_frame(_BIG_BODY + b"\x00"), "length does not match", id="trailing-byte-in-frame"),
        pytest.param(
            encode_frame(b"\xdd" + (2**20).to_bytes(4, "big") + b"\x00" * 200_000), "too many items", id="array-over-the-item-limit"
        ),
    ],
)
@pytest.mark.parametrize("step", [1 << 20, 65536, 4099])
def test_a_large_frame_decodes_as_a_small_one_with_the_frames_around_it(frame: bytes, error: str | None, step: int) -> None:
    """A large body is decoded apart from the unpacker: same objects and errors, and the frames before and after it still decode."""
    before, after = GOLDEN[1][0], GOLDEN[0][0]
    stream = before + frame + after
    dec = FrameDecoder(max_items=10_000)
    out, err = _outcome(dec, [stream[i : i + step] for i in range(0, len(stream), step)])
    if err is None and dec.error is not None:  # met after the frames returned with it: kept for the next feed
        err = str(dec.error)
    if error is None:
        assert err is None and out == [GOLDEN[1][1], [4, 1, b"k", _BIG], GOLDEN[0][1]]
    else:
        assert err is not None and error in err and out == [GOLDEN[1][1]], (out[:1], err)


def test_one_frame_at_a_time_after_a_large_frame() -> None:
    dec = FrameDecoder()
    dec.one_frame = True
    stream = encode_frame(_BIG_BODY) + GOLDEN[0][0] + GOLDEN[1][0]
    out = dec.feed(stream[:100_000]) + dec.feed(stream[100_000:])
    assert out == [[4, 1, b"k", _BIG]] and dec.buffered == len(GOLDEN[0][0]) + len(GOLDEN[1][0])
    assert dec.feed(b"") == [GOLDEN[0][1]] and dec.feed(b"") == [GOLDEN[1][1]] and dec.buffered == 0


def test_a_partial_large_frame_is_counted_as_it_arrives() -> None:
    """A large body of few objects is counted about at its bytes (its few decoded objects add a little)."""
    dec = FrameDecoder()
    frame = encode_frame(_BIG_BODY)
    assert dec.feed(frame[:70_000]) == [] and 70_000 <= dec.buffered < 72_000
    assert dec.feed(frame[70_000:200_000]) == [] and 200_000 <= dec.buffered < 202_000
    assert dec.feed(frame[200_000:] + GOLDEN[0][0][:2]) == [[4, 1, b"k", _BIG]] and dec.buffered == 2


def test_a_partial_large_frame_of_small_objects_is_counted_at_what_its_objects_hold() -> None:
    """A large body is decoded as it arrives: its bytes and the objects made from them count, not its bytes alone.

    60,000 byte strings of two bytes are 240 KB of msgpack but a 48-byte
    block each once decoded: a client trickling such a frame must not hold
    ten times what ``--max-input-buffer`` counts.
    """
    body = msgpack.packb([b"xy"] * 60_000)
    frame = encode_frame(body)
    dec = FrameDecoder(max_items=100_000)
    half = len(frame) // 2
    assert dec.feed(frame[:half]) == []
    assert dec.buffered >= 10 * half, dec.buffered
    assert dec.feed(frame[half:] + GOLDEN[0][0]) == [[b"xy"] * 60_000, GOLDEN[0][1]] and dec.buffered == 0


def test_no_feed_decodes_a_whole_large_frame_at_once() -> None:
    """Each read of a large frame decodes what it brought: the last one does not decode the whole body."""
    items = [[b"key:%d" % i, b"v" * 100] for i in range(20_000)]
    frame = encode_frame(msgpack.packb([6, 1, items]))
    dec = FrameDecoder(max_items=100_000)
    step = 65_536
    reads = [frame[i : i + step] for i in range(0, len(frame), step)]
    for chunk in reads[:-1]:
        assert dec.feed(chunk) == []
    made_before = sys.getallocatedblocks()
    (obj,) = dec.feed(reads[-1])
    assert sys.getallocatedblocks() - made_before < len(items), "the last read made only the objects of its own bytes"
    assert obj == [6, 1, items]
