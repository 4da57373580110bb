"""Codecs: a client codec paired with a server codec in memory; argument checks."""

from __future__ import annotations

import pytest

from dcache.errors import BadArgumentsError, KeyTooLargeError, RemoteProtocolError, ValueTooLargeError
from dcache.protocol import ClientCodec, Limits, Op, Request, Response, ServerCodec, check_key, check_value


def test_client_server_pair_in_memory():
    client, server = ClientCodec(), ServerCodec()
    wire = b"".join(client.send(Request(Op.GET, i, (b"k%d" % i,))) for i in range(1, 6))
    reqs = server.receive(wire)
    assert [r.request_id for r in reqs] == [1, 2, 3, 4, 5]
    assert reqs[0] == Request(Op.GET, 1, (b"k1",))
    back = b"".join(server.send(Response(r.request_id, 0, r.args[0])) for r in reversed(reqs))
    resps = client.receive(back)
    assert [r.request_id for r in resps] == [5, 4, 3, 2, 1]
    assert all(r.ok for r in resps)
    assert resps[-1].result == b"k1"


def test_server_codec_rejects_non_requests():
    server = ServerCodec()
    with pytest.raises(RemoteProtocolError):
        server.receive(b"\x00\x00\x00\x02\x91\x01")  # [1]: no request id


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(max_frame_bytes=100, max_key_bytes=50, max_value_bytes=50)
    with pytest.raises(ValueError):
        Limits(max_key_bytes=0)


def test_check_key():
    limits = Limits(max_frame_bytes=10_000, max_key_bytes=4, max_value_bytes=100)
    assert check_key(b"abcd", limits) == b"abcd"
    assert check_key("ab", limits) == b"ab"
    with pytest.raises(KeyTooLargeError):
        check_key(b"abcde", limits)
    with pytest.raises(KeyTooLargeError):
        check_key("ééé", limits)  # 6 bytes in UTF-8
    with pytest.raises(BadArgumentsError):
        check_key(5, limits)
    with pytest.raises(BadArgumentsError):
        check_key(b"", limits)


def test_check_value():
    limits = Limits(max_frame_bytes=10_000, max_key_bytes=4, max_value_bytes=3)
    assert check_value(b"", limits) == b""
    assert check_value("é", limits) == "é".encode()
    with pytest.raises(ValueTooLargeError):
        check_value(b"abcd", limits)
    with pytest.raises(BadArgumentsError):
        check_value(None, limits)
