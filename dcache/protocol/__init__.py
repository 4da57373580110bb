"""The dcache wire protocol (sans-IO): framing, the op table and its parsers, limits, request tables."""

from .codec import encode_request, encode_response, pack
from .framing import HEADER, HEADER_BYTES, ONE_CHUNK_BYTES, FrameDecoder, encode_frame, foreign_protocol, queue_frame
from .limits import (
    INT64_MAX,
    INT64_MIN,
    MAX_ARRAY_ITEMS,
    MAX_BATCH_KEYS,
    MAX_FRAME_BYTES,
    MAX_HELLO_FRAME_BYTES,
    MAX_KEY_BYTES,
    MAX_TTL_MS,
    MAX_VALUE_BYTES,
    MAX_WEIGHT,
    UINT64_MAX,
    Limits,
)
from .messages import CHANGING_OPS, CONNECTION_REQUEST_ID, PROTOCOL_VERSION, PUSH_ID, Op, Push, SetFlag, Status
from .ops import OPS, Credential, OpSpec, check_key, check_value, parse_request_id, unpack_entries
from .requests import MAX_REQUEST_ID, RequestTable

__all__ = [
    "CHANGING_OPS",
    "CONNECTION_REQUEST_ID",
    "HEADER",
    "HEADER_BYTES",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_ARRAY_ITEMS",
    "MAX_BATCH_KEYS",
    "MAX_FRAME_BYTES",
    "MAX_HELLO_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_REQUEST_ID",
    "MAX_TTL_MS",
    "MAX_VALUE_BYTES",
    "MAX_WEIGHT",
    "ONE_CHUNK_BYTES",
    "OPS",
    "PROTOCOL_VERSION",
    "PUSH_ID",
    "Push",
    "UINT64_MAX",
    "Credential",
    "FrameDecoder",
    "Limits",
    "Op",
    "OpSpec",
    "RequestTable",
    "SetFlag",
    "Status",
    "check_key",
    "check_value",
    "encode_frame",
    "encode_request",
    "encode_response",
    "foreign_protocol",
    "pack",
    "parse_request_id",
    "queue_frame",
    "unpack_entries",
]
