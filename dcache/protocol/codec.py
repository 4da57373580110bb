"""Message-level codecs over the framing layer, sans-IO.

``Limits`` groups the size limits both ends enforce. ``encode_request`` and
``encode_response`` produce complete frames; ``ServerCodec`` and
``ClientCodec`` turn received bytes into requests and responses.

The helpers ``check_key`` and ``check_value`` are what servers call per
request to turn argument errors into typed ``ServerError``s; they stay cheap
(a type test and a length comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from ..errors import (
    BadArgumentsError,
    KeyTooLargeError,
    LocalProtocolError,
    ValueTooLargeError,
)
from .framing import HEADER, MAX_FRAME_BYTES, FrameDecoder
from .messages import Request, Response

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "Limits",
    "pack",
    "encode_request",
    "encode_response",
    "check_key",
    "check_value",
    "ServerCodec",
    "ClientCodec",
]

#: Default largest key (bytes after UTF-8 encoding).
MAX_KEY_BYTES = 1024
#: Default largest value.
MAX_VALUE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits enforced on the wire.

    ``max_frame_bytes`` bounds one frame body, ``max_key_bytes`` one key and
    ``max_value_bytes`` one value. The frame limit must leave room for a
    maximal key and value.
    """

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = MAX_VALUE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_key_bytes", "max_value_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_key_bytes + self.max_value_bytes + 64 > self.max_frame_bytes:
            raise ValueError("max_frame_bytes must exceed max_key_bytes + max_value_bytes + 64")


_packer = msgpack.Packer(use_bin_type=True)
#: Pack one object into msgpack bytes (one shared, reused packer).
pack: Callable[[Any], bytes] = _packer.pack
_header = HEADER.pack


def encode_request(op: int, request_id: int, *args: Any) -> bytes:
    """One complete request frame ``[op, request_id, *args]``."""
    try:
        body = pack([op, request_id, *args])
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode request: {exc}") from None
    return _header(len(body)) + body


def encode_response(request_id: int, status: int, result: Any) -> bytes:
    """One complete response frame ``[request_id, status, result]``."""
    body = pack([request_id, status, result])
    return _header(len(body)) + body


def check_key(key: Any, limits: Limits) -> bytes:
    """Return ``key`` as bytes or raise a typed argument error.

    A msgpack ``str`` key is accepted and UTF-8 encoded, so clients in other
    languages may send either type.
    """
    if key.__class__ is not bytes:
        if isinstance(key, str):
            key = key.encode()
        elif isinstance(key, (bytes, bytearray, memoryview)):
            key = bytes(key)
        else:
            raise BadArgumentsError(f"key must be bytes or str, not {type(key).__name__}")
    k = cast(bytes, key)
    if len(k) > limits.max_key_bytes:
        raise KeyTooLargeError(f"key of {len(k)} bytes exceeds the limit of {limits.max_key_bytes}")
    if not k:
        raise BadArgumentsError("key must not be empty")
    return k


def check_value(value: Any, limits: Limits) -> bytes:
    """Return ``value`` as bytes or raise a typed argument error."""
    if value.__class__ is not bytes:
        if isinstance(value, str):
            value = value.encode()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        else:
            raise BadArgumentsError(f"value must be bytes or str, not {type(value).__name__}")
    v = cast(bytes, value)
    if len(v) > limits.max_value_bytes:
        raise ValueTooLargeError(f"value of {len(v)} bytes exceeds the limit of {limits.max_value_bytes}")
    return v


class ServerCodec:
    """Bytes from a client in, ``Request``s out; responses back to bytes."""

    __slots__ = ("limits", "_decoder")

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._decoder = FrameDecoder(self.limits.max_frame_bytes)

    def receive(self, data: bytes) -> list[Request]:
        """Decode every complete request in ``data``.

        Raises ``RemoteProtocolError`` for bytes that are not frames or
        frames that are not requests.
        """
        from ..errors import RemoteProtocolError

        out = []
        for msg in self._decoder.feed(data):
            try:
                out.append(Request.from_wire(msg))
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from None
        return out

    @staticmethod
    def send(response: Response) -> bytes:
        """Encode one response as a frame."""
        return encode_response(response.request_id, response.status, response.result)


class ClientCodec:
    """Requests to bytes; bytes from a server in, ``Response``s out."""

    __slots__ = ("limits", "_decoder")

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._decoder = FrameDecoder(self.limits.max_frame_bytes)

    @staticmethod
    def send(request: Request) -> bytes:
        """Encode one request as a frame."""
        return encode_request(request.op, request.request_id, *request.args)

    def receive(self, data: bytes) -> list[Response]:
        """Decode every complete response in ``data``."""
        from ..errors import RemoteProtocolError

        out = []
        for msg in self._decoder.feed(data):
            try:
                out.append(Response.from_wire(msg))
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from None
        return out
