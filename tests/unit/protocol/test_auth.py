"""The cluster secret's challenge and response: both sides prove it, it never crosses the wire."""

from __future__ import annotations

import pytest

from dcache.errors import AuthError
from dcache.protocol import Op, encode_request
from dcache.protocol.auth import NONCE_BYTES, client_proof, new_nonce, proofs_match, prove, server_proof

SECRET = b"a-cluster-secret-of-some-length"


def test_nonces_are_fresh() -> None:
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and all(len(n) == NONCE_BYTES for n in nonces)


def test_proofs_bind_the_secret_both_nonces_and_the_direction() -> None:
    a, b = new_nonce(), new_nonce()
    p = client_proof(SECRET, a, b)
    assert len(p) == 32
    assert p != client_proof(SECRET, b, a)  # nonces in order
    assert p != client_proof(SECRET + b"x", a, b)  # the secret
    assert p != client_proof(SECRET, a, new_nonce())  # a replay on another connection
    assert p != server_proof(SECRET, b, a)  # the server's answer cannot be reflected back
    assert proofs_match(p, client_proof(SECRET, a, b))
    assert not proofs_match(p, p[:-1] + bytes([p[-1] ^ 1]))
    assert not proofs_match(p, None) and not proofs_match(p, p.hex())


async def test_prove_sends_a_proof_not_the_secret_and_checks_the_answer() -> None:
    server_nonce = new_nonce()
    sent: list[bytes] = []

    async def honest(nonce: bytes, proof: bytes) -> object:
        sent.append(encode_request(Op.AUTH, 2, nonce, proof))
        assert proofs_match(client_proof(SECRET, server_nonce, nonce), proof)
        return server_proof(SECRET, nonce, server_nonce)

    await prove(honest, {"nonce": server_nonce}, SECRET, "peer")
    assert sent and SECRET not in sent[0]

    async def impostor(nonce: bytes, proof: bytes) -> object:
        return server_proof(b"another-secret-entirely-0000", nonce, server_nonce)

    with pytest.raises(AuthError, match="did not prove"):
        await prove(impostor, {"nonce": server_nonce}, SECRET, "peer")

    async def never(nonce: bytes, proof: bytes) -> object:
        raise AssertionError("no AUTH to a node without a nonce")

    with pytest.raises(AuthError, match="has no cluster secret"):
        await prove(never, {"role": "aux"}, SECRET, "peer")
