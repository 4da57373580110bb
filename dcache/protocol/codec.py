"""Encoding requests and answers as frames (sans-IO).

One shared, reused msgpack ``Packer`` (``use_bin_type=True``); decoding is
``dcache.protocol.framing.FrameDecoder``'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import LocalProtocolError
from .framing import HEADER

__all__ = ["Packed", "pack", "pack_answer", "encode_request", "encode_response"]

_packer = msgpack.Packer(use_bin_type=True)
#: Pack one object into msgpack bytes (one shared, reused packer).
pack: Callable[[Any], bytes] = _packer.pack
_header = HEADER.pack
#: msgpack's header of a 3-element array: an answer ``[request_id, status, result]``.
_ANSWER_ARRAY = b"\x93"


class Packed:
    """A handler's result already packed as msgpack: its answer carries ``data`` as the result, byte for byte.

    For an answer that is cheaper to build as bytes than to pack object by
    object (MSETV's when every entry was stored: one shared pattern per
    entry). ``unpacked()`` is the object a caller in-process gets.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def unpacked(self) -> Any:
        """The result as objects (arrays as lists), as a peer decodes it."""
        return msgpack.unpackb(self.data, raw=False)


def pack_answer(request_id: int, status: int, result: Packed) -> bytes:
    """The body of the answer ``[request_id, status, result]`` to a ``Packed`` result: the same bytes ``pack`` gives for its objects."""
    return _ANSWER_ARRAY + pack(request_id) + pack(status) + result.data


def encode_request(op: int, request_id: int, *args: Any) -> bytes:
    """One complete request frame ``[op, request_id, *args]``.

    Raises:
        LocalProtocolError: an argument cannot be encoded in msgpack.
    """
    try:
        body = pack([op, request_id, *args])
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode request: {exc}") from None
    return _header(len(body)) + body


def encode_response(request_id: int, status: int, result: Any) -> bytes:
    """One complete response frame ``[request_id, status, result]``."""
    body = pack([request_id, status, result])
    return _header(len(body)) + body
