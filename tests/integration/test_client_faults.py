"""The Python client against real dcache processes that stop, die or are misused, as its users meet them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from dcache import Client
from tests.harness import DaemonProcess, start_aux
from tests.tlscerts import TlsCerts, make_certs

pytestmark = pytest.mark.slow

#: Bound on anything that must not hang (every case below finishes far sooner when right).
HANG_S = 10.0
#: A value the kernel's socket buffers cannot absorb when the server stops reading.
LARGE = b"x" * (8 * 1024 * 1024)


@pytest.fixture
def aux() -> Iterator[DaemonProcess]:
    node = start_aux()
    try:
        yield node
    finally:
        node.signal(signal.SIGCONT)
        node.kill()


async def test_close_does_not_wait_for_a_server_that_stopped_reading(aux: DaemonProcess) -> None:
    c = Client(aux.addr, timeout=0.5, connect_timeout=0.5)
    try:
        assert await c.set("k", b"v")
        aux.signal(signal.SIGSTOP)
        with pytest.raises(TimeoutError):
            await c.set("big", LARGE)  # most of it stays in the client's write buffer
    finally:
        await asyncio.wait_for(c.close(), HANG_S)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("value", [b"v", LARGE], ids=["small", "large"])
async def test_close_over_tls_waits_for_a_stopped_server_no_longer_than_a_connect(certs: TlsCerts, value: bytes) -> None:
    node = DaemonProcess("aux", ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *certs.daemon_args()]).start()
    try:
        c = Client(node.addr, timeout=0.5, connect_timeout=0.5, ssl=certs.client_context())
        try:
            assert await c.set("k", b"v")
            node.signal(signal.SIGSTOP)
            with pytest.raises(TimeoutError):
                await c.set("k", value)
        finally:
            # The TLS goodbye waited 30 s (the loop's default) for a server that never answers it.
            await asyncio.wait_for(c.close(), HANG_S)
    finally:
        node.signal(signal.SIGCONT)
        node.kill()
