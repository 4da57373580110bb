#!/usr/bin/env python3
"""Micro-benchmark of frame decoding: dcache's FrameDecoder against the classic loop.

    .venv/bin/python bin/bench_decoder.py

Decodes chunks of 32 GET frames; prints microseconds per frame.
"""

from __future__ import annotations

import struct
import time

import msgpack

from dcache.protocol import FrameDecoder, encode_request

HEADER = struct.Struct(">I")
CHUNK = b"".join(encode_request(3, i, b"key:%08d" % i) for i in range(32))
ROUNDS = 20_000


def framedecoder() -> float:
    dec = FrameDecoder()
    t = time.perf_counter()
    for _ in range(ROUNDS):
        dec.feed(CHUNK)
    return (time.perf_counter() - t) / (ROUNDS * 32) * 1e6


def bytearray_loop() -> float:
    buf = bytearray()
    unpackb = msgpack.unpackb
    unpack_from = HEADER.unpack_from
    t = time.perf_counter()
    for _ in range(ROUNDS):
        buf += CHUNK
        off = 0
        out = []
        n = len(buf)
        while n - off >= 4:
            (size,) = unpack_from(buf, off)
            if n - off - 4 < size:
                break
            out.append(unpackb(memoryview(buf)[off + 4 : off + 4 + size], raw=False))
            off += 4 + size
        del buf[:off]
    return (time.perf_counter() - t) / (ROUNDS * 32) * 1e6


def bare_unpacker() -> float:
    up = msgpack.Unpacker(raw=False)
    body = b"".join(msgpack.packb([3, i, b"key:%08d" % i]) for i in range(32))
    t = time.perf_counter()
    for _ in range(ROUNDS):
        up.feed(body)
        list(up)
    return (time.perf_counter() - t) / (ROUNDS * 32) * 1e6


if __name__ == "__main__":
    # best of five runs of each, to keep a busy machine's noise out
    print(f"FrameDecoder (streaming Unpacker):   {min(framedecoder() for _ in range(5)):.3f} us/frame")
    print(f"bytearray + unpackb per frame:       {min(bytearray_loop() for _ in range(5)):.3f} us/frame")
    print(f"bare Unpacker, no framing (bound):   {min(bare_unpacker() for _ in range(5)):.3f} us/frame")
