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

__all__ = ["pack", "encode_request", "encode_response"]

_packer = msgpack.Packer(use_bin_type=True)
#: Pack one object into msgpack bytes (one shared, reused packer).
pack: Callable[[Any], bytes] = _packer.pack
_header = HEADER.pack


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
