"""``dcache.lru.snapshot``: round trips, expiry at load, and every way a file can be damaged."""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dcache.errors import DCacheError
from dcache.lru import LRUCache, SnapshotCorruptError, SnapshotData, SnapshotError, SnapshotForeignError, dump, load
from dcache.lru.snapshot import DUMP_CHUNK_ENTRIES, FORMAT_VERSION, MAGIC, SnapshotDecoder, pack_entries, write_packed

NOW = 1_700_000_000_000
HEADER: dict[str, Any] = {"node_id": "aux-1", "ring_epoch": 7, "created_ms": NOW - 5}
U64 = (1 << 64) - 1


def dumps(entries: Any, **header: Any) -> bytes:
    buf = io.BytesIO()
    n = dump(entries, buf, **{**HEADER, **header})
    data = buf.getvalue()
    assert n == len(data)
    return data


def loads(data: bytes, now_ms: int = NOW, **kw: Any) -> SnapshotData:
    return load(io.BytesIO(data), now_ms=now_ms, **kw)


class Dribble(io.RawIOBase):
    """A file whose reads return 1 to 7 bytes: every object straddles read boundaries."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = min(size, self._rng.randint(1, 7))
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


def build(header: Any, body: bytes = b"", trailer: Any = None, *, magic: bytes = MAGIC) -> bytes:
    """A stream with a correct checksum around arbitrary header, body and trailer.

    ``trailer`` may be a dict, raw bytes, or a callable of the right digest.
    """
    head = magic + (header if isinstance(header, bytes) else msgpack.packb(header))
    digest = xxhash.xxh3_64_intdigest(head + body)
    if trailer is None:
        trailer = {"count": header["count"], "xxh3_64": digest}
    elif callable(trailer):
        trailer = trailer(digest)
    return head + body + (trailer if isinstance(trailer, bytes) else msgpack.packb(trailer))


def header(count: int, **kw: Any) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, **HEADER, "count": count, **kw}


def sample_entries(n: int, seed: int = 1) -> list[tuple[bytes, bytes, int, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        exp = rng.choice([0, 0, NOW + rng.randint(1, 10**6), U64])
        out.append((b"k%d" % i, rng.randbytes(rng.choice([0, 1, 31, 32, 255, 256, 300])), exp, rng.randint(0, U64)))
    return out


SMALL = [(b"a", b"1", 0, 1), (b"b", b"", NOW + 1000, 2), (b"\x00\xff", b"x" * 40, 0, U64)]
SMALL_FILE = dumps(SMALL)
BIG_ENTRIES = sample_entries(3 * DUMP_CHUNK_ENTRIES + 17)
BIG_FILE = dumps(BIG_ENTRIES)


# -- round trips ---------------------------------------------------------------


def test_round_trip_keeps_every_field():
    data = loads(SMALL_FILE)
    assert data.entries == SMALL
    assert (data.node_id, data.ring_epoch, data.created_ms, data.count, data.expired) == ("aux-1", 7, NOW - 5, 3, 0)
    assert data.size_bytes == len(SMALL_FILE)
    assert SMALL_FILE.startswith(MAGIC)


def test_empty_snapshot():
    data = loads(dumps([]))
    assert data.entries == [] and data.count == 0 and data.expired == 0


def test_round_trip_across_chunks_and_read_boundaries():
    assert loads(BIG_FILE).entries == BIG_ENTRIES
    assert load(Dribble(BIG_FILE), now_ms=NOW).entries == BIG_ENTRIES


def test_dump_accepts_lists_and_lru_items():
    cache = LRUCache(1 << 20, clock=lambda: NOW)
    cache.set(b"x", b"1", version=5)
    cache.set(b"y", b"2", expires_at=NOW + 10, version=6)
    assert loads(dumps(cache.snapshot_items())).entries == [(b"x", b"1", 0, 5), (b"y", b"2", NOW + 10, 6)]


def test_pack_entries_and_write_packed_equal_dump():
    chunks = [pack_entries(BIG_ENTRIES[i : i + 1000]) for i in range(0, len(BIG_ENTRIES), 1000)]
    buf = io.BytesIO()
    write_packed(chunks, buf, count=len(BIG_ENTRIES), **HEADER)
    assert buf.getvalue() == BIG_FILE


def test_expired_entries_are_dropped_at_load():
    entries = [(b"none", b"v", 0, 1), (b"past", b"v", NOW - 1, 2), (b"now", b"v", NOW, 3), (b"later", b"v", NOW + 1, 4)]
    data = loads(dumps(entries))
    assert [e[0] for e in data.entries] == [b"none", b"later"]
    assert data.expired == 2 and data.count == 4
    assert loads(dumps(entries), now_ms=0).entries == entries


# -- the decoder: entries as they are read, the verdict at the end ------------------


def decode_in_pieces(data: bytes, piece: int, max_entries: int) -> tuple[SnapshotDecoder, list[list[Any]]]:
    """Feed ``data`` ``piece`` bytes at a time, draining ``decode`` after each; the decoder and every batch."""
    decoder = SnapshotDecoder(now_ms=NOW)
    batches = []
    for i in range(0, len(data), piece):
        decoder.feed(data[i : i + piece])
        while (batch := decoder.decode(max_entries)) is not None:
            assert len(batch) <= max_entries
            batches.append(batch)
    return decoder, batches


@pytest.mark.parametrize("piece,max_entries", [(1, 1), (7, 3), (4096, 100), (len(BIG_FILE), 1000)])
def test_the_decoder_gives_loads_entries_in_bounded_batches(piece: int, max_entries: int):
    decoder, batches = decode_in_pieces(BIG_FILE, piece, max_entries)
    assert decoder.finish() == len(BIG_FILE) and decoder.complete
    assert [e for b in batches for e in b] == BIG_ENTRIES
    assert decoder.header is not None and decoder.header.count == len(BIG_ENTRIES)


def test_the_decoder_hands_out_entries_before_the_file_ends():
    decoder = SnapshotDecoder(now_ms=NOW)
    decoder.feed(BIG_FILE[: len(BIG_FILE) // 2])
    got = []
    while (batch := decoder.decode(500)) is not None:
        got += batch
    assert 0 < len(got) < len(BIG_ENTRIES) and got == BIG_ENTRIES[: len(got)]
    assert not decoder.complete
    with pytest.raises(SnapshotCorruptError, match=f"truncated in the entry {len(got)} of {len(BIG_ENTRIES)}"):
        decoder.finish()


def test_damage_only_the_end_shows_comes_after_the_entries_it_spoiled():
    """A flipped value byte passes every shape check: the entries are out before the checksum fails."""
    i = SMALL_FILE.index(b"x" * 40) + 3
    decoder = SnapshotDecoder(now_ms=NOW)
    decoder.feed(flipped(SMALL_FILE, i, 0x01))
    assert decoder.decode(2) == SMALL[:2]
    with pytest.raises(SnapshotCorruptError, match="checksum"):
        decoder.decode(2)


def test_the_decoder_counts_expired_entries_and_returns_the_others():
    entries = [(b"a", b"v", NOW - 1, 1), (b"b", b"v", NOW - 2, 2), (b"c", b"v", 0, 3)]
    decoder, batches = decode_in_pieces(dumps(entries), 1 << 20, 1)
    assert [e for b in batches for e in b] == [entries[2]] and decoder.expired == 2
    decoder.finish()


def test_bytes_fed_after_the_trailer_fail_the_finish():
    decoder, _ = decode_in_pieces(SMALL_FILE, len(SMALL_FILE), 10)
    assert decoder.complete
    decoder.feed(b"\x00")
    with pytest.raises(SnapshotCorruptError, match="trailing"):
        decoder.finish()


# -- damage: truncation, flipped bytes, trailing bytes -----------------------------


def test_truncation_at_every_offset_of_a_small_file():
    for n in range(len(SMALL_FILE)):
        with pytest.raises(SnapshotCorruptError):
            loads(SMALL_FILE[:n])


def test_truncation_at_sampled_offsets_of_a_big_file():
    size = len(BIG_FILE)
    rng = random.Random(2)
    offsets = {*range(0, 64), *range(size - 64, size), *(rng.randrange(size) for _ in range(150))}
    for n in sorted(offsets):
        with pytest.raises(SnapshotCorruptError):
            loads(BIG_FILE[:n])


def flipped(data: bytes, i: int, mask: int) -> bytes:
    b = bytearray(data)
    b[i] ^= mask
    return bytes(b)


def test_flipped_bytes_at_every_position_of_a_small_file():
    for i in range(len(SMALL_FILE)):
        for mask in (0x01, 0x80, 0xFF):
            with pytest.raises(SnapshotError):
                loads(flipped(SMALL_FILE, i, mask))


def test_flipped_bytes_at_sampled_positions_of_a_big_file():
    rng = random.Random(3)
    size = len(BIG_FILE)
    positions = {*range(0, 48), *range(size - 48, size), *(rng.randrange(size) for _ in range(150))}
    for i in sorted(positions):
        with pytest.raises(SnapshotError):
            loads(flipped(BIG_FILE, i, 1 << rng.randrange(8)))


def test_a_flip_inside_a_value_is_caught_by_the_checksum():
    i = SMALL_FILE.index(b"x" * 40) + 3
    with pytest.raises(SnapshotCorruptError, match="checksum"):
        loads(flipped(SMALL_FILE, i, 0x01))


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", SMALL_FILE[-32:], SMALL_FILE, msgpack.packb({"count": 3, "xxh3_64": 1})], ids=repr)
def test_trailing_bytes_are_rejected(extra: bytes):
    with pytest.raises(SnapshotCorruptError, match="trailing"):
        loads(SMALL_FILE + extra)
    with pytest.raises(SnapshotCorruptError, match="trailing"):
        load(Dribble(SMALL_FILE + extra), now_ms=NOW)


# -- foreign files ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"DCSNAP\x00\x02" + SMALL_FILE[8:], b"XCSNAP\x00\x01" + SMALL_FILE[8:], b"hello, world", b'{"format": 1}', b"\x00" * 64],
    ids=["next-magic", "bad-magic", "text", "json", "zeros"],
)
def test_wrong_magic_is_foreign(data: bytes):
    with pytest.raises(SnapshotForeignError):
        loads(data)


@pytest.mark.parametrize("fmt", [0, 2, 99, "1", None, True])
def test_other_format_versions_are_foreign(fmt: Any):
    with pytest.raises(SnapshotForeignError, match="format"):
        loads(build(header(0, format=fmt)))


def test_a_short_prefix_of_the_magic_is_truncation_not_foreign():
    for n in range(len(MAGIC)):
        with pytest.raises(SnapshotCorruptError, match="truncated"):
            loads(MAGIC[:n])


def test_errors_belong_to_the_dcache_tree():
    assert issubclass(SnapshotCorruptError, SnapshotError) and issubclass(SnapshotForeignError, SnapshotError)
    assert issubclass(SnapshotError, DCacheError)


# -- well-checksummed but malformed ------------------------------------------------


def entries_body(*entries: Any) -> bytes:
    return b"".join(msgpack.packb(e) for e in entries)


@pytest.mark.parametrize(
    "hdr",
    [
        {"format": 1},
        header(0, node_id=5),
        header(0, ring_epoch=-1),
        header(0, created_ms="x"),
        {**header(0), "count": None},
        {**header(0), "count": -1},
    ],
    ids=["missing-fields", "node-id-int", "negative-epoch", "created-str", "count-nil", "count-negative"],
)
def test_bad_header_fields(hdr: dict[str, Any]):
    with pytest.raises(SnapshotCorruptError):
        loads(build(hdr, trailer={"count": 0, "xxh3_64": 0}))


def test_header_that_is_not_a_map():
    with pytest.raises(SnapshotCorruptError, match="header"):
        loads(build(msgpack.packb([1, 2]), trailer=b""))


def test_unknown_header_keys_are_ignored():
    data = build(header(1, extra="yes"), entries_body([b"k", b"v", 0, 1]))
    assert loads(data).entries == [(b"k", b"v", 0, 1)]


@pytest.mark.parametrize(
    "entry",
    [
        [b"k", b"v", 0],
        [b"k", b"v", 0, 1, 2],
        ["k", b"v", 0, 1],
        [b"k", "v", 0, 1],
        [b"k", b"v", -1, 1],
        [b"k", b"v", 0, -1],
        [b"k", b"v", 1.5, 1],
        [b"k", b"v", False, 1],
        [b"k", b"v", 0, None],
        {"k": b"v"},
        b"kv",
    ],
    ids=repr,
)
def test_malformed_entries(entry: Any):
    with pytest.raises(SnapshotCorruptError):
        loads(build(header(1), entries_body(entry)))


def test_trailer_count_must_match_the_header():
    with pytest.raises(SnapshotCorruptError, match="count"):
        loads(build(header(0), trailer=lambda d: {"count": 1, "xxh3_64": d}))


@pytest.mark.parametrize(
    "trailer",
    [
        lambda d: {"count": 0},
        lambda d: {"count": 0, "xxh3_64": d, "more": 1},
        lambda d: [0, d],
        lambda d: {"count": 0, "xxh3_64": str(d)},
    ],
    ids=["missing-checksum", "extra-key", "array", "checksum-str"],
)
def test_malformed_trailers(trailer: Any):
    with pytest.raises(SnapshotCorruptError):
        loads(build(header(0), trailer=trailer))


def test_more_entries_than_the_header_counts():
    body = entries_body([b"a", b"1", 0, 1], [b"b", b"2", 0, 2])
    with pytest.raises(SnapshotCorruptError):
        loads(build(header(1), body, trailer=lambda d: {"count": 1, "xxh3_64": d}))


def test_invalid_utf8_in_the_header():
    raw = msgpack.packb(header(0, node_id="NODE")).replace(b"NODE", b"\xff\xfe\xfd\xfc")
    with pytest.raises(SnapshotCorruptError):
        loads(build(raw, trailer={"count": 0, "xxh3_64": 0}))


def test_values_over_the_limit_are_corruption_not_memory_blowups():
    data = dumps([(b"k", b"v" * 1000, 0, 1)])
    assert loads(data, max_bin_bytes=1000).entries
    with pytest.raises(SnapshotCorruptError):
        loads(data, max_bin_bytes=999)
    # A damaged length prefix claiming a 4 GiB value fails fast.
    bad = SMALL_FILE.replace(b"\xc4\x28" + b"x" * 40, b"\xc6\xff\xff\xff\xff" + b"x" * 40)
    assert bad != SMALL_FILE
    with pytest.raises(SnapshotCorruptError):
        loads(bad)


# -- dump refuses what load would reject -------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        ("k", b"v", 0, 1),
        (b"k", "v", 0, 1),
        (b"k", b"v", -1, 1),
        (b"k", b"v", 0, 1 << 64),
        (b"k", b"v", True, 1),
        (b"k", b"v", 0),
        [b"k", b"v", 0, 1],
    ],
    ids=repr,
)
def test_dump_rejects_bad_entries(entry: Any):
    with pytest.raises(ValueError):
        dumps([entry])


@pytest.mark.parametrize("field,value", [("node_id", 3), ("ring_epoch", -1), ("created_ms", 1.5)])
def test_dump_rejects_bad_header_fields(field: str, value: Any):
    with pytest.raises(ValueError, match=field):
        dumps(SMALL, **{field: value})


def test_write_packed_checks_the_count_before_the_trailer():
    buf = io.BytesIO()
    with pytest.raises(ValueError, match="announced"):
        write_packed([pack_entries(SMALL)], buf, count=2, **HEADER)
    with pytest.raises(SnapshotCorruptError):
        loads(buf.getvalue())


class LyingLength(list):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 1


def test_dump_checks_len_against_what_it_iterates():
    with pytest.raises(ValueError):
        dumps(LyingLength(SMALL))


# -- properties --------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=U64)
entry_maps = st.dictionaries(
    st.binary(max_size=40),
    st.tuples(st.binary(max_size=300), st.one_of(st.just(0), st.integers(NOW - 10, NOW + 10), u64), u64),
    max_size=40,
)


@given(entry_maps, st.integers(0, U64), st.text(max_size=30), u64, u64)
@example({b"": (b"", U64, U64)}, U64, "", 0, 0)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_property(mapping, now_ms, node_id, ring_epoch, created_ms):
    entries = [(k, v, exp, ver) for k, (v, exp, ver) in mapping.items()]
    data = dumps(entries, node_id=node_id, ring_epoch=ring_epoch, created_ms=created_ms)
    got = load(Dribble(data, seed=len(data)), now_ms=now_ms)
    live = [e for e in entries if e[2] == 0 or e[2] > now_ms]
    assert got.entries == live
    assert got.expired == len(entries) - len(live)
    assert (got.node_id, got.ring_epoch, got.created_ms, got.count) == (node_id, ring_epoch, created_ms, len(entries))


@given(st.binary(max_size=200))
@example(MAGIC)
@example(MAGIC + b"\x80")
@example(MAGIC + b"\xdf\xff\xff\xff\xff")
@example(MAGIC + b"\xc1")
@settings(max_examples=300)
def test_arbitrary_bytes_only_raise_snapshot_errors(data):
    for blob in (data, MAGIC + data):
        with pytest.raises(SnapshotError):
            loads(blob)


@given(st.data())
@settings(max_examples=200)
def test_any_damage_to_a_valid_file_is_detected(data):
    pos = data.draw(st.integers(0, len(SMALL_FILE) - 1))
    kind = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    b = bytearray(SMALL_FILE)
    if kind == "replace":
        b[pos] = data.draw(st.integers(0, 255).filter(lambda x: x != SMALL_FILE[pos]))
    elif kind == "delete":
        del b[pos]
    else:
        b.insert(pos, data.draw(st.integers(0, 255)))
    try:
        got = loads(bytes(b))
    except SnapshotError:
        return
    # Not refused: only a change that keeps every value may load, e.g. the checksum's msgpack type
    # byte uint64 (0xcf) turned into int64 (0xd3) when its top bit is 0 (position 168 here), or an
    # int8 prefix (0xd0) inserted before a small int of the header (the same value, one byte longer:
    # only ``size_bytes``, the stream's length, differs).
    assert dataclasses.replace(got, size_bytes=len(SMALL_FILE)) == loads(SMALL_FILE)
