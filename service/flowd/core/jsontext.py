"""Compact JSON text, fast: orjson where it can, the standard library where orjson refuses
(integers beyond 64 bits, non-string keys, lone surrogates), so what flowd accepts never
depends on which one wrote it. Encoding was 9 % of the daemon's CPU with the standard
library alone (bench/RESULTS.md)."""

from __future__ import annotations

import json

import orjson


def dumps(value: object) -> str:
    """``value`` as compact JSON text (no whitespace)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":"))
