"""jsontext: compact JSON whichever encoder wrote it, and the standard library's reading of
JSON whichever decoder read it; what orjson refuses or reads differently still works."""

from __future__ import annotations

import json
import re

import pytest

from flowd.core import jsontext


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [True, None, 1.5], "c": {"d": "é ✓"}},
        {"big": 2**70},  # beyond 64 bits: orjson refuses, the standard library does not
        {1: "non-string key"},  # orjson refuses; json writes "1"
        [],
        "x",
    ],
)
def test_dumps_is_compact_json_of_the_value(value: object) -> None:
    text = jsontext.dumps(value)
    assert json.loads(text) == json.loads(json.dumps(value))
    assert ", " not in text
    assert ": " not in text


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1, "b": [true, null, 1.5], "c": {"d": "\xc3\xa9"}}',
        b"123456789012345678901234567890",  # orjson reads it as a float
        b"-9223372036854775809",  # below int64
        b"1e400",  # orjson refuses infinity
        b'"\\ud800"',  # a lone surrogate: orjson refuses
        b"\xef\xbb\xbf{}",  # a BOM
        '{"utf": 16}'.encode("utf-16"),
        b'{"a": 1, "a": 2}',
        b" [] ",
    ],
)
def test_loads_reads_what_the_standard_library_reads(data: bytes) -> None:
    got = jsontext.loads(data)
    assert got == json.loads(data)
    assert type(got) is type(json.loads(data))


@pytest.mark.parametrize("data", [b"NaN", b"[Infinity]", b"{}x", b"{", b"\xff"])
def test_loads_fails_where_the_standard_library_fails(data: bytes) -> None:
    try:
        json.loads(data, parse_constant=_no_constant)
    except ValueError as exc:
        theirs = str(exc)
    with pytest.raises(ValueError, match=f"^{re.escape(theirs)}$"):
        jsontext.loads(data, parse_constant=_no_constant)


def test_size_is_the_utf8_length_of_dumps() -> None:
    for value in ({"a": "é" * 3}, {"big": 2**70}, {"s": "\ud800"}, [1, "x"], {}):
        assert jsontext.size(value) == len(jsontext.dumps(value).encode(errors="surrogatepass"))
