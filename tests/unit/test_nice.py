"""FLOWD_NICE: read and bounded like every setting; refused, the daemon warns and goes on."""

from __future__ import annotations

import os

import pytest
import structlog
from pydantic import ValidationError

from flowd.cli import flowd as cli
from flowd.config import Settings


def test_nice_is_read_from_the_environment_and_bounded() -> None:
    assert Settings.from_env({}).nice is None  # untouched: inherited
    assert Settings.from_env({"FLOWD_NICE": "-10"}).nice == -10
    for bad in ("-21", "20", "high"):
        with pytest.raises(ValidationError):
            Settings.from_env({"FLOWD_NICE": bad})


def test_a_refused_nice_is_a_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    with structlog.testing.capture_logs() as logs:
        assert cli.set_nice(-10) is False
    (warning,) = [e for e in logs if e["event"] == "nice_refused"]
    assert warning["nice"] == -10
    assert warning["running_at"] == os.getpriority(os.PRIO_PROCESS, 0)
    assert warning["log_level"] == "warning"


def test_an_accepted_nice_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    assert cli.set_nice(5) is True
    assert calls == [(os.PRIO_PROCESS, 0, 5)]
