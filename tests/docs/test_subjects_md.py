"""subjects.md, bus/subjects.py, bus/codec.py and the error tree say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowd.bus import codec
from flowd.bus import subjects as names
from flowd.config import ENV
from flowd.core import errors

DOC = (Path(__file__).resolve().parents[2] / "subjects.md").read_text()


def _row(subject: str) -> str:
    """The row of the Commands table for ``subject``."""
    table = DOC[DOC.index("## Commands") : DOC.index("### Step observations")]
    rows = [line for line in table.splitlines() if line.startswith(f"| `{subject}`")]
    assert len(rows) == 1, f"subjects.md has no single Commands row for {subject}"
    return rows[0]


@pytest.mark.parametrize("verb", names.VERBS)
def test_every_verb_and_its_fields_are_documented(verb: str) -> None:
    row = _row(f"P.cmd.<id>.{verb}")
    for field in codec.BODIES[verb].model_fields:
        if field != "expected_revision":  # documented once for all verbs
            assert f"`{field}`" in row, (verb, field)


def test_create_and_observation_fields_are_documented() -> None:
    row = _row("P.cmd.<id>.create`, `P.cmd.create")
    for field in codec.CreateCommand.model_fields:
        assert f"`{field}`" in row, field
    obs = DOC[DOC.index("### Step observations") :]
    for field in codec.ObserveCommand.model_fields:
        assert f"`{field}`" in obs, field


def test_every_header_is_documented() -> None:
    headers = [v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)]
    assert headers
    for header in headers:
        assert f"`{header}`" in DOC, header


def _codes(cls: type[errors.FlowError]) -> set[str]:
    found = {cls.code}
    for sub in cls.__subclasses__():
        found |= _codes(sub)
    return found


def test_every_error_code_is_documented() -> None:
    table = DOC[DOC.index("## Error codes") :]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))
    assert _codes(errors.FlowError) - {"flow_error"} <= documented
    assert "internal" in documented


def test_every_setting_named_in_the_doc_exists() -> None:
    named = set(re.findall(r"`(FLOWD_[A-Z_]+)", DOC))
    assert named, "subjects.md names no settings?"
    assert named <= set(ENV.values()), named - set(ENV.values())


def test_stream_names_follow_the_prefix() -> None:
    s = names.Subjects("my-app")
    assert (s.cmd_stream, s.evt_stream) == ("MY_APP_CMD", "MY_APP_EVT")
    assert s.command("id", "start") == "my-app.cmd.id.start"
    with pytest.raises(ValueError, match="prefix"):
        names.Subjects("a.b")
