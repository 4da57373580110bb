"""A blocking raw-socket peer for protocol-level tests (no dcache client involved)."""

from __future__ import annotations

import socket
import time
from typing import Any

from dcache.protocol import FrameDecoder, encode_request


class RawConn:
    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.inbox: list[Any] = []
        self.timeout = timeout

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, rid: int, *args: Any) -> None:
        self.sock.sendall(encode_request(op, rid, *args))

    def recv(self) -> Any:
        """The next decoded frame; raises EOFError if the server closed first."""
        deadline = time.monotonic() + self.timeout
        while not self.inbox:
            if time.monotonic() > deadline:
                raise TimeoutError("no frame from server")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    def call(self, op: int, rid: int, *args: Any) -> Any:
        self.send(op, rid, *args)
        return self.recv()

    def closed_by_server(self) -> bool:
        """True once the server has closed (reads EOF within the timeout)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
            if not data:
                return True
            self.inbox.extend(self.decoder.feed(data))
        return False

    def close(self) -> None:
        self.sock.close()
