"""TLS (``dcache.tls``): settings, contexts, reloads, and a service's TLS listener over real loopback sockets.

Certificates are made at run time with the openssl CLI (``tests.tlscerts``).
The listener tests run on asyncio's loop and on uvloop (``conftest.py``):
the two hand the first bytes after a handshake over at different moments.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dcache import Client
from dcache.client import ClientConfig, open_connection
from dcache.config import AuxConfig, HttpConfig, NodeConfig, load_config
from dcache.errors import ConfigError, NoAvailableNodeError
from dcache.protocol import Op
from dcache.server import FrameProtocol, Service
from dcache.tls import MIN_TLS_VERSION, TlsContexts, check_tls_settings, client_context, fingerprint, peer_context, server_context
from tests.tlscerts import TlsCerts, make_certs

from .master.fakecluster import until


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    return make_certs(tmp_path_factory.mktemp("tls"))


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "daemon", "field"),
    [
        ({"cert": "c"}, True, "tls_key"),
        ({"key": "k"}, False, "tls_cert"),
        ({"cert": "c", "key": "k"}, True, "tls_ca"),
        ({"ca": "a"}, True, "tls_cert"),
        ({"cert": "c", "key": "k", "client_auth": True}, False, "tls_client_auth"),
        ({"ca": "a", "client_auth": True}, False, "tls_client_auth"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_field(kwargs: dict[str, Any], daemon: bool, field: str) -> None:
    args = {"cert": None, "key": None, "ca": None, "client_auth": False, **kwargs}
    with pytest.raises(ConfigError) as exc:
        check_tls_settings(args["cert"], args["key"], args["ca"], args["client_auth"], daemon=daemon)
    assert str(exc.value).startswith(f"{field}:")


def test_combinations_that_work() -> None:
    check_tls_settings(None, None, None, False, daemon=True)
    check_tls_settings("c", "k", "a", True, daemon=True)
    check_tls_settings("c", "k", None, False, daemon=False)  # the shim: HTTPS, plain to the masters
    check_tls_settings(None, None, "a", False, daemon=False)  # the shim: plain HTTP, TLS to the masters


def test_config_fields_come_from_flags_env_and_files(tmp_path: Path, certs: TlsCerts) -> None:
    env = {"DCACHE_TLS_CERT": certs.node.cert, "DCACHE_TLS_KEY": certs.node.key, "DCACHE_TLS_CA": certs.ca.cert}
    cfg = load_config(AuxConfig, "aux", {"tls_client_auth": True}, env=env)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_client_auth) == (certs.node.cert, certs.node.key, certs.ca.cert, True)
    toml = tmp_path / "c.toml"
    toml.write_text(f'[http]\ntls_ca = "{certs.ca.cert}"\ntls_handshake_timeout = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'tls_handshake_timeout'"):  # a daemon's setting, not the shim's
        load_config(HttpConfig, "http", config_file=str(toml))
    with pytest.raises(ConfigError, match="tls_handshake_timeout: must be positive"):
        NodeConfig(tls_handshake_timeout=0)
    with pytest.raises(ConfigError, match="tls_key: --tls-cert and --tls-key go together"):
        load_config(AuxConfig, "aux", env={"DCACHE_TLS_CERT": certs.node.cert, "DCACHE_TLS_CA": certs.ca.cert})


def test_files_that_cannot_be_used_are_one_line_config_errors(tmp_path: Path, certs: TlsCerts) -> None:
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        subprocess.run(
            ["openssl", "pkey", "-in", certs.node.key, "-aes256", "-passout", "pass:secret"], capture_output=True, check=True
        ).stdout
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": missing, "tls_key": certs.node.key, "tls_ca": certs.ca.cert}, f"tls_cert: cannot read {missing}"),
        ({"tls_cert": certs.node.cert, "tls_key": missing, "tls_ca": certs.ca.cert}, f"tls_key: cannot read {missing}"),
        ({"tls_cert": certs.node.cert, "tls_key": certs.node.key, "tls_ca": missing}, f"tls_ca: cannot read {missing}"),
        ({"tls_cert": certs.node.cert, "tls_key": certs.client.key, "tls_ca": certs.ca.cert}, "is not the key of the certificate"),
        ({"tls_cert": str(garbage), "tls_key": certs.node.key, "tls_ca": certs.ca.cert}, "must be a PEM certificate and its PEM key"),
        ({"tls_cert": certs.node.cert, "tls_key": certs.node.key, "tls_ca": str(garbage)}, "holds no PEM CA certificate"),
        ({"tls_cert": certs.node.cert, "tls_key": str(encrypted), "tls_ca": certs.ca.cert}, "is encrypted: give an unencrypted key"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError) as exc:
            NodeConfig(**settings).tls()
        assert message in str(exc.value) and "\n" not in str(exc.value), (settings, str(exc.value))


def test_contexts_are_tls_1_2_at_least_and_verify_as_documented(certs: TlsCerts) -> None:
    server = server_context(certs.node.cert, certs.node.key, certs.ca.cert, client_auth=True)
    peer = peer_context(certs.ca.cert, certs.node.cert, certs.node.key)
    client = client_context(ca=certs.ca.cert)
    for ctx in (server, peer, client):
        assert ctx.minimum_version == MIN_TLS_VERSION == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server_context(certs.node.cert, certs.node.key).verify_mode == ssl.CERT_NONE
    assert peer.verify_mode == ssl.CERT_REQUIRED and not peer.check_hostname  # links: the cluster CA, no host names
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname  # applications: chain and host name
    with pytest.raises(ConfigError, match="tls_cert: a client certificate needs both"):
        client_context(ca=certs.ca.cert, cert=certs.client.cert)
    assert NodeConfig().tls() is None and HttpConfig().tls() is None


def test_the_client_config_takes_only_a_client_side_context(certs: TlsCerts) -> None:
    ctx = client_context(ca=certs.ca.cert)
    assert ClientConfig("127.0.0.1:1", ssl=ctx).ssl is ctx
    with pytest.raises(ConfigError, match=r"ssl: must be an ssl\.SSLContext"):
        ClientConfig("127.0.0.1:1", ssl="ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="server-side context"):
        ClientConfig("127.0.0.1:1", ssl=server_context(certs.node.cert, certs.node.key))


def test_fingerprint_is_what_openssl_prints(certs: TlsCerts) -> None:
    der = ssl.PEM_cert_to_DER_cert(Path(certs.node.cert).read_text())
    out = subprocess.run(
        ["openssl", "x509", "-in", certs.node.cert, "-noout", "-fingerprint", "-sha256"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().split("=", 1)[1] == fingerprint(der)


# -- a service's TLS listener ---------------------------------------------------------


class Toy(Service):
    role = "toy"

    def __init__(self, settings: NodeConfig) -> None:
        super().__init__("toy-tls", settings)
        self.handlers[Op.PING] = lambda conn, rid, args: "PONG"
        self.handlers[Op.STATS] = lambda conn, rid, args: self.connection_stats()


def _settings(certs: TlsCerts, tmp: Path | None = None, **extra: Any) -> NodeConfig:
    cert, key = certs.node.cert, certs.node.key
    if tmp is not None:  # a copy the test may overwrite (reloads)
        cert, key = shutil.copy(cert, str(tmp / "live.pem")), shutil.copy(key, str(tmp / "live.key"))
    return NodeConfig(tls_cert=cert, tls_key=key, tls_ca=certs.ca.cert, **extra)


@pytest.fixture
async def toy(certs: TlsCerts) -> AsyncIterator[tuple[Toy, str]]:
    service = Toy(_settings(certs, tls_client_auth=True, tls_handshake_timeout=0.3, max_connections=4))
    server = await service.listen("127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield service, f"{host}:{port}"
    finally:
        await service.shutdown(1.0)


async def _peer_fingerprint(addr: str, ctx: ssl.SSLContext) -> str:
    host, port = addr.split(":")
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return fingerprint(der)
    finally:
        writer.close()


async def test_a_tls_client_is_served_and_its_first_bytes_reach_the_protocol(toy: tuple[Toy, str], certs: TlsCerts) -> None:
    service, addr = toy
    async with Client(addr, ssl=certs.client_context(), timeout=5) as c:
        assert await c.ping() >= 0  # HELLO rides right behind the handshake: the early bytes are handed over
        stats = await c.stats()
    assert stats["tls"] is True and stats["tls_handshakes"] >= 1 and stats["tls_handshakes_refused"] == 0
    assert service.tls_listener is not None and service.tls_listener.in_progress == 0
    conn = next(iter(service.state.connections), None)
    assert conn is None or isinstance(conn, FrameProtocol)


async def test_plaintext_and_strangers_are_refused_and_counted(toy: tuple[Toy, str], certs: TlsCerts) -> None:
    service, addr = toy
    host, port = addr.split(":")
    with pytest.raises((ConnectionError, OSError)):  # plaintext HELLO: the handshake fails, no dcache answer
        await open_connection(host, int(port), connect_timeout=2)
    stranger = client_context(ca=certs.ca.cert, cert=certs.wrong.cert, key=certs.wrong.key)
    no_cert = client_context(ca=certs.ca.cert)
    for ctx in (stranger, no_cert):
        async with Client(addr, ssl=ctx, timeout=2, connect_timeout=2, retries=0) as c:
            with pytest.raises((NoAvailableNodeError, ConnectionError, OSError)):
                await c.ping()
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that trusts another CA refuses the node
        await open_connection(host, int(port), connect_timeout=2, ssl=client_context(ca=certs.wrong_ca.cert))
    listener = service.tls_listener
    assert listener is not None
    # Refused by the node: plaintext, a stranger's certificate, no certificate; the client that
    # refused the node closed without a word: dropped, on the node's side.
    await until(lambda: listener.failures["refused"] == 3 and listener.failures["dropped"] == 1, what="every refusal counted")
    async with Client(addr, ssl=certs.client_context(), timeout=5) as c:  # and the node goes on serving
        assert await c.ping() >= 0
    assert service.rejected_connections == 0


async def test_silent_handshakes_time_out_and_count_against_max_connections(toy: tuple[Toy, str], certs: TlsCerts) -> None:
    service, addr = toy
    listener = service.tls_listener
    assert listener is not None
    host, port = addr.split(":")
    silent = [socket.create_connection((host, int(port))) for _ in range(4)]  # max_connections: 4
    try:
        await until(lambda: listener.in_progress == 4, what="four handshakes in progress")
        extra = socket.create_connection((host, int(port)))
        extra.settimeout(5)
        assert await asyncio.to_thread(extra.recv, 1) == b""  # refused: the slots are taken by handshakes
        extra.close()
        assert service.rejected_connections == 1
        await until(lambda: listener.failures["timeout"] == 4, timeout=5, what="the silent handshakes cut at the timeout")
        assert listener.in_progress == 0
    finally:
        for s in silent:
            s.close()
    async with Client(addr, ssl=certs.client_context(), timeout=5) as c:
        assert await c.ping() >= 0


async def test_reload_serves_the_new_certificate_and_a_bad_one_changes_nothing(tmp_path: Path, certs: TlsCerts) -> None:
    settings = _settings(certs, tmp_path)
    service = Toy(settings)
    server = await service.listen("127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    addr = f"{host}:{port}"
    tls = service.tls
    assert isinstance(tls, TlsContexts)
    probe = client_context(ca=certs.ca.cert)
    old = fingerprint(ssl.PEM_cert_to_DER_cert(Path(certs.node.cert).read_text()))
    try:
        async with Client(addr, ssl=certs.client_context(), timeout=5, max_connections=1) as c:
            assert await c.ping() >= 0
            assert await _peer_fingerprint(addr, probe) == old
            renewed = certs.ca.issue("renewed")
            assert settings.tls_cert and settings.tls_key
            shutil.copy(renewed.cert, settings.tls_cert)
            shutil.copy(renewed.key, settings.tls_key)
            assert tls.reload() is True and tls.reloads == 1
            new = fingerprint(ssl.PEM_cert_to_DER_cert(Path(renewed.cert).read_text()))
            assert await _peer_fingerprint(addr, probe) == new
            assert await c.ping() >= 0  # the connection opened before the reload goes on
            Path(settings.tls_key).write_text("garbage\n")
            assert tls.reload() is False and tls.reload_failures == 1
            assert await _peer_fingerprint(addr, probe) == new  # the live context kept the good pair
            assert await c.ping() >= 0
    finally:
        await service.shutdown(1.0)


async def test_shutdown_closes_tls_connections_and_cancels_handshakes(certs: TlsCerts) -> None:
    service = Toy(_settings(certs, tls_client_auth=True))
    server = await service.listen("127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    listener = service.tls_listener
    assert listener is not None
    silent = socket.create_connection((host, port))
    conn = await open_connection(host, port, ssl=certs.client_context(), connect_timeout=5)
    try:
        assert await conn.call(Op.PING) == "PONG"
        await until(lambda: listener.in_progress == 1, what="the silent handshake in progress")
        await service.shutdown(1.0)
        assert listener.in_progress == 0 and not service.state.tasks
        await until(lambda: conn.is_closing, what="the client's connection closed by the node")
        silent.settimeout(5)
        try:
            assert await asyncio.to_thread(silent.recv, 1) == b""
        except ConnectionResetError:
            pass
    finally:
        conn.close()
        silent.close()
