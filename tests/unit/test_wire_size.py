"""The size NATS counts for a message, and dead letters cut to fit it."""

from __future__ import annotations

from nats.aio.client import Client

from flowd.bus.nats import fitted, wire_size
from flowd.bus.subjects import DLQ_TRUNCATED


def _hpub_header_block(headers: dict[str, str]) -> bytes:
    """The header block nats-py writes (Client._send_publish), built here independently."""
    out = b"NATS/1.0\r\n"
    for k, v in headers.items():
        out += k.strip().encode() + b": " + v.strip().replace("\r", " ").replace("\n", " ").encode()
        out += b"\r\n"
    return out + b"\r\n"


def test_wire_size_counts_the_header_block_as_nats_py_writes_it() -> None:
    headers = {"Nats-Msg-Id": "dlq-1", "Flowd-Dlq-Reason": " two\nlines é ", "X": ""}
    assert wire_size(headers, 10) == len(_hpub_header_block(headers)) + 10
    assert wire_size(None, 10) == 10
    assert wire_size({}, 10) == 10
    assert Client  # the writer these numbers follow


def test_a_letter_that_fits_is_left_alone() -> None:
    data, headers = fitted(b"abc", {"A": "b"}, 1000)
    assert (data, headers) == (b"abc", {"A": "b"})


def test_a_letter_too_big_is_cut_to_exactly_fit_and_says_its_size() -> None:
    body = b"y" * 5000
    limit = 1024
    data, headers = fitted(body, {"Nats-Msg-Id": "dlq-x", "Flowd-Dlq-Reason": "r" * 300}, limit)
    assert headers[DLQ_TRUNCATED] == "5000"
    assert wire_size(headers, len(data)) == limit
    assert body.startswith(data)


def test_headers_alone_over_the_limit_leave_an_empty_body() -> None:
    data, headers = fitted(b"z" * 10, {"Flowd-Dlq-Reason": "r" * 100}, 50)
    assert data == b""
    assert headers[DLQ_TRUNCATED] == "10"
