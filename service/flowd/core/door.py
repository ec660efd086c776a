"""What flowd refuses at the door: input PostgreSQL or NATS cannot hold, or that would change
meaning on the way in. One check, pure, used for every JSON body flowd accepts (commands,
observations, ``P.api.*`` requests, wake messages) and for the header values it keeps.

- **Encoding** (``utf8_text``): a body must be UTF-8 without a byte order mark. UTF-16 and
  UTF-32 (with or without a BOM), a UTF-8 BOM, a NUL byte and invalid UTF-8 are ``Unreadable``.
- **Syntax and depth** (``read_json``): not JSON (also ``NaN``, ``Infinity``), or nested
  deeper than ``MAX_DEPTH``: ``Unreadable`` (``NotJson`` for the former).
- **Values** (``problems``): in any string or object key, NUL (``\\u0000``: PostgreSQL text
  and jsonb cannot hold it) and lone surrogates (``\\ud800`` unpaired: no UTF-8 for it); numbers
  whose magnitude is beyond a double (``1e400`` would become infinity, stored as null);
  integers outside the signed 64-bit range. These are ``errors.InvalidInput`` with
  ``errors`` mapping each JSON path (``patch.k1``, ``of.0.at``) to what is wrong.
- **Header values** (``text_problem``): NUL, other control characters, lone surrogates, the
  replacement character (the bytes were not UTF-8), and a length limit.

Paths and messages never repeat a refused character: they name it escaped (``\\u0000``), so
a rejection can itself be stored and published.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

from flowd.core import errors, jsontext

MAX_DEPTH: Final = 32
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**63 - 1
#: At most this many problems are reported for one body.
MAX_PROBLEMS: Final = 10

_BAD_IN_VALUE = re.compile("[\x00\ud800-\udfff]")
_BAD_IN_HEADER = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffd]")
_ESCAPE = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffd\\\\]")
_BOMS: Final = (
    (b"\xff\xfe\x00\x00", "starts with a UTF-32 byte order mark"),
    (b"\x00\x00\xfe\xff", "starts with a UTF-32 byte order mark"),
    (b"\xef\xbb\xbf", "starts with a UTF-8 byte order mark"),
    (b"\xff\xfe", "starts with a UTF-16 byte order mark"),
    (b"\xfe\xff", "starts with a UTF-16 byte order mark"),
)


class Unreadable(Exception):
    """A body that cannot be read as UTF-8 JSON at all; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotJson(Unreadable):
    """UTF-8 text, but not JSON."""


def escaped(text: str, limit: int = 100) -> str:
    """``text`` with control characters, lone surrogates, U+FFFD and backslashes escaped
    (``\\u0000``), cut to ``limit`` characters: safe to store, publish and log."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return _ESCAPE.sub(lambda m: f"\\u{ord(m[0]):04x}" if m[0] != "\\" else "\\\\", cut)


def utf8_text(data: bytes) -> str:
    """``data`` as UTF-8 text, or Unreadable naming the encoding it looks like."""
    for bom, reason in _BOMS:
        if data.startswith(bom):
            raise Unreadable(f"payload is not UTF-8 JSON: {reason}")
    if b"\x00" in data:  # never in UTF-8 JSON: UTF-16 or UTF-32 without a BOM, or binary
        encoding = json.detect_encoding(data)
        what = f"looks like {encoding.upper()}" if encoding != "utf-8" else "contains a NUL byte"
        raise Unreadable(f"payload is not UTF-8 JSON: {what}")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise Unreadable(f"payload is not UTF-8 JSON: invalid UTF-8 at byte {exc.start}") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def read_json(data: bytes) -> object:
    """The JSON value of ``data``: Unreadable (NotJson for a syntax error) when it cannot be
    read, ``errors.InvalidInput`` when it holds what flowd refuses (``problems``)."""
    value = jsontext.loads_fast(data)
    if value is jsontext.UNREAD:
        utf8_text(data)  # before the standard library, which reads a BOM, UTF-16 and UTF-32
        try:
            value = json.loads(data, parse_constant=_no_constant)
        except RecursionError:
            raise Unreadable(f"JSON nested deeper than {MAX_DEPTH} levels") from None
        except ValueError as exc:
            message = str(exc)
            if "integer string conversion" in message:
                message = "a number has more than 4300 digits"
            raise NotJson(f"payload is not UTF-8 JSON: {message[:200]}") from None
    elif b"\\u0000" not in data:
        # orjson read it: UTF-8, no lone surrogate, finite numbers, integers within 64 bits;
        # a NUL can only come from a \\u0000 escape. Only the depth is left to check.
        _check_depth(value)
        return value
    found = problems(value)
    if found:
        raise refusal(found)
    return value


def _check_depth(value: object) -> None:
    stack: list[tuple[dict[object, object] | list[object], int]] = (
        [(value, 1)] if isinstance(value, dict | list) else []
    )
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Unreadable(f"JSON nested deeper than {MAX_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def refusal(found: dict[str, str], what: str = "payload") -> errors.InvalidInput:
    """``problems`` as the InvalidInput that refuses them."""
    listed = "; ".join(f"{path}: {message}" for path, message in found.items())
    return errors.InvalidInput(f"{what} refused: {listed}", found)


def problems(value: object, path: str = "") -> dict[str, str]:
    """JSON path -> what is wrong there, for every value flowd refuses inside ``value`` (at
    most MAX_PROBLEMS). Unreadable if it is nested deeper than MAX_DEPTH."""
    found: dict[str, str] = {}
    if not isinstance(value, dict | list):
        _scalar(value, path or "_", found)
        return found
    stack: list[tuple[dict[object, object] | list[object], int, str]] = [(value, 1, path)]
    while stack:
        item, depth, at = stack.pop()
        if depth > MAX_DEPTH:
            raise Unreadable(f"JSON nested deeper than {MAX_DEPTH} levels")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if len(found) >= MAX_PROBLEMS:
                return found
            if isinstance(key, str) and _BAD_IN_VALUE.search(key):
                found[_join(at, key)] = f"key {_char_problem(key)}"
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, _join(at, key)))
            elif child is not None and not isinstance(child, bool):
                _scalar(child, _join(at, key), found)
    return found


def _join(at: str, key: object) -> str:
    name = escaped(key) if isinstance(key, str) else str(key)
    return f"{at}.{name}" if at else name


def _scalar(value: object, at: str, found: dict[str, str]) -> None:
    if isinstance(value, str):
        if _BAD_IN_VALUE.search(value):
            found[at] = f"string {_char_problem(value)}"
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            found[at] = f"integer beyond the signed 64-bit range ({INT_MIN}..{INT_MAX})"
    elif isinstance(value, float) and not math.isfinite(value):
        found[at] = "number beyond the range of a double (about ±1.8e308)"


def _char_problem(text: str, pattern: re.Pattern[str] = _BAD_IN_VALUE) -> str:
    match = pattern.search(text)
    assert match is not None
    char = match[0]
    code = f"\\u{ord(char):04x}"
    if char == "\x00":
        return f"contains NUL ({code})"
    if "\ud800" <= char <= "\udfff":
        return f"contains a lone surrogate ({code})"
    if char == "\ufffd":
        return f"contains {code} (the mark of bytes that were not UTF-8)"
    return f"contains a control character ({code})"


def text_problem(text: str, max_length: int | None = None) -> str | None:
    """What makes ``text`` (a header value or subject token flowd keeps: a command id, a
    correlation id, a flow id token) unusable, or None: NUL, control characters, lone
    surrogates, the replacement character, more than ``max_length`` characters."""
    if _BAD_IN_HEADER.search(text):
        return _char_problem(text, _BAD_IN_HEADER)
    if max_length is not None and len(text) > max_length:
        return f"is longer than {max_length} characters"
    return None


def value_problem(text: str) -> str | None:
    """What makes a string value unstorable (NUL, a lone surrogate), or None."""
    return f"string {_char_problem(text)}" if _BAD_IN_VALUE.search(text) else None
