#!/usr/bin/env python3
"""How long the one ``FrameDecoder.feed`` call that completes a large frame takes (docs/BENCHMARKS.md).

The frame is an MSET of ``--pairs`` pairs (``--key-bytes`` keys,
``--value-bytes`` values) followed by a GET frame, fed in ``--read-bytes``
reads as a socket would deliver it. Prints the total and the longest call
per round. Run it with ``PYTHONPATH`` set to the tree to measure.
"""

from __future__ import annotations

import argparse
import time

from dcache.protocol import FrameDecoder, Op, encode_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000, help="pairs in the MSET (default 10000)")
    parser.add_argument("--key-bytes", type=int, default=1024, help="bytes per key (default 1024)")
    parser.add_argument("--value-bytes", type=int, default=3072, help="bytes per value (default 3072)")
    parser.add_argument("--read-bytes", type=int, default=262_144, help="bytes per feed call (default 262144)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    pairs = [[(b"key:%d:" % i).ljust(args.key_bytes, b"x"), b"v" * args.value_bytes] for i in range(args.pairs)]
    stream = encode_request(Op.MSET, 1, pairs) + encode_request(Op.GET, 2, b"k")
    chunks = [stream[i : i + args.read_bytes] for i in range(0, len(stream), args.read_bytes)]
    print(f"frame of {len(stream) / 2**20:.1f} MiB in {len(chunks)} reads")
    for _ in range(args.rounds):
        decoder = FrameDecoder(64 << 20, max(args.pairs, 10_000))
        out: list[object] = []
        worst = total = 0.0
        for chunk in chunks:
            t0 = time.perf_counter()
            out += decoder.feed(chunk)
            took = time.perf_counter() - t0
            worst = max(worst, took)
            total += took
        assert len(out) == 2, "the MSET and the GET frame"
        print(f"total {total * 1e3:.1f} ms, longest feed {worst * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
