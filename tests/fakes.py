"""Test doubles shared by unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dcache.errors import Status
from dcache.peer import PeerConnection
from dcache.protocol import FrameDecoder, Op, encode_response


class FakeTransport:
    """Enough of an ``asyncio.Transport`` for the protocols: collects what is written.

    ``protocol``: if set, ``close()`` reports the loss to it (``connection_lost``)
    in the next loop iteration, as a real transport does.
    """

    def __init__(self, peername: Any = None, *, half_close: bool = False) -> None:
        self.written: list[bytes] = []
        self.closed = False
        #: Whether it can shut its write side (a TCP transport can): ``write_eof`` sets ``eof``.
        self.half_close = half_close
        self.eof = False
        self.reading = True
        self.peername = peername
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self.peername is not None:
            return self.peername
        return default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.append(b"".join(chunks))

    def get_write_buffer_size(self) -> int:
        """Bytes written and not sent: none (the peer reads at once; see ``SlowReaderTransport``)."""
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def frames(self) -> list[Any]:
        """Everything written, decoded frame by frame."""
        return FrameDecoder().feed(b"".join(self.written))


class Reply:
    """An answer with an explicit status, for ``FakeAux.answer`` (a nil result is ``Reply(0, None)``)."""

    __slots__ = ("status", "result")

    def __init__(self, status: int, result: Any) -> None:
        self.status = int(status)
        self.result = result


class FakeAux:
    """An aux node on the other end of a master's fake connections: answers HELLO, records the rest.

    ``connect`` is a ``dcache.master.links.ConnectionFactory``: pass it to
    ``MasterNode(config, connect=...)`` or ``AuxLink(..., factory=...)``.
    Every request other than HELLO is kept in ``requests[node_id]`` and left
    unanswered unless ``answer`` says otherwise: a callable ``(node_id, msg)
    -> result``, where ``None`` leaves the request unanswered (``respond``
    can answer it later) and a ``Reply`` answers with its status.

    Knobs (public, set them freely): ``incarnations[node_id]`` is what its
    HELLO reports (default 1); ``hello_replies[node_id]`` replaces its HELLO
    answer; a node in ``silent`` answers nothing, HELLO included; connecting
    to a node in ``refused`` fails with ``ConnectionRefusedError``;
    ``clusters[node_id]`` is the cluster its BIND took (a node binds to the
    first cluster and answers ``WRONG_CLUSTER`` to others, as a real one does);
    a node in ``before_bind`` answers BIND ``UNKNOWN_OP``, as a node from
    before that op does. EPOCH is answered as a real node does (the floor,
    ``floors[node_id]``); each connection's last one is in ``epochs[node_id]``
    (not in ``requests``); a node in ``before_epoch`` answers it ``UNKNOWN_OP``.
    """

    def __init__(self, answer: Callable[[str, list[Any]], Any] | None = None) -> None:
        self.requests: dict[str, list[list[Any]]] = {}
        self.transports: dict[str, list[FakeTransport]] = {}
        self.answer = answer
        self.incarnations: dict[str, int] = {}
        self.hello_replies: dict[str, Reply] = {}
        self.silent: set[str] = set()
        self.refused: set[str] = set()
        self.connects: dict[str, int] = {}
        self.clusters: dict[str, str] = {}
        self.before_bind: set[str] = set()
        self.epochs: dict[str, list[int]] = {}
        self.floors: dict[str, int] = {}
        self.before_epoch: set[str] = set()

    async def connect(self, host: str, port: int, name: str, on_answers: Callable[[], None] | None) -> PeerConnection:
        self.connects[name] = self.connects.get(name, 0) + 1
        if name in self.refused:
            raise ConnectionRefusedError(f"{host}:{port} refused the connection")
        proto = PeerConnection(f"aux node {name}", on_answers)
        transport = _AnsweringTransport(self, name, proto)
        self.transports.setdefault(name, []).append(transport)
        proto.connection_made(transport)  # type: ignore[arg-type]
        return proto

    def ops(self, node_id: str, *ops: int) -> list[list[Any]]:
        """The requests ``node_id`` received with one of ``ops`` (every op if none given), in order."""
        return [m for m in self.requests.get(node_id, []) if not ops or m[0] in ops]

    def respond(self, node_id: str, msg: list[Any], result: Any, status: int = 0) -> None:
        """Answer a request ``node_id`` received and left unanswered (by identity of ``msg``)."""
        for transport in self.transports.get(node_id, []):
            if any(m is msg for m in transport.received):  # type: ignore[attr-defined]
                transport.reply(msg[1], status, result)  # type: ignore[attr-defined]
                return
        raise AssertionError(f"{node_id} did not receive {msg!r}")

    def drop(self, node_id: str) -> None:
        """The connections to ``node_id`` are lost (the aux node died or the network cut them)."""
        for transport in self.transports.get(node_id, []):
            transport.close()


class _AnsweringTransport(FakeTransport):
    def __init__(self, aux: FakeAux, name: str, proto: PeerConnection) -> None:
        super().__init__()
        self.protocol = proto
        self._aux = aux
        self._name = name
        self._proto = proto
        self._decoder = FrameDecoder()
        self.received: list[list[Any]] = []

    def reply(self, rid: int, status: int, result: Any) -> None:
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._deliver, encode_response(rid, status, result))

    def _deliver(self, frame: bytes) -> None:
        if not self.closed:
            self._proto.data_received(frame)

    def write(self, data: bytes) -> None:
        super().write(data)
        aux = self._aux
        name = self._name
        for msg in self._decoder.feed(bytes(data)):
            if name in aux.silent:
                self.received.append(msg)
                if msg[0] != Op.HELLO:
                    aux.requests.setdefault(name, []).append(msg)
                continue
            if msg[0] == Op.HELLO:
                hello = aux.hello_replies.get(name)
                if hello is not None:
                    self.reply(msg[1], hello.status, hello.result)
                else:
                    self.reply(msg[1], 0, {"role": "aux", "node_id": name, "incarnation": aux.incarnations.get(name, 1)})
                continue
            if msg[0] == Op.BIND and name in aux.before_bind:
                self.reply(msg[1], int(Status.UNKNOWN_OP), f"unknown op {msg[0]}")
                continue
            if msg[0] == Op.BIND:
                bound = aux.clusters.setdefault(name, msg[2])
                self.reply(msg[1], *((0, bound) if bound == msg[2] else (int(Status.WRONG_CLUSTER), f"bound to {bound!r}")))
                continue
            if msg[0] == Op.EPOCH and name in aux.before_epoch:
                self.reply(msg[1], int(Status.UNKNOWN_OP), f"unknown op {msg[0]}")
                continue
            if msg[0] == Op.EPOCH:
                aux.epochs.setdefault(name, []).append(msg[2])
                floor = max(aux.floors.get(name, 0), msg[3] if len(msg) > 3 else 0)
                aux.floors[name] = floor
                self.reply(msg[1], 0, floor)
                continue
            self.received.append(msg)
            aux.requests.setdefault(name, []).append(msg)
            if aux.answer is not None:
                result = aux.answer(name, msg)
                if result.__class__ is Reply:
                    self.reply(msg[1], result.status, result.result)
                elif result is not None:
                    self.reply(msg[1], 0, result)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))


class SlowReaderTransport(FakeTransport):
    """A transport whose client does not read: past ``high`` bytes written it pauses the protocol's writing.

    ``drain()`` plays the client reading everything; ``get_write_buffer_size``
    is what was written since.
    """

    def __init__(self, high: int) -> None:
        super().__init__(peername=("10.0.0.1", 5000), half_close=True)
        self.high = high
        self.size = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.size += len(data)
        if self.size > self.high and not self.paused and self.protocol is not None:
            self.paused = True
            self.protocol.pause_writing()

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def get_write_buffer_size(self) -> int:
        return 0 if self.closed else self.size

    def abort(self) -> None:
        self.size = 0  # an aborted transport drops what it held
        super().abort()

    def drain(self) -> None:
        """The client read everything."""
        self.size = 0
        if self.paused and self.protocol is not None:
            self.paused = False
            self.protocol.resume_writing()
