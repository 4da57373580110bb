"""Length-prefixed msgpack framing, sans-IO.

A frame is a 4-byte big-endian unsigned length ``n`` followed by exactly
``n`` bytes holding one msgpack object. This module turns a byte stream into
decoded objects and back; it owns no socket, no loop and does no logging.

Design note
-----------
Per-frame Python work is the cost that matters at high request rates, so the
decoder keeps it in C where it can: every chunk is fed once into one
streaming ``msgpack.Unpacker``; per frame Python does only what the length
prefix needs (read four bytes, compare against the limit, note where the
frame must end) and msgpack's C parser does the rest. Measured here: about
0.27 µs of decoder work per small frame against 0.44 µs for a bytearray +
``unpackb`` loop. A chunk that is exactly one whole frame while nothing is
buffered (every read of an unpipelined connection) takes a shorter path
with the same checks: 0.47 µs per call against 1.13 through the general
loop, whose set-up is paid per call.

Invariants:

* A frame whose declared length exceeds ``max_frame_bytes`` is refused as
  soon as its four header bytes arrive, before its body is buffered.
* The msgpack object must end exactly where the length says: shorter
  (trailing bytes) or longer (running into the next frame) is a protocol
  error. Once an error is raised the stream is unusable; the caller sends an
  error frame and closes the connection.
* An array or map of more than ``max_items`` items anywhere in a frame is
  refused as soon as its header is read (status ``TOO_MANY_KEYS``), before
  its items are decoded: a 24 MB frame of two million keys would otherwise
  hold the loop for 150 ms building them.
* The internal buffer never holds more than ``max_frame_bytes`` plus one
  chunk of unconsumed input. The limit can be lowered and raised again
  (``max_frame_bytes`` is settable, up to the ``max_frame_bytes`` the decoder
  was built with): a server accepts only HELLO-sized frames until a
  connection has authenticated.
* A large frame (over ``STASH_AFTER_BYTES``) still arriving is decoded as
  its bytes come, by an unpacker of its own: no single call decodes a
  whole 30 MB frame, and ``buffered`` counts the objects decoded so far
  (``DECODED_BLOCK_BYTES`` each), not only the bytes, so a server's
  ``--max-input-buffer`` bounds what a trickled frame of tiny items holds.
* The unpacker starts with a small buffer (``INITIAL_BUFFER_BYTES``) and
  grows it only as large frames need; msgpack's default reserves 1 MiB per
  unpacker, which a server pays per connection.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import msgpack

from ..errors import RemoteProtocolError, Status
from .limits import MAX_ARRAY_ITEMS, MAX_FRAME_BYTES

__all__ = [
    "HEADER",
    "HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "ONE_CHUNK_BYTES",
    "FrameDecoder",
    "encode_frame",
    "foreign_protocol",
    "frame_header",
    "queue_frame",
]

HEADER = struct.Struct(">I")
HEADER_BYTES = 4
#: Largest unsplit chunk handed to the unpacker at once.
_FEED_CHUNK_BYTES = 1024 * 1024
#: The unpacker's first buffer (msgpack's ``read_size``); it grows (doubling)
#: only when a chunk does not fit, so an idle or short connection costs a few
#: pages, not msgpack's default of a megabyte.
INITIAL_BUFFER_BYTES = 16 * 1024
#: The body of a frame larger than this, still arriving, is decoded as it
#: arrives by an unpacker of its own (``msgpack.Unpacker`` resumes where its
#: last call stopped): each read decodes what it brought, so no call decodes
#: the whole frame (40-60 ms for an MSET of 100,000 pairs or of 41 MB,
#: docs/BENCHMARKS.md "Frame decoding"), and the body is never kept whole:
#: the unpacker holds only the unfinished item at the end of what came.
STASH_AFTER_BYTES = 64 * 1024
#: What each small object decoded from a large frame still arriving is charged
#: in ``buffered`` (so in a server's ``--max-input-buffer``), on top of the
#: frame's bytes: the objects are made as the bytes come, and a byte string
#: of two bytes is four bytes of msgpack but a 48-byte block (a list, 64 and
#: its items' array). Counted with ``sys.getallocatedblocks`` around each
#: decoding call (pymalloc's blocks, up to 512 bytes: larger objects are
#: about the size of their bytes, which are counted already).
DECODED_BLOCK_BYTES = 64
#: msgpack never shrinks its buffer: after a frame larger than this, the
#: decoder starts a new unpacker as soon as nothing is buffered, so an idle
#: connection does not keep the memory its largest frame needed.
RENEW_AFTER_BYTES = 1024 * 1024

frame_header = HEADER.pack
_allocated_blocks = sys.getallocatedblocks
_unpack_header = HEADER.unpack_from

_RUNS_PAST = "msgpack object runs past the end of its frame"
_LENGTH_MISMATCH = "frame length does not match its msgpack object"


def _undecodable(exc: Exception) -> RemoteProtocolError:
    text = str(exc)
    if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
        return RemoteProtocolError(
            f"too many items in one array or map of a frame ({text}): split the request", status=Status.TOO_MANY_KEYS
        )
    return RemoteProtocolError(f"undecodable frame: {exc.__class__.__name__}: {text}")


#: Frames up to this size are queued as one ``header + body`` chunk
#: (``queue_frame``). uvloop writes a lone bytes object with a plain
#: write(2); a list goes through its writev path (a write context, a buffer
#: acquired per chunk), which costs more than the copy up to about 10 KB and
#: less above (docs/DECISIONS.md).
ONE_CHUNK_BYTES = 4096


def queue_frame(out: list[bytes], body: bytes) -> None:
    """Append the frame of an already-packed ``body`` to the write queue ``out``.

    A small frame goes in as one chunk, a large one as header and body (no
    copy of the body); write a queue of one chunk with ``transport.write``.
    """
    if len(body) <= ONE_CHUNK_BYTES:
        out.append(HEADER.pack(len(body)) + body)
    else:
        out.append(HEADER.pack(len(body)))
        out.append(body)


def encode_frame(payload: bytes) -> bytes:
    """Prefix an already-packed msgpack ``payload`` with its 4-byte length."""
    n = len(payload)
    if n > 0xFFFFFFFF:
        from ..errors import LocalProtocolError

        raise LocalProtocolError(f"frame of {n} bytes cannot be length-prefixed")
    return HEADER.pack(n) + payload


class FrameDecoder:
    """Incremental decoder: bytes in, one msgpack object out per frame.

    ``feed(data)`` returns the list of objects completed by ``data`` (often
    empty, often many). It raises ``RemoteProtocolError`` for anything that is
    not a well-formed frame; its ``status`` is ``FRAME_TOO_LARGE`` when the
    declared length is over the limit.
    """

    __slots__ = (
        "_unpacker",
        "_max_frame",
        "_ceiling",
        "_fed",
        "_frame_end",
        "_partial",
        "error",
        "_frame_start",
        "_big",
        "_large",
        "_large_got",
        "_large_extra",
        "_max_items",
        "buffered",
        "one_frame",
    )

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, max_items: int = MAX_ARRAY_ITEMS) -> None:
        if max_frame_bytes <= 0 or max_items <= 0:
            raise ValueError("max_frame_bytes and max_items must be positive")
        self._max_frame = max_frame_bytes
        self._ceiling = max_frame_bytes
        self._max_items = max_items
        self._unpacker = self._new_unpacker()
        self._big = False  # a frame over RENEW_AFTER_BYTES went through the unpacker
        self._large: msgpack.Unpacker | None = None  # decodes a large frame's body as it arrives (not the shared unpacker)
        self._large_got = 0  # bytes of that body fed to it so far
        self._large_extra = 0  # what its objects decoded so far are estimated to hold beyond those bytes (``DECODED_BLOCK_BYTES``)
        self._fed = 0  # stream offset of the end of everything fed so far
        self._frame_end = -1  # stream offset where the current body ends; -1: reading a header
        self._partial = b""  # header bytes received so far (fewer than four)
        #: The protocol error met after the objects last returned, if any:
        #: ``feed`` returns the complete objects that precede a bad frame and
        #: keeps the error here; the next ``feed`` raises it. Set by the
        #: decoder only (an attribute, not a property: read once per
        #: ``data_received``).
        self.error: RemoteProtocolError | None = None
        self._frame_start = 0  # stream offset of the current frame's header
        #: Bytes received but not yet consumed as complete frames (kept up to
        #: date by ``feed``: an attribute, not a property, for the hot path).
        self.buffered = 0
        #: Return after each frame, leaving the rest buffered (``feed(b"")``
        #: decodes the next): a server reads the frames that follow a HELLO
        #: only once the HELLO has decided which limit they get.
        self.one_frame = False

    def _new_unpacker(self) -> msgpack.Unpacker:
        ceiling = self._ceiling
        return msgpack.Unpacker(
            read_size=min(INITIAL_BUFFER_BYTES, ceiling),
            max_buffer_size=ceiling + _FEED_CHUNK_BYTES + HEADER_BYTES,
            **self._limits(),
        )

    def _renew(self) -> None:
        """Start a new unpacker (nothing is buffered): the old one's grown buffer is freed."""
        self._unpacker = self._new_unpacker()
        self._fed = self._frame_start = 0
        self._big = False

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame body this decoder accepts now (settable, up to the one it was built with)."""
        return self._max_frame

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        if not 0 < value <= self._ceiling:
            raise ValueError(f"max_frame_bytes must be in 1 .. {self._ceiling}")
        self._max_frame = value

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data`` and return every object it completes, in order.

        Raises ``RemoteProtocolError`` when the stream is malformed and no
        complete object precedes the fault in this call; otherwise the
        objects are returned and the error is left in ``error``.
        """
        if self.error is not None:
            raise _copy(self.error)
        if self._frame_end < 0 and not self._partial:
            # Fast path: nothing buffered and ``data`` is exactly one whole
            # frame (an unpipelined request or answer). Same checks and
            # errors as ``_drain``, without its set-up.
            n = len(data) - HEADER_BYTES
            if n > 0 and n <= self._max_frame and _unpack_header(data)[0] == n:
                up = self._unpacker
                up.feed(data)
                self._fed = end = self._fed + n + HEADER_BYTES
                up.read_bytes(HEADER_BYTES)
                try:
                    obj = up.unpack()
                except msgpack.OutOfData:
                    raise self._keep(RemoteProtocolError(_RUNS_PAST)) from None
                except Exception as exc:
                    raise self._keep(_undecodable(exc)) from None
                if up.tell() != end:
                    raise self._keep(RemoteProtocolError(_LENGTH_MISMATCH))
                if n > RENEW_AFTER_BYTES:
                    self._renew()
                return [obj]
        try:
            return self._feed(data)
        except _Failed as failed:
            if failed.out:
                self._keep(failed.error)
                return failed.out
            # No local may hold the raised error: this frame, kept by its
            # traceback, would hold it back (a cycle through ``self``).
            raise self._keep(failed.error) from None

    def _keep(self, error: RemoteProtocolError) -> RemoteProtocolError:
        """Keep ``error`` for ``error``/the next ``feed``; return a copy to raise.

        The kept error carries no traceback and no context: a traceback holds
        the frames of this decoder's methods and, through ``f_back``, of the
        caller's (a server connection's ``data_received``), which hold
        ``self``: a reference cycle (connection -> decoder -> error ->
        traceback -> frames -> connection) that only the cyclic GC frees.
        """
        error.__traceback__ = None
        error.__context__ = None
        error.__cause__ = None
        self.error = error
        return _copy(error)

    def _feed(self, data: bytes) -> list[Any]:
        if len(data) > _FEED_CHUNK_BYTES:
            acc: list[Any] = []
            view = memoryview(data)
            for i in range(0, len(data), _FEED_CHUNK_BYTES):
                try:
                    acc.extend(self._feed(bytes(view[i : i + _FEED_CHUNK_BYTES])))
                except _Failed as failed:
                    failed.out[:0] = acc
                    raise
            return acc
        if self._large is not None:
            return self._feed_large(data)
        out: list[Any] = []
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise _Failed(RemoteProtocolError("input buffer overflow"), out) from None
        self._fed += len(data)
        try:
            self._drain(out)
        except RemoteProtocolError as exc:
            raise _Failed(exc, out) from None
        if self._big and self._frame_end < 0 and not self._partial and self._unpacker.tell() == self._fed:
            self._renew()
        return out

    def _start_large(self, n: int, first: bytes) -> None:
        """Decode the ``n``-byte body of a large frame as it arrives (see ``STASH_AFTER_BYTES``), from ``first``, its bytes so far."""
        self._large = msgpack.Unpacker(read_size=min(INITIAL_BUFFER_BYTES, n), max_buffer_size=n + _FEED_CHUNK_BYTES, **self._limits())
        self._large_got = self._large_extra = 0
        try:
            self._large_part(first, n)
        except _Failed as failed:
            raise failed.error from None

    def _large_part(self, part: Any, n: int) -> Any:
        """Feed ``part`` of the large body of ``n`` bytes; the decoded object once it is complete, else ``_MORE``."""
        up = self._large
        assert up is not None
        try:
            up.feed(part)  # within max_buffer_size: what is fed never passes the body's end
        except msgpack.BufferFull:
            raise _Failed(RemoteProtocolError("input buffer overflow"), []) from None
        self._large_got = got = self._large_got + len(part)
        blocks = _allocated_blocks()
        try:
            obj = up.unpack()
        except msgpack.OutOfData:
            obj = _MORE
        except Exception as exc:  # any malformed msgpack: the stream is lost
            raise _Failed(_undecodable(exc), []) from None
        if obj is _MORE:
            if got >= n:
                raise _Failed(RemoteProtocolError(_RUNS_PAST), [])
            made = _allocated_blocks() - blocks  # the objects of the items decoded, kept until the frame is complete
            if made > 0:
                self._large_extra += made * DECODED_BLOCK_BYTES
            return _MORE
        if up.tell() != n:  # the object ended before its frame did
            raise _Failed(RemoteProtocolError(_LENGTH_MISMATCH), [])
        return obj

    def _feed_large(self, data: bytes) -> list[Any]:
        """More of a large frame's body (see ``STASH_AFTER_BYTES``): decoded as it comes; the frame's object once complete."""
        n = self._frame_end - self._frame_start - HEADER_BYTES
        need = n - self._large_got
        if len(data) < need:
            obj = self._large_part(data, n)
            if obj is _MORE:
                self.buffered = HEADER_BYTES + self._large_got + self._large_extra
                return []
        else:
            obj = self._large_part(memoryview(data)[:need], n)
        self._large = None
        self._large_extra = 0
        self._frame_end = -1
        self._renew()  # the unpacker holds nothing: a new one, its offsets from the next byte
        self.buffered = 0
        rest = data[need:]
        if not rest:
            return [obj]
        if self.one_frame:  # the next frame waits for ``feed(b"")``
            self._unpacker.feed(rest)
            self._fed = self.buffered = len(rest)
            return [obj]
        try:
            out = self._feed(rest)
        except _Failed as failed:
            failed.out.insert(0, obj)
            raise
        out.insert(0, obj)
        return out

    def _limits(self) -> dict[str, Any]:
        """The unpacker's limits, for ``msgpack.unpackb`` (``_new_unpacker``)."""
        ceiling = self._ceiling
        return {
            "raw": False,
            "strict_map_key": True,
            "use_list": True,
            "max_str_len": ceiling,
            "max_bin_len": ceiling,
            "max_array_len": min(ceiling, self._max_items),
            "max_map_len": min(ceiling // 2, self._max_items),
            "max_ext_len": ceiling,
        }

    def _drain(self, out: list[Any]) -> None:
        # Hot loop: state lives in locals and is written back once on exit.
        up = self._unpacker
        append = out.append
        read_bytes = up.read_bytes
        tell = up.tell
        unpack = up.unpack
        from_bytes = int.from_bytes
        max_frame = self._max_frame
        end = self._frame_end
        n = end - self._frame_start - HEADER_BYTES
        try:
            while True:
                if end < 0:
                    if self._partial:
                        header = self._partial + read_bytes(HEADER_BYTES - len(self._partial))
                        self._partial = b""
                    else:
                        header = read_bytes(HEADER_BYTES)
                    if len(header) < HEADER_BYTES:
                        self._partial = header
                        return
                    n = from_bytes(header, "big")
                    if n > max_frame:
                        raise RemoteProtocolError(
                            f"frame of {n} bytes exceeds the limit of {max_frame} bytes",
                            status=Status.FRAME_TOO_LARGE,
                        )
                    if n == 0:
                        raise RemoteProtocolError("empty frame")
                    if n > RENEW_AFTER_BYTES:
                        self._big = True
                    end = tell() + n
                    if n > STASH_AFTER_BYTES and end > self._fed:  # a large body still arriving: decoded as it comes
                        self._start_large(n, read_bytes(n))
                        return
                try:
                    obj = unpack()
                except msgpack.OutOfData:
                    if self._fed >= end:
                        raise RemoteProtocolError(_RUNS_PAST) from None
                    return
                except Exception as exc:  # any malformed msgpack: the stream is lost
                    raise _undecodable(exc) from None
                if tell() != end:
                    raise RemoteProtocolError(_LENGTH_MISMATCH)
                end = -1
                append(obj)
                if self.one_frame:
                    return
        finally:
            self._frame_end = end
            if end >= 0:
                self._frame_start = start = end - n - HEADER_BYTES
                self.buffered = self._fed - start + self._large_extra
            else:
                self.buffered = len(self._partial) + self._fed - tell()


#: ``_large_part``'s answer while a large body is incomplete (``None`` is a msgpack value).
_MORE: Any = object()


def _copy(error: RemoteProtocolError) -> RemoteProtocolError:
    """A fresh exception like ``error``, to raise without attaching frames to the kept one."""
    return RemoteProtocolError(str(error), status=error.status)


class _Failed(Exception):
    """Internal: carries the error and the objects decoded before it."""

    def __init__(self, error: RemoteProtocolError, out: list[Any]) -> None:
        self.error = error
        self.out = out


#: First bytes of a RESP (Redis protocol) reply: simple string, error, bulk string, array, integer.
_RESP_FIRST_BYTES = frozenset(b"+-$*:")


def foreign_protocol(data: bytes) -> str | None:
    """The protocol the first bytes a server sent look like, if not ours: ``"HTTP"``, ``"RESP"`` or ``None``.

    Meant for the error path of a client that has not had its HELLO
    answered: the four bytes ``HTTP`` read as a frame header say 1213486160
    bytes, and each RESP first byte makes a header of at least 0x24000000
    bytes (576 MiB), so both fail the frame limit at once; this tells the
    user why.
    """
    if data.startswith(b"HTTP/"):
        return "HTTP"
    if data[:1] and data[0] in _RESP_FIRST_BYTES:
        return "RESP"
    return None
