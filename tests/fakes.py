"""Test doubles shared by unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dcache.peer import PeerConnection
from dcache.protocol import FrameDecoder, Op, encode_response


class FakeTransport:
    """Enough of an ``asyncio.Transport`` for the protocols: collects what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeAux:
    """An aux node on the other end of a master's fake connections: answers HELLO, records the rest.

    ``connect`` is a ``dcache.master.links.ConnectionFactory``: pass it to
    ``MasterNode(config, connect=...)``. Every request other than HELLO is
    kept in ``requests[node_id]`` and left unanswered unless ``answer`` says
    otherwise (a callable ``(node_id, msg) -> result or None``).
    """

    def __init__(self, answer: Callable[[str, list[Any]], Any] | None = None) -> None:
        self.requests: dict[str, list[list[Any]]] = {}
        self.transports: dict[str, list[FakeTransport]] = {}
        self.answer = answer

    async def connect(self, host: str, port: int, name: str, on_answers: Callable[[], None] | None) -> PeerConnection:
        proto = PeerConnection(f"aux node {name}", on_answers)
        transport = _AnsweringTransport(self, name, proto)
        self.transports.setdefault(name, []).append(transport)
        proto.connection_made(transport)  # type: ignore[arg-type]
        return proto


class _AnsweringTransport(FakeTransport):
    def __init__(self, aux: FakeAux, name: str, proto: PeerConnection) -> None:
        super().__init__()
        self._aux = aux
        self._name = name
        self._proto = proto
        self._decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        super().write(data)
        for msg in self._decoder.feed(bytes(data)):
            if msg[0] == Op.HELLO:
                reply = encode_response(msg[1], 0, {"role": "aux", "node_id": self._name, "incarnation": 1})
                asyncio.get_running_loop().call_soon(self._proto.data_received, reply)
                continue
            self._aux.requests.setdefault(self._name, []).append(msg)
            if self._aux.answer is not None:
                result = self._aux.answer(self._name, msg)
                if result is not None:
                    asyncio.get_running_loop().call_soon(self._proto.data_received, encode_response(msg[1], 0, result))

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))
