"""FrameDecoder memory (issue 13, findings 4 and 5): what one decoder reserves, and that it dies by reference counting.

Every connection owns a decoder, so its fixed cost is paid per connection,
and a decoder that only the cyclic GC can free keeps its buffer (up to
``max_frame_bytes`` plus a chunk) for as long as the collector does not run:
on an aux node, which freezes the GC's view every 5 s, forever.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest

from dcache.errors import RemoteProtocolError
from dcache.protocol import HEADER, FrameDecoder, encode_request

pytestmark = pytest.mark.slow  # issue 13's memory tests run together

#: What a new decoder may reserve: msgpack's Unpacker object alone is about
#: 41 KB (its parse stack); its buffer should start small and grow on demand.
NEW_DECODER_BUDGET_BYTES = 128 * 1024


class _WeakFrameDecoder(FrameDecoder):
    """Today's FrameDecoder, plus the slot a weak reference needs."""

    __slots__ = ("__weakref__",)


@pytest.fixture(autouse=True)
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_new_decoder_reserves_little() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoder = FrameDecoder()
        cost = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert decoder.feed(encode_request(2, 1)) == [[2, 1]]
    assert cost <= NEW_DECODER_BUDGET_BYTES, f"a new FrameDecoder reserves {cost} bytes (one per connection)"


PING = encode_request(2, 1)
BAD = [
    pytest.param(HEADER.pack(1) + b"\xc1", id="undecodable-one-frame"),
    pytest.param(PING + HEADER.pack(1) + b"\xc1", id="undecodable-after-a-frame"),
    pytest.param(HEADER.pack(2) + b"\x92", id="object-runs-past-its-frame"),
    pytest.param(HEADER.pack(3) + b"\xc0\xc0\xc0", id="length-mismatch"),
    pytest.param(HEADER.pack(2**31), id="too-large"),
    pytest.param(PING + HEADER.pack(2**31), id="too-large-after-a-frame"),
]


@pytest.mark.parametrize("bad", BAD)
def test_a_decoder_that_met_an_error_is_freed_by_reference_counting(bad: bytes) -> None:
    decoder = _WeakFrameDecoder(32 * 1024 * 1024)
    for _ in range(2):  # the error as first met, then as raised again by the next feed
        try:
            decoder.feed(bad)
        except RemoteProtocolError:
            pass
    assert isinstance(decoder.error, RemoteProtocolError)
    ref = weakref.ref(decoder)
    del decoder
    assert ref() is None, "the kept error's traceback holds the decoder's frames, which hold the decoder"


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "in-256k-reads"])
def test_an_idle_decoder_does_not_keep_what_its_largest_frame_needed(split: bool) -> None:
    big = encode_request(4, 1, b"k", bytes(8 * 1024 * 1024))
    chunks = [big[i : i + 256 * 1024] for i in range(0, len(big), 256 * 1024)] if split else [big]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoder = FrameDecoder()
        out = []
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
        assert len(out) == 1 and len(out[0][3]) == 8 * 1024 * 1024
        del out, chunk
        held = tracemalloc.get_traced_memory()[0] - before
        assert decoder.feed(encode_request(2, 2)) == [[2, 2]]  # still usable afterwards
    finally:
        tracemalloc.stop()
    assert held <= NEW_DECODER_BUDGET_BYTES, f"an idle decoder keeps {held} bytes after one 8 MiB frame"
