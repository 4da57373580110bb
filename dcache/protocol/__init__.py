"""The dcache wire protocol: framing, messages and codecs (sans-IO)."""

from .codec import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    ClientCodec,
    Limits,
    ServerCodec,
    check_key,
    check_value,
    encode_request,
    encode_response,
    pack,
)
from .framing import HEADER, HEADER_BYTES, MAX_FRAME_BYTES, ONE_CHUNK_BYTES, FrameDecoder, encode_frame, queue_frame
from .messages import CONNECTION_REQUEST_ID, OP_ARITY, PROTOCOL_VERSION, Op, Request, Response, SetFlag, Status

__all__ = [
    "CONNECTION_REQUEST_ID",
    "HEADER",
    "HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "ONE_CHUNK_BYTES",
    "OP_ARITY",
    "PROTOCOL_VERSION",
    "ClientCodec",
    "FrameDecoder",
    "Limits",
    "Op",
    "Request",
    "Response",
    "ServerCodec",
    "SetFlag",
    "Status",
    "check_key",
    "check_value",
    "encode_frame",
    "encode_request",
    "encode_response",
    "pack",
    "queue_frame",
]
