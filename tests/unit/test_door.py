"""core.door: what flowd refuses at the door, and how precisely it says so."""

from __future__ import annotations

import json

import pytest

from flowd.core import door, errors


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'\xef\xbb\xbf{"a": 1}', "starts with a UTF-8 byte order mark"),
        ('{"a": 1}'.encode("utf-16"), "starts with a UTF-16 byte order mark"),
        ('{"a": 1}'.encode("utf-32"), "starts with a UTF-32 byte order mark"),
        ('{"a": 1}'.encode("utf-16-le"), "looks like UTF-16-LE"),
        ('{"a": 1}'.encode("utf-16-be"), "looks like UTF-16-BE"),
        ('{"a": 1}'.encode("utf-32-le"), "looks like UTF-32-LE"),
        (b'{"a": "x\x00"}', "contains a NUL byte"),
        (b'{"a": "\xff"}', "invalid UTF-8 at byte 7"),
        (b'{"a": "\xed\xa0\x80"}', "invalid UTF-8 at byte 7"),  # a surrogate, CESU-style
        (b'{"a": "\xc0\x80"}', "invalid UTF-8 at byte 7"),  # an overlong NUL
    ],
)
def test_only_utf8_without_a_bom_is_read(data: bytes, reason: str) -> None:
    with pytest.raises(door.Unreadable) as info:
        door.read_json(data)
    assert info.value.reason == f"payload is not UTF-8 JSON: {reason}"


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (b'{"patch": {"k1": "a\\u0000b"}}', "patch.k1", "string contains NUL (\\u0000)"),
        (b'{"patch": {"a\\u0000b": 1}}', "patch.a\\u0000b", "key contains NUL (\\u0000)"),
        (b'{"p": ["x", "\\ud800"]}', "p.1", "string contains a lone surrogate (\\ud800)"),
        (b'{"p": {"\\udfff": 1}}', "p.\\udfff", "key contains a lone surrogate (\\udfff)"),
        (b'{"a": 1e400}', "a", "number beyond the range of a double (about ±1.8e308)"),
        (b'{"a": -1e400}', "a", "number beyond the range of a double (about ±1.8e308)"),
        (b'{"a": 1e309}', "a", "number beyond the range of a double (about ±1.8e308)"),
        (b'{"a": [1.8e308]}', "a.0", "number beyond the range of a double (about ±1.8e308)"),
        (
            b'{"a": 9223372036854775808}',
            "a",
            "integer beyond the signed 64-bit range (-9223372036854775808..9223372036854775807)",
        ),
        (b'{"a": -9223372036854775809}', "a", "integer beyond the signed 64-bit range"),
        (b'"\\u0000"', "_", "string contains NUL (\\u0000)"),
    ],
)
def test_values_postgres_cannot_hold_are_refused_by_path(
    data: bytes, path: str, message: str
) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        door.read_json(data)
    assert list(info.value.errors) == [path]
    assert info.value.errors[path].startswith(message)
    assert info.value.message.startswith(f"payload refused: {path}: ")
    # the refusal itself holds nothing it refuses: it can be stored and published
    assert not door.problems(json.loads(json.dumps(info.value.details())))


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 9223372036854775807, "b": -9223372036854775808, "c": 1.7976931348623157e308}',
        b'{"a": 1e-400, "b": "\\ud83d\\ude00 \\u0001 \\\\u0000", "c": [null, true, 0.5]}',
        b'{"\\u00e9": "\xc3\xa9"}',
    ],
)
def test_what_fits_passes(data: bytes) -> None:
    assert door.read_json(data) == json.loads(data)


def test_not_json_and_too_deep() -> None:
    with pytest.raises(door.NotJson, match="payload is not UTF-8 JSON: NaN is not JSON"):
        door.read_json(b'{"a": NaN}')
    with pytest.raises(door.NotJson, match="more than 4300 digits"):
        door.read_json(b"1" * 5000)
    with pytest.raises(door.Unreadable, match="deeper than 32"):
        door.read_json(b"[" * 33 + b"]" * 33)
    assert door.read_json(b"[" * 32 + b"]" * 32)


def test_many_problems_are_capped_and_keys_are_escaped_and_cut() -> None:
    found = door.problems({f"k{i}": "\x00" for i in range(50)})
    assert len(found) == door.MAX_PROBLEMS
    [(path, _)] = door.problems({"\x01" * 500 + "\x00": 1}).items()
    assert path.startswith("\\u0001\\u0001")
    assert path.endswith("…")
    assert len(path) < 700


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ok-1", None),
        ("é✓", None),
        ("a\x00b", "contains NUL (\\u0000)"),
        ("a\x01b", "contains a control character (\\u0001)"),
        ("a\tb", "contains a control character (\\u0009)"),
        ("a\x7f", "contains a control character (\\u007f)"),
        ("a\ud800", "contains a lone surrogate (\\ud800)"),
        ("a\ufffd", "contains \\ufffd (the mark of bytes that were not UTF-8)"),
        ("x" * 201, "is longer than 200 characters"),
    ],
)
def test_header_values(value: str, problem: str | None) -> None:
    assert door.text_problem(value, 200) == problem
