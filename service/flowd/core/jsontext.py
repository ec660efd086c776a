"""Compact JSON text, fast: orjson where it can, the standard library where orjson refuses
(integers beyond 64 bits, non-string keys, lone surrogates), so what flowd accepts never
depends on which one wrote it. Encoding was 9 % of the daemon's CPU with the standard
library alone (bench/RESULTS.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

# 19 digits in a row may be an integer beyond 64 bits, which orjson reads as a float.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def dumps(value: object) -> str:
    """``value`` as compact JSON text (no whitespace)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"))


def size(value: object) -> int:
    """The bytes of ``dumps(value)`` in UTF-8, without making the text."""
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return len(json.dumps(value, separators=(",", ":")).encode())


#: What ``loads_fast`` returns for data it leaves to the standard library.
UNREAD: Final = object()


def loads_fast(data: bytes) -> Any:
    """The value of JSON ``data`` if orjson reads it exactly as the standard library does,
    else ``UNREAD``. A value read here came from UTF-8 without a byte order mark, holds no
    lone surrogate, no non-finite number and no integer of 19 digits or more."""
    if _LONG_NUMBER.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return UNREAD


def loads(data: bytes, *, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """The value of JSON ``data``, exactly as ``json.loads(data, parse_constant=...)`` reads
    it (same values, same errors): orjson reads what it reads the same way; everything else
    (errors, NaN and Infinity, lone surrogates, a BOM, UTF-16, long integers) goes to the
    standard library."""
    value = loads_fast(data)
    return json.loads(data, parse_constant=parse_constant) if value is UNREAD else value
