"""jsontext.dumps: compact JSON whichever encoder wrote it; what orjson refuses still works."""

from __future__ import annotations

import json

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
