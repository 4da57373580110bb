"""The shim's HTTP layer: the fast paths of the hot path answer what the general code would (some on an in-memory transport)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dcache.http._wire import HttpProtocol, HttpServer, Request, Response
from dcache.http.app import HttpError, _json_object, _posted, _split_target


def _general_split(target: bytes) -> tuple[str, str]:
    """What ``_split_target`` answered before its fast path: httptools' URL parser on every target."""
    url = httptools.parse_url(target)
    raw = url.path or b"/"
    text = (unquote_to_bytes(raw) if b"%" in raw else raw).decode()
    return text, "" if url.query is None else url.query.decode("latin-1")


def _accepted(target: bytes) -> bool:
    """Whether llhttp takes ``target`` in a request line (only those reach ``_split_target``)."""

    class Sink:
        url = b""
        done = False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    try:
        httptools.HttpRequestParser(sink).feed_data(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    except httptools.HttpParserError:
        return False
    return sink.done and sink.url == target


_URL_BYTES = st.sampled_from([b"/", b"a", b"k", b"?", b"#", b"%", b"%41", b"%ff", b"%e2%82%ac", b"\xe2\x82\xac", b"\xff", b"=", b"&", b";"])


@given(st.lists(_URL_BYTES | st.binary(max_size=3), max_size=12))
@example([b"/data/k1"])
@example([b"/data/k?x=1"])
@example([b"/data/\xe2\x82\xac#frag"])
@example([b"/data/\xff"])
@example([b"//x/y"])
def test_split_target_answers_what_the_url_parser_would(parts: list[bytes]) -> None:
    target = b"/" + b"".join(parts)
    if not _accepted(target):
        return
    try:
        expected: tuple[str, str] | int = _general_split(target)
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        expected = 400
    try:
        got: tuple[str, str] | int = _split_target(target)
    except HttpError as exc:
        got = exc.status
    assert got == expected


class _App:
    """Answers every request with 200 ``ok`` at once."""

    max_body = 1024

    def dispatch(self, request: Request) -> Response:
        return Response(200, b"ok\n")

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.mark.parametrize(
    ("request_bytes", "connection"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"close"),
        (b"GET / HTTP/1.0\r\n\r\n", b"close"),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"keep-alive"),
        (b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n", b"keep-alive"),
        (b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n", b"keep-alive"),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", None),
    ],
)
async def test_connection_header_of_the_answer(request_bytes: bytes, connection: bytes | None) -> None:
    proto = HttpProtocol(HttpServer(_App()))
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(request_bytes)
    head, _, body = transport.out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"ok\n"
    assert b"Content-Length: 3" in lines and b"Content-Type: application/json; charset=utf-8" in lines
    assert [line.split(b": ", 1)[1] for line in lines if line.lower().startswith(b"connection:")] == (
        [] if connection is None else [connection]
    )
    assert transport.closed == (connection == b"close")
    await asyncio.sleep(0)


def _general_json_object(body: bytes) -> tuple[int, str] | dict[str, Any]:
    """What ``_json_object`` answered before its fast path: ``json.loads`` on every body."""
    if not body.strip():
        return 400, "the request body must be a JSON object"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return 400, f"the request body is not valid JSON: {exc}"
    if not isinstance(doc, dict):
        return 400, f"the request body must be a JSON object, not {type(doc).__name__}"
    return doc


_JSON_BYTES = st.sampled_from([b"{", b"}", b'"', b"key", b":", b",", b" ", b"\x00", b"\xff", b"\xe2\x82\xac", b"\\ud800", b"1", b"[]"])


@given(st.lists(_JSON_BYTES | st.binary(max_size=3), max_size=12), st.sampled_from([b"", b"{", b"{\x00", b" {"]))
@example([b'"key": "k", "value": "v"}'], b"{")
@example([b"\x00\x00\x00"], b"{")
@example([b"\x00"], b"{")
@example([b'"a": 1}  \r\n'], b"{")  # one value, then whitespace: the scanner's end is not the text's
@example([b'"a": 1} x'], b"{")  # extra data
@example([b'"a": 1}}'], b"{")
@example([b'"a": ', b"[" * 5000], b"{")  # too deep: RecursionError from the scanner and from decode
def test_json_object_answers_what_json_loads_would(parts: list[bytes], prefix: bytes) -> None:
    body = prefix + b"".join(parts)
    try:
        got: tuple[int, str] | dict[str, Any] = _json_object(body)
    except HttpError as exc:
        got = exc.status, exc.message
    assert got == _general_json_object(body)


_ASCII_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=20)


@given(
    st.one_of(
        st.tuples(st.text(max_size=20), st.text(max_size=20), st.booleans(), st.booleans()).map(
            lambda t: json.dumps({"key": t[0], "value": t[1]}, ensure_ascii=t[2], separators=(",", ":") if t[3] else None).encode()
        ),
        st.tuples(_ASCII_TEXT, _ASCII_TEXT).map(lambda t: b'{"key":"%s","value":"%s"}' % (t[0].encode(), t[1].encode())),
    )
)
@example(b'{"key":"k1","value":"plain ~!#$%&()*+,-./:;<=>?@[]^_`{|}"}')
@example(b'{"key":"del\x7f","value":"v"}')
@example(b'{"key":"k","value":"\\u0041"}')
@example('{"key":"k","value":"\u00e9"}'.encode())
@example(b' {"key":"k","value":"v"}')
def test_posted_answer_is_the_bytes_json_dumps_gives(body: bytes) -> None:
    """POST /data's answer skips escaping for plain ASCII bodies: the bytes must be json.dumps's, whatever the body."""
    try:
        doc = _json_object(body)
        key, value = doc["key"], doc["value"]
        key_bytes, value_bytes = key.encode(), value.encode()
    except (HttpError, KeyError, UnicodeEncodeError):  # refused before the answer is built
        return
    assert _posted(body, key, value, key_bytes, value_bytes).body == json.dumps({"key": key, "value": value}).encode() + b"\n"
