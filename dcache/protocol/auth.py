"""Proving the cluster secret without sending it: HMAC challenge and response (sans-IO).

A connection's HELLO answer carries a fresh random ``nonce`` from the
server when the node has a cluster secret. The peer answers with AUTH
``[client_nonce, proof]``, where ``proof = client_proof(secret,
server_nonce, client_nonce)``; the server checks it in constant time and
answers ``server_proof(secret, client_nonce, server_nonce)``, which the peer
checks in turn: each side proves it knows the secret, over nonces the other
chose, so a recorded exchange is worth nothing on another connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable

from ..errors import AuthError

__all__ = ["NONCE_BYTES", "new_nonce", "client_proof", "server_proof", "proofs_match", "prove"]

#: Bytes of each side's nonce.
NONCE_BYTES = 16
_CLIENT = b"dcache-cluster-v1 client "
_SERVER = b"dcache-cluster-v1 server "


def new_nonce() -> bytes:
    """A fresh random nonce."""
    return os.urandom(NONCE_BYTES)


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a peer sends to prove the secret: HMAC-SHA256 over the server's nonce, then its own."""
    return hmac.new(secret, _CLIENT + server_nonce + client_nonce, hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the server answers to prove it too: HMAC-SHA256 over the peer's nonce, then its own."""
    return hmac.new(secret, _SERVER + client_nonce + server_nonce, hashlib.sha256).digest()


def proofs_match(expected: bytes, got: object) -> bool:
    """Constant-time comparison of a proof with the expected one."""
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)


async def prove(send_auth: Callable[[bytes, bytes], Awaitable[object]], hello: dict[str, object], secret: bytes, name: str) -> None:
    """The peer's side of AUTH on a connection whose HELLO answered ``hello``.

    ``send_auth(client_nonce, proof)`` sends AUTH and returns its answer.

    Raises:
        AuthError: ``name`` has no cluster secret (no nonce in ``hello``), or
            its answer does not prove the same secret.
        ServerError: what AUTH raised (``AuthError`` for a wrong secret).
    """
    server_nonce = hello.get("nonce")
    if not isinstance(server_nonce, bytes):
        raise AuthError(f"{name} has no cluster secret, so it cannot prove it (start it with --cluster-secret-file)")
    mine = new_nonce()
    answer = await send_auth(mine, client_proof(secret, server_nonce, mine))
    if not proofs_match(server_proof(secret, mine, server_nonce), answer):
        raise AuthError(f"{name} did not prove the cluster secret")
